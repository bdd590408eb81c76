/* mempool.c: the kernel's rules, and the one way into the lock.
 *
 * The rules (Linux v3.2 mm/mempool.c)
 * -----------------------------------
 *   step_alloc      mempool_alloc: the arena first; if it fails, the top of
 *                   the reserve; if that is empty too, register as a sleeper
 *                   (may sleep) or fail (may not). Registration happens in the
 *                   critical section that found the reserve empty, so no
 *                   wake-up can be lost between the check and the sleep.
 *   release_slot    mempool_free: refill the reserve while curr_nr < min_nr
 *                   (and wake the sleepers), else give the element back to the
 *                   arena (our cache, or the shared list).
 *   step_alloc_bulk n attempts at the arena, the rest from the reserve all or
 *                   nothing (it holds nothing while it sleeps).
 *
 * Entry
 * -----
 * Every call that takes the pool lock goes through run(), and every wait
 * for the lock has a deadline set by call_init from the call's kind:
 *
 *   BOUND_CALLER   a call that may sleep (alloc with __GFP_WAIT, a blocking
 *                  put or get): its own timeout, or none if the caller gave
 *                  none (the caller asked to wait);
 *   BOUND_ATOMIC   a call that may not wait: GFP_ATOMIC, *_nowait,
 *                  alloc_preallocated, free: ATOMIC_WAIT_NS, then RC_BUSY,
 *                  which its kind answers (None, queue.Full or queue.Empty; a
 *                  free parks its element, see below);
 *   BOUND_ADMIN    stats, reclaim_dead, resize, set_fail_rate, destroy,
 *                  adopt, opening a queue, attaching: ADMIN_WAIT_NS, then
 *                  RC_BUSY: TimeoutError naming the holder.
 *
 * So nothing waits on a live process (stopped, traced, starved) unless its
 * caller asked to wait. Whoever holds the lock first completes the frees
 * that others parked (finish_parked), and counts out dead sleepers when a
 * nap ended unwoken.
 *
 * Parked frees: a free whose lock does not come within its bound moves the
 * slot word HELD -> PARKED (a CAS: the commit; the handle is no longer
 * held, so a second free of it is refused) and raises the hint H_PARKED.
 * The next holder of the lock clears the hint and returns every PARKED slot
 * through release_slot. release_slot itself parks a free whose reserve
 * has room only in places another live process is moving this instant
 * (places.c): the reserve is refilled first, and nobody waits for it. A
 * parker killed between its CAS and the hint leaves
 * a PARKED slot that repair and retire (which read every word) return.
 * stats() counts parked elements in in_use (they are still out of the pool)
 * and says how many.
 *
 * The wait loop
 * -------------
 * run() makes one attempt under the lock (the step), releases it, does
 * what the attempt left (wake-ups, then `after`: the trace and the poison
 * warning, which may run Python code, now that the lock is free), and if the
 * step registered as a sleeper, sleeps on its channel (wake.c) until woken,
 * the retry period or the deadline, then tries again. Past the deadline it
 * makes one last attempt that does not register.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "pool.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

int have_prefetchw;

/* PREFETCHW is CPUID 0x80000001 ECX bit 8 (every x86-64 of the last decade;
 * older ones may not decode it, so it is asked for, not assumed). */
__attribute__((constructor)) static void detect_prefetchw(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) have_prefetchw = (int)((c >> 8) & 1);
#endif
}

int corrupt(struct pool *p, const char *fmt, unsigned long long a, unsigned long long b) {
    snprintf(p->msg, sizeof p->msg, fmt, a, b);
    return RC_CORRUPT;
}

/* Why handle (slot idx, generation gen) is not a held element: into p->msg. */
void describe(struct pool *p, uint64_t w, uint64_t gen) {
    static const char *where[] = STATE_WHERE;
    uint64_t s = W_STATE(w);
    if (s == ST_HELD)
        snprintf(p->msg, sizeof p->msg,
                 "stale, or another pool's: its slot is held under generation %llu, not %llu (freed and handed out "
                 "again since)", (unsigned long long)W_GEN(w), (unsigned long long)gen);
    else
        snprintf(p->msg, sizeof p->msg, "its slot is %s (freed already, or never allocated, or another pool's handle)",
                 where[s < sizeof where / sizeof *where ? s : 0]);
}

