/* slots.c: the only code that writes a slot word, the reserve stack or the
 * arena's free list.
 *
 * As in mm/mempool.c, where add_element and remove_element are the only
 * code that touches the pool's elements[] array, every other file moves a
 * slot by calling these:
 *
 *   set_word        a slot word, by compare-and-swap from the word the caller
 *                   read (the hot path moves a slot of its cache without the
 *                   lock, and a thief under the lock may move it too)
 *   hand_out        a slot to HELD by us under its next generation, and its
 *                   hand-out time (since[]: the only writer)
 *   add_element     push onto the reserve stack (curr_nr + 1)
 *   remove_element  pop the reserve stack's top (curr_nr - 1), checking its
 *                   poison
 *   reserve_count   H_CURR_NR, the reserve's total (the stack and the places
 *                   lent to processes) less the places' slack (places.c),
 *                   by atomic adds; and the low-water mark
 *                   (lower_low_water, its only writer)
 *   arena_push/pop  the shared free list of the arena (arena_free)
 *   list_push       the push under both (repair pushes the lists again
 *                   with it, after list_reset empties them)
 *
 * Order of a move: the slot word first (the commit), then the list around
 * it. A process killed between the two leaves a word that says where the
 * slot is and a list that does not yet (or still) name it; repair() rebuilds
 * the lists from the words, so the word is always the truth.
 *
 * Poisoning (the kernel's slab debugging): an element entering the reserve
 * is filled with POISON_FREE and a last POISON_END; when it leaves, the
 * pattern is checked (a mismatch: written after free, counted and warned
 * after the lock is released) and the element filled with POISON_INUSE.
 */
#include <string.h>

#include "pool.h"

int set_word(struct pool *p, uint64_t idx, uint64_t old, uint64_t new_) {
    return cas(&p->words[idx], old, new_);
}

/* Mark slot idx, whose word is `old` and is ours to move (ARENA or RESERVE
 * under the lock, or CACHED by us), HELD by us under its next generation:
 * the commit of an allocation. 1 with its handle, or 0 if the word moved
 * meanwhile (a thief took a cached slot). */
