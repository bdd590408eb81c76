"""A pool's numbers and its picture, from a copy of its metadata.

One derivation: the pool's numbers (``min_nr``, ``curr_nr``, the shared and
cached arena, ``in_use``, ``queued``, ``parked``, ``nr_waiters``, the
status) come from ``shmpool._core.derive``, the C code that ``stats()`` runs
under the lock (``_core/derive.c``), here run on the copy. So the inspector
and ``stats()`` clamp, count and skip alike and can never disagree; a torn
or damaged copy gives clamped numbers, never an out-of-bounds read. A
summary copy holds zeros where it copied nothing, which reads as nothing
parked and no slot cached but those the caches name, which it copied.

What ``derive`` does not give is slot-level, and stays numpy over the
copy's words (nothing loops over slots in Python): each slot's code in the
slot map, the map itself, the per-holder rows, the per-queue rows and the
counters, summed as ``derive`` sums them (the header's plus every registry
entry's below ``H_ENTRIES_USED``).

Whose is a slot: a HELD or CACHED slot's owner field is a registry entry +
1. It names a live process if that entry is in use (epoch not 0, below
``H_ENTRIES_USED``) and someone holds the entry's OFD lock; a dead one if
in use and nobody does (``reclaim_dead`` takes its elements back); and no
process ever attached if it is 0, beyond the entries used, or a vacant
entry: that is damage (the core refuses such a pool), shown ``?``. A
QUEUED slot's owner field names its queue (index + 1), not a process; a
PARKED slot's names the process that freed it, for the record.

Pids are shown as the processes recorded them (they may be another pid
namespace's): a command name is shown only for a pid that runs here with
the recorded start time.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import psutil

from .. import _segment
from .._core import derive
from .._layout import (
    COUNTERS,
    FLAG_POISON,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
    H_ENTRIES_USED,
    H_FAIL_RATE,
    H_FLAGS,
    H_LOCK_SEQ,
    H_LOCK_WAITERS,
    H_NR_WAITERS,
    H_RNG_KIND,
    H_SEED,
    H_VERSION,
    N_PROC_COUNTERS,
    OWNER_MASK,
    P_COUNTERS,
    P_EPOCH,
    P_PID,
    P_QGET,
    P_QPUT,
    P_SLEEPING,
    P_START,
    PROC_WORDS,
    Q_COUNT,
    Q_DEPTH,
    Q_GETS,
    Q_GETTERS,
    Q_NAME,
    Q_PUTS,
    Q_PUTTERS,
    Q_STATE,
    QUEUE_LIVE,
    QUEUE_NAME_BYTES,
    QUEUE_WORDS,
    RNG_GLIBC,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_PARKED,
    ST_QUEUED,
    ST_RESERVE,
    ST_SHARED,
    STATUS_LIVE,
)
from .._mapping import Views
from .._procs import is_alive, start_ticks
from .sizing import oldest_age_per_entry, oldest_held, sizing
from .snapshot import Copy, cache_slots, fields, procs_table, reserve_slots
from .topics import topic_rows

#: Version of the --json documents' keys (every document carries it as
#: "schema"): raised when a key is renamed or changes meaning.
SCHEMA = 2  # 2: the reserve's record (sizing), ages, attached
STACK_SHOWN = 16  # reserve stack entries shown without --all
MAP_WIDTH = 64  # slot map characters per row
MAP_ROWS = 8  # at most this many rows: bigger pools are grouped
CREATE_TIME_SLACK_S = 1.0  # psutil's start times are derived from a boot time in whole seconds
SLEEPERS_MAX = 1 << 20  # the core's bound: more sleepers is damage (derive counts such a count as 0)

# Slot map codes, in the order of their symbols: 0-5 are normal states
# (ranked for ties: the higher code wins), 6-7 problems (shown if present
# at all).
MAP_SYMBOLS = ".cRQSHPX?"
M_ARENA, M_CACHED, M_RESERVE, M_QUEUED, M_SHARED, M_HELD, M_PARKED, M_DEAD, M_INVALID = range(9)
SLOT_COUNT_KEYS = ("arena", "cached", "reserve", "queued", "shared", "held", "parked", "held_dead", "invalid")
# What an owner field names (owner_verdicts).
V_NONE, V_ALIVE, V_DEAD = 0, 1, 2


def derived(copy: Copy) -> dict[str, Any]:
    """The pool's numbers, by the code ``stats()`` runs (see the module doc):
    min_nr, curr_nr, arena_shared, arena_cached, in_use, queued, parked,
    nr_waiters, status, reserve_low_water, longest_sleep, total_sleep,
    attached (the registry entries in use whose process lived just after
    the copy: a copy has no descriptor for derive to ask)."""
    geo = copy.views.geo
    n: dict[str, Any] = derive(copy.views.mm, geo.capacity, geo.max_procs, geo.max_queues, geo.off_words,
                               geo.off_procs, geo.off_queues)
    n["attached"] = int((copy.alive & in_use_entries(copy.views)).sum())
    return n


def entries_used(v: Views) -> int:
    """How many registry entries a scan looks at (``H_ENTRIES_USED``,
    bounded by the registry), as the core scans them."""
    return min(int(v.hdr[H_ENTRIES_USED]), v.geo.max_procs)


def in_use_entries(v: Views) -> np.ndarray:
    """One bool per registry entry: whether a process ever attached there is
    recorded in it (epoch not 0, below ``H_ENTRIES_USED``)."""
    procs = procs_table(v)
    return np.asarray((np.arange(v.geo.max_procs) < entries_used(v)) & (procs[:, P_EPOCH] != 0))


def owner_verdicts(alive: np.ndarray, in_use: np.ndarray | None = None) -> np.ndarray:
    """Indexed by a HELD or CACHED slot's owner field (entry + 1): V_ALIVE,
    V_DEAD, or V_NONE when it names no process ever attached (0, beyond
    the registry, or an entry not in use). ``alive`` and ``in_use`` hold
    one bool per entry; ``in_use`` None: every entry of ``alive``."""
    if in_use is None:
        in_use = np.ones(alive.size, dtype=bool)
    table = np.full(OWNER_MASK + 1, V_NONE, dtype=np.uint8)
    table[1 : alive.size + 1] = np.where(in_use, np.where(alive, V_ALIVE, V_DEAD), V_NONE)
    return table


def copy_verdicts(copy: Copy) -> np.ndarray:
    """``owner_verdicts`` of the copy's registry."""
    return owner_verdicts(copy.alive, in_use_entries(copy.views))


