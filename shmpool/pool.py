"""Mempool: the kernel's mm/mempool.c rules over a shared-memory segment.

The rules (../shared/KERNEL_MEMPOOL.md in the project, Linux v3.2)
---------------------------------------------------------------------
- create takes ``min_nr`` elements from the arena into the reserve;
- alloc tries the arena first and falls back to the reserve (LIFO) only when
  the arena fails; an allocation that may not sleep then returns None, one
  that may sleep waits for a free (or 5 s) and tries again, never failing;
- free refills the reserve while ``curr_nr < min_nr`` and wakes the
  sleepers, and otherwise gives the element back to the arena;
- resize shrinks by giving reserve elements back, grows by refilling from the
  arena, and a grow that finds the arena failing still succeeds.

Who mutates what: ``_add_element`` and ``_remove_element`` are the only code
that touches the reserve stack, ``Arena`` the only code that touches the
arena's free list, and ``_hand_out`` the only code that marks a slot HELD.
Everything runs under the pool lock (see ``_lock``), which is never held
across a sleep.

How an operation stays repairable if its process dies half way
----------------------------------------------------------------
The slot words are the truth; the two stacks and their depths are a cache of
them. Every operation commits with one aligned 8-byte store into a slot word
(HELD when an element is handed out, RESERVE or ARENA when it comes back),
and the stack and counter updates around that store are derivable from the
words. A process killed anywhere inside a critical section therefore leaves:

- slots whose words are whole, each in exactly one state;
- stacks that may be one entry off, and counters that may be one off.

Rebuilding the stacks and depths from the words (``_recovery.rebuild``,
numpy, one pass) restores every invariant; the process that takes the lock
over from a dead holder does it before anything else (``_lock``). An element
whose word says HELD by a dead process was handed out (or was being freed)
and goes back through the normal free path when somebody calls
``reclaim_dead``. A sleeper that dies stays counted in ``nr_waiters`` until a
repair or a reclaim recounts the sleepers of live processes from the
registry. Counters are statistics: they may be one off after a death and
nothing depends on them.

Who holds an element: the pid in its slot word, qualified by the process
registry (``_layout``, ``_procs``), so that a reused pid is not mistaken for
the holder. Handing a handle to another process does not move it: the
receiver calls ``adopt`` to become the holder, and until it does, the
element is the sender's and is reclaimed if the sender dies.

Handles are ``index | generation << 24 | tag << 48`` (see ``_layout``).
"""

from __future__ import annotations

import atexit
import functools
import math
import operator
import os
import random
import time
import warnings
import weakref
from typing import Any, Callable, Optional

import numpy as np

from . import _segment
from ._arena import Arena
from ._debug import poison_pattern, quick_check
from ._errors import (
    InvalidHandleError,
    PoisonWarning,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
)
from ._fast import LAYOUT as _FAST_LAYOUT
from ._fast import FastPath
from ._layout import (
    C_ALLOC_ARENA,
    C_ALLOC_FAILED,
    C_ALLOC_RESERVE,
    C_FAULTS,
    C_FREE_ARENA,
    C_FREE_RESERVE,
    C_POISON,
    C_SLEEPS,
    CACHE_MAX,
    COUNTERS,
    FLAG_POISON,
    GEN_BITS,
    GEN_MASK,
    GEN_SHIFT,
    H_ARENA_FREE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
    H_CURR_NR,
    H_FAIL_RATE,
    H_FLAGS,
    H_MAGIC,
    H_MIN_NR,
    H_NR_WAITERS,
    H_RECLAIMED,
    H_SEED,
    H_STATUS,
    H_TAG,
    HGEN_SHIFT,
    INDEX_MASK,
    MAGIC,
    MAX_CAPACITY,
    MAX_SLOT_SIZE,
    N_PROC_COUNTERS,
    P_COUNTERS,
    PID_SHIFT,
    PROC_WORDS,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_RESERVE,
    STATE_MASK,
    STATE_NAMES,
    STATUS_DESTROYED,
    STATUS_LIVE,
    TAG_MASK,
    TAG_SHIFT,
    Geometry,
    Views,
    cached_slots,
    read_geometry,
    write_geometry,
)
from ._lock import PoolLock, WaitQueue
from ._procs import Registry, self_identity
from ._recovery import rebuild
from .gfp import GFP_KERNEL, may_sleep
from .stats import PoolStats

__all__ = ["Mempool", "Trace"]

Trace = Callable[[str, Optional[int], int], None]

#: How long a sleeping allocation sleeps before it retries the arena even if
#: nothing woke it (the kernel's ``io_schedule_timeout(5*HZ)``).
SLEEP_RETRY_SECONDS = 5.0
#: How many elements a growing resize moves per lock hold.
RESIZE_BATCH = 1024
#: How long attach waits for a pool that is still being created.
ATTACH_WAIT_SECONDS = 1.0
#: How long close() waits for the lock to give its cache back.
CLOSE_LOCK_SECONDS = 0.5

