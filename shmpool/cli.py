"""shmpool-inspect: look at live pools from any terminal, or from a script.

Design
------
Inspecting never changes a pool. The segment is mapped read-only, and the
pool lock is taken directly on its semaphore, for a short bound and without
recording a holder (recording would write the header): under it, the whole
segment is copied and everything shown is computed from the copy, with
numpy over the per-slot words (a million slots take milliseconds). If the
lock does not come within the bound (a process stuck, or killed, holding
it), the copy is taken without it and marked possibly inconsistent.
``--reclaim-dead`` is the one exception, and says so: it attaches as a
process and takes back the elements of dead holders.

JSON keys (``--json``, stable)
------------------------------
One pool::

    name, layout_version, path, consistent (bool: copied under the lock),
    geometry {slot_size, capacity, stride, total_bytes},
    min_nr, curr_nr, arena_free, arena_shared, arena_cached, in_use,
    nr_waiters, fail_rate, seed, poison (bool), status ("live"|"destroyed"),
    counters {alloc_arena, alloc_reserve, alloc_failed, free_reserve,
              free_arena, sleeps, faults_injected, poison_errors,
              lock_recoveries, reclaimed},
    rates {same keys, per second; --watch only, from the second frame},
    reserve_stack [slot, ...] (top first; the first 16 unless --all),
    holders [{pid, name, alive, held, cached, sleeping}],
    slot_map (string, legend below), slot_map_group (slots per character),
    lock {held, pid, alive, held_for_s},
    creator {pid, alive}, findings [...] (with --check)

No name: a list of {name, slot_size, capacity, min_nr, curr_nr, in_use,
nr_waiters, creator_alive} or {name, error}.

Slot map: ``R`` in the reserve, ``.`` free in the arena, ``c`` free in a
process's cache, ``H`` held by a live process, ``X`` held by a dead one.
When a character stands for a group of slots, it shows the group's most
telling state, in the order X, H, c, R, ``.``.

Exit status: 0 fine; 1 ``--check`` found problems; 2 usage error, no such
pool, or not a pool.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import posix_ipc
import psutil

from . import _segment
from ._debug import audit
from ._errors import PoolFormatError
from ._layout import (
    COUNTERS,
    FLAG_POISON,
    H_ARENA_FREE,
    H_CREATOR_PID,
    H_CURR_NR,
    H_FAIL_RATE,
    H_FLAGS,
    H_LOCK_PID,
    H_LOCK_SINCE_NS,
    H_LOCK_START,
    H_MIN_NR,
    H_NR_WAITERS,
    H_SEED,
    H_STATUS,
    LAYOUT_VERSION,
    MAGIC,
    N_PROC_COUNTERS,
    P_COUNTERS,
    P_PID,
    P_SLEEPING,
    P_START,
    PID_SHIFT,
    PROC_WORDS,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_RESERVE,
    STATE_MASK,
    STATUS_LIVE,
    Views,
    cached_slots,
    read_geometry,
)
from ._procs import is_alive

PROG = "shmpool-inspect"
MAP_CHARS = 512  # at most this many characters of slot map (8 rows of 64)
MAP_WIDTH = 64
STACK_SHOWN = 16
EXAMPLES = """examples:
  shmpool-inspect                   every pool on this machine, one line each
  shmpool-inspect demo              the whole picture of pool "demo"
  shmpool-inspect demo --json       the same, as JSON for a script
  shmpool-inspect demo --watch 0.5  redraw twice a second, with rates
  shmpool-inspect demo --check      audit it: exit 1 and one line a problem
  shmpool-inspect demo --reclaim-dead   take back dead processes' elements
"""


class InspectError(Exception):
    """A pool that cannot be shown (exit status 2)."""


@dataclass
class Copy:
    """A pool's segment, copied; ``consistent`` if copied under its lock."""

    name: str
    views: Views
    consistent: bool
    lock_value: int


def _open(name: str) -> tuple[mmap.mmap, int]:
    try:
        shm = posix_ipc.SharedMemory(_segment.shm_name(name), read_only=True)
    except posix_ipc.ExistentialError:
        raise InspectError(f"no pool named {name!r}") from None
    except posix_ipc.PermissionsError:
        raise InspectError(f"pool {name!r}: permission denied") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size == 0:
            raise InspectError(f"{name!r} is not a shmpool pool (empty segment)")
        return mmap.mmap(shm.fd, size, prot=mmap.PROT_READ), size
    finally:
        shm.close_fd()


