"""shmpool-inspect: look at live pools from any terminal, or from a script.

Design
------
Inspecting never changes a pool. The segment is opened and mapped read-only
(a stray store would fault, not corrupt), and the pool lock is taken on its
semaphore directly, not through ``PoolLock``, which would write its holder
into the header. Under the lock only the metadata is copied (header, slot
words, both stacks, process registry: 16 bytes a slot, a few milliseconds
for a million slots) and, for ``--check`` of a poisoned pool, the reserve's
elements are compared with the poison pattern in place. Everything shown is
computed from that copy with numpy over the per-slot words; nothing loops
over slots in Python.

The inspector holds the lock with signals blocked (Ctrl-C or Ctrl-Z arrive
after the release), so it cannot be stopped while holding it. Killed while
holding it (SIGKILL), it leaves the lock taken with no holder recorded,
which the pool's users take over after ``_lock.ORPHAN_SECONDS``.

It never hangs: if the lock does not come within ``--lock-timeout``
(0.25 s), because a process is stuck or was killed holding it, the copy is
taken without it, says who holds the lock (alive or dead, for how long),
and is marked ``"consistent": false``.

Who is alive: a holder is the pid in a slot word, qualified by its registry
entry's start time (``_procs``), so a reused pid is not mistaken for the
holder. The creator is alive if its pid runs with the start time the header
recorded at create.

Slot map: one character per slot, or per group of slots for big pools (at
most 8 rows of 64)::

    R  in the reserve          H  held by a live process
    .  free in the arena       X  held by a dead process
    c  free in a process's     ?  no valid state (damage)
       cache (see _fast.c)

A character for a group shows the state most of its slots are in (a tie
goes to the busier state: H, c, R, then .), except that a group with any
``?`` slot shows ``?`` and else one with any ``X`` slot shows ``X``:
problems are never averaged away.

JSON keys (``--json``; stable: keys may be added, never renamed)
----------------------------------------------------------------
One pool (``NAME --json``; one document per line with ``--watch``)::

    name, layout_version, path, status ("live" | "destroyed"),
    consistent (bool: the copy was taken under the lock),
    geometry {slot_size, capacity, stride, total_bytes},
    min_nr, curr_nr, arena_free, arena_shared, arena_cached, in_use,
    nr_waiters, fail_rate, seed, poison (bool),
    counters {alloc_arena, alloc_reserve, alloc_failed, free_reserve,
              free_arena, sleeps, faults_injected, poison_errors,
              lock_recoveries, reclaimed},
    rates {the counters' keys: per second; --watch only, from frame 2},
    reserve_stack [slot, ...]  (top first; the first 16 unless --all),
    holders [{pid, name, alive, held, cached, sleeping}]  (one per process
        that is alive and attached, or that holds, caches or sleeps),
    slot_counts {reserve, arena, cached, held, held_dead, invalid},
    slot_map (string, legend above), slot_map_group (slots per character),
    lock {held (bool, or null if unknown), pid, alive, held_for_s,
          waited_s (how long the inspector waited for it), error},
    creator {pid, alive, created_s (Unix time)}

The numbers ``min_nr`` .. ``poison`` and ``counters`` are those of
``Mempool.stats()``. ``NAME --check --json``: {name, consistent, ok,
findings [sentence, ...]}. No NAME: a list with, per pool, {name, slot_size,
capacity, min_nr, curr_nr, in_use, nr_waiters, creator_pid, creator_alive,
consistent}, or {name, error} for one that cannot be read.

Exit status: 0 fine; 1 ``--check`` found problems; 2 usage error, no such
pool, or not a pool (a message on stderr); 130 interrupted (but ``--watch``,
which ends with 0 on Ctrl-C and when its pool is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import mmap
import os
import signal
import stat
import struct
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import posix_ipc
import psutil

from . import _segment
from ._debug import audit, poison_pattern
from ._errors import PoolFormatError
from ._layout import (
    COUNTERS,
    FLAG_POISON,
    H_ARENA_FREE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
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
    H_TAG,
    H_VERSION,
    HEADER_BYTES,
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
    Geometry,
    Views,
    cached_slots,
    read_geometry,
)
from ._procs import is_alive, start_ticks

PROG = "shmpool-inspect"
LOCK_TIMEOUT = 0.25  # seconds to wait for the pool lock (--lock-timeout)
LIST_LOCK_TIMEOUT = 0.05  # the same, per pool, when listing them all
ACQUIRE_SLICE = 0.1  # the wait for the lock is made of slices this long
STACK_SHOWN = 16  # reserve stack entries shown without --all
MAP_WIDTH = 64  # slot map characters per row
MAP_ROWS = 8  # at most this many rows: bigger pools are grouped
CHECK_ATTEMPTS = 3  # a finding must show in this many copies in a row
CREATE_TIME_SLACK_S = 1.0  # psutil's start times are derived from a boot time in whole seconds
POISON_CHUNK_BYTES = 8 << 20  # the poison scan compares this much at a time
#: Held off while the inspector holds the pool lock, so that it cannot be
#: stopped or interrupted there (faults caused by the process itself stay).
HOLD_SIGNALS = signal.valid_signals() - {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGBUS, signal.SIGSEGV, signal.SIGFPE, signal.SIGILL,
    signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT,
}

# Slot map codes, in the order of their symbols: 0-3 are normal states
# (ranked for ties), 4-5 problems (shown if present at all).
MAP_SYMBOLS = ".cRHX?"
M_ARENA, M_CACHED, M_RESERVE, M_HELD, M_DEAD, M_INVALID = range(6)
SLOT_COUNT_KEYS = ("arena", "cached", "reserve", "held", "held_dead", "invalid")

EXAMPLES = """\
examples:
  shmpool-inspect                     every pool on this machine, one line each
  shmpool-inspect demo                the whole picture of pool "demo"
  shmpool-inspect demo --json         the same, as JSON for a script
  shmpool-inspect demo --watch 0.5    redraw twice a second, with rates
  shmpool-inspect demo --check        audit it: exit 1, one line a problem
  shmpool-inspect demo --reclaim-dead take back dead processes' elements

