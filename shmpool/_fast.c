/* shmpool._fast: the hot path of alloc and free, in C.
 *
 * Why C: a Python-level alloc+free pair costs ~2.4 us, 30x a bare semaphore
 * acquire+release; the per-process cache below makes the common case
 * lock-free, and only C can do that safely (it needs compare-and-swap on the
 * slot words) and cheaply (a call here costs ~0.05 us).
 *
 * The per-process cache (like SLUB's per-CPU slabs and DPDK's per-lcore
 * mempool caches). Each process's registry entry in the segment holds a
 * small stack of arena slots that only that process touches; their slot
 * words say CACHED by that pid, so every other process (shmpool-inspect,
 * crash recovery, reclaim) sees them. For one process the cache behaves as
 * the top of the arena's free-list stack: refill moves the shared stack's
 * top onto the cache in order, drain moves the cache's bottom back, so the
 * allocation order is exactly that of the single locked stack.
 *
 * Stealing: free slots must not be stranded in an idle process's cache while
 * another process finds the shared list dry (it would go to the reserve, and
 * sleep, with free slots in the pool). So such a process, holding the lock,
 * takes other caches' slots by compare-and-swap of the slot word (CACHED by
 * its owner -> ARENA) onto the shared list, and counts them in the victim's
 * entry (P_STOLEN). The victim's cache still lists them: its owner pops by
 * compare-and-swap too (CACHED by me -> HELD), and drops an entry whose slot
 * is no longer cached by it (P_DISCARDED). A cache therefore holds
 * cache_n - stolen + discarded slots, exactly, even when a stolen slot comes
 * back into the same cache and is listed twice.
 *
 * What this file does, and nothing else:
 * - alloc: arena first, as the kernel: a fault draw (lock-free: splitmix64 is
 *   a counter, so the shared state advances by fetch_add), then a pop from
 *   the cache. Anything else (a fault, an empty cache, a non-int gfp, a
 *   timeout, tracing) goes to the Python slow path, which holds the lock.
 * - free: validate the handle, peek curr_nr < min_nr without the lock (the
 *   kernel's unlocked peek: the reserve refills first, on the slow path),
 *   then compare-and-swap the slot word from HELD to CACHED (so a double
 *   free raced from two processes frees once) and push onto the cache.
 *   A full cache, an invalid handle or a CAS that loses go to the slow path.
 * - the reserve's common case: when the arena fails, pop the reserve's top,
 *   and when a free finds curr_nr < min_nr, push onto it (waking sleepers),
 *   under the pool lock taken with sem_trywait and recorded exactly as
 *   _lock.PoolLock records it. A lock that is busy, poisoning, an empty
 *   reserve or anything unusual goes to the Python slow path, which waits
 *   for the lock (and recovers it from a dead holder). Every store here
 *   keeps the pool repairable: the slot word is the commit point.
 * - refill, drain, cas, draw: helpers the slow path calls with the lock held.
 *
 * Threads: every function runs with the GIL held from start to end, so the
 * threads of one process never see a cache half-updated.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <time.h>

/* Must match shmpool/_layout.py (checked at import by _layout). */
#define H_FAIL_THRESHOLD 24
#define H_RNG 26
#define H_MIN_NR 17
#define H_CURR_NR 18
#define H_ARENA_FREE 19
#define H_STATUS 16
#define STATUS_LIVE 1
#define H_FLAGS 12
#define FLAG_POISON 1
#define H_NR_WAITERS 20
#define H_LOCK_PID 28
#define H_LOCK_SINCE_NS 29
#define H_LOCK_START 30
#define H_LOCK_SEQ 31
#define ST_RESERVE 2
#define P_C_ALLOC_RESERVE 7
#define P_C_FREE_RESERVE 9
#define P_PID 0
#define P_CACHE_N 3
#define P_STOLEN 4
#define P_DISCARDED 5
#define P_C_ALLOC_ARENA 6
#define P_C_FREE_ARENA 10
#define P_C_FAULTS 12
#define P_CACHE 14
#define ST_ARENA 1
#define ST_HELD 3
#define ST_CACHED 4
#define STATE_MASK 0xFFull
#define GEN_SHIFT 8
#define GEN_MASK 0xFFFFFFull
#define PID_SHIFT 32
#define INDEX_MASK 0xFFFFFFull
#define HGEN_SHIFT 24
#define TAG_SHIFT 48
#define GFP_WAIT 0x10
#define GFP_ALL 0xF0
#define GOLDEN 0x9E3779B97F4A7C15ull

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    uint64_t *hdr, *words, *entry;
    uint32_t *arena, *cache, *stack;
    uint64_t capacity, tag, pid, start, cache_max;
    sem_t *lock_sem, *wait_sem;
    uint64_t *registry;
    Py_ssize_t max_procs, proc_words;
    int enabled;
} FastPath;

