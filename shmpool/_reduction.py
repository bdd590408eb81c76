"""Pool-backed arrays through multiprocessing: sent by reference, not copied.

multiprocessing pickles what it sends (Queue, Pipe, Pool, ProcessPoolExecutor,
Process arguments) with its ForkingPickler, which looks reducers up by type
first. As torch does for its shared tensors (multiprocessing/reductions.py),
shmpool registers one for numpy arrays when it is imported: an owning array
(``pool.array``, ``alloc_array``) or a view of one, held by this process,
travels as its reference (the pool's name, the handle with its generation,
its holder, and dtype, shape, strides and offset in the element); every
other array is reduced exactly as numpy reduces it, so it pickles as before.

The element stays its sender's while the message travels: sending marks the
sender's array given (its finalizer frees nothing), and a sender that dies
meanwhile leaves it to ``reclaim_dead``, as a plain handle would. On arrival
the receiver adopts it, only from the holder the reference names (so a
reference that arrives after its element was freed, or that another
receiver adopted already, raises InvalidHandleError), and gets an owning
array over the same memory: no copy. The receiver attaches to the pool by
name once per process and keeps it. ``pickle.dumps`` does not use these
reducers: it copies.
"""

from __future__ import annotations

import pickle
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from ._core import send_reference
from ._errors import PoolDestroyedError
from ._typing import Array

_pools: dict[str, Any] = {}
_pools_lock = threading.Lock()


def _reduce(a: Array) -> Any:
    ref = send_reference(a)
    if ref is None:
        return a.__reduce_ex__(pickle.DEFAULT_PROTOCOL)  # numpy's own, as without us
    name, handle, holder, offset = ref
    return _rebuild, (name, handle, holder, a.dtype, a.shape, a.strides, offset)


def _pool(name: str, stale: Any = None) -> Any:
    """This process's attachment to pool ``name`` for arriving references
    (a new one if the one kept is ``stale``: closed, or its pool destroyed
    and the name made again)."""
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None or pool.closed or pool is stale:
            from .pool import Mempool

            pool = _pools[name] = Mempool.attach(name)
        return pool


def _rebuild(name: str, handle: int, holder: int, dtype: np.dtype[Any], shape: tuple[int, ...],
             strides: tuple[int, ...], offset: int) -> Array:
    pool = _pool(name)
    try:
        pool._core.adopt(handle, holder)  # InvalidHandleError: freed, or adopted by another receiver
    except PoolDestroyedError:
        pool = _pool(name, stale=pool)
        pool._core.adopt(handle, holder)
    element = pool._core.array(handle, np.uint8, pool.slot_size)
    return np.ndarray(shape, dtype, buffer=element, offset=offset, strides=strides)


def register() -> None:
    ForkingPickler.register(np.ndarray, _reduce)
