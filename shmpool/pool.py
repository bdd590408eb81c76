"""Mempool: the kernel's mm/mempool.c, shared by processes; a facade.

The rules (Linux v3.2; ../shared/KERNEL_MEMPOOL.md in the project)
------------------------------------------------------------------
- create takes ``min_nr`` elements from the arena into the reserve;
- alloc tries the arena first and falls back to the reserve (LIFO) only when
  the arena fails; an allocation that may not sleep then returns None, one
  that may sleep waits for a free (or 5 s) and tries again, never failing;
- free refills the reserve while ``curr_nr < min_nr`` and wakes the
  sleepers, and otherwise gives the element back to the arena;
- resize shrinks by giving reserve elements back, grows by refilling from the
  arena, and a grow that finds the arena failing still succeeds.

Where things are
----------------
Each rule is one transition of the compiled core (``shmpool/_core/``, whose
``pool.h`` has the map), run as one C call that takes the pool lock, makes
its move and releases it, running no Python code in between; the core also
checks every argument it takes. This class is the facade that documents the
calls and composes the few that take more than one core call. A Mempool
holds its core (``_core``, private) and binds the core's ``alloc``,
``free``, ``buffer`` and ``ndarray`` to itself, so that they run no Python
frame. Making and finding pools is in ``_lifecycle``; this process's
registry entry, fork and exit in ``_attach``; queues in ``queues``; the
awaitable twins in ``_aio``.

Who holds an element: the owner field of its slot word, the registry entry
of the process that holds it (``_layout``). Handing a handle to another
process outside a queue does not move it: the receiver calls ``adopt``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, overload

from . import _aio, _attach, _lifecycle, _log, _segment
from ._args import check_array, check_fail_rate, check_queue_name, check_range, check_rng, check_seed
from ._core import LAYOUT_HASH, Core, set_classes, set_logger
from ._errors import (
    InvalidHandleError,
    PoisonWarning,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
)
from ._layout import (
    ADMIN_WAIT_NS,
    ATOMIC_WAIT_NS,
    FLAG_POISON,
    H_FLAGS,
    MAX_PROCS,
    MAX_QUEUES,
    SLEEP_RETRY_NS,
    Geometry,
    layout_hash,
)
from ._typing import Array, Handles
from .gfp import GFP_KERNEL, GFPWarning, SleepingMask
from .queues import Queue
from .stats import PoolStats
from .topics import Topic

__all__ = ["Mempool", "Trace"]

Trace = Callable[[str, int | None, int], None]

#: How long a sleeping allocation sleeps before it retries the arena even if
#: nothing woke it (the kernel's ``io_schedule_timeout(5*HZ)``).
SLEEP_RETRY_SECONDS = SLEEP_RETRY_NS / 1e9
#: How long a call that may not wait (GFP_ATOMIC, GFP_NOWAIT, *_nowait,
#: alloc_preallocated, free) waits for a pool lock held by a live process.
ATOMIC_LOCK_WAIT_SECONDS = ATOMIC_WAIT_NS / 1e9
#: How long an administrative call (stats, reclaim_dead, resize,
#: set_fail_rate, destroy, adopt, opening a queue, attaching, close) waits
#: for it, before TimeoutError.
ADMIN_LOCK_WAIT_SECONDS = ADMIN_WAIT_NS / 1e9
OPEN_WAIT_SECONDS = _lifecycle.OPEN_WAIT_SECONDS

if layout_hash() != LAYOUT_HASH:
    raise ImportError("shmpool._core was built for another layout (shmpool/_layout.py changed): rebuild it "
                      "(pip install -e .)")
set_classes(PoolFormatError, PoolDestroyedError, InvalidHandleError, PoolClosedError, PoisonWarning, GFPWarning)
set_logger(_log.logger)


class Mempool:
    """A memory pool shared by every process that attaches to it by name.

    Make one with :meth:`create`, :meth:`attach` or :meth:`open`, never
    directly. A Mempool is safe to use from several threads; it pickles by
    name (the receiving process attaches to the same pool); it is a context
    manager that closes on exit.
    """

    __slots__ = ("_name", "_core", "_member", "_seg", "_geo", "_trace", "_open", "__weakref__", "__dict__")

    def __init__(self, name: str, seg: _segment.Segment, geo: Geometry, *, min_nr: int | None = None) -> None:
        poison = bool(int.from_bytes(seg.mm[8 * H_FLAGS : 8 * H_FLAGS + 8], "little") & FLAG_POISON)
        self._core = core = Core(
            seg.mm, name, geo.off_words, geo.off_stack, geo.off_arena, geo.off_next, geo.off_desc, geo.off_since, geo.off_procs,
            geo.off_queues, geo.off_refs, geo.off_topics,
            geo.max_queues, geo.off_slots, geo.max_procs, geo.capacity, geo.stride, geo.slot_size, poison,
            _segment.fifo_prefix(name),
        )
        # The hot paths: the core's C methods, found before the documented ones below.
        self.__dict__.update(alloc=core.alloc, free=core.free, buffer=core.buffer, ndarray=core.ndarray,
                             array=core.array)
        self._name, self._seg, self._geo = name, seg, geo
        self._trace: Trace | None = None
        self._open = True
        if min_nr is not None:
            core.format(min_nr)  # create: the reserve, before anybody can see the pool
        self._member = _attach.Membership(core, name, seg.fd, self.close)
        try:
            self._member.join()
        except BaseException:
            self._open = False
            core.close()
            raise

    # ------------------------------------------------------------------
    # Making and finding pools (_lifecycle)

    @classmethod
    def create(cls, name: str, *, min_nr: int, slot_size: int, capacity: int, fail_rate: float = 0.0,
               seed: int | None = None, mode: int = 0o600, poison: bool = False,
               max_processes: int = MAX_PROCS, rng: str = "splitmix64") -> Mempool:
        """Create pool ``name`` with ``capacity`` slots of ``slot_size``
        bytes and pre-allocate ``min_nr`` of them into the reserve (exempt
        from fault injection: it never fails).

        ``fail_rate``: the arena fails on purpose with that probability, by a
        generator seeded with ``seed`` (random if None; ``stats().seed``):
        ``rng="splitmix64"`` (lock-free), or ``"glibc"``, ``rand() % 100 <
        fail_rate * 100`` after ``srand(seed)`` in the order every process
        asks the arena (the seed's simulation: ``shmpool-demo --seed-run``).
        ``mode``: the segment's permissions; ``poison``: reserve poisoning
        (PoisonWarning); ``max_processes``: attached at once (EUSERS beyond).
        ValueError, TypeError for bad arguments; FileExistsError if the name
        is taken (saying if stale, and how to remove it); OSError if the
        system cannot back it. On any error nothing is left behind."""
        return _lifecycle.create(cls, name, min_nr=min_nr, slot_size=slot_size, capacity=capacity,
                                 fail_rate=fail_rate, seed=seed, mode=mode, poison=poison, max_processes=max_processes,
                                 rng=rng)

    @classmethod
    def attach(cls, name: str) -> Mempool:
        """Attach to the existing pool ``name`` (from any process).

        FileNotFoundError if there is none, PermissionError if its mode does
        not admit this user, PoolFormatError if the segment is not a whole
        shmpool pool of this layout, OSError (EUSERS) if ``max_processes``
        processes are attached already, TimeoutError if a stopped process
        holds the pool lock. Attaching changes nothing but the registry.
        """
        return _lifecycle.attach(cls, name)

    @classmethod
    def open(cls, name: str, *, create: bool = True, min_nr: int | None = None, slot_size: int | None = None,
             capacity: int | None = None, fail_rate: float = 0.0, seed: int | None = None, mode: int = 0o600,
             poison: bool = False, max_processes: int = MAX_PROCS, rng: str = "splitmix64") -> Mempool:
        """Attach to pool ``name``, creating it first if there is none and
        ``create`` is true: for processes that start in any order.

        An existing pool must have the ``slot_size`` and ``capacity`` given
        (ValueError otherwise; the pool is left as it is); the other
        arguments are :meth:`create`'s and only serve to create it. Creating
        needs ``min_nr``, ``slot_size`` and ``capacity`` (TypeError). Safe
        when several processes open one name at once: one creates it, the
        others attach, waiting up to ``OPEN_WAIT_SECONDS`` for it to be
        finished. Any existing pool is attached, a stale one included; to
        start from nothing, the pool's owner uses :meth:`create` with
        :meth:`destroying`.
        """
        return _lifecycle.open_(cls, name, create_=create, min_nr=min_nr, slot_size=slot_size, capacity=capacity,
                                fail_rate=fail_rate, seed=seed, mode=mode, poison=poison, max_processes=max_processes,
                                rng=rng)

    # ------------------------------------------------------------------
    # Allocation and free. alloc, free, buffer and ndarray are the core's C
    # methods, bound to each pool; these bodies run only through the class.

    @overload
    def alloc(self, gfp: SleepingMask = ..., *, timeout: float | None = None) -> int: ...
    @overload
    def alloc(self, gfp: int, *, timeout: float | None = None) -> int | None: ...

    def alloc(self, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> int | None:
        """Allocate one element; return its handle (an int).

        The kernel's order: the arena first; if it fails, the top of the
        reserve. If the reserve is empty too, a ``gfp`` that may not sleep
        (GFP_ATOMIC, GFP_NOWAIT) returns None, while one that may (GFP_KERNEL,
        GFP_NOIO, GFP_NOFS) sleeps until a free refills the reserve, or for 5
        s, and tries again: it never returns None. ``timeout`` (seconds; a
        huge one is clamped, never an error) bounds the whole call, the wait
        for the pool lock included: TimeoutError. A call that may not sleep
        waits for the lock at most ``ATOMIC_LOCK_WAIT_SECONDS`` (then None).
        close() from another thread ends a sleep with PoolClosedError.
        If a PoisonWarning made an exception, or the trace raised, the element
        is given back before the exception goes on. Elements are not zeroed. Holding elements while sleeping for more can
        deadlock (the kernel's pitfall); bound such waits with ``timeout``.
        """
        return self._core.alloc(gfp, timeout=timeout)

    def free(self, handle: int | None) -> None:
        """Return an element; None is ignored (as the kernel ignores NULL).

        While the reserve is below ``min_nr`` the element refills it and every
        sleeping allocation is woken; otherwise it goes back to the arena. Any
        process may free any handle that is currently held. It never waits
        longer than ``ATOMIC_LOCK_WAIT_SECONDS``: if a stopped process holds
        the pool lock, the element is parked and the next holder of the lock
        completes the free. TypeError (not an int), ValueError (out of
        range), InvalidHandleError (not held: double free, stale, another
        pool's); a refused free changes nothing.
        """
        self._core.free(handle)

    def buffer(self, handle: int) -> memoryview:
        """A writable memoryview of the element's ``slot_size`` bytes, no
        copy; it keeps the mapping alive after close(). The element must be
        held (the handle's errors as for free)."""
        return self._core.buffer(handle)

    def ndarray(self, handle: int, dtype: Any = None, shape: Any = None) -> Array:
        """A numpy array over the element's bytes, no copy: ``dtype`` (default
        uint8) and ``shape`` (default: as many as fit; an int or a tuple;
        ValueError if more than the slot). With neither, an element made by
        ``alloc_array`` gives the view recorded with it. It keeps the mapping alive after
        close(); the handle's errors as for free."""
        return self._core.ndarray(handle, dtype, shape)

    @overload
    def alloc_array(self, shape: Any, dtype: Any, gfp: SleepingMask = ..., *, timeout: float | None = None) -> Array: ...
    @overload
    def alloc_array(self, shape: Any, dtype: Any, gfp: int, *, timeout: float | None = None) -> Array | None: ...

    def alloc_array(self, shape: Any, dtype: Any, gfp: int = GFP_KERNEL, *,
                    timeout: float | None = None) -> Array | None:
        """alloc(gfp, timeout=timeout), its element's dtype and shape
        recorded with it: an owning array (see ``array``), or None where
        alloc would return None. ValueError if they do not fit in a slot
        (or in a descriptor: a plain dtype, at most 4 dimensions). The
        record travels with the element (a queue, adopt): ``ndarray(h)``
        and ``array(h)`` without dtype and shape give this view in any
        process; a free forgets it."""
        code, dims = check_array(shape, dtype, self.slot_size)
        h = self._core.alloc(gfp, timeout=timeout)
        if h is None:
            return None
        try:
            self._core.describe(h, code, dims)
            return self._core.array(h)
        except BaseException:
            self._core.free(h)
            raise

    def array(self, handle: int, dtype: Any = None, shape: Any = None) -> Array:
        """ndarray(handle, dtype, shape), owning its element: when the last
        reference to it and to every view made from it is gone, the element
        is freed if this process still holds it (not put on a queue, not
        freed, not adopted elsewhere since). ``free(a)`` and ``q.put(a)``
        take an owning array as they take its handle (and it then frees
        nothing); ``shmpool.handle_of(a)`` gives the handle. The finalizer
        may run in any thread at any moment the collector runs: it frees as
        ``free`` does, never raises, and parks the element if the lock does
        not come within ``ATOMIC_LOCK_WAIT_SECONDS``."""
        return self._core.array(handle, dtype, shape)

    def alloc_preallocated(self) -> int | None:
        """Take an element from the reserve only, never the arena, never
        sleeping (the kernel's mempool_alloc_preallocated): None if it is
        empty, or if the lock does not come within ATOMIC_LOCK_WAIT_SECONDS."""
        return self._core.alloc_preallocated()

    @overload
    async def alloc_async(self, gfp: SleepingMask = ..., *, timeout: float | None = None) -> int: ...
    @overload
    async def alloc_async(self, gfp: int, *, timeout: float | None = None) -> int | None: ...

    async def alloc_async(self, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> int | None:
        """alloc() for asyncio: ``h = await pool.alloc_async(GFP_KERNEL, timeout=None)``.

        Never blocks the event loop: the attempt is made without sleeping;
        if it finds nothing and ``gfp`` may sleep, the coroutine sleeps in
        its event loop, woken by a free as a sleeping alloc is (see
        ``shmpool._aio``); TimeoutError after ``timeout`` seconds. A ``gfp``
        that may not sleep returns None instead. Cancelled, it raises
        CancelledError at once and nothing is lost.
        """
        return await _aio.alloc(self._member, gfp, timeout)

    @overload
    def alloc_bulk(self, n: int, gfp: SleepingMask = ..., *, timeout: float | None = None) -> Handles: ...
    @overload
    def alloc_bulk(self, n: int, gfp: int, *, timeout: float | None = None) -> Handles | None: ...

    def alloc_bulk(self, n: int, gfp: int = GFP_KERNEL, *, timeout: float | None = None) -> Handles | None:
        """Allocate ``n`` elements (0 to the capacity) at once: their handles
        as an int64 array. Each is an arena attempt first (its own fault
        draw); what the arena does not give comes from the reserve, all or
        nothing: if the reserve cannot cover it, the arena's elements go back
        too and the call holds nothing while it waits (no deadlock between
        bulk callers). Then a ``gfp`` that may not sleep returns None; one
        that may sleeps and retries, never failing (``timeout``:
        TimeoutError). KERNEL.md compares it with linux-next's."""
        return self._core.alloc_bulk(n, gfp, timeout=timeout)

    def free_bulk(self, handles: Any) -> None:
        """Free many elements (a sequence or an integer array of handles).
        Every handle is checked first: one that is not an int, out of range,
        not held, or given twice refuses the whole call (TypeError,
        ValueError, InvalidHandleError) and nothing is freed. Then as if
        freed one by one: the reserve first while it is below min_nr, the
        rest to the arena. It never waits longer than free does."""
        self._core.free_bulk(handles)

    def adopt(self, handle: int) -> None:
        """Make this process the holder of ``handle`` (received from another
        process), so that it is not reclaimed if the sender dies. Refused as
        free() is if the handle is not held; changes nothing else."""
        self._core.adopt(handle)

    def reclaim_dead(self) -> int:
        """Take back every element held by a process that no longer exists,
        through the free path (the reserve first, sleepers woken); how many.
        Also gives back dead processes' cached slots, completes parked
        frees and counts out dead sleepers. An element handed to another
        process outside a queue is its sender's until the receiver adopts it.
        A held slot that names no process ever attached is damage:
        PoolFormatError, nothing changed."""
        return self._core.reclaim()

    # ------------------------------------------------------------------
    # Queues, resize, destroy

    def queue(self, name: str, depth: int | None = None) -> Queue:
        """Queue ``name`` of this pool (``shmpool.queues``): created with
        ``depth`` (1 to the capacity) if it does not exist, else opened. Any
        process opens it by name. FileNotFoundError if there is no such
        queue and no ``depth``, ValueError if it exists with another depth,
        OSError if the pool has MAX_QUEUES queues already."""
        raw = check_queue_name(name)
        want = 0 if depth is None else check_range(depth, "depth", 1, self.capacity, "the capacity")
        index, have = self._core.queue_open(raw, want)
        if index == -1:
            raise FileNotFoundError(2, f"pool {self.name!r} has no queue {name!r} (give a depth to create it)")
        if index == -2:
            raise OSError(28, f"pool {self.name!r} has {MAX_QUEUES} queues already")
        if want and have != want:
            raise ValueError(f"queue {name!r} exists with depth {have}, not {want}")
        return Queue(self._member, name, index, have)

    def topic(self, name: str, depth: int | None = None, *, overflow: str = "block") -> Topic:
        """Topic ``name`` (``shmpool.topics``), created with ``depth`` and ``overflow`` ("block",
        "drop_oldest"), or opened (FileNotFoundError: none and no depth; ValueError: another)."""
        return _lifecycle.open_topic(self._member, self.name, name, depth, overflow)

    def resize(self, new_min_nr: int, gfp: int = GFP_KERNEL) -> None:
        """Change ``min_nr`` (mempool_resize). Shrinking gives reserve
        elements above ``new_min_nr`` back to the arena; growing raises
        ``min_nr`` and refills from the arena (faults apply; other processes'
        cached slots are taken too), and succeeds even if the arena fails
        part way. ``new_min_nr`` from 1 to the capacity (ValueError, nothing
        changed). Never sleeps."""
        self._core.resize(new_min_nr, gfp)

    def destroy(self, force: bool = False) -> None:
        """Unlink the pool's segment, and close this object.

        Refused with PoolBusyError, changing nothing, while elements are held
        or queued, unless ``force``. A reserve below min_nr with nothing held
        does not stop it (later kernels dropped v3.2's BUG_ON). Attached
        processes get PoolDestroyedError from their next call, and their
        sleepers are woken to get it.
        """
        refused = self._core.destroy(bool(force))
        if refused is not None:
            lent, curr_nr, min_nr = refused
            raise PoolBusyError(
                f"pool {self.name!r} still lends {lent} element(s), held or queued (its reserve holds {curr_nr} of "
                f"{min_nr}): free them first, or destroy(force=True)"
            )
        _segment.unlink(self.name)
        self._close(destroyed=True)

    @contextlib.contextmanager
    def destroying(self, *, force: bool = False) -> Iterator[Mempool]:
        """For the pool's creator: ``with Mempool.create(...).destroying() as
        pool:`` destroys it when the block ends. An exception (Ctrl-C
        included) destroys it whatever is held or queued
        (``destroy(force=True)``) and goes on; a normal end is
        ``destroy(force=force)``, whose PoolBusyError reports a leak and leaves
        the pool for ``shmpool-inspect``. A pool already destroyed or closed
        here is left alone."""
        try:
            yield self
        except BaseException:
            if self._open:
                try:
                    self.destroy(force=True)
                except PoolDestroyedError:  # another process destroyed it first
                    self.close()
            raise
        if self._open:
            try:
                self.destroy(force=force)
            except PoolDestroyedError:
                self.close()

    # ------------------------------------------------------------------
    # Looking at the pool

    def stats(self) -> PoolStats:
        """A frozen, consistent snapshot, taken under the lock
        (``curr_nr + arena_free + in_use + queued == capacity``);
        TimeoutError if a stopped process keeps the lock."""
        return PoolStats(name=self._name, slot_size=self._geo.slot_size, capacity=self._geo.capacity,
                         **self._core.stats())

    @property
    def long_sleep(self) -> float | None:
        """Seconds after which a sleeping allocation of this object is said to
        the ``shmpool`` logger, once, with who holds the elements (5.0; None: never)."""
        return self._core.long_sleep

    @long_sleep.setter
    def long_sleep(self, seconds: float | None) -> None:
        self._core.long_sleep = seconds

    def is_saturated(self) -> bool:
        """True if the reserve is full (``curr_nr >= min_nr``), read without
        the lock as the kernel's mempool_is_saturated reads it."""
        return self._core.saturated

    def set_fail_rate(self, fail_rate: float, *, seed: int | None = None) -> None:
        """Change the arena's injected failure rate for every process; a
        ``seed`` also restarts the failure sequence (with ``rng="glibc"``,
        as ``srand(seed)``: an unsigned int)."""
        seed = check_seed(seed)
        check_rng(self.rng, seed)  # (glibc's srand takes an unsigned int)
        self._core.set_faults(check_fail_rate(fail_rate), seed)

    @property
    def trace(self) -> Trace | None:
        """Optional ``trace(event, handle, curr_nr)``, called after each alloc
        and free of this object, outside the lock. Events: "alloc-arena",
        "alloc-reserve", "alloc-failed", "sleep", "free-reserve",
        "free-arena"; ``curr_nr`` is the reserve's depth right after. While
        it is set, this object's calls all take the lock (its cache goes
        back to the arena)."""
        return self._trace

    @trace.setter
    def trace(self, callback: Trace | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"trace must be callable or None, not {type(callback).__name__}")
        self._trace = callback
        self._core.trace = callback
        if callback is not None and self._open:
            self._core.drain_cache()
        self._core.enabled = self._open

    @property
    def recoveries(self) -> int:
        """How many times this object took the lock over from a dead holder."""
        return self._core.recoveries

    @property
    def min_nr(self) -> int:
        """The reserve's target size now (``resize`` changes it; one load)."""
        return self._core.min_nr

    @property
    def rng(self) -> str:
        """The fault injector's generator: "splitmix64" or "glibc" (create's ``rng``)."""
        return self._core.rng

    @property
    def name(self) -> str:
        """The pool's name, as given to create, attach or open."""
        return self._name

    @property
    def slot_size(self) -> int:
        return self._geo.slot_size

    @property
    def capacity(self) -> int:
        return self._geo.capacity

    @property
    def closed(self) -> bool:
        return not self._open

    # ------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Let go of the pool in this object; the pool lives on, and so does
        this process's ownership of the elements it holds. Never raises; may
        be called twice, from any thread (a sleep of this object in another
        thread ends with PoolClosedError). Views of elements stay valid until
        the last of them is gone. Further calls raise PoolClosedError."""
        self._close(destroyed=False)

    def leave(self) -> bool:
        """This process leaves the pool: all it holds comes back (as a dead
        process's would), its subscriptions end, every object of the pool in
        it closes. The last process attached destroys the pool (True), in one
        step under the lock, so of several leaving at once exactly one does.
        RuntimeError, nothing changed, while a thread of it waits on the pool."""
        return _lifecycle.leave(self)

    def _close(self, destroyed: bool) -> None:
        if not self._open:
            return
        self._open = False
        self._member.leave(destroyed)
        self._core.close()
        self._seg.close()

    def __enter__(self) -> Mempool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_reattach, (self.name,))

    def __repr__(self) -> str:
        state = f"slot_size={self.slot_size}, capacity={self.capacity}" if self._open else "closed"
        return f"<Mempool {self.name!r} {state}>"


def _reattach(name: str) -> Mempool:
    return Mempool.attach(name)
