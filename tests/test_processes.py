"""Several processes (and threads) on one pool: spawned children and separate
interpreters allocating, passing, freeing and sleeping, woken by each other."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import threading

import children
import numpy as np
import pytest
from conftest import SHM
from helpers import check_whole, run_python, wait_for

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, handle_slot

ctx = mp.get_context("spawn")


def exhaust(pool: Mempool) -> list[int]:
    """Take every element (arena and reserve); returns the handles."""
    held = []
    while (h := pool.alloc(GFP_ATOMIC)) is not None:
        held.append(h)
    assert pool.stats().in_use == pool.capacity
    return held


@pytest.mark.timeout(60)
def test_attach_read_and_write_across_processes(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=4) as pool:
        h = pool.alloc()
        pool.ndarray(h, np.int64, 4)[:] = [1, 2, 3, 4]
        q = ctx.Queue()
        p = spawn(children.read_and_reply, name, h, q)
        assert q.get(timeout=30) == [1, 2, 3, 4]
        p.join(30)
        assert p.exitcode == 0
        assert pool.ndarray(h, np.int64, 4).tolist() == [2, 4, 6, 8]
        pool.free(h)
        pool.destroy()


@pytest.mark.timeout(60)
def test_alloc_in_one_process_free_in_a_separate_interpreter(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        h = pool.alloc()
        pool.buffer(h)[:5] = b"hello"
        code = (
            "import sys, shmpool\n"
            "p = shmpool.Mempool.attach(sys.argv[1]); h = int(sys.argv[2])\n"
            "assert bytes(p.buffer(h)[:5]) == b'hello'\n"
            "p.free(h); p.close()\n"
            "print('freed')\n"
        )
        out = run_python(code, name, str(h))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "freed"
        s = pool.stats()
        assert (s.in_use, s.free_arena) == (0, 1)
        # and the handle is dead everywhere now
        out = run_python(code, name, str(h))
        assert out.returncode != 0 and "InvalidHandleError" in out.stderr
        pool.destroy()


@pytest.mark.timeout(60)
def test_gfp_kernel_sleeps_until_a_free_in_another_process_wakes_it(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        held = exhaust(pool)
        q = ctx.Queue()
        p = spawn(children.sleeping_alloc, name, q)
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to go to sleep")
        # Registered as a waiter, and still sleeping: nothing came back.
        assert p.is_alive()
        with pytest.raises(queue_mod.Empty):
            q.get(timeout=0.2)
        assert pool.stats().sleeps == 1
        freed = held.pop()
        out = run_python("import sys, shmpool; shmpool.Mempool.attach(sys.argv[1]).free(int(sys.argv[2]))", name, str(freed))
        assert out.returncode == 0, out.stderr
        status, h = q.get(timeout=30)  # only a wake-up can end its sleep in time
        assert status == "ok" and handle_slot(h) == handle_slot(freed)
        p.join(30)
        s = pool.stats()
        assert (s.nr_waiters, s.in_use, s.alloc_failed) == (0, 4, 1)  # the 1 is exhaust()'s
        for x in held + [h]:
            pool.free(x)
        # The wait channel is a word of the segment: nothing else was made.
        assert [e for e in os.listdir(SHM) if name in e] == [f"shmpool.{name}"]
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_gfp_atomic_returns_none_at_once_in_another_process(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        held = exhaust(pool)
        q = ctx.Queue()
        p = spawn(children.sleeping_alloc, name, q, GFP_ATOMIC)
        assert q.get(timeout=30) == ("ok", None)
        p.join(30)
        s = pool.stats()
        assert (s.sleeps, s.nr_waiters, s.alloc_failed) == (0, 0, 2)  # exhaust()'s and the child's
        for h in held:
            pool.free(h)
        pool.destroy()


@pytest.mark.timeout(60)
def test_destroy_wakes_sleepers_in_other_processes(name: str, spawn) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
    exhaust(pool)
    q = ctx.Queue()
    spawn(children.sleeping_alloc, name, q)
    wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
    pool.destroy(force=True)
    assert q.get(timeout=30) == ("error", "PoolDestroyedError")


@pytest.mark.timeout(60)
def test_several_sleepers_are_each_woken(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=3) as pool:
        held = exhaust(pool)
        q = ctx.Queue()
        for _ in range(3):
            spawn(children.sleeping_alloc, name, q)
        wait_for(lambda: pool.stats().nr_waiters == 3, what="three sleepers")
        for h in held:
            pool.free(h)
        got = sorted(handle_slot(q.get(timeout=30)[1]) for _ in range(3))
        assert got == [0, 1, 2]
        wait_for(lambda: pool.stats().nr_waiters == 0, what="the sleepers to settle")
        assert pool.stats().in_use == 3
        pool.destroy(force=True)


@pytest.mark.timeout(60)
def test_handles_passed_between_processes(name: str, spawn) -> None:
    # Seed 3 makes the first draw a fault: the producer's first allocation is
    # the first arena attempt whatever the timing (how many more there are
    # depends on it: with these 2 arena slots, maybe none), so a fault is
    # injected in every run.
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4, fail_rate=0.3, seed=3) as pool:
        q, results = ctx.Queue(), ctx.Queue()
        prod = spawn(children.producer, name, 200, q)
        spawn(children.consumer, name, q, results)
        seen = results.get(timeout=50)
        assert [i for _, i in seen] == list(range(200))
        assert {pid for pid, _ in seen} == {prod.pid}
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.alloc_failed) == (0, 2, 0)
        assert s.alloc_reserve > 0 and s.faults_injected > 0
        check_whole(pool)
        pool.destroy()


HAMMER_INTERPRETER = """
import sys, multiprocessing as mp
sys.path.insert(0, sys.argv[2])
import children

class Out:
    def put(self, item):
        print(repr(item))

children.hammer(sys.argv[1], int(sys.argv[3]), 99, Out())
"""


@pytest.mark.timeout(120)
def test_many_processes_hammer_one_pool_and_leave_it_whole(name: str, spawn, popen) -> None:
    iterations = 1500
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=10, fail_rate=0.3, seed=42) as pool:
        results = ctx.Queue()
        procs = [spawn(children.hammer, name, iterations, seed, results) for seed in range(4)]
        tests_dir = os.path.dirname(children.__file__)
        other = popen(HAMMER_INTERPRETER, name, tests_dir, str(iterations))
        reports = [results.get(timeout=100) for _ in procs]
        out, err = other.communicate(timeout=100)
        assert other.returncode == 0, err
        reports.append(eval(out.strip()))
        for ops, bad, errors in reports:
            assert errors == []
            assert bad == 0, "an element was handed to two holders"
            assert ops > iterations // 2
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.nr_waiters) == (0, 3, 0)
        assert s.alloc_arena + s.alloc_reserve == s.free_arena + s.free_reserve
        assert s.faults_injected > 0 and s.alloc_reserve > 0
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_threads_of_one_process_share_a_pool_safely(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=6, fail_rate=0.3, seed=9) as pool:
        errors: list[BaseException] = []

        def worker(tid: int) -> None:
            try:
                for i in range(300):
                    h = pool.alloc(GFP_KERNEL, timeout=20)
                    arr = pool.ndarray(h, np.int64, 2)
                    arr[:] = (tid, i)
                    assert tuple(arr) == (tid, i), "element shared by two holders"
                    pool.free(h)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        s = pool.stats()
        assert s.alloc_arena + s.alloc_reserve == 2400 and s.alloc_failed == 0
        assert (s.in_use, s.curr_nr, s.nr_waiters) == (0, 2, 0)
        check_whole(pool)
        pool.destroy()
