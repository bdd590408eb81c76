"""Repair: rebuild what a dead lock holder may have left half-done.

The slot words are the truth (see ``_layout`` and ``pool``); the reserve
stack, the arena free list, their depths and the waiter count are derived
from them and from the process registry. Slots cached by a dead process
(see ``_fast.c``) go back to the arena; a live process's cache is left to
it, as it changes its cache without the lock. ``rebuild`` recomputes all of it
with numpy in one pass, keeping the surviving order of each stack (so the
reserve stays LIFO for the elements that were on it), and reports what it
changed. It is idempotent: on a whole pool it changes nothing.

It runs with the pool lock held: by the process that took the lock over from
a dead holder (``_lock``), and by ``Mempool.reclaim_dead``.
"""

from __future__ import annotations

import numpy as np

from ._layout import (
    GEN_MASK,
    GEN_SHIFT,
    H_ARENA_FREE,
    H_CURR_NR,
    H_MIN_NR,
    H_NR_WAITERS,
    P_CACHE_N,
    P_DISCARDED,
    P_PID,
    P_STOLEN,
    PID_SHIFT,
    PROC_WORDS,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_RESERVE,
    STATE_MASK,
    Views,
)
from ._procs import Registry


def _ordered(stack: np.ndarray, depth: int, members: np.ndarray, capacity: int) -> np.ndarray:
    """The slots of ``members`` (a boolean mask), in the order in which the
    first ``depth`` entries of ``stack`` list them, then the unlisted ones."""
    entries = stack[: min(depth, capacity)].astype(np.int64)
    entries = entries[entries < capacity]
    entries = entries[members[entries]]
    _, first = np.unique(entries, return_index=True)
    kept = entries[np.sort(first)]
    listed = np.zeros(capacity, dtype=bool)
    listed[kept] = True
    return np.concatenate([kept, np.flatnonzero(members & ~listed)]).astype(np.uint32)


def rebuild(v: Views, registry: Registry) -> list[str]:
    """Make the stacks, depths and waiter count agree with the slot words
    and the registry. Returns one line per thing it had to fix."""
    hdr, cap = v.hdr, v.geo.capacity
    fixed: list[str] = []
    words = np.frombuffer(v.words, dtype=np.uint64)
    states = words & np.uint64(STATE_MASK)
    invalid = (states != ST_ARENA) & (states != ST_RESERVE) & (states != ST_HELD) & (states != ST_CACHED)
    if invalid.any():
        fixed.append(f"{int(invalid.sum())} slot(s) in no valid state put in the arena")
        gens = words[invalid] & np.uint64(GEN_MASK << GEN_SHIFT)
        words[invalid] = gens | np.uint64(ST_ARENA)
        states = words & np.uint64(STATE_MASK)

    # Cached slots of a process that is gone (or unknown) are free again; a
    # live process's cache is its own business: not touched.
    procs = np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)
    cached = states == ST_CACHED
    if cached.any():
        owners = words >> np.uint64(PID_SHIFT)
        for pid in np.unique(owners[cached]).tolist():
            if not registry.holder_alive(pid):
                lost = cached & (owners == pid)
                words[lost] = (words[lost] & np.uint64(GEN_MASK << GEN_SHIFT)) | np.uint64(ST_ARENA)
                for field in (P_CACHE_N, P_STOLEN, P_DISCARDED):
                    procs[procs[:, P_PID] == pid, field] = 0
                fixed.append(f"{int(lost.sum())} slot(s) cached by dead process {pid} put back in the arena")
        states = words & np.uint64(STATE_MASK)

    stack = np.frombuffer(v.stack, dtype=np.uint32)
    reserve = _ordered(stack, hdr[H_CURR_NR], states == ST_RESERVE, cap)
    min_nr = hdr[H_MIN_NR]
    if reserve.size > min_nr:  # the reserve is not a cache: extras go back
        extra = reserve[min_nr:]
        words[extra] = (words[extra] & np.uint64(GEN_MASK << GEN_SHIFT)) | np.uint64(ST_ARENA)
        reserve = reserve[:min_nr]
        fixed.append(f"{extra.size} reserve element(s) beyond min_nr given back to the arena")
        states = words & np.uint64(STATE_MASK)
    arena_list = np.frombuffer(v.arena, dtype=np.uint32)
    arena = _ordered(arena_list, hdr[H_ARENA_FREE], states == ST_ARENA, cap)

    for label, index, arr, new in (
        ("reserve", H_CURR_NR, stack, reserve),
        ("arena", H_ARENA_FREE, arena_list, arena),
    ):
        old_depth = hdr[index]
        if old_depth != new.size or not np.array_equal(arr[: new.size], new):
            fixed.append(f"{label} stack rebuilt: depth {old_depth} -> {new.size}")
            arr[: new.size] = new
            hdr[index] = new.size

    sleepers = registry.live_sleepers()
    if hdr[H_NR_WAITERS] != sleepers:
        fixed.append(f"nr_waiters {hdr[H_NR_WAITERS]} -> {sleepers} (sleepers that died)")
        hdr[H_NR_WAITERS] = sleepers
    return fixed
