/* py_module.c: the module shmpool._core: the Core type, what the core
 * borrows from Python (releasing the GIL, running signal handlers), the
 * exception classes it raises, and two functions for the package's tools:
 * may_sleep (the one check of a GFP mask) and derive (a pool's numbers from
 * a copy of its metadata, for shmpool-inspect).
 */
#define SHMPOOL_MODULE_C
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

#include "py.h"

PyObject *ErrFormat, *ErrDestroyed, *ErrInvalid, *ErrClosed, *WarnPoison, *WarnGFP;
static PyObject *Logger; /* logging.getLogger("shmpool") (shmpool/_log.py), from set_logger */
int64_t retry_alloc_ns = (int64_t)SLEEP_RETRY_NS, retry_queue_ns = (int64_t)QUEUE_RETRY_NS;
int crash_point = CP_NONE;
const char *const CRASH_POINTS[CP_N] = {"", "alloc-reserve", "free-reserve", "retire", "steal", "refill", "drain",
                                        "rebuild", "queue-put", "queue-get", "park", "publish", "topic-release",
                                        "place-pop", "place-push", "lend"};

static int crash_stops; /* crash_at(..., stop=True): SIGSTOP once instead */

void crash_here(void) {
    if (!crash_stops) {
        kill(getpid(), SIGKILL);
        return;
    }
    crash_point = CP_NONE; /* (once: the process goes on where it stopped) */
    kill(getpid(), SIGSTOP);
}

static void *unblock(void) { return PyEval_SaveThread(); }
static void block(void *token) { PyEval_RestoreThread((PyThreadState *)token); }
static int signals(void) { return PyErr_CheckSignals(); }
struct host host = {unblock, block, signals};

int core_type_init(void);
int methods_init(void);

/* set_classes(PoolFormatError, PoolDestroyedError, InvalidHandleError,
 * PoolClosedError, PoisonWarning, GFPWarning) */
static PyObject *mod_set_classes(PyObject *m, PyObject *args) {
    PyObject *a, *b, *c, *d, *e, *g;
    if (!PyArg_ParseTuple(args, "OOOOOO", &a, &b, &c, &d, &e, &g)) return NULL;
    Py_XSETREF(ErrFormat, Py_NewRef(a));
    Py_XSETREF(ErrDestroyed, Py_NewRef(b));
    Py_XSETREF(ErrInvalid, Py_NewRef(c));
    Py_XSETREF(ErrClosed, Py_NewRef(d));
    Py_XSETREF(WarnPoison, Py_NewRef(e));
    Py_XSETREF(WarnGFP, Py_NewRef(g));
    Py_RETURN_NONE;
}

/* set_logger(logger): the `shmpool` logger (shmpool/_log.py). */
static PyObject *mod_set_logger(PyObject *m, PyObject *logger) {
    Py_XSETREF(Logger, Py_NewRef(logger));
    Py_RETURN_NONE;
}

/* Say something to the `shmpool` logger at `level` (logging's numbers),
 * if it listens at that level. An exception already set is kept (and 0
 * returned); else -1 if the logger itself raised (its handlers' errors are
 * its own: logging reports them). */
