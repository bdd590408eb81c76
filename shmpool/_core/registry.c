/* registry.c: the processes attached to a pool, and the dead ones.
 *
 * Each attached process has one registry entry, shared by every object of
 * that pool in the process. It is claimed without the lock (there is no
 * token to take the lock with yet): the process takes the OFD lock on the
 * entry's byte of the segment file (only one process can: a vacant entry, or
 * a dead process's), then gives the entry a new epoch by CAS, so that every
 * token of its dead predecessor is recognisably dead. Then, under the lock
 * taken with the new token, it takes back what dead processes left, its
 * predecessor's elements included (it has allocated nothing yet, so whatever
 * names the entry is the predecessor's).
 *
 * Who is dead, for retire: an entry whose epoch is not 0 and whose OFD lock
 * nobody holds; and the entry we just claimed if it was a dead process's
 * (not if it was vacant). A held or cached slot whose owner field names a vacant entry
 * (epoch 0), an entry beyond H_ENTRIES_USED, or no entry at all cannot be:
 * every path that vacates an entry first takes back what names it. Such a
 * slot is damage (PoolFormatError, and a finding of --check), never a dead
 * holder's element to hand out again: one damaged byte must not give a live
 * holder's element to a second one.
 *
 * Retire: the reserve places lent to the dead go back to the shared stack
 * (places.c), held elements of the dead go back through the free path, their
 * cached slots to the arena, parked frees are completed; then each dead
 * entry is vacated, its epoch cleared last (the commit, by CAS, unless a
 * newcomer claimed it meanwhile). Every step is a whole slot word, so a
 * retire cut short is finished by the next one.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

enum { ALIVE = OWNER_ALIVE, DEAD = OWNER_DEAD, PREDECESSOR = OWNER_PREDECESSOR, IMPOSSIBLE = OWNER_IMPOSSIBLE };

/* How many registry entries scans must look at: one past the highest entry
 * ever taken (a hint, so that a pool used by a few processes is not scanned
 * max_procs deep on its reserve path). */
uint64_t entries_used(const struct pool *p) {
    uint64_t n = ld(&p->hdr[H_ENTRIES_USED]);
    return n < p->max_procs ? n : p->max_procs;
}

void note_entry_used(struct pool *p, uint64_t e) {
    uint64_t seen = ld(&p->hdr[H_ENTRIES_USED]);
    while (seen < e + 1 && !__atomic_compare_exchange_n(&p->hdr[H_ENTRIES_USED], &seen, e + 1, 0, __ATOMIC_SEQ_CST,
                                                       __ATOMIC_SEQ_CST))
        ;
}

static int try_ofd_lock(int fd, const struct pool *p, uint64_t e) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(p->off_procs + 8ull * PROC_WORDS * e);
    fl.l_len = 1;
    return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

static void bind_entry(struct pool *p, int fd, uint64_t e, uint64_t epoch) {
    p->fd = fd;
    p->entry = ENTRY(p, e);
    p->cache = CACHE_OF(p->entry);
    p->me = e + 1;
    p->token = p->me | epoch << 16;
}

/* Claim an entry for this process through fd (lock-free; see above):
 * vacant entries first, then dead processes'. RC_OK with *index, or RC_FAIL
 * if every entry belongs to a live process. */
int registry_claim(struct pool *p, int fd, int64_t *index) {
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t e = 0; e < p->max_procs; e++) {
            uint64_t *ent = ENTRY(p, e);
            uint64_t old = ld(&ent[P_EPOCH]);
            if ((pass == 0) != (old == 0)) continue;
            if (!try_ofd_lock(fd, p, e)) continue; /* a live process has it */
            uint64_t epoch = __atomic_add_fetch(&p->hdr[H_EPOCH], 1, __ATOMIC_SEQ_CST) & ((1ull << 48) - 1);
            if (epoch == 0) epoch = 1;
            while (!__atomic_compare_exchange_n(&ent[P_EPOCH], &old, epoch, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                ; /* a reclaimer may have vacated it meanwhile: old is reloaded */
            note_entry_used(p, e);
            bind_entry(p, fd, e, epoch);
            p->claimed_dead = old != 0;
            *index = (int64_t)e;
            return RC_OK;
        }
    }
    return RC_FAIL;
}

/* A claim whose registration did not finish (the lock did not come, or
 * damage): an entry that was vacant is vacant again (we still hold its OFD
 * lock: nobody else can have claimed it); a dead process's is left as a dead
 * process's (the caller closes fd, dropping the OFD lock), for the next
 * retire to take back and vacate. */
void registry_unclaim(struct pool *p) {
    if (p->entry && !p->claimed_dead) {
        st(&p->entry[P_CACHE_N], 0);
        cas(&p->entry[P_EPOCH], p->token >> 16, 0);
    }
    registry_forget(p);
}

/* Use this process's existing entry (another object of the pool claimed
 * it). 0 if it is not ours any more. */
int registry_bind(struct pool *p, int fd, int64_t index, uint64_t epoch) {
    if (index < 0 || (uint64_t)index >= p->max_procs || epoch == 0) return 0;
    if (ld(&ENTRY(p, index)[P_EPOCH]) != epoch) return 0;
    bind_entry(p, fd, (uint64_t)index, epoch);
    return 1;
}

