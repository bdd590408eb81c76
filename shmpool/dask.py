"""shmpool.dask: a pool per host under dask.distributed.

``pip install 'shmpool[dask]'``; dask and distributed are needed here only.

One pool per host
-----------------
``client.register_plugin(PoolPlugin("frames", min_nr=..., slot_size=...,
capacity=...))`` opens, in every worker process, its host's pool (create or
attach: ``Mempool.open``), named ``frames@HOST`` (``host_pool_name``), and
``local_pool()`` gives it to tasks. A host is a /dev/shm, not an address:
containers of one machine may each have their own. ``host_id()`` hashes the
kernel's boot id with the device of the /dev/shm mount; ``SHMPOOL_HOST_ID``
in a worker's environment overrides it (the tests run two "hosts" on one
machine so). When the plugin is unregistered or a worker closes, the worker
leaves the pool (``Mempool.leave``: what it holds comes back); the last
process of the host to leave destroys it, in the same step under the pool
lock as its count of who is attached, so of workers leaving at once exactly
one does.

Arrays between tasks
--------------------
Dask moves a result between workers by serializing it on the comm that the
recipient opened to fetch it, with a context naming both ends: ``sender``
and ``recipient`` are the two sides' handshakes (GPU libraries pass IPC
handles on one host through the same hook). The plugin adds to its
worker's handshake (``worker.connection_args["handshake_overrides"]``,
which distributed's connect sends) its host id and, for each pool, its
membership of the pool's share group (``_share``). Importing this module
registers, for ``numpy.ndarray``, ``dask_serialize`` and
``dask_deserialize`` functions that wrap distributed's own:

* An owning array of a pool (``pool.array``, ``alloc_array``, or a view of
  one) that this process holds or shares, sent to a worker of the same
  host that is a member of that pool's group, travels by reference: the
  recipient gets a share (one step under the lock, before a byte leaves),
  takes it on arrival and views the same memory, writable, no copy. The
  element is then held by both (and by every worker that fetches it
  later); each lets go when Dask releases the key there, and the last
  frees it. A worker that already references the element, one of another
  host, the client, or spilling to disk: by value, through distributed's
  own numpy serializer, untouched.
* A pool's array that arrives by value (from another host) at a worker
  with one pool lands in an element of it if it fits a slot (a
  non-sleeping allocation, GFP_NOWAIT, by the kernel's rule; the heap if
  there is none free), so that it travels on by reference on its new
  host. At the client, and for every other array, it is the plain array
  distributed makes.

A worker killed (or restarted by its nanny) leaves its elements and shares
to the next attach, which its restart is, or ``reclaim_dead()``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from distributed import WorkerPlugin
    from distributed.protocol import numpy as _distributed_numpy  # noqa: F401  (registers numpy's own, wrapped below)
    from distributed.protocol.serialize import dask_deserialize, dask_serialize
except ImportError as exc:  # pragma: no cover - the extra is installed by the test command
    raise ImportError("shmpool.dask needs dask.distributed: pip install 'shmpool[dask]'") from exc

from ._core import owner_ref
from ._errors import ShmpoolError
from ._segment import check_name
from ._share import ShareGroup
from ._typing import Array
from .gfp import GFP_NOWAIT
from .pool import Mempool

__all__ = ["PoolPlugin", "host_id", "host_pool_name", "local_pool"]

HANDSHAKE_KEY = "shmpool"  # in a worker's handshake: {"host": id, "pools": {name: [member, epoch]}}
LAND_KEY = "shmpool-land"  # in a by-value header: the array was a pool's, and lands in the recipient's
GROUP = "shmpool.dask"  # the share group of the workers of a host, in each pool
_HOST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def host_id() -> str:
    """This process's host, as far as pools go: ``SHMPOOL_HOST_ID`` if set
    (1 to 64 of ``A-Za-z0-9_.-``; ValueError otherwise), else a hash of the
    kernel's boot id and the device of /dev/shm (two containers with their
    own /dev/shm are two hosts)."""
    given = os.environ.get("SHMPOOL_HOST_ID")
    if given is not None:
        if not _HOST_ID.fullmatch(given):
            raise ValueError(f"SHMPOOL_HOST_ID is 1 to 64 of A-Za-z0-9_.-, not {given!r}")
        return given
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # no /proc: the machine's name stands for it
        boot = socket.gethostname()
    shm = os.stat("/dev/shm")
    return hashlib.blake2b(f"{boot}:{shm.st_dev}".encode(), digest_size=6).hexdigest()


def host_pool_name(name: str, host: str | None = None) -> str:
    """The name of pool ``name``'s segment on ``host`` (this one if None):
    ``NAME@HOST``, for ``Mempool.attach`` and ``shmpool-inspect``."""
    return check_name(f"{name}@{host if host is not None else host_id()}")


@dataclass
class _Local:
    """One PoolPlugin's pool in this process, and its membership."""

    name: str  # the plugin's name for it (without the host)
    host: str
    pool: Mempool
    group: ShareGroup
    users: int = 1  # the workers of this process that set it up


