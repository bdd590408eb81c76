"""The reserve's places across processes (places.c): each process empties
and fills the places lent to it without the pool lock, yet the reserve
stays one reserve. An element is never handed to two processes at once, a
free refills the reserve wherever its empty place is, an idle process's
full places serve the others, a dead one's come back, and ``curr_nr`` and
the audit agree with the slots at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from helpers import assert_settled, check_whole, read_word, wait_for
from procs import entry_of, start_child, timed

from shmpool import GFP_ATOMIC, Mempool
from shmpool.testing import entry_offset, header_word_offset, sleep_retry

#: A child's loop on the reserve: alloc, stamp its pid into the element,
#: check the stamp is still its own, free. Counts what it saw.
HAMMER = """
import numpy as np
me, pairs, empty, stolen = os.getpid(), 0, 0, 0
for i in range({n}):
    h = pool.alloc(GFP_ATOMIC)
    if h is None:
        empty += 1
        continue
    a = pool.ndarray(h, dtype=np.int64)
    a[:] = me
    a[1] = i
    if a[0] != me or a[1] != i or (a[2:] != me).any():
        stolen += 1
    del a
    pool.free(h)
    pairs += 1
"""


@pytest.mark.timeout(180)
def test_processes_on_the_reserve_at_once_never_share_an_element(name: str, popen) -> None:
    """min_nr == capacity: the arena is dry, every alloc is a reserve pop
    and every free a push, mostly into the process's own places."""
    n, kids = 20000, 3
    with Mempool.create(name, min_nr=24, slot_size=64, capacity=24) as pool:
        children = [start_child(popen, name) for _ in range(kids)]
        for c in children:
            c.send(HAMMER.format(n=n))
        for c in children:
            assert c.answer(timeout=150) is None
        seen = [c.call("(pairs, empty, stolen)") for c in children]
        assert all(stolen == 0 for _, _, stolen in seen), seen
        assert all(pairs > 0 for pairs, _, _ in seen), seen
        s = pool.stats()
        total = sum(pairs for pairs, _, _ in seen)
        assert s.alloc_arena == 0 and s.alloc_reserve == total
        assert s.free_reserve == total and s.free_arena == 0
        assert (s.curr_nr, s.in_use, s.arena_free) == (24, 0, 0)
        assert s.reserve_low_water <= 24 - 1
        check_whole(pool)
        for c in children:
            assert c.finish() == 0
        pool.destroy()


#: A child's warm-up that makes it live on the reserve (the arena dry): its
#: locked reserve operations lend it the reserve's places after 16.
ON_THE_RESERVE = "for _ in range(10): pool.free(pool.alloc(GFP_ATOMIC))"


def places_lent(pool: Mempool, pid: int) -> int:
    """How many of the reserve's places process ``pid`` has (its entry)."""
    return read_word(pool, entry_offset(pool, entry_of(pool.name, pid), "P_PLACE_Q"))


INSPECT = os.path.join(os.path.dirname(sys.executable), "shmpool-inspect")


def _inspect_check(name: str) -> subprocess.CompletedProcess[str]:
    """``shmpool-inspect --check``: the audit of a copy taken without the
    lock, so the processes' places are seen as they are."""
    return subprocess.run([INSPECT, name, "--check"], capture_output=True, text=True, timeout=60)