/* The header's own bounds, checked before any transition. */
int check_header(struct pool *p) {
    uint64_t *h = p->hdr;
    uint64_t min_nr = h[H_MIN_NR], curr = ld(&h[H_CURR_NR]), shared = h[H_ARENA_FREE];
    uint64_t depth = h[H_RESERVE_DEPTH], lent = h[H_LENT];
    if (min_nr < 1 || min_nr > p->capacity)
        return corrupt(p, "min_nr %llu is outside 1..capacity (%llu)", min_nr, p->capacity);
    if (curr > min_nr) return corrupt(p, "curr_nr %llu exceeds min_nr %llu", curr, min_nr);
    if (lent > min_nr || depth > min_nr - lent)
        return corrupt(p, "the reserve stack's depth %llu and the places lent %llu exceed min_nr", depth, lent);
    if (depth > curr) st(&h[H_RECOUNT], 1); /* curr_nr too low (a process killed mid-move): counted again */
    if (shared > p->capacity || curr + shared > p->capacity)
        return corrupt(p, "arena_free %llu is beyond the capacity %llu", shared, p->capacity);
    if (h[H_NR_WAITERS] > SLEEPERS_MAX) uncount_dead_sleepers(p); /* damage: recount */
    if (p->entry && p->entry[P_CACHE_N] > CACHE_MAX)
        return corrupt(p, "this process's cache count %llu exceeds its size %llu", p->entry[P_CACHE_N], CACHE_MAX);
    if (h[H_STATUS] != STATUS_LIVE) return RC_DESTROYED;
    return RC_OK;
}

/* ------------------------------------------------------------------ */
/* Entry and the wait loop                                             */

/* A call of kind `bound` (BOUND_*) with the caller's timeout (-1: none).
 * Cheap: no clock is read unless there is a timeout (the lock's bound is
 * turned into a deadline only if the lock is not free at once). */
void call_init(struct call *c, step_fn step, int bound, int64_t timeout_ns) {
    c->step = step;
    c->after = NULL;
    c->ctx = NULL;
    c->arg = NULL;
    c->may_sleep = c->sleep_outside = c->slept = c->reported = c->skip_arena = c->drawn = c->channel = 0;
    c->slept_since = 0;
    c->timeout_ns = timeout_ns;
    c->deadline = timeout_ns <= 0 ? deadline_in(timeout_ns) : DEADLINE_LAZY; /* (0: passed at once) */
    c->bound_ns = bound == BOUND_ATOMIC ? (int64_t)ATOMIC_WAIT_NS : bound == BOUND_ADMIN ? (int64_t)ADMIN_WAIT_NS : -1;
    c->retry_ns = SLEEP_RETRY_NS;
    c->nap_ns = PUT_NAP_NS;
    c->q = c->a = c->b = 0;
    c->out[0] = 0;
    c->src = NULL;
    c->dst = NULL;
    c->n = c->moved = 0;
    c->bad = -1;
    c->snapshot = NULL;
}

/* Return every PARKED slot (lock held; see "Parked frees"). */
int finish_parked(struct pool *p) {
    if (!__atomic_exchange_n(&p->hdr[H_PARKED], 0, __ATOMIC_SEQ_CST)) return RC_OK;
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_PARKED) continue;
        int r = release_slot(p, idx, w, 0);
        if (r == RC_CORRUPT) {
            st(&p->hdr[H_PARKED], 1);
            return r;
        }
    }
    p->last_event = EV_NONE;
    return RC_OK;
}

/* What every holder does before it lets go: the frees parked meanwhile. */
void leave(struct pool *p) {
    if (ld(&p->hdr[H_PARKED])) finish_parked(p);
    if (p->relend) places_lend(p); /* (damage it finds, the next call reports) */
    if (p->traced) p->last_curr = reserve_total(p);
    lock_release(p);
}

int is_allocation(const struct call *c) { return c->step == step_alloc || c->step == step_alloc_bulk; }

/* An allocation that slept `ns` in all returns: the sleep totals (lock-free:
 * one word each, so a kill at any instruction leaves them whole). */
