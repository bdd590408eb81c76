"""shmpool-inspect: look at live pools from any terminal, or from a script.

Design
------
Inspecting never changes a pool, and never takes its lock. The segment is
opened and mapped read-only (a stray store would fault, not corrupt), and
neither the pool lock (the header word ``H_LOCK_OWNER``, see ``_fast.c``)
nor the named semaphore ``/shmpool.NAME.lock`` where contenders sleep is
touched: a lock taken by the inspector would have to be recorded like any
holder's, and an inspector that is killed, stopped or slow must never be
one more thing the pool's users wait for.

Only the metadata is copied (header, slot words, both stacks, queue
links, process registry, queue table: 20 bytes a slot, a few milliseconds
for a million slots), and, for ``--check`` of a poisoned pool, the
reserve's elements are compared with the poison pattern in place.
Everything shown is computed from that copy with numpy over the per-slot
words; nothing loops over slots in Python (but ``--check`` walks each
queue's list, as the audit does).

A quiet copy: every critical section runs under the lock, and every
acquisition bumps ``H_LOCK_SEQ``. A copy during which the lock was free,
before and after, with the same sequence number, saw no critical section:
the reserve, the shared arena, the queues, the stacks and the counters in
it agree with each other (``"consistent": true``). A process's own cache
changes without the lock (see ``_fast.c``), so a quiet copy may still
catch one cache push or pop half done. The inspector retries (reading
only the lock's words between tries) until it gets a quiet copy or
``--lock-timeout`` (0.25 s) has passed; then it keeps the last copy, marked
``"consistent": false``, and says who holds the lock: the holder's registry
entry and the pid it recorded there, alive or dead, for how long.

``--check`` audits three copies, a little apart (0.05 s, then 0.2 s), and
reports a finding only if it shows in all three: a busy pool's passing
inconsistencies (a cache push caught half way, a process preempted inside
one) are not damage. It fails with exit status 1 when elements are held by
dead processes or dead processes' sleepers (in alloc or on a queue) are
still counted, and says to run ``shmpool-inspect --reclaim-dead NAME`` (or
``pool.reclaim_dead()``). An element in a queue is the queue's, not its
sender's: one whose sender died is no finding (reclaim_dead never takes it).

Who is alive: a registry entry belongs to a live process iff its epoch is
not 0 and some open file description holds the OFD lock on the entry's
byte of the segment (``_procs.entry_alive``); the kernel drops that lock
when its process dies, whatever the pid namespaces. A held slot's holder is
the entry in its owner field; one that names a vacant entry, or no entry at
all, is held by the dead. A queued slot's owner field names its queue
(index + 1), not a process. Pids are shown as the processes recorded them
(they may be another pid namespace's): a command name is shown only for a
pid that runs here with the recorded start time. The creator is alive if
its pid runs with the start time the header recorded at create.

Slot map: one character per slot, or per group of slots for big pools (at
most 8 rows of 64)::

    R  in the reserve          H  held by a live process
    .  free in the arena       X  held by a dead process
    c  free in a process's     Q  in a queue (shmpool.queues)
       cache (see _fast.c)     ?  no valid state, or queued in a
                                  queue that does not exist (damage)

A character for a group shows the state most of its slots are in (a tie
goes to the busier state: H, Q, R, c, then .), except that a group with any
``?`` slot shows ``?`` and else one with any ``X`` slot shows ``X``:
problems are never averaged away.

JSON keys (``--json``; stable: keys may be added, never renamed)
----------------------------------------------------------------
One pool (``NAME --json``; one document per line with ``--watch``)::

    name, layout_version, path, status ("live" | "destroyed"),
    consistent (bool: a quiet copy, see above),
    geometry {slot_size, capacity, stride, total_bytes},
    min_nr, curr_nr, arena_free, arena_shared, arena_cached, in_use,
    queued, nr_waiters, fail_rate, seed, poison (bool),
    counters {alloc_arena, alloc_reserve, alloc_failed, free_reserve,
              free_arena, sleeps, faults_injected, poison_errors,
              lock_recoveries, reclaimed},
    rates {the counters' keys: per second; --watch only, from frame 2},
    reserve_stack [slot, ...]  (top first; the first 16 unless --all),
    holders [{pid, name, alive, held, cached, sleeping, entry, epoch,
              queue_sleeping}]
        (one per registry entry whose process is alive, or that holds,
        caches or sleeps; entry null for held slots that name no entry;
        sleeping: its threads in a sleeping alloc, queue_sleeping: its
        threads asleep in a blocked put or get, on any queue),
    queues [{name, index, depth, count, waiters, puts, gets}]
        (one per live queue, by index in the queue table: count is the
        elements in it now, waiters the threads asleep in a blocked put or
        get on it, puts and gets its counters),
    slot_counts {reserve, arena, cached, queued, held, held_dead, invalid},
    slot_map (string, legend above), slot_map_group (slots per character),
    lock {held (bool), pid, alive, held_for_s, waited_s, error,
          entry, epoch, seq, waiters, held_throughout},
    creator {pid, alive, created_s (Unix time)}

The numbers ``min_nr`` .. ``poison`` and ``counters`` are those of
``Mempool.stats()``: ``curr_nr + arena_free + in_use + queued == capacity``.
``NAME --check --json``: {name, consistent, ok, findings [sentence, ...]}.
No NAME: a list with, per pool, {name, slot_size, capacity, min_nr,
curr_nr, in_use, nr_waiters, creator_pid, creator_alive, consistent,
queued}, or {name, error} for one that cannot be read.

Since queues (issue 10), as ``stats()``: ``in_use`` counts the elements
processes hold and no longer those that queues hold (new ``queued``);
``nr_waiters`` counts the threads asleep on queues too (the header's word
counts sleeping allocations only); new keys ``queues``,
``slot_counts.queued``, ``holders[].queue_sleeping`` and the listing's
``queued``; the slot map's new ``Q``.

Since layout v4 (the lock is a header word holding its owner's token):
``lock.held`` is always a bool (it was null when the semaphore could not be
opened); ``lock.pid`` is the pid recorded in the holder's registry entry,
null when the token names no current entry (the holder is gone), and
``lock.alive`` is decided by the entry's OFD lock; ``lock.error`` is always
null (no semaphore is opened any more); ``lock.waited_s`` is how long the
inspector waited for a quiet copy; new: ``lock.entry`` (registry entry of
the holder, or null), ``lock.epoch``, ``lock.seq`` (acquisitions so far),
``lock.waiters`` (contenders asleep on the lock), ``lock.held_throughout``
(one holder kept the lock for the whole wait). ``consistent`` means a quiet
copy (it meant: copied under the lock). ``holders`` rows are per registry
entry (new keys ``entry``, ``epoch``), their ``alive`` by OFD lock.

Since schema 1 (issue 12): every document (each pool's, each entry of the
listing, ``--check``'s) carries ``"schema": 1``; the listing's entries have
``stale`` (creator and every attached process dead: ``--destroy`` removes
it) and ``damaged`` (the header's counts cannot be a whole pool's: the text
listing says DAMAGED instead of showing them); ``holders[].command`` is
what the COMMAND column shows (the script, ``-m module``, or
``mp child of PID`` for a multiprocessing child; ``name`` stays the
process name).

Exit status: 0 fine; 1 ``--check`` found problems; 2 usage error, no such
pool, or not a pool (a message on stderr); 3 ``--destroy`` refused (the
pool is in use; ``--force``); 130 interrupted (but ``--watch``, which ends
with 0 on Ctrl-C and when its pool is gone).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import mmap
import os
import re
import signal
import stat
import struct
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from . import _segment
from ._debug import audit, poison_pattern
from ._errors import PoolFormatError
from ._layout import (
    CACHE_MAX,
    COUNTERS,
    FLAG_POISON,
    H_ARENA_FREE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
    H_CURR_NR,
    H_FAIL_RATE,
    H_FLAGS,
    H_LOCK_OWNER,
    H_LOCK_SEQ,
    H_LOCK_WAITERS,
    H_MIN_NR,
    H_NR_WAITERS,
    H_SEED,
    H_STATUS,
    H_VERSION,
    HEADER_BYTES,
    MAGIC,
    N_PROC_COUNTERS,
    OWNER_MASK,
    OWNER_SHIFT,
    P_CACHE,
    P_CACHE_N,
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
    Q_NAME,
    Q_PUTS,
    Q_STATE,
    Q_GETTERS,
    Q_PUTTERS,
    QUEUE_LIVE,
    QUEUE_NAME_BYTES,
    QUEUE_WORDS,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_QUEUED,
    ST_RESERVE,
    STATE_MASK,
    STATUS_LIVE,
    Geometry,
    ST_PARKED,
)
from ._mapping import Views, read_geometry
from ._lock import LockHolder, holder
from ._procs import entry_alive, is_alive, start_ticks

PROG = "shmpool-inspect"
LOCK_TIMEOUT = 0.25  # seconds to try for a quiet copy (--lock-timeout)
LIST_LOCK_TIMEOUT = 0.05  # the same, per pool, when listing them all
RETRY_FIRST_S = 0.0005  # the first pause between tries for a quiet copy
RETRY_MAX_S = 0.01  # pauses double up to this
STACK_SHOWN = 16  # reserve stack entries shown without --all
MAP_WIDTH = 64  # slot map characters per row
MAP_ROWS = 8  # at most this many rows: bigger pools are grouped
CHECK_ATTEMPTS = 3  # a finding must show in this many copies in a row
CHECK_SPACING_S = (0.05, 0.2)  # pauses before the second and third of them
HOLDERS_NAMED = 4  # a finding names at most this many processes
CREATE_TIME_SLACK_S = 1.0  # psutil's start times are derived from a boot time in whole seconds
POISON_CHUNK_BYTES = 8 << 20  # the poison scan compares this much at a time
SLEEPERS_MAX = 1 << 20  # _fast.c's bound: a waiter count beyond it is damage (stats() counts it as 0)
QUEUE_NAME_SHOWN = 16  # a longer queue name gets a line of its own in the text view

# Slot map codes, in the order of their symbols: 0-4 are normal states
# (ranked for ties: the higher code wins), 5-6 problems (shown if present
# at all).
MAP_SYMBOLS = ".cRQHX?"
M_ARENA, M_CACHED, M_RESERVE, M_QUEUED, M_HELD, M_DEAD, M_INVALID = range(7)
#: Version of the --json documents' keys (every document carries it as
#: "schema"): raised when a key is renamed or changes meaning.
SCHEMA = 1
SLOT_COUNT_KEYS = ("arena", "cached", "reserve", "queued", "held", "held_dead", "invalid")

EXAMPLES = """\
examples:
  shmpool-inspect                     every pool on this machine, one line each
  shmpool-inspect demo                the whole picture of pool "demo"
  shmpool-inspect demo --json         the same, as JSON for a script
  shmpool-inspect demo --watch 0.5    redraw twice a second, with rates
  shmpool-inspect demo --check        audit it: exit 1, one line a problem
  shmpool-inspect demo --reclaim-dead take back dead processes' elements

