"""alloc_bulk / free_bulk: the reserve part all or nothing, nothing held
while waiting (KERNEL.md says how they differ from the kernel's bulk calls,
which are in linux-next, not in a release)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import children
import numpy as np
import pytest
from helpers import check_whole, in_thread, snapshot, wait_for
from procs import start_child

from shmpool import GFP_ATOMIC, GFP_KERNEL, InvalidHandleError, Mempool, handle_slot

ctx = mp.get_context("spawn")


def test_bulk_takes_the_arena_first_then_the_reserve(name: str) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=10) as pool:
        hs = pool.alloc_bulk(9, GFP_ATOMIC)
        assert hs.dtype == np.int64 and len(set(handle_slot(h) for h in hs.tolist())) == 9
        s = pool.stats()
        assert (s.alloc_arena, s.alloc_reserve, s.in_use, s.curr_nr) == (7, 2, 9, 1)
        pool.free_bulk(hs)
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.free_reserve, s.free_arena) == (0, 3, 2, 7)
        check_whole(pool)
        pool.destroy()


def test_the_reserve_part_is_all_or_nothing(name: str) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=6, fail_rate=1.0, seed=2) as pool:
        before = pool.stats()
        assert pool.alloc_bulk(4, GFP_ATOMIC) is None  # the reserve has 3: none taken
        after = pool.stats()
        assert (after.in_use, after.curr_nr, after.alloc_failed) == (0, 3, before.alloc_failed + 1)
        hs = pool.alloc_bulk(3, GFP_ATOMIC)
        assert pool.stats().alloc_reserve == 3
        pool.free_bulk(hs)
        with pytest.raises(TimeoutError):
            pool.alloc_bulk(4, GFP_KERNEL, timeout=0.1)
        assert pool.stats().in_use == 0 and pool.stats().nr_waiters == 0
        pool.destroy()


def test_bulk_frees_in_the_order_of_single_frees(name: str) -> None:
    stacks = []
    for i, bulk in enumerate((True, False)):
        with Mempool.create(f"{name}{i}", min_nr=3, slot_size=16, capacity=12) as pool:
            hs = [pool.alloc(GFP_ATOMIC) for _ in range(12)]
            order = hs[5:] + hs[:5]
            if bulk:
                pool.free_bulk(np.array(order))
            else:
                for h in order:
                    pool.free(h)
            again = [handle_slot(pool.alloc(GFP_ATOMIC)) for _ in range(12)]
            stacks.append(again)
            pool.destroy(force=True)
    assert stacks[0] == stacks[1]


@pytest.mark.parametrize(
    "make_bad, exc, match",
    [
        (lambda hs: ["x", "y"], TypeError, "is an int, not str|must be integers"),
        (lambda hs: np.array([1.0, 2.0]), TypeError, "is an int, not numpy.float64|must be integers"),
        (lambda hs: [hs[0], -1], ValueError, "out of range"),
        (lambda hs: [hs[0], hs[1], hs[0]], InvalidHandleError, "twice"),
        (lambda hs: [hs[0], hs[1] ^ (1 << 50)], InvalidHandleError, "another pool's"),
        (lambda hs: [hs[0], hs[2] + (1 << 24)], InvalidHandleError, "stale|not held"),
    ],
)
@pytest.mark.parametrize("form", [list, tuple, np.asarray], ids=["list", "tuple", "array"])
def test_a_refused_free_bulk_frees_nothing(name: str, make_bad, exc, match, form) -> None:
    """A list, a tuple and an array of handles: the same refusals, each
    changing nothing."""
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        hs = pool.alloc_bulk(3, GFP_ATOMIC).tolist()
        before = snapshot(pool)
        with pytest.raises(exc, match=match):
            pool.free_bulk(form(make_bad(hs)))
        assert snapshot(pool) == before
        pool.free_bulk(form(hs))
        assert pool.stats().in_use == 0
        pool.destroy()


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_free_bulk_takes_every_integer_array_and_big_batches(name: str, dtype) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=5000) as pool:
        hs = pool.alloc_bulk(4500)
        pool.free_bulk(hs.astype(dtype)[::-1])  # reversed: a view with a negative stride
        assert pool.stats().in_use == 0
        pool.destroy()


def test_bulk_argument_checks(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        for bad in (-1, 5):
            with pytest.raises(ValueError):
                pool.alloc_bulk(bad)
        with pytest.raises(TypeError):
            pool.alloc_bulk(2.0)  # type: ignore[arg-type]
        assert pool.alloc_bulk(0).size == 0
        pool.free_bulk([])
        pool.destroy()


@pytest.mark.timeout(60)
def test_two_bulk_sleepers_cannot_deadlock(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        held = pool.alloc_bulk(3, GFP_ATOMIC)  # one left
        results = ctx.Queue()
        for _ in range(2):
            spawn(children.bulk_sleeper, name, 3, results)
        wait_for(lambda: pool.stats().nr_waiters == 2, what="both bulk callers to sleep")
        assert pool.stats().in_use == 3  # they hold nothing while they wait
        pool.free_bulk(held)
        assert sorted(results.get(timeout=40) for _ in range(2)) == [(3, True), (3, True)]
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.nr_waiters) == (0, 2, 0)
        check_whole(pool)
        pool.destroy()


def test_a_handle_given_twice_is_refused_in_a_small_batch_of_a_big_pool(name: str) -> None:
    # A batch much smaller than the pool is checked by sorting the batch
    # alone (a big one by a map of the slots): both refuse a repeat.
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=1000) as pool:
        hs = [pool.alloc() for _ in range(3)]
        before = snapshot(pool)
        with pytest.raises(InvalidHandleError, match="given twice"):
            pool.free_bulk([hs[0], hs[1], hs[0]])
        assert snapshot(pool) == before
        pool.free_bulk(hs)
        pool.destroy()


#: A peer that asks for n elements at once and reports how many it got.
BULK_PEER = """
import sys
from shmpool import GFP_KERNEL, Mempool
pool = Mempool.attach(sys.argv[1])
hs = pool.alloc_bulk(int(sys.argv[2]), GFP_KERNEL, timeout=30)
print(len(hs), flush=True)
pool.free_bulk(hs)
pool.close()
"""


@pytest.mark.timeout(60)
def test_bulk_waits_holding_nothing_and_free_bulk_takes_everything(name: str, popen) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=6) as pool:
        pool.set_fail_rate(1.0)
        mine = pool.alloc(GFP_ATOMIC)  # from the reserve: 2 of 3 left, 3 in the arena
        pool.set_fail_rate(0.0)
        # 6 at once: 3 from the arena, 3 from a reserve of 2: all or nothing.
        assert pool.alloc_bulk(6, GFP_ATOMIC) is None
        assert pool.stats().in_use == 1
        peer = popen(BULK_PEER, name, "6")
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the bulk caller to sleep")
        s = pool.stats()
        # The kernel's mempool_alloc_bulk would hold the 3 arena elements while it waits.
        assert (s.in_use, s.arena_free, s.curr_nr) == (1, 3, 2)
        pool.free(mine)  # refills the reserve and wakes it: 3 + 3
        assert peer.stdout.readline().strip() == "6", peer.stderr.read()
        assert peer.wait(timeout=30) == 0, peer.stderr.read()
        # n above min_nr is fine here (the kernel warns); free_bulk frees all
        # of them and returns nothing (the kernel's returns how many it put
        # in the reserve, leaving the rest to the caller).
        hs = pool.alloc_bulk(6, GFP_ATOMIC)
        assert pool.free_bulk(hs) is None
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.arena_free) == (0, 3, 3)
        check_whole(pool)
        pool.destroy()


def bulk_in_thread(pool: Mempool, n: int) -> tuple[threading.Event, list]:
    pool.long_sleep = None  # (the long-sleep report would end its sleep after 5 s, woken or not)
    done, out = in_thread(lambda: pool.alloc_bulk(n, GFP_KERNEL, timeout=50))
    wait_for(lambda: pool.stats().nr_waiters == 1, what="alloc_bulk to sleep")
    return done, out


def slept_again(pool: Mempool, free) -> None:
    """free() one element and wait until the sleeping alloc_bulk has been
    woken, found too little, and sleeps again."""
    sleeps = pool.stats().sleeps
    free()
    wait_for(lambda: pool.stats().sleeps == sleeps + 1 and pool.stats().nr_waiters == 1,
             what="alloc_bulk to wake and sleep again")


@pytest.mark.timeout(60)
def test_a_sleeping_bulk_alloc_is_woken_by_frees_to_the_arena(name: str, no_retries) -> None:
    """alloc_bulk(3) with min_nr 2 needs an element beyond the reserve: the
    free that finds the reserve full (and goes to the arena) must wake it,
    not only the frees that refill the reserve."""
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        held = [pool.alloc(GFP_ATOMIC) for _ in range(4)]
        done, out = bulk_in_thread(pool, 3)
        for h in held[:2]:  # each refills the reserve, wakes it, and it sleeps again (2 < 3)
            slept_again(pool, lambda h=h: pool.free(h))
        pool.free(held[2])  # the reserve is full: to the arena
        assert done.wait(10), "alloc_bulk slept on while the pool had the 3 elements it asked for"
        got = out[0].tolist()
        assert len(set(got)) == 3 and pool.stats().in_use == 4 and pool.stats().nr_waiters == 0
        pool.free_bulk(got + held[3:])
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_sleeping_bulk_alloc_is_woken_by_another_process_freeing_to_its_cache(name: str, popen,
                                                                                   no_retries) -> None:
    """The same, with the frees made by another process: the last goes to
    that process's cache without the lock, and the sleeper, woken, takes it
    from there."""
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        other = start_child(popen, name)
        other.call("hs = [pool.alloc(GFP_ATOMIC) for _ in range(4)]")
        done, out = bulk_in_thread(pool, 3)
        for i in range(2):
            slept_again(pool, lambda i=i: other.call(f"pool.free(hs[{i}])"))
        other.call("pool.free(hs[2])")  # the reserve is full: to its cache, without the lock
        assert done.wait(10), "alloc_bulk slept on while another process's cache held what it needed"
        assert len(set(out[0].tolist())) == 3
        pool.free_bulk(out[0])
        other.call("pool.free(hs[3])")
        other.finish()
        check_whole(pool)
        pool.destroy()
