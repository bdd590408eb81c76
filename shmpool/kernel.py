"""The kernel's own names, for code ported from mm/mempool.c.

Each is a thin shim over :class:`~shmpool.Mempool`; ``mempool_free`` keeps
the kernel's argument order (element first). The GFP bits and masks of
Linux v3.2 are here too (``from shmpool.kernel import *`` gives a port
everything), see :mod:`shmpool.gfp`.

Constructors take the kernel's arguments in the kernel's order, then the
pool's name. The kernel passes ``alloc``/``free`` callbacks and their
``pool_data``; here the arena is always the backing allocator, so what the
callbacks would mean becomes the slot size:

======================================  ========================================
kernel                                  shmpool
======================================  ========================================
mempool_create(min_nr, alloc, free,     mempool_create(min_nr, name, *,
  data)                                   slot_size, capacity=None)
mempool_create_node(min_nr, alloc,      mempool_create_node(min_nr, name,
  free, data, node_id)                    node_id=-1, *, slot_size, ...)
mempool_create_slab_pool(min_nr, kc)    mempool_create_slab_pool(min_nr,
                                          slot_size, name)
mempool_create_kmalloc_pool(min_nr,     mempool_create_kmalloc_pool(min_nr,
  size)                                   size, name)
mempool_create_page_pool(min_nr,        mempool_create_page_pool(min_nr,
  order)                                  order, name)
mempool_init(&pool, min_nr, ...)        pool = mempool_init(min_nr, name, ...)
mempool_exit(&pool)                     mempool_exit(pool)
======================================  ========================================

- ``capacity`` (the arena's fixed size: how many slots the pool has in all,
  the reserve included) defaults to ``CAPACITY_PER_MIN_NR`` (4) times
  ``min_nr``: the kernel's backing allocator is the whole machine, the
  arena is not, so say how big it is when 4 x min_nr is not right. Every
  other keyword (``fail_rate``, ``seed``, ``mode``, ``poison``) goes to
  :meth:`Mempool.create`.
- The slab pool's ``slot_size`` stands in for the ``kmem_cache`` (its object
  size); the page pool's slots are ``PAGE_SIZE << order`` bytes, with
  ``PAGE_SIZE`` this machine's page size (``mmap.PAGESIZE``).
- ``node_id`` (NUMA) is accepted and ignored: a POSIX shared-memory segment
  is placed by the kernel's memory policy, not by the pool.
- mempool_init/mempool_exit: the kernel initialises a ``mempool_t`` that the
  caller embeds and returns 0 or -ENOMEM; a Python object cannot be
  initialised in place, so ``mempool_init`` returns the new pool (and raises
  on failure, like ``mempool_create``), and ``mempool_exit`` destroys it. As
  in the kernel, ``mempool_exit`` of a pool that was never initialised
  (None) does nothing, and ``mempool_initialized`` tells.
- ``mempool_destroy(None)`` does nothing, as in later kernels.

Not provided: the backing allocator's callbacks (``mempool_alloc_slab``,
``mempool_free_slab``, ``mempool_kmalloc``, ``mempool_kfree``,
``mempool_alloc_pages``, ``mempool_free_pages``): the arena is the only
backing allocator. KERNEL.md lists every difference from Linux v3.2.
"""

from __future__ import annotations

import mmap
import operator
from typing import Any, overload

from . import gfp as _gfp
from ._layout import MAX_CAPACITY
from .gfp import *  # noqa: F403  (the v3.2 GFP names, for ports)
from .gfp import GFP_KERNEL, SleepingMask, may_sleep
from .pool import Mempool

#: The machine's page size: a page pool's slot is ``PAGE_SIZE << order``.
PAGE_SIZE = mmap.PAGESIZE
#: ``NUMA_NO_NODE``: the node_id that says "any node" (every node is ignored).
NUMA_NO_NODE = -1
#: A constructor's ``capacity`` defaults to this many times ``min_nr``.
CAPACITY_PER_MIN_NR = 4


