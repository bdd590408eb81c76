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

The lock is never held across a sleep. Its holder writes its pid, its start
time, the time it took the lock and a sequence number into the header, so
that a person (shmpool-inspect) can see who holds it and for how long, and
so that a process killed while holding it can be told from a slow one.

Recovery from a dead holder
---------------------------
A semaphore has no owner: if its holder is killed, everyone else would wait
forever. So the lock is taken with a bounded wait (POLL_SECONDS), and a
contender that times out looks at the recorded holder:

- alive (its pid runs and started when the record says): wait on;
- dead: take the lock over;
- none recorded while the lock stays taken (a holder killed between its
  sem_wait and its first store, or between its last store and sem_post):
  once the sequence number has not moved for ORPHAN_SECONDS, take it over.

Taking over is arbitrated by a POSIX record lock (lockf) on the segment, which
the kernel drops if the recoverer dies too: the winner checks that the
record still names the holder it saw die (else someone recovered first and
it goes back to waiting), records itself as the holder, so that it now holds
the semaphore the dead process held, and runs the repair (``_recovery``)
before its own critical section. Threads of one process recover one at a
time (record locks belong to processes, not threads).

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

import fcntl
import os
import signal
import threading
import time
from typing import Callable

import posix_ipc

from ._layout import H_CURR_NR, H_LOCK_PID, H_LOCK_SEQ, H_LOCK_SINCE_NS, H_LOCK_START, H_NR_WAITERS, H_RECOVERIES
from ._procs import is_alive

#: How long a contender waits on the lock before it looks at the holder.
POLL_SECONDS = 0.05
#: How long the lock may stay taken with no holder recorded before it is
#: presumed orphaned (a living holder records itself within microseconds).
ORPHAN_SECONDS = 0.5
_recovering = threading.Lock()  # one recovery at a time in this process

_monotonic_ns = time.monotonic_ns


#: A blocking wait is made of slices this long, with signals held off
#: during each (see _acquire).
WAIT_SLICE_SECONDS = 0.1
# The signals programs handle in Python (pytest-timeout uses SIGALRM). Not
# all of them: signal.pthread_sigmask returns the old mask as a set of enum
# members, and with every signal blocked that costs ~55 us per wait against
# ~4 us for these (measured). A raising handler on another signal is left to
# posix_ipc (its exception is lost and the wait goes on).
_SIGNALS = {
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
    signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD,
}


def _acquire(sem: posix_ipc.Semaphore, timeout: float | None) -> bool:
    """sem_wait with a timeout (None: forever); False if it timed out.

    posix_ipc runs Python signal handlers inside its wait and throws away any
    exception they raise (except KeyboardInterrupt), so a handler's
    SystemExit, or pytest-timeout's failure, would be lost. So the wait is
    made of short slices with signals held off; a signal that comes during a
    slice is delivered right after it, and its handler runs here, in Python,
    where whatever it raises propagates.
    """
    if timeout == 0:
        try:
            sem.acquire(0)
            return True
        except posix_ipc.BusyError:
            return False
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - time.monotonic())
        if wait <= 0:
            return False
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            sem.acquire(wait)
            return True
        except posix_ipc.BusyError:
            pass
        except posix_ipc.SignalError:  # only with signals unblockable here: retry
            pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


class _OwnedFd:
    """Closes its descriptor when the last reference goes."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class PoolLock:
    """The pool lock, as a context manager. Not reentrant. ``repair`` is
    called, with the lock held, after taking it over from a dead holder."""

    __slots__ = ("_owned", "_sem", "_hdr", "_fd", "pid", "start", "repair", "recoveries")

    def __init__(self, sem: posix_ipc.Semaphore, hdr: memoryview, fd: int, pid: int, start: int) -> None:
        self._owned = _OwnedSemaphore(sem)
        self._sem = sem
        self._hdr = hdr
        self._fd = _OwnedFd(fd)
        self.pid = pid
        self.start = start
        self.repair: Callable[[], object] = lambda: None
        self.recoveries = 0

    def __enter__(self) -> None:
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            if self._acquire_slow():
                return  # taken over from a dead holder: already recorded
        hdr = self._hdr
        hdr[H_LOCK_PID] = self.pid
        hdr[H_LOCK_START] = self.start
        hdr[H_LOCK_SINCE_NS] = _monotonic_ns()
        hdr[H_LOCK_SEQ] += 1

    def __exit__(self, *exc: object) -> None:
        self._hdr[H_LOCK_PID] = 0
        self._sem.release()

    def acquire_within(self, seconds: float) -> bool:
        """Take the lock if it comes within ``seconds`` (no recovery);
        release it with ``__exit__``. For paths that must not block, such as
        close() at interpreter exit."""
        if not _acquire(self._sem, seconds):
            return False
        hdr = self._hdr
        hdr[H_LOCK_PID] = self.pid
        hdr[H_LOCK_START] = self.start
        hdr[H_LOCK_SINCE_NS] = _monotonic_ns()
        hdr[H_LOCK_SEQ] += 1
        return True

    def release_initial(self) -> None:
        """Release the lock that ``create`` holds from birth (value 0)."""
        self._sem.release()

    def _acquire_slow(self) -> bool:
        """Wait for the lock, recovering it from a dead holder. False when
        acquired normally, True when taken over (holder already recorded)."""
        hdr = self._hdr
        orphan: tuple[int, float] | None = None
        while not _acquire(self._sem, POLL_SECONDS):
            pid, start, seq = hdr[H_LOCK_PID], hdr[H_LOCK_START], hdr[H_LOCK_SEQ]
            if pid:
                orphan = None
                if is_alive(pid, start):
                    continue
            else:
                if orphan is None or orphan[0] != seq:
                    orphan = (seq, time.monotonic())
                    continue
                if time.monotonic() - orphan[1] < ORPHAN_SECONDS:
                    continue
            if self._take_over(pid, start, seq):
                return True
            orphan = None
        return False

    def _take_over(self, pid: int, start: int, seq: int) -> bool:
        hdr = self._hdr
        with _recovering:
            fcntl.lockf(self._fd.fd, fcntl.LOCK_EX)
            try:
                still = (hdr[H_LOCK_PID], hdr[H_LOCK_START], hdr[H_LOCK_SEQ]) == (pid, start, seq)
                if not still or self._sem.value != 0:
                    return False  # somebody recovered it, or it was released
                hdr[H_LOCK_PID] = self.pid
                hdr[H_LOCK_START] = self.start
                hdr[H_LOCK_SINCE_NS] = _monotonic_ns()
                hdr[H_LOCK_SEQ] = seq + 1
                try:
                    self.repair()
                except BaseException:
                    self.__exit__()
                    raise
                self.recoveries += 1
                hdr[H_RECOVERIES] += 1
                return True
            finally:
                fcntl.lockf(self._fd.fd, fcntl.LOCK_UN)


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
        """prepare_to_wait: count this sleeper (the caller also counts it in
        its registry entry, so that a dead sleeper can be uncounted)."""
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
        hdr[H_NR_WAITERS] -= 1
        self.drain()

    def drain(self) -> None:
        """Take back tokens beyond the number of sleepers."""
        n = self._hdr[H_NR_WAITERS]
        sem = self._sem
        while sem.value > n and _acquire(sem, 0):
            pass
