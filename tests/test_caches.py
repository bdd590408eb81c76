"""The compiled hot path (_fast.c): per-process caches, stealing, counters.
The kernel's rules themselves are tested, through it, everywhere else."""

from __future__ import annotations

import pytest
from helpers import check_whole, snapshot

from shmpool import GFP_ATOMIC, Mempool
from shmpool._layout import CACHE_MAX, HEADER_BYTES

ATTACH = "import sys, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"


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
        assert pool._fast._cache_n > 0
        from shmpool._layout import H_ARENA_FREE

        with Mempool.attach(name) as other:
            assert other._core[0].hdr[H_ARENA_FREE] < 39
        pool.close()
        with Mempool.attach(name) as other:
            assert other._core[0].hdr[H_ARENA_FREE] == 39  # all back on the shared list
            check_whole(other)
            other.destroy()


@pytest.mark.timeout(30)
def test_slots_cached_by_an_idle_process_are_not_stranded(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=8) as pool:
        # The child takes the whole arena into its cache and idles.
        child = popen(ATTACH + "pool.free(pool.alloc()); print(pool._fast._cache_n, flush=True); sys.stdin.read()", name)
        assert int(child.stdout.readline()) == 6
        got = [pool.alloc(GFP_ATOMIC) for _ in range(6)]  # arena first: taken from its cache
        s = pool.stats()
        assert (s.alloc_arena, s.alloc_reserve, s.curr_nr, s.in_use) == (7, 0, 2, 6)
        for h in got:
            pool.free(h)
        child.stdin.close()
        child.wait(timeout=10)
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
            "    print(pool._fast._cache_n, flush=True)\n"
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
        assert n + pool._fast._cache_n == 3
        child.stdin.close()
        child.wait(timeout=10)
        check_whole(pool)
        pool.destroy()


def test_tracing_takes_the_locked_path_and_gives_the_cache_back(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8) as pool:
        pool.free(pool.alloc(GFP_ATOMIC))
        assert pool._fast._enabled and pool._fast._cache_n == 7
        events = []
        pool.trace = lambda e, h, c: events.append(e)
        assert not pool._fast._enabled and pool._fast._cache_n == 0
        pool.free(pool.alloc(GFP_ATOMIC))
        assert events == ["alloc-arena", "free-arena"]
        pool.trace = None
        assert pool._fast._enabled
        pool.destroy()


def test_a_full_cache_spills_to_the_shared_list(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=200) as pool:
        held = [pool.alloc(GFP_ATOMIC) for _ in range(150)]
        for h in held:
            pool.free(h)
        assert pool._fast._cache_n <= CACHE_MAX
        s = pool.stats()
        assert (s.in_use, s.arena_free, s.free_arena) == (0, 199, 150)
        check_whole(pool)
        pool.destroy()
