/* lock.c: the pool lock, and who is alive.
 *
 * The lock
 * --------
 * The header word H_LOCK_OWNER is the lock: 0 when free, else the holder's
 * token (entry + 1) | epoch << 16, stored by compare-and-swap: the same
 * atomic step takes the lock and records who holds it, so a hold is never
 * anonymous. Only C code holds it, for one call that runs no Python code.
 *
 * What it guards: every move of a slot word into or out of the reserve and
 * the shared arena, the reserve stack and curr_nr, the arena's free list and
 * arena_free, min_nr, the status word, queues, the registry entries of dead
 * processes, the fault injector's settings and the header's counters. A
 * process's own cache moves without it (arena.c), sleeper counts are atomic.
 *
 * Contenders spin briefly (critical sections last some hundred nanoseconds),
 * looking at the word less often the longer they spin, then count
 * themselves in H_LOCK_WAITERS, look once more, and wait on the word as a
 * futex (its low 32 bits) in slices of LOCK_SLICE_NS. A releaser stores 0
 * and, if it sees a waiter, wakes one, unless one it woke has not run yet
 * (H_LOCK_WAKING, cleared by a waiter as it leaves its wait): on a machine
 * with more processes than CPUs, waking another at every release while the
 * first waits for a CPU is a system call per critical section for nothing.
 * Both sides use sequentially consistent operations, so either the
 * releaser sees the waiter or the waiter sees the lock free: no wake-up is
 * lost (a woken waiter that dies before it clears the flag leaves the others
 * to their slice).
 *
 * Takeover: a contender whose slice ran out on the same holder looks at it:
 * the lock is taken over (by CAS from that exact token, so one contender
 * wins) only from an owner proven dead: its registry entry holds another
 * epoch, or nobody holds the OFD lock on the entry's byte of the segment
 * file (the kernel drops it when its process dies, in any pid namespace). A
 * stopped, traced or starved holder is alive and is never taken over from;
 * every wait is bounded by its caller's deadline instead (mempool.c, run).
 * The winner repairs the pool (repair.c) before anything else.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>

#include "pool.h"

/* 1 if some open file description holds the OFD lock on entry e's byte
 * (its process lives), 0 if none does. When it cannot tell, alive. */
int entry_locked(const struct pool *p, uint64_t e) {
    if (p->fd < 0) return 1;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(p->off_procs + 8ull * PROC_WORDS * e);
    fl.l_len = 1;
    if (fcntl(p->fd, F_OFD_GETLK, &fl) < 0) return 1;
    return fl.l_type != F_UNLCK;
}

/* Whether the entry behind owner field o (entry + 1) is a live process. */
int owner_alive(const struct pool *p, uint64_t o) {
    if (o == 0 || o > p->max_procs) return 0;
    if (o == p->me) return 1;
    if (ld(&ENTRY(p, o - 1)[P_EPOCH]) == 0) return 0;
    return entry_locked(p, o - 1);
}

/* Whether the lock token tok names a live holder. */
int token_alive(const struct pool *p, uint64_t tok) {
    uint64_t o = tok & OWNER_MASK, epoch = tok >> 16;
    if (o == 0 || o > p->max_procs || epoch == 0) return 0;
    if (tok == p->token) return 1;
    if (ld(&ENTRY(p, o - 1)[P_EPOCH]) != epoch) return 0;
    return o == p->me || entry_locked(p, o - 1);
}

