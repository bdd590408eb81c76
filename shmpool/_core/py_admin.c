/* py_admin.c: the Core's administrative methods (stats, reclaim, resize,
 * destroy, faults), and this process's place in the registry (register,
 * bind, forget, detach). Each waits for the lock at most the admin bound,
 * then raises TimeoutError naming the holder.
 */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "py.h"

/* Elements taken back from dead processes: said to the logger. */
static void log_reclaimed(Core *f, uint64_t n, const char *by) {
    if (n && log_msg(LOG_WARNING, "pool '%s': %s took back %llu element%s held by processes that died", f->p.name, by,
                     (unsigned long long)n, n == 1 ? "" : "s") < 0)
        PyErr_WriteUnraisable(NULL);
}

static PyObject *run_admin(Core *f, struct call *c, const char *what) {
    int r = run_call(f, c);
    if (r == RC_OK) return Py_NewRef(Py_None);
    return raise_for(f, r, what);
}

#define ADMIN_CALL(var, step)                                                                                         \
    struct call var;                                                                                                  \
    call_init(&var, step, BOUND_ADMIN, -1)

/* stats() -> dict of the pool's numbers (derive.c), under the lock. */
static PyObject *Core_stats(Core *f, PyObject *unused) {
    if (enter(f) < 0) return NULL;
    struct numbers n;
    ADMIN_CALL(c, step_stats);
    c.snapshot = (uint64_t *)&n;
    PyObject *res = run_admin(f, &c, "stats");
    if (!res) return leave_with(f, NULL);
    Py_DECREF(res);
    double rate;
    memcpy(&rate, &n.fail_rate_bits, 8);
    return leave_with(f, Py_BuildValue(
        "{sKsKsKsKsKsKsdsKsOsKsKsKsKsKsKsKsKsKsKsKsdsdsKsK}", "min_nr", n.min_nr, "curr_nr", n.curr_nr, "arena_free",
        n.arena_shared + n.arena_cached, "in_use", n.in_use, "queued", n.queued, "nr_waiters", n.nr_waiters,
        "fail_rate", rate, "seed", n.seed, "poison", (n.flags & FLAG_POISON) ? Py_True : Py_False,
        "alloc_arena", n.counters[0], "alloc_reserve", n.counters[1], "alloc_failed", n.counters[2], "free_reserve",
        n.counters[3], "free_arena", n.counters[4], "sleeps", n.counters[5], "faults_injected", n.counters[6],
        "poison_errors", n.counters[7], "lock_recoveries", n.counters[8], "reclaimed", n.counters[9], "reserve_low_water", n.low_water,
        "longest_sleep", (double)n.longest_sleep_ns / 1e9, "total_sleep", (double)n.total_sleep_ns / 1e9, "attached",
        n.attached, "published", n.published));
}

/* reclaim() -> how many held elements came back from dead processes. */
static PyObject *Core_reclaim(Core *f, PyObject *unused) {
    if (enter(f) < 0) return NULL;
    ADMIN_CALL(c, step_reclaim);
    PyObject *res = run_admin(f, &c, "reclaim_dead");
    if (!res) return leave_with(f, NULL);
    Py_DECREF(res);
    log_reclaimed(f, c.a, "reclaim_dead");
    return leave_with(f, PyLong_FromUnsignedLongLong(c.a));
}

/* resize(new_min_nr, gfp): mempool_resize; gfp is checked, and otherwise
 * unused (it never sleeps). A growing resize refills in batches, each one
 * lock hold. */
static PyObject *Core_resize(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    int64_t new_min;
    int sleeps;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "resize(new_min_nr, gfp)");
        return NULL;
    }
    if (conv_gfp(args[1], &sleeps) < 0 || conv_count(args[0], "new_min_nr", 1, (int64_t)f->p.capacity, &new_min) < 0 ||
        enter(f) < 0)
        return NULL;
    ADMIN_CALL(c, step_resize);
    c.a = (uint64_t)new_min;
    PyObject *res = run_admin(f, &c, "resize");
    while (res && c.b) {
        Py_DECREF(res);
        uint64_t grow = c.b;
        ADMIN_CALL(g, step_resize_grow);
        g.b = grow;
        g.n = 1024; /* elements a lock hold */
        res = run_admin(f, &g, "resize");
        c.b = g.b;
    }
    return leave_with(f, res);
}

/* destroy(force) -> None (the status says destroyed, every sleeper of
 * every process woken), or (lent, curr_nr, min_nr) if refused. */
