"""A pool's topics, from a copy of its metadata: the topic table, each
live subscription's ring, and the rows ``describe`` shows (a topics section:
each topic's depth, overflow and counters, and each subscriber's process,
backlog and what it has received and not released).

The truth about a published element is its slot word (SHARED by a topic)
and its reference word (which subscriptions reference it, and which of
them received it); the rings list each subscription's pending elements
(``_core/topic.c``). Everything here only reads, with numpy, within bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._layout import (
    MAX_SUBS,
    MAX_TOPICS,
    OVERFLOW_NAMES,
    OVERFLOW_SHARE,
    P_EPOCH,
    P_PID,
    QUEUE_LIVE,
    QUEUE_NAME_BYTES,
    REF_RECEIVED_SHIFT,
    S_DROPPED,
    S_EPOCH,
    S_HEAD,
    S_OWNER,
    S_TAIL,
    ST_SHARED,
    SUB_WORDS,
    T_DEPTH,
    T_DROPPED,
    T_NAME,
    T_OVERFLOW,
    T_PUBLISHED,
    T_STATE,
    T_SUBS,
    TOPIC_MAX_DEPTH,
    TOPIC_WORDS,
)
from .._mapping import Views
from .snapshot import Copy, procs_table

__all__ = ["ring_entries", "subscription_row", "topic_rows", "topic_table"]

OVERFLOW_OF = {v: k for k, v in OVERFLOW_NAMES.items()} | {OVERFLOW_SHARE: "share"}  # a share group (_share)


def topic_table(v: Views) -> np.ndarray:
    return np.frombuffer(v.topics, dtype=np.uint64).reshape(MAX_TOPICS, TOPIC_WORDS)


def subscription_row(v: Views, t: int, j: int) -> np.ndarray:
    return np.asarray(np.frombuffer(v.subs, dtype=np.uint64).reshape(MAX_TOPICS, MAX_SUBS, SUB_WORDS)[t, j])


def ring_entries(v: Views, t: int, j: int, depth: int) -> np.ndarray:
    """Subscription j's pending slot indexes, oldest first (at most its
    depth, bounded by TOPIC_MAX_DEPTH)."""
    row = subscription_row(v, t, j)
    depth = max(1, min(depth, TOPIC_MAX_DEPTH))
    head, n = int(row[S_HEAD]), min(int(row[S_TAIL] - row[S_HEAD]), depth)
    ring = np.frombuffer(v.rings, dtype=np.uint32).reshape(MAX_TOPICS, MAX_SUBS, TOPIC_MAX_DEPTH)[t, j]
    return np.asarray(ring[(head + np.arange(max(0, n))) % depth])


def topic_rows(copy: Copy) -> list[dict[str, Any]]:
    """One row per live topic: name, index, depth, overflow, published and
    dropped (counters), shared (its elements out now), and its
    subscribers [{index, pid, alive, pending, received, dropped}]."""
    v = copy.views
    table, procs = topic_table(v), procs_table(v)
    states, owners = copy.slots
    refs = np.frombuffer(v.refs, dtype=np.uint64)
    rows = []
    for t in np.flatnonzero(table[:, T_STATE] == QUEUE_LIVE).tolist():
        row = table[t]
        mine = (states == ST_SHARED) & (owners == t + 1)
        got = refs[mine] >> np.uint64(REF_RECEIVED_SHIFT)
        subs = []
        for j in range(MAX_SUBS):
            if not int(row[T_SUBS]) >> j & 1:
                continue
            s = subscription_row(v, t, j)
            o = int(s[S_OWNER])
            known = 1 <= o <= v.geo.max_procs and int(procs[o - 1, P_EPOCH]) == int(s[S_EPOCH])  # (else: gone)
            subs.append({
                "index": j, "pid": int(procs[o - 1, P_PID]) if known else 0, "entry": o - 1 if known else None,
                "alive": bool(copy.alive[o - 1]) if known else False,
                "pending": max(0, min(int(s[S_TAIL] - s[S_HEAD]), int(row[T_DEPTH]))),
                "received": int(np.count_nonzero((got >> np.uint64(j)) & np.uint64(1))),
                "dropped": int(s[S_DROPPED]),
            })
        raw = np.ascontiguousarray(row[T_NAME : T_NAME + QUEUE_NAME_BYTES // 8]).tobytes()
        rows.append({
            "name": raw.split(b"\0", 1)[0].decode("utf-8", "replace"), "index": t, "depth": int(row[T_DEPTH]),
            "overflow": OVERFLOW_OF.get(int(row[T_OVERFLOW]), "?"), "published": int(row[T_PUBLISHED]),
            "dropped": int(row[T_DROPPED]), "shared": int(np.count_nonzero(mine)), "subscribers": subs,
        })
    return rows
