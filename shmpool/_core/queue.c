/* queue.c: named queues of elements; ownership moves with the element.
 *
 * A queue is a FIFO of slots linked through next[] (an element is in one
 * queue at most, so one link per slot serves every queue), with its head,
 * tail, count and depth in the queue table. put moves an element HELD by
 * the caller to QUEUED by the queue, get moves the head to HELD by the
 * caller: each in one critical section whose commit is the slot word, so an
 * element is in its queue or with a process, never both and never neither,
 * whatever instant a process dies at (queue_relink rebuilds the lists from
 * the words). A queued element belongs to nobody but the queue: retire never
 * takes it, so a sender that dies after put loses nothing.
 *
 * Blocked puts and gets sleep like a sleeping alloc (wake.c): registered in
 * the critical section that found the queue full (or empty), on the queue's
 * putters' (getters') channel, woken after the lock is released by the get
 * (put) that changes that: one getter per element put; the putters once
 * there is room for a batch (put_room), so that a producer faster than its
 * consumers does not sleep and wake once per message. Before registering, a
 * blocked call polls the count for a while without the lock or the GIL
 * (queue_spin), as long as spinning has been paying off for it.
 */
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "pool.h"

/* The live queue q and its bounds, or RC_CORRUPT / RC_INVALID. */
static int queue_check(struct pool *p, uint64_t q) {
    if (q >= p->max_queues || QUEUE(p, q)[Q_STATE] != QUEUE_LIVE) {
        snprintf(p->msg, sizeof p->msg, "queue %llu does not exist", (unsigned long long)q);
        return RC_INVALID;
    }
    uint64_t *Q = QUEUE(p, q);
    uint64_t n = Q[Q_COUNT], depth = Q[Q_DEPTH];
    if (depth < 1 || depth > p->capacity) return corrupt(p, "queue %llu has depth %llu", q, depth);
    if (n > depth) return corrupt(p, "queue %llu holds %llu elements, more than its depth", q, n);
    if (n && (Q[Q_HEAD] >= p->capacity || Q[Q_TAIL] >= p->capacity))
        return corrupt(p, "queue %llu's head or tail is beyond the capacity (%llu)", q, p->capacity);
    return RC_OK;
}

/* Link slot idx, whose word now says QUEUED by q, at q's tail: the one
 * writer of the queues' lists. */
static void queue_link(struct pool *p, uint64_t q, uint64_t idx) {
    uint64_t *Q = QUEUE(p, q);
    uint64_t n = Q[Q_COUNT];
    p->next[idx] = (uint32_t)NO_SLOT;
    if (n == 0) st(&Q[Q_HEAD], idx);
    else p->next[Q[Q_TAIL]] = (uint32_t)idx;
    st(&Q[Q_TAIL], idx);
    st(&Q[Q_COUNT], n + 1);
}

/* Unlink q's head (count > 0, checked): its index. The word still says
 * QUEUED: the caller hands it out (the commit). */
static int queue_unlink(struct pool *p, uint64_t q, uint64_t *out) {
    uint64_t *Q = QUEUE(p, q);
    uint64_t n = Q[Q_COUNT], head = Q[Q_HEAD];
    prefetch_w(&p->words[head]); /* read, then CASed by the caller: owned at once */
    uint64_t w = ld(&p->words[head]);
    if (W_STATE(w) != ST_QUEUED || W_OWNER(w) != q + 1)
        return corrupt(p, "queue %llu's head is slot %llu, which is not in it", q, head);
    uint64_t nx = n > 1 ? p->next[head] : NO_SLOT;
    if (n > 1 && nx >= p->capacity) return corrupt(p, "queue %llu links slot %llu to nowhere", q, head);
    if (n > 1) { /* the next get's word and first line, while the caller works */
        prefetch_w(&p->words[nx]);
        prefetch_r(p->data + nx * p->stride);
    }
    prefetch_r(p->data + head * p->stride); /* the element's first line: the getter reads it next */
    st(&Q[Q_HEAD], nx);
    if (n == 1) st(&Q[Q_TAIL], NO_SLOT);
    st(&Q[Q_COUNT], n - 1);
    *out = head;
    return RC_OK;
}

/* The room a full queue's sleeping putters are woken for (its low-water
 * mark): a quarter of the queue, at most QUEUE_BATCH, or more if a sleeping
 * putter needs more; never more than the depth. A producer that outruns
 * its consumers then sleeps once per batch, not once per element (the
 * convoy where every get wakes the producer, which puts one element and
 * sleeps again); a putter left waiting below the mark looks again after a
 * nap (run). */
static uint64_t put_room(const uint64_t *Q) {
    uint64_t depth = Q[Q_DEPTH], need = ld(&Q[Q_PUT_NEED]), low = depth / 4;
    if (low > QUEUE_BATCH) low = QUEUE_BATCH;
    if (low < need) low = need;
    return low < 1 ? 1 : low > depth ? depth : low;
}

