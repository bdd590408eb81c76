/* py_queue.c: the Core's queue methods. A blocking put or get waits as
 * long as its caller asked (its timeout, or none); a non-blocking one waits
 * for the lock at most the atomic bound and then says the queue is full
 * (empty).
 */
#include "py.h"

static int parse_q(Core *f, PyObject *o, uint64_t *q) {
    int64_t v;
    if (conv_count(o, "queue", 0, (int64_t)f->p.max_queues - 1, &v) < 0) return -1;
    *q = (uint64_t)v;
    return 0;
}

/* (q, x, block=True, timeout=None) -> the call, ready to run. */
static int parse_move(Core *f, PyObject *const *args, Py_ssize_t nargs, const char *fname, struct call *c,
                      step_fn step, PyObject **x, PyObject **timeout) {
    if (nargs < 2 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 to 4 arguments (%zd given)", fname, nargs);
        return -1;
    }
    uint64_t q;
    int64_t timeout_ns = -1;
    if (parse_q(f, args[0], &q) < 0) return -1;
    int block = nargs > 2 ? PyObject_IsTrue(args[2]) : 1;
    if (block < 0) return -1;
    *x = args[1];
    *timeout = nargs > 3 ? args[3] : Py_None;
    if (block && conv_timeout(*timeout, &timeout_ns) < 0) return -1; /* ignored when not blocking, as queue.Queue */
    call_init(c, step, block ? BOUND_CALLER : BOUND_ATOMIC, timeout_ns);
    c->may_sleep = block;
    c->retry_ns = (uint64_t)retry_queue_ns;
    c->q = q;
    return 0;
}

static PyObject *moved_error(Core *f, struct call *c, int r) {
    if (r == RC_INVALID && c->bad >= 0) return raise_invalid(f, (uint64_t)c->src[c->bad]);
    if (r == RC_INVALID) {
        PyErr_SetString(PyExc_ValueError, f->p.msg);
        return NULL;
    }
    return raise_for(f, r, "queue");
}

/* put(q, handle, block=True, timeout=None) -> True, or False if it stayed full. */
static PyObject *Core_put(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    struct call c;
    PyObject *x, *timeout;
    uint64_t idx, gen;
    if (parse_move(f, args, nargs, "put", &c, step_put, &x, &timeout) < 0 || conv_handle(f, x, &idx, &gen) < 0 ||
        enter(f) < 0)
        return NULL;
    int64_t one = (int64_t)(idx | gen << HGEN_SHIFT);
    c.src = &one;
    c.n = 1;
    int r = run_call(f, &c);
    Owner *ow = r == RC_OK ? owner_of(x) : NULL;
    if (ow) ow->given = 1; /* an owning array: its element is the queue's now */
    if (r == RC_OK || r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY) return leave_with(f, PyBool_FromLong(r == RC_OK));
    return leave_with(f, moved_error(f, &c, r));
}

/* get(q, block=True, timeout=None) -> a handle, or None if it stayed empty. */
static PyObject *Core_get(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *with[4] = {nargs > 0 ? args[0] : NULL, Py_None, nargs > 1 ? args[1] : Py_True,
                         nargs > 2 ? args[2] : Py_None};
    struct call c;
    PyObject *x, *timeout;
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "get() takes 1 to 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (parse_move(f, with, 4, "get", &c, step_get, &x, &timeout) < 0 || enter(f) < 0) return NULL;
    int64_t one = -1;
    c.dst = &one;
    c.n = 1;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, PyLong_FromLongLong(one));
    if (r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    return leave_with(f, moved_error(f, &c, r));
}

/* put_many(q, handles, block=True, timeout=None) -> True, or False if
 * there was no room for all of them (all or nothing). */
