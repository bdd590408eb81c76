/* places.c: the reserve's places, lent to processes.
 *
 * Why
 * ---
 * The reserve is a stack under the pool lock, as the kernel's elements[]
 * is under pool->lock. When every process runs short at once (the moment
 * the reserve exists for), every pop and push takes that lock, and the lock
 * word, the stack and the slots' words cross between the cores on every
 * call: two processes on the reserve did less than one alone. So the
 * reserve's min_nr positions ("places") are split, as SLUB splits a cache
 * into per-CPU slabs and the arena here has per-process caches:
 *
 *   the shared part   min_nr - H_LENT places: the stack (slots.c), depth
 *                     H_RESERVE_DEPTH, under the pool lock;
 *   a process's part  P_PLACE_Q places (at most PLACES_MAX) in its registry
 *                     entry, of which the first P_PLACE_R are full: they name
 *                     RESERVE slots whose owner field is that entry.
 *
 * A full place is an element in the reserve; an empty one is room in it. So
 * "curr_nr < min_nr" is "some place is empty", wherever it is, and the
 * kernel's rule carries over unchanged: a free goes to the reserve while
 * any place is empty, an allocation takes from the reserve only when the
 * arena failed.
 *
 * The owner fills and empties its own places without the pool lock
 * (place_pop_fast, place_push_fast): an allocation whose arena is dry takes
 * its top full place, a free fills its lowest empty one. Nothing crosses
 * cores: not even the reserve's count, as a percpu_counter batches the
 * kernel's counts. H_CURR_NR (kept by atomic adds, slots.c reserve_count) is
 * the reserve's total less every entry's *slack*: the full places its
 * owner has not counted there. The owner takes slack before it empties a
 * place (SLACK_TAKE at once, H_CURR_NR lowered first) and keeps it when it
 * fills one, giving back all but SLACK_TAKE when it grows past SLACK_MAX;
 * so a process that pops and pushes by turns writes no shared word at all.
 * H_CURR_NR is therefore never more than the reserve holds, which is all
 * that its lock-free reader needs: free's unlocked peek sends a free to the
 * locked path when it reads less than min_nr, and the locked path decides
 * by the places themselves. Whoever takes an entry's place lock under the
 * pool lock folds its slack back in first (places_lock), so every move
 * below counts exactly, as before. curr_nr itself (stats, is_saturated,
 * the inspector) is H_CURR_NR plus every entry's slack (reserve_total); the
 * low-water mark is lowered with H_CURR_NR plus the mover's own slack,
 * exact while one process lives on its places and at most the others'
 * slack too low while several do.
 *
 * A process is lent places once it has gone to the reserve under the lock
 * LEND_AFTER times (a process that touches the reserve now and then never
 * has any). Under the pool lock, a process doing anything else with the
 * reserve first gives its places back (places_return: its elements onto the stack's top,
 * oldest first; they are the newest), does what the single stack would,
 * and when the lock is let go borrows the stack's top min(PLACES_MAX,
 * shared part) places again (places_lend; leave() in mempool.c). One process
 * alone therefore sees exactly the single stack's LIFO order (the seed's run
 * is unchanged); among several, the order is LIFO per process. When the
 * stack is empty, an allocation steals another process's top full place
 * (steal_place); when the shared part is full, a free takes over another's
 * empty place (migrate_hole): places move to where the need is, as SLUB's
 * partial slabs do.
 *
 * Who moves a process's places
 * ----------------------------
 * P_PLACE_LOCK: 0, or the token of whoever is moving them, taken by CAS: the
 * owner on its lock-free path (uncontended: its own line), or a holder of
 * the pool lock. A holder of the pool lock never waits on a live process:
 * it spins briefly, then skips a busy entry (its places are out of reach
 * for that call, like an element that process holds). A free whose only
 * empty places are out of reach so is parked (release_slot): the next
 * holder of the lock completes it, into the reserve, never the arena,
 * whose elements the reserve would not get back. A place lock whose
 * holder is proven dead (the token's epoch or OFD lock, as for the pool
 * lock) is taken over, and that entry's places are given back whole
 * (give_back with `dead`), whatever its list said.
 *
 * Crashes: every move commits with the slot word, as everywhere. H_CURR_NR
 * is lowered before an element leaves the reserve and raised after one
 * entered it, so a process killed at any instruction leaves it too low,
 * never too high: a too-low count sends a free to the locked path, which
 * decides by the places themselves. repair and retire count it again from
 * the words (recount) once no live process is moving places; H_RECOUNT asks
 * the next holder of the lock to when one was.
 */
