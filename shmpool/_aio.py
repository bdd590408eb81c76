"""The awaitable twins of the calls that may wait: ``pool.alloc_async``,
``q.get_async`` and ``q.put_async``.

How they wait
-------------
Each first makes the non-blocking attempt in the event loop's thread: the
allocation with ``__GFP_WAIT`` cleared (the lock-free cache, else one
critical section), ``get`` or ``put`` without blocking (one critical
section); the wait for the pool lock is bounded at 50 ms, as a
``GFP_ATOMIC`` allocation's is. Only when that finds nothing does the call
wait, in a thread (kept a while for the next wait), in the blocking form, in
slices: the thread sleeps on the pool's wait channel like any sleeping
caller (the GIL released, woken by the free, put or get that it waits for)
and comes back between slices to see whether the coroutine still wants it.
The event loop is never blocked; the thread hands its result over with
``call_soon_threadsafe``, as the last thing it does before it blocks again:
the loop's thread, which that wakes, would otherwise wait for the GIL while
the waiting thread finished its bookkeeping (that ordering took the
wake-up from 2.0x to 1.4-1.5x the threaded alloc's, ``tools/bench.py
asyncwake``).

Cancellation
------------
A coroutine that is cancelled (``asyncio.wait_for``'s timeout, a task's
``cancel()``) tells its thread to stop; the element never gets lost:

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
A waiting call holds a thread. The pool's counters see a waiting
``alloc_async`` as what it does: its non-blocking attempt is a failed
allocation, and each slice a sleeping allocation that timed out (one more
``sleeps`` and ``alloc_failed`` per slice: ``ALLOC_SLICE_SECONDS`` is long
for that reason); a queue's slices leave no trace.
"""

from __future__ import annotations

import asyncio
import os
import queue as _stdqueue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .gfp import __GFP_WAIT, may_sleep

if TYPE_CHECKING:
    from .pool import Mempool
    from .queues import Queue

#: How long a waiting alloc_async's thread sleeps per slice: it stops within
#: this after a cancellation, and each slice counts as a sleep and a failed
#: (timed-out) allocation in the pool's counters.
ALLOC_SLICE_SECONDS = 0.25
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


def _free_quietly(pool: Mempool, handle: int) -> None:
    try:
        pool.free(handle)
    except Exception:  # the pool closed or destroyed meanwhile: nothing to give back to
        pass


async def alloc(pool: Mempool, gfp: int, timeout: float | None) -> int | None:
    sleeps = may_sleep(gfp)
    seconds = None if timeout is None else pool._check_timeout(timeout)
    start = _monotonic()
    h = pool.alloc(int(gfp) & ~int(__GFP_WAIT)) if sleeps else pool.alloc(gfp)
    if h is not None or not sleeps:
        return h
    free = lambda h: _free_quietly(pool, h)  # noqa: E731
    h = await _wait(start, seconds, _slices(lambda s: pool.alloc(gfp, timeout=s), TimeoutError), ALLOC_SLICE_SECONDS, free, free)
    if h is _NOTHING:
        raise TimeoutError(f"pool {pool.name!r}: no element within {timeout} s")
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
        if q._put_now(handle):
            return
    except Exception:  # the pool closed or destroyed meanwhile
        return
    threading.Thread(target=_requeue, args=(q, handle), name="shmpool requeue", daemon=True).start()


async def get(q: Queue, timeout: float | None) -> int:
    seconds = q._seconds(timeout)
    start = _monotonic()
    h = q._get_now()
    if h is not None:
        return h
    h = await _wait(
        start, seconds, _slices(lambda s: q.get(True, s), _stdqueue.Empty), QUEUE_SLICE_SECONDS,
        lambda h: _requeue(q, h), lambda h: _requeue_now(q, h),
    )
    if h is _NOTHING:
        raise _stdqueue.Empty
    return h  # type: ignore[no-any-return]


async def put(q: Queue, handle: int, timeout: float | None) -> None:
    seconds = q._seconds(timeout)
    start = _monotonic()
    if q._put_now(handle):
        return

    def put_one(slice_seconds: float) -> bool:
        q.put(handle, True, slice_seconds)
        return True

    # No undo: a put that happened stays (the caller learns of it).
    if await _wait(start, seconds, _slices(put_one, _stdqueue.Full), QUEUE_SLICE_SECONDS) is _NOTHING:
        raise _stdqueue.Full