slot map: R reserve, . arena free, c free in a process's cache,
          H held by a live process, X held by a dead one, ? damaged
          (for big pools a character stands for a group of slots)

exit status: 0 fine, 1 --check found problems, 2 usage error, no such pool
or not a pool, 130 interrupted. JSON keys: see shmpool/cli.py.
"""


class InspectError(Exception):
    """A pool that cannot be shown (exit status 2)."""


class PoolMissing(InspectError):
    """There is no pool of that name (any more)."""


# ----------------------------------------------------------------------
# Taking a copy


@dataclass(frozen=True)
class LockState:
    """What the inspector learnt about the pool lock while copying."""

    taken: bool  # the inspector held it while copying
    waited_s: float  # how long it waited (the whole bound if not taken)
    surplus: int  # the semaphore's value while held: 0 unless the lock is broken
    error: str | None  # why the semaphore could not be opened


@dataclass(frozen=True)
class Copy:
    """A pool's metadata, copied. ``views`` covers the header, slot words,
    stacks and registry of the copy; its ``data`` is empty (slot contents
    are not copied). ``unpoisoned`` lists the reserve slots whose poison
    pattern was found broken, or is None when not scanned."""

    name: str
    views: Views
    consistent: bool
    lock: LockState
    unpoisoned: np.ndarray | None


def _open_readonly(name: str) -> tuple[mmap.mmap, int]:
    """Map segment ``name`` read-only; (mapping, size). InspectError."""
    try:
        shm = posix_ipc.SharedMemory(_segment.shm_name(name), read_only=True)
    except posix_ipc.ExistentialError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except posix_ipc.PermissionsError:
        path = os.path.join(_segment.SHM_DIR, _segment.SHM_PREFIX + name)
        raise InspectError(f"pool {name!r}: permission denied: {_segment._why_denied(path)}") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size == 0:
            raise InspectError(f"{name!r} is not a shmpool pool (an empty segment: being created, or not a pool)")
        return mmap.mmap(shm.fd, size, access=mmap.ACCESS_READ), size
    finally:
        shm.close_fd()


def _open_lock(name: str) -> tuple[posix_ipc.Semaphore | None, str | None]:
    """The pool lock's semaphore, or None and why not."""
    try:
        return posix_ipc.Semaphore(_segment.sem_names(name)[0]), None
    except posix_ipc.ExistentialError:
        return None, "its semaphore does not exist (the pool is half made or half destroyed)"
    except posix_ipc.PermissionsError:
        return None, "this user may not open its semaphore"