/* The slow paths are methods of the Python subclass (Mempool):
 * self._alloc_slow(gfp, timeout, arena_failed) and self._free_slow(handle). */
static PyObject *GFP_KERNEL_OBJ, *STR_ALLOC_SLOW, *STR_FREE_SLOW;

#define CHECK_OPEN(f)                                                          \
    if ((f)->hdr == NULL || (f)->entry == NULL) {                              \
        PyErr_SetString(PyExc_ValueError, "the pool is closed in this object"); \
        return NULL;                                                           \
    }

static inline uint64_t ld(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* One splitmix64 draw from the shared generator: 1 if the arena must fail. */
static inline int fault(FastPath *f) {
    uint64_t thr = ld(&f->hdr[H_FAIL_THRESHOLD]);
    if (!thr) return 0;
    uint64_t z = __atomic_add_fetch(&f->hdr[H_RNG], GOLDEN, __ATOMIC_RELAXED);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    if ((z >> 11) < thr) {
        f->entry[P_C_FAULTS]++;
        return 1;
    }
    return 0;
}

/* Pop the cache's top and hand it out; NULL with no error set if the cache
 * turned out to hold only stale (stolen) entries. */
static inline PyObject *hand_out_cached(FastPath *f) {
    uint64_t n = f->entry[P_CACHE_N];
    while (n > 0) {
        n--;
        uint64_t idx = f->cache[n];
        f->entry[P_CACHE_N] = n;
        if (idx >= f->capacity) {
            PyErr_Format(PyExc_ValueError, "pool is corrupt: cache entry %llu names slot %llu, out of range",
                         (unsigned long long)n, (unsigned long long)idx);
            return NULL;
        }
        uint64_t w = ld(&f->words[idx]);
        if ((w & STATE_MASK) == ST_CACHED && (w >> PID_SHIFT) == f->pid) {
            uint64_t gen = ((w >> GEN_SHIFT) + 1) & GEN_MASK;
            uint64_t held = ST_HELD | gen << GEN_SHIFT | f->pid << PID_SHIFT;
            if (__atomic_compare_exchange_n(&f->words[idx], &w, held, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                f->entry[P_C_ALLOC_ARENA]++;
                return PyLong_FromUnsignedLongLong(idx | gen << HGEN_SHIFT | f->tag << TAG_SHIFT);
            }
        }
        f->entry[P_DISCARDED]++; /* stolen meanwhile: drop the stale entry */
    }
    return NULL;
}

/* The pool lock without waiting; recorded like _lock.PoolLock. */
static inline int lock_try(FastPath *f) {
    if (f->lock_sem == NULL || sem_trywait(f->lock_sem) != 0) return 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t *h = f->hdr;
    st(&h[H_LOCK_PID], f->pid);
    st(&h[H_LOCK_START], f->start);
    st(&h[H_LOCK_SINCE_NS], (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
    h[H_LOCK_SEQ]++;
    return 1;
}

static inline void lock_release(FastPath *f) {
    st(&f->hdr[H_LOCK_PID], 0);
    sem_post(f->lock_sem);
}

/* Whether the reserve path may run here: a live pool without poisoning. */
static inline int reserve_fast_ok(FastPath *f) {
    return f->lock_sem != NULL && (ld(&f->hdr[H_FLAGS]) & FLAG_POISON) == 0 && ld(&f->hdr[H_STATUS]) == STATUS_LIVE;
}

/* Whether some other process's cache holds slots (then the Python path,
 * which can steal them, must decide: the arena is not really dry). */
static int others_cache(FastPath *f);

/* alloc's fall-back to the reserve (the arena failed): the top of the
 * reserve, or NULL (no error) to let the slow path decide. */
static PyObject *reserve_alloc(FastPath *f, int arena_dry) {
    if (!reserve_fast_ok(f) || (arena_dry && others_cache(f)) || !lock_try(f)) return NULL;
    PyObject *handle = NULL;
    uint64_t *h = f->hdr, n = h[H_CURR_NR];
    if (n > 0 && n <= f->capacity && h[H_STATUS] == STATUS_LIVE) {
        uint64_t idx = f->stack[n - 1];
        uint64_t w = idx < f->capacity ? f->words[idx] : 0;
        if (idx < f->capacity && (w & STATE_MASK) == ST_RESERVE) {
            h[H_CURR_NR] = n - 1;
            uint64_t gen = ((w >> GEN_SHIFT) + 1) & GEN_MASK;
            st(&f->words[idx], ST_HELD | gen << GEN_SHIFT | f->pid << PID_SHIFT);
            f->entry[P_C_ALLOC_RESERVE]++;
            handle = PyLong_FromUnsignedLongLong(idx | gen << HGEN_SHIFT | f->tag << TAG_SHIFT);
        }
    }
    lock_release(f);
    return handle;
}

/* free's refill of the reserve (curr_nr < min_nr was peeked): 1 done, 0 the
 * reserve is full after all (go on to the cache), -1 let the slow path do
 * it (busy lock, poisoning, a handle that is not held...). */
static int reserve_free(FastPath *f, uint64_t idx, uint64_t w) {
    if (!reserve_fast_ok(f) || !lock_try(f)) return -1;
    uint64_t *h = f->hdr, n = h[H_CURR_NR];
    int done = 0;
    if (n >= h[H_MIN_NR]) {
        done = 0;
    } else if (n >= f->capacity || h[H_STATUS] != STATUS_LIVE ||
               !__atomic_compare_exchange_n(&f->words[idx], &w, (w & (GEN_MASK << GEN_SHIFT)) | ST_RESERVE, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        done = -1;
    } else {
        f->stack[n] = (uint32_t)idx;
        h[H_CURR_NR] = n + 1;
        f->entry[P_C_FREE_RESERVE]++;
        /* wake_all (see _lock.WaitQueue): a token for every sleeper */
        int64_t sleepers = (int64_t)h[H_NR_WAITERS];
        if (sleepers > 0 && f->wait_sem != NULL) {
            int value = 0;
            sem_getvalue(f->wait_sem, &value);
            for (int64_t i = value; i < sleepers; i++) sem_post(f->wait_sem);
        }
        done = 1;
    }
    lock_release(f);
    return done;
}

static PyObject *call_slow_alloc(FastPath *f, PyObject *gfp, PyObject *timeout, int arena_failed) {
    PyObject *args[4] = {(PyObject *)f, gfp, timeout, arena_failed ? Py_True : Py_False};
    return PyObject_VectorcallMethod(STR_ALLOC_SLOW, args, 4, NULL);
}

/* alloc(gfp=GFP_KERNEL, *, timeout=None) */
static PyObject *FastPath_alloc(FastPath *f, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    /* Every check here only chooses the path: the slow path validates fully. */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *gfp = nargs > 0 ? args[0] : GFP_KERNEL_OBJ;
    PyObject *timeout = Py_None;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "alloc() takes at most 1 positional argument (gfp)");
        return NULL;
    }
    if (kwnames) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0) timeout = args[nargs + i];
            else if (PyUnicode_CompareWithASCIIString(key, "gfp") == 0 && nargs == 0) gfp = args[nargs + i];
            else {
                PyErr_Format(PyExc_TypeError, "alloc() got an unexpected keyword argument '%U'", key);
                return NULL;
            }
        }
    }
    if (!f->enabled || timeout != Py_None || !PyLong_Check(gfp) || PyBool_Check(gfp))
        return call_slow_alloc(f, gfp, timeout, 0);
    long g = PyLong_AsLong(gfp);
    if (g == -1 && PyErr_Occurred()) { PyErr_Clear(); return call_slow_alloc(f, gfp, timeout, 0); }
    if (g & ~GFP_ALL || f->entry == NULL || ld(&f->hdr[H_STATUS]) != STATUS_LIVE)
        return call_slow_alloc(f, gfp, timeout, 0);
    PyObject *h;
    if (f->entry[P_CACHE_N] == 0) {
        if (ld(&f->hdr[H_ARENA_FREE]) != 0) return call_slow_alloc(f, gfp, timeout, 0); /* refill */
        h = reserve_alloc(f, 1); /* the arena is dry: no draw */
        return h ? h : call_slow_alloc(f, gfp, timeout, 0);
    }
    if (fault(f)) {
        h = reserve_alloc(f, 0);
        return h ? h : call_slow_alloc(f, gfp, timeout, 1);
    }
    h = hand_out_cached(f);
    if (h == NULL && !PyErr_Occurred()) return call_slow_alloc(f, gfp, timeout, 0);
    return h;
}

