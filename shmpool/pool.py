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

Where the rules live
--------------------
Each rule is one transition in ``_fast.c``, run as one C call that holds
the pool lock from start to end and runs no Python code meanwhile (so no
signal handler, collector or thread can interrupt a critical section). This
module is the policy around them: it checks arguments, turns seconds into
deadlines, raises errors that say what to do, makes views of elements, and
manages lifetimes (create, attach, fork, close, pickling). A ``Mempool``
holds the compiled ``Core`` (``_fast``) and binds its ``alloc``, ``free``,
``buffer`` and ``ndarray`` to itself, so that they run no Python frame on
their common path; everything else of the core is private (``_*_core``).

Who holds an element
--------------------
The owner field of its slot word: the registry entry of the process that
holds it (``_layout``). An entry is this process's for its whole life (one
per pool, shared by every Mempool object of that pool in the process), and
is alive exactly while the process is: it holds an OFD lock on the entry's
byte of the segment file, which the kernel drops when the process dies. A
forked child gets its own entry. Handing a handle to another process does not
move it: the receiver calls ``adopt`` to become the holder, and until it
does, the element is the sender's and is reclaimed if the sender dies.

Handles are ``index | generation << 24`` (see ``_layout``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import math
import operator
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, overload

import numpy as np

from . import _aio, _procs, _segment
from ._debug import quick_check
from ._errors import (
    InvalidHandleError,
    PoisonWarning,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
)
from ._fast import LAYOUT as _FAST_LAYOUT
from ._fast import Core, set_atomic_wait, set_errors, set_gfp_bits
from ._layout import (
    COUNTERS,
    FLAG_POISON,
    GEN_MASK,
    GEN_SHIFT,
    H_ARENA_FREE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
    H_CURR_NR,
    H_FAIL_RATE,
    H_FAIL_THRESHOLD,
    H_FLAGS,
    H_MAGIC,
    H_MIN_NR,
    H_NR_WAITERS,
    H_RNG,
    H_SEED,
    H_STATUS,
    HEADER_BYTES,
    HEADER_WORDS,
    HGEN_SHIFT,
    INDEX_MASK,
    MAGIC,
    MAX_CAPACITY,
    MAX_QUEUES,
    MAX_SLOT_SIZE,
    N_PROC_COUNTERS,
    ST_ARENA,
    ST_HELD,
    STATE_MASK,
    STATE_NAMES,
    STATUS_LIVE,
    Geometry,
    Views,
    read_geometry,
    write_geometry,
)
from ._procs import self_identity
from .gfp import __GFP_ZERO, GFP_KERNEL, GFP_VALID_MASK, SleepingMask, may_sleep
from .queues import Queue, check_queue_name
from .stats import PoolStats

__all__ = ["Mempool", "Trace"]

Trace = Callable[[str, Optional[int], int], None]

#: How long a sleeping allocation sleeps before it retries the arena even if
#: nothing woke it (the kernel's ``io_schedule_timeout(5*HZ)``).
SLEEP_RETRY_SECONDS = 5.0
#: How long an allocation that may not sleep (GFP_ATOMIC, GFP_NOWAIT) waits
#: for the pool lock, held by a live process, before it returns None.
ATOMIC_LOCK_WAIT_SECONDS = 0.05
#: How many elements a growing resize moves per lock hold.
RESIZE_BATCH = 1024
#: How long Mempool.open waits for another process to finish creating the
#: pool it opens (two processes that open at once on a loaded machine).
OPEN_WAIT_SECONDS = 10.0
#: How long attach waits for a pool that is still being created: as long,
#: since a loaded machine slows a creator down as much (a creator that died
#: half way is reported after it).
ATTACH_WAIT_SECONDS = OPEN_WAIT_SECONDS
#: How long close() waits for the lock to give its cache back.
CLOSE_LOCK_SECONDS = 0.5

_monotonic = time.monotonic
_NS = 1_000_000_000
_FAULT_BITS = 53  # fault draws are compared as 53-bit fractions, exact at 0 and 1

set_errors(PoolFormatError, PoolDestroyedError, InvalidHandleError, PoolClosedError, PoisonWarning)
set_atomic_wait(int(ATOMIC_LOCK_WAIT_SECONDS * _NS))
set_gfp_bits(GFP_VALID_MASK & ~__GFP_ZERO)  # the one list of valid bits is gfp.py's


def _check_fast_layout() -> None:
    """The compiled core hard-codes the layout: every number must agree."""
    from . import _layout

    per_counter = {f"C_{name.upper()}": i for i, (name, _) in enumerate(COUNTERS[:N_PROC_COUNTERS])}
    per_counter["C_POISON"] = per_counter.pop("C_POISON_ERRORS")
    per_counter["C_FAULTS"] = per_counter.pop("C_FAULTS_INJECTED")
    wrong = {}
    for key, value in _FAST_LAYOUT.items():
        expected = per_counter[key] if key in per_counter else getattr(_layout, key, None)
        if expected != value:
            wrong[key] = (value, expected)
    if wrong:
        raise ImportError(f"shmpool._fast was built for another layout: {wrong}; rebuild it (pip install -e .)")


_check_fast_layout()


# ----------------------------------------------------------------------
# This process's registry entries, one per pool (shared by its objects)


@dataclass
class _Attachment:
    fd: int  # an open file description of the segment, holding the OFD lock
    index: int
    epoch: int
    refs: int = 0  # open Mempool objects of this process bound to it


_attachments: dict[tuple[int, int], _Attachment] = {}
_attach_lock = threading.Lock()
_live_pools: Any = None  # a WeakSet of open pools, made below


def _after_fork_in_child() -> None:
    # The child inherited our descriptions, OFD locks and all: it must not
    # keep the parent's entries alive after the parent dies, nor use them.
    global _attach_lock
    _attach_lock = threading.Lock()
    for att in _attachments.values():
        try:
            os.close(att.fd)
        except OSError:
            pass
    _attachments.clear()
    for pool in list(_live_pools):
        pool._become(*self_identity())


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    # Give cached arena slots back while we can (a process that dies without
    # this leaves them to reclaim_dead).
    for pool in list(_live_pools):
        pool.close()


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


def _ns(seconds: float) -> int:
    return min(int(seconds * _NS), (1 << 62))


class _LockForTests:
    """The pool lock as a context manager, for tests and tools that read a
    pool at rest: taking it runs no Python code under it."""

    __slots__ = ("_pool",)

    def __init__(self, pool: Mempool) -> None:
        self._pool = pool

    def __enter__(self) -> None:
        self._pool._fast._test_lock()

    def __exit__(self, *exc: object) -> None:
        self._pool._fast._test_unlock()


class Mempool:
    """A memory pool shared by every process that attaches to it by name.

    Make one with :meth:`create` or :meth:`attach`, never directly. A
    Mempool is safe to use from several threads; it pickles by name (the
    receiving process attaches to the same pool); it is a context manager
    that closes on exit.

    The compiled core is held, not inherited (``_fast``, private), so that
    a pool's public names are the documented ones. ``alloc``, ``free``,
    ``buffer`` and ``ndarray`` are documented below, and each pool binds
    the core's C methods of those names to itself when it is made: a call
    runs no Python frame on the common path (the arena, through this
    process's cache) and hands whatever needs checking or waiting to
    ``_alloc_slow``, ``_free_slow``, ``_buffer_slow`` and ``_ndarray_slow``.
    The core holds the pool weakly: a bound method kept after the pool is
    gone raises PoolClosedError where it needs the pool.
    """

    __slots__ = (
        "_name", "_trace", "_core", "_fast", "_pid", "_start", "_capacity", "_slot_size", "_stride", "_fd", "_key",
        "__weakref__", "__dict__",  # __dict__: the core's bound hot-path methods, set per pool
    )

    def __init__(self, name: str, seg: _segment.Segment, geo: Geometry, *, register: bool = True) -> None:
        v = Views(seg.mm, geo)
        lock_name, wait_name = _segment.sem_names(name)
        self._fast = fast = Core(
            seg.mm, geo.off_words, geo.off_stack, geo.off_arena, geo.off_next, geo.off_procs, geo.off_queues,
            geo.max_queues, geo.off_slots, geo.max_procs, geo.capacity, geo.stride, geo.slot_size,
            bool(v.hdr[H_FLAGS] & FLAG_POISON), lock_name, wait_name, name, _segment.queue_sem_prefix(name),
        )
        fast._set_owner(self)
        fast._set_fifo_prefix(_segment.fifo_prefix(name))
        # The hot paths, the core's C methods themselves (found before the
        # documented methods of the same names, which only describe them).
        self.__dict__.update(alloc=fast.alloc, free=fast.free, buffer=fast.buffer, ndarray=fast.ndarray)
        # posix_ipc's semaphore objects are not needed: the core opened its own.
        for sem in (seg.lock_sem, seg.wait_sem):
            try:
                sem.close()
            except Exception:
                pass
        self._name = name
        self._trace: Trace | None = None
        self._pid, self._start = self_identity()
        self._capacity = geo.capacity
        self._slot_size = geo.slot_size
        self._stride = geo.stride
        self._fd = seg.fd
        st = os.fstat(seg.fd)
        self._key = (st.st_dev, st.st_ino)
        self._core: tuple[Views, _LockForTests] | None = (v, _LockForTests(self))
        self._fast._set_data(v.data)
        if register:
            self._attach_process()
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
        a wrong type, FileExistsError if the name is taken (its message says
        whether the pool there is stale, and how to remove it), OSError if the
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
        try:
            seg = _segment.create(name, geo.total, mode)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, cls._existing(name)) from None
        try:
            # Nobody can attach before the magic number is written (last).
            v = Views(seg.mm, geo)
            hdr = v.hdr
            write_geometry(hdr, geo)
            hdr[H_FLAGS] = FLAG_POISON if poison else 0
            pid, start = self_identity()
            hdr[H_CREATOR_PID] = pid
            hdr[H_CREATOR_START] = start
            hdr[H_CREATED_NS] = time.time_ns()
            hdr[H_STATUS] = STATUS_LIVE
            v.fhdr[H_FAIL_RATE] = rate
            hdr[H_FAIL_THRESHOLD] = round(rate * (1 << _FAULT_BITS))
            hdr[H_SEED] = hdr[H_RNG] = seed
            # Every slot in the arena, generations random, the lowest slots
            # handed out first.
            gens = np.random.default_rng(random.SystemRandom().getrandbits(64)).integers(
                0, GEN_MASK, size=capacity, dtype=np.uint64, endpoint=True
            )
            np.frombuffer(v.words, dtype=np.uint64)[:] = (gens << np.uint64(GEN_SHIFT)) | np.uint64(ST_ARENA)
            np.frombuffer(v.arena, dtype=np.uint32)[:] = np.arange(capacity - 1, -1, -1, dtype=np.uint32)
            hdr[H_ARENA_FREE] = capacity
            del v, hdr
            pool = cls(name, seg, geo, register=False)
            pool._fast._format(min_nr)
            pool._attach_process()
            pool._core[0].hdr[H_MAGIC] = MAGIC  # type: ignore[index]  # last: from here on the pool is whole
        except BaseException:
            _segment.unlink(name)
            raise
        return pool

    @classmethod
    def attach(cls, name: str) -> Mempool:
        """Attach to the existing pool ``name`` (from any process).

        Raises FileNotFoundError if there is none, PermissionError if its
        mode does not admit this user, PoolFormatError if the segment is not
        a shmpool pool of this layout version (wrong magic or version, a
        header that disagrees with itself or with the segment's size).
        Attaching changes nothing but the process registry.
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
            finding = quick_check(Views(mm, geo))
            if finding:
                raise PoolFormatError(f"pool {name!r} is corrupt: {finding} (shmpool-inspect --check {name} audits it)")
            lock_sem, wait_sem = _segment.open_sems(name)
        except BaseException:
            try:
                mm.close()
            except BufferError:
                pass
            os.close(fd)
            raise
        return cls(name, _segment.Segment(mm, size, fd, lock_sem, wait_sem), geo)

    @classmethod
    def open(
        cls,
        name: str,
        *,
        create: bool = True,
        min_nr: int | None = None,
        slot_size: int | None = None,
        capacity: int | None = None,
        fail_rate: float = 0.0,
        seed: int | None = None,
        mode: int = 0o600,
        poison: bool = False,
    ) -> Mempool:
        """Attach to pool ``name``, creating it first if there is none and
        ``create`` is true: for processes that start in any order.

        An existing pool must have the ``slot_size`` and ``capacity`` given
        (ValueError naming both geometries otherwise; the pool is left as it
        is). ``min_nr`` and the other arguments are :meth:`create`'s and are
        used only to create the pool (an existing pool keeps its own
        ``min_nr``, which :meth:`resize` may have changed). Creating needs
        ``min_nr``, ``slot_size`` and ``capacity`` (TypeError without them).
        With ``create=False`` it is :meth:`attach` plus the geometry check.

        Safe when several processes open one name at once: one creates it;
        the others, whose create finds the name taken (FileExistsError),
        attach to the winner's pool, waiting up to ``OPEN_WAIT_SECONDS``
        for it to be finished. Any existing pool is attached, one left by a run
        that died included: its queued elements are still queued, and the
        elements its dead processes held are reclaimed when this process
        registers. To start from nothing, the one process that owns the
        pool's lifetime uses :meth:`create` (whose FileExistsError says
        whether the pool there is stale) with :meth:`destroying`.
        """
        _segment.check_name(name)
        if create and (min_nr is None or slot_size is None or capacity is None):
            raise TypeError("Mempool.open() needs min_nr, slot_size and capacity to create the pool (or create=False)")
        want = {k: _check_int(v, k) for k, v in (("slot_size", slot_size), ("capacity", capacity)) if v is not None}
        deadline = _monotonic() + OPEN_WAIT_SECONDS
        while True:
            try:
                pool = cls._attach_once(name)
            except _NotReady:  # being created by another process (on a busy machine that can take a while)
                if _monotonic() > deadline:
                    raise PoolFormatError(
                        f"pool {name!r} was not finished within {OPEN_WAIT_SECONDS} s (its creator may have died "
                        "while creating it)"
                    ) from None
                time.sleep(0.005)  # poll with a deadline for the creator to finish
                continue
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    return cls.create(
                        name, min_nr=min_nr, slot_size=slot_size, capacity=capacity,  # type: ignore[arg-type]
                        fail_rate=fail_rate, seed=seed, mode=mode, poison=poison,
                    )
                except FileExistsError:
                    # Created by another process since our attach found nothing
                    # (or being created: a segment not yet sized reads as
                    # missing): attach to theirs.
                    if _monotonic() > deadline:
                        raise
                    time.sleep(0.001)  # poll with a deadline for the creator to size it
                    continue
            have = {"slot_size": pool.slot_size, "capacity": pool.capacity}
            if any(have[k] != v for k, v in want.items()):
                pool.close()
                raise ValueError(
                    f"pool {name!r} exists with slot_size={have['slot_size']}, capacity={have['capacity']}, not "
                    + ", ".join(f"{k}={v}" for k, v in want.items())
                )
            return pool

    @classmethod
    def _existing(cls, name: str) -> str:
        """What create() says when ``name`` is taken: whether the pool there
        is stale (its creator and every process attached to it dead) and how
        to remove it, or that it is in use."""
        remove = f"remove it with `shmpool-inspect {name} --destroy` (or `python tools/cleanup.py {name}` from a source checkout)"
        try:
            mm, size, fd = _segment.open_shm(name, readonly=True)
        except FileNotFoundError:
            return f"pool {name!r} already exists (it is being created or destroyed right now)"
        except PermissionError as exc:
            return f"pool {name!r} already exists and this user may not open it ({exc.strerror})"
        with mm:
            head = mm[:HEADER_BYTES]  # a copy: no view keeps the mapping
        os.close(fd)
        if len(head) >= 8 and int.from_bytes(head[:8], "little") == 0:
            return f"pool {name!r} already exists (it is being created right now, or its creator died creating it)"
        try:
            read_geometry(head, size)  # type: ignore[arg-type]
        except PoolFormatError as exc:
            return f"pool {name!r} already exists but is no pool this shmpool can use ({exc}); {remove}"
        pid, start = (int.from_bytes(head[8 * w : 8 * w + 8], "little") for w in (H_CREATOR_PID, H_CREATOR_START))
        try:
            live = _procs.live_pids(name)
        except (OSError, PoolFormatError):
            live = []
        creator = _procs.is_alive(pid, start)
        if live or creator:
            return (
                f"pool {name!r} already exists and is in use (its creator, pid {pid}, "
                f"{'is alive' if creator else 'has exited'}; {len(live)} live process(es) attached): attach to it "
                "(Mempool.attach, or Mempool.open to create it only if missing), or choose another name"
            )
        return (
            f"pool {name!r} already exists and is stale: its creator (pid {pid}) and every process attached to it "
            f"have exited (a run that ended without destroying it); {remove}"
        )

    def _attach_process(self) -> None:
        """Bind this object to this process's registry entry in the pool,
        registering the process first if it has none."""
        key = self._key
        with _attach_lock:
            att = _attachments.get(key)
            if att is not None and self._fast._bind(att.fd, att.index, att.epoch):
                att.refs += 1
                self._fast._enabled = self._trace is None
                return
            # A description of our own: the OFD lock lives as long as it does.
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
            try:
                index, epoch = self._fast._register(fd, self._pid, self._start)
            except BaseException:
                os.close(fd)
                raise
            if att is not None:
                os.close(att.fd)
            _attachments[key] = _Attachment(fd, index, epoch, 1)
        self._fast._enabled = self._trace is None

    def _release_attachment(self, destroyed: bool) -> None:
        """This object lets go of the process's registry entry. The last one
        to do so vacates it, unless the process still holds elements (they
        stay its own, and the entry with them, until the process exits or
        frees them): a process that attaches and closes many pools does not
        keep a descriptor per pool. After destroy the descriptor goes
        whatever is held."""
        with _attach_lock:
            att = _attachments.get(self._key)
            if att is None or self._fast._entry != att.index:
                return
            att.refs -= 1
            if att.refs > 0:
                return
            try:
                vacated = self._fast._detach(_ns(CLOSE_LOCK_SECONDS))
            except Exception:  # a damaged pool, or a signal: keep the entry
                vacated = False
            if vacated or destroyed:
                del _attachments[self._key]
                os.close(att.fd)
                _aio.drop_fifos(self._key)  # its asyncio wake-up FIFO, if it made one

    def _become(self, pid: int, start: int) -> None:
        """After fork(): this object now belongs to the child."""
        self._pid, self._start = pid, start
        self._fast._enabled = False  # the cache in use was the parent's
        if self._core is None:
            return
        try:
            self._attach_process()
        except Exception:  # a pool destroyed meanwhile: its next call says so
            pass

    # ------------------------------------------------------------------
    # Allocation and free

    # alloc, free, buffer and ndarray: what the core's C methods, bound to
    # each pool in __init__, do (these bodies run only if called through
    # the class, Mempool.alloc(pool, ...)).

    @overload
    def alloc(self, gfp: SleepingMask = ..., *, timeout: float | None = None) -> int: ...
    @overload
    def alloc(self, gfp: int, *, timeout: float | None = None) -> int | None: ...

    def alloc(self, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> int | None:
        """Allocate one element; return its handle (an int).

        The kernel's order: the arena first; if it fails, the top of the
        reserve. If the reserve is empty too, a ``gfp`` that may not sleep
        (GFP_ATOMIC, GFP_NOWAIT) returns None at once, while one that may
        (GFP_KERNEL, GFP_NOIO, GFP_NOFS) sleeps until a free refills the
        reserve, or for 5 s, and tries again from the arena: it never
        returns None. ``timeout`` (seconds) bounds the whole call, the wait
        for the pool lock included: TimeoutError once it has passed without
        success. A call that may not sleep waits for the lock at most
        ``ATOMIC_LOCK_WAIT_SECONDS`` (then None).

        The element's bytes are whatever its last user left (not zeroed).
        Holding many elements while sleeping for more can deadlock against
        other processes doing the same; use one allocation at a time or
        bound the wait with ``timeout``.
        """
        return self._fast.alloc(gfp, timeout=timeout)

    def free(self, handle: int | None) -> None:
        """Return an element. None is ignored (as the kernel ignores NULL).

        If the reserve is below ``min_nr`` the element refills it and every
        sleeping allocation is woken; otherwise it goes back to the arena.
        Any process may free any handle that is currently held.

        Raises TypeError if ``handle`` is not an int, ValueError if it is out
        of range, InvalidHandleError if it is not currently held (double
        free, never allocated, stale, another pool's). A refused free changes
        nothing.
        """
        self._fast.free(handle)

    def buffer(self, handle: int) -> memoryview:
        """A writable memoryview of the element's ``slot_size`` bytes, no
        copy. It keeps the mapping alive after close(); the element must
        still be held (the handle's errors as for free)."""
        return self._fast.buffer(handle)

    def ndarray(self, handle: int, dtype: Any = None, shape: Any = None) -> np.ndarray:
        """A numpy array over the element's bytes, no copy: ``dtype``
        (default uint8) and ``shape`` (default: as many as fit; an int or a
        tuple; ValueError if more than the slot). Keeps the mapping alive
        after close(); the handle's errors as for free."""
        return self._fast.ndarray(handle, dtype, shape)

    def _alloc_slow(self, gfp: int = GFP_KERNEL, timeout: float | None = None, skip_arena: bool = False) -> int | None:
        """alloc() past the C fast path: every check, the lock, sleeping.
        (The fast path calls this with ``skip_arena`` when its own arena
        attempt failed, so that the first attempt here is the reserve.)
        """
        if self._core is None:
            raise self._closed()
        sleeps = may_sleep(gfp)
        timeout_ns = -1 if timeout is None else _ns(self._check_timeout(timeout))
        try:
            return self._fast._alloc_core(
                sleeps, skip_arena, timeout_ns, _ns(SLEEP_RETRY_SECONDS), _ns(ATOMIC_LOCK_WAIT_SECONDS)
            )
        except TimeoutError:
            raise TimeoutError(f"pool {self.name!r}: no element within {timeout} s") from None
        except PoolDestroyedError:
            raise PoolDestroyedError(f"pool {self.name!r} was destroyed") from None

    def alloc_preallocated(self) -> int | None:
        """Take an element from the reserve only, never the arena, never
        sleeping (the kernel's mempool_alloc_preallocated): None if empty."""
        if self._core is None:
            raise self._closed()
        return self._fast._alloc_preallocated_core()

    @overload
    async def alloc_async(self, gfp: SleepingMask = ..., *, timeout: float | None = None) -> int: ...
    @overload
    async def alloc_async(self, gfp: int, *, timeout: float | None = None) -> int | None: ...

    async def alloc_async(self, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> int | None:
        """alloc() for asyncio: ``h = await pool.alloc_async(GFP_KERNEL, timeout=None)``.

        Never blocks the event loop: the allocation is first tried without
        sleeping (``__GFP_WAIT`` cleared: the arena, then the reserve), and
        only if that finds nothing, and ``gfp`` may sleep, does it sleep, in
        a thread of its own, woken by a free as promptly as alloc()
        (TimeoutError after ``timeout`` seconds). A ``gfp`` that may not
        sleep returns None at once instead, as alloc() does.

        Cancelled (``asyncio.wait_for``'s timeout included), it raises
        CancelledError at once, and an element its thread got meanwhile is
        freed: nothing leaks, unlike ``asyncio.to_thread(pool.alloc)``. See
        ``shmpool._aio`` for what waiting costs.
        """
        return await _aio.alloc(self, gfp, timeout)

    def _free_slow(self, handle: int | None) -> None:
        """free() past the C fast path: every check, then the locked free."""
        if handle is None:
            return
        if self._core is None:
            raise self._closed()
        idx, gen = self._decode(handle)
        try:
            self._fast._free_core(idx, gen)
        except PoolDestroyedError:
            raise PoolDestroyedError(f"pool {self.name!r} was destroyed") from None

    @overload
    def alloc_bulk(self, n: int, gfp: SleepingMask = ..., *, timeout: float | None = None) -> np.ndarray: ...
    @overload
    def alloc_bulk(self, n: int, gfp: int, *, timeout: float | None = None) -> np.ndarray | None: ...

    def alloc_bulk(self, n: int, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> np.ndarray | None:
        """Allocate ``n`` elements at once; return their handles as a numpy
        int64 array. Not the kernel's mempool_alloc_bulk (in linux-next,
        not in a release), which fills the caller's array, takes no gfp and
        keeps what it got while it waits: KERNEL.md lists the differences.

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
        if self._core is None:
            raise self._closed()
        n = _check_int(n, "n")
        if not 0 <= n <= self._capacity:
            raise ValueError(f"n must be from 0 to the capacity ({self._capacity}), not {n}")
        sleeps = may_sleep(gfp)
        timeout_ns = -1 if timeout is None else _ns(self._check_timeout(timeout))
        out = np.empty(n, dtype=np.int64)
        try:
            got = self._fast._alloc_bulk_core(
                out, n, sleeps, timeout_ns, _ns(SLEEP_RETRY_SECONDS), _ns(ATOMIC_LOCK_WAIT_SECONDS)
            )
        except TimeoutError:
            raise TimeoutError(f"pool {self.name!r}: no {n} elements within {timeout} s") from None
        return out if got else None

    def free_bulk(self, handles: Any) -> None:
        """Free many elements at once (a sequence or array of handles).

        Every handle is checked first: one that is not an int, out of range,
        not currently held, or given twice refuses the whole call (TypeError,
        ValueError, InvalidHandleError) and nothing is freed. Then, as if
        freed one by one: the first ones refill the reserve while it is
        below min_nr (waking sleepers), the rest go back to the arena.
        Returns None: the kernel's mempool_free_bulk (linux-next) returns how
        many it put in the reserve and leaves the rest to the caller; here
        every element is freed.
        """
        if self._core is None:
            raise self._closed()
        if self._fast._free_bulk_fast(handles) is None:  # a list of ints or an int64 array, checked in C
            return
        arr = self._check_handles(handles)  # anything else, or the error that says what is wrong
        if arr.size:
            self._fast._free_bulk_core(arr)

    def _check_handles(self, handles: Any) -> np.ndarray:
        """Many handles as a contiguous int64 array, each an int in range and
        no slot named twice (TypeError, ValueError, InvalidHandleError).
        Costs in proportion to the batch, not the pool."""
        arr = np.asarray(handles)
        if not arr.size:
            return np.empty(0, dtype=np.int64)  # (an empty list is float64 to numpy)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"handles must be integers, not {arr.dtype}")
        if arr.dtype == np.uint64 and int(arr.max()) >> 63:
            raise ValueError(f"handle {int(arr.max())} is out of range")
        arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
        idx = arr & INDEX_MASK
        bad = np.flatnonzero((arr < 0) | (idx >= self._capacity))
        if bad.size:
            raise ValueError(f"handle {int(arr[bad[0]])} is out of range")
        if arr.size > 1:
            if arr.size * 64 >= self._capacity:  # a big batch: one pass over a map of the slots
                seen = np.zeros(self._capacity, dtype=np.uint8)
                seen[idx] = 1
                clash = np.count_nonzero(seen) != arr.size
            else:  # a small one: a sort of the batch alone
                clash = True
            if clash:
                order = np.argsort(idx, kind="stable")
                twice = np.flatnonzero(idx[order][1:] == idx[order][:-1])
                if twice.size:
                    raise InvalidHandleError(int(arr[order[twice[0] + 1]]), "given twice in one call")
        return arr

    def reclaim_dead(self) -> int:
        """Take back every element held by a process that no longer exists,
        through the normal free path (the reserve refills first, sleepers
        are woken); returns how many. Also gives back the cached slots of
        dead processes and uncounts sleepers that died.

        An element handed to another process still belongs to the process
        that allocated it until the receiver calls :meth:`adopt`: if the
        sender dies first, the element is reclaimed from the receiver.
        """
        if self._core is None:
            raise self._closed()
        return self._fast._reclaim_core()

    def adopt(self, handle: int) -> None:
        """Make this process the holder of ``handle`` (received from another
        process), so that it is not reclaimed if the sender dies. Refused
        like free() if the handle is not currently held; changes nothing
        else."""
        if self._core is None:
            raise self._closed()
        idx, gen = self._decode(handle)
        self._fast._adopt_core(idx, gen)

    @property
    def recoveries(self) -> int:
        """How many times this object took the lock over from a dead holder."""
        return self._fast._recoveries

    def _decode(self, handle: object) -> tuple[int, int]:
        """(slot index, generation) of a handle of this pool, or the error."""
        if type(handle) is not int:
            if isinstance(handle, bool) or not hasattr(type(handle), "__index__"):
                raise TypeError(f"a handle is an int, not {type(handle).__name__}")
            handle = operator.index(handle)  # type: ignore[arg-type]
        if handle < 0 or handle >> 63:
            raise ValueError(f"handle {handle} is out of range")
        idx = handle & INDEX_MASK
        if idx >= self._capacity:
            raise ValueError(f"handle {handle:#x} names slot {idx}, beyond the capacity ({self._capacity})")
        return idx, handle >> HGEN_SHIFT

    @staticmethod
    def _describe(word: int, gen: int) -> str:
        state = word & STATE_MASK
        if state == ST_HELD:
            return (f"stale, or another pool's: its slot is held under generation {(word >> GEN_SHIFT) & GEN_MASK}, "
                    f"not {gen} (freed and handed out again since)")
        where = STATE_NAMES.get(state, f"in no valid state ({state})")
        return f"its slot is {where} (freed already, or never allocated, or another pool's handle)"

    def _check_timeout(self, timeout: object) -> float:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        seconds = float(timeout)
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        return seconds

    # ------------------------------------------------------------------
    # Queues

    def queue(self, name: str, depth: int | None = None) -> Queue:
        """Queue ``name`` of this pool (see ``shmpool.queues``): created with
        ``depth`` (1 to the capacity) if it does not exist, else opened.
        Any process opens it by name: ``pool.queue("frames")``.

        Raises FileNotFoundError if there is no such queue and no ``depth``,
        ValueError if it exists with another depth, OSError if the pool
        already has MAX_QUEUES queues.
        """
        if self._core is None:
            raise self._closed()
        raw = check_queue_name(name)
        want = 0
        if depth is not None:
            want = _check_int(depth, "depth")
            if not 1 <= want <= self._capacity:
                raise ValueError(f"depth must be from 1 to the capacity ({self._capacity}), not {want}")
        index, have = self._fast._queue_open(raw, want)
        if index == -1:
            raise FileNotFoundError(errno.ENOENT, f"pool {self.name!r} has no queue {name!r} (give a depth to create it)")
        if index == -2:
            raise OSError(errno.ENOSPC, f"pool {self.name!r} has {MAX_QUEUES} queues already")
        if depth is not None and have != want:
            raise ValueError(f"queue {name!r} exists with depth {have}, not {want}")
        return Queue(self, name, index, have)

    # ------------------------------------------------------------------
    # Resize and destroy

    def resize(self, new_min_nr: int, gfp: int = GFP_KERNEL) -> None:
        """Change ``min_nr`` (the kernel's mempool_resize).

        Shrinking gives reserve elements above ``new_min_nr`` back to the
        arena. Growing raises ``min_nr`` and refills the reserve from the
        arena (fault injection applies; free slots in other processes'
        caches are taken too); if the arena fails part way the resize still
        succeeds, the reserve under-filled until later frees top it up.
        ``new_min_nr`` must be from 1 to the capacity (ValueError, nothing
        changed). Never sleeps.
        """
        if self._core is None:
            raise self._closed()
        may_sleep(gfp)  # validates
        new_min_nr = _check_int(new_min_nr, "new_min_nr")
        if not 1 <= new_min_nr <= self._capacity:
            raise ValueError(f"new_min_nr must be from 1 to the capacity ({self._capacity}), not {new_min_nr}")
        self._fast._resize_core(new_min_nr, RESIZE_BATCH)

    def destroy(self, force: bool = False) -> None:
        """Unlink the pool's segment and semaphores, and close this object.

        Refuses with PoolBusyError, changing nothing, while elements are
        held or queued, unless ``force``. A reserve that is not full with nothing held
        (a growing resize that found the arena failing) does not stop it:
        later kernels dropped v3.2's ``BUG_ON(curr_nr != min_nr)`` for that
        case. Other processes that are still attached get PoolDestroyedError
        from their next operation, and their sleeping allocations are woken
        to get it; their mappings stay valid until they close.
        """
        if self._core is None:
            raise self._closed()
        try:
            refused = self._fast._destroy_core(bool(force))
        except PoolDestroyedError:
            raise PoolDestroyedError(f"pool {self.name!r} was destroyed already") from None
        if refused is not None:
            in_use, curr_nr, min_nr = refused
            raise PoolBusyError(
                f"pool {self.name!r} still lends {in_use} element(s), held or queued (its reserve holds {curr_nr} "
                f"of {min_nr}): "
                "free them first, or destroy(force=True)"
            )
        _segment.unlink(self.name)
        self._close(destroyed=True)

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
        if word & STATE_MASK != ST_HELD or word >> GEN_SHIFT != gen:
            raise InvalidHandleError(handle, self._describe(word, gen))
        return idx * self._stride

    # buffer(handle) and ndarray(handle, dtype, shape) are the core's: a
    # checked handle and a view cut in C. Whatever they find unusual comes
    # here, to be checked and said in Python.

    def _buffer_slow(self, handle: int) -> memoryview:
        off = self._slot_offset(handle)
        return self._core[0].data[off : off + self._slot_size]  # type: ignore[index]

    def _ndarray_slow(self, handle: int, dtype: Any = None, shape: Any = None) -> np.ndarray:
        dt = np.dtype(np.uint8 if dtype is None else dtype)
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
        buf = np.empty(HEADER_WORDS + 3 + N_PROC_COUNTERS, dtype=np.uint64)
        self._fast._stats_core(buf)
        words = buf.tolist()
        cached, in_use, queued = words[HEADER_WORDS], words[HEADER_WORDS + 1], words[HEADER_WORDS + 2]
        per_proc = words[HEADER_WORDS + 3 :]
        counts = {name: words[index] + (per_proc[i] if i < N_PROC_COUNTERS else 0) for i, (name, index) in enumerate(COUNTERS)}
        curr_nr = words[H_CURR_NR]
        return PoolStats(
            name=self.name,
            slot_size=self._slot_size,
            capacity=self._capacity,
            min_nr=words[H_MIN_NR],
            curr_nr=curr_nr,
            arena_free=words[H_ARENA_FREE] + cached,
            in_use=in_use,
            queued=queued,
            nr_waiters=words[H_NR_WAITERS],
            fail_rate=float(buf[H_FAIL_RATE : H_FAIL_RATE + 1].view(np.float64)[0]),
            seed=words[H_SEED],
            poison=bool(words[H_FLAGS] & FLAG_POISON),
            **counts,
        )

    def is_saturated(self) -> bool:
        """True if the reserve is full (``curr_nr >= min_nr``)."""
        s = self.stats()
        return s.curr_nr >= s.min_nr

    def set_fail_rate(self, fail_rate: float, *, seed: int | None = None) -> None:
        """Change the arena's injected failure rate for every process; a
        ``seed`` also restarts the failure sequence."""
        if self._core is None:
            raise self._closed()
        rate = _check_fail_rate(fail_rate)
        seed = _check_seed(seed)
        try:
            self._fast._set_faults(rate, round(rate * (1 << _FAULT_BITS)), seed is not None, seed or 0)
        except PoolDestroyedError:
            raise PoolDestroyedError(f"pool {self.name!r} was destroyed") from None

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
        if callback is not None and not callable(callback):
            raise TypeError(f"trace must be callable or None, not {type(callback).__name__}")
        self._trace = callback
        self._fast._trace_cb = callback
        if self._core is None:
            return
        if callback is not None and self._fast._enabled:
            self._fast._enabled = False
            self._fast._drain_cache(-1)
        elif callback is None and self._fast._entry >= 0:
            self._fast._enabled = True

    @property
    def min_nr(self) -> int:
        """The reserve's target size now (``resize`` changes it; read
        without the lock: a single load)."""
        core = self._core
        if core is None:
            raise self._closed()
        return int(core[0].hdr[H_MIN_NR])

    @property
    def name(self) -> str:
        """The pool's name, as given to create, attach or open."""
        return self._name

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
        """Let go of the pool in this object; the pool lives on, and so does
        this process's ownership of the elements it holds. Never raises, and
        may be called twice. Memoryviews and numpy views of elements stay
        valid until the last of them is gone; the mapping is unmapped then.
        Further calls on this object raise PoolClosedError."""
        core = self._core
        if core is None:
            return
        self._close(destroyed=False)

    @contextlib.contextmanager
    def destroying(self, *, force: bool = False) -> Iterator[Mempool]:
        """For the pool's creator: ``with Mempool.create(...).destroying()
        as pool:`` yields this pool and destroys it when the block ends, so
        that no run leaves it behind in /dev/shm.

        If the block ends by an exception (KeyboardInterrupt included), the
        pool is destroyed whatever is held or queued (``destroy(force=True)``;
        processes still attached get PoolDestroyedError from their next
        call) and the exception goes on. If it ends normally, it is
        ``destroy(force=force)``: without ``force``, elements still held or
        queued then are a leak, reported by PoolBusyError, and the pool is
        left as it is for ``shmpool-inspect`` to show who holds them. A pool
        already destroyed or closed in this object when the block ends is
        left alone.
        """
        try:
            yield self
        except BaseException:
            if self._core is not None:
                try:
                    self.destroy(force=True)
                except PoolDestroyedError:  # another process destroyed it first
                    self.close()
            raise
        if self._core is not None:
            try:
                self.destroy(force=force)
            except PoolDestroyedError:
                self.close()

    def _close(self, destroyed: bool) -> None:
        core = self._core
        if core is None:
            return
        if self._fast._enabled:
            self._fast._enabled = False
            # The cache's slots back to the shared arena, if the lock comes
            # soon (never block in close); otherwise they wait for a thief or
            # for reclaim_dead.
            try:
                self._fast._drain_cache(_ns(CLOSE_LOCK_SECONDS))
            except Exception:  # a damaged pool, or a signal: leave it to the audit
                pass
        self._release_attachment(destroyed)
        self._core = None
        self._fast._unmap()
        mm = core[0].mm
        del core
        try:
            os.close(self._fd)
        except OSError:
            pass
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


import weakref  # noqa: E402  (after the class: the set holds Mempools)

_live_pools = weakref.WeakSet()