#include "pool.h"

#define PLACE_SPINS 512 /* pauses a holder of the pool lock waits for an owner in its lock-free path */
#define LEND_AFTER 16   /* locked reserve operations of an object before it is lent places */
#define SLACK_TAKE 4    /* slack an owner takes at once, and keeps when it gives some back */
#define SLACK_MAX 8     /* slack beyond which an owner gives back all but SLACK_TAKE */

static uint32_t *places_of(uint64_t *ent) { return (uint32_t *)(ent + P_PLACES); }

static int own_trylock(struct pool *p) {
    uint64_t free_ = 0;
    return __atomic_compare_exchange_n(&p->entry[P_PLACE_LOCK], &free_, p->token, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_RELAXED);
}

static void places_unlock(uint64_t *ent) { __atomic_store_n(&ent[P_PLACE_LOCK], 0, __ATOMIC_RELEASE); }

/* Entry's slack counted in H_CURR_NR again, its place lock held. `whole`:
 * its owner is not in the middle of a move, so the slack is exact: the
 * word first, then H_CURR_NR, so that it is never too high. Else (a dead
 * holder's, which may have handed an element out and not yet said so) the
 * slack is dropped and curr_nr counted again by the next holder. A word
 * out of bounds is left for check_counts to report. */
static void fold(struct pool *p, uint64_t *ent, int whole) {
    uint64_t v = ld(&ent[P_PLACE_R]), s = places_slack(v);
    if (s == 0 || !places_word_ok(v)) return;
    st(&ent[P_PLACE_R], places_full(v));
    if (whole) reserve_count(p, (int64_t)s);
    else st(&p->hdr[H_RECOUNT], 1);
}

/* Entry e's place lock, for a holder of the pool lock, its slack folded: 1
 * when taken, 2 when taken over from a dead holder (its places may be half
 * moved), 0 if a live process is moving them (skipped). */
static int places_lock(struct pool *p, uint64_t e) {
    uint64_t *ent = ENTRY(p, e);
    for (int i = 0;; i++) {
        uint64_t t = ld(&ent[P_PLACE_LOCK]);
        if ((t == 0 && cas(&ent[P_PLACE_LOCK], 0, p->token)) ||
            t == p->token) { /* (ours: the GIL keeps our own lock-free path out of a locked step) */
            fold(p, ent, 1);
            return 1;
        }
        if (i < PLACE_SPINS) {
            cpu_relax();
            continue;
        }
        if (t != 0 && !token_alive(p, t) && cas(&ent[P_PLACE_LOCK], t, p->token)) {
            fold(p, ent, 0);
            return 2;
        }
        return 0;
    }
}

/* ------------------------------------------------------------------ */
/* The owner, without the pool lock                                     */

/* An allocation whose arena is dry: our top full place, handed out. 1 with
 * *handle, 0 if we have none (or another holds our places this instant).
 * With no slack left, SLACK_TAKE of our full places stop counting in
 * H_CURR_NR first; then the pop writes only our own line. */
int place_pop_fast(struct pool *p, uint64_t *handle) {
    uint64_t *ent = p->entry;
    if (!own_trylock(p)) return 0;
    uint64_t v = ent[P_PLACE_R], r = places_full(v), s = places_slack(v), q = ent[P_PLACE_Q];
    int ok = 0;
    if (r > 0 && r <= q && q <= PLACES_MAX && s <= r) {
        uint64_t idx = places_of(ent)[r - 1];
        uint64_t w = idx < p->capacity ? ld(&p->words[idx]) : 0;
        if (W_STATE(w) == ST_RESERVE && W_OWNER(w) == p->me) {
            if (s == 0) { /* (H_CURR_NR first: never too high; the word then says so, so that a takeover
                           * after a kill here drops the slack and asks for a recount: fold) */
                s = r < SLACK_TAKE ? r : SLACK_TAKE;
                reserve_count(p, -(int64_t)s);
                st(&ent[P_PLACE_R], places_word(r, s));
            }
            CRASH(CP_PLACE_POP);
            st(&ent[P_PLACE_R], places_word(r - 1, s - 1)); /* (first: curr_nr is never too high either) */
            if (hand_out(p, idx, w, handle)) {
                lower_low_water(p, ld(&p->hdr[H_CURR_NR]) + s - 1);
                ok = 1;
            } else
                st(&ent[P_PLACE_R], places_word(r, s));
        }
    }
    places_unlock(ent);
    return ok;
}