/* free(handle) */
static PyObject *FastPath_free(FastPath *f, PyObject *handle) {
    if (handle == Py_None) Py_RETURN_NONE;
    if (!f->enabled || f->entry == NULL || !PyLong_CheckExact(handle)) goto slow;
    int overflow = 0;
    long long h = PyLong_AsLongLongAndOverflow(handle, &overflow);
    if (overflow || h < 0) { PyErr_Clear(); goto slow; }
    uint64_t idx = (uint64_t)h & INDEX_MASK, gen = ((uint64_t)h >> HGEN_SHIFT) & GEN_MASK;
    if (idx >= f->capacity || ((uint64_t)h >> TAG_SHIFT) != f->tag) goto slow;
    uint64_t *hdr = f->hdr;
    if (ld(&hdr[H_STATUS]) != STATUS_LIVE) goto slow;
    uint64_t w = ld(&f->words[idx]);
    if ((w & STATE_MASK) != ST_HELD || ((w >> GEN_SHIFT) & GEN_MASK) != gen) goto slow;
    /* The kernel's unlocked peek, then the check under the lock: the
     * reserve refills first. */
    if (ld(&hdr[H_CURR_NR]) < ld(&hdr[H_MIN_NR])) {
        int r = reserve_free(f, idx, w);
        if (r > 0) Py_RETURN_NONE;
        if (r < 0) goto slow;
        w = ld(&f->words[idx]); /* the reserve filled meanwhile: to the cache */
        if ((w & STATE_MASK) != ST_HELD || ((w >> GEN_SHIFT) & GEN_MASK) != gen) goto slow;
    }
    uint64_t n = f->entry[P_CACHE_N];
    if (n >= f->cache_max) goto slow;
    uint64_t cached = ST_CACHED | gen << GEN_SHIFT | f->pid << PID_SHIFT;
    if (!__atomic_compare_exchange_n(&f->words[idx], &w, cached, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) goto slow;
    f->cache[n] = (uint32_t)idx;
    f->entry[P_CACHE_N] = n + 1;
    f->entry[P_C_FREE_ARENA]++;
    Py_RETURN_NONE;
slow: {
        PyObject *args[2] = {(PyObject *)f, handle};
        return PyObject_VectorcallMethod(STR_FREE_SLOW, args, 2, NULL);
    }
}

/* take_bulk(out, n): with the lock held, hand out up to n arena elements
 * into ``out`` (a writable int64 buffer), each one an arena attempt with its
 * own fault draw: from this process's cache, then the shared free list.
 * Returns how many it wrote to the front of ``out``; the rest of the n
 * attempts failed (a fault or a dry arena). */
static PyObject *FastPath_take_bulk(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(f);
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "take_bulk(out, n)"); return NULL; }
    Py_buffer out;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if ((n == -1 && PyErr_Occurred()) || n < 0 || out.len < n * 8) {
        PyBuffer_Release(&out);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "out is smaller than n int64");
        return NULL;
    }
    int64_t *dst = (int64_t *)out.buf;
    Py_ssize_t got = 0;
    uint64_t shared = f->hdr[H_ARENA_FREE];
    for (Py_ssize_t i = 0; i < n; i++) {
        if (f->entry[P_CACHE_N] == 0 && shared == 0) break; /* dry: no more draws */
        if (fault(f)) continue;
        uint64_t idx = UINT64_MAX, w = 0;
        while (f->entry[P_CACHE_N] > 0 && idx == UINT64_MAX) { /* the cache is the arena's top */
            uint64_t c = f->cache[--f->entry[P_CACHE_N]];
            w = c < f->capacity ? ld(&f->words[c]) : 0;
            if (c < f->capacity && (w & STATE_MASK) == ST_CACHED && (w >> PID_SHIFT) == f->pid) idx = c;
            else f->entry[P_DISCARDED]++;
        }
        if (idx == UINT64_MAX) {
            if (shared == 0) break;
            idx = f->arena[--shared];
            w = idx < f->capacity ? f->words[idx] : 0;
            if (idx >= f->capacity || (w & STATE_MASK) != ST_ARENA) {
                f->hdr[H_ARENA_FREE] = shared + 1;
                PyBuffer_Release(&out);
                PyErr_Format(PyExc_ValueError, "pool is corrupt: arena free list entry %llu names slot %llu, not a free one",
                             (unsigned long long)shared, (unsigned long long)idx);
                return NULL;
            }
        }
        uint64_t gen = ((w >> GEN_SHIFT) + 1) & GEN_MASK;
        /* A cached slot could be taken by a thief only under the lock, which we hold: a plain store is safe. */
        st(&f->words[idx], ST_HELD | gen << GEN_SHIFT | f->pid << PID_SHIFT);
        dst[got++] = (int64_t)(idx | gen << HGEN_SHIFT | f->tag << TAG_SHIFT);
    }
    f->hdr[H_ARENA_FREE] = shared;
    f->entry[P_C_ALLOC_ARENA] += got;
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(got);
}