def take_copy(name: str, lock_timeout: float = LOCK_TIMEOUT, *, scan_poison: bool = True) -> Copy:
    """Copy pool ``name``'s metadata, under its lock if the lock comes
    within ``lock_timeout`` seconds, else without it (``consistent`` False).
    With ``scan_poison``, a poisoned pool's reserve elements are checked
    for their pattern too (while the lock is held). Never writes to the
    pool and never blocks longer than ``lock_timeout`` plus the copy.
    Raises InspectError (PoolMissing if there is no such pool)."""
    try:
        _segment.check_name(name)
    except (TypeError, ValueError) as exc:
        raise InspectError(str(exc)) from None
    mm, size = _open_readonly(name)
    try:
        try:
            geo = read_geometry(mm, size)
        except PoolFormatError as exc:
            raise InspectError(f"{name!r} is not a usable shmpool pool: {exc}") from None
        sem, error = _open_lock(name)
        try:
            return _copy_locked(name, mm, geo, sem, error, lock_timeout, scan_poison)
        finally:
            if sem is not None:
                sem.close()
    finally:
        mm.close()


@contextlib.contextmanager
def _holding(sem: posix_ipc.Semaphore | None, timeout: float) -> Iterator[tuple[bool, float]]:
    """Take the lock's semaphore if it comes within ``timeout`` seconds and
    hold it for the body; yields (taken, seconds waited). Records nothing
    in the pool. Signals are held off while it is held, so the holder
    cannot be stopped (Ctrl-Z) or interrupted there; the wait is made of
    slices between which a pending Ctrl-C gets in."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HOLD_SIGNALS)
    taken = False
    try:
        started = time.monotonic()
        deadline = started + timeout
        while sem is not None:
            try:
                sem.acquire(max(0.0, min(ACQUIRE_SLICE, deadline - time.monotonic())))  # no EINTR: blocked
                taken = True
                break
            except posix_ipc.BusyError:
                if time.monotonic() >= deadline:
                    break
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a pending signal's handler runs here
            signal.pthread_sigmask(signal.SIG_BLOCK, HOLD_SIGNALS)
        yield taken, time.monotonic() - started
    finally:
        if taken:
            sem.release()  # type: ignore[union-attr]
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _copy_locked(
    name: str, mm: mmap.mmap, geo: Geometry, sem: posix_ipc.Semaphore | None, error: str | None,
    lock_timeout: float, scan_poison: bool,
) -> Copy:
    with _holding(sem, lock_timeout) as (taken, waited):
        surplus = sem.value if taken and sem is not None else 0
        views = Views(mm[: geo.off_slots], geo)  # type: ignore[arg-type]  # any buffer will do
        unpoisoned = _scan_poison(mm, views) if scan_poison else None
    return Copy(name, views, taken, LockState(taken, waited, surplus, error), unpoisoned)


def _scan_poison(mm: mmap.mmap, v: Views) -> np.ndarray | None:
    """The reserve slots (of the copy's stack) whose contents in ``mm`` are
    not the poison pattern; None if the pool is not poisoned or its stack
    cannot be read within bounds (the audit reports that)."""
    geo, hdr = v.geo, v.hdr
    curr_nr = hdr[H_CURR_NR]
    if not hdr[H_FLAGS] & FLAG_POISON or curr_nr > geo.capacity:
        return None
    entries = np.frombuffer(v.stack, dtype=np.uint32)[:curr_nr]
    if entries.size and int(entries.max()) >= geo.capacity:
        return None
    want = np.frombuffer(poison_pattern(geo.slot_size), dtype=np.uint8)
    rows = max(1, POISON_CHUNK_BYTES // geo.stride)
    slots = np.frombuffer(mm, dtype=np.uint8, count=geo.capacity * geo.stride, offset=geo.off_slots)
    try:
        slots = slots.reshape(geo.capacity, geo.stride)
        broken = [np.empty(0, dtype=np.uint32)]
        for start in range(0, entries.size, rows):
            chunk = entries[start : start + rows]
            broken.append(chunk[(slots[chunk, : geo.slot_size] != want).any(axis=1)])
    finally:
        del slots  # the mapping cannot be closed while a view of it lives
    return np.concatenate(broken)


# ----------------------------------------------------------------------
# Describing a copy


@functools.lru_cache(maxsize=1024)
def _command(pid: int, start: int) -> str:
    """The command name of the live process (pid, start), or ''."""
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return ""


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
    return started <= created_ns / 1e9 + CREATE_TIME_SLACK_S


def _procs(v: Views) -> np.ndarray:
    return np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)


def _registry(procs: np.ndarray) -> dict[int, int]:
    """pid -> registry row, for every entry in use."""
    rows = np.flatnonzero(procs[:, P_PID]).tolist()
    return {int(procs[row, P_PID]): row for row in rows}


def _live_pids(procs: np.ndarray, pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` whose registry entry names a process still running."""
    registry = _registry(procs)
    return {pid for pid in pids if pid in registry and is_alive(pid, int(procs[registry[pid], P_START]))}


def _counts_by_pid(owners: np.ndarray, mask: np.ndarray) -> dict[int, int]:
    pids, counts = np.unique(owners[mask], return_counts=True)
    return dict(zip(pids.tolist(), counts.tolist()))


def _holders(states: np.ndarray, owners: np.ndarray, procs: np.ndarray) -> tuple[list[dict[str, Any]], set[int]]:
    """One row per process that is alive and attached, or that holds,
    caches or sleeps (a dead process with nothing is no holder); and the
    set of live pids."""
    held = _counts_by_pid(owners, states == ST_HELD)
    cached = _counts_by_pid(owners, states == ST_CACHED)
    registry = _registry(procs)
    live = _live_pids(procs, set(held) | set(cached) | set(registry))
    rows = []
    for pid in sorted(set(held) | set(cached) | set(registry)):
        row = registry.get(pid)
        sleeping = int(procs[row, P_SLEEPING]) if row is not None else 0
        alive = pid in live
        if not (alive or held.get(pid) or cached.get(pid) or sleeping):
            continue
        rows.append({
            "pid": pid,
            "name": _command(pid, int(procs[row, P_START])) if alive and row is not None else "",
            "alive": alive,
            "held": held.get(pid, 0),
            "cached": cached.get(pid, 0),
            "sleeping": sleeping,
        })
    return rows, live


def slot_codes(words: np.ndarray, states: np.ndarray, live: set[int]) -> np.ndarray:
    """Each slot's slot-map code (M_*), from its word and state; a held
    slot is M_HELD if its pid is in ``live``, else M_DEAD."""
    codes = np.full(words.size, M_INVALID, dtype=np.uint8)
    codes[states == ST_ARENA] = M_ARENA
    codes[states == ST_CACHED] = M_CACHED
    codes[states == ST_RESERVE] = M_RESERVE
    held = states == ST_HELD
    codes[held] = M_DEAD
    if live:
        codes[held & np.isin(words >> np.uint64(PID_SHIFT), np.fromiter(live, dtype=np.uint64))] = M_HELD
    return codes


def slot_map(codes: np.ndarray) -> tuple[str, int]:
    """The slot map (see the module doc) and how many slots a character
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
    normal = counts[:, M_HELD::-1]  # H, c, R, . (reversed: argmax takes the first of a tie)
    shown = M_HELD - np.argmax(normal, axis=1)
    shown[counts[:, M_DEAD] > 0] = M_DEAD
    shown[counts[:, M_INVALID] > 0] = M_INVALID
    return "".join(symbols[shown]), group


def _counters(v: Views) -> dict[str, int]:
    """The counters as stats() sums them: the header's plus every
    registry entry's."""
    per_proc = _procs(v)[:, P_COUNTERS : P_COUNTERS + N_PROC_COUNTERS].sum(axis=0).tolist()
    return {
        name: int(v.hdr[index]) + (int(per_proc[i]) if i < N_PROC_COUNTERS else 0)
        for i, (name, index) in enumerate(COUNTERS)
    }


def _lock_info(copy: Copy) -> dict[str, Any]:
    hdr, lock = copy.views.hdr, copy.lock
    info: dict[str, Any] = {
        "held": None, "pid": None, "alive": None, "held_for_s": None, "waited_s": None, "error": lock.error,
    }
    if lock.taken:
        info.update(held=False, waited_s=round(lock.waited_s, 3))
    elif lock.error is None:
        pid, since = int(hdr[H_LOCK_PID]), int(hdr[H_LOCK_SINCE_NS])
        info["held"] = True
        if pid:  # recorded by its holder (copied right after the wait)
            info.update(pid=pid, alive=is_alive(pid, int(hdr[H_LOCK_START])))
            if since:
                info["held_for_s"] = round(max(0, time.monotonic_ns() - since) / 1e9, 3)
    return info


def _totals(v: Views) -> dict[str, int]:
    """The header's numbers, as stats() derives them."""
    hdr, cap = v.hdr, v.geo.capacity
    curr_nr, shared = int(hdr[H_CURR_NR]), int(hdr[H_ARENA_FREE])
    cached = int(cached_slots(_procs(v)).sum())
    return {
        "min_nr": int(hdr[H_MIN_NR]), "curr_nr": curr_nr, "arena_free": shared + cached,
        "arena_shared": shared, "arena_cached": cached, "in_use": cap - curr_nr - shared - cached,
        "nr_waiters": int(hdr[H_NR_WAITERS]),
    }


def _creator(v: Views) -> dict[str, Any]:
    pid, created_ns = int(v.hdr[H_CREATOR_PID]), int(v.hdr[H_CREATED_NS])
    alive = creator_alive(pid, created_ns, int(v.hdr[H_CREATOR_START]))
    return {"pid": pid, "alive": alive, "created_s": round(created_ns / 1e9, 3)}


def _path(name: str) -> str:
    return os.path.join(_segment.SHM_DIR, _segment.SHM_PREFIX + name)


def describe(copy: Copy, show_all: bool = False) -> dict[str, Any]:
    """Everything about one pool, as the JSON document (see the module doc)."""
    v, geo = copy.views, copy.views.geo
    hdr = v.hdr
    words = np.frombuffer(v.words, dtype=np.uint64)
    states = (words & np.uint64(STATE_MASK)).astype(np.uint8)
    holders, live = _holders(states, words >> np.uint64(PID_SHIFT), _procs(v))
    codes = slot_codes(words, states, live)
    smap, group = slot_map(codes)
    totals = _totals(v)
    depth = min(totals["curr_nr"], geo.capacity)
    stack = np.frombuffer(v.stack, dtype=np.uint32)[:depth][::-1]
    return {
        "name": copy.name,
        "layout_version": int(hdr[H_VERSION]),
        "path": _path(copy.name),
        "status": "live" if hdr[H_STATUS] == STATUS_LIVE else "destroyed",
        "consistent": copy.consistent,
        "geometry": {"slot_size": geo.slot_size, "capacity": geo.capacity, "stride": geo.stride,
                     "total_bytes": geo.total},
        **totals,
        "fail_rate": float(v.fhdr[H_FAIL_RATE]),
        "seed": int(hdr[H_SEED]),
        "poison": bool(hdr[H_FLAGS] & FLAG_POISON),
        "counters": _counters(v),
        "reserve_stack": (stack if show_all else stack[:STACK_SHOWN]).tolist(),
        "holders": holders,
        "slot_counts": dict(zip(SLOT_COUNT_KEYS, np.bincount(codes, minlength=len(MAP_SYMBOLS)).tolist())),
        "slot_map": smap,
        "slot_map_group": group,
        "lock": _lock_info(copy),
        "creator": _creator(v),
    }


def summarize(copy: Copy) -> dict[str, Any]:
    """One pool's line of the listing (no per-slot work)."""
    v = copy.views
    totals = _totals(v)
    creator = _creator(v)
    return {
        "name": copy.name, "slot_size": v.geo.slot_size, "capacity": v.geo.capacity,
        "min_nr": totals["min_nr"], "curr_nr": totals["curr_nr"], "in_use": totals["in_use"],
        "nr_waiters": totals["nr_waiters"], "creator_pid": creator["pid"], "creator_alive": creator["alive"],
        "consistent": copy.consistent,
    }


# ----------------------------------------------------------------------
# Finding pools

_MAGIC_BYTES = struct.pack("=Q", MAGIC)  # as the header stores it


def _probe(path: str) -> str | None:
    """'pool' if the file at ``path`` starts with a pool's magic number,
    'no permission' if it cannot be read, None for anything else. Never
    blocks (a FIFO is not opened for good) and never follows a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        return "no permission"
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, len(_MAGIC_BYTES), 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return "pool" if head == _MAGIC_BYTES else None


def list_pools() -> list[dict[str, Any]]:
    """Every shmpool pool in /dev/shm, one summary each (see the module doc).
    A pool is a segment named shmpool.NAME (else no name reaches it) whose
    first word is the magic number; one this user may not read is listed
    as such, one that vanishes meanwhile is left out."""
    out: list[dict[str, Any]] = []
    try:
        entries = sorted(os.listdir(_segment.SHM_DIR))
    except OSError as exc:
        raise InspectError(f"cannot list {_segment.SHM_DIR}: {exc.strerror}") from None
    for entry in entries:
        if entry.startswith("sem.") or not entry.startswith(_segment.SHM_PREFIX):
            continue
        name = entry[len(_segment.SHM_PREFIX) :]
        kind = _probe(os.path.join(_segment.SHM_DIR, entry))
        if kind is None:
            continue
        if kind != "pool":
            out.append({"name": name, "error": kind})
            continue
        try:
            out.append(summarize(take_copy(name, LIST_LOCK_TIMEOUT, scan_poison=False)))
        except PoolMissing:
            continue
        except InspectError as exc:
            out.append({"name": name, "error": str(exc)})
    return out


# ----------------------------------------------------------------------
# Checking


def _without_poison_flag(v: Views) -> Views:
    """A copy of ``v`` whose header says 'no poisoning', for _debug.audit:
    its poison check reads every slot's data, which a Copy leaves out (the
    reserve's poison is scanned by take_copy instead)."""
    meta = bytearray(v.mm)
    memoryview(meta)[:HEADER_BYTES].cast("Q")[H_FLAGS] &= ~FLAG_POISON
    return Views(meta, v.geo)  # type: ignore[arg-type]


def _waiter_findings(v: Views) -> list[str]:
    """nr_waiters counts at least the sleepers that live processes record
    in their registry entries (sleepers that died may stay counted)."""
    procs = _procs(v)
    sleeping = {int(procs[r, P_PID]): int(procs[r, P_SLEEPING]) for r in np.flatnonzero(procs[:, P_SLEEPING]).tolist()}
    alive = _live_pids(procs, sleeping)
    live = sum(n for pid, n in sleeping.items() if pid in alive)
    nr_waiters = int(v.hdr[H_NR_WAITERS])
    if nr_waiters < live:
        return [f"nr_waiters {nr_waiters} is less than the {live} sleeping allocation(s) of live processes"]
    return []


def _holder_findings(v: Views) -> list[str]:
    words = np.frombuffer(v.words, dtype=np.uint64)
    orphans = np.flatnonzero(((words & np.uint64(STATE_MASK)) == ST_HELD) & ((words >> np.uint64(PID_SHIFT)) == 0))
    if orphans.size:
        return [f"{orphans.size} held slot(s) record no holder (pid 0), first slot {orphans[0]}"]
    return []


def check(copy: Copy) -> list[str]:
    """Every broken invariant in ``copy``, one sentence each that names the
    damage (empty for a healthy pool): ``_debug.audit`` (each slot in one
    place, stacks of distinct slots in the right state, counts that add up,
    curr_nr <= min_nr <= capacity, caches), the reserve's poison, the waiter
    count, holders, the lock semaphore; and, on a copy taken without the
    lock, a line that says so (such an audit proves nothing)."""
    v = copy.views
    findings = audit(_without_poison_flag(v))
    if copy.unpoisoned is not None and copy.unpoisoned.size and not findings:  # as audit: on an otherwise whole pool
        n, first = copy.unpoisoned.size, int(copy.unpoisoned[0])
        findings.append(f"{n} reserved element(s) lost their poison (written after free), first slot {first}")
    findings += _holder_findings(v) + _waiter_findings(v)
    if v.hdr[H_STATUS] != STATUS_LIVE:
        findings.append("the pool is marked destroyed but still exists (its destroyer may have died)")
    if copy.lock.surplus:
        findings.append(f"the lock's semaphore had value {copy.lock.surplus + 1}, not 1: the lock is broken")
    if not copy.consistent:
        findings.append(f"{_lock_text(_lock_info(copy))}: this audit ran on a copy taken without the lock")
    return findings


def check_pool(name: str, lock_timeout: float = LOCK_TIMEOUT) -> tuple[Copy, list[str]]:
    """Audit pool ``name``. A live process changes its own cache without the
    lock, so a copy can catch it half way: findings count only if they show
    in CHECK_ATTEMPTS copies in a row (those of the last are returned)."""
    for _ in range(CHECK_ATTEMPTS):
        copy = take_copy(name, lock_timeout)
        findings = check(copy)
        if not findings or not copy.consistent:
            break
    return copy, findings


# ----------------------------------------------------------------------
# Rendering for a person (80 columns)


def _bar(curr: int, min_nr: int, width: int = 20) -> str:
    filled = min(width, round(width * curr / min_nr)) if min_nr > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _lock_text(lock: dict[str, Any]) -> str:
    if lock["held"] is None:
        return f"unknown: {lock['error']}"
    if not lock["held"]:
        waited = lock["waited_s"] or 0
        return "free" + (f" (waited {waited * 1000:.0f} ms for it)" if waited >= 0.001 else "")
    if lock["pid"] is None:
        return "held, holder not recorded (being taken or released)"
    text = f"held by pid {lock['pid']} ({'alive' if lock['alive'] else 'dead'})"
    return text + (f" for {lock['held_for_s']:.3f} s" if lock["held_for_s"] is not None else "")


def _wrapped(label: str, text: str) -> list[str]:
    return textwrap.wrap(text, 78, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13) or [""]


def _summary_lines(d: dict[str, Any]) -> list[str]:
    g, creator = d["geometry"], d["creator"]
    created = datetime.datetime.fromtimestamp(creator["created_s"]).strftime("%Y-%m-%d %H:%M:%S")
    short = d["min_nr"] - d["curr_nr"]
    dead = d["slot_counts"]["held_dead"]
    rows = [
        ("segment", f"{d['path']}, {g['total_bytes']} bytes"),
        ("geometry", f"{g['capacity']} slots of {g['slot_size']} bytes (stride {g['stride']})"),
        ("reserve", f"{_bar(d['curr_nr'], d['min_nr'])} {d['curr_nr']}/{d['min_nr']} curr_nr/min_nr, "
                    + ("full" if short <= 0 else f"{short} below min_nr")),
        ("arena", f"{d['arena_free']} free ({d['arena_shared']} shared, {d['arena_cached']} in process caches)"),
        ("in use", f"{d['in_use']}" + (f" ({dead} held by dead processes)" if dead else "")),
        ("waiters", f"{d['nr_waiters']} sleeping"),
        ("faults", f"fail_rate {d['fail_rate']:g}, seed {d['seed']}"),
        ("poison", "on" if d["poison"] else "off"),
        ("lock", _lock_text(d["lock"])),
        ("creator", f"pid {creator['pid']} ({'alive' if creator['alive'] else 'gone'}), created {created}"),
    ]
    if d["status"] != "live":
        rows.insert(0, ("status", "DESTROYED (being unlinked)"))
    return [line for label, text in rows for line in _wrapped(label, text)]


def _stack_lines(d: dict[str, Any]) -> list[str]:
    stack = d["reserve_stack"]
    head = f"reserve stack, top first ({len(stack)} of {d['curr_nr']} shown):" if len(stack) < d["curr_nr"] else (
        "reserve stack, top first:")
    body = " ".join(map(str, stack)) if stack else "(empty)"
    return [head, *textwrap.wrap(body, 78, initial_indent="  ", subsequent_indent="  ")]


def _holder_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"{'PID':>8}  {'COMMAND':<20} {'STATE':<5} {'HELD':>10} {'CACHED':>8} {'SLEEPING':>8}"]
    for h in d["holders"]:
        lines.append(
            f"{h['pid']:>8}  {(h['name'] or '-')[:20]:<20} {'alive' if h['alive'] else 'DEAD':<5} "
            f"{h['held']:>10} {h['cached']:>8} {h['sleeping']:>8}"
        )
    if not d["holders"]:
        lines.append(f"{'':>8}  (no process holds or waits)")
    return lines


