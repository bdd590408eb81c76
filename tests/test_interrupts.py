"""Code that runs at any instant: signal handlers that raise, the garbage
collector's __del__, another thread's close(), a thread that hogs the GIL;
and timeouts of any size. None of them may leave the lock held, a sleeper
counted, or an element lost, and every wait ends as documented.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Any

import children
import pytest
from helpers import assert_settled, check_whole, wait_for
from procs import ATTACH_CODE, header_word, timed

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, PoolClosedError, _layout

ctx = mp.get_context("spawn")


def report(q: Any, timeout: float, who: str = "a child") -> Any:
    """The next report on ``q``; fails the test, saying who, if none comes
    in time (a wedged child)."""
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no report from {who} within {timeout} s: wedged?")


# ----------------------------------------------------------------------
# Signal handlers that raise inside operations


@pytest.mark.timeout(300)
def test_exceptions_from_signal_handlers_inside_operations_leave_no_lock_held_and_lose_nothing(
    name: str, spawn
) -> None:
    # An interrupt that arrives during a call that hands out elements is
    # raised when it returns, before the caller has recorded them: those
    # stay held by the live process until reclaim_dead after its exit. Up
    # to 8 per interrupt here, hence the capacity.
    with Mempool.create(name, min_nr=16, slot_size=16, capacity=32768) as pool:
        go, results = ctx.Event(), ctx.Queue()
        kids = [spawn(children.interrupted_worker, name, 1500, 0.0005, seed, go, results) for seed in (1, 2)]
        for _ in kids:
            fired, ops, errors = report(results, 120, "an interrupted worker")
            assert errors == []
            assert fired >= 1500 and ops > 0
        # Both are alive and idle: neither may have left the lock held.
        assert header_word(name, _layout.H_LOCK_OWNER) == 0
        h, took = timed(lambda: pool.alloc(GFP_ATOMIC))
        assert h is not None, "the lock is held by an idle live process"
        assert took < 1.0
        pool.free(h)
        s = pool.stats()
        assert s.nr_waiters == 0  # nobody sleeps
        assert s.lock_recoveries == 0
        go.set()
        for _ in kids:
            assert report(results, 60, "an interrupted worker") == []  # what they know they hold, they free
        for p in kids:
            p.join(30)
            assert p.exitcode == 0
        pool.reclaim_dead()  # what an interrupt made them lose track of
        assert_settled(pool, in_use=0, nr_waiters=0, curr_nr=16)
        pool.destroy()


@pytest.mark.timeout(300)
def test_a_sleeping_alloc_interrupted_by_a_raising_handler_leaks_no_waiter(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        mine = [pool.alloc(GFP_ATOMIC) for _ in range(4)]  # the pool is dry
        assert None not in mine
        commands, results = ctx.Queue(), ctx.Queue()
        child = spawn(children.interrupted_sleeper, name, 300, 0.0007, commands, results)
        fired, _, errors = report(results, 120, "the interrupted sleeper")
        assert errors == [] and fired >= 300
        assert pool.stats().sleeps > 0  # the interrupts found allocations asleep
        # The child lives on, sleeping nowhere: no sleeper may be counted.
        assert pool.stats().nr_waiters == 0
        for k in range(10):
            commands.put("sleep")
            wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
            os.kill(child.pid, signal.SIGUSR1)
            assert report(results, 30, "the sleeper") == ("interrupted", k)
            assert pool.stats().nr_waiters == 0
        # And a sleeper that a free wakes is still woken.
        commands.put("alloc")
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        pool.free(mine.pop())
        what, _ = report(results, 30, "the sleeper")
        assert what == "got"
        commands.put(None)
        assert report(results, 30, "the sleeper") == ("done", [])
        child.join(30)
        assert child.exitcode == 0
        for h in mine:
            pool.free(h)
        assert pool.reclaim_dead() == 0
        assert_settled(pool, in_use=0, nr_waiters=0, curr_nr=2)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_signal_handlers_exception_ends_a_sleep_and_uncounts_the_sleeper(name: str, popen) -> None:
    # posix_ipc drops exceptions raised by signal handlers during its waits;
    # shmpool's waits let them through, and the sleeper uncounts itself.
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as pool:
        h = pool.alloc()
        code = (
            "import signal\n"
            "def stop(*args):\n    raise SystemExit(7)\n"
            "signal.signal(signal.SIGTERM, stop)\n" + ATTACH_CODE + "print('sleeping', flush=True)\npool.alloc()\n"
        )
        child = popen(code, name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 7
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        pool.destroy()

# ----------------------------------------------------------------------
# The garbage collector runs __del__ at any instant


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", ["reserve", "arena"])
def test_a_del_that_frees_run_by_the_collector_wedges_nothing(name: str, spawn, path: str) -> None:
    # "reserve": every element is the reserve's, so that every free in a
    # __del__ needs the lock; "arena": frees go through the cache.
    min_nr = 256 if path == "reserve" else 8
    with Mempool.create(name, min_nr=min_nr, slot_size=16, capacity=256) as pool:
        results = ctx.Queue()
        child = spawn(children.collector_frees, name, 3.0, 1, results)
        rounds, made, freed, errors, in_use = report(results, 60, "the child whose __del__ frees")
        child.join(30)
        assert child.exitcode == 0
        assert errors == []
        assert rounds > 0 and freed == made  # every collected object freed its element
        assert in_use == 0
        h, took = timed(lambda: pool.alloc(GFP_ATOMIC))
        assert h is not None and took < 1.0
        pool.free(h)
        assert pool.reclaim_dead() == 0
        assert_settled(pool, in_use=0, nr_waiters=0, lock_recoveries=0)
        pool.destroy()



# ----------------------------------------------------------------------
# A lock holder starved of the GIL by its own thread


@pytest.mark.timeout(300)
def test_a_lock_holder_starved_of_the_gil_by_its_own_thread_is_not_robbed(name: str, spawn) -> None:
    # The hog's stats() thread takes the lock while its main thread holds
    # the GIL for half a second at a time; two others hammer the reserve.
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=8, fail_rate=1.0) as pool:
        hog_results, work_results = ctx.Queue(), ctx.Queue()
        hog = spawn(children.gil_hog, name, 4.0, hog_results)
        workers = [spawn(children.hammer, name, 10_000, seed, work_results) for seed in (1, 2)]
        calls, sorts, errors = report(hog_results, 240, "the GIL hog")
        assert errors == [] and calls > 0 and sorts > 0
        for _ in workers:
            ops, bad, errors = report(work_results, 240, "a hammer")
            assert errors == [] and bad == 0 and ops > 0
        for p in [hog, *workers]:
            p.join(30)
            assert p.exitcode == 0
        assert_settled(pool, lock_recoveries=0, in_use=0, curr_nr=4)
        pool.destroy()




# ----------------------------------------------------------------------
# close() from another thread


def sleeper_thread(fn: Any) -> tuple[threading.Thread, queue.Queue[Any]]:
    out: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            out.put(("ok", fn()))
        except BaseException as exc:
            out.put((type(exc).__name__, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["alloc", "alloc_bulk", "get", "put"])
def test_close_from_another_thread_wakes_the_objects_sleeper_at_once(name: str, call: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3) as owner:
        q = owner.queue("q", depth=1)
        held = [owner.alloc(), owner.alloc()]  # the arena's two: the reserve's one is left
        if call == "alloc":
            held.append(owner.alloc())  # dry
        if call == "put":
            q.put(held.pop())  # full
        pool = Mempool.attach(name)
        pq = pool.queue("q")
        mine = pool.alloc(GFP_ATOMIC) if call == "put" else None
        fn = {
            "alloc": lambda: pool.alloc(GFP_KERNEL),
            "alloc_bulk": lambda: pool.alloc_bulk(2),  # all or nothing: the one left is not enough
            "get": lambda: pq.get(),
            "put": lambda: pq.put(mine),
        }[call]
        t, out = sleeper_thread(fn)
        wait_for(lambda: owner.stats().nr_waiters == 1, what="the thread to sleep")
        (_, took) = timed(pool.close)
        t.join(2.0)  # far below the 5 s (1 s for queues) retry: only the close can have woken it
        assert not t.is_alive()
        kind, exc = out.get_nowait()
        assert kind == "PoolClosedError", (kind, exc)
        assert took < 2.0
        assert owner.stats().nr_waiters == 0  # counted out
        for h in held + ([mine] if mine is not None else []):  # a close keeps what the process holds
            owner.free(h)
        if call == "put":
            owner.free(q.get_nowait())
        owner.destroy()


@pytest.mark.timeout(60)
def test_close_wakes_an_alloc_async_and_counts_it_out(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as owner:
        h = owner.alloc()
        pool = Mempool.attach(name)

        async def main() -> tuple[str, float]:
            task = asyncio.ensure_future(pool.alloc_async(GFP_KERNEL))
            deadline = time.monotonic() + 10
            while owner.stats().nr_waiters != 1:  # a poll with a deadline, without blocking the loop
                assert time.monotonic() < deadline, "the coroutine never slept"
                await asyncio.sleep(0.001)
            t0 = time.monotonic()
            threading.Thread(target=pool.close).start()  # from another thread
            try:
                await asyncio.wait_for(task, 4.0)  # below the 5 s retry
            except PoolClosedError:
                return "PoolClosedError", time.monotonic() - t0
            return "returned", time.monotonic() - t0

        kind, took = asyncio.run(main())
        assert kind == "PoolClosedError" and took < 4.0
        assert owner.stats().nr_waiters == 0  # never left counted for the life of the process
        owner.free(h)
        owner.destroy()


# ----------------------------------------------------------------------
# Timeouts of any size


@pytest.mark.timeout(60)
def test_a_huge_timeout_waits_as_long_as_asked_and_never_overflows(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2) as pool:
        q = pool.queue("q", depth=1)
        for huge in (1e300, 10**400, 2**63):
            h = pool.alloc(GFP_KERNEL, timeout=huge)  # an element is free: at once
            hs = pool.alloc_bulk(1, timeout=huge)
            assert hs is not None
            q.put(h, timeout=huge)
            assert q.get(timeout=huge) == h
            q.put(h)
            assert asyncio.run(q.get_async(timeout=huge)) == h
            pool.free(h)
            pool.free_bulk(hs)
        # And it waits: a sleeper with a huge timeout is woken by a free.
        held = [pool.alloc(), pool.alloc()]
        t, out = sleeper_thread(lambda: pool.alloc(GFP_KERNEL, timeout=1e300))
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the sleeper")
        pool.free(held.pop())
        t.join(10)
        kind, got = out.get_nowait()
        assert kind == "ok" and got is not None
        pool.free(got)
        pool.free(held.pop())
        for bad in (float("inf"), float("nan"), -1):
            with pytest.raises(ValueError):
                pool.alloc(GFP_KERNEL, timeout=bad)
        with pytest.raises(TypeError):
            pool.alloc(GFP_KERNEL, timeout="1")
        check_whole(pool)
        pool.destroy()