def _inspect_json(name: str) -> dict:
    out = subprocess.run([INSPECT, name, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(60)
def test_a_free_refills_an_empty_place_lent_to_another_process(name: str, popen) -> None:
    """The kernel's rule across processes: the child's reserve pops leave
    the empty places in its own part; the parent, which has none, frees
    the elements, and they go to the reserve, not the arena."""
    with Mempool.create(name, min_nr=6, slot_size=16, capacity=8) as pool:
        child = start_child(popen, name)
        child.call("keep = [pool.alloc(GFP_ATOMIC) for _ in range(2)]")  # the arena's two
        child.call(ON_THE_RESERVE)
        hs = child.call("keep + [pool.alloc(GFP_ATOMIC) for _ in range(6)]")  # then the reserve's six
        assert places_lent(pool, child.pid) > 0
        s = pool.stats()
        assert (s.curr_nr, s.in_use, s.alloc_reserve) == (0, 8, 16)
        assert _inspect_check(name).returncode == 0  # the child's places audit clean, without the lock
        for h in hs[2:]:
            pool.free(h)
        s = pool.stats()
        assert (s.curr_nr, s.arena_free, s.free_reserve, s.free_arena) == (6, 0, 10 + 6, 0)  # (10: the warm-up's)
        for h in hs[:2]:
            pool.free(h)  # the reserve is full now: the arena
        s = pool.stats()
        assert (s.curr_nr, s.in_use, s.free_arena) == (6, 0, 2)
        check_whole(pool)
        assert child.finish() == 0
        pool.destroy()


@pytest.mark.timeout(90)
def test_a_free_waits_for_no_process_and_still_refills_the_reserve_first(name: str, popen) -> None:
    """The reserve's only empty places are the child's, and the child is
    stopped in the middle of moving them (inside a lock-free pop, its
    place lock held). The parent's frees neither wait for it nor send the
    elements to the arena (whose elements the reserve never gets back):
    they are parked, and the first holder of the lock after the child goes
    on puts them into the reserve, as the kernel's rule says."""
    with Mempool.create(name, min_nr=6, slot_size=16, capacity=8) as pool:
        child = start_child(popen, name)
        child.call("keep = [pool.alloc(GFP_ATOMIC) for _ in range(2)]")  # the arena's two
        child.call(ON_THE_RESERVE)
        hs = child.call("[pool.alloc(GFP_ATOMIC) for _ in range(5)]")  # five of the reserve's six
        assert places_lent(pool, child.pid) == 6 and None not in hs
        child.send("shmpool.testing.stop_at('place-pop'); last = pool.alloc(GFP_ATOMIC)")
        wait_for(lambda: child.state() in ("T", "t"), what="the child to stop inside its pop")
        before = pool.stats()
        for h in hs:
            _, took = timed(lambda h=h: pool.free(h))
            assert took < 5.0  # (the lock's bound for a free is far below: no wait on the child)
        d = _inspect_json(name)
        assert d["parked"] == 5 and d["slot_counts"]["parked"] == 5
        s = pool.stats()
        assert (s.free_arena, s.arena_free, s.in_use) == (before.free_arena, before.arena_free, 8 - s.curr_nr)
        child.cont()
        assert child.answer(timeout=30) is None
        s = pool.stats()  # (its lock completes the parked frees)
        assert (s.curr_nr, s.free_arena, s.free_reserve) == (5, before.free_arena, before.free_reserve + 5)
        assert _inspect_json(name)["parked"] == 0
        child.call("pool.free(last); pool.free_bulk(keep)")
        assert_settled(pool, curr_nr=6, in_use=0, arena_free=2)
        assert child.finish() == 0
        pool.destroy()


@pytest.mark.timeout(60)
def test_an_idle_process_s_full_places_serve_the_others(name: str, popen) -> None:
    """The child takes one element from the reserve (its first reserve pop
    lends it the stack's top places, full) and then idles: every other
    element of the reserve can still be had by the parent, and then none."""
    with Mempool.create(name, min_nr=8, slot_size=16, capacity=8) as pool:
        child = start_child(popen, name)
        child.call(ON_THE_RESERVE)
        child.call("h = pool.alloc(GFP_ATOMIC); assert h is not None")
        assert places_lent(pool, child.pid) > 0
        assert _inspect_check(name).returncode == 0
        out = subprocess.run([INSPECT, name, "--json"], capture_output=True, text=True, timeout=60)
        d = json.loads(out.stdout)
        assert d["curr_nr"] == 7 and len(set(d["reserve_stack"])) == 7  # its places are the reserve's too
        assert d["slot_counts"]["reserve"] == 7
        mine = [pool.alloc(GFP_ATOMIC) for _ in range(7)]
        assert None not in mine and len(set(mine)) == 7
        assert pool.alloc(GFP_ATOMIC) is None
        assert pool.stats().curr_nr == 0
        child.call("pool.free(h)")
        for h in mine:
            pool.free(h)
        s = pool.stats()
        assert (s.curr_nr, s.in_use) == (8, 0)
        check_whole(pool)
        assert child.finish() == 0
        pool.destroy()


#: A child's pairs on its own places (it holds h), reading the header's
#: shared count after every move.
WATCH_THE_COUNT = """
import struct
fd = os.open(shmpool.testing.segment_path(pool), os.O_RDONLY)
off = shmpool.testing.header_word_offset("H_CURR_NR")
seen = set()
for _ in range(1000):
    pool.free(h)
    seen.add(struct.unpack("=Q", os.pread(fd, 8, off))[0])
    h = pool.alloc(GFP_ATOMIC)
    seen.add(struct.unpack("=Q", os.pread(fd, 8, off))[0])
os.close(fd)
"""


@pytest.mark.timeout(90)
def test_a_process_living_on_its_places_writes_no_shared_count(name: str, popen) -> None:
    """The reserve's count batched as a percpu_counter: the child's
    lock-free pops and pushes on its own places leave the header's
    H_CURR_NR alone (it read the word after each of 2,000 moves: one value,
    never more than the reserve held), and still curr_nr, is_saturated,
    the low-water mark and the audit say exactly what the reserve holds; a
    free elsewhere that finds the reserve full goes to the arena, and a
    kill gives the child's uncounted places back."""
    with Mempool.create(name, min_nr=8, slot_size=16, capacity=10) as pool:
        mine = [pool.alloc(GFP_ATOMIC) for _ in range(2)]  # the arena's two: it is dry
        child = start_child(popen, name)
        child.call(ON_THE_RESERVE)
        child.call("h = pool.alloc(GFP_ATOMIC); assert h is not None")
        assert places_lent(pool, child.pid) == 8
        s = pool.stats()
        assert (s.curr_nr, s.in_use, s.reserve_low_water) == (7, 3, 7) and not pool.is_saturated()
        child.call(WATCH_THE_COUNT)
        seen = child.call("sorted(seen)")
        assert len(seen) == 1 and seen[0] <= 7, seen
        assert read_word(pool, header_word_offset("H_CURR_NR")) == seen[0]
        s = pool.stats()
        assert (s.curr_nr, s.in_use, s.reserve_low_water, s.alloc_arena) == (7, 3, 7, 2)
        assert (s.alloc_reserve, s.free_reserve) == (10 + 1 + 1000, 10 + 1000)
        assert _inspect_check(name).returncode == 0  # the audit adds the uncounted places too
        assert _inspect_json(name)["curr_nr"] == 7
        child.call("pool.free(h)")
        assert pool.is_saturated() and pool.stats().curr_nr == 8
        before = pool.stats()
        pool.free(mine.pop())  # the reserve is full, whatever the header's count says: the arena
        s = pool.stats()
        assert (s.curr_nr, s.free_arena, s.free_reserve) == (8, before.free_arena + 1, before.free_reserve)
        child.call("h = pool.alloc(GFP_ATOMIC)")
        child.kill()
        assert pool.reclaim_dead() == 1
        assert_settled(pool, curr_nr=8, in_use=1, reserve_low_water=7)
        pool.free(mine.pop())
        assert_settled(pool, curr_nr=8, in_use=0)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_killed_process_s_places_come_back_whole(name: str, popen) -> None:
    with Mempool.create(name, min_nr=8, slot_size=16, capacity=8) as pool:
        child = start_child(popen, name)
        child.call(ON_THE_RESERVE)
        child.call("hs = [pool.alloc(GFP_ATOMIC) for _ in range(3)]; pool.free(hs.pop())")
        assert places_lent(pool, child.pid) > 0
        s = pool.stats()
        assert (s.curr_nr, s.in_use) == (6, 2)
        child.kill()
        assert pool.reclaim_dead() == 2
        s = pool.stats()
        assert (s.curr_nr, s.in_use) == (8, 0)
        check_whole(pool)
        got = [pool.alloc(GFP_ATOMIC) for _ in range(8)]
        assert None not in got and len(set(got)) == 8
        pool.free_bulk(got)
        pool.destroy()


@pytest.mark.timeout(90)
def test_a_process_killed_lending_itself_places_leaves_the_others_places_whole(name: str, popen) -> None:
    """The victim dies holding the lock in the middle of lending itself
    the top of a full stack, while another process has places too. The
    repair that follows must not move places by a stack it cannot trust:
    every process's places are forgotten and their elements rebuilt into
    the stack from the slot words, so the other process goes on, the audit
    is clean and the reserve never holds more than min_nr."""
    with Mempool.create(name, min_nr=24, slot_size=16, capacity=24) as pool:
        victim = start_child(popen, name)  # (the entry before the other's)
        other = start_child(popen, name)
        other.call(ON_THE_RESERVE)
        assert places_lent(pool, other.pid) == 10
        # 16 locked reserve operations, then a free_bulk that fills the
        # stack again: its leave lends the victim places, and it dies there.
        victim.call("pool.set_fail_rate(1.0); hs = [pool.alloc(GFP_ATOMIC) for _ in range(2)]\n"
                    "for _ in range(7): pool.free(pool.alloc(GFP_ATOMIC))")
        victim.call("shmpool.testing.crash_at('lend')")
        victim.send("pool.free_bulk(hs)")
        assert victim.wait(60) == -signal.SIGKILL
        pool.reclaim_dead()
        assert pool.stats().lock_recoveries == 1
        check_whole(pool)
        other.call("hs = [pool.alloc(GFP_ATOMIC) for _ in range(24)]")
        assert other.call("len({h for h in hs if h is not None})") == 24
        assert pool.alloc(GFP_ATOMIC) is None
        other.call("pool.free_bulk(hs[:12])\nfor h in hs[12:]: pool.free(h)")
        assert_settled(pool, curr_nr=24, in_use=0, arena_free=0)
        assert other.finish() == 0
        pool.destroy()


@pytest.mark.timeout(90)
def test_a_sleeper_whose_elements_were_being_moved_looks_again_soon(name: str, popen) -> None:
    """Every element is in the child's full places, and the child is stopped
    in the middle of taking one (its place lock held): the parent's
    allocation finds them out of reach and sleeps. Nobody will wake it
    (a pop wakes nobody), so it looks again soon, not after its retry
    period (made longer than the test, its long-sleep report off): once the child goes on, the
    parent gets one of the child's places."""
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=4) as pool:
        child = start_child(popen, name)
        child.call(ON_THE_RESERVE)
        assert places_lent(pool, child.pid) == 4
        child.send("shmpool.testing.stop_at('place-pop'); h = pool.alloc(GFP_ATOMIC)")
        wait_for(lambda: child.state() in ("T", "t"), what="the child to stop inside its pop")
        go_on = threading.Thread(target=lambda: (
            wait_for(lambda: pool.stats().nr_waiters == 1, timeout=30, what="the parent to sleep"), child.cont()))
        before = sleep_retry(alloc=600.0)
        pool.long_sleep = None  # (its report would wake it after 5 s too)
        go_on.start()
        try:
            h, took = timed(lambda: pool.alloc(timeout=45.0))
        finally:
            sleep_retry(alloc=before[0])
            go_on.join(60)
        assert child.answer(timeout=30) is None
        assert h is not None and took < 40.0  # it looked again, not the deadline's last attempt
        assert pool.stats().sleeps >= 1
        pool.free(h)
        child.call("pool.free(h)")
        assert_settled(pool, curr_nr=4, in_use=0)
        assert child.finish() == 0
        pool.destroy()


@pytest.mark.timeout(90)
def test_a_sleeping_allocation_is_woken_by_a_free_into_another_s_place(name: str, popen) -> None:
    """The parent sleeps in alloc with everything out (its retry period
    made longer than the test and its long-sleep report off, so only a
    wake-up ends the sleep before its timeout); the child, once it sees the sleeper, frees one element into
    its own empty place without the lock: the sleeper is woken and gets it."""
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=4) as pool:
        child = start_child(popen, name)
        child.call(ON_THE_RESERVE)
        child.call("hs = [pool.alloc(GFP_ATOMIC) for _ in range(4)]; assert None not in hs")
        assert places_lent(pool, child.pid) > 0
        child.send("import time\ndeadline = time.monotonic() + 30\n"
                   "while pool.stats().nr_waiters == 0 and time.monotonic() < deadline: time.sleep(0.001)\n"
                   "pool.free(hs.pop())")
        before = sleep_retry(alloc=600.0)
        pool.long_sleep = None  # (its report would wake it after 5 s too)
        try:
            h, took = timed(lambda: pool.alloc(timeout=45.0))
        finally:
            sleep_retry(alloc=before[0])
        assert child.answer(timeout=30) is None
        assert h is not None and took < 40.0  # woken, not the deadline's last attempt
        assert pool.stats().sleeps >= 1
        pool.free(h)
        child.call("pool.free_bulk(hs)")
        assert pool.stats().curr_nr == 4
        check_whole(pool)
        assert child.finish() == 0
        pool.destroy()