def _capacity(min_nr: object, capacity: int | None) -> Any:
    """The capacity asked for, or the default (a valid one even for a wrong
    ``min_nr``, which ``Mempool.create`` then refuses with its own error)."""
    if capacity is not None:
        return capacity
    try:
        n = operator.index(min_nr)  # type: ignore[arg-type]
    except TypeError:
        n = 1
    return min(max(n, 1) * CAPACITY_PER_MIN_NR, MAX_CAPACITY)


def _index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


# ----------------------------------------------------------------------
# Making and ending pools


def mempool_create(min_nr: int, name: str, *, slot_size: int, capacity: int | None = None, **options: Any) -> Mempool:
    """mempool_create(min_nr, ...): create pool ``name`` of ``capacity``
    slots of ``slot_size`` bytes (capacity defaults to 4 x min_nr) and fill
    its reserve with ``min_nr`` of them. Errors as :meth:`Mempool.create`."""
    return Mempool.create(name, min_nr=min_nr, slot_size=slot_size, capacity=_capacity(min_nr, capacity), **options)


def mempool_create_node(
    min_nr: int,
    name: str,
    node_id: int = NUMA_NO_NODE,
    *,
    slot_size: int,
    capacity: int | None = None,
    gfp_mask: int = GFP_KERNEL,
    **options: Any,
) -> Mempool:
    """mempool_create_node(min_nr, ..., node_id): :func:`mempool_create`;
    ``node_id`` must be an int and is ignored (the segment's pages are
    placed by the kernel's memory policy). ``gfp_mask`` (later kernels pass
    one) is checked and otherwise ignored: the pre-fill never fails."""
    _index(node_id, "node_id")
    may_sleep(gfp_mask)
    return mempool_create(min_nr, name, slot_size=slot_size, capacity=capacity, **options)


def mempool_create_slab_pool(
    min_nr: int, slot_size: int, name: str, *, capacity: int | None = None, **options: Any
) -> Mempool:
    """mempool_create_slab_pool(min_nr, kc): a pool of ``slot_size``-byte
    elements, the slot size standing in for the kmem_cache's object size."""
    return mempool_create(min_nr, name, slot_size=slot_size, capacity=capacity, **options)


def mempool_create_kmalloc_pool(
    min_nr: int, size: int, name: str, *, capacity: int | None = None, **options: Any
) -> Mempool:
    """mempool_create_kmalloc_pool(min_nr, size): a pool of ``size``-byte
    elements."""
    return mempool_create(min_nr, name, slot_size=size, capacity=capacity, **options)


def mempool_create_page_pool(
    min_nr: int, order: int, name: str, *, capacity: int | None = None, **options: Any
) -> Mempool:
    """mempool_create_page_pool(min_nr, order): a pool of ``2**order``
    pages per element (slots of ``PAGE_SIZE << order`` bytes). ``order``
    must be 0 or more (ValueError), and the slot no larger than
    Mempool.create allows."""
    order = _index(order, "order")
    if order < 0:
        raise ValueError(f"order must be 0 or more, not {order}")
    if order > 30:  # beyond any slot size (Mempool.create says so for the others); keeps the shift small
        raise ValueError(f"order {order} makes slots of more than 2**30 bytes")
    return mempool_create(min_nr, name, slot_size=PAGE_SIZE << order, capacity=capacity, **options)


def mempool_init(min_nr: int, name: str, **kwargs: Any) -> Mempool:
    """mempool_init(pool, min_nr, ...): the arguments of
    :func:`mempool_create`; returns the new pool, where the kernel fills the
    caller's ``mempool_t`` and returns 0 (raises where it returns -ENOMEM).
    End it with :func:`mempool_exit`."""
    return mempool_create(min_nr, name, **kwargs)


