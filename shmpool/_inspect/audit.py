"""The audit of a pool, and ``shmpool-inspect --check``.

Poisoning (the kernel's mempool poisoning under slab debugging,
CONFIG_SLUB_DEBUG_ON / slub_debug=P): an element that enters the reserve is
filled with POISON_FREE (0x6b) and its last byte set to POISON_END (0xa5);
when it leaves the reserve the pattern is checked (a mismatch means that
somebody wrote to the element after freeing it) and the element is filled
with POISON_INUSE (0x5a) before it is handed out. ``_core/slots.c`` does
it, under the lock; the audit checks the reserve's patterns.

``audit`` (DPDK's rte_mempool_audit) reads a pool's views and reports every
way in which they break the layout's invariants, one sentence each: each
slot in one valid state, both stacks of distinct slots in the right state
with depths that match, curr_nr <= min_nr <= capacity, each cached slot in
its owner's cache, each queue's list, no held or cached slot naming a
process that never attached (damage: the core refuses such a pool rather
than take the slot back as a dead process's), the reserve's poison. It
never writes, and works with numpy over the per-slot arrays, so a million
slots are audited in well under a second. ``shmpool.testing.audit`` runs it
under the pool lock; ``--check`` runs it on a copy taken without the lock.

``check`` adds what only a copy with its liveness can tell: elements held
and sleepers still counted by dead processes (what ``reclaim_dead`` takes
back: the finding says to run ``--reclaim-dead``), parked frees that no
lock holder will complete (their process died before raising the hint),
waiter counts that disagree with the sleepers the registry records, and a
lock held by one process for the whole wait for a quiet copy. An element in
a queue is the queue's, not its sender's: one whose sender died is no
finding (reclaim_dead never takes it).

Nothing guarantees that a copy taken without the lock is whole (a process's
cache changes without the lock, a holder may be stopped half way), so
``check_pool`` audits three copies, a little apart (0.05 s, then 0.2 s),
and reports a finding only if it shows in all three: a busy pool's passing
inconsistencies are not damage.
"""

from __future__ import annotations

import re
import time

import numpy as np

from .._layout import (
    CACHE_MAX,
    FLAG_POISON,
    H_ARENA_FREE,
    H_CURR_NR,
    H_FLAGS,
    H_LENT,
    H_MIN_NR,
    H_NR_WAITERS,
    H_PARKED,
    H_RESERVE_DEPTH,
    H_STATUS,
    HEADER_BYTES,
    MAX_SUBS,
    MAX_TOPICS,
    OVERFLOW_SHARE,
    OWNER_MASK,
    OWNER_SHIFT,
    P_CACHE,
    P_CACHE_N,
    P_EPOCH,
    P_PID,
    P_PLACE_Q,
    P_PLACE_R,
    P_PLACES,
    P_SLEEPING,
    PLACE_FULL_MASK,
    PLACE_SLACK_SHIFT,
    PLACES_MAX,
    Q_COUNT,
    Q_DEPTH,
    Q_GETTERS,
    Q_HEAD,
    Q_PUTTERS,
    Q_STATE,
    Q_TAIL,
    QUEUE_LIVE,
    REF_RECEIVED_SHIFT,
    S_HEAD,
    S_TAIL,
    ST_ARENA,
    ST_CACHED,
    ST_HELD,
    ST_PARKED,
    ST_QUEUED,
    ST_RESERVE,
    ST_SHARED,
    STATE_MASK,
    STATUS_LIVE,
    T_DEPTH,
    T_OVERFLOW,
    T_STATE,
    T_SUBS,
)
from .._mapping import Views
from .numbers import (
    V_DEAD,
    copy_verdicts,
    entries_used,
    held_per_owner,
    in_use_entries,
    live_queues,
    lock_info,
    queue_name,
    queue_sleepers,
    queue_table,
)
from .render import lock_text
from .snapshot import LOCK_TIMEOUT, PROG, Copy, poison_pattern, procs_table, take_copy
from .topics import ring_entries, subscription_row, topic_rows, topic_table

