/*
 * shmbus._cfast: the Queue's hot path in C (optional; shmbus/_accel.py loads it).
 *
 * One job: the common case of a single put and a single get, done in one call
 * each, with exactly the stores the pure-Python path makes and in the same
 * order (shmbus/_queue.py: Queue.put/_put_locked/_publish and Queue._take1).
 * Whatever is not the common case -- a busy lock, a record that wraps, a full
 * ring, a maxsize queue, a damaged record, a bytes or ndarray message, fault
 * injection -- is handed back to Python, which checks, waits, recovers and
 * raises. So this file never waits, never raises a shmbus error, and never
 * trusts a value read from the shared file: every position is checked before
 * it is used to address memory.
 *
 * Header word indices come from shmbus/_format.py (the only module that knows
 * byte offsets) through the constructor. The record header is the format's
 * "<IHHQ" (length, kind, state, seq), 16 bytes, records aligned to 16:
 * _accel.py checks those against _format before it loads us.
 *
 * Semaphores: we open our own handles on the bus's named semaphores
 * (sem_open of the same names), so no posix_ipc internals are touched. Only
 * sem_trywait and sem_post are used: never a wait, so the GIL is never held
 * across a sleep.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>

#define REC_SIZE 16
#define ALIGN_MASK 15
#define REC_MSGPACK 1
#define REC_RAW 2
#define REC_WRAP 3
#define STATE_COMMITTED 1
/* msgpack bin 8/16/32 first bytes: a bytes message, which Python returns without decoding */
#define BIN8 0xc4
#define BIN32 0xc6

/* put() results, mirrored by _accel.py */
#define PUT_NOT_TAKEN 0 /* head lock busy (or closed, or no participant slot): nothing done */
#define PUT_DONE 1      /* written, published, lock released, consumer token posted */
#define PUT_SAMPLE 2    /* written and published, lock still held: Python records the time sample */
#define PUT_LOCKED 3    /* lock held, nothing written: Python continues with the lock */

/* get() results when not a message */
#define GET_NO_TOKEN 0   /* no items token was free: nothing done */
#define GET_HAS_TOKEN 1  /* an items token is held, nothing taken: Python takes with it */

enum { W_HEAD, W_TAIL, W_NEXT_SEQ, W_TAIL_SEQ, W_BYTES_IN, W_BYTES_OUT, N_W64 };
enum { W_HEAD_HOLDER, W_TAIL_HOLDER, W_HEAD_RELEASES, W_TAIL_RELEASES, W_SPACE_WAITING, N_W32 };

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* the whole mapping; held until close() */
    int has_view;
    uint64_t *h64;
    uint32_t *h32;
    unsigned char *ring;
    uint64_t cap;
    uint64_t sample_every; /* one message in this many gets a time sample (_format) */
    Py_ssize_t w64[N_W64];
    Py_ssize_t w32[N_W32];
    sem_t *head, *tail, *items;
} FastQueue;

static inline uint64_t ld64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t ld32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#define H64(q, w) ((q)->h64 + (q)->w64[w])
#define H32(q, w) ((q)->h32 + (q)->w32[w])

static inline uint64_t span_of(uint64_t length) { return (REC_SIZE + length + ALIGN_MASK) & ~(uint64_t)ALIGN_MASK; }

/* _recovery.Lock.release: clear the holder, count the release, then post. */
static void lock_release(FastQueue *q, int holder, int releases, sem_t *sem) {
    st32(H32(q, holder), 0);
    st32(H32(q, releases), ld32(H32(q, releases)) + 1);
    sem_post(sem);
}

static int take_lock(FastQueue *q, sem_t *sem, int holder, uint32_t me) {
    if (sem_trywait(sem) != 0) return 0; /* EAGAIN or EINTR: Python waits (with recovery) */
    st32(H32(q, holder), me);
    return 1;
}

static void fq_close_sems(FastQueue *q) {
    sem_t **sems[] = {&q->head, &q->tail, &q->items};
    for (size_t i = 0; i < 3; i++) {
        if (*sems[i] != NULL && *sems[i] != SEM_FAILED) sem_close(*sems[i]);
        *sems[i] = NULL;
    }
}

