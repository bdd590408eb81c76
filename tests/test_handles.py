"""Handles: slot and generation, refused once stale, of another pool, or
freed twice, however many processes race to free one.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import children
import pytest
from helpers import check_whole
from procs import entry_of, slot_word

import shmpool
from shmpool import GFP_KERNEL, InvalidHandleError, Mempool, _layout

ctx = mp.get_context("spawn")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["reserve", "arena"])
def test_a_stale_handle_is_refused_after_many_reuses_of_its_slot(name: str, path: str) -> None:
    # One slot that every allocation reuses: capacity 1 (the reserve's), or
    # one arena slot beside a reserve that GFP_KERNEL never needs.
    capacity = 1 if path == "reserve" else 2
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=capacity) as pool:
        first = pool.alloc(GFP_KERNEL, timeout=5)
        pool.free(first)
        seen = {first}
        slot = first & 0xFFFFFF
        h = first
        for _ in range(100_000):
            h = pool.alloc(GFP_KERNEL, timeout=5)
            assert h & 0xFFFFFF == slot
            seen.add(h)
            pool.free(h)
        assert len(seen) == 100_001  # a new generation each time
        current = pool.alloc(GFP_KERNEL, timeout=5)
        assert current & 0xFFFFFF == slot
        for stale in (first, h):
            with pytest.raises(InvalidHandleError):
                pool.free(stale)
            with pytest.raises(InvalidHandleError):
                pool.buffer(stale)
        pool.buffer(current)[:4] = b"mine"  # untouched by the refusals
        assert bytes(pool.buffer(current)[:4]) == b"mine"
        pool.free(current)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_handle_is_slot_and_generation_and_its_slot_word_says_held_by_us(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=16) as pool:
        hs = [pool.alloc(GFP_KERNEL, timeout=5) for _ in range(8)]
        assert len({h & 0xFFFFFF for h in hs}) == 8
        gens = set()
        for h in hs:
            assert 0 <= h < 1 << 63
            slot, gen = h & 0xFFFFFF, h >> 24
            assert shmpool.handle_slot(h) == slot < 16
            word = slot_word(name, slot)
            assert word & 0xFF == _layout.ST_HELD
            assert (word >> 8) & 0xFFFF == entry_of(name, os.getpid()) + 1  # owner: our entry + 1
            assert word >> 24 == gen  # bits 24-62
            gens.add(gen)
        assert len(gens) > 1  # generations start at random per slot,
        assert max(gens) >= 1 << 24  # and are wider than 24 bits
        with Mempool.create(name + "-b", min_nr=2, slot_size=16, capacity=16) as other:
            try:
                theirs = [other.alloc(GFP_KERNEL, timeout=5) for _ in range(16)]
                for h in hs:  # our handles name held slots there, of other generations
                    with pytest.raises(InvalidHandleError):
                        other.free(h)
                for h in theirs:
                    other.free(h)
                check_whole(other)
            finally:
                other.destroy(force=True)
        for h in hs:
            pool.free(h)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_double_free_raced_by_several_processes_frees_once(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        for _ in range(3):
            h = pool.alloc()
            barrier, results = ctx.Barrier(4), ctx.Queue()
            for _ in range(4):
                spawn(children.free_at_once, name, h, barrier, results)
            outcomes = sorted(results.get(timeout=30) for _ in range(4))
            assert outcomes == ["InvalidHandleError"] * 3 + ["freed"]
            s = pool.stats()
            assert s.in_use == 0
        assert s.free_arena + s.free_reserve == 3
        check_whole(pool)
        pool.destroy()