CHECK_ATTEMPTS = 3  # a finding must show in this many copies in a row
CHECK_SPACING_S = (0.05, 0.2)  # pauses before the second and third of them
HOLDERS_NAMED = 4  # a finding names at most this many processes
VALID_STATES = (ST_ARENA, ST_RESERVE, ST_HELD, ST_CACHED, ST_QUEUED, ST_PARKED, ST_SHARED)


def audit(v: Views) -> list[str]:
    """Every broken invariant of the pool in ``v``, one sentence each (an
    empty list for a healthy pool). Call it with the pool lock held for an
    exact answer; without it, a busy pool may show passing inconsistencies."""
    hdr, geo = v.hdr, v.geo
    cap = geo.capacity
    findings: list[str] = []
    min_nr, curr_nr, arena_free = hdr[H_MIN_NR], hdr[H_CURR_NR], hdr[H_ARENA_FREE]
    depth, lent = hdr[H_RESERVE_DEPTH], hdr[H_LENT]
    if not 1 <= min_nr <= cap:
        findings.append(f"min_nr {min_nr} is outside 1..capacity ({cap})")
    if curr_nr > min_nr:
        findings.append(f"curr_nr {curr_nr} exceeds min_nr {min_nr}")
    if depth + lent > min_nr:
        findings.append(f"the reserve stack's depth {depth} and the places lent {lent} exceed min_nr {min_nr}")
    if curr_nr + arena_free > cap or depth + arena_free > cap:
        findings.append(f"curr_nr {curr_nr} + arena_free {arena_free} exceed the capacity {cap}")
        return findings  # the stacks cannot be read within bounds
    words = np.frombuffer(v.words, dtype=np.uint64)
    states = (words & np.uint64(STATE_MASK)).astype(np.uint8)
    owners = ((words >> np.uint64(OWNER_SHIFT)) & np.uint64(OWNER_MASK)).astype(np.int64)
    bad = np.flatnonzero(~np.isin(states, VALID_STATES))
    if bad.size:
        findings.append(f"{bad.size} slot(s) have no valid state, first slot {bad[0]} (state {states[bad[0]]})")
    stacked = states.copy()  # a process's reserve places are not the stack's
    stacked[(states == ST_RESERVE) & (owners != 0)] = 0
    for label, n, state, arr in (
        ("reserve stack", depth, ST_RESERVE, v.stack),
        ("arena free list", arena_free, ST_ARENA, v.arena),
    ):
        entries = np.frombuffer(arr, dtype=np.uint32)[:n]
        out = np.flatnonzero(entries >= cap)
        if out.size:
            findings.append(f"{label} entry {out[0]} is slot {entries[out[0]]}, out of range")
            continue
        if np.bincount(entries, minlength=cap).max(initial=0) > 1:  # O(capacity), no sort
            findings.append(f"{label} holds a slot more than once")
        wrong = np.flatnonzero(stacked[entries] != state)
        if wrong.size:
            slot = entries[wrong[0]]
            findings.append(f"{label} holds slot {slot}, whose state is {states[slot]}, not {state}")
        count = int(np.count_nonzero(stacked == state))
        if count != n:
            findings.append(f"{count} slot(s) are marked {label.split()[0]} but the {label} holds {n}")
    findings += _audit_owners(v, states, owners)
    findings += _audit_caches(v, states, owners)
    findings += _audit_places(v, states, owners, curr_nr, lent)
    findings += _audit_queues(v, states, owners)
    findings += _audit_topics(v, states, owners)
    if hdr[H_NR_WAITERS] >= 1 << 31:
        findings.append(f"nr_waiters {hdr[H_NR_WAITERS]} is impossible")
    if hdr[H_FLAGS] & FLAG_POISON and not findings:
        findings += _audit_poison(v, depth)
    return findings


