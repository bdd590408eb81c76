"""Named queues of elements inside a pool: handing an element to another
process moves its ownership.

Why queues live in the pool
---------------------------
A handle passed through a pipe or a ``multiprocessing.Queue`` is still its
sender's element while it is in flight: if the sender dies, ``reclaim_dead``
takes the element back and the receiver gets a stale handle. A queue of the
pool holds the element itself: ``put`` moves it from the caller to the queue
and ``get`` from the queue to the caller, each in one critical section of
the core (``_core/queue.c``) whose commit is the element's slot word (HELD
by the sender -> QUEUED by the queue -> HELD by the receiver). So:

- an element in a queue belongs to nobody but the queue: ``reclaim_dead``
  never takes it, and a sender that dies after ``put`` loses nothing;
- a receiver that dies after ``get`` holds it, and it is reclaimed as usual;
- a process killed inside ``put`` or ``get`` leaves the element in the queue
  or with that process, never both and never neither.

Each queue is a FIFO with a depth fixed when it is created; up to
``MAX_QUEUES`` queues per pool, named by up to 47 bytes of UTF-8. Many
producers and many consumers may use one queue. A blocked ``put`` sleeps on
the queue's putters' channel, a blocked ``get`` on its getters' (each a
futex word of the segment), registered in the critical section that found
the queue full (empty), woken after the lock is released by the ``get``
(``put``) that changes that. A ``put`` wakes one getter per element it
adds. A full queue's putters are woken once a batch is free (a quarter of
the depth, at most 64, or what a sleeping ``put_many`` needs), not at every
``get``: a producer that outruns its consumers then sleeps once a batch
instead of once a message (the wake-up convoy); a putter left below that
mark looks again after a nap of a millisecond, doubling. Before it sleeps,
a blocked call polls the queue for a few microseconds, as long as that has
been paying off for it (``_core/queue.c``, ``queue_spin``). A non-blocking
call waits for the pool lock at most ``ATOMIC_LOCK_WAIT_SECONDS`` and then
says the queue is full (empty).

The interface is ``multiprocessing.Queue``'s, with the standard library's
``queue.Full`` and ``queue.Empty``.
"""

from __future__ import annotations

import queue as _stdqueue
from typing import TYPE_CHECKING, Any

from . import _aio
from ._errors import PoolClosedError
from ._typing import Handles

if TYPE_CHECKING:
    from ._attach import Membership

__all__ = ["Queue"]


