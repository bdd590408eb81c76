/* topic.c: topics, one element published to many subscribers.
 *
 * A topic has up to MAX_SUBS subscriptions, each a ring of pending slot
 * indexes (at most the topic's depth, TOPIC_MAX_DEPTH at most) owned by one
 * process. publish moves an element HELD by the caller to SHARED by the
 * topic, and puts it at the tail of every live subscription's ring; its
 * reference word (refs[idx]) then has the bit of each of them in its low
 * half. A get takes a ring's head and sets the subscription's bit in the
 * high half (received); a release clears both bits, and the element goes
 * back to the pool, by the kernel's free rule (release_slot: the reserve
 * first), when the low half is 0. No subscriber: publish frees at once.
 *
 * Order of a publish, each step repairable after a kill at any instruction:
 *   1. overflow: a full ring waits (block) or drops its oldest pending
 *      element (drop_oldest: unref, which may free it);
 *   2. refs[idx] = the live subscriptions (the slot is still HELD by us:
 *      nobody else reads its reference word);
 *   3. idx at the tail of every live ring;
 *   4. the commit: the slot word HELD -> SHARED (by CAS).
 * A kill before 4 leaves ring entries naming a slot that is not SHARED by
 * the topic: repair (topic_repair) drops them, and the element is still
 * the publisher's. After 4 it is published to every subscription current
 * at that moment. A SHARED slot whose low half is 0 (a kill between a
 * release and its free) is freed by repair.
 *
 * A subscription whose process died (its entry's epoch changed, or its OFD
 * lock is gone: retire decides, as for held elements) is dropped: every
 * reference it has, pending or received, is released (sub_drop), and its
 * ring emptied. The others go on.
 *
 * A share group (T_OVERFLOW == OVERFLOW_SHARE) is a topic that nothing is
 * published to: its subscriptions are processes that hold elements
 * together (shmpool.dask: the workers of one host). A member gives its
 * reference to another by share: its element (HELD by it, committed to
 * SHARED by the group with its own bits set, by the same CAS as publish's
 * step 4; or SHARED by the group and received by it) gets the target's
 * low bit, pending; the target, alive and of the epoch the caller names,
 * takes it (its received bit). Release, retire, repair and the last
 * reference's free are the topic's. A process holds at most one reference
 * per element: share refuses (RC_FAIL, nothing changed) a target that
 * references the element already, and the caller sends the bytes instead.
 * A share never taken (the message was lost) stays pending until the
 * target's subscription is dropped (its process leaves or dies).
 *
 * unref is the one writer of reference words after publish and share; the
 * rings are written by ring_push and ring_pop only.
 */
#include <stdio.h>
#include <string.h>

#include "pool.h"

#define LOW(r) ((uint32_t)(r))
#define HIGH(r) ((uint32_t)((r) >> REF_RECEIVED_SHIFT))

/* The live topic t and its bounds, or RC_INVALID / RC_CORRUPT. */
static int topic_check(struct pool *p, uint64_t t) {
    if (t >= MAX_TOPICS || TOPIC(p, t)[T_STATE] != QUEUE_LIVE) {
        snprintf(p->msg, sizeof p->msg, "topic %llu does not exist", (unsigned long long)t);
        return RC_INVALID;
    }
    uint64_t depth = TOPIC(p, t)[T_DEPTH];
    if (depth < 1 || depth > TOPIC_MAX_DEPTH) return corrupt(p, "topic %llu has depth %llu", t, depth);
    if (TOPIC(p, t)[T_SUBS] >> MAX_SUBS) return corrupt(p, "topic %llu names subscriptions beyond %llu", t, MAX_SUBS);
    if (TOPIC(p, t)[T_OVERFLOW] > OVERFLOW_SHARE) return corrupt(p, "topic %llu has kind %llu", t, TOPIC(p, t)[T_OVERFLOW]);
    return RC_OK;
}

/* Subscription j of topic t is live and its ring within bounds. */
static int sub_check(struct pool *p, uint64_t t, uint64_t j) {
    if (j >= MAX_SUBS || !(TOPIC(p, t)[T_SUBS] >> j & 1)) {
        snprintf(p->msg, sizeof p->msg, "subscription %llu of topic %llu does not exist (closed, or its process "
                 "died)", (unsigned long long)j, (unsigned long long)t);
        return RC_INVALID;
    }
    uint64_t *S = SUB(p, t, j);
    if (S[S_TAIL] - S[S_HEAD] > TOPIC(p, t)[T_DEPTH])
        return corrupt(p, "subscription %llu holds %llu pending elements, more than its depth", j, S[S_TAIL] - S[S_HEAD]);
    return RC_OK;
}

