/* py_type.c: the Core type: one process's handle on one pool's segment.
 *
 * A Mempool holds one Core (has-a) and binds its alloc, free, buffer and
 * ndarray to itself. Core(buf, name, geometry..., fifo_prefix) checks that
 * the geometry fits the mapping before it points anything into it.
 *
 * Lifetime: close() marks the object closing, wakes its own sleepers (every
 * wait in it ends with PoolClosedError), and releases the mapping once the
 * last call under way returns (`busy`), so a close from another thread or a
 * signal handler never pulls the mapping from under a call.
 */
#include <string.h>

#include "py.h"

PyObject *closed_error(Core *f) {
    if (f->unusable) {
        PyErr_SetObject((PyObject *)Py_TYPE(f->unusable), f->unusable);
        return NULL;
    }
    PyErr_Format(ErrClosed, "pool '%s' is closed in this object; attach again to use it", f->p.name);
    return NULL;
}


PyObject *raise_for(Core *f, int r, const char *what) {
    switch (r) {
    case RC_SIGNAL: return NULL; /* the handler's (or callback's) exception is set */
    case RC_TIMEOUT: PyErr_Format(PyExc_TimeoutError, "pool '%s': %s: the timeout passed", f->p.name, what); return NULL;
    case RC_BUSY: return raise_busy(f, what);
    case RC_DESTROYED: PyErr_Format(ErrDestroyed, "pool '%s' was destroyed", f->p.name); return NULL;
    case RC_CLOSED: return closed_error(f);
    case RC_NOMEM: return PyErr_NoMemory();
    case RC_INVALID: PyErr_SetString(PyExc_ValueError, f->p.msg); return NULL;
    case RC_CORRUPT:
        log_msg(LOG_ERROR, "pool '%s' is corrupt: %s (found by %s; shmpool-inspect --check %s audits it)", f->p.name,
                f->p.msg, what, f->p.name);
        PyErr_Format(ErrFormat, "pool '%s' is corrupt: %s (shmpool-inspect --check %s audits it)", f->p.name, f->p.msg,
                     f->p.name);
        return NULL;
    default: PyErr_Format(PyExc_SystemError, "shmpool: %s: unexpected result %d", what, r); return NULL;
    }
}