_monotonic = time.monotonic
#: How many slots a cache refill takes from the shared free list, and how
#: many a full cache gives back, per lock hold.
CACHE_BATCH = CACHE_MAX // 2
_live_pools: weakref.WeakSet[Mempool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A mapping inherited across fork() is still the same shared pool; what
    # changes is who we are: elements and the lock are recorded by process.
    for pool in list(_live_pools):
        pool._become(*self_identity())


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    # Give cached arena slots back while we can (a process that dies without
    # this leaves them to reclaim_dead).
    for pool in list(_live_pools):
        pool.close()


def _check_fast_layout() -> None:
    """The compiled hot path hard-codes these layout numbers: they must agree."""
    from . import _layout

    wrong = {k: (v, getattr(_layout, k, None)) for k, v in _FAST_LAYOUT.items()
             if getattr(_layout, k, None) != v and not k.startswith("P_C_")}
    per_proc = {"P_C_ALLOC_ARENA": C_ALLOC_ARENA, "P_C_FREE_ARENA": C_FREE_ARENA, "P_C_FAULTS": C_FAULTS,
                "P_C_ALLOC_RESERVE": C_ALLOC_RESERVE, "P_C_FREE_RESERVE": C_FREE_RESERVE}
    wrong.update({k: (_FAST_LAYOUT[k], P_COUNTERS + c) for k, c in per_proc.items() if _FAST_LAYOUT[k] != P_COUNTERS + c})
    if wrong:
        raise ImportError(f"shmpool._fast was built for another layout: {wrong}; rebuild it (pip install -e .)")


_check_fast_layout()


class _NotReady(Exception):
    """The segment exists but its creator has not finished it yet."""


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


def _check_fail_rate(fail_rate: object) -> float:
    if isinstance(fail_rate, bool) or not isinstance(fail_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"fail_rate must be a number, not {type(fail_rate).__name__}")
    rate = float(fail_rate)
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"fail_rate must be a finite number from 0 to 1, not {fail_rate!r}")
    return rate


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    value = _check_int(seed, "seed")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"seed must be from 0 to 2**64-1, not {value}")
    return value