/* put of c->n handles of c->src into queue c->q (lock held): all checked
 * first (held by this process under their generation; c->bad names the one
 * refused), then all or nothing: room for every one, else register or fail. */
int step_put(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = queue_check(p, c->q)) != RC_OK) return r;
    for (int64_t i = 0; i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        uint64_t w = idx < p->capacity ? ld(&p->words[idx]) : 0;
        c->bad = i;
        if (idx >= p->capacity) {
            snprintf(p->msg, sizeof p->msg, "its slot is beyond the capacity");
            return RC_INVALID;
        }
        if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
            describe(p, w, gen);
            return RC_INVALID;
        }
        if (W_OWNER(w) != p->me) {
            snprintf(p->msg, sizeof p->msg, "held by another process, not this one (it must adopt() it first)");
            return RC_INVALID;
        }
    }
    c->bad = -1;
    uint64_t *Q = QUEUE(p, c->q);
    if (Q[Q_COUNT] + (uint64_t)c->n > Q[Q_DEPTH]) {
        if (mode != MODE_SLEEP) return RC_FAIL;
        uint64_t need = ld(&Q[Q_PUTTERS]) ? ld(&Q[Q_PUT_NEED]) : 0; /* the others' (none: a stale hint) */
        st(&Q[Q_PUT_NEED], need > (uint64_t)c->n ? need : (uint64_t)c->n);
        c->channel = CH_PUT(c->q);
        c->seen = chan_prepare(p, c->channel);
        return RC_SLEEP;
    }
    for (int64_t i = 0; i < c->n; i++) {
        uint64_t h = (uint64_t)c->src[i], idx = h & INDEX_MASK, gen = h >> HGEN_SHIFT;
        if (!set_word(p, idx, mkword(ST_HELD, p->me, gen), mkword(ST_QUEUED, c->q + 1, gen))) {
            snprintf(p->msg, sizeof p->msg, "freed by another process at the same moment");
            c->bad = i;
            return RC_INVALID; /* the ones before it are queued: the message says so */
        }
        CRASH(CP_QUEUE_PUT); /* queued by its word, not yet linked */
        queue_link(p, c->q, idx);
    }
    Q[Q_PUTS] += (uint64_t)c->n;
    c->moved = c->n;
    if (ld(&Q[Q_GETTERS])) {
        p->wake_get |= 1ull << c->q;
        p->wake_get_n = c->n;
    }
    return RC_OK;
}

/* get of up to c->n from queue c->q (lock held): its first elements, now
 * held by this process (handles unchanged), into c->dst; c->moved. */
int step_get(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = queue_check(p, c->q)) != RC_OK) return r;
    uint64_t *Q = QUEUE(p, c->q);
    if (Q[Q_COUNT] == 0) {
        if (mode != MODE_SLEEP) return RC_FAIL;
        c->channel = CH_GET(c->q);
        c->seen = chan_prepare(p, c->channel);
        return RC_SLEEP;
    }
    int64_t k = 0;
    while (k < c->n && Q[Q_COUNT] > 0) {
        uint64_t idx;
        if ((r = queue_unlink(p, c->q, &idx)) != RC_OK) break;
        CRASH(CP_QUEUE_GET); /* unlinked, its word still QUEUED */
        uint64_t w = ld(&p->words[idx]), gen = W_GEN(w);
        set_word(p, idx, w, mkword(ST_HELD, p->me, gen)); /* the commit: ours now */
        c->dst[k++] = (int64_t)(idx | gen << HGEN_SHIFT);
    }
    Q[Q_GETS] += (uint64_t)k;
    c->moved = k;
    if (k && ld(&Q[Q_PUTTERS]) && Q[Q_DEPTH] - Q[Q_COUNT] >= put_room(Q)) {
        p->wake_put |= 1ull << c->q;
        st(&Q[Q_PUT_NEED], 0); /* the woken that still lack room say so again */
    }
    return k ? RC_OK : r;
}

/* Before a put or get takes the lock: ask for the queue's count line owned
 * (the step reads and writes it), so that its miss overlaps the lock's. */
void queue_warm(struct pool *p, const struct call *c) {
    if (c->q < p->max_queues) prefetch_w(&QUEUE(p, c->q)[Q_COUNT]);
}

/* Before a blocked put (get) registers and sleeps: poll the queue's count
 * without the lock or the GIL, while this object's budget for that queue and
 * side lasts. The budget follows what spinning buys on this machine, as
 * glibc's adaptive mutexes do: a spin that saw the other side act keeps it
 * (at least twice what it took), one that ran out halves it, down to no
 * spin, with a probe for one sleep in SPIN_PROBE so that a change of pace
 * is seen. Where the other side cannot act meanwhile (it sleeps between
 * messages, as a paced producer does, or waits for a CPU), a spin only
 * delays the sleep and burns a CPU the others need: there it stops. A put
 * spins for the room it would be woken for (put_room), not for one slot. */
