/* arena.c: the kernel's backing allocator, the "arena" of free slots.
 *
 * The arena is the shared free list (slots.c owns it) and, in front of it,
 * one cache of free slots per process, in that process's registry entry, as
 * SLUB keeps per-CPU slabs and DPDK per-lcore caches: a process pops and
 * pushes its own cache without the lock, so the common alloc and free touch
 * no lock and no shared cache line. The reserve is never cached.
 *
 * A cache is a stack of slot indexes `cache[0:cache_n]` whose slots' words
 * say CACHED by the entry. Only its owner pushes and pops, lock-free, moving
 * the slot word by CAS (set_word): a thief holding the pool lock may take a
 * cached slot at the same moment. The thief moves the word CACHED -> ARENA,
 * pushes the slot on the shared list and blanks the cache entry (CAS on the
 * entry, unless the owner reused it meanwhile); the owner drops entries whose
 * slot is no longer cached by it. How many slots a cache holds is therefore
 * counted from the slot words its entries name (cached_by), never kept in a
 * counter that a death could leave half updated.
 *
 * When the shared list runs dry, arena_take steals every other process's
 * cache before it reports the arena dry, so free slots are never stranded in
 * an idle process's cache. Fault injection (fail_rate) draws once per
 * arena attempt that could have been served, from one of two generators
 * chosen at create: a splitmix64 counter in the header (an atomic add:
 * lock-free, the default), or glibc's rand() (random_r's additive feedback
 * generator, TYPE_3, as srand() seeds it), drawn under the pool lock, so
 * that the attempts of every process draw in the order they ask the arena,
 * and a run reproduces a C program's `rand() % 100 < rate` decisions.
 */
#include <string.h>

#include "pool.h"

#define GOLDEN 0x9E3779B97F4A7C15ull

/* glibc's srand(seed) into the header's table (lock held, or nobody else
 * sees the pool yet): srandom_r for TYPE_3, then its 310 discarded draws. */
void glibc_srand(struct pool *p, uint32_t seed) {
    int32_t *r = (int32_t *)&p->hdr[H_GLIBC_TABLE];
    r[0] = (int32_t)(seed ? seed : 1);
    for (int i = 1; i < 31; i++) {
        long hi = r[i - 1] / 127773, lo = r[i - 1] % 127773; /* 16807 * r mod (2**31 - 1), without overflow */
        long word = 16807 * lo - 2836 * hi;
        if (word < 0) word += 2147483647;
        r[i] = (int32_t)word;
    }
    st(&p->hdr[H_GLIBC_FRONT], 3);
    for (int i = 0; i < 310; i++) glibc_rand(p);
}

/* glibc's rand() (random_r, TYPE_3) from the header's table (lock held). */
uint32_t glibc_rand(struct pool *p) {
    uint32_t *r = (uint32_t *)&p->hdr[H_GLIBC_TABLE];
    uint64_t front = ld(&p->hdr[H_GLIBC_FRONT]) % 31, rear = (front + 28) % 31; /* (bounded: damage) */
    uint32_t val = r[front] + r[rear];
    r[front] = val;
    st(&p->hdr[H_GLIBC_FRONT], (front + 1) % 31);
    return val >> 1;
}

/* 1 if this arena attempt fails on purpose (counted). With RNG_GLIBC the
 * caller holds the lock (alloc's lock-free path does not draw). */
int fault(struct pool *p) {
    uint64_t thr = ld(&p->hdr[H_FAIL_THRESHOLD]);
    if (!thr) return 0;
    int hit;
    if (ld(&p->hdr[H_RNG_KIND]) == RNG_GLIBC) {
        double rate; /* the seed's test, exactly: rand() % 100 < fail_rate * 100 */
        uint64_t bits = ld(&p->hdr[H_FAIL_RATE]);
        memcpy(&rate, &bits, sizeof rate);
        hit = (double)(glibc_rand(p) % 100) < rate * 100.0;
    } else {
        uint64_t z = __atomic_add_fetch(&p->hdr[H_RNG], GOLDEN, __ATOMIC_RELAXED);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        hit = (z >> 11) < thr;
    }
    if (hit) count(p, C_FAULTS, 1);
    return hit;
}

/* Pop our cache's top and hand it out (lock-free): 1 with *handle, 0 if the
 * cache holds no slot of ours (entries taken by thieves are dropped). */