/* Topic t live, and subscription j of it live and this process's: the
 * check of every call a subscriber makes on its own subscription. */
static int own_sub_check(struct pool *p, uint64_t t, uint64_t j) {
    int r = topic_check(p, t);
    if (r != RC_OK || (r = sub_check(p, t, j)) != RC_OK) return r;
    if (SUB(p, t, j)[S_OWNER] != p->me) {
        snprintf(p->msg, sizeof p->msg, "subscription %llu is another process's", (unsigned long long)j);
        return RC_INVALID;
    }
    return RC_OK;
}

static void ring_push(struct pool *p, uint64_t t, uint64_t j, uint64_t idx) {
    uint64_t *S = SUB(p, t, j), tail = S[S_TAIL];
    RING(p, t, j)[tail % TOPIC(p, t)[T_DEPTH]] = (uint32_t)idx;
    st(&S[S_TAIL], tail + 1);
}

/* The head of subscription j's ring (not empty), checked: a slot SHARED by
 * topic t that j references. */
static int ring_pop(struct pool *p, uint64_t t, uint64_t j, uint64_t *out) {
    uint64_t *S = SUB(p, t, j), head = S[S_HEAD];
    uint64_t idx = RING(p, t, j)[head % TOPIC(p, t)[T_DEPTH]];
    uint64_t w = idx < p->capacity ? ld(&p->words[idx]) : 0;
    if (idx >= p->capacity || W_STATE(w) != ST_SHARED || W_OWNER(w) != t + 1 || !(LOW(p->refs[idx]) >> j & 1))
        return corrupt(p, "subscription %llu's ring names slot %llu, which it does not reference", j, idx);
    st(&S[S_HEAD], head + 1);
    *out = idx;
    return RC_OK;
}

/* Subscription j lets go of SHARED slot idx (its bits cleared); the last
 * reference frees it, by the kernel's rule. */
static int unref(struct pool *p, uint64_t idx, uint64_t j) {
    uint64_t r = p->refs[idx] & ~(1ull << j | 1ull << (j + REF_RECEIVED_SHIFT));
    st(&p->refs[idx], r);
    if (LOW(r)) return RC_OK;
    CRASH(CP_TOPIC_RELEASE); /* no reference left, not yet freed: repair frees it */
    int x = release_slot(p, idx, ld(&p->words[idx]), 0);
    return x == RC_INVALID ? corrupt(p, "shared slot %llu moved while the lock was held", idx, 0) : x;
}

/* Whether subscription S's process lives: its entry holds the epoch it
 * subscribed under and someone holds the entry's OFD lock. */
static int sub_alive(const struct pool *p, const uint64_t *S) {
    uint64_t o = S[S_OWNER];
    if (o == 0 || o > p->max_procs || ld(&ENTRY(p, o - 1)[P_EPOCH]) != S[S_EPOCH]) return 0;
    return owner_alive(p, o);
}

/* Drop subscription j of topic t: every reference it has released, its
 * ring emptied, its sleepers' count reset, the subscription vacated.
 * *freed counts the elements whose last reference it was (back to the
 * pool). */
int sub_drop(struct pool *p, uint64_t t, uint64_t j, uint64_t *freed) {
    uint64_t *S = SUB(p, t, j);
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) == ST_SHARED && W_OWNER(w) == t + 1 && (LOW(p->refs[idx]) >> j & 1)) {
            *freed += LOW(p->refs[idx]) == 1u << j;
            int r = unref(p, idx, j);
            if (r != RC_OK) return r;
        }
    }
    int dead = !sub_alive(p, S);
    st(&TOPIC(p, t)[T_SUBS], TOPIC(p, t)[T_SUBS] & ~(1ull << j));
    st(&S[S_HEAD], S[S_TAIL]);
    if (dead) st(&S[S_GETTERS], 0); /* a live owner's sleepers count themselves out (and then see it gone) */
    st(&S[S_OWNER], 0);
    p->wake_room |= 1ull << t;     /* a full ring is gone */
    p->wake_sub[t] |= 1u << j;     /* its own getters, if any, find it closed */
    p->wake_topics |= 1ull << t;
    return RC_OK;
}

