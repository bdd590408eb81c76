/* py_alloc.c: the Core's allocation methods (alloc, free, bulk, adopt,
 * async) and the glue around run(): arguments converted once (py_convert.c),
 * one call of the core, then the result or the exception, built after the
 * lock is released. Queue and administrative methods are in py_queue.c and
 * py_admin.c.
 */
#include <errno.h>
#include <math.h>
#include <unistd.h>

#include "py.h"

static const char *const EVENT_NAMES[] = {NULL, "alloc-arena", "alloc-reserve", "alloc-failed", "sleep",
                                          "free-reserve", "free-arena"};

/* ------------------------------------------------------------------ */
/* Around run()                                                        */

static int is_alloc(const struct call *c) { return c->step == step_alloc; }

/* An allocation asleep longer than the object's long_sleep: said once to
 * the `shmpool` logger, with who holds the elements, and plainly when this
 * process holds every one of them (nobody else can free one: a likely
 * self-deadlock). -1 if the logger raised. */
static int report_long_sleep(Core *f, uint64_t slept_ns) {
    struct pool *p = &f->p;
    uint32_t *held = PyMem_Calloc(p->max_procs + 1, sizeof *held);
    if (!held) return log_msg(LOG_WARNING, "pool '%s': an allocation in pid %ld has slept %.1f s", p->name,
                              (long)getpid(), (double)slept_ns / 1e9);
    held_by(p, held);
    uint64_t total = 0, mine = p->me && p->me <= p->max_procs ? held[p->me] : 0, queued = 0;
    for (uint64_t o = 0; o <= p->max_procs; o++) total += held[o];
    for (uint64_t q = 0; q < p->max_queues; q++)
        if (ld(&QUEUE(p, q)[Q_STATE]) == QUEUE_LIVE) queued += ld(&QUEUE(p, q)[Q_COUNT]);
    char who[600];
    size_t at = 0;
    who[0] = 0;
    for (int shown = 0; shown < 8; shown++) { /* the biggest holders first */
        uint64_t best = 0;
        for (uint64_t o = 1; o <= p->max_procs; o++)
            if (held[o] > (best ? held[best] : 0)) best = o;
        if (!best) break;
        unsigned long long pid = ld(&ENTRY(p, best - 1)[P_PID]);
        int k = snprintf(who + at, sizeof who - at, "%spid %llu%s holds %u", shown ? ", " : "", pid,
                         best == p->me ? " (this process)" : "", held[best]);
        if (k < 0 || (size_t)k >= sizeof who - at) break;
        at += (size_t)k;
        held[best] = 0;
    }
    PyMem_Free(held);
    double s = (double)slept_ns / 1e9;
    if (total && mine == total && !queued)
        return log_msg(LOG_WARNING, "pool '%s': an allocation in pid %ld has slept %.1f s, and this process itself "
                       "holds every element that is out of the pool (%llu of %llu): only a free by another of its "
                       "threads can wake it (a likely self-deadlock: free what it holds, or give alloc a timeout)",
                       p->name, (long)getpid(), s, (unsigned long long)total, (unsigned long long)p->capacity);
    return log_msg(LOG_WARNING, "pool '%s': an allocation in pid %ld has slept %.1f s waiting for an element to "
                   "come back: %s; %llu in queues", p->name, (long)getpid(), s, at ? who : "no process holds any",
                   (unsigned long long)queued);
}

/* After each attempt, the lock released: the poison warning, then the
 * trace of an alloc or free. -1 if either raised; an element the attempt
 * got is then given back (nothing is lost). */
