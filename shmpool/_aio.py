"""The awaitable twins of the calls that may wait: ``pool.alloc_async``,
``q.get_async`` and ``q.put_async``.

How alloc_async waits: in its own event loop
--------------------------------------------
It first makes the non-blocking attempt (``__GFP_WAIT`` cleared: the
lock-free cache, else one critical section). If that finds nothing and the
mask may sleep, it sleeps the way a sleeping alloc does, with the event loop
as its wait queue: one critical section (``alloc_async_try``) tries again
and, failing, counts the caller in as a sleeper (``nr_waiters``, its
process's entry) and as an *async* one (``H_ASYNC_WAITERS``, the entry's
``P_ASYNC``), all under the lock, the kernel's ``prepare_to_wait``. The
coroutine then awaits a future that its loop completes when the process's
FIFO (``/dev/shm/fifo.shmpool.NAME.E``, E its registry entry) becomes
readable: a free that refills the reserve writes a byte into the FIFO of
every process with async sleepers, after the lock is released
(``_core/wake.c``, ``poke_async``), as ``wake_up`` wakes every sleeper. Each
woken coroutine counts itself out and tries again. No thread is involved.

- No lost wake-up: a byte written after the coroutine registered waits in
  the FIFO until the loop, which runs nothing between the registration and
  the coroutine's await, reads it.
- The FIFO is opened for reading and writing (so that it never reads as
  end-of-file) and watched by the first loop of the process that waits; it
  stays registered in that loop until the loop closes (adding and removing
  a reader around every wait cost more than the rest of a wake-up). Another
  loop of the same process meanwhile waits in a thread (below). A waking
  process keeps the FIFOs it wrote to open while their entry's epoch stays
  the same, and blocks SIGPIPE around its writes (a reader that has gone
  gives EPIPE, never a signal that might kill it).
- Nothing wakes a process that cannot reach the FIFO (another mount of
  /dev/shm): its coroutines try again every ``SLEEP_RETRY_NS`` (5 s), as a
  sleeping alloc does. A lock held by a live process for
  ``ATOMIC_LOCK_WAIT_SECONDS`` (GFP_ATOMIC's wait) makes the attempt give up
  without registering, and try again ``LOCK_BUSY_RETRY_SECONDS``
  later: the loop is never blocked longer than ``GFP_ATOMIC`` waits.
- Cancelled, it counts itself out in its ``finally``: nothing was taken on
  its behalf, so nothing can be lost. A coroutine whose loop is closed with
  it pending counts itself out when it is collected.
- The FIFO goes when the process lets go of its registry entry, and with
  the pool (``_segment.unlink``); one left by a killed process is replaced
  by the next process in that entry.

How the other waits go: in a thread
-----------------------------------
``get_async`` and ``put_async`` (and an ``alloc_async`` whose loop cannot
have the FIFO) first make the non-blocking attempt in the event loop's
thread, then wait in a thread (kept a while for the next wait), in the
blocking form, in slices: the thread sleeps on the wait channel like any
sleeping caller (the GIL released) and comes back between slices to see
whether the coroutine still wants it. The thread hands its result over
with ``call_soon_threadsafe``, as the last thing it does before it blocks
again: the loop's thread, which that wakes, would otherwise wait for the GIL
while the waiting thread finished its bookkeeping.

Cancellation of a wait in a thread: the element never gets lost.

- ``alloc_async``: CancelledError at once. If the thread got an element
  after all (it was under way when the cancellation came), it frees it.
- ``get_async``: CancelledError at once. If the thread got an element
  after all, it puts it back into the queue: at the tail, since nothing can
  put an element back at the head, so elements put in the meantime come
  out before it (it waits for room if the queue filled up meanwhile).
- ``put_async``: a put cannot be taken back, so the coroutine waits for the
  attempt under way to end (one slice at most): CancelledError if the
  element was not put (it is still the caller's); if it was, the call
  returns normally, the cancellation dropped, as ``asyncio.wait_for``
  returns a result that arrived as it timed out. Either way the caller
  knows whose the element is.

Costs
-----
The counters see a waiting ``alloc_async`` as what it does: its
non-blocking attempt is a failed allocation, each registration a sleep. A
wait in a thread holds the thread, and each of its slices counts as a sleep
and a timed-out allocation (``ALLOC_SLICE_SECONDS`` is long for that
reason); a queue's slices leave no trace.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue as _stdqueue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _segment
from ._core import retry as _retry
from ._core import seconds as _seconds
from .gfp import __GFP_WAIT, may_sleep

if TYPE_CHECKING:
    from ._attach import Membership
    from .queues import Queue
    from .topics import Subscription

#: How long a waiting alloc_async's thread sleeps per slice: it stops within
#: this after a cancellation, and each slice counts as a sleep and a failed
#: (timed-out) allocation in the pool's counters.
ALLOC_SLICE_SECONDS = 0.25
#: How soon an alloc_async whose attempt found the pool lock busy (held by a
#: live process for 50 ms) tries again, without blocking the loop meanwhile.
LOCK_BUSY_RETRY_SECONDS = 0.005
#: The same for get_async and put_async, whose slices leave no trace: a
#: cancelled put_async waits at most this long to know whether its put
#: happened.
QUEUE_SLICE_SECONDS = 0.05
#: How long a thread that waited stays for the next wait before it exits.
IDLE_THREAD_SECONDS = 30.0

_NOTHING: Any = object()
_monotonic = time.monotonic


class _Threads:
    """Daemon threads for the waits, kept a while when idle: a wait does not
    pay for starting a thread, and a thread that has handed its result to
    the loop goes back to sleep at once instead of exiting (the loop's
    thread, just woken, would wait for the GIL through the exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_stdqueue.SimpleQueue[Callable[[], Callable[[], None]]]] = []

    def run(self, job: Callable[[], Callable[[], None]]) -> None:
        """Run ``job`` (which must not raise) in an idle thread, or a new one;
        what it returns (which must not raise either) is called last, once
        the thread counts as idle again, so that the loop's thread, which it
        wakes, finds the GIL about to be free."""
        with self._lock:
            if self._idle:
                self._idle.pop().put(job)
                return
        inbox: _stdqueue.SimpleQueue[Callable[[], Callable[[], None]]] = _stdqueue.SimpleQueue()
        inbox.put(job)
        threading.Thread(target=self._serve, args=(inbox,), name="shmpool waits", daemon=True).start()

    def _serve(self, inbox: _stdqueue.SimpleQueue[Callable[[], Callable[[], None]]]) -> None:
        while True:
            try:
                job = inbox.get(timeout=IDLE_THREAD_SECONDS)
            except _stdqueue.Empty:
                with self._lock:
                    if any(box is inbox for box in self._idle):
                        self._idle[:] = [box for box in self._idle if box is not inbox]
                        return
                continue  # a job was given to us as we timed out
            last = job()
            del job
            with self._lock:
                self._idle.append(inbox)
            last()  # wakes the loop: nothing but the next get after it
            del last


