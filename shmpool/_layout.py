"""Segment layout: where each field of a pool lives in its segment.

One POSIX shared-memory segment holds one pool::

    offset 0            header: HEADER_WORDS unsigned 64-bit words (below)
    off_words           slot words: capacity x u64, one per slot (the truth)
    off_stack           reserve stack: capacity x u32 slot indexes (elements[])
    off_arena           arena free list: capacity x u32 slot indexes (a stack)
    off_procs           process registry: max_procs x PROC_WORDS u64 (below)
    off_slots           slots: capacity x stride bytes, page-aligned start
    total               end of the segment

That is 16 bytes of metadata per slot beyond the fixed header. The stack has
room for ``capacity`` entries, so ``resize`` can grow ``min_nr`` up to the
capacity without moving anything. ``stride`` is ``slot_size`` rounded up to
8, so every slot is 8-byte aligned (numpy views of any dtype up to 8 bytes are
aligned).

The slot word is the truth about a slot; everything else is derived from it::

    bits 0-7    state: ARENA, RESERVE, HELD or CACHED (0 never appears in a
                live pool)
    bits 8-31   generation: bumped each time the slot is handed out
    bits 32-63  pid of the holder (HELD) or of the process whose cache
                holds the free slot (CACHED)

A handle is ``index | generation << 24 | tag << 48``: the slot index, the
generation the slot had when it was handed out, and the pool's random tag.
A stale handle (its slot freed and handed out again) and a handle from
another pool are therefore refused instead of freeing someone else's element.

The reserve stack and the arena free list are two stacks of slot indexes whose
depths are ``curr_nr`` and ``arena_free``. They are caches of the slot words:
``stack[0:curr_nr]`` holds exactly the RESERVE slots and
``arena[0:arena_free]`` exactly the ARENA slots. Because a single aligned
8-byte store changes a slot's state, a process killed at any instant leaves
slot words that are each whole, from which the stacks and counters can be
rebuilt (see ``_debug.rebuild``).

The process registry has one entry per process attached (or once attached)
to the pool: its pid, its start time (see ``_procs``), how many of its
threads are sleeping in alloc, its counters (summed with the header's
counters, which keep the counts of retired entries, when read: no counter
is a cache line that every process writes) and its cache of free arena slots
(see ``_fast.c``: a small stack that only its owner changes, whose slots are
CACHED by the owner's pid). When the shared free list runs dry, a process
may take cached slots from other processes' caches (by compare-and-swap on
the slot word, under the lock), leaving stale entries that their owner drops
when it meets them; a cache therefore holds ``cache_n - stolen + discarded``
slots, and the arena's free count is the shared list's depth plus that of
every cache. It names the holders behind the pids in the
slot words: a pid without an entry, or whose entry's start time is not the
start time of the live process with that pid, is dead. A registry entry is
never shared: a process that registers under the pid of a dead one first
takes back the dead one's elements.

Header words are native-endian u64, addressed by the ``H_*`` indexes below;
the ones marked (f64) hold an IEEE double in the same 8 bytes. The magic
number comes first and is written last by ``create``, so a half-made pool
is never mistaken for a whole one.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

from ._errors import PoolFormatError

MAGIC = int.from_bytes(b"SHMPOOL\x00", "little")
LAYOUT_VERSION = 3

HEADER_WORDS = 64
HEADER_BYTES = HEADER_WORDS * 8
PAGE = mmap.PAGESIZE

# Header word indexes. Geometry: written once by create, read-only after.
H_MAGIC = 0
H_VERSION = 1
H_HEADER_BYTES = 2
H_TOTAL = 3
H_SLOT_SIZE = 4
H_CAPACITY = 5
H_STRIDE = 6
H_OFF_WORDS = 7
H_OFF_STACK = 8
H_OFF_ARENA = 9
H_OFF_SLOTS = 10
H_TAG = 11
H_FLAGS = 12
H_CREATOR_PID = 13
H_CREATED_NS = 14  # wall clock, time.time_ns()
H_MAX_PROCS = 15
H_OFF_PROCS = 27
# Pool state: guarded by the pool lock.
H_STATUS = 16  # STATUS_LIVE, or STATUS_DESTROYED once destroy() began
H_MIN_NR = 17
H_CURR_NR = 18
H_ARENA_FREE = 19
H_NR_WAITERS = 20  # sleeping allocations between register and finish
H_CREATOR_START = 21  # the creator's start time (see _procs); 0 if unknown
H_FAIL_RATE = 23  # (f64) probability that an arena attempt fails on purpose
H_FAIL_THRESHOLD = 24  # fail_rate scaled to 2**64: fail when rng < threshold
H_SEED = 25
H_RNG = 26  # splitmix64 state of the fault injector
# The pool lock's holder (written by its holder, read by anyone).
H_LOCK_PID = 28
H_LOCK_SINCE_NS = 29  # time.monotonic_ns() when it was taken
H_LOCK_START = 30  # the holder's start time (see _procs)
H_LOCK_SEQ = 31  # bumped by every acquisition
# Counters: guarded by the pool lock.
H_ALLOC_ARENA = 32
H_ALLOC_RESERVE = 33
H_ALLOC_FAILED = 34
H_FREE_RESERVE = 35
H_FREE_ARENA = 36
H_SLEEPS = 37
H_FAULTS = 38  # arena attempts failed on purpose
H_POISON_ERRORS = 39
H_RECOVERIES = 40  # times the lock was taken over from a dead holder
H_RECLAIMED = 41  # elements taken back from dead holders
COUNTERS = (
    ("alloc_arena", H_ALLOC_ARENA),
    ("alloc_reserve", H_ALLOC_RESERVE),
    ("alloc_failed", H_ALLOC_FAILED),
    ("free_reserve", H_FREE_RESERVE),
    ("free_arena", H_FREE_ARENA),
    ("sleeps", H_SLEEPS),
    ("faults_injected", H_FAULTS),
    ("poison_errors", H_POISON_ERRORS),
    ("lock_recoveries", H_RECOVERIES),
    ("reclaimed", H_RECLAIMED),
)

STATUS_LIVE = 1
STATUS_DESTROYED = 2
FLAG_POISON = 1

# Slot words.
ST_ARENA = 1
ST_RESERVE = 2
ST_HELD = 3
ST_CACHED = 4
STATE_NAMES = {
    ST_ARENA: "in the arena",
    ST_RESERVE: "in the reserve",
    ST_HELD: "held",
    ST_CACHED: "in the arena (a process's cache)",
}
STATE_MASK = 0xFF
GEN_SHIFT = 8
GEN_MASK = 0xFFFFFF
GEN_BITS = GEN_MASK << GEN_SHIFT
PID_SHIFT = 32

# Handles.
INDEX_BITS = 24
INDEX_MASK = (1 << INDEX_BITS) - 1
HGEN_SHIFT = 24
TAG_SHIFT = 48
TAG_MASK = 0x7FFF  # 15 bits, so that a handle fits a signed 64-bit integer
MAX_CAPACITY = INDEX_MASK  # 16,777,215 slots
MAX_SLOT_SIZE = 1 << 30

# Process registry entries: PROC_WORDS u64 each.
P_PID = 0
P_START = 1
P_SLEEPING = 2
P_CACHE_N = 3  # entries in the cache array (some may be stale: below)
P_STOLEN = 4  # cached slots taken by other processes (written under the lock)
P_DISCARDED = 5  # stale entries the owner dropped (written by the owner)
P_COUNTERS = 6  # the first N_PROC_COUNTERS of COUNTERS, in that order
N_PROC_COUNTERS = 8
P_CACHE = P_COUNTERS + N_PROC_COUNTERS  # CACHE_MAX u32 slot indexes
CACHE_MAX = 64
PROC_WORDS = P_CACHE + CACHE_MAX // 2
MAX_PROCS = 256
# Per-process counter indexes (relative to P_COUNTERS).
C_ALLOC_ARENA, C_ALLOC_RESERVE, C_ALLOC_FAILED, C_FREE_RESERVE, C_FREE_ARENA, C_SLEEPS, C_FAULTS, C_POISON = range(8)


def cached_slots(procs: np.ndarray) -> np.ndarray:
    """Per registry entry (rows of a (max_procs, PROC_WORDS) array), how
    many slots its cache holds: its entries less the stale ones."""
    return procs[:, P_CACHE_N] - procs[:, P_STOLEN] + procs[:, P_DISCARDED]


@dataclass(frozen=True)
class Geometry:
    """Where things are in a segment of this shape (all in bytes)."""

    slot_size: int
    capacity: int
    stride: int
    off_words: int
    off_stack: int
    off_arena: int
    off_procs: int
    max_procs: int
    off_slots: int
    total: int

    @classmethod
    def of(cls, slot_size: int, capacity: int, max_procs: int = MAX_PROCS) -> Geometry:
        stride = (slot_size + 7) & ~7
        off_words = HEADER_BYTES
        off_stack = off_words + 8 * capacity
        off_arena = off_stack + 4 * capacity
        off_procs = (off_arena + 4 * capacity + 7) & ~7
        off_slots = -(-(off_procs + 8 * PROC_WORDS * max_procs) // PAGE) * PAGE
        total = off_slots + stride * capacity
        return cls(slot_size, capacity, stride, off_words, off_stack, off_arena, off_procs, max_procs, off_slots, total)


def read_geometry(mm: mmap.mmap, size: int) -> Geometry:
    """Validate the header of a mapped segment of ``size`` bytes and return
    its geometry. Reads only; raises PoolFormatError on any disagreement,
    before anything beyond the checked size is touched (no SIGBUS)."""
    if size < HEADER_BYTES:
        raise PoolFormatError(f"segment is {size} bytes, shorter than a shmpool header ({HEADER_BYTES})")
    words = struct.unpack_from(f"={HEADER_WORDS}Q", mm, 0)
    if words[H_MAGIC] != MAGIC:
        raise PoolFormatError("not a shmpool pool (bad magic number)")
    if words[H_VERSION] != LAYOUT_VERSION:
        raise PoolFormatError(
            f"pool has layout version {words[H_VERSION]}, this shmpool reads version {LAYOUT_VERSION}"
        )
    slot_size, capacity, max_procs = words[H_SLOT_SIZE], words[H_CAPACITY], words[H_MAX_PROCS]
    if not (1 <= slot_size <= MAX_SLOT_SIZE and 1 <= capacity <= MAX_CAPACITY and 1 <= max_procs <= 1 << 16):
        raise PoolFormatError(
            f"header has an impossible geometry: slot_size={slot_size}, capacity={capacity}, max_procs={max_procs}"
        )
    geo = Geometry.of(slot_size, capacity, max_procs)
    stored = (
        words[H_HEADER_BYTES], words[H_STRIDE], words[H_OFF_WORDS], words[H_OFF_STACK],
        words[H_OFF_ARENA], words[H_OFF_PROCS], words[H_OFF_SLOTS], words[H_TOTAL],
    )
    expected = (
        HEADER_BYTES, geo.stride, geo.off_words, geo.off_stack, geo.off_arena, geo.off_procs, geo.off_slots, geo.total,
    )
    if stored != expected:
        raise PoolFormatError("header offsets disagree with its geometry")
    if size < geo.total:
        raise PoolFormatError(f"segment is {size} bytes but its header says {geo.total}: truncated")
    return geo


def write_geometry(hdr: memoryview, geo: Geometry) -> None:
    """Fill the geometry words of a fresh header (not the magic)."""
    hdr[H_VERSION] = LAYOUT_VERSION
    hdr[H_HEADER_BYTES] = HEADER_BYTES
    hdr[H_TOTAL] = geo.total
    hdr[H_SLOT_SIZE] = geo.slot_size
    hdr[H_CAPACITY] = geo.capacity
    hdr[H_STRIDE] = geo.stride
    hdr[H_OFF_WORDS] = geo.off_words
    hdr[H_OFF_STACK] = geo.off_stack
    hdr[H_OFF_ARENA] = geo.off_arena
    hdr[H_OFF_PROCS] = geo.off_procs
    hdr[H_MAX_PROCS] = geo.max_procs
    hdr[H_OFF_SLOTS] = geo.off_slots


class Views:
    """Typed memoryviews over one mapping. Holding a Views keeps the mapping
    alive (each view is an export of it); dropping the last one unmaps."""

    __slots__ = ("mm", "geo", "hdr", "fhdr", "words", "stack", "arena", "procs", "data")

    def __init__(self, mm: mmap.mmap, geo: Geometry) -> None:
        base = memoryview(mm)
        self.mm = mm
        self.geo = geo
        self.hdr = base[:HEADER_BYTES].cast("Q")
        self.fhdr = base[:HEADER_BYTES].cast("d")
        self.words = base[geo.off_words : geo.off_stack].cast("Q")
        self.stack = base[geo.off_stack : geo.off_arena].cast("I")
        self.arena = base[geo.off_arena : geo.off_arena + 4 * geo.capacity].cast("I")
        self.procs = base[geo.off_procs : geo.off_procs + 8 * PROC_WORDS * geo.max_procs].cast("Q")
        self.data = base[geo.off_slots : geo.total]