/* A free while we have an empty place: HELD slot idx (word w) fills it,
 * as slack (given back to H_CURR_NR, all but SLACK_TAKE, beyond
 * SLACK_MAX). 1 if done, 0 if we have none (or the word moved: a
 * concurrent free). */
int place_push_fast(struct pool *p, uint64_t idx, uint64_t w) {
    uint64_t *ent = p->entry;
    if (!own_trylock(p)) return 0;
    uint64_t v = ent[P_PLACE_R], r = places_full(v), s = places_slack(v), q = ent[P_PLACE_Q];
    int ok = 0;
    if (r < q && q <= PLACES_MAX && s <= r) {
        __atomic_store_n(&places_of(ent)[r], (uint32_t)idx, __ATOMIC_RELEASE);
        if (set_word(p, idx, w, mkword(ST_RESERVE, p->me, W_GEN(w)))) {
            CRASH(CP_PLACE_PUSH);
            uint64_t keep = s < SLACK_MAX ? s + 1 : SLACK_TAKE;
            st(&ent[P_PLACE_R], places_word(r + 1, keep));
            if (keep <= s) reserve_count(p, (int64_t)(s + 1 - keep)); /* (last: never too high) */
            ok = 1;
        }
    }
    places_unlock(ent);
    return ok;
}

/* ------------------------------------------------------------------ */
/* Under the pool lock                                                  */

/* Full place idx (word w) of some entry onto the shared stack's top, with
 * its element still in the reserve (no count changes). */
static int to_stack(struct pool *p, uint64_t idx, uint64_t w) {
    if (p->hdr[H_RESERVE_DEPTH] + p->hdr[H_LENT] >= p->hdr[H_MIN_NR])
        return corrupt(p, "the reserve stack's depth %llu reaches min_nr %llu with places still lent",
                       p->hdr[H_RESERVE_DEPTH], p->hdr[H_MIN_NR]);
    if (set_word(p, idx, w, mkword(ST_RESERVE, 0, W_GEN(w)))) list_push(p, 1, idx);
    return RC_OK;
}

static void lent_less(struct pool *p, uint64_t k) {
    uint64_t lent = p->hdr[H_LENT];
    st(&p->hdr[H_LENT], lent > k ? lent - k : 0);
}

/* Entry e's place counts within bounds, or RC_CORRUPT. */
static int check_counts(struct pool *p, uint64_t e, uint64_t q, uint64_t r) {
    if (q > PLACES_MAX || r > q)
        return corrupt(p, "registry entry %llu claims %llu reserve places (or more full than lent)", e, q);
    return RC_OK;
}

/* Full place i of entry e: its slot and word, which must be a RESERVE slot
 * owned by e, or RC_CORRUPT. */
static int full_place(struct pool *p, uint64_t e, uint64_t i, uint64_t *idx, uint64_t *w) {
    *idx = places_of(ENTRY(p, e))[i];
    *w = *idx < p->capacity ? ld(&p->words[*idx]) : 0;
    if (W_STATE(*w) != ST_RESERVE || W_OWNER(*w) != e + 1)
        return corrupt(p, "reserve place %llu of registry entry %llu names a slot not in the reserve", i, e);
    return RC_OK;
}

/* Whether an entry has no places and nobody moving any. */
static int untouched(const uint64_t *ent) {
    return ld(&ent[P_PLACE_Q]) == 0 && ld(&ent[P_PLACE_R]) == 0 && ld(&ent[P_PLACE_LOCK]) == 0;
}

/* An entry's places emptied, as never lent (its place lock held). */
static void forget(uint64_t *ent) {
    st(&ent[P_PLACE_R], 0);
    st(&ent[P_PLACE_Q], 0);
    for (uint64_t i = 0; i < PLACES_MAX; i++) __atomic_store_n(&places_of(ent)[i], 0u, __ATOMIC_RELAXED);
}

/* Entry e's places back to the shared part (its place lock held): its
 * elements onto the stack's top, oldest first. `dead`: its process died,
 * perhaps in the middle of a move, so every RESERVE slot it owns goes back,
 * listed or not, and its list is not trusted. Else a list that names
 * anything but its own RESERVE slots is damage (nothing moved). */