/* give_bulk(handles, n): with the lock held, after the
 * caller validated every handle: compare-and-swap each element's word from
 * HELD to ARENA and push it onto the shared free list. Returns how many
 * moved (fewer only if another process freed one at the same moment). */
static PyObject *FastPath_give_bulk(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(f);
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "give_bulk(handles, n)"); return NULL; }
    Py_buffer in;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if ((n == -1 && PyErr_Occurred()) || n < 0 || in.len < n * 8) {
        PyBuffer_Release(&in);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "handles is smaller than n int64");
        return NULL;
    }
    const int64_t *src = (const int64_t *)in.buf;
    uint64_t shared = f->hdr[H_ARENA_FREE];
    Py_ssize_t moved = 0;
    for (Py_ssize_t i = 0; i < n && shared < f->capacity; i++) {
        uint64_t h = (uint64_t)src[i], idx = h & INDEX_MASK, gen = (h >> HGEN_SHIFT) & GEN_MASK;
        if (idx >= f->capacity) continue;
        uint64_t w = ld(&f->words[idx]);
        if ((w & STATE_MASK) != ST_HELD || ((w >> GEN_SHIFT) & GEN_MASK) != gen) continue;
        if (__atomic_compare_exchange_n(&f->words[idx], &w, (w & (GEN_MASK << GEN_SHIFT)) | ST_ARENA, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            f->arena[shared++] = (uint32_t)idx;
            moved++;
        }
    }
    f->hdr[H_ARENA_FREE] = shared;
    f->entry[P_C_FREE_ARENA] += moved;
    PyBuffer_Release(&in);
    return PyLong_FromSsize_t(moved);
}