void note_sleep(struct pool *p, uint64_t ns) {
    __atomic_add_fetch(&p->hdr[H_TOTAL_SLEEP_NS], ns, __ATOMIC_RELAXED);
    uint64_t longest = __atomic_load_n(&p->hdr[H_LONGEST_SLEEP_NS], __ATOMIC_RELAXED);
    while (ns > longest && !__atomic_compare_exchange_n(&p->hdr[H_LONGEST_SLEEP_NS], &longest, ns, 0,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}

static int run_loop(struct pool *p, struct call *c);

int run(struct pool *p, struct call *c) {
    int r = run_loop(p, c);
    if (c->slept && is_allocation(c)) note_sleep(p, now_ns() - c->slept_since);
    return r;
}

static int run_loop(struct pool *p, struct call *c) {
    for (;;) {
        int mode = c->sleep_outside ? MODE_ASYNC : c->may_sleep && !call_passed(c) ? MODE_SLEEP : MODE_FAIL;
        if (c->step == step_put || c->step == step_get) {
            queue_warm(p, c); /* its line, owned, while the lock is coming */
            if (mode == MODE_SLEEP) queue_spin(p, c, c->step == step_put);
        }
        uint64_t tried = mode == MODE_SLEEP && !c->slept && is_allocation(c) ? now_ns() : 0; /* a sleep starts here */
        int r = lock_try(p) ? RC_OK : lock_acquire(p, call_deadline(c), c->may_sleep ? -1 : c->bound_ns);
        p->last_event = EV_NONE; /* (after the wait: another thread's call may have run meanwhile) */
        if (r == RC_TIMEOUT && !c->may_sleep && c->bound_ns >= 0) r = RC_BUSY;
        if ((r == RC_TIMEOUT || r == RC_BUSY) && c->step == step_alloc) { /* the lock did not come: a failure */
            count(p, C_ALLOC_FAILED, 1);
            p->last_event = EV_ALLOC_FAILED;
            if (p->traced) p->last_curr = reserve_total(p);
        }
        if (r == RC_OK) {
            if (ld(&p->hdr[H_PARKED])) r = finish_parked(p);
            if (r == RC_OK && p->recount) {
                p->recount = 0;
                uncount_dead_sleepers(p);
            }
            if (r == RC_OK && ld(&p->hdr[H_RECOUNT])) recount(p);
            if (r == RC_OK) r = c->step(p, c, mode);
            leave(p);
        }
        wake_pending(p);
        if (r == RC_SLEEP) call_deadline(c); /* it will wait: its deadline counts from now at the latest */
        if (r == RC_FAIL && c->may_sleep) r = RC_TIMEOUT; /* the last attempt, past the deadline */
        if (c->after && c->after(p, c, r) < 0) {
            if (r == RC_SLEEP) {
                if (mode == MODE_ASYNC) chan_async_done(p);
                else chan_cancel(p, c->channel); /* count out without waiting */
            }
            return RC_SIGNAL;
        }
        if (r != RC_SLEEP || c->sleep_outside) return r;
        uint64_t now = now_ns(), nap = c->retry_ns;
        if (!c->slept) c->slept = 1, c->slept_since = tried ? tried : now;
        if (p->long_sleep_ns >= 0 && !c->reported && is_allocation(c)) { /* wake to report it (`after`) */
            uint64_t at = c->slept_since + (uint64_t)p->long_sleep_ns;
            if (at > now && at - now < nap) nap = at - now;
        }
        /* Nobody may wake it, so it looks again, sooner at first: a put
         * below the low-water mark; an allocation whose last look found
         * elements only in the places of a process moving them (that
         * process's pop wakes nobody; its step is short, unless stopped). */
        int short_nap = (c->step == step_put || (is_allocation(c) && p->places_busy)) && c->nap_ns < nap;
        if (short_nap) {
            nap = c->nap_ns;
            c->nap_ns *= 2;
        }
        r = chan_sleep(p, c->channel, c->seen, earlier(now + nap, call_deadline(c)), short_nap);
        if (r != RC_OK) return r;
    }
}

/* ------------------------------------------------------------------ */
/* mempool_alloc and mempool_free                                      */

typedef int (*attempt_fn)(struct pool *p, struct call *c, int mode);

/* Just counted in as a sleeper of the allocation channel (lock held):
 * look at every other cache once more. A free without the lock (free_fast)
 * may have put a slot there after our first look and, looking for sleepers
 * before we counted in, woken nobody. RC_AGAIN if it did (the slots are on
 * the shared list now: try again), RC_OK to sleep. */
static int recheck_caches(struct pool *p) {
    uint64_t taken = 0;
    store_load_fence(); /* (chan_prepare's atomic add is one on x86) */
    int r = steal(p, &taken);
    return r != RC_OK ? r : taken || others_have_places(p) ? RC_AGAIN : RC_OK;
}

/* An attempt (lock held) that registers as a sleeper of the allocation
 * channel when it finds nothing looks at the caches once more, and makes
 * one more attempt if they held slots (count out first). */
static int attempt_or_sleep(struct pool *p, struct call *c, int mode, attempt_fn attempt) {
    for (int again = 0;; again++) {
        int r = attempt(p, c, mode);
        if (r != RC_SLEEP || again) return r;
        if ((r = recheck_caches(p)) == RC_OK) return RC_SLEEP;
        if (mode == MODE_ASYNC) chan_async_done(p);
        else chan_cancel(p, CH_ALLOC);
        if (r != RC_AGAIN) return r;
    }
}

static int alloc_attempt(struct pool *p, struct call *c, int mode);

/* One attempt (lock held): the arena (unless skip_arena), then the
 * reserve's top; with nothing, register (MODE_SLEEP, MODE_ASYNC) or fail.
 * The handle goes to c->a. */
int step_alloc(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    return r != RC_OK ? r : attempt_or_sleep(p, c, mode, alloc_attempt);
}

static int alloc_attempt(struct pool *p, struct call *c, int mode) {
    int r;
    if (!c->skip_arena) {
        r = arena_take(p, !c->drawn, ST_HELD, &c->a); /* one draw per attempt */
        c->drawn = 0;
        if (r == RC_OK) {
            p->last_event = EV_ALLOC_ARENA;
            return RC_OK;
        }
        if (r != RC_FAIL && r != RC_DRY) return r;
    }
    c->skip_arena = 0;
    uint64_t idx;
    if ((r = reserve_pop(p, &idx)) == RC_OK) {
        CRASH(CP_ALLOC_RESERVE);
        hand_out(p, idx, ld(&p->words[idx]), &c->a);
        count(p, C_ALLOC_RESERVE, 1);
        p->last_event = EV_ALLOC_RESERVE;
        return RC_OK;
    }
    if (r != RC_FAIL) return r;
    if (mode == MODE_SLEEP || mode == MODE_ASYNC) {
        c->channel = CH_ALLOC;
        if (mode == MODE_ASYNC) chan_async_prepare(p);
        else c->seen = chan_prepare(p, CH_ALLOC);
        p->last_event = EV_SLEEP;
        return RC_SLEEP;
    }
    count(p, C_ALLOC_FAILED, 1);
    p->last_event = EV_ALLOC_FAILED;
    return RC_FAIL;
}

/* mempool_alloc_preallocated: the reserve only, never the arena. */
int step_alloc_preallocated(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    uint64_t idx;
    if ((r = reserve_pop(p, &idx)) == RC_FAIL) {
        count(p, C_ALLOC_FAILED, 1);
        return RC_FAIL;
    }
    if (r != RC_OK) return r;
    hand_out(p, idx, ld(&p->words[idx]), &c->a);
    count(p, C_ALLOC_RESERVE, 1);
    return RC_OK;
}

/* Slot idx, whose word was w (HELD, or PARKED already), parked: its free
 * is completed by the next holder of the lock (see "Parked frees"). */
static int park(struct pool *p, uint64_t idx, uint64_t w) {
    if (W_STATE(w) != ST_PARKED && !set_word(p, idx, w, mkword(ST_PARKED, p->me, W_GEN(w)))) return RC_INVALID;
    CRASH(CP_PARK);
    __atomic_store_n(&p->hdr[H_PARKED], 1, __ATOMIC_SEQ_CST);
    return RC_OK;
}

/* mempool_free of HELD (or PARKED) slot idx whose word was w (lock held):
 * refill the reserve if it is below min_nr (and wake the sleepers), else
 * give the element to the arena, through our cache when `to_cache`. If the
 * reserve's only empty places are another process's that it is moving
 * this instant, the element is parked for the next holder: the reserve
 * first, as the kernel's rule says, and no wait on a live process. The
 * word moves by CAS (a free without the lock may race): RC_INVALID if it
 * lost. */
int release_slot(struct pool *p, uint64_t idx, uint64_t w, int to_cache) {
    uint64_t *h = p->hdr;
    int room = 0, busy = 0;
    if (ld(&h[H_CURR_NR]) < h[H_MIN_NR]) { /* some place is empty: find it (ours given back first) */
        int r = reserve_room(p, &room, &busy);
        if (r != RC_OK) return r;
    }
    if (!room && busy) {
        p->last_event = EV_NONE;
        return park(p, idx, w);
    }
    if (room) {
        if (!set_word(p, idx, w, mkword(ST_RESERVE, 0, W_GEN(w)))) return RC_INVALID;
        CRASH(CP_FREE_RESERVE);
        add_element(p, idx);
        count(p, C_FREE_RESERVE, 1);
        p->wake |= ld(&h[H_NR_WAITERS]) != 0; /* sleepers count in under the lock: none can be missed */
        p->last_event = EV_FREE_RESERVE;
        return RC_OK;
    }
    if (to_cache && p->enabled && p->entry) {
        if (p->entry[P_CACHE_N] >= CACHE_MAX) {
            int r = drain(p, CACHE_MAX - CACHE_BATCH);
            if (r != RC_OK) return r;
        }
        if (!cache_push(p, idx, w)) return RC_INVALID;
    } else {
        if (h[H_ARENA_FREE] >= p->capacity)
            return corrupt(p, "arena_free %llu is beyond the capacity %llu", h[H_ARENA_FREE], p->capacity);
        if (!set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)))) return RC_INVALID;
        arena_push(p, idx);
    }
    count(p, C_FREE_ARENA, 1);
    p->wake |= ld(&h[H_NR_WAITERS]) != 0; /* a bulk sleeper may need more than the reserve holds */
    p->last_event = EV_FREE_ARENA;
    return RC_OK;
}