static int give_back(struct pool *p, uint64_t e, int dead) {
    uint64_t *ent = ENTRY(p, e), o = e + 1;
    uint64_t q = ld(&ent[P_PLACE_Q]), r = ld(&ent[P_PLACE_R]);
    uint32_t *pl = places_of(ent);
    int rc = RC_OK;
    if (!dead) {
        if (check_counts(p, e, q, r) != RC_OK) return RC_CORRUPT;
        for (uint64_t i = 0, idx, w; i < r; i++) /* all checked before anything moves */
            if (full_place(p, e, i, &idx, &w) != RC_OK) return RC_CORRUPT;
    }
    /* H_LENT first, the stack after: depth + lent <= min_nr at every instant
     * (an attach checks it without the lock) */
    lent_less(p, q <= PLACES_MAX ? q : PLACES_MAX);
    if (!dead) {
        for (uint64_t i = 0; rc == RC_OK && i < r; i++) rc = to_stack(p, pl[i], ld(&p->words[pl[i]]));
    } else {
        for (uint64_t i = 0; rc == RC_OK && i < r && i < PLACES_MAX; i++) { /* in order, what is still there */
            uint64_t idx = pl[i], w = idx < p->capacity ? ld(&p->words[idx]) : 0;
            if (W_STATE(w) == ST_RESERVE && W_OWNER(w) == o) rc = to_stack(p, idx, w);
        }
        for (uint64_t idx = 0; rc == RC_OK && idx < p->capacity; idx++) { /* then what a move left unlisted */
            uint64_t w = ld(&p->words[idx]);
            if (W_STATE(w) == ST_RESERVE && W_OWNER(w) == o) rc = to_stack(p, idx, w);
        }
    }
    if (rc != RC_OK) return rc;
    forget(ent);
    return RC_OK;
}

/* Entry e's places, whose lock was taken over from a dead holder, back
 * whole; curr_nr is counted again by the next holder of the lock. */
static int give_back_dead(struct pool *p, uint64_t e) {
    int r = give_back(p, e, 1);
    st(&p->hdr[H_RECOUNT], 1);
    return r;
}

/* Our places back to the shared part, before anything else is done with
 * the reserve under the lock; leave() lends them again (p->relend). */
int places_return(struct pool *p) {
    if (!p->entry) return RC_OK;
    p->relend = 1;
    if (ld(&p->entry[P_PLACE_Q]) == 0) return RC_OK;
    int k = places_lock(p, p->me - 1);
    if (!k) return RC_OK;
    int r = k == 2 ? give_back_dead(p, p->me - 1) : give_back(p, p->me - 1, 0);
    places_unlock(p->entry);
    return r;
}

/* Lend ourselves the stack's top min(PLACES_MAX, shared part) places (its
 * top elements, oldest first, and the empty places above them), when we
 * have none: what lets our next allocations and frees on the reserve skip
 * the lock. Only for an object that uses the lock-free paths, and only
 * once it has gone to the reserve under the lock LEND_AFTER times: a
 * process that touches the reserve now and then keeps the single stack
 * (nothing of it sits in its entry), one that lives on it gets places. */
int places_lend(struct pool *p) {
    p->relend = 0;
    if (p->reserve_calls < LEND_AFTER) { /* not yet a process that lives on the reserve */
        p->reserve_calls++;
        return RC_OK;
    }
    if (!p->entry || !p->enabled || p->poison || ld(&p->entry[P_PLACE_Q]) != 0 || ld(&p->entry[P_EPOCH]) == 0 ||
        ld(&p->hdr[H_STATUS]) != STATUS_LIVE)
        return RC_OK;
    uint64_t *h = p->hdr, min_nr = h[H_MIN_NR], lent = h[H_LENT], depth = h[H_RESERVE_DEPTH];
    if (lent > min_nr || depth > min_nr - lent) return RC_OK; /* (check_header's: the next call says so) */
    uint64_t shared = min_nr - lent, k = shared < PLACES_MAX ? shared : PLACES_MAX, bottom = shared - k;
    if (k == 0) return RC_OK;
    uint64_t f = depth > bottom ? depth - bottom : 0;
    for (uint64_t i = 0; i < f; i++) { /* all checked before anything moves */
        uint64_t idx = p->stack[bottom + i];
        if (idx >= p->capacity || W_STATE(ld(&p->words[idx])) != ST_RESERVE || W_OWNER(ld(&p->words[idx])) != 0)
            return corrupt(p, "reserve stack entry %llu names slot %llu, which is not in the reserve", bottom + i, idx);
    }
    int lk = places_lock(p, p->me - 1);
    if (lk != 1) { /* busy, or a dead holder's (then given back whole) */
        int r = lk == 2 ? give_back_dead(p, p->me - 1) : RC_OK;
        if (lk == 2) places_unlock(p->entry);
        return r;
    }
    uint32_t *pl = places_of(p->entry);
    for (uint64_t i = 0; i < f; i++) {
        uint64_t idx = p->stack[bottom + i], w = ld(&p->words[idx]);
        __atomic_store_n(&pl[i], (uint32_t)idx, __ATOMIC_RELEASE);
        set_word(p, idx, w, mkword(ST_RESERVE, p->me, W_GEN(w)));
        CRASH(CP_LEND);
    }
    list_cut(p, depth - f);
    st(&p->entry[P_PLACE_R], f);
    st(&p->entry[P_PLACE_Q], k);
    st(&h[H_LENT], lent + k);
    places_unlock(p->entry);
    return RC_OK;
}

