"""Mempool.leave: a process lets go of a pool, everything it holds comes
back, and of several processes leaving at once exactly the last destroys
the pool (one step under the pool lock with the count of who is
attached), with real processes."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from children import hold_then_leave
from helpers import check_whole, wait_for

from shmpool import Mempool, PoolClosedError
from shmpool.testing import segment_path


def test_leave_gives_back_what_the_process_holds(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        other = Mempool.attach(name)  # a second object of this process: closed by the leave too
        [pool.alloc() for _ in range(3)]
        sub = pool.topic("t", 4).subscribe()
        assert pool.stats().attached == 1
        assert pool.leave() is True  # nobody else attached: destroyed
        assert pool.closed and other.closed and sub.closed
        with pytest.raises(PoolClosedError):
            other.alloc()
        with pytest.raises(PoolClosedError):
            pool.leave()
    assert not os.path.exists(segment_path(name))


def test_of_processes_leaving_at_once_exactly_the_last_destroys(name: str, spawn) -> None:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    pool = Mempool.create(name, min_nr=2, slot_size=64, capacity=32)
    kids = [spawn(hold_then_leave, name, 3, ready, go, results) for _ in range(4)]
    for _ in kids:
        ready.get(timeout=60)
    s = pool.stats()
    assert (s.attached, s.in_use) == (5, 12)
    assert pool.leave() is False  # the children are attached: it lives on
    go.set()
    verdicts = [results.get(timeout=60) for _ in kids]
    for k in kids:
        k.join(30)
    assert sorted(verdicts) == [False, False, False, True]
    assert not os.path.exists(segment_path(name))


def test_a_leaver_that_is_not_last_leaves_the_pool_whole(name: str, spawn) -> None:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        kid = spawn(hold_then_leave, name, 5, ready, go, results)
        ready.get(timeout=60)
        assert pool.stats().in_use == 5
        go.set()
        assert results.get(timeout=60) is False
        kid.join(30)
        s = pool.stats()
        assert (s.in_use, s.attached) == (0, 1)
        check_whole(pool)


def test_leave_is_refused_while_a_thread_of_the_process_waits(name: str) -> None:
    import threading

    with Mempool.create(name, min_nr=1, slot_size=64, capacity=2).destroying() as pool:
        held = [pool.alloc(), pool.alloc()]
        got: list[int] = []
        sleeper = threading.Thread(target=lambda: got.append(pool.alloc(timeout=60)))
        sleeper.start()
        wait_for(lambda: pool.stats().nr_waiters > 0, 30, "the thread asleep in alloc")
        before = pool.stats()
        with pytest.raises(RuntimeError, match="waiting"):
            pool.leave()
        assert not pool.closed and pool.stats().in_use == before.in_use == 2
        pool.free(held.pop())
        sleeper.join(30)
        assert len(got) == 1
        pool.free(got.pop())
        pool.free(held.pop())
