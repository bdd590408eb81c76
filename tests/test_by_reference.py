"""Pool-backed arrays through multiprocessing (Queue, ProcessPoolExecutor,
Pool): by reference, with the receiver as the element's holder."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor

import children
import numpy as np
import pytest
from helpers import check_whole

from shmpool import InvalidHandleError, Mempool, handle_of

ctx = mp.get_context("spawn")


@pytest.fixture
def pool(name: str):
    with Mempool.create(name, min_nr=2, slot_size=1 << 20, capacity=8).destroying() as p:
        yield p


@pytest.mark.timeout(120)
def test_an_array_through_mp_queue_arrives_as_the_same_memory(pool: Mempool) -> None:
    channel, back, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    a = pool.alloc_array((2, 3), np.float64)
    a[:] = 1.5
    h = handle_of(a)
    p = ctx.Process(target=children.receive_array, args=(channel, back, go))
    p.start()
    try:
        channel.put(a)
        dtype, shape, values, handle = back.get(timeout=60)
        assert (dtype, shape, handle) == (a.dtype.str, (2, 3), h) and values == [[1.5] * 3] * 2
        assert back.get(timeout=60) == "written"
        assert a[0].tolist() == [42.0] * 3 and a[1].tolist() == [1.5] * 3  # its write, in our memory: no copy
        del a  # sent: ours no longer, so our finalizer frees nothing
        assert pool.stats().in_use == 1  # the receiver holds it
        go.set()
        assert back.get(timeout=60) == "dropped"
        assert pool.stats().in_use == 0  # its last reference went: back in the pool
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        channel.close()
        back.close()
    check_whole(pool)


@pytest.mark.timeout(120)
def test_arrays_through_process_pools_go_both_ways_by_reference(pool: Mempool) -> None:
    arrays = [pool.alloc_array(4, np.int64) for _ in range(3)]
    for i, a in enumerate(arrays):
        a[:] = i + 1
    handles = [handle_of(a) for a in arrays]
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        back = ex.submit(children.scale_in_place, arrays[0], 3).result(timeout=60)
    assert handle_of(back) == handles[0] and back.tolist() == [3] * 4
    assert arrays[0].tolist() == [3] * 4  # the task wrote into our element (another mapping of it came back)
    back[0] = -1
    assert arrays[0][0] == -1
    with ctx.Pool(2) as workers:
        results = workers.map(children.scale_in_place, arrays[1:])
    assert [r.tolist() for r in results] == [[4] * 4, [6] * 4] == [a.tolist() for a in arrays[1:]]
    assert [handle_of(r) for r in results] == handles[1:]
    assert pool.stats().in_use == 3  # each came back to us
    del arrays, back, results
    assert pool.stats().in_use == 0
    check_whole(pool)


def test_a_stale_reference_is_refused_and_plain_pickle_copies(pool: Mempool) -> None:
    a = pool.alloc_array(4, np.int32)
    a[:] = 5
    copied = pickle.loads(pickle.dumps(a))  # not multiprocessing's pickler: a copy
    assert copied.tolist() == [5] * 4 and not np.shares_memory(copied, a)
    from multiprocessing.reduction import ForkingPickler

    sent = bytes(ForkingPickler.dumps(a))
    pool.free(a)  # freed before the reference arrives
    with pytest.raises(InvalidHandleError):
        pickle.loads(sent)
    assert pool.stats().in_use == 0
    plain = np.arange(5)
    assert pickle.loads(bytes(ForkingPickler.dumps(plain))).tolist() == plain.tolist()
