"""The layout table: where each field of a pool lives in its segment.

This module is the one truth for both languages. It imports nothing from the
package, so that ``setup.py`` can load it by path and generate the C core's
header from it (``c_header()`` -> ``shmpool/_core/layout.h``); the compiled
core carries a hash of that text, checked against this table when the core
is imported (``layout_hash()``), so a stale build is refused by name.

One POSIX shared-memory segment holds one pool::

    offset 0            header: HEADER_WORDS unsigned 64-bit words (H_*)
    off_words           slot words: capacity x u64, one per slot (the truth)
    off_stack           reserve stack: capacity x u32 slot indexes (elements[])
    off_arena           arena free list: capacity x u32 slot indexes (a stack)
    off_next            queue links: capacity x u32, the next slot in a queue
    off_desc            element descriptors: capacity x DESC_WORDS u64 (D_*)
    off_since           hand-out times: capacity x u64, CLOCK_MONOTONIC ns
    off_procs           process registry: max_procs x PROC_WORDS u64 (P_*)
    off_queues          queue table: MAX_QUEUES x QUEUE_WORDS u64 (Q_*)
    off_refs            references: capacity x u64, for SHARED slots (REF_*)
    off_topics          topic table: MAX_TOPICS x TOPIC_WORDS u64 (T_*), then
                        subscriptions: MAX_TOPICS x MAX_SUBS x SUB_WORDS u64
                        (S_*), then their rings: MAX_TOPICS x MAX_SUBS x
                        TOPIC_MAX_DEPTH u32 slot indexes
    off_slots           slots: capacity x stride bytes, page-aligned start
    total               end of the segment

That is 68 bytes of metadata per slot beyond the fixed part. The stack has
room for ``capacity`` entries, so ``resize`` can grow ``min_nr`` up to the
capacity without moving anything. ``stride`` is ``slot_size`` rounded up to
8, so every slot is 8-byte aligned.

The slot word
-------------
The slot word is the truth about a slot; every list, depth and count is
derived from the words and can be rebuilt from them (``_core/repair.c``)::

    bits 0-7    state (ST_*): ARENA, RESERVE, HELD, CACHED, QUEUED or PARKED
                (0 never appears in a live pool)
    bits 8-23   owner: for HELD and CACHED the registry entry + 1 of the
                process that holds the slot (or whose cache holds it); for
                QUEUED the queue + 1; for PARKED the entry + 1 of the process
                that freed it (for the record); 0 otherwise
    bits 24-62  generation: bumped each time the slot is handed out

A held slot's owner must name an entry in use (its epoch not 0, below
``H_ENTRIES_USED``): one that names a vacant entry or none is damage, never
a dead holder's element to take back. PARKED: freed while the pool lock
could not be had (a live holder stopped); the next holder of the lock
completes the free (``H_PARKED`` counts them).

A handle is ``index | generation << 24``: a stale handle (its slot freed and
handed out again) is refused. Generations are 39 bits and start at a random
value per slot, so another pool's handle names the right generation with
odds of 2**-39; a slot reused every 50 ns takes about 7.6 hours to come back
to a generation.

Hand-out times
--------------
``since[idx]`` is when slot ``idx`` was last handed out (an allocation; a
put, get or adopt keeps it), CLOCK_MONOTONIC_COARSE ns, written by the one
code that hands a slot out (``hand_out``) after its word's CAS, so that
only the allocating process writes it and no other core pays for the line.
It is for people (shmpool-inspect's ages): a process killed between the two
stores leaves the previous time, which nothing depends on.

The registry and the queues
---------------------------
One registry entry per attached process: its pid and start time (for
people), its epoch (drawn from ``H_EPOCH`` when the entry was taken; it names
this incarnation of the entry in lock tokens), how many of its threads sleep
on each wait channel (so that a dead sleeper can be counted out), its
counters (summed with the header's when read), its cache of free arena
slots (a stack only its owner pushes and pops; thieves blank what they take)
and the reserve places lent to it (``P_PLACE_*``, a line of their own:
``_core/places.c``). The reserve is ``H_RESERVE_DEPTH`` elements on the
shared stack plus every process's full places; ``H_CURR_NR`` is their total
less each entry's slack (full places its owner has not counted there yet,
so that its lock-free pops and pushes write no shared line: ``curr_nr`` is
``H_CURR_NR`` plus every entry's slack), ``H_LENT`` the places lent (so the
stack's part of ``min_nr`` is ``min_nr - H_LENT``).
Liveness: each attached process holds an OFD lock on its entry's first byte
of the segment file, dropped by the kernel when it dies.

A queue is a FIFO linked through ``next[]`` with its head, tail, count and
depth in the queue table; the QUEUED slot word is the truth.

The pool lock is the header word ``H_LOCK_OWNER``: 0 when free, else the
holder's token ``(entry + 1) | epoch << 16``. Contenders and sleepers wait on
futex words (the low 32 bits of ``H_LOCK_OWNER``, ``H_WAIT_SEQ``,
``Q_GET_SEQ``, ``Q_PUT_SEQ``), so nothing but the segment itself is shared.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass

MAGIC = int.from_bytes(b"SHMPOOL\x00", "little")
LAYOUT_VERSION = 13  # 13: places' slack (H_CURR_NR a lower bound; curr_nr adds every entry's slack); 12: the header's hot words regrouped (nothing a lock-free call reads on the lock's line); 11: reserve places (per-process windows of the reserve; curr_nr an atomic total); 10: share groups (a topic kind: elements held by several processes); 9: topics (SHARED slots, references, subscriptions); 8: the reserve's low-water mark, slept time, hand-out times; 7: header and registry entries grouped by cache line; 6: futex channels, PARKED frees

HEADER_WORDS = 96
HEADER_BYTES = HEADER_WORDS * 8
PAGE = mmap.PAGESIZE

# Header words. Geometry: written once by create, read-only after.
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
H_OFF_NEXT = 10
H_OFF_PROCS = 11
H_MAX_PROCS = 12
H_OFF_QUEUES = 13
H_MAX_QUEUES = 14
H_OFF_SLOTS = 15
# Cold: written at create or rarely.
H_FLAGS = 16
H_CREATOR_PID = 17
H_CREATOR_START = 18  # the creator's start time (see _procs); 0 if unknown
H_CREATED_NS = 19  # wall clock, time.time_ns()
H_EPOCH = 20  # the last epoch handed to a registry entry (atomic add)
H_FAIL_RATE = 21  # (f64) probability that an arena attempt fails on purpose
H_SEED = 22
H_RNG_KIND = 23  # the fault injector's generator: RNG_SPLITMIX or RNG_GLIBC
# The words below are grouped by cache line (8 words each), by who writes
# them and when, so that a call moves as few lines between cores as it can
# (tools/bench.py pipeline and reserve2 measure it).
#
# The lock's line: the lock word and what only lock holders and lock
# contenders touch (H_PARKED is also raised lock-free by a parked free).
# Every acquisition writes it, so nothing that a lock-free call reads lives
# here: when two processes hand elements over through a queue, each takes
# the lock once per message, and an allocation from the cache that read
# this line would miss on it every time.
H_LOCK_OWNER = 24  # 0, or the holder's token (entry + 1) | epoch << 16; contenders wait on its low 32 bits
H_LOCK_SINCE_NS = 25  # CLOCK_MONOTONIC ns when the lock was taken (written by the holder)
H_LOCK_SEQ = 26  # bumped by every acquisition
H_LOCK_WAITERS = 27  # contenders asleep on the lock
H_LOCK_WAKING = 28  # 1: a releaser woke a lock contender that has not run yet (no other is woken meanwhile)
H_PARKED = 29  # slots PARKED (freed without the lock) that the next lock holder returns
H_RESERVE_DEPTH = 30  # the shared reserve stack's depth (under the lock)
H_LENT = 31  # reserve places lent to processes, in all (under the lock; repair sums the entries' P_PLACE_Q)
# The state line: read by every call, the lock-free alloc and free
# included; written rarely (destroy, resize, sleepers counting themselves
# in), except H_CURR_NR by the reserve's own moves.
H_STATUS = 32  # STATUS_LIVE, or STATUS_DESTROYED once destroy() began
H_MIN_NR = 33
H_CURR_NR = 34  # the reserve's elements in all (the shared stack and every place) less every entry's slack (atomic adds)
H_NR_WAITERS = 35  # sleeping allocations, counted in and out with atomic adds
H_ASYNC_WAITERS = 36  # of them, the asyncio ones (woken through their process's FIFO)
H_FAIL_THRESHOLD = 37  # fail_rate scaled to 2**53: fail when the draw is below it
H_ENTRIES_USED = 38  # one past the highest registry entry ever taken: how far scans look
H_RECOUNT = 39  # 1: curr_nr is to be counted again from the words (a repair found a place busy)
# The arena's line: written by cache refills and drains (a batch at a
# time), wake-ups and the fault injector; the geometry words here are read
# at attach only.
H_OFF_DESC = 40  # (geometry) the element descriptors' table
H_OFF_SINCE = 41  # (geometry) the hand-out times' table
H_LOW_WATER = 42  # the lowest curr_nr seen since create (lowered by CAS-min with the reserve's moves)
H_OFF_REFS = 43  # (geometry) the references' table (topics)
H_OFF_TOPICS = 44  # (geometry) the topic table, its subscriptions and their rings
H_ARENA_FREE = 45
H_WAIT_SEQ = 46  # futex word: bumped by every wake-up of the channel
H_RNG = 47  # splitmix64 state of the fault injector (atomic add; RNG_SPLITMIX)
# Counters (the header's part; each registry entry counts the first N_PROC_COUNTERS too).
H_ALLOC_ARENA = 48
H_ALLOC_RESERVE = 49
H_ALLOC_FAILED = 50
H_FREE_RESERVE = 51
H_FREE_ARENA = 52
H_SLEEPS = 53
H_FAULTS = 54  # arena attempts failed on purpose
H_POISON_ERRORS = 55
H_RECOVERIES = 56  # times the lock was taken over from a dead holder
H_RECLAIMED = 57  # elements taken back from dead holders
# Sleeping allocations' time asleep (ns), added by each when it returns
# (atomic add; the longest by compare-and-swap): not counters of COUNTERS,
# which count events.
H_LONGEST_SLEEP_NS = 58
H_TOTAL_SLEEP_NS = 59
# glibc's rand() (RNG_GLIBC), under the pool lock: random_r's TYPE_3 table,
# 31 int32 in 16 words, and the index of its front pointer (the rear one is
# three behind, as srandom_r leaves them).
H_GLIBC_TABLE = 64
H_GLIBC_FRONT = 80
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
RNG_SPLITMIX = 0  # splitmix64 over a counter: lock-free draws (the default)
RNG_GLIBC = 1  # glibc's rand(), seeded by srand(seed): the seed program's draws, one per arena attempt
RNG_NAMES = {"splitmix64": RNG_SPLITMIX, "glibc": RNG_GLIBC}

# Slot words.
ST_ARENA = 1
ST_RESERVE = 2
ST_HELD = 3
ST_CACHED = 4
ST_QUEUED = 5
ST_PARKED = 6
ST_SHARED = 7  # published to a topic (owner: the topic + 1): read by its subscribers, freed by the last
STATE_NAMES = {
    ST_ARENA: "in the arena",
    ST_RESERVE: "in the reserve",
    ST_HELD: "held",
    ST_CACHED: "in the arena (a process's cache)",
    ST_QUEUED: "in a queue",
    ST_PARKED: "being freed (parked until the pool lock or the reserve's empty place is free)",
    ST_SHARED: "published to a topic",
}
STATE_MASK = 0xFF
OWNER_SHIFT = 8
OWNER_MASK = 0xFFFF
GEN_SHIFT = 24
GEN_MASK = (1 << 39) - 1

# Handles: index | generation << HGEN_SHIFT (63 bits: fits an int64).
INDEX_BITS = 24
INDEX_MASK = (1 << INDEX_BITS) - 1
HGEN_SHIFT = 24
MAX_CAPACITY = INDEX_MASK  # 16,777,215 slots
MAX_SLOT_SIZE = 1 << 30

# Process registry entries: PROC_WORDS u64 each, a whole number of cache
# lines. The first line is what other processes read (liveness, sleepers,
# the cache's length for a thief); the counters, written by the owner on
# every call, have a line of their own, so that a thief's or a waker's read
# never takes the line the owner is writing.
P_PID = 0
P_START = 1
P_EPOCH = 2  # 0: the entry is vacant
P_SLEEPING = 3  # this process's threads asleep in a sleeping alloc (async ones included)
P_ASYNC = 4  # of P_SLEEPING, the asyncio ones
P_CACHE_N = 5  # entries in the cache array (some may be blank: taken by thieves)
P_COUNTERS = 8  # the first N_PROC_COUNTERS of COUNTERS, in that order
N_PROC_COUNTERS = 8
CACHE_MAX = 64
P_CACHE = P_COUNTERS + N_PROC_COUNTERS  # CACHE_MAX u32 slot indexes
MAX_QUEUES = 64
P_QGET = P_CACHE + CACHE_MAX // 2  # MAX_QUEUES u8: this process's threads asleep in a get, per queue
P_QPUT = P_QGET + MAX_QUEUES // 8  # MAX_QUEUES u8: the same in a put
# The reserve's places lent to this process (places.c): a line of their own,
# written by the owner on every lock-free reserve pop and push.
P_PLACE_LOCK = P_QPUT + MAX_QUEUES // 8  # 0, or the token of whoever moves these places (the owner, or a lock holder)
P_PLACE_Q = P_PLACE_LOCK + 1  # places lent
P_PLACE_R = P_PLACE_LOCK + 2  # r | s << PLACE_SLACK_SHIFT: r of them full (P_PLACES[0:r] name RESERVE slots owned
# by this entry), s <= r of those not counted in H_CURR_NR (the slack); one word, so one store moves both
P_PLACES = P_PLACE_LOCK + 3  # PLACES_MAX u32 slot indexes, oldest first
PLACES_MAX = 10
PLACE_SLACK_SHIFT = 16  # P_PLACE_R: the full places below it, the slack above
PLACE_FULL_MASK = (1 << PLACE_SLACK_SHIFT) - 1
PROC_WORDS = P_PLACES + PLACES_MAX // 2  # 72: nine lines
MAX_PROCS = 256  # the default max_processes
MAX_MAX_PROCS = OWNER_MASK - 1  # an owner field holds entry + 1
CACHE_BLANK = 0xFFFFFFFF  # a cache entry taken by another process
# Per-process counter indexes (relative to P_COUNTERS).
C_ALLOC_ARENA = 0
C_ALLOC_RESERVE = 1
C_ALLOC_FAILED = 2
C_FREE_RESERVE = 3
C_FREE_ARENA = 4
C_SLEEPS = 5
C_FAULTS = 6
C_POISON = 7

# Element descriptors (alloc_array): DESC_WORDS u64 per slot, written by
# the element's holder (no lock: nobody else may touch a held element),
# D_GEN last. A descriptor is the element's only while D_GEN names the
# generation its slot word has: a free and a new allocation make it stale
# without a write, and a put, get or adopt keep it.
D_GEN = 0  # generation << 8 | DESC_SET | ndim; 0: none
D_DTYPE = 1  # numpy's dtype.str, NUL-padded (8 bytes)
D_DIMS = 2  # up to DESC_MAX_DIMS u32 dimensions (two words)
DESC_WORDS = 4
DESC_SET = 0x80
DESC_MAX_DIMS = 4

# Topics (publish/subscribe). A SHARED slot's reference word (refs[idx])
# says which subscriptions of its topic reference it: bit j of the low half
# (REF_PENDING..) for each subscription j that still has it, pending or
# received; bit j of the high half for those that have received it (got it
# and not yet released it). The element goes back to the pool when the low
# half is 0.
REF_RECEIVED_SHIFT = 32
MAX_TOPICS = 8
MAX_SUBS = 16  # subscriptions per topic (bits of a reference word's halves)
TOPIC_MAX_DEPTH = 256  # a subscription's ring: at most this many pending elements
T_NAME = 0  # QUEUE_NAME_BYTES, NUL-padded
T_STATE = 6  # 0 vacant, QUEUE_LIVE in use
T_DEPTH = 7
T_OVERFLOW = 8  # OVERFLOW_BLOCK or OVERFLOW_DROP_OLDEST; OVERFLOW_SHARE: a share group
T_SUBS = 9  # bit j: subscription j is live
T_PUBLISHED = 10  # elements published (counter)
T_DROPPED = 11  # pending elements dropped by drop_oldest (counter, every subscription)
T_ROOM_SEQ = 12  # futex word of the publishers' channel: bumped when a full ring gets room
T_PUBLISHERS = 13  # publishers asleep, waiting for room
TOPIC_WORDS = 16
OVERFLOW_BLOCK = 0
OVERFLOW_DROP_OLDEST = 1
# A share group: nothing is published to it; its subscriptions are processes
# that hold elements together (share and take, _core/topic.c), as the workers
# of a host do under shmpool.dask. Not a mode a user picks (OVERFLOW_NAMES).
OVERFLOW_SHARE = 2
OVERFLOW_NAMES = {"block": OVERFLOW_BLOCK, "drop_oldest": OVERFLOW_DROP_OLDEST}
S_OWNER = 0  # the subscribing process's registry entry + 1 (0: vacant)
S_EPOCH = 1  # that entry's epoch when it subscribed (another: the subscriber is gone)
S_HEAD = 2  # elements taken from the ring so far (the next to take: ring[head % depth])
S_TAIL = 3  # elements put into the ring so far
S_SEQ = 4  # futex word of its getters' channel: bumped when an element arrives
S_GETTERS = 5  # its threads asleep in a get
S_DROPPED = 6  # its pending elements dropped by drop_oldest
SUB_WORDS = 8

# Queue table entries: QUEUE_WORDS u64 each.
Q_NAME = 0  # QUEUE_NAME_BYTES, NUL-padded
QUEUE_NAME_BYTES = 48
Q_STATE = 6  # 0 vacant, QUEUE_LIVE in use
Q_DEPTH = 7
Q_COUNT = 8  # the second line: what put and get change, under the lock
Q_HEAD = 9  # slot index, or NO_SLOT
Q_TAIL = 10
Q_PUTS = 11
Q_GETS = 12
Q_GETTERS = 16  # the third line, the sleepers': threads asleep in a blocked get
Q_PUTTERS = 17  # threads asleep in a blocked put
Q_GET_SEQ = 18  # futex word of the getters' channel: bumped when elements arrive
Q_PUT_SEQ = 19  # futex word of the putters' channel: bumped when room is made
Q_PUT_NEED = 20  # the most room a sleeping putter waits for (a hint: getters wake putters once there is this much)
QUEUE_WORDS = 24  # three cache lines; 13-15 and 21-23 reserved
QUEUE_LIVE = 1
NO_SLOT = 0xFFFFFFFF

# Bounds on every wait for the pool lock (see _core/mempool.c, "Entry").
ATOMIC_WAIT_NS = 50_000_000  # a call that may not wait (GFP_ATOMIC, *_nowait, alloc_preallocated, free)
ADMIN_WAIT_NS = 500_000_000  # an administrative call (stats, reclaim_dead, resize, destroy, attach, ...)
SLEEP_RETRY_NS = 5_000_000_000  # a sleeping alloc retries this often unwoken (io_schedule_timeout(5*HZ))
LONG_SLEEP_NS = 5_000_000_000  # a sleeping alloc asleep this long is said to the `shmpool` logger (the default)
QUEUE_RETRY_NS = 1_000_000_000  # a blocked put or get re-checks this often unwoken
QUEUE_BATCH = 64  # a full queue's putters are woken once a quarter of it, at most this many, is free
PUT_NAP_NS = 1_000_000  # ... and look again after this (doubling up to QUEUE_RETRY_NS) if nobody woke them
LOCK_SLICE_NS = 20_000_000  # a lock contender looks at the holder's liveness this often
MAX_WAIT_NS = 1 << 62  # a longer timeout is clamped to this (about 146 years)

# Poisoning (the kernel's slab debugging values).
POISON_FREE = 0x6B
POISON_END = 0xA5
POISON_INUSE = 0x5A

#: What c_header() emits, section by section: (comment, names).
_C_SECTIONS = (
    ("identity", ("MAGIC", "LAYOUT_VERSION", "HEADER_WORDS")),
    ("header words", tuple(n for n in globals() if n.startswith("H_"))),
    ("header values", ("STATUS_LIVE", "STATUS_DESTROYED", "FLAG_POISON", "RNG_SPLITMIX", "RNG_GLIBC")),
    ("slot words", ("ST_ARENA", "ST_RESERVE", "ST_HELD", "ST_CACHED", "ST_QUEUED", "ST_PARKED", "ST_SHARED",
                    "STATE_MASK",
                    "OWNER_SHIFT", "OWNER_MASK", "GEN_SHIFT", "GEN_MASK")),
    ("handles", ("INDEX_MASK", "HGEN_SHIFT", "MAX_CAPACITY", "MAX_SLOT_SIZE")),
    ("descriptors", ("D_GEN", "D_DTYPE", "D_DIMS", "DESC_WORDS", "DESC_SET", "DESC_MAX_DIMS")),
    ("registry entries", tuple(n for n in globals() if n.startswith(("P_", "C_")))
     + ("N_PROC_COUNTERS", "CACHE_MAX", "PLACES_MAX", "PLACE_SLACK_SHIFT", "PLACE_FULL_MASK", "PROC_WORDS", "MAX_PROCS", "MAX_MAX_PROCS", "CACHE_BLANK")),
    ("queue table", tuple(n for n in globals() if n.startswith("Q_"))
     + ("QUEUE_NAME_BYTES", "QUEUE_WORDS", "QUEUE_LIVE", "MAX_QUEUES", "NO_SLOT", "QUEUE_BATCH")),
    ("topics", tuple(n for n in globals() if n.startswith(("T_", "S_")))
     + ("REF_RECEIVED_SHIFT", "MAX_TOPICS", "MAX_SUBS", "TOPIC_MAX_DEPTH", "TOPIC_WORDS", "SUB_WORDS",
        "OVERFLOW_BLOCK", "OVERFLOW_DROP_OLDEST", "OVERFLOW_SHARE")),
    ("topic region", ("OFF_SUBS", "OFF_RINGS", "TOPICS_BYTES")),
    ("bounds (ns)", ("ATOMIC_WAIT_NS", "ADMIN_WAIT_NS", "SLEEP_RETRY_NS", "LONG_SLEEP_NS", "QUEUE_RETRY_NS", "PUT_NAP_NS",
                     "LOCK_SLICE_NS", "MAX_WAIT_NS")),
    ("poisoning", ("POISON_FREE", "POISON_END", "POISON_INUSE")),
)


def c_header() -> str:
    """The C core's ``layout.h``: every constant above that C uses, one
    ``#define`` each (unsigned 64-bit), and the hash that ties the build to
    this table."""
    body = []
    for comment, names in _C_SECTIONS:
        body.append(f"\n/* {comment} */")
        body += [f"#define {n} {globals()[n]:#x}ull" for n in names]
    body.append("\n/* the counters, in COUNTERS' order: their header words */")
    body.append(f"#define N_COUNTERS {len(COUNTERS)}")
    body.append("#define COUNTER_WORDS {" + ", ".join(f"{w:#x}ull" for _, w in COUNTERS) + "}")
    body.append("\n/* where a slot in each state is, by state (0: none valid), for messages */")
    where = (STATE_NAMES.get(s, "in no valid state") for s in range(max(STATE_NAMES) + 1))
    body.append("#define STATE_WHERE {" + ", ".join(f'"{w}"' for w in where) + "}")
    text = "\n".join(body) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return (
        "/* Generated by setup.py from shmpool/_layout.py: do not edit (edit the table). */\n"
        "#ifndef SHMPOOL_LAYOUT_H\n#define SHMPOOL_LAYOUT_H\n"
        f'#define LAYOUT_HASH "{digest}"\n{text}#endif\n'
    )


def layout_hash() -> str:
    """The hash ``c_header()`` stamps into the header (and the core)."""
    return c_header().split('LAYOUT_HASH "', 1)[1].split('"', 1)[0]


LINE = 64  # bytes in a cache line
OFF_SUBS = 8 * TOPIC_WORDS * MAX_TOPICS  # the subscriptions, from off_topics
OFF_RINGS = OFF_SUBS + 8 * SUB_WORDS * MAX_SUBS * MAX_TOPICS  # their rings, from off_topics
TOPICS_BYTES = OFF_RINGS + 4 * TOPIC_MAX_DEPTH * MAX_SUBS * MAX_TOPICS


def _line(offset: int) -> int:
    return -(-offset // LINE) * LINE


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
    off_desc: int
    off_since: int
    off_procs: int
    max_procs: int
    off_queues: int
    off_refs: int
    off_topics: int
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
        off_stack = _line(off_words + 8 * capacity)  # every table starts a cache line
        off_arena = _line(off_stack + 4 * capacity)
        off_next = _line(off_arena + 4 * capacity)
        off_desc = _line(off_next + 4 * capacity)
        off_since = _line(off_desc + 8 * DESC_WORDS * capacity)
        off_procs = _line(off_since + 8 * capacity)
        off_queues = off_procs + 8 * PROC_WORDS * max_procs
        off_refs = _line(off_queues + 8 * QUEUE_WORDS * MAX_QUEUES)
        off_topics = _line(off_refs + 8 * capacity)
        off_slots = -(-(off_topics + TOPICS_BYTES) // PAGE) * PAGE
        total = off_slots + stride * capacity
        return cls(
            slot_size, capacity, stride, off_words, off_stack, off_arena, off_next, off_desc, off_since, off_procs,
            max_procs,
            off_queues, off_refs, off_topics,
            MAX_QUEUES, off_slots, total,
        )

    def header_words(self) -> dict[int, int]:
        """The geometry words of a header of this shape (``H_* -> value``),
        as create writes them and attach checks them."""
        return {
            H_VERSION: LAYOUT_VERSION, H_HEADER_BYTES: HEADER_BYTES, H_TOTAL: self.total,
            H_SLOT_SIZE: self.slot_size, H_CAPACITY: self.capacity, H_STRIDE: self.stride,
            H_OFF_WORDS: self.off_words, H_OFF_STACK: self.off_stack, H_OFF_ARENA: self.off_arena,
            H_OFF_NEXT: self.off_next, H_OFF_DESC: self.off_desc, H_OFF_SINCE: self.off_since,
            H_OFF_PROCS: self.off_procs,
            H_MAX_PROCS: self.max_procs,
            H_OFF_QUEUES: self.off_queues, H_MAX_QUEUES: self.max_queues, H_OFF_SLOTS: self.off_slots,
            H_OFF_REFS: self.off_refs, H_OFF_TOPICS: self.off_topics,
        }
