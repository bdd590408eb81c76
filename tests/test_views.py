"""Views of an element: ``buffer`` (a memoryview) and ``ndarray`` (numpy),
no copy, over the pool's shared memory; only a held element has them, and
they outlive the pool object that made them."""

from __future__ import annotations

import numpy as np
import pytest

from shmpool import GFP_ATOMIC, InvalidHandleError, Mempool


@pytest.fixture
def pool(name: str):
    p = Mempool.create(name, min_nr=3, slot_size=64, capacity=8)
    yield p
    p.close()


def test_buffer_and_ndarray_are_the_same_bytes(pool: Mempool) -> None:
    h = pool.alloc()
    pool.buffer(h)[:8] = (12345).to_bytes(8, "little")
    assert pool.ndarray(h, np.int64, 1)[0] == 12345
    arr = pool.ndarray(h, np.float64, (2, 4))
    arr[:] = 1.5
    assert bytes(pool.buffer(h)) == np.full(8, 1.5).tobytes()
    pool.free(h)


def test_ndarray_shape_must_fit(pool: Mempool) -> None:
    h = pool.alloc()
    with pytest.raises(ValueError):
        pool.ndarray(h, np.float64, 9)
    with pytest.raises(ValueError):
        pool.ndarray(h, np.uint8, (-1,))
    with pytest.raises(TypeError):
        pool.ndarray(h, object)
    assert pool.ndarray(h, np.float64).shape == (8,)
    assert pool.ndarray(h).dtype == np.uint8 and pool.ndarray(h).shape == (64,)
    pool.free(h)


def test_buffer_of_a_free_handle_is_refused(pool: Mempool) -> None:
    h = pool.alloc()
    pool.free(h)
    with pytest.raises(InvalidHandleError):
        pool.buffer(h)
    with pytest.raises(InvalidHandleError):
        pool.ndarray(h)


def test_slots_are_8_byte_aligned(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=13, capacity=5) as p:
        hs = [p.alloc(GFP_ATOMIC) for _ in range(5)]
        for h in hs:
            assert p.ndarray(h, np.uint8).ctypes.data % 8 == 0
            assert p.ndarray(h, np.uint8).nbytes == 13
            assert len(p.buffer(h)) == 13
        for h in hs:
            p.free(h)
        p.destroy()


def test_views_outlive_close_and_are_the_pools_memory(name: str) -> None:
    p = Mempool.create(name, min_nr=1, slot_size=32, capacity=4)
    h = p.alloc()
    mv = p.buffer(h)
    arr = p.ndarray(h, np.int32)
    p.close()
    p.close()  # twice is fine
    mv[:4] = b"abcd"  # the mapping is still there
    arr[1] = 77
    assert bytes(mv[:4]) == b"abcd" and bytes(mv[4:8]) == (77).to_bytes(4, "little")
    with Mempool.attach(name) as q:  # and it is the pool's memory, seen by others
        assert bytes(q.buffer(h)[:8]) == b"abcd" + (77).to_bytes(4, "little")
        q.free(h)
        del mv, arr
        q.destroy()