static int after_unlock(struct pool *p, struct call *c, int r) {
    Core *f = c->ctx;
    int failed = 0;
    if (r == RC_SLEEP && c->slept && !c->reported && p->long_sleep_ns >= 0 && is_allocation(c)) {
        uint64_t slept = now_ns() - c->slept_since;
        if (slept >= (uint64_t)p->long_sleep_ns) {
            c->reported = 1;
            failed = report_long_sleep(f, slept) < 0;
        }
    }
    if (!failed && p->poisoned >= 0) {
        long long idx = (long long)p->poisoned;
        p->poisoned = -1;
        log_msg(LOG_WARNING, "pool '%s': reserved element in slot %lld was written after it was freed (poison "
                "mismatch; its bytes are left as found)", p->name, idx);
        failed = PyErr_WarnFormat(WarnPoison, 1, "pool '%s': reserved element in slot %lld was written after it was "
                                  "freed", p->name, idx) < 0;
    }
    if (!failed && f->trace && (is_alloc(c) || c->step == step_free) && p->last_event != EV_NONE) {
        PyObject *h;
        if (c->step == step_free) h = PyLong_FromUnsignedLongLong(c->a | c->b << HGEN_SHIFT);
        else if (r == RC_OK) h = PyLong_FromUnsignedLongLong(c->a);
        else h = Py_NewRef(Py_None);
        PyObject *res = h ? PyObject_CallFunction(f->trace, "sOK", EVENT_NAMES[p->last_event], h,
                                                  (unsigned long long)p->last_curr) : NULL;
        Py_XDECREF(h);
        Py_XDECREF(res);
        failed = res == NULL;
    }
    if (failed && r == RC_OK) {
        if (is_alloc(c) || c->step == step_alloc_preallocated) give_back(f, (const int64_t *)&c->a, 1);
        else if (c->step == step_alloc_bulk) give_back(f, c->dst, c->n);
    }
    return failed ? -1 : 0;
}

int run_call(Core *f, struct call *c) {
    c->ctx = f;
    c->after = f->trace || f->p.poison || (c->may_sleep && is_allocation(c) && f->p.long_sleep_ns >= 0)
                   ? after_unlock : NULL; /* nothing to say otherwise */
    return run(&f->p, c);
}

/* Free elements a failed call got, keeping the exception that is set (the
 * trace is not called for them; a lock that does not come parks them). */
void give_back(Core *f, const int64_t *handles, int64_t n) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    struct call c;
    call_init(&c, step_free_bulk, BOUND_ATOMIC, -1);
    c.src = handles;
    c.n = n;
    c.ctx = f;
    if (run(&f->p, &c) == RC_BUSY) park_bulk(&f->p, &c);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

PyObject *handles_array(const int64_t *src, int64_t n) {
    npy_intp dims[1] = {(npy_intp)n};
    PyObject *arr = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (arr && n) memcpy(PyArray_DATA((PyArrayObject *)arr), src, (size_t)n * 8);
    return arr;
}

/* ------------------------------------------------------------------ */
/* alloc                                                               */

static inline __attribute__((always_inline)) int parse_alloc(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname, int first,
                       PyObject **gfp, PyObject **timeout) {
    if (nargs > first + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional arguments", fname, first + 1);
        return -1;
    }
    if (nargs > first) *gfp = args[first];
    for (Py_ssize_t i = 0, nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0; i < nk; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0) *timeout = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "gfp") == 0 && nargs <= first) *gfp = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, key);
            return -1;
        }
    }
    return 0;
}

static PyObject *GFP_KERNEL_OBJ;

/* alloc(gfp=GFP_KERNEL, *, timeout=None): see Mempool.alloc. The common
 * case is this process's cache, without the lock; when the arena is dry (or
 * failed on purpose), this process's reserve places, without the lock. */
