/* wake.c: wait channels, the kernel's wait queue across processes.
 *
 * A channel is a sequence word in the segment, used as a futex, with a
 * count of its sleepers. Channel 0 is the pool's (sleeping allocations,
 * woken when a free refills the reserve); each queue has two, one for its
 * getters (woken when elements arrive) and one for its putters (woken when
 * room is made), so a wake-up only ever reaches sleepers waiting for what
 * the waker changed.
 *
 *   prepare_to_wait  chan_prepare, in the same critical section that found
 *                    nothing: count in (the channel, then our registry
 *                    entry), read the sequence word;
 *   schedule         chan_sleep, without the lock: wait while the word still
 *                    holds what we read (the kernel re-checks it atomically:
 *                    a wake-up between the critical section and the wait is
 *                    never lost), until woken, the retry period, the
 *                    deadline, a signal handler's exception or close();
 *   finish_wait      count out (our entry, then the channel) with atomic
 *                    adds, lock-free, so an interrupted sleep never leaks;
 *   wake_up          chan_wake, after the lock is released: bump the word,
 *                    and wake its sleepers if it counts any.
 *
 * As the kernel's wake_up, a wake-up wakes every sleeper of the channel and
 * each tries again; there are no tokens to count, lose or leave behind. A
 * waker never needs the lock, nor to know who sleeps: a damaged count can
 * cost a spurious futex call, never a flood.
 *
 * Per registry entry, each channel's sleepers are counted too, so that the
 * sleepers of a dead process can be counted out (uncount_dead_sleepers).
 *
 * asyncio: a sleeping alloc_async waits in its event loop on its process's
 * FIFO (/dev/shm/fifo.shmpool.NAME.E), counted as a sleeper of channel 0 and
 * as an async one; waking channel 0 writes a byte into the FIFO of every
 * process with async sleepers. Writers keep the FIFOs open while the entry's
 * epoch stays the same, and block SIGPIPE around the writes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pool.h"

/* ------------------------------------------------------------------ */
/* Futexes on words of the segment (shared: no FUTEX_PRIVATE_FLAG)     */

/* Wait while *addr == val, until the monotonic time `until` (NO_DEADLINE:
 * none), the GIL released. 0 if woken or the word differs, ETIMEDOUT, or
 * EINTR (a signal: the caller runs the handlers). */
int futex_wait32(uint32_t *addr, uint32_t val, uint64_t until) {
    struct timespec ts, *tsp = NULL;
    if (until != NO_DEADLINE) {
        uint64_t now = now_ns();
        if (until <= now) return ETIMEDOUT;
        uint64_t left = until - now;
        ts.tv_sec = (time_t)(left / 1000000000ull);
        ts.tv_nsec = (long)(left % 1000000000ull);
        tsp = &ts;
    }
    void *token = host.unblock();
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, val, tsp, NULL, 0);
    int err = r == 0 ? 0 : errno;
    host.block(token);
    if (err == EAGAIN) return 0;
    return err;
}