/* This object has no entry (after fork, before the child registers). */
void registry_forget(struct pool *p) {
    p->entry = NULL;
    p->cache = NULL;
    p->me = 0;
    p->token = 0;
    p->enabled = 0;
    p->fd = -1;
}

/* Every owner field's verdict (ALIVE, DEAD, IMPOSSIBLE; see above), indexed
 * by the field. Caller frees. NULL: no memory. */
unsigned char *dead_owners(struct pool *p) {
    unsigned char *v = malloc(OWNER_MASK + 1);
    if (!v) return NULL;
    memset(v, IMPOSSIBLE, OWNER_MASK + 1);
    uint64_t used = entries_used(p);
    for (uint64_t o = 1; o <= used; o++) {
        if (o == p->me) v[o] = ALIVE;
        else if (ld(&ENTRY(p, o - 1)[P_EPOCH]) != 0) v[o] = entry_locked(p, o - 1) ? ALIVE : DEAD;
    }
    return v;
}

/* Take back everything of the entries that v marks DEAD or PREDECESSOR, and
 * complete parked frees; then vacate the DEAD entries. How many held
 * elements came back, or RC_CORRUPT (nothing changed) if a held or cached
 * slot names an entry that cannot hold it. */
int64_t retire(struct pool *p, const unsigned char *v) {
    for (uint64_t idx = 0; idx < p->capacity; idx++) { /* damage first: refused whole */
        uint64_t w = ld(&p->words[idx]), s = W_STATE(w);
        if ((s == ST_HELD || s == ST_CACHED) && v[W_OWNER(w)] == IMPOSSIBLE)
            return corrupt(p, "slot %llu is held or cached by registry entry field %llu, which names no process "
                              "that was ever attached (a vacant or unused entry): damage", idx, W_OWNER(w));
    }
    int r = places_retire(p, v, DEAD, PREDECESSOR); /* their reserve places, before their held elements */
    if (r != RC_OK) return r;
    for (uint64_t o = 1, used = entries_used(p), moved = 0; o <= used; o++) /* their caches, in their order */
        if ((v[o] == DEAD || v[o] == PREDECESSOR) && (r = steal_cache(p, o - 1, &moved)) != RC_OK) return r;
    int64_t taken = 0;
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]), s = W_STATE(w);
        if (s == ST_PARKED) {
            if (release_slot(p, idx, w, 0) == RC_CORRUPT) return RC_CORRUPT;
            continue;
        }
        if ((s != ST_HELD && s != ST_CACHED) || v[W_OWNER(w)] == ALIVE) continue;
        if (s == ST_HELD) {
            int r = release_slot(p, idx, w, 0);
            if (r == RC_CORRUPT) return r;
            taken += r == RC_OK;
        } else {
            if (p->hdr[H_ARENA_FREE] >= p->capacity)
                return corrupt(p, "arena_free %llu is beyond the capacity %llu", p->hdr[H_ARENA_FREE], p->capacity);
            if (set_word(p, idx, w, mkword(ST_ARENA, 0, W_GEN(w)))) arena_push(p, idx);
        }
        CRASH(CP_RETIRE);
    }
    int64_t freed = topics_retire(p, v, DEAD, PREDECESSOR); /* their subscriptions' references */
    if (freed < 0) return freed;
    taken += freed;
    for (uint64_t o = 1; o <= p->max_procs && o <= OWNER_MASK; o++) {
        if (v[o] != DEAD) continue;
        uint64_t *ent = ENTRY(p, o - 1);
        uint64_t epoch = ld(&ent[P_EPOCH]);
        if (epoch == 0 || entry_locked(p, o - 1)) continue; /* vacant, or claimed by a newcomer meanwhile */
        st(&ent[P_CACHE_N], 0);
        drop_sleepers(p, ent);
        cas(&ent[P_EPOCH], epoch, 0); /* last, and only if nobody claimed it: the commit */
    }
    p->hdr[H_RECLAIMED] += (uint64_t)taken;
    return taken;
}

/* retire with dead_owners' verdicts, our own entry's being `self` (ALIVE:
 * ours stays; PREDECESSOR: ours goes back too), then count out the dead
 * sleepers: how many held elements came back, or RC_NOMEM / RC_CORRUPT.
 * The one retire of reclaim_dead, registration and leave. */
int64_t retire_dead(struct pool *p, int self) {
    unsigned char *v = dead_owners(p);
    if (!v) return RC_NOMEM;
    if (p->me) v[p->me] = (unsigned char)self;
    int64_t taken = retire(p, v);
    free(v);
    if (taken >= 0) uncount_dead_sleepers(p);
    return taken;
}

/* Registration under the lock (after registry_claim): dead processes'
 * elements and our predecessor's back; our entry made ours (c->a: pid,
 * c->b: start time). A destroyed pool may be attached: its calls say so. */
int step_register(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK && r != RC_DESTROYED) return r;
    /* What names our entry is its dead predecessor's; a vacant entry has
     * none (whatever names it is damage). */
    int64_t t = retire_dead(p, p->claimed_dead ? PREDECESSOR : IMPOSSIBLE);
    if (t < 0) return (int)t;
    st(&p->entry[P_PID], c->a);
    st(&p->entry[P_START], c->b);
    c->n = t; /* (for the log) */
    st(&p->entry[P_CACHE_N], 0);
    drop_sleepers(p, p->entry); /* our predecessor's */
    p->wake = 1;
    return RC_OK;
}