void queue_spin(struct pool *p, struct call *c, int put) {
    if (c->q >= p->max_queues) return;
    uint64_t *Q = QUEUE(p, c->q), *count = &Q[Q_COUNT], depth = ld(&Q[Q_DEPTH]), n = (uint64_t)c->n;
    if (put ? ld(count) + n <= depth : ld(count) > 0) return;
    uint64_t want = put ? put_room(Q) : 1;
    if (put && want < n) want = n;
    uint32_t *budget = &p->spin_ns[c->q][put];
    if (*budget < SPIN_MIN_NS) {
        if (++p->spin_skips[c->q][put] % SPIN_PROBE) return;
        *budget = QUEUE_SPIN_NS / 4; /* the probe */
    }
    uint64_t t0 = now_ns(), until = earlier(t0 + *budget, call_deadline(c));
    int seen = 0;
    void *token = host.unblock();
    for (int i = 1;; i++) {
        cpu_relax();
        uint64_t k = ld(count);
        if (put ? k <= depth && depth - k >= want : k > 0) {
            seen = 1;
            break;
        }
        if (i % 64 == 0) {
            if (now_ns() >= until) break;
            sched_yield(); /* on a busy machine, let the other side run */
        }
    }
    host.block(token);
    if (!seen) {
        *budget /= 2;
        return;
    }
    uint64_t took = 2 * (now_ns() - t0);
    if (took > *budget) *budget = took < QUEUE_SPIN_NS ? (uint32_t)took : (uint32_t)QUEUE_SPIN_NS;
}

/* Open queue c->arg (QUEUE_NAME_BYTES, NUL-padded), creating it with depth
 * c->a if missing and c->a > 0: c->out = {index, depth}; index -1 if
 * missing, -2 if the table is full. */
int step_queue_open(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    int64_t vacant = -1;
    c->out[0] = (uint64_t)-1;
    for (uint64_t q = 0; q < p->max_queues; q++) {
        uint64_t *Q = QUEUE(p, q);
        if (Q[Q_STATE] != QUEUE_LIVE) {
            if (vacant < 0) vacant = (int64_t)q;
        } else if (memcmp(Q + Q_NAME, c->arg, QUEUE_NAME_BYTES) == 0) {
            c->out[0] = q;
            c->out[1] = Q[Q_DEPTH];
            return RC_OK;
        }
    }
    if (c->a == 0) return RC_OK;
    if (vacant < 0) {
        c->out[0] = (uint64_t)-2;
        return RC_OK;
    }
    uint64_t *Q = QUEUE(p, (uint64_t)vacant);
    memset(Q, 0, QUEUE_WORDS * 8);
    memcpy(Q + Q_NAME, c->arg, QUEUE_NAME_BYTES);
    st(&Q[Q_DEPTH], c->a);
    st(&Q[Q_HEAD], NO_SLOT);
    st(&Q[Q_TAIL], NO_SLOT);
    st(&Q[Q_STATE], QUEUE_LIVE); /* last: the queue exists */
    c->out[0] = (uint64_t)vacant;
    c->out[1] = c->a;
    return RC_OK;
}

/* repair: rebuild every queue from the QUEUED slot words: keep each list's
 * run from its head while it names this queue's elements, each once (FIFO
 * order kept), then append the queue's elements that no list reached (an
 * element queued or taken by a process killed between its word and its
 * links). The caller made sure every QUEUED word names a live queue. */
int queue_relink(struct pool *p, unsigned char *seen) {
    uint64_t cap = p->capacity;
    memset(seen, 0, cap);
    for (uint64_t q = 0; q < p->max_queues; q++) {
        uint64_t *Q = QUEUE(p, q);
        if (Q[Q_STATE] != QUEUE_LIVE) continue;
        if (Q[Q_DEPTH] < 1 || Q[Q_DEPTH] > cap) Q[Q_DEPTH] = cap;
        uint64_t kept = 0, idx = Q[Q_HEAD], limit = Q[Q_COUNT] < cap ? Q[Q_COUNT] : cap;
        st(&Q[Q_COUNT], 0);
        while (kept < limit && idx < cap && !seen[idx] && W_STATE(ld(&p->words[idx])) == ST_QUEUED &&
               W_OWNER(ld(&p->words[idx])) == q + 1) {
            uint64_t nx = p->next[idx];
            seen[idx] = 1;
            queue_link(p, q, idx); /* in place: its predecessor already points at it */
            kept++;
            idx = nx;
        }
        if (kept == 0) {
            st(&Q[Q_HEAD], NO_SLOT);
            st(&Q[Q_TAIL], NO_SLOT);
        }
    }
    for (uint64_t idx = 0; idx < cap; idx++) {
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_QUEUED || seen[idx]) continue;
        queue_link(p, W_OWNER(w) - 1, idx);
        seen[idx] = 1;
    }
    return RC_OK;
}
