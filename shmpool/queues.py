"""Named queues of elements inside a pool: handing an element to another
process moves its ownership.

Why queues live in the pool
---------------------------
A handle passed through a pipe or a ``multiprocessing.Queue`` is still its
sender's element while it is in flight: if the sender dies, ``reclaim_dead``
takes the element back and the receiver gets a stale handle. A queue of the
pool holds the element itself: ``put`` moves it from the caller to the queue
and ``get`` from the queue to the caller, each in one critical section of
``_fast.c`` whose commit is the element's slot word (HELD by the sender ->
QUEUED by the queue -> HELD by the receiver). So:

- an element in a queue belongs to nobody but the queue: ``reclaim_dead``
  never takes it, and a sender that dies after ``put`` loses nothing;
- a receiver that dies after ``get`` holds it, and it is reclaimed as usual;
- a process killed inside ``put`` or ``get`` leaves the element in the queue
  or with that process, never both and never neither (the repair rebuilds
  the queue from the slot words).

Each queue is a FIFO linked through the pool's per-slot ``next`` links (an
element is in one queue at most), with a depth fixed when it is created; up
to ``MAX_QUEUES`` queues per pool, named by up to 47 bytes of UTF-8. Many
producers and many consumers may use one queue. Blocking ``put`` and
``get`` sleep on the pool's wait channel like a sleeping alloc: registered
in the critical section that found the queue full (or empty), woken after
the lock is released by the ``get`` (or ``put``) that changes that; a
signal handler's exception or the timeout ends the wait with nothing
moved and nothing leaked.

The interface is ``multiprocessing.Queue``'s, with the standard library's
``queue.Full`` and ``queue.Empty``.
"""

from __future__ import annotations

import math
import queue as _stdqueue
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _aio
from ._errors import PoolClosedError
from ._layout import HGEN_SHIFT, QUEUE_NAME_BYTES

if TYPE_CHECKING:
    from .pool import Mempool

__all__ = ["Queue"]

_PUT, _GET = 0, 1
#: A blocked put or get re-checks its queue at least this often even if
#: nothing wakes it (a waker that died between its move and its wake-up).
RETRY_SECONDS = 1.0
_RETRY_NS = int(RETRY_SECONDS * 1_000_000_000)
#: How long get_async and put_async, in the event loop's thread, wait for
#: the pool lock (held by a live process) before they wait in a thread
#: instead (GFP_ATOMIC's ATOMIC_LOCK_WAIT_SECONDS).
NOWAIT_LOCK_SECONDS = 0.05
_NS = 1_000_000_000


def _timeout_ns(block: bool, timeout: object) -> int:
    if not block or timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    seconds = float(timeout)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    return min(int(seconds * _NS), 1 << 62)


def check_queue_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a queue name is a str, not {type(name).__name__}")
    raw = name.encode()
    if not 1 <= len(raw) < QUEUE_NAME_BYTES or "\0" in name:
        raise ValueError(f"a queue name is 1 to {QUEUE_NAME_BYTES - 1} bytes of UTF-8 without NUL, not {name!r}")
    return raw


