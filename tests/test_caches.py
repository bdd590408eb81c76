"""Each process's cache of free arena slots: the hot path takes and gives
them without the lock and writes no shared header word; other processes
take what an idle process caches (stealing), so no free slot is stranded;
counters stay exact. The kernel's rules themselves are tested, through the
caches, everywhere else."""

from __future__ import annotations

import pytest
from helpers import check_whole, snapshot
from procs import start_child

from shmpool import GFP_ATOMIC, Mempool
from shmpool._layout import CACHE_MAX, H_ARENA_FREE, HEADER_BYTES
from shmpool.testing import cached, hold_lock, slot_word_offset, views

#: A python -c child attached to pool argv[1] that can print its cache.
ATTACH = "import sys, shmpool\nfrom shmpool.testing import cached\npool = shmpool.Mempool.attach(sys.argv[1])\n"


def shared_free_list(pool: Mempool) -> int:
    """The depth of the arena's shared free list (not the caches)."""
    with hold_lock(pool):
        return int(views(pool).hdr[H_ARENA_FREE])


def test_the_hot_path_writes_no_shared_header_word(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=64) as pool:
        pool.free(pool.alloc(GFP_ATOMIC))  # fills this process's cache (under the lock)
        before = snapshot(pool)[:HEADER_BYTES]
        for _ in range(1000):
            pool.free(pool.alloc(GFP_ATOMIC))
        assert snapshot(pool)[:HEADER_BYTES] == before  # counters are per process
        s = pool.stats()
        assert (s.alloc_arena, s.free_arena) == (1001, 1001)  # ...and summed when read
        pool.destroy()


def test_close_gives_the_cache_back(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=40) as pool:
        pool.free(pool.alloc(GFP_ATOMIC))
        assert cached(pool) > 0
        assert shared_free_list(pool) == 39 - cached(pool)
        pool.close()
        with Mempool.attach(name) as other:
            assert shared_free_list(other) == 39  # all back on the shared list
            check_whole(other)
            other.destroy()


