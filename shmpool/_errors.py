"""Exception types.

Every error shmpool raises on purpose is either a built-in type (TypeError for
a wrong type, ValueError for a wrong value, FileExistsError /
FileNotFoundError / PermissionError for names, TimeoutError for a sleeping
alloc that ran out of time) or one of the subclasses below, each of which is
also a built-in type so that ``except ValueError`` keeps working.

All of them pickle (they are raised in child processes and sent back).
"""

from __future__ import annotations

__all__ = [
    "ShmpoolError",
    "InvalidHandleError",
    "PoolClosedError",
    "PoolFormatError",
    "PoolBusyError",
    "PoolDestroyedError",
    "PoisonWarning",
]


class ShmpoolError(Exception):
    """Base class of every shmpool-specific exception."""


class InvalidHandleError(ShmpoolError, ValueError):
    """A handle that is not currently held: freed twice, never allocated,
    stale (its slot was freed and handed out again), or from another pool.

    ``handle`` is the handle as given; ``state`` says what the slot is now
    (``"in the reserve"``, ``"in the arena"``, ``"held (generation 7)"``,
    ``"from another pool"``...).
    """

    def __init__(self, handle: int, state: str) -> None:
        super().__init__(handle, state)
        self.handle = handle
        self.state = state

    def __str__(self) -> str:
        return f"handle {self.handle:#x} is not held: {self.state}"


class PoolClosedError(ShmpoolError, ValueError):
    """An operation on a Mempool object after its ``close()`` or ``destroy()``
    (like I/O on a closed file). Attach again to go on using the pool."""


class PoolFormatError(ShmpoolError, ValueError):
    """The segment is not a usable shmpool pool: wrong magic number, another
    layout version, a header that disagrees with itself or with the size of
    the segment. Nothing was written to it."""


class PoolDestroyedError(ShmpoolError, RuntimeError):
    """The pool was destroyed by some process while this one was attached."""


class PoolBusyError(ShmpoolError, RuntimeError):
    """``destroy()`` of a pool that still lends elements out (held or
    queued). (A reserve below ``min_nr`` with nothing held does not stop it:
    later kernels dropped v3.2's ``BUG_ON(curr_nr != min_nr)``.) Free the
    elements first, or pass ``force=True``."""


class PoisonWarning(UserWarning):
    """A poisoned element left the reserve without its poison pattern:
    somebody wrote to it after freeing it."""
