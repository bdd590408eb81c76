"""The kernel's rules (../shared/KERNEL_MEMPOOL.md), one process at a time:
a plain model of them against the compiled core, then each rule by example.

The model
---------
Property-based: random alloc, free, resize and fault-rate changes against a
plain model of the kernel's rules, every counter checked after every step.

The model restates the rules; it does not copy shmpool. It holds:

- ``min_nr``, and the reserve as a LIFO list of slot indexes (its top is the
  end of the list);
- the arena's free list as a LIFO list too. A fresh pool's arena gives the
  lowest slots first, and create pre-fills the reserve from it (exempt from
  fault injection), so slots ``0..min_nr-1`` are the reserve with
  ``min_nr-1`` on top and the arena's next pop is slot ``min_nr``;
- the handles held, and every counter of ``stats()``;
- the fault injector: splitmix64, restated below. The state starts at the
  seed and ``set_fail_rate(rate, seed=S)`` restarts it; a draw fails when
  ``(out >> 11) < round(rate * 2**53)``. A draw happens only on an arena
  attempt that the arena could serve (it is not empty) and only while the
  rate is not 0 (at rate 0 the injector is off and its state does not move,
  as the kernel's should_fail() returns before drawing when the probability
  is 0).

With that the model predicts, for every allocation, whether the arena or the
reserve serves it and which slot it returns (``handle_slot``), and for every
grow which slots refill the reserve.

Two runs of the same machine:

- ``test_kernel_rules_hold``: every property, except that the slot an arena
  pop returns need only be a free arena slot (not the top of the arena's
  list). It must pass.
- ``test_kernel_rules_hold_with_exact_arena_order``: the same plus the exact
  LIFO order of the arena (ArenaOrderError, which nothing but that property
  raises, says which pop broke it). It found that a shrinking resize put the
  reserve's elements under this process's cache instead of on the arena's
  top; the C transitions drain the cache first, as every other path does.

Failures are reproducible: hypothesis prints the steps and a
``@reproduce_failure`` blob, and ``pytest --hypothesis-seed=N`` replays a run.

The rules by example
--------------------
create, alloc, free, resize, fault injection, destroy and poisoning, each
rule and each refusal (a refused call changes no byte of the segment), and
the kernel's own names for them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import warnings
from typing import Any

import numpy as np
import pytest
from helpers import RUN_TAG, check_whole, reserve_stack, slot_bytes, snapshot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shmpool import (
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    InvalidHandleError,
    Mempool,
    PoisonWarning,
    PoolBusyError,
    PoolStats,
    handle_slot,
    kernel,
)
from shmpool._layout import POISON_END, POISON_FREE, POISON_INUSE
from shmpool.pool import ATOMIC_LOCK_WAIT_SECONDS
from shmpool.testing import hold_lock

M64 = (1 << 64) - 1
RATES = (0.0, 0.3, 0.7, 1.0)
MAX_CAPACITY = 12

class ArenaOrderError(AssertionError):
    """An arena pop returned a free arena slot, but not the top of the arena."""


# ----------------------------------------------------------------------
# The model


def splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


class KernelModel:
    """The kernel's mempool rules for one process, in plain Python."""

    COUNTERS = ("alloc_arena", "alloc_reserve", "alloc_failed", "free_reserve", "free_arena", "sleeps", "faults_injected")

    def __init__(self, capacity: int, min_nr: int, fail_rate: float, seed: int, exact_arena_order: bool) -> None:
        self.capacity = capacity
        self.exact_arena_order = exact_arena_order
        arena = list(range(capacity - 1, -1, -1))  # top (end) is slot 0: lowest slots first
        self.reserve: list[int] = []  # top is the end
        self.min_nr = min_nr
        for _ in range(min_nr):  # create's pre-fill: no fault draws
            self.reserve.append(arena.pop())
        self.arena = arena
        self.low_water = min_nr  # the lowest len(reserve) seen (the pool's H_LOW_WATER)
        self.held: dict[int, int] = {}  # handle -> slot
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.set_fail_rate(fail_rate, seed)  # the generator starts at the seed

    def set_fail_rate(self, rate: float, seed: int | None) -> None:
        """A new rate; a seed (never None at create) restarts the generator."""
        self.fail_rate = rate
        self.threshold = round(rate * (1 << 53))
        if seed is not None:
            self.seed = seed
            self.rng = seed

    def arena_attempt(self) -> bool:
        """One try of the backing allocator: True if the arena gives its top
        element (the caller then names it with ``arena_take``)."""
        if not self.arena:
            return False  # dry: nothing drawn
        if self.threshold:
            self.rng, out = splitmix64(self.rng)
            if (out >> 11) < self.threshold:
                self.counters["faults_injected"] += 1
                return False
        return True

    def arena_take(self, slot: int) -> None:
        """The arena gave ``slot``: it must be its top (LIFO)."""
        assert slot in self.arena, f"the arena gave slot {slot}, which is not free in it (free: {self.arena})"
        if self.exact_arena_order and slot != self.arena[-1]:
            raise ArenaOrderError(
                f"the arena gave slot {slot}, not its top {self.arena[-1]} (free list, top last: {self.arena})"
            )
        self.arena.remove(slot)

    def alloc(self, may_use_arena: bool = True) -> tuple[str, int | None]:
        """What an allocation does: ("arena", None): the arena's top (the
        caller names it with arena_take); ("reserve", slot): the reserve's
        top, popped; ("failed", None)."""
        if may_use_arena and self.arena_attempt():
            self.counters["alloc_arena"] += 1
            return "arena", None
        if self.reserve:
            self.counters["alloc_reserve"] += 1
            slot = self.reserve.pop()
            self.low_water = min(self.low_water, len(self.reserve))
            return "reserve", slot
        self.counters["alloc_failed"] += 1
        return "failed", None

    def free(self, handle: int) -> str:
        slot = self.held.pop(handle)
        if len(self.reserve) < self.min_nr:
            self.reserve.append(slot)
            self.counters["free_reserve"] += 1
            return "free-reserve"
        self.arena.append(slot)
        self.counters["free_arena"] += 1
        return "free-arena"

    def resize(self, new_min_nr: int, refilled: list[int]) -> None:
        """Shrink: pop the reserve down to new_min_nr onto the arena, one by
        one. Grow: raise min_nr, then refill from the arena (fault draws
        included) until the reserve is full or an attempt fails.
        ``refilled``: the slots the pool pushed onto the reserve, in order
        (each must be the arena's top at its turn)."""
        if new_min_nr <= self.min_nr:
            while len(self.reserve) > new_min_nr:
                self.arena.append(self.reserve.pop())
                self.low_water = min(self.low_water, len(self.reserve))
            self.min_nr = new_min_nr
            assert refilled == [], f"a shrink refilled the reserve with {refilled}"
            return
        self.min_nr = new_min_nr
        pushed = list(refilled)
        while len(self.reserve) < self.min_nr and self.arena_attempt():
            assert pushed, f"the grow stopped after {len(refilled)} refill(s); the model says the arena gives more"
            slot = pushed.pop(0)
            self.arena_take(slot)
            self.reserve.append(slot)
        assert not pushed, f"the grow refilled {refilled}; the model says only the first {len(refilled) - len(pushed)}"

    def check_self(self) -> None:
        """Every slot is in exactly one place."""
        slots = self.reserve + self.arena + list(self.held.values())
        assert sorted(slots) == list(range(self.capacity)), f"model lost a slot: {slots}"
        assert len(self.reserve) <= self.min_nr