class Queue:
    """A FIFO of elements of one pool, shared by every process that opens it
    by name (``pool.queue(name)``). Make one with :meth:`Mempool.queue`.

    ``put`` hands the caller's element to the queue, ``get`` hands the
    queue's oldest element to the caller: the handle is the same, only its
    holder changes. Handles that are invalid, stale or not held by the
    calling process are refused with the pool's errors, changing nothing.
    """

    __slots__ = ("_pool", "_name", "_depth", "_index")

    def __init__(self, pool: Mempool, name: str, index: int, depth: int) -> None:
        self._pool = pool
        self._name = name
        self._depth = depth
        self._index = index

    @property
    def name(self) -> str:
        """The queue's name in its pool."""
        return self._name

    @property
    def depth(self) -> int:
        """How many elements the queue holds at most."""
        return self._depth

    def _move(self, kind: int, buf: np.ndarray, n: int, block: bool, timeout: object) -> int:
        if self._index < 0:
            raise self._closed()
        ns = _timeout_ns(block, timeout)
        return self._pool._fast._queue_move(kind, self._index, buf, n, bool(block), ns, _RETRY_NS)

    def put(self, handle: int, block: bool = True, timeout: float | None = None) -> None:
        """Hand element ``handle`` (held by this process) to the queue; it
        no longer belongs to the caller. Blocks while the queue is full (up
        to ``timeout`` seconds): queue.Full if it stays full, or at once if
        not ``block``."""
        if self._index < 0:
            raise self._closed()
        ns = _timeout_ns(block, timeout)
        moved = self._pool._fast._qput(self._index, block, ns, _RETRY_NS, handle)  # one C call
        if moved < 0:  # not a plain int of this pool: a numpy integer, or the error that says why
            idx, gen = self._pool._decode(handle)
            moved = self._pool._fast._qput(self._index, block, ns, _RETRY_NS, idx | gen << HGEN_SHIFT)
        if moved == 0:
            raise _stdqueue.Full

    def put_nowait(self, handle: int) -> None:
        """put(handle, block=False): queue.Full at once when full."""
        self.put(handle, False)

    def put_many(self, handles: Any, block: bool = True, timeout: float | None = None) -> None:
        """Hand many elements to the queue, all or nothing: blocks until
        there is room for all of them (queue.Full after ``timeout``, or at
        once if not ``block``). More handles than the depth: ValueError."""
        arr = self._pool._check_handles(handles)
        if arr.size == 0:
            return
        if arr.size > self.depth:
            raise ValueError(f"{arr.size} elements can never fit queue {self.name!r} of depth {self.depth}")
        if not self._move(_PUT, arr, arr.size, block, timeout):
            raise _stdqueue.Full

    def get(self, block: bool = True, timeout: float | None = None) -> int:
        """Take the oldest element: the caller is now its holder. Blocks
        while the queue is empty (up to ``timeout`` seconds): queue.Empty if
        it stays empty, or at once if not ``block``."""
        if self._index < 0:
            raise self._closed()
        ns = _timeout_ns(block, timeout)
        handle = self._pool._fast._qget(self._index, block, ns, _RETRY_NS)  # one C call
        if handle is None:
            raise _stdqueue.Empty
        return handle

    def get_nowait(self) -> int:
        """get(block=False): queue.Empty at once when empty."""
        return self.get(False)

    def get_many(self, max_n: int, block: bool = True, timeout: float | None = None) -> np.ndarray:
        """Take 1 to ``max_n`` of the oldest elements at once (a numpy int64
        array of handles, oldest first); blocks like get() until there is
        at least one."""
        if isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)):
            raise TypeError(f"max_n must be an int, not {type(max_n).__name__}")
        if max_n < 1:
            raise ValueError(f"max_n must be at least 1, not {max_n}")
        out = np.empty(min(int(max_n), self.depth), dtype=np.int64)
        got = self._move(_GET, out, out.size, block, timeout)
        if not got:
            raise _stdqueue.Empty
        return out if got == out.size else out[:got]

    async def get_async(self, timeout: float | None = None) -> int:
        """get() for asyncio: ``h = await q.get_async(timeout=None)``.

        Never blocks the event loop: a non-blocking get first, then, if the
        queue is empty, a blocking one in a thread of its own, woken as
        promptly as get() (queue.Empty after ``timeout`` seconds).
        Cancelled (``asyncio.wait_for``'s timeout included), it raises
        CancelledError at once; an element its thread took meanwhile is put
        back into the queue, at the tail (see ``shmpool._aio``), never lost.
        """
        return await _aio.get(self, timeout)

    async def put_async(self, handle: int, timeout: float | None = None) -> None:
        """put() for asyncio: ``await q.put_async(h, timeout=None)``.

        Never blocks the event loop: a non-blocking put first, then, if the
        queue is full, a blocking one in a thread of its own (queue.Full
        after ``timeout`` seconds). Cancelled, it raises CancelledError if
        the element was not put (it is still the caller's); a put that
        happened before the cancellation could stop it (it waits up to
        ``shmpool._aio.QUEUE_SLICE_SECONDS`` to know) returns normally, the
        element the queue's.
        """
        await _aio.put(self, handle, timeout)

    def _put_now(self, handle: int) -> bool:
        """put_nowait for the event loop's thread: False if full, or if the
        pool lock did not come within NOWAIT_LOCK_SECONDS."""
        idx, gen = self._pool._decode(handle)
        one = np.empty(1, dtype=np.int64)
        one[0] = idx | gen << HGEN_SHIFT
        return bool(self._move_now(_PUT, one))

    def _get_now(self) -> int | None:
        """get_nowait for the event loop's thread: None if empty, or if the
        pool lock did not come within NOWAIT_LOCK_SECONDS."""
        one = np.empty(1, dtype=np.int64)
        return int(one[0]) if self._move_now(_GET, one) else None

    def _move_now(self, kind: int, one: np.ndarray) -> int:
        if self._index < 0:
            raise self._closed()
        lock_ns = int(NOWAIT_LOCK_SECONDS * _NS)
        return int(self._pool._fast._queue_move(kind, self._index, one, 1, False, lock_ns, _RETRY_NS))

    @staticmethod
    def _seconds(timeout: object) -> float | None:
        ns = _timeout_ns(True, timeout)
        return None if ns < 0 else ns / _NS

    def qsize(self) -> int:
        """How many elements the queue holds now."""
        if self._index < 0:
            raise self._closed()
        return self._pool._fast._queue_count(self._index)

    def __len__(self) -> int:
        return self.qsize()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self.depth

    def close(self) -> None:
        """Let go of this handle on the queue (the queue and its elements
        stay in the pool). Further calls raise PoolClosedError."""
        self._index = -1

    def _closed(self) -> PoolClosedError:
        return PoolClosedError(f"queue {self.name!r} is closed in this object; open it again with pool.queue()")

    def __repr__(self) -> str:
        return f"<shmpool Queue {self.name!r} of pool {self._pool.name!r}, depth {self.depth}>"

