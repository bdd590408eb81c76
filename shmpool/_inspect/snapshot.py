"""Taking a copy of a pool's metadata, without its lock.

Inspecting never changes a pool and never takes its lock. The segment is
opened and mapped read-only (a stray store would fault, not corrupt) and
the lock word is only read: a lock taken by the inspector would have to be
recorded like any holder's, and an inspector that is killed, stopped or
slow must never be one more thing the pool's users wait for.

Only the metadata is copied: the segment's bytes before its slots (header,
slot words, both stacks, queue links, process registry, queue table; 20
bytes a slot, a few milliseconds for a million slots). For ``--check`` of a
poisoned pool the reserve's elements are compared with the poison pattern
in place, within the same try. A *summary* copy (the listing) copies only
the header, the registry, the queue table and the slot words the caches
name, and leaves zeros elsewhere: enough for the pool's numbers
(``numbers.derive``), which read nothing else unless the header says that
parked frees exist.

A quiet copy: every critical section runs under the lock, and every
acquisition bumps ``H_LOCK_SEQ``. A copy during which the lock was free,
before and after, with the same sequence number, saw no critical section:
the reserve, the shared arena, the queues, the stacks and the counters in
it agree with each other (``consistent``). A process's own cache changes
without the lock, and a free that cannot get the lock parks its element
without it, so a quiet copy may still catch one of those half done. The
copy is retried (reading only the lock's words between tries) until it is
quiet or ``lock_timeout`` has passed; then the last try is kept, marked not
consistent, with who holds the lock.

Who holds the lock: ``H_LOCK_OWNER`` is 0 or the holder's token ``(entry +
1) | epoch << 16`` (``_core/lock.c`` says how it is taken and taken over).
The token is read back into the holder's registry entry: the pid it
recorded there, and whether it lives, decided as the core decides it, by
the OFD lock on the entry's byte of the segment (``_procs.entry_alive``),
which the kernel drops when its process dies, in any pid namespace.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import _segment
from .._errors import PoolFormatError
from .._layout import (
    CACHE_MAX,
    FLAG_POISON,
    H_CREATED_NS,
    H_FLAGS,
    H_LOCK_OWNER,
    H_LOCK_SEQ,
    H_LOCK_SINCE_NS,
    H_RESERVE_DEPTH,
    HEADER_BYTES,
    MAGIC,
    OWNER_MASK,
    OWNER_SHIFT,
    P_CACHE,
    P_CACHE_N,
    P_EPOCH,
    P_PID,
    P_PLACE_Q,
    P_PLACE_R,
    P_PLACES,
    P_START,
    PLACE_FULL_MASK,
    PLACES_MAX,
    POISON_END,
    POISON_FREE,
    PROC_WORDS,
    QUEUE_WORDS,
    STATE_MASK,
    Geometry,
)
from .._mapping import Views, read_geometry
from .._procs import entry_alive

PROG = "shmpool-inspect"
LOCK_TIMEOUT = 0.25  # seconds to try for a quiet copy (--lock-timeout)
LIST_LOCK_TIMEOUT = 0.05  # the same, per pool, when listing them all
RETRY_FIRST_S = 0.0005  # the first pause between tries for a quiet copy
RETRY_MAX_S = 0.01  # pauses double up to this
POISON_CHUNK_BYTES = 8 << 20  # the poison scan compares this much at a time


class InspectError(Exception):
    """A pool that cannot be shown (exit status 2)."""


class PoolMissing(InspectError):
    """There is no pool of that name (any more)."""


def poison_pattern(slot_size: int) -> bytes:
    """What a reserved element holds while poisoning is on."""
    return bytes([POISON_FREE]) * (slot_size - 1) + bytes([POISON_END])


@dataclass(frozen=True)
class LockHolder:
    """Who held the pool lock when it was read."""

    entry: int  # registry entry (-1: the token names none)
    epoch: int
    pid: int  # 0 if the entry no longer has this epoch
    start: int
    alive: bool
    since_ns: int  # CLOCK_MONOTONIC ns when it was taken
    seq: int


def holder(v: Views, fd: int) -> LockHolder | None:
    """The lock's holder, or None if it is free. ``fd``: a descriptor of the
    segment that holds no OFD lock itself (for the liveness check)."""
    hdr = v.hdr
    token = hdr[H_LOCK_OWNER]
    if not token:
        return None
    entry, epoch = (token & OWNER_MASK) - 1, token >> 16
    procs = procs_table(v)
    if not 0 <= entry < v.geo.max_procs or procs[entry, P_EPOCH] != epoch:
        return LockHolder(entry if 0 <= entry < v.geo.max_procs else -1, epoch, 0, 0, False,
                          hdr[H_LOCK_SINCE_NS], hdr[H_LOCK_SEQ])
    return LockHolder(entry, epoch, int(procs[entry, P_PID]), int(procs[entry, P_START]),
                      entry_alive(fd, v.geo, entry), hdr[H_LOCK_SINCE_NS], hdr[H_LOCK_SEQ])


@dataclass(frozen=True)
class LockState:
    """What the inspector learnt about the pool lock while copying."""

    holder: LockHolder | None  # who held it when the copy was taken (None: free)
    waited_s: float  # how long it waited for a quiet copy
    held_throughout: bool  # one holder kept the lock from the first look to the copy
    copied_ns: int  # CLOCK_MONOTONIC ns when the copy was taken


def procs_table(v: Views) -> np.ndarray:
    """The registry as a (max_procs, PROC_WORDS) array of words."""
    return np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)


def fields(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(state, owner field) of each of ``words``."""
    return (words & np.uint64(STATE_MASK)).astype(np.uint8), (
        (words >> np.uint64(OWNER_SHIFT)) & np.uint64(OWNER_MASK)).astype(np.uint16)


