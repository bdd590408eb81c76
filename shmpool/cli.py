"""shmpool-inspect: look at live pools from any terminal, or from a script.

Design
------
Inspecting never changes a pool, and never takes its lock: the segment is
mapped read-only and its metadata copied while the lock is free (a quiet
copy: no critical section ran during it), retrying until ``--lock-timeout``
(0.25 s); then the last copy is kept, marked ``"consistent": false``, with
who holds the lock. How, and why, is in ``shmpool/_inspect/``, one concern
a module: ``snapshot`` (the copy and the lock holder), ``numbers`` (the
pool's numbers, by the C code ``stats()`` runs, so the two never disagree;
the slot map, holders, queues), ``audit`` (``--check``), ``render`` (the
text). This module parses the arguments and runs the commands; only
``--reclaim-dead`` and ``--destroy`` write (they attach to the pool, or
unlink a stale one).

``--check`` audits three copies, a little apart (0.05 s, then 0.2 s), and
reports a finding only if it shows in all three: a busy pool's passing
inconsistencies (a cache push caught half way) are not damage. It fails
with exit status 1 when the pool is damaged, when elements are held by dead
processes, dead processes' sleepers (in alloc or on a queue) are still
counted or parked frees were left by a process that died (those say to run
``shmpool-inspect --reclaim-dead NAME``, or ``pool.reclaim_dead()``). An
element in a queue is the queue's, not its sender's: one whose sender died
is no finding. A held or cached slot whose owner field names no process
ever attached (owner 0, a vacant registry entry, or one beyond
``H_ENTRIES_USED``) is damage: reclaim_dead refuses such a pool.

Who is alive: a registry entry belongs to a live process iff its epoch is
not 0 and some open file description holds the OFD lock on the entry's
byte of the segment (``_procs.entry_alive``); the kernel drops that lock
when its process dies, whatever the pid namespaces. Pids are shown as the
processes recorded them (they may be another pid namespace's): a command
name is shown only for a pid that runs here with the recorded start time.
The creator is alive if its pid runs with the start time the header
recorded at create.

Slot map: one character per slot, or per group of slots for big pools (at
most 8 rows of 64)::

    R  in the reserve          H  held by a live process
    .  free in the arena       P  parked: freed while the lock (or the
    c  free in a process's        reserve's empty place) was busy; the
       cache                      next lock holder completes the free
    Q  in a queue              X  held by a dead process
       (shmpool.queues)        ?  no valid state, queued in a queue that
    S  shared: published to a     does not exist, or held or cached by no
       topic (shmpool.topics)     process ever attached (damage)

A character for a group shows the state most of its slots are in (a tie
goes to the busier state: P, H, S, Q, R, c, then .), except that a group with
any ``?`` slot shows ``?`` and else one with any ``X`` slot shows ``X``:
problems are never averaged away.

JSON keys (``--json``; stable: keys may be added, never renamed)
----------------------------------------------------------------
One pool (``NAME --json``; one document per line with ``--watch``)::

    schema (2), name, layout_version, path, status ("live" | "destroyed"),
    consistent (bool: a quiet copy, see above),
    geometry {slot_size, capacity, stride, total_bytes},
    min_nr, curr_nr, arena_free, arena_shared, arena_cached, in_use,
    parked, queued, nr_waiters, fail_rate, seed, poison (bool),
    reserve_low_water, longest_sleep, total_sleep (seconds), attached,
    counters {alloc_arena, alloc_reserve, alloc_failed, free_reserve,
              free_arena, sleeps, faults_injected, poison_errors,
              lock_recoveries, reclaimed},
    sizing {min_nr, reserve_low_water, alloc_reserve, allocations, sleeps,
            longest_sleep, total_sleep, verdict (the line on min_nr)},
    oldest_held [{slot, handle, age (seconds), pid, entry, alive}]
        (held elements, oldest first; the first 16 unless --all),
    published (elements shared by topics now, in in_use too),
    topics [{name, index, depth, overflow, published, dropped, shared,
             subscribers [{index, pid, entry, alive, pending, received,
                           dropped}]}]
        (one per live topic: published and dropped are counters, shared
        its elements out now; a subscriber's pending elements wait in its
        ring, received ones it got and has not released),
    rates {the counters' keys: per second; --watch only, from frame 2},
    reserve_stack [slot, ...]  (top first; the first 16 unless --all),
    holders [{pid, name, command, alive, held, cached, sleeping, entry,
              epoch, queue_sleeping, oldest_age}]
        (one per registry entry whose process is alive, or that holds,
        caches or sleeps; then one with entry null for held slots that
        name no process ever attached (damage); sleeping: its threads in a
        sleeping alloc, queue_sleeping: its threads asleep in a blocked put
        or get, on any queue),
    queues [{name, index, depth, count, waiters, getters, putters, puts,
             gets}]
        (one per live queue, by index in the queue table: count is the
        elements in it now, getters and putters the threads asleep in a
        blocked get and put on it, waiters their sum, puts and gets its
        counters),
    slot_counts {arena, cached, reserve, queued, shared, held, parked,
                 held_dead, invalid},
    slot_map (string, legend above), slot_map_group (slots per character),
    lock {held (bool), pid, alive, held_for_s, waited_s, error,
          entry, epoch, seq, waiters, held_throughout},
    creator {pid, alive, created_s (Unix time)}

The numbers ``min_nr`` .. ``nr_waiters`` are derived by the code that
``Mempool.stats()`` runs, and with ``counters`` are those of ``stats()``
(``arena_free`` is ``arena_shared + arena_cached``): ``curr_nr +
arena_free + in_use + queued == capacity``. ``in_use`` counts the elements
processes hold and the parked ones (``parked``, also in ``in_use``: freed
while the lock was busy, not yet back), not those in queues (``queued``);
``nr_waiters`` counts sleeping allocations and every queue's sleepers.
``NAME --check --json``: {schema, name, consistent, ok, findings
[sentence, ...]}. No NAME: a list with, per pool, {schema, name,
slot_size, capacity, min_nr, curr_nr, in_use, nr_waiters, creator_pid,
creator_alive, consistent, queued, stale, damaged}, or {schema, name,
error} for one that cannot be read. ``stale``: creator and every attached
process dead (``--destroy`` removes it); ``damaged``: the header's counts
cannot be a whole pool's (the text listing says DAMAGED instead of showing
them). ``holders[].command`` is what the COMMAND column shows (the script,
``-m module``, or ``mp child of PID`` for a multiprocessing child; ``name``
is the process name). ``lock``: ``pid`` is the pid recorded in the
holder's registry entry, null when the lock's token names no current entry
(the holder is gone), ``alive`` by the entry's OFD lock, ``entry`` and
``epoch`` the token's, ``seq`` the acquisitions so far, ``waiters`` the
contenders asleep on it, ``waited_s`` how long the inspector waited for a
quiet copy, ``held_throughout`` whether one holder kept it all that time;
``error`` is always null (kept for old readers).

Since layout v6 (schema still 1): new ``parked`` and
``slot_counts.parked`` (the slot map's ``P``); ``queues[].getters`` and
``putters`` (``waiters`` stays their sum); a held or cached slot naming no
process ever attached counts as ``invalid`` (``?``), no longer as
``held_dead`` (``X``), and held slots naming a vacant or never used entry
count in the holders row with entry null (that entry's row no longer shows
them); there are no semaphores (the lock and the wait channels are words
of the segment).

Schema 2 (layout v8): new ``reserve_low_water`` (the lowest ``curr_nr``
since create), ``longest_sleep`` and ``total_sleep`` (sleeping
allocations' time asleep), ``attached`` (processes attached now, by their
OFD locks), all as ``stats()`` has them; ``sizing`` (the same numbers with
the allocations the reserve served, and the verdict on ``min_nr`` the text
page shows); ``oldest_held`` and ``holders[].oldest_age``: how long each
held element has been out since it was allocated (its hand-out time in the
segment; a put or get does not reset it). Nothing was renamed.
``NAME --prometheus`` prints the numbers in the Prometheus text format
(``shmpool.metrics``), no JSON.

From a script: ``list_pools()``, ``take_copy(name)``, ``describe(copy)``,
``render(document)``, ``render_list(pools)``, ``check_pool(name)`` and the
slot map's ``slot_codes``, ``slot_map`` and codes ``M_*`` (``__all__``).

Exit status: 0 fine; 1 ``--check`` found problems; 2 usage error, no such
pool, or not a pool (a message on stderr), or ``--reclaim-dead`` of a
damaged pool; 3 ``--destroy`` refused (the pool is in use; ``--force``);
130 interrupted (but ``--watch``, which ends with 0 on Ctrl-C and when its
pool is gone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import Any

from . import _segment
from ._errors import PoolFormatError
from ._inspect import (
    LIST_LOCK_TIMEOUT,
    LOCK_TIMEOUT,
    M_ARENA,
    M_CACHED,
    M_DEAD,
    M_HELD,
    M_INVALID,
    M_PARKED,
    M_QUEUED,
    M_RESERVE,
    MAP_ROWS,
    MAP_WIDTH,
    PROG,
    SCHEMA,
    InspectError,
    PoolMissing,
    check_pool,
    creator,
    describe,
    find_pools,
    render,
    render_list,
    slot_codes,
    slot_map,
    summarize,
    take_copy,
)
from ._procs import live_pids
from .metrics import exposition
from .pool import Mempool

__all__ = [
    "LOCK_TIMEOUT",
    "MAP_ROWS",
    "MAP_WIDTH",
    "M_ARENA",
    "M_CACHED",
    "M_DEAD",
    "M_HELD",
    "M_INVALID",
    "M_PARKED",
    "M_QUEUED",
    "M_RESERVE",
    "SCHEMA",
    "InspectError",
    "PoolMissing",
    "check_pool",
    "describe",
    "list_pools",
    "main",
    "render",
    "render_list",
    "slot_codes",
    "slot_map",
    "take_copy",
]

EXIT_REFUSED = 3  # --destroy of a pool in use, without --force
EXAMPLES = f"""\
examples:
  shmpool-inspect                     every pool on this machine, one line each
  shmpool-inspect demo                the whole picture of pool "demo"
  shmpool-inspect demo --json         the same, as JSON for a script
  shmpool-inspect demo --watch 0.5    redraw twice a second, with rates
  shmpool-inspect demo --check        audit it: exit 1, one line a problem
  shmpool-inspect demo --prometheus   its metrics, in the Prometheus text format
  shmpool-inspect demo --reclaim-dead take back dead processes' elements

