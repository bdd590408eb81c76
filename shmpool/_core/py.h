/* py.h: what the files that include Python.h share (py_*.c: the module,
 * the type, its methods, views and argument checks). The core's transitions
 * are in the files that do not include it (pool.h); these only turn Python
 * arguments into C values, run one call of the core, and turn its result
 * into a Python object or exception, after the lock is released.
 *
 * Arguments are checked once, here: converters for a handle, handles, a
 * gfp mask, a timeout and a count (py_convert.c) raise the TypeError or
 * ValueError that says what is wrong. A valid call stays in C until it
 * returns; nothing calls back into shmpool's Python code.
 */
#ifndef SHMPOOL_PY_H
#define SHMPOOL_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL shmpool_ARRAY_API
#ifndef SHMPOOL_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "pool.h"

typedef struct {
    PyObject_HEAD
    struct pool p;
    Py_buffer view;           /* the mapping, held while the object is open */
    int have_view;
    int busy;                 /* calls under way (the mapping goes when the last returns after close) */
    int async_pending;        /* alloc_async registrations not yet counted out (close counts them out) */
    PyObject *trace;          /* trace(event, handle, curr_nr), or NULL */
    PyObject *unusable;       /* why this object may not be used (a forked child that could not register) */
    PyObject *data_mv;        /* a memoryview of the slots: views are cut from it and keep the mapping */
    PyObject *last_dtype;     /* the dtype ndarray() saw last, and its descr */
    PyObject *last_descr;
    uint64_t logged_recoveries; /* takeovers already said to the logger */
} Core;

extern PyObject *ErrFormat, *ErrDestroyed, *ErrInvalid, *ErrClosed, *WarnPoison, *WarnGFP;
extern PyType_Spec CoreSpec;
extern PyMethodDef Core_methods[];
extern uint64_t gfp_valid, gfp_wait, gfp_zero; /* from gfp.py, at import */
extern int64_t retry_alloc_ns, retry_queue_ns; /* SLEEP_RETRY_NS, QUEUE_RETRY_NS; tests lengthen them */

/* Entering and leaving a call: a closed object refuses, and its mapping
 * lives until the last call under way returns. */
PyObject *closed_error(Core *f);
void release_view(Core *f);
static inline int enter(Core *f) {
    if (f->unusable || !f->p.hdr || f->p.closing) {
        closed_error(f);
        return -1;
    }
    f->busy++;
    return 0;
}
/* The `shmpool` logger (py_module.c): logging's levels, a message. */
enum { LOG_INFO = 20, LOG_WARNING = 30, LOG_ERROR = 40 };
int log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_takeovers(Core *f);
static inline PyObject *leave_with(Core *f, PyObject *result) {
    if (f->p.recoveries != f->logged_recoveries) log_takeovers(f);
    if (--f->busy == 0 && f->p.closing) release_view(f);
    return result;
}

/* The Python exception for a result code (no lock held). `what` names the
 * call for a timeout ("no element within 2 s", ...). */
PyObject *raise_for(Core *f, int r, const char *what);
PyObject *raise_invalid(Core *f, uint64_t handle);
PyObject *raise_busy(Core *f, const char *call);

/* convert.c */
int conv_timeout(PyObject *o, int64_t *ns);                 /* None: -1 */
int conv_gfp(PyObject *o, int *sleeps);
int conv_handle(Core *f, PyObject *o, uint64_t *idx, uint64_t *gen);
int conv_count(PyObject *o, const char *what, int64_t lo, int64_t hi, int64_t *out);
int64_t *conv_handles(Core *f, PyObject *o, int64_t *n, int64_t *stack, int64_t stack_n);
int conv_name(PyObject *o, const char *what, char *padded); /* a queue's or topic's name: QUEUE_NAME_BYTES */
int decode_fast(Core *f, PyObject *o, uint64_t *idx, uint64_t *gen); /* an exact int in range, or 0 */

/* py_alloc.c: run() with the Python side's `after` (poison
 * warnings, trace), and the elements a failed call gives back */
int run_call(Core *f, struct call *c);
void give_back(Core *f, const int64_t *handles, int64_t n);
void free_owned(Core *f, uint64_t handle);                   /* an owning array's finalizer */
PyObject *handles_array(const int64_t *src, int64_t n);
void forget_zero_warning(void);

/* py_views.c */
typedef struct {
    PyObject_HEAD
    Core *core;                /* the pool object that frees it */
    PyObject *mv;              /* the slots' memoryview: keeps the mapping alive */
    uint64_t handle;
    int given;                 /* freed or put through the array: its finalizer frees nothing */
} Owner;
PyObject *Core_buffer(Core *f, PyObject *handle);
PyObject *Core_ndarray(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
PyObject *Core_array(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
PyObject *Core_describe(Core *f, PyObject *const *args, Py_ssize_t nargs);
PyObject *mod_owner_handle(PyObject *m, PyObject *o);
PyObject *mod_owner_ref(PyObject *m, PyObject *o);
PyObject *mod_send_reference(PyObject *m, PyObject *o);
Owner *owner_of(PyObject *o);
int views_init(PyObject *module);

/* py_queue.c */
int queue_init(PyObject *module); /* the Port type, queue.Full and queue.Empty */

#endif