def mempool_init_node(min_nr: int, name: str, node_id: int = NUMA_NO_NODE, **kwargs: Any) -> Mempool:
    """mempool_init_node(pool, ..., gfp_mask, node_id): the arguments of
    :func:`mempool_create_node`, shaped as :func:`mempool_init`."""
    return mempool_create_node(min_nr, name, node_id, **kwargs)


def mempool_init_slab_pool(min_nr: int, slot_size: int, name: str, **kwargs: Any) -> Mempool:
    """mempool_init_slab_pool(pool, min_nr, kc): see :func:`mempool_create_slab_pool`."""
    return mempool_create_slab_pool(min_nr, slot_size, name, **kwargs)


def mempool_init_kmalloc_pool(min_nr: int, size: int, name: str, **kwargs: Any) -> Mempool:
    """mempool_init_kmalloc_pool(pool, min_nr, size): see :func:`mempool_create_kmalloc_pool`."""
    return mempool_create_kmalloc_pool(min_nr, size, name, **kwargs)


def mempool_init_page_pool(min_nr: int, order: int, name: str, **kwargs: Any) -> Mempool:
    """mempool_init_page_pool(pool, min_nr, order): see :func:`mempool_create_page_pool`."""
    return mempool_create_page_pool(min_nr, order, name, **kwargs)


def mempool_initialized(pool: Mempool | None) -> bool:
    """mempool_initialized(pool): True for a pool made by mempool_init (or
    any open Mempool), False for None or a pool after mempool_exit."""
    return pool is not None and not pool.closed


def mempool_destroy(pool: Mempool | None) -> None:
    """mempool_destroy(pool): give the pool back (unlink it). ``None`` is
    ignored, as later kernels ignore NULL.

    Refuses (PoolBusyError, nothing changed) only while elements are held.
    A reserve below ``min_nr`` with nothing held (a growing resize that
    found the arena failing) does not stop it: later kernels dropped v3.2's
    ``BUG_ON(curr_nr != min_nr)`` as wrong for exactly that case."""
    if pool is None:
        return
    pool.destroy()


def mempool_exit(pool: Mempool | None) -> None:
    """mempool_exit(pool): end a pool made by :func:`mempool_init`, by the
    rules of :func:`mempool_destroy` (refused while elements are held).
    ``None`` (a pool never initialised) and a pool already ended are
    ignored, as the kernel's mempool_exit of a zeroed pool is."""
    if pool is None or pool.closed:
        return
    pool.destroy()


# ----------------------------------------------------------------------
# Using pools


@overload
def mempool_alloc(pool: Mempool, gfp_mask: SleepingMask = ...) -> int: ...
@overload
def mempool_alloc(pool: Mempool, gfp_mask: int) -> int | None: ...


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
    """mempool_resize(pool, new_min_nr, gfp_mask): 0 on success, like the
    kernel (later kernels dropped ``gfp_mask``; it may be left out)."""
    pool.resize(new_min_nr, gfp_mask)
    return 0


def mempool_is_saturated(pool: Mempool) -> bool:
    """mempool_is_saturated(pool): curr_nr >= min_nr."""
    return pool.is_saturated()


__all__ = [
    "CAPACITY_PER_MIN_NR",
    "NUMA_NO_NODE",
    "PAGE_SIZE",
    "mempool_alloc",
    "mempool_alloc_preallocated",
    "mempool_create",
    "mempool_create_kmalloc_pool",
    "mempool_create_node",
    "mempool_create_page_pool",
    "mempool_create_slab_pool",
    "mempool_destroy",
    "mempool_exit",
    "mempool_free",
    "mempool_init",
    "mempool_init_kmalloc_pool",
    "mempool_init_node",
    "mempool_init_page_pool",
    "mempool_init_slab_pool",
    "mempool_initialized",
    "mempool_is_saturated",
    "mempool_resize",
    *(name for name in _gfp.__all__ if name != "may_sleep"),
]