def cached_per_entry(v: Views) -> np.ndarray:
    """How many slots each registry entry's cache holds, as the core's
    ``cached_by`` counts them for ``derive``: the entries of
    ``cache[0:cache_n]`` that name a slot CACHED by that entry, of entries
    below ``H_ENTRIES_USED`` (never a counter)."""
    idx, valid = cache_slots(procs_table(v), v.geo.capacity)
    valid &= (np.arange(v.geo.max_procs) < entries_used(v))[:, None]
    states, owners = fields(np.frombuffer(v.words, dtype=np.uint64)[idx])
    me = np.arange(1, v.geo.max_procs + 1)[:, None]
    return np.asarray((valid & (states == ST_CACHED) & (owners == me)).sum(axis=1))


def slot_codes(words: np.ndarray, alive: np.ndarray, queue_live: np.ndarray | None = None,
               in_use: np.ndarray | None = None) -> np.ndarray:
    """Each slot's slot-map code (M_*), from its word. A held slot is M_HELD
    or M_DEAD as ``alive`` (one bool per registry entry) says of the entry
    its owner field names, and M_INVALID if that names no process ever
    attached (see ``owner_verdicts``; ``in_use`` None: every entry of
    ``alive`` is in use); a cached slot of no such process is M_INVALID
    too. A queued slot is M_QUEUED if its owner field names a queue that
    ``queue_live`` (one bool per queue table entry) says exists, else
    M_INVALID (None: any queue)."""
    if queue_live is None:
        queue_live = np.ones(OWNER_MASK, dtype=bool)
    return _codes(*fields(words), owner_verdicts(alive, in_use), queue_live)


def _codes(states: np.ndarray, owners: np.ndarray, verdicts: np.ndarray, queue_live: np.ndarray) -> np.ndarray:
    codes = np.full(states.size, M_INVALID, dtype=np.uint8)
    named = verdicts[owners]
    codes[states == ST_ARENA] = M_ARENA
    codes[(states == ST_CACHED) & (named != V_NONE)] = M_CACHED
    codes[states == ST_RESERVE] = M_RESERVE
    queues = np.zeros(OWNER_MASK + 1, dtype=bool)
    queues[1 : queue_live.size + 1] = queue_live
    codes[(states == ST_QUEUED) & queues[owners]] = M_QUEUED  # the others stay M_INVALID
    held = states == ST_HELD
    codes[held & (named == V_ALIVE)] = M_HELD
    codes[held & (named == V_DEAD)] = M_DEAD
    codes[states == ST_PARKED] = M_PARKED
    codes[states == ST_SHARED] = M_SHARED  # (audit checks its topic)
    return codes


