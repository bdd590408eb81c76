"""Property-based: random alloc, free, resize and fault-rate changes against a
plain model of the kernel's rules (KERNEL_MEMPOOL.md), every counter checked
after every step.

The model states the rules, not shmpool's implementation: the reserve is a
LIFO list (a rule), the arena a set (its order is nobody's business), and the
fault injector is splitmix64 drawn once per arena attempt that the arena
could have served (the documented behaviour), so the model predicts which
attempts fail."""

from __future__ import annotations

import uuid

import pytest
from helpers import RUN_TAG, check_whole, snapshot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shmpool import GFP_ATOMIC, GFP_KERNEL, GFP_NOWAIT, InvalidHandleError, Mempool, handle_slot

M64 = (1 << 64) - 1


class Model:
    def __init__(self, capacity: int, min_nr: int, rate: float, seed: int) -> None:
        self.min_nr = min_nr
        self.reserve = list(range(min_nr))  # create pre-fills it from the arena
        self.arena = set(range(min_nr, capacity))
        self.held: dict[int, int] = {}  # handle -> slot
        self.counters = dict.fromkeys(
            ("alloc_arena", "alloc_reserve", "alloc_failed", "free_reserve", "free_arena", "sleeps", "faults_injected"), 0
        )
        self.set_rate(rate, seed)

    def set_rate(self, rate: float, seed: int | None) -> None:
        self.threshold = round(rate * (1 << 53))
        if seed is not None:
            self.rng = seed

    def arena_fails(self) -> bool:
        """One arena attempt: True if it fails (dry, or a fault fires)."""
        if not self.arena:
            return True  # dry: no draw
        if not self.threshold:
            return False
        self.rng = (self.rng + 0x9E3779B97F4A7C15) & M64
        z = self.rng
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        if z >> 11 < self.threshold:
            self.counters["faults_injected"] += 1
            return True
        return False

    def free(self, slot: int) -> None:
        if len(self.reserve) < self.min_nr:
            self.reserve.append(slot)
            self.counters["free_reserve"] += 1
        else:
            self.arena.add(slot)
            self.counters["free_arena"] += 1


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: Mempool | None = None
        self.freed: list[int] = []

    @initialize(
        capacity=st.integers(1, 12),
        data=st.data(),
        rate=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
        seed=st.integers(0, M64),
    )
    def create(self, capacity: int, data: st.DataObject, rate: float, seed: int) -> None:
        min_nr = data.draw(st.integers(1, capacity))
        self.pool = Mempool.create(
            f"{RUN_TAG}-m{uuid.uuid4().hex[:8]}", min_nr=min_nr, slot_size=16, capacity=capacity,
            fail_rate=rate, seed=seed,
        )
        self.model = Model(capacity, min_nr, rate, seed)

    def _alloc_expect(self, may_fail_with: type | None, handle: int | None) -> None:
        m = self.model
        if not m.arena_fails():
            assert handle is not None and handle_slot(handle) in m.arena, "arena first"
            m.arena.remove(handle_slot(handle))
            m.counters["alloc_arena"] += 1
        elif m.reserve:
            assert handle is not None and handle_slot(handle) == m.reserve.pop(), "reserve top (LIFO)"
            m.counters["alloc_reserve"] += 1
        else:
            assert handle is None
            m.counters["alloc_failed"] += 1
            return
        m.held[handle] = handle_slot(handle)

    @rule(gfp=st.sampled_from([GFP_ATOMIC, GFP_NOWAIT, GFP_KERNEL]))
    def alloc(self, gfp: int) -> None:
        assert self.pool is not None
        try:
            handle = self.pool.alloc(gfp, timeout=0) if gfp == GFP_KERNEL else self.pool.alloc(gfp)
        except TimeoutError:
            handle = None
        self._alloc_expect(None, handle)

    @rule()
    def alloc_preallocated(self) -> None:
        assert self.pool is not None
        handle = self.pool.alloc_preallocated()
        m = self.model
        if m.reserve:
            assert handle is not None and handle_slot(handle) == m.reserve.pop()
            m.counters["alloc_reserve"] += 1
            m.held[handle] = handle_slot(handle)
        else:
            assert handle is None
            m.counters["alloc_failed"] += 1

    @precondition(lambda self: self.model.held)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        assert self.pool is not None
        handle = data.draw(st.sampled_from(sorted(self.model.held)))
        self.pool.free(handle)
        self.model.free(self.model.held.pop(handle))
        self.freed.append(handle)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free_changes_nothing(self, data: st.DataObject) -> None:
        assert self.pool is not None
        handle = data.draw(st.sampled_from(self.freed))
        if handle in self.model.held:
            return  # handed out again under a new generation: not a double free
        before = snapshot(self.pool)
        with pytest.raises(InvalidHandleError):
            self.pool.free(handle)
        assert snapshot(self.pool) == before

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        assert self.pool is not None
        m = self.model
        cap = self.pool.capacity
        new = data.draw(st.integers(1, cap))
        self.pool.resize(new)
        if new <= m.min_nr:
            while len(m.reserve) > new:
                m.arena.add(m.reserve.pop())
            m.min_nr = new
            return
        m.min_nr = new
        stack = self._stack()
        assert stack[: len(m.reserve)] == m.reserve
        while len(m.reserve) < m.min_nr and not m.arena_fails():
            slot = stack[len(m.reserve)]
            assert slot in m.arena, "resize refills from the arena"
            m.arena.remove(slot)
            m.reserve.append(slot)

    @rule(new_min=st.sampled_from([0, -1, 13, 100]))
    def bad_resize_changes_nothing(self, new_min: int) -> None:
        assert self.pool is not None
        if 1 <= new_min <= self.pool.capacity:
            return
        before = snapshot(self.pool)
        with pytest.raises(ValueError):
            self.pool.resize(new_min)
        assert snapshot(self.pool) == before

    @rule(rate=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.none() | st.integers(0, M64))
    def set_fail_rate(self, rate: float, seed: int | None) -> None:
        assert self.pool is not None
        self.pool.set_fail_rate(rate, seed=seed)
        self.model.set_rate(rate, seed)

    def _stack(self) -> list[int]:
        assert self.pool is not None
        v = self.pool._core[0]
        return [v.stack[i] for i in range(v.hdr[18])]

    @invariant()
    def matches_the_model(self) -> None:
        if self.pool is None:
            return
        m, s = self.model, self.pool.stats()
        assert (s.min_nr, s.curr_nr, s.arena_free, s.in_use) == (m.min_nr, len(m.reserve), len(m.arena), len(m.held))
        assert s.curr_nr + s.arena_free + s.in_use == s.capacity
        for key, value in m.counters.items():
            assert getattr(s, key) == value, key
        assert self._stack() == m.reserve
        check_whole(self.pool)

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.destroy(force=True)


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kernel_rules_hold_under_random_operations = pytest.mark.timeout(300)(PoolMachine.TestCase)