int hand_out(struct pool *p, uint64_t idx, uint64_t old, uint64_t *handle) {
    uint64_t gen = (W_GEN(old) + 1) & GEN_MASK;
    if (!set_word(p, idx, old, mkword(ST_HELD, p->me, gen))) return 0;
    struct timespec ts; /* for people (ages in shmpool-inspect): the coarse clock is enough and costs a load */
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    st(&p->since[idx], (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
    *handle = idx | gen << HGEN_SHIFT;
    return 1;
}

static void poison_fill(struct pool *p, uint64_t idx) {
    unsigned char *e = p->data + idx * p->stride;
    memset(e, POISON_FREE, p->slot_size - 1);
    e[p->slot_size - 1] = POISON_END;
}

/* Whether reserved slot idx still holds its poison pattern whole. */
int poison_intact(const struct pool *p, uint64_t idx) {
    const unsigned char *e = p->data + idx * p->stride;
    uint64_t n = p->slot_size;
    for (uint64_t i = 0; i + 1 < n; i++)
        if (e[i] != POISON_FREE) return 0;
    return e[n - 1] == POISON_END;
}

/* The kernel's check_element: the pattern must be whole; then
 * POISON_INUSE. A mismatch is counted and warned (after the lock is
 * released) and, as the kernel's __check_element does, the bytes are left
 * as they were found: they are the evidence. */
static void poison_check(struct pool *p, uint64_t idx) {
    if (!poison_intact(p, idx)) {
        count(p, C_POISON, 1);
        p->poisoned = (int64_t)idx;
        return;
    }
    memset(p->data + idx * p->stride, POISON_INUSE, p->slot_size);
}

/* Push slot idx onto the reserve stack (reserve) or the shared free list,
 * below capacity (the caller checked): the one place that writes either. */
void list_push(struct pool *p, int reserve, uint64_t idx) {
    uint64_t *depth = &p->hdr[reserve ? H_RESERVE_DEPTH : H_ARENA_FREE], n = *depth;
    (reserve ? p->stack : p->arena)[n] = (uint32_t)idx;
    st(depth, n + 1);
}

/* H_LOW_WATER down to n if n is lower (a CAS: places move without the
 * lock; the line is written rarely). The only code that lowers it. */
void lower_low_water(struct pool *p, uint64_t n) {
    uint64_t lw = ld(&p->hdr[H_LOW_WATER]);
    while (n < lw && !__atomic_compare_exchange_n(&p->hdr[H_LOW_WATER], &lw, n, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}

/* H_CURR_NR up or down by d, atomically: its only writer besides recount
 * (places.c). Lowered before an element leaves the reserve (or before a
 * process's places take slack) and raised after one entered it (or after
 * slack was given up), so that a process killed between leaves it too low,
 * never too high; it never goes below 0. The new value. */
uint64_t reserve_count(struct pool *p, int64_t d) {
    uint64_t *c = &p->hdr[H_CURR_NR];
    if (d >= 0) return __atomic_add_fetch(c, (uint64_t)d, __ATOMIC_SEQ_CST);
    uint64_t n = __atomic_load_n(c, __ATOMIC_RELAXED), m = (uint64_t)-d;
    while (n > 0 && !__atomic_compare_exchange_n(c, &n, n > m ? n - m : 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return n > m ? n - m : 0;
}

/* Push slot idx, whose word the caller has just made RESERVE, onto the
 * reserve's stack: an element enters the reserve. The caller checked that
 * there is an empty shared place (places.c, reserve_room). */
void add_element(struct pool *p, uint64_t idx) {
    if (p->poison) poison_fill(p, idx);
    list_push(p, 1, idx);
    reserve_count(p, 1);
}

/* Pop the top of the reserve's stack (depth > 0): its index, or
 * RC_CORRUPT. The slot word still says RESERVE: the caller hands it out or
 * frees it. */
int remove_element(struct pool *p, uint64_t *out) {
    uint64_t n = p->hdr[H_RESERVE_DEPTH];
    if (n == 0 || n > p->capacity) return corrupt(p, "the reserve stack's depth %llu is beyond the capacity %llu", n, p->capacity);
    uint64_t idx = p->stack[n - 1];
    if (idx >= p->capacity || W_STATE(ld(&p->words[idx])) != ST_RESERVE)
        return corrupt(p, "reserve stack entry %llu names slot %llu, which is not in the reserve", n - 1, idx);
    reserve_count(p, -1);
    lower_low_water(p, reserve_total(p)); /* (the lock held: our places are given back) */
    st(&p->hdr[H_RESERVE_DEPTH], n - 1);
    if (p->poison) poison_check(p, idx);
    *out = idx;
    return RC_OK;
}

/* Push slot idx, whose word the caller has just made ARENA, onto the shared
 * free list. */
int arena_push(struct pool *p, uint64_t idx) {
    uint64_t n = p->hdr[H_ARENA_FREE];
    if (n >= p->capacity) return corrupt(p, "arena_free %llu is beyond the capacity %llu", n, p->capacity);
    list_push(p, 0, idx);
    return RC_OK;
}

/* The entry `depth` below the top of the shared free list (0: the top),
 * checked: a slot whose word says ARENA. RC_FAIL past the bottom. */
int arena_peek(struct pool *p, uint64_t depth, uint64_t *out) {
    uint64_t n = p->hdr[H_ARENA_FREE];
    if (n > p->capacity) return corrupt(p, "arena_free %llu is beyond the capacity %llu", n, p->capacity);
    if (depth >= n) return RC_FAIL;
    uint64_t idx = p->arena[n - 1 - depth];
    if (idx >= p->capacity || W_STATE(ld(&p->words[idx])) != ST_ARENA)
        return corrupt(p, "arena free list entry %llu names slot %llu, not a free one", n - 1 - depth, idx);
    *out = idx;
    return RC_OK;
}

/* Pop the shared free list: a slot whose word says ARENA, or RC_FAIL. */
int arena_pop(struct pool *p, uint64_t *out) {
    int r = arena_peek(p, 0, out);
    if (r == RC_OK) st(&p->hdr[H_ARENA_FREE], p->hdr[H_ARENA_FREE] - 1);
    return r;
}

/* Cut the reserve stack down to its `depth` bottom entries: their slots
 * above moved to a process's places (places_lend), still in the reserve. */
void list_cut(struct pool *p, uint64_t depth) {
    if (depth < p->hdr[H_RESERVE_DEPTH]) st(&p->hdr[H_RESERVE_DEPTH], depth);
}

/* Empty the reserve stack (reserve) or the free list, for repair() to push
 * the slots that the words say are there. */
void list_reset(struct pool *p, int reserve) {
    st(&p->hdr[reserve ? H_RESERVE_DEPTH : H_ARENA_FREE], 0);
}