@pytest.mark.timeout(60)
def test_a_killed_process_s_cache_comes_back_in_its_order(name: str, popen) -> None:
    """A killed process's cache goes back to the shared free list as its
    close would have given it back, bottom first, so the next allocation
    elsewhere gets what it freed last. (Given back slot by slot in index
    order, two processes' next refills took tops side by side, on one line
    of the slot words, which each then wrote on every allocation: two
    processes on the arena path did 0.3x the work of one.)"""
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=64) as pool:
        child = start_child(popen, name)
        hs = child.call("[pool.alloc(GFP_ATOMIC) for _ in range(3)]")
        freed = [hs[1], hs[2], hs[0]]  # not the slots' order
        child.call(f"for h in {freed!r}: pool.free(h)")
        child.kill()
        assert pool.reclaim_dead() == 0  # (nothing was held: its cache is not counted)
        got = [pool.alloc(GFP_ATOMIC) for _ in range(3)]
        assert [slot_word_offset(pool, h) for h in got] == [slot_word_offset(pool, h) for h in reversed(freed)]
        pool.free_bulk(got)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_slots_cached_by_an_idle_process_are_not_stranded(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=8) as pool:
        # The child takes the whole arena into its cache and idles.
        child = popen(ATTACH + "pool.free(pool.alloc()); print(cached(pool), flush=True); sys.stdin.read()", name)
        assert int(child.stdout.readline()) == 6
        got = [pool.alloc(GFP_ATOMIC) for _ in range(6)]  # arena first: taken from its cache
        s = pool.stats()
        assert (s.alloc_arena, s.alloc_reserve, s.curr_nr, s.in_use) == (7, 0, 2, 6)
        for h in got:
            pool.free(h)
        child.stdin.close()
        assert child.wait(timeout=10) == 0, child.stderr.read()
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_an_owner_drops_entries_that_were_stolen_and_counts_stay_exact(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        code = ATTACH + (
            "for line in sys.stdin:\n"
            "    if line.strip() == 'fill':\n"
            "        pool.free(pool.alloc())\n"
            "    else:\n"
            "        hs = [pool.alloc(shmpool.GFP_ATOMIC) for _ in range(4)]\n"
            "        for h in hs:\n"
            "            pool.free(h)\n"
            "    print(cached(pool), flush=True)\n"
        )
        child = popen(code, name)
        child.stdin.write("fill\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) == 3  # the whole arena is in its cache
        mine = [pool.alloc(GFP_ATOMIC) for _ in range(3)]  # stolen from it
        assert pool.stats().alloc_arena == 4
        for h in mine:
            pool.free(h)  # into my cache now
        child.stdin.write("cycle\n")  # it meets its stale entries, steals back, frees
        child.stdin.flush()
        n = int(child.stdout.readline())
        s = pool.stats()
        assert s.in_use == 0 and s.arena_free == 3 and s.curr_nr == 1
        assert n + cached(pool) == 3
        child.stdin.close()
        assert child.wait(timeout=10) == 0, child.stderr.read()
        check_whole(pool)
        pool.destroy()


def test_tracing_takes_the_locked_path_and_gives_the_cache_back(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8) as pool:
        pool.free(pool.alloc(GFP_ATOMIC))
        assert cached(pool) == 7
        events = []
        pool.trace = lambda e, h, c: events.append(e)
        assert cached(pool) == 0 and shared_free_list(pool) == 7
        pool.free(pool.alloc(GFP_ATOMIC))
        assert events == ["alloc-arena", "free-arena"]  # every call traced: none took the cache
        assert cached(pool) == 0
        pool.trace = None
        pool.free(pool.alloc(GFP_ATOMIC))
        assert cached(pool) > 0 and events == ["alloc-arena", "free-arena"]  # the cache again, untraced
        pool.destroy()


def test_a_full_cache_spills_to_the_shared_list(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=200) as pool:
        held = [pool.alloc(GFP_ATOMIC) for _ in range(150)]
        for h in held:
            pool.free(h)
        assert 0 < cached(pool) <= CACHE_MAX
        s = pool.stats()
        assert (s.in_use, s.arena_free, s.free_arena) == (0, 199, 150)
        check_whole(pool)
        pool.destroy()


# ----------------------------------------------------------------------
# Free slots stranded in a live peer's cache are taken by the locked paths

#: A peer that fills its cache with every free arena slot (allocates them
#: all, frees them all: the reserve is full, so they stay in its cache),
#: says so, and stays alive until its stdin closes.
FILL_CACHE_AND_STAY = """
import sys
from shmpool import GFP_ATOMIC, Mempool
pool = Mempool.attach(sys.argv[1])
held = [pool.alloc(GFP_ATOMIC) for _ in range(pool.stats().arena_free)]
assert None not in held and pool.stats().alloc_reserve == 0
for h in held:
    pool.free(h)
print("ready", len(held), flush=True)
sys.stdin.read()
pool.close()
"""


def peer_fills_its_cache(pool: Mempool, popen) -> object:
    """Start the peer; return it once every free arena slot is in its cache."""
    peer = popen(FILL_CACHE_AND_STAY, pool.name)
    line = peer.stdout.readline()
    if line.split() != ["ready", str(pool.capacity - 2)]:
        peer.stdin.close()  # let it end before its stderr is read
        peer.wait(timeout=30)
        pytest.fail(f"the peer said {line!r}: {peer.stderr.read()}")
    s = pool.stats()
    assert (s.curr_nr, s.min_nr, s.arena_free, s.in_use) == (2, 2, pool.capacity - 2, 0)
    assert shared_free_list(pool) == 0  # the shared free list is dry: all of them in the peer's cache
    return peer


def end_peer(peer) -> None:
    peer.stdin.close()
    assert peer.wait(timeout=30) == 0, peer.stderr.read()


@pytest.mark.timeout(60)
def test_resize_takes_free_slots_from_a_live_peers_cache(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=24) as pool:
        peer = peer_fills_its_cache(pool, popen)
        pool.resize(10)
        s = pool.stats()
        assert (s.curr_nr, s.min_nr, s.arena_free, s.in_use) == (10, 10, 14, 0)
        check_whole(pool)
        end_peer(peer)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_traced_alloc_takes_free_slots_from_a_live_peers_cache(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=24) as pool:
        peer = peer_fills_its_cache(pool, popen)
        events: list[str] = []
        pool.trace = lambda event, handle, curr_nr: events.append(event)
        h = pool.alloc(GFP_ATOMIC)
        assert h is not None and events == ["alloc-arena"]
        assert pool.stats().curr_nr == 2  # the reserve was not touched
        held = [h]
        while (h := pool.alloc(GFP_ATOMIC)) is not None:
            held.append(h)
        assert len(held) == 24  # every slot: none left stranded
        assert events == ["alloc-arena"] * 22 + ["alloc-reserve"] * 2 + ["alloc-failed"]
        pool.free_bulk(held)
        check_whole(pool)
        end_peer(peer)
        pool.destroy()