# ----------------------------------------------------------------------
# The machine


class PoolMachine(RuleBasedStateMachine):
    exact_arena_order = False

    def __init__(self) -> None:
        super().__init__()
        self.pool: Mempool | None = None
        self.issued: set[int] = set()  # every handle ever returned
        self.events: list[tuple[str, int | None, int]] = []
        self.tracing = False

    # -- set-up and tear-down

    @initialize(
        capacity=st.integers(1, MAX_CAPACITY),
        data=st.data(),
        rate=st.sampled_from(RATES),
        seed=st.integers(0, M64),  # never None: a random seed would make runs unrepeatable
        poison=st.booleans(),
    )
    def create(self, capacity: int, data: st.DataObject, rate: float, seed: int, poison: bool) -> None:
        min_nr = data.draw(st.integers(1, capacity), label="min_nr")
        self.pool = Mempool.create(
            f"{RUN_TAG}-model-{uuid.uuid4().hex[:12]}",
            min_nr=min_nr, slot_size=24, capacity=capacity, fail_rate=rate, seed=seed, poison=poison,
        )
        self.poison = poison
        self.model = KernelModel(capacity, min_nr, rate, seed, self.exact_arena_order)

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.destroy(force=True)
            self.pool = None

    # -- helpers

    def _stack(self) -> list[int]:
        """The reserve stack in the segment, bottom first."""
        assert self.pool is not None
        return reserve_stack(self.pool)

    def _got(self, handle: int | None, outcome: str, reserve_top: int | None) -> None:
        """Check what an allocation returned against the model's outcome."""
        m = self.model
        if outcome == "failed":
            assert handle is None, f"the model says this allocation fails, the pool gave {handle:#x}"
            return
        assert handle is not None, f"the model says the {outcome} serves this allocation, the pool gave nothing"
        assert handle not in self.issued, f"handle {handle:#x} was handed out before"
        slot = handle_slot(handle)
        if outcome == "arena":
            m.arena_take(slot)
        else:
            assert slot == reserve_top, f"the reserve gave slot {slot}, not its top {reserve_top} (LIFO)"
        self.issued.add(handle)
        m.held[handle] = slot

    def _traced(self, event: str, handle: int | None) -> None:
        if self.tracing:
            assert self.events == [(event, handle, len(self.model.reserve))], self.events
        else:
            assert self.events == []
        self.events.clear()

    # -- allocation (one rule, so that allocations and frees come about equally often)

    @rule(
        how=st.sampled_from(
            [("nowait", gfp) for gfp in (GFP_ATOMIC, GFP_NOWAIT, int(GFP_ATOMIC), int(GFP_NOWAIT))]
            + [("sleep, timeout=0", gfp) for gfp in (GFP_KERNEL, GFP_NOIO, GFP_NOFS)]
            + [("preallocated", None)]
        )
    )
    def alloc(self, how: tuple[str, int | None]) -> None:
        """- GFP_ATOMIC, GFP_NOWAIT: the arena first, then the reserve's top,
          else None at once.
        - GFP_KERNEL, GFP_NOIO, GFP_NOFS with timeout=0: the same, except that
          where the former returns None this raises TimeoutError, counted as
          failed, without ever registering as a sleeper (the deadline has
          passed already).
        - alloc_preallocated(): the reserve's top only; never the arena, so
          no fault draw; None if empty; not traced."""
        assert self.pool is not None
        kind, gfp = how
        if kind == "preallocated":
            handle = self.pool.alloc_preallocated()
            self._got(handle, *self.model.alloc(may_use_arena=False))
            assert self.events == [], f"alloc_preallocated was traced: {self.events}"
            return
        outcome, reserve_top = self.model.alloc()
        if kind == "nowait":
            handle = self.pool.alloc(gfp)
        elif outcome == "failed":
            with pytest.raises(TimeoutError):
                self.pool.alloc(gfp, timeout=0)
            handle = None
        else:
            handle = self.pool.alloc(gfp, timeout=0)
        self._got(handle, outcome, reserve_top)
        self._traced({"arena": "alloc-arena", "reserve": "alloc-reserve", "failed": "alloc-failed"}[outcome], handle)

    # -- free

    @precondition(lambda self: self.model.held)
    @rule(data=st.data())
    def free_held(self, data: st.DataObject) -> None:
        """Refill the reserve below min_nr, else back to the arena's top."""
        assert self.pool is not None
        handle = data.draw(st.sampled_from(sorted(self.model.held)), label="handle")
        self.pool.free(handle)
        event = self.model.free(handle)
        self._traced(event, handle)

    # -- resize

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        """Shrink: reserve tops go to the arena. Grow: refill from the arena,
        with fault draws, stopping at the first failure."""
        assert self.pool is not None
        m = self.model
        new = data.draw(st.integers(1, m.capacity), label="new_min_nr")
        depth = len(m.reserve)
        self.pool.resize(new)
        stack = self._stack()
        assert stack[:depth] == m.reserve[: len(stack)], f"resize disturbed the reserve: {stack} vs {m.reserve}"
        m.resize(new, stack[depth:])

    # -- refused calls (one rule, so that they do not crowd out the others)

    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        """Each changes nothing at all (the whole segment is compared):
        - free(None): ignored, as the kernel ignores NULL;
        - free of a handle not held now (a double free, or a stale handle
          whose slot was handed out again) or of another pool's handle:
          InvalidHandleError;
        - resize to a new_min_nr outside 1..capacity: ValueError."""
        assert self.pool is not None
        gone = sorted(self.issued - set(self.model.held))
        kinds = ["free None", "resize"] + (["free gone"] if gone else []) + (["free forged"] if self.issued else [])
        kind = data.draw(st.sampled_from(kinds), label="kind")
        before = snapshot(self.pool)
        if kind == "free None":
            self.pool.free(None)
        elif kind == "resize":
            cap = self.model.capacity
            new = data.draw(st.sampled_from([0, -1, -(1 << 40), cap + 1, MAX_CAPACITY + 1, 1 << 40]), label="new_min_nr")
            with pytest.raises(ValueError):
                self.pool.resize(new)
        else:
            handle = data.draw(st.sampled_from(gone if kind == "free gone" else sorted(self.issued)), label="handle")
            if kind == "free forged":  # the same slot and generation under another pool's tag
                handle ^= 1 << 50
            with pytest.raises(InvalidHandleError):
                self.pool.free(handle)
        assert snapshot(self.pool) == before, f"{kind} changed the pool"
        assert self.events == [], f"{kind} was traced: {self.events}"

    # -- fault injection and tracing

    @rule(rate=st.sampled_from(RATES), seed=st.none() | st.integers(0, M64))
    def set_fail_rate(self, rate: float, seed: int | None) -> None:
        assert self.pool is not None
        self.pool.set_fail_rate(rate, seed=seed)
        self.model.set_fail_rate(rate, seed)

    @rule(on=st.booleans())
    def trace(self, on: bool) -> None:
        """With a trace callback every operation takes the locked Python
        path; without one, the compiled hot path. The rules are the same."""
        assert self.pool is not None
        self.pool.trace = (lambda event, handle, curr_nr: self.events.append((event, handle, curr_nr))) if on else None
        self.tracing = on

    # -- after every step

    @invariant()
    def pool_matches_the_model(self) -> None:
        if self.pool is None:
            return
        m = self.model
        m.check_self()
        s = self.pool.stats()
        want = PoolStats(
            name=self.pool.name, slot_size=24, capacity=m.capacity, min_nr=m.min_nr, curr_nr=len(m.reserve),
            arena_free=len(m.arena), in_use=len(m.held), queued=0, nr_waiters=0, fail_rate=m.fail_rate, seed=m.seed,
            poison=self.poison, poison_errors=0, lock_recoveries=0, reclaimed=0, **m.counters,
            reserve_low_water=m.low_water, longest_sleep=0.0, total_sleep=0.0, attached=1, published=0,
        )
        got: dict[str, Any] = dataclasses.asdict(s)
        diff = {k: (got[k], v) for k, v in dataclasses.asdict(want).items() if got[k] != v}
        assert not diff, f"stats differ from the model (field: (pool, model)): {diff}"
        assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity
        assert self._stack() == m.reserve, f"reserve stack {self._stack()} != model {m.reserve} (bottom first)"
        check_whole(self.pool)