_threads = _Threads()


def _after_fork_in_child() -> None:
    global _threads
    _threads = _Threads()  # the parent's threads are not ours


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Waiter:
    """One coroutine's wait, in one of the waiting threads.

    ``attempt(seconds)`` is the blocking call, bounded by ``seconds``: it
    returns what it moved or ``_NOTHING``. ``undo`` (None for a put) hands
    back what an attempt moved when nobody wants it any more; ``undo_now``
    does it from the loop's thread without blocking.
    """

    def __init__(
        self,
        attempt: Callable[[float], Any],
        deadline: float | None,
        slice_seconds: float,
        undo: Callable[[Any], None] | None,
        undo_now: Callable[[Any], None] | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._attempt = attempt
        self._deadline = deadline
        self._slice = slice_seconds
        self._undo = undo
        self._undo_now = undo_now
        self._lock = threading.Lock()
        self._stop = False  # the coroutine no longer wants anything (under _lock)
        self._moved: Any = _NOTHING  # what the thread hands over (under _lock)
        self._error: BaseException | None = None
        self._finished = False  # the thread is done (set in the loop's thread)
        self._wake: asyncio.Future[None] = self._loop.create_future()

    # -- in the thread

    def _run(self) -> Callable[[], None]:
        moved, error = _NOTHING, None
        try:
            while not self._stop:
                seconds = self._slice
                if self._deadline is not None:
                    left = self._deadline - _monotonic()
                    if left <= 0:
                        break
                    seconds = min(seconds, left)
                moved = self._attempt(seconds)
                if moved is not _NOTHING:
                    break
        except BaseException as exc:  # the pool's errors go to the coroutine
            error = exc
        with self._lock:
            orphan = self._stop and moved is not _NOTHING and self._undo is not None
            if not orphan:
                self._moved, self._error = moved, error
        if orphan:  # cancelled while this attempt was under way
            self._undo(moved)  # type: ignore[misc]
        return self._hand_over

    def _hand_over(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._finish)
        except RuntimeError:  # the loop is closed: nobody will take it
            with self._lock:
                moved, self._moved = self._moved, _NOTHING
            if moved is not _NOTHING and self._undo is not None:
                self._undo(moved)

    # -- in the loop's thread

    def _finish(self) -> None:
        self._finished = True
        if not self._wake.done():
            self._wake.set_result(None)

    def _give_up(self) -> Any:
        """Tell the thread to stop. What it has handed over already is
        undone (alloc, get), or returned (put: nothing undoes a put)."""
        with self._lock:
            self._stop = True
            moved, self._moved = self._moved, _NOTHING
        if moved is not _NOTHING and self._undo_now is not None:
            self._undo_now(moved)
            return _NOTHING
        return moved

    async def wait(self) -> Any:
        """What the thread moved, or _NOTHING when the deadline passed;
        raises what it raised."""
        _threads.run(self._run)
        try:
            await self._wake
        except asyncio.CancelledError:
            moved = self._give_up()
            if self._undo_now is not None:
                raise
            # Nothing can undo a put: wait for the attempt under way.
            while not self._finished:
                self._wake = self._loop.create_future()
                try:
                    await self._wake
                except asyncio.CancelledError:
                    pass
            if moved is _NOTHING:
                moved = self._moved
            if moved is _NOTHING:
                raise
            return moved  # it happened: the cancellation came too late
        except BaseException:  # the coroutine closed unfinished (GeneratorExit): nobody will take it
            self._give_up()
            raise
        if self._error is not None:
            raise self._error
        return self._moved


def _slices(call: Callable[[float], Any], nothing: type[BaseException]) -> Callable[[float], Any]:
    """A _Waiter's attempt from a blocking call bounded by its argument in
    seconds, which raises ``nothing`` when that passes."""

    def attempt(seconds: float) -> Any:
        try:
            return call(seconds)
        except nothing:
            return _NOTHING

    return attempt


async def _wait(
    start: float,
    seconds: float | None,
    attempt: Callable[[float], Any],
    slice_seconds: float,
    undo: Callable[[Any], None] | None = None,
    undo_now: Callable[[Any], None] | None = None,
) -> Any:
    """What the attempts moved, waiting in a thread, or _NOTHING once
    ``seconds`` from ``start`` have passed."""
    deadline = None if seconds is None else start + seconds
    if deadline is not None and deadline <= _monotonic():
        return _NOTHING
    return await _Waiter(attempt, deadline, slice_seconds, undo, undo_now).wait()


def _free_quietly(member: Membership, handle: int) -> None:
    try:
        member.core.free(handle)
    except Exception:  # the pool closed or destroyed meanwhile: nothing to give back to
        pass


# ----------------------------------------------------------------------
# alloc_async: woken in the event loop itself


class _Fifo:
    """This process's asyncio wait channel for one pool: the FIFO of its
    registry entry (``_segment.fifo_prefix``), watched by one event loop
    (the first that waits, until it closes; other loops of the process wait
    in threads meanwhile). A free that refills the reserve writes a byte into
    the FIFO of every process with async sleepers (``_core/wake.c``,
    poke_async): the loop wakes every coroutine waiting on the pool, as the
    kernel's ``wake_up`` wakes every sleeper, and each tries again. The
    reader stays registered while the loop has the FIFO: adding and removing
    it around every wait cost more than the rest of a wake-up."""

    __slots__ = ("fd", "path", "loop", "waiters")

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self.loop: asyncio.AbstractEventLoop | None = None
        # Weak: a coroutine left pending by a closed loop must stay
        # collectable (its finally counts it out).
        self.waiters: weakref.WeakSet[asyncio.Future[None]] = weakref.WeakSet()

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.waiters.clear()
        loop.add_reader(self.fd, self._ready)
        self.loop = loop

    def _ready(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:  # drained
            pass
        for fut in list(self.waiters):
            _wake(fut)

    def close(self) -> None:
        """In the loop's thread if it still runs (its selector holds the
        descriptor), else here."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            if asyncio._get_running_loop() is not loop:
                try:
                    loop.call_soon_threadsafe(self.close)
                    return
                except RuntimeError:  # closed meanwhile
                    pass
            else:
                loop.remove_reader(self.fd)
        self.loop = None
        try:
            os.close(self.fd)
        except OSError:
            pass


_fifos: dict[tuple[tuple[int, int], int], _Fifo] = {}
_fifo_lock = threading.Lock()


def _fifo_for(member: Membership, loop: asyncio.AbstractEventLoop) -> _Fifo | None:
    """The pool's wait channel in ``loop``, made on first use; None if
    another loop of this process has it (or no FIFO can be made): that wait
    goes to a thread instead."""
    entry = member.core.entry
    if entry < 0:
        return None
    key = (member.key, entry)
    with _fifo_lock:
        fifo = _fifos.get(key)
        if fifo is None:
            path = _segment.fifo_prefix(member.name) + str(entry)
            try:
                fd = _segment.make_fifo(path, os.fstat(member.seg_fd).st_mode)
            except OSError:
                return None
            fifo = _fifos[key] = _Fifo(fd, path)
            member.on_detach(functools.partial(drop_fifos, member.key))
        if fifo.loop is not loop:
            if fifo.loop is not None and not fifo.loop.is_closed():
                return None
            fifo.watch(loop)
        return fifo


def drop_fifos(key: tuple[int, int]) -> None:
    """The process let go of its registry entry of pool ``key``: its FIFO
    goes (nothing waits on it: a waiting coroutine keeps its pool open)."""
    with _fifo_lock:
        for k in [k for k in _fifos if k[0] == key]:
            fifo = _fifos.pop(k)
            try:
                os.unlink(fifo.path)
            except OSError:
                pass
            fifo.close()


def _forget_fifos_in_child() -> None:
    global _fifo_lock
    _fifo_lock = threading.Lock()
    for fifo in _fifos.values():  # the parent's: closed here, left in place for it
        try:
            os.close(fifo.fd)
        except OSError:
            pass
    _fifos.clear()


os.register_at_fork(after_in_child=_forget_fifos_in_child)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def alloc(member: Membership, gfp: int, timeout: float | None) -> int | None:
    core = member.core
    sleeps = may_sleep(gfp)
    seconds = _seconds(timeout)
    start = _monotonic()
    nowait = int(gfp) & ~int(__GFP_WAIT)
    h = core.alloc(nowait) if sleeps else core.alloc(gfp)
    if h is not None or not sleeps:
        return h  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    fifo = _fifo_for(member, loop)
    if fifo is None:
        return await _alloc_in_thread(member, gfp, timeout, start, seconds)
    deadline = None if seconds is None else start + seconds
    asleep: list[float] = []  # when it first registered: its sleep goes into the pool's sleep totals
    try:
        return await _alloc_async_loop(member, core, loop, fifo, nowait, deadline, timeout, asleep)
    finally:
        if asleep:
            core.note_sleep(_monotonic() - asleep[0])


async def _alloc_async_loop(member: Membership, core: Any, loop: asyncio.AbstractEventLoop, fifo: _Fifo, nowait: int,
                            deadline: float | None, timeout: float | None, asleep: list[float]) -> int | None:
    reported = False
    while True:
        got = core.alloc_async_try()  # the handle; None: counted in as an async sleeper; False: lock busy
        if type(got) is int:
            return got
        long_sleep = core.long_sleep
        if got is None and not asleep:
            asleep.append(_monotonic())
        elif asleep and not reported and long_sleep is not None and _monotonic() - asleep[0] >= long_sleep:
            reported = True
            core.report_long_sleep(_monotonic() - asleep[0])
        # Listening only now is no race: a byte written since the attempt
        # waits in the FIFO until this loop runs its callbacks, after the await.
        fut = loop.create_future()
        fifo.waiters.add(fut)
        wait = _retry()[0] / 1e9 if got is None else LOCK_BUSY_RETRY_SECONDS
        if asleep and not reported and long_sleep is not None:  # wake to say it (the logger)
            wait = max(0.0, min(wait, asleep[0] + long_sleep - _monotonic()))
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - _monotonic()))
        timer = loop.call_later(wait, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            fifo.waiters.discard(fut)
            if got is None:
                core.async_done()
        if deadline is not None and _monotonic() >= deadline:
            h = core.alloc(nowait)  # a last attempt that does not sleep
            if h is not None:
                return h  # type: ignore[no-any-return]
            raise TimeoutError(f"pool {member.name!r}: no element within {timeout} s")


async def _alloc_in_thread(
    member: Membership, gfp: int, timeout: float | None, start: float, seconds: float | None
) -> int:
    """alloc_async's wait when its loop cannot have the FIFO (another loop
    of this process waits on it): a sleeping alloc in a thread, in slices."""
    free = lambda h: _free_quietly(member, h)  # noqa: E731
    attempt = _slices(lambda s: member.core.alloc(gfp, timeout=s), TimeoutError)
    h = await _wait(start, seconds, attempt, ALLOC_SLICE_SECONDS, free, free)
    if h is _NOTHING:
        raise TimeoutError(f"pool {member.name!r}: no element within {timeout} s")
    return h  # type: ignore[no-any-return]


def _requeue(q: Queue, handle: int) -> None:
    """Put back an element that a cancelled get took (from a thread: waits
    for room if need be)."""
    try:
        q.put(handle)
    except Exception:  # the pool closed or destroyed meanwhile
        pass


def _requeue_now(q: Queue, handle: int) -> None:
    """The same from the loop's thread: at once if there is room, else from
    a thread of its own."""
    try:
        q.put_nowait(handle)
        return
    except _stdqueue.Full:
        pass
    except Exception:  # the pool closed or destroyed meanwhile
        return
    threading.Thread(target=_requeue, args=(q, handle), name="shmpool requeue", daemon=True).start()


async def get(q: Queue, timeout: float | None) -> int:
    return await _take(q.get, timeout, lambda h: _requeue(q, h), lambda h: _requeue_now(q, h))


async def _take(get: Callable[[bool, float | None], int], timeout: float | None,
                undo: Callable[[Any], None], undo_now: Callable[[Any], None]) -> int:
    """A queue's or a subscription's get for asyncio: a non-blocking get
    (it waits for the lock at most the atomic bound, as GFP_ATOMIC), then
    blocking ones in a thread, a slice at a time; ``undo`` (``undo_now`` in
    the loop's thread) what a thread took after a cancellation."""
    seconds = _seconds(timeout)
    start = _monotonic()
    try:
        return get(False, None)
    except _stdqueue.Empty:
        pass
    h = await _wait(start, seconds, _slices(lambda s: get(True, s), _stdqueue.Empty), QUEUE_SLICE_SECONDS, undo,
                    undo_now)
    if h is _NOTHING:
        raise _stdqueue.Empty
    return h  # type: ignore[no-any-return]


async def put(q: Queue, handle: int, timeout: float | None) -> None:
    seconds = _seconds(timeout)
    start = _monotonic()
    try:
        q.put_nowait(handle)
        return
    except _stdqueue.Full:
        pass

    def put_one(slice_seconds: float) -> bool:
        q.put(handle, True, slice_seconds)
        return True

    # No undo: a put that happened stays (the caller learns of it).
    if await _wait(start, seconds, _slices(put_one, _stdqueue.Full), QUEUE_SLICE_SECONDS) is _NOTHING:
        raise _stdqueue.Full


def _release_quietly(sub: Subscription, handle: int) -> None:
    try:
        sub.release(handle)
    except Exception:  # the subscription or pool closed meanwhile: released with it
        pass


async def receive(sub: Subscription, timeout: float | None) -> int:
    """A subscription's get for asyncio, as ``get``; an element its thread
    received after a cancellation is released (the subscription misses it:
    it cannot be pending again)."""
    return await _take(sub.get, timeout, lambda h: _release_quietly(sub, h), lambda h: _release_quietly(sub, h))