static PyObject *Core_put_many(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    struct call c;
    PyObject *x, *timeout, *res = NULL;
    int64_t stack[64], n = 0;
    if (parse_move(f, args, nargs, "put_many", &c, step_put, &x, &timeout) < 0) return NULL;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    int64_t *hs = conv_handles(f, x, &n, stack, 64);
    if (!hs) return NULL;
    uint64_t depth = ld(&QUEUE(&f->p, c.q)[Q_DEPTH]);
    if ((uint64_t)n > depth) {
        PyErr_Format(PyExc_ValueError, "%lld elements can never fit a queue of depth %llu", (long long)n,
                     (unsigned long long)depth);
    } else if (n == 0) {
        res = Py_NewRef(Py_True);
    } else if (enter(f) == 0) {
        c.src = hs;
        c.n = n;
        int r = run_call(f, &c);
        res = leave_with(f, r == RC_OK || r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY ? PyBool_FromLong(r == RC_OK)
                                                                         : moved_error(f, &c, r));
    }
    if (hs != stack) PyMem_Free(hs);
    return res;
}

/* get_many(q, max_n, block=True, timeout=None) -> 1 to max_n handles (an
 * int64 array, oldest first), or None if it stayed empty. */
static PyObject *Core_get_many(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    struct call c;
    PyObject *x, *timeout;
    int64_t max_n;
    if (parse_move(f, args, nargs, "get_many", &c, step_get, &x, &timeout) < 0 ||
        conv_count(x, "max_n", 1, INT64_MAX, &max_n) < 0 || enter(f) < 0)
        return NULL;
    uint64_t depth = ld(&QUEUE(&f->p, c.q)[Q_DEPTH]);
    uint64_t most = depth < f->p.capacity ? depth : f->p.capacity; /* (a damaged depth: the capacity) */
    int64_t n = (uint64_t)max_n < most ? max_n : (int64_t)(most ? most : 1);
    int64_t stack[256], *dst = n <= 256 ? stack : PyMem_Malloc((size_t)n * 8);
    if (!dst) return leave_with(f, PyErr_NoMemory());
    c.dst = dst;
    c.n = n;
    int r = run_call(f, &c);
    PyObject *res = r == RC_OK ? handles_array(dst, c.moved)
                    : r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY ? Py_NewRef(Py_None) : moved_error(f, &c, r);
    if (dst != stack) PyMem_Free(dst);
    return leave_with(f, res);
}

/* queue_count(q): how many elements queue q holds now (one load). */
static PyObject *Core_queue_count(Core *f, PyObject *arg) {
    uint64_t q;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    if (parse_q(f, arg, &q) < 0) return NULL;
    uint64_t n = ld(&QUEUE(&f->p, q)[Q_COUNT]);
    return PyLong_FromUnsignedLongLong(n < f->p.capacity ? n : f->p.capacity);
}

/* queue_open(name, depth) -> (index, depth): queue `name` (bytes),
 * created with `depth` if missing and depth > 0; index -1 if missing and
 * depth is 0, -2 if the table is full. */
static PyObject *Core_queue_open(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    char padded[QUEUE_NAME_BYTES];
    int64_t depth;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "queue_open(name: bytes, depth)");
        return NULL;
    }
    if (conv_name(args[0], "queue", padded) < 0 || conv_count(args[1], "depth", 0, (int64_t)f->p.capacity, &depth) < 0 ||
        enter(f) < 0)
        return NULL;
    struct call c;
    call_init(&c, step_queue_open, BOUND_ADMIN, -1);
    c.arg = padded;
    c.a = (uint64_t)depth;
    int r = run_call(f, &c);
    if (r != RC_OK) return leave_with(f, raise_for(f, r, "queue"));
    return leave_with(f, Py_BuildValue("LK", (long long)(int64_t)c.out[0], (unsigned long long)c.out[1]));
}

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
PyMethodDef Core_queue_methods[] = {
    M("put", Core_put, METH_FASTCALL, "(q, handle, block=True, timeout=None) -> put"),
    M("get", Core_get, METH_FASTCALL, "(q, block=True, timeout=None) -> handle or None"),
    M("put_many", Core_put_many, METH_FASTCALL, "(q, handles, block=True, timeout=None) -> put"),
    M("get_many", Core_get_many, METH_FASTCALL, "(q, max_n, block=True, timeout=None) -> handles or None"),
    M("queue_count", Core_queue_count, METH_O, "(q) -> count"),
    M("queue_open", Core_queue_open, METH_FASTCALL, "(name, depth) -> (index, depth)"),
    {NULL},
};