/* cache_push(index, word): the locked path's free into this process's
 * cache: compare-and-swap the slot word from ``word`` (HELD) to CACHED by
 * us and push. 1 done, 0 the cache is full (drain and retry), -1 the word
 * was not ``word`` any more (somebody else freed it). */
static PyObject *FastPath_cache_push(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(f);
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "cache_push(index, word)"); return NULL; }
    unsigned long long idx = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long long word = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (idx >= f->capacity) { PyErr_SetString(PyExc_IndexError, "slot index out of range"); return NULL; }
    uint64_t n = f->entry[P_CACHE_N];
    if (n >= f->cache_max) return PyLong_FromLong(0);
    uint64_t w = word;
    uint64_t cached = (w & (GEN_MASK << GEN_SHIFT)) | ST_CACHED | f->pid << PID_SHIFT;
    if (!__atomic_compare_exchange_n(&f->words[idx], &w, cached, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return PyLong_FromLong(-1);
    f->cache[n] = (uint32_t)idx;
    f->entry[P_CACHE_N] = n + 1;
    f->entry[P_C_FREE_ARENA]++;
    return PyLong_FromLong(1);
}

/* pop_cached(): with the lock held, hand out the cache's top, or None. */
static PyObject *FastPath_pop_cached(FastPath *f, PyObject *unused) {
    CHECK_OPEN(f);
    PyObject *h = hand_out_cached(f);
    if (h == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return h;
}

/* draw(): one fault draw; True if the arena must fail. */
static PyObject *FastPath_draw(FastPath *f, PyObject *unused) {
    CHECK_OPEN(f);
    return PyBool_FromLong(fault(f));
}

/* refill(k): with the lock held, move up to k slots from the top of the
 * shared free list onto the cache, keeping their order. Returns how many. */
static PyObject *FastPath_refill(FastPath *f, PyObject *arg) {
    CHECK_OPEN(f);
    long long k = PyLong_AsLongLong(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    uint64_t shared = f->hdr[H_ARENA_FREE], n = f->entry[P_CACHE_N];
    uint64_t room = f->cache_max - n;
    uint64_t take = (uint64_t)k < room ? (uint64_t)k : room;
    if (take > shared) take = shared;
    uint64_t first = shared - take;
    for (uint64_t i = 0; i < take; i++) {
        uint64_t idx = f->arena[first + i];
        uint64_t w = f->words[idx < f->capacity ? idx : 0];
        if (idx >= f->capacity || (w & STATE_MASK) != ST_ARENA) {
            PyErr_Format(PyExc_ValueError, "pool is corrupt: arena free list entry %llu names slot %llu, not a free one",
                         (unsigned long long)(first + i), (unsigned long long)idx);
            return NULL; /* checked before moving anything: nothing changed */
        }
    }
    for (uint64_t i = 0; i < take; i++) {
        uint64_t idx = f->arena[first + i];
        f->cache[n + i] = (uint32_t)idx;
        st(&f->words[idx], (f->words[idx] & (GEN_MASK << GEN_SHIFT)) | ST_CACHED | f->pid << PID_SHIFT);
    }
    f->entry[P_CACHE_N] = n + take;
    f->hdr[H_ARENA_FREE] = first;
    return PyLong_FromUnsignedLongLong(take);
}

/* drain(keep): with the lock held, move all but the top ``keep`` cache
 * entries (the bottom of the cache) back onto the shared free list; stale
 * entries are dropped. Returns how many slots moved. */
static PyObject *FastPath_drain(FastPath *f, PyObject *arg) {
    CHECK_OPEN(f);
    long long keep = PyLong_AsLongLong(arg);
    if (keep == -1 && PyErr_Occurred()) return NULL;
    uint64_t n = f->entry[P_CACHE_N];
    uint64_t move = keep < 0 ? n : (n > (uint64_t)keep ? n - (uint64_t)keep : 0);
    uint64_t shared = f->hdr[H_ARENA_FREE], moved = 0;
    for (uint64_t i = 0; i < move; i++) {
        uint64_t idx = f->cache[i];
        if (idx >= f->capacity || shared + moved >= f->capacity) {
            PyErr_SetString(PyExc_ValueError, "pool is corrupt: a cache entry or arena_free is beyond the capacity");
            return NULL;
        }
        uint64_t w = ld(&f->words[idx]);
        uint64_t freed = (w & (GEN_MASK << GEN_SHIFT)) | ST_ARENA;
        if ((w & STATE_MASK) == ST_CACHED && (w >> PID_SHIFT) == f->pid &&
            __atomic_compare_exchange_n(&f->words[idx], &w, freed, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            f->arena[shared + moved++] = (uint32_t)idx;
        } else {
            f->entry[P_DISCARDED]++;
        }
    }
    memmove(f->cache, f->cache + move, (n - move) * sizeof(uint32_t));
    f->entry[P_CACHE_N] = n - move;
    f->hdr[H_ARENA_FREE] = shared + moved;
    return PyLong_FromUnsignedLongLong(moved);
}

/* steal(registry_offset, max_procs, proc_words): with the lock held, take
 * every slot cached by another process onto the shared free list. */
static PyObject *FastPath_steal(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(f);
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "steal(registry_offset, max_procs, proc_words)"); return NULL; }
    Py_ssize_t off = PyLong_AsSsize_t(args[0]), max = PyLong_AsSsize_t(args[1]), words = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (off < 0 || max < 0 || words < P_CACHE || off + max * words * 8 > f->view.len) {
        PyErr_SetString(PyExc_ValueError, "registry outside the mapping");
        return NULL;
    }
    uint64_t taken = 0, shared = f->hdr[H_ARENA_FREE];
    for (Py_ssize_t e = 0; e < max; e++) {
        uint64_t *entry = (uint64_t *)((char *)f->view.buf + off) + e * words;
        uint64_t owner = ld(&entry[P_PID]);
        if (owner == 0 || entry == f->entry) continue;
        uint64_t n = ld(&entry[P_CACHE_N]);
        uint64_t limit = (uint64_t)(words - P_CACHE) * 2;
        uint32_t *cache = (uint32_t *)(entry + P_CACHE);
        for (uint64_t i = 0; i < n && i < limit; i++) {
            uint64_t idx = __atomic_load_n(&cache[i], __ATOMIC_ACQUIRE);
            if (idx >= f->capacity || shared >= f->capacity) continue;
            uint64_t w = ld(&f->words[idx]);
            if ((w & STATE_MASK) != ST_CACHED || (w >> PID_SHIFT) != owner) continue;
            uint64_t freed = (w & (GEN_MASK << GEN_SHIFT)) | ST_ARENA;
            if (__atomic_compare_exchange_n(&f->words[idx], &w, freed, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                f->arena[shared++] = (uint32_t)idx;
                __atomic_add_fetch(&entry[P_STOLEN], 1, __ATOMIC_RELEASE);
                taken++;
            }
        }
    }
    f->hdr[H_ARENA_FREE] = shared;
    return PyLong_FromUnsignedLongLong(taken);
}

static int others_cache(FastPath *f) {
    for (Py_ssize_t e = 0; e < f->max_procs; e++) {
        uint64_t *entry = f->registry + e * f->proc_words;
        if (entry == f->entry || ld(&entry[P_PID]) == 0) continue;
        if (ld(&entry[P_CACHE_N]) - ld(&entry[P_STOLEN]) + ld(&entry[P_DISCARDED]) > 0) return 1;
    }
    return 0;
}

/* cas(index, expected, new): compare-and-swap one slot word. */
static PyObject *FastPath_cas(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(f);
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "cas(index, expected, new)"); return NULL; }
    unsigned long long idx = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long long expected = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long desired = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (idx >= f->capacity) { PyErr_SetString(PyExc_IndexError, "slot index out of range"); return NULL; }
    uint64_t e = expected;
    return PyBool_FromLong(__atomic_compare_exchange_n(&f->words[idx], &e, (uint64_t)desired, 0,
                                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
}

/* bind(entry_offset, pid, start): point at this process's registry entry. */
static PyObject *FastPath_bind(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    if (f->hdr == NULL) { PyErr_SetString(PyExc_ValueError, "the pool is closed in this object"); return NULL; }
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "bind(entry_offset, pid, start)"); return NULL; }
    Py_ssize_t off = PyLong_AsSsize_t(args[0]);
    unsigned long long pid = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long start = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (off < 0 || off % 8 || off + (Py_ssize_t)(P_CACHE * 8 + f->cache_max * 4) > f->view.len) {
        PyErr_SetString(PyExc_ValueError, "registry entry outside the mapping");
        return NULL;
    }
    f->entry = (uint64_t *)((char *)f->view.buf + off);
    f->cache = (uint32_t *)(f->entry + P_CACHE);
    f->pid = pid;
    f->start = start;
    Py_RETURN_NONE;
}

static int FastPath_init(FastPath *f, PyObject *args, PyObject *kwds) {
    PyObject *buf;
    Py_ssize_t off_words, off_arena, off_stack, off_procs, max_procs, proc_words;
    unsigned long long capacity, tag, cache_max;
    const char *lock_name, *wait_name;
    if (!PyArg_ParseTuple(args, "OnnnnnnKKKss", &buf, &off_words, &off_arena, &off_stack, &off_procs, &max_procs,
                          &proc_words, &capacity, &tag, &cache_max, &lock_name, &wait_name))
        return -1;
    if (f->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath initialised twice");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &f->view, PyBUF_WRITABLE) < 0) return -1;
    f->have_view = 1;
    if (off_words < 0 || off_arena < 0 || off_stack < 0 || off_procs < 0 || max_procs < 0 || proc_words < P_CACHE ||
        off_words + (Py_ssize_t)(8 * capacity) > f->view.len || off_arena + (Py_ssize_t)(4 * capacity) > f->view.len ||
        off_stack + (Py_ssize_t)(4 * capacity) > f->view.len || off_procs + max_procs * proc_words * 8 > f->view.len ||
        f->view.len < 512) {
        PyErr_SetString(PyExc_ValueError, "geometry outside the mapping");
        return -1;
    }
    f->hdr = (uint64_t *)f->view.buf;
    f->words = (uint64_t *)((char *)f->view.buf + off_words);
    f->arena = (uint32_t *)((char *)f->view.buf + off_arena);
    f->stack = (uint32_t *)((char *)f->view.buf + off_stack);
    f->registry = (uint64_t *)((char *)f->view.buf + off_procs);
    f->max_procs = max_procs;
    f->proc_words = proc_words;
    /* The same named semaphores as posix_ipc's objects (glibc shares one
     * mapping per process); without them the reserve path stays in Python. */
    f->lock_sem = sem_open(lock_name, 0);
    if (f->lock_sem == SEM_FAILED) f->lock_sem = NULL;
    f->wait_sem = sem_open(wait_name, 0);
    if (f->wait_sem == SEM_FAILED) f->wait_sem = NULL;
    f->entry = NULL;
    f->cache = NULL;
    f->capacity = capacity;
    f->tag = tag;
    f->cache_max = cache_max;
    f->enabled = 0; /* until bind() */
    return 0;
}

/* _unmap(): let go of the mapping (close); every later call takes the
 * slow path, which says the pool is closed. */
static void close_sems(FastPath *f) {
    if (f->lock_sem) sem_close(f->lock_sem);
    if (f->wait_sem) sem_close(f->wait_sem);
    f->lock_sem = f->wait_sem = NULL;
}

static PyObject *FastPath_release(FastPath *f, PyObject *unused) {
    close_sems(f);
    f->enabled = 0;
    f->hdr = NULL;
    f->words = f->entry = NULL;
    f->arena = f->cache = f->stack = NULL;
    f->registry = NULL;
    if (f->have_view) {
        f->have_view = 0;
        PyBuffer_Release(&f->view);
    }
    Py_RETURN_NONE;
}

static void FastPath_dealloc(FastPath *f) {
    close_sems(f);
    if (f->have_view) PyBuffer_Release(&f->view);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *get_enabled(FastPath *f, void *c) { return PyBool_FromLong(f->enabled && f->entry != NULL); }
static int set_enabled(FastPath *f, PyObject *v, void *c) {
    int b = PyObject_IsTrue(v);
    if (b < 0) return -1;
    f->enabled = b && f->entry != NULL;
    return 0;
}
static PyObject *get_cache_n(FastPath *f, void *c) {
    if (!f->entry) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(f->entry[P_CACHE_N] - f->entry[P_STOLEN] + f->entry[P_DISCARDED]);
}

static PyGetSetDef FastPath_getset[] = {
    {"enabled", (getter)get_enabled, (setter)set_enabled, "whether alloc/free take the fast path", NULL},
    {"cache_n", (getter)get_cache_n, NULL, "slots in this process's cache (stale entries not counted)", NULL},
    {NULL},
};

static PyMethodDef FastPath_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))FastPath_alloc, METH_FASTCALL | METH_KEYWORDS,
     "alloc($self, /, gfp=208, *, timeout=None)\n--\n\n"
     "Allocate one element; return its handle (an int). gfp defaults to\n"
     "GFP_KERNEL (208).\n\n"
     "The kernel's order: the arena first; if it fails, the top of the reserve.\n"
     "If the reserve is empty too, a gfp that may not sleep (GFP_ATOMIC,\n"
     "GFP_NOWAIT) returns None at once, while one that may (GFP_KERNEL,\n"
     "GFP_NOIO, GFP_NOFS) sleeps until a free refills the reserve, or for 5 s,\n"
     "and tries again: it never returns None. timeout (seconds) bounds that:\n"
     "TimeoutError. The element's bytes are not zeroed. TypeError/ValueError\n"
     "for a bad gfp; PoolClosedError, PoolDestroyedError."},
    {"free", (PyCFunction)FastPath_free, METH_O,
     "free($self, handle, /)\n--\n\n"
     "Return an element; None is ignored (as the kernel ignores NULL).\n\n"
     "While the reserve is below min_nr the element refills it and wakes the\n"
     "sleepers; otherwise it goes back to the arena. Any process may free any\n"
     "handle that is currently held. TypeError (not an int), ValueError (out\n"
     "of range), InvalidHandleError (not held: double free, stale, another\n"
     "pool's); a refused free changes nothing."},
    {"take_bulk", (PyCFunction)(void (*)(void))FastPath_take_bulk, METH_FASTCALL, "take_bulk(out, n) -> how many"},
    {"give_bulk", (PyCFunction)(void (*)(void))FastPath_give_bulk, METH_FASTCALL, "give_bulk(handles, n) -> how many"},
    {"cache_push", (PyCFunction)(void (*)(void))FastPath_cache_push, METH_FASTCALL, "cache_push(index, word) -> 1, 0 (full) or -1 (lost)"},
    {"pop_cached", (PyCFunction)FastPath_pop_cached, METH_NOARGS, "hand out the cache's top (lock held), or None"},
    {"draw", (PyCFunction)FastPath_draw, METH_NOARGS, "one fault draw: True if the arena must fail"},
    {"refill", (PyCFunction)FastPath_refill, METH_O, "refill(k): shared free list -> cache (lock held)"},
    {"drain", (PyCFunction)FastPath_drain, METH_O, "drain(keep): cache bottom -> shared free list (lock held)"},
    {"cas", (PyCFunction)(void (*)(void))FastPath_cas, METH_FASTCALL, "cas(index, expected, new) -> bool"},
    {"steal", (PyCFunction)(void (*)(void))FastPath_steal, METH_FASTCALL, "steal(registry_offset, max_procs, proc_words)"},
    {"bind", (PyCFunction)(void (*)(void))FastPath_bind, METH_FASTCALL, "bind(entry_offset, pid, start)"},
    {"_unmap", (PyCFunction)FastPath_release, METH_NOARGS, "let go of the mapping (close)"},
    {NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._fast.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
    .tp_doc = "The lock-free hot path of one Mempool object (see the top of _fast.c).",
};