class Mempool(FastPath):
    """A memory pool shared by every process that attaches to it by name.

    Make one with :meth:`create` or :meth:`attach`, never directly. A
    Mempool is safe to use from several threads; it pickles by name (the
    receiving process attaches to the same pool); it is a context manager
    that closes on exit.

    ``alloc(gfp=GFP_KERNEL, *, timeout=None)`` and ``free(handle)`` are
    inherited from the compiled hot path (``_fast.c``), which serves the
    common case (the arena, through this process's cache) without a lock
    and hands everything else to ``_alloc_slow`` and ``_free_slow`` below,
    whose docstrings give the contract.
    """

    __slots__ = (
        "name", "_trace", "_core", "_pid", "_start", "_entry", "_ctr", "_tag", "_capacity", "_slot_size",
        "_stride", "_poison", "__weakref__",
    )

    def __init__(
        self, name: str, seg: _segment.Segment, geo: Geometry, *, register: bool = True, tag: int | None = None
    ) -> None:
        v = Views(seg.mm, geo)
        hdr = v.hdr
        if tag is None:
            tag = hdr[H_TAG]
        lock_name, wait_name = _segment.sem_names(name)
        FastPath.__init__(
            self, seg.mm, geo.off_words, geo.off_arena, geo.off_stack, geo.off_procs, geo.max_procs, PROC_WORDS,
            geo.capacity, tag, CACHE_MAX, lock_name, wait_name,
        )
        self.name = name
        self._trace: Trace | None = None
        self._pid, self._start = self_identity()
        self._entry = -1
        self._ctr: memoryview | None = None  # this process's counters
        self._tag = tag
        self._capacity = geo.capacity
        self._slot_size = geo.slot_size
        self._stride = geo.stride
        self._poison = poison_pattern(geo.slot_size) if hdr[H_FLAGS] & FLAG_POISON else None
        # Everything that touches the segment, in one attribute so that an
        # operation loads it once: close() swaps it for None, and operations
        # already under way keep their own references to what they use.
        lock = PoolLock(seg.lock_sem, hdr, seg.fd, self._pid, self._start)
        waitq = WaitQueue(seg.wait_sem, hdr)
        registry = Registry(v.procs, geo.max_procs, hdr)
        lock.repair = functools.partial(_repair, v, registry, waitq)
        self._core: tuple[Views, PoolLock, Arena, WaitQueue, Registry] | None = (
            v, lock, Arena(v), waitq, registry,
        )
        if register:
            with lock:
                self._register(v, registry)
        _live_pools.add(self)

    # ------------------------------------------------------------------
    # Making and finding pools

    @classmethod
    def create(
        cls,
        name: str,
        *,
        min_nr: int,
        slot_size: int,
        capacity: int,
        fail_rate: float = 0.0,
        seed: int | None = None,
        mode: int = 0o600,
        poison: bool = False,
    ) -> Mempool:
        """Create pool ``name`` with ``capacity`` slots of ``slot_size``
        bytes and pre-allocate ``min_nr`` of them into the reserve (the
        pre-fill is exempt from fault injection, so it never fails).

        ``fail_rate`` makes the arena fail on purpose with that probability,
        drawn from a generator seeded with ``seed`` (random if None; the
        seed used is in ``stats().seed``). ``mode`` sets the permissions of
        the segment and semaphores. ``poison`` turns on poisoning of reserve
        elements (see :class:`PoisonWarning`).

        Raises ValueError for an impossible geometry or rate, TypeError for
        a wrong type, FileExistsError if the name is taken, OSError if the
        system cannot back the segment. On any error nothing is left behind.
        """
        _segment.check_name(name)
        slot_size = _check_int(slot_size, "slot_size")
        capacity = _check_int(capacity, "capacity")
        min_nr = _check_int(min_nr, "min_nr")
        mode = _check_int(mode, "mode")
        rate = _check_fail_rate(fail_rate)
        seed = _check_seed(seed)
        if not 1 <= slot_size <= MAX_SLOT_SIZE:
            raise ValueError(f"slot_size must be from 1 to {MAX_SLOT_SIZE}, not {slot_size}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be from 1 to {MAX_CAPACITY}, not {capacity}")
        if not 1 <= min_nr <= capacity:
            raise ValueError(f"min_nr must be from 1 to capacity ({capacity}), not {min_nr}")
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits (0 to 0o777), not {mode:#o}")
        if seed is None:
            seed = random.SystemRandom().getrandbits(64)

        geo = Geometry.of(slot_size, capacity)
        seg = _segment.create(name, geo.total, mode)  # born with the lock taken
        try:
            tag = random.randint(1, TAG_MASK)
            pool = cls(name, seg, geo, register=False, tag=tag)
            assert pool._core is not None
            v, lock, arena, _, registry = pool._core
            hdr = v.hdr
            write_geometry(hdr, geo)
            hdr[H_TAG] = tag
            hdr[H_FLAGS] = FLAG_POISON if poison else 0
            pool._poison = poison_pattern(slot_size) if poison else None
            hdr[H_CREATOR_PID] = pool._pid
            hdr[H_CREATOR_START] = pool._start
            hdr[H_CREATED_NS] = time.time_ns()
            hdr[H_STATUS] = STATUS_LIVE
            arena.format(capacity)
            arena.set_faults(rate, seed)
            hdr[H_MIN_NR] = min_nr
            for _ in range(min_nr):
                pool._add_element(arena.alloc(pool, inject=False), v)
            pool._register(v, registry)
            hdr[H_MAGIC] = MAGIC  # last: from here on the pool is whole
        except BaseException:
            _segment.unlink(name)
            raise
        lock.release_initial()
        return pool

    @classmethod
    def attach(cls, name: str) -> Mempool:
        """Attach to the existing pool ``name`` (from any process).

        Raises FileNotFoundError if there is none, PermissionError if its
        mode does not admit this user, PoolFormatError if the segment is not
        a shmpool pool of this layout version (wrong magic or version, a
        header that disagrees with itself or with the segment's size).
        Attaching never changes the pool.
        """
        _segment.check_name(name)
        deadline = _monotonic() + ATTACH_WAIT_SECONDS
        while True:
            try:
                return cls._attach_once(name)
            except _NotReady:
                if _monotonic() > deadline:
                    raise PoolFormatError(
                        f"pool {name!r} was never finished (its creator may have died while creating it)"
                    ) from None
                time.sleep(0.005)  # poll with a deadline for the creator to finish

    @classmethod
    def _attach_once(cls, name: str) -> Mempool:
        mm, size, fd = _segment.open_shm(name)
        try:
            if size >= 8 and int.from_bytes(mm[:8], "little") == 0:
                raise _NotReady
            geo = read_geometry(mm, size)
            lock_sem, wait_sem = _segment.open_sems(name)
        except BaseException:
            mm.close()
            os.close(fd)
            raise
        pool = cls(name, _segment.Segment(mm, size, fd, lock_sem, wait_sem), geo)
        finding = quick_check(pool._core[0])  # type: ignore[index]
        if finding:
            pool.close()
            raise pool._corrupt(finding)
        return pool

    def _register(self, v: Views, registry: Registry) -> None:
        """Give this process its registry entry (lock held) and point the
        hot path at it. A dead process whose pid we now have, or whose entry
        we take, is retired first, so that no element is ever attributed to
        the wrong process."""
        index = registry.find(self._pid)
        if index >= 0 and registry.entry(index)[1] != self._start:
            self._retire(index, self._pid, v)  # our pid's dead predecessor
            index = -1
        if index < 0:
            index, dead = registry.vacancy()
            if dead:
                self._retire(index, dead, v)
            registry.occupy(index, self._pid, self._start)
        self._entry = index
        base = index * PROC_WORDS
        self._ctr = v.procs[base + P_COUNTERS : base + P_COUNTERS + N_PROC_COUNTERS]
        self.bind(v.geo.off_procs + 8 * base, self._pid, self._start)
        self.enabled = self._trace is None

    def _retire(self, index: int, pid: int, v: Views) -> int:
        """Retire the entry of dead process ``pid`` (lock held): take back
        what it had (see ``_take_back``) and fold its counters into the
        header's. Returns how many held elements were taken back."""
        taken = self._take_back(pid, v)
        self._core[4].retire(index)  # type: ignore[index]
        return taken

    def _take_back(self, pid: int, v: Views) -> int:
        """Everything dead process ``pid`` had (lock held): its held elements
        go back through the free path (the reserve first), its cached slots
        back to the arena. Returns how many held elements were taken back."""
        words = np.frombuffer(v.words, dtype=np.uint64)
        state = words & np.uint64(STATE_MASK)
        theirs = (words >> np.uint64(PID_SHIFT)) == pid
        core = self._core
        assert core is not None
        arena, waitq = core[2], core[3]
        for idx in np.flatnonzero((state == ST_CACHED) & theirs).tolist():
            arena.free(idx)
        held = np.flatnonzero((state == ST_HELD) & theirs).tolist()
        taken = sum(self._release(idx, int(words[idx]), v, arena, waitq) is not None for idx in held)
        v.hdr[H_RECLAIMED] += taken
        return taken

    def _become(self, pid: int, start: int) -> None:
        """After fork(): this object now belongs to the child."""
        self._pid, self._start = pid, start
        core = self._core
        if core is None:
            return
        lock = core[1]
        lock.pid, lock.start = pid, start
        self.enabled = False  # the cache in use was the parent's
        try:
            with lock:
                self._register(core[0], core[4])
        except Exception:  # a pool destroyed meanwhile: its next call says so
            pass

    # ------------------------------------------------------------------
    # The reserve: the only code that touches the stack

    def _push_reserve(self, idx: int, v: Views) -> None:
        """Push slot ``idx``, already marked RESERVE, onto the reserve (lock
        held); poison it first if poisoning is on. The caller has checked
        that the stack has room."""
        if self._poison is not None:
            off = idx * self._stride
            v.data[off : off + self._slot_size] = self._poison
        hdr = v.hdr
        n = hdr[H_CURR_NR]
        v.stack[n] = idx
        hdr[H_CURR_NR] = n + 1

    def _add_element(self, idx: int, v: Views) -> None:
        """Move slot ``idx`` from the arena (taken off its free list by the
        caller) into the reserve (lock held)."""
        if v.hdr[H_CURR_NR] >= self._capacity:
            raise self._corrupt(f"curr_nr {v.hdr[H_CURR_NR]} is beyond the capacity")
        words = v.words
        words[idx] = words[idx] & GEN_BITS | ST_RESERVE
        self._push_reserve(idx, v)

    def _remove_element(self, v: Views) -> int:
        """Pop the top of the reserve (lock held; curr_nr > 0). Returns the
        slot index, or ``~index`` (negative) if poisoning is on and the
        element lost its pattern: the caller counts it and warns once the
        lock is released. A stack entry that does not name a reserved slot
        raises PoolFormatError before anything changes."""
        hdr = v.hdr
        n = hdr[H_CURR_NR] - 1
        try:
            idx = v.stack[n]
            reserved = v.words[idx] & STATE_MASK == ST_RESERVE
        except IndexError:
            raise self._corrupt(f"reserve stack entry {n} is out of range") from None
        if not reserved:
            raise self._corrupt(f"reserve stack entry {n} names slot {idx}, which is not in the reserve")
        hdr[H_CURR_NR] = n
        poison = self._poison
        if poison is not None:
            off = idx * self._stride
            if v.data[off : off + self._slot_size] != poison:
                self._ctr[C_POISON] += 1  # type: ignore[index]
                return ~idx
        return idx

    def _corrupt(self, finding: str) -> PoolFormatError:
        return PoolFormatError(f"pool {self.name!r} is corrupt: {finding} (shmpool-inspect --check {self.name} audits it)")

    def _warn_poison(self, idx: int) -> None:
        warnings.warn(
            f"pool {self.name!r}: reserved element in slot {idx} was written after it was freed",
            PoisonWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------
    # Allocation and free

    def _hand_out(self, idx: int, v: Views) -> int:
        """Mark slot ``idx`` HELD by this process under a new generation and
        return its handle (lock held). This store commits the allocation."""
        words = v.words
        gen = ((words[idx] >> GEN_SHIFT) + 1) & GEN_MASK
        words[idx] = ST_HELD | gen << GEN_SHIFT | self._pid << PID_SHIFT
        return idx | gen << HGEN_SHIFT | self._tag << TAG_SHIFT

    def _arena_take(self, v: Views, arena: Arena) -> int | None:
        """The kernel's first try, the backing allocator (lock held): an
        element from the arena, or None if it is dry or a fault fires.
        Through this process's cache when the hot path is on (refilling it
        from the shared free list), else from the shared free list."""
        if not self.enabled:
            idx = arena.alloc(self)
            if idx < 0:
                return None
            self._ctr[C_ALLOC_ARENA] += 1  # type: ignore[index]
            return self._hand_out(idx, v)
        if self.cache_n == 0 and v.hdr[H_ARENA_FREE] == 0:
            # Free slots may sit in other processes' caches: take them back
            # rather than go to the reserve (and sleep) with free slots about.
            if not self.steal(v.geo.off_procs, v.geo.max_procs, PROC_WORDS):
                return None  # dry: no draw, as in Arena.alloc
        if self.draw():
            return None
        while True:
            handle = self.pop_cached()
            if handle is not None:
                return handle
            if not self.refill(CACHE_BATCH):
                return None

    def _alloc_slow(self, gfp: int = GFP_KERNEL, timeout: float | None = None, arena_failed: bool = False) -> int | None:
        """alloc(gfp=GFP_KERNEL, *, timeout=None): allocate one element;
        return its handle.

        The kernel's order: the arena first; if it fails, the top of the
        reserve. If the reserve is empty too, a ``gfp`` that may not sleep
        (GFP_ATOMIC, GFP_NOWAIT) returns None at once, while one that may
        (GFP_KERNEL, GFP_NOIO, GFP_NOFS) sleeps until a free refills the
        reserve, or for 5 s, and tries again from the arena: it never
        returns None. ``timeout`` (seconds, sleeping allocations only) bounds
        that: TimeoutError once it has passed without success.

        The element's bytes are whatever its last user left (not zeroed).
        Holding many elements while sleeping for more can deadlock against
        other processes doing the same; use one allocation at a time or
        bound the wait with ``timeout``.

        (The hot path calls this with ``arena_failed`` when its own arena
        attempt failed, so that the first attempt here skips the arena.)
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, arena, waitq, registry = core
        sleeps = may_sleep(gfp)
        deadline = None if timeout is None else _monotonic() + self._check_timeout(timeout)
        hdr = v.hdr
        ctr = self._ctr
        trace = self._trace
        waiting = slept = woken = False
        while True:
            handle = None
            with lock:
                if waiting:
                    self._finish_wait(hdr, waitq, registry, woken)
                    waiting = False
                if hdr[H_STATUS] != STATUS_LIVE:
                    raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
                idx = 0
                if arena_failed:
                    arena_failed = False
                else:
                    handle = self._arena_take(v, arena)
                    event = "alloc-arena"
                if handle is None and hdr[H_CURR_NR]:
                    idx = self._remove_element(v)
                    ctr[C_ALLOC_RESERVE] += 1
                    handle = self._hand_out(idx if idx >= 0 else ~idx, v)
                    event = "alloc-reserve"
                if handle is not None:
                    if slept:  # we may hold another sleeper's token
                        waitq.rewake_if_needed()
                elif not sleeps or (deadline is not None and _monotonic() >= deadline):
                    ctr[C_ALLOC_FAILED] += 1
                    event = "alloc-failed"
                else:
                    # Checked the reserve and registered in one critical
                    # section: a free that refills it must see us and wake us.
                    self._register_wait(waitq, registry)
                    waiting = slept = True
                    event = "sleep"
                curr_nr = hdr[H_CURR_NR]
            if trace is not None:
                trace(event, handle, curr_nr)
            if handle is not None:
                if idx < 0:
                    self._warn_poison(~idx)
                return handle
            if not waiting:
                if not sleeps:
                    return None
                raise TimeoutError(f"pool {self.name!r}: no element within {timeout} s")
            woken = self._sleep(lock, waitq, registry, deadline)

    def alloc_preallocated(self) -> int | None:
        """Take an element from the reserve only, never the arena, never
        sleeping (the kernel's mempool_alloc_preallocated): None if empty."""
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, _, _ = core
        hdr = v.hdr
        with lock:
            if hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            if not hdr[H_CURR_NR]:
                self._ctr[C_ALLOC_FAILED] += 1  # type: ignore[index]
                return None
            idx = self._remove_element(v)
            self._ctr[C_ALLOC_RESERVE] += 1  # type: ignore[index]
            handle = self._hand_out(idx if idx >= 0 else ~idx, v)
        if idx < 0:
            self._warn_poison(~idx)
        return handle

    def _free_slow(self, handle: int | None) -> None:
        """free(handle): return an element. None is ignored (as the kernel
        ignores NULL).

        If the reserve is below ``min_nr`` the element refills it and every
        sleeping allocation is woken; otherwise it goes back to the arena.
        Any process may free any handle that is currently held.

        Raises TypeError if ``handle`` is not an int, ValueError if it is out
        of range, InvalidHandleError if it is not currently held (double
        free, never allocated, stale, another pool's). A refused free changes
        nothing.
        """
        if handle is None:
            return
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, arena, waitq, _ = core
        idx, gen = self._decode(handle)
        hdr, words = v.hdr, v.words
        with lock:
            if hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            word = words[idx]
            if word & STATE_MASK != ST_HELD or (word >> GEN_SHIFT) & GEN_MASK != gen:
                raise InvalidHandleError(handle, self._describe(word, gen))
            if hdr[H_CURR_NR] >= hdr[H_MIN_NR] and self.enabled:
                # To the arena through this process's cache (its top is the
                # arena's top), making room in it if it is full.
                while (pushed := self.cache_push(idx, word)) == 0:
                    self.drain(CACHE_MAX - CACHE_BATCH)
                event = "free-arena" if pushed > 0 else None
            else:
                event = self._release(idx, word, v, arena, waitq)
            if event is None:
                raise InvalidHandleError(handle, "freed by another process at the same moment")
            curr_nr = hdr[H_CURR_NR]
        trace = self._trace
        if trace is not None:
            trace(event, handle, curr_nr)
        return None

    def _register_wait(self, waitq: WaitQueue, registry: Registry) -> None:
        """prepare_to_wait (lock held): count this sleeper, in the pool and
        in our registry entry (so that it can be uncounted if we die)."""
        waitq.register()
        registry.add_sleeper(self._entry, 1)
        self._ctr[C_SLEEPS] += 1  # type: ignore[index]

    def _finish_wait(self, hdr: memoryview, waitq: WaitQueue, registry: Registry, woken: bool) -> None:
        """finish_wait (lock held). After a quiet 5 s nap, also recount the
        sleepers, dropping any that died."""
        waitq.finish()
        registry.add_sleeper(self._entry, -1)
        if not woken:
            hdr[H_NR_WAITERS] = registry.live_sleepers()
            waitq.drain()

    def _sleep(self, lock: PoolLock, waitq: WaitQueue, registry: Registry, deadline: float | None) -> bool:
        """Sleep (lock not held) until woken, the 5 s retry or ``deadline``;
        True if woken. Interrupted (KeyboardInterrupt...), it uncounts itself."""
        wait = SLEEP_RETRY_SECONDS
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - _monotonic()))
        try:
            return waitq.sleep(wait)
        except BaseException:
            with lock:
                waitq.finish()
                registry.add_sleeper(self._entry, -1)
            raise

    def alloc_bulk(self, n: int, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> np.ndarray | None:
        """Allocate ``n`` elements at once; return their handles as a numpy
        int64 array (the kernel 6.19's mempool_alloc_bulk).

        Each element is an arena attempt first (with its own fault draw);
        the elements the arena does not give come from the reserve, all of
        them or none: if the reserve cannot cover them, the arena's elements
        go back too and the call holds nothing while it waits, so two bulk
        callers can never deadlock by each holding part of what they need.
        A ``gfp`` that may not sleep returns None then; one that may sleeps
        until a free refills the reserve (or 5 s) and tries again, never
        failing (``timeout`` bounds it: TimeoutError). ``n`` must be from 0
        to the capacity (ValueError).
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, waitq, registry = core
        n = _check_int(n, "n")
        if not 0 <= n <= self._capacity:
            raise ValueError(f"n must be from 0 to the capacity ({self._capacity}), not {n}")
        sleeps = may_sleep(gfp)
        deadline = None if timeout is None else _monotonic() + self._check_timeout(timeout)
        hdr, ctr = v.hdr, self._ctr
        out = np.empty(n, dtype=np.int64)
        geo = v.geo
        waiting = slept = woken = False
        poisoned: list[int] = []
        while True:
            with lock:
                if waiting:
                    self._finish_wait(hdr, waitq, registry, woken)
                    waiting = False
                if hdr[H_STATUS] != STATUS_LIVE:
                    raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
                got = self.take_bulk(out, n)
                if got < n and self.cache_n == 0 and hdr[H_ARENA_FREE] == 0:
                    if self.steal(geo.off_procs, geo.max_procs, PROC_WORDS):
                        got += self.take_bulk(out[got:], n - got)
                need = n - got
                if need <= hdr[H_CURR_NR]:
                    for i in range(got, n):
                        idx = self._remove_element(v)
                        if idx < 0:
                            poisoned.append(~idx)
                            idx = ~idx
                        out[i] = self._hand_out(idx, v)
                    ctr[C_ALLOC_RESERVE] += need  # type: ignore[index]
                    if slept:
                        waitq.rewake_if_needed()
                    break
                self.give_bulk(out, got)  # all or nothing: hold nothing while waiting
                if not sleeps or (deadline is not None and _monotonic() >= deadline):
                    ctr[C_ALLOC_FAILED] += 1  # type: ignore[index]
                    if not sleeps:
                        return None
                    raise TimeoutError(f"pool {self.name!r}: no {n} elements within {timeout} s")
                self._register_wait(waitq, registry)
                waiting = slept = True
            woken = self._sleep(lock, waitq, registry, deadline)
        for idx in poisoned:
            self._warn_poison(idx)
        return out

    def free_bulk(self, handles: Any) -> None:
        """Free many elements at once (a sequence or array of handles).

        Every handle is checked first: one that is not an int, out of range,
        not currently held, or given twice refuses the whole call (TypeError,
        ValueError, InvalidHandleError) and nothing is freed. Then, as if
        freed one by one: the first ones refill the reserve while it is
        below min_nr (waking sleepers), the rest go back to the arena.
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, arena, waitq, _ = core
        arr = np.asarray(handles)
        if not arr.size:
            return  # nothing to free (an empty list is float64 to numpy)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"handles must be integers, not {arr.dtype}")
        arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
        n = arr.size
        idx = arr & INDEX_MASK
        bad = np.flatnonzero((arr < 0) | (idx >= self._capacity))
        if bad.size:
            raise ValueError(f"handle {int(arr[bad[0]])} is out of range")
        bad = np.flatnonzero((arr >> TAG_SHIFT) != self._tag)
        if bad.size:
            raise InvalidHandleError(int(arr[bad[0]]), f"not a handle of pool {self.name!r} (another pool's, or forged)")
        seen = np.zeros(self._capacity, dtype=bool)  # O(capacity), no sort
        seen[idx] = True
        if np.count_nonzero(seen) != n:
            slots, counts = np.unique(idx, return_counts=True)
            twice = int(slots[np.argmax(counts > 1)])
            raise InvalidHandleError(int(arr[np.argmax(idx == twice)]), "given twice in one free_bulk")
        hdr = v.hdr
        words = np.frombuffer(v.words, dtype=np.uint64)
        gens = (arr >> HGEN_SHIFT) & GEN_MASK
        with lock:
            if hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            w = words[idx]
            bad = np.flatnonzero(((w & np.uint64(STATE_MASK)) != ST_HELD) | ((w >> np.uint64(GEN_SHIFT)) & np.uint64(GEN_MASK) != gens.astype(np.uint64)))
            if bad.size:
                i = int(bad[0])
                raise InvalidHandleError(int(arr[i]), self._describe(int(w[i]), int(gens[i])))
            refill = min(n, max(0, hdr[H_MIN_NR] - hdr[H_CURR_NR]))
            lost = sum(self._release(int(idx[i]), int(w[i]), v, arena, waitq) is None for i in range(refill))
            if refill < n:
                if self.enabled:
                    self.drain(0)  # our cache is the arena's top: keep the order
                lost += (n - refill) - self.give_bulk(arr[refill:], n - refill)
        if lost:
            raise InvalidHandleError(int(arr[0]), f"{lost} of these elements were freed by another process at the same moment")

    def _release(self, idx: int, word: int, v: Views, arena: Arena, waitq: WaitQueue) -> str | None:
        """The kernel's free of HELD slot ``idx`` whose word was ``word``
        (lock held): refill the reserve if it is below min_nr and wake the
        sleepers, else give the element to the arena. The slot word moves by
        compare-and-swap, because the hot path frees without the lock: None
        if it lost (somebody else freed the element first)."""
        hdr = v.hdr
        to_reserve = hdr[H_CURR_NR] < hdr[H_MIN_NR]
        depth = hdr[H_CURR_NR] if to_reserve else hdr[H_ARENA_FREE]
        if depth >= self._capacity:
            raise self._corrupt(f"{'curr_nr' if to_reserve else 'arena_free'} {depth} is beyond the capacity")
        if not self.cas(idx, word, word & GEN_BITS | (ST_RESERVE if to_reserve else ST_ARENA)):
            return None
        if to_reserve:
            self._push_reserve(idx, v)
            self._ctr[C_FREE_RESERVE] += 1  # type: ignore[index]
            waitq.wake_all()
            return "free-reserve"
        arena.push(idx)
        self._ctr[C_FREE_ARENA] += 1  # type: ignore[index]
        return "free-arena"

    def reclaim_dead(self) -> int:
        """Take back every element held by a process that no longer exists,
        through the normal free path (the reserve refills first, sleepers
        are woken); returns how many. Also uncounts sleepers that died.

        An element handed to another process still belongs to the process
        that allocated it until the receiver calls :meth:`adopt`: if the
        sender dies first, the element is reclaimed from the receiver.
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, waitq, registry = core
        with lock:
            if v.hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            words = np.frombuffer(v.words, dtype=np.uint64)
            state = words & np.uint64(STATE_MASK)
            owned = (state == ST_HELD) | (state == ST_CACHED)
            pids = set(np.unique(words[owned] >> np.uint64(PID_SHIFT)).tolist()) | registry.pids()
            taken = 0
            for pid in sorted(pids):
                if pid == self._pid or registry.holder_alive(pid):
                    continue
                index = registry.find(pid)
                # With no entry (never registered, or retired): elements only.
                taken += self._retire(index, pid, v) if index >= 0 else self._take_back(pid, v)
            v.hdr[H_NR_WAITERS] = registry.live_sleepers()
            waitq.drain()
        return taken

    def adopt(self, handle: int) -> None:
        """Make this process the holder of ``handle`` (received from another
        process), so that it is not reclaimed if the sender dies. Refused
        like free() if the handle is not currently held; changes nothing
        else."""
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, _, _ = core
        idx, gen = self._decode(handle)
        words = v.words
        with lock:
            if v.hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            word = words[idx]
            if word & STATE_MASK != ST_HELD or (word >> GEN_SHIFT) & GEN_MASK != gen:
                raise InvalidHandleError(handle, self._describe(word, gen))
            if not self.cas(idx, word, ST_HELD | gen << GEN_SHIFT | self._pid << PID_SHIFT):
                raise InvalidHandleError(handle, "freed by another process at the same moment")

    @property
    def recoveries(self) -> int:
        """How many times this object took the lock over from a dead holder."""
        core = self._core
        return 0 if core is None else core[1].recoveries

    def _decode(self, handle: object) -> tuple[int, int]:
        """(slot index, generation) of a handle of this pool, or the error."""
        if type(handle) is not int:
            if isinstance(handle, bool) or not hasattr(type(handle), "__index__"):
                raise TypeError(f"a handle is an int, not {type(handle).__name__}")
            handle = operator.index(handle)
        if handle < 0 or handle >> 63:
            raise ValueError(f"handle {handle} is out of range")
        idx = handle & INDEX_MASK
        if idx >= self._capacity:
            raise ValueError(f"handle {handle:#x} names slot {idx}, beyond the capacity ({self._capacity})")
        if handle >> TAG_SHIFT != self._tag:
            raise InvalidHandleError(handle, f"not a handle of pool {self.name!r} (another pool's, or forged)")
        return idx, (handle >> HGEN_SHIFT) & GEN_MASK

    @staticmethod
    def _describe(word: int, gen: int) -> str:
        state = word & STATE_MASK
        if state == ST_HELD:
            return f"stale: its slot was freed and handed out again (generation {(word >> GEN_SHIFT) & GEN_MASK}, not {gen})"
        where = STATE_NAMES.get(state, f"in no valid state ({state})")
        return f"its slot is {where} (freed already, or never allocated)"

    def _check_timeout(self, timeout: object) -> float:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        seconds = float(timeout)
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        return seconds

    # ------------------------------------------------------------------
    # Resize and destroy

    def resize(self, new_min_nr: int, gfp: int = GFP_KERNEL) -> None:
        """Change ``min_nr`` (the kernel's mempool_resize).

        Shrinking gives reserve elements above ``new_min_nr`` back to the
        arena. Growing raises ``min_nr`` and refills the reserve from the
        arena (fault injection applies); if the arena fails part way the
        resize still succeeds, the reserve under-filled until later frees top
        it up. ``new_min_nr`` must be from 1 to the capacity (ValueError,
        nothing changed). Never sleeps.
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, arena, waitq, _ = core
        may_sleep(gfp)  # validates
        new_min_nr = _check_int(new_min_nr, "new_min_nr")
        if not 1 <= new_min_nr <= self._capacity:
            raise ValueError(f"new_min_nr must be from 1 to the capacity ({self._capacity}), not {new_min_nr}")
        hdr = v.hdr
        poisoned: list[int] = []
        with lock:
            if hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            grow = new_min_nr > hdr[H_MIN_NR]
            if not grow:
                while hdr[H_CURR_NR] > new_min_nr:
                    idx = self._remove_element(v)
                    if idx < 0:
                        poisoned.append(~idx)
                        idx = ~idx
                    arena.free(idx)
            hdr[H_MIN_NR] = new_min_nr
        while grow:
            with lock:
                if self.enabled:
                    self.drain(0)  # our cache is the arena's top: keep the order
                # Re-checked each batch: another process may have resized.
                for _ in range(RESIZE_BATCH):
                    if hdr[H_CURR_NR] >= hdr[H_MIN_NR]:
                        grow = False
                        break
                    idx = arena.alloc(self)
                    if idx < 0:
                        grow = False
                        break
                    self._add_element(idx, v)
                # The kernel wakes sleepers only from free; waking them here
                # too spares them the rest of their 5 s nap.
                waitq.wake_all()
        for idx in poisoned:
            self._warn_poison(idx)

    def destroy(self, force: bool = False) -> None:
        """Unlink the pool's segment and semaphores, and close this object.

        Like the kernel (``BUG_ON(curr_nr != min_nr)``), refuses with
        PoolBusyError, changing nothing, while elements are held or the
        reserve is not full, unless ``force``. Other processes that are still
        attached get PoolDestroyedError from their next operation, and their
        sleeping allocations are woken to get it; their mappings stay valid
        until they close.
        """
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, waitq, _ = core
        hdr = v.hdr
        with lock:
            if hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed already")
            curr_nr, min_nr = hdr[H_CURR_NR], hdr[H_MIN_NR]
            in_use = self._capacity - curr_nr - hdr[H_ARENA_FREE] - int(cached_slots(self._proc_table(v)).sum())
            if not force and (in_use or curr_nr != min_nr):
                raise PoolBusyError(
                    f"pool {self.name!r} still lends {in_use} element(s) and its reserve holds "
                    f"{curr_nr} of {min_nr}: free them first, or destroy(force=True)"
                )
            hdr[H_STATUS] = STATUS_DESTROYED
            waitq.wake_all()
        _segment.unlink(self.name)
        self.close()

    # ------------------------------------------------------------------
    # Element access

    def _slot_offset(self, handle: int) -> int:
        core = self._core
        if core is None:
            raise self._closed()
        idx, gen = self._decode(handle)
        # Read without the lock on purpose: the caller holds the handle, so
        # nobody else may change this word; a single 8-byte load is whole.
        word = core[0].words[idx]
        if word & STATE_MASK != ST_HELD or (word >> GEN_SHIFT) & GEN_MASK != gen:
            raise InvalidHandleError(handle, self._describe(word, gen))
        return idx * self._stride

    def buffer(self, handle: int) -> memoryview:
        """A writable memoryview of the element's ``slot_size`` bytes. It
        stays valid after ``close()`` (the mapping lives while views do)."""
        off = self._slot_offset(handle)
        return self._core[0].data[off : off + self._slot_size]  # type: ignore[index]

    def ndarray(self, handle: int, dtype: Any = np.uint8, shape: Any = None) -> np.ndarray:
        """A zero-copy numpy view of the element. ``shape`` defaults to as
        many ``dtype`` items as fit in the slot; a shape that does not fit
        raises ValueError. Slots are 8-byte aligned."""
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise TypeError("a slot cannot hold Python objects (dtype has object fields)")
        if dt.itemsize < 1:
            raise ValueError(f"dtype {dt} has no size")
        if shape is None:
            shape = (self._slot_size // dt.itemsize,)
        elif isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        shape = tuple(_check_int(n, "shape entry") for n in shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        count = math.prod(shape)
        if count * dt.itemsize > self._slot_size:
            raise ValueError(f"{shape} of {dt} needs {count * dt.itemsize} bytes; a slot has {self._slot_size}")
        off = self._slot_offset(handle)
        mm = self._core[0].mm  # type: ignore[index]
        return np.frombuffer(mm, dtype=dt, count=count, offset=self._core[0].geo.off_slots + off).reshape(shape)  # type: ignore[index]

    # ------------------------------------------------------------------
    # Looking at the pool

    def stats(self) -> PoolStats:
        """A frozen, consistent snapshot (taken under the lock)."""
        core = self._core
        if core is None:
            raise self._closed()
        v, lock, _, _, _ = core
        hdr = v.hdr
        procs = self._proc_table(v)
        with lock:
            words = hdr.tolist()
            cached = int(cached_slots(procs).sum())
            per_proc = procs[:, P_COUNTERS : P_COUNTERS + N_PROC_COUNTERS].sum(axis=0).tolist()
        counts = {name: words[index] + (per_proc[i] if i < N_PROC_COUNTERS else 0) for i, (name, index) in enumerate(COUNTERS)}
        curr_nr, arena_free = words[H_CURR_NR], words[H_ARENA_FREE] + cached
        return PoolStats(
            name=self.name,
            slot_size=self._slot_size,
            capacity=self._capacity,
            min_nr=words[H_MIN_NR],
            curr_nr=curr_nr,
            arena_free=arena_free,
            in_use=self._capacity - curr_nr - arena_free,
            nr_waiters=words[H_NR_WAITERS],
            fail_rate=v.fhdr[H_FAIL_RATE],
            seed=words[H_SEED],
            poison=bool(words[H_FLAGS] & FLAG_POISON),
            **counts,
        )

    @staticmethod
    def _proc_table(v: Views) -> np.ndarray:
        """The registry as a (max_procs, PROC_WORDS) array (a view)."""
        return np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)

    def is_saturated(self) -> bool:
        """True if the reserve is full (``curr_nr >= min_nr``)."""
        s = self.stats()
        return s.curr_nr >= s.min_nr

    def set_fail_rate(self, fail_rate: float, *, seed: int | None = None) -> None:
        """Change the arena's injected failure rate for every process; a
        ``seed`` also restarts the failure sequence."""
        core = self._core
        if core is None:
            raise self._closed()
        rate = _check_fail_rate(fail_rate)
        seed = _check_seed(seed)
        v, lock, arena, _, _ = core
        with lock:
            if v.hdr[H_STATUS] != STATUS_LIVE:
                raise PoolDestroyedError(f"pool {self.name!r} was destroyed")
            arena.set_faults(rate, seed)

    @property
    def trace(self) -> Trace | None:
        """Optional ``trace(event, handle, curr_nr)``, called after each alloc
        and free of this object, outside the lock. Events: "alloc-arena",
        "alloc-reserve" (the arena failed), "alloc-failed", "sleep",
        "free-reserve", "free-arena"; ``curr_nr`` is the reserve's depth
        right after the operation. While it is set, this object's
        operations all take the locked path (its cache is given back)."""
        return self._trace

    @trace.setter
    def trace(self, callback: Trace | None) -> None:
        self._trace = callback
        core = self._core
        if core is None:
            return
        if callback is not None and self.enabled:
            self.enabled = False
            with core[1]:
                self.drain(0)
        elif callback is None and self._entry >= 0:
            self.enabled = True

    @property
    def slot_size(self) -> int:
        return self._slot_size

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._core is None

    # ------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Let go of the pool in this process; the pool lives on. Never
        raises, and may be called twice. Memoryviews and numpy views of
        elements stay valid until the last of them is gone; the mapping is
        unmapped then. Further calls on this object raise PoolClosedError."""
        core = self._core
        if core is None:
            return
        if self.enabled:
            self.enabled = False
            lock = core[1]
            # The cache's slots back to the shared arena, if the lock comes
            # soon (never block in close: at exit, this process may even hold
            # it); otherwise they wait for reclaim_dead.
            if lock.acquire_within(CLOSE_LOCK_SECONDS):
                try:
                    self.drain(0)
                except ValueError:  # a damaged pool: leave it to the audit
                    pass
                finally:
                    lock.__exit__()
        self._core = None
        self._unmap()
        mm = core[0].mm
        del core
        try:
            mm.close()
        except BufferError:
            pass  # views are alive: the mapping goes with the last of them

    def _closed(self) -> PoolClosedError:
        return PoolClosedError(f"pool {self.name!r} is closed in this object; attach again to use it")

    def __enter__(self) -> Mempool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self._core is None else f"slot_size={self._slot_size}, capacity={self._capacity}"
        return f"<Mempool {self.name!r} {state}>"


def _attach(name: str) -> Mempool:
    return Mempool.attach(name)


def _repair(v: Views, registry: Registry, waitq: WaitQueue) -> None:
    """Run by the process that took the lock over from a dead holder."""
    rebuild(v, registry)
    waitq.drain()