class Queue:
    """A FIFO of elements of one pool, shared by every process that opens it
    by name (``pool.queue(name)``). Make one with :meth:`Mempool.queue`.

    ``put`` hands the caller's element to the queue, ``get`` hands the
    queue's oldest element to the caller: the handle is the same, only its
    holder changes. Handles that are invalid, stale or not held by the
    calling process are refused with the pool's errors, changing nothing.
    """

    __slots__ = ("_member", "_core", "_port", "_name", "_depth", "_index", "_used", "_unused_index", "__dict__")

    def __init__(self, member: Membership, name: str, index: int, depth: int) -> None:
        self._member = member
        self._core = member.core
        self._name = name
        self._depth = depth
        self._index = index
        self._used = False  # moved elements through the methods below (see close)
        self._unused_index = -1
        # The idiom's per-message calls: the core's, bound to this queue,
        # found before the documented ones below (as Mempool binds alloc).
        self._port = port = self._core.port(index, name)
        self.__dict__.update(put=port.put, get=port.get)

    @property
    def name(self) -> str:
        """The queue's name in its pool."""
        return self._name

    @property
    def depth(self) -> int:
        """How many elements the queue holds at most."""
        return self._depth

    def _q(self) -> int:
        if self._index < 0:
            raise PoolClosedError(f"queue {self.name!r} is closed in this object; open it again with pool.queue()")
        return self._index

    def _count(self) -> int:
        """qsize(), with multiprocessing.Queue's error once closed: OSError
        (unless it was closed before it was used, as multiprocessing's)."""
        try:
            q = self._unused_index if self._index < 0 <= self._unused_index else self._q()
            return self._core.queue_count(q)  # type: ignore[no-any-return]
        except PoolClosedError as exc:
            raise OSError(f"queue {self.name!r} is closed ({exc})") from None

    def put(self, handle: int, block: bool = True, timeout: float | None = None) -> None:
        """Hand element ``handle`` (held by this process) to the queue; it no
        longer belongs to the caller. Blocks while the queue is full (up to
        ``timeout`` seconds): queue.Full if it stays full, or at once if not
        ``block``. (The core's port runs it: this body only through the class.)"""
        self._port.put(handle, block, timeout)

    def put_nowait(self, handle: int) -> None:
        """put(handle, block=False): queue.Full at once when full."""
        self.put(handle, False)

    def put_many(self, handles: Any, block: bool = True, timeout: float | None = None) -> None:
        """Hand many elements to the queue, all or nothing: blocks until there
        is room for all of them (queue.Full after ``timeout``, or at once if
        not ``block``). More handles than the depth: ValueError."""
        self._used = True
        if not self._core.put_many(self._q(), handles, block, timeout):
            raise _stdqueue.Full

    def get(self, block: bool = True, timeout: float | None = None) -> int:
        """Take the oldest element: the caller is now its holder. Blocks
        while the queue is empty (up to ``timeout`` seconds): queue.Empty if
        it stays empty, or at once if not ``block``. (The core's port runs it:
        this body only through the class.)"""
        return self._port.get(block, timeout)  # type: ignore[no-any-return]

    def get_nowait(self) -> int:
        """get(block=False): queue.Empty at once when empty."""
        return self.get(False)

    def get_many(self, max_n: int, block: bool = True, timeout: float | None = None) -> Handles:
        """Take 1 to ``max_n`` of the oldest elements at once (an int64 array
        of handles, oldest first); blocks like get() until there is at least
        one."""
        self._used = True
        handles = self._core.get_many(self._q(), max_n, block, timeout)
        if handles is None:
            raise _stdqueue.Empty
        return handles  # type: ignore[no-any-return]

    async def get_async(self, timeout: float | None = None) -> int:
        """get() for asyncio: ``h = await q.get_async(timeout=None)``.

        Never blocks the event loop: a non-blocking get first, then, if the
        queue is empty, a blocking one in a thread (queue.Empty after
        ``timeout`` seconds). Cancelled, it raises CancelledError at once;
        an element its thread took meanwhile is put back into the queue, at
        the tail (see ``shmpool._aio``), never lost.
        """
        return await _aio.get(self, timeout)

    async def put_async(self, handle: int, timeout: float | None = None) -> None:
        """put() for asyncio: ``await q.put_async(h, timeout=None)``.

        Never blocks the event loop: a non-blocking put first, then, if the
        queue is full, a blocking one in a thread (queue.Full after
        ``timeout`` seconds). Cancelled, it raises CancelledError if the
        element was not put (it is still the caller's); a put that happened
        before the cancellation could stop it returns normally.
        """
        await _aio.put(self, handle, timeout)

    def qsize(self) -> int:
        """How many elements the queue holds now. On a closed queue (or
        pool) object, OSError, as multiprocessing.Queue's once closed;
        put and get raise PoolClosedError, a ValueError, as its do."""
        return self._count()

    def __len__(self) -> int:
        return self.qsize()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self.depth

    def close(self) -> None:
        """Let go of this handle on the queue (the queue and its elements
        stay in the pool). Further calls raise PoolClosedError (put, get)
        or OSError (qsize, empty, full), as multiprocessing.Queue's do; as
        there, qsize, empty and full still answer on an object closed before
        it moved any element."""
        if not (self._used or self._port.used) and self._index >= 0:
            self._unused_index = self._index
        self._index = -1
        self._port.close()

    def join_thread(self) -> None:
        """Nothing to do: multiprocessing.Queue's, kept so that shutdown
        code written for it runs unchanged. There is no feeder thread: a
        put has moved its element into the queue before it returns."""

    def cancel_join_thread(self) -> None:
        """Nothing to do (see join_thread): no put is ever left in a
        buffer of this process, so none can be lost or waited for."""

    def __repr__(self) -> str:
        return f"<shmpool Queue {self.name!r} of pool {self._member.name!r}, depth {self.depth}>"
