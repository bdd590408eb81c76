/* py_topic.c: the Core's topic methods (topic.c). A blocking publish or get
 * waits as long as its caller asked (its timeout, or none); a non-blocking
 * one waits for the lock at most the atomic bound, then says Full (Empty).
 */
#include "py.h"

static int parse_t(PyObject *o, uint64_t *t) {
    int64_t v;
    if (conv_count(o, "topic", 0, (int64_t)MAX_TOPICS - 1, &v) < 0) return -1;
    *t = (uint64_t)v;
    return 0;
}

static int parse_j(PyObject *o, uint64_t *j) {
    int64_t v;
    if (conv_count(o, "subscription", 0, (int64_t)MAX_SUBS - 1, &v) < 0) return -1;
    *j = (uint64_t)v;
    return 0;
}

/* (t, j, ...): a topic and one of its subscriptions, from the first two of
 * exactly `want` arguments; TypeError naming `call` otherwise. */
static int parse_tj(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *call, uint64_t *t,
                    uint64_t *j) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", call, want, nargs);
        return -1;
    }
    return parse_t(args[0], t) < 0 || parse_j(args[1], j) < 0 ? -1 : 0;
}

static PyObject *topic_error(Core *f, int r) {
    if (r == RC_INVALID) {
        PyErr_SetString(PyExc_ValueError, f->p.msg);
        return NULL;
    }
    return raise_for(f, r, "topic");
}

/* (block, timeout) at args[at], args[at + 1] -> the call's bound. */
static int parse_wait(Core *f, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t at, struct call *c, step_fn step) {
    int block = nargs > at ? PyObject_IsTrue(args[at]) : 1;
    int64_t timeout_ns = -1;
    if (block < 0) return -1;
    if (block && nargs > at + 1 && conv_timeout(args[at + 1], &timeout_ns) < 0) return -1;
    call_init(c, step, block ? BOUND_CALLER : BOUND_ATOMIC, timeout_ns);
    c->may_sleep = block;
    c->retry_ns = (uint64_t)retry_queue_ns;
    return 0;
}

/* topic_open(name, depth, overflow) -> (index, depth, overflow); index -1
 * if missing and depth is 0, -2 if the table is full. */
static PyObject *Core_topic_open(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    char padded[QUEUE_NAME_BYTES];
    int64_t depth, overflow;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "topic_open(name: bytes, depth, overflow)");
        return NULL;
    }
    if (conv_name(args[0], "topic", padded) < 0 || conv_count(args[1], "depth", 0, (int64_t)TOPIC_MAX_DEPTH, &depth) < 0 ||
        conv_count(args[2], "overflow", 0, OVERFLOW_SHARE, &overflow) < 0 || enter(f) < 0)
        return NULL;
    struct call c;
    call_init(&c, step_topic_open, BOUND_ADMIN, -1);
    c.arg = padded;
    c.a = (uint64_t)depth;
    c.b = (uint64_t)overflow;
    int r = run_call(f, &c);
    if (r != RC_OK) return leave_with(f, raise_for(f, r, "topic"));
    return leave_with(f, Py_BuildValue("LKK", (long long)(int64_t)c.out[0], (unsigned long long)c.out[1],
                                       (unsigned long long)c.out[2]));
}

/* subscribe(t) -> the subscription's index, or -1 if the topic has
 * MAX_SUBS subscriptions already. */
static PyObject *Core_subscribe(Core *f, PyObject *arg) {
    uint64_t t;
    if (parse_t(arg, &t) < 0 || enter(f) < 0) return NULL;
    struct call c;
    call_init(&c, step_subscribe, BOUND_ADMIN, -1);
    c.q = t;
    int r = run_call(f, &c);
    if (r != RC_OK) return leave_with(f, topic_error(f, r));
    return leave_with(f, PyLong_FromLongLong((long long)(int64_t)c.out[0]));
}