def copy_codes(copy: Copy) -> np.ndarray:
    """Every slot's code in ``copy``."""
    return _codes(*copy.slots, copy_verdicts(copy), live_queues(copy.views))


def slot_map(codes: np.ndarray) -> tuple[str, int]:
    """The slot map (see shmpool/cli.py) and how many slots a character
    stands for: one per slot up to MAP_ROWS x MAP_WIDTH slots, grouped
    beyond."""
    n = codes.size
    group = max(1, math.ceil(n / (MAP_ROWS * MAP_WIDTH)))
    symbols = np.array(list(MAP_SYMBOLS))
    if group == 1:
        return "".join(symbols[codes]), 1
    groups = math.ceil(n / group)
    kinds = len(MAP_SYMBOLS)
    key = np.arange(n, dtype=np.int64) // group * kinds + codes
    counts = np.bincount(key, minlength=groups * kinds).reshape(groups, kinds)
    normal = counts[:, M_PARKED::-1]  # P, H, S, Q, R, c, . (reversed: argmax takes the first of a tie)
    shown = M_PARKED - np.argmax(normal, axis=1)
    shown[counts[:, M_DEAD] > 0] = M_DEAD
    shown[counts[:, M_INVALID] > 0] = M_INVALID
    return "".join(symbols[shown]), group


def held_per_owner(copy: Copy) -> np.ndarray:
    """How many slots are HELD under each owner field (OWNER_MASK + 1)."""
    states, owners = copy.slots
    return np.bincount(owners[states == ST_HELD], minlength=OWNER_MASK + 1)


def queue_sleepers(v: Views) -> tuple[np.ndarray, np.ndarray]:
    """How many threads of each registry entry's process sleep in a get and
    in a put on each queue: two (max_procs, max_queues) arrays, the
    entries' P_QGET and P_QPUT bytes."""
    procs, q = procs_table(v), v.geo.max_queues
    get = np.ascontiguousarray(procs[:, P_QGET:P_QPUT]).view(np.uint8)[:, :q].astype(np.int64)
    put = np.ascontiguousarray(procs[:, P_QPUT:PROC_WORDS]).view(np.uint8)[:, :q].astype(np.int64)
    return get, put


@functools.lru_cache(maxsize=1024)
def _command(pid: int, start: int) -> str:
    """The command name of process ``pid`` if it runs here with start time
    ``start`` (a pid recorded in another pid namespace names a stranger
    here), else ''."""
    if not is_alive(pid, start):
        return ""
    try:
        return str(psutil.Process(pid).name())
    except (psutil.Error, OSError):
        return ""


#: Interpreter options that take a value (``python -W x``): skipped to find
#: the script.
_PY_VALUE_OPTS = {"-W", "-X", "--check-hash-based-pycs"}


@functools.lru_cache(maxsize=1024)
def _command_line(pid: int, start: int) -> str:
    """What the COMMAND column shows for process ``pid`` (if it runs here
    with start time ``start``, else ''): for a Python interpreter, what it
    runs (the script path, ``-m module``, ``mp child of PID`` for a
    multiprocessing child, ``python -c``), else the process name."""
    name = _command(pid, start)
    if not name:
        return ""
    try:
        proc = psutil.Process(pid)
        argv, ppid = proc.cmdline(), proc.ppid()
    except (psutil.Error, OSError):
        return name
    if not argv or (not os.path.basename(argv[0]).startswith("python") and not name.startswith("python")):
        return name
    joined = " ".join(argv)
    if "multiprocessing" in joined and ("spawn_main" in joined or "--multiprocessing-fork" in argv
                                        or "forkserver" in joined):
        return f"mp child of {ppid}"
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return f"-m {next(args, '?')}"
        if arg.startswith("-m") and len(arg) > 2:
            return f"-m {arg[2:]}"
        if arg == "-c" or arg.startswith("-c"):
            return "python -c"
        if arg in _PY_VALUE_OPTS:
            next(args, None)
            continue
        if arg.startswith("-"):
            continue
        return str(arg)  # the script
    return name


def creator_alive(pid: int, created_ns: int, start: int = 0) -> bool:
    """Whether the process that created a pool at ``created_ns`` (wall
    clock) still runs. Exactly, by its recorded start time, when the header
    has it; else a live, non-zombie process has its pid and started no later
    than the pool was created (else the pid was reused)."""
    if start:
        return is_alive(pid, start)
    if start_ticks(pid) is None:
        return False
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return False
    return bool(started <= created_ns / 1e9 + CREATE_TIME_SLACK_S)