int cache_pop(struct pool *p, uint64_t *handle) {
    uint64_t *ent = p->entry;
    uint64_t n = ent[P_CACHE_N];
    if (n > CACHE_MAX) n = CACHE_MAX;
    while (n > 0) {
        n--;
        uint64_t idx = __atomic_load_n(&p->cache[n], __ATOMIC_ACQUIRE);
        st(&ent[P_CACHE_N], n);
        if (idx >= p->capacity) continue; /* blank, or damaged: dropped */
        prefetch_w(&p->words[idx]); /* read, then CASed: owned at once */
        if (n > 0) { /* the next allocation's word, while the caller works */
            uint32_t nx = __atomic_load_n(&p->cache[n - 1], __ATOMIC_RELAXED);
            if (nx < p->capacity) prefetch_w(&p->words[nx]);
        }
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_CACHED || W_OWNER(w) != p->me) continue; /* taken by a thief */
        if (hand_out(p, idx, w, handle)) return 1;
    }
    return 0;
}

/* Push HELD slot idx (word w) onto our cache (lock-free, or under the lock
 * by release_slot): 1 if it went there, 0 if the cache is full or the word
 * moved (a concurrent free of the same handle by another process). */
int cache_push(struct pool *p, uint64_t idx, uint64_t w) {
    uint64_t n = p->entry[P_CACHE_N];
    if (n >= CACHE_MAX) return 0;
    /* The entry first, then the word: the word's CAS (a full barrier) is
     * what makes the slot findable by a thief, before free_fast looks for
     * sleepers (see there). A thief meanwhile skips the entry: its slot is
     * not CACHED yet. */
    __atomic_store_n(&p->cache[n], (uint32_t)idx, __ATOMIC_RELEASE);
    st(&p->entry[P_CACHE_N], n + 1);
    if (!set_word(p, idx, w, mkword(ST_CACHED, p->me, W_GEN(w)))) {
        st(&p->entry[P_CACHE_N], n);
        return 0;
    }
    return 1;
}

/* Move all but the top `keep` entries of our cache (its bottom) onto the
 * shared free list (lock held). Our cache is the arena's top: this keeps the
 * allocation order of the single locked stack. */
int drain(struct pool *p, uint64_t keep) {
    if (!p->entry) return RC_OK;
    uint64_t *ent = p->entry;
    uint64_t n = ent[P_CACHE_N];
    if (n > CACHE_MAX) return corrupt(p, "this process's cache count %llu exceeds its size %llu", n, CACHE_MAX);
    uint64_t move = n > keep ? n - keep : 0;
    for (uint64_t i = 0; i < move; i++) {
        uint64_t idx = __atomic_load_n(&p->cache[i], __ATOMIC_ACQUIRE);
        if (idx >= p->capacity) continue;
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_CACHED || W_OWNER(w) != p->me) continue;
        if (p->hdr[H_ARENA_FREE] >= p->capacity)
            return corrupt(p, "arena_free %llu is beyond the capacity %llu", p->hdr[H_ARENA_FREE], p->capacity);
        if (set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)))) {
            CRASH(CP_DRAIN);
            arena_push(p, idx);
        }
    }
    memmove(p->cache, p->cache + move, (n - move) * sizeof(uint32_t));
    st(&ent[P_CACHE_N], n - move);
    return RC_OK;
}

/* Move up to k slots from the top of the shared free list onto our cache,
 * keeping their order (the list's top becomes the cache's top; lock held). */
static int refill(struct pool *p, uint64_t k, uint64_t *moved) {
    uint64_t *ent = p->entry;
    uint64_t n = ent[P_CACHE_N];
    if (n > CACHE_MAX) return corrupt(p, "this process's cache count %llu exceeds its size %llu", n, CACHE_MAX);
    uint64_t take = CACHE_MAX - n, shared = p->hdr[H_ARENA_FREE];
    if (take > k) take = k;
    if (take > shared) take = shared;
    for (uint64_t i = 0; i < take; i++) { /* all checked before anything moves */
        uint64_t idx;
        int r = arena_peek(p, i, &idx);
        if (r != RC_OK) return r;
        prefetch_w(&p->words[idx]); /* the words' misses overlap, before the loop below CASes them */
    }
    for (uint64_t i = 0; i < take; i++) {
        uint64_t idx;
        arena_pop(p, &idx);
        uint64_t w = ld(&p->words[idx]);
        set_word(p, idx, w, mkword(ST_CACHED, p->me, W_GEN(w)));
        __atomic_store_n(&p->cache[n + take - 1 - i], (uint32_t)idx, __ATOMIC_RELEASE);
        CRASH(CP_REFILL);
    }
    st(&ent[P_CACHE_N], n + take);
    *moved = take;
    return RC_OK;
}

