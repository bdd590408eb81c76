/* py_views.c: zero-copy views of an element, made in C.
 *
 * buffer(h) is a slice of a memoryview of the slots; ndarray(h, dtype,
 * shape) a numpy array over the slot whose base is that memoryview. Either
 * keeps the mapping alive after close(). The handle is checked with one load
 * of its slot word without the lock: the caller holds it, so nobody else may
 * change that word (a stale or freed handle is refused, as by free).
 *
 * array(h, dtype, shape) is the same view, owning: its base is an Owner,
 * which holds the pool object and the memoryview, and whose deallocation
 * (when the last array or view over the element is gone) frees the element
 * if this process still holds it (free_owned). An owning array handed to
 * free() or a queue's put() is marked given: its finalizer then frees
 * nothing. numpy points every view's base at the Owner, so owner_of finds
 * it in one step.
 */
#include <string.h>

#include "py.h"

/* Whether SHARED word w's views are read-only: published to a topic (its
 * subscribers read it), not held by a share group (whose members hold it
 * as its holder did). T_OVERFLOW is set once, when the topic is made. */
static int read_only(const struct pool *p, uint64_t w) {
    uint64_t t = W_OWNER(w) - 1;
    return !(p->topics && t < MAX_TOPICS && ld(&TOPIC(p, t)[T_OVERFLOW]) == OVERFLOW_SHARE);
}

/* The slot of a handle this object may view, or -1 with the error. A
 * shared element (published to a topic) may be viewed too, read-only:
 * *shared says so (held by a share group: writable, as a held one). */
static int64_t viewable_as(Core *f, PyObject *handle, int *shared) {
    uint64_t idx, gen;
    if (!f->p.hdr || f->p.closing || !f->data_mv) {
        closed_error(f);
        return -1;
    }
    if (!decode_fast(f, handle, &idx, &gen) && conv_handle(f, handle, &idx, &gen) < 0) return -1;
    uint64_t w = ld(&f->p.words[idx]);
    int ok = W_STATE(w) == ST_HELD || W_STATE(w) == ST_SHARED;
    *shared = W_STATE(w) == ST_SHARED && read_only(&f->p, w);
    if (!ok || W_GEN(w) != gen) {
        describe(&f->p, w, gen);
        raise_invalid(f, idx | gen << HGEN_SHIFT);
        return -1;
    }
    return (int64_t)idx;
}

/* The slot of a held element (not a shared one), or -1 with the error. */
static int64_t viewable(Core *f, PyObject *handle) {
    int shared;
    int64_t idx = viewable_as(f, handle, &shared);
    if (idx >= 0 && shared) {
        PyErr_SetString(PyExc_ValueError, "a shared element (published to a topic) is read-only");
        return -1;
    }
    return idx;
}

PyObject *Core_buffer(Core *f, PyObject *handle) {
    int shared;
    int64_t idx = viewable_as(f, handle, &shared);
    if (idx < 0) return NULL;
    Py_ssize_t off = (Py_ssize_t)((uint64_t)idx * f->p.stride);
    PyObject *mv = PySequence_GetSlice(f->data_mv, off, off + (Py_ssize_t)f->p.slot_size);
    if (!mv || !shared) return mv;
    PyObject *ro = PyObject_CallMethod(mv, "toreadonly", NULL); /* several subscribers read it */
    Py_DECREF(mv);
    return ro;
}

static PyArray_Descr *descr_of(Core *f, PyObject *dtype) {
    PyArray_Descr *d = NULL;
    if (dtype == Py_None) return PyArray_DescrFromType(NPY_UINT8);
    if (dtype == f->last_dtype && f->last_descr) {
        Py_INCREF(f->last_descr);
        return (PyArray_Descr *)f->last_descr;
    }
    if (!PyArray_DescrConverter(dtype, &d)) return NULL;
    if (PyDataType_REFCHK(d)) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_TypeError, "a slot cannot hold Python objects (dtype has object fields)");
        return NULL;
    }
    if (PyDataType_ELSIZE(d) < 1) {
        PyErr_Format(PyExc_ValueError, "dtype %R has no size", (PyObject *)d);
        Py_DECREF(d);
        return NULL;
    }
    Py_XSETREF(f->last_dtype, Py_NewRef(dtype));
    Py_XSETREF(f->last_descr, Py_NewRef((PyObject *)d));
    return d;
}

