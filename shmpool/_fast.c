/* shmpool._fast: the pool lock and every transition of the pool, in C.
 *
 * Why all of it is here
 * ---------------------
 * A Python signal handler, the garbage collector (a __del__) or another
 * thread can run between any two bytecodes. If Python code ran while the pool
 * lock is held, a KeyboardInterrupt could abandon a critical section half
 * done, or a __del__ that frees an element could try to take the lock its own
 * process holds. So every critical section is one call of a function in this
 * file that runs no Python code and creates no Python object between taking
 * the lock and releasing it. Python (pool.py) composes these calls: argument
 * checks, errors, views; results are built after the lock is released.
 *
 * The lock
 * --------
 * The header word H_LOCK_OWNER is the lock: 0 when free, else the holder's
 * token (entry + 1) | epoch << 16, stored by compare-and-swap: the same
 * atomic step takes the lock and records who holds it, so a hold is never
 * anonymous. The named semaphore is only where contenders sleep: a
 * contender counts itself in H_LOCK_WAITERS, tries the CAS once more, and
 * sleeps on the semaphore in slices of LOCK_SLICE_NS; a releaser stores 0 and,
 * if it sees a waiter, posts (both sides use sequentially consistent
 * operations, so either the releaser sees the waiter or the waiter's CAS
 * sees the lock free: no lost wake-up).
 *
 * A contender whose slice ran out looks at the owner: the lock is taken over
 * (by CAS from that exact token, so one contender wins) only from an owner
 * proven dead: its registry entry holds another epoch, or nobody holds the
 * OFD lock on the entry's byte of the segment file (the kernel drops it when
 * its process dies, in any pid namespace). A stopped, traced or starved
 * holder is alive and is waited for, however long; waits are bounded by the
 * caller's deadline instead. The winner repairs the pool (repair() below)
 * before anything else.
 *
 * Transitions
 * -----------
 * The kernel's rules, one function per move of a slot, each the only code
 * that makes that move (as add_element/remove_element in mm/mempool.c):
 *   add_element / remove_element   reserve stack push / pop   (RESERVE)
 *   arena_push / arena_pop         shared free list           (ARENA)
 *   cache_pop / cache_push / refill / drain / steal  a process's cache (CACHED)
 *   hand_out                       any free slot -> HELD by us
 *   release_slot                   HELD -> reserve, cache or arena (mempool_free)
 * Every one commits with one aligned 8-byte store (or CAS) of the slot word:
 * the stacks and depths around it are derived from the words, so a process
 * killed at any instruction leaves a pool that repair() makes whole.
 *
 * Lock-free, by design: a process pops and pushes its own cache without the
 * lock (CAS on the slot word, since a thief holding the lock may take a
 * cached slot), draws fault injections (splitmix64 is a counter: fetch_add),
 * and counts sleepers (atomic add), so that giving up a sleep never needs
 * the lock. Everything else happens under the lock.
 *
 * The segment is untrusted: every index, depth and count read from it is
 * bounded before use; a value out of bounds makes the call fail with
 * PoolFormatError and changes nothing further.
 *
 * Threads: every function runs with the GIL held, except the waits, which
 * hold no lock and touch no state; an object closed meanwhile (by another
 * thread or a signal handler) is released only when the last call on it
 * returns (busy count).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <pthread.h>
#include <semaphore.h>
#include <sys/stat.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Must match shmpool/_layout.py: every one is checked at import (LAYOUT). */
#define HEADER_WORDS 64
#define H_FLAGS 12
#define H_STATUS 16
#define H_MIN_NR 17
#define H_CURR_NR 18
#define H_ARENA_FREE 19
#define H_NR_WAITERS 20
#define H_EPOCH 22
#define H_FAIL_RATE 23
#define H_FAIL_THRESHOLD 24
#define H_SEED 25
#define H_RNG 26
#define H_LOCK_OWNER 28
#define H_LOCK_SINCE_NS 29
#define H_LOCK_WAITERS 30
#define H_LOCK_SEQ 31
#define H_ALLOC_FAILED 34
#define H_RECOVERIES 40
#define H_RECLAIMED 41
#define H_ENTRIES_USED 42
#define H_ASYNC_WAITERS 46
#define FLAG_POISON 1
#define STATUS_LIVE 1
#define STATUS_DESTROYED 2
#define ST_ARENA 1
#define ST_RESERVE 2
#define ST_HELD 3
#define ST_CACHED 4
#define ST_QUEUED 5
#define Q_NAME 0
#define QUEUE_NAME_BYTES 48
#define Q_STATE 6
#define Q_DEPTH 7
#define Q_COUNT 8
#define Q_HEAD 9
#define Q_TAIL 10
#define Q_PUTS 11
#define Q_GETS 12
#define Q_WAITERS 13
#define Q_PUTTERS 14
#define QUEUE_WORDS 16
#define QUEUE_LIVE 1
#define NO_SLOT 0xFFFFFFFFu
#define STATE_MASK 0xFFull
#define OWNER_SHIFT 8
#define OWNER_MASK 0xFFFFull
#define GEN_SHIFT 24
#define GEN_MASK ((1ull << 39) - 1)
#define INDEX_MASK 0xFFFFFFull
#define HGEN_SHIFT 24
#define P_PID 0
#define P_START 1
#define P_SLEEPING 2
#define P_CACHE_N 3
#define P_EPOCH 4
#define P_ASYNC 5
#define P_COUNTERS 6
#define N_PROC_COUNTERS 8
#define P_CACHE 14
#define CACHE_MAX 64
#define P_QSLEEP 46
#define MAX_QUEUES 64
#define PROC_WORDS 54
#define CACHE_BLANK 0xFFFFFFFFu
#define C_ALLOC_ARENA 0
#define C_ALLOC_RESERVE 1
#define C_ALLOC_FAILED 2
#define C_FREE_RESERVE 3
#define C_FREE_ARENA 4
#define C_SLEEPS 5
#define C_FAULTS 6
#define C_POISON 7

#define GFP_WAIT 0x10
#define GOLDEN 0x9E3779B97F4A7C15ull
#define CACHE_BATCH (CACHE_MAX / 2)
#define LOCK_SLICE_NS 20000000ull       /* a contender looks at the owner this often */
#define LOCK_SPINS 256                  /* pauses a contender spins before it sleeps */
#define QUEUE_SPIN_NS 50000ull          /* a blocked put or get polls this long before it sleeps */
#define WAKE_MAX 65536                  /* tokens one wake-up may post */
#define SLEEPERS_MAX (1ull << 20)       /* more sleepers than this: a damaged count */
#define POISON_FREE 0x6b
#define POISON_END 0xa5
#define POISON_INUSE 0x5a

/* Results of the locked steps. */
enum { RC_OK = 0, RC_FAIL = 1, RC_SLEEP = 2, RC_DRY = 3, RC_TIMEOUT = -1, RC_SIGNAL = -2, RC_DESTROYED = -3, RC_CORRUPT = -4,
       RC_INVALID = -5, RC_CLOSED = -6 };
/* What alloc_step does when nothing is left: fail (counted), register as a
 * sleeper, or only report it (the caller goes on to sleep through Python). */
enum { MODE_FAIL = 0, MODE_SLEEP = 1, MODE_PROBE = 2, MODE_ASYNC = 3 };
#define FIFO_CACHE 16 /* other processes' FIFOs kept open for writing, by entry: an open costs more than the write */
/* Trace events (pool.EVENTS names them). */
enum { EV_NONE = 0, EV_ALLOC_ARENA, EV_ALLOC_RESERVE, EV_ALLOC_FAILED, EV_SLEEP, EV_FREE_RESERVE, EV_FREE_ARENA };
static const char *EVENT_NAMES[] = {NULL, "alloc-arena", "alloc-reserve", "alloc-failed", "sleep", "free-reserve",
                                    "free-arena"};

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    uint64_t *hdr, *words, *registry, *entry;
    uint32_t *stack, *arena, *cache, *next;
    uint64_t *queues;
    unsigned char *data;
    uint64_t capacity, stride, slot_size, max_procs, off_procs, max_queues;
    uint64_t me;    /* our owner field: entry index + 1 (0 until bound) */
    uint64_t token; /* our lock token */
    int fd;         /* the segment file, for OFD liveness (not owned) */
    sem_t *lock_sem, *wait_sem;
    sem_t *qsem[MAX_QUEUES]; /* each queue's wait channel, opened when first needed */
    char qsem_prefix[300];
    char fifo_prefix[320];    /* path of an entry's asyncio wake-up FIFO, less the entry number ("" until set) */
    struct { uint64_t entry, epoch; int fd1; } fifo_w[FIFO_CACHE]; /* FIFOs open for writing (fd + 1; 0: none) */
    int enabled, poison, busy, closing;
    int wake;                 /* set under the lock: post wake-ups once it is released */
    int woken;                /* the last sleep ended with a token */
    int qwake;                /* likewise for a queue's channel: its index + 1 */
    int recount;              /* a nap ended with no wake-up: uncount dead sleepers next time */
    int64_t poisoned;         /* a slot found written after free (warn after unlock), or -1 */
    uint64_t recoveries;      /* times this object took the lock over from a dead owner */
    int last_event;
    uint64_t last_curr;
    PyObject *trace;          /* trace(event, handle, curr_nr), or NULL */
    PyObject *owner;          /* a weak reference to the Mempool that holds us, whose policy the slow paths call */
    PyObject *data_mv;        /* a memoryview of the slots: views are slices of it (they keep the mapping) */
    PyObject *last_dtype;     /* the dtype argument ndarray() saw last, and its descr */
    PyArray_Descr *last_descr;
    char msg[240];            /* why a call found the pool damaged or a handle invalid */
    char name[256];           /* the pool's name, for messages */
} Core;

static PyObject *ErrFormat, *ErrDestroyed, *ErrInvalid, *ErrClosed, *WarnPoison;
static PyObject *GFP_KERNEL_OBJ, *STR_ALLOC_SLOW, *STR_FREE_SLOW;
static uint64_t atomic_wait_ns = 50000000ull; /* GFP_ATOMIC waits this long for the lock */
static long fast_gfp_bits = 0xF0;             /* gfp bits the C path takes as they are (set_gfp_bits) */
static int crash_point = 0;                   /* test hook: SIGKILL ourselves at this point */
enum { CP_NONE = 0, CP_ALLOC_RESERVE, CP_FREE_RESERVE, CP_RETIRE, CP_STEAL, CP_REFILL, CP_DRAIN, CP_REBUILD,
       CP_QUEUE_PUT, CP_QUEUE_GET, CP_N };
static const char *CRASH_POINTS[] = {"", "alloc-reserve", "free-reserve", "retire", "steal", "refill", "drain", "rebuild",
                                     "queue-put", "queue-get"};
#define CRASH(p) do { if (crash_point == (p)) kill(getpid(), SIGKILL); } while (0)