int log_msg(int level, const char *fmt, ...) {
    if (!Logger) return 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    int r = 0;
    PyObject *on = PyObject_CallMethod(Logger, "isEnabledFor", "i", level);
    if (!on) r = -1;
    else if (PyObject_IsTrue(on)) {
        char text[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        PyObject *res = PyObject_CallMethod(Logger, "log", "is", level, text);
        if (!res) r = -1;
        Py_XDECREF(res);
    }
    Py_XDECREF(on);
    if (et) {
        PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        r = 0;
    }
    return r;
}

/* A takeover of the lock by this object since the last call: said once. */
void log_takeovers(Core *f) {
    uint64_t n = f->p.recoveries - f->logged_recoveries;
    f->logged_recoveries = f->p.recoveries;
    if (log_msg(LOG_WARNING, "pool '%s': took the pool lock over from pid %llu, which died holding it (%llu time%s), "
                "and repaired the pool", f->p.name, (unsigned long long)f->p.taken_from_pid, (unsigned long long)n,
                n == 1 ? "" : "s") < 0)
        PyErr_WriteUnraisable(Logger);
}

/* set_gfp(valid_mask, wait_bit, zero_bit): gfp.py's table. */
static PyObject *mod_set_gfp(PyObject *m, PyObject *args) {
    unsigned long long valid, wait, zero;
    if (!PyArg_ParseTuple(args, "KKK", &valid, &wait, &zero)) return NULL;
    gfp_valid = valid;
    gfp_wait = wait;
    gfp_zero = zero;
    Py_RETURN_NONE;
}

/* may_sleep(gfp) -> whether the mask has __GFP_WAIT (the one check of a
 * mask: TypeError, ValueError, and the __GFP_ZERO warning). */
static PyObject *mod_may_sleep(PyObject *m, PyObject *gfp) {
    int sleeps;
    if (conv_gfp(gfp, &sleeps) < 0) return NULL;
    return PyBool_FromLong(sleeps);
}

/* seconds(timeout) -> the timeout as a float of seconds, or None: the one
 * check of a timeout (clamped to MAX_WAIT_NS), for the awaitable twins. */
static PyObject *mod_seconds(PyObject *m, PyObject *timeout) {
    int64_t ns;
    if (conv_timeout(timeout, &ns) < 0) return NULL;
    if (ns < 0) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)ns / 1e9);
}

static PyObject *mod_after_fork_in_child(PyObject *m, PyObject *unused) {
    forget_zero_warning(); /* warned once per process: a child is another */
    Py_RETURN_NONE;
}

/* crash_at(point, stop=False): a test hook: SIGKILL this process the next
 * time it reaches `point` ("" turns it off); with `stop`, SIGSTOP it there
 * once (a live process paused in the middle of an operation). */
static PyObject *mod_crash_at(PyObject *m, PyObject *args) {
    const char *s;
    int stop = 0;
    if (!PyArg_ParseTuple(args, "s|p:crash_at", &s, &stop)) return NULL;
    for (int i = 0; i < CP_N; i++) {
        if (strcmp(s, CRASH_POINTS[i]) == 0) {
            crash_stops = stop;
            crash_point = i;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "no crash point '%s'", s);
    return NULL;
}

/* set_retry(alloc_ns, queue_ns): how often an unwoken sleeper retries
 * (tests lengthen it, so that only a wake-up can end a sleep). */
static PyObject *mod_set_retry(PyObject *m, PyObject *args) {
    long long a, q;
    if (!PyArg_ParseTuple(args, "LL", &a, &q)) return NULL;
    if (a < 1 || q < 1) {
        PyErr_SetString(PyExc_ValueError, "retry periods must be positive");
        return NULL;
    }
    retry_alloc_ns = a;
    retry_queue_ns = q;
    Py_RETURN_NONE;
}

static PyObject *mod_retry(PyObject *m, PyObject *unused) {
    return Py_BuildValue("LL", (long long)retry_alloc_ns, (long long)retry_queue_ns);
}

/* derive(meta, capacity, max_procs, max_queues, off_words, off_procs,
 * off_queues) -> the numbers of the pool whose metadata (the segment's
 * bytes before its slots) `meta` holds: derive.c over a copy, as stats()
 * over the pool. */
static PyObject *mod_derive(PyObject *m, PyObject *args) {
    Py_buffer b;
    unsigned long long cap, procs, queues, off_words, off_procs, off_queues;
    if (!PyArg_ParseTuple(args, "y*KKKKKK", &b, &cap, &procs, &queues, &off_words, &off_procs, &off_queues)) return NULL;
    struct pool p;
    memset(&p, 0, sizeof p);
    uint64_t len = (uint64_t)b.len;
    if (cap < 1 || cap > MAX_CAPACITY || procs < 1 || procs > MAX_MAX_PROCS || queues > MAX_QUEUES ||
        len < 8 * HEADER_WORDS || off_words + 8 * cap > len || off_procs % 8 || off_queues % 8 ||
        off_procs + 8 * PROC_WORDS * procs > len || off_queues + 8 * QUEUE_WORDS * queues > len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "geometry outside the copy");
        return NULL;
    }
    char *base = b.buf;
    p.hdr = (uint64_t *)base;
    p.words = (uint64_t *)(base + off_words);
    p.registry = (uint64_t *)(base + off_procs);
    p.queues = (uint64_t *)(base + off_queues);
    p.capacity = cap;
    p.max_procs = procs;
    p.max_queues = queues;
    p.fd = -1;
    struct numbers n;
    derive(&p, &n);
    PyBuffer_Release(&b);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsdsdsKsK}", "min_nr", n.min_nr, "curr_nr", n.curr_nr, "arena_shared",
                         n.arena_shared, "arena_cached", n.arena_cached, "in_use", n.in_use, "queued", n.queued,
                         "parked", n.parked, "nr_waiters", n.nr_waiters, "status", n.status, "reserve_low_water",
                         n.low_water, "longest_sleep", (double)n.longest_sleep_ns / 1e9, "total_sleep",
                         (double)n.total_sleep_ns / 1e9, "attached", n.attached, "published", n.published);
}