def _audit_owners(v: Views, states: np.ndarray, owners: np.ndarray) -> list[str]:
    """Every HELD or CACHED slot names a registry entry in use (epoch not
    0, below H_ENTRIES_USED): one that names no process ever attached is
    damage, never a dead process's element."""
    named = np.zeros(OWNER_MASK + 1, dtype=bool)
    named[1 : v.geo.max_procs + 1] = in_use_entries(v)
    bad = np.flatnonzero(((states == ST_HELD) | (states == ST_CACHED)) & ~named[owners])
    if not bad.size:
        return []
    slot, used = int(bad[0]), entries_used(v)
    owner = int(owners[slot])
    why = ("owner field 0" if owner == 0 else f"registry entry {owner - 1}, beyond the {used} entries ever used"
           if owner > used else f"registry entry {owner - 1}, vacant")
    return [f"{bad.size} held or cached slot(s) whose owner names no process ever attached, first slot {slot} "
            f"({why}): damage, not a dead process's elements (reclaim_dead refuses the pool)"]


def _audit_caches(v: Views, states: np.ndarray, owners: np.ndarray) -> list[str]:
    """Every CACHED slot names a registry entry that lists it in its cache.
    Exact only while no process is in its lock-free hot path: those change
    their own cache without the lock."""
    cap = v.geo.capacity
    procs = procs_table(v)
    findings: list[str] = []
    listed = np.zeros(cap, dtype=bool)
    for row in range(v.geo.max_procs):
        n = int(procs[row, P_CACHE_N])
        if not n and not procs[row, P_EPOCH]:
            continue
        if n > CACHE_MAX:
            findings.append(f"registry entry {row} (pid {int(procs[row, P_PID])}) claims {n} cache entries, "
                            f"more than {CACHE_MAX}")
            continue
        entries = procs[row, P_CACHE:].view(np.uint32)[:n].astype(np.int64)
        entries = entries[entries < cap]  # blanks: entries other processes took
        listed[entries[(states[entries] == ST_CACHED) & (owners[entries] == row + 1)]] = True
    unlisted = np.flatnonzero((states == ST_CACHED) & ~listed)
    if unlisted.size:
        slot = int(unlisted[0])
        findings.append(f"{unlisted.size} cached slot(s) are in no cache, first slot {slot} "
                        f"(entry {int(owners[slot]) - 1})")
    return findings


def _audit_places(v: Views, states: np.ndarray, owners: np.ndarray, curr_nr: int, lent: int) -> list[str]:
    """Every reserve slot a process owns is one of its full places, the
    places lent add up to H_LENT, and curr_nr (the header's plus every
    entry's slack: full places not counted there) counts every reserve slot.
    Exact only while no process is in its lock-free path (it moves its own
    places without the lock)."""
    cap = v.geo.capacity
    procs = procs_table(v)
    findings: list[str] = []
    listed = np.zeros(cap, dtype=bool)
    total_lent = slack = 0
    for row in range(v.geo.max_procs):
        q, word = int(procs[row, P_PLACE_Q]), int(procs[row, P_PLACE_R])
        if not q and not word:
            continue
        r, s = word & PLACE_FULL_MASK, word >> PLACE_SLACK_SHIFT
        if q > PLACES_MAX or r > q or s > r:
            findings.append(f"registry entry {row} (pid {int(procs[row, P_PID])}) claims {q} reserve places, {r} of "
                            f"them full and {s} of those uncounted (at most {PLACES_MAX}, no more full than lent, "
                            f"no more uncounted than full)")
            continue
        slack += s
        total_lent += q
        places = procs[row, P_PLACES:].view(np.uint32)[:r].astype(np.int64)
        good = places[places < cap]
        good = good[(states[good] == ST_RESERVE) & (owners[good] == row + 1)]
        if good.size != r:
            findings.append(f"registry entry {row} lists {r} full reserve places, of which {good.size} name its own "
                            f"reserve slots")
        listed[good] = True
    unlisted = np.flatnonzero((states == ST_RESERVE) & (owners != 0) & ~listed)
    if unlisted.size:
        slot = int(unlisted[0])
        findings.append(f"{unlisted.size} reserve slot(s) owned by a process are in none of its places, first slot "
                        f"{slot} (entry {int(owners[slot]) - 1})")
    if total_lent != lent:
        findings.append(f"the processes hold {total_lent} reserve places but lent says {lent}")
    reserved = int(np.count_nonzero(states == ST_RESERVE))
    if reserved != curr_nr + slack:
        findings.append(f"{reserved} slot(s) are in the reserve but curr_nr says {curr_nr + slack} ({curr_nr} and "
                        f"{slack} uncounted in places)")
    return findings


