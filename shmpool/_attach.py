"""This process's place in each pool's registry: joining, leaving, fork, exit.

One registry entry per process per pool
---------------------------------------
A process holds one entry in the registry of each pool it is attached to,
shared by every Mempool object of that pool in the process (``_attachments``,
keyed by the segment file's device and inode). The entry is alive exactly as
long as the process: the process holds an OFD lock on the entry's byte of
the segment file, through a file description of its own, which the kernel
drops when the process dies (``_core/registry.c`` claims the entry; ``_procs``
explains liveness). The last object of the process to close lets go of the
entry, unless the process still holds elements: they stay its own, and the
entry with them, until it frees them or exits.

Fork: a child inherits its parent's descriptions, OFD locks and all, and
must neither keep the parent's entries alive after the parent dies nor use
them. After fork, the child closes them and every object of a pool forgets
the parent's entry and registers the child in one of its own. If that fails
(every entry taken by a live process: OSError with errno EUSERS, or a lock
that a stopped process holds: TimeoutError), the object raises that error at
every use instead of sharing its parent's entry.

At exit, open objects close (their cached slots go back to the arena while
the process can still give them).
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._core import after_fork_in_child as _core_after_fork
from ._procs import self_identity


@dataclass
class _Attachment:
    fd: int  # our own description of the segment, holding the OFD lock on the entry's byte
    index: int
    epoch: int
    refs: int = 0  # open objects of this process bound to it
    on_detach: list[Callable[[], None]] = field(default_factory=list)


_attachments: dict[tuple[int, int], _Attachment] = {}
_lock = threading.Lock()
_members: weakref.WeakSet[Membership] = weakref.WeakSet()


class Membership:
    """One Mempool object's membership of its process's registry entry."""

    __slots__ = ("core", "name", "key", "seg_fd", "close", "subscriptions", "__weakref__")

    def __init__(self, core: Any, name: str, seg_fd: int, close: Callable[[], None]) -> None:
        self.core = core
        self.name = name
        self.seg_fd = seg_fd
        st = os.fstat(seg_fd)
        self.key = (st.st_dev, st.st_ino)
        self.close = weakref.WeakMethod(close)
        self.subscriptions: weakref.WeakSet[Any] = weakref.WeakSet()  # made through this object: closed with it
        _members.add(self)

    def join(self) -> None:
        """Bind the object to this process's entry, registering the process
        first if it has none (OSError EUSERS if the registry is full,
        TimeoutError if the lock does not come)."""
        with _lock:
            att = _attachments.get(self.key)
            if att is not None and self.core.bind(att.fd, att.index, att.epoch):
                att.refs += 1
                self.core.enabled = True
                return
            fd = os.open(f"/proc/self/fd/{self.seg_fd}", os.O_RDWR | os.O_CLOEXEC)
            try:
                index, epoch = self.core.register(fd, *self_identity())
            except BaseException:
                os.close(fd)
                raise
            if att is not None:
                os.close(att.fd)
            _attachments[self.key] = _Attachment(fd, index, epoch, 1)
        self.core.enabled = True

    def leave(self, destroyed: bool) -> None:
        """The object lets go of the entry: first its cached slots go back
        to the arena (if the lock comes within its bound). The last object
        to leave vacates the entry (if that lock came: it is not waited for
        twice), unless the process still holds elements; after destroy the
        description goes whatever is held. Its topic subscriptions are
        closed first (what they received or have pending released)."""
        for sub in list(self.subscriptions):
            sub.close()
        detach = True
        if self.core.enabled:
            self.core.enabled = False
            try:
                detach = self.core.drain_cache()
            except Exception:  # a damaged pool, or a signal: left to the audit and reclaim
                pass
        with _lock:
            att = _attachments.get(self.key)
            if att is None or self.core.entry != att.index:
                return
            att.refs -= 1
            if att.refs > 0:
                return
            try:
                vacated = detach and self.core.detach()
            except Exception:  # a damaged pool, or a signal: keep the entry
                vacated = False
            if not (vacated or destroyed):
                return
            hooks = _let_go(self.key, att)
        for hook in hooks:
            hook()

    def depart(self) -> tuple[bool, list[Callable[[], None]]]:
        """This process leaves the pool (``Mempool.leave``): everything it
        holds comes back and its subscriptions end, then the last process
        attached destroys the pool (True) or this one vacates its entry, in
        one step under the pool lock (``core.leave``). Every other object
        of the pool in this process then forgets the entry; their ``close``
        methods are returned for the caller to call."""
        with _lock:
            att = _attachments.get(self.key)
            if att is None or self.core.entry != att.index:
                raise RuntimeError("this object is not attached (closed, or after fork without an entry)")
            destroyed, _taken = self.core.leave()
            hooks = _let_go(self.key, att)
            others = [m for m in _members if m is not self and m.key == self.key]
            for member in others:
                member.core.forget(None)
        for hook in hooks:
            hook()
        return bool(destroyed), [c for c in (m.close() for m in others) if c is not None]

    def on_detach(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when this process lets go of the entry (its asyncio
        FIFO goes then)."""
        with _lock:
            att = _attachments.get(self.key)
            if att is not None and hook not in att.on_detach:
                att.on_detach.append(hook)

    def _after_fork_in_child(self) -> None:
        self.core.forget(None)  # the parent's entry is not ours
        try:
            self.join()
        except Exception as exc:  # every later call raises it
            self.core.forget(exc)


def _let_go(key: tuple[int, int], att: _Attachment) -> list[Callable[[], None]]:
    """The process has no entry in the pool any more (``_lock`` held): its
    attachment goes, and with it the description holding the OFD lock. The
    hooks to call, outside the lock."""
    del _attachments[key]
    os.close(att.fd)
    return list(att.on_detach)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for att in _attachments.values():
        try:
            os.close(att.fd)
        except OSError:
            pass
    _attachments.clear()
    _core_after_fork()
    for member in list(_members):
        if member.core.entry >= 0:
            member._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    for member in list(_members):
        close = member.close()
        if close is not None:
            close()
