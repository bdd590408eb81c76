"""shmpool: the Linux kernel's memory pool (mm/mempool.c) for processes that
share memory.

A pool keeps ``min_nr`` fixed-size elements in reserve in a POSIX
shared-memory segment; allocations try the pool's arena first and fall back
to the reserve, sleeping allocations wait for a free, and any process that
attaches by name can allocate, write, pass the integer handle on, and free.
"""

from __future__ import annotations

from . import _reduction
from ._core import owner_handle as _owner_handle
from ._errors import (
    InvalidHandleError,
    PoisonWarning,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
    ShmpoolError,
)
from ._layout import INDEX_MASK
from .gfp import GFP, GFP_ATOMIC, GFP_KERNEL, GFP_NOFS, GFP_NOIO, GFP_NOWAIT, GFPWarning
from .kernel import (
    mempool_alloc,
    mempool_alloc_preallocated,
    mempool_create,
    mempool_create_kmalloc_pool,
    mempool_create_node,
    mempool_create_page_pool,
    mempool_create_slab_pool,
    mempool_destroy,
    mempool_exit,
    mempool_free,
    mempool_init,
    mempool_init_kmalloc_pool,
    mempool_init_node,
    mempool_init_page_pool,
    mempool_init_slab_pool,
    mempool_initialized,
    mempool_is_saturated,
    mempool_resize,
)
from .pool import Mempool
from .queues import Queue
from .stats import PoolStats
from .topics import Subscription, Topic

_reduction.register()  # pool-backed arrays through multiprocessing: by reference

__version__ = "0.1.0"

__all__ = [
    "GFP",
    "GFP_ATOMIC",
    "GFP_KERNEL",
    "GFP_NOFS",
    "GFP_NOIO",
    "GFP_NOWAIT",
    "GFPWarning",
    "InvalidHandleError",
    "Mempool",
    "PoisonWarning",
    "PoolBusyError",
    "PoolClosedError",
    "PoolDestroyedError",
    "PoolFormatError",
    "PoolStats",
    "Queue",
    "Subscription",
    "Topic",
    "ShmpoolError",
    "handle_of",
    "handle_slot",
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
]


def handle_of(a: object) -> int:
    """The handle of the element an owning array (``pool.array(h)``) or any
    view of one is over; ValueError for any other object."""
    handle = _owner_handle(a)
    if handle is None:
        raise ValueError(f"not an owning array of a pool (pool.array(handle)), but {type(a).__name__}")
    return handle


def handle_slot(handle: int) -> int:
    """The slot index a handle names (handles also carry a generation and
    the pool's tag, so that stale and foreign handles are refused)."""
    return handle & INDEX_MASK
