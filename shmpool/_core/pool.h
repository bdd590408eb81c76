/* pool.h: what every file of the core shares. No Python here.
 *
 * The core in one page
 * --------------------
 * A pool is one shared-memory segment laid out as _layout.py says (layout.h
 * is generated from it). `struct pool` is one process's view of it: where
 * the header, slot words, stacks and registry are, which registry entry is
 * ours, and what a critical section left to do once the lock is released.
 *
 * The files, one concern each; only the py_*.c files include Python.h (they
 * share py.h), so "no Python code while the lock is held" holds by
 * construction:
 *
 *   slots.c     the only writer of slot words, the reserve stack and the
 *               arena's free list (add_element / remove_element, arena_push /
 *               arena_pop, set_word), curr_nr (reserve_count), and poisoning
 *   places.c    the reserve's places lent to processes: each fills and
 *               empties its own without the lock; the only writer of them
 *   arena.c     the kernel's "backing allocator": each process's cache of
 *               arena slots (lock-free for its owner), stealing, fault
 *               injection, arena_take
 *   lock.c      the pool lock: a header word taken by CAS with its owner's
 *               token; contenders wait on it as a futex; liveness and takeover
 *   wake.c      wait channels (futex words), sleeper counts, asyncio FIFOs
 *   mempool.c   the kernel's rules (alloc_step, release_slot, parked frees,
 *               bulk, resize, destroy) and the one entry and wait loop, run()
 *   queue.c     queues: ownership that moves with the element
 *   registry.c  processes: register, bind, detach, dead owners, retire
 *   repair.c    rebuild every list and depth from the slot words
 *   derive.c    the one derivation of a pool's numbers (stats, inspect)
 *   admin.c     resize, destroy, stats, reclaim, detach: one step each
 *   py_*.c      the Python type (py_type.c), its methods (py_alloc.c,
 *               py_queue.c, py_admin.c), argument checks (py_convert.c),
 *               element views (py_views.c), the module (py_module.c)
 *
 * Every multi-word update commits with one aligned 8-byte store or CAS of
 * a slot word (or of a registry entry's epoch); everything around it is
 * derived and rebuilt by repair(), so a process killed at any instruction
 * leaves a pool that the next holder of the lock makes whole.
 *
 * The segment is untrusted: every index, depth and count read from it is
 * bounded before use; a value out of bounds makes the call fail with
 * RC_CORRUPT (PoolFormatError) and changes nothing further.
 */
#ifndef SHMPOOL_POOL_H
#define SHMPOOL_POOL_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "layout.h"

/* Results of the core's steps. */
enum {
    RC_OK = 0,
    RC_FAIL = 1,      /* nothing to give, and the call may not sleep */
    RC_SLEEP = 2,     /* registered as a sleeper on the call's channel */
    RC_DRY = 3,       /* the arena has no free slot */
    RC_AGAIN = 4,     /* (inside a step) something changed: attempt once more */
    RC_TIMEOUT = -1,  /* the deadline passed (for the lock, or for the whole call) */
    RC_SIGNAL = -2,   /* a signal handler raised, or a callback failed: its exception is set */
    RC_DESTROYED = -3,
    RC_CORRUPT = -4,  /* the segment is damaged: p->msg says how */
    RC_INVALID = -5,  /* a handle that is not held (p->msg says why), or no such queue */
    RC_CLOSED = -6,   /* the object was closed meanwhile */
    RC_NOMEM = -7,
    RC_BUSY = -8,     /* a call that may not wait: the lock did not come within its bound (a live holder) */
};

/* What a step does when nothing is left. */
enum { MODE_FAIL = 0, MODE_SLEEP = 1, MODE_ASYNC = 2 };

/* Trace events (pool.trace names them). */
enum { EV_NONE = 0, EV_ALLOC_ARENA, EV_ALLOC_RESERVE, EV_ALLOC_FAILED, EV_SLEEP, EV_FREE_RESERVE, EV_FREE_ARENA };