/* Take every slot entry e's cache lists onto the shared free list, bottom
 * first, as its own drain would (lock held; its list is only trusted
 * entry by entry: each slot must be CACHED by e). So the list keeps the
 * order it gave: a dead process's cache returned slot by slot in index
 * order put two processes' next refills' tops side by side, on one line of
 * the slot words, which each then wrote on every allocation (two
 * processes on the arena path at 0.3x one). *taken grows by how many
 * moved. */
int steal_cache(struct pool *p, uint64_t e, uint64_t *taken) {
    uint64_t *ent = ENTRY(p, e);
    uint64_t n = ld(&ent[P_CACHE_N]);
    if (n > CACHE_MAX) n = CACHE_MAX;
    uint32_t *cache = CACHE_OF(ent);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t idx = __atomic_load_n(&cache[i], __ATOMIC_ACQUIRE);
        if (idx >= p->capacity) continue;
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_CACHED || W_OWNER(w) != e + 1) continue;
        if (p->hdr[H_ARENA_FREE] >= p->capacity)
            return corrupt(p, "arena_free %llu is beyond the capacity %llu", p->hdr[H_ARENA_FREE], p->capacity);
        if (set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)))) {
            CRASH(CP_STEAL);
            arena_push(p, idx);
            uint32_t expected = idx; /* blank the entry, unless its owner reused it */
            __atomic_compare_exchange_n(&cache[i], &expected, (uint32_t)CACHE_BLANK, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE);
            (*taken)++;
        }
    }
    return RC_OK;
}

/* Take every slot cached by another process onto the shared free list
 * (lock held). How many moved. */
int steal(struct pool *p, uint64_t *taken) {
    *taken = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        if (e + 1 == p->me || ld(&ENTRY(p, e)[P_EPOCH]) == 0) continue;
        int r = steal_cache(p, e, taken);
        if (r != RC_OK) return r;
    }
    return RC_OK;
}

/* Whether the arena looks dry without the lock: no slot on the shared list
 * and no cache that lists any (a cache's count, not its words: a stale
 * count sends the caller to the locked path, which steals). */
int arena_dry(const struct pool *p) {
    if (ld(&p->hdr[H_ARENA_FREE]) != 0) return 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++)
        if (ld(&ENTRY(p, e)[P_CACHE_N]) != 0) return 0;
    return 1;
}

/* How many slots entry e's cache really holds: entries naming a slot
 * CACHED by e (counted from the words, never from a counter). */
uint64_t cached_by(const struct pool *p, uint64_t e) {
    const uint64_t *ent = ENTRY(p, e);
    uint64_t total = 0, n = ld(&ent[P_CACHE_N]);
    if (n > CACHE_MAX) n = CACHE_MAX;
    const uint32_t *cache = (const uint32_t *)(ent + P_CACHE);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t idx = __atomic_load_n(&cache[i], __ATOMIC_ACQUIRE);
        if (idx >= p->capacity) continue;
        uint64_t w = ld(&p->words[idx]);
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
int arena_take(struct pool *p, int inject, int to, uint64_t *handle) {
    int use_cache = p->enabled && p->entry;
    uint64_t taken, idx;
    int r;
    if ((!use_cache || p->entry[P_CACHE_N] == 0) && p->hdr[H_ARENA_FREE] == 0) {
        if ((r = steal(p, &taken)) != RC_OK) return r;
        if (!taken) return RC_DRY; /* dry: no draw */
    }
    if (inject && fault(p)) return RC_FAIL;
    if (use_cache && to == ST_HELD) {
        for (;;) {
            if (cache_pop(p, handle)) {
                count(p, C_ALLOC_ARENA, 1);
                return RC_OK;
            }
            uint64_t moved;
            if ((r = refill(p, CACHE_BATCH, &moved)) != RC_OK) return r;
            if (moved) continue;
            if ((r = steal(p, &taken)) != RC_OK) return r; /* our cache held only stale entries */
            if (!taken) return RC_DRY;
        }
    }
    if (use_cache && (r = drain(p, 0)) != RC_OK) return r; /* our cache is the arena's top: keep the order */
    if ((r = arena_pop(p, &idx)) != RC_OK) return r == RC_FAIL ? RC_DRY : r;
    uint64_t w = ld(&p->words[idx]);
    if (to == ST_HELD) {
        hand_out(p, idx, w, handle); /* ours under the lock: cannot move */
        count(p, C_ALLOC_ARENA, 1);
    } else {
        set_word(p, idx, w, mkword(ST_RESERVE, 0, W_GEN(w)));
        add_element(p, idx);
    }
    return RC_OK;
}