static inline uint64_t ld(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cas(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t mkword(uint64_t state, uint64_t owner, uint64_t gen) {
    return state | (owner & OWNER_MASK) << OWNER_SHIFT | (gen & GEN_MASK) << GEN_SHIFT;
}
#define W_STATE(w) ((w) & STATE_MASK)
#define W_OWNER(w) (((w) >> OWNER_SHIFT) & OWNER_MASK)
#define W_GEN(w) (((w) >> GEN_SHIFT) & GEN_MASK)
#define ENTRY(f, e) ((f)->registry + (uint64_t)(e) * PROC_WORDS)
#define CACHE_OF(ent) ((uint32_t *)((ent) + P_CACHE))
#define QUEUE(f, q) ((f)->queues + (uint64_t)(q) * QUEUE_WORDS)

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int corrupt(Core *f, const char *fmt, unsigned long long a, unsigned long long b) {
    snprintf(f->msg, sizeof f->msg, fmt, a, b);
    return RC_CORRUPT;
}

/* ------------------------------------------------------------------ */
/* Liveness                                                            */

/* 1 if some open file description holds the OFD lock on entry e's byte
 * (its process lives), 0 if none does. When it cannot tell, alive. */
static int entry_locked(Core *f, uint64_t e) {
    if (f->fd < 0) return 1;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(f->off_procs + 8ull * PROC_WORDS * e);
    fl.l_len = 1;
    if (fcntl(f->fd, F_OFD_GETLK, &fl) < 0) return 1;
    return fl.l_type != F_UNLCK;
}

/* How many registry entries scans must look at: one past the highest entry
 * ever taken (a hint kept in the header, so that a pool used by a few
 * processes is not scanned 256 entries deep on its reserve path). */
static inline uint64_t entries_used(Core *f) {
    uint64_t n = ld(&f->hdr[H_ENTRIES_USED]);
    return n < f->max_procs ? n : f->max_procs;
}

static void note_entry_used(Core *f, uint64_t e) {
    uint64_t seen = ld(&f->hdr[H_ENTRIES_USED]);
    while (seen < e + 1 && !__atomic_compare_exchange_n(&f->hdr[H_ENTRIES_USED], &seen, e + 1, 0, __ATOMIC_SEQ_CST,
                                                       __ATOMIC_SEQ_CST))
        ;
}

/* Whether the entry behind owner field o (entry + 1) is a live process. */
static int owner_alive(Core *f, uint64_t o) {
    if (o == 0 || o > f->max_procs) return 0;
    if (o == f->me) return 1;
    if (ld(&ENTRY(f, o - 1)[P_EPOCH]) == 0) return 0;
    return entry_locked(f, o - 1);
}

/* Whether the lock token tok names a live holder. */
static int token_alive(Core *f, uint64_t tok) {
    uint64_t o = tok & OWNER_MASK, epoch = tok >> 16;
    if (o == 0 || o > f->max_procs || epoch == 0) return 0;
    if (tok == f->token) return 1;
    if (ld(&ENTRY(f, o - 1)[P_EPOCH]) != epoch) return 0;
    return o == f->me || entry_locked(f, o - 1);
}

/* ------------------------------------------------------------------ */
/* The lock                                                            */

static void repair(Core *f);

static inline void note_locked(Core *f) {
    st(&f->hdr[H_LOCK_SINCE_NS], now_ns());
    f->hdr[H_LOCK_SEQ]++;
}

static inline int lock_try(Core *f) {
    uint64_t free_ = 0;
    if (!__atomic_compare_exchange_n(&f->hdr[H_LOCK_OWNER], &free_, f->token, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return 0;
    note_locked(f);
    return 1;
}

static void lock_release(Core *f) {
    __atomic_store_n(&f->hdr[H_LOCK_OWNER], 0, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&f->hdr[H_LOCK_WAITERS], __ATOMIC_SEQ_CST) != 0 && f->lock_sem != NULL) {
        int value = 0;
        if (sem_getvalue(f->lock_sem, &value) == 0 && value <= 0) sem_post(f->lock_sem);
    }
}

/* Sleep on sem until a post or until the monotonic time `until`, the GIL
 * released. 1 if a post was taken. */
static int sem_nap(sem_t *sem, uint64_t until) {
    uint64_t now = now_ns();
    if (until <= now) return sem != NULL && sem_trywait(sem) == 0;
    uint64_t wait = until - now;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    if (sem != NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + wait % 1000000000ull;
        ts.tv_sec += (time_t)(wait / 1000000000ull + ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        got = sem_timedwait(sem, &ts) == 0;
    } else {
        struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
    Py_END_ALLOW_THREADS
    return got;
}

/* Take the pool lock by `deadline` (monotonic ns; 0: no deadline). Between
 * naps (the lock not held) Python signal handlers run: an exception from one
 * ends the wait (RC_SIGNAL). RC_CLOSED if the object was closed meanwhile. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int lock_acquire(Core *f, uint64_t deadline) {
    if (lock_try(f)) return RC_OK;
    /* Critical sections last about a hundred nanoseconds: spin a little on a
     * plain load before paying two system calls to sleep and be woken. */
    for (int i = 0; i < LOCK_SPINS; i++) {
        cpu_relax();
        if (__atomic_load_n(&f->hdr[H_LOCK_OWNER], __ATOMIC_RELAXED) == 0 && lock_try(f)) return RC_OK;
    }
    for (;;) {
        __atomic_add_fetch(&f->hdr[H_LOCK_WAITERS], 1, __ATOMIC_SEQ_CST);
        int got = lock_try(f);
        int posted = 0;
        if (!got) {
            uint64_t until = now_ns() + LOCK_SLICE_NS;
            if (deadline && deadline < until) until = deadline;
            posted = sem_nap(f->lock_sem, until);
        }
        __atomic_sub_fetch(&f->hdr[H_LOCK_WAITERS], 1, __ATOMIC_SEQ_CST);
        if (f->closing) {
            if (got) lock_release(f);
            return RC_CLOSED;
        }
        if (got || lock_try(f)) return RC_OK;
        if (PyErr_CheckSignals() < 0) return RC_SIGNAL;
        if (!posted) {
            uint64_t tok = __atomic_load_n(&f->hdr[H_LOCK_OWNER], __ATOMIC_SEQ_CST);
            if (tok != 0 && !token_alive(f, tok)) {
                uint64_t expected = tok;
                if (__atomic_compare_exchange_n(&f->hdr[H_LOCK_OWNER], &expected, f->token, 0, __ATOMIC_SEQ_CST,
                                                __ATOMIC_RELAXED)) {
                    note_locked(f);
                    f->hdr[H_RECOVERIES]++;
                    f->recoveries++;
                    repair(f);
                    return RC_OK;
                }
            }
        }
        if (deadline && now_ns() >= deadline) return RC_TIMEOUT;
    }
}

/* ------------------------------------------------------------------ */
/* Waking sleepers                                                     */

/* Uncount the sleepers of dead entries (lock held). Sleepers count
 * themselves in and out with atomic adds, in nr_waiters and in their entry,
 * so the dead ones' counts are subtracted, not the total recomputed: a live
 * sleeper leaving meanwhile is never lost. A count beyond any possible
 * number (damage) is replaced by the live total. */
/* Take an entry's sleepers out of nr_waiters (a dead entry's). */
static void drop_sleepers(Core *f, uint64_t *ent) {
    uint64_t a = __atomic_exchange_n(&ent[P_ASYNC], 0, __ATOMIC_SEQ_CST);
    if (a && a <= SLEEPERS_MAX) __atomic_sub_fetch(&f->hdr[H_ASYNC_WAITERS], a, __ATOMIC_SEQ_CST);
    uint64_t n = __atomic_exchange_n(&ent[P_SLEEPING], 0, __ATOMIC_SEQ_CST);
    if (n && n <= SLEEPERS_MAX) __atomic_sub_fetch(&f->hdr[H_NR_WAITERS], n, __ATOMIC_SEQ_CST);
    uint8_t *qs = (uint8_t *)(ent + P_QSLEEP);
    for (uint64_t q = 0; q < MAX_QUEUES; q++) {
        uint8_t k = __atomic_exchange_n(&qs[q], 0, __ATOMIC_SEQ_CST);
        if (k && q < f->max_queues) __atomic_sub_fetch(&QUEUE(f, q)[Q_WAITERS], k, __ATOMIC_SEQ_CST);
    }
}

static void uncount_dead_sleepers(Core *f) {
    uint64_t live = 0, live_async = 0;
    for (uint64_t e = 0, used = entries_used(f); e < used; e++) {
        uint64_t *ent = ENTRY(f, e);
        uint64_t n = ld(&ent[P_SLEEPING]), a = ld(&ent[P_ASYNC]), qs = 0;
        for (int w = 0; w < MAX_QUEUES / 8; w++) qs |= ld(&ent[P_QSLEEP + w]);
        if (!n && !a && !qs) continue;
        if (n <= SLEEPERS_MAX && a <= n && owner_alive(f, e + 1)) {
            live += n;
            live_async += a;
            continue;
        }
        drop_sleepers(f, ent);
    }
    if (ld(&f->hdr[H_ASYNC_WAITERS]) > SLEEPERS_MAX) st(&f->hdr[H_ASYNC_WAITERS], live_async);
    /* Only an impossible count is replaced: a count below the live total is
     * what a sleeper leaving right now looks like (its entry is uncounted
     * before nr_waiters), and must be left alone. */
    if (ld(&f->hdr[H_NR_WAITERS]) > SLEEPERS_MAX) st(&f->hdr[H_NR_WAITERS], live);
}

/* Wait channels. Channel 0 is the pool's (sleeping allocations: the
 * reserve refilled); channel q + 1 is queue q's (a blocked put or get: the
 * queue changed). Each is a named semaphore whose posts are "retry" tokens
 * addressed to nobody, a count of its sleepers, and per registry entry how
 * many of that process's threads sleep on it (so that a dead sleeper can be
 * uncounted). Separate channels mean a token is only ever taken by a sleeper
 * waiting for what the waker changed. */
static uint64_t *waiters_of(Core *f, int ch) {
    return ch == 0 ? &f->hdr[H_NR_WAITERS] : &QUEUE(f, ch - 1)[Q_WAITERS];
}

static sem_t *sem_of(Core *f, int ch) {
    if (ch == 0) return f->wait_sem;
    if (f->qsem[ch - 1] == NULL) {
        char nm[340];
        snprintf(nm, sizeof nm, "%s%d", f->qsem_prefix, ch - 1);
        sem_t *sem = sem_open(nm, 0);
        if (sem != SEM_FAILED) f->qsem[ch - 1] = sem;
    }
    return f->qsem[ch - 1];
}

/* This entry's count of its threads asleep on channel ch. */
static inline void entry_sleepers_add(Core *f, int ch, int64_t d) {
    if (!f->entry) return;
    if (ch == 0) __atomic_add_fetch(&f->entry[P_SLEEPING], (uint64_t)d, __ATOMIC_SEQ_CST);
    else __atomic_add_fetch((uint8_t *)(f->entry + P_QSLEEP) + (ch - 1), (uint8_t)d, __ATOMIC_SEQ_CST);
}

/* Count a sleeper in (d = 1, lock held) or out (d = -1, lock-free): the
 * channel's count is never below the sum of the entries' counts (in: it
 * first; out: it last). */
static void sleeper_add_ch(Core *f, int ch, int64_t d) {
    uint64_t *w = waiters_of(f, ch);
    if (d > 0) __atomic_add_fetch(w, (uint64_t)d, __ATOMIC_SEQ_CST);
    entry_sleepers_add(f, ch, d);
    if (d < 0) __atomic_add_fetch(w, (uint64_t)d, __ATOMIC_SEQ_CST);
}

static void sleeper_add(Core *f, int64_t d) { sleeper_add_ch(f, 0, d); }

/* Count an asyncio waiter in (d = 1, lock held) or out (d = -1,
 * lock-free): a sleeper on channel 0 that waits on its process's FIFO
 * rather than the semaphore. It is counted as a sleeper too (inspect, the
 * dead-sleeper rules and stats see it as one), and as async, so that no
 * token is posted for it: sleepers on the semaphore are the counts less the
 * async ones, which the order below only ever overestimates. */
static void async_only_add(Core *f, int64_t d) {
    if (d > 0) __atomic_add_fetch(&f->hdr[H_ASYNC_WAITERS], (uint64_t)d, __ATOMIC_SEQ_CST);
    if (f->entry) __atomic_add_fetch(&f->entry[P_ASYNC], (uint64_t)d, __ATOMIC_SEQ_CST);
    if (d < 0) __atomic_add_fetch(&f->hdr[H_ASYNC_WAITERS], (uint64_t)d, __ATOMIC_SEQ_CST);
}

static void async_add(Core *f, int64_t d) {
    if (d > 0) sleeper_add(f, d); /* in: the sleeper first */
    async_only_add(f, d);
    if (d < 0) sleeper_add(f, d); /* out: the sleeper last */
}

/* Sleepers on channel ch's semaphore: for channel 0, less the async ones. */
static uint64_t sem_sleepers(Core *f, int ch) {
    uint64_t n = ld(waiters_of(f, ch));
    if (ch != 0) return n;
    uint64_t a = ld(&f->hdr[H_ASYNC_WAITERS]);
    return n > a ? n - a : 0;
}

/* Wake every process with asyncio waiters: a byte into each one's FIFO
 * (after the lock is released; a process that is not listening, or gone,
 * is skipped: its waiters retry on their own within SLEEP_RETRY). */
static void poke_async(Core *f) {
    if (!f->fifo_prefix[0] || !ld(&f->hdr[H_ASYNC_WAITERS])) return;
    /* Writing to a FIFO whose reader left raises SIGPIPE, which a program
     * may not ignore: blocked here, and ours taken back. */
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    for (uint64_t e = 0, used = entries_used(f); e < used; e++) {
        uint64_t *ent = ENTRY(f, e);
        uint64_t a = ld(&ent[P_ASYNC]), epoch = ld(&ent[P_EPOCH]);
        if (!a || a > SLEEPERS_MAX) continue;
        /* An entry's FIFO is its process's: kept open while the entry's
         * epoch (its process) stays the same. */
        __typeof__(f->fifo_w[0]) *c = &f->fifo_w[e % FIFO_CACHE];
        if (c->fd1 && (c->entry != e || c->epoch != epoch)) {
            close(c->fd1 - 1);
            c->fd1 = 0;
        }
        if (!c->fd1) {
            char path[340];
            snprintf(path, sizeof path, "%s%llu", f->fifo_prefix, (unsigned long long)e);
            int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW); /* ENXIO: nobody listens */
            struct stat sb;
            if (fd >= 0 && (fstat(fd, &sb) != 0 || !S_ISFIFO(sb.st_mode))) {
                close(fd);
                fd = -1;
            }
            if (fd < 0) continue;
            c->fd1 = fd + 1;
            c->entry = e;
            c->epoch = epoch;
        }
        if (write(c->fd1 - 1, "w", 1) < 0 && errno != EAGAIN) { /* EAGAIN: full, so readable already */
            if (errno == EPIPE) {
                struct timespec zero = {0, 0};
                sigtimedwait(&pipe_set, NULL, &zero); /* ours: the reader left */
            }
            close(c->fd1 - 1);
            c->fd1 = 0;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* wake_up(&wait), called after the lock is released: a token for every
 * sleeper on the channel, never more than the registry counts (a damaged
 * count cannot flood the channel). */
static void wake_ch(Core *f, int ch) {
    if (ch == 0) poke_async(f);
    sem_t *sem = sem_of(f, ch);
    uint64_t n = sem_sleepers(f, ch);
    if (sem == NULL || n == 0) return;
    uint64_t counted = 0;
    for (uint64_t e = 0, used = entries_used(f); e < used && counted < n; e++) {
        uint64_t *ent = ENTRY(f, e);
        uint64_t k;
        if (ch == 0) {
            uint64_t all = ld(&ent[P_SLEEPING]), a = ld(&ent[P_ASYNC]);
            k = all > a ? all - a : 0;
        } else {
            k = __atomic_load_n((uint8_t *)(ent + P_QSLEEP) + (ch - 1), __ATOMIC_ACQUIRE);
        }
        counted += k < SLEEPERS_MAX ? k : SLEEPERS_MAX;
    }
    if (n > counted) n = counted;
    if (n > WAKE_MAX) n = WAKE_MAX;
    int value = 0;
    if (sem_getvalue(sem, &value) != 0) return;
    for (int64_t i = value; i < (int64_t)n; i++) sem_post(sem);
}

static void wake_all(Core *f) {
    f->wake = 0;
    wake_ch(f, 0);
}

/* Take back tokens beyond the number of sleepers (finish_wait). */
static void drain_tokens_ch(Core *f, int ch) {
    sem_t *sem = sem_of(f, ch);
    if (sem == NULL) return;
    int value = 0;
    for (int i = 0; i < WAKE_MAX; i++) {
        if (sem_getvalue(sem, &value) != 0 || (uint64_t)value <= sem_sleepers(f, ch)) break;
        if (sem_trywait(sem) != 0) break;
    }
}

static void drain_tokens(Core *f) { drain_tokens_ch(f, 0); }

/* ------------------------------------------------------------------ */
/* Fault injection (lock-free)                                         */

static inline int fault(Core *f) {
    uint64_t thr = ld(&f->hdr[H_FAIL_THRESHOLD]);
    if (!thr) return 0;
    uint64_t z = __atomic_add_fetch(&f->hdr[H_RNG], GOLDEN, __ATOMIC_RELAXED);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    if ((z >> 11) < thr) {
        if (f->entry) f->entry[P_COUNTERS + C_FAULTS]++;
        return 1;
    }
    return 0;
}

static inline void count(Core *f, int c, uint64_t n) {
    if (f->entry) f->entry[P_COUNTERS + c] += n;
}

/* ------------------------------------------------------------------ */
/* The reserve: the only code that touches the stack                  */

static void poison_fill(Core *f, uint64_t idx) {
    unsigned char *p = f->data + idx * f->stride;
    memset(p, POISON_FREE, f->slot_size - 1);
    p[f->slot_size - 1] = POISON_END;
}

/* The kernel's check_element: the pattern must be whole; then POISON_INUSE. */
static void poison_check(Core *f, uint64_t idx) {
    unsigned char *p = f->data + idx * f->stride;
    uint64_t n = f->slot_size;
    for (uint64_t i = 0; i < n; i++) {
        if (p[i] != (i + 1 < n ? POISON_FREE : POISON_END)) {
            count(f, C_POISON, 1);
            f->poisoned = (int64_t)idx;
            break;
        }
    }
    memset(p, POISON_INUSE, n);
}

/* Push slot idx, whose word the caller has just made RESERVE, onto the
 * reserve. The caller checked that curr_nr < min_nr <= capacity. */
static void add_element(Core *f, uint64_t idx) {
    if (f->poison) poison_fill(f, idx);
    uint64_t n = f->hdr[H_CURR_NR];
    f->stack[n] = (uint32_t)idx;
    st(&f->hdr[H_CURR_NR], n + 1);
}

/* Pop the top of the reserve (curr_nr > 0): its index, or RC_CORRUPT. The
 * slot word still says RESERVE: the caller hands it out or frees it. */
static int remove_element(Core *f, uint64_t *out) {
    uint64_t n = f->hdr[H_CURR_NR];
    if (n == 0 || n > f->capacity) return corrupt(f, "curr_nr %llu is beyond the capacity %llu", n, f->capacity);
    uint64_t idx = f->stack[n - 1];
    if (idx >= f->capacity || W_STATE(f->words[idx]) != ST_RESERVE)
        return corrupt(f, "reserve stack entry %llu names slot %llu, which is not in the reserve", n - 1, idx);
    st(&f->hdr[H_CURR_NR], n - 1);
    if (f->poison) poison_check(f, idx);
    *out = idx;
    return RC_OK;
}

/* The header's own bounds, checked before any transition. */
static int check_header(Core *f) {
    uint64_t *h = f->hdr;
    uint64_t min_nr = h[H_MIN_NR], curr = h[H_CURR_NR], shared = h[H_ARENA_FREE];
    if (min_nr < 1 || min_nr > f->capacity)
        return corrupt(f, "min_nr %llu is outside 1..capacity (%llu)", min_nr, f->capacity);
    if (curr > min_nr) return corrupt(f, "curr_nr %llu exceeds min_nr %llu", curr, min_nr);
    if (shared > f->capacity || curr + shared > f->capacity)
        return corrupt(f, "arena_free %llu is beyond the capacity %llu", shared, f->capacity);
    if (h[H_NR_WAITERS] > SLEEPERS_MAX) uncount_dead_sleepers(f); /* damage: recount */
    if (f->entry && f->entry[P_CACHE_N] > CACHE_MAX)
        return corrupt(f, "this process's cache count %llu exceeds its size %llu", f->entry[P_CACHE_N], CACHE_MAX);
    if (h[H_STATUS] != STATUS_LIVE) return RC_DESTROYED;
    return RC_OK;
}

/* ------------------------------------------------------------------ */
/* The arena: the shared free list and the per-process caches          */

static int arena_push(Core *f, uint64_t idx) {
    uint64_t n = f->hdr[H_ARENA_FREE];
    if (n >= f->capacity) return corrupt(f, "arena_free %llu is beyond the capacity %llu", n, f->capacity);
    f->arena[n] = (uint32_t)idx;
    st(&f->hdr[H_ARENA_FREE], n + 1);
    return RC_OK;
}

/* Pop the shared free list: a slot whose word says ARENA, or RC_FAIL. */
static int arena_pop(Core *f, uint64_t *out) {
    uint64_t n = f->hdr[H_ARENA_FREE];
    if (n == 0) return RC_FAIL;
    if (n > f->capacity) return corrupt(f, "arena_free %llu is beyond the capacity %llu", n, f->capacity);
    uint64_t idx = f->arena[n - 1];
    if (idx >= f->capacity || W_STATE(f->words[idx]) != ST_ARENA)
        return corrupt(f, "arena free list entry %llu names slot %llu, not a free one", n - 1, idx);
    st(&f->hdr[H_ARENA_FREE], n - 1);
    *out = idx;
    return RC_OK;
}

/* Mark slot idx HELD by us under a new generation; its handle. The caller
 * owns the slot's current state (ARENA or RESERVE under the lock, or CACHED
 * by us: then by CAS, see cache_pop). This store commits an allocation. */
static inline uint64_t hand_out(Core *f, uint64_t idx) {
    uint64_t gen = (W_GEN(f->words[idx]) + 1) & GEN_MASK;
    st(&f->words[idx], mkword(ST_HELD, f->me, gen));
    return idx | gen << HGEN_SHIFT;
}

/* Pop our cache's top and hand it out (lock-free): 1 with *handle, 0 if the
 * cache holds no slot of ours (entries taken by thieves are dropped). */
static int cache_pop(Core *f, uint64_t *handle) {
    uint64_t *ent = f->entry;
    uint64_t n = ent[P_CACHE_N];
    if (n > CACHE_MAX) n = CACHE_MAX;
    while (n > 0) {
        n--;
        uint64_t idx = __atomic_load_n(&f->cache[n], __ATOMIC_ACQUIRE);
        st(&ent[P_CACHE_N], n);
        if (idx >= f->capacity) continue; /* blank, or damaged: dropped */
        uint64_t w = ld(&f->words[idx]);
        if (W_STATE(w) != ST_CACHED || W_OWNER(w) != f->me) continue; /* taken by a thief */
        uint64_t gen = (W_GEN(w) + 1) & GEN_MASK;
        if (cas(&f->words[idx], w, mkword(ST_HELD, f->me, gen))) {
            *handle = idx | gen << HGEN_SHIFT;
            return 1;
        }
    }
    return 0;
}

/* Move all but the top `keep` entries of our cache (its bottom) onto the
 * shared free list (lock held). Our cache is the arena's top: this keeps the
 * allocation order of the single locked stack. */
static int drain(Core *f, uint64_t keep) {
    if (!f->entry) return RC_OK;
    uint64_t *ent = f->entry;
    uint64_t n = ent[P_CACHE_N];
    if (n > CACHE_MAX) return corrupt(f, "this process's cache count %llu exceeds its size %llu", n, CACHE_MAX);
    uint64_t move = n > keep ? n - keep : 0;
    for (uint64_t i = 0; i < move; i++) {
        uint64_t idx = __atomic_load_n(&f->cache[i], __ATOMIC_ACQUIRE);
        if (idx >= f->capacity) continue;
        uint64_t w = ld(&f->words[idx]);
        if (W_STATE(w) != ST_CACHED || W_OWNER(w) != f->me) continue;
        if (f->hdr[H_ARENA_FREE] >= f->capacity)
            return corrupt(f, "arena_free %llu is beyond the capacity %llu", f->hdr[H_ARENA_FREE], f->capacity);
        if (cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)))) {
            CRASH(CP_DRAIN);
            arena_push(f, idx);
        }
    }
    memmove(f->cache, f->cache + move, (n - move) * sizeof(uint32_t));
    st(&ent[P_CACHE_N], n - move);
    return RC_OK;
}

/* Move up to k slots from the top of the shared free list onto our cache,
 * in order (lock held). How many moved, or RC_CORRUPT. */
static int refill(Core *f, uint64_t k, uint64_t *moved) {
    uint64_t *ent = f->entry;
    uint64_t n = ent[P_CACHE_N], shared = f->hdr[H_ARENA_FREE];
    if (n > CACHE_MAX) return corrupt(f, "this process's cache count %llu exceeds its size %llu", n, CACHE_MAX);
    if (shared > f->capacity) return corrupt(f, "arena_free %llu is beyond the capacity %llu", shared, f->capacity);
    uint64_t take = CACHE_MAX - n;
    if (take > k) take = k;
    if (take > shared) take = shared;
    uint64_t first = shared - take;
    for (uint64_t i = 0; i < take; i++) { /* all checked before anything moves */
        uint64_t idx = f->arena[first + i];
        if (idx >= f->capacity || W_STATE(f->words[idx]) != ST_ARENA)
            return corrupt(f, "arena free list entry %llu names slot %llu, not a free one", first + i, idx);
    }
    for (uint64_t i = 0; i < take; i++) {
        uint64_t idx = f->arena[first + i];
        __atomic_store_n(&f->cache[n + i], (uint32_t)idx, __ATOMIC_RELEASE);
        st(&f->words[idx], mkword(ST_CACHED, f->me, W_GEN(f->words[idx])));
        CRASH(CP_REFILL);
    }
    st(&ent[P_CACHE_N], n + take);
    st(&f->hdr[H_ARENA_FREE], first);
    *moved = take;
    return RC_OK;
}

/* Take every slot cached by another process onto the shared free list
 * (lock held), so that free slots are never stranded in an idle process's
 * cache. How many moved. */
static int steal(Core *f, uint64_t *taken) {
    *taken = 0;
    for (uint64_t e = 0, used = entries_used(f); e < used; e++) {
        if (e + 1 == f->me) continue;
        uint64_t *ent = ENTRY(f, e);
        if (ld(&ent[P_EPOCH]) == 0) continue;
        uint64_t n = ld(&ent[P_CACHE_N]);
        if (n > CACHE_MAX) n = CACHE_MAX;
        uint32_t *cache = CACHE_OF(ent);
        for (uint64_t i = 0; i < n; i++) {
            uint32_t idx = __atomic_load_n(&cache[i], __ATOMIC_ACQUIRE);
            if (idx >= f->capacity) continue;
            uint64_t w = ld(&f->words[idx]);
            if (W_STATE(w) != ST_CACHED || W_OWNER(w) != e + 1) continue;
            if (f->hdr[H_ARENA_FREE] >= f->capacity)
                return corrupt(f, "arena_free %llu is beyond the capacity %llu", f->hdr[H_ARENA_FREE], f->capacity);
            if (cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)))) {
                CRASH(CP_STEAL);
                arena_push(f, idx);
                uint32_t expected = idx; /* blank the entry, unless its owner reused it */
                __atomic_compare_exchange_n(&cache[i], &expected, CACHE_BLANK, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
                (*taken)++;
            }
        }
    }
    return RC_OK;
}

/* How many slots entry e's cache really holds: entries naming a slot
 * CACHED by e (counted from the words, never from a counter). */
static uint64_t cached_by(Core *f, uint64_t e) {
    uint64_t *ent = ENTRY(f, e), total = 0;
    uint64_t n = ld(&ent[P_CACHE_N]);
    if (n > CACHE_MAX) n = CACHE_MAX;
    uint32_t *cache = CACHE_OF(ent);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t idx = __atomic_load_n(&cache[i], __ATOMIC_ACQUIRE);
        if (idx >= f->capacity) continue;
        uint64_t w = ld(&f->words[idx]);
        total += W_STATE(w) == ST_CACHED && W_OWNER(w) == e + 1;
    }
    return total;
}