static PyObject *Core_alloc(Core *f, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *gfp = GFP_KERNEL_OBJ, *timeout = Py_None;
    if (parse_alloc(args, nargs, kwnames, "alloc", 0, &gfp, &timeout) < 0) return NULL;
    struct pool *p = &f->p;
    int skip = 0, drawn = 0, sleeps = -1;
    if (PyLong_Check(gfp) && !PyBool_Check(gfp)) { /* the common masks: checked here, without the warning */
        long g = PyLong_AsLong(gfp);
        if (g >= 0 && ((uint64_t)g & ~(gfp_valid & ~gfp_zero)) == 0) sleeps = ((uint64_t)g & gfp_wait) != 0;
        PyErr_Clear();
    }
    if (sleeps >= 0 && timeout == Py_None && p->enabled && ld(&p->hdr[H_STATUS]) == STATUS_LIVE &&
        (ld(&p->hdr[H_RNG_KIND]) != RNG_GLIBC || !ld(&p->hdr[H_FAIL_THRESHOLD]))) { /* glibc's draws: locked */
        uint64_t h;
        int places = !p->poison && p->entry[P_PLACE_R] > 0; /* full reserve places of ours */
        if (p->entry[P_CACHE_N] > 0) {
            if (fault(p)) skip = 1; /* the arena failed: the reserve next */
            else if (cache_pop(p, &h)) {
                count(p, C_ALLOC_ARENA, 1);
                return PyLong_FromUnsignedLongLong(h);
            } else
                drawn = 1; /* (a thief took our cache meanwhile: this attempt has drawn already) */
        } else if (places && !arena_dry(p)) { /* the arena's slots are elsewhere: the locked attempt takes one */
            if (fault(p)) skip = 1;
            else drawn = 1;
        } else
            skip = places; /* (dry: no draw) */
        if (skip && places && place_pop_fast(p, &h)) {
            count(p, C_ALLOC_RESERVE, 1);
            return PyLong_FromUnsignedLongLong(h);
        }
    }
    int64_t timeout_ns = -1;
    if ((sleeps < 0 && conv_gfp(gfp, &sleeps) < 0) || (timeout != Py_None && conv_timeout(timeout, &timeout_ns) < 0) ||
        enter(f) < 0)
        return NULL;
    struct call c;
    call_init(&c, step_alloc, sleeps ? BOUND_CALLER : BOUND_ATOMIC, timeout_ns);
    c.may_sleep = sleeps;
    c.skip_arena = skip;
    c.drawn = drawn;
    c.retry_ns = (uint64_t)retry_alloc_ns;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, PyLong_FromUnsignedLongLong(c.a));
    if (r == RC_FAIL || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    if (r == RC_TIMEOUT) {
        PyErr_Format(PyExc_TimeoutError, "pool '%s': no element within %S s", p->name, timeout);
        return leave_with(f, NULL);
    }
    return leave_with(f, raise_for(f, r, "alloc"));
}

/* alloc_preallocated(): the reserve only, never the arena, never waiting. */
static PyObject *Core_alloc_preallocated(Core *f, PyObject *unused) {
    if (enter(f) < 0) return NULL;
    struct call c;
    call_init(&c, step_alloc_preallocated, BOUND_ATOMIC, -1);
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, PyLong_FromUnsignedLongLong(c.a));
    if (r == RC_FAIL || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    return leave_with(f, raise_for(f, r, "alloc_preallocated"));
}

/* alloc_bulk(n, gfp=GFP_KERNEL, *, timeout=None): n handles (int64 array). */
static PyObject *Core_alloc_bulk(Core *f, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *gfp = GFP_KERNEL_OBJ, *timeout = Py_None;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "alloc_bulk() needs n");
        return NULL;
    }
    int64_t n, timeout_ns;
    int sleeps;
    if (parse_alloc(args, nargs, kwnames, "alloc_bulk", 1, &gfp, &timeout) < 0 ||
        conv_count(args[0], "n", 0, (int64_t)f->p.capacity, &n) < 0 || conv_gfp(gfp, &sleeps) < 0 ||
        conv_timeout(timeout, &timeout_ns) < 0 || enter(f) < 0)
        return NULL;
    npy_intp dims[1] = {(npy_intp)n};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!out || n == 0) return leave_with(f, out);
    struct call c;
    call_init(&c, step_alloc_bulk, sleeps ? BOUND_CALLER : BOUND_ATOMIC, timeout_ns);
    c.may_sleep = sleeps;
    c.retry_ns = (uint64_t)retry_alloc_ns;
    c.dst = PyArray_DATA((PyArrayObject *)out);
    c.n = n;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, out);
    Py_DECREF(out);
    if (r == RC_FAIL || r == RC_BUSY) return leave_with(f, Py_NewRef(Py_None));
    if (r == RC_TIMEOUT) {
        PyErr_Format(PyExc_TimeoutError, "pool '%s': no %lld elements within %S s", f->p.name, (long long)n, timeout);
        return leave_with(f, NULL);
    }
    return leave_with(f, raise_for(f, r, "alloc_bulk"));
}

/* alloc_async_try(): one attempt of a sleeping alloc_async, in the event
 * loop's thread: the handle; None, counted in as an async sleeper under the
 * lock (its process's FIFO gets a byte when the reserve is refilled;
 * async_done() counts it out); False if the lock did not come within the
 * atomic bound (not registered: the loop must not block longer). */