/* The free of handle (c->a = slot, c->b = generation), held by c->out[0]
 * (0: anybody), lock held. */
int step_free(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    uint64_t w = ld(&p->words[c->a]);
    if (W_STATE(w) == ST_SHARED && W_GEN(w) == c->b) { /* a shared element: this process lets go of it */
        c->out[0] = (uint64_t)-1;
        return step_release(p, c, mode);
    }
    if (!held_as(w, c->b, c->out[0])) {
        describe(p, w, c->b);
        return RC_INVALID;
    }
    r = release_slot(p, c->a, w, 1);
    if (r == RC_INVALID) snprintf(p->msg, sizeof p->msg, "freed by another process at the same moment");
    return r;
}

/* The free without the lock, when the reserve is full (the kernel's
 * unlocked peek, checked again by any locked free): onto our cache. 1 if
 * done. */
int free_fast(struct pool *p, uint64_t idx, uint64_t gen, uint64_t owner) {
    if (!p->enabled || !p->entry) return 0;
    uint64_t *h = p->hdr;
    uint64_t w = ld(&p->words[idx]);
    if (!held_as(w, gen, owner) || ld(&h[H_STATUS]) != STATUS_LIVE) return 0;
    int reserve = places_full(p->entry[P_PLACE_R]) < p->entry[P_PLACE_Q] && !p->poison; /* an empty place of ours */
    if (reserve) {
        if (!place_push_fast(p, idx, w)) return 0;
    } else {
        if (ld(&h[H_CURR_NR]) < ld(&h[H_MIN_NR])) return 0; /* the reserve first: under the lock */
        if (!cache_push(p, idx, w)) return 0;
    }
    count(p, reserve ? C_FREE_RESERVE : C_FREE_ARENA, 1);
    /* A sleeper (a bulk allocation needing more than the reserve holds)
     * counts itself in, then looks at every cache (under the lock); we
     * published the slot, then look for sleepers: one of the two sees the
     * other. */
    store_load_fence();
    if (__atomic_load_n(&h[H_NR_WAITERS], __ATOMIC_SEQ_CST)) chan_wake(p, CH_ALLOC, INT_MAX);
    return 1;
}

