"""Owning arrays (pool.array): an element freed when the last array or view
over it is gone, if this process still holds it."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from helpers import check_whole, wait_for
from procs import start_child

from shmpool import GFP_ATOMIC, InvalidHandleError, Mempool, PoolFormatError, handle_of
from shmpool.testing import hold_lock, views


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


def test_dtype_and_shape_travel_with_the_element(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=2)
    a = pool.alloc_array((2, 3), np.float32)
    a[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    q.put(a)
    del a
    consumer = start_child(popen, name)
    got = consumer.call("(lambda a: (str(a.dtype), a.shape, a.tolist()))(pool.array(pool.queue('q').get()))")
    assert got == ("float32", (2, 3), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert pool.stats().in_use == 0  # the consumer's array went with its last reference
    consumer.finish()


def test_a_descriptor_is_its_generations_only(pool: Mempool) -> None:
    a = pool.alloc_array(4, np.int16)
    h = handle_of(a)
    assert pool.ndarray(h).dtype == np.int16 and pool.ndarray(h, np.uint8).shape == (64,)  # given: as asked
    pool.free(a)
    again = [pool.alloc() for _ in range(8)]  # every slot, its own among them, under a new generation
    assert all(pool.ndarray(x).dtype == np.uint8 and pool.ndarray(x).shape == (64,) for x in again)
    pool.free_bulk(again)


def test_alloc_array_refuses_what_does_not_fit(pool: Mempool) -> None:
    for shape, dtype in (((9,), np.float64), ((1, 1, 1, 1, 1), np.uint8), ((-1,), np.uint8), (8, "S9"),
                         (1, [("a", "i4"), ("b", "f4")])):
        with pytest.raises(ValueError):
            pool.alloc_array(shape, dtype)
    with pytest.raises(TypeError):
        pool.alloc_array(2, object)
    with pytest.raises(TypeError):
        pool.alloc_array("2", np.uint8)
    assert pool.stats().in_use == 0  # refused before anything was allocated
    held = [pool.alloc_array(8, np.uint8, GFP_ATOMIC) for _ in range(8)]
    assert pool.alloc_array(8, np.uint8, GFP_ATOMIC) is None  # where alloc returns None
    del held
    assert pool.stats().in_use == 0


def test_a_damaged_descriptor_is_a_format_error(pool: Mempool) -> None:
    a = pool.alloc_array(4, np.int32)
    h = handle_of(a)
    slot = h & 0xFFFFFF
    desc = views(pool).desc
    desc[4 * slot + 1] = int.from_bytes(b"<q9\x00\x00\x00\x00\x00", "little")  # no dtype
    with pytest.raises(PoolFormatError, match="descriptor"):
        pool.ndarray(h)
    desc[4 * slot + 1] = int.from_bytes(b"<f8\x00\x00\x00\x00\x00", "little")
    desc[4 * slot + 2] = 10**6  # a million float64: beyond the slot
    with pytest.raises(PoolFormatError, match="descriptor"):
        pool.array(h)
    assert pool.ndarray(h, np.int32, 4).shape == (4,)  # asked for explicitly: as ever
    pool.free(a)
