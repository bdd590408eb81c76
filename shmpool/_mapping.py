"""A mapped segment: its header checked against the layout, and typed views.

``read_geometry`` is the one check of a segment's header (attach, inspect,
the listing): it reads, bounds every value it uses, and raises
PoolFormatError before anything beyond the checked size is touched, so that a
damaged or foreign segment can never make a process fault (SIGBUS) or read
out of bounds. ``Views`` are typed memoryviews over one mapping (or over a
copy of its metadata), for the audit and the inspector. ``quick_check``
looks for the signs of damage that can be seen at once, without the lock
(attach runs it; the full audit is ``shmpool._inspect.audit``).
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np

from ._errors import PoolFormatError
from ._layout import (
    DESC_WORDS,
    H_ARENA_FREE,
    H_CAPACITY,
    H_CURR_NR,
    H_LENT,
    H_MAGIC,
    H_MAX_PROCS,
    H_MIN_NR,
    H_RESERVE_DEPTH,
    H_SLOT_SIZE,
    H_VERSION,
    HEADER_BYTES,
    HEADER_WORDS,
    LAYOUT_VERSION,
    MAGIC,
    MAX_CAPACITY,
    MAX_MAX_PROCS,
    MAX_SLOT_SIZE,
    OFF_RINGS,
    OFF_SUBS,
    PROC_WORDS,
    QUEUE_WORDS,
    TOPICS_BYTES,
    Geometry,
)


def read_geometry(mm: Any, size: int) -> Geometry:
    """Validate the header of a mapped segment (or a copy of it) of ``size``
    bytes and return its geometry. Raises PoolFormatError on any
    disagreement."""
    if size < HEADER_BYTES:
        raise PoolFormatError(f"segment is {size} bytes, shorter than a shmpool header ({HEADER_BYTES})")
    words = struct.unpack_from(f"={HEADER_WORDS}Q", mm, 0)
    if words[H_MAGIC] != MAGIC:
        raise PoolFormatError("not a shmpool pool (bad magic number)")
    if words[H_VERSION] != LAYOUT_VERSION:
        raise PoolFormatError(f"pool has layout version {words[H_VERSION]}, this shmpool reads version {LAYOUT_VERSION}")
    slot_size, capacity, max_procs = words[H_SLOT_SIZE], words[H_CAPACITY], words[H_MAX_PROCS]
    if not (1 <= slot_size <= MAX_SLOT_SIZE and 1 <= capacity <= MAX_CAPACITY and 1 <= max_procs <= MAX_MAX_PROCS):
        raise PoolFormatError(
            f"header has an impossible geometry: slot_size={slot_size}, capacity={capacity}, max_procs={max_procs}"
        )
    geo = Geometry.of(slot_size, capacity, max_procs)
    if any(words[h] != value for h, value in geo.header_words().items()):
        raise PoolFormatError("header offsets disagree with its geometry")
    if size < geo.total:
        raise PoolFormatError(f"segment is {size} bytes but its header says {geo.total}: truncated")
    return geo


def write_geometry(hdr: memoryview, geo: Geometry) -> None:
    """Fill the geometry words of a fresh header (not the magic)."""
    for h, value in geo.header_words().items():
        hdr[h] = value


class Views:
    """Typed memoryviews over one mapping, or over a copy of its metadata
    (then ``data`` is empty). Holding a Views keeps the mapping alive (each
    view is an export of it); dropping the last one unmaps."""

    __slots__ = ("mm", "geo", "hdr", "fhdr", "words", "stack", "arena", "next", "desc", "since", "procs", "queues", "refs",
                 "topics", "subs", "rings", "data")

    def __init__(self, mm: Any, geo: Geometry) -> None:
        base = memoryview(mm).cast("B")
        self.mm = mm
        self.geo = geo
        self.hdr = base[:HEADER_BYTES].cast("Q")
        self.fhdr = base[:HEADER_BYTES].cast("d")
        self.words = base[geo.off_words : geo.off_words + 8 * geo.capacity].cast("Q")
        self.stack = base[geo.off_stack : geo.off_stack + 4 * geo.capacity].cast("I")
        self.arena = base[geo.off_arena : geo.off_arena + 4 * geo.capacity].cast("I")
        self.next = base[geo.off_next : geo.off_next + 4 * geo.capacity].cast("I")
        self.desc = base[geo.off_desc : geo.off_desc + 8 * DESC_WORDS * geo.capacity].cast("Q")
        self.since = base[geo.off_since : geo.off_since + 8 * geo.capacity].cast("Q")
        self.refs = base[geo.off_refs : geo.off_refs + 8 * geo.capacity].cast("Q")
        self.topics = base[geo.off_topics : geo.off_topics + OFF_SUBS].cast("Q")
        self.subs = base[geo.off_topics + OFF_SUBS : geo.off_topics + OFF_RINGS].cast("Q")
        self.rings = base[geo.off_topics + OFF_RINGS : geo.off_topics + TOPICS_BYTES].cast("I")
        self.procs = base[geo.off_procs : geo.off_procs + 8 * PROC_WORDS * geo.max_procs].cast("Q")
        self.queues = base[geo.off_queues : geo.off_queues + 8 * QUEUE_WORDS * geo.max_queues].cast("Q")
        self.data = base[geo.off_slots : geo.total]


def map_file(fd: int, size: int, readonly: bool = False) -> mmap.mmap:
    prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
    return mmap.mmap(fd, size, prot=prot)


def quick_check(v: Views) -> str | None:
    """The first sign of corruption that can be seen without the lock and
    without reading every slot (fast enough for every attach), or None.
    Each property checked holds at every instant in a healthy pool."""
    hdr, cap = v.hdr, v.geo.capacity
    min_nr, curr_nr, arena_free = hdr[H_MIN_NR], hdr[H_CURR_NR], hdr[H_ARENA_FREE]
    depth, lent = hdr[H_RESERVE_DEPTH], hdr[H_LENT]
    if not 1 <= min_nr <= cap:
        return f"min_nr {min_nr} is outside 1..capacity ({cap})"
    if curr_nr > min_nr:
        return f"curr_nr {curr_nr} exceeds min_nr {min_nr}"
    # (each word alone: their sum holds under the lock, but two words read
    # without it may come from either side of a lend or a give-back)
    if depth > min_nr or lent > min_nr:
        return f"the reserve stack's depth {depth} or the places lent {lent} exceed min_nr {min_nr}"
    if curr_nr + arena_free > cap:
        return f"curr_nr {curr_nr} + arena_free {arena_free} exceed the capacity {cap}"
    for label, n, arr in (("reserve stack", depth, v.stack), ("arena free list", arena_free, v.arena)):
        entries = np.frombuffer(arr, dtype=np.uint32)[:n]
        if entries.size and int(entries.max()) >= cap:
            at = int(np.argmax(entries >= cap))
            return f"{label} entry {at} is slot {entries[at]}, out of range (capacity {cap})"
    return None