static PyObject *Core_destroy(Core *f, PyObject *arg) {
    int force = PyObject_IsTrue(arg);
    if (force < 0 || enter(f) < 0) return NULL;
    ADMIN_CALL(c, step_destroy);
    int64_t bad[64];
    c.a = (uint64_t)force;
    c.dst = bad;
    c.n = 64;
    int r = run_call(f, &c);
    if (r == RC_DESTROYED) {
        PyErr_Format(ErrDestroyed, "pool '%s' was destroyed already", f->p.name);
        return leave_with(f, NULL);
    }
    if (r != RC_OK) return leave_with(f, raise_for(f, r, "destroy"));
    if (c.out[3]) return leave_with(f, Py_BuildValue("KKK", c.out[0], c.out[1], c.out[2]));
    wake_everyone(&f->p);
    for (int64_t i = 0; i < c.moved && i < c.n; i++) /* destroyed: a warning that raises is the caller's to see */
        if (PyErr_WarnFormat(WarnPoison, 1, "pool '%s': reserved element in slot %lld was written after it was freed "
                             "(found when the pool was destroyed)", f->p.name, (long long)bad[i]) < 0)
            return leave_with(f, NULL);
    if (c.moved > c.n && PyErr_WarnFormat(WarnPoison, 1, "pool '%s': %lld more reserved elements were written after "
                                          "they were freed", f->p.name, (long long)(c.moved - c.n)) < 0)
        return leave_with(f, NULL);
    return leave_with(f, Py_NewRef(Py_None));
}

/* set_faults(rate, seed): the arena's injected failure rate (checked by
 * the caller: 0 to 1) and, unless seed is None, a seed that restarts it. */
static PyObject *Core_set_faults(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_faults(rate, seed)");
        return NULL;
    }
    double rate = PyFloat_AsDouble(args[0]);
    unsigned long long seed = args[1] == Py_None ? 0 : PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred() || enter(f) < 0) return NULL;
    ADMIN_CALL(c, step_set_faults);
    memcpy(&c.a, &rate, 8);
    c.b = (uint64_t)llround(rate * 9007199254740992.0); /* 2**53: draws are 53-bit fractions */
    c.out[0] = args[1] != Py_None;
    c.out[1] = seed;
    return leave_with(f, run_admin(f, &c, "set_fail_rate"));
}

/* format(min_nr): create's pre-fill; nobody else sees the pool yet. */
static PyObject *Core_format(Core *f, PyObject *arg) {
    int64_t min_nr;
    if (conv_count(arg, "min_nr", 1, (int64_t)f->p.capacity, &min_nr) < 0 || enter(f) < 0) return NULL;
    int r = format_reserve(&f->p, (uint64_t)min_nr);
    return leave_with(f, r == RC_OK ? Py_NewRef(Py_None) : raise_for(f, r, "create"));
}

/* register(fd, pid, start) -> (index, epoch): give this process an entry
 * (see registry.c). OSError(EUSERS) if every entry belongs to a live
 * process; TimeoutError if the lock does not come within the admin bound
 * (the entry is then left to be retired). */
static PyObject *Core_register(Core *f, PyObject *args) {
    int fd;
    unsigned long long pid, start;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &pid, &start) || enter(f) < 0) return NULL;
    int64_t index;
    if (registry_claim(&f->p, fd, &index) != RC_OK) {
        PyObject *msg = PyUnicode_FromFormat("pool '%s' has %llu processes attached already (max_processes)",
                                             f->p.name, (unsigned long long)f->p.max_procs);
        PyObject *exc = msg ? PyObject_CallFunction(PyExc_OSError, "iO", EUSERS, msg) : NULL;
        Py_XDECREF(msg);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return leave_with(f, NULL);
    }
    ADMIN_CALL(c, step_register);
    c.a = pid;
    c.b = start;
    PyObject *res = run_admin(f, &c, "attach");
    if (!res) {
        registry_unclaim(&f->p);
        return leave_with(f, NULL);
    }
    Py_DECREF(res);
    log_reclaimed(f, (uint64_t)c.n, "attach");
    return leave_with(f, Py_BuildValue("LK", (long long)index, (unsigned long long)(f->p.token >> 16)));
}

/* bind(fd, index, epoch) -> whether this process's entry is still ours. */
static PyObject *Core_bind(Core *f, PyObject *args) {
    int fd;
    long long index;
    unsigned long long epoch;
    if (!PyArg_ParseTuple(args, "iLK", &fd, &index, &epoch)) return NULL;
    if (!f->p.hdr) return closed_error(f);
    return PyBool_FromLong(registry_bind(&f->p, fd, index, epoch));
}

/* forget(why=None): this object has no entry (a forked child, before it
 * registers); `why`, an exception, is raised by every later call. */
static PyObject *Core_forget(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    registry_forget(&f->p);
    Py_XSETREF(f->unusable, nargs > 0 && args[0] != Py_None ? Py_NewRef(args[0]) : NULL);
    Py_RETURN_NONE;
}

/* detach() -> True if this process's entry was vacated (it holds no
 * element); False if it holds some, or the lock did not come. */
