"""Share groups: one element held by several processes at once.

An element is held by one process (HELD), queued, or published to a topic
whose subscribers read it (SHARED). Some users need a fourth shape: several
processes each hold the same element, as its holder did, and it goes back
to the pool when the last lets go. Dask does that to results: a key's value
may live in the memory of several workers of a host (replicas), any of
which Dask may drop at any moment (``shmpool.dask``).

That is a topic kind (``OVERFLOW_SHARE``, layout v10), so that everything a
topic has for references carries over: the element is SHARED by the group,
its reference word has one bit per member (a process's subscription), a
dead member's references go at the next attach or ``reclaim_dead()``
(retire), repair frees a shared slot nobody references, and the last
release frees by the kernel's rule (the reserve first). Nothing is
published to a group and nothing waits in its rings; its views are
writable, as the holder's were.

Two transitions are the group's own (``_core/topic.c``), each one step
under the pool lock:

* ``share(handle, j, epoch)``: this member gives member ``j`` (subscribed
  under ``epoch``, which names one incarnation) a reference, pending. The
  element is this process's: HELD (the first share commits it to SHARED,
  its own bits set) or SHARED by the group and taken by it. False, nothing
  changed, when ``j`` is gone or references the element already: a process
  never holds two references to one element, so a late release of an old
  one cannot take a new one's. The caller then sends the bytes.
* ``take(handle)``: the target receives it (its received bit).

A share that is never taken (the message lost on the way) stays pending
until the target's membership ends, when its process leaves or dies.
Releasing is ``pool.free(handle)``, which an owning array's finalizer does.
"""

from __future__ import annotations

import errno
from typing import Any

from ._args import check_queue_name
from ._layout import MAX_SUBS, MAX_TOPICS, OVERFLOW_SHARE


class ShareGroup:
    """This process's membership of share group ``name`` of ``pool``
    (created if the pool has none). ValueError if a topic of that name
    exists and is not a group; OSError if the pool has MAX_TOPICS topics,
    or the group MAX_SUBS members."""

    __slots__ = ("_core", "name", "t", "j", "epoch", "_open", "__weakref__")

    def __init__(self, pool: Any, name: str) -> None:
        raw = check_queue_name(name)
        core = self._core = pool._core
        t, _depth, kind = core.topic_open(raw, 1, OVERFLOW_SHARE)
        if t == -2:
            raise OSError(errno.ENOSPC, f"pool {pool.name!r} has {MAX_TOPICS} topics already")
        if kind != OVERFLOW_SHARE:
            raise ValueError(f"pool {pool.name!r} has a topic {name!r} that is not a share group")
        j = core.subscribe(t)
        if j < 0:
            raise OSError(errno.EUSERS, f"share group {name!r} of pool {pool.name!r} has {MAX_SUBS} members already")
        self.name, self.t, self.j, self.epoch = name, t, j, core.sub_epoch(t, j)
        self._open = True
        pool._member.subscriptions.add(self)  # closed with the pool object

    def share(self, handle: int, j: int, epoch: int) -> bool:
        """Give member ``j`` (of ``epoch``) a reference to ``handle``, held
        or taken by this process; False if it is gone or has one."""
        return bool(self._core.share(self.t, self.j, handle, j, epoch))

    def take(self, handle: int) -> None:
        """Receive ``handle``, shared with this member (InvalidHandleError if
        it is not, or was taken already)."""
        self._core.take(self.t, self.j, handle)

    def close(self) -> None:
        """End the membership: every reference it has, pending or taken, is
        released. Never raises."""
        if not self._open:
            return
        self._open = False
        try:
            self._core.unsubscribe(self.t, self.j)
        except Exception:  # the pool closed, left or destroyed: nothing of ours is left
            pass