def take_copy(name: str, lock_timeout: float) -> Copy:
    """Copy pool ``name``'s segment, under its lock if it comes in time."""
    _segment.check_name(name)
    mm, size = _open(name)
    try:
        try:
            geo = read_geometry(mm, size)
        except PoolFormatError as exc:
            raise InspectError(f"{name!r} is not a usable shmpool pool: {exc}") from None
        lock_name = _segment.sem_names(name)[0]
        try:
            sem = posix_ipc.Semaphore(lock_name)
        except posix_ipc.Error:
            sem = None
        consistent = False
        value = -1
        try:
            if sem is not None:
                value = sem.value
                try:
                    sem.acquire(lock_timeout)
                    consistent = True
                except posix_ipc.BusyError:
                    pass
            data = bytearray(mm[: geo.total])
        finally:
            if sem is not None:
                if consistent:
                    sem.release()
                sem.close()
    finally:
        mm.close()
    return Copy(name, Views(data, geo), consistent, value)  # type: ignore[arg-type]


def _proc_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"


def describe(copy: Copy, show_all: bool = False) -> dict[str, Any]:
    """Everything about one pool, as the JSON document (see the module doc)."""
    v, geo = copy.views, copy.views.geo
    hdr = v.hdr
    cap = geo.capacity
    words = np.frombuffer(v.words, dtype=np.uint64)
    states = (words & np.uint64(STATE_MASK)).astype(np.uint8)
    owners = words >> np.uint64(PID_SHIFT)
    procs = np.frombuffer(v.procs, dtype=np.uint64).reshape(geo.max_procs, PROC_WORDS)
    registered = {int(procs[i, P_PID]): i for i in np.flatnonzero(procs[:, P_PID]).tolist()}

    def alive(pid: int) -> bool:
        row = registered.get(pid)
        return row is not None and is_alive(pid, int(procs[row, P_START]))

    held = states == ST_HELD
    cached_mask = states == ST_CACHED
    pids = set(np.unique(owners[held | cached_mask]).tolist()) | set(registered)
    holders = []
    liveness = {}
    for pid in sorted(pids):
        liveness[pid] = alive(pid)
        row = registered.get(pid)
        holders.append({
            "pid": pid,
            "name": _proc_name(pid) if liveness[pid] else "",
            "alive": liveness[pid],
            "held": int(np.count_nonzero(held & (owners == pid))),
            "cached": int(np.count_nonzero(cached_mask & (owners == pid))),
            "sleeping": int(procs[row, P_SLEEPING]) if row is not None else 0,
        })
    dead_pids = [pid for pid, ok in liveness.items() if not ok]
    dead_held = held & np.isin(owners, dead_pids) if dead_pids else np.zeros(cap, dtype=bool)

    per_proc = procs[:, P_COUNTERS : P_COUNTERS + N_PROC_COUNTERS].sum(axis=0).tolist()
    counters = {name: int(hdr[index]) + (int(per_proc[i]) if i < N_PROC_COUNTERS else 0)
                for i, (name, index) in enumerate(COUNTERS)}
    curr_nr, shared = int(hdr[H_CURR_NR]), int(hdr[H_ARENA_FREE])
    cached = int(cached_slots(procs).sum())
    stack = np.frombuffer(v.stack, dtype=np.uint32)[: min(curr_nr, cap)][::-1]
    lock_pid = int(hdr[H_LOCK_PID])
    since = int(hdr[H_LOCK_SINCE_NS])
    lock_held = copy.lock_value == 0 or bool(lock_pid)
    creator = int(hdr[H_CREATOR_PID])
    return {
        "name": copy.name,
        "layout_version": LAYOUT_VERSION,
        "path": os.path.join(_segment.SHM_DIR, _segment.SHM_PREFIX + copy.name),
        "consistent": copy.consistent,
        "geometry": {"slot_size": geo.slot_size, "capacity": cap, "stride": geo.stride, "total_bytes": geo.total},
        "min_nr": int(hdr[H_MIN_NR]),
        "curr_nr": curr_nr,
        "arena_free": shared + cached,
        "arena_shared": shared,
        "arena_cached": cached,
        "in_use": cap - curr_nr - shared - cached,
        "nr_waiters": int(hdr[H_NR_WAITERS]),
        "fail_rate": float(v.fhdr[H_FAIL_RATE]),
        "seed": int(hdr[H_SEED]),
        "poison": bool(hdr[H_FLAGS] & FLAG_POISON),
        "status": "live" if hdr[H_STATUS] == STATUS_LIVE else "destroyed",
        "counters": counters,
        "reserve_stack": [int(x) for x in (stack if show_all else stack[:STACK_SHOWN])],
        "holders": holders,
        **slot_map(states, dead_held),
        "lock": {
            "held": lock_held,
            "pid": lock_pid or None,
            "alive": is_alive(lock_pid, int(hdr[H_LOCK_START])) if lock_pid else None,
            "held_for_s": round((time.monotonic_ns() - since) / 1e9, 3) if lock_pid and since else None,
        },
        "creator": {"pid": creator, "alive": alive(creator) if creator in registered else psutil.pid_exists(creator)},
    }