static void fq_release(FastQueue *q) {
    if (q->has_view) {
        PyBuffer_Release(&q->view);
        q->has_view = 0;
    }
    q->h64 = NULL;
    q->h32 = NULL;
    q->ring = NULL;
    fq_close_sems(q);
}

static void fq_dealloc(FastQueue *q) {
    fq_release(q);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static int read_indices(PyObject *seq, Py_ssize_t *out, Py_ssize_t n, Py_ssize_t limit, const char *what) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "%s: a tuple of %zd indices is needed", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PyTuple_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 0 || v >= limit) {
            PyErr_Format(PyExc_ValueError, "%s: index %zd out of the header", what, v);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

static sem_t *open_sem(PyObject *name) {
    const char *s = PyUnicode_AsUTF8(name);
    if (s == NULL) return NULL;
    sem_t *sem = sem_open(s, 0);
    if (sem == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return NULL;
    }
    return sem;
}

/* FastQueue(mapping, ring_offset, capacity, sample_every, (head, tail, items) semaphore names,
 *           u64 word indices, u32 word indices): indices lie before ring_offset. */
static int fq_init(FastQueue *q, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *buf, *names, *w64, *w32;
    Py_ssize_t ring_offset;
    unsigned long long cap, sample_every;
    if (!PyArg_ParseTuple(args, "OnKKO!O!O!", &buf, &ring_offset, &cap, &sample_every, &PyTuple_Type,
                          &names, &PyTuple_Type, &w64, &PyTuple_Type, &w32))
        return -1;
    fq_release(q);
    if (PyTuple_GET_SIZE(names) != 3) {
        PyErr_SetString(PyExc_ValueError, "three semaphore names are needed");
        return -1;
    }
    if (ring_offset <= 0 || ring_offset % 8 || sample_every == 0) {
        PyErr_SetString(PyExc_ValueError, "bad ring offset or sample interval");
        return -1;
    }
    if (read_indices(w64, q->w64, N_W64, ring_offset / 8, "u64 words") < 0) return -1;
    if (read_indices(w32, q->w32, N_W32, ring_offset / 4, "u32 words") < 0) return -1;
    if (PyObject_GetBuffer(buf, &q->view, PyBUF_WRITABLE) < 0) return -1;
    q->has_view = 1;
    if (cap == 0 || cap % (ALIGN_MASK + 1) || cap > UINT64_MAX / 4 ||
        (uint64_t)q->view.len < (uint64_t)ring_offset + cap) {
        fq_release(q);
        PyErr_SetString(PyExc_ValueError, "mapping smaller than header + ring, or a bad capacity");
        return -1;
    }
    q->h64 = (uint64_t *)q->view.buf;
    q->h32 = (uint32_t *)q->view.buf;
    q->ring = (unsigned char *)q->view.buf + ring_offset;
    q->cap = cap;
    q->sample_every = sample_every;
    if ((q->head = open_sem(PyTuple_GET_ITEM(names, 0))) == NULL ||
        (q->tail = open_sem(PyTuple_GET_ITEM(names, 1))) == NULL ||
        (q->items = open_sem(PyTuple_GET_ITEM(names, 2))) == NULL) {
        fq_release(q);
        return -1;
    }
    return 0;
}

static int get_u32(PyObject *o, uint32_t *out) {
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    *out = (uint32_t)v;
    return 0;
}

/* put(me, kind, prefix, body, n) -> PUT_*: the common case of Queue.put. */
static PyObject *fq_put(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "put(me, kind, prefix, body, n)");
        return NULL;
    }
    uint32_t me, kind;
    if (get_u32(args[0], &me) < 0 || get_u32(args[1], &kind) < 0) return NULL;
    PyObject *prefix = args[2], *body = args[3];
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "prefix must be bytes");
        return NULL;
    }
    if (q->ring == NULL || me == 0) return PyLong_FromLong(PUT_NOT_TAKEN);
    Py_buffer bv;
    const char *bdata = NULL;
    Py_ssize_t blen = 0;
    int has_bv = 0;
    if (body != Py_None) {
        if (PyBytes_Check(body)) {
            bdata = PyBytes_AS_STRING(body);
            blen = PyBytes_GET_SIZE(body);
        } else {
            if (PyObject_GetBuffer(body, &bv, PyBUF_CONTIG_RO) < 0) return NULL;
            has_bv = 1;
            bdata = bv.buf;
            blen = bv.len;
        }
    }
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
    uint64_t n = (uint64_t)plen + (uint64_t)blen;
    int result = PUT_LOCKED;
    if (!take_lock(q, q->head, W_HEAD_HOLDER, me)) {
        result = PUT_NOT_TAKEN;
        goto out;
    }
    uint64_t cap = q->cap;
    uint64_t head = ld64(H64(q, W_HEAD)), tail = ld64(H64(q, W_TAIL));
    uint64_t seq = ld64(H64(q, W_NEXT_SEQ));
    uint64_t span = span_of(n);
    /* Python's place() == head, with every overflow left to Python's checks. */
    if (n > UINT32_MAX || tail > head || head - tail > cap || (head | tail) & ALIGN_MASK ||
        head > UINT64_MAX - 2 * cap || seq == UINT64_MAX || span > cap - head % cap ||
        head + span - tail > cap)
        goto out;
    unsigned char *rec = q->ring + head % cap;
    memcpy(rec + REC_SIZE, PyBytes_AS_STRING(prefix), (size_t)plen);
    if (blen) memcpy(rec + REC_SIZE + plen, bdata, (size_t)blen);
    uint32_t len32 = (uint32_t)n;
    uint16_t kind16 = (uint16_t)kind, state16 = STATE_COMMITTED;
    memcpy(rec, &len32, 4);
    memcpy(rec + 4, &kind16, 2);
    memcpy(rec + 6, &state16, 2);
    memcpy(rec + 8, &seq, 8);
    /* _publish: counters first, head last (release stores keep that order). */
    st64(H64(q, W_NEXT_SEQ), seq + 1);
    st64(H64(q, W_BYTES_IN), ld64(H64(q, W_BYTES_IN)) + n);
    st64(H64(q, W_HEAD), head + span);
    if (seq % q->sample_every == 0) {
        result = PUT_SAMPLE;
        goto out;
    }
    lock_release(q, W_HEAD_HOLDER, W_HEAD_RELEASES, q->head);
    sem_post(q->items);
    result = PUT_DONE;