class ExactArenaOrderMachine(PoolMachine):
    exact_arena_order = True


# ----------------------------------------------------------------------
# The tests

SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,  # write nothing into the tree: a failure prints its steps and a @reproduce_failure blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(120)
def test_kernel_rules_hold() -> None:
    """Every rule and counter, the arena's slots checked as a set."""
    run_state_machine_as_test(PoolMachine, settings=SETTINGS)


@pytest.mark.timeout(120)
def test_kernel_rules_hold_with_exact_arena_order() -> None:
    """Every rule and counter, and which slot each arena pop returns."""
    run_state_machine_as_test(ExactArenaOrderMachine, settings=SETTINGS)


# The smallest case of the shrink-order bug the machine above found.
@pytest.mark.timeout(30)
def test_shrink_gives_back_to_the_arena_top(name: str) -> None:
    pool = Mempool.create(name, min_nr=2, slot_size=16, capacity=4)  # reserve [0, 1], arena's top: 2
    try:
        h = pool.alloc(GFP_ATOMIC)  # the arena's top: slot 2
        assert handle_slot(h) == 2
        pool.free(h)  # the reserve is full: slot 2 goes back on the arena's top
        pool.resize(1)  # shrink: slot 1 (the reserve's top) goes on the arena's top, above slot 2
        got = handle_slot(pool.alloc(GFP_ATOMIC))
        if got != 1:
            raise ArenaOrderError(f"after the shrink the arena gave slot {got}, not slot 1, its top")
    finally:
        pool.destroy(force=True)