PyObject *raise_invalid(Core *f, uint64_t handle) {
    PyObject *exc = PyObject_CallFunction(ErrInvalid, "Ks", (unsigned long long)handle, f->p.msg);
    if (exc) {
        PyErr_SetObject(ErrInvalid, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* TimeoutError for a call that may not wait long, whose lock a live
 * process kept: who, and for how long. */
PyObject *raise_busy(Core *f, const char *call) {
    struct pool *p = &f->p;
    uint64_t tok = ld(&p->hdr[H_LOCK_OWNER]), o = tok & OWNER_MASK, since = ld(&p->hdr[H_LOCK_SINCE_NS]);
    uint64_t now = now_ns();
    if (tok && o >= 1 && o <= p->max_procs) {
        unsigned long long pid = ld(&ENTRY(p, o - 1)[P_PID]);
        char held[32]; /* (PyErr_Format has no %f) */
        snprintf(held, sizeof held, "%.3f", since && now > since ? (double)(now - since) / 1e9 : 0.0);
        PyErr_Format(PyExc_TimeoutError,
                     "pool '%s': %s gave up waiting for the pool lock, held by pid %llu for %s s (a stopped, traced "
                     "or starved process; it is taken over only once that process is dead)",
                     p->name, call, pid, held);
    } else {
        PyErr_Format(PyExc_TimeoutError, "pool '%s': %s gave up waiting for the pool lock (busy)", p->name, call);
    }
    return NULL;
}

void release_view(Core *f) {
    release_fifos(&f->p);
    f->p.enabled = 0;
    f->p.hdr = f->p.words = f->p.registry = f->p.entry = f->p.queues = NULL;
    f->p.stack = f->p.arena = f->p.cache = f->p.next = NULL;
    f->p.data = NULL;
    if (f->have_view) {
        f->have_view = 0;
        PyBuffer_Release(&f->view);
    }
    Py_CLEAR(f->data_mv); /* views made from it keep their own reference: the mapping lives while they do */
}

static int Core_init(Core *f, PyObject *args, PyObject *kwds) {
    PyObject *buf;
    const char *name, *fifo;
    Py_ssize_t off_words, off_stack, off_arena, off_next, off_desc, off_since, off_procs, off_queues, off_refs, off_topics, max_queues,
        off_slots,
        max_procs;
    unsigned long long capacity, stride, slot_size;
    int poison;
    if (!PyArg_ParseTuple(args, "OsnnnnnnnnnnnnnKKKps", &buf, &name, &off_words, &off_stack, &off_arena, &off_next,
                          &off_desc, &off_since, &off_procs, &off_queues, &off_refs, &off_topics, &max_queues, &off_slots, &max_procs, &capacity, &stride,
                          &slot_size, &poison, &fifo))
        return -1;
    if (f->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Core initialised twice");
        return -1;
    }
    if (strlen(fifo) + 24 > sizeof f->p.fifo_prefix) {
        PyErr_SetString(PyExc_ValueError, "pool name too long for its FIFO paths");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &f->view, PyBUF_WRITABLE) < 0) return -1;
    f->have_view = 1;
    Py_ssize_t len = f->view.len;
    if (capacity < 1 || capacity > MAX_CAPACITY || max_procs < 1 || (uint64_t)max_procs > MAX_MAX_PROCS ||
        slot_size < 1 || stride < slot_size || len < (Py_ssize_t)(8 * HEADER_WORDS) ||
        off_words < (Py_ssize_t)(8 * HEADER_WORDS) || off_words + (Py_ssize_t)(8 * capacity) > len || off_stack < 0 ||
        off_stack + (Py_ssize_t)(4 * capacity) > len || off_arena < 0 || off_arena + (Py_ssize_t)(4 * capacity) > len ||
        off_next < 0 || off_next + (Py_ssize_t)(4 * capacity) > len || off_queues < 0 || off_queues % 8 ||
        off_desc < 0 || off_desc % 8 || off_desc + (Py_ssize_t)(8 * DESC_WORDS * capacity) > len ||
        off_since < 0 || off_since % 8 || off_since + (Py_ssize_t)(8 * capacity) > len ||
        off_refs < 0 || off_refs % 8 || off_refs + (Py_ssize_t)(8 * capacity) > len ||
        off_topics < 0 || off_topics % 8 || off_topics + (Py_ssize_t)TOPICS_BYTES > len ||
        max_queues < 0 || max_queues > (Py_ssize_t)MAX_QUEUES ||
        off_queues + max_queues * (Py_ssize_t)QUEUE_WORDS * 8 > len || off_procs < 0 || off_procs % 8 ||
        off_procs + max_procs * (Py_ssize_t)PROC_WORDS * 8 > len || off_slots < 0 ||
        (uint64_t)off_slots + stride * capacity > (uint64_t)len) {
        PyErr_SetString(PyExc_ValueError, "geometry outside the mapping");
        return -1;
    }
    struct pool *p = &f->p;
    char *base = (char *)f->view.buf;
    p->hdr = (uint64_t *)base;
    p->words = (uint64_t *)(base + off_words);
    p->stack = (uint32_t *)(base + off_stack);
    p->arena = (uint32_t *)(base + off_arena);
    p->next = (uint32_t *)(base + off_next);
    p->desc = (uint64_t *)(base + off_desc);
    p->since = (uint64_t *)(base + off_since);
    p->refs = (uint64_t *)(base + off_refs);
    p->topics = (uint64_t *)(base + off_topics);
    p->subs = (uint64_t *)(base + off_topics + OFF_SUBS);
    p->rings = (uint32_t *)(base + off_topics + OFF_RINGS);
    p->queues = (uint64_t *)(base + off_queues);
    p->registry = (uint64_t *)(base + off_procs);
    p->data = (unsigned char *)(base + off_slots);
    p->max_queues = (uint64_t)max_queues;
    p->capacity = capacity;
    p->stride = stride;
    p->slot_size = slot_size;
    p->max_procs = (uint64_t)max_procs;
    p->off_procs = (uint64_t)off_procs;
    p->poison = poison;
    p->fd = -1;
    p->long_sleep_ns = (int64_t)LONG_SLEEP_NS;
    for (int q = 0; q < (int)MAX_QUEUES; q++) p->spin_ns[q][0] = p->spin_ns[q][1] = (uint32_t)QUEUE_SPIN_NS;
    p->poisoned = -1;
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->fifo_prefix, sizeof p->fifo_prefix, "%s", fifo);
    PyObject *mv = PyMemoryView_FromObject(buf);
    if (!mv) return -1;
    f->data_mv = PySequence_GetSlice(mv, off_slots, off_slots + (Py_ssize_t)(stride * capacity));
    Py_DECREF(mv);
    return f->data_mv ? 0 : -1;
}

/* close(): see the top of this file. */
static PyObject *Core_close(Core *f, PyObject *unused) {
    if (f->p.closing) Py_RETURN_NONE;
    f->p.closing = 1;
    f->p.enabled = 0;
    if (f->p.hdr && (f->p.waiting || f->async_pending)) wake_everyone(&f->p); /* they end with PoolClosedError */
    for (; f->p.hdr && f->async_pending > 0; f->async_pending--) chan_async_done(&f->p); /* counted out, once */
    if (f->busy == 0) release_view(f);
    Py_RETURN_NONE;
}

static void Core_dealloc(Core *f) {
    PyTypeObject *tp = Py_TYPE(f);
    release_view(f);
    Py_CLEAR(f->trace);
    Py_CLEAR(f->unusable);
    Py_CLEAR(f->data_mv);
    Py_CLEAR(f->last_dtype);
    Py_CLEAR(f->last_descr);
    tp->tp_free((PyObject *)f);
    Py_DECREF(tp);
}

static PyObject *get_enabled(Core *f, void *c) { return PyBool_FromLong(f->p.enabled && f->p.entry != NULL); }
static int set_enabled(Core *f, PyObject *v, void *c) {
    int b = v ? PyObject_IsTrue(v) : 0;
    if (b < 0) return -1;
    f->p.enabled = b && f->p.entry != NULL && !f->p.closing && f->trace == NULL;
    return 0;
}
static PyObject *get_cache_n(Core *f, void *c) {
    if (!f->p.entry || !f->p.hdr) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(cached_by(&f->p, f->p.me - 1));
}
static PyObject *get_recoveries(Core *f, void *c) { return PyLong_FromUnsignedLongLong(f->p.recoveries); }
/* long_sleep: seconds after which a sleeping allocation is said to the
 * logger (None: never). */
static PyObject *get_long_sleep(Core *f, void *c) {
    if (f->p.long_sleep_ns < 0) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)f->p.long_sleep_ns / 1e9);
}
static int set_long_sleep(Core *f, PyObject *v, void *c) {
    if (v == NULL || v == Py_None) {
        f->p.long_sleep_ns = -1;
        return 0;
    }
    int64_t ns;
    if (conv_timeout(v, &ns) < 0) return -1;
    f->p.long_sleep_ns = ns;
    return 0;
}
static PyObject *get_entry(Core *f, void *c) { return PyLong_FromLongLong((long long)f->p.me - 1); }
static PyObject *get_trace(Core *f, void *c) { return Py_NewRef(f->trace ? f->trace : Py_None); }
static int set_trace(Core *f, PyObject *v, void *c) {
    Py_XSETREF(f->trace, v == NULL || v == Py_None ? NULL : Py_NewRef(v));
    if (f->trace) f->p.enabled = 0;
    f->p.traced = f->trace != NULL;
    return 0;
}
/* Read without the lock on purpose: one aligned load each (as the kernel's
 * mempool_is_saturated reads curr_nr). */
