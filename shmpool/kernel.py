"""The kernel's own names, for code ported from mm/mempool.c.

Each is a thin alias of a Mempool method; ``mempool_free`` keeps the kernel's
argument order (element first). ``mempool_create`` takes the pool's name and
geometry where the kernel takes alloc/free callbacks: the arena is always the
backing allocator here.
"""

from __future__ import annotations

from typing import Any

from .gfp import GFP_KERNEL
from .pool import Mempool

__all__ = [
    "mempool_create",
    "mempool_alloc",
    "mempool_alloc_preallocated",
    "mempool_free",
    "mempool_resize",
    "mempool_destroy",
    "mempool_is_saturated",
]


def mempool_create(min_nr: int, name: str, *, slot_size: int, capacity: int, **options: Any) -> Mempool:
    """mempool_create(min_nr, ...): create a pool and fill its reserve."""
    return Mempool.create(name, min_nr=min_nr, slot_size=slot_size, capacity=capacity, **options)


def mempool_alloc(pool: Mempool, gfp_mask: int = GFP_KERNEL) -> int | None:
    """mempool_alloc(pool, gfp_mask): see Mempool.alloc."""
    return pool.alloc(gfp_mask)


def mempool_alloc_preallocated(pool: Mempool) -> int | None:
    """mempool_alloc_preallocated(pool): the reserve only, never sleeping."""
    return pool.alloc_preallocated()


def mempool_free(element: int | None, pool: Mempool) -> None:
    """mempool_free(element, pool): see Mempool.free."""
    pool.free(element)


def mempool_resize(pool: Mempool, new_min_nr: int, gfp_mask: int = GFP_KERNEL) -> int:
    """mempool_resize(pool, new_min_nr, gfp_mask): 0 on success, like the kernel."""
    pool.resize(new_min_nr, gfp_mask)
    return 0


def mempool_destroy(pool: Mempool) -> None:
    """mempool_destroy(pool): refuses (PoolBusyError) unless the reserve is full
    and nothing is held."""
    pool.destroy()


def mempool_is_saturated(pool: Mempool) -> bool:
    """mempool_is_saturated(pool): curr_nr >= min_nr."""
    return pool.is_saturated()