/* A free whose lock did not come: park the element (see "Parked frees"). */
int park_free(struct pool *p, uint64_t idx, uint64_t gen, uint64_t owner) {
    uint64_t w = ld(&p->words[idx]);
    if (!held_as(w, gen, owner)) {
        describe(p, w, gen);
        return RC_INVALID;
    }
    if (park(p, idx, w) != RC_OK) {
        snprintf(p->msg, sizeof p->msg, "freed by another process at the same moment");
        return RC_INVALID;
    }
    return RC_OK;
}

/* make this process the holder of a held element (c->a, c->b), held by
 * c->out[0] (0: by anybody; a reference that travelled names its sender). */
int step_adopt(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    uint64_t w = ld(&p->words[c->a]);
    if (!held_as(w, c->b, c->out[0])) {
        describe(p, w, c->b);
        return RC_INVALID;
    }
    if (!set_word(p, c->a, w, mkword(ST_HELD, p->me, c->b))) {
        snprintf(p->msg, sizeof p->msg, "freed by another process at the same moment");
        return RC_INVALID;
    }
    return RC_OK;
}

/* ------------------------------------------------------------------ */
/* Bulk                                                                */

/* c->n elements into c->dst: n arena attempts (each with its own draw,
 * straight from the shared list, our cache put back on it first so that the
 * order is the single locked stack's), the rest from the reserve, all or
 * nothing: when the reserve cannot cover them, the arena's go back too and
 * nothing is held while waiting. */