static inline void note_locked(struct pool *p) {
    struct timespec ts; /* for people (how long a holder has held it): the coarse clock is enough and cheaper */
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    st(&p->hdr[H_LOCK_SINCE_NS], (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
    p->hdr[H_LOCK_SEQ]++;
}

int lock_try(struct pool *p) {
    uint64_t free_ = 0;
    if (!__atomic_compare_exchange_n(&p->hdr[H_LOCK_OWNER], &free_, p->token, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return 0;
    note_locked(p);
    return 1;
}

int lock_held_by_us(const struct pool *p) {
    return p->token != 0 && __atomic_load_n(&p->hdr[H_LOCK_OWNER], __ATOMIC_SEQ_CST) == p->token;
}

void lock_release(struct pool *p) {
    __atomic_store_n(&p->hdr[H_LOCK_OWNER], 0, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->hdr[H_LOCK_WAITERS], __ATOMIC_SEQ_CST) != 0 &&
        !__atomic_exchange_n(&p->hdr[H_LOCK_WAKING], 1, __ATOMIC_SEQ_CST))
        futex_wake32(futex_word(&p->hdr[H_LOCK_OWNER]), 1);
}

/* Take the lock over from `tok`, proven dead; then repair. */
static int take_over(struct pool *p, uint64_t tok) {
    uint64_t expected = tok;
    if (!__atomic_compare_exchange_n(&p->hdr[H_LOCK_OWNER], &expected, p->token, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return 0;
    note_locked(p);
    uint64_t o = tok & OWNER_MASK;
    p->taken_from_pid = o >= 1 && o <= p->max_procs ? ld(&ENTRY(p, o - 1)[P_PID]) : 0;
    p->hdr[H_RECOVERIES]++;
    p->recoveries++;
    repair(p);
    return 1;
}

/* Take the pool lock by `deadline` (monotonic ns; NO_DEADLINE: none), and
 * within bound_ns from now (-1: no bound). Between waits (the lock not
 * held) signal handlers run: one that raises ends the wait (RC_SIGNAL).
 * RC_CLOSED if the object was closed meanwhile, RC_TIMEOUT at the deadline. */
int lock_acquire(struct pool *p, uint64_t deadline, int64_t bound_ns) {
    if (lock_try(p)) return RC_OK;
    for (int spun = 0, gap = 1; spun < LOCK_SPINS; spun += gap, gap = gap < LOCK_GAP_MAX ? 2 * gap : gap) {
        for (int k = 0; k < gap; k++) cpu_relax();
        if (__atomic_load_n(&p->hdr[H_LOCK_OWNER], __ATOMIC_RELAXED) == 0 && lock_try(p)) return RC_OK;
    }
    if (bound_ns >= 0) deadline = earlier(deadline, deadline_in(bound_ns)); /* (the spin is microseconds) */
    uint64_t watched = 0, since = 0; /* the holder we have waited on, and since when */
    for (;;) {
        __atomic_add_fetch(&p->hdr[H_LOCK_WAITERS], 1, __ATOMIC_SEQ_CST);
        uint64_t tok = __atomic_load_n(&p->hdr[H_LOCK_OWNER], __ATOMIC_SEQ_CST);
        if (tok != 0 && !p->closing) {
            uint64_t now = now_ns();
            if (tok != watched) watched = tok, since = now;
            p->waiting++;
            futex_wait32(futex_word(&p->hdr[H_LOCK_OWNER]), (uint32_t)tok, earlier(now + LOCK_SLICE_NS, deadline));
            p->waiting--;
        }
        __atomic_sub_fetch(&p->hdr[H_LOCK_WAITERS], 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->hdr[H_LOCK_WAKING], __ATOMIC_RELAXED)) /* woken (or not): the next release wakes again */
            __atomic_store_n(&p->hdr[H_LOCK_WAKING], 0, __ATOMIC_SEQ_CST);
        if (p->closing) return RC_CLOSED;
        if (lock_try(p)) return RC_OK;
        if (host.signals() < 0) return RC_SIGNAL;
        tok = __atomic_load_n(&p->hdr[H_LOCK_OWNER], __ATOMIC_SEQ_CST);
        if (tok != 0 && tok == watched && now_ns() - since >= LOCK_SLICE_NS) {
            if (!token_alive(p, tok) && take_over(p, tok)) return RC_OK;
            since = now_ns(); /* alive: look again a slice from now */
        }
        if (passed(deadline)) {
            /* A wake-up meant for us that we leave unused passes on. */
            if (__atomic_load_n(&p->hdr[H_LOCK_OWNER], __ATOMIC_SEQ_CST) == 0 &&
                __atomic_load_n(&p->hdr[H_LOCK_WAITERS], __ATOMIC_SEQ_CST) != 0)
                futex_wake32(futex_word(&p->hdr[H_LOCK_OWNER]), 1);
            return RC_TIMEOUT;
        }
    }
}