def _audit_queues(v: Views, states: np.ndarray, owners: np.ndarray) -> list[str]:
    """Every QUEUED slot names a queue of the table; each live queue's list,
    walked from its head, names exactly its QUEUED slots, ``count`` of
    them, ending at its tail."""
    cap, n = v.geo.capacity, v.geo.max_queues
    table = queue_table(v)
    nxt = np.frombuffer(v.next, dtype=np.uint32)
    queued = states == ST_QUEUED
    findings: list[str] = []
    stray = np.flatnonzero(queued & ((owners == 0) | (owners > n)))
    if stray.size:
        findings.append(f"{stray.size} queued slot(s) name no queue of the table's {n} (owner field "
                        f"{int(owners[stray[0]])}), first slot {stray[0]}")
    for q in range(n):
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
            findings.append(f"queue {q}'s list reaches {walked} element(s); its count says {count} and {mine} "
                            "are queued in it")
    return findings


def _audit_topics(v: Views, states: np.ndarray, owners: np.ndarray) -> list[str]:
    """Every SHARED slot names a live topic and is referenced by some of its
    live subscriptions (received ones a subset); each live subscription's
    ring names, once each, exactly the slots it references and has not
    received (its pending ones), no more than the topic's depth (a share
    group has no rings)."""
    findings: list[str] = []
    shared = states == ST_SHARED
    refs = np.frombuffer(v.refs, dtype=np.uint64)
    low, high = refs & np.uint64(0xFFFFFFFF), refs >> np.uint64(REF_RECEIVED_SHIFT)
    topics = topic_table(v)
    live = np.zeros(MAX_TOPICS + 1, dtype=bool)
    live[1:] = topics[:, T_STATE] == QUEUE_LIVE
    stray = np.flatnonzero(shared & ~live[np.minimum(owners, MAX_TOPICS)] | shared & (owners > MAX_TOPICS))
    if stray.size:
        findings.append(f"{stray.size} shared slot(s) name no live topic, first slot {stray[0]}")
    for t in np.flatnonzero(live[1:]).tolist():
        subs = int(topics[t, T_SUBS])
        mine = np.flatnonzero(shared & (owners == t + 1))
        bad = mine[((low[mine] & ~np.uint64(subs)) != 0) | (low[mine] == 0) | ((high[mine] & ~low[mine]) != 0)]
        if bad.size:
            findings.append(f"topic {t}: {bad.size} shared slot(s) have references that no live subscription "
                            f"accounts for, first slot {bad[0]} (references {int(refs[bad[0]]):#x}, "
                            f"subscriptions {subs:#x})")
        depth = int(topics[t, T_DEPTH])
        for j in range(MAX_SUBS):
            if not subs >> j & 1 or int(topics[t, T_OVERFLOW]) == OVERFLOW_SHARE:  # (a group's shares wait in no ring)
                continue
            pending = int(subscription_row(v, t, j)[S_TAIL] - subscription_row(v, t, j)[S_HEAD])
            ring = ring_entries(v, t, j, depth)
            want = mine[((low[mine] >> np.uint64(j)) & np.uint64(1)).astype(bool)
                        & ~((high[mine] >> np.uint64(j)) & np.uint64(1)).astype(bool)]
            if pending > depth or sorted(ring.tolist()) != sorted(want.tolist()):
                findings.append(f"topic {t}, subscription {j}: its ring holds {min(pending, depth)} pending "
                                f"element(s); {want.size} shared slot(s) are pending for it")
    return findings


def _audit_poison(v: Views, curr_nr: int) -> list[str]:
    geo = v.geo
    slots = np.frombuffer(v.data, dtype=np.uint8).reshape(geo.capacity, geo.stride)[:, : geo.slot_size]
    entries = np.frombuffer(v.stack, dtype=np.uint32)[:curr_nr]
    if not entries.size:
        return []
    want = np.frombuffer(poison_pattern(geo.slot_size), dtype=np.uint8)
    broken = entries[np.flatnonzero((slots[entries] != want).any(axis=1))]
    return _unpoisoned(broken)