slot map: R reserve, . arena free, c free in a process's cache,
          Q in a queue, S shared (a topic's), H held by a live process,
          P parked (being freed),
          X held by a dead one, ? damaged
          (for big pools a character stands for a group of slots)

It never takes the pool lock: it copies the pool's metadata while the lock
is free (--lock-timeout bounds the wait for that).

stale: a pool whose creator and attached processes are all dead (remove it
with --destroy); DAMAGED: its counts cannot be right (see --check).

exit status: 0 fine (and --watch ended by Ctrl-C or by its pool going away),
1 --check found problems, 2 usage error, no such pool, not a pool or a
damaged one, 3 --destroy refused (the pool is in use), 130 interrupted.
JSON keys: see shmpool/cli.py (every document has "schema": {SCHEMA}).
"""


def list_pools() -> list[dict[str, Any]]:
    """Every shmpool pool in /dev/shm, one summary each (see the module doc),
    by name. A pool this user may not read is listed as such, one that
    vanishes meanwhile is left out."""
    out: list[dict[str, Any]] = []
    for name, kind in find_pools():
        if kind != "pool":
            out.append({"schema": SCHEMA, "name": name, "error": kind})
            continue
        try:
            out.append(summarize(take_copy(name, LIST_LOCK_TIMEOUT, summary=True)))
        except PoolMissing:
            continue
        except InspectError as exc:
            out.append({"schema": SCHEMA, "name": name, "error": str(exc)})
    return out


def _emit(text: str) -> None:
    print(text, flush=True)


class _Stop(BaseException):
    """SIGINT or SIGTERM during --watch (raised once, by its handler)."""


def watch(name: str, interval: float, lock_timeout: float, as_json: bool, show_all: bool = False) -> int:
    """Redraw pool ``name`` every ``interval`` seconds, with the counters'
    rates, until SIGINT or SIGTERM (exit 0) or until the pool is gone,
    destroyed or replaced by another of the same name (said on stderr, exit
    0). InspectError if it cannot be shown at the start."""
    stopping = [False]  # once set, further signals are ignored

    def on_signal(signum: int, frame: Any) -> None:
        if not stopping[0]:
            stopping[0] = True
            raise _Stop  # at once, even in a wait for a quiet copy

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return _watch_frames(name, interval, lock_timeout, as_json, show_all, stopping)
    except _Stop:
        return 0


def _watch_frames(
    name: str, interval: float, lock_timeout: float, as_json: bool, show_all: bool, stopping: list[bool],
) -> int:
    def gone(why: str) -> int:
        stopping[0] = True  # from here on, a signal changes nothing
        print(f"{PROG}: pool {name!r} {why}", file=sys.stderr)
        return 0

    previous: tuple[float, dict[str, int]] | None = None
    identity: tuple[int, int] | None = None
    while True:
        try:
            copy = take_copy(name, lock_timeout, scan_poison=False)
        except InspectError as exc:
            if identity is None:
                stopping[0] = True
                raise
            return gone("is gone" if isinstance(exc, PoolMissing) else f"cannot be shown any more ({exc})")
        if identity is not None and copy.identity != identity:
            return gone("is gone (replaced by a new pool of that name)")
        identity = copy.identity
        now = time.monotonic()
        d = describe(copy, show_all)
        if previous is not None:
            dt = now - previous[0]
            d["rates"] = {k: round((v - previous[1][k]) / dt, 3) for k, v in d["counters"].items()}
        previous = (now, d["counters"])
        if as_json:
            _emit(json.dumps(d))
        else:
            clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
            _emit(clear + render(d, when=time.strftime("%H:%M:%S")) + "\n")
        if d["status"] != "live":
            return gone("is gone (destroyed)")
        time.sleep(max(0.0, now + interval - time.monotonic()))  # a signal's _Stop ends it at once


def reclaim(name: str, lock_timeout: float = LOCK_TIMEOUT) -> int:
    """--reclaim-dead: it attaches as a process (which itself takes back
    what a dead predecessor in its registry entry left), then calls
    ``reclaim_dead``. Says, per dead process, what it held, cached and
    slept on (as a copy just before saw it), then how many elements came
    back: the rise of the pool's ``reclaimed`` counter meanwhile (another
    process reclaiming at the same moment is counted too). A damaged pool
    (PoolFormatError) is refused, exit status 2."""
    before = describe(take_copy(name, lock_timeout, scan_poison=False))
    try:
        with Mempool.attach(name) as pool:
            taken = pool.reclaim_dead()
            reclaimed = pool.stats().reclaimed
    except FileNotFoundError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except (OSError, PoolFormatError, ValueError) as exc:
        raise InspectError(str(exc)) from None
    for h in before["holders"]:
        if h["entry"] is None or h["alive"] or not (h["held"] or h["cached"] or h["sleeping"] or h["queue_sleeping"]):
            continue
        what = f"{h['held']} held element(s), {h['cached']} cached slot(s), {h['sleeping']} sleeping" + (
            f", {h['queue_sleeping']} asleep on queues" if h["queue_sleeping"] else "")
        _emit(f"  pid {h['pid']} (dead): {what} (registry entry {h['entry']})")
    taken = max(taken, reclaimed - before["counters"]["reclaimed"])
    _emit(f"reclaimed {taken} element(s) from dead processes in pool {name!r}")
    return 0


def destroy(name: str, force: bool = False) -> int:
    """--destroy: remove pool ``name`` (its segment and FIFOs). A stale
    pool (its creator and every attached process dead) goes at once; a
    live one (creator alive, or any process attached per
    ``_procs.live_pids``) is refused with exit status 3 unless ``force``:
    then it is destroyed as ``destroy(force=True)`` would (attached
    processes get PoolDestroyedError, sleepers are woken)."""
    made = creator(take_copy(name, LIST_LOCK_TIMEOUT, scan_poison=False, summary=True).views)
    try:
        live = [pid for pid, _ in live_pids(name)]
    except FileNotFoundError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except (OSError, PoolFormatError) as exc:
        raise InspectError(str(exc)) from None
    users = ([f"its creator (pid {made['pid']})"] if made["alive"] else []) + (
        [f"attached pid(s) {', '.join(map(str, live))}"] if live else [])
    if users and not force:
        print(f"{PROG}: pool {name!r} is in use ({'; '.join(users)} alive): not destroyed "
              "(--force destroys it anyway)", file=sys.stderr)
        return EXIT_REFUSED
    if users:
        try:
            Mempool.attach(name).destroy(force=True)
        except FileNotFoundError:
            raise PoolMissing(f"no pool named {name!r}") from None
        except (OSError, PoolFormatError, ValueError):
            _segment.unlink(name)  # a pool that cannot be attached: remove its names
    elif not _segment.unlink(name):
        raise PoolMissing(f"no pool named {name!r}")
    _emit(f"destroyed pool {name!r}" + ("" if users else " (stale: its creator and attached processes were dead)"))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show shmpool pools: every pool on this machine, or one in full.\n"
                    "Read-only: it never changes a pool (but --reclaim-dead writes).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="the pool to show (default: list every pool)")
    parser.add_argument("--json", action="store_true", help="print JSON (keys documented in shmpool/cli.py)")
    parser.add_argument("--all", action="store_true", help="show the whole reserve stack")
    parser.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 1) with rates, until Ctrl-C or the pool is gone")
    parser.add_argument("--check", action="store_true", help="audit the pool: exit 1 with one line per problem")
    parser.add_argument("--prometheus", action="store_true",
                        help="print the pool's metrics in the Prometheus text format (shmpool.metrics)")
    parser.add_argument("--reclaim-dead", action="store_true",
                        help="take back elements held by dead processes (writes to the pool)")
    parser.add_argument("--destroy", action="store_true",
                        help="remove the pool if it is stale (creator and attached processes dead); "
                             "exit 3 if it is in use, unless --force")
    parser.add_argument("--force", action="store_true", help="with --destroy: remove a pool in use too")
    parser.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT, metavar="SECONDS",
                        help="try this long for a copy taken while the pool lock is free, then keep the last "
                             f"(default {LOCK_TIMEOUT}; the lock itself is never taken)")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    modes = [flag for flag, on in (("--watch", args.watch is not None), ("--check", args.check),
                                   ("--prometheus", args.prometheus),
                                   ("--reclaim-dead", args.reclaim_dead), ("--destroy", args.destroy)) if on]
    if modes and not args.name:
        parser.error(f"{modes[0]} needs a pool name")
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} cannot be combined")
    if args.watch is not None and not 0 < args.watch < math.inf:
        parser.error("--watch needs a positive number of seconds")
    if args.prometheus and (args.json or args.all):
        parser.error("--prometheus prints the Prometheus text format: no --json or --all")
    if args.force and not args.destroy:
        parser.error("--force goes with --destroy only")
    if not 0 <= args.lock_timeout <= 3600:
        parser.error("--lock-timeout needs a number of seconds from 0 to 3600")


def _run(args: argparse.Namespace) -> int:
    if args.name is None:
        pools = list_pools()
        _emit(json.dumps(pools, indent=2) if args.json else render_list(pools))
        return 0
    if args.reclaim_dead:
        return reclaim(args.name, args.lock_timeout)
    if args.destroy:
        return destroy(args.name, args.force)
    if args.watch is not None:
        return watch(args.name, args.watch, args.lock_timeout, args.json, args.all)
    if args.check:
        copy, findings = check_pool(args.name, args.lock_timeout)
        if args.json:
            _emit(json.dumps({"schema": SCHEMA, "name": args.name, "consistent": copy.consistent, "ok": not findings,
                              "findings": findings}, indent=2))
        else:
            _emit("\n".join(findings) if findings else
                  f"pool {args.name!r}: all checks pass ({copy.views.geo.capacity} slots)")
        return 1 if findings else 0
    d = describe(take_copy(args.name, args.lock_timeout, scan_poison=False), show_all=args.all)
    if args.prometheus:
        sys.stdout.write(exposition(args.name, d))
        return 0
    _emit(json.dumps(d, indent=2) if args.json else render(d))
    return 0


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so that the interpreter's
    final flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """The console script. Returns the exit status (see the module doc)."""
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors: exit 2 with a message on stderr
    _validate(parser, args)
    try:
        return _run(args)
    except InspectError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