static PyObject *Core_alloc_async_try(Core *f, PyObject *unused) {
    if (enter(f) < 0) return NULL;
    struct call c;
    call_init(&c, step_alloc, BOUND_ATOMIC, -1);
    c.sleep_outside = 1;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, PyLong_FromUnsignedLongLong(c.a));
    if (r == RC_SLEEP) {
        f->async_pending++;
        return leave_with(f, Py_NewRef(Py_None));
    }
    if (r == RC_BUSY) return leave_with(f, Py_NewRef(Py_False));
    return leave_with(f, raise_for(f, r, "alloc_async"));
}

/* note_sleep(seconds): an alloc_async that slept that long returns (the
 * sleep totals, as run() keeps them for the others). */
static PyObject *Core_note_sleep(Core *f, PyObject *arg) {
    int64_t ns;
    if (arg == Py_None || conv_timeout(arg, &ns) < 0 || enter(f) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "note_sleep(seconds)");
        return NULL;
    }
    note_sleep(&f->p, (uint64_t)ns);
    return leave_with(f, Py_NewRef(Py_None));
}

/* report_long_sleep(seconds): an alloc_async asleep that long says so. */
static PyObject *Core_report_long_sleep(Core *f, PyObject *arg) {
    int64_t ns;
    if (arg == Py_None || conv_timeout(arg, &ns) < 0 || enter(f) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "report_long_sleep(seconds)");
        return NULL;
    }
    if (report_long_sleep(f, (uint64_t)ns) < 0) return leave_with(f, NULL);
    return leave_with(f, Py_NewRef(Py_None));
}

/* async_done(): count out a sleeper that alloc_async_try registered (a
 * close() since has counted it out already). */
