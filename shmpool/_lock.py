"""The pool lock and the wait channel.

What the lock protects
----------------------
One POSIX named semaphore of value 1 stands in for the kernel's
``pool->lock`` spinlock. The arena shares it (a slab cache has its own lock,
but here the arena lives in the same segment and a second lock would only
add a second acquisition to every allocation). Held, it guards:

- every slot word, the reserve stack and ``curr_nr``, the arena free list and
  ``arena_free``, ``min_nr``, the status word;
- the wait bookkeeping (``nr_waiters``);
- the fault injector's state and the counters.

Invariants whenever the lock is free: ``stack[0:curr_nr]`` are exactly the
RESERVE slots, ``arena[0:arena_free]`` exactly the ARENA slots, the rest are
HELD, so ``curr_nr + arena_free + in_use == capacity``; and
``0 <= curr_nr <= min_nr <= capacity``.

The lock is never held across a sleep. Its holder writes its pid and the time
it took it into the header, so that a person (shmpool-inspect) can see who
holds it and for how long, and so that a later crash-recovery pass can tell
a dead holder from a slow one.

The wait channel
----------------
The kernel's wait queue is a second named semaphore, value 0, whose posts
are wake-up tokens: a token tells whichever sleeper takes it to retry. They
are addressed to nobody, because a semaphore cannot address them.

- register (``prepare_to_wait``): in the same critical section in which it
  found the reserve empty, a sleeper counts itself in ``nr_waiters``. A free
  that refills the reserve afterwards must see it, so no wake-up can be lost
  between its last check and its sleep (the later kernels' check-and-register
  under the lock).
- wake_all: post ``nr_waiters - value`` tokens, so that there is a token for
  every sleeper. A sleeper that has taken a token but not yet settled is
  still counted, so tokens + such sleepers >= nr_waiters after a wake.
- finish (``finish_wait``): a sleeper that wakes, by token or by timeout,
  uncounts itself, then drains tokens beyond ``nr_waiters`` (posted for a
  sleeper that timed out first). Stale tokens therefore never pile up.
- A sleeper may take a token posted for another (tokens are anonymous); the
  other sleeps on. That only matters if an element is still in the reserve
  afterwards, so a sleeper that retried and leaves the reserve non-empty with
  sleepers uncovered wakes again (``rewake_if_needed``).

Tokens are posted only under the lock, so the value read under the lock can
only fall (sleepers taking tokens) until the lock is released. A spurious
wake-up costs one retry; correctness never depends on which sleeper wins,
and a sleeper retries after 5 s even if nothing wakes it.
"""

from __future__ import annotations

import time

import posix_ipc

from ._layout import H_CURR_NR, H_LOCK_PID, H_LOCK_SINCE_NS, H_NR_WAITERS

_monotonic_ns = time.monotonic_ns


def _acquire(sem: posix_ipc.Semaphore, timeout: float | None) -> bool:
    """sem_wait that survives signals whose handlers return (PEP 475's rule);
    a handler that raises (KeyboardInterrupt) propagates. False on timeout."""
    while True:
        try:
            sem.acquire(timeout)
            return True
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            continue


class _OwnedSemaphore:
    """Closes its semaphore when the last reference goes (posix_ipc does not),
    so that closing a pool while another thread is inside an operation on it
    never pulls the semaphore out from under that thread."""

    __slots__ = ("sem",)

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        self.sem = sem

    def __del__(self) -> None:
        try:
            self.sem.close()
        except Exception:  # already closed or gone: nothing left to release
            pass


class PoolLock:
    """The pool lock, as a context manager. Not reentrant."""

    __slots__ = ("_owned", "_sem", "_hdr", "pid")

    def __init__(self, sem: posix_ipc.Semaphore, hdr: memoryview, pid: int) -> None:
        self._owned = _OwnedSemaphore(sem)
        self._sem = sem
        self._hdr = hdr
        self.pid = pid

    def __enter__(self) -> None:
        _acquire(self._sem, None)
        hdr = self._hdr
        hdr[H_LOCK_PID] = self.pid
        hdr[H_LOCK_SINCE_NS] = _monotonic_ns()

    def __exit__(self, *exc: object) -> None:
        self._hdr[H_LOCK_PID] = 0
        self._sem.release()

    def release_initial(self) -> None:
        """Release the lock that ``create`` holds from birth (value 0)."""
        self._sem.release()


class WaitQueue:
    """The pool's wait queue. ``register``, ``wake_all``, ``finish`` and
    ``rewake_if_needed`` are called with the pool lock held; ``sleep``
    without it."""

    __slots__ = ("_owned", "_sem", "_hdr")

    def __init__(self, sem: posix_ipc.Semaphore, hdr: memoryview) -> None:
        self._owned = _OwnedSemaphore(sem)
        self._sem = sem
        self._hdr = hdr

    def register(self) -> None:
        """prepare_to_wait: count this sleeper."""
        self._hdr[H_NR_WAITERS] += 1

    def wake_all(self) -> None:
        """wake_up(&pool->wait): make sure there is a token for every sleeper."""
        n = self._hdr[H_NR_WAITERS]
        if n:
            sem = self._sem
            for _ in range(n - sem.value):
                sem.release()

    def rewake_if_needed(self) -> None:
        """After a sleeper's successful retry: if the reserve still holds
        elements, cover any sleeper whose token it may have taken."""
        if self._hdr[H_CURR_NR]:
            self.wake_all()

    def sleep(self, timeout: float) -> bool:
        """Sleep until a token comes or ``timeout`` seconds pass."""
        return _acquire(self._sem, timeout)

    def finish(self) -> None:
        """finish_wait: uncount this sleeper and drain stale tokens."""
        hdr = self._hdr
        n = hdr[H_NR_WAITERS] - 1
        hdr[H_NR_WAITERS] = n
        sem = self._sem
        while sem.value > n and _acquire(sem, 0):
            pass