out:
    if (has_bv) PyBuffer_Release(&bv);
    return PyLong_FromLong(result);
}

/* get(me, tokens_index) -> (kind, bytes) | GET_*: the common case of Queue.get (_take1). */
static PyObject *fq_get(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get(me, tokens_index)");
        return NULL;
    }
    uint32_t me;
    if (get_u32(args[0], &me) < 0) return NULL;
    Py_ssize_t tokens = PyLong_AsSsize_t(args[1]);
    if (tokens == -1 && PyErr_Occurred()) return NULL;
    if (q->ring == NULL || me == 0 || tokens <= 0 ||
        (size_t)tokens >= (size_t)((unsigned char *)q->ring - (unsigned char *)q->h64) / 8)
        return PyLong_FromLong(GET_NO_TOKEN);
    if (sem_trywait(q->items) != 0) return PyLong_FromLong(GET_NO_TOKEN);
    uint64_t *tok = q->h64 + tokens;
    st64(tok, 1);
    if (!take_lock(q, q->tail, W_TAIL_HOLDER, me)) return PyLong_FromLong(GET_HAS_TOKEN);
    uint64_t cap = q->cap;
    uint64_t tail = ld64(H64(q, W_TAIL)), head = ld64(H64(q, W_HEAD));
    if (!(tail < head && head - tail <= cap) || (head | tail) & ALIGN_MASK || ld32(H32(q, W_SPACE_WAITING)))
        goto give_back;
    uint64_t off = tail % cap;
    unsigned char *rec = q->ring + off;
    uint32_t length;
    uint16_t kind, state;
    uint64_t rseq;
    memcpy(&length, rec, 4);
    memcpy(&kind, rec + 4, 2);
    memcpy(&state, rec + 6, 2);
    if (kind == REC_WRAP && state == STATE_COMMITTED) {
        tail += cap - off;
        if (tail >= head) goto give_back;
        off = 0;
        rec = q->ring;
        memcpy(&length, rec, 4);
        memcpy(&kind, rec + 4, 2);
        memcpy(&state, rec + 6, 2);
    }
    memcpy(&rseq, rec + 8, 8);
    if (state != STATE_COMMITTED || (kind != REC_MSGPACK && kind != REC_RAW)) goto give_back;
    uint64_t end = tail + span_of(length);
    if (end > head || off + REC_SIZE + length > cap) goto give_back;
    if (kind == REC_MSGPACK && length && rec[REC_SIZE] >= BIN8 && rec[REC_SIZE] <= BIN32) goto give_back;
    uint64_t seq = ld64(H64(q, W_TAIL_SEQ));
    if (rseq != seq || seq >= ld64(H64(q, W_NEXT_SEQ))) goto give_back;
    PyObject *payload = PyBytes_FromStringAndSize((const char *)rec + REC_SIZE, length);
    if (payload == NULL) {
        /* Nothing taken: the token goes back, so the message stays gettable. */
        lock_release(q, W_TAIL_HOLDER, W_TAIL_RELEASES, q->tail);
        st64(tok, 0);
        sem_post(q->items);
        return NULL;
    }
    st64(H64(q, W_TAIL_SEQ), seq + 1);
    st64(H64(q, W_TAIL), end);
    /* Statistics after the commit, as in Python (modulo 2**64 there too). */
    st64(H64(q, W_BYTES_OUT), ld64(H64(q, W_BYTES_OUT)) + length);
    st64(tok, 0);
    lock_release(q, W_TAIL_HOLDER, W_TAIL_RELEASES, q->tail);
    PyObject *k = PyLong_FromLong(kind);
    if (k == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *t = PyTuple_New(2);
    if (t == NULL) {
        Py_DECREF(k);
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, k);
    PyTuple_SET_ITEM(t, 1, payload);
    return t;
give_back:
    lock_release(q, W_TAIL_HOLDER, W_TAIL_RELEASES, q->tail);
    return PyLong_FromLong(GET_HAS_TOKEN);
}