/* Open topic c->arg (QUEUE_NAME_BYTES), creating it with depth c->a and
 * overflow c->b if c->a > 0: c->out = index, depth, overflow; index -1:
 * none (and not created), -2: the table is full. */
int step_topic_open(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    int64_t vacant = -1;
    c->out[0] = (uint64_t)-1;
    for (uint64_t t = 0; t < MAX_TOPICS; t++) {
        uint64_t *T = TOPIC(p, t);
        if (T[T_STATE] != QUEUE_LIVE) {
            if (vacant < 0) vacant = (int64_t)t;
        } else if (memcmp(T + T_NAME, c->arg, QUEUE_NAME_BYTES) == 0) {
            c->out[0] = t;
            c->out[1] = T[T_DEPTH];
            c->out[2] = T[T_OVERFLOW];
            return RC_OK;
        }
    }
    if (c->a == 0) return RC_OK;
    if (vacant < 0) {
        c->out[0] = (uint64_t)-2;
        return RC_OK;
    }
    uint64_t *T = TOPIC(p, (uint64_t)vacant);
    memset(T, 0, TOPIC_WORDS * 8);
    memcpy(T + T_NAME, c->arg, QUEUE_NAME_BYTES);
    st(&T[T_DEPTH], c->a);
    st(&T[T_OVERFLOW], c->b);
    for (uint64_t j = 0; j < MAX_SUBS; j++) memset(SUB(p, vacant, j), 0, SUB_WORDS * 8);
    st(&T[T_STATE], QUEUE_LIVE); /* last: the topic exists */
    c->out[0] = (uint64_t)vacant;
    c->out[1] = c->a;
    c->out[2] = c->b;
    return RC_OK;
}

/* Subscribe this process to topic c->q: c->out[0] = the subscription, or
 * -1 if the topic has MAX_SUBS already. It receives what is published from
 * now on. */
int step_subscribe(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = topic_check(p, c->q)) != RC_OK) return r;
    uint64_t *T = TOPIC(p, c->q);
    c->out[0] = (uint64_t)-1;
    for (uint64_t j = 0; j < MAX_SUBS; j++) {
        if (T[T_SUBS] >> j & 1) continue;
        uint64_t *S = SUB(p, c->q, j);
        st(&S[S_HEAD], 0);
        st(&S[S_TAIL], 0);
        st(&S[S_DROPPED], 0); /* (S_SEQ and S_GETTERS stay: a former subscriber's sleeper may still count out) */
        st(&S[S_EPOCH], p->entry ? p->entry[P_EPOCH] : 0);
        st(&S[S_OWNER], p->me);
        st(&T[T_SUBS], T[T_SUBS] | 1ull << j); /* the commit */
        c->out[0] = j;
        return RC_OK;
    }
    return RC_OK;
}

/* Close subscription c->a of topic c->q (this process's). */
int step_unsubscribe(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = own_sub_check(p, c->q, c->a)) != RC_OK) return r;
    uint64_t freed = 0;
    return sub_drop(p, c->q, c->a, &freed);
}

/* Publish the handle (c->a slot, c->b generation), held by this process, to
 * topic c->q (see the order above). */