/* The dimensions of `shape` (None: as many items as fit; an int; or a
 * sequence of ints) for items of `item` bytes in a slot: nd, or -1. */
static int dims_of(Core *f, PyObject *shape, Py_ssize_t item, npy_intp *dims) {
    uint64_t slot = f->p.slot_size;
    if (shape == Py_None) {
        dims[0] = (npy_intp)(slot / (uint64_t)item);
        return 1;
    }
    PyObject *seq = PyIndex_Check(shape) ? PyTuple_Pack(1, shape) : PySequence_Fast(shape, "shape must be an int or a "
                                                                                           "sequence of ints");
    if (!seq) return -1;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(seq);
    uint64_t total = 1;
    int neg = 0, big = 0;
    if (nd > NPY_MAXDIMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "shape has %zd dimensions, more than %d", nd, NPY_MAXDIMS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        PyObject *d = PySequence_Fast_GET_ITEM(seq, i);
        if (PyBool_Check(d) || !PyIndex_Check(d)) {
            PyErr_Format(PyExc_TypeError, "shape entry must be an int, not %.100s", Py_TYPE(d)->tp_name);
            Py_DECREF(seq);
            return -1;
        }
        Py_ssize_t v = PyNumber_AsSsize_t(d, NULL);
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        dims[i] = (npy_intp)v;
        if (v < 0) neg = 1;
        else if (v && total > slot / (uint64_t)v) big = 1;
        else total *= (uint64_t)v;
    }
    if (neg || big || total * (uint64_t)item > slot) {
        PyObject *t = PySequence_Tuple(seq);
        if (neg) PyErr_Format(PyExc_ValueError, "shape %R has a negative dimension", t);
        else PyErr_Format(PyExc_ValueError, "%R needs more than the %llu bytes of a slot", t, (unsigned long long)slot);
        Py_XDECREF(t);
        Py_DECREF(seq);
        return -1;
    }
    Py_DECREF(seq);
    return (int)nd;
}

/* ------------------------------------------------------------------ */
/* Owners                                                              */

static PyTypeObject *OwnerType;