# ----------------------------------------------------------------------
# The rules by example: create


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
    assert pool.alloc(GFP_ATOMIC) is None
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


# ---------------------------------------------------------------- fault injection


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


@pytest.mark.parametrize(
    "bad, exc",
    [(float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError), (1.01, ValueError), ("0.3", TypeError)],
)
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


def test_destroy_refuses_only_while_elements_are_held(name: str) -> None:
    """Later kernels dropped v3.2's BUG_ON(curr_nr != min_nr): a reserve
    below min_nr with nothing held does not stop destroy."""
    pool = Mempool.create(name, min_nr=2, slot_size=16, capacity=8, fail_rate=1.0, seed=1)
    try:
        pool.resize(6)  # the arena fails: the resize succeeds, the reserve stays at 2
        s = pool.stats()
        assert (s.curr_nr, s.min_nr, s.in_use) == (2, 6, 0)
        h = pool.alloc(GFP_ATOMIC)  # from the reserve
        before = snapshot(pool)
        with pytest.raises(PoolBusyError, match="1 element"):
            kernel.mempool_destroy(pool)
        assert snapshot(pool) == before  # refused: nothing changed
        pool.free(h)
        assert pool.stats().curr_nr == 2  # under-filled, nothing held
    except BaseException:
        pool.destroy(force=True)
        raise
    kernel.mempool_destroy(pool)
    assert pool.closed
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