static PyObject *get_min_nr(Core *f, void *c) {
    if (!f->p.hdr) return closed_error(f);
    return PyLong_FromUnsignedLongLong(ld(&f->p.hdr[H_MIN_NR]));
}
static PyObject *get_rng(Core *f, void *c) {
    if (!f->p.hdr) return closed_error(f);
    return PyUnicode_FromString(ld(&f->p.hdr[H_RNG_KIND]) == RNG_GLIBC ? "glibc" : "splitmix64");
}
/* curr_nr as stats() says it (H_CURR_NR plus the places' slack: places.c),
 * also without the lock. */
static PyObject *get_saturated(Core *f, void *c) {
    if (!f->p.hdr) return closed_error(f);
    return PyBool_FromLong(reserve_total(&f->p) >= ld(&f->p.hdr[H_MIN_NR]));
}

static PyGetSetDef Core_getset[] = {
    {"enabled", (getter)get_enabled, (setter)set_enabled, "whether this object uses its process's cache", NULL},
    {"cache_n", (getter)get_cache_n, NULL, "slots in this process's cache", NULL},
    {"recoveries", (getter)get_recoveries, NULL, "times this object took the lock over from a dead owner", NULL},
    {"long_sleep", (getter)get_long_sleep, (setter)set_long_sleep, "a sleeping allocation is logged after this", NULL},
    {"entry", (getter)get_entry, NULL, "this process's registry entry (-1: none)", NULL},
    {"trace", (getter)get_trace, (setter)set_trace, "the trace callback, called outside the lock", NULL},
    {"min_nr", (getter)get_min_nr, NULL, "min_nr now (one load)", NULL},
    {"saturated", (getter)get_saturated, NULL, "curr_nr >= min_nr now (two loads)", NULL},
    {"rng", (getter)get_rng, NULL, "the fault injector's generator", NULL},
    {NULL},
};

