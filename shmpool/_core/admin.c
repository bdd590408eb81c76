/* admin.c: the administrative transitions, each one step under the lock
 * (run() in mempool.c takes it, with the ADMIN bound):
 *
 *   step_resize / step_resize_grow   mempool_resize
 *   step_destroy                     mempool_destroy's check, then the status
 *   step_set_faults                  the fault injector's rate and seed
 *   step_stats                       a consistent snapshot (derive.c)
 *   step_reclaim                     take back dead processes' elements
 *   step_drain_cache, step_detach    close: our cache back, our entry vacated
 *   step_leave                       leave: all of ours back; the last destroys
 *   format_reserve                   create's pre-fill (nobody sees the pool yet)
 */
#include <stdio.h>
#include <string.h>

#include "pool.h"

/* mempool_resize, first step: shrink (reserve elements above new_min_nr go
 * back to the arena) or raise min_nr. c->a: new_min_nr; c->b set to 1 if the
 * reserve must grow (step_resize_grow, in batches, each its own lock hold). */
int step_resize(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    if (c->a < 1 || c->a > p->capacity) return corrupt(p, "new min_nr %llu is outside 1..%llu", c->a, p->capacity);
    c->b = c->a > p->hdr[H_MIN_NR];
    if (!c->b) {
        if (p->enabled && p->entry && p->entry[P_CACHE_N] && (r = drain(p, 0)) != RC_OK) return r;
        int64_t busy = places_reclaim_all(p); /* every place back to the stack */
        if (busy < 0) return (int)busy;
        if (busy) {
            snprintf(p->msg, sizeof p->msg, "a process is moving its reserve places");
            return RC_BUSY;
        }
        while (p->hdr[H_RESERVE_DEPTH] > c->a) {
            uint64_t idx;
            if ((r = remove_element(p, &idx)) != RC_OK) return r;
            uint64_t w = ld(&p->words[idx]);
            set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)));
            if ((r = arena_push(p, idx)) != RC_OK) return r;
        }
    }
    st(&p->hdr[H_MIN_NR], c->a);
    return RC_OK;
}

/* A growing resize's refill: up to c->n elements from the arena (faults
 * apply; other caches are stolen from), stopping where the arena fails or
 * the reserve is full (another process may have resized: re-checked each
 * time). c->b becomes 0 when done. The kernel wakes sleepers only from free;
 * waking them here spares them the rest of a 5 s nap. */
int step_resize_grow(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    for (int64_t i = 0; r == RC_OK && i < c->n; i++) {
        uint64_t unused;
        int room = 0, busy;
        if (ld(&p->hdr[H_CURR_NR]) < p->hdr[H_MIN_NR] && (r = reserve_room(p, &room, &busy)) != RC_OK) break;
        if (!room) { c->b = 0; break; }
        int a = arena_take(p, 1, ST_RESERVE, &unused);
        if (a == RC_FAIL || a == RC_DRY) { c->b = 0; break; }
        r = a;
    }
    p->wake = 1;
    return r;
}

/* destroy: refused while elements are held or queued (unless c->a, force):
 * c->out = {lent, curr_nr, min_nr, refused}; else the status says destroyed
 * (the caller then wakes every sleeper of every process). */
int step_destroy(struct pool *p, struct call *c, int mode) {
    if (p->hdr[H_STATUS] != STATUS_LIVE) return RC_DESTROYED;
    struct numbers n;
    derive(p, &n);
    c->out[0] = n.in_use + n.queued;
    c->out[1] = n.curr_nr;
    c->out[2] = n.min_nr;
    c->out[3] = c->out[0] && !c->a;
    if (c->out[3]) return RC_OK;
    st(&p->hdr[H_STATUS], STATUS_DESTROYED);
    /* mempool_exit empties the reserve through remove_element, which checks
     * each element's poison: every reserved element written after its free
     * is counted, and its slot listed (c->dst, up to c->n) for a warning. */
    uint64_t curr = p->hdr[H_RESERVE_DEPTH]; /* (a poisoned pool lends no places) */
    c->moved = 0;
    for (uint64_t i = 0; p->poison && i < curr && i < p->capacity; i++) {
        uint64_t idx = p->stack[i];
        if (idx >= p->capacity || W_STATE(ld(&p->words[idx])) != ST_RESERVE || poison_intact(p, idx)) continue;
        count(p, C_POISON, 1);
        if (c->moved < c->n) c->dst[c->moved] = (int64_t)idx;
        c->moved++;
    }
    return RC_OK;
}