/* The kernel's first try: the backing allocator (lock held). A slot is
 * taken from our cache (refilled from the shared list), else the shared
 * list; when both are dry, other processes' caches are stolen from first. A
 * fault draw happens only when the arena could serve. With `to` ST_HELD the
 * slot is handed out (*handle); with ST_RESERVE it is added to the reserve.
 * RC_OK, RC_FAIL (a fault), RC_DRY (nothing free) or RC_CORRUPT. */
static int arena_take(Core *f, int inject, int to, uint64_t *handle) {
    int use_cache = f->enabled && f->entry;
    uint64_t taken;
    int r;
    if ((!use_cache || f->entry[P_CACHE_N] == 0) && f->hdr[H_ARENA_FREE] == 0) {
        if ((r = steal(f, &taken)) != RC_OK) return r;
        if (!taken) return RC_DRY; /* dry: no draw */
    }
    if (inject && fault(f)) return RC_FAIL;
    if (use_cache && to == ST_HELD) {
        for (;;) {
            if (cache_pop(f, handle)) {
                count(f, C_ALLOC_ARENA, 1);
                return RC_OK;
            }
            uint64_t moved;
            if ((r = refill(f, CACHE_BATCH, &moved)) != RC_OK) return r;
            if (moved) continue;
            if ((r = steal(f, &taken)) != RC_OK) return r; /* our cache held only stale entries */
            if (!taken) return RC_DRY;
        }
    }
    if (use_cache && (r = drain(f, 0)) != RC_OK) return r; /* our cache is the arena's top: keep the order */
    uint64_t idx;
    if ((r = arena_pop(f, &idx)) != RC_OK) return r == RC_FAIL ? RC_DRY : r;
    if (to == ST_HELD) {
        *handle = hand_out(f, idx);
        count(f, C_ALLOC_ARENA, 1);
    } else {
        st(&f->words[idx], mkword(ST_RESERVE, 0, W_GEN(f->words[idx])));
        add_element(f, idx);
    }
    return RC_OK;
}

/* ------------------------------------------------------------------ */
/* mempool_alloc and mempool_free, one locked step each                */

/* One attempt (lock held): the arena (unless skip_arena), then the reserve's
 * top. With nothing: RC_SLEEP after registering as a sleeper (when
 * `sleeps`: checked and registered in one critical section, so no wake-up
 * is lost), else RC_FAIL. */
static int alloc_step(Core *f, int skip_arena, int mode, uint64_t *handle) {
    int r = check_header(f);
    if (r != RC_OK) return r;
    if (!skip_arena) {
        r = arena_take(f, 1, ST_HELD, handle);
        if (r == RC_OK) {
            f->last_event = EV_ALLOC_ARENA;
            return RC_OK;
        }
        if (r != RC_FAIL && r != RC_DRY) return r;
    }
    if (f->hdr[H_CURR_NR] > 0) {
        uint64_t idx;
        r = remove_element(f, &idx);
        if (r != RC_OK) return r;
        CRASH(CP_ALLOC_RESERVE);
        *handle = hand_out(f, idx);
        count(f, C_ALLOC_RESERVE, 1);
        f->last_event = EV_ALLOC_RESERVE;
        return RC_OK;
    }
    if (mode == MODE_SLEEP || mode == MODE_ASYNC) {
        if (mode == MODE_ASYNC) async_add(f, 1);
        else sleeper_add(f, 1);
        count(f, C_SLEEPS, 1);
        f->last_event = EV_SLEEP;
        return RC_SLEEP;
    }
    if (mode == MODE_PROBE) return RC_FAIL;
    count(f, C_ALLOC_FAILED, 1);
    f->last_event = EV_ALLOC_FAILED;
    return RC_FAIL;
}

/* mempool_free of HELD slot idx whose word was w (lock held): refill the
 * reserve if it is below min_nr (and wake the sleepers), else give the
 * element to the arena, through our cache when `to_cache`. The word moves by
 * CAS (the hot path frees without the lock): RC_INVALID if it lost. */
static int release_slot(Core *f, uint64_t idx, uint64_t w, int to_cache) {
    uint64_t *h = f->hdr;
    if (h[H_CURR_NR] < h[H_MIN_NR]) {
        if (!cas(&f->words[idx], w, mkword(ST_RESERVE, 0, W_GEN(w)))) return RC_INVALID;
        CRASH(CP_FREE_RESERVE);
        add_element(f, idx);
        count(f, C_FREE_RESERVE, 1);
        f->wake = 1;
        f->last_event = EV_FREE_RESERVE;
        return RC_OK;
    }
    if (to_cache && f->enabled && f->entry) {
        if (f->entry[P_CACHE_N] >= CACHE_MAX) {
            int r = drain(f, CACHE_MAX - CACHE_BATCH);
            if (r != RC_OK) return r;
        }
        uint64_t n = f->entry[P_CACHE_N];
        if (!cas(&f->words[idx], w, mkword(ST_CACHED, f->me, W_GEN(w)))) return RC_INVALID;
        __atomic_store_n(&f->cache[n], (uint32_t)idx, __ATOMIC_RELEASE);
        st(&f->entry[P_CACHE_N], n + 1);
    } else {
        if (h[H_ARENA_FREE] >= f->capacity)
            return corrupt(f, "arena_free %llu is beyond the capacity %llu", h[H_ARENA_FREE], f->capacity);
        if (!cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)))) return RC_INVALID;
        arena_push(f, idx);
    }
    count(f, C_FREE_ARENA, 1);
    f->last_event = EV_FREE_ARENA;
    return RC_OK;
}

/* Why handle (slot idx, generation gen) is not a held element: into f->msg. */
static void describe(Core *f, uint64_t w, uint64_t gen) {
    static const char *where[] = {"in no valid state", "in the arena", "in the reserve", "held",
                                  "in the arena (a process's cache)", "in a queue"};
    uint64_t s = W_STATE(w);
    if (s == ST_HELD)
        snprintf(f->msg, sizeof f->msg,
                 "stale, or another pool's: its slot is held under generation %llu, not %llu (freed and handed out "
                 "again since)", (unsigned long long)W_GEN(w), (unsigned long long)gen);
    else
        snprintf(f->msg, sizeof f->msg, "its slot is %s (freed already, or never allocated, or another pool's handle)",
                 where[s <= 5 ? s : 0]);
}

/* ------------------------------------------------------------------ */
/* Dead processes: retire, reclaim, register                           */

/* Take back everything of the dead entries marked in dead[] (indexed by
 * owner field): held elements through the free path, cached slots to the
 * arena; then vacate each entry, its epoch cleared last (the commit). Every
 * step is a whole slot word, so a retire cut short is finished by the next
 * one. Returns how many held elements came back, or RC_CORRUPT. */
static int64_t retire(Core *f, const unsigned char *dead) {
    int64_t taken = 0;
    for (uint64_t idx = 0; idx < f->capacity; idx++) {
        uint64_t w = ld(&f->words[idx]);
        uint64_t s = W_STATE(w), o = W_OWNER(w);
        if ((s != ST_HELD && s != ST_CACHED) || o > f->max_procs || !dead[o]) continue;
        if (s == ST_HELD) {
            int r = release_slot(f, idx, w, 0);
            if (r == RC_CORRUPT) return r;
            taken += r == RC_OK;
        } else {
            if (f->hdr[H_ARENA_FREE] >= f->capacity)
                return corrupt(f, "arena_free %llu is beyond the capacity %llu", f->hdr[H_ARENA_FREE], f->capacity);
            if (cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)))) arena_push(f, idx);
        }
        CRASH(CP_RETIRE);
    }
    for (uint64_t o = 1; o <= f->max_procs; o++) {
        if (dead[o] != 1) continue;
        uint64_t *ent = ENTRY(f, o - 1);
        uint64_t epoch = ld(&ent[P_EPOCH]);
        if (epoch == 0 || entry_locked(f, o - 1)) continue; /* vacant, or claimed by a newcomer meanwhile */
        st(&ent[P_CACHE_N], 0);
        drop_sleepers(f, ent);
        cas(&ent[P_EPOCH], epoch, 0); /* last, and only if nobody claimed it: the commit */
    }
    f->hdr[H_RECLAIMED] += (uint64_t)taken;
    return taken;
}

/* The owner fields of dead holders: vacant or dead entries, and any field
 * beyond the registry (damage). Caller frees. NULL: no memory. */
static unsigned char *dead_owners(Core *f, int *any) {
    unsigned char *dead = calloc(OWNER_MASK + 1, 1);
    if (!dead) return NULL;
    *any = 0;
    dead[0] = 1; /* a held or cached slot with no owner: an orphan */
    for (uint64_t o = 1; o <= OWNER_MASK; o++) {
        if (o == f->me) continue;
        if (o > f->max_procs || !owner_alive(f, o)) {
            dead[o] = 1;
            if (o <= f->max_procs && ld(&ENTRY(f, o - 1)[P_EPOCH]) != 0) *any = 1;
        }
    }
    return dead;
}

/* ------------------------------------------------------------------ */
/* Repair: make the stacks and depths agree with the slot words        */

/* Keep the entries of list[0:depth] whose slot is in state `s` (each once,
 * in order), then append the other slots in that state; return the depth. */
static uint64_t rebuild_list(Core *f, uint32_t *list, uint64_t depth, uint64_t s, unsigned char *seen) {
    uint64_t cap = f->capacity, j = 0;
    if (depth > cap) depth = cap;
    memset(seen, 0, cap);
    for (uint64_t i = 0; i < depth; i++) {
        uint64_t idx = list[i];
        if (idx < cap && !seen[idx] && W_STATE(f->words[idx]) == s) {
            seen[idx] = 1;
            list[j++] = (uint32_t)idx;
        }
    }
    for (uint64_t idx = 0; idx < cap; idx++)
        if (!seen[idx] && W_STATE(f->words[idx]) == s) list[j++] = (uint32_t)idx;
    return j;
}

/* Rebuild every queue from the QUEUED slot words: keep each list's run from
 * its head while it names this queue's elements, each once (FIFO order
 * kept), then append the queue's elements that no list reached (an element
 * queued or taken by a process killed between its word store and its
 * links). */
static void repair_queues(Core *f, unsigned char *seen) {
    uint64_t cap = f->capacity;
    memset(seen, 0, cap);
    for (uint64_t q = 0; q < f->max_queues; q++) {
        uint64_t *Q = QUEUE(f, q);
        if (Q[Q_STATE] != QUEUE_LIVE) continue;
        if (Q[Q_DEPTH] < 1 || Q[Q_DEPTH] > cap) Q[Q_DEPTH] = cap;
        uint64_t n = 0, tail = NO_SLOT, idx = Q[Q_HEAD];
        uint64_t limit = Q[Q_COUNT] < cap ? Q[Q_COUNT] : cap;
        while (n < limit && idx < cap && !seen[idx] && W_STATE(f->words[idx]) == ST_QUEUED &&
               W_OWNER(f->words[idx]) == q + 1) {
            seen[idx] = 1;
            tail = idx;
            n++;
            idx = f->next[idx];
        }
        if (n == 0) st(&Q[Q_HEAD], NO_SLOT);
        else f->next[tail] = NO_SLOT;
        st(&Q[Q_TAIL], tail);
        st(&Q[Q_COUNT], n);
    }
    for (uint64_t idx = 0; idx < cap; idx++) {
        uint64_t w = f->words[idx];
        if (W_STATE(w) != ST_QUEUED || seen[idx]) continue;
        uint64_t *Q = QUEUE(f, W_OWNER(w) - 1); /* a live queue: checked by the caller's first pass */
        uint64_t n = Q[Q_COUNT];
        f->next[idx] = NO_SLOT;
        if (n == 0) st(&Q[Q_HEAD], idx);
        else f->next[Q[Q_TAIL]] = (uint32_t)idx;
        st(&Q[Q_TAIL], idx);
        st(&Q[Q_COUNT], n + 1);
        seen[idx] = 1;
    }
}

/* Run by the process that took the lock over from a dead holder (and by
 * reclaim). Idempotent: on a whole pool it changes nothing. Counts the
 * things it fixed. */
static void repair(Core *f) {
    uint64_t cap = f->capacity;
    unsigned char *seen = malloc(cap);
    int any;
    unsigned char *dead = dead_owners(f, &any);
    if (!seen || !dead) { free(seen); free(dead); return; }
    uint64_t *h = f->hdr;
    for (uint64_t e = 0; e < f->max_procs; e++) { /* the scans' bound, in case it was damaged */
        uint64_t *ent = ENTRY(f, e);
        if (ld(&ent[P_EPOCH]) || ld(&ent[P_CACHE_N]) || ld(&ent[P_SLEEPING])) note_entry_used(f, e);
    }
    if (h[H_MIN_NR] < 1) h[H_MIN_NR] = 1;
    if (h[H_MIN_NR] > cap) h[H_MIN_NR] = cap;
    for (uint64_t idx = 0; idx < cap; idx++) {
        uint64_t w = ld(&f->words[idx]), s = W_STATE(w);
        if (s < ST_ARENA || s > ST_QUEUED || (s == ST_CACHED && dead[W_OWNER(w)]) ||
            (s == ST_QUEUED && (W_OWNER(w) == 0 || W_OWNER(w) > f->max_queues ||
                                QUEUE(f, W_OWNER(w) - 1)[Q_STATE] != QUEUE_LIVE)))
            cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)));
        else if (s == ST_RESERVE && W_OWNER(w) != 0)
            st(&f->words[idx], mkword(ST_RESERVE, 0, W_GEN(w)));
        CRASH(CP_REBUILD);
    }
    uint64_t curr = rebuild_list(f, f->stack, h[H_CURR_NR], ST_RESERVE, seen);
    while (curr > h[H_MIN_NR]) { /* the reserve is not a cache: extras go back */
        uint64_t idx = f->stack[--curr];
        st(&f->words[idx], mkword(ST_ARENA, 0, W_GEN(f->words[idx])));
    }
    st(&h[H_CURR_NR], curr);
    repair_queues(f, seen);
    st(&h[H_ARENA_FREE], rebuild_list(f, f->arena, h[H_ARENA_FREE], ST_ARENA, seen));
    uncount_dead_sleepers(f);
    free(seen);
    free(dead);
    f->wake = 1;
}