/* Whether entry e (not ours) may have places to look at. */
static int other(const struct pool *p, uint64_t e) {
    return e + 1 != p->me && ld(&ENTRY(p, e)[P_EPOCH]) != 0;
}

/* The stack is empty: another process's top full place (element and place)
 * onto it. *got: 1 if one moved. */
int steal_place(struct pool *p, int *got) {
    *got = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (!other(p, e) || ld(&ent[P_PLACE_R]) == 0) continue;
        int k = places_lock(p, e);
        if (!k) {
            p->places_busy = 1; /* (a sleeper looks again soon: see run_loop) */
            continue;
        }
        int r = RC_OK;
        if (k == 2) { /* its holder died moving them: all of them back */
            uint64_t before = p->hdr[H_RESERVE_DEPTH];
            r = give_back_dead(p, e);
            *got = p->hdr[H_RESERVE_DEPTH] > before;
        } else {
            uint64_t n = ld(&ent[P_PLACE_R]), q = ld(&ent[P_PLACE_Q]);
            uint64_t idx, w;
            if ((r = check_counts(p, e, q, n)) == RC_OK && n > 0 && (r = full_place(p, e, n - 1, &idx, &w)) == RC_OK) {
                lent_less(p, 1); /* (first: see give_back) */
                if ((r = to_stack(p, idx, w)) == RC_OK) {
                    st(&ent[P_PLACE_R], n - 1);
                    st(&ent[P_PLACE_Q], q - 1);
                    *got = 1;
                }
            }
        }
        places_unlock(ent);
        if (r != RC_OK || *got) return r;
    }
    return RC_OK;
}

/* The shared part is full: another process's empty place becomes shared.
 * *room: 1 if one did; else *busy: 1 if an entry with empty places was
 * skipped because its live owner was moving them. */
int migrate_hole(struct pool *p, int *room, int *busy) {
    *room = *busy = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (!other(p, e) || ld(&ent[P_PLACE_Q]) <= places_full(ld(&ent[P_PLACE_R]))) continue;
        int k = places_lock(p, e);
        if (!k) {
            *busy = 1;
            continue;
        }
        int r = RC_OK;
        if (k == 2) {
            r = give_back_dead(p, e);
        } else {
            uint64_t n = ld(&ent[P_PLACE_R]), q = ld(&ent[P_PLACE_Q]);
            if (n < q && q <= PLACES_MAX) {
                st(&ent[P_PLACE_Q], q - 1);
                lent_less(p, 1);
            }
        }
        places_unlock(ent);
        if (r != RC_OK) return r;
        uint64_t *h = p->hdr;
        if (h[H_RESERVE_DEPTH] + h[H_LENT] < h[H_MIN_NR]) {
            *room = 1;
            return RC_OK;
        }
    }
    return RC_OK;
}

/* Whether a free may go to the reserve (lock held; the caller saw curr_nr <
 * min_nr): an empty shared place, else another process's made shared. Our
 * own places were given back first. With no room, *busy says whether an
 * empty place exists but its live owner is moving it this instant (the
 * free must wait for it, not go to the arena: see release_slot). */
int reserve_room(struct pool *p, int *room, int *busy) {
    int r = places_return(p);
    *busy = 0;
    if (r != RC_OK) return r;
    uint64_t *h = p->hdr;
    *room = h[H_RESERVE_DEPTH] + h[H_LENT] < h[H_MIN_NR];
    return *room ? RC_OK : migrate_hole(p, room, busy);
}

/* The reserve's top for an allocation (lock held): our places given back,
 * then the stack's top, stealing another process's full place when the
 * stack is empty. RC_FAIL if no element is within reach. */