static void Owner_dealloc(PyObject *self) {
    Owner *o = (Owner *)self;
    if (!o->given && o->core) free_owned(o->core, o->handle);
    Py_XDECREF(o->core);
    Py_XDECREF(o->mv);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyType_Slot Owner_slots[] = {
    {Py_tp_dealloc, (void *)Owner_dealloc},
    {Py_tp_doc, "the element behind an owning array: freed when the last array over it goes, if still held"},
    {0, NULL},
};
static PyType_Spec OwnerSpec = {"shmpool._core.Owner", sizeof(Owner), 0, Py_TPFLAGS_DEFAULT, Owner_slots};

int views_init(PyObject *module) {
    OwnerType = (PyTypeObject *)PyType_FromSpec(&OwnerSpec);
    if (!OwnerType) return -1;
    Py_INCREF(OwnerType);
    return PyModule_AddObject(module, "Owner", (PyObject *)OwnerType);
}

/* The Owner behind array o (borrowed), or NULL (no error set). */
Owner *owner_of(PyObject *o) {
    if (!OwnerType || !PyArray_Check(o)) return NULL;
    PyObject *base = PyArray_BASE((PyArrayObject *)o);
    while (base && PyArray_Check(base)) base = PyArray_BASE((PyArrayObject *)base);
    return base && Py_TYPE(base) == OwnerType ? (Owner *)base : NULL;
}

/* send_reference(a) -> (pool name, handle, holder, offset) of the element
 * an owning array (or a view of one) is over, if this process holds it,
 * and marks it given (its finalizer frees nothing: the element is its
 * sender's until a receiver adopts it from this holder); or None. */
PyObject *mod_send_reference(PyObject *m, PyObject *o) {
    Owner *ow = owner_of(o);
    if (!ow || !ow->core || !ow->core->p.hdr || ow->core->p.closing) Py_RETURN_NONE;
    Core *f = ow->core;
    uint64_t idx = ow->handle & INDEX_MASK;
    if (!held_as(ld(&f->p.words[idx]), ow->handle >> HGEN_SHIFT, f->p.me))
        Py_RETURN_NONE; /* not ours to send: it pickles as any array */
    char *start = (char *)f->p.data + idx * f->p.stride, *at = PyArray_BYTES((PyArrayObject *)o);
    ow->given = 1;
    return Py_BuildValue("sKKn", f->p.name, (unsigned long long)ow->handle, (unsigned long long)f->p.me,
                         (Py_ssize_t)(at - start));
}

/* owner_ref(a) -> (pool name, handle, offset) of the element an owning
 * array (or a view of one) is over, whoever holds it now, or None. Nothing
 * is marked: for a sender that keeps its reference (shmpool.dask). */
PyObject *mod_owner_ref(PyObject *m, PyObject *o) {
    Owner *ow = owner_of(o);
    if (!ow || !ow->core || !ow->core->p.hdr || ow->core->p.closing) Py_RETURN_NONE;
    Core *f = ow->core;
    char *start = (char *)f->p.data + (ow->handle & INDEX_MASK) * f->p.stride, *at = PyArray_BYTES((PyArrayObject *)o);
    return Py_BuildValue("sKn", f->p.name, (unsigned long long)ow->handle, (Py_ssize_t)(at - start));
}

/* owner_handle(a) -> the handle of the element an owning array (or any view
 * of one) is over, or None. */
PyObject *mod_owner_handle(PyObject *m, PyObject *o) {
    Owner *ow = owner_of(o);
    if (!ow) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(ow->handle);
}

static PyObject *make_view(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int own);

PyObject *Core_ndarray(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return make_view(f, args, nargs, kwnames, 0);
}

PyObject *Core_array(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return make_view(f, args, nargs, kwnames, 1);
}

/* ------------------------------------------------------------------ */
/* Descriptors: the dtype and shape alloc_array records with an element  */

/* describe(handle, code, dims): record dtype code (numpy's dtype.str, 1 to
 * 8 bytes) and dims (up to DESC_MAX_DIMS ints) for an element this process
 * holds (checked by the caller to fit the slot). */
PyObject *Core_describe(Core *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "describe(handle, code: bytes, dims: tuple)");
        return NULL;
    }
    Py_ssize_t clen = PyBytes_GET_SIZE(args[1]), nd = PyTuple_GET_SIZE(args[2]);
    if (clen < 1 || clen > 8 || nd > (Py_ssize_t)DESC_MAX_DIMS) {
        PyErr_SetString(PyExc_ValueError, "a descriptor holds a dtype code of 1 to 8 bytes and at most 4 dimensions");
        return NULL;
    }
    uint32_t dims[DESC_MAX_DIMS] = {0};
    for (Py_ssize_t i = 0; i < nd; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[2], i));
        if (PyErr_Occurred()) return NULL;
        if (v > 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_ValueError, "a dimension beyond 2**32-1");
            return NULL;
        }
        dims[i] = (uint32_t)v;
    }
    int64_t idx = viewable(f, args[0]);
    if (idx < 0) return NULL;
    uint64_t w = ld(&f->p.words[idx]), *d = f->p.desc + (uint64_t)idx * DESC_WORDS, code = 0;
    if (!held_as(w, W_GEN(w), f->p.me)) {
        PyErr_SetString(PyExc_ValueError, "the element is held by another process");
        return NULL;
    }
    memcpy(&code, PyBytes_AS_STRING(args[1]), (size_t)clen);
    st(&d[D_DTYPE], code);
    memcpy(&d[D_DIMS], dims, sizeof dims);
    __atomic_store_n(&d[D_GEN], W_GEN(w) << 8 | DESC_SET | (uint64_t)nd, __ATOMIC_RELEASE); /* last */
    Py_RETURN_NONE;
}

/* The recorded dtype and dims of slot idx (its word w), if it has a
 * descriptor of its current generation: 1 (*descr new), 0 if none, -1 with
 * PoolFormatError for one that is damaged. */