static PyObject *Core_async_done(Core *f, PyObject *unused) {
    if (f->p.hdr && f->async_pending > 0) {
        f->async_pending--;
        chan_async_done(&f->p);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* free                                                                */

/* free(handle): see Mempool.free. The common case is our cache, without
 * the lock; a free whose lock does not come within the atomic bound parks
 * the element for the next holder of the lock. */
/* The free of slot idx under generation gen, held by `owner` (0: by
 * anybody), once entered: under the lock within the atomic bound, else
 * parked. `quiet` (a finalizer): no trace, no warning (no `after`). */
static int free_locked(Core *f, uint64_t idx, uint64_t gen, uint64_t owner, int quiet) {
    struct call c;
    call_init(&c, step_free, BOUND_ATOMIC, -1);
    c.a = idx;
    c.b = gen;
    c.out[0] = owner;
    c.ctx = f;
    int r = quiet ? run(&f->p, &c) : run_call(f, &c);
    return r == RC_BUSY ? park_free(&f->p, idx, gen, owner) : r;
}

static PyObject *Core_free(Core *f, PyObject *handle) {
    if (handle == Py_None) Py_RETURN_NONE;
    uint64_t idx, gen;
    if (!f->p.hdr || !decode_fast(f, handle, &idx, &gen)) {
        if (conv_handle(f, handle, &idx, &gen) < 0) return NULL;
        Owner *ow = owner_of(handle);
        if (ow) ow->given = 1; /* an owning array: freed now, so its finalizer frees nothing (even if this raises) */
    }
    if (f->trace == NULL && f->p.hdr && free_fast(&f->p, idx, gen, 0)) Py_RETURN_NONE;
    if (enter(f) < 0) return NULL;
    int r = free_locked(f, idx, gen, 0, 0);
    if (r == RC_OK) return leave_with(f, Py_NewRef(Py_None));
    if (r == RC_INVALID) return leave_with(f, raise_invalid(f, idx | gen << HGEN_SHIFT));
    return leave_with(f, raise_for(f, r, "free"));
}

/* An owning array's finalizer: free its element if this process still
 * holds it under its generation (not put on a queue, sent or freed since;
 * checked by the same compare-and-swap that frees it). It may run at any
 * moment the collector runs, in any thread, but never under the pool lock
 * (only C runs there): no trace, no warning, never an exception (the one
 * set, if any, is kept); a lock that does not come within the atomic bound
 * parks the element, as free does. */
void free_owned(Core *f, uint64_t handle) {
    uint64_t idx = handle & INDEX_MASK, gen = handle >> HGEN_SHIFT;
    if (f->unusable || !f->p.hdr || f->p.closing || !f->p.me || idx >= f->p.capacity) return;
    if (f->trace == NULL && free_fast(&f->p, idx, gen, f->p.me)) return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (enter(f) == 0) {
        free_locked(f, idx, gen, f->p.me, 1);
        leave_with(f, NULL);
    }
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* free_bulk(handles): every handle checked first (an invalid one frees
 * none), then as if freed one by one. */
static PyObject *Core_free_bulk(Core *f, PyObject *handles) {
    int64_t stack[64], n = 0;
    if (!f->p.hdr || f->p.closing) return closed_error(f);
    int64_t *hs = conv_handles(f, handles, &n, stack, 64);
    if (!hs) return NULL;
    PyObject *res = NULL;
    if (enter(f) < 0) goto out;
    struct call c;
    call_init(&c, step_free_bulk, BOUND_ATOMIC, -1);
    c.src = hs;
    c.n = n;
    int r = n ? run_call(f, &c) : RC_OK;
    if (r == RC_BUSY) r = park_bulk(&f->p, &c);
    if (r == RC_INVALID && c.bad >= 0) res = raise_invalid(f, (uint64_t)hs[c.bad]);
    else if (r != RC_OK) res = raise_for(f, r, "free_bulk");
    else if (c.moved) {
        snprintf(f->p.msg, sizeof f->p.msg, "%lld of these elements were freed by another process at the same moment",
                 (long long)c.moved);
        res = raise_invalid(f, (uint64_t)hs[0]);
    } else res = Py_NewRef(Py_None);
    res = leave_with(f, res);
out:
    if (hs != stack) PyMem_Free(hs);
    return res;
}

/* adopt(handle): make this process the holder of a held element. */
static PyObject *Core_adopt(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t idx, gen;
    unsigned long long from = 0; /* adopt(handle, from_owner=0): only from that holder (0: any) */
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "adopt(handle, from_owner=0)");
        return NULL;
    }
    if (nargs == 2 && (from = PyLong_AsUnsignedLongLong(args[1])) == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *handle = args[0];
    if (conv_handle(f, handle, &idx, &gen) < 0 || enter(f) < 0) return NULL;
    struct call c;
    call_init(&c, step_adopt, BOUND_ADMIN, -1);
    c.a = idx;
    c.b = gen;
    c.out[0] = from;
    int r = run_call(f, &c);
    if (r == RC_OK) return leave_with(f, Py_NewRef(Py_None));
    if (r == RC_INVALID) return leave_with(f, raise_invalid(f, idx | gen << HGEN_SHIFT));
    return leave_with(f, raise_for(f, r, "adopt"));
}

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
PyMethodDef Core_alloc_methods[] = {
    M("alloc", Core_alloc, METH_FASTCALL | METH_KEYWORDS,
      "alloc($self, /, gfp=GFP_KERNEL, *, timeout=None)\n--\n\nAllocate one element; its handle (see Mempool.alloc)."),
    M("free", Core_free, METH_O, "free($self, handle, /)\n--\n\nReturn an element (see Mempool.free)."),
    M("alloc_preallocated", Core_alloc_preallocated, METH_NOARGS, "the reserve only, never waiting"),
    M("alloc_bulk", Core_alloc_bulk, METH_FASTCALL | METH_KEYWORDS, "(n, gfp=GFP_KERNEL, *, timeout=None)"),
    M("free_bulk", Core_free_bulk, METH_O, "(handles)"),
    M("adopt", Core_adopt, METH_FASTCALL, "(handle, from_owner=0)"),
    M("alloc_async_try", Core_alloc_async_try, METH_NOARGS, "() -> handle, None (registered), False (lock busy)"),
    M("async_done", Core_async_done, METH_NOARGS, "count out an async sleeper"),
    M("note_sleep", Core_note_sleep, METH_O, "(seconds): an alloc_async slept that long"),
    M("report_long_sleep", Core_report_long_sleep, METH_O, "(seconds): an alloc_async asleep that long says so"),
    {NULL},
};

int methods_init(void) {
    GFP_KERNEL_OBJ = PyLong_FromLong(0xD0);
    return GFP_KERNEL_OBJ ? 0 : -1;
}