int step_publish(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = topic_check(p, c->q)) != RC_OK) return r;
    uint64_t idx = c->a, w = ld(&p->words[idx]), *T = TOPIC(p, c->q), depth = T[T_DEPTH];
    if (T[T_OVERFLOW] == OVERFLOW_SHARE) {
        snprintf(p->msg, sizeof p->msg, "topic %llu is a share group: nothing is published to it", (unsigned long long)c->q);
        return RC_INVALID;
    }
    if (!held_as(w, c->b, p->me)) {
        if (held_as(w, c->b, 0)) snprintf(p->msg, sizeof p->msg, "held by another process, not this one");
        else describe(p, w, c->b);
        return RC_INVALID;
    }
    uint64_t freed = 0;
    for (uint32_t bits = (uint32_t)T[T_SUBS]; bits; bits &= bits - 1) { /* 1. overflow */
        uint64_t j = (uint64_t)__builtin_ctz(bits), *S = SUB(p, c->q, j);
        if ((r = sub_check(p, c->q, j)) != RC_OK) return r;
        if (S[S_TAIL] - S[S_HEAD] < depth) continue;
        if (!sub_alive(p, S)) { /* a dead subscriber's full ring never drains: dropped, never waited on */
            if ((r = sub_drop(p, c->q, j, &freed)) != RC_OK) return r;
            continue;
        }
        if (T[T_OVERFLOW] != OVERFLOW_DROP_OLDEST) {
            if (mode != MODE_SLEEP) return RC_FAIL;
            c->channel = CH_ROOM(c->q);
            c->seen = chan_prepare(p, c->channel);
            return RC_SLEEP;
        }
    }
    uint32_t subs = (uint32_t)T[T_SUBS];
    for (uint32_t bits = subs; bits; bits &= bits - 1) {
        uint64_t j = (uint64_t)__builtin_ctz(bits), *S = SUB(p, c->q, j), old;
        if (S[S_TAIL] - S[S_HEAD] < depth) continue;
        if ((r = ring_pop(p, c->q, j, &old)) != RC_OK || (r = unref(p, old, j)) != RC_OK) return r;
        st(&S[S_DROPPED], S[S_DROPPED] + 1);
        st(&T[T_DROPPED], T[T_DROPPED] + 1);
    }
    st(&T[T_PUBLISHED], T[T_PUBLISHED] + 1);
    if (!subs) return release_slot(p, idx, w, 1); /* nobody listens: freed at once */
    st(&p->refs[idx], subs);                      /* 2. */
    for (uint32_t bits = subs; bits; bits &= bits - 1) { /* 3. */
        uint64_t j = (uint64_t)__builtin_ctz(bits);
        ring_push(p, c->q, j, idx);
        if (ld(&SUB(p, c->q, j)[S_GETTERS])) {
            p->wake_sub[c->q] |= 1u << j;
            p->wake_topics |= 1ull << c->q;
        }
    }
    CRASH(CP_PUBLISH); /* in every ring, not yet SHARED: repair drops the entries, it stays ours */
    if (!set_word(p, idx, w, mkword(ST_SHARED, c->q + 1, c->b))) /* 4. the commit */
        return corrupt(p, "slot %llu moved while the lock was held", idx, 0);
    return RC_OK;
}

/* Up to c->n pending elements of subscription c->a of topic c->q into
 * c->dst (their handles), received by it; c->moved. */
int step_sub_get(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK || (r = own_sub_check(p, c->q, c->a)) != RC_OK) return r;
    uint64_t *S = SUB(p, c->q, c->a), j = c->a;
    if (S[S_TAIL] == S[S_HEAD]) {
        if (mode != MODE_SLEEP) return RC_FAIL;
        c->channel = CH_SUB(c->q, j);
        c->seen = chan_prepare(p, c->channel);
        return RC_SLEEP;
    }
    int full = S[S_TAIL] - S[S_HEAD] >= TOPIC(p, c->q)[T_DEPTH];
    int64_t k = 0;
    while (k < c->n && S[S_TAIL] != S[S_HEAD]) {
        uint64_t idx;
        if ((r = ring_pop(p, c->q, j, &idx)) != RC_OK) break;
        st(&p->refs[idx], p->refs[idx] | 1ull << (j + REF_RECEIVED_SHIFT));
        c->dst[k++] = (int64_t)(idx | W_GEN(ld(&p->words[idx])) << HGEN_SHIFT);
    }
    c->moved = k;
    if (k && full && ld(&TOPIC(p, c->q)[T_PUBLISHERS])) {
        p->wake_room |= 1ull << c->q;
        p->wake_topics |= 1ull << c->q;
    }
    return k ? RC_OK : r;
}

/* Release the element (c->a slot, c->b generation) received by subscription
 * c->out[0] of topic c->q; c->out[0] = -1: by any subscription of this
 * process that has received it (pool.free of a shared element). */
int step_release(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    if (r != RC_OK) return r;
    uint64_t idx = c->a, w = ld(&p->words[idx]);
    if (W_STATE(w) != ST_SHARED || W_GEN(w) != c->b) {
        describe(p, w, c->b);
        return RC_INVALID;
    }
    uint64_t t = W_OWNER(w) - 1;
    if ((r = topic_check(p, t)) != RC_OK) return r;
    uint32_t got = HIGH(p->refs[idx]) & (uint32_t)TOPIC(p, t)[T_SUBS];
    for (uint32_t bits = got; bits; bits &= bits - 1) {
        uint64_t j = (uint64_t)__builtin_ctz(bits);
        if (SUB(p, t, j)[S_OWNER] != p->me) continue;
        if (c->out[0] != (uint64_t)-1 && (c->out[0] != j || t != c->q)) continue;
        return unref(p, idx, j);
    }
    snprintf(p->msg, sizeof p->msg, "a shared element this %s has not received (released already, or still pending)",
             c->out[0] == (uint64_t)-1 ? "process" : "subscription");
    return RC_INVALID;
}