def _counter_lines(d: dict[str, Any]) -> list[str]:
    rates = d.get("rates")
    lines = ["counters" + (f"{'':>26}per second" if rates else "")]
    for key, value in d["counters"].items():
        line = f"  {key:<18} {value:>14}"
        if rates:
            line += f"  {rates[key]:>14.1f}"
        lines.append(line)
    return lines


def _map_lines(d: dict[str, Any]) -> list[str]:
    group, smap = d["slot_map_group"], d["slot_map"]
    lines = ["slot map: R reserve  . arena  c cached  H held  X held by the dead  ? bad"]
    if group > 1:
        lines.append(f"  1 char = {group} slots: the state of most (X or ? if any)")
    for i in range(0, len(smap), MAP_WIDTH):
        lines.append(f"{i * group:>10} {smap[i : i + MAP_WIDTH]}")
    return lines


def render(d: dict[str, Any], when: str = "") -> str:
    """One pool for a person, in 80 columns (a long pool name aside)."""
    lines = [f"pool {d['name']} (shmpool layout v{d['layout_version']})" + (f"  at {when}" if when else "")]
    if not d["consistent"]:
        lines += ["  WARNING: the lock was not free in time, so this snapshot was copied",
                  "  without it and may be inconsistent"]
    sections = [_summary_lines(d), _stack_lines(d), _holder_lines(d), _counter_lines(d), _map_lines(d)]
    for section in sections:
        lines += section + [""]
    return "\n".join(lines[:-1])


