"""Debugging aids: element poisoning and the pool audit.

Poisoning (the kernel's mempool poisoning under slab debugging,
CONFIG_SLUB_DEBUG_ON / slub_debug=P): an element that enters the reserve is
filled with POISON_FREE (0x6b) and its last byte set to POISON_END (0xa5);
when it leaves the reserve the pattern is checked (a mismatch means that
somebody wrote to the element after freeing it) and the element is filled
with POISON_INUSE (0x5a) before it is handed out. ``_core/slots.c`` does it, under
the lock; the audit below checks the reserve's patterns.

The audit (DPDK's rte_mempool_audit, and the checks of shmpool-inspect
--check) reads a pool and reports every way in which it breaks the layout's
invariants. It never writes. Both work with numpy over the per-slot arrays,
so a pool of a million slots is audited in well under a second.
"""

from __future__ import annotations

import numpy as np

from ._layout import (
    CACHE_MAX,
    FLAG_POISON,
    H_ARENA_FREE,
    H_CURR_NR,
    H_FLAGS,
    H_MIN_NR,
    H_NR_WAITERS,
    OWNER_MASK,
    OWNER_SHIFT,
    P_CACHE,
    P_CACHE_N,
    P_EPOCH,
    P_PID,
    POISON_END,
    POISON_FREE,
    POISON_INUSE,
    PROC_WORDS,
    Q_COUNT,
    Q_DEPTH,
    Q_HEAD,
    Q_STATE,
    Q_TAIL,
    QUEUE_LIVE,
    QUEUE_WORDS,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_PARKED,
    ST_QUEUED,
    ST_RESERVE,
    STATE_MASK,
)
from ._mapping import Views



def poison_pattern(slot_size: int) -> bytes:
    """What a reserved element holds while poisoning is on."""
    return bytes([POISON_FREE]) * (slot_size - 1) + bytes([POISON_END])


def quick_check(v: Views) -> str | None:
    """The first sign of corruption that can be seen without the lock and
    without reading every slot (fast enough for every attach), or None.
    Each property checked holds at every instant in a healthy pool."""
    hdr, cap = v.hdr, v.geo.capacity
    min_nr, curr_nr, arena_free = hdr[H_MIN_NR], hdr[H_CURR_NR], hdr[H_ARENA_FREE]
    if not 1 <= min_nr <= cap:
        return f"min_nr {min_nr} is outside 1..capacity ({cap})"
    if curr_nr > min_nr:
        return f"curr_nr {curr_nr} exceeds min_nr {min_nr}"
    if curr_nr + arena_free > cap:
        return f"curr_nr {curr_nr} + arena_free {arena_free} exceed the capacity {cap}"
    for label, depth, arr in (("reserve stack", curr_nr, v.stack), ("arena free list", arena_free, v.arena)):
        entries = np.frombuffer(arr, dtype=np.uint32)[:depth]
        if entries.size and int(entries.max()) >= cap:
            at = int(np.argmax(entries >= cap))
            return f"{label} entry {at} is slot {entries[at]}, out of range (capacity {cap})"
    return None


def audit(v: Views) -> list[str]:
    """Every broken invariant of the pool in ``v``, one sentence each (an
    empty list for a healthy pool). Call it with the pool lock held for an
    exact answer; without it, a busy pool may show passing inconsistencies."""
    hdr, geo = v.hdr, v.geo
    cap = geo.capacity
    findings: list[str] = []
    min_nr, curr_nr, arena_free = hdr[H_MIN_NR], hdr[H_CURR_NR], hdr[H_ARENA_FREE]
    if not 1 <= min_nr <= cap:
        findings.append(f"min_nr {min_nr} is outside 1..capacity ({cap})")
    if curr_nr > min_nr:
        findings.append(f"curr_nr {curr_nr} exceeds min_nr {min_nr}")
    if curr_nr + arena_free > cap:
        findings.append(f"curr_nr {curr_nr} + arena_free {arena_free} exceed the capacity {cap}")
        return findings  # the stacks cannot be read within bounds
    states = np.frombuffer(v.words, dtype=np.uint64) & STATE_MASK
    bad = np.flatnonzero(
        (states != ST_ARENA) & (states != ST_RESERVE) & (states != ST_HELD) & (states != ST_CACHED)
        & (states != ST_QUEUED) & (states != ST_PARKED)
    )
    if bad.size:
        findings.append(f"{bad.size} slot(s) have no valid state, first slot {bad[0]} (state {states[bad[0]]})")
    for label, depth, state, arr in (
        ("reserve stack", curr_nr, ST_RESERVE, v.stack),
        ("arena free list", arena_free, ST_ARENA, v.arena),
    ):
        entries = np.frombuffer(arr, dtype=np.uint32)[:depth]
        out = np.flatnonzero(entries >= cap)
        if out.size:
            findings.append(f"{label} entry {out[0]} is slot {entries[out[0]]}, out of range")
            continue
        if np.bincount(entries, minlength=cap).max(initial=0) > 1:  # O(capacity), no sort
            findings.append(f"{label} holds a slot more than once")
        wrong = np.flatnonzero(states[entries] != state)
        if wrong.size:
            slot = entries[wrong[0]]
            findings.append(f"{label} holds slot {slot}, whose state is {states[slot]}, not {state}")
        count = int(np.count_nonzero(states == state))
        if count != depth:
            findings.append(f"{count} slot(s) are marked {label.split()[0]} but the {label} holds {depth}")
    findings += _audit_caches(v, states)
    findings += _audit_queues(v, states)
    if hdr[H_NR_WAITERS] >= 1 << 31:
        findings.append(f"nr_waiters {hdr[H_NR_WAITERS]} is impossible")
    if hdr[H_FLAGS] & FLAG_POISON and not findings:
        findings += _audit_poison(v, curr_nr)
    return findings