static int recorded(Core *f, uint64_t idx, uint64_t w, PyArray_Descr **descr, npy_intp *dims, int *nd) {
    const uint64_t *d = f->p.desc + idx * DESC_WORDS;
    uint64_t g = __atomic_load_n(&d[D_GEN], __ATOMIC_ACQUIRE);
    if (!(g & DESC_SET) || g >> 8 != W_GEN(w)) return 0;
    uint64_t code = ld(&d[D_DTYPE]);
    char text[9] = {0};
    memcpy(text, &code, 8);
    uint32_t u[DESC_MAX_DIMS];
    memcpy(u, &d[D_DIMS], sizeof u);
    *nd = (int)(g & 0x7F);
    uint64_t total = 1;
    PyObject *s = *nd <= (int)DESC_MAX_DIMS ? PyUnicode_DecodeASCII(text, (Py_ssize_t)strlen(text), "strict") : NULL;
    PyErr_Clear();
    *descr = NULL;
    if (s && !PyArray_DescrConverter(s, descr)) PyErr_Clear();
    Py_XDECREF(s);
    for (int i = 0; *descr && i < *nd; i++) {
        dims[i] = (npy_intp)u[i];
        total = u[i] && total > f->p.slot_size / u[i] ? f->p.slot_size + 1 : total * u[i];
    }
    if (!*descr || PyDataType_REFCHK(*descr) || PyDataType_ELSIZE(*descr) < 1 ||
        total > f->p.slot_size / (uint64_t)PyDataType_ELSIZE(*descr)) {
        Py_XDECREF(*descr);
        PyErr_Format(ErrFormat, "pool '%s': the descriptor of slot %llu is damaged", f->p.name, (unsigned long long)idx);
        return -1;
    }
    return 1;
}

static PyObject *make_view(Core *f, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int own) {
    PyObject *handle = nargs >= 1 ? args[0] : NULL, *dtype = nargs >= 2 ? args[1] : Py_None;
    PyObject *shape = nargs >= 3 ? args[2] : Py_None;
    if (nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "ndarray() takes at most 3 arguments (handle, dtype, shape)");
        return NULL;
    }
    for (Py_ssize_t i = 0, nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0; i < nk; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "dtype") == 0 && nargs < 2) dtype = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "shape") == 0 && nargs < 3) shape = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "handle") == 0 && nargs < 1) handle = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "ndarray() got an unexpected keyword argument '%U'", key);
            return NULL;
        }
    }
    if (!handle) {
        PyErr_SetString(PyExc_TypeError, "ndarray() needs a handle");
        return NULL;
    }
    PyArray_Descr *descr = NULL;
    npy_intp dims[NPY_MAXDIMS];
    int nd = 0, found = 0, shared = 0;
    int64_t idx;
    if (dtype == Py_None && shape == Py_None) { /* the view alloc_array recorded, if any */
        if ((idx = viewable_as(f, handle, &shared)) < 0) return NULL;
        found = recorded(f, (uint64_t)idx, ld(&f->p.words[idx]), &descr, dims, &nd);
        if (found < 0) return NULL;
    }
    if (!found) {
        if (!(descr = descr_of(f, dtype))) return NULL;
        nd = dims_of(f, shape, PyDataType_ELSIZE(descr), dims);
        idx = nd < 0 ? -1 : viewable_as(f, handle, &shared);
        if (idx < 0) {
            Py_DECREF(descr);
            return NULL;
        }
    }
    char *ptr = (char *)f->p.data + (uint64_t)idx * f->p.stride;
    PyObject *base = Py_NewRef(f->data_mv);
    if (own) {
        Owner *o = PyObject_New(Owner, OwnerType);
        if (!o) {
            Py_DECREF(base);
            Py_DECREF(descr);
            return NULL;
        }
        o->core = (Core *)Py_NewRef((PyObject *)f);
        o->mv = base;
        o->handle = (uint64_t)idx | (ld(&f->p.words[idx]) >> GEN_SHIFT & GEN_MASK) << HGEN_SHIFT;
        o->given = 0;
        base = (PyObject *)o;
    }
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, ptr,
                                         shared ? NPY_ARRAY_CARRAY_RO : NPY_ARRAY_CARRAY, NULL);
    if (!arr) {
        if (own) ((Owner *)base)->given = 1; /* its element stays held: the caller still has the handle */
        Py_DECREF(base);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, base) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}