int reserve_pop(struct pool *p, uint64_t *idx) {
    int r = places_return(p), got = 1;
    p->places_busy = 0;
    while (r == RC_OK && p->hdr[H_RESERVE_DEPTH] == 0 && got) r = steal_place(p, &got);
    if (r != RC_OK) return r;
    return p->hdr[H_RESERVE_DEPTH] ? remove_element(p, idx) : RC_FAIL;
}

/* Whether another process holds full places (a sleeper's last look). */
int others_have_places(const struct pool *p) {
    for (uint64_t e = 0, used = entries_used(p); e < used; e++)
        if (other(p, e) && ld(&ENTRY(p, e)[P_PLACE_R]) != 0) return 1;
    return 0;
}

/* Every process's places back to the shared part (resize, hold_lock): how
 * many entries were skipped because their owner is moving them this
 * instant. A holder proven dead (its process, or a lock holder that died in
 * its lock-free step) gives its places back whole. */
int64_t places_reclaim_all(struct pool *p) {
    int64_t n = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (untouched(ent)) continue;
        int k = places_lock(p, e);
        if (!k) {
            n++;
            continue;
        }
        int r = give_back(p, e, k == 2 || ld(&ent[P_EPOCH]) == 0);
        places_unlock(ent);
        if (r != RC_OK) return r;
    }
    return n;
}

/* Repair's: every process's places forgotten (none lent), but those of a
 * live process moving them this instant: busy[o] (o = entry + 1) set for
 * those, and how many. Nothing is moved here: a holder of the pool lock
 * that died in the middle of lending, giving back or stealing left the
 * stack and the lists in no state to move by, so repair's pass over the
 * slot words turns every forgotten entry's RESERVE slots into the stack's
 * (and the stack is rebuilt from the words). */
int64_t places_forget_all(struct pool *p, unsigned char *busy) {
    int64_t n = 0;
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (untouched(ent)) continue;
        if (!places_lock(p, e)) {
            busy[e + 1] = 1;
            n++;
            continue;
        }
        forget(ent);
        places_unlock(ent);
    }
    return n;
}

/* The places of the entries v marks (dead, or our predecessor) back, whole
 * (retire). */
int places_retire(struct pool *p, const unsigned char *v, int dead, int predecessor) {
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t *ent = ENTRY(p, e);
        if (v[e + 1] != dead && v[e + 1] != predecessor) continue;
        if (untouched(ent)) continue;
        int k = places_lock(p, e);
        if (!k) continue; /* (a newcomer claimed the entry meanwhile and is moving them) */
        int r = give_back_dead(p, e);
        places_unlock(ent);
        if (r != RC_OK) return r;
    }
    return RC_OK;
}

/* curr_nr: H_CURR_NR plus every entry's slack (an entry whose word is out
 * of bounds adds none; a damaged H_CURR_NR is left for the reader to
 * judge, as derive's callers do). Without the lock it is a snapshot,
 * exact whenever no process is moving its places; derive, is_saturated and
 * the events' curr_nr read it. */
uint64_t reserve_total(const struct pool *p) {
    uint64_t n = ld(&p->hdr[H_CURR_NR]);
    for (uint64_t e = 0, used = entries_used(p); e < used; e++) {
        uint64_t v = ld(&ENTRY(p, e)[P_PLACE_R]);
        if (places_word_ok(v)) n += places_slack(v);
    }
    return n;
}

/* H_CURR_NR counted again from the words, with every entry's places held
 * still (lock held). Left for the next holder (H_RECOUNT) if a live process
 * is moving its places. */
void recount(struct pool *p) {
    uint64_t used = entries_used(p), held = 0;
    int ok = 1;
    for (; held < used; held++) {
        int k = places_lock(p, held);
        if (!k) {
            ok = 0;
            break;
        }
        if (k == 2 && give_back(p, held, 1) != RC_OK) { /* a dead holder's: given back whole first */
            ok = 0;
            held++;
            break;
        }
    }
    if (ok) {
        uint64_t n = 0;
        for (uint64_t idx = 0; idx < p->capacity; idx++) n += W_STATE(ld(&p->words[idx])) == ST_RESERVE;
        __atomic_store_n(&p->hdr[H_CURR_NR], n, __ATOMIC_SEQ_CST);
        lower_low_water(p, n);
    }
    st(&p->hdr[H_RECOUNT], !ok);
    while (held-- > 0) places_unlock(ENTRY(p, held));
}