static PyObject *fq_close(FastQueue *q, PyObject *Py_UNUSED(unused)) {
    fq_release(q);
    Py_RETURN_NONE;
}

static PyMethodDef fq_methods[] = {
    {"put", (PyCFunction)(void (*)(void))fq_put, METH_FASTCALL,
     "put(me, kind, prefix, body, n) -> 0 not taken, 1 done, 2 done with the lock held, 3 lock held"},
    {"get", (PyCFunction)(void (*)(void))fq_get, METH_FASTCALL,
     "get(me, tokens_index) -> (kind, payload), or 0 no token, 1 a token held"},
    {"close", (PyCFunction)fq_close, METH_NOARGS, "Release the mapping and the semaphore handles."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmbus._cfast.FastQueue",
    .tp_basicsize = sizeof(FastQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The Queue's single put and get in C (see _accel.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fq_init,
    .tp_dealloc = (destructor)fq_dealloc,
    .tp_methods = fq_methods,
};

static struct PyModuleDef cfast_module = {
    PyModuleDef_HEAD_INIT, "shmbus._cfast", "The Queue's hot path in C (optional).", -1, NULL,
};

PyMODINIT_FUNC PyInit__cfast(void) {
    if (PyType_Ready(&FastQueueType) < 0) return NULL;
    PyObject *m = PyModule_Create(&cfast_module);
    if (m == NULL) return NULL;
    Py_INCREF(&FastQueueType);
    if (PyModule_AddObject(m, "FastQueue", (PyObject *)&FastQueueType) < 0) {
        Py_DECREF(&FastQueueType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "RECORD_SIZE", REC_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "ALIGN", ALIGN_MASK + 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
