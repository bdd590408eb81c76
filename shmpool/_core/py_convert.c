/* convert.c: every argument the core takes from Python, checked once.
 *
 * Each converter accepts what the documented signature accepts and raises
 * the error that says what is wrong (TypeError for a wrong type, ValueError
 * for a wrong value, InvalidHandleError for a handle named twice); the core
 * is reached only with valid values.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "py.h"

uint64_t gfp_valid = 0xEFDFFF, gfp_wait = 0x10, gfp_zero = 0x8000;
static int zero_warned = 0;
void forget_zero_warning(void) { zero_warned = 0; }

/* A timeout in seconds (None: -1): a number >= 0, finite; a huge one waits
 * as long as asked (clamped to MAX_WAIT_NS, about 146 years). */
int conv_timeout(PyObject *o, int64_t *ns) {
    if (o == Py_None) {
        *ns = -1;
        return 0;
    }
    double s;
    if (PyBool_Check(o)) goto type;
    if (PyLong_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred()) return -1;
        s = overflow > 0 ? 1e300 : overflow < 0 ? -1.0 : (double)v;
    } else {
        s = PyFloat_AsDouble(o);
        if (s == -1.0 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) return -1;
            PyErr_Clear();
            goto type;
        }
    }
    if (!(s >= 0) || !isfinite(s)) {
        PyErr_Format(PyExc_ValueError, "timeout must be a finite number of seconds >= 0, not %R", o);
        return -1;
    }
    *ns = s * 1e9 >= (double)MAX_WAIT_NS ? (int64_t)MAX_WAIT_NS : (int64_t)(s * 1e9);
    return 0;
type:
    PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds or None, not %.100s", Py_TYPE(o)->tp_name);
    return -1;
}

/* A GFP mask (an int: a GFP flag combination) with only Linux v3.2's bits:
 * whether it may sleep. The first mask with __GFP_ZERO warns, once per
 * process: elements are not zeroed. */
int conv_gfp(PyObject *o, int *sleeps) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "gfp must be a GFP flag combination (an int), not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long g = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (g == -1 && PyErr_Occurred()) return -1;
    if (overflow || g < 0 || ((uint64_t)g & ~gfp_valid)) {
        PyErr_Format(PyExc_ValueError, "gfp %R has bits that no Linux v3.2 GFP mask has (valid: 0x%llx)", o,
                     (unsigned long long)gfp_valid);
        return -1;
    }
    if (((uint64_t)g & gfp_zero) && !zero_warned) {
        zero_warned = 1;
        if (PyErr_WarnEx(WarnGFP,
                         "__GFP_ZERO is not supported: shmpool does not zero elements (a recycled element holds what "
                         "its last user wrote); clear the element yourself. Warned once per process.",
                         1) < 0)
            return -1;
    }
    *sleeps = ((uint64_t)g & gfp_wait) != 0;
    return 0;
}

/* An exact int naming a slot of this pool: 1 with idx and gen, else 0 (no
 * error set: the caller converts it properly). */
int decode_fast(Core *f, PyObject *o, uint64_t *idx, uint64_t *gen) {
    if (!PyLong_CheckExact(o)) return 0;
    int overflow = 0;
    long long h = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || h < 0) {
        PyErr_Clear();
        return 0;
    }
    *idx = (uint64_t)h & INDEX_MASK;
    *gen = (uint64_t)h >> HGEN_SHIFT;
    return *idx < f->p.capacity;
}