static int bulk_attempt(struct pool *p, struct call *c, int mode) {
    int r = RC_OK;
    int64_t got = 0, n = c->n;
    if (r == RC_OK && p->enabled && p->entry && p->entry[P_CACHE_N]) r = drain(p, 0);
    for (int64_t i = 0; r == RC_OK && i < n; i++) {
        uint64_t idx, taken;
        if (p->hdr[H_ARENA_FREE] == 0 && ((r = steal(p, &taken)) != RC_OK || !taken)) break; /* dry: no more draws */
        if (fault(p)) continue; /* a fault: the next element is another attempt */
        if ((r = arena_pop(p, &idx)) != RC_OK) break;
        uint64_t h;
        hand_out(p, idx, ld(&p->words[idx]), &h);
        c->dst[got++] = (int64_t)h;
    }
    if (r != RC_OK) return r; /* (damage: what was handed out stays held, as the words say) */
    count(p, C_ALLOC_ARENA, (uint64_t)got);
    uint64_t need = (uint64_t)(n - got);
    int more = 1; /* the reserve's elements in reach: ours given back, others' stolen while needed */
    r = places_return(p);
    p->places_busy = 0;
    while (r == RC_OK && p->hdr[H_RESERVE_DEPTH] < need && more) r = steal_place(p, &more);
    if (r != RC_OK) return r;
    if (need <= p->hdr[H_RESERVE_DEPTH]) {
        for (int64_t i = got; i < n; i++) {
            uint64_t idx, h;
            if ((r = remove_element(p, &idx)) != RC_OK) return r;
            hand_out(p, idx, ld(&p->words[idx]), &h);
            c->dst[i] = (int64_t)h;
        }
        count(p, C_ALLOC_RESERVE, need);
        return RC_OK;
    }
    for (int64_t i = got; i-- > 0;) { /* all or nothing: the arena's back, in order */
        uint64_t idx = (uint64_t)c->dst[i] & INDEX_MASK, w = ld(&p->words[idx]);
        if (p->hdr[H_ARENA_FREE] >= p->capacity)
            return corrupt(p, "arena_free %llu is beyond the capacity %llu", p->hdr[H_ARENA_FREE], p->capacity);
        if (set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)))) arena_push(p, idx);
    }
    count(p, C_ALLOC_ARENA, (uint64_t)-got);
    if (mode == MODE_SLEEP) {
        c->channel = CH_ALLOC;
        c->seen = chan_prepare(p, CH_ALLOC);
        return RC_SLEEP;
    }
    count(p, C_ALLOC_FAILED, 1);
    return RC_FAIL;
}

int step_alloc_bulk(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    return r != RC_OK ? r : attempt_or_sleep(p, c, mode, bulk_attempt);
}

/* Free c->n handles of c->src (in range, no slot twice: checked by the
 * caller): all checked first, an invalid one refuses the whole call (c->bad,
 * nothing freed); then as if freed one by one. c->moved: how many another
 * process freed at the same moment. */
int step_free_bulk(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    for (int64_t i = 0; r == RC_OK && i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
            describe(p, w, gen);
            c->bad = i;
            return RC_INVALID;
        }
    }
    for (int64_t i = 0; r == RC_OK && i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) { c->moved++; continue; }
        if (ld(&p->hdr[H_CURR_NR]) >= p->hdr[H_MIN_NR] && p->enabled && p->entry && p->entry[P_CACHE_N] &&
            (r = drain(p, 0)) != RC_OK) /* our cache is the arena's top: keep the order */
            break;
        int x = release_slot(p, idx, w, 0);
        if (x == RC_INVALID) c->moved++;
        else if (x != RC_OK) r = x;
    }
    return r;
}

/* free_bulk whose lock did not come: every handle checked, then parked. */
int park_bulk(struct pool *p, struct call *c) {
    for (int64_t i = 0; i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
            describe(p, w, gen);
            c->bad = i;
            return RC_INVALID;
        }
    }
    for (int64_t i = 0; i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i];
        if (park_free(p, h & INDEX_MASK, h >> HGEN_SHIFT, 0) != RC_OK) c->moved++;
    }
    return RC_OK;
}
