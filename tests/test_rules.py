"""Property-based: random alloc, free, resize and fault-rate changes against a
plain model of the kernel's rules (../shared/KERNEL_MEMPOOL.md), every
counter checked after every step.

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
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from helpers import RUN_TAG, check_whole, snapshot
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
    PoolStats,
    handle_slot,
)
from shmpool._layout import H_CURR_NR

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
            return "reserve", self.reserve.pop()
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
        v = self.pool._core[0]  # type: ignore[index]
        return v.stack[: v.hdr[H_CURR_NR]].tolist()

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
