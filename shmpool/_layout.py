"""Segment layout: where each field of a pool lives in its segment.

One POSIX shared-memory segment holds one pool::

    offset 0            header: HEADER_WORDS unsigned 64-bit words (below)
    off_words           slot words: capacity x u64, one per slot (the truth)
    off_stack           reserve stack: capacity x u32 slot indexes (elements[])
    off_arena           arena free list: capacity x u32 slot indexes (a stack)
    off_next            queue links: capacity x u32, the next slot in a queue
    off_procs           process registry: max_procs x PROC_WORDS u64 (below)
    off_queues          queue table: max_queues x QUEUE_WORDS u64 (below)
    off_slots           slots: capacity x stride bytes, page-aligned start
    total               end of the segment

That is 20 bytes of metadata per slot beyond the fixed header. The stack has
room for ``capacity`` entries, so ``resize`` can grow ``min_nr`` up to the
capacity without moving anything. ``stride`` is ``slot_size`` rounded up to
8, so every slot is 8-byte aligned (numpy views of any dtype up to 8 bytes are
aligned).

The slot word is the truth about a slot; everything else is derived from it::

    bits 0-7    state: ARENA, RESERVE, HELD, CACHED or QUEUED (0 never
                appears in a live pool)
    bits 8-23   owner: the registry entry (index + 1) of the process that
                holds the slot (HELD) or whose cache holds it (CACHED), or
                the queue (index + 1) that holds it (QUEUED); 0 otherwise
    bits 24-62  generation: bumped each time the slot is handed out

A handle is ``index | generation << 24``: the slot index and the generation
the slot had when it was handed out. A stale handle (its slot freed and
handed out again) is refused instead of freeing someone else's element.
Generations are 39 bits and start at a random value per slot, so a handle of
another pool (or a forged one) names the right generation with odds of
2**-39. A slot reused at full speed (an alloc+free pair every 50 ns) takes
2**39 * 50 ns, about 7.6 hours, to come back to a generation; a stale handle
is accepted only if it is used at exactly that moment.

The reserve stack and the arena free list are two stacks of slot indexes whose
depths are ``curr_nr`` and ``arena_free``. They are caches of the slot words:
``stack[0:curr_nr]`` holds exactly the RESERVE slots and
``arena[0:arena_free]`` exactly the ARENA slots. Because a single aligned
8-byte store changes a slot's state, a process killed at any instant leaves
slot words that are each whole, from which the stacks and counters can be
rebuilt (``repair`` in ``_fast.c``).

The process registry has one entry per process attached to the pool: its
pid and start time (for people: see ``_procs``), its epoch (a number drawn
from ``H_EPOCH`` when the entry was taken: it names this incarnation of the
entry in lock tokens), how many of its threads are sleeping in alloc, its
counters (summed with the header's counters when read: no counter is a cache
line that every process writes; a dead process's counters stay in its entry
and its successor there counts on from them, so nothing is folded or lost)
and its cache of free arena slots (see
``_fast.c``: a small stack that only its owner pushes and pops, whose slots
are CACHED by the entry). When the shared free list runs dry, a process may
take cached slots from other processes' caches (by compare-and-swap of the
slot word, under the lock), and blanks the cache entry it took; an owner
drops an entry whose slot is no longer cached by it. How many slots a cache
holds is therefore counted from the slot words its entries name, never kept
in a counter that a death could leave half-updated.

Liveness: each attached process holds an open-file-description lock
(``F_OFD_SETLK``) on its entry's first byte of the segment file. The kernel
drops it when the process dies, whatever pid namespace either side is in, so
an entry whose byte nobody locks belongs to a dead process. Pids are kept
only to show people who is who.

Queues: a named queue is a FIFO of elements linked through ``next[]`` (an
element is in one queue at most, so one link per slot serves every queue),
with its head, tail, count and depth in the queue table. The QUEUED slot
word is the truth; the links, head, tail and count are rebuilt from the words
by the repair, so an element is in its queue or with a process, never both
and never neither, whatever instant a process dies at.

The pool lock is the header word ``H_LOCK_OWNER``: 0 when free, else the
holder's token ``(entry + 1) | epoch << 16``, set by compare-and-swap, so a
hold is never anonymous (see ``_fast.c``).

Header words are native-endian u64, addressed by the ``H_*`` indexes below;
the ones marked (f64) hold an IEEE double in the same 8 bytes. The magic
number comes first and is written last by ``create``, so a half-made pool
is never mistaken for a whole one.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from ._errors import PoolFormatError

MAGIC = int.from_bytes(b"SHMPOOL\x00", "little")
LAYOUT_VERSION = 5  # 5: asyncio waiters (H_ASYNC_WAITERS, P_ASYNC) woken through FIFOs

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
H_EPOCH = 22  # the last epoch handed to a registry entry
H_FAIL_RATE = 23  # (f64) probability that an arena attempt fails on purpose
H_FAIL_THRESHOLD = 24  # fail_rate scaled to 2**64: fail when rng < threshold
H_SEED = 25
H_RNG = 26  # splitmix64 state of the fault injector
# The pool lock (see _fast.c).
H_LOCK_OWNER = 28  # 0, or the holder's token (entry + 1) | epoch << 16
H_LOCK_SINCE_NS = 29  # CLOCK_MONOTONIC ns when it was taken (written by the holder)
H_LOCK_WAITERS = 30  # contenders sleeping on the lock semaphore
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
H_OFF_NEXT = 43
H_OFF_QUEUES = 44
H_MAX_QUEUES = 45
H_ENTRIES_USED = 42  # one past the highest registry entry ever taken: how far scans look
H_ASYNC_WAITERS = 46  # of nr_waiters, the asyncio ones: woken through their process's FIFO, not the semaphore
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
ST_QUEUED = 5
STATE_NAMES = {
    ST_ARENA: "in the arena",
    ST_RESERVE: "in the reserve",
    ST_HELD: "held",
    ST_CACHED: "in the arena (a process's cache)",
    ST_QUEUED: "in a queue",
}
STATE_MASK = 0xFF
OWNER_SHIFT = 8
OWNER_MASK = 0xFFFF
GEN_SHIFT = 24
GEN_MASK = (1 << 39) - 1
GEN_BITS = GEN_MASK << GEN_SHIFT

# Handles: index | generation << HGEN_SHIFT (63 bits: fits an int64).
INDEX_BITS = 24
INDEX_MASK = (1 << INDEX_BITS) - 1
HGEN_SHIFT = 24
MAX_CAPACITY = INDEX_MASK  # 16,777,215 slots
MAX_SLOT_SIZE = 1 << 30

# Process registry entries: PROC_WORDS u64 each.
P_PID = 0
P_START = 1
P_SLEEPING = 2
P_CACHE_N = 3  # entries in the cache array (some may be stale or blank)
P_EPOCH = 4  # 0: the entry is vacant
P_ASYNC = 5  # of P_SLEEPING, the asyncio waiters (woken through the entry's FIFO, _segment.fifo_path)
P_COUNTERS = 6  # the first N_PROC_COUNTERS of COUNTERS, in that order
N_PROC_COUNTERS = 8
P_CACHE = P_COUNTERS + N_PROC_COUNTERS  # CACHE_MAX u32 slot indexes
CACHE_MAX = 64
P_QSLEEP = P_CACHE + CACHE_MAX // 2  # MAX_QUEUES u8: this process's threads asleep on each queue
PROC_WORDS = P_QSLEEP + 64 // 8
MAX_PROCS = 256
MAX_MAX_PROCS = OWNER_MASK - 1  # an owner field holds entry + 1
CACHE_BLANK = 0xFFFFFFFF  # a cache entry taken by another process
# Queue table entries: QUEUE_WORDS u64 each.
Q_NAME = 0  # QUEUE_NAME_BYTES, NUL-padded
QUEUE_NAME_BYTES = 48
Q_STATE = 6  # 0 vacant, QUEUE_LIVE in use
Q_DEPTH = 7
Q_COUNT = 8
Q_HEAD = 9  # slot index, or NO_SLOT
Q_TAIL = 10
Q_PUTS = 11
Q_GETS = 12
Q_WAITERS = 13  # threads asleep in a blocked put or get on this queue
Q_PUTTERS = 14  # of them, those in a put (the others wait in a get)
QUEUE_WORDS = 16
QUEUE_LIVE = 1
MAX_QUEUES = 64
NO_SLOT = 0xFFFFFFFF
# Per-process counter indexes (relative to P_COUNTERS).
C_ALLOC_ARENA, C_ALLOC_RESERVE, C_ALLOC_FAILED, C_FREE_RESERVE, C_FREE_ARENA, C_SLEEPS, C_FAULTS, C_POISON = range(8)


@dataclass(frozen=True)
class Geometry:
    """Where things are in a segment of this shape (all in bytes)."""

    slot_size: int
    capacity: int
    stride: int
    off_words: int
    off_stack: int
    off_arena: int
    off_next: int
    off_procs: int
    max_procs: int
    off_queues: int
    max_queues: int
    off_slots: int
    total: int

    def live_byte(self, entry: int) -> int:
        """The byte of the segment file whose OFD lock says registry entry
        ``entry`` belongs to a live process (its first byte)."""
        return self.off_procs + 8 * PROC_WORDS * entry

    @classmethod
    def of(cls, slot_size: int, capacity: int, max_procs: int = MAX_PROCS) -> Geometry:
        stride = (slot_size + 7) & ~7
        off_words = HEADER_BYTES
        off_stack = off_words + 8 * capacity
        off_arena = off_stack + 4 * capacity
        off_next = off_arena + 4 * capacity
        off_procs = (off_next + 4 * capacity + 7) & ~7
        off_queues = off_procs + 8 * PROC_WORDS * max_procs
        off_slots = -(-(off_queues + 8 * QUEUE_WORDS * MAX_QUEUES) // PAGE) * PAGE
        total = off_slots + stride * capacity
        return cls(
            slot_size, capacity, stride, off_words, off_stack, off_arena, off_next, off_procs, max_procs, off_queues,
            MAX_QUEUES, off_slots, total,
        )


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
    if not (1 <= slot_size <= MAX_SLOT_SIZE and 1 <= capacity <= MAX_CAPACITY and 1 <= max_procs <= MAX_MAX_PROCS):
        raise PoolFormatError(
            f"header has an impossible geometry: slot_size={slot_size}, capacity={capacity}, max_procs={max_procs}"
        )
    geo = Geometry.of(slot_size, capacity, max_procs)
    stored = (
        words[H_HEADER_BYTES], words[H_STRIDE], words[H_OFF_WORDS], words[H_OFF_STACK],
        words[H_OFF_ARENA], words[H_OFF_PROCS], words[H_OFF_SLOTS], words[H_TOTAL], words[H_OFF_NEXT],
        words[H_OFF_QUEUES], words[H_MAX_QUEUES],
    )
    expected = (
        HEADER_BYTES, geo.stride, geo.off_words, geo.off_stack, geo.off_arena, geo.off_procs, geo.off_slots, geo.total,
        geo.off_next, geo.off_queues, geo.max_queues,
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
    hdr[H_OFF_NEXT] = geo.off_next
    hdr[H_OFF_QUEUES] = geo.off_queues
    hdr[H_MAX_QUEUES] = geo.max_queues
    hdr[H_OFF_SLOTS] = geo.off_slots


class Views:
    """Typed memoryviews over one mapping. Holding a Views keeps the mapping
    alive (each view is an export of it); dropping the last one unmaps."""

    __slots__ = ("mm", "geo", "hdr", "fhdr", "words", "stack", "arena", "next", "procs", "queues", "data")

    def __init__(self, mm: mmap.mmap, geo: Geometry) -> None:
        base = memoryview(mm)
        self.mm = mm
        self.geo = geo
        self.hdr = base[:HEADER_BYTES].cast("Q")
        self.fhdr = base[:HEADER_BYTES].cast("d")
        self.words = base[geo.off_words : geo.off_stack].cast("Q")
        self.stack = base[geo.off_stack : geo.off_arena].cast("I")
        self.arena = base[geo.off_arena : geo.off_arena + 4 * geo.capacity].cast("I")
        self.next = base[geo.off_next : geo.off_next + 4 * geo.capacity].cast("I")
        self.procs = base[geo.off_procs : geo.off_procs + 8 * PROC_WORDS * geo.max_procs].cast("Q")
        self.queues = base[geo.off_queues : geo.off_queues + 8 * QUEUE_WORDS * geo.max_queues].cast("Q")
        self.data = base[geo.off_slots : geo.total]