slot map: R reserve, . arena free, c free in a process's cache,
          Q in a queue, H held by a live process, X held by a dead one,
          ? damaged
          (for big pools a character stands for a group of slots)

It never takes the pool lock: it copies the pool's metadata while the lock
is free (--lock-timeout bounds the wait for that).

stale: a pool whose creator and attached processes are all dead (remove it
with --destroy); DAMAGED: its counts cannot be right (see --check).

exit status: 0 fine (and --watch ended by Ctrl-C or by its pool going away),
1 --check found problems, 2 usage error, no such pool or not a pool,
3 --destroy refused (the pool is in use), 130 interrupted.
JSON keys: see shmpool/cli.py (every document has "schema": 1).
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

    holder: LockHolder | None  # who held it when the copy was taken (None: free)
    waited_s: float  # how long it waited for a quiet copy
    held_throughout: bool  # one holder kept the lock from the first look to the copy
    copied_ns: int  # CLOCK_MONOTONIC ns when the copy was taken


@dataclass(frozen=True)
class Copy:
    """A pool's metadata, copied. ``views`` covers the header, slot words,
    stacks and registry of the copy; its ``data`` is empty (slot contents
    are not copied). ``alive[e]`` says whether registry entry ``e``
    belonged to a live process just after the copy. ``unpoisoned`` lists
    the reserve slots whose poison pattern was found broken, or is None
    when not scanned. ``identity`` tells this pool from a later one of the
    same name. A ``summary`` copy holds only the header, the registry and
    the queue table and the slot words that the registry's caches name
    (enough for ``summarize``); the rest of its words, stacks and links are
    zeros."""

    name: str
    views: Views
    consistent: bool
    lock: LockState
    alive: np.ndarray
    unpoisoned: np.ndarray | None
    identity: tuple[int, int]
    summary: bool = False

    @functools.cached_property
    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(state, owner field) of every slot word, computed once."""
        if self.summary:
            raise ValueError("a summary copy holds no slot words")
        return _fields(np.frombuffer(self.views.words, dtype=np.uint64))


def _path(name: str) -> str:
    return os.path.join(_segment.SHM_DIR, _segment.SHM_PREFIX + name)


def _open_readonly(name: str) -> tuple[mmap.mmap, int, int]:
    """Map segment ``name`` read-only: (mapping, size, descriptor). The
    descriptor is a description of our own that holds no OFD lock (for the
    liveness checks). Opened without blocking and never through a link, so
    that something odd in /dev/shm cannot hang it. InspectError."""
    path = _path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except PermissionError:
        raise InspectError(f"pool {name!r}: permission denied: {_segment.why_denied(path)}") from None
    except OSError as exc:
        raise InspectError(f"{name!r} is not a shmpool pool ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InspectError(f"{name!r} is not a shmpool pool (not a regular file)")
        if st.st_size == 0:
            raise InspectError(f"{name!r} is not a shmpool pool (an empty segment: being created, or not a pool)")
        return mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ), st.st_size, fd
    except BaseException:
        os.close(fd)
        raise


def take_copy(
    name: str, lock_timeout: float = LOCK_TIMEOUT, *, scan_poison: bool = True, summary: bool = False
) -> Copy:
    """Copy pool ``name``'s metadata without its lock: a quiet copy (see the
    module doc) if one comes within ``lock_timeout`` seconds, else the last
    try (``consistent`` False). With ``scan_poison``, a poisoned pool's
    reserve elements are checked for their pattern within the same try;
    with ``summary``, only what ``summarize`` reads is copied (see Copy).
    Never writes to the pool and never blocks longer than ``lock_timeout``
    plus a copy. Raises InspectError (PoolMissing if there is no such
    pool)."""
    try:
        _segment.check_name(name)
    except (TypeError, ValueError) as exc:
        raise InspectError(str(exc)) from None
    mm, size, fd = _open_readonly(name)
    try:
        try:
            geo = read_geometry(mm, size)
        except PoolFormatError as exc:
            raise InspectError(f"{name!r} is not a usable shmpool pool: {exc}") from None
        return _copy(name, mm, fd, geo, lock_timeout, scan_poison and not summary, summary)
    finally:
        os.close(fd)
        mm.close()


def _copy(
    name: str, mm: mmap.mmap, fd: int, geo: Geometry, lock_timeout: float, scan_poison: bool, summary: bool
) -> Copy:
    base = memoryview(mm)
    hdr = base[:HEADER_BYTES].cast("Q")  # live: aligned 8-byte loads of the lock's words
    try:
        started = time.monotonic()
        deadline = started + lock_timeout
        first = (hdr[H_LOCK_OWNER], hdr[H_LOCK_SEQ])
        pause = RETRY_FIRST_S
        while True:
            owner, seq = hdr[H_LOCK_OWNER], hdr[H_LOCK_SEQ]
            last_try = time.monotonic() >= deadline
            if owner == 0 or last_try:
                copied_ns = time.monotonic_ns()
                meta = _summary_bytes(mm, geo) if summary else mm[: geo.off_slots]
                unpoisoned = _scan_poison(mm, Views(meta, geo)) if scan_poison else None  # type: ignore[arg-type]
                after = (hdr[H_LOCK_OWNER], hdr[H_LOCK_SEQ])
                quiet = owner == 0 and after == (0, seq)
                if quiet or last_try:
                    break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))  # Ctrl-C gets in here
            pause = min(2 * pause, RETRY_MAX_S)
        waited = time.monotonic() - started
    finally:
        hdr.release()
        base.release()
    views = Views(meta, geo)  # type: ignore[arg-type]  # any buffer will do
    procs = _procs(views)
    alive = np.zeros(geo.max_procs, dtype=bool)
    for e in np.flatnonzero(procs[:, P_EPOCH]).tolist():
        alive[e] = entry_alive(fd, geo, e)
    throughout = not quiet and lock_timeout > 0 and first[0] != 0 and after == first
    lock = LockState(holder(views, fd), waited, throughout, copied_ns)
    identity = (os.fstat(fd).st_ino, int(views.hdr[H_CREATED_NS]))
    return Copy(name, views, quiet, lock, alive, unpoisoned, identity, summary)


def _summary_bytes(mm: mmap.mmap, geo: Geometry) -> np.ndarray:
    """The metadata as ``summarize`` needs it: the header, the registry and
    the queue table copied, of the slot words only those the caches name,
    zeros elsewhere (untouched pages of a zeroed buffer cost nothing)."""
    meta = np.zeros(geo.off_slots, dtype=np.uint8)
    procs_end = geo.off_procs + 8 * PROC_WORDS * geo.max_procs
    queues_end = geo.off_queues + 8 * QUEUE_WORDS * geo.max_queues  # the table follows the registry
    meta[:HEADER_BYTES] = np.frombuffer(mm, dtype=np.uint8, count=HEADER_BYTES)
    meta[geo.off_procs : queues_end] = np.frombuffer(mm, dtype=np.uint8, count=queues_end - geo.off_procs,
                                                     offset=geo.off_procs)
    idx, _ = _cache_slots(meta[geo.off_procs : procs_end].view(np.uint64).reshape(geo.max_procs, PROC_WORDS),
                          geo.capacity)
    live = np.frombuffer(mm, dtype=np.uint64, count=geo.capacity, offset=geo.off_words)
    try:
        meta[geo.off_words : geo.off_stack].view(np.uint64)[idx] = live[idx]
    finally:
        del live  # the mapping cannot be closed while a view of it lives
    return meta


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


def _procs(v: Views) -> np.ndarray:
    return np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)


def _fields(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(state, owner field) of each of ``words``."""
    return (words & np.uint64(STATE_MASK)).astype(np.uint8), (
        (words >> np.uint64(OWNER_SHIFT)) & np.uint64(OWNER_MASK)).astype(np.uint16)


