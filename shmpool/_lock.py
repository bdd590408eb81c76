"""The pool lock, read from Python. The lock itself lives in ``_fast.c``.

What the lock protects
----------------------
The lock guards every slot word's move into or out of the reserve and the
shared arena, the reserve stack and ``curr_nr``, the arena's free list and
``arena_free``, ``min_nr``, the status word, the registry's entries of dead
processes, the fault injector's settings and the header's counters. A
process's own cache is changed by that process alone, lock-free (see
``_fast.c``), and sleeper counts are atomic.

Invariants whenever the lock is free: ``stack[0:curr_nr]`` are exactly the
RESERVE slots, ``arena[0:arena_free]`` exactly the ARENA slots, the others
are HELD or CACHED, so ``curr_nr + arena_free + cached + in_use ==
capacity``; and ``0 <= curr_nr <= min_nr <= capacity``.

How it is held
--------------
The header word ``H_LOCK_OWNER`` is 0 when the lock is free and the holder's
token ``(entry + 1) | epoch << 16`` while it is held; the one
compare-and-swap that takes the lock writes the token, so there is no
instant at which the lock is held by nobody known. Only C code holds it, for
one call that runs no Python code (no signal handler, collector or thread
of the holder can run inside a critical section). Contenders sleep on the
named semaphore ``/shmpool.NAME.lock``.

A contender takes the lock over only from a holder proven dead: the token's
entry has another epoch now, or no process holds the OFD lock on the entry's
byte of the segment file (``_procs.entry_alive``). A stopped or starved
holder is waited for; callers bound their waits with deadlines instead
(``timeout=``, and ``ATOMIC_LOCK_WAIT_SECONDS`` for allocations that may not
sleep). The process that takes the lock over repairs the pool first,
rebuilding the stacks and depths from the slot words.

The wait channel
----------------
The kernel's wait queue is the second named semaphore, value 0, whose posts
are wake-up tokens: a token tells whichever sleeper takes it to retry.

- register (``prepare_to_wait``): in the same critical section in which it
  found the reserve empty, a sleeper counts itself in ``nr_waiters`` (and in
  its registry entry, so that a dead sleeper can be uncounted). A free that
  refills the reserve afterwards must see it, so no wake-up is lost.
- wake_all: after the lock is released, post ``nr_waiters - value`` tokens.
- finish (``finish_wait``): a sleeper that wakes, by token, timeout or
  signal, uncounts itself with an atomic decrement (no lock: an interrupted
  sleep cannot leak its count), then drains tokens beyond ``nr_waiters``.
- A sleeper may take a token posted for another; a sleeper that retried and
  leaves the reserve non-empty therefore wakes the others again.
- An ``alloc_async`` sleeper is counted in ``nr_waiters`` too, and in
  ``H_ASYNC_WAITERS`` (and its entry's ``P_ASYNC``): tokens are posted for
  the others only, and wake_all writes a byte into the FIFO of each process
  with async sleepers, whose event loop wakes them (``_aio``).

This module only reads: who holds the lock, for shmpool-inspect and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._layout import H_LOCK_OWNER, H_LOCK_SEQ, H_LOCK_SINCE_NS, OWNER_MASK, P_EPOCH, P_PID, P_START, PROC_WORDS
from ._mapping import Views
from ._procs import entry_alive


@dataclass(frozen=True)
class LockHolder:
    """Who held the pool lock when it was read."""

    entry: int  # registry entry (-1: the token names none)
    epoch: int
    pid: int  # 0 if the entry no longer has this epoch
    start: int
    alive: bool
    since_ns: int  # CLOCK_MONOTONIC ns when it was taken
    seq: int


def holder(v: Views, fd: int) -> LockHolder | None:
    """The lock's holder, or None if it is free. ``fd``: a descriptor of the
    segment that holds no OFD lock itself (for the liveness check)."""
    hdr = v.hdr
    token = hdr[H_LOCK_OWNER]
    if not token:
        return None
    entry, epoch = (token & OWNER_MASK) - 1, token >> 16
    procs = np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)
    if not 0 <= entry < v.geo.max_procs or procs[entry, P_EPOCH] != epoch:
        return LockHolder(entry if 0 <= entry < v.geo.max_procs else -1, epoch, 0, 0, False,
                          hdr[H_LOCK_SINCE_NS], hdr[H_LOCK_SEQ])
    return LockHolder(entry, epoch, int(procs[entry, P_PID]), int(procs[entry, P_START]),
                      entry_alive(fd, v.geo, entry), hdr[H_LOCK_SINCE_NS], hdr[H_LOCK_SEQ])
