/* py_queue.c: the Core's queue methods. A blocking put or get waits as
 * long as its caller asked (its timeout, or none); a non-blocking one waits
 * for the lock at most the atomic bound and then says the queue is full
 * (empty).
 *
 * A Port is one queue of one Core, for a Queue object: its put and get are
 * the idiom's per-message calls, so they are bound to the Queue as they are
 * (as the Core's alloc and free are to a Mempool) and raise queue.Full and
 * queue.Empty themselves, with no Python frame in between.
 */
#include "py.h"

static PyObject *QueueFull, *QueueEmpty; /* the standard library's queue.Full and queue.Empty */

static int parse_q(Core *f, PyObject *o, uint64_t *q) {
    int64_t v;
    if (conv_count(o, "queue", 0, (int64_t)f->p.max_queues - 1, &v) < 0) return -1;
    *q = (uint64_t)v;
    return 0;
}

/* A move of queue q with (block, timeout) -> the call, ready to run. */
static int prepare_move(uint64_t q, PyObject *block_obj, PyObject *timeout, struct call *c, step_fn step) {
    int64_t timeout_ns = -1;
    int block = block_obj == Py_True ? 1 : PyObject_IsTrue(block_obj);
    if (block < 0) return -1;
    if (block && conv_timeout(timeout, &timeout_ns) < 0) return -1; /* ignored when not blocking, as queue.Queue */
    call_init(c, step, block ? BOUND_CALLER : BOUND_ATOMIC, timeout_ns);
    c->may_sleep = block;
    c->retry_ns = (uint64_t)retry_queue_ns;
    c->q = q;
    return 0;
}

/* A queue method's arguments (q, [x,] block=True, timeout=None): `first`
 * of them required (q, and x if any); the queue's index into *q. */
static int parse_head(Core *f, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t first, const char *fname,
                      uint64_t *q) {
    if (nargs < first || nargs > first + 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", fname, first, first + 2, nargs);
        return -1;
    }
    return parse_q(f, args[0], q);
}

/* (q, x, block=True, timeout=None) -> the call, ready to run. */
static int parse_move(Core *f, PyObject *const *args, Py_ssize_t nargs, const char *fname, struct call *c,
                      step_fn step, PyObject **x) {
    uint64_t q;
    if (parse_head(f, args, nargs, 2, fname, &q) < 0) return -1;
    *x = args[1];
    return prepare_move(q, nargs > 2 ? args[2] : Py_True, nargs > 3 ? args[3] : Py_None, c, step);
}

static PyObject *moved_error(Core *f, struct call *c, int r) {
    if (r == RC_INVALID && c->bad >= 0) return raise_invalid(f, (uint64_t)c->src[c->bad]);
    if (r == RC_INVALID) {
        PyErr_SetString(PyExc_ValueError, f->p.msg);
        return NULL;
    }
    return raise_for(f, r, "queue");
}

/* One put of handle x into queue q: True, or False if it stayed full. */
static PyObject *put_one(Core *f, uint64_t q, PyObject *x, PyObject *block, PyObject *timeout) {
    struct call c;
    uint64_t idx, gen;
    if (prepare_move(q, block, timeout, &c, step_put) < 0 || conv_handle(f, x, &idx, &gen) < 0 || enter(f) < 0)
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

/* put(q, handle, block=True, timeout=None) -> True, or False if it stayed full. */
static PyObject *Core_put(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t q;
    if (parse_head(f, args, nargs, 2, "put", &q) < 0) return NULL;
    return put_one(f, q, args[1], nargs > 2 ? args[2] : Py_True, nargs > 3 ? args[3] : Py_None);
}

/* One get from queue q: a handle, or None if it stayed empty. */
static PyObject *get_one(Core *f, uint64_t q, PyObject *block, PyObject *timeout) {
    struct call c;
    if (prepare_move(q, block, timeout, &c, step_get) < 0 || enter(f) < 0) return NULL;
    int64_t one = -1;
    c.dst = &one;
    c.n = 1;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, PyLong_FromLongLong(one));
    if (r == RC_FAIL || r == RC_TIMEOUT || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    return leave_with(f, moved_error(f, &c, r));
}

/* get(q, block=True, timeout=None) -> a handle, or None if it stayed empty. */
static PyObject *Core_get(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t q;
    if (parse_head(f, args, nargs, 1, "get", &q) < 0) return NULL;
    return get_one(f, q, nargs > 1 ? args[1] : Py_True, nargs > 2 ? args[2] : Py_None);
}

/* put_many(q, handles, block=True, timeout=None) -> True, or False if
 * there was no room for all of them (all or nothing). */
static PyObject *Core_put_many(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    struct call c;
    PyObject *x, *res = NULL;
    int64_t stack[64], n = 0;
    if (parse_move(f, args, nargs, "put_many", &c, step_put, &x) < 0) return NULL;
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
    PyObject *x;
    int64_t max_n;
    if (parse_move(f, args, nargs, "get_many", &c, step_get, &x) < 0 ||
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

/* ------------------------------------------------------------------ */
/* Ports                                                               */

typedef struct {
    PyObject_HEAD
    Core *core;
    uint64_t q;                /* the queue's index */
    int closed;                /* Queue.close() was called */
    PyObject *name;            /* for messages */
    int used;                  /* moved an element (Queue.close's rule) */
} Port;

static PyTypeObject *PortType;

/* Positional then keyword arguments into out[0:n] (names[i] for out[i]),
 * as a def with defaults would take them; the unset stay as they were. */
static int port_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname,
                     const char *const *names, int n, int required, PyObject **out) {
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) out[i] = args[i];
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nk; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < n && PyUnicode_CompareWithASCIIString(key, names[i]) != 0) i++;
        if (i == n || i < nargs) {
            PyErr_Format(PyExc_TypeError, i == n ? "%s() got an unexpected keyword argument %R"
                                                 : "%s() got multiple values for argument %R", fname, key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (int i = 0; i < required; i++)
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    return 0;
}

static int port_open(Port *pt) {
    if (!pt->closed) return 0;
    PyErr_Format(ErrClosed, "queue %R is closed in this object; open it again with pool.queue()", pt->name);
    return -1;
}

/* put(handle, block=True, timeout=None): queue.Full if it stayed full. */
static PyObject *Port_put(Port *pt, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"handle", "block", "timeout"};
    PyObject *a[3] = {NULL, Py_True, Py_None};
    if (port_args(args, nargs, kwnames, "put", names, 3, 1, a) < 0 || port_open(pt) < 0) return NULL;
    pt->used = 1;
    PyObject *r = put_one(pt->core, pt->q, a[0], a[1], a[2]);
    if (r != Py_False) return r == Py_True ? (Py_DECREF(r), Py_NewRef(Py_None)) : r;
    Py_DECREF(r);
    PyErr_SetNone(QueueFull);
    return NULL;
}

/* get(block=True, timeout=None): a handle, queue.Empty if it stayed empty. */
static PyObject *Port_get(Port *pt, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"block", "timeout"};
    PyObject *a[2] = {Py_True, Py_None};
    if (port_args(args, nargs, kwnames, "get", names, 2, 0, a) < 0 || port_open(pt) < 0) return NULL;
    pt->used = 1;
    PyObject *r = get_one(pt->core, pt->q, a[0], a[1]);
    if (r != Py_None) return r;
    Py_DECREF(r);
    PyErr_SetNone(QueueEmpty);
    return NULL;
}