/* Wait channels: 0 is the pool's (sleeping allocations); queue q's getters
 * wait on 1 + 2q, its putters on 2 + 2q. */
#define CH_ALLOC 0
#define CH_GET(q) (1 + 2 * (int)(q))
#define CH_PUT(q) (2 + 2 * (int)(q))
#define CH_QUEUE(ch) (((ch) - 1) / 2)
#define CH_IS_PUT(ch) ((ch) > 0 && (ch) < CH_TOPIC0 && ((ch) & 1) == 0)
/* Topic t's publishers wait on CH_ROOM(t), subscription j's getters on
 * CH_SUB(t, j); they are counted per channel only (no registry entry counts
 * them: a dead one's count costs a spurious wake, and its subscription's is
 * reset when the subscription is dropped). */
#define CH_TOPIC0 (1 + 2 * (int)MAX_QUEUES)
#define CH_ROOM(t) (CH_TOPIC0 + (int)(t) * (1 + (int)MAX_SUBS))
#define CH_SUB(t, j) (CH_ROOM(t) + 1 + (int)(j))
#define TOPIC(p, t) ((p)->topics + (uint64_t)(t) * TOPIC_WORDS)
#define SUB(p, t, j) ((p)->subs + ((uint64_t)(t) * MAX_SUBS + (uint64_t)(j)) * SUB_WORDS)
#define RING(p, t, j) ((p)->rings + ((uint64_t)(t) * MAX_SUBS + (uint64_t)(j)) * TOPIC_MAX_DEPTH)

#define CACHE_BATCH (CACHE_MAX / 2)
#define LOCK_SPINS 256           /* pauses a lock contender spins before it sleeps */
#define LOCK_GAP_MAX 16          /* at most this many pauses between two looks at the lock word */
#define QUEUE_SPIN_NS 50000ull   /* a blocked put or get polls at most this long before it sleeps */
#define SPIN_MIN_NS 2000u        /* below this budget it does not spin ... */
#define SPIN_PROBE 8             /* ... but for one sleep in this many */
#define SLEEPERS_MAX (1ull << 20) /* more sleepers than this: a damaged count */
#define FIFO_CACHE 16            /* other processes' FIFOs kept open for writing */
#define NO_DEADLINE 0ull

struct fifo_slot { uint64_t entry, epoch; int fd1; };

struct pool {
    /* The segment. */
    uint64_t *hdr, *words, *registry, *queues;
    uint32_t *stack, *arena, *next;
    uint64_t *desc;              /* element descriptors: DESC_WORDS per slot (py_views.c) */
    uint64_t *since;             /* hand-out times: one per slot (hand_out writes them) */
    uint64_t *refs, *topics, *subs; /* references of SHARED slots; the topic and subscription tables */
    uint32_t *rings;             /* the subscriptions' rings of pending slot indexes */
    unsigned char *data;
    uint64_t capacity, stride, slot_size, max_procs, off_procs, max_queues;
    int fd;                      /* the segment file, for OFD liveness (not owned) */
    int poison;
    /* This process. */
    uint64_t *entry;             /* our registry entry, or NULL */
    uint32_t *cache;             /* its cache of arena slots */
    uint64_t me;                 /* our owner field: entry + 1 (0: none) */
    uint64_t token;              /* our lock token */
    int enabled;                 /* this object uses the process's cache */
    int claimed_dead;            /* our entry was a dead process's when we claimed it (its elements are ours to retire) */
    volatile int closing;        /* close() began: every wait ends with RC_CLOSED */
    int waiting;                 /* threads of this object in a futex wait (close wakes them) */
    /* Left by a critical section, done once the lock is released. */
    int wake;                    /* wake the sleeping allocations */
    uint64_t wake_get, wake_put; /* queues (bit q) whose getters / putters to wake */
    int64_t wake_get_n;          /* how many getters (the elements just put; queues change one per call) */
    uint64_t wake_room;          /* topics (bit t) whose publishers to wake */
    uint64_t wake_topics;        /* topics (bit t) with publishers or subscribers to wake */
    uint32_t wake_sub[MAX_TOPICS]; /* subscriptions (bit j) of topic t whose getters to wake */
    int recount;                 /* a nap ended unwoken: count out dead sleepers next time */
    int relend;                  /* this holder gave its reserve places back: lend them again at leave() */
    int places_busy;             /* the last reserve_pop skipped a live process's full places (it was moving them) */
    uint32_t reserve_calls;      /* its locked reserve operations, up to LEND_AFTER (places.c) */
    int64_t poisoned;            /* a slot found written after free (warned after unlock), or -1 */
    int last_event;              /* what the last step did (trace) */
    uint64_t last_curr;          /* curr_nr just after it (only while traced: it sums every entry's slack) */
    int traced;                  /* a trace hook is set: last_event's curr_nr is wanted */
    uint64_t recoveries;         /* times this object took the lock over from a dead owner */
    uint64_t taken_from_pid;     /* the dead holder of the last takeover (for the log) */
    int64_t long_sleep_ns;       /* an allocation asleep this long is reported once (`after`); -1: never */
    char msg[240];               /* why a call found the pool damaged or a handle invalid */
    char name[256];              /* the pool's name, for messages */
    char fifo_prefix[320];       /* an entry's asyncio FIFO is this + its number ("": none) */
    uint32_t spin_ns[MAX_QUEUES][2]; /* this object's spin budget per queue, get [0] and put [1] (queue_spin) */
    uint8_t spin_skips[MAX_QUEUES][2]; /* sleeps without a spin since the budget ran out (a probe every SPIN_PROBE) */
    struct fifo_slot fifo_w[FIFO_CACHE];
};

