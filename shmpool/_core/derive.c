/* derive.c: the one derivation of a pool's numbers.
 *
 * stats() runs it under the lock on the live segment; shmpool-inspect runs
 * it on a copy of the metadata taken without the lock (py_module.c, derive).
 * Both therefore say the same thing with the same clamps:
 *
 *   curr_nr       H_CURR_NR plus every entry's slack (reserve_total,
 *                 places.c)
 *   arena_shared  the shared free list's depth (arena_free in the header)
 *   arena_cached  slots CACHED by the entry whose cache lists them (entries
 *                 in use, below H_ENTRIES_USED), counted from the words
 *   queued        the live queues' counts, each at most the capacity
 *   in_use        the rest of the capacity (held and parked elements);
 *                 curr_nr + arena_shared + arena_cached + queued + in_use is
 *                 the capacity whenever the parts fit in it
 *   parked        PARKED slots, counted when the hint says there may be some
 *   nr_waiters    the sleeping allocations plus every live queue's sleepers
 *                 (a count beyond SLEEPERS_MAX is damage: 0)
 *   counters      the header's plus every entry's (COUNTERS' order)
 *   low_water, longest_sleep_ns, total_sleep_ns   the header's (low_water
 *                 at most min_nr)
 *   attached      entries in use (epoch not 0) whose process lives (its OFD
 *                 lock; a copy has no descriptor to ask: every entry in use)
 *
 * It only reads, and every value read is bounded, so a damaged or torn copy
 * gives clamped numbers, never an out-of-bounds read.
 */
#include <string.h>

#include "pool.h"

static uint64_t at_most(uint64_t x, uint64_t cap) { return x < cap ? x : cap; }

void derive(const struct pool *p, struct numbers *n) {
    const uint64_t *h = p->hdr;
    uint64_t cap = p->capacity, used = entries_used(p);
    n->status = ld(&h[H_STATUS]);
    n->flags = ld(&h[H_FLAGS]);
    n->min_nr = ld(&h[H_MIN_NR]);
    n->curr_nr = reserve_total(p);
    n->arena_shared = ld(&h[H_ARENA_FREE]);
    n->fail_rate_bits = ld(&h[H_FAIL_RATE]);
    n->seed = ld(&h[H_SEED]);
    n->low_water = at_most(ld(&h[H_LOW_WATER]), n->min_nr);
    n->longest_sleep_ns = ld(&h[H_LONGEST_SLEEP_NS]);
    n->total_sleep_ns = ld(&h[H_TOTAL_SLEEP_NS]);
    n->arena_cached = n->attached = 0;
    for (uint64_t e = 0; e < used; e++) {
        const uint64_t *ent = ENTRY(p, e);
        if (ld(&ent[P_EPOCH]) != 0 || ld(&ent[P_CACHE_N]) != 0) n->arena_cached += cached_by(p, e);
        if (ld(&ent[P_EPOCH]) != 0) n->attached += e + 1 == p->me || entry_locked(p, e);
    }
    n->queued = 0;
    n->nr_waiters = ld(&h[H_NR_WAITERS]);
    if (n->nr_waiters > SLEEPERS_MAX) n->nr_waiters = 0; /* damage (the next holder recounts it) */
    for (uint64_t q = 0; q < p->max_queues; q++) {
        const uint64_t *Q = QUEUE(p, q);
        if (ld(&Q[Q_STATE]) != QUEUE_LIVE) continue;
        n->queued += at_most(ld(&Q[Q_COUNT]), cap);
        for (int k = 0; k < 2; k++) {
            uint64_t w = ld(&Q[k ? Q_PUTTERS : Q_GETTERS]);
            n->nr_waiters += w <= SLEEPERS_MAX ? w : 0; /* beyond it: damage, as everywhere */
        }
    }
    uint64_t free_ = at_most(n->curr_nr, cap) + at_most(n->arena_shared, cap) + at_most(n->arena_cached, cap) +
                     at_most(n->queued, cap);
    n->in_use = free_ >= cap ? 0 : cap - free_;
    n->published = published_now(p);
    n->parked = 0;
    if (ld(&h[H_PARKED]))
        for (uint64_t idx = 0; idx < cap; idx++) n->parked += W_STATE(ld(&p->words[idx])) == ST_PARKED;
    const uint64_t header_counter[N_COUNTERS] = COUNTER_WORDS;
    for (int c = 0; c < N_COUNTERS; c++) {
        n->counters[c] = ld(&h[header_counter[c]]);
        if (c < (int)N_PROC_COUNTERS)
            for (uint64_t e = 0; e < used; e++) n->counters[c] += ld(&ENTRY(p, e)[P_COUNTERS + c]);
    }
}

/* How many slots each owner field holds (HELD): counts[o] for o in
 * 0..max_procs (o is an entry + 1; 0 and fields beyond the registry count
 * in counts[0]), from the words as they are (no lock: for a message). */
void held_by(const struct pool *p, uint32_t *counts) {
    memset(counts, 0, sizeof *counts * (p->max_procs + 1));
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]), o = W_OWNER(w);
        if (W_STATE(w) == ST_HELD) counts[o <= p->max_procs ? o : 0]++;
    }
}