def _audit_caches(v: Views, states: np.ndarray) -> list[str]:
    """Every CACHED slot names a registry entry that lists it in its cache.
    Exact only while no process is in its lock-free hot path: those change
    their own cache without the lock."""
    cap = v.geo.capacity
    procs = np.frombuffer(v.procs, dtype=np.uint64).reshape(v.geo.max_procs, PROC_WORDS)
    words = np.frombuffer(v.words, dtype=np.uint64)
    owners = (words >> np.uint64(OWNER_SHIFT)) & np.uint64(OWNER_MASK)
    cached = states == ST_CACHED
    findings: list[str] = []
    listed = np.zeros(cap, dtype=bool)
    for row in range(v.geo.max_procs):
        n = int(procs[row, P_CACHE_N])
        if not n and not procs[row, P_EPOCH]:
            continue
        if n > CACHE_MAX:
            findings.append(f"registry entry {row} (pid {int(procs[row, P_PID])}) claims {n} cache entries, more than {CACHE_MAX}")
            continue
        entries = procs[row, P_CACHE:].view(np.uint32)[:n].astype(np.int64)
        entries = entries[entries < cap]  # blanks: entries other processes took
        listed[entries[(states[entries] == ST_CACHED) & (owners[entries] == row + 1)]] = True
    unlisted = np.flatnonzero(cached & ~listed)
    if unlisted.size:
        slot = int(unlisted[0])
        findings.append(f"{unlisted.size} cached slot(s) are in no cache, first slot {slot} (entry {int(owners[slot]) - 1})")
    return findings


def _audit_queues(v: Views, states: np.ndarray) -> list[str]:
    """Each live queue's list, walked from its head, names exactly its
    QUEUED slots, ``count`` of them, ending at its tail."""
    cap = v.geo.capacity
    words = np.frombuffer(v.words, dtype=np.uint64)
    owners = (words >> np.uint64(OWNER_SHIFT)) & np.uint64(OWNER_MASK)
    table = np.frombuffer(v.queues, dtype=np.uint64).reshape(v.geo.max_queues, QUEUE_WORDS)
    nxt = np.frombuffer(v.next, dtype=np.uint32)
    queued = states == ST_QUEUED
    findings: list[str] = []
    stray = np.flatnonzero(queued & ((owners == 0) | (owners > v.geo.max_queues)))
    if stray.size:
        findings.append(f"{stray.size} queued slot(s) name no queue, first slot {int(stray[0])}")
    for q in range(v.geo.max_queues):
        row = table[q]
        mine = int(np.count_nonzero(queued & (owners == q + 1)))
        if row[Q_STATE] != QUEUE_LIVE:
            if mine:
                findings.append(f"{mine} slot(s) are queued in queue {q}, which does not exist")
            continue
        count, depth, idx = int(row[Q_COUNT]), int(row[Q_DEPTH]), int(row[Q_HEAD])
        if count > depth:
            findings.append(f"queue {q} holds {count} elements, more than its depth {depth}")
        walked, last, seen = 0, -1, set()
        while walked < min(count, cap) and idx < cap and idx not in seen:
            if states[idx] != ST_QUEUED or owners[idx] != q + 1:
                break
            seen.add(idx)
            last, walked = idx, walked + 1
            idx = int(nxt[idx])
        if walked != count or mine != count or (count and last != int(row[Q_TAIL])):
            findings.append(f"queue {q}'s list reaches {walked} element(s); its count says {count} and {mine} are queued in it")
    return findings


def _audit_poison(v: Views, curr_nr: int) -> list[str]:
    geo = v.geo
    slots = np.frombuffer(v.data, dtype=np.uint8).reshape(geo.capacity, geo.stride)[:, : geo.slot_size]
    entries = np.frombuffer(v.stack, dtype=np.uint32)[:curr_nr]
    if not entries.size:
        return []
    want = np.frombuffer(poison_pattern(geo.slot_size), dtype=np.uint8)
    broken = entries[np.flatnonzero((slots[entries] != want).any(axis=1))]
    if broken.size:
        return [f"{broken.size} reserved element(s) lost their poison (written after free), first slot {broken[0]}"]
    return []