/* Share group t, and subscription j of it that is this process's. */
static int member_check(struct pool *p, uint64_t t, uint64_t j) {
    int r = own_sub_check(p, t, j);
    if (r != RC_OK) return r;
    if (TOPIC(p, t)[T_OVERFLOW] != OVERFLOW_SHARE) {
        snprintf(p->msg, sizeof p->msg, "topic %llu is not a share group", (unsigned long long)t);
        return RC_INVALID;
    }
    return RC_OK;
}

/* share: this process's member c->out[0] of share group c->q gives member
 * c->out[1] (subscribed under epoch c->out[2]) a reference to the element
 * (c->a slot, c->b generation) that it holds or has received. RC_FAIL,
 * nothing changed: the target is gone, or references it already. */
int step_share(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    uint64_t t = c->q, mine = c->out[0], j = c->out[1];
    if (r != RC_OK || (r = member_check(p, t, mine)) != RC_OK) return r;
    uint64_t *T = TOPIC(p, t), idx = c->a, w = ld(&p->words[idx]);
    if (j >= MAX_SUBS || j == mine || !(T[T_SUBS] >> j & 1) || SUB(p, t, j)[S_EPOCH] != c->out[2] ||
        !sub_alive(p, SUB(p, t, j)))
        return RC_FAIL;
    if (held_as(w, c->b, p->me)) { /* the first share: the refs first, then the commit (as publish) */
        st(&p->refs[idx], 1ull << mine | 1ull << (mine + REF_RECEIVED_SHIFT) | 1ull << j);
        CRASH(CP_PUBLISH); /* still HELD: its reference word is read by nobody */
        if (!set_word(p, idx, w, mkword(ST_SHARED, t + 1, c->b)))
            return corrupt(p, "slot %llu moved while the lock was held", idx, 0);
        return RC_OK;
    }
    if (W_STATE(w) != ST_SHARED || W_GEN(w) != c->b || W_OWNER(w) != t + 1 ||
        !(HIGH(p->refs[idx]) >> mine & 1)) {
        if (W_STATE(w) == ST_SHARED && W_GEN(w) == c->b)
            snprintf(p->msg, sizeof p->msg, "a shared element this process has not received");
        else describe(p, w, c->b);
        return RC_INVALID;
    }
    if (LOW(p->refs[idx]) >> j & 1) return RC_FAIL;
    st(&p->refs[idx], p->refs[idx] | 1ull << j);
    return RC_OK;
}

/* take: this process's member c->out[0] of share group c->q receives the
 * element (c->a slot, c->b generation) another member shared with it. */
int step_take(struct pool *p, struct call *c, int mode) {
    int r = check_header(p);
    uint64_t t = c->q, j = c->out[0];
    if (r != RC_OK || (r = member_check(p, t, j)) != RC_OK) return r;
    uint64_t idx = c->a, w = ld(&p->words[idx]), refs = p->refs[idx];
    if (W_STATE(w) != ST_SHARED || W_GEN(w) != c->b || W_OWNER(w) != t + 1) {
        describe(p, w, c->b);
        return RC_INVALID;
    }
    if (!(LOW(refs) >> j & 1) || (HIGH(refs) >> j & 1)) {
        snprintf(p->msg, sizeof p->msg, "a shared element not shared with this member, or taken already");
        return RC_INVALID;
    }
    st(&p->refs[idx], refs | 1ull << (j + REF_RECEIVED_SHIFT));
    return RC_OK;
}

/* Pending elements of subscription j of topic t (no lock: a count). */
uint64_t sub_pending(const struct pool *p, uint64_t t, uint64_t j) {
    const uint64_t *S = SUB(p, t, j);
    uint64_t n = ld(&S[S_TAIL]) - ld(&S[S_HEAD]);
    return n <= TOPIC_MAX_DEPTH ? n : 0;
}