def holders(copy: Copy) -> list[dict[str, Any]]:
    """One row per registry entry whose process is alive, or that holds,
    caches or sleeps (in alloc or on a queue; a dead entry with nothing is
    no holder), by entry; then one row (entry None, pid 0) for held slots
    whose owner field names no process ever attached (damage). Queued
    elements are the queues', never a process's: no row counts them."""
    v, alive = copy.views, copy.alive
    n = v.geo.max_procs
    procs, held, cached = procs_table(v), held_per_owner(copy), cached_per_entry(v)
    named = copy_verdicts(copy)[1 : n + 1] != V_NONE
    mine = np.where(named, held[1 : n + 1], 0)
    get, put = queue_sleepers(v)
    on_queues = (get + put).sum(axis=1)
    rows = []
    oldest = oldest_age_per_entry(copy)
    busy = (mine > 0) | (cached > 0) | (procs[:, P_SLEEPING] > 0) | (on_queues > 0)
    for e in np.flatnonzero(alive | busy).tolist():
        pid, start = int(procs[e, P_PID]), int(procs[e, P_START])
        rows.append({
            "pid": pid,
            "name": _command(pid, start) if alive[e] else "",
            "command": _command_line(pid, start) if alive[e] else "",
            "alive": bool(alive[e]),
            "held": int(mine[e]),
            "cached": int(cached[e]),
            "sleeping": int(procs[e, P_SLEEPING]),
            "entry": e,
            "epoch": int(procs[e, P_EPOCH]),
            "queue_sleeping": int(on_queues[e]),
            "oldest_age": oldest.get(e) if mine[e] else None,
        })
    orphans = int(held.sum() - mine.sum())
    if orphans:
        rows.append({"pid": 0, "name": "", "command": "", "alive": False, "held": orphans, "cached": 0, "sleeping": 0,
                     "entry": None, "epoch": 0, "queue_sleeping": 0, "oldest_age": None})
    return rows


def queue_table(v: Views) -> np.ndarray:
    return np.frombuffer(v.queues, dtype=np.uint64).reshape(v.geo.max_queues, QUEUE_WORDS)


def live_queues(v: Views) -> np.ndarray:
    """One bool per queue table entry: whether that queue exists."""
    return np.asarray(queue_table(v)[:, Q_STATE] == QUEUE_LIVE)