/* ------------------------------------------------------------------ */
/* Python-facing helpers                                               */

#define ENTER(f)                                                                 \
    do {                                                                         \
        if ((f)->hdr == NULL || (f)->closing) return closed_error(f);            \
        (f)->busy++;                                                             \
    } while (0)

static void release_view(Core *f);
static PyObject *closed_error(Core *f) {
    PyErr_Format(ErrClosed ? ErrClosed : PyExc_ValueError, "pool '%s' is closed in this object; attach again to use it",
                 f->name);
    return NULL;
}

static PyObject *leave(Core *f, PyObject *result) {
    if (--f->busy == 0 && f->closing) release_view(f);
    return result;
}

/* After the lock is released: wake-ups, then the poison warning. */
static int after_unlock(Core *f) {
    if (f->wake) wake_all(f);
    if (f->qwake) {
        int ch = f->qwake;
        f->qwake = 0;
        wake_ch(f, ch);
    }
    if (f->poisoned >= 0) {
        int64_t idx = f->poisoned;
        f->poisoned = -1;
        if (PyErr_WarnFormat(WarnPoison, 2, "pool '%s': reserved element in slot %lld was written after it was freed",
                             f->name, (long long)idx) < 0)
            return -1;
    }
    return 0;
}

/* The Python exception for a result code (no lock held). */
static PyObject *raise_for(Core *f, int r) {
    switch (r) {
    case RC_SIGNAL: return NULL; /* the handler's exception is set */
    case RC_TIMEOUT: PyErr_Format(PyExc_TimeoutError, "pool '%s': the timeout passed", f->name); return NULL;
    case RC_DESTROYED: PyErr_Format(ErrDestroyed, "pool '%s' was destroyed", f->name); return NULL;
    case RC_CLOSED: return closed_error(f);
    case RC_CORRUPT:
        PyErr_Format(ErrFormat, "pool '%s' is corrupt: %s (shmpool-inspect --check %s audits it)", f->name, f->msg,
                     f->name);
        return NULL;
    default: PyErr_Format(PyExc_SystemError, "shmpool: unexpected result %d", r); return NULL;
    }
}

static int call_trace(Core *f, uint64_t handle, int has_handle) {
    if (f->trace == NULL || f->last_event == EV_NONE) return 0;
    PyObject *h = has_handle ? PyLong_FromUnsignedLongLong(handle) : Py_NewRef(Py_None);
    if (!h) return -1;
    PyObject *res = PyObject_CallFunction(f->trace, "sOK", EVENT_NAMES[f->last_event], h,
                                          (unsigned long long)f->last_curr);
    Py_DECREF(h);
    if (!res) return -1;
    Py_DECREF(res);
    return 0;
}

static uint64_t deadline_from(long long ns) {
    if (ns < 0) return 0;
    uint64_t d = now_ns() + (uint64_t)ns;
    return d ? d : 1;
}

/* One locked alloc attempt (the lock taken by `deadline`). */
static int alloc_locked(Core *f, int skip_arena, int mode, uint64_t deadline, uint64_t *handle) {
    f->last_event = EV_NONE;
    int r = lock_acquire(f, deadline);
    if (r == RC_TIMEOUT) {
        count(f, C_ALLOC_FAILED, 1);
        f->last_event = EV_ALLOC_FAILED;
        f->last_curr = ld(&f->hdr[H_CURR_NR]);
    }
    if (r != RC_OK) return r;
    if (f->recount) {
        f->recount = 0;
        uncount_dead_sleepers(f);
    }
    r = alloc_step(f, skip_arena, mode, handle);
    f->last_curr = f->hdr[H_CURR_NR];
    lock_release(f);
    return r;
}

static int free_locked(Core *f, uint64_t idx, uint64_t gen, int to_cache);

/* Free an element we just got, keeping the exception that is set. */
static void give_back(Core *f, uint64_t handle) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *saved = f->trace;
    f->trace = NULL;
    free_locked(f, handle & INDEX_MASK, handle >> HGEN_SHIFT, 1);
    after_unlock(f);
    f->trace = saved;
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* Sleep until a wake-up token, `until`, or a signal handler's exception
 * (RC_SIGNAL); the caller is registered as a sleeper and unregisters after,
 * lock-free, so that an interrupted sleep never leaks nr_waiters. */
static int sleep_until_ch(Core *f, int ch, uint64_t until) {
    int r = RC_OK, woken = 0;
    sem_t *sem = sem_of(f, ch);
    for (;;) {
        if ((woken = sem_nap(sem, until)) || f->closing) break;
        if (PyErr_CheckSignals() < 0) { r = RC_SIGNAL; break; }
        if (now_ns() >= until) break;
    }
    if (!woken) f->recount = 1; /* nobody woke us: some sleepers may have died */
    f->woken = woken;
    sleeper_add_ch(f, ch, -1); /* finish_wait */
    drain_tokens_ch(f, ch);
    if (r == RC_OK && f->closing) r = RC_CLOSED;
    return r;
}

static int sleep_until(Core *f, uint64_t until) { return sleep_until_ch(f, 0, until); }

/* The whole of mempool_alloc for a call that may sleep or fail: attempts
 * under the lock, sleeps without it. `deadline` (0: none) bounds the whole
 * call; lock_deadline bounds a non-sleeping call's wait for the lock. */
static int alloc_loop(Core *f, int sleeps, int skip_arena, uint64_t deadline, uint64_t retry_ns,
                      uint64_t lock_deadline, uint64_t *handle) {
    int slept = 0;
    for (;;) {
        /* Past the deadline, one last attempt that does not register. */
        int mode = sleeps && !(deadline && now_ns() >= deadline) ? MODE_SLEEP : MODE_FAIL;
        int r = alloc_locked(f, skip_arena, mode, sleeps ? deadline : lock_deadline, handle);
        skip_arena = 0;
        if (r == RC_TIMEOUT && !sleeps) r = RC_FAIL; /* may not sleep: the lock did not come in time */
        if (r == RC_OK && slept && f->hdr[H_CURR_NR] > 0) f->wake = 1; /* we may hold another sleeper's token */
        if (after_unlock(f) < 0) {
            if (r == RC_SLEEP) sleeper_add(f, -1);
            return RC_SIGNAL;
        }
        if (r == RC_FAIL && sleeps) r = RC_TIMEOUT;
        if (r == RC_OK || r == RC_FAIL || r == RC_TIMEOUT || r == RC_SLEEP) {
            if (call_trace(f, *handle, r == RC_OK) < 0) {
                if (r == RC_SLEEP) sleeper_add(f, -1);
                if (r == RC_OK) give_back(f, *handle); /* the trace raised: nothing is lost */
                return RC_SIGNAL;
            }
        }
        if (r != RC_SLEEP) return r;
        uint64_t until = now_ns() + retry_ns;
        if (deadline && deadline < until) until = deadline;
        if ((r = sleep_until(f, until)) != RC_OK) return r;
        slept = 1;
    }
}

/* ------------------------------------------------------------------ */
/* Methods                                                             */

/* owner.<name>(*args[1:n]): the Python policy of the Mempool holding us,
 * for whatever the C path does not serve. args[0] is filled in here. */
static PyObject *call_owner(Core *f, PyObject *name, PyObject **args, size_t n) {
    PyObject *owner = NULL;
    if (f->owner) {
#if PY_VERSION_HEX >= 0x030D0000
        if (PyWeakref_GetRef(f->owner, &owner) < 0) return NULL;
#else
        owner = PyWeakref_GetObject(f->owner);
        owner = owner == Py_None ? NULL : Py_NewRef(owner);
#endif
    }
    if (owner == NULL) return closed_error(f); /* the pool object is gone: only its bound methods live on */
    args[0] = owner;
    PyObject *res = PyObject_VectorcallMethod(name, args, n, NULL);
    Py_DECREF(owner);
    return res;
}

static PyObject *call_slow_alloc(Core *f, PyObject *gfp, PyObject *timeout, int skip) {
    PyObject *args[4] = {NULL, gfp, timeout, skip ? Py_True : Py_False};
    return call_owner(f, STR_ALLOC_SLOW, args, 4);
}

/* alloc(gfp=GFP_KERNEL, *, timeout=None): the lock-free cache, else one
 * locked attempt; sleeping, odd arguments and tracing go to _alloc_slow. */
static PyObject *Core_alloc(Core *f, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *gfp = nargs > 0 ? args[0] : GFP_KERNEL_OBJ;
    PyObject *timeout = Py_None;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "alloc() takes at most 1 positional argument (gfp)");
        return NULL;
    }
    if (kwnames) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0) timeout = args[nargs + i];
            else if (PyUnicode_CompareWithASCIIString(key, "gfp") == 0 && nargs == 0) gfp = args[nargs + i];
            else {
                PyErr_Format(PyExc_TypeError, "alloc() got an unexpected keyword argument '%U'", key);
                return NULL;
            }
        }
    }
    if (f->hdr == NULL || f->closing || f->trace != NULL || timeout != Py_None || !PyLong_Check(gfp) ||
        PyBool_Check(gfp))
        return call_slow_alloc(f, gfp, timeout, 0);
    long g = PyLong_AsLong(gfp);
    if (g == -1 && PyErr_Occurred()) { PyErr_Clear(); return call_slow_alloc(f, gfp, timeout, 0); }
    /* gfp.py's valid bits but __GFP_ZERO (it warns: Python) mean nothing here beyond __GFP_WAIT. */
    if ((g & ~fast_gfp_bits) != 0 || ld(&f->hdr[H_STATUS]) != STATUS_LIVE) return call_slow_alloc(f, gfp, timeout, 0);
    int sleeps = (g & GFP_WAIT) != 0, skip = 0;
    if (f->enabled && f->entry && f->entry[P_CACHE_N] > 0) {
        if (fault(f)) skip = 1;
        else {
            uint64_t h;
            if (cache_pop(f, &h)) {
                count(f, C_ALLOC_ARENA, 1);
                return PyLong_FromUnsignedLongLong(h);
            }
        }
    }
    f->busy++;
    uint64_t h = 0;
    int r = alloc_locked(f, skip, sleeps ? MODE_PROBE : MODE_FAIL,
                         sleeps ? 0 : deadline_from((long long)atomic_wait_ns), &h);
    if (r == RC_TIMEOUT && !sleeps) r = RC_FAIL;
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r == RC_OK) return leave(f, PyLong_FromUnsignedLongLong(h));
    if (r == RC_FAIL && sleeps) {
        /* The kernel sleeps next: Python composes the wait (the reserve is
         * checked again with the registration, and no new draw is made). */
        leave(f, NULL);
        return call_slow_alloc(f, gfp, timeout, 1);
    }
    if (r == RC_FAIL) return leave(f, Py_NewRef(Py_None));
    return leave(f, raise_for(f, r));
}

/* _alloc_core(sleeps, skip_arena, timeout_ns, retry_ns, lock_wait_ns):
 * mempool_alloc after Python checked the arguments. timeout_ns < 0: none;
 * lock_wait_ns bounds the wait for the lock of a call that may not sleep.
 * A handle, or None (may not sleep and nothing to give); raises
 * TimeoutError, PoolDestroyedError, PoolFormatError, or what a signal
 * handler raised during a wait (nothing is held then, nothing leaked). */
static PyObject *Core_alloc_core(Core *f, PyObject *args) {
    int sleeps, skip;
    long long timeout_ns, retry_ns, lock_wait_ns;
    if (!PyArg_ParseTuple(args, "ppLLL", &sleeps, &skip, &timeout_ns, &retry_ns, &lock_wait_ns)) return NULL;
    ENTER(f);
    uint64_t h = 0;
    uint64_t deadline = deadline_from(timeout_ns);
    uint64_t lock_deadline = deadline_from(lock_wait_ns);
    if (deadline && (!lock_deadline || deadline < lock_deadline)) lock_deadline = deadline;
    int r = alloc_loop(f, sleeps, skip, deadline, retry_ns > 0 ? (uint64_t)retry_ns : 1, lock_deadline, &h);
    if (r == RC_OK) return leave(f, PyLong_FromUnsignedLongLong(h));
    if (r == RC_FAIL) return leave(f, Py_NewRef(Py_None));
    return leave(f, raise_for(f, r));
}

/* _alloc_async_try(): one attempt of a sleeping allocation for
 * asyncio, in the event loop's thread: the handle; or None, registered as
 * an async sleeper under the lock (its process's FIFO gets a byte when the
 * reserve is refilled; _async_done() counts it out); or False when the lock
 * did not come within GFP_ATOMIC's wait (not registered: the loop must not
 * block longer). */
static PyObject *Core_alloc_async_try(Core *f, PyObject *unused) {
    ENTER(f);
    uint64_t h = 0;
    f->last_event = EV_NONE;
    int r = lock_acquire(f, deadline_from((long long)atomic_wait_ns));
    if (r == RC_TIMEOUT) return leave(f, Py_NewRef(Py_False));
    if (r == RC_OK) {
        if (f->recount) {
            f->recount = 0;
            uncount_dead_sleepers(f);
        }
        r = alloc_step(f, 0, MODE_ASYNC, &h);
        f->last_curr = f->hdr[H_CURR_NR];
        lock_release(f);
    }
    if (after_unlock(f) < 0 || ((r == RC_OK || r == RC_SLEEP) && call_trace(f, h, r == RC_OK) < 0)) {
        if (r == RC_SLEEP) async_add(f, -1);
        if (r == RC_OK) give_back(f, h); /* nothing is lost */
        return leave(f, NULL);
    }
    if (r == RC_OK) return leave(f, PyLong_FromUnsignedLongLong(h));
    if (r == RC_SLEEP) return leave(f, Py_NewRef(Py_None));
    return leave(f, raise_for(f, r));
}

/* _async_done(): count out an async sleeper that _alloc_async_try
 * registered (lock-free, as a sleeper counts itself out). */
static PyObject *Core_async_done(Core *f, PyObject *unused) {
    if (f->hdr == NULL) Py_RETURN_NONE;
    async_add(f, -1);
    Py_RETURN_NONE;
}

/* _set_fifo_prefix(path): where entry e's FIFO is: path + str(e). */
static PyObject *Core_set_fifo_prefix(Core *f, PyObject *arg) {
    const char *p = PyUnicode_AsUTF8(arg);
    if (!p) return NULL;
    if (strlen(p) + 8 > sizeof f->fifo_prefix) {
        PyErr_SetString(PyExc_ValueError, "FIFO path too long");
        return NULL;
    }
    snprintf(f->fifo_prefix, sizeof f->fifo_prefix, "%s", p);
    Py_RETURN_NONE;
}

/* alloc_preallocated(): the reserve only, never the arena, never sleeping. */
static PyObject *Core_alloc_preallocated(Core *f, PyObject *unused) {
    ENTER(f);
    int r = lock_acquire(f, 0);
    uint64_t h = 0;
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_OK) {
            uint64_t idx;
            if (f->hdr[H_CURR_NR] == 0) {
                count(f, C_ALLOC_FAILED, 1);
                r = RC_FAIL;
            } else if ((r = remove_element(f, &idx)) == RC_OK) {
                h = hand_out(f, idx);
                count(f, C_ALLOC_RESERVE, 1);
            }
        }
        lock_release(f);
    }
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r == RC_OK) return leave(f, PyLong_FromUnsignedLongLong(h));
    if (r == RC_FAIL) return leave(f, Py_NewRef(Py_None));
    return leave(f, raise_for(f, r));
}

/* Decode a handle for the lock-free checks: 1 with idx and gen. */
static int decode(Core *f, PyObject *handle, uint64_t *idx, uint64_t *gen) {
    if (!PyLong_CheckExact(handle)) return 0;
    int overflow = 0;
    long long h = PyLong_AsLongLongAndOverflow(handle, &overflow);
    if (overflow || h < 0) { PyErr_Clear(); return 0; }
    *idx = (uint64_t)h & INDEX_MASK;
    *gen = (uint64_t)h >> HGEN_SHIFT;
    return *idx < f->capacity;
}

/* The locked free of slot idx / gen; RC_INVALID with f->msg. */
static int free_locked(Core *f, uint64_t idx, uint64_t gen, int to_cache) {
    int r = lock_acquire(f, 0);
    if (r != RC_OK) return r;
    f->last_event = EV_NONE;
    r = check_header(f);
    if (r == RC_OK) {
        uint64_t w = ld(&f->words[idx]);
        if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
            describe(f, w, gen);
            r = RC_INVALID;
        } else if ((r = release_slot(f, idx, w, to_cache)) == RC_INVALID) {
            snprintf(f->msg, sizeof f->msg, "freed by another process at the same moment");
        }
    }
    f->last_curr = f->hdr[H_CURR_NR];
    lock_release(f);
    return r;
}