/* unsubscribe(t, j): every reference of subscription j released. */
static PyObject *Core_unsubscribe(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, j;
    if (parse_tj(args, nargs, 2, "unsubscribe", &t, &j) < 0 || enter(f) < 0) return NULL;
    struct call c;
    call_init(&c, step_unsubscribe, BOUND_ADMIN, -1);
    c.q = t;
    c.a = j;
    int r = run_call(f, &c);
    if (r != RC_OK) return leave_with(f, topic_error(f, r));
    return leave_with(f, Py_NewRef(Py_None));
}

/* publish(t, handle, block=True, timeout=None) -> True, or False if a
 * subscriber's ring stayed full (overflow "block"). */
static PyObject *Core_publish(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, idx, gen;
    struct call c;
    if (nargs < 2 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "publish() takes 2 to 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (parse_t(args[0], &t) < 0 || conv_handle(f, args[1], &idx, &gen) < 0 ||
        parse_wait(f, args, nargs, 2, &c, step_publish) < 0 || enter(f) < 0)
        return NULL;
    c.q = t;
    c.a = idx;
    c.b = gen;
    int r = run_call(f, &c);
    Owner *ow = r == RC_OK ? owner_of(args[1]) : NULL;
    if (ow) ow->given = 1; /* an owning array: its element is the topic's now */
    if (r == RC_OK || r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY) return leave_with(f, PyBool_FromLong(r == RC_OK));
    if (r == RC_INVALID) return leave_with(f, raise_invalid(f, idx | gen << HGEN_SHIFT));
    return leave_with(f, topic_error(f, r));
}

/* sub_get(t, j, max_n, block=True, timeout=None) -> 1 to max_n handles (an
 * int64 array, in publication order), or None if it stayed empty. */
static PyObject *Core_sub_get(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, j;
    int64_t max_n;
    struct call c;
    if (nargs < 3 || nargs > 5) {
        PyErr_Format(PyExc_TypeError, "sub_get() takes 3 to 5 arguments (%zd given)", nargs);
        return NULL;
    }
    if (parse_t(args[0], &t) < 0 || parse_j(args[1], &j) < 0 ||
        conv_count(args[2], "max_n", 1, INT64_MAX, &max_n) < 0 || parse_wait(f, args, nargs, 3, &c, step_sub_get) < 0 ||
        enter(f) < 0)
        return NULL;
    int64_t dst[TOPIC_MAX_DEPTH];
    c.q = t;
    c.a = j;
    c.dst = dst;
    c.n = max_n < (int64_t)TOPIC_MAX_DEPTH ? max_n : (int64_t)TOPIC_MAX_DEPTH;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, handles_array(dst, c.moved));
    if (r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    return leave_with(f, topic_error(f, r));
}

/* A call of `step` on the element (idx, gen) for subscription j of topic t
 * (release, share, take). */
static void element_init(struct call *c, step_fn step, uint64_t t, uint64_t j, uint64_t idx, uint64_t gen) {
    call_init(c, step, BOUND_ATOMIC, -1);
    c->q = t;
    c->a = idx;
    c->b = gen;
    c->out[0] = j;
}

/* The end of a call on one element: ok (a new reference) on success, else
 * the error for r. */
static PyObject *element_result(Core *f, int r, uint64_t idx, uint64_t gen, const char *what, PyObject *ok) {
    if (r == RC_OK) return leave_with(f, ok);
    Py_DECREF(ok);
    if (r == RC_INVALID) return leave_with(f, raise_invalid(f, idx | gen << HGEN_SHIFT));
    if (r == RC_BUSY) return leave_with(f, raise_busy(f, what));
    return leave_with(f, topic_error(f, r));
}