def render_list(pools: list[dict[str, Any]]) -> str:
    """The listing: one line a pool."""
    width = min(28, max([4, *(len(p["name"]) for p in pools)]))
    lines = [f"{'NAME':<{width}} {'SLOT':>6} {'CAPACITY':>8} {'MIN':>7} {'CURR':>7} {'IN USE':>8} {'WAIT':>4} CREATOR"]
    for p in pools:
        name = p["name"] if len(p["name"]) <= width else p["name"][: width - 1] + "~"
        if "error" in p:
            lines.append(f"{name:<{width}} ({p['error']})")
            continue
        lines.append(
            f"{name:<{width}} {p['slot_size']:>6} {p['capacity']:>8} {p['min_nr']:>7} {p['curr_nr']:>7} "
            f"{p['in_use']:>8} {p['nr_waiters']:>4} {'alive' if p['creator_alive'] else 'gone'}"
            + ("" if p["consistent"] else " (lock busy)")
        )
    if not pools:
        lines.append("(no pools)")
    return "\n".join(lines)


# ----------------------------------------------------------------------
# Commands


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
            raise _Stop  # at once, even in a wait for the lock (between its slices)

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
        this = (int(copy.views.hdr[H_CREATED_NS]), int(copy.views.hdr[H_TAG]))
        if identity is not None and this != identity:
            return gone("is gone (replaced by a new pool of that name)")
        identity = this
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
    """--reclaim-dead: the one command that writes (it attaches as a
    process). Says, per dead process, what it held and cached (as seen
    just before), then how many elements ``reclaim_dead`` took back."""
    from .pool import Mempool

    before = describe(take_copy(name, lock_timeout, scan_poison=False))
    try:
        with Mempool.attach(name) as pool:
            taken = pool.reclaim_dead()
    except FileNotFoundError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except (OSError, PoolFormatError, ValueError) as exc:
        raise InspectError(str(exc)) from None
    for h in before["holders"]:
        if not h["alive"] and (h["held"] or h["cached"]):
            _emit(f"  pid {h['pid']} (dead): {h['held']} held element(s), {h['cached']} cached slot(s)")
    _emit(f"reclaimed {taken} element(s) from dead processes in pool {name!r}")
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
    parser.add_argument("--reclaim-dead", action="store_true",
                        help="take back elements held by dead processes (writes to the pool)")
    parser.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT, metavar="SECONDS",
                        help=f"wait this long for the pool lock, then copy without it (default {LOCK_TIMEOUT})")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    modes = [flag for flag, on in (("--watch", args.watch is not None), ("--check", args.check),
                                   ("--reclaim-dead", args.reclaim_dead)) if on]
    if modes and not args.name:
        parser.error(f"{modes[0]} needs a pool name")
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} cannot be combined")
    if args.watch is not None and not 0 < args.watch < math.inf:
        parser.error("--watch needs a positive number of seconds")
    if not 0 <= args.lock_timeout <= 3600:
        parser.error("--lock-timeout needs a number of seconds from 0 to 3600")


def _run(args: argparse.Namespace) -> int:
    if args.name is None:
        pools = list_pools()
        _emit(json.dumps(pools, indent=2) if args.json else render_list(pools))
        return 0
    if args.reclaim_dead:
        return reclaim(args.name, args.lock_timeout)
    if args.watch is not None:
        return watch(args.name, args.watch, args.lock_timeout, args.json, args.all)
    if args.check:
        copy, findings = check_pool(args.name, args.lock_timeout)
        if args.json:
            _emit(json.dumps({"name": args.name, "consistent": copy.consistent, "ok": not findings,
                              "findings": findings}, indent=2))
        else:
            _emit("\n".join(findings) if findings else
                  f"pool {args.name!r}: all checks pass ({copy.views.geo.capacity} slots)")
        return 1 if findings else 0
    d = describe(take_copy(args.name, args.lock_timeout, scan_poison=False), show_all=args.all)
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