def slot_map(states: np.ndarray, dead_held: np.ndarray) -> dict[str, Any]:
    """One character per slot, or per group of slots for large pools."""
    codes = np.full(states.shape, 0, dtype=np.uint8)  # rank: . R c H X
    codes[states == ST_RESERVE] = 1
    codes[states == ST_CACHED] = 2
    codes[states == ST_HELD] = 3
    codes[dead_held] = 4
    codes[(states != ST_ARENA) & (codes == 0)] = 4  # an invalid state: show it loudly
    group = max(1, math.ceil(states.size / MAP_CHARS))
    padded = np.zeros(math.ceil(states.size / group) * group, dtype=np.uint8)
    padded[: states.size] = codes
    ranks = padded.reshape(-1, group).max(axis=1)
    return {"slot_map": "".join(np.array(list(".RcHX"))[ranks]), "slot_map_group": group}


def list_pools() -> list[dict[str, Any]]:
    """Every shmpool pool in /dev/shm, found by its magic number."""
    out = []
    for entry in sorted(os.listdir(_segment.SHM_DIR)):
        if entry.startswith("sem.") or not entry.startswith(_segment.SHM_PREFIX):
            continue  # pools are named shmpool.*, but only the magic says which are pools
        name = entry[len(_segment.SHM_PREFIX) :]
        path = os.path.join(_segment.SHM_DIR, entry)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except PermissionError:
            out.append({"name": name, "error": "no permission"})
            continue
        except OSError:
            continue
        if len(head) < 8 or int.from_bytes(head, "little") != MAGIC:
            continue
        try:
            d = describe(take_copy(name, 0.05))
        except (InspectError, ValueError) as exc:
            out.append({"name": name, "error": str(exc)})
            continue
        out.append({
            "name": name, "slot_size": d["geometry"]["slot_size"], "capacity": d["geometry"]["capacity"],
            "min_nr": d["min_nr"], "curr_nr": d["curr_nr"], "in_use": d["in_use"], "nr_waiters": d["nr_waiters"],
            "creator_alive": d["creator"]["alive"],
        })
    return out


def render_list(pools: list[dict[str, Any]]) -> str:
    lines = [f"{'NAME':<20} {'SLOT':>6} {'CAPACITY':>9} {'MIN':>5} {'CURR':>5} {'IN USE':>8} {'WAIT':>4}  CREATOR"]
    for p in pools:
        if "error" in p:
            lines.append(f"{p['name'][:20]:<20} ({p['error']})")
            continue
        lines.append(
            f"{p['name'][:20]:<20} {p['slot_size']:>6} {p['capacity']:>9} {p['min_nr']:>5} {p['curr_nr']:>5} "
            f"{p['in_use']:>8} {p['nr_waiters']:>4}  {'alive' if p['creator_alive'] else 'gone'}"
        )
    if not pools:
        lines.append("(no pools)")
    return "\n".join(lines)


def _bar(curr: int, min_nr: int, width: int = 20) -> str:
    filled = round(width * curr / min_nr) if min_nr else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render(d: dict[str, Any]) -> str:
    g = d["geometry"]
    lock = d["lock"]
    if not lock["held"]:
        lock_text = "free"
    elif lock["pid"]:
        state = "alive" if lock["alive"] else "DEAD"
        lock_text = f"held by pid {lock['pid']} ({state}) for {lock['held_for_s']} s"
    else:
        lock_text = "held, holder not recorded"
    lines = [
        f"pool {d['name']}  (layout v{d['layout_version']}, {d['path']})" + ("" if d["status"] == "live" else "  DESTROYED"),
        "" if d["consistent"] else "  WARNING: the lock was not free; this copy was taken without it\n"
        "           and may be inconsistent",
        f"  geometry   {g['capacity']} slots of {g['slot_size']} bytes (stride {g['stride']}), {g['total_bytes']} bytes",
        f"  reserve    {_bar(d['curr_nr'], d['min_nr'])} {d['curr_nr']}/{d['min_nr']} (curr_nr/min_nr)",
        f"  arena      {d['arena_free']} free ({d['arena_shared']} shared, {d['arena_cached']} in process caches)",
        f"  in use     {d['in_use']}",
        f"  waiters    {d['nr_waiters']} sleeping",
        f"  faults     fail_rate {d['fail_rate']:.2f}, seed {d['seed']}",
        f"  poison     {'on' if d['poison'] else 'off'}",
        f"  lock       {lock_text}",
        f"  creator    pid {d['creator']['pid']} ({'alive' if d['creator']['alive'] else 'gone'})",
        "",
        "reserve stack, top first: " + (" ".join(map(str, d["reserve_stack"])) or "(empty)")
        + (" ..." if len(d["reserve_stack"]) < d["curr_nr"] else ""),
        "",
        f"{'PID':>8}  {'COMMAND':<16} {'ALIVE':<5} {'HELD':>8} {'CACHED':>7} {'SLEEP':>5}",
    ]
    for h in d["holders"]:
        lines.append(
            f"{h['pid']:>8}  {h['name'][:16]:<16} {'yes' if h['alive'] else 'NO':<5} {h['held']:>8} {h['cached']:>7} "
            f"{h['sleeping']:>5}"
        )
    if not d["holders"]:
        lines.append("    (no processes)")
    lines += ["", "counters" + ("            per second" if d.get("rates") else "")]
    for key, value in d["counters"].items():
        rate = d.get("rates", {}).get(key)
        lines.append(f"  {key:<18} {value:>12}" + (f"  {rate:>12.1f}" if rate is not None else ""))
    group = d["slot_map_group"]
    legend = "R reserve, . arena, c cached, H held, X held by a dead process"
    lines += ["", f"slot map ({legend}" + (f"; 1 char = {group} slots" if group > 1 else "") + ")"]
    smap = d["slot_map"]
    lines += ["  " + smap[i : i + MAP_WIDTH] for i in range(0, len(smap), MAP_WIDTH)]
    return "\n".join(line for i, line in enumerate(lines) if line or i != 1)