def test_destroy_accepts_an_underfilled_reserve_with_nothing_held(pool: Mempool) -> None:
    held = drain_arena(pool)
    pool.resize(5)  # under-filled: 3 of 5
    for h in held:
        pool.free(h)  # tops it up to 5, the rest to the arena
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
    pool.destroy()  # nothing to free: not refused
    assert pool.closed


def test_destroy_force_unlinks_with_elements_held(pool: Mempool, name: str) -> None:
    pool.alloc()
    pool.destroy(force=True)
    assert pool.closed
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


# ---------------------------------------------------------------- poisoning


def test_poisoning_is_the_kernels(name: str) -> None:
    assert (POISON_FREE, POISON_END, POISON_INUSE) == (0x6B, 0xA5, 0x5A)
    free_pattern = bytes([POISON_FREE]) * 31 + bytes([POISON_END])
    with Mempool.create(name, min_nr=3, slot_size=32, capacity=6, poison=True) as pool:
        # Entering the reserve: POISON_FREE, the last byte POISON_END.
        assert [slot_bytes(pool, slot) for slot in reserve_stack(pool)] == [free_pattern] * 3
        pool.set_fail_rate(1.0)
        h = pool.alloc(GFP_ATOMIC)  # the arena fails: the reserve's top
        assert pool.stats().alloc_reserve == 1
        # Leaving it, the element is checked and filled with POISON_INUSE
        # before it is handed out (the kernel's check_element).
        assert bytes(pool.buffer(h)) == bytes([POISON_INUSE]) * 32
        pool.buffer(h)[:] = b"x" * 32
        pool.free(h)  # back into the reserve: poisoned again
        assert [slot_bytes(pool, slot) for slot in reserve_stack(pool)] == [free_pattern] * 3
        pool.destroy()


def written_after_free(pool: Mempool, at: int) -> int:
    """Allocate an element, free it into the reserve, then write byte ``at``
    of it through a view kept too long; its handle."""
    h = pool.alloc()
    mv = pool.buffer(h)
    pool.free(h)
    mv[at] = 0
    del mv
    return h


