"""The kernel's rules, one process at a time (KERNEL_MEMPOOL.md)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from helpers import check_whole, snapshot

import shmpool
from shmpool import (
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    InvalidHandleError,
    Mempool,
    PoisonWarning,
    PoolBusyError,
    handle_slot,
)
from shmpool._debug import POISON_END, POISON_FREE, POISON_INUSE


@pytest.fixture
def pool(name: str):
    p = Mempool.create(name, min_nr=3, slot_size=64, capacity=8)
    yield p
    p.close()


def drain_arena(pool: Mempool) -> list[int]:
    """Allocate every arena slot (fail_rate 0): returns their handles."""
    s = pool.stats()
    handles = [pool.alloc(GFP_ATOMIC) for _ in range(s.arena_free)]
    assert pool.stats().arena_free == 0
    return handles


def reserve_stack(pool: Mempool) -> list[int]:
    v = pool._core[0]
    return [v.stack[i] for i in range(v.hdr[shmpool._layout.H_CURR_NR])]


# ---------------------------------------------------------------- create


def test_fresh_pool_has_a_full_reserve_and_the_rest_in_the_arena(pool: Mempool) -> None:
    s = pool.stats()
    assert (s.min_nr, s.curr_nr, s.arena_free, s.in_use) == (3, 3, 5, 0)
    assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity
    check_whole(pool)


def test_create_prefill_is_exempt_from_fault_injection(name: str) -> None:
    with Mempool.create(name, min_nr=4, slot_size=8, capacity=4, fail_rate=1.0, seed=1) as p:
        s = p.stats()
        assert (s.curr_nr, s.arena_free, s.faults_injected) == (4, 0, 0)
        p.destroy()


def test_slots_are_8_byte_aligned(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=13, capacity=5) as p:
        hs = [p.alloc(GFP_ATOMIC) for _ in range(5)]
        for h in hs:
            assert p.ndarray(h, np.uint8).ctypes.data % 8 == 0
            assert p.ndarray(h, np.uint8).nbytes == 13
        for h in hs:
            p.free(h)
        p.destroy()


# ---------------------------------------------------------------- alloc


def test_alloc_takes_the_arena_first(pool: Mempool) -> None:
    h = pool.alloc(GFP_ATOMIC)
    s = pool.stats()
    assert (s.alloc_arena, s.alloc_reserve, s.curr_nr, s.arena_free, s.in_use) == (1, 0, 3, 4, 1)
    pool.free(h)


def test_reserve_is_a_lifo_stack(pool: Mempool) -> None:
    held = drain_arena(pool)
    stack = reserve_stack(pool)
    got = [handle_slot(pool.alloc(GFP_ATOMIC)) for _ in range(3)]
    assert got == stack[::-1]
    assert pool.stats().alloc_reserve == 3
    # freed elements come back on top: the last freed is the next taken
    h1, h2 = pool.alloc(GFP_ATOMIC), None
    assert h1 is None
    for h in held:
        pool.free(h)
    assert reserve_stack(pool) == [handle_slot(h) for h in held[:3]]
    h2 = pool.alloc_preallocated()
    assert handle_slot(h2) == handle_slot(held[2])


@pytest.mark.parametrize("gfp", [GFP_ATOMIC, GFP_NOWAIT])
def test_non_sleeping_alloc_returns_none_at_once(pool: Mempool, gfp: int) -> None:
    drain_arena(pool)
    for _ in range(3):
        assert pool.alloc(gfp) is not None
    before = pool.stats()
    assert pool.alloc(gfp) is None
    after = pool.stats()
    assert after.alloc_failed == before.alloc_failed + 1
    assert (after.curr_nr, after.in_use, after.nr_waiters, after.sleeps) == (0, 8, 0, 0)


@pytest.mark.parametrize("gfp", [GFP_KERNEL, GFP_NOIO, GFP_NOFS])
@pytest.mark.timeout(20)
def test_sleeping_alloc_times_out_with_timeouterror_and_leaves_no_waiter(pool: Mempool, gfp: int) -> None:
    drain_arena(pool)
    for _ in range(3):
        pool.alloc(gfp)
    with pytest.raises(TimeoutError):
        pool.alloc(gfp, timeout=0.05)
    s = pool.stats()
    assert (s.nr_waiters, s.sleeps, s.alloc_failed, s.in_use) == (0, 1, 1, 8)
    check_whole(pool)


def test_timeout_zero_tries_once(pool: Mempool) -> None:
    assert pool.alloc(GFP_KERNEL, timeout=0) is not None


def test_gfp_flags_compose_like_the_kernel() -> None:
    assert GFP_KERNEL == GFP.WAIT | GFP.IO | GFP.FS
    assert GFP_NOFS == GFP.WAIT | GFP.IO
    assert GFP_NOIO == GFP.WAIT
    assert GFP_ATOMIC == GFP.HIGH and not GFP_ATOMIC & GFP.WAIT
    assert GFP_NOWAIT == 0


@pytest.mark.parametrize(
    "bad, exc", [(1.5, TypeError), ("x", TypeError), (None, TypeError), (0x2000, ValueError), (1 << 24, ValueError)]
)
def test_bad_gfp_is_refused_and_changes_nothing(pool: Mempool, bad: object, exc: type) -> None:
    before = snapshot(pool)
    with pytest.raises(exc):
        pool.alloc(bad)  # type: ignore[arg-type]
    assert snapshot(pool) == before


# ---------------------------------------------------------------- free


def test_free_refills_the_reserve_first_then_the_arena(pool: Mempool) -> None:
    held = drain_arena(pool) + [pool.alloc(GFP_ATOMIC) for _ in range(3)]
    assert pool.stats().curr_nr == 0
    for i, h in enumerate(held):
        pool.free(h)
        s = pool.stats()
        assert s.curr_nr == min(i + 1, 3)  # never above min_nr: not a cache
        assert s.arena_free == max(0, i + 1 - 3)
    s = pool.stats()
    assert (s.free_reserve, s.free_arena) == (3, 5)
    check_whole(pool)


def test_free_none_is_ignored(pool: Mempool) -> None:
    before = snapshot(pool)
    pool.free(None)
    assert snapshot(pool) == before


def test_any_handle_int_like_is_accepted(pool: Mempool) -> None:
    h = pool.alloc()
    pool.free(np.int64(h))
    assert pool.stats().in_use == 0


@pytest.mark.parametrize("bad", ["1", 1.0, True, [1], b"\x01"])
def test_free_of_a_non_int_is_typeerror(pool: Mempool, bad: object) -> None:
    before = snapshot(pool)
    with pytest.raises(TypeError):
        pool.free(bad)  # type: ignore[arg-type]
    assert snapshot(pool) == before


def test_free_out_of_range_is_valueerror(pool: Mempool) -> None:
    h = pool.alloc()
    before = snapshot(pool)
    for bad in (-1, 1 << 63, 1 << 70, h - handle_slot(h) + 8, h | 0xFFFFFF):
        with pytest.raises(ValueError):
            pool.free(bad)
    assert snapshot(pool) == before
    pool.free(h)


def test_double_free_and_never_allocated_name_the_state(pool: Mempool) -> None:
    h = pool.alloc()
    pool.free(h)  # the reserve is full: back to the arena
    before = snapshot(pool)
    with pytest.raises(InvalidHandleError, match="in the arena") as err:
        pool.free(h)
    assert err.value.handle == h and isinstance(err.value, ValueError)
    never = (h & ~0xFFFFFFFFFFFF) | reserve_stack(pool)[0]  # a reserved slot, never handed out
    with pytest.raises(InvalidHandleError, match="in the reserve"):
        pool.free(never)
    assert snapshot(pool) == before


def test_stale_handle_is_refused_without_freeing_the_new_holder(pool: Mempool) -> None:
    old = pool.alloc()
    pool.free(old)  # on top of the arena's free list
    new = pool.alloc(GFP_ATOMIC)  # the same slot, next generation
    assert handle_slot(new) == handle_slot(old) and new != old
    before = snapshot(pool)
    with pytest.raises(InvalidHandleError, match="stale"):
        pool.free(old)
    assert snapshot(pool) == before
    pool.free(new)


def test_handle_of_another_pool_is_refused(pool: Mempool, name: str) -> None:
    with Mempool.create(name + "b", min_nr=3, slot_size=64, capacity=8) as other:
        h = other.alloc()
        before = snapshot(pool)
        with pytest.raises(InvalidHandleError, match="another pool's"):
            pool.free(h)
        assert snapshot(pool) == before
        other.free(h)
        other.destroy()


# ---------------------------------------------------------------- resize


def test_resize_shrink_gives_reserve_elements_to_the_arena(pool: Mempool) -> None:
    pool.resize(1)
    s = pool.stats()
    assert (s.min_nr, s.curr_nr, s.arena_free) == (1, 1, 7)
    check_whole(pool)


def test_resize_grow_fills_from_the_arena(pool: Mempool) -> None:
    pool.resize(6)
    s = pool.stats()
    assert (s.min_nr, s.curr_nr, s.arena_free) == (6, 6, 2)
    check_whole(pool)


def test_resize_grow_with_a_dry_arena_succeeds_underfilled_and_frees_top_up(pool: Mempool) -> None:
    held = drain_arena(pool)
    pool.resize(8)
    s = pool.stats()
    assert (s.min_nr, s.curr_nr) == (8, 3)
    for h in held:
        pool.free(h)
    s = pool.stats()
    assert (s.curr_nr, s.arena_free, s.free_reserve) == (8, 0, 5)
    check_whole(pool)


def test_resize_refill_is_subject_to_fault_injection(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=6, fail_rate=1.0, seed=3) as p:
        p.resize(5)
        s = p.stats()
        assert (s.min_nr, s.curr_nr, s.faults_injected) == (5, 1, 1)
        p.destroy(force=True)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (9, ValueError), (2.0, TypeError), ("3", TypeError)])
def test_bad_resize_is_refused_and_changes_nothing(pool: Mempool, bad: object, exc: type) -> None:
    before = snapshot(pool)
    with pytest.raises(exc):
        pool.resize(bad)  # type: ignore[arg-type]
    assert snapshot(pool) == before


# ---------------------------------------------------------------- faults


def test_fault_injection_sends_allocations_to_the_reserve(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=8, capacity=10, fail_rate=1.0, seed=5) as p:
        a, b = p.alloc(GFP_ATOMIC), p.alloc(GFP_ATOMIC)
        assert p.alloc(GFP_ATOMIC) is None  # arena has 8 free slots, but refuses
        s = p.stats()
        assert (s.alloc_reserve, s.alloc_arena, s.arena_free, s.faults_injected) == (2, 0, 8, 3)
        p.set_fail_rate(0.0)
        c = p.alloc(GFP_ATOMIC)
        assert p.stats().alloc_arena == 1
        for h in (a, b, c):
            p.free(h)
        p.destroy()


def decisions(pool: Mempool, n: int) -> list[str]:
    """Which allocator served each of n alloc+free pairs."""
    out = []
    for _ in range(n):
        before = pool.stats().alloc_arena
        h = pool.alloc(GFP_ATOMIC)
        out.append("arena" if pool.stats().alloc_arena > before else "reserve")
        pool.free(h)
    return out


def test_fault_injection_is_seeded_and_reproducible(name: str) -> None:
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        with Mempool.create(f"{name}{i}", min_nr=1, slot_size=8, capacity=4, fail_rate=0.3, seed=seed) as p:
            runs.append(decisions(p, 200))
            p.destroy()
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    rate = runs[0].count("reserve") / 200
    assert 0.2 < rate < 0.4


def test_set_fail_rate_with_seed_restarts_the_sequence(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=4, fail_rate=0.5, seed=11) as p:
        first = decisions(p, 50)
        p.set_fail_rate(0.5, seed=11)
        assert decisions(p, 50) == first
        assert p.stats().seed == 11 and p.stats().fail_rate == 0.5
        p.destroy()


@pytest.mark.parametrize("bad, exc", [(float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError), (1.01, ValueError), ("0.3", TypeError)])
def test_bad_fail_rate_is_refused(pool: Mempool, name: str, bad: object, exc: type) -> None:
    before = snapshot(pool)
    with pytest.raises(exc):
        pool.set_fail_rate(bad)  # type: ignore[arg-type]
    assert snapshot(pool) == before
    with pytest.raises(exc):
        Mempool.create(name + "x", min_nr=1, slot_size=8, capacity=2, fail_rate=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- destroy


def test_destroy_refuses_while_elements_are_held(pool: Mempool, name: str) -> None:
    h = pool.alloc()
    before = snapshot(pool)
    with pytest.raises(PoolBusyError, match="lends 1 element") as err:
        pool.destroy()
    assert isinstance(err.value, RuntimeError)
    assert snapshot(pool) == before
    pool.free(h)
    pool.destroy()
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


def test_destroy_accepts_an_underfilled_reserve_with_nothing_held(pool: Mempool) -> None:
    held = drain_arena(pool)
    pool.resize(5)  # under-filled: 3 of 5
    for h in held[:2]:
        pool.free(h)  # tops it up to 5, 3 still held... free them all:
    for h in held[2:]:
        pool.free(h)
    assert pool.stats().curr_nr == 5
    pool.resize(8)  # arena has 3: refills to 8
    p2 = pool.alloc(GFP_ATOMIC)  # from the reserve now (arena dry)
    pool.free(p2)  # back into the reserve
    pool.resize(1)
    assert pool.stats().curr_nr == 1
    # Now make curr_nr < min_nr with nothing held:
    pool.set_fail_rate(1.0)
    pool.resize(3)  # refill fails on purpose: 1 of 3
    s = pool.stats()
    assert (s.curr_nr, s.min_nr, s.in_use) == (1, 3, 0)
    # Later kernels dropped v3.2's BUG_ON(curr_nr != min_nr) for exactly this
    # case: there is nothing to free, so destroy must not refuse.
    pool.destroy()
    assert pool.closed


def test_destroy_force_unlinks_with_elements_held(pool: Mempool, name: str) -> None:
    pool.alloc()
    pool.destroy(force=True)
    assert pool.closed
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


# ---------------------------------------------------------------- poison


def test_poison_pattern_fills_reserved_elements(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4, poison=True) as p:
        v = p._core[0]
        for slot in reserve_stack(p):
            raw = bytes(v.data[slot * 16 : slot * 16 + 16])
            assert raw == bytes([POISON_FREE]) * 15 + bytes([POISON_END])
        # Leaving the reserve, the element is checked and filled with
        # POISON_INUSE before it is handed out (the kernel's check_element).
        p.set_fail_rate(1.0)
        h = p.alloc(GFP_ATOMIC)
        assert bytes(p.buffer(h)) == bytes([POISON_INUSE]) * 16
        p.free(h)
        p.destroy()


def test_write_after_free_into_a_reserved_element_is_reported(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=2, poison=True) as p:
        h = p.alloc()
        mv = p.buffer(h)
        p.free(h)
        mv[3] = 0  # write after free, through a view kept too long
        del mv
        with pytest.warns(PoisonWarning, match=f"slot {handle_slot(h)}"):
            again = p.alloc()
        assert handle_slot(again) == handle_slot(h)  # still handed out, as the kernel does
        assert p.stats().poison_errors == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other = p.alloc()  # an intact one: no warning
        p.free(again)
        p.free(other)
        p.destroy()


def test_poison_error_escalated_to_exception_leaves_the_pool_whole(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=1, poison=True) as p:
        h = p.alloc()
        p.free(h)
        p._core[0].data[0] = 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", PoisonWarning)
            with pytest.raises(PoisonWarning):
                p.alloc()
        assert p.stats().in_use == 1  # the element was handed out before the warning
        check_whole(p)
        p.destroy(force=True)


# ---------------------------------------------------------------- access


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
    pool.free(h)


def test_buffer_of_a_free_handle_is_refused(pool: Mempool) -> None:
    h = pool.alloc()
    pool.free(h)
    with pytest.raises(InvalidHandleError):
        pool.buffer(h)
    with pytest.raises(InvalidHandleError):
        pool.ndarray(h)


# ---------------------------------------------------------------- kernel names


def test_kernel_names_follow_the_kernel(name: str) -> None:
    pool = shmpool.mempool_create(2, name, slot_size=32, capacity=3)
    assert shmpool.mempool_is_saturated(pool)
    a = shmpool.mempool_alloc(pool, GFP_ATOMIC)
    b = shmpool.mempool_alloc(pool, GFP_ATOMIC)  # arena dry: from the reserve
    assert not shmpool.mempool_is_saturated(pool)
    shmpool.mempool_free(None, pool)
    shmpool.mempool_free(b, pool)  # element first, like the kernel
    shmpool.mempool_free(a, pool)
    assert shmpool.mempool_resize(pool, 1, GFP_KERNEL) == 0
    assert shmpool.mempool_is_saturated(pool)
    c = shmpool.mempool_alloc_preallocated(pool)
    assert pool.stats().alloc_reserve == 2
    shmpool.mempool_free(c, pool)
    shmpool.mempool_destroy(pool)
    assert pool.closed


# ---------------------------------------------------------------- threads


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