static struct PyModuleDef fastmodule = {PyModuleDef_HEAD_INIT, "shmpool._fast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fast(void) {
    if (PyType_Ready(&FastPathType) < 0) return NULL;
    PyObject *m = PyModule_Create(&fastmodule);
    if (!m) return NULL;
    GFP_KERNEL_OBJ = PyLong_FromLong(0xD0);
    STR_ALLOC_SLOW = PyUnicode_InternFromString("_alloc_slow");
    STR_FREE_SLOW = PyUnicode_InternFromString("_free_slow");
    Py_INCREF(&FastPathType);
    PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType);
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "H_FAIL_THRESHOLD", H_FAIL_THRESHOLD, "H_RNG", H_RNG, "H_MIN_NR", H_MIN_NR, "H_CURR_NR", H_CURR_NR,
        "H_ARENA_FREE", H_ARENA_FREE, "H_STATUS", H_STATUS, "P_CACHE_N", P_CACHE_N, "P_PID", P_PID,
        "P_STOLEN", P_STOLEN, "P_DISCARDED", P_DISCARDED, "H_FLAGS", H_FLAGS, "FLAG_POISON", FLAG_POISON,
        "H_NR_WAITERS", H_NR_WAITERS, "H_LOCK_PID", H_LOCK_PID, "H_LOCK_SINCE_NS", H_LOCK_SINCE_NS,
        "H_LOCK_START", H_LOCK_START, "H_LOCK_SEQ", H_LOCK_SEQ, "ST_RESERVE", ST_RESERVE,
        "P_C_ALLOC_RESERVE", P_C_ALLOC_RESERVE, "P_C_FREE_RESERVE", P_C_FREE_RESERVE,
        "P_C_ALLOC_ARENA", P_C_ALLOC_ARENA, "P_C_FREE_ARENA", P_C_FREE_ARENA, "P_C_FAULTS", P_C_FAULTS,
        "P_CACHE", P_CACHE, "ST_CACHED", ST_CACHED, "ST_HELD", ST_HELD, "ST_ARENA", ST_ARENA);
    PyModule_AddObject(m, "LAYOUT", layout);
    return m;
}