_locals: dict[str, _Local] = {}  # by the plugin's name
_lock = threading.Lock()


def local_pool(name: str | None = None) -> Mempool:
    """The pool a PoolPlugin opened in this worker process (the only one if
    ``name`` is None). LookupError if there is none of that name (no plugin
    registered, or outside a worker); ValueError if ``name`` is None and
    several plugins opened pools."""
    with _lock:
        if name is not None:
            local = _locals.get(name)
            if local is None:
                raise LookupError(f"no shmpool pool {name!r} in this process (register PoolPlugin({name!r}, ...) "
                                  f"with the client; it opens one in every worker)")
            return local.pool
        if len(_locals) == 1:
            return next(iter(_locals.values())).pool
    if not _locals:
        raise LookupError("no shmpool pool in this process: register shmpool.dask.PoolPlugin with the client "
                          "(client.register_plugin(...)), and call local_pool() in a task")
    raise ValueError(f"several shmpool pools in this process ({sorted(_locals)}): local_pool(name)")


class PoolPlugin(WorkerPlugin):
    """A worker plugin that opens host pool ``name`` in every worker
    (``Mempool.open`` with these arguments, and ``create_args`` as
    ``Mempool.create``'s), and leaves it when the worker closes or the
    plugin is unregistered; the last worker of a host destroys it. Its
    Dask name (``unregister_worker_plugin``) is ``"shmpool-" + name``."""

    idempotent = True

    def __init__(self, name: str, *, min_nr: int, slot_size: int, capacity: int, **create_args: Any) -> None:
        check_name(name)
        if "@" in name:
            raise ValueError(f"a PoolPlugin's name may not contain '@' (the host goes there), not {name!r}")
        self.pool_name = name
        self.name = f"shmpool-{name}"
        self.create_args = dict(create_args, min_nr=min_nr, slot_size=slot_size, capacity=capacity)

    def setup(self, worker: Any) -> None:
        host = host_id()
        with _lock:  # (workers of one process, processes=False: one pool, one membership, counted)
            local = _locals.get(self.pool_name)
            if local is not None and not local.pool.closed and local.host == host:
                local.users += 1
            else:
                pool = Mempool.open(host_pool_name(self.pool_name, host), **self.create_args)
                try:
                    local = _locals[self.pool_name] = _Local(self.pool_name, host, pool, ShareGroup(pool, GROUP))
                except BaseException:
                    pool.close()
                    raise
        overrides = worker.connection_args.setdefault("handshake_overrides", {})
        mine = overrides.setdefault(HANDSHAKE_KEY, {"host": host, "pools": {}})
        mine["pools"][self.pool_name] = [local.group.j, local.group.epoch]

    def teardown(self, worker: Any) -> None:
        mine = worker.connection_args.get("handshake_overrides", {}).get(HANDSHAKE_KEY)
        if mine is not None:
            mine["pools"].pop(self.pool_name, None)
        with _lock:
            local = _locals.get(self.pool_name)
            if local is None:
                return
            local.users -= 1
            if local.users > 0:
                return
            del _locals[self.pool_name]
        if not local.pool.closed:
            try:
                local.pool.leave()
            except (ShmpoolError, RuntimeError, TimeoutError, OSError):
                local.pool.close()  # its elements go back when this process ends