def check(copy: Copy) -> list[str]:
    findings = audit(copy.views)
    if not copy.consistent:
        findings.append("the lock was not free: this audit ran on a copy taken without it")
    return findings


def watch(name: str, interval: float, lock_timeout: float, as_json: bool) -> int:
    previous: tuple[float, dict[str, int]] | None = None
    stop = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_sigint)
    while not stop:
        try:
            d = describe(take_copy(name, lock_timeout))
        except InspectError:
            print(f"{PROG}: pool {name!r} is gone", file=sys.stderr)
            return 0
        now = time.monotonic()
        if previous is not None:
            dt = now - previous[0]
            d["rates"] = {k: (v - previous[1][k]) / dt for k, v in d["counters"].items()}
        previous = (now, d["counters"])
        if as_json:
            print(json.dumps(d), flush=True)
        else:
            if sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(render(d) + "\n", flush=True)
        deadline = time.monotonic() + interval
        while not stop and time.monotonic() < deadline:
            time.sleep(min(0.05, interval))  # the redraw pace; Ctrl-C is seen within 50 ms
    return 0


def reclaim(name: str) -> int:
    from .pool import Mempool  # a real attach: this is the one command that writes

    before = describe(take_copy(name, 0.25))
    try:
        with Mempool.attach(name) as pool:
            taken = pool.reclaim_dead()
    except (FileNotFoundError, PoolFormatError) as exc:
        raise InspectError(str(exc)) from None
    for h in before["holders"]:
        if not h["alive"] and (h["held"] or h["cached"]):
            print(f"  pid {h['pid']} (dead): {h['held']} held element(s), {h['cached']} cached slot(s)")
    print(f"reclaimed {taken} element(s) from dead processes in pool {name!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show shmpool pools: all of them, or one in full. Read-only (but --reclaim-dead).",
        epilog=EXAMPLES + "\nexit status: 0 fine, 1 --check found problems, 2 usage error or no such pool",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="the pool (default: list every pool)")
    parser.add_argument("--json", action="store_true", help="print JSON (keys documented in shmpool/cli.py)")
    parser.add_argument("--all", action="store_true", help="show the whole reserve stack")
    parser.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 1) with rates, until Ctrl-C or the pool is gone")
    parser.add_argument("--check", action="store_true", help="audit the pool: exit 1 with one line per problem")
    parser.add_argument("--reclaim-dead", action="store_true", help="take back elements held by dead processes")
    parser.add_argument("--lock-timeout", type=float, default=0.25, metavar="SECONDS",
                        help="how long to wait for the pool lock before copying without it (default 0.25)")
    args = parser.parse_args(argv)
    if (args.watch is not None or args.check or args.reclaim_dead) and not args.name:
        parser.error("--watch, --check and --reclaim-dead need a pool name")
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch needs a positive number of seconds")
    try:
        if args.name is None:
            pools = list_pools()
            print(json.dumps(pools, indent=2) if args.json else render_list(pools))
            return 0
        if args.reclaim_dead:
            return reclaim(args.name)
        if args.watch is not None:
            return watch(args.name, args.watch, args.lock_timeout, args.json)
        copy = take_copy(args.name, args.lock_timeout)
        if args.check:
            findings = check(copy)
            if args.json:
                print(json.dumps({"name": args.name, "findings": findings}))
            else:
                print("\n".join(findings) if findings else f"pool {args.name!r}: all checks pass")
            return 1 if findings else 0
        d = describe(copy, show_all=args.all)
        print(json.dumps(d, indent=2) if args.json else render(d))
        return 0
    except (InspectError, ValueError, TypeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