void futex_wake32(uint32_t *addr, int n) {
    syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ------------------------------------------------------------------ */
/* Channels                                                            */

/* A topic's channel (ch >= CH_TOPIC0): its sequence word (seq) or its
 * sleepers' count: topic t's room, or subscription j's. */
static uint64_t *topic_chan_word(struct pool *p, int ch, int seq) {
    int t = (ch - CH_TOPIC0) / (1 + (int)MAX_SUBS), j = (ch - CH_TOPIC0) % (1 + (int)MAX_SUBS) - 1;
    if (j < 0) return &TOPIC(p, t)[seq ? T_ROOM_SEQ : T_PUBLISHERS];
    return &SUB(p, t, j)[seq ? S_SEQ : S_GETTERS];
}

static uint64_t *chan_seq(struct pool *p, int ch) {
    if (ch == CH_ALLOC) return &p->hdr[H_WAIT_SEQ];
    if (ch >= CH_TOPIC0) return topic_chan_word(p, ch, 1);
    return &QUEUE(p, CH_QUEUE(ch))[CH_IS_PUT(ch) ? Q_PUT_SEQ : Q_GET_SEQ];
}

uint64_t *chan_count(struct pool *p, int ch) {
    if (ch == CH_ALLOC) return &p->hdr[H_NR_WAITERS];
    if (ch >= CH_TOPIC0) return topic_chan_word(p, ch, 0);
    return &QUEUE(p, CH_QUEUE(ch))[CH_IS_PUT(ch) ? Q_PUTTERS : Q_GETTERS];
}

/* This entry's count of its threads asleep on channel ch. */
static void entry_count_add(struct pool *p, int ch, int64_t d) {
    if (!p->entry || ch >= CH_TOPIC0) return; /* (topic sleepers are counted by their channel only) */
    if (ch == CH_ALLOC) {
        __atomic_add_fetch(&p->entry[P_SLEEPING], (uint64_t)d, __ATOMIC_SEQ_CST);
        return;
    }
    uint8_t *per = (uint8_t *)(p->entry + (CH_IS_PUT(ch) ? P_QPUT : P_QGET));
    __atomic_add_fetch(&per[CH_QUEUE(ch)], (uint8_t)d, __ATOMIC_SEQ_CST);
}

/* Count a sleeper in (d = 1) or out (d = -1): the channel's count is never
 * below the sum of the entries' (in: it first; out: it last). */
static void sleeper_add(struct pool *p, int ch, int64_t d) {
    uint64_t *n = chan_count(p, ch);
    if (d > 0) __atomic_add_fetch(n, (uint64_t)d, __ATOMIC_SEQ_CST);
    entry_count_add(p, ch, d);
    if (d < 0) __atomic_add_fetch(n, (uint64_t)d, __ATOMIC_SEQ_CST);
}

uint32_t chan_prepare(struct pool *p, int ch) {
    sleeper_add(p, ch, 1);
    count(p, C_SLEEPS, ch == CH_ALLOC);
    return (uint32_t)__atomic_load_n(chan_seq(p, ch), __ATOMIC_SEQ_CST);
}

static void async_add(struct pool *p, int64_t d) {
    if (d > 0) __atomic_add_fetch(&p->hdr[H_ASYNC_WAITERS], (uint64_t)d, __ATOMIC_SEQ_CST);
    if (p->entry) __atomic_add_fetch(&p->entry[P_ASYNC], (uint64_t)d, __ATOMIC_SEQ_CST);
    if (d < 0) __atomic_add_fetch(&p->hdr[H_ASYNC_WAITERS], (uint64_t)d, __ATOMIC_SEQ_CST);
}

void chan_cancel(struct pool *p, int ch) { sleeper_add(p, ch, -1); }

void chan_async_prepare(struct pool *p) {
    chan_prepare(p, CH_ALLOC); /* a sleeper first, then an async one */
    async_add(p, 1);
}

void chan_async_done(struct pool *p) {
    async_add(p, -1); /* the async one first, then the sleeper */
    sleeper_add(p, CH_ALLOC, -1);
}

int chan_sleep(struct pool *p, int ch, uint32_t seen, uint64_t until, int nap) {
    int r = RC_OK, woken = 0;
    uint32_t *word = futex_word(chan_seq(p, ch));
    for (;;) {
        if (p->closing) break;
        p->waiting++;
        int err = futex_wait32(word, seen, until);
        p->waiting--;
        if (err == 0) { woken = 1; break; }
        if (err == EINTR && host.signals() < 0) { r = RC_SIGNAL; break; }
        if (err == ETIMEDOUT || (until != NO_DEADLINE && now_ns() >= until)) break;
    }
    if (!woken && !nap) p->recount = 1; /* nobody woke us in a whole retry: some sleepers may have died */
    sleeper_add(p, ch, -1);     /* finish_wait */
    if (r == RC_OK && p->closing) r = RC_CLOSED;
    return r;
}

/* ------------------------------------------------------------------ */
/* Waking                                                              */

/* Wake every process with asyncio sleepers: a byte into each one's FIFO (a
 * process that is not listening, or gone, is skipped: its sleepers retry on
 * their own). */
static void poke_async(struct pool *p) {
    if (!p->fifo_prefix[0] || !ld(&p->hdr[H_ASYNC_WAITERS])) return;
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old); /* a reader that left gives EPIPE, never a signal */
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        uint64_t a = ld(&ent[P_ASYNC]), epoch = ld(&ent[P_EPOCH]);
        if (!a || a > SLEEPERS_MAX) continue;
        struct fifo_slot *c = &p->fifo_w[e % FIFO_CACHE];
        if (c->fd1 && (c->entry != e || c->epoch != epoch)) {
            close(c->fd1 - 1);
            c->fd1 = 0;
        }
        if (!c->fd1) {
            char path[340];
            snprintf(path, sizeof path, "%s%llu", p->fifo_prefix, (unsigned long long)e);
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

void release_fifos(struct pool *p) {
    for (int i = 0; i < FIFO_CACHE; i++) {
        if (p->fifo_w[i].fd1) close(p->fifo_w[i].fd1 - 1);
        p->fifo_w[i].fd1 = 0;
    }
}

void chan_wake(struct pool *p, int ch, int wake_n) {
    uint64_t *seq = chan_seq(p, ch);
    __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
    uint64_t n = __atomic_load_n(chan_count(p, ch), __ATOMIC_SEQ_CST);
    if (ch == CH_ALLOC) {
        uint64_t a = ld(&p->hdr[H_ASYNC_WAITERS]);
        if (a) poke_async(p);
        n = n > a ? n - a : 0;
    }
    if (n) futex_wake32(futex_word(seq), wake_n);
}

void wake_pending_now(struct pool *p) {
    if (p->wake) {
        p->wake = 0;
        chan_wake(p, CH_ALLOC, INT_MAX); /* as the kernel's wake_up: each retries (a bulk sleeper may need many) */
    }
    /* A getter takes one element: as many as were put (a woken getter that
     * does not take one, closing, leaves it for the others: close wakes
     * them all). Putters, all: each needs its own room. */
    int n = p->wake_get_n > 0 && p->wake_get_n < INT_MAX ? (int)p->wake_get_n : INT_MAX;
    for (uint64_t bits = p->wake_get; bits; bits &= bits - 1) chan_wake(p, CH_GET(__builtin_ctzll(bits)), n);
    for (uint64_t bits = p->wake_put; bits; bits &= bits - 1) chan_wake(p, CH_PUT(__builtin_ctzll(bits)), INT_MAX);
    p->wake_get = p->wake_put = 0;
    p->wake_get_n = 0;
    for (uint64_t bits = p->wake_topics; bits; bits &= bits - 1) { /* publishers all; a subscription's one getter */
        uint64_t t = (uint64_t)__builtin_ctzll(bits);
        if (p->wake_room >> t & 1) chan_wake(p, CH_ROOM(t), INT_MAX);
        for (uint32_t subs = p->wake_sub[t]; subs; subs &= subs - 1) chan_wake(p, CH_SUB(t, __builtin_ctz(subs)), 1);
        p->wake_sub[t] = 0;
    }
    p->wake_room = p->wake_topics = 0;
}

/* Every channel's sleepers and the lock's waiters, whatever the counts say
 * (close: this object's sleepers end with RC_CLOSED; destroy: every
 * process's end with RC_DESTROYED). Others retry and sleep again. */
static void wake_all_on(struct pool *p, int ch) {
    uint64_t *seq = chan_seq(p, ch);
    __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
    futex_wake32(futex_word(seq), INT_MAX);
}

void wake_everyone(struct pool *p) {
    for (int ch = 0; ch <= 2 * (int)p->max_queues; ch++)
        if (ch == CH_ALLOC || ld(&QUEUE(p, CH_QUEUE(ch))[Q_STATE]) == QUEUE_LIVE) wake_all_on(p, ch);
    for (uint64_t t = 0; t < MAX_TOPICS; t++)
        if (ld(&TOPIC(p, t)[T_STATE]) == QUEUE_LIVE)
            for (int ch = CH_ROOM(t); ch <= CH_SUB(t, MAX_SUBS - 1); ch++) wake_all_on(p, ch);
    poke_async(p);
    futex_wake32(futex_word(&p->hdr[H_LOCK_OWNER]), INT_MAX);
}

/* ------------------------------------------------------------------ */
/* Dead sleepers                                                       */

/* Take a dead entry's sleepers out of every channel's count. */
void drop_sleepers(struct pool *p, uint64_t *ent) {
    uint64_t a = __atomic_exchange_n(&ent[P_ASYNC], 0, __ATOMIC_SEQ_CST);
    if (a && a <= SLEEPERS_MAX) __atomic_sub_fetch(&p->hdr[H_ASYNC_WAITERS], a, __ATOMIC_SEQ_CST);
    uint64_t n = __atomic_exchange_n(&ent[P_SLEEPING], 0, __ATOMIC_SEQ_CST);
    if (n && n <= SLEEPERS_MAX) __atomic_sub_fetch(&p->hdr[H_NR_WAITERS], n, __ATOMIC_SEQ_CST);
    for (int put = 0; put < 2; put++) {
        uint8_t *per = (uint8_t *)(ent + (put ? P_QPUT : P_QGET));
        for (uint64_t q = 0; q < MAX_QUEUES; q++) {
            uint8_t k = __atomic_exchange_n(&per[q], 0, __ATOMIC_SEQ_CST);
            if (k && q < p->max_queues)
                __atomic_sub_fetch(&QUEUE(p, q)[put ? Q_PUTTERS : Q_GETTERS], k, __ATOMIC_SEQ_CST);
        }
    }
}

static int entry_sleeps(const uint64_t *ent) {
    uint64_t any = ld(&ent[P_SLEEPING]) | ld(&ent[P_ASYNC]);
    for (uint64_t w = 0; w < 2 * MAX_QUEUES / 8; w++) any |= ld(&ent[P_QGET + w]); /* P_QGET, then P_QPUT */
    return any != 0;
}

/* Count out the sleepers of dead entries (lock held). Sleepers count
 * themselves in and out with atomic adds, so the dead ones' counts are
 * subtracted, not the totals recomputed: a live sleeper leaving meanwhile is
 * never lost. A total beyond any possible number (damage) is replaced by the
 * live sum. */
void uncount_dead_sleepers(struct pool *p) {
    uint64_t live = 0, live_async = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (!entry_sleeps(ent)) continue;
        uint64_t n = ld(&ent[P_SLEEPING]), a = ld(&ent[P_ASYNC]);
        if (n <= SLEEPERS_MAX && a <= n && owner_alive(p, e + 1)) {
            live += n;
            live_async += a;
            continue;
        }
        drop_sleepers(p, ent);
    }
    if (ld(&p->hdr[H_ASYNC_WAITERS]) > SLEEPERS_MAX) st(&p->hdr[H_ASYNC_WAITERS], live_async);
    /* Only an impossible count is replaced: one below the live sum is what
     * a sleeper leaving right now looks like (its entry is counted out
     * before the channel), and must be left alone. */
    if (ld(&p->hdr[H_NR_WAITERS]) > SLEEPERS_MAX) st(&p->hdr[H_NR_WAITERS], live);
}