/* (t, j, handle): step for subscription j of topic t on that element. */
static PyObject *element_call(Core *f, step_fn step, const char *what, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, j, idx, gen;
    if (parse_tj(args, nargs, 3, what, &t, &j) < 0 || conv_handle(f, args[2], &idx, &gen) < 0 || enter(f) < 0)
        return NULL;
    struct call c;
    element_init(&c, step, t, j, idx, gen);
    return element_result(f, run_call(f, &c), idx, gen, what, Py_NewRef(Py_None));
}

/* release(t, j, handle): subscription j lets go of an element it received. */
static PyObject *Core_release(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    return element_call(f, step_release, "release", args, nargs);
}

/* share(t, mine, handle, j, epoch) -> True if member j of share group t
 * (subscribed under epoch) now references the element too; False, nothing
 * changed, if j is gone or references it already. */
static PyObject *Core_share(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, mine, idx, gen, j;
    int64_t epoch;
    if (parse_tj(args, nargs, 5, "share", &t, &mine) < 0 || conv_handle(f, args[2], &idx, &gen) < 0 ||
        parse_j(args[3], &j) < 0 || conv_count(args[4], "epoch", 0, INT64_MAX, &epoch) < 0 || enter(f) < 0)
        return NULL;
    struct call c;
    element_init(&c, step_share, t, mine, idx, gen);
    c.out[1] = j;
    c.out[2] = (uint64_t)epoch;
    int r = run_call(f, &c);
    return element_result(f, r == RC_FAIL ? RC_OK : r, idx, gen, "share", PyBool_FromLong(r == RC_OK));
}

/* take(t, j, handle): member j (this process's) of share group t receives
 * an element shared with it. */
static PyObject *Core_take(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    return element_call(f, step_take, "take", args, nargs);
}

/* sub_epoch(t, j) -> the epoch subscription j was made under (one load). */
static PyObject *Core_sub_epoch(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, j;
    if (parse_tj(args, nargs, 2, "sub_epoch", &t, &j) < 0) return NULL;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    return PyLong_FromUnsignedLongLong(ld(&SUB(&f->p, t, j)[S_EPOCH]));
}

/* sub_pending(t, j) -> its pending elements now (two loads). */
static PyObject *Core_sub_pending(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t t, j;
    if (parse_tj(args, nargs, 2, "sub_pending", &t, &j) < 0) return NULL;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    return PyLong_FromUnsignedLongLong(sub_pending(&f->p, t, j));
}

/* topic_subs(t) -> its live subscriptions now (one load). */
static PyObject *Core_topic_subs(Core *f, PyObject *arg) {
    uint64_t t;
    if (parse_t(arg, &t) < 0) return NULL;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    return PyLong_FromLong(__builtin_popcountll(ld(&TOPIC(&f->p, t)[T_SUBS]) & ((1ull << MAX_SUBS) - 1)));
}

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
PyMethodDef Core_topic_methods[] = {
    M("topic_open", Core_topic_open, METH_FASTCALL, "(name, depth, overflow) -> (index, depth, overflow)"),
    M("subscribe", Core_subscribe, METH_O, "(t) -> subscription index, or -1"),
    M("unsubscribe", Core_unsubscribe, METH_FASTCALL, "(t, j)"),
    M("publish", Core_publish, METH_FASTCALL, "(t, handle, block=True, timeout=None) -> published"),
    M("sub_get", Core_sub_get, METH_FASTCALL, "(t, j, max_n, block=True, timeout=None) -> handles or None"),
    M("release", Core_release, METH_FASTCALL, "(t, j, handle)"),
    M("share", Core_share, METH_FASTCALL, "(t, mine, handle, j, epoch) -> shared"),
    M("take", Core_take, METH_FASTCALL, "(t, j, handle)"),
    M("sub_epoch", Core_sub_epoch, METH_FASTCALL, "(t, j) -> epoch"),
    M("sub_pending", Core_sub_pending, METH_FASTCALL, "(t, j) -> pending"),
    M("topic_subs", Core_topic_subs, METH_O, "(t) -> live subscriptions"),
    {NULL},
};