static int handle_value(Core *f, PyObject *o, int64_t *out) {
    if (PyBool_Check(o) || !PyIndex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a handle is an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(o);
    if (!i) return -1;
    int overflow = 0;
    long long h = PyLong_AsLongLongAndOverflow(i, &overflow);
    if (h == -1 && PyErr_Occurred()) {
        Py_DECREF(i);
        return -1;
    }
    if (overflow || h < 0) {
        PyErr_Format(PyExc_ValueError, "handle %S is out of range", i);
        Py_DECREF(i);
        return -1;
    }
    Py_DECREF(i);
    if (((uint64_t)h & INDEX_MASK) >= f->p.capacity) {
        PyErr_Format(PyExc_ValueError, "handle 0x%llx names slot %llu, beyond the capacity (%llu)", (unsigned long long)h,
                     (unsigned long long)((uint64_t)h & INDEX_MASK), (unsigned long long)f->p.capacity);
        return -1;
    }
    *out = h;
    return 0;
}

/* A handle of this pool (any int; its slot within the capacity). */
int conv_handle(Core *f, PyObject *o, uint64_t *idx, uint64_t *gen) {
    if (decode_fast(f, o, idx, gen)) return 0;
    Owner *ow = owner_of(o); /* an owning array stands for its element */
    int64_t h;
    if (ow) h = (int64_t)ow->handle;
    else if (handle_value(f, o, &h) < 0) return -1;
    *idx = (uint64_t)h & INDEX_MASK;
    *gen = (uint64_t)h >> HGEN_SHIFT;
    return 0;
}

/* An int from lo to hi. */
int conv_count(PyObject *o, const char *what, int64_t lo, int64_t hi, int64_t *out) {
    if (PyBool_Check(o) || !PyIndex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(o);
    if (!i) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be from %lld to %lld, not %R", what, (long long)lo, (long long)hi, o);
        return -1;
    }
    *out = v;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The index of a handle of h[0:n] whose slot an earlier one names, -1 if
 * none, -2 without memory. A bitmap of the slots when it is small beside
 * the batch (a bit per slot, O(n)), else a sort of the batch's slots. */
static int64_t slot_twice(const int64_t *h, int64_t n, uint64_t capacity) {
    int64_t twice = -1;
    if (capacity / 8 <= 64 * (uint64_t)n) {
        uint8_t *seen = PyMem_Calloc(capacity / 8 + 1, 1);
        if (!seen) return -2;
        for (int64_t i = 0; i < n && twice < 0; i++) {
            uint64_t ix = (uint64_t)h[i] & INDEX_MASK;
            if (ix >= capacity) continue; /* refused by the step */
            if (seen[ix >> 3] & (1u << (ix & 7))) twice = i;
            seen[ix >> 3] |= (uint8_t)(1u << (ix & 7));
        }
        PyMem_Free(seen);
        return twice;
    }
    uint64_t *ix = PyMem_Malloc((size_t)n * sizeof *ix);
    if (!ix) return -2;
    for (int64_t i = 0; i < n; i++) ix[i] = (uint64_t)h[i] & INDEX_MASK;
    qsort(ix, (size_t)n, sizeof *ix, cmp_u64);
    for (int64_t i = 1; i < n && twice < 0; i++)
        if (ix[i] == ix[i - 1])
            for (int64_t j = n; j-- > 0;)
                if (((uint64_t)h[j] & INDEX_MASK) == ix[i]) { twice = j; break; }
    PyMem_Free(ix);
    return twice;
}

/* Integer buffer formats, by struct code: their size and signedness. */
static int int_format(const char *fmt, int *is_signed) {
    if (!fmt) return 1; /* "B" */
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    if (fmt[0] == 0 || fmt[1] != 0) return 0;
    *is_signed = strchr("bhilqn", fmt[0]) != NULL;
    return strchr("bBhHiIlLqQnN", fmt[0]) != NULL;
}

static int64_t *from_buffer(Core *f, PyObject *o, Py_buffer *b, int64_t *n, int64_t *dst) {
    int is_signed = 0;
    if (!int_format(b->format, &is_signed)) {
        PyObject *dtype = PyObject_GetAttrString(o, "dtype"); /* a numpy array says what it holds */
        if (dtype) PyErr_Format(PyExc_TypeError, "handles must be integers, not %S", dtype);
        else {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "handles must be integers, not items of format %s", b->format ? b->format : "?");
        }
        Py_XDECREF(dtype);
        return NULL;
    }
    Py_ssize_t item = b->itemsize;
    for (int64_t i = 0; i < *n; i++) {
        const char *src = (const char *)b->buf + i * item;
        int64_t v = 0;
        uint64_t u = 0;
        int wide = 0;
        switch (item) {
        case 1: v = is_signed ? (int64_t) * (const int8_t *)src : (int64_t) * (const uint8_t *)src; break;
        case 2: v = is_signed ? (int64_t) * (const int16_t *)src : (int64_t) * (const uint16_t *)src; break;
        case 4: v = is_signed ? (int64_t) * (const int32_t *)src : (int64_t) * (const uint32_t *)src; break;
        default:
            memcpy(&u, src, 8);
            v = (int64_t)u;
            wide = !is_signed && (u >> 63);
        }
        if (v < 0 || ((uint64_t)v & INDEX_MASK) >= f->p.capacity) {
            if (wide) PyErr_Format(PyExc_ValueError, "handle %llu is out of range", (unsigned long long)u);
            else if (v < 0) PyErr_Format(PyExc_ValueError, "handle %lld is out of range", (long long)v);
            else
                PyErr_Format(PyExc_ValueError, "handle 0x%llx names slot %llu, beyond the capacity (%llu)",
                             (unsigned long long)v, (unsigned long long)((uint64_t)v & INDEX_MASK),
                             (unsigned long long)f->p.capacity);
            return NULL;
        }
        dst[i] = v;
    }
    return dst;
}

/* Many handles (a sequence of ints, or an integer array of any shape) as
 * int64, each in range and no slot named twice: the array (`stack` if it
 * fits, else PyMem_Malloc'd: the caller frees what is not `stack`) and *n;
 * NULL with the error. */
int64_t *conv_handles(Core *f, PyObject *o, int64_t *n, int64_t *stack, int64_t stack_n) {
    Py_buffer b = {0};
    PyObject *seq = NULL;
    int64_t *dst = stack, *out = NULL;
    if (PyObject_CheckBuffer(o) && !PyBytes_Check(o) && !PyByteArray_Check(o) &&
        PyObject_GetBuffer(o, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        *n = b.itemsize ? b.len / b.itemsize : 0;
    } else {
        PyErr_Clear();
        seq = PySequence_Fast(o, "handles must be a sequence or an array of ints");
        if (!seq) return NULL;
        *n = PySequence_Fast_GET_SIZE(seq);
    }
    if (*n > stack_n && !(dst = PyMem_Malloc((size_t)*n * sizeof *dst))) {
        PyErr_NoMemory();
        goto done;
    }
    if (b.obj) {
        if (!from_buffer(f, o, &b, n, dst)) goto done;
    } else {
        for (int64_t i = 0; i < *n; i++)
            if (handle_value(f, PySequence_Fast_GET_ITEM(seq, i), &dst[i]) < 0) goto done;
    }
    if (*n > 1) { /* no slot twice */
        int64_t twice = slot_twice(dst, *n, f->p.capacity);
        if (twice == -2) {
            PyErr_NoMemory();
            goto done;
        }
        if (twice >= 0) {
            snprintf(f->p.msg, sizeof f->p.msg, "given twice in one call");
            raise_invalid(f, (uint64_t)dst[twice]);
            goto done;
        }
    }
    out = dst;
done:
    if (b.obj) PyBuffer_Release(&b);
    Py_XDECREF(seq);
    if (!out && dst != stack) PyMem_Free(dst);
    return out;
}

/* A queue's or topic's name (bytes, 1 to QUEUE_NAME_BYTES - 1; checked by
 * _args.check_queue_name first), NUL-padded into `padded`. */
int conv_name(PyObject *o, const char *what, char *padded) {
    char *name;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(o, &name, &len) < 0) return -1;
    if (len < 1 || len >= (Py_ssize_t)QUEUE_NAME_BYTES) {
        PyErr_Format(PyExc_ValueError, "%s name out of range", what);
        return -1;
    }
    memset(padded, 0, QUEUE_NAME_BYTES);
    memcpy(padded, name, (size_t)len);
    return 0;
}