/* The injected failure rate (c->a: its f64 bits, c->b: the threshold) and,
 * if c->out[0], a seed c->out[1] that restarts the sequence. */
int step_set_faults(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    st(&p->hdr[H_FAIL_RATE], c->a);
    st(&p->hdr[H_FAIL_THRESHOLD], c->b);
    if (c->out[0]) {
        st(&p->hdr[H_SEED], c->out[1]);
        st(&p->hdr[H_RNG], c->out[1]);
        if (ld(&p->hdr[H_RNG_KIND]) == RNG_GLIBC) glibc_srand(p, (uint32_t)c->out[1]);
    }
    return RC_OK;
}

/* A snapshot of the pool's numbers into *(struct numbers *)c->snapshot. */
int step_stats(struct pool *p, struct call *c, int mode) {
    derive(p, (struct numbers *)c->snapshot);
    return RC_OK;
}

/* reclaim_dead: everything of dead processes back (c->a: how many held
 * elements); their sleepers counted out. */
int step_reclaim(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    int64_t taken = retire_dead(p, OWNER_ALIVE);
    if (taken < 0) return (int)taken;
    c->a = (uint64_t)taken;
    p->wake = 1;
    return RC_OK;
}

/* Our cache back to the shared free list (close, a trace being set). */
int step_drain_cache(struct pool *p, struct call *c, int mode) {
    int r = places_return(p); /* (not lent again: the object no longer uses the lock-free paths) */
    return r != RC_OK ? r : drain(p, 0);
}

/* If this process holds no element and no thread of it sleeps, give its
 * cache back and vacate its entry (epoch cleared last: the commit). c->a: 1
 * if vacated. */
int step_detach(struct pool *p, struct call *c, int mode) {
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) == ST_HELD && W_OWNER(w) == p->me) return RC_OK;
    }
    int r = drain(p, 0);
    if (r != RC_OK || ld(&p->entry[P_SLEEPING]) != 0) return r;
    if ((r = places_return(p)) != RC_OK) return r;
    st(&p->entry[P_CACHE_N], 0);
    st(&p->entry[P_EPOCH], 0); /* (vacated: leave() lends it nothing) */
    c->a = 1;
    return RC_OK;
}

/* leave: this process lets go of the pool. Everything it holds comes back
 * and its subscriptions are dropped (retire, as for a dead process's); then
 * if no other live process is attached the pool is destroyed (c->out[0] =
 * 1: the caller unlinks it and wakes every sleeper), else its entry is
 * vacated. One step under the lock, so of several processes leaving at
 * once exactly the last destroys. Refused (RC_INVALID, nothing changed)
 * while a thread of this process sleeps on the pool. */
int step_leave(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    if (ld(&p->entry[P_SLEEPING]) != 0) {
        snprintf(p->msg, sizeof p->msg, "a thread of this process is waiting on the pool");
        return RC_INVALID;
    }
    int64_t taken = retire_dead(p, OWNER_PREDECESSOR); /* what names our entry goes back */
    if (taken < 0) return (int)taken;
    struct numbers n;
    derive(p, &n);
    c->a = (uint64_t)taken;
    c->out[0] = n.attached <= 1; /* (we count ourselves) */
    if (c->out[0]) {
        st(&p->hdr[H_STATUS], STATUS_DESTROYED);
    } else {
        st(&p->entry[P_CACHE_N], 0);
        st(&p->entry[P_EPOCH], 0); /* vacated: others count us out */
    }
    p->wake = 1;
    return RC_OK;
}

/* create's pre-fill of the reserve from a fresh arena (no fault injection);
 * nobody else can see the pool yet. */
int format_reserve(struct pool *p, uint64_t min_nr) {
    st(&p->hdr[H_MIN_NR], min_nr);
    for (uint64_t i = 0; i < min_nr; i++) {
        uint64_t idx;
        int r = arena_pop(p, &idx);
        if (r != RC_OK) return r == RC_FAIL ? corrupt(p, "the arena cannot fill a reserve of %llu (capacity %llu)", min_nr, p->capacity) : r;
        uint64_t w = ld(&p->words[idx]);
        set_word(p, idx, w, mkword(ST_RESERVE, 0, W_GEN(w)));
        add_element(p, idx);
    }
    st(&p->hdr[H_LOW_WATER], min_nr);
    return RC_OK;
}