def _unpoisoned(broken: np.ndarray) -> list[str]:
    if broken.size:
        return [f"{broken.size} reserved element(s) lost their poison (written after free), first slot {broken[0]}"]
    return []


# ----------------------------------------------------------------------
# --check: the audit of a copy, with what liveness tells


def _without_poison_flag(v: Views) -> Views:
    """A copy of ``v`` whose header says 'no poisoning', for ``audit``: its
    poison check reads every slot's data, which a Copy leaves out (the
    reserve's poison is scanned by take_copy instead)."""
    meta = bytearray(v.mm)
    memoryview(meta)[:HEADER_BYTES].cast("Q")[H_FLAGS] &= ~FLAG_POISON
    return Views(meta, v.geo)


def _reclaim_hint(name: str) -> str:
    return f"run `{PROG} --reclaim-dead {name}` (or pool.reclaim_dead())"


def _who(procs: np.ndarray, entries: list[int], what: np.ndarray, unit: str) -> str:
    """'3 <unit> of entry 0 (pid 12), ...' for the first few ``entries``."""
    named = []
    for e in entries[:HOLDERS_NAMED]:
        whose = f"pid {int(procs[e, P_PID])}" if procs[e, P_EPOCH] else f"vacant, last pid {int(procs[e, P_PID])}"
        named.append(f"{int(what[e])} {unit} of entry {e} ({whose})")
    more = len(entries) - HOLDERS_NAMED
    return ", ".join(named) + (f" and {more} more entries" if more > 0 else "")


def _dead_findings(copy: Copy) -> list[str]:
    """Elements held by dead processes (an entry in use whose process is
    dead), and sleepers (in alloc, on queues) that dead processes still
    count: what reclaim_dead takes back. A queued element is the queue's,
    whoever put it: never a finding here."""
    v, alive = copy.views, copy.alive
    procs, n = procs_table(v), v.geo.max_procs
    per_entry = np.where(copy_verdicts(copy)[1 : n + 1] == V_DEAD, held_per_owner(copy)[1 : n + 1], 0)
    hint = _reclaim_hint(copy.name)
    findings = []
    dead = np.flatnonzero(per_entry > 0).tolist()
    if dead:
        total = int(per_entry[dead].sum())
        findings.append(f"{total} element(s) held by dead processes ({_who(procs, dead, per_entry, 'held')}): {hint}")
    sleeping = procs[:, P_SLEEPING]
    ghosts = np.flatnonzero((sleeping > 0) & ~alive).tolist()
    if ghosts:
        total = int(sleeping[ghosts].sum())
        findings.append(f"{total} sleeping allocation(s) of dead processes still counted "
                        f"({_who(procs, ghosts, sleeping, 'sleeping')}): {hint}")
    get, put = queue_sleepers(v)
    on_queues = (get + put).sum(axis=1)
    ghosts = np.flatnonzero((on_queues > 0) & ~alive).tolist()
    if ghosts:
        total = int(on_queues[ghosts].sum())
        findings.append(f"{total} queue sleeper(s) of dead processes still counted "
                        f"({_who(procs, ghosts, on_queues, 'asleep on queues')}): {hint}")
    for topic in topic_rows(copy):  # a dead subscriber's references keep elements out (and may block publishers)
        for s in topic["subscribers"]:
            if not s["alive"]:
                who = f"pid {s['pid']}" if s["entry"] is not None else "a process no longer registered"
                findings.append(f"topic {topic['name']!r}: subscription {s['index']} of dead {who} still references "
                                f"{s['pending']} pending and {s['received']} received element(s): {hint}")
    return findings


def _parked_findings(copy: Copy) -> list[str]:
    """A free that could not get the lock parks its element and then raises
    the hint H_PARKED, for the next lock holder to complete it. Parked
    slots with the hint down: their process died in between, and only
    repair or reclaim_dead (which read every word) will complete them."""
    parked = np.flatnonzero(copy.slots[0] == ST_PARKED)
    if not parked.size or copy.views.hdr[H_PARKED]:
        return []
    return [f"{parked.size} parked element(s) (freed while the lock was busy), first slot {parked[0]}, but the "
            f"hint H_PARKED is 0: the freeing process died before raising it and no lock holder will complete "
            f"the free: {_reclaim_hint(copy.name)}"]