def test_write_after_free_into_a_reserved_element_is_reported(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=2, poison=True) as p:
        h = written_after_free(p, 3)
        with pytest.warns(PoisonWarning, match=f"slot {handle_slot(h)}.*written after"):
            again = p.alloc()
        assert handle_slot(again) == handle_slot(h)  # still handed out, as the kernel does
        evidence = bytearray([POISON_FREE] * 15 + [POISON_END])
        evidence[3] = 0
        assert bytes(p.buffer(again)) == bytes(evidence)  # left as found (the kernel's __check_element)
        assert p.stats().poison_errors == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other = p.alloc()  # an intact one: no warning
        p.free(again)
        p.free(other)
        check_whole(p)
        p.destroy()


def test_destroy_checks_every_reserved_elements_poison(name: str) -> None:
    """mempool_exit empties the reserve through remove_element, which checks
    each element: destroy warns for every one written after its free."""
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=3, poison=True) as p:
        hs = [p.alloc() for _ in range(3)]
        views = [p.buffer(h) for h in hs]
        p.free_bulk(hs)
        views[0][0] = 1
        views[2][15] = 1
        del views
        with pytest.warns(PoisonWarning) as caught:
            p.destroy()
        said = sorted(str(w.message) for w in caught if issubclass(w.category, PoisonWarning))
        assert len(said) == 2 and all("destroyed" in s for s in said)
        assert {f"slot {handle_slot(hs[i])} " in " ".join(said) for i in (0, 2)} == {True}
        assert f"slot {handle_slot(hs[1])} " not in " ".join(said)


def test_destroying_a_whole_poisoned_pool_warns_nothing(name: str) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=6, poison=True) as p:
        p.free_bulk([p.alloc() for _ in range(6)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p.destroy()


def test_poison_warning_escalated_to_an_exception_gives_the_element_back(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=1, poison=True) as p:
        written_after_free(p, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PoisonWarning)
            with pytest.raises(PoisonWarning):
                p.alloc()
            # The call that raised gave its element back (poisoned afresh):
            # nothing is held, nothing is lost, and the next alloc is clean.
            s = p.stats()
            assert (s.in_use, s.curr_nr, s.poison_errors) == (0, 1, 1)
            check_whole(p)
            h = p.alloc()
        assert handle_slot(h) == 0 and bytes(p.buffer(h)) == bytes([POISON_INUSE]) * 8
        p.free(h)
        check_whole(p)
        p.destroy()


# ---------------------------------------------------------------- the kernel's names


def test_kernel_names_follow_the_kernel(name: str) -> None:
    pool = kernel.mempool_create(2, name, slot_size=32, capacity=3)
    assert kernel.mempool_is_saturated(pool)
    a = kernel.mempool_alloc(pool, GFP_ATOMIC)
    b = kernel.mempool_alloc(pool, GFP_ATOMIC)  # arena dry: from the reserve
    assert not kernel.mempool_is_saturated(pool)
    kernel.mempool_free(None, pool)
    kernel.mempool_free(b, pool)  # element first, like the kernel
    kernel.mempool_free(a, pool)
    assert kernel.mempool_resize(pool, 1, GFP_KERNEL) == 0
    assert kernel.mempool_is_saturated(pool)
    c = kernel.mempool_alloc_preallocated(pool)
    assert pool.stats().alloc_reserve == 2
    kernel.mempool_free(c, pool)
    kernel.mempool_destroy(pool)
    assert pool.closed


def test_is_saturated_reads_without_the_lock(pool: Mempool) -> None:
    """As the kernel's mempool_is_saturated: two loads, no lock, so it
    answers at once even while the lock is held (here by this process)."""
    h = pool.alloc_preallocated()
    with hold_lock(pool):
        took = []
        for _ in range(5):  # a call that waited for the lock would wait its bound every time
            t0 = time.monotonic()
            assert not pool.is_saturated()  # 2 of 3
            took.append(time.monotonic() - t0)
        assert min(took) < ATOMIC_LOCK_WAIT_SECONDS
    pool.free(h)
    with hold_lock(pool):
        assert pool.is_saturated()