static PyObject *invalid(Core *f, uint64_t handle) {
    PyObject *exc = PyObject_CallFunction(ErrInvalid, "Ks", (unsigned long long)handle, f->msg);
    if (exc) {
        PyErr_SetObject(ErrInvalid, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* free(handle): the lock-free cache push when the reserve is full, else the
 * locked free; anything unusual goes to _free_slow. */
static PyObject *Core_free(Core *f, PyObject *handle) {
    if (handle == Py_None) Py_RETURN_NONE;
    uint64_t idx, gen;
    if (f->hdr == NULL || f->closing || f->trace != NULL || !decode(f, handle, &idx, &gen)) goto slow;
    uint64_t *h = f->hdr;
    if (ld(&h[H_STATUS]) != STATUS_LIVE) goto slow;
    uint64_t w = ld(&f->words[idx]);
    if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) goto slow;
    /* The kernel's unlocked peek (checked again under the lock): while the
     * reserve is below min_nr, the element goes there first. */
    if (ld(&h[H_CURR_NR]) >= ld(&h[H_MIN_NR]) && f->enabled && f->entry) {
        uint64_t n = f->entry[P_CACHE_N];
        if (n < CACHE_MAX && cas(&f->words[idx], w, mkword(ST_CACHED, f->me, gen))) {
            __atomic_store_n(&f->cache[n], (uint32_t)idx, __ATOMIC_RELEASE);
            st(&f->entry[P_CACHE_N], n + 1);
            count(f, C_FREE_ARENA, 1);
            Py_RETURN_NONE;
        }
    }
    f->busy++;
    int r = free_locked(f, idx, gen, 1);
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r == RC_OK) return leave(f, Py_NewRef(Py_None));
    if (r == RC_INVALID) return leave(f, invalid(f, idx | gen << HGEN_SHIFT));
    return leave(f, raise_for(f, r));
slow: {
        PyObject *a[2] = {NULL, handle};
        return call_owner(f, STR_FREE_SLOW, a, 2);
    }
}

/* _free_core(index, generation): the locked free after Python decoded the
 * handle; returns None (the trace, if any, is called here). */
static PyObject *Core_free_core(Core *f, PyObject *args) {
    unsigned long long idx, gen;
    if (!PyArg_ParseTuple(args, "KK", &idx, &gen)) return NULL;
    ENTER(f);
    if (idx >= f->capacity) {
        PyErr_SetString(PyExc_ValueError, "slot index out of range");
        return leave(f, NULL);
    }
    int r = free_locked(f, idx, gen, 1);
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r == RC_INVALID) return leave(f, invalid(f, idx | gen << HGEN_SHIFT));
    if (r != RC_OK) return leave(f, raise_for(f, r));
    if (call_trace(f, idx | gen << HGEN_SHIFT, 1) < 0) return leave(f, NULL);
    return leave(f, Py_NewRef(Py_None));
}

/* _adopt_core(index, generation): make us the holder of a held element. */
static PyObject *Core_adopt_core(Core *f, PyObject *args) {
    unsigned long long idx, gen;
    if (!PyArg_ParseTuple(args, "KK", &idx, &gen)) return NULL;
    ENTER(f);
    if (idx >= f->capacity) {
        PyErr_SetString(PyExc_ValueError, "slot index out of range");
        return leave(f, NULL);
    }
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_OK) {
            uint64_t w = ld(&f->words[idx]);
            if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
                describe(f, w, gen);
                r = RC_INVALID;
            } else if (!cas(&f->words[idx], w, mkword(ST_HELD, f->me, gen))) {
                snprintf(f->msg, sizeof f->msg, "freed by another process at the same moment");
                r = RC_INVALID;
            }
        }
        lock_release(f);
    }
    if (r == RC_INVALID) return leave(f, invalid(f, idx | gen << HGEN_SHIFT));
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_NewRef(Py_None));
}

/* _alloc_bulk_core(out, n, sleeps, timeout_ns, retry_ns, lock_wait_ns):
 * n elements into out (int64), the reserve part all or nothing: when the
 * reserve cannot cover what the arena did not give, the arena's elements go
 * back and nothing is held while waiting. True, or False (may not sleep). */
static PyObject *Core_alloc_bulk_core(Core *f, PyObject *args) {
    PyObject *obj;
    Py_ssize_t n;
    int sleeps;
    long long timeout_ns, retry_ns, lock_wait_ns;
    if (!PyArg_ParseTuple(args, "OnpLLL", &obj, &n, &sleeps, &timeout_ns, &retry_ns, &lock_wait_ns)) return NULL;
    Py_buffer out;
    if (PyObject_GetBuffer(obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (n < 0 || (uint64_t)n > f->capacity || out.len < n * 8) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "n out of range, or out too small");
        return NULL;
    }
    if (f->hdr == NULL || f->closing) { PyBuffer_Release(&out); return closed_error(f); }
    f->busy++;
    int64_t *dst = (int64_t *)out.buf;
    uint64_t deadline = deadline_from(timeout_ns), lock_deadline = sleeps ? deadline : deadline_from(lock_wait_ns);
    int slept = 0, r;
    for (;;) {
        r = lock_acquire(f, lock_deadline);
        if (r == RC_TIMEOUT && !sleeps) { count(f, C_ALLOC_FAILED, 1); r = RC_FAIL; break; }
        if (r != RC_OK) break;
        if (f->recount) {
            f->recount = 0;
            uncount_dead_sleepers(f);
        }
        r = check_header(f);
        Py_ssize_t got = 0;
        /* n arena attempts, each with its own draw, straight from the shared
         * list: our cache (the arena's top) goes back onto it first, in
         * order, so the slots come in the order of the single locked stack. */
        if (r == RC_OK && f->enabled && f->entry && f->entry[P_CACHE_N]) r = drain(f, 0);
        for (Py_ssize_t i = 0; r == RC_OK && i < n; i++) {
            uint64_t idx, taken;
            if (f->hdr[H_ARENA_FREE] == 0) {
                if ((r = steal(f, &taken)) != RC_OK || !taken) break; /* dry: no more draws */
            }
            if (fault(f)) continue; /* a fault: the next element is another attempt */
            if ((r = arena_pop(f, &idx)) != RC_OK) break;
            dst[got++] = (int64_t)hand_out(f, idx);
        }
        if (got) count(f, C_ALLOC_ARENA, (uint64_t)got);
        if (r == RC_OK) {
            uint64_t need = (uint64_t)(n - got);
            if (need <= f->hdr[H_CURR_NR]) {
                for (Py_ssize_t i = got; i < n && r == RC_OK; i++) {
                    uint64_t idx;
                    if ((r = remove_element(f, &idx)) == RC_OK) dst[i] = (int64_t)hand_out(f, idx);
                }
                if (r == RC_OK) {
                    count(f, C_ALLOC_RESERVE, need);
                    if (slept && f->hdr[H_CURR_NR] > 0) f->wake = 1;
                }
            } else {
                for (Py_ssize_t i = got; i-- > 0;) { /* all or nothing: give the arena's back, in order */
                    uint64_t idx = (uint64_t)dst[i] & INDEX_MASK;
                    uint64_t w = ld(&f->words[idx]);
                    if (idx < f->capacity && W_STATE(w) == ST_HELD && W_OWNER(w) == f->me) {
                        if (f->hdr[H_ARENA_FREE] >= f->capacity) { r = corrupt(f, "arena_free %llu is beyond the capacity %llu", f->hdr[H_ARENA_FREE], f->capacity); break; }
                        if (cas(&f->words[idx], w, mkword(ST_ARENA, 0, W_GEN(w)))) arena_push(f, idx);
                    }
                }
                if (got) count(f, C_ALLOC_ARENA, (uint64_t)-(int64_t)got);
                if (r == RC_OK) {
                    if (!sleeps || (deadline && now_ns() >= deadline)) {
                        count(f, C_ALLOC_FAILED, 1);
                        r = sleeps ? RC_TIMEOUT : RC_FAIL;
                    } else {
                        sleeper_add(f, 1);
                        count(f, C_SLEEPS, 1);
                        r = RC_SLEEP;
                    }
                }
            }
        }
        lock_release(f);
        if (after_unlock(f) < 0) {
            if (r == RC_SLEEP) sleeper_add(f, -1);
            r = RC_SIGNAL;
            break;
        }
        if (r != RC_SLEEP) break;
        uint64_t until = now_ns() + (uint64_t)(retry_ns > 0 ? retry_ns : 1);
        if (deadline && deadline < until) until = deadline;
        if ((r = sleep_until(f, until)) != RC_OK) break;
        slept = 1;
    }
    PyBuffer_Release(&out);
    if (r == RC_OK) return leave(f, Py_NewRef(Py_True));
    if (r == RC_FAIL) return leave(f, Py_NewRef(Py_False));
    return leave(f, raise_for(f, r));
}

/* _free_bulk_core(handles): free many (int64, each decoded and in range,
 * no slot twice: Python checked). Every handle is checked under the lock
 * first; an invalid one refuses the whole call (InvalidHandleError, nothing
 * freed). Then as if freed one by one. */
/* The locked free of n checked handles (in range, no slot twice): all or
 * nothing; None, or NULL with the pool's error. */
static PyObject *free_bulk(Core *f, const int64_t *src, Py_ssize_t n) {
    if (f->hdr == NULL || f->closing) return closed_error(f);
    f->busy++;
    int64_t bad = -1, lost = 0;
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        for (Py_ssize_t i = 0; r == RC_OK && i < n; i++) {
            uint64_t h = (uint64_t)src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
            if (idx >= f->capacity) { r = corrupt(f, "handle %llu names slot %llu beyond the capacity", h, idx); break; }
            uint64_t w = ld(&f->words[idx]);
            if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
                describe(f, w, gen);
                bad = i;
                r = RC_INVALID;
            }
        }
        for (Py_ssize_t i = 0; r == RC_OK && i < n; i++) {
            uint64_t h = (uint64_t)src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
            uint64_t w = ld(&f->words[idx]);
            if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) { lost++; continue; }
            int to_arena = f->hdr[H_CURR_NR] >= f->hdr[H_MIN_NR];
            if (to_arena && f->enabled && f->entry && f->entry[P_CACHE_N]) {
                if ((r = drain(f, 0)) != RC_OK) break; /* our cache is the arena's top: keep the order */
            }
            int x = release_slot(f, idx, w, 0);
            if (x == RC_INVALID) lost++;
            else if (x != RC_OK) r = x;
        }
        lock_release(f);
    }
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r == RC_INVALID) return leave(f, invalid(f, (uint64_t)src[bad]));
    if (r != RC_OK) return leave(f, raise_for(f, r));
    if (lost) {
        snprintf(f->msg, sizeof f->msg, "%lld of these elements were freed by another process at the same moment",
                 (long long)lost);
        return leave(f, invalid(f, (uint64_t)src[0]));
    }
    return leave(f, Py_NewRef(Py_None));
}

static PyObject *Core_free_bulk_core(Core *f, PyObject *obj) {
    Py_buffer in;
    if (PyObject_GetBuffer(obj, &in, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *res = free_bulk(f, (const int64_t *)in.buf, in.len / 8);
    PyBuffer_Release(&in);
    return res;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* _free_bulk_fast(handles): free_bulk for a list of ints or a 1-D int64
 * array, its checks made here (in range, no slot twice: a sort of the
 * batch's indexes); NotImplemented for anything else or anything wrong,
 * which Python's checks then describe. */
#define FAST_BULK_MAX 4096
static PyObject *Core_free_bulk_fast(Core *f, PyObject *obj) {
    int64_t stack_h[64];
    uint64_t stack_i[64];
    int64_t *hs = stack_h;
    uint64_t *ix = stack_i;
    Py_ssize_t n;
    Py_buffer in = {0};
    if (PyList_CheckExact(obj)) {
        n = PyList_GET_SIZE(obj);
    } else if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj)) {
        if (PyObject_GetBuffer(obj, &in, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0) {
            PyErr_Clear();
            Py_RETURN_NOTIMPLEMENTED;
        }
        if (in.ndim != 1 || in.itemsize != 8 || !in.format || !(strcmp(in.format, "l") == 0 || strcmp(in.format, "q") == 0)) {
            PyBuffer_Release(&in);
            Py_RETURN_NOTIMPLEMENTED;
        }
        n = in.len / 8;
    } else {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *res = NULL;
    if (n == 0 || n > FAST_BULK_MAX) { res = Py_NewRef(Py_NotImplemented); goto out; }
    if (n > 64) {
        hs = PyMem_Malloc((size_t)n * sizeof *hs);
        ix = PyMem_Malloc((size_t)n * sizeof *ix);
        if (!hs || !ix) { PyErr_NoMemory(); goto out; }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t h;
        if (in.obj) {
            h = ((const int64_t *)in.buf)[i];
        } else {
            PyObject *item = PyList_GET_ITEM(obj, i);
            int overflow = 0;
            if (!PyLong_CheckExact(item)) { res = Py_NewRef(Py_NotImplemented); goto out; }
            h = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (overflow || (h == -1 && PyErr_Occurred())) { PyErr_Clear(); res = Py_NewRef(Py_NotImplemented); goto out; }
        }
        if (h < 0 || ((uint64_t)h & INDEX_MASK) >= f->capacity) { res = Py_NewRef(Py_NotImplemented); goto out; }
        hs[i] = h;
        ix[i] = (uint64_t)h & INDEX_MASK;
    }
    qsort(ix, (size_t)n, sizeof *ix, cmp_u64);
    for (Py_ssize_t i = 1; i < n; i++)
        if (ix[i] == ix[i - 1]) { res = Py_NewRef(Py_NotImplemented); goto out; }
    res = free_bulk(f, hs, n);
out:
    if (in.obj) PyBuffer_Release(&in);
    if (hs != stack_h) PyMem_Free(hs);
    if (ix != stack_i) PyMem_Free(ix);
    return res;
}

/* _resize_core(new_min_nr, batch): mempool_resize. Shrink: pop reserve
 * elements above new_min_nr back to the arena. Grow: raise min_nr, then
 * refill from the arena (faults apply; other caches are stolen from) in
 * batches of `batch` per lock hold, stopping where the arena fails. */
static PyObject *Core_resize_core(Core *f, PyObject *args) {
    unsigned long long new_min;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "Kn", &new_min, &batch)) return NULL;
    if (new_min < 1 || new_min > f->capacity || batch < 1) {
        PyErr_SetString(PyExc_ValueError, "new_min_nr out of range");
        return NULL;
    }
    ENTER(f);
    int r = lock_acquire(f, 0), grow = 0;
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_OK) {
            grow = new_min > f->hdr[H_MIN_NR];
            if (!grow) {
                if (f->enabled && f->entry && f->entry[P_CACHE_N]) r = drain(f, 0);
                while (r == RC_OK && f->hdr[H_CURR_NR] > new_min) {
                    uint64_t idx;
                    if ((r = remove_element(f, &idx)) != RC_OK) break;
                    st(&f->words[idx], mkword(ST_ARENA, 0, W_GEN(f->words[idx])));
                    r = arena_push(f, idx);
                }
            }
            if (r == RC_OK) st(&f->hdr[H_MIN_NR], new_min);
        }
        lock_release(f);
    }
    while (r == RC_OK && grow) {
        if ((r = lock_acquire(f, 0)) != RC_OK) break;
        r = check_header(f);
        for (Py_ssize_t i = 0; r == RC_OK && i < batch; i++) {
            /* re-checked each time: another process may have resized */
            if (f->hdr[H_CURR_NR] >= f->hdr[H_MIN_NR]) { grow = 0; break; }
            uint64_t unused;
            int a = arena_take(f, 1, ST_RESERVE, &unused);
            if (a == RC_FAIL || a == RC_DRY) { grow = 0; break; }
            r = a;
        }
        /* The kernel wakes sleepers only from free; waking them here too
         * spares them the rest of their 5 s nap. */
        f->wake = 1;
        lock_release(f);
        if (after_unlock(f) < 0) return leave(f, NULL);
    }
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_NewRef(Py_None));
}

/* Slots held and cached right now (lock held): (in_use, cached). */
static uint64_t queued_total(Core *f) {
    uint64_t n = 0;
    for (uint64_t q = 0; q < f->max_queues; q++) {
        uint64_t *Q = QUEUE(f, q);
        if (ld(&Q[Q_STATE]) == QUEUE_LIVE) {
            uint64_t c = ld(&Q[Q_COUNT]);
            n += c < f->capacity ? c : f->capacity;
        }
    }
    return n;
}

/* Slots held and cached right now (lock held): (in_use, cached); queued
 * elements count in neither (stats and destroy ask queued_total). */
static void usage(Core *f, uint64_t *in_use, uint64_t *cached) {
    uint64_t c = 0;
    for (uint64_t e = 0, used = entries_used(f); e < used; e++)
        if (ld(&ENTRY(f, e)[P_EPOCH]) != 0 || ld(&ENTRY(f, e)[P_CACHE_N]) != 0) c += cached_by(f, e);
    uint64_t free_ = f->hdr[H_CURR_NR] + f->hdr[H_ARENA_FREE] + c + queued_total(f);
    *cached = c;
    *in_use = free_ >= f->capacity ? 0 : f->capacity - free_;
}

/* _destroy_core(force): (in_use, curr_nr, min_nr) if refused (elements
 * held), else None: the status says destroyed and every sleeper is woken. */
