"""The arena: the pool's "system allocator".

In the kernel a mempool sits on a slab cache that may fail; here it sits on
the slots that are neither in the reserve nor held, kept on a free-list stack
in the segment. ``alloc`` fails (returns -1) when the stack is empty, and
also on purpose with probability ``fail_rate``, drawn from a splitmix64
generator whose state lives in the header: any process can change the rate
or reseed it for everyone, and one process replaying the same calls with the
same seed sees the same failures.

Every method is called with the pool lock held. This class is the only code
that moves slots on or off the free list, and ``free`` is the only code that
marks a slot ARENA.
"""

from __future__ import annotations

import numpy as np

from ._layout import (
    GEN_MASK,
    GEN_SHIFT,
    H_ARENA_FREE,
    H_FAIL_RATE,
    H_FAIL_THRESHOLD,
    H_FAULTS,
    H_RNG,
    H_SEED,
    ST_ARENA,
    STATE_MASK,
    Views,
)
from ._errors import PoolFormatError

M64 = (1 << 64) - 1
_GEN_BITS = GEN_MASK << GEN_SHIFT
_FAULT_BITS = 53  # draws are compared as 53-bit fractions, exact at 0 and 1


def splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (new state, 64-bit output)."""
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


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

    def alloc(self, inject: bool = True) -> int:
        """A free slot's index (its word still says ARENA: the caller marks
        it), or -1 if the arena is dry or, with ``inject``, an injected fault
        fires. Faults are drawn only when the arena could have succeeded, so
        ``faults_injected`` counts real refusals."""
        hdr = self._hdr
        n = hdr[H_ARENA_FREE]
        if not n:
            return -1
        if inject:
            threshold = hdr[H_FAIL_THRESHOLD]
            if threshold:
                hdr[H_RNG], z = splitmix64(hdr[H_RNG])
                if z >> (64 - _FAULT_BITS) < threshold:
                    hdr[H_FAULTS] += 1
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
        """Give slot ``idx`` back to the arena."""
        hdr = self._hdr
        n = hdr[H_ARENA_FREE]
        try:
            self._free[n] = idx  # first: a corrupt depth fails before any change
        except IndexError:
            raise PoolFormatError(f"pool is corrupt: arena_free {n} is beyond the capacity") from None
        words = self._words
        words[idx] = words[idx] & _GEN_BITS | ST_ARENA
        hdr[H_ARENA_FREE] = n + 1