/* What the Python side lends the core: waits release the GIL, and signal
 * handlers run between them (py_module.c fills this in). */
struct host {
    void *(*unblock)(void);      /* release the GIL: a token for block() */
    void (*block)(void *);       /* take it back */
    int (*signals)(void);        /* run pending signal handlers: -1 if one raised */
};
extern struct host host;
extern int crash_point;          /* a test hook: SIGKILL ourselves at this point */
enum { CP_NONE = 0, CP_ALLOC_RESERVE, CP_FREE_RESERVE, CP_RETIRE, CP_STEAL, CP_REFILL, CP_DRAIN, CP_REBUILD,
       CP_QUEUE_PUT, CP_QUEUE_GET, CP_PARK, CP_PUBLISH, CP_TOPIC_RELEASE, CP_PLACE_POP, CP_PLACE_PUSH, CP_LEND, CP_N };
extern const char *const CRASH_POINTS[CP_N];
void crash_here(void);
#define CRASH(pt) do { if (crash_point == (pt)) crash_here(); } while (0)

/* ------------------------------------------------------------------ */
/* Words                                                              */

static inline uint64_t ld(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cas(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
/* Between a store and a later load of another word, where both sides of a
 * wake-up (the sleeper counting itself in, then looking; the waker storing,
 * then looking for sleepers) must not both miss the other. On x86 the
 * locked compare-and-swap that precedes it is a full barrier already. */
static inline void store_load_fence(void) {
#if !defined(__x86_64__) && !defined(__i386__)
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}
static inline uint64_t mkword(uint64_t state, uint64_t owner, uint64_t gen) {
    return state | (owner & OWNER_MASK) << OWNER_SHIFT | (gen & GEN_MASK) << GEN_SHIFT;
}
#define W_STATE(w) ((w) & STATE_MASK)
#define W_OWNER(w) (((w) >> OWNER_SHIFT) & OWNER_MASK)
#define W_GEN(w) (((w) >> GEN_SHIFT) & GEN_MASK)
/* Whether word w is the element of generation gen held by `owner` (0: by
 * anybody; an owning array's finalizer, and a reference that travelled,
 * deal only with what that process holds). */
static inline int held_as(uint64_t w, uint64_t gen, uint64_t owner) {
    return W_STATE(w) == ST_HELD && W_GEN(w) == gen && (!owner || W_OWNER(w) == owner);
}
#define ENTRY(p, e) ((p)->registry + (uint64_t)(e) * PROC_WORDS)
#define CACHE_OF(ent) ((uint32_t *)((ent) + P_CACHE))
#define QUEUE(p, q) ((p)->queues + (uint64_t)(q) * QUEUE_WORDS)

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A deadline `ns` from now (ns < 0: none). */
static inline uint64_t deadline_in(int64_t ns) {
    if (ns < 0) return NO_DEADLINE;
    uint64_t d = now_ns() + ((uint64_t)ns < MAX_WAIT_NS ? (uint64_t)ns : MAX_WAIT_NS);
    return d ? d : 1;
}
static inline int passed(uint64_t deadline) { return deadline != NO_DEADLINE && now_ns() >= deadline; }
static inline uint64_t earlier(uint64_t a, uint64_t b) {
    if (a == NO_DEADLINE) return b;
    if (b == NO_DEADLINE) return a;
    return a < b ? a : b;
}

static inline void count(struct pool *p, int c, uint64_t n) {
    if (p->entry) p->entry[P_COUNTERS + c] += n;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Cache-line hints. Between two processes on two cores, a line that a call
 * reads and then writes (a slot word it CASes, a queue's count) crosses
 * twice: shared for the read, then owned for the write. prefetch_w asks for
 * it owned at once, and early: issued before the lock is taken, or for the
 * element the next call will take, its miss overlaps other work. A hint
 * only: it changes no value, and nothing depends on it. (PREFETCHW where
 * the CPU has it, mempool.c asks CPUID; else a plain prefetch.) */
extern int have_prefetchw;
static inline void prefetch_w(const void *a) {
#if defined(__x86_64__)
    if (have_prefetchw) {
        __asm__ __volatile__("prefetchw %0" : : "m"(*(const char *)a));
        return;
    }
#endif
    __builtin_prefetch(a, 1, 3);
}
static inline void prefetch_r(const void *a) { __builtin_prefetch(a, 0, 3); }

int corrupt(struct pool *p, const char *fmt, unsigned long long a, unsigned long long b);
void describe(struct pool *p, uint64_t w, uint64_t gen); /* why a handle is not held, into p->msg */

/* ------------------------------------------------------------------ */
/* slots.c: the only writers of slot words, the reserve and the arena  */

int set_word(struct pool *p, uint64_t idx, uint64_t old, uint64_t new_);
int hand_out(struct pool *p, uint64_t idx, uint64_t old, uint64_t *handle);
void add_element(struct pool *p, uint64_t idx);
int remove_element(struct pool *p, uint64_t *out);
void glibc_srand(struct pool *p, uint32_t seed);         /* the glibc generator's table, seeded */
uint32_t glibc_rand(struct pool *p);
int poison_intact(const struct pool *p, uint64_t idx);   /* a reserved element's pattern is whole */
int arena_push(struct pool *p, uint64_t idx);
int arena_pop(struct pool *p, uint64_t *out);
int arena_peek(struct pool *p, uint64_t depth, uint64_t *out); /* entry `depth` from the top, checked */
void list_reset(struct pool *p, int reserve);                   /* repair: empty a list to push it again */
void list_push(struct pool *p, int reserve, uint64_t idx);      /* the push under add_element and arena_push */
void list_cut(struct pool *p, uint64_t depth);                  /* the reserve stack's top moved to places */
uint64_t reserve_count(struct pool *p, int64_t d);              /* H_CURR_NR + d (atomic, never below 0): the new value */
void lower_low_water(struct pool *p, uint64_t n);

/* ------------------------------------------------------------------ */
/* places.c: the reserve's places lent to processes                     */

int place_pop_fast(struct pool *p, uint64_t *handle);            /* lock-free: our top full place, handed out */
int place_push_fast(struct pool *p, uint64_t idx, uint64_t w);   /* lock-free: a free into our empty place */
int places_return(struct pool *p);                               /* lock held: ours back to the stack */
int places_lend(struct pool *p);                                 /* lock held: the stack's top lent to us */
int reserve_pop(struct pool *p, uint64_t *idx);                  /* lock held: the reserve's top, stealing if need be */
int reserve_room(struct pool *p, int *room, int *busy);          /* lock held: an empty place for a free */
int steal_place(struct pool *p, int *got);
int migrate_hole(struct pool *p, int *room, int *busy);
int others_have_places(const struct pool *p);
int64_t places_reclaim_all(struct pool *p);
int64_t places_forget_all(struct pool *p, unsigned char *busy);
int places_retire(struct pool *p, const unsigned char *v, int dead, int predecessor);
void recount(struct pool *p);
uint64_t reserve_total(const struct pool *p);                    /* curr_nr: H_CURR_NR plus every entry's slack */

/* An entry's P_PLACE_R: its full places, and the slack (those of them not
 * counted in H_CURR_NR), in one word so that one store moves both. */
static inline uint64_t places_full(uint64_t v) { return v & PLACE_FULL_MASK; }
static inline uint64_t places_slack(uint64_t v) { return v >> PLACE_SLACK_SHIFT; }
static inline uint64_t places_word(uint64_t full, uint64_t slack) { return full | slack << PLACE_SLACK_SHIFT; }
static inline int places_word_ok(uint64_t v) { return places_slack(v) <= places_full(v) && places_full(v) <= PLACES_MAX; }

/* ------------------------------------------------------------------ */
/* arena.c: caches, stealing, faults                                    */

int fault(struct pool *p);
int cache_pop(struct pool *p, uint64_t *handle);
int cache_push(struct pool *p, uint64_t idx, uint64_t w);
int drain(struct pool *p, uint64_t keep);
int steal(struct pool *p, uint64_t *taken);
int steal_cache(struct pool *p, uint64_t e, uint64_t *taken); /* entry e's cache to the shared list, in its order */
uint64_t cached_by(const struct pool *p, uint64_t e);
int arena_dry(const struct pool *p);                   /* lock-free: no free slot anywhere (a hint) */
int arena_take(struct pool *p, int inject, int to, uint64_t *handle);

/* ------------------------------------------------------------------ */
/* lock.c                                                               */

int entry_locked(const struct pool *p, uint64_t e);
int owner_alive(const struct pool *p, uint64_t o);
int token_alive(const struct pool *p, uint64_t tok);
int lock_try(struct pool *p);
int lock_acquire(struct pool *p, uint64_t deadline, int64_t bound_ns);
void lock_release(struct pool *p);
int lock_held_by_us(const struct pool *p);

/* ------------------------------------------------------------------ */
/* wake.c                                                               */

uint64_t *chan_count(struct pool *p, int ch);
uint32_t chan_prepare(struct pool *p, int ch);           /* lock held: count in, the seq to wait on */
void chan_cancel(struct pool *p, int ch);                 /* count out a sleeper that will not sleep */
void chan_async_prepare(struct pool *p);                  /* lock held: count in an asyncio sleeper */
void chan_async_done(struct pool *p);                     /* lock-free: count it out */
int chan_sleep(struct pool *p, int ch, uint32_t seen, uint64_t until, int nap); /* lock-free: wait, count out */
void chan_wake(struct pool *p, int ch, int n);            /* after unlock: n of its sleepers (INT_MAX: all) */
void wake_pending_now(struct pool *p);
/* After unlock: what the section left to wake (nothing, mostly). */
static inline void wake_pending(struct pool *p) {
    if (p->wake | (p->wake_get != 0) | (p->wake_put != 0) | (p->wake_topics != 0)) wake_pending_now(p);
}
void wake_everyone(struct pool *p);                       /* close and destroy: every channel, every sleeper */
void drop_sleepers(struct pool *p, uint64_t *ent);        /* a dead entry's sleepers, counted out */
void uncount_dead_sleepers(struct pool *p);
int futex_wait32(uint32_t *addr, uint32_t val, uint64_t until);
void futex_wake32(uint32_t *addr, int n);
static inline uint32_t *futex_word(uint64_t *w) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return (uint32_t *)w + 1;
#else
    return (uint32_t *)w;
#endif
}
void release_fifos(struct pool *p);

/* ------------------------------------------------------------------ */
/* mempool.c: the kernel's rules and the one entry and wait loop        */

/* One call through the lock: run() takes the lock by the deadline the
 * call's kind allows, makes one attempt (step, the lock held), releases the
 * lock, does what the attempt left (wake-ups; `after`, which may run Python
 * code), and, if the attempt registered as a sleeper, sleeps on its channel
 * until woken, the retry period or the deadline, then tries again. */
struct call;
typedef int (*step_fn)(struct pool *p, struct call *c, int mode);
struct call {
    step_fn step;
    int (*after)(struct pool *p, struct call *c, int r); /* lock released; -1: abort (RC_SIGNAL) */
    void *ctx;                 /* the caller's, for `after` */
    const void *arg;           /* a step's argument that is no number (a queue's name) */
    int may_sleep;             /* sleeps when step registers (else RC_SLEEP is returned) */
    int sleep_outside;         /* RC_SLEEP goes back to the caller, who waits elsewhere (asyncio) */
    uint64_t deadline;         /* of the whole call (0: none; DEADLINE_LAZY: not read yet, call_deadline) */
    int64_t timeout_ns;        /* what it was made from (-1: none) */
    int64_t bound_ns;          /* a wait for the lock by a call that may not sleep: at most this (-1: none) */
    uint64_t retry_ns;         /* a sleeper retries this often unwoken */
    uint64_t nap_ns;           /* a blocked put looks again after this (doubling up to retry_ns) */
    int channel;               /* set by a step that registered */
    uint32_t seen;             /* the channel's sequence when it registered */
    int slept;                 /* it has slept at least once */
    int reported;              /* its long sleep was reported (the `after` hook, once per call) */
    uint64_t slept_since;      /* when it first slept (monotonic ns) */
    int skip_arena;            /* the first attempt goes straight to the reserve */
    int drawn;                 /* the first attempt's fault draw was made (lock-free): not again */
    /* Arguments and results of the steps. */
    uint64_t q;
    const int64_t *src;
    int64_t *dst;
    int64_t n, moved, bad;
    uint64_t a, b, out[4];
    uint64_t *snapshot;
};

/* A call's deadline is read from the clock when it first matters: before
 * its first wait (for the lock, a spin, a sleep), or once its first attempt
 * found it must wait. Until then it has run C only, without waiting, and a
 * call that never waits (the common case: a queue that has room, a lock
 * that is free) reads no clock at all. */
#define DEADLINE_LAZY UINT64_MAX
static inline uint64_t call_deadline(struct call *c) {
    if (c->deadline == DEADLINE_LAZY) c->deadline = deadline_in(c->timeout_ns);
    return c->deadline;
}
static inline int call_passed(const struct call *c) { return c->deadline != DEADLINE_LAZY && passed(c->deadline); }

enum { BOUND_CALLER = 0, BOUND_ATOMIC = 1, BOUND_ADMIN = 2 };
int is_allocation(const struct call *c);   /* alloc or alloc_bulk: its sleep counts in the sleep totals */
void note_sleep(struct pool *p, uint64_t ns); /* the one writer of H_LONGEST_SLEEP_NS and H_TOTAL_SLEEP_NS */
void call_init(struct call *c, step_fn step, int bound, int64_t timeout_ns);
int run(struct pool *p, struct call *c);
void leave(struct pool *p);                 /* complete parked frees, release the lock */
int check_header(struct pool *p);
int finish_parked(struct pool *p);

int step_alloc(struct pool *p, struct call *c, int mode);
int step_alloc_preallocated(struct pool *p, struct call *c, int mode);
int step_alloc_bulk(struct pool *p, struct call *c, int mode);
int step_free(struct pool *p, struct call *c, int mode);
int step_free_bulk(struct pool *p, struct call *c, int mode);
int step_adopt(struct pool *p, struct call *c, int mode);
int step_resize(struct pool *p, struct call *c, int mode);
int step_destroy(struct pool *p, struct call *c, int mode);
int step_set_faults(struct pool *p, struct call *c, int mode);
int step_stats(struct pool *p, struct call *c, int mode);
int step_reclaim(struct pool *p, struct call *c, int mode);
int step_drain_cache(struct pool *p, struct call *c, int mode);
int step_detach(struct pool *p, struct call *c, int mode);
int step_leave(struct pool *p, struct call *c, int mode);
int step_resize_grow(struct pool *p, struct call *c, int mode);
int release_slot(struct pool *p, uint64_t idx, uint64_t w, int to_cache);
int park_free(struct pool *p, uint64_t idx, uint64_t gen, uint64_t owner);
int park_bulk(struct pool *p, struct call *c);
int free_fast(struct pool *p, uint64_t idx, uint64_t gen, uint64_t owner);
int format_reserve(struct pool *p, uint64_t min_nr);

/* ------------------------------------------------------------------ */
/* queue.c                                                              */

int step_queue_open(struct pool *p, struct call *c, int mode);
int step_put(struct pool *p, struct call *c, int mode);
int step_get(struct pool *p, struct call *c, int mode);
void queue_spin(struct pool *p, struct call *c, int put);
void queue_warm(struct pool *p, const struct call *c);
int queue_relink(struct pool *p, unsigned char *seen);     /* repair */

/* ------------------------------------------------------------------ */
/* topic.c                                                              */

int step_topic_open(struct pool *p, struct call *c, int mode);
int step_subscribe(struct pool *p, struct call *c, int mode);
int step_unsubscribe(struct pool *p, struct call *c, int mode);
int step_publish(struct pool *p, struct call *c, int mode);
int step_sub_get(struct pool *p, struct call *c, int mode);
int step_release(struct pool *p, struct call *c, int mode);
int step_share(struct pool *p, struct call *c, int mode);
int step_take(struct pool *p, struct call *c, int mode);
int sub_drop(struct pool *p, uint64_t t, uint64_t j, uint64_t *freed);
uint64_t sub_pending(const struct pool *p, uint64_t t, uint64_t j);
int64_t topics_retire(struct pool *p, const unsigned char *v, int dead, int predecessor);
int topic_repair(struct pool *p);
uint64_t published_now(const struct pool *p);

/* ------------------------------------------------------------------ */
/* registry.c                                                           */

int registry_claim(struct pool *p, int fd, int64_t *index);
int step_register(struct pool *p, struct call *c, int mode);
void registry_unclaim(struct pool *p);
int registry_bind(struct pool *p, int fd, int64_t index, uint64_t epoch);
void registry_forget(struct pool *p);
uint64_t entries_used(const struct pool *p);
void note_entry_used(struct pool *p, uint64_t e);
enum { OWNER_ALIVE = 0, OWNER_DEAD = 1, OWNER_PREDECESSOR = 2, OWNER_IMPOSSIBLE = 3 };
unsigned char *dead_owners(struct pool *p); /* a verdict per owner field */
int64_t retire(struct pool *p, const unsigned char *dead);
int64_t retire_dead(struct pool *p, int self); /* dead_owners + retire + uncount_dead_sleepers */

/* ------------------------------------------------------------------ */
/* repair.c, derive.c                                                   */

void repair(struct pool *p);

/* The pool's numbers, as stats() and shmpool-inspect give them. */
struct numbers {
    uint64_t status, flags, min_nr, curr_nr, arena_shared, arena_cached, in_use, queued, parked, nr_waiters;
    uint64_t fail_rate_bits, seed;
    uint64_t low_water, longest_sleep_ns, total_sleep_ns; /* for sizing the reserve */
    uint64_t attached;         /* entries in use whose process lives (with no fd to ask: in use) */
    uint64_t published;        /* SHARED slots (published to a topic; counted in in_use too) */
    uint64_t counters[16]; /* COUNTERS' order: the header's plus every entry's */
};
void derive(const struct pool *p, struct numbers *n);
void held_by(const struct pool *p, uint32_t *counts); /* HELD slots per owner field (a message's numbers) */

#endif