# ----------------------------------------------------------------------
# Serialization: numpy arrays, by reference on one host

_numpy_dumps = dask_serialize.dispatch(np.ndarray)
_numpy_loads = dask_deserialize.dispatch(np.ndarray)


def _reference(x: Array, ref: tuple[str, int, int], context: dict[str, Any]) -> list[Any] | None:
    """The reference ``x`` (a pool's array: ``owner_ref`` gave ``ref``)
    travels as, its share made; None: by value."""
    peer = (context.get("recipient") or {}).get(HANDSHAKE_KEY)
    if not isinstance(peer, dict):
        return None
    pool_name, handle, offset = ref
    with _lock:
        local = next((loc for loc in _locals.values() if loc.pool.name == pool_name), None)
    if local is None or peer.get("host") != local.host:
        return None
    member = (peer.get("pools") or {}).get(local.name)
    if not (isinstance(member, (list, tuple)) and len(member) == 2):  # (msgpack makes lists tuples)
        return None
    try:
        if not local.group.share(handle, int(member[0]), int(member[1])):
            return None
    except (ShmpoolError, ValueError, TypeError, TimeoutError):
        return None  # not ours to share (freed, sent on), or the pool went: the bytes go
    return [local.name, handle, int(member[0]), pickle.dumps(x.dtype), list(x.shape), list(x.strides), offset]


def _adopt(ref: list[Any]) -> Array:
    name, handle, member, dtype, shape, strides, offset = ref
    with _lock:
        local = _locals.get(name)
    if local is None or local.group.j != member:
        raise RuntimeError(f"a shmpool reference to pool {name!r} for member {member} arrived at a process that is "
                           f"not that member")
    local.group.take(handle)
    element = local.pool.array(handle, np.uint8, local.pool.slot_size)  # owning: released with the last view
    return np.ndarray(tuple(shape), pickle.loads(dtype), buffer=element, offset=offset, strides=tuple(strides))


def _land(x: Array) -> Array:
    """An array that arrived by value, in an element of this process's pool
    if it has exactly one and there is one free; else as it is."""
    with _lock:
        local = next(iter(_locals.values())) if len(_locals) == 1 else None
    if local is None or x.dtype.hasobject or not 0 < x.nbytes <= local.pool.slot_size:
        return x
    try:
        handle = local.pool.alloc(GFP_NOWAIT)
        if handle is None:
            return x
        element = local.pool.array(handle, np.uint8, local.pool.slot_size)
    except (ShmpoolError, TimeoutError):
        return x
    out: Array = np.ndarray(x.shape, x.dtype, buffer=element)
    out[...] = x
    return out


def _serialize(x: Array, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    ref = owner_ref(x) if context else None  # (no context: spilled to disk, by value)
    if ref is not None:
        reference = _reference(x, ref, context or {})
        if reference is not None:
            return {HANDSHAKE_KEY: reference}, []
    header, frames = _numpy_dumps(x, context=context)
    if ref is not None:  # a pool's array on its way to another host: lands in a pool there
        header = {**header, LAND_KEY: True}
    return header, frames


def _deserialize(header: dict[str, Any], frames: list[Any]) -> Array:
    ref = header.get(HANDSHAKE_KEY)
    if ref is not None:
        return _adopt(ref)
    x = _numpy_loads(header, frames)
    return _land(x) if header.get(LAND_KEY) else x


dask_serialize.register(np.ndarray)(_serialize)
dask_deserialize.register(np.ndarray)(_deserialize)
