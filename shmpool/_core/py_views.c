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
#include "py.h"

/* The slot of a handle this object may view, or -1 with the error. */
static int64_t viewable(Core *f, PyObject *handle) {
    uint64_t idx, gen;
    if (!f->p.hdr || f->p.closing || !f->data_mv) {
        closed_error(f);
        return -1;
    }
    if (!decode_fast(f, handle, &idx, &gen) && conv_handle(f, handle, &idx, &gen) < 0) return -1;
    uint64_t w = ld(&f->p.words[idx]);
    if (W_STATE(w) != ST_HELD || W_GEN(w) != gen) {
        describe(&f->p, w, gen);
        raise_invalid(f, idx | gen << HGEN_SHIFT);
        return -1;
    }
    return (int64_t)idx;
}

PyObject *Core_buffer(Core *f, PyObject *handle) {
    int64_t idx = viewable(f, handle);
    if (idx < 0) return NULL;
    Py_ssize_t off = (Py_ssize_t)((uint64_t)idx * f->p.stride);
    return PySequence_GetSlice(f->data_mv, off, off + (Py_ssize_t)f->p.slot_size);
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
    PyArray_Descr *descr = descr_of(f, dtype);
    if (!descr) return NULL;
    npy_intp dims[NPY_MAXDIMS];
    int nd = dims_of(f, shape, PyDataType_ELSIZE(descr), dims);
    int64_t idx = nd < 0 ? -1 : viewable(f, handle);
    if (idx < 0) {
        Py_DECREF(descr);
        return NULL;
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
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, ptr, NPY_ARRAY_CARRAY, NULL);
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
