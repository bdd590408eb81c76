"""The public surface: every public name of a pool and a queue is in the
README, and the geometry cannot be assigned."""

from __future__ import annotations

import os
import re

import pytest

from shmpool import Mempool

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_every_public_name_of_a_pool_and_a_queue_is_in_the_readme(name: str) -> None:
    with open(README) as f:
        text = f.read()
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        q = pool.queue("q", depth=2)
        names = public(pool) | public(q)
        assert {"alloc", "free", "buffer", "ndarray", "queue", "put", "get"} <= names
        missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
        assert missing == []


@pytest.mark.parametrize("attr", ["name", "min_nr", "slot_size", "capacity", "closed"])
def test_a_pools_geometry_is_read_only(name: str, attr: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        before = getattr(pool, attr)
        with pytest.raises(AttributeError):
            setattr(pool, attr, before)
        assert getattr(pool, attr) == before


@pytest.mark.parametrize("attr", ["name", "depth"])
def test_a_queues_name_and_depth_are_read_only(name: str, attr: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        q = pool.queue("q", depth=2)
        with pytest.raises(AttributeError):
            setattr(q, attr, 3)
        assert (q.name, q.depth) == ("q", 2)


def test_the_compiled_core_is_held_not_inherited(name: str) -> None:
    from shmpool._fast import Core

    assert Mempool.__mro__ == (Mempool, object)
    for method in ("alloc", "free", "buffer", "ndarray"):
        assert getattr(Mempool, method).__doc__  # documented, typed (help() and mypy see it)
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        assert not isinstance(pool, Core)
        h = Mempool.alloc(pool)  # the documented method does what the bound one does
        Mempool.free(pool, h)
        assert pool.stats().in_use == 0


def test_a_hot_path_method_kept_after_its_pool_is_gone_raises_closed(name: str) -> None:
    import gc

    from shmpool import PoolClosedError

    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=4)
    alloc, free = pool.alloc, pool.free
    h = alloc()
    free(h)  # works while the pool lives
    pool.close()
    del pool
    gc.collect()
    with pytest.raises(PoolClosedError):
        alloc()
    with pytest.raises(PoolClosedError):
        free(h)
    Mempool.attach(name).destroy()