static PyObject *Core_destroy_core(Core *f, PyObject *arg) {
    int force = PyObject_IsTrue(arg);
    if (force < 0) return NULL;
    ENTER(f);
    uint64_t in_use = 0, cached = 0, curr = 0, min_nr = 0;
    int refused = 0;
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        if (f->hdr[H_STATUS] != STATUS_LIVE) r = RC_DESTROYED;
        else {
            usage(f, &in_use, &cached);
            curr = f->hdr[H_CURR_NR];
            min_nr = f->hdr[H_MIN_NR];
            in_use += queued_total(f); /* queued elements are lent too */
            if (in_use && !force) refused = 1;
            else {
                st(&f->hdr[H_STATUS], STATUS_DESTROYED);
                f->wake = 1;
            }
        }
        lock_release(f);
    }
    if (f->wake) {
        /* wake every sleeper, whatever the count says */
        f->wake = 0;
        for (int ch = 0; ch <= (int)f->max_queues; ch++) {
            if (ch && QUEUE(f, ch - 1)[Q_STATE] != QUEUE_LIVE) continue;
            sem_t *sem = sem_of(f, ch);
            uint64_t n = ld(waiters_of(f, ch));
            for (uint64_t i = 0; sem && i < n && i < WAKE_MAX; i++) sem_post(sem);
        }
    }
    if (r != RC_OK) return leave(f, raise_for(f, r));
    if (refused) return leave(f, Py_BuildValue("KKK", in_use, curr, min_nr));
    return leave(f, Py_NewRef(Py_None));
}

/* _reclaim_core(): take back everything of dead processes; how many held
 * elements came back. Also recounts the sleepers. */
static PyObject *Core_reclaim_core(Core *f, PyObject *unused) {
    ENTER(f);
    int64_t taken = 0;
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_OK) {
            int any;
            unsigned char *dead = dead_owners(f, &any);
            if (!dead) r = corrupt(f, "out of memory (%llu, %llu)", 0, 0);
            else {
                taken = retire(f, dead);
                if (taken < 0) r = (int)taken;
                free(dead);
            }
            if (r == RC_OK) {
                uncount_dead_sleepers(f);
                f->wake = 1;
            }
        }
        lock_release(f);
    }
    if (after_unlock(f) < 0) return leave(f, NULL);
    drain_tokens(f);
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, PyLong_FromLongLong(taken));
}

/* _stats_core(out): a consistent snapshot under the lock into out (uint64,
 * HEADER_WORDS + 3 + N_PROC_COUNTERS): the header, then the cached total,
 * the queued total
 * and in_use, then every per-process counter summed. */
static PyObject *Core_stats_core(Core *f, PyObject *obj) {
    Py_buffer out;
    if (PyObject_GetBuffer(obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (out.len < (Py_ssize_t)(8 * (HEADER_WORDS + 3 + N_PROC_COUNTERS))) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "out too small");
        return NULL;
    }
    if (f->hdr == NULL || f->closing) { PyBuffer_Release(&out); return closed_error(f); }
    f->busy++;
    uint64_t *o = (uint64_t *)out.buf;
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        memcpy(o, f->hdr, 8 * HEADER_WORDS);
        usage(f, &o[HEADER_WORDS + 1], &o[HEADER_WORDS]);
        o[HEADER_WORDS + 2] = queued_total(f);
        for (uint64_t q = 0; q < f->max_queues; q++) /* queue sleepers count as waiters too */
            if (QUEUE(f, q)[Q_STATE] == QUEUE_LIVE) o[H_NR_WAITERS] += QUEUE(f, q)[Q_WAITERS] < SLEEPERS_MAX ? QUEUE(f, q)[Q_WAITERS] : 0;
        for (int c = 0; c < N_PROC_COUNTERS; c++) o[HEADER_WORDS + 3 + c] = 0;
        for (uint64_t e = 0, used = entries_used(f); e < used; e++)
            for (int c = 0; c < N_PROC_COUNTERS; c++) o[HEADER_WORDS + 3 + c] += ld(&ENTRY(f, e)[P_COUNTERS + c]);
        lock_release(f);
    }
    PyBuffer_Release(&out);
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_NewRef(Py_None));
}

/* _set_faults(rate, threshold, has_seed, seed): the injected failure rate,
 * and a seed that restarts the sequence, in one critical section. */
static PyObject *Core_set_faults(Core *f, PyObject *args) {
    double rate;
    unsigned long long thr, seed;
    int has_seed;
    if (!PyArg_ParseTuple(args, "dKpK", &rate, &thr, &has_seed, &seed)) return NULL;
    ENTER(f);
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_OK) {
            uint64_t bits;
            memcpy(&bits, &rate, 8);
            st(&f->hdr[H_FAIL_RATE], bits);
            st(&f->hdr[H_FAIL_THRESHOLD], thr);
            if (has_seed) {
                st(&f->hdr[H_SEED], seed);
                st(&f->hdr[H_RNG], seed);
            }
        }
        lock_release(f);
    }
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_NewRef(Py_None));
}

/* _format(min_nr): create's pre-fill of the reserve from a fresh arena
 * (no fault injection); nobody else can see the pool yet. */
static PyObject *Core_format(Core *f, PyObject *arg) {
    unsigned long long min_nr = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    ENTER(f);
    int r = RC_OK;
    st(&f->hdr[H_MIN_NR], min_nr);
    for (uint64_t i = 0; i < min_nr && r == RC_OK; i++) {
        uint64_t idx;
        if ((r = arena_pop(f, &idx)) != RC_OK) break;
        st(&f->words[idx], mkword(ST_RESERVE, 0, W_GEN(f->words[idx])));
        add_element(f, idx);
    }
    if (r != RC_OK) return leave(f, raise_for(f, r == RC_FAIL ? RC_CORRUPT : r));
    return leave(f, Py_NewRef(Py_None));
}

static int try_ofd_lock(int fd, Core *f, uint64_t e) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(f->off_procs + 8ull * PROC_WORDS * e);
    fl.l_len = 1;
    return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

/* _register(fd, pid, start): give this process a registry entry and return
 * (index, epoch).
 *
 * First, without the lock (there is no token to take it with yet): claim an
 * entry by taking the OFD lock on its byte through fd (only one process can:
 * a vacant entry, else a dead process's), then give it a new epoch by CAS,
 * so that every token of the entry's dead predecessor is recognisably
 * dead. Then, under the lock taken with the new token: take back what dead
 * processes left, the predecessor's elements included (this process has
 * allocated nothing yet, so whatever names the entry is the predecessor's).
 * A death at any point leaves a dead entry, retired like any other.
 * OSError (EUSERS) if every entry belongs to a live process. */
static PyObject *Core_register(Core *f, PyObject *args) {
    int fd;
    unsigned long long pid, start;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &pid, &start)) return NULL;
    ENTER(f);
    int64_t index = -1;
    for (int pass = 0; pass < 2 && index < 0; pass++) {
        for (uint64_t e = 0; e < f->max_procs; e++) {
            uint64_t *ent = ENTRY(f, e);
            uint64_t old = ld(&ent[P_EPOCH]);
            if ((pass == 0) != (old == 0)) continue; /* vacant entries first */
            if (!try_ofd_lock(fd, f, e)) continue;  /* a live process has it */
            uint64_t epoch = __atomic_add_fetch(&f->hdr[H_EPOCH], 1, __ATOMIC_SEQ_CST) & ((1ull << 48) - 1);
            if (epoch == 0) epoch = 1;
            while (!__atomic_compare_exchange_n(&ent[P_EPOCH], &old, epoch, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                ; /* a reclaimer may have vacated it meanwhile: old is reloaded */
            index = (int64_t)e;
            note_entry_used(f, e);
            f->fd = fd;
            f->entry = ent;
            f->cache = CACHE_OF(ent);
            f->me = e + 1;
            f->token = f->me | epoch << 16;
            break;
        }
    }
    if (index < 0) {
        errno = EUSERS;
        PyErr_Format(PyExc_OSError, "%llu live processes are attached to this pool already",
                     (unsigned long long)f->max_procs);
        return leave(f, NULL);
    }
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        if (r == RC_DESTROYED) r = RC_OK; /* a destroyed pool may be attached; its operations say so */
        unsigned char *dead = NULL;
        int any = 0;
        if (r == RC_OK && (dead = dead_owners(f, &any)) == NULL) r = corrupt(f, "out of memory (%llu, %llu)", 0, 0);
        if (r == RC_OK) {
            dead[f->me] = 2; /* our predecessor's elements: taken back, the entry kept */
            int64_t t = retire(f, dead);
            if (t < 0) r = (int)t;
            else uncount_dead_sleepers(f);
        }
        free(dead);
        st(&f->entry[P_PID], pid);
        st(&f->entry[P_START], start);
        st(&f->entry[P_CACHE_N], 0);
        drop_sleepers(f, f->entry); /* our predecessor's */
        lock_release(f);
    }
    if (after_unlock(f) < 0) return leave(f, NULL);
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_BuildValue("LK", (long long)index, (unsigned long long)(f->token >> 16)));
}

/* _bind(fd, index, epoch): use this process's existing entry (another
 * object of the same pool registered it). False if it is not ours any more. */
static PyObject *Core_bind(Core *f, PyObject *args) {
    int fd;
    long long index;
    unsigned long long epoch;
    if (!PyArg_ParseTuple(args, "iLK", &fd, &index, &epoch)) return NULL;
    if (f->hdr == NULL) return closed_error(f);
    if (index < 0 || (uint64_t)index >= f->max_procs || epoch == 0) Py_RETURN_FALSE;
    uint64_t *ent = ENTRY(f, index);
    if (ld(&ent[P_EPOCH]) != epoch) Py_RETURN_FALSE;
    f->fd = fd;
    f->entry = ent;
    f->cache = CACHE_OF(ent);
    f->me = (uint64_t)index + 1;
    f->token = f->me | epoch << 16;
    Py_RETURN_TRUE;
}

/* _detach(wait_ns): if this process holds no element of the pool, give
 * its cache back and vacate its registry entry (the caller then closes the
 * OFD lock's descriptor). True if vacated; False if it holds elements (its
 * entry stays, so that they stay its own) or the lock did not come. */
static PyObject *Core_detach(Core *f, PyObject *arg) {
    long long wait = PyLong_AsLongLong(arg);
    if (wait == -1 && PyErr_Occurred()) return NULL;
    if (f->hdr == NULL || f->entry == NULL) Py_RETURN_FALSE;
    f->busy++;
    int vacated = 0;
    int r = lock_acquire(f, deadline_from(wait));
    if (r == RC_OK) {
        int holds = 0;
        for (uint64_t idx = 0; idx < f->capacity && !holds; idx++) {
            uint64_t w = ld(&f->words[idx]);
            holds = W_STATE(w) == ST_HELD && W_OWNER(w) == f->me;
        }
        if (!holds && drain(f, 0) == RC_OK && ld(&f->entry[P_SLEEPING]) == 0) {
            st(&f->entry[P_CACHE_N], 0);
            st(&f->entry[P_EPOCH], 0);
            vacated = 1;
        }
        lock_release(f);
    }
    if (r == RC_SIGNAL) return leave(f, NULL);
    if (vacated) {
        f->entry = NULL;
        f->cache = NULL;
        f->enabled = 0;
    }
    return leave(f, PyBool_FromLong(vacated));
}

/* _drain_cache(wait_ns): give our cache back to the shared free list if
 * the lock comes within wait_ns (close, trace). True if done. */
static PyObject *Core_drain_cache(Core *f, PyObject *arg) {
    long long wait = PyLong_AsLongLong(arg);
    if (wait == -1 && PyErr_Occurred()) return NULL;
    if (f->hdr == NULL || f->entry == NULL) Py_RETURN_FALSE;
    f->busy++;
    int r = lock_acquire(f, deadline_from(wait));
    if (r == RC_OK) {
        r = drain(f, 0);
        lock_release(f);
    }
    if (r == RC_SIGNAL) return leave(f, NULL);
    return leave(f, PyBool_FromLong(r == RC_OK));
}

/* ------------------------------------------------------------------ */
/* Queues: ownership moves with the element                            */

/* The live queue q and its bounds, or RC_CORRUPT / RC_INVALID. */
static int queue_check(Core *f, uint64_t q) {
    if (q >= f->max_queues || QUEUE(f, q)[Q_STATE] != QUEUE_LIVE) {
        snprintf(f->msg, sizeof f->msg, "queue %llu does not exist", (unsigned long long)q);
        return RC_INVALID;
    }
    uint64_t *Q = QUEUE(f, q);
    uint64_t n = Q[Q_COUNT], depth = Q[Q_DEPTH];
    if (depth < 1 || depth > f->capacity) return corrupt(f, "queue %llu has depth %llu", q, depth);
    if (n > depth) return corrupt(f, "queue %llu holds %llu elements, more than its depth", q, n);
    if (n && (Q[Q_HEAD] >= f->capacity || Q[Q_TAIL] >= f->capacity))
        return corrupt(f, "queue %llu's head or tail is beyond the capacity (%llu)", q, f->capacity);
    return RC_OK;
}

/* Link slot idx, whose word now says QUEUED by q, at q's tail. */
static void queue_link(Core *f, uint64_t q, uint64_t idx) {
    uint64_t *Q = QUEUE(f, q);
    uint64_t n = Q[Q_COUNT];
    f->next[idx] = NO_SLOT;
    if (n == 0) st(&Q[Q_HEAD], idx);
    else f->next[Q[Q_TAIL]] = (uint32_t)idx;
    st(&Q[Q_TAIL], idx);
    st(&Q[Q_COUNT], n + 1);
    Q[Q_PUTS]++;
}

/* Unlink q's head (count > 0, checked by queue_check): its index. The
 * word still says QUEUED: the caller hands it out (the commit). */
static int queue_unlink(Core *f, uint64_t q, uint64_t *out) {
    uint64_t *Q = QUEUE(f, q);
    uint64_t n = Q[Q_COUNT], head = Q[Q_HEAD];
    uint64_t w = f->words[head];
    if (W_STATE(w) != ST_QUEUED || W_OWNER(w) != q + 1)
        return corrupt(f, "queue %llu's head is slot %llu, which is not in it", q, head);
    uint64_t nx = n > 1 ? f->next[head] : NO_SLOT;
    if (n > 1 && nx >= f->capacity) return corrupt(f, "queue %llu links slot %llu to nowhere", q, head);
    st(&Q[Q_HEAD], nx);
    if (n == 1) st(&Q[Q_TAIL], NO_SLOT);
    st(&Q[Q_COUNT], n - 1);
    Q[Q_GETS]++;
    *out = head;
    return RC_OK;
}

/* put of n handles (lock held): all checked first (held by this process
 * under their generation), then all or nothing: room for every one, else
 * RC_SLEEP (registered) or RC_FAIL. *bad: which handle was refused. */
static int queue_put_step(Core *f, uint64_t q, const int64_t *src, Py_ssize_t n, int mode, Py_ssize_t *bad) {
    int r = check_header(f);
    if (r != RC_OK) return r;
    if ((r = queue_check(f, q)) != RC_OK) return r;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = (uint64_t)src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = idx < f->capacity ? ld(&f->words[idx]) : 0;
        if (idx >= f->capacity || W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
            if (idx < f->capacity) describe(f, w, gen);
            else snprintf(f->msg, sizeof f->msg, "its slot is beyond the capacity");
            *bad = i;
            return RC_INVALID;
        }
        if (W_OWNER(w) != f->me) {
            snprintf(f->msg, sizeof f->msg, "held by another process, not this one (it must adopt() it first)");
            *bad = i;
            return RC_INVALID;
        }
    }
    uint64_t *Q = QUEUE(f, q);
    if (Q[Q_COUNT] + (uint64_t)n > Q[Q_DEPTH]) {
        if (mode == MODE_SLEEP) {
            __atomic_add_fetch(&Q[Q_PUTTERS], 1, __ATOMIC_SEQ_CST); /* which kind sleeps: see queue_move */
            sleeper_add_ch(f, (int)q + 1, 1);
            return RC_SLEEP;
        }
        return RC_FAIL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = (uint64_t)src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = mkword(ST_HELD, f->me, gen);
        if (!cas(&f->words[idx], w, mkword(ST_QUEUED, q + 1, gen))) { /* freed meanwhile by another process */
            snprintf(f->msg, sizeof f->msg, "freed by another process at the same moment");
            *bad = i;
            return RC_INVALID; /* the ones before it are queued: said in the message */
        }
        CRASH(CP_QUEUE_PUT); /* queued by its word, not yet linked */
        queue_link(f, q, idx);
    }
    if (ld(&Q[Q_WAITERS])) f->qwake = (int)q + 1; /* getters sleeping: one more element */
    return RC_OK;
}

/* get of up to max_n (lock held): the queue's first elements, now held by
 * this process (their handles unchanged), into dst; *got. */
static int queue_get_step(Core *f, uint64_t q, int64_t *dst, Py_ssize_t max_n, int mode, Py_ssize_t *got) {
    int r = check_header(f);
    if (r != RC_OK) return r;
    if ((r = queue_check(f, q)) != RC_OK) return r;
    uint64_t *Q = QUEUE(f, q);
    if (Q[Q_COUNT] == 0) {
        if (mode == MODE_SLEEP) {
            sleeper_add_ch(f, (int)q + 1, 1);
            return RC_SLEEP;
        }
        return RC_FAIL;
    }
    Py_ssize_t k = 0;
    while (k < max_n && Q[Q_COUNT] > 0) {
        uint64_t idx;
        if ((r = queue_unlink(f, q, &idx)) != RC_OK) break;
        CRASH(CP_QUEUE_GET); /* unlinked, its word still QUEUED */
        uint64_t gen = W_GEN(f->words[idx]);
        st(&f->words[idx], mkword(ST_HELD, f->me, gen)); /* the commit: ours now */
        dst[k++] = (int64_t)(idx | gen << HGEN_SHIFT);
    }
    *got = k;
    if (k && ld(&Q[Q_WAITERS])) f->qwake = (int)q + 1; /* putters sleeping: more room */
    return k ? RC_OK : r;
}