/* retire: drop the subscriptions of the processes v marks DEAD or
 * PREDECESSOR, or whose entry holds another epoch now. How many elements
 * went back to the pool (counted by sub_drop: the shared counts move under
 * other processes' lock-free calls meanwhile). */
int64_t topics_retire(struct pool *p, const unsigned char *v, int dead, int predecessor) {
    uint64_t freed = 0;
    for (uint64_t t = 0; t < MAX_TOPICS; t++) {
        if (TOPIC(p, t)[T_STATE] != QUEUE_LIVE) continue;
        for (uint32_t bits = (uint32_t)TOPIC(p, t)[T_SUBS]; bits; bits &= bits - 1) {
            uint64_t j = (uint64_t)__builtin_ctz(bits), *S = SUB(p, t, j), o = S[S_OWNER];
            int gone = o == 0 || o > p->max_procs || v[o] == dead || v[o] == predecessor ||
                       ld(&ENTRY(p, o - 1)[P_EPOCH]) != S[S_EPOCH];
            if (!gone) continue;
            int r = sub_drop(p, t, j, &freed);
            if (r != RC_OK) return r;
        }
    }
    return (int64_t)freed;
}

/* repair: every ring keeps the entries that name a slot SHARED by its topic
 * and referenced by it (in order); a SHARED slot of a topic that does not
 * exist, or that no live subscription references, goes back to the pool. */
int topic_repair(struct pool *p) {
    for (uint64_t t = 0; t < MAX_TOPICS; t++) {
        uint64_t *T = TOPIC(p, t);
        if (T[T_STATE] != QUEUE_LIVE) continue;
        if (T[T_DEPTH] < 1 || T[T_DEPTH] > TOPIC_MAX_DEPTH) st(&T[T_DEPTH], TOPIC_MAX_DEPTH);
        st(&T[T_SUBS], T[T_SUBS] & ((1ull << MAX_SUBS) - 1));
        uint64_t depth = T[T_DEPTH];
        for (uint32_t bits = (uint32_t)T[T_SUBS]; bits; bits &= bits - 1) {
            uint64_t j = (uint64_t)__builtin_ctz(bits), *S = SUB(p, t, j), kept = 0, head = S[S_HEAD];
            uint64_t n = S[S_TAIL] - head;
            uint32_t *ring = RING(p, t, j), keep[TOPIC_MAX_DEPTH];
            for (uint64_t i = 0; i < n && i < depth; i++) {
                uint64_t idx = ring[(head + i) % depth];
                uint64_t w = idx < p->capacity ? ld(&p->words[idx]) : 0;
                if (idx < p->capacity && W_STATE(w) == ST_SHARED && W_OWNER(w) == t + 1 && (LOW(p->refs[idx]) >> j & 1))
                    keep[kept++] = (uint32_t)idx;
            }
            for (uint64_t i = 0; i < kept; i++) ring[(head + i) % depth] = keep[i];
            st(&S[S_TAIL], head + kept);
        }
    }
    for (uint64_t idx = 0; idx < p->capacity; idx++) {
        uint64_t w = ld(&p->words[idx]);
        if (W_STATE(w) != ST_SHARED) continue;
        uint64_t t = W_OWNER(w) - 1;
        uint32_t live = t < MAX_TOPICS && TOPIC(p, t)[T_STATE] == QUEUE_LIVE ? (uint32_t)TOPIC(p, t)[T_SUBS] : 0;
        uint64_t r = p->refs[idx] & ((uint64_t)live | (uint64_t)live << REF_RECEIVED_SHIFT);
        st(&p->refs[idx], r);
        if (!LOW(r)) {
            int x = release_slot(p, idx, w, 0);
            if (x == RC_CORRUPT) return x;
        }
    }
    return RC_OK;
}

/* SHARED slots now (derive). A pool with no topic has none: stats() then
 * reads no slot word (a copy, which has no topic table here, is scanned). */
uint64_t published_now(const struct pool *p) {
    uint64_t n = 0, live = 0;
    for (uint64_t t = 0; p->topics && t < MAX_TOPICS; t++) live |= ld(&TOPIC(p, t)[T_STATE]) == QUEUE_LIVE;
    if (p->topics && !live) return 0;
    for (uint64_t idx = 0; idx < p->capacity; idx++) n += W_STATE(ld(&p->words[idx])) == ST_SHARED;
    return n;
}
