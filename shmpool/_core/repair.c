/* repair.c: make every list and depth agree with the slot words.
 *
 * Run by the process that took the lock over from a dead holder, which may
 * have died at any instruction of any transition. Every transition commits
 * with one store or CAS of a slot word, and moves lists and depths around
 * that commit; so the words are whole, and everything else is rebuilt from
 * them:
 *
 *   - a word in no valid state, a slot cached by a dead process, a slot
 *     queued in a queue that does not exist: back to the arena;
 *   - every process's reserve places forgotten (their slots join the stack
 *     with the stray RESERVE slots below), but a live
 *     one's that it is moving this instant (places.c);
 *   - the reserve stack: its entries that still name RESERVE slots, in
 *     order, each once, then the RESERVE slots it lost; beyond its share of
 *     min_nr, back to the arena (the reserve is not a cache); curr_nr
 *     counted again from the words;
 *   - each queue's list from its head while it names its own QUEUED slots,
 *     then the ones it lost (queue.c, queue_relink);
 *   - the arena's free list likewise;
 *   - the topics' rings and references (topic.c, topic_repair);
 *   - parked frees completed, dead sleepers counted out, sleepers woken.
 *
 * Idempotent: on a whole pool it changes nothing. A held or cached slot that
 * names an entry that cannot hold it is damage and is left as it is, for
 * --check to report.
 */
#include <stdlib.h>
#include <string.h>

#include "pool.h"

/* The entries of list[0:depth] whose slot is in state `s` (each once, in
 * order), then the other slots in that state, into out; their number. */
static int in_list(const struct pool *p, uint64_t idx, uint64_t s) {
    uint64_t w = ld(&p->words[idx]);
    return W_STATE(w) == s && (s != ST_RESERVE || W_OWNER(w) == 0); /* (a process's reserve places: not the stack's) */
}

static uint64_t rebuilt(struct pool *p, const uint32_t *list, uint64_t depth, uint64_t s, unsigned char *seen,
                        uint32_t *out) {
    uint64_t cap = p->capacity, j = 0;
    if (depth > cap) depth = cap;
    memset(seen, 0, cap);
    for (uint64_t i = 0; i < depth; i++) {
        uint64_t idx = list[i];
        if (idx < cap && !seen[idx] && in_list(p, idx, s)) {
            seen[idx] = 1;
            out[j++] = (uint32_t)idx;
        }
    }
    for (uint64_t idx = 0; idx < cap; idx++)
        if (!seen[idx] && in_list(p, idx, s)) out[j++] = (uint32_t)idx;
    return j;
}

static void push_all(struct pool *p, int reserve, const uint32_t *order, uint64_t n) {
    list_reset(p, reserve);
    for (uint64_t i = 0; i < n; i++) list_push(p, reserve, order[i]);
}

void repair(struct pool *p) {
    uint64_t cap = p->capacity, *h = p->hdr;
    unsigned char *seen = malloc(cap), *v = dead_owners(p), *busy = calloc(p->max_procs + 2, 1);
    uint32_t *order = malloc(cap * sizeof *order);
    if (!seen || !v || !order || !busy) goto out;
    for (uint64_t e = 0; e < p->max_procs; e++) { /* the scans' bound, in case it was damaged */
        uint64_t *ent = ENTRY(p, e);
        if (ld(&ent[P_EPOCH]) || ld(&ent[P_CACHE_N]) || ld(&ent[P_SLEEPING])) note_entry_used(p, e);
    }
    free(v);
    v = dead_owners(p); /* with the bound restored */
    if (!v) goto out;
    if (h[H_MIN_NR] < 1) h[H_MIN_NR] = 1;
    if (h[H_MIN_NR] > cap) h[H_MIN_NR] = cap;
    /* Every process's reserve places forgotten, but those of a live process
     * moving them this instant; their slots join the stack below. */
    int64_t moving = places_forget_all(p, busy);
    uint64_t lent = 0;
    for (uint64_t e = 0; e < p->max_procs; e++) {
        uint64_t q = ld(&ENTRY(p, e)[P_PLACE_Q]);
        if (busy[e + 1]) lent += q <= PLACES_MAX ? q : PLACES_MAX;
    }
    if (lent > h[H_MIN_NR]) lent = h[H_MIN_NR];
    if (lent < h[H_LENT]) st(&h[H_LENT], lent); /* (never above its final value meanwhile: attach checks the sum) */
    for (uint64_t idx = 0; idx < cap; idx++) {
        uint64_t w = ld(&p->words[idx]), s = W_STATE(w), o = W_OWNER(w);
        int stray = s < ST_ARENA || s > ST_SHARED || (s == ST_CACHED && v[o] == OWNER_DEAD) ||
                    (s == ST_QUEUED && (o == 0 || o > p->max_queues || QUEUE(p, o - 1)[Q_STATE] != QUEUE_LIVE)) ||
                    (s == ST_SHARED && (o == 0 || o > MAX_TOPICS || TOPIC(p, o - 1)[T_STATE] != QUEUE_LIVE));
        if (stray) set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)));
        else if (s == ST_RESERVE && o != 0 && !(o <= p->max_procs && busy[o]))
            set_word(p, idx, w, mkword(ST_RESERVE, 0, W_GEN(w)));
        CRASH(CP_REBUILD);
    }
    uint64_t curr = rebuilt(p, p->stack, h[H_RESERVE_DEPTH], ST_RESERVE, seen, order);
    while (curr > h[H_MIN_NR] - lent) { /* the reserve is not a cache: extras go back */
        uint64_t idx = order[--curr], w = ld(&p->words[idx]);
        set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)));
    }
    push_all(p, 1, order, curr);
    st(&h[H_LENT], lent);
    queue_relink(p, seen);
    push_all(p, 0, order, rebuilt(p, p->arena, h[H_ARENA_FREE], ST_ARENA, seen, order));
    topic_repair(p); /* rings, references; shared slots nobody references freed */
    if (moving) st(&h[H_RECOUNT], 1); /* (the next holder counts curr_nr once they are still) */
    else recount(p);
    st(&h[H_PARKED], 1);
    finish_parked(p);
    uncount_dead_sleepers(p);
    p->wake = 1;
out:
    free(seen);
    free(v);
    free(order);
    free(busy);
}