extern PyMethodDef Core_alloc_methods[], Core_queue_methods[], Core_admin_methods[], Core_topic_methods[];

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
static PyMethodDef own_methods[] = {
    M("buffer", Core_buffer, METH_O, "buffer($self, handle, /)\n--\n\nA writable memoryview of the element."),
    M("ndarray", Core_ndarray, METH_FASTCALL | METH_KEYWORDS,
      "ndarray($self, handle, /, dtype=None, shape=None)\n--\n\nA zero-copy numpy view of the element."),
    M("array", Core_array, METH_FASTCALL | METH_KEYWORDS,
      "array($self, handle, /, dtype=None, shape=None)\n--\n\nAn owning numpy view of the element."),
    M("describe", Core_describe, METH_FASTCALL, "(handle, code, dims): record an element's dtype and shape"),
    M("close", Core_close, METH_NOARGS, "let go of the mapping; wake this object's sleepers"),
    {NULL},
};

static PyMethodDef all_methods[96];

static PyType_Slot Core_slots[] = {
    {Py_tp_init, (void *)Core_init},
    {Py_tp_dealloc, (void *)Core_dealloc},
    {Py_tp_methods, all_methods},
    {Py_tp_getset, Core_getset},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_doc, "One process's handle on one pool: its lock and transitions (see shmpool/_core/pool.h)."},
    {0, NULL},
};

PyType_Spec CoreSpec = {
    .name = "shmpool._core.Core",
    .basicsize = sizeof(Core),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Core_slots,
};

/* The methods of every py_*.c file, in one table. */
int core_type_init(void) {
    PyMethodDef *tables[] = {own_methods, Core_alloc_methods, Core_queue_methods, Core_admin_methods, Core_topic_methods};
    size_t k = 0;
    for (size_t t = 0; t < sizeof tables / sizeof *tables; t++)
        for (PyMethodDef *m = tables[t]; m->ml_name; m++) {
            if (k + 1 >= sizeof all_methods / sizeof *all_methods) return -1;
            all_methods[k++] = *m;
        }
    all_methods[k].ml_name = NULL;
    return 0;
}