/* Before a blocked put or get registers and sleeps (two system calls and a
 * wake-up of some ten microseconds), poll the queue's count for a short
 * while without the lock or the GIL: in a busy pipeline the other side
 * usually makes room, or puts the next element, well within it. */
static void queue_spin(Core *f, uint64_t q, int kind, uint64_t n, uint64_t deadline) {
    uint64_t *count = &QUEUE(f, q)[Q_COUNT], depth = ld(&QUEUE(f, q)[Q_DEPTH]);
    uint64_t until = now_ns() + QUEUE_SPIN_NS;
    if (deadline && deadline < until) until = deadline;
    if (kind == 0 ? ld(count) + n <= depth : ld(count) > 0) return;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1;; i++) {
        cpu_relax();
        if (kind == 0 ? ld(count) + n <= depth : ld(count) > 0) break;
        if (i % 64 == 0) {
            if (now_ns() >= until) break;
            sched_yield(); /* on a busy machine, let the other side run */
        }
    }
    Py_END_ALLOW_THREADS
}

/* _queue_move(kind, q, buffer, n, block, timeout_ns, retry_ns): put (kind
 * 0) the n handles of buffer into queue q, or get (kind 1) up to n from it
 * into buffer. Blocking waits sleep like a sleeping alloc (registered in
 * the critical section that found no room or nothing, woken after the
 * lock is released by the get or put that changes that). Returns how many
 * moved: n for a put, 1..n for a get, 0 if it would block (not `block`) or
 * the timeout passed. InvalidHandleError for a handle not held by this
 * process (nothing moved); PoolFormatError; PoolDestroyedError. */
/* Move n handles between data and queue q (kind 0: put, 1: get): the
 * number moved (0: full or empty until the deadline), or NULL with the
 * pool's error. */
static PyObject *queue_move(Core *f, int kind, unsigned long long q, int64_t *data, Py_ssize_t n, int block,
                            long long timeout_ns, long long retry_ns) {
    if (f->hdr == NULL || f->closing) return closed_error(f);
    f->busy++;
    uint64_t deadline = deadline_from(timeout_ns);
    Py_ssize_t moved = 0, bad = -1;
    int r, slept_woken = 0, passed = 0;
    for (;;) {
        int mode = block && !(deadline && now_ns() >= deadline) ? MODE_SLEEP : MODE_FAIL;
        if (mode == MODE_SLEEP && q < f->max_queues) queue_spin(f, q, kind, (uint64_t)n, deadline);
        r = lock_acquire(f, deadline);
        if (r != RC_OK) break;
        if (kind == 0) {
            r = queue_put_step(f, q, data, n, mode, &bad);
            if (r == RC_OK) moved = n;
        } else {
            r = queue_get_step(f, q, data, n, mode, &moved);
        }
        lock_release(f);
        if (after_unlock(f) < 0) {
            if (r == RC_SLEEP) {
                sleeper_add_ch(f, (int)q + 1, -1);
                if (kind == 0) __atomic_sub_fetch(&QUEUE(f, q)[Q_PUTTERS], 1, __ATOMIC_SEQ_CST);
            }
            r = RC_SIGNAL;
            break;
        }
        if (r != RC_SLEEP) break;
        /* A queue's putters and getters share its channel: a token we took
         * and could not use may have been posted for a sleeper of the other
         * kind (a put that made room, taken by a getter that then found the
         * queue empty). Pass it on rather than swallow it; both kinds can
         * never be unable at once, so it ends with one that can. */
        if (slept_woken && !passed) {
            uint64_t all = ld(&QUEUE(f, q)[Q_WAITERS]), putters = ld(&QUEUE(f, q)[Q_PUTTERS]);
            uint64_t others = kind == 0 ? (all > putters ? all - putters : 0) : putters;
            sem_t *sem = sem_of(f, (int)q + 1);
            if (others && sem) {
                sem_post(sem); /* once a call: a chain of passes ends */
                passed = 1;
            }
        }
        uint64_t until = now_ns() + (uint64_t)(retry_ns > 0 ? retry_ns : 1);
        if (deadline && deadline < until) until = deadline;
        r = sleep_until_ch(f, (int)q + 1, until);
        if (kind == 0) __atomic_sub_fetch(&QUEUE(f, q)[Q_PUTTERS], 1, __ATOMIC_SEQ_CST);
        if (r != RC_OK) break;
        slept_woken = f->woken;
    }
    if (r == RC_OK) return leave(f, PyLong_FromSsize_t(moved));
    if (r == RC_FAIL || r == RC_TIMEOUT) return leave(f, PyLong_FromLong(0));
    if (r == RC_INVALID && bad >= 0) return leave(f, invalid(f, (uint64_t)((int64_t *)data)[bad]));
    if (r == RC_INVALID) {
        PyErr_SetString(PyExc_ValueError, f->msg);
        return leave(f, NULL);
    }
    return leave(f, raise_for(f, r));
}

static PyObject *Core_queue_move(Core *f, PyObject *args) {
    int kind, block;
    unsigned long long q;
    PyObject *obj;
    Py_ssize_t n;
    long long timeout_ns, retry_ns;
    if (!PyArg_ParseTuple(args, "iKOnpLL", &kind, &q, &obj, &n, &block, &timeout_ns, &retry_ns)) return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(obj, &buf, (kind ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (n < 1 || buf.len < n * 8) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "n out of range, or the buffer too small");
        return NULL;
    }
    PyObject *res = queue_move(f, kind, q, (int64_t *)buf.buf, n, block, timeout_ns, retry_ns);
    PyBuffer_Release(&buf);
    return res;
}

/* The arguments of _qput and _qget after their first: q, block, timeout_ns
 * (-1: none), retry_ns. */
static int queue_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, unsigned long long *q, int *block,
                      long long *timeout_ns, long long *retry_ns) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    *q = PyLong_AsUnsignedLongLong(args[0]);
    if (*q == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if ((*block = PyObject_IsTrue(args[1])) < 0) return -1;
    *timeout_ns = PyLong_AsLongLong(args[2]);
    if (*timeout_ns == -1 && PyErr_Occurred()) return -1;
    *retry_ns = PyLong_AsLongLong(args[3]);
    if (*retry_ns == -1 && PyErr_Occurred()) return -1;
    return 0;
}

/* _qput(q, block, timeout_ns, retry_ns, handle): one element's put in one
 * call: 1 put, 0 still full at the deadline, -1 not a handle of this pool
 * (the caller decodes it again for the error); the pool's errors raise. */
static PyObject *Core_qput(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    unsigned long long q;
    int block;
    long long timeout_ns, retry_ns;
    if (queue_args(args, nargs, 5, &q, &block, &timeout_ns, &retry_ns) < 0) return NULL;
    uint64_t idx, gen;
    if (!decode(f, args[4], &idx, &gen)) return PyLong_FromLong(-1);
    int64_t one = (int64_t)(idx | gen << HGEN_SHIFT);
    return queue_move(f, 0, q, &one, 1, block, timeout_ns, retry_ns);
}

/* _qget(q, block, timeout_ns, retry_ns): one element's get in one call: its
 * handle, or None if the queue stayed empty until the deadline. */
static PyObject *Core_qget(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    unsigned long long q;
    int block;
    long long timeout_ns, retry_ns;
    if (queue_args(args, nargs, 4, &q, &block, &timeout_ns, &retry_ns) < 0) return NULL;
    int64_t one = -1;
    PyObject *res = queue_move(f, 1, q, &one, 1, block, timeout_ns, retry_ns);
    if (res == NULL) return NULL;
    long moved = PyLong_AsLong(res);
    Py_DECREF(res);
    if (moved <= 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(one);
}

/* The queue's wait channel, made with the pool's permissions (a syscall
 * under the lock, no Python). Without it blocked calls fall back to naps. */
static void create_queue_sem(Core *f, uint64_t q) {
    char nm[340], path[400];
    snprintf(nm, sizeof nm, "%s%llu", f->qsem_prefix, (unsigned long long)q);
    struct stat sb;
    mode_t mode = f->fd >= 0 && fstat(f->fd, &sb) == 0 ? (sb.st_mode & 0777) : 0600;
    sem_t *sem = sem_open(nm, O_CREAT, mode, 0);
    if (sem == SEM_FAILED) return;
    snprintf(path, sizeof path, "/dev/shm/sem.%s", nm + 1);
    chmod(path, mode); /* exactly the pool's mode, whatever the umask */
    if (f->qsem[q]) sem_close(f->qsem[q]);
    f->qsem[q] = sem;
}

/* _queue_open(name, depth): the index of queue `name` (bytes); created
 * with `depth` if missing and depth > 0. (index, depth); -1 as the index if
 * missing and depth is 0; -2 if the table is full. */
static PyObject *Core_queue_open(Core *f, PyObject *args) {
    const char *name;
    Py_ssize_t len;
    unsigned long long depth;
    if (!PyArg_ParseTuple(args, "y#K", &name, &len, &depth)) return NULL;
    if (len < 1 || len >= QUEUE_NAME_BYTES || depth > f->capacity) {
        PyErr_SetString(PyExc_ValueError, "queue name or depth out of range");
        return NULL;
    }
    ENTER(f);
    char padded[QUEUE_NAME_BYTES];
    memset(padded, 0, sizeof padded);
    memcpy(padded, name, (size_t)len);
    long long index = -1;
    uint64_t have = 0;
    int r = lock_acquire(f, 0);
    if (r == RC_OK) {
        r = check_header(f);
        int64_t vacant = -1;
        for (uint64_t q = 0; r == RC_OK && q < f->max_queues; q++) {
            uint64_t *Q = QUEUE(f, q);
            if (Q[Q_STATE] != QUEUE_LIVE) {
                if (vacant < 0) vacant = (int64_t)q;
                continue;
            }
            if (memcmp(Q + Q_NAME, padded, QUEUE_NAME_BYTES) == 0) {
                index = (long long)q;
                have = Q[Q_DEPTH];
                break;
            }
        }
        if (r == RC_OK && index < 0 && depth > 0) {
            if (vacant < 0) index = -2;
            else {
                uint64_t *Q = QUEUE(f, (uint64_t)vacant);
                memcpy(Q + Q_NAME, padded, QUEUE_NAME_BYTES);
                st(&Q[Q_DEPTH], depth);
                st(&Q[Q_COUNT], 0);
                st(&Q[Q_HEAD], NO_SLOT);
                st(&Q[Q_TAIL], NO_SLOT);
                Q[Q_PUTS] = Q[Q_GETS] = 0;
                st(&Q[Q_WAITERS], 0);
                st(&Q[Q_PUTTERS], 0);
                create_queue_sem(f, (uint64_t)vacant);
                st(&Q[Q_STATE], QUEUE_LIVE); /* last: the queue exists */
                index = vacant;
                have = depth;
            }
        }
        lock_release(f);
    }
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_BuildValue("LK", index, (unsigned long long)have));
}

/* _queue_count(q): how many elements queue q holds now (lock-free: a
 * single load, exact at that instant). */
static PyObject *Core_queue_count(Core *f, PyObject *arg) {
    unsigned long long q = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (f->hdr == NULL || f->closing) return closed_error(f);
    if (q >= f->max_queues) {
        PyErr_SetString(PyExc_ValueError, "no such queue");
        return NULL;
    }
    uint64_t n = ld(&QUEUE(f, q)[Q_COUNT]);
    return PyLong_FromUnsignedLongLong(n < f->capacity ? n : f->capacity);
}

/* ------------------------------------------------------------------ */
/* Element views                                                       */

static PyObject *STR_BUFFER_SLOW, *STR_NDARRAY_SLOW;

/* The slot of a handle this object may view: held now under its
 * generation (a single load: the caller holds the handle, so nobody else
 * may change the word). -1 if anything is unusual (the slow path says what). */
static int64_t viewable(Core *f, PyObject *handle) {
    uint64_t idx, gen;
    if (f->hdr == NULL || f->closing || f->data_mv == NULL || !decode(f, handle, &idx, &gen)) return -1;
    uint64_t w = ld(&f->words[idx]);
    if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) return -1;
    return (int64_t)idx;
}

/* buffer(handle): a writable memoryview of the element's bytes: a slice of
 * the slots' memoryview, so it keeps the mapping alive after close(). */
static PyObject *Core_buffer(Core *f, PyObject *handle) {
    int64_t idx = viewable(f, handle);
    if (idx < 0) {
        PyObject *a[2] = {NULL, handle};
        return call_owner(f, STR_BUFFER_SLOW, a, 2);
    }
    Py_ssize_t off = (Py_ssize_t)((uint64_t)idx * f->stride);
    return PySequence_GetSlice(f->data_mv, off, off + (Py_ssize_t)f->slot_size);
}

/* ndarray(handle, dtype=uint8, shape=None): a zero-copy numpy view of the
 * element, based on a memoryview of the slots (which keeps the mapping). */
static PyObject *Core_ndarray(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *handle = NULL, *dtype = Py_None, *shape = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs >= 1) handle = args[0];
    if (nargs >= 2) dtype = args[1];
    if (nargs >= 3) shape = args[2];
    int simple = nargs >= 1 && nargs <= 3;
    for (Py_ssize_t i = 0; i < nkw && simple; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "dtype") == 0 && nargs < 2) dtype = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "shape") == 0 && nargs < 3) shape = args[nargs + i];
        else simple = 0;
    }
    int64_t idx = simple ? viewable(f, handle) : -1;
    PyArray_Descr *descr = NULL;
    if (idx >= 0) {
        if (dtype == Py_None) {
            descr = PyArray_DescrFromType(NPY_UINT8);
        } else if (dtype == f->last_dtype && f->last_descr) {
            descr = f->last_descr;
            Py_INCREF(descr);
        } else {
            if (!PyArray_DescrConverter(dtype, &descr)) PyErr_Clear(), descr = NULL;
            else if (descr) {
                Py_XSETREF(f->last_dtype, Py_NewRef(dtype));
                Py_XSETREF(f->last_descr, descr);
                Py_INCREF(descr);
            }
        }
    }
    npy_intp dims[NPY_MAXDIMS];
    int nd = 0;
    if (descr) {
        Py_ssize_t item = PyDataType_ELSIZE(descr);
        npy_intp total = 1;
        if (item < 1 || PyDataType_REFCHK(descr)) nd = -1;
        else if (shape == Py_None) {
            dims[0] = (npy_intp)(f->slot_size / (uint64_t)item);
            nd = 1;
            total = dims[0];
        } else if (PyLong_CheckExact(shape)) {
            dims[0] = PyLong_AsSsize_t(shape);
            nd = 1;
            total = dims[0];
        } else if (PyTuple_CheckExact(shape) && PyTuple_GET_SIZE(shape) <= NPY_MAXDIMS) {
            nd = (int)PyTuple_GET_SIZE(shape);
            for (int i = 0; i < nd && nd >= 0; i++) {
                PyObject *d = PyTuple_GET_ITEM(shape, i);
                dims[i] = PyLong_CheckExact(d) ? PyLong_AsSsize_t(d) : -1;
                if (dims[i] < 0 || (dims[i] && total > PY_SSIZE_T_MAX / dims[i])) nd = -1;
                else total *= dims[i];
            }
        } else nd = -1;
        if (PyErr_Occurred()) PyErr_Clear(), nd = -1;
        if (nd >= 0 && (dims[0] < 0 || (uint64_t)total * (uint64_t)item > f->slot_size)) nd = -1;
        if (nd < 0) Py_CLEAR(descr);
    }
    if (!descr) { /* anything unusual: the Python path checks and says what */
        PyObject *a[4] = {NULL, nargs >= 1 ? args[0] : Py_None, dtype, shape};
        if (nargs < 1) {
            PyErr_SetString(PyExc_TypeError, "ndarray() needs a handle");
            return NULL;
        }
        return call_owner(f, STR_NDARRAY_SLOW, a, 4);
    }
    char *ptr = (char *)f->data + (uint64_t)idx * f->stride;
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, ptr, NPY_ARRAY_CARRAY, NULL);
    if (!arr) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef(f->data_mv)) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* _set_data(memoryview): the slots' memoryview that views are cut from. */
static PyObject *Core_set_data(Core *f, PyObject *mv) {
    if (!PyMemoryView_Check(mv)) {
        PyErr_SetString(PyExc_TypeError, "a memoryview of the slots");
        return NULL;
    }
    Py_XSETREF(f->data_mv, Py_NewRef(mv));
    Py_RETURN_NONE;
}

/* _test_lock() / _test_unlock(): take and release the pool lock as this
 * process, for tests (a child that holds it, then is stopped or killed). */
static PyObject *Core_test_lock(Core *f, PyObject *unused) {
    ENTER(f);
    int r = lock_acquire(f, 0);
    if (r != RC_OK) return leave(f, raise_for(f, r));
    return leave(f, Py_NewRef(Py_None));
}

static PyObject *Core_test_unlock(Core *f, PyObject *unused) {
    ENTER(f);
    if (ld(&f->hdr[H_LOCK_OWNER]) != f->token) {
        PyErr_SetString(PyExc_RuntimeError, "this process does not hold the pool lock");
        return leave(f, NULL);
    }
    lock_release(f);
    if (after_unlock(f) < 0) return leave(f, NULL);
    return leave(f, Py_NewRef(Py_None));
}