@dataclass(frozen=True)
class Copy:
    """A pool's metadata, copied. ``views`` covers the header, slot words,
    stacks, registry and queue table of the copy; its ``data`` is empty
    (slot contents are not copied). ``alive[e]`` says whether registry
    entry ``e`` belonged to a live process just after the copy.
    ``unpoisoned`` lists the reserve slots whose poison pattern was found
    broken, or is None when not scanned. ``identity`` tells this pool from
    a later one of the same name. A ``summary`` copy holds only the header,
    the registry, the queue table and the slot words that the registry's
    caches name; the rest of its words, stacks and links are zeros."""

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
        return fields(np.frombuffer(self.views.words, dtype=np.uint64))


def _open_readonly(name: str) -> tuple[mmap.mmap, int, int]:
    """Map segment ``name`` read-only: (mapping, size, descriptor). The
    descriptor is a description of our own that holds no OFD lock (for the
    liveness checks). Opened without blocking and never through a link, so
    that something odd in /dev/shm cannot hang it. InspectError."""
    path = _segment.segment_path(name)
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
    with ``summary``, only what the pool's numbers read is copied (see
    Copy). Never writes to the pool and never blocks longer than
    ``lock_timeout`` plus a copy. Raises InspectError (PoolMissing if there
    is no such pool)."""
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
        try:
            mm.close()
        except BufferError:  # an interrupt came while a view of it lived: it goes with the view
            pass


def _copy(
    name: str, mm: mmap.mmap, fd: int, geo: Geometry, lock_timeout: float, scan_poison: bool, summary: bool
) -> Copy:
    base = hdr = None
    try:
        base = memoryview(mm)
        hdr = base[:HEADER_BYTES].cast("Q")  # live: aligned 8-byte loads of the lock's words
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
                unpoisoned = _scan_poison(mm, Views(meta, geo)) if scan_poison else None
                after = (hdr[H_LOCK_OWNER], hdr[H_LOCK_SEQ])
                quiet = owner == 0 and after == (0, seq)
                if quiet or last_try:
                    break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))  # Ctrl-C gets in here
            pause = min(2 * pause, RETRY_MAX_S)
        waited = time.monotonic() - started
    finally:  # (an interrupt may come anywhere: a Ctrl-C ends the wait with KeyboardInterrupt, never BufferError)
        for view in (hdr, base):
            if view is not None:
                view.release()
    views = Views(meta, geo)  # any buffer will do
    procs = procs_table(views)
    alive = np.zeros(geo.max_procs, dtype=bool)
    for e in np.flatnonzero(procs[:, P_EPOCH]).tolist():
        alive[e] = entry_alive(fd, geo, e)
    throughout = not quiet and lock_timeout > 0 and first[0] != 0 and after == first
    lock = LockState(holder(views, fd), waited, throughout, copied_ns)
    identity = (os.fstat(fd).st_ino, int(views.hdr[H_CREATED_NS]))
    return Copy(name, views, quiet, lock, alive, unpoisoned, identity, summary)


def cache_slots(procs: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots each registry entry's cache names, (max_procs, CACHE_MAX)
    (0 where an entry is past ``cache_n``, blank or out of range), and
    where they are valid: of the entries in use or with a cache count, as
    the core's ``cached_by`` reads them."""
    n = np.minimum(procs[:, P_CACHE_N], CACHE_MAX).astype(np.int64)
    counted = (procs[:, P_EPOCH] != 0) | (procs[:, P_CACHE_N] != 0)
    cache = np.ascontiguousarray(procs[:, P_CACHE : P_CACHE + CACHE_MAX // 2]).view(np.uint32).astype(np.int64)
    valid = (np.arange(CACHE_MAX)[None, :] < n[:, None]) & counted[:, None] & (cache < capacity)
    return np.where(valid, cache, 0), valid


def reserve_slots(v: Views) -> np.ndarray:
    """The reserve's slots, bottom first: the shared stack, then each
    process's full places (its own order; by registry entry), bounded to
    the capacity (an out-of-range entry is the audit's to report). For one
    process this is the kernel's single stack."""
    cap = v.geo.capacity
    parts = [np.frombuffer(v.stack, dtype=np.uint32)[: min(int(v.hdr[H_RESERVE_DEPTH]), cap)]]
    procs = procs_table(v)
    full = procs[:, P_PLACE_R] & np.uint64(PLACE_FULL_MASK)  # (the slack above: _layout.P_PLACE_R)
    for row in np.flatnonzero((full != 0) & (full <= procs[:, P_PLACE_Q])):
        r = min(int(full[row]), PLACES_MAX)
        parts.append(procs[row, P_PLACES:].view(np.uint32)[:r])
    out = np.concatenate(parts)
    return out[out < cap]


def _summary_bytes(mm: mmap.mmap, geo: Geometry) -> np.ndarray:
    """The metadata as a summary needs it: the header, the registry and the
    queue table copied, of the slot words only those the caches name,
    zeros elsewhere (untouched pages of a zeroed buffer cost nothing)."""
    meta = np.zeros(geo.off_slots, dtype=np.uint8)
    procs_end = geo.off_procs + 8 * PROC_WORDS * geo.max_procs
    queues_end = geo.off_queues + 8 * QUEUE_WORDS * geo.max_queues  # the table follows the registry
    meta[:HEADER_BYTES] = np.frombuffer(mm, dtype=np.uint8, count=HEADER_BYTES)
    meta[geo.off_procs : queues_end] = np.frombuffer(mm, dtype=np.uint8, count=queues_end - geo.off_procs,
                                                     offset=geo.off_procs)
    idx, _ = cache_slots(meta[geo.off_procs : procs_end].view(np.uint64).reshape(geo.max_procs, PROC_WORDS),
                         geo.capacity)
    live = np.frombuffer(mm, dtype=np.uint64, count=geo.capacity, offset=geo.off_words)
    try:
        meta[geo.off_words : geo.off_words + 8 * geo.capacity].view(np.uint64)[idx] = live[idx]
    finally:
        del live  # the mapping cannot be closed while a view of it lives
    return meta


def _scan_poison(mm: mmap.mmap, v: Views) -> np.ndarray | None:
    """The reserve slots (of the copy's stack) whose contents in ``mm`` are
    not the poison pattern; None if the pool is not poisoned or its stack
    cannot be read within bounds (the audit reports that)."""
    geo, hdr = v.geo, v.hdr
    depth = hdr[H_RESERVE_DEPTH]
    if not hdr[H_FLAGS] & FLAG_POISON or depth > geo.capacity:
        return None
    entries = np.frombuffer(v.stack, dtype=np.uint32)[:depth]  # (a poisoned pool lends no places)
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


def find_pools() -> Iterator[tuple[str, str]]:
    """(name, 'pool' or 'no permission') of every pool in /dev/shm, by name:
    a segment named shmpool.NAME (else no name reaches it) whose first word
    is the magic number, or that this user may not read. InspectError if
    the directory cannot be listed."""
    try:
        entries = sorted(os.listdir(_segment.SHM_DIR))
    except OSError as exc:
        raise InspectError(f"cannot list {_segment.SHM_DIR}: {exc.strerror}") from None
    for entry in entries:
        if entry.startswith(_segment.SHM_PREFIX):
            kind = _probe(os.path.join(_segment.SHM_DIR, entry))
            if kind is not None:
                yield entry[len(_segment.SHM_PREFIX) :], kind
