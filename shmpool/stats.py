"""Frozen snapshots of a pool, taken under its lock."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PoolStats:
    """One consistent view of a pool. ``curr_nr + arena_free + in_use +
    queued == capacity`` always holds in a snapshot: ``in_use`` counts the
    elements processes hold, ``queued`` those that queues hold.

    Counters count since create, over every process: ``alloc_arena`` and
    ``alloc_reserve`` are allocations served by the arena and by the
    reserve, ``alloc_failed`` allocations that returned no element (None, or
    TimeoutError), ``free_reserve`` and ``free_arena`` frees that refilled the
    reserve or went back to the arena, ``sleeps`` times a sleeping
    allocation went to sleep, ``faults_injected`` arena attempts failed on
    purpose, ``poison_errors`` poisoned elements found written after free,
    ``lock_recoveries`` times the lock was taken over from a dead holder,
    ``reclaimed`` elements taken back from dead holders.

    For sizing the reserve (``shmpool-inspect`` gives a verdict from them):
    ``reserve_low_water`` is the lowest ``curr_nr`` seen since create (0:
    the reserve ran dry at least once; ``min_nr``: it was never drawn on;
    while several processes live on the reserve's places at once it may
    read lower, by at most the full places they have not counted yet),
    ``longest_sleep`` and ``total_sleep`` the longest sleep of one sleeping
    allocation and all their sleeps together, in seconds (each is added when
    its allocation returns). ``attached`` is how many processes are attached
    now (registry entries of live processes). ``published`` counts the
    elements published to topics and not yet released by every subscriber
    (they are in ``in_use`` too).
    """

    name: str
    slot_size: int
    capacity: int
    min_nr: int
    curr_nr: int
    arena_free: int
    in_use: int
    queued: int
    nr_waiters: int
    fail_rate: float
    seed: int
    poison: bool
    alloc_arena: int
    alloc_reserve: int
    alloc_failed: int
    free_reserve: int
    free_arena: int
    sleeps: int
    faults_injected: int
    poison_errors: int
    lock_recoveries: int
    reclaimed: int
    reserve_low_water: int
    longest_sleep: float
    total_sleep: float
    attached: int
    published: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