static PyObject *Port_close(Port *pt, PyObject *unused) {
    pt->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Port_used(Port *pt, void *unused) { return PyBool_FromLong(pt->used); }

static void Port_dealloc(PyObject *self) {
    Port *pt = (Port *)self;
    Py_XDECREF(pt->core);
    Py_XDECREF(pt->name);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
static PyMethodDef Port_methods[] = {
    M("put", Port_put, METH_FASTCALL | METH_KEYWORDS,
      "put($self, /, handle, block=True, timeout=None)\n--\n\nHand element `handle` to the queue (Queue.put): "
      "queue.Full if it stays full."),
    M("get", Port_get, METH_FASTCALL | METH_KEYWORDS,
      "get($self, /, block=True, timeout=None)\n--\n\nTake the oldest element (Queue.get): queue.Empty if it "
      "stays empty."),
    M("close", Port_close, METH_NOARGS, "close($self, /)\n--\n\nput and get raise PoolClosedError from now on."),
    {NULL},
};
static PyGetSetDef Port_getset[] = {
    {"used", (getter)Port_used, NULL, "whether put or get was called", NULL},
    {NULL},
};
static PyType_Slot Port_slots[] = {
    {Py_tp_dealloc, (void *)Port_dealloc},
    {Py_tp_methods, Port_methods},
    {Py_tp_getset, Port_getset},
    {Py_tp_doc, "one queue of a pool object: its put and get, bound to a Queue"},
    {0, NULL},
};
static PyType_Spec PortSpec = {"shmpool._core.Port", sizeof(Port), 0, Py_TPFLAGS_DEFAULT, Port_slots};

/* port(q, name) -> a Port of queue q (an index queue_open gave). */
static PyObject *Core_port(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t q;
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "port(q, name: str)");
        return NULL;
    }
    if (parse_q(f, args[0], &q) < 0) return NULL;
    Port *pt = PyObject_New(Port, PortType);
    if (!pt) return NULL;
    pt->core = (Core *)Py_NewRef((PyObject *)f);
    pt->q = q;
    pt->closed = pt->used = 0;
    pt->name = Py_NewRef(args[1]);
    return (PyObject *)pt;
}

int queue_init(PyObject *module) {
    PyObject *mod = PyImport_ImportModule("queue");
    if (!mod) return -1;
    QueueFull = PyObject_GetAttrString(mod, "Full");
    QueueEmpty = PyObject_GetAttrString(mod, "Empty");
    Py_DECREF(mod);
    if (!QueueFull || !QueueEmpty) return -1;
    PortType = (PyTypeObject *)PyType_FromSpec(&PortSpec);
    if (!PortType) return -1;
    Py_INCREF(PortType);
    return PyModule_AddObject(module, "Port", (PyObject *)PortType);
}

PyMethodDef Core_queue_methods[] = {
    M("port", Core_port, METH_FASTCALL, "(q, name) -> Port: the queue's put and get for a Queue"),
    M("put", Core_put, METH_FASTCALL, "(q, handle, block=True, timeout=None) -> put"),
    M("get", Core_get, METH_FASTCALL, "(q, block=True, timeout=None) -> handle or None"),
    M("put_many", Core_put_many, METH_FASTCALL, "(q, handles, block=True, timeout=None) -> put"),
    M("get_many", Core_get_many, METH_FASTCALL, "(q, max_n, block=True, timeout=None) -> handles or None"),
    M("queue_count", Core_queue_count, METH_O, "(q) -> count"),
    M("queue_open", Core_queue_open, METH_FASTCALL, "(name, depth) -> (index, depth)"),
    {NULL},
};