def _waiter_findings(copy: Copy) -> list[str]:
    """nr_waiters counts the sleepers that processes record in their
    registry entries: every sleeper counts itself in both (dead ones too,
    until they are uncounted from both)."""
    sleeping = procs_table(copy.views)[:, P_SLEEPING]
    live, recorded = int(sleeping[copy.alive].sum()), int(sleeping.sum())
    nr_waiters = int(copy.views.hdr[H_NR_WAITERS])
    if nr_waiters < live:
        return [f"nr_waiters {nr_waiters} is less than the {live} sleeping allocation(s) of live processes"]
    if nr_waiters > recorded:
        return [f"nr_waiters {nr_waiters} is more than the {recorded} sleeping allocation(s) recorded in the "
                f"registry: wake-ups are posted for sleepers that do not exist"]
    return []


def _queue_waiter_findings(copy: Copy) -> list[str]:
    """Each live queue's sleeper counts (in get, in put) count the sleepers
    that processes record per queue and side in their registry entries, as
    nr_waiters does for allocations."""
    v = copy.views
    table = queue_table(v)
    get, put = queue_sleepers(v)
    findings = []
    for q in np.flatnonzero(live_queues(v)).tolist():
        which = f"queue {q} ({queue_name(table[q])!r})"
        for side, word, per in (("get", Q_GETTERS, get), ("put", Q_PUTTERS, put)):
            waiters = int(table[q, word])
            live, recorded = int(per[copy.alive, q].sum()), int(per[:, q].sum())
            if waiters < live:
                findings.append(f"{which} counts {waiters} waiter(s) in {side}, fewer than the {live} sleeping "
                                f"in {side} on it in live processes")
            elif waiters > recorded:
                findings.append(f"{which} counts {waiters} waiter(s) in {side}, more than the {recorded} "
                                "recorded in the registry")
    return findings


def check(copy: Copy) -> list[str]:
    """Every broken invariant in ``copy``, one sentence each that names the
    damage (empty for a healthy pool): ``audit``, the reserve's poison (as
    take_copy scanned it), parked frees nobody will complete, elements and
    sleepers of dead processes, the waiter counts (the pool's and each
    queue's per side); and, if one holder kept the lock for the whole wait,
    a line that says so (the audit then ran on a copy that a critical
    section may have left half done)."""
    if copy.summary:
        raise ValueError("a summary copy cannot be audited")
    v = copy.views
    findings = audit(_without_poison_flag(v))
    if copy.unpoisoned is not None and not findings:  # as audit: on an otherwise whole pool
        findings += _unpoisoned(copy.unpoisoned)
    findings += _parked_findings(copy) + _dead_findings(copy) + _waiter_findings(copy)
    findings += _queue_waiter_findings(copy)
    if v.hdr[H_STATUS] != STATUS_LIVE:
        findings.append("the pool is marked destroyed but still exists (its destroyer may have died)")
    if copy.lock.held_throughout:
        findings.append(f"the lock was {lock_text(lock_info(copy))}, all {copy.lock.waited_s:.2f} s the inspector "
                        f"waited: this audit ran on a copy that a critical section may have left half done")
    return findings


def _kind(finding: str) -> str:
    """A finding without its numbers: the same problem seen again."""
    return re.sub(r"\d+(\.\d+)?", "#", finding)


def check_pool(name: str, lock_timeout: float = LOCK_TIMEOUT) -> tuple[Copy, list[str]]:
    """Audit pool ``name``: a finding counts only if it shows in
    CHECK_ATTEMPTS copies in a row, CHECK_SPACING_S apart (see the module
    doc); the last copy and its confirmed findings are returned."""
    copy = take_copy(name, lock_timeout)
    findings = check(copy)
    for pause in CHECK_SPACING_S[: CHECK_ATTEMPTS - 1]:
        if not findings:
            break
        time.sleep(pause)
        copy = take_copy(name, lock_timeout)
        kinds = {_kind(f) for f in findings}
        findings = [f for f in check(copy) if _kind(f) in kinds]
    return copy, findings