def queue_name(row: np.ndarray) -> str:
    raw = np.ascontiguousarray(row[Q_NAME : Q_NAME + QUEUE_NAME_BYTES // 8]).tobytes()
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def queues(v: Views) -> list[dict[str, Any]]:
    """One row per live queue, by index: its name, index in the queue
    table, depth, count (elements in it now), its sleepers in a blocked get
    (getters) and put (putters), waiters (their sum) and its puts and gets
    counters, as the queue table has them."""
    table = queue_table(v)
    rows = []
    for q in np.flatnonzero(live_queues(v)).tolist():
        getters, putters = int(table[q, Q_GETTERS]), int(table[q, Q_PUTTERS])
        rows.append({"name": queue_name(table[q]), "index": q, "depth": int(table[q, Q_DEPTH]),
                     "count": int(table[q, Q_COUNT]), "waiters": getters + putters, "getters": getters,
                     "putters": putters, "puts": int(table[q, Q_PUTS]), "gets": int(table[q, Q_GETS])})
    return rows


def counters(v: Views) -> dict[str, int]:
    """The counters as ``derive`` sums them: the header's plus every
    registry entry's below ``H_ENTRIES_USED``."""
    per_proc = procs_table(v)[: entries_used(v), P_COUNTERS : P_COUNTERS + N_PROC_COUNTERS].sum(axis=0).tolist()
    return {
        name: int(v.hdr[index]) + (int(per_proc[i]) if i < N_PROC_COUNTERS else 0)
        for i, (name, index) in enumerate(COUNTERS)
    }


def lock_info(copy: Copy) -> dict[str, Any]:
    """The ``lock`` document: what the copy learnt about the pool lock."""
    hdr, lock, h = copy.views.hdr, copy.lock, copy.lock.holder
    info: dict[str, Any] = {
        "held": h is not None, "pid": None, "alive": None, "held_for_s": None,
        "waited_s": round(lock.waited_s, 3), "error": None, "entry": None, "epoch": None,
        "seq": int(hdr[H_LOCK_SEQ]), "waiters": int(hdr[H_LOCK_WAITERS]), "held_throughout": lock.held_throughout,
    }
    if h is not None:
        info.update(alive=h.alive, epoch=h.epoch, entry=h.entry if h.entry >= 0 else None,
                    pid=h.pid if h.pid else None)
        if h.since_ns:
            info["held_for_s"] = round(max(0, lock.copied_ns - h.since_ns) / 1e9, 3)
    return info


def creator(v: Views) -> dict[str, Any]:
    """The ``creator`` document: the creator's pid, whether it lives, when
    it created the pool."""
    pid, created_ns = int(v.hdr[H_CREATOR_PID]), int(v.hdr[H_CREATED_NS])
    alive = creator_alive(pid, created_ns, int(v.hdr[H_CREATOR_START]))
    return {"pid": pid, "alive": alive, "created_s": round(created_ns / 1e9, 3)}


def describe(copy: Copy, show_all: bool = False) -> dict[str, Any]:
    """Everything about one pool, as the JSON document (see shmpool/cli.py)."""
    v, geo = copy.views, copy.views.geo
    hdr = v.hdr
    codes = copy_codes(copy)
    smap, group = slot_map(codes)
    n = derived(copy)
    stack = reserve_slots(v)[::-1]
    rows, counted = holders(copy), counters(v)
    return {
        "schema": SCHEMA,
        "name": copy.name,
        "layout_version": int(hdr[H_VERSION]),
        "path": _segment.segment_path(copy.name),
        "status": "live" if n["status"] == STATUS_LIVE else "destroyed",
        "consistent": copy.consistent,
        "geometry": {"slot_size": geo.slot_size, "capacity": geo.capacity, "stride": geo.stride,
                     "total_bytes": geo.total},
        "min_nr": n["min_nr"],
        "curr_nr": n["curr_nr"],
        "arena_free": n["arena_shared"] + n["arena_cached"],
        "arena_shared": n["arena_shared"],
        "arena_cached": n["arena_cached"],
        "in_use": n["in_use"],
        "parked": n["parked"],
        "queued": n["queued"],
        "nr_waiters": n["nr_waiters"],
        "fail_rate": float(v.fhdr[H_FAIL_RATE]),
        "seed": int(hdr[H_SEED]),
        "rng": "glibc" if hdr[H_RNG_KIND] == RNG_GLIBC else "splitmix64",
        "poison": bool(hdr[H_FLAGS] & FLAG_POISON),
        "reserve_low_water": n["reserve_low_water"],
        "longest_sleep": n["longest_sleep"],
        "total_sleep": n["total_sleep"],
        "attached": n["attached"],
        "counters": counted,
        "sizing": sizing(n["min_nr"], n, counted),
        "reserve_stack": (stack if show_all else stack[:STACK_SHOWN]).tolist(),
        "holders": rows,
        "oldest_held": oldest_held(copy, rows, show_all),
        "queues": queues(v),
        "topics": topic_rows(copy),
        "published": n["published"],
        "slot_counts": dict(zip(SLOT_COUNT_KEYS, np.bincount(codes, minlength=len(MAP_SYMBOLS)).tolist(), strict=True)),
        "slot_map": smap,
        "slot_map_group": group,
        "lock": lock_info(copy),
        "creator": creator(v),
    }


def summarize(copy: Copy) -> dict[str, Any]:
    """One pool's line of the listing (no per-slot work but the caches);
    a summary copy will do."""
    v = copy.views
    n = derived(copy)
    made = creator(v)
    return {
        "schema": SCHEMA,
        "name": copy.name, "slot_size": v.geo.slot_size, "capacity": v.geo.capacity,
        "min_nr": n["min_nr"], "curr_nr": n["curr_nr"], "in_use": n["in_use"],
        "nr_waiters": n["nr_waiters"], "creator_pid": made["pid"], "creator_alive": made["alive"],
        "consistent": copy.consistent, "queued": n["queued"],
        "stale": not made["alive"] and not copy.alive.any(),
        "damaged": header_damaged(v, n),
    }


def header_damaged(v: Views, n: dict[str, int]) -> bool:
    """Whether the header's counts cannot be those of a whole pool: each of
    ``n``'s parts within the capacity and together no more than it, the
    live queues' counts (unclamped) too, and the alloc sleepers below the
    core's bound. The listing then says DAMAGED rather than show them."""
    cap = v.geo.capacity
    queued = sum(map(int, queue_table(v)[live_queues(v), Q_COUNT]))  # no uint64 wrap
    parts = (n["curr_nr"], n["arena_shared"], n["arena_cached"], queued, n["min_nr"])
    return (any(not 0 <= x <= cap for x in parts) or sum(parts[:4]) > cap
            or int(v.hdr[H_NR_WAITERS]) > SLEEPERS_MAX)
