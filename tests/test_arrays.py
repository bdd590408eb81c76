"""Owning arrays (pool.array): an element freed when the last array or view
over it is gone, if this process still holds it."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from helpers import check_whole, wait_for
from procs import start_child

from shmpool import InvalidHandleError, Mempool, handle_of
from shmpool.testing import hold_lock


@pytest.fixture
def pool(name: str):
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as p:
        yield p


def test_the_last_reference_frees_the_element(pool: Mempool) -> None:
    h = pool.alloc()
    a = pool.array(h, np.float32, (4, 4))
    view = a[1:3, ::2]
    assert handle_of(a) == handle_of(view) == h and a.shape == (4, 4) and a.dtype == np.float32
    a[:] = 7
    assert (pool.ndarray(h, np.float32, 16) == 7).all()  # the same memory
    del a
    assert pool.stats().in_use == 1  # the view keeps it
    del view
    assert pool.stats().in_use == 0
    with pytest.raises(InvalidHandleError):
        pool.free(h)  # freed already
    check_whole(pool)


def test_free_and_put_take_an_owning_array_and_it_then_frees_nothing(pool: Mempool) -> None:
    a = pool.array(pool.alloc())
    pool.free(a)
    h = pool.alloc()  # the same slot again, most likely: the array must not free it
    del a
    assert pool.stats().in_use == 1
    q = pool.queue("q", depth=2)
    b = pool.array(h)
    q.put(b)
    del b
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 1)  # the queue's, not freed
    got = pool.array(q.get())
    assert handle_of(got) == h
    del got
    assert pool.stats().in_use == 0
    check_whole(pool)


def test_handle_of_refuses_what_is_not_an_owning_array(pool: Mempool) -> None:
    h = pool.alloc()
    for other in (np.zeros(4), pool.ndarray(h), b"x", 3):
        with pytest.raises(ValueError, match="not an owning array"):
            handle_of(other)
    pool.free(h)


def test_an_element_adopted_elsewhere_is_not_freed_by_the_array(pool: Mempool, name: str, popen) -> None:
    h = pool.alloc()
    a = pool.array(h)
    other = start_child(popen, name)
    other.call(f"pool.adopt({h})")
    del a
    assert pool.stats().in_use == 1  # the other process's now
    other.call(f"pool.free({h})")
    other.finish()
    assert pool.stats().in_use == 0


def test_a_consumer_that_drops_the_array_returns_the_element(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=4)
    consumer = start_child(popen, name)
    consumer.call("q = pool.queue('q')")
    for i in range(3):
        a = pool.array(pool.alloc(), np.int64, 8)
        a[:] = i
        q.put(a)
    del a
    sums = consumer.call("[int(pool.array(q.get(), np.int64, 8).sum()) for _ in range(3)]")
    assert sums == [0, 8, 16]  # each array dropped at once inside the comprehension
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 0)
    consumer.finish()
    check_whole(pool)


def test_the_finalizer_runs_anywhere_the_collector_does(pool: Mempool) -> None:
    """In another thread, inside a collection of a reference cycle."""
    class Cycle:
        pass

    c = Cycle()
    c.me = c  # type: ignore[attr-defined]
    c.a = pool.array(pool.alloc())  # type: ignore[attr-defined]
    del c
    t = threading.Thread(target=gc.collect)
    t.start()
    t.join(10)
    assert pool.stats().in_use == 0
    check_whole(pool)


def test_a_finalizer_behind_a_held_lock_parks_the_element(pool: Mempool) -> None:
    a = pool.array(pool.alloc())
    with hold_lock(pool):
        del a  # the lock does not come within the atomic bound: parked, no exception, no hang
    wait_for(lambda: pool.stats().in_use == 0, what="the parked element to be returned")
    check_whole(pool)
