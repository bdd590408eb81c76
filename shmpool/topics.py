"""Topics: one element published to many subscribers, freed when the last
lets go.

Why topics live in the pool
---------------------------
A queue hands each element to one consumer. A topic hands it to every
subscriber at once, without a copy: ``publish`` moves an element the caller
holds to the topic, and each subscription current at that moment finds it
in its ring (its own buffer of ``depth`` pending elements), in publication
order. The element is then SHARED by the topic: subscribers read it through
``pool.ndarray(h)`` / ``pool.buffer(h)``, read-only, and let go of it with
``s.release(h)`` (or ``pool.free(h)``); the last release returns it to the
pool by the kernel's free rule (the reserve first). With no subscriber,
``publish`` frees it at once.

The bookkeeping is the core's (``_core/topic.c``): a reference word per
slot says which subscriptions still reference the element (pending or
received) and which have received it, so that

- a subscriber that dies loses the others nothing: ``reclaim_dead()`` (and
  a new process's attach) drops its subscriptions, releasing what it had
  pending and what it had received;
- a publisher that dies loses nothing it published: a SHARED element is the
  topic's, never its publisher's;
- a process killed inside ``publish`` leaves the element published to every
  current subscriber or still its own (the commit is its slot word), never
  half.

Overflow, per topic: ``"block"`` (the default) makes a publisher wait while
any subscriber's ring is full (its timeout, then queue.Full);
``"drop_oldest"`` drops that subscriber's oldest pending element instead
(its reference released), as iceoryx2's safe overflow does, so a stalled
subscriber never slows the others down. ``MAX_TOPICS`` topics per pool,
``MAX_SUBS`` subscriptions per topic, a depth of at most
``TOPIC_MAX_DEPTH``.
"""

from __future__ import annotations

import queue as _stdqueue
from typing import TYPE_CHECKING, Any

from . import _aio
from ._errors import PoolClosedError
from ._layout import MAX_SUBS
from ._typing import Handles

if TYPE_CHECKING:
    from ._attach import Membership

__all__ = ["Subscription", "Topic"]


class Topic:
    """A topic of one pool, shared by every process that opens it by name
    (``pool.topic(name)``)."""

    __slots__ = ("_member", "_core", "_name", "_depth", "_overflow", "_index", "__weakref__")

    def __init__(self, member: Membership, name: str, index: int, depth: int, overflow: str) -> None:
        self._member = member
        self._core = member.core
        self._name = name
        self._depth = depth
        self._overflow = overflow
        self._index = index

    @property
    def name(self) -> str:
        return self._name

    @property
    def depth(self) -> int:
        """Each subscriber's buffer: how many elements may be pending for it."""
        return self._depth

    @property
    def overflow(self) -> str:
        """``"block"`` or ``"drop_oldest"``: what a full subscriber's buffer does to a publish."""
        return self._overflow

    def _t(self) -> int:
        if self._index < 0:
            raise PoolClosedError(f"topic {self._name!r} is closed in this object; open it again with pool.topic()")
        return self._index

    @property
    def subscribers(self) -> int:
        """How many subscriptions the topic has now (every process's)."""
        return self._core.topic_subs(self._t())  # type: ignore[no-any-return]

    def publish(self, handle: Any, block: bool = True, timeout: float | None = None) -> None:
        """Hand element ``handle`` (held by this process, or an owning array
        over it) to the topic: every current subscriber receives it once. It
        is no longer the caller's. With overflow "block", waits while a
        subscriber's buffer is full (up to ``timeout``): queue.Full if it
        stays full, or at once if not ``block``; nothing changed then."""
        if not self._core.publish(self._t(), handle, block, timeout):
            raise _stdqueue.Full

    def publish_nowait(self, handle: Any) -> None:
        """publish(handle, block=False)."""
        self.publish(handle, False)

    def subscribe(self) -> Subscription:
        """A new subscription of this process: it receives what is published
        from now on. OSError if the topic has MAX_SUBS subscriptions."""
        j = self._core.subscribe(self._t())
        if j < 0:
            raise OSError(28, f"topic {self._name!r} has {MAX_SUBS} subscriptions already")
        sub = Subscription(self, j)
        self._member.subscriptions.add(sub)  # closed when the pool object closes
        return sub

    def close(self) -> None:
        """Let go of the topic in this object (it lives on in the pool, and
        so do subscriptions made through it until they close)."""
        self._index = -1

    def __enter__(self) -> Topic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Topic {self._name!r} depth={self._depth} overflow={self._overflow!r}>"


class Subscription:
    """One subscriber of a topic, in this process (``topic.subscribe()``).
    ``get`` gives the handles of published elements in publication order,
    each once; ``release`` lets go of one. ``close`` releases everything
    it holds or has pending; closing the pool object it was made through
    closes it too."""

    __slots__ = ("_topic", "_core", "_t", "_j", "_open", "__weakref__")

    def __init__(self, topic: Topic, j: int) -> None:
        self._topic = topic
        self._core = topic._core
        self._t = topic._index
        self._j = j
        self._open = True

    @property
    def topic(self) -> Topic:
        return self._topic

    def _check(self) -> None:
        if not self._open:
            raise PoolClosedError(f"subscription to {self._topic.name!r} is closed")

    def get(self, block: bool = True, timeout: float | None = None) -> int:
        """The oldest pending element's handle, received by this
        subscription; blocks while none is pending (up to ``timeout``):
        queue.Empty if none comes, or at once if not ``block``."""
        self._check()
        got = self._core.sub_get(self._t, self._j, 1, block, timeout)
        if got is None:
            raise _stdqueue.Empty
        return int(got[0])

    def get_nowait(self) -> int:
        return self.get(False)

    def get_many(self, max_n: int, block: bool = True, timeout: float | None = None) -> Handles:
        """1 to ``max_n`` pending elements at once (an int64 array, oldest
        first); blocks like get() until there is one."""
        self._check()
        got = self._core.sub_get(self._t, self._j, max_n, block, timeout)
        if got is None:
            raise _stdqueue.Empty
        return got  # type: ignore[no-any-return]

    async def get_async(self, timeout: float | None = None) -> int:
        """get() for asyncio: never blocks the event loop (a blocking get in a
        thread when none is pending; queue.Empty after ``timeout``). If it
        is cancelled after its thread received an element, that element is
        released."""
        self._check()
        return await _aio.receive(self, timeout)

    def release(self, handle: int) -> None:
        """Let go of an element this subscription received; the last
        reference returns it to the pool. ValueError (InvalidHandleError) if
        it did not receive it or released it already."""
        self._check()
        self._core.release(self._t, self._j, handle)

    def close(self) -> None:
        """Release everything this subscription received or has pending,
        and end it. Never raises; may be called twice."""
        if not self._open:
            return
        self._open = False
        try:
            self._core.unsubscribe(self._t, self._j)
        except Exception:  # the pool closed, destroyed or damaged: reclaim_dead drops it
            pass

    @property
    def closed(self) -> bool:
        return not self._open

    def __len__(self) -> int:
        """Elements pending for this subscription now."""
        self._check()
        return self._core.sub_pending(self._t, self._j)  # type: ignore[no-any-return]

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if not self._open else f"{len(self)} pending"
        return f"<Subscription to {self._topic.name!r} #{self._j} {state}>"