static PyMethodDef module_methods[] = {
    {"set_classes", mod_set_classes, METH_VARARGS, "(format, destroyed, invalid, closed, poison_warning, gfp_warning)"},
    {"set_logger", mod_set_logger, METH_O, "(logger): where the core says what operators should know"},
    {"set_gfp", mod_set_gfp, METH_VARARGS, "(valid_mask, wait_bit, zero_bit)"},
    {"may_sleep", mod_may_sleep, METH_O, "may_sleep(gfp) -> bool"},
    {"seconds", mod_seconds, METH_O, "seconds(timeout) -> float or None: the timeout checked"},
    {"after_fork_in_child", mod_after_fork_in_child, METH_NOARGS, "per-process state of a forked child"},
    {"crash_at", mod_crash_at, METH_VARARGS, "crash_at(point, stop=False): SIGKILL (or SIGSTOP once) this process at that point (tests)"},
    {"set_retry", mod_set_retry, METH_VARARGS, "(alloc_ns, queue_ns): retry periods of unwoken sleepers (tests)"},
    {"retry", mod_retry, METH_NOARGS, "() -> (alloc_ns, queue_ns)"},
    {"derive", mod_derive, METH_VARARGS, "(meta, capacity, max_procs, max_queues, off_words, off_procs, off_queues)"},
    {"owner_handle", mod_owner_handle, METH_O, "(a) -> the handle an owning array is over, or None"},
    {"owner_ref", mod_owner_ref, METH_O, "(a) -> (pool, handle, offset) of an owning array's element, or None"},
    {"send_reference", mod_send_reference, METH_O, "(a) -> (pool, handle, holder, offset), marked given; or None"},
    {NULL},
};

static struct PyModuleDef coremodule = {PyModuleDef_HEAD_INIT, "shmpool._core", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    if (core_type_init() < 0 || methods_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    PyObject *type = PyType_FromSpec(&CoreSpec);
    if (!type || PyModule_AddObject(m, "Core", type) < 0 || PyModule_AddStringConstant(m, "LAYOUT_HASH", LAYOUT_HASH) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    if (views_init(m) < 0 || queue_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *points = PyTuple_New(CP_N - 1);
    for (int i = 1; points && i < CP_N; i++) PyTuple_SET_ITEM(points, i - 1, PyUnicode_FromString(CRASH_POINTS[i]));
    if (!points || PyModule_AddObject(m, "CRASH_POINTS", points) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