static PyObject *Core_detach(Core *f, PyObject *unused) {
    if (!f->p.hdr || !f->p.entry) Py_RETURN_FALSE;
    f->busy++;
    ADMIN_CALL(c, step_detach);
    int r = run_call(f, &c);
    if (r == RC_SIGNAL) return leave_with(f, NULL);
    PyErr_Clear();
    if (r == RC_OK && c.a) registry_forget(&f->p);
    return leave_with(f, PyBool_FromLong(r == RC_OK && c.a));
}

/* leave() -> (destroyed, taken): this process lets go of the pool (step_leave);
 * destroyed: it was the last, every sleeper is woken (the caller unlinks). */
static PyObject *Core_leave(Core *f, PyObject *unused) {
    if (!f->p.hdr || f->p.closing || !f->p.entry) return closed_error(f);
    if (enter(f) < 0) return NULL;
    ADMIN_CALL(c, step_leave);
    int r = run_call(f, &c);
    if (r == RC_INVALID) {
        PyErr_SetString(PyExc_RuntimeError, f->p.msg);
        return leave_with(f, NULL);
    }
    if (r != RC_OK) return leave_with(f, raise_for(f, r, "leave"));
    if (c.out[0]) wake_everyone(&f->p);
    registry_forget(&f->p);
    return leave_with(f, Py_BuildValue("NK", PyBool_FromLong((long)c.out[0]), (unsigned long long)c.a));
}

/* drain_cache() -> True if this process's cache went back to the shared
 * free list (close, a trace being set). */
static PyObject *Core_drain_cache(Core *f, PyObject *unused) {
    if (!f->p.hdr || !f->p.entry) Py_RETURN_FALSE;
    f->busy++;
    ADMIN_CALL(c, step_drain_cache);
    int r = run_call(f, &c);
    if (r == RC_SIGNAL) return leave_with(f, NULL);
    PyErr_Clear();
    return leave_with(f, PyBool_FromLong(r == RC_OK));
}

/* hold(timeout=None) / unhold(): the pool lock held across Python code by
 * this process, as a recorded holder (shmpool.testing.hold_lock), with the
 * reserve's places gathered into its stack (lent again at unhold). */
static PyObject *Core_hold(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    int64_t ns = -1;
    if ((nargs > 0 && conv_timeout(args[0], &ns) < 0) || enter(f) < 0) return NULL;
    int r = lock_acquire(&f->p, deadline_in(ns), -1);
    if (r == RC_OK) { /* every reserve place back in the stack while it is held: views show the kernel's one stack */
        places_reclaim_all(&f->p); /* (damage it finds, the next call reports) */
        f->p.relend = 1;
    }
    if (r == RC_TIMEOUT) return leave_with(f, raise_busy(f, "hold_lock"));
    return leave_with(f, r == RC_OK ? Py_NewRef(Py_None) : raise_for(f, r, "hold_lock"));
}

static PyObject *Core_unhold(Core *f, PyObject *unused) {
    if (enter(f) < 0) return NULL;
    if (!lock_held_by_us(&f->p)) {
        PyErr_SetString(PyExc_RuntimeError, "this process does not hold the pool lock");
        return leave_with(f, NULL);
    }
    leave(&f->p);
    wake_pending(&f->p);
    return leave_with(f, Py_NewRef(Py_None));
}

#define M(name, fn, flags, doc) {name, (PyCFunction)(void (*)(void))fn, flags, doc}
PyMethodDef Core_admin_methods[] = {
    M("stats", Core_stats, METH_NOARGS, "() -> dict: a consistent snapshot"),
    M("reclaim", Core_reclaim, METH_NOARGS, "() -> elements taken back from dead processes"),
    M("resize", Core_resize, METH_FASTCALL, "(new_min_nr, gfp)"),
    M("destroy", Core_destroy, METH_O, "(force) -> None, or (lent, curr_nr, min_nr) if refused"),
    M("set_faults", Core_set_faults, METH_FASTCALL, "(rate, seed)"),
    M("format", Core_format, METH_O, "(min_nr)"),
    M("register", Core_register, METH_VARARGS, "(fd, pid, start) -> (index, epoch)"),
    M("bind", Core_bind, METH_VARARGS, "(fd, index, epoch) -> bool"),
    M("forget", Core_forget, METH_FASTCALL, "(why=None)"),
    M("detach", Core_detach, METH_NOARGS, "() -> bool"),
    M("leave", Core_leave, METH_NOARGS, "() -> (destroyed, taken)"),
    M("drain_cache", Core_drain_cache, METH_NOARGS, "() -> bool"),
    M("hold", Core_hold, METH_FASTCALL, "(timeout=None): take the pool lock (tests)"),
    M("unhold", Core_unhold, METH_NOARGS, "release it"),
    {NULL},
};