def _cache_slots(procs: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots each registry entry's cache names, (max_procs, CACHE_MAX)
    (0 where an entry is past ``cache_n``, blank or out of range), and
    where they are valid. Entries count as ``usage`` in ``_fast.c`` counts
    them: those in use, or with a cache count."""
    n = np.minimum(procs[:, P_CACHE_N], CACHE_MAX).astype(np.int64)
    counted = (procs[:, P_EPOCH] != 0) | (procs[:, P_CACHE_N] != 0)
    cache = np.ascontiguousarray(procs[:, P_CACHE : P_CACHE + CACHE_MAX // 2]).view(np.uint32).astype(np.int64)
    valid = (np.arange(CACHE_MAX)[None, :] < n[:, None]) & counted[:, None] & (cache < capacity)
    return np.where(valid, cache, 0), valid


def cached_per_entry(v: Views) -> np.ndarray:
    """How many slots each registry entry's cache holds: the entries of
    ``cache[0:cache_n]`` that name a slot CACHED by that entry (as
    ``usage`` in ``_fast.c`` counts them: never a counter)."""
    idx, valid = _cache_slots(_procs(v), v.geo.capacity)
    states, owners = _fields(np.frombuffer(v.words, dtype=np.uint64)[idx])
    me = np.arange(1, v.geo.max_procs + 1)[:, None]
    return np.asarray((valid & (states == ST_CACHED) & (owners == me)).sum(axis=1))


def owner_alive(alive: np.ndarray) -> np.ndarray:
    """Indexed by an owner field (entry + 1, or queue + 1): whether it
    names an entry (a queue) that ``alive`` says is alive (live); 0 and
    fields beyond ``alive`` name none."""
    table = np.zeros(OWNER_MASK + 1, dtype=bool)
    table[1 : alive.size + 1] = alive
    return table


def slot_codes(words: np.ndarray, alive: np.ndarray, queue_live: np.ndarray | None = None) -> np.ndarray:
    """Each slot's slot-map code (M_*), from its word; a held slot is
    M_HELD if its owner field names a registry entry that ``alive`` (one
    bool per entry) says is alive, else M_DEAD; a queued slot is M_QUEUED
    if its owner field names a queue that ``queue_live`` (one bool per
    queue table entry) says exists, else M_INVALID (None: any queue)."""
    if queue_live is None:
        queue_live = np.ones(OWNER_MASK, dtype=bool)
    return _codes(*_fields(words), alive, queue_live)


def _codes(states: np.ndarray, owners: np.ndarray, alive: np.ndarray, queue_live: np.ndarray) -> np.ndarray:
    codes = np.full(states.size, M_INVALID, dtype=np.uint8)
    codes[states == ST_ARENA] = M_ARENA
    codes[states == ST_CACHED] = M_CACHED
    codes[states == ST_RESERVE] = M_RESERVE
    codes[(states == ST_QUEUED) & owner_alive(queue_live)[owners]] = M_QUEUED  # the others stay M_INVALID
    held = states == ST_HELD
    codes[held] = M_DEAD
    codes[held & owner_alive(alive)[owners]] = M_HELD
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
    normal = counts[:, M_HELD::-1]  # H, Q, R, c, . (reversed: argmax takes the first of a tie)
    shown = M_HELD - np.argmax(normal, axis=1)
    shown[counts[:, M_DEAD] > 0] = M_DEAD
    shown[counts[:, M_INVALID] > 0] = M_INVALID
    return "".join(symbols[shown]), group


def _held_per_owner(copy: Copy) -> np.ndarray:
    """How many slots are HELD under each owner field (OWNER_MASK + 1)."""
    states, owners = copy.slots
    return np.bincount(owners[states == ST_HELD], minlength=OWNER_MASK + 1)


def queue_sleepers(v: Views) -> np.ndarray:
    """How many threads of each registry entry's process sleep on each
    queue, (max_procs, max_queues): the entries' P_QSLEEP bytes."""
    procs = _procs(v)
    get = np.ascontiguousarray(procs[:, P_QGET : P_QPUT]).view(np.uint8).astype(np.int64)
    per = get + np.ascontiguousarray(procs[:, P_QPUT : PROC_WORDS]).view(np.uint8)
    return per[:, : v.geo.max_queues].astype(np.int64)


def holders(copy: Copy) -> list[dict[str, Any]]:
    """One row per registry entry whose process is alive, or that holds,
    caches or sleeps (in alloc or on a queue; a dead entry with nothing is
    no holder), by entry; then one row (entry None, pid 0) for held slots
    whose owner field names no entry (0, or beyond the registry: damage).
    Queued elements are the queues', never a process's: no row counts them."""
    v, alive = copy.views, copy.alive
    procs, held, cached = _procs(v), _held_per_owner(copy), cached_per_entry(v)
    on_queues = queue_sleepers(v).sum(axis=1)
    n = v.geo.max_procs
    rows = []
    busy = (held[1 : n + 1] > 0) | (cached > 0) | (procs[:, P_SLEEPING] > 0) | (on_queues > 0)
    for e in np.flatnonzero(alive | busy).tolist():
        pid, start = int(procs[e, P_PID]), int(procs[e, P_START])
        rows.append({
            "pid": pid,
            "name": _command(pid, start) if alive[e] else "",
            "command": _command_line(pid, start) if alive[e] else "",
            "alive": bool(alive[e]),
            "held": int(held[e + 1]),
            "cached": int(cached[e]),
            "sleeping": int(procs[e, P_SLEEPING]),
            "entry": e,
            "epoch": int(procs[e, P_EPOCH]),
            "queue_sleeping": int(on_queues[e]),
        })
    orphans = int(held[0] + held[n + 1 :].sum())
    if orphans:
        rows.append({"pid": 0, "name": "", "command": "", "alive": False, "held": orphans, "cached": 0, "sleeping": 0,
                     "entry": None, "epoch": 0, "queue_sleeping": 0})
    return rows


def _queue_table(v: Views) -> np.ndarray:
    return np.frombuffer(v.queues, dtype=np.uint64).reshape(v.geo.max_queues, QUEUE_WORDS)


def live_queues(v: Views) -> np.ndarray:
    """One bool per queue table entry: whether that queue exists."""
    return np.asarray(_queue_table(v)[:, Q_STATE] == QUEUE_LIVE)


def _queue_name(row: np.ndarray) -> str:
    raw = np.ascontiguousarray(row[Q_NAME : Q_NAME + QUEUE_NAME_BYTES // 8]).tobytes()
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def queues(v: Views) -> list[dict[str, Any]]:
    """One row per live queue, by index: its name, index in the queue
    table, depth, count (elements in it now), waiters (threads asleep in a
    blocked put or get on it) and its puts and gets counters, as the queue
    table has them."""
    table = _queue_table(v)
    return [
        {"name": _queue_name(table[q]), "index": q, "depth": int(table[q, Q_DEPTH]), "count": int(table[q, Q_COUNT]),
         "waiters": int(table[q, Q_GETTERS]) + int(table[q, Q_PUTTERS]), "puts": int(table[q, Q_PUTS]), "gets": int(table[q, Q_GETS])}
        for q in np.flatnonzero(live_queues(v)).tolist()
    ]


def _counters(v: Views) -> dict[str, int]:
    """The counters as stats() sums them: the header's plus every
    registry entry's."""
    per_proc = _procs(v)[:, P_COUNTERS : P_COUNTERS + N_PROC_COUNTERS].sum(axis=0).tolist()
    return {
        name: int(v.hdr[index]) + (int(per_proc[i]) if i < N_PROC_COUNTERS else 0)
        for i, (name, index) in enumerate(COUNTERS)
    }


def _lock_info(copy: Copy) -> dict[str, Any]:
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


def _totals(v: Views) -> dict[str, int]:
    """The header's numbers, as stats() derives them: queued elements are
    the live queues' counts, in_use the rest of the capacity, nr_waiters
    the sleeping allocations plus every live queue's waiters."""
    hdr, cap = v.hdr, v.geo.capacity
    curr_nr, shared = int(hdr[H_CURR_NR]), int(hdr[H_ARENA_FREE])
    cached = int(cached_per_entry(v).sum())
    table = _queue_table(v)[live_queues(v)]
    queued = int(np.minimum(table[:, Q_COUNT], cap).sum())
    waiters = np.concatenate([table[:, Q_GETTERS], table[:, Q_PUTTERS]])
    on_queues = int(waiters[waiters < SLEEPERS_MAX].sum())
    return {
        "min_nr": int(hdr[H_MIN_NR]), "curr_nr": curr_nr, "arena_free": shared + cached,
        "arena_shared": shared, "arena_cached": cached, "in_use": max(0, cap - curr_nr - shared - cached - queued),
        "queued": queued, "nr_waiters": int(hdr[H_NR_WAITERS]) + on_queues,
    }


def _creator(v: Views) -> dict[str, Any]:
    pid, created_ns = int(v.hdr[H_CREATOR_PID]), int(v.hdr[H_CREATED_NS])
    alive = creator_alive(pid, created_ns, int(v.hdr[H_CREATOR_START]))
    return {"pid": pid, "alive": alive, "created_s": round(created_ns / 1e9, 3)}


def describe(copy: Copy, show_all: bool = False) -> dict[str, Any]:
    """Everything about one pool, as the JSON document (see the module doc)."""
    v, geo = copy.views, copy.views.geo
    hdr = v.hdr
    codes = _codes(*copy.slots, copy.alive, live_queues(v))
    smap, group = slot_map(codes)
    totals = _totals(v)
    depth = min(totals["curr_nr"], geo.capacity)
    stack = np.frombuffer(v.stack, dtype=np.uint32)[:depth][::-1]
    return {
        "schema": SCHEMA,
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
        "holders": holders(copy),
        "queues": queues(v),
        "slot_counts": dict(zip(SLOT_COUNT_KEYS, np.bincount(codes, minlength=len(MAP_SYMBOLS)).tolist())),
        "slot_map": smap,
        "slot_map_group": group,
        "lock": _lock_info(copy),
        "creator": _creator(v),
    }


def summarize(copy: Copy) -> dict[str, Any]:
    """One pool's line of the listing (no per-slot work but the caches)."""
    v = copy.views
    totals = _totals(v)
    creator = _creator(v)
    return {
        "schema": SCHEMA,
        "name": copy.name, "slot_size": v.geo.slot_size, "capacity": v.geo.capacity,
        "min_nr": totals["min_nr"], "curr_nr": totals["curr_nr"], "in_use": totals["in_use"],
        "nr_waiters": totals["nr_waiters"], "creator_pid": creator["pid"], "creator_alive": creator["alive"],
        "consistent": copy.consistent, "queued": totals["queued"],
        "stale": not creator["alive"] and not copy.alive.any(),
        "damaged": _header_damaged(v),
    }


def _header_damaged(v: Views) -> bool:
    """Whether the header's counts cannot be those of a whole pool (each
    within the capacity, together no more than it, waiters below the bound):
    the listing then says "damaged" rather than show the numbers."""
    hdr, cap = v.hdr, v.geo.capacity
    curr_nr, shared, min_nr = int(hdr[H_CURR_NR]), int(hdr[H_ARENA_FREE]), int(hdr[H_MIN_NR])
    cached = int(cached_per_entry(v).sum())
    table = _queue_table(v)[live_queues(v)]
    queued = int(table[:, Q_COUNT].sum())
    parts = (curr_nr, shared, cached, queued, min_nr)
    return (any(not 0 <= x <= cap for x in parts) or curr_nr + shared + cached + queued > cap
            or int(hdr[H_NR_WAITERS]) >= SLEEPERS_MAX)


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
            out.append({"schema": SCHEMA, "name": name, "error": kind})
            continue
        try:
            out.append(summarize(take_copy(name, LIST_LOCK_TIMEOUT, summary=True)))
        except PoolMissing:
            continue
        except InspectError as exc:
            out.append({"schema": SCHEMA, "name": name, "error": str(exc)})
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


def _who(procs: np.ndarray, entries: list[int], what: np.ndarray, unit: str) -> str:
    """'pid 12 (entry 0): 3 <unit>, ...' for the first few ``entries``."""
    named = []
    for e in entries[:HOLDERS_NAMED]:
        whose = f"pid {int(procs[e, P_PID])}" if procs[e, P_EPOCH] else f"vacant, last pid {int(procs[e, P_PID])}"
        named.append(f"{int(what[e])} {unit} of entry {e} ({whose})")
    more = len(entries) - HOLDERS_NAMED
    return ", ".join(named) + (f" and {more} more entries" if more > 0 else "")


def _dead_findings(copy: Copy) -> list[str]:
    """Elements held by dead processes (an entry whose process is dead, or
    an owner field naming a vacant entry or none at all), and sleepers (in
    alloc, on queues) that dead processes still count: what reclaim_dead
    takes back. A queued element is the queue's, whoever put it: never a
    finding here."""
    v, alive = copy.views, copy.alive
    procs, held, n = _procs(v), _held_per_owner(copy), v.geo.max_procs
    hint = f"run `{PROG} --reclaim-dead {copy.name}` (or pool.reclaim_dead())"
    findings = []
    per_entry = held[1 : n + 1]
    dead = np.flatnonzero((per_entry > 0) & ~alive).tolist()
    if dead:
        total = int(per_entry[dead].sum())
        findings.append(f"{total} element(s) held by dead processes ({_who(procs, dead, per_entry, 'held')}): {hint}")
    states, owners = copy.slots
    for label, mask in (("record no holder (owner 0)", owners == 0),
                        (f"name an owner beyond the registry of {n} entries", owners > n)):
        slots = np.flatnonzero((states == ST_HELD) & mask)
        if slots.size:
            findings.append(f"{slots.size} held slot(s) {label}, first slot {slots[0]}: {hint}")
    sleeping = procs[:, P_SLEEPING]
    ghosts = np.flatnonzero((sleeping > 0) & ~alive).tolist()
    if ghosts:
        total = int(sleeping[ghosts].sum())
        findings.append(f"{total} sleeping allocation(s) of dead processes still counted "
                        f"({_who(procs, ghosts, sleeping, 'sleeping')}): {hint}")
    on_queues = queue_sleepers(v).sum(axis=1)
    ghosts = np.flatnonzero((on_queues > 0) & ~alive).tolist()
    if ghosts:
        total = int(on_queues[ghosts].sum())
        findings.append(f"{total} queue sleeper(s) of dead processes still counted "
                        f"({_who(procs, ghosts, on_queues, 'asleep on queues')}): {hint}")
    return findings


def _waiter_findings(copy: Copy) -> list[str]:
    """nr_waiters counts the sleepers that processes record in their
    registry entries: every sleeper counts itself in both (dead ones too,
    until they are uncounted from both)."""
    sleeping = _procs(copy.views)[:, P_SLEEPING]
    live, recorded = int(sleeping[copy.alive].sum()), int(sleeping.sum())
    nr_waiters = int(copy.views.hdr[H_NR_WAITERS])
    if nr_waiters < live:
        return [f"nr_waiters {nr_waiters} is less than the {live} sleeping allocation(s) of live processes"]
    if nr_waiters > recorded:
        return [f"nr_waiters {nr_waiters} is more than the {recorded} sleeping allocation(s) recorded in the "
                f"registry: wake-ups are posted for sleepers that do not exist"]
    return []


def _queue_waiter_findings(copy: Copy) -> list[str]:
    """Each live queue's waiter count counts the sleepers that processes
    record per queue in their registry entries, as nr_waiters does for
    allocations."""
    v = copy.views
    table, per = _queue_table(v), queue_sleepers(v)
    findings = []
    for q in np.flatnonzero(live_queues(v)).tolist():
        waiters = int(table[q, Q_GETTERS]) + int(table[q, Q_PUTTERS])
        live, recorded = int(per[copy.alive, q].sum()), int(per[:, q].sum())
        which = f"queue {q} ({_queue_name(table[q])!r})"
        if waiters < live:
            findings.append(f"{which} counts {waiters} waiter(s), fewer than the {live} sleeping on it in live "
                            f"processes")
        elif waiters > recorded:
            findings.append(f"{which} counts {waiters} waiter(s), more than the {recorded} recorded in the registry")
    return findings


def _queued_findings(copy: Copy) -> list[str]:
    """Queued slots whose owner field names no queue table entry at all (0,
    or beyond the table): the audit checks those that name an entry."""
    states, owners = copy.slots
    n = copy.views.geo.max_queues
    slots = np.flatnonzero((states == ST_QUEUED) & ((owners == 0) | (owners > n)))
    if slots.size:
        return [f"{slots.size} queued slot(s) name no queue of the table's {n} (owner field "
                f"{int(owners[slots[0]])}), first slot {slots[0]}"]
    return []


def check(copy: Copy) -> list[str]:
    """Every broken invariant in ``copy``, one sentence each that names the
    damage (empty for a healthy pool): ``_debug.audit`` (each slot in one
    place, stacks of distinct slots in the right state, counts that add up,
    curr_nr <= min_nr <= capacity, caches, each queue's list), the
    reserve's poison, queued slots that name no queue, elements and
    sleepers of dead processes, the waiter counts (the pool's and each
    queue's); and, if one holder
    kept the lock for the whole wait, a line that says so (the audit then
    ran on a copy that a critical section may have left half done)."""
    if copy.summary:
        raise ValueError("a summary copy cannot be audited")
    v = copy.views
    findings = audit(_without_poison_flag(v))
    if copy.unpoisoned is not None and copy.unpoisoned.size and not findings:  # as audit: on an otherwise whole pool
        n, first = copy.unpoisoned.size, int(copy.unpoisoned[0])
        findings.append(f"{n} reserved element(s) lost their poison (written after free), first slot {first}")
    findings += _queued_findings(copy) + _dead_findings(copy) + _waiter_findings(copy) + _queue_waiter_findings(copy)
    if v.hdr[H_STATUS] != STATUS_LIVE:
        findings.append("the pool is marked destroyed but still exists (its destroyer may have died)")
    if copy.lock.held_throughout:
        findings.append(f"the lock was {_lock_text(_lock_info(copy))}, all {copy.lock.waited_s:.2f} s the inspector "
                        f"waited: this audit ran on a copy that a critical section may have left half done")
    return findings


def _kind(finding: str) -> str:
    """A finding without its numbers: the same problem seen again."""
    return re.sub(r"\d+(\.\d+)?", "#", finding)


def check_pool(name: str, lock_timeout: float = LOCK_TIMEOUT) -> tuple[Copy, list[str]]:
    """Audit pool ``name``. Nothing guarantees a copy taken without the lock
    is whole (a process's cache changes without the lock, a holder may be
    stopped half way), so a finding counts only if it shows in
    CHECK_ATTEMPTS copies in a row, CHECK_SPACING_S apart; the last copy
    and its confirmed findings are returned."""
    copy = take_copy(name, lock_timeout)
    findings = check(copy)
    for pause in CHECK_SPACING_S[: CHECK_ATTEMPTS - 1]:
        if not findings:
            break
        time.sleep(pause)
        copy = take_copy(name, lock_timeout)
        kinds = {_kind(f) for f in findings}
        findings = [f for f in check(copy) if _kind(f) in kinds]
    return copy, findings


# ----------------------------------------------------------------------
# Rendering for a person (80 columns)


def _bar(curr: int, min_nr: int, width: int = 20) -> str:
    filled = min(width, round(width * curr / min_nr)) if min_nr > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _printable(text: str) -> str:
    """``text`` with anything a terminal would act on escaped (a queue name
    is any UTF-8 without NUL)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _lock_text(lock: dict[str, Any]) -> str:
    if not lock["held"]:
        waited = lock["waited_s"] or 0
        return "free" + (f" (waited {waited * 1000:.0f} ms for a quiet copy)" if waited >= 0.001 else "")
    if lock["pid"] is None:
        text = f"held by a process no longer registered (token of entry {lock['entry']}, epoch {lock['epoch']}): dead"
    else:
        text = f"held by pid {lock['pid']} ({'alive' if lock['alive'] else 'dead'}, registry entry {lock['entry']})"
    return text + (f" for {lock['held_for_s']:.3f} s" if lock["held_for_s"] is not None else "")


def _wrapped(label: str, text: str) -> list[str]:
    return textwrap.wrap(text, 78, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13) or [""]


def _summary_lines(d: dict[str, Any]) -> list[str]:
    g, creator = d["geometry"], d["creator"]
    created = datetime.datetime.fromtimestamp(creator["created_s"]).strftime("%Y-%m-%d %H:%M:%S")
    short = d["min_nr"] - d["curr_nr"]
    dead = d["slot_counts"]["held_dead"]
    on_queues = sum(q["waiters"] for q in d["queues"] if q["waiters"] < SLEEPERS_MAX)
    rows = [
        ("segment", f"{d['path']}, {g['total_bytes']} bytes"),
        ("geometry", f"{g['capacity']} slots of {g['slot_size']} bytes (stride {g['stride']})"),
        ("reserve", f"{_bar(d['curr_nr'], d['min_nr'])} {d['curr_nr']}/{d['min_nr']} curr_nr/min_nr, "
                    + ("full" if short <= 0 else f"{short} below min_nr")),
        ("arena", f"{d['arena_free']} free ({d['arena_shared']} shared, {d['arena_cached']} in process caches)"),
        ("in use", f"{d['in_use']}" + (f" ({dead} held by dead processes)" if dead else "")),
        ("queued", f"{d['queued']} in {len(d['queues'])} queue(s)" if d["queues"] else f"{d['queued']} (no queues)"),
        ("waiters", f"{d['nr_waiters']} sleeping" + (
            f" ({d['nr_waiters'] - on_queues} in alloc, {on_queues} on queues)" if on_queues else "")),
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


def _shown_command(text: str, width: int = 20) -> str:
    """A command in ``width`` columns: a long one keeps its end (a script's
    file name), behind a leading ~."""
    text = _printable(text)
    return text if len(text) <= width else "~" + text[-(width - 1) :]


def _holder_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"{'PID':>8}  {'COMMAND':<20} {'STATE':<5} {'HELD':>8} {'CACHED':>6} {'SLEEPING':>8} {'Q-WAIT':>6} "
             f"{'ENTRY':>6}"]
    for h in d["holders"]:
        entry = "-" if h["entry"] is None else str(h["entry"])
        lines.append(
            f"{h['pid']:>8}  {_shown_command(h.get('command') or h['name'] or '-'):<20} {'alive' if h['alive'] else 'DEAD':<5} "
            f"{h['held']:>8} {h['cached']:>6} {h['sleeping']:>8} {h['queue_sleeping']:>6} {entry:>6}"
        )
    if not d["holders"]:
        lines.append(f"{'':>8}  (no process holds or waits)")
    return lines


def _queue_lines(d: dict[str, Any]) -> list[str]:
    """Each live queue: its fill against its depth, waiters and counters
    (a name too long for its column gets a line of its own)."""
    w = QUEUE_NAME_SHOWN
    lines = [f"  {'QUEUE':<{w}} {'FILL':<14} {'COUNT/DEPTH':>13} {'WAITERS':>7} {'PUTS':>10} {'GETS':>10}"]
    for q in d["queues"]:
        name = _printable(q["name"])
        if len(name) > w:
            lines.append(f"  {name}")
            name = ""
        fill = f"{q['count']}/{q['depth']}"
        lines.append(f"  {name:<{w}} {_bar(q['count'], q['depth'], 12)} {fill:>13} {q['waiters']:>7} "
                     f"{q['puts']:>10} {q['gets']:>10}")
    return [f"queues ({len(d['queues'])}):", *lines]


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
    lines = ["slot map: R reserve  . arena  c cached  Q queued  H held  X held by dead  ? bad"]
    if group > 1:
        lines.append(f"  1 char = {group} slots: the state of most (X or ? if any)")
    for i in range(0, len(smap), MAP_WIDTH):
        lines.append(f"{i * group:>10} {smap[i : i + MAP_WIDTH]}")
    return lines


def render(d: dict[str, Any], when: str = "") -> str:
    """One pool for a person, in 80 columns (a long pool name aside)."""
    lines = [f"pool {d['name']} (shmpool layout v{d['layout_version']})" + (f"  at {when}" if when else "")]
    if not d["consistent"]:
        lines += [f"  WARNING: the pool lock was not free for a whole copy within {d['lock']['waited_s']:.2f} s,",
                  "  so this snapshot may be inconsistent"]
    sections = [_summary_lines(d), _stack_lines(d), _holder_lines(d)]
    if d["queues"]:
        sections.append(_queue_lines(d))
    sections += [_counter_lines(d), _map_lines(d)]
    for section in sections:
        lines += section + [""]
    return "\n".join(lines[:-1])


LIST_COLUMNS = (("SLOT", "slot_size"), ("CAPACITY", "capacity"), ("MIN", "min_nr"), ("CURR", "curr_nr"),
                ("IN USE", "in_use"), ("QUEUED", "queued"), ("WAIT", "nr_waiters"))
LIST_NAME_MIN = 8  # the name column is never narrower than this


def render_list(pools: list[dict[str, Any]]) -> str:
    """The listing: one line a pool, in 80 columns (unless numbers too big
    for them): each number column as wide as its widest entry, the name
    column what is left (a longer name ends in ~)."""
    shown = [p for p in pools if "error" not in p]
    numbered = [p for p in shown if not p.get("damaged")]
    widths = [max([len(head), *(len(str(p[key])) for p in numbered)]) for head, key in LIST_COLUMNS]
    creators = {id(p): ("alive" if p["creator_alive"] else "gone") + (" STALE" if p.get("stale") else "")
                + ("" if p["consistent"] else " (lock busy)") for p in shown}
    tail = max([len("CREATOR"), *map(len, creators.values())])
    room = 80 - sum(w + 1 for w in widths) - 1 - tail
    width = max(LIST_NAME_MIN, min(room, max([4, *(len(p["name"]) for p in pools)])))
    heads = " ".join(f"{head:>{w}}" for (head, _), w in zip(LIST_COLUMNS, widths))
    lines = [f"{'NAME':<{width}} {heads} CREATOR"]
    for p in pools:
        name = p["name"] if len(p["name"]) <= width else p["name"][: width - 1] + "~"
        if "error" in p:
            lines += textwrap.wrap(f"{name:<{width}} ({p['error']})", 80, subsequent_indent=" " * (width + 1))
            continue
        if p.get("damaged"):
            text = f"DAMAGED: run `{PROG} {p['name']} --check`"
            lines.append(f"{name:<{width}} {text:<{sum(w + 1 for w in widths) - 1}} {creators[id(p)]}")
            continue
        numbers = " ".join(f"{p[key]:>{w}}" for (_, key), w in zip(LIST_COLUMNS, widths))
        lines.append(f"{name:<{width}} {numbers} {creators[id(p)]}")
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
    """--reclaim-dead: the one command that writes (it attaches as a
    process, which itself takes back what dead processes left, then calls
    ``reclaim_dead``). Says, per dead process, what it held, cached and
    slept on (as a copy just before saw it), then how many elements came
    back: the rise of the pool's ``reclaimed`` counter meanwhile (another
    process reclaiming at the same moment is counted too)."""
    from .pool import Mempool

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
        if h["alive"] or not (h["held"] or h["cached"] or h["sleeping"] or h["queue_sleeping"]):
            continue
        what = f"{h['held']} held element(s), {h['cached']} cached slot(s), {h['sleeping']} sleeping" + (
            f", {h['queue_sleeping']} asleep on queues" if h["queue_sleeping"] else "")
        if h["entry"] is None:
            _emit(f"  no holder recorded: {h['held']} held element(s)")
        else:
            _emit(f"  pid {h['pid']} (dead): {what} (registry entry {h['entry']})")
    taken = max(taken, reclaimed - before["counters"]["reclaimed"])
    _emit(f"reclaimed {taken} element(s) from dead processes in pool {name!r}")
    return 0


EXIT_REFUSED = 3  # --destroy of a pool in use, without --force


def destroy(name: str, force: bool = False) -> int:
    """--destroy: remove pool ``name`` (its segment and semaphores). A
    stale pool (its creator and every attached process dead) goes at once;
    a live one (creator alive, or any process attached per
    ``_procs.live_pids``) is refused with exit status 3 unless ``force``:
    then it is destroyed as ``destroy(force=True)`` would (attached
    processes get PoolDestroyedError, sleepers are woken)."""
    from ._procs import live_pids
    from .pool import Mempool

    copy = take_copy(name, LIST_LOCK_TIMEOUT, scan_poison=False, summary=True)
    creator = _creator(copy.views)
    try:
        live = [pid for pid, _ in live_pids(name)]
    except FileNotFoundError:
        raise PoolMissing(f"no pool named {name!r}") from None
    except (OSError, PoolFormatError) as exc:
        raise InspectError(str(exc)) from None
    users = ([f"its creator (pid {creator['pid']})"] if creator["alive"] else []) + (
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
                                   ("--reclaim-dead", args.reclaim_dead), ("--destroy", args.destroy)) if on]
    if modes and not args.name:
        parser.error(f"{modes[0]} needs a pool name")
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} cannot be combined")
    if args.watch is not None and not 0 < args.watch < math.inf:
        parser.error("--watch needs a positive number of seconds")
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
