"""The arena: the pool's "system allocator".

In the kernel a mempool sits on a slab cache that may fail; here it sits on
the slots that are neither in the reserve nor held, kept on a free-list stack
in the segment. ``alloc`` fails (returns -1) when the stack is empty, and
also on purpose with probability ``fail_rate``, drawn from a splitmix64
generator whose state lives in the header: any process can change the rate
or reseed it for everyone, and one process replaying the same calls with the
same seed sees the same failures.

Every method is called with the pool lock held. This class and the cache
refill/drain of ``_fast.c`` (which move runs of slots between the top of the
free list and a process's cache, also under the lock) are the only code that
moves slots on or off the free list. The fault generator is drawn only by
``_fast.c`` (``FastPath.draw``): splitmix64 is a counter, so processes draw
from the one shared sequence without the lock, by an atomic add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._errors import PoolFormatError
from ._layout import (
    GEN_BITS,
    H_ARENA_FREE,
    H_FAIL_RATE,
    H_FAIL_THRESHOLD,
    H_RNG,
    H_SEED,
    ST_ARENA,
    STATE_MASK,
    Views,
)

if TYPE_CHECKING:
    from ._fast import FastPath

_FAULT_BITS = 53  # draws are compared as 53-bit fractions, exact at 0 and 1


class Arena:
    __slots__ = ("_hdr", "_fhdr", "_words", "_free")

    def __init__(self, v: Views) -> None:
        self._hdr = v.hdr
        self._fhdr = v.fhdr
        self._words = v.words
        self._free = v.arena

    def format(self, capacity: int) -> None:
        """Put every slot in the arena (create only), ordered so that the
        first allocations take the lowest slots."""
        words = np.frombuffer(self._words, dtype=np.uint64)
        words[:] = ST_ARENA
        free = np.frombuffer(self._free, dtype=np.uint32)
        free[:] = np.arange(capacity - 1, -1, -1, dtype=np.uint32)
        self._hdr[H_ARENA_FREE] = capacity

    def set_faults(self, fail_rate: float, seed: int | None) -> None:
        """Change the injected failure rate; a seed restarts the sequence."""
        hdr = self._hdr
        self._fhdr[H_FAIL_RATE] = fail_rate
        hdr[H_FAIL_THRESHOLD] = round(fail_rate * (1 << _FAULT_BITS))
        if seed is not None:
            hdr[H_SEED] = seed
            hdr[H_RNG] = seed

    def alloc(self, fast: FastPath, inject: bool = True) -> int:
        """A free slot's index from the shared free list (its word still
        says ARENA: the caller marks it), or -1 if the list is empty or, with
        ``inject``, an injected fault fires (drawn by ``fast.draw()``, which
        counts it). Faults are drawn only when the arena could have
        succeeded, so ``faults_injected`` counts real refusals."""
        hdr = self._hdr
        n = hdr[H_ARENA_FREE]
        if not n:
            return -1
        if inject and fast.draw():
            return -1
        n -= 1
        try:
            idx = self._free[n]
            free = self._words[idx] & STATE_MASK == ST_ARENA
        except IndexError:
            raise PoolFormatError(f"pool is corrupt: arena free list entry {n} is out of range") from None
        if not free:
            raise PoolFormatError(f"pool is corrupt: arena free list entry {n} names slot {idx}, not a free one")
        hdr[H_ARENA_FREE] = n
        return idx

    def free(self, idx: int) -> None:
        """Give slot ``idx`` (reserved or cached, not held: held slots move by
        compare-and-swap, see Mempool._release) back to the arena."""
        if self._hdr[H_ARENA_FREE] >= len(self._free):
            raise PoolFormatError(f"pool is corrupt: arena_free {self._hdr[H_ARENA_FREE]} is beyond the capacity")
        words = self._words
        words[idx] = words[idx] & GEN_BITS | ST_ARENA
        self.push(idx)

    def push(self, idx: int) -> None:
        """Push slot ``idx``, already marked ARENA, onto the free list (the
        caller checked that it has room)."""
        hdr = self._hdr
        n = hdr[H_ARENA_FREE]
        self._free[n] = idx
        hdr[H_ARENA_FREE] = n + 1