static int Core_init(Core *f, PyObject *args, PyObject *kwds) {
    PyObject *buf;
    Py_ssize_t off_words, off_stack, off_arena, off_next, off_procs, off_queues, max_queues, off_slots, max_procs;
    unsigned long long capacity, stride, slot_size;
    int poison;
    const char *lock_name, *wait_name, *name, *qprefix;
    if (!PyArg_ParseTuple(args, "OnnnnnnnnnKKKpssss", &buf, &off_words, &off_stack, &off_arena, &off_next, &off_procs,
                          &off_queues, &max_queues, &off_slots, &max_procs, &capacity, &stride, &slot_size, &poison,
                          &lock_name, &wait_name, &name, &qprefix))
        return -1;
    snprintf(f->qsem_prefix, sizeof f->qsem_prefix, "%s", qprefix);
    snprintf(f->name, sizeof f->name, "%s", name);
    if (f->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Core initialised twice");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &f->view, PyBUF_WRITABLE) < 0) return -1;
    f->have_view = 1;
    Py_ssize_t len = f->view.len;
    if (capacity < 1 || capacity > INDEX_MASK || max_procs < 1 || (uint64_t)max_procs >= OWNER_MASK ||
        slot_size < 1 || stride < slot_size || len < 8 * HEADER_WORDS || off_words < 8 * HEADER_WORDS ||
        off_words + (Py_ssize_t)(8 * capacity) > len || off_stack < 0 || off_stack + (Py_ssize_t)(4 * capacity) > len ||
        off_arena < 0 || off_arena + (Py_ssize_t)(4 * capacity) > len || off_next < 0 ||
        off_next + (Py_ssize_t)(4 * capacity) > len || off_queues < 0 || off_queues % 8 || max_queues < 0 ||
        max_queues > MAX_QUEUES || off_queues + max_queues * QUEUE_WORDS * 8 > len ||
        off_procs < 0 || off_procs % 8 ||
        off_procs + max_procs * PROC_WORDS * 8 > len || off_slots < 0 ||
        (uint64_t)off_slots + stride * capacity > (uint64_t)len) {
        PyErr_SetString(PyExc_ValueError, "geometry outside the mapping");
        return -1;
    }
    char *base = (char *)f->view.buf;
    f->hdr = (uint64_t *)base;
    f->words = (uint64_t *)(base + off_words);
    f->stack = (uint32_t *)(base + off_stack);
    f->arena = (uint32_t *)(base + off_arena);
    f->next = (uint32_t *)(base + off_next);
    f->queues = (uint64_t *)(base + off_queues);
    f->max_queues = (uint64_t)max_queues;
    f->registry = (uint64_t *)(base + off_procs);
    f->data = (unsigned char *)(base + off_slots);
    f->capacity = capacity;
    f->stride = stride;
    f->slot_size = slot_size;
    f->max_procs = (uint64_t)max_procs;
    f->off_procs = (uint64_t)off_procs;
    f->poison = poison;
    f->fd = -1;
    f->poisoned = -1;
    /* The same named semaphores as posix_ipc's objects. */
    f->lock_sem = sem_open(lock_name, 0);
    if (f->lock_sem == SEM_FAILED) f->lock_sem = NULL;
    f->wait_sem = sem_open(wait_name, 0);
    if (f->wait_sem == SEM_FAILED) f->wait_sem = NULL;
    return 0;
}

static void release_view(Core *f) {
    for (int i = 0; i < FIFO_CACHE; i++) {
        if (f->fifo_w[i].fd1) close(f->fifo_w[i].fd1 - 1);
        f->fifo_w[i].fd1 = 0;
    }
    for (int q = 0; q < MAX_QUEUES; q++) {
        if (f->qsem[q]) sem_close(f->qsem[q]);
        f->qsem[q] = NULL;
    }
    if (f->lock_sem) sem_close(f->lock_sem);
    if (f->wait_sem) sem_close(f->wait_sem);
    f->lock_sem = f->wait_sem = NULL;
    f->enabled = 0;
    f->hdr = f->words = f->registry = f->entry = NULL;
    f->stack = f->arena = f->cache = f->next = NULL;
    f->queues = NULL;
    f->data = NULL;
    if (f->have_view) {
        f->have_view = 0;
        PyBuffer_Release(&f->view);
    }
}

/* _unmap(): let go of the mapping (close). A call under way on another
 * thread (or interrupted by the signal handler that closes) finishes first:
 * the mapping is released when the last call returns. */
static PyObject *Core_unmap(Core *f, PyObject *unused) {
    f->closing = 1;
    f->enabled = 0;
    if (f->busy == 0) release_view(f);
    Py_RETURN_NONE;
}

static PyObject *Core_set_owner(Core *f, PyObject *owner) {
    PyObject *ref = PyWeakref_NewRef(owner, NULL);
    if (!ref) return NULL;
    Py_XSETREF(f->owner, ref);
    Py_RETURN_NONE;
}

static void Core_dealloc(Core *f) {
    release_view(f);
    Py_CLEAR(f->trace);
    Py_CLEAR(f->owner);
    Py_CLEAR(f->data_mv);
    Py_CLEAR(f->last_dtype);
    Py_CLEAR(f->last_descr);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *get_enabled(Core *f, void *c) { return PyBool_FromLong(f->enabled && f->entry != NULL); }
static int set_enabled(Core *f, PyObject *v, void *c) {
    int b = PyObject_IsTrue(v);
    if (b < 0) return -1;
    f->enabled = b && f->entry != NULL && !f->closing;
    return 0;
}
static PyObject *get_cache_n(Core *f, void *c) {
    if (!f->entry || !f->hdr) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(cached_by(f, f->me - 1));
}
static PyObject *get_recoveries(Core *f, void *c) { return PyLong_FromUnsignedLongLong(f->recoveries); }
static PyObject *get_entry(Core *f, void *c) { return PyLong_FromLongLong((long long)f->me - 1); }
static PyObject *get_trace_cb(Core *f, void *c) { return Py_NewRef(f->trace ? f->trace : Py_None); }
static int set_trace_cb(Core *f, PyObject *v, void *c) {
    Py_XSETREF(f->trace, v == NULL || v == Py_None ? NULL : Py_NewRef(v));
    return 0;
}

static PyGetSetDef Core_getset[] = {
    {"_enabled", (getter)get_enabled, (setter)set_enabled, "whether this object uses its process's cache", NULL},
    {"_cache_n", (getter)get_cache_n, NULL, "slots in this process's cache", NULL},
    {"_recoveries", (getter)get_recoveries, NULL, "times this object took the lock over from a dead owner", NULL},
    {"_entry", (getter)get_entry, NULL, "this process's registry entry (-1: none)", NULL},
    {"_trace_cb", (getter)get_trace_cb, (setter)set_trace_cb, "the trace callback, called outside the lock", NULL},
    {NULL},
};

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
static PyMethodDef Core_methods[] = {
    M("alloc", Core_alloc, METH_FASTCALL | METH_KEYWORDS,
      "alloc($self, /, gfp=208, *, timeout=None)\n--\n\n"
      "Allocate one element; return its handle (an int). gfp defaults to\n"
      "GFP_KERNEL (208).\n\n"
      "The kernel's order: the arena first; if it fails, the top of the reserve.\n"
      "If the reserve is empty too, a gfp that may not sleep (GFP_ATOMIC,\n"
      "GFP_NOWAIT) returns None at once (it waits for the pool lock at most\n"
      "ATOMIC_LOCK_WAIT_SECONDS), while one that may (GFP_KERNEL, GFP_NOIO,\n"
      "GFP_NOFS) sleeps until a free refills the reserve, or for 5 s, and tries\n"
      "again: it never returns None. timeout (seconds) bounds the whole call,\n"
      "the wait for the lock included: TimeoutError. The element's bytes are\n"
      "not zeroed. TypeError/ValueError for a bad gfp; PoolClosedError,\n"
      "PoolDestroyedError, PoolFormatError (a damaged pool)."),
    M("free", Core_free, METH_O,
      "free($self, handle, /)\n--\n\n"
      "Return an element; None is ignored (as the kernel ignores NULL).\n\n"
      "While the reserve is below min_nr the element refills it and wakes the\n"
      "sleepers; otherwise it goes back to the arena. Any process may free any\n"
      "handle that is currently held. TypeError (not an int), ValueError (out\n"
      "of range), InvalidHandleError (not held: double free, stale, another\n"
      "pool's); a refused free changes nothing."),
    M("_alloc_core", Core_alloc_core, METH_VARARGS, "(sleeps, skip_arena, timeout_ns, retry_ns, lock_wait_ns)"),
    M("_alloc_preallocated_core", Core_alloc_preallocated, METH_NOARGS, "the reserve only"),
    M("_free_core", Core_free_core, METH_VARARGS, "(index, generation)"),
    M("_adopt_core", Core_adopt_core, METH_VARARGS, "(index, generation)"),
    M("_alloc_bulk_core", Core_alloc_bulk_core, METH_VARARGS, "(out, n, sleeps, timeout_ns, retry_ns, lock_wait_ns)"),
    M("_free_bulk_core", Core_free_bulk_core, METH_O, "(handles int64)"),
    M("_resize_core", Core_resize_core, METH_VARARGS, "(new_min_nr, batch)"),
    M("_destroy_core", Core_destroy_core, METH_O, "(force) -> None or (in_use, curr_nr, min_nr)"),
    M("_reclaim_core", Core_reclaim_core, METH_NOARGS, "take back dead processes' elements"),
    M("_stats_core", Core_stats_core, METH_O, "(out uint64)"),
    M("_set_faults", Core_set_faults, METH_VARARGS, "(rate, threshold, has_seed, seed)"),
    M("_format", Core_format, METH_O, "(min_nr)"),
    M("_register", Core_register, METH_VARARGS, "(fd, pid, start) -> (index, epoch)"),
    M("_bind", Core_bind, METH_VARARGS, "(fd, index, epoch) -> bool"),
    M("_drain_cache", Core_drain_cache, METH_O, "(wait_ns) -> bool"),
    M("_detach", Core_detach, METH_O, "(wait_ns) -> bool: vacate our entry if we hold nothing"),
    M("buffer", Core_buffer, METH_O,
      "buffer($self, handle, /)\n--\n\n"
      "A writable memoryview of the element's slot_size bytes. It stays valid\n"
      "after close() (the mapping lives while views do). InvalidHandleError if\n"
      "the handle is not held now."),
    M("ndarray", Core_ndarray, METH_FASTCALL | METH_KEYWORDS,
      "ndarray($self, handle, /, dtype=numpy.uint8, shape=None)\n--\n\n"
      "A zero-copy numpy view of the element. shape defaults to as many dtype\n"
      "items as fit in the slot; a shape that does not fit raises ValueError.\n"
      "Slots are 8-byte aligned. It keeps the mapping alive after close()."),
    M("_set_data", Core_set_data, METH_O, "(memoryview of the slots)"),
    M("_queue_move", Core_queue_move, METH_VARARGS, "(kind, q, buffer, n, block, timeout_ns, retry_ns) -> moved"),
    M("_free_bulk_fast", Core_free_bulk_fast, METH_O, "(handles) -> None, or NotImplemented for Python's checks"),
    M("_alloc_async_try", Core_alloc_async_try, METH_NOARGS, "() -> handle, None (registered), False (lock busy)"),
    M("_async_done", Core_async_done, METH_NOARGS, "count out an async sleeper"),
    M("_set_fifo_prefix", Core_set_fifo_prefix, METH_O, "(path prefix of the entries' asyncio wake-up FIFOs)"),
    M("_set_owner", Core_set_owner, METH_O, "(pool): the Mempool whose policy the slow paths call (held weakly)"),
    M("_qput", Core_qput, METH_FASTCALL, "(q, block, timeout_ns, retry_ns, handle) -> 1 put, 0 full, -1 not a handle"),
    M("_qget", Core_qget, METH_FASTCALL, "(q, block, timeout_ns, retry_ns) -> handle, or None when empty"),
    M("_queue_open", Core_queue_open, METH_VARARGS, "(name, depth) -> (index, depth)"),
    M("_queue_count", Core_queue_count, METH_O, "(q) -> count"),
    M("_test_lock", Core_test_lock, METH_NOARGS, "take the pool lock (tests)"),
    M("_test_unlock", Core_test_unlock, METH_NOARGS, "release the pool lock (tests)"),
    M("_unmap", Core_unmap, METH_NOARGS, "let go of the mapping (close)"),
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._fast.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_doc = "The pool lock and every transition of one pool (see the top of _fast.c).",
};

/* set_errors(PoolFormatError, PoolDestroyedError, InvalidHandleError,
 * PoolClosedError, PoisonWarning) */
static PyObject *mod_set_errors(PyObject *m, PyObject *args) {
    PyObject *a, *b, *c, *d, *e;
    if (!PyArg_ParseTuple(args, "OOOOO", &a, &b, &c, &d, &e)) return NULL;
    Py_XSETREF(ErrFormat, Py_NewRef(a));
    Py_XSETREF(ErrDestroyed, Py_NewRef(b));
    Py_XSETREF(ErrInvalid, Py_NewRef(c));
    Py_XSETREF(ErrClosed, Py_NewRef(d));
    Py_XSETREF(WarnPoison, Py_NewRef(e));
    Py_RETURN_NONE;
}

/* set_atomic_wait(ns): how long a call that may not sleep waits for the lock. */
static PyObject *mod_set_atomic_wait(PyObject *m, PyObject *arg) {
    unsigned long long ns = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    atomic_wait_ns = ns;
    Py_RETURN_NONE;
}

/* set_gfp_bits(mask): the gfp bits alloc() may take without Python's check. */
static PyObject *mod_set_gfp_bits(PyObject *m, PyObject *arg) {
    long bits = PyLong_AsLong(arg);
    if (bits == -1 && PyErr_Occurred()) return NULL;
    fast_gfp_bits = bits;
    Py_RETURN_NONE;
}

/* crash_at(point): a test hook: SIGKILL this process the next time it
 * reaches `point` ("" turns it off). */
static PyObject *mod_crash_at(PyObject *m, PyObject *arg) {
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    for (int i = 0; i < CP_N; i++) {
        if (strcmp(s, CRASH_POINTS[i]) == 0) {
            crash_point = i;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "no crash point %R", arg);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"set_errors", mod_set_errors, METH_VARARGS, "set_errors(format, destroyed, invalid, closed, poison_warning)"},
    {"set_atomic_wait", mod_set_atomic_wait, METH_O, "set_atomic_wait(ns)"},
    {"set_gfp_bits", mod_set_gfp_bits, METH_O, "set_gfp_bits(mask)"},
    {"crash_at", mod_crash_at, METH_O, "crash_at(point): SIGKILL this process at that point (tests)"},
    {NULL},
};

static struct PyModuleDef fastmodule = {PyModuleDef_HEAD_INIT, "shmpool._fast", NULL, -1, module_methods};

#define L(name) #name, (long long)(name)
PyMODINIT_FUNC PyInit__fast(void) {
    import_array();
    if (PyType_Ready(&CoreType) < 0) return NULL;
    STR_BUFFER_SLOW = PyUnicode_InternFromString("_buffer_slow");
    STR_NDARRAY_SLOW = PyUnicode_InternFromString("_ndarray_slow");
    PyObject *m = PyModule_Create(&fastmodule);
    if (!m) return NULL;
    GFP_KERNEL_OBJ = PyLong_FromLong(0xD0);
    STR_ALLOC_SLOW = PyUnicode_InternFromString("_alloc_slow");
    STR_FREE_SLOW = PyUnicode_InternFromString("_free_slow");
    Py_INCREF(&CoreType);
    PyModule_AddObject(m, "Core", (PyObject *)&CoreType);
    PyObject *layout = Py_BuildValue(
        "{sLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsL}",
        L(HEADER_WORDS), L(H_FLAGS), L(H_STATUS), L(H_MIN_NR), L(H_CURR_NR), L(H_ARENA_FREE), L(H_NR_WAITERS),
        L(H_EPOCH), L(H_FAIL_RATE), L(H_FAIL_THRESHOLD), L(H_SEED), L(H_RNG), L(H_LOCK_OWNER), L(H_LOCK_SINCE_NS),
        L(H_LOCK_WAITERS), L(H_LOCK_SEQ), L(H_ALLOC_FAILED), L(H_RECOVERIES), L(H_RECLAIMED), L(H_ENTRIES_USED), L(H_ASYNC_WAITERS), L(P_ASYNC), L(FLAG_POISON),
        L(STATUS_LIVE), L(STATUS_DESTROYED), L(ST_ARENA), L(ST_RESERVE), L(ST_HELD), L(ST_CACHED), L(ST_QUEUED), L(Q_NAME),
        L(QUEUE_NAME_BYTES), L(Q_STATE), L(Q_DEPTH), L(Q_COUNT), L(Q_HEAD), L(Q_TAIL), L(Q_PUTS), L(Q_GETS),
        L(QUEUE_WORDS), L(QUEUE_LIVE), L(NO_SLOT), L(Q_WAITERS), L(Q_PUTTERS), L(P_QSLEEP), L(MAX_QUEUES), L(STATE_MASK),
        L(OWNER_SHIFT), L(OWNER_MASK), L(GEN_SHIFT), L(GEN_MASK), L(INDEX_MASK), L(HGEN_SHIFT), L(P_PID),
        L(P_START), L(P_SLEEPING), L(P_CACHE_N), L(P_EPOCH), L(P_COUNTERS), L(N_PROC_COUNTERS), L(P_CACHE),
        L(CACHE_MAX), L(PROC_WORDS), L(CACHE_BLANK), L(C_ALLOC_ARENA), L(C_ALLOC_RESERVE), L(C_ALLOC_FAILED),
        L(C_FREE_RESERVE), L(C_FREE_ARENA), L(C_SLEEPS), L(C_FAULTS), L(C_POISON));
    PyModule_AddObject(m, "LAYOUT", layout);
    return m;
}
