/*
 * shmbus._cfast: the Queue's and the Topic's hot paths in C (optional; shmbus/_accel.py loads it).
 *
 * One job: the common case of a put and a get, single or batch (FastQueue), of
 * a publish and a subscription's read (FastTopic, below), done in one call
 * each, encoding and decoding included, with exactly the stores the pure-Python
 * path makes and in the same order (shmbus/_producer.py: put/_put_locked/_publish;
 * shmbus/_consumer.py: _take1/_take; shmbus/_topic.py and shmbus/_subscription.py
 * for FastTopic). Whatever is not the common case -- a busy lock, a record that
 * wraps, a full ring, a maxsize queue, a damaged record, an ndarray message, a
 * type the codec's C parts do not take -- is handed back to Python, which checks, waits, recovers and
 * raises. So this file never waits, never raises a shmbus error, and never
 * trusts a value read from the shared file: every position is checked before
 * it is used to address memory.
 *
 * Every number of the format (header word indices, mutex offsets, the record
 * header, kinds, states, time samples), of the codec and of our calling
 * convention comes from shmbus/_format.h, which tools/gen_cheader.py writes
 * from the Python modules that define them (shmbus/_cconst.py lists them).
 * CONSTANTS hands back the values we were compiled with, and _accel.py
 * refuses us if one differs from Python's.
 *
 * Locks: the head and tail locks are robust process-shared mutexes in the
 * header (shmbus/_mutex.py); we only ever trylock them, and we release them
 * before returning (but for put_many's PUT_HELD), all inside one call made
 * with the GIL held, so no Python signal handler can run between taking a
 * lock and releasing it. A lock that needs repair (EOWNERDEAD, or its repair
 * word set) is handed to Python untouched: marked for repair, released.
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
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_format.h"

#if PY_VERSION_HEX < 0x030A0000 /* Py_NewRef is 3.10+; we support 3.9 */
static inline PyObject *Py_NewRef(PyObject *o) {
    Py_INCREF(o);
    return o;
}
#endif

#define ALIGN_MASK (ALIGN - 1)
/* The longest C spins for a message, holding the GIL (other threads of the process wait). */
#define SPIN_MAX_S 200e-6
/* put()/put_many() return written << 2 | PUT_* (see _cconst.py); put_obj may return PUT_PYTHON. */

/* Every word and mutex we address lies in the header, before any ring. */
_Static_assert(sizeof(pthread_mutex_t) <= MUTEX_SIZE, "a mutex larger than its room in the header");
_Static_assert(M_HEAD % 8 == 0 && M_TAIL % 8 == 0, "mutexes are 8-aligned");
_Static_assert(M_HEAD + MUTEX_SIZE <= HEADER_MIN && M_TAIL + MUTEX_SIZE <= HEADER_MIN, "mutex out of the header");
_Static_assert((Q_TIME_SAMPLES + 2 * TIME_SAMPLES) * 8 <= HEADER_MIN, "time samples out of the header");
_Static_assert(Q_HEAD < HEADER_MIN / 8 && Q_TAIL < HEADER_MIN / 8 && Q_NEXT_SEQ < HEADER_MIN / 8 &&
                   Q_TAIL_SEQ < HEADER_MIN / 8 && Q_BYTES_IN < HEADER_MIN / 8 && Q_BYTES_OUT < HEADER_MIN / 8,
               "u64 word out of the header");
_Static_assert(I_HEAD_REPAIR < HEADER_MIN / 4 && I_TAIL_REPAIR < HEADER_MIN / 4 &&
                   I_SPACE_WAITING < HEADER_MIN / 4,
               "u32 word out of the header");
_Static_assert(RECORD_SIZE == ALIGN && (ALIGN & ALIGN_MASK) == 0, "a record header is one alignment unit");
_Static_assert(REC_LENGTH + 4 <= RECORD_SIZE && REC_KIND + 2 <= RECORD_SIZE && REC_STATE + 2 <= RECORD_SIZE &&
                   REC_SEQ + 8 <= RECORD_SIZE,
               "record header fields out of the record header");
_Static_assert(SAMPLE_EVERY > 0 && (SAMPLE_EVERY & (SAMPLE_EVERY - 1)) == 0, "a power of two");

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* the whole mapping; held until close() */
    int has_view;
    uint64_t *h64;
    uint32_t *h32;
    unsigned char *ring;
    uint64_t cap;
    pthread_mutex_t *head, *tail; /* in the mapping */
    sem_t *items, *space;
    PyObject *last;       /* what the last get handed out (take_last: a signal's exception lost it) */
    /* The codec (set_codec): encode and decode inside put_obj/get_obj. */
    PyObject *pack;       /* packer.pack, or NULL: put_obj hands every message back */
    PyObject *unpack;     /* msgpack.unpackb, or NULL: get_obj returns (kind, payload) */
    PyObject *kwnames;    /* unpack's keyword names, and their values: */
    PyObject *kwvalues;   /* (tuple) */
    PyObject *fast_pack;   /* msgspec's encode, or NULL: for a plain_tree message, the same bytes as pack
                            */
    int plain;            /* pack is msgpack's with no options: put_objs encodes with pack_plain */
    PyObject *fast_unpack; /* msgspec's decode, or NULL: for a payload with no timestamp, as unpack */
    uint64_t max_payload; /* larger messages go to Python (MessageTooLarge) */
} FastQueue;

/* get_obj's results when it returns no message (never a decoded object). */
static PyObject *NoToken, *HasToken;
static PyObject *RecMsgpack; /* the int REC_MSGPACK, as encode_many's records carry it */

/* The crash tests' named steps (shmbus/_faults.py), at the same stores as in Python:
 * fault_hook is NULL unless a step is armed (set_fault_hook), so a step costs one
 * load and a branch never taken. The hook (_faults.hit) kills or stops the process
 * there; it never returns an error but from a broken test, which goes to
 * sys.unraisablehook: half an operation cannot be abandoned here. */
static PyObject *fault_hook;

static void fault_hit(const char *step) {
    PyObject *hook = Py_NewRef(fault_hook); /* the hook may disarm, dropping fault_hook's reference */
    PyObject *r = PyObject_CallFunction(hook, "s", step);
    if (r == NULL) PyErr_WriteUnraisable(hook);
    Py_XDECREF(r);
    Py_DECREF(hook);
}

#define FAULT(step)                                                   \
    do {                                                              \
        if (__builtin_expect(fault_hook != NULL, 0)) fault_hit(step); \
    } while (0)

static inline uint64_t ld64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t ld32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Header words by their u64 index (Q_*) or u32 index (I_*). */
#define H64(q, w) ((q)->h64 + (w))
#define H32(q, w) ((q)->h32 + (w))

static inline uint64_t span_of(uint64_t length) {
    return (RECORD_SIZE + length + ALIGN_MASK) & ~(uint64_t)ALIGN_MASK;
}

static void lock_release(pthread_mutex_t *m) { pthread_mutex_unlock(m); }

/* _recovery.Lock.try_acquire's common case: 1 if taken and sound. A lock whose
 * holder died (EOWNERDEAD) or that awaits repair is left for Python to mend:
 * its repair word set, made consistent, released. */
static int lock_take(uint32_t *h32, pthread_mutex_t *m, int repair) {
    int rc = pthread_mutex_trylock(m);
    if (rc == EOWNERDEAD) {
        st32(h32 + repair, 1); /* first: the mutex is consistent only with the word set */
        pthread_mutex_consistent(m);
        pthread_mutex_unlock(m);
        return 0;
    }
    if (rc != 0) return 0; /* EBUSY (Python waits), ENOTRECOVERABLE, EDEADLK (Python raises) */
    if (ld32(h32 + repair)) {
        pthread_mutex_unlock(m);
        return 0;
    }
    return 1;
}

static int take_lock(FastQueue *q, pthread_mutex_t *m, int repair) { return lock_take(q->h32, m, repair); }

/* _bus.record_time: message seq (a multiple of SAMPLE_EVERY) is published now. */
static void store_sample(uint64_t *h64, Py_ssize_t entry, uint64_t seq, uint64_t now) {
    uint64_t *e = h64 + Q_TIME_SAMPLES + 2 * entry;
    st64(e, SAMPLE_WRITING); /* seq last: a reader seeing the same seq around the time has a whole entry */
    st64(e + 1, now);
    st64(e, seq);
}

static void time_sample(uint64_t *h64, uint64_t seq) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    store_sample(h64, (Py_ssize_t)((seq / SAMPLE_EVERY) & 3), seq, now);
    for (int k = 1; k < TIME_SAMPLES - 3; k++) {
        if (seq % (SAMPLE_EVERY << (3 * k))) break;
        store_sample(h64, 3 + k, seq, now);
    }
}

static void record_time(FastQueue *q, uint64_t seq) { time_sample(q->h64, seq); }

static void fq_close_sems(FastQueue *q) {
    sem_t **sems[] = {&q->items, &q->space};
    for (size_t i = 0; i < 2; i++) {
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
    q->head = q->tail = NULL;
    Py_CLEAR(q->last);
    fq_close_sems(q);
    Py_CLEAR(q->pack);
    Py_CLEAR(q->unpack);
    Py_CLEAR(q->kwnames);
    Py_CLEAR(q->kwvalues);
    Py_CLEAR(q->fast_pack);
    Py_CLEAR(q->fast_unpack);
}

static void fq_dealloc(FastQueue *q) {
    fq_release(q);
    Py_TYPE(q)->tp_free((PyObject *)q);
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

/* FastQueue(mapping, ring_offset, capacity, (items, space) semaphore names). */
static int fq_init(FastQueue *q, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *buf, *names;
    Py_ssize_t ring_offset;
    unsigned long long cap;
    if (!PyArg_ParseTuple(args, "OnKO!", &buf, &ring_offset, &cap, &PyTuple_Type, &names)) return -1;
    fq_release(q);
    if (PyTuple_GET_SIZE(names) != 2) {
        PyErr_SetString(PyExc_ValueError, "two semaphore names are needed");
        return -1;
    }
    if (ring_offset < HEADER_MIN || ring_offset % 8) {
        PyErr_SetString(PyExc_ValueError, "bad ring offset");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &q->view, PyBUF_WRITABLE) < 0) return -1;
    q->has_view = 1;
    if (cap == 0 || cap % ALIGN || cap > UINT64_MAX / 4 || (uint64_t)q->view.len < (uint64_t)ring_offset + cap) {
        fq_release(q);
        PyErr_SetString(PyExc_ValueError, "mapping smaller than header + ring, or a bad capacity");
        return -1;
    }
    q->h64 = (uint64_t *)q->view.buf;
    q->h32 = (uint32_t *)q->view.buf;
    q->ring = (unsigned char *)q->view.buf + ring_offset;
    q->cap = cap;
    q->head = (pthread_mutex_t *)((char *)q->view.buf + M_HEAD);
    q->tail = (pthread_mutex_t *)((char *)q->view.buf + M_TAIL);
    if ((q->items = open_sem(PyTuple_GET_ITEM(names, 0))) == NULL ||
        (q->space = open_sem(PyTuple_GET_ITEM(names, 1))) == NULL) {
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

/* One encoded message, as _codec.Codec.encode gives it: (kind, prefix, body, n). */
typedef struct {
    uint32_t kind;
    const char *prefix, *body;
    Py_ssize_t plen, blen;
    Py_buffer view; /* when body is neither bytes nor None */
    int has_view;
} Msg;

static int msg_parse(Msg *m, PyObject *kind, PyObject *prefix, PyObject *body) {
    m->has_view = 0;
    m->body = NULL;
    m->blen = 0;
    if (get_u32(kind, &m->kind) < 0) return -1;
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "prefix must be bytes");
        return -1;
    }
    m->prefix = PyBytes_AS_STRING(prefix);
    m->plen = PyBytes_GET_SIZE(prefix);
    if (body == Py_None) return 0;
    if (PyBytes_Check(body)) {
        m->body = PyBytes_AS_STRING(body);
        m->blen = PyBytes_GET_SIZE(body);
        return 0;
    }
    if (PyObject_GetBuffer(body, &m->view, PyBUF_CONTIG_RO) < 0) return -1;
    m->has_view = 1;
    m->body = m->view.buf;
    m->blen = m->view.len;
    return 0;
}

static void msg_release(Msg *m) {
    if (m->has_view) PyBuffer_Release(&m->view);
    m->has_view = 0;
}

/* Release the first n of msgs and free the array. */
static void msgs_free(Msg *msgs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) msg_release(&msgs[i]);
    PyMem_Free(msgs);
}

/* The Msg of each (kind, prefix, body, n) of list (put_many's and publish_many's argument),
 * or NULL with an exception set; msgs_free(msgs, PyList_GET_SIZE(list)) releases them. */
static Msg *parse_msgs(PyObject *list) {
    Py_ssize_t count = PyList_GET_SIZE(list);
    Msg *msgs = PyMem_Calloc((size_t)(count ? count : 1), sizeof(Msg));
    if (msgs == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *t = PyList_GET_ITEM(list, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
            PyErr_SetString(PyExc_TypeError, "each item must be (kind, prefix, body, n)");
            msgs_free(msgs, i);
            return NULL;
        }
        if (msg_parse(&msgs[i], PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2)) < 0) {
            msgs_free(msgs, i);
            return NULL;
        }
    }
    return msgs;
}

/* Under the head lock: write as many of msgs as fit at head without a wrap,
 * publish them (counters first, head last, as _publish does) and post their
 * items tokens. Returns how many were written. */
static Py_ssize_t write_records(FastQueue *q, Msg *msgs, Py_ssize_t count) {
    uint64_t cap = q->cap;
    uint64_t head = ld64(H64(q, Q_HEAD)), tail = ld64(H64(q, Q_TAIL));
    uint64_t seq = ld64(H64(q, Q_NEXT_SEQ)), nbytes = 0;
    /* Every overflow and damaged position is left to Python's checks. */
    if (tail > head || head - tail > cap || (head | tail) & ALIGN_MASK || head > UINT64_MAX - 2 * cap ||
        seq > UINT64_MAX - (uint64_t)count)
        return 0;
    {
        /* _ring.check_room, for a single put as for a batch: head + 2 * (the spans of the whole
         * batch) <= 2**64 - 1 - 2 * cap, or Python raises CorruptBus with nothing written; so we
         * must not write the first ones. (The Python single put's inline test is as strict.) */
        uint64_t half = (UINT64_MAX - 2 * cap - head) / 2, total = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            total += span_of((uint64_t)msgs[i].plen + (uint64_t)msgs[i].blen);
            if (total > half) return 0;
        }
    }
    Py_ssize_t k = 0;
    for (; k < count; k++) {
        Msg *m = &msgs[k];
        uint64_t n = (uint64_t)m->plen + (uint64_t)m->blen;
        uint64_t span = span_of(n);
        if (n > UINT32_MAX || span > cap - head % cap || head + span - tail > cap) break; /* _ring.place != head */
        /* _ring.place's early wrap (rare: once per HOT_WINDOW bytes at most): Python writes it. */
        uint64_t used_max = 2 * span > NEAR_EMPTY ? 2 * span : NEAR_EMPTY;
        if (head % cap >= HOT_WINDOW && head - tail <= used_max && head + (cap - head % cap) + span - tail <= cap)
            break;
        unsigned char *rec = q->ring + head % cap;
        memcpy(rec + RECORD_SIZE, m->prefix, (size_t)m->plen);
        if (m->blen) memcpy(rec + RECORD_SIZE + m->plen, m->body, (size_t)m->blen);
        uint32_t len32 = (uint32_t)n;
        uint16_t kind16 = (uint16_t)m->kind, state16 = STATE_COMMITTED;
        uint64_t rseq = seq + (uint64_t)k;
        memcpy(rec + REC_LENGTH, &len32, 4);
        memcpy(rec + REC_KIND, &kind16, 2);
        memcpy(rec + REC_STATE, &state16, 2);
        memcpy(rec + REC_SEQ, &rseq, 8);
        head += span;
        nbytes += n;
        FAULT("put:after-write");
    }
    if (k) {
        st64(H64(q, Q_NEXT_SEQ), seq + (uint64_t)k);
        FAULT("put:mid-publish");
        st64(H64(q, Q_BYTES_IN), ld64(H64(q, Q_BYTES_IN)) + nbytes);
        st64(H64(q, Q_HEAD), head);
        /* One of them a multiple of SAMPLE_EVERY: a time sample (as _publish does). */
        uint64_t last = seq + (uint64_t)k - 1;
        if (last % SAMPLE_EVERY < (uint64_t)k) record_time(q, last - last % SAMPLE_EVERY);
        FAULT("put:before-post");
        for (Py_ssize_t i = 0; i < k; i++) sem_post(q->items);
    }
    return k;
}

static PyObject *put_result(Py_ssize_t written, int code) { return PyLong_FromSsize_t(written << 2 | code); }

/* Take the head lock, write what fits, and release it unless put_many has more for Python:
 * a single put that wrote nothing released the lock and goes to Python whole. */
static PyObject *put_msgs(FastQueue *q, Msg *msgs, Py_ssize_t count, int batch) {
    if (!take_lock(q, q->head, I_HEAD_REPAIR)) return put_result(0, PUT_NOT_TAKEN);
    FAULT("put:after-lock");
    Py_ssize_t k = write_records(q, msgs, count);
    if (k < count && (batch || k)) {
        PyObject *r = put_result(k, PUT_HELD);
        if (r == NULL) lock_release(q->head); /* no one else would */
        return r;
    }
    lock_release(q->head);
    return put_result(k, k ? PUT_DONE : PUT_NOT_TAKEN);
}

/* put(kind, prefix, body, n) -> written << 2 | PUT_*: Queue.put's common case. */
static PyObject *fq_put(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "put(kind, prefix, body, n)");
        return NULL;
    }
    Msg m;
    if (msg_parse(&m, args[0], args[1], args[2]) < 0) return NULL;
    PyObject *r = q->ring == NULL ? put_result(0, PUT_NOT_TAKEN) : put_msgs(q, &m, 1, 0);
    msg_release(&m);
    return r;
}

/* The types msgpack packs itself, exactly (as _codec._PLAIN_TYPES): any other goes to Python. */
static int plain_type(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    return t == &PyDict_Type || t == &PyList_Type || t == &PyTuple_Type || t == &PyUnicode_Type ||
           t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type || o == Py_None;
}

/* The depth to which plain_tree looks; deeper messages are msgpack's to encode (and refuse). */
#define PLAIN_DEPTH 32

/* 1 if o is made only of the exact types msgpack and msgspec encode to the same
 * bytes (dict, list, tuple, str, int, float, bool, None, bytes), no deeper than
 * depth: msgspec also encodes types msgpack refuses (datetime, UUID, set, Enum,
 * dataclasses...) and reads an ExtType (a tuple subclass) as an array, so only
 * these exact types are handed to it. tests/test_codec.py checks the bytes. */
static inline int plain_leaf(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    return t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type || o == Py_None ||
           t == &PyBytes_Type;
}

/* (A leaf is tested inline, before a call: most of a small message's objects are leaves.) */
static int plain_tree(PyObject *o, int depth) {
    if (plain_leaf(o)) return 1;
    if (depth <= 0) return 0;
    PyTypeObject *t = Py_TYPE(o);
    if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v))
            if ((!plain_leaf(k) && !plain_tree(k, depth - 1)) || (!plain_leaf(v) && !plain_tree(v, depth - 1)))
                return 0;
        return 1;
    }
    if (t == &PyList_Type || t == &PyTuple_Type) {
        PyObject **items = PySequence_Fast_ITEMS(o);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        for (Py_ssize_t i = 0; i < n; i++)
            if (!plain_leaf(items[i]) && !plain_tree(items[i], depth - 1)) return 0;
        return 1;
    }
    return 0;
}

/* The msgpack payload of obj (a plain_type), or NULL with no error set: Python encodes
 * it again (and raises EncodeError) or it is too large (MessageTooLarge there). */
static PyObject *encode_with(PyObject *fast_pack, PyObject *pack, uint64_t max_payload, PyObject *obj) {
    PyObject *data = NULL;
    if (fast_pack != NULL && plain_tree(obj, PLAIN_DEPTH)) {
        data = PyObject_CallOneArg(fast_pack, obj);
        if (data == NULL) PyErr_Clear(); /* msgpack decides: the same bytes, or its own error */
    }
    if (data == NULL) data = PyObject_CallOneArg(pack, obj);
    if (data == NULL || !PyBytes_Check(data) || (uint64_t)PyBytes_GET_SIZE(data) > max_payload) {
        PyErr_Clear();
        Py_XDECREF(data);
        return NULL;
    }
    return data;
}

static PyObject *encode_obj(FastQueue *q, PyObject *obj) {
    return encode_with(q->fast_pack, q->pack, q->max_payload, obj);
}

/* A bytes message as Codec.encode writes it: the msgpack bin header, then the data, copied
 * once from the caller's object (or PUT_PYTHON when it is too large: MessageTooLarge). */
static PyObject *put_bin(FastQueue *q, PyObject *data) {
    uint64_t n = (uint64_t)PyBytes_GET_SIZE(data);
    unsigned char hdr[5];
    Py_ssize_t hlen;
    if (n < 256) {
        hdr[0] = BIN8, hdr[1] = (unsigned char)n, hlen = 2;
    } else if (n < 65536) {
        hdr[0] = BIN16, hdr[1] = (unsigned char)(n >> 8), hdr[2] = (unsigned char)n, hlen = 3;
    } else {
        hdr[0] = BIN32, hlen = 5;
        for (int i = 0; i < 4; i++) hdr[1 + i] = (unsigned char)(n >> (24 - 8 * i));
    }
    if (n > UINT32_MAX || n + (uint64_t)hlen > q->max_payload) return PyLong_FromLong(PUT_PYTHON);
    Msg m = {.kind = REC_MSGPACK, .prefix = (const char *)hdr, .plen = hlen, .body = PyBytes_AS_STRING(data),
             .blen = (Py_ssize_t)n};
    return put_msgs(q, &m, 1, 0);
}

/* put_obj(obj) -> written << 2 | PUT_*, or PUT_PYTHON: Queue.put's common case,
 * encoding included (before the lock). PUT_PYTHON (nothing done, no error) when
 * the codec is not set, obj is neither bytes nor of a plain type, encoding fails (Python
 * encodes again and raises EncodeError) or the message is too large. */
static PyObject *fq_put_obj(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "put_obj(obj)");
        return NULL;
    }
    if (q->ring == NULL || q->pack == NULL) return PyLong_FromLong(PUT_PYTHON);
    if (PyBytes_CheckExact(args[0])) return put_bin(q, args[0]);
    if (!plain_type(args[0])) return PyLong_FromLong(PUT_PYTHON);
    PyObject *data = encode_obj(q, args[0]);
    if (data == NULL) return PyLong_FromLong(PUT_PYTHON);
    Msg m = {.kind = REC_MSGPACK, .prefix = PyBytes_AS_STRING(data), .plen = PyBytes_GET_SIZE(data)};
    PyObject *r = put_msgs(q, &m, 1, 0);
    Py_DECREF(data);
    return r;
}

/* encode_many(list) -> [(REC_MSGPACK, payload, None, n)...] as Codec.encode gives them, or
 * None (no error) when Python must encode the batch: one of them is not of a plain type,
 * cannot be encoded or is too large (Python raises EncodeError or MessageTooLarge). */
static PyObject *fq_encode_many(FastQueue *q, PyObject *objs) {
    if (!PyList_Check(objs)) {
        PyErr_SetString(PyExc_TypeError, "encode_many(list)");
        return NULL;
    }
    if (q->pack == NULL) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(objs);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* (the list may change under a msgspec or msgpack call: read it each time) */
        PyObject *obj = i < PyList_GET_SIZE(objs) ? Py_NewRef(PyList_GET_ITEM(objs, i)) : NULL;
        PyObject *data = obj != NULL && plain_type(obj) ? encode_obj(q, obj) : NULL;
        Py_XDECREF(obj);
        if (data == NULL || n != PyList_GET_SIZE(objs)) {
            Py_XDECREF(data);
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        /* (built by hand: Py_BuildValue's format parsing was half of this loop's own cost) */
        PyObject *item = PyTuple_New(4), *n = PyLong_FromSsize_t(PyBytes_GET_SIZE(data));
        if (item == NULL || n == NULL) {
            Py_XDECREF(item);
            Py_XDECREF(n);
            Py_DECREF(data);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(item, 0, Py_NewRef(RecMsgpack));
        PyTuple_SET_ITEM(item, 1, data);
        PyTuple_SET_ITEM(item, 2, Py_NewRef(Py_None));
        PyTuple_SET_ITEM(item, 3, n);
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* What msgpack_span needs of each type byte: bytes of data that follow it (skip), bytes of
 * a length or count that follow it (lb: the length is data to skip, or times mul objects
 * to read), and objects it holds by itself (add: a fixmap's or fixarray's). */
typedef struct {
    uint8_t skip, lb, mul, add, bad;
} SpanStep;

static SpanStep span_steps[256];

/* Fill span_steps (at import): the msgpack spec's type bytes. */
static void span_steps_init(void) {
    for (int c = 0; c < 256; c++) {
        SpanStep s = {0};
        if (c <= 0x7F || c >= 0xE0 || c == 0xC0 || c == 0xC2 || c == 0xC3)
            ; /* fixints, nil, false, true: the byte alone */
        else if (c <= 0x8F)
            s.add = (uint8_t)(2 * (c & 0x0F));
        else if (c <= 0x9F)
            s.add = (uint8_t)(c & 0x0F);
        else if (c <= 0xBF)
            s.skip = (uint8_t)(c & 0x1F);
        else
            switch (c) {
            case 0xC4: case 0xD9: s.lb = 1; break; /* bin8, str8 */
            case 0xC5: case 0xDA: s.lb = 2; break;
            case 0xC6: case 0xDB: s.lb = 4; break;
            case 0xC7: s.lb = 1, s.skip = 1; break; /* ext8: its type byte, then the data */
            case 0xC8: s.lb = 2, s.skip = 1; break;
            case 0xC9: s.lb = 4, s.skip = 1; break;
            case 0xCC: case 0xD0: s.skip = 1; break;
            case 0xCD: case 0xD1: s.skip = 2; break;
            case 0xCA: case 0xCE: case 0xD2: s.skip = 4; break;
            case 0xCB: case 0xCF: case 0xD3: s.skip = 8; break;
            case 0xD4: s.skip = 2; break; /* fixext: the type byte, then 1, 2, 4, 8 or 16 */
            case 0xD5: s.skip = 3; break;
            case 0xD6: s.skip = 5; break;
            case 0xD7: s.skip = 9; break;
            case 0xD8: s.skip = 17; break;
            case 0xDC: s.lb = 2, s.mul = 1; break; /* array16, map16: a count follows */
            case 0xDD: s.lb = 4, s.mul = 1; break;
            case 0xDE: s.lb = 2, s.mul = 2; break;
            case 0xDF: s.lb = 4, s.mul = 2; break;
            default: s.bad = 1; break; /* 0xC1: never used */
            }
        span_steps[c] = s;
    }
}

/* The length of the one msgpack object at the start of p[0:n], or 0 if p does not start
 * with a well-formed one (a bad type byte, a length past n). Only the framing is read,
 * one table look-up a type byte (both ends of put_many/get_many run it on every message). */
static size_t msgpack_span(const unsigned char *p, size_t n) {
    size_t i = 0, need = 1; /* objects still to read; each takes at least one byte */
    while (need) {
        if (i >= n || need > n - i) return 0;
        SpanStep s = span_steps[p[i++]];
        size_t skip = s.skip;
        need += (size_t)s.add - 1;
        if (__builtin_expect(s.lb | s.bad, 0)) {
            if (s.bad || n - i < s.lb) return 0;
            size_t len = 0;
            for (size_t b = 0; b < s.lb; b++) len = len << 8 | p[i + b];
            i += s.lb;
            if (s.mul)
                need += s.mul * len;
            else
                skip += len;
        }
        if (n - i < skip) return 0;
        i += skip;
    }
    return i;
}

/* A growing byte buffer: a batch's encodings, one after the other. */
typedef struct {
    unsigned char *p;
    size_t len, cap;
} Buf;

/* The buffer batches are encoded into, kept between calls (detached while in use: a fault
 * hook may run Python, which may encode another batch); freed past SPARE_MAX. */
static Buf spare;
#define SPARE_MAX (1 << 20)

/* buf_room's growth: 0, or -1 (no memory, no error set). */
static int buf_grow(Buf *b, size_t n) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < n) {
        if (cap > (size_t)PY_SSIZE_T_MAX / 2) return -1;
        cap *= 2;
    }
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* Room for n more bytes in b: 0, or -1 (no memory, no error set). */
static inline int buf_room(Buf *b, size_t n) { return b->cap - b->len >= n ? 0 : buf_grow(b, n); }

#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BE16(x) (x)
#define BE32(x) (x)
#define BE64(x) (x)
#else
#define BE16(x) __builtin_bswap16(x)
#define BE32(x) __builtin_bswap32(x)
#define BE64(x) __builtin_bswap64(x)
#endif

/* A type byte and n (0, 1, 2, 4 or 8) big-endian bytes of v (room made by the caller). */
static inline void put_be(Buf *b, unsigned char type, uint64_t v, int n) {
    unsigned char *d = b->p + b->len;
    d[0] = type;
    if (n == 1) {
        d[1] = (unsigned char)v;
    } else if (n == 2) {
        uint16_t x = BE16((uint16_t)v);
        memcpy(d + 1, &x, 2);
    } else if (n == 4) {
        uint32_t x = BE32((uint32_t)v);
        memcpy(d + 1, &x, 4);
    } else if (n == 8) {
        uint64_t x = BE64(v);
        memcpy(d + 1, &x, 8);
    }
    b->len += 1 + (size_t)n;
}

/* A header whose length or count is n: fix (its bits in the type byte) under fix_limit, else
 * the 8-bit (if t8), 16-bit or 32-bit form, as msgpack's packer chooses them. */
static inline void put_len(Buf *b, size_t n, unsigned char fix, size_t fix_limit, int t8, unsigned char t16) {
    if (n < fix_limit)
        put_be(b, (unsigned char)(fix | n), 0, 0);
    else if (t8 && n < 256)
        put_be(b, (unsigned char)(t16 - 1), n, 1);
    else if (n < 65536)
        put_be(b, t16, n, 2);
    else
        put_be(b, (unsigned char)(t16 + 1), n, 4);
}

#define PACK_OK 0
#define PACK_PYTHON 1 /* not a plain_tree message, or one msgpack refuses: Python's to encode */
#define PACK_NOMEM (-1)

static int pack_int(Buf *b, PyObject *o) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow > 0) { /* (msgpack: above 2**63 - 1, uint64 or OverflowError) */
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PACK_PYTHON;
        }
        put_be(b, 0xCF, u, 8);
        return PACK_OK;
    }
    if (overflow < 0) return PACK_PYTHON;
    if (v >= 0) { /* msgpack's pack_imp_uint64 */
        uint64_t u = (uint64_t)v;
        if (u < 128) put_be(b, (unsigned char)u, 0, 0);
        else if (u < 256) put_be(b, 0xCC, u, 1);
        else if (u < 65536) put_be(b, 0xCD, u, 2);
        else if (u < (1ULL << 32)) put_be(b, 0xCE, u, 4);
        else put_be(b, 0xCF, u, 8);
    } else if (v >= -32) { /* and pack_imp_int64 */
        put_be(b, (unsigned char)(int8_t)v, 0, 0);
    } else if (v >= -128) {
        put_be(b, 0xD0, (uint64_t)v, 1);
    } else if (v >= -32768) {
        put_be(b, 0xD1, (uint64_t)v, 2);
    } else if (v >= -2147483648LL) {
        put_be(b, 0xD2, (uint64_t)v, 4);
    } else {
        put_be(b, 0xD3, (uint64_t)v, 8);
    }
    return PACK_OK;
}

/* A str or bytes: its header (str8 as use_bin_type writes it; bin for bytes), then its data. */
static int pack_raw(Buf *b, const char *data, Py_ssize_t n, int is_str) {
    if ((uint64_t)n > UINT32_MAX) return PACK_PYTHON; /* msgpack refuses it */
    if (buf_room(b, 5 + (size_t)n) < 0) return PACK_NOMEM;
    if (is_str)
        put_len(b, (size_t)n, 0xA0, 32, 1, 0xDA);
    else
        put_len(b, (size_t)n, 0, 0, 1, 0xC5);
    memcpy(b->p + b->len, data, (size_t)n);
    b->len += (size_t)n;
    return PACK_OK;
}

/* Append the msgpack encoding of o to b if it is a scalar of plain_tree's exact types:
 * PACK_OK, PACK_PYTHON, PACK_NOMEM, or PACK_NOT_LEAF (nothing written: a container, or
 * another type). Inline: most of a small message's objects are scalars. */
#define PACK_NOT_LEAF 2
static inline int pack_leaf(Buf *b, PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    if (buf_room(b, 9) < 0) return PACK_NOMEM; /* the largest header or scalar */
    if (t == &PyUnicode_Type) {
        if (PyUnicode_IS_COMPACT_ASCII(o)) {
            Py_ssize_t n = PyUnicode_GET_LENGTH(o);
            if (n < 32) { /* fixstr: the room is there if n <= 8, else made by pack_raw */
                if (n > 8 && buf_room(b, 1 + (size_t)n) < 0) return PACK_NOMEM;
                b->p[b->len] = (unsigned char)(0xA0 | n);
                memcpy(b->p + b->len + 1, PyUnicode_DATA(o), (size_t)n);
                b->len += 1 + (size_t)n;
                return PACK_OK;
            }
            return pack_raw(b, (const char *)PyUnicode_DATA(o), n, 1);
        }
        Py_ssize_t n;
        const char *data = PyUnicode_AsUTF8AndSize(o, &n); /* (as msgpack: cached in the str) */
        if (data == NULL) {
            PyErr_Clear(); /* a lone surrogate: msgpack raises */
            return PACK_PYTHON;
        }
        return pack_raw(b, data, n, 1);
    }
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t u;
        memcpy(&u, &d, 8);
        put_be(b, 0xCB, u, 8);
        return PACK_OK;
    }
    if (t == &PyLong_Type) return pack_int(b, o);
    if (t == &PyBool_Type || o == Py_None) {
        put_be(b, o == Py_None ? 0xC0 : o == Py_True ? 0xC3 : 0xC2, 0, 0);
        return PACK_OK;
    }
    if (t == &PyBytes_Type) return pack_raw(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o), 0);
    return PACK_NOT_LEAF;
}

/* Append the msgpack encoding of o to b, byte for byte what msgpack's Packer() writes, if o
 * is made only of plain_tree's exact types, no deeper than depth (the check and the encoding
 * in one walk: no Python code runs, so nothing changes under it). */
static int pack_plain(Buf *b, PyObject *o, int depth) {
    int rc = pack_leaf(b, o);
    if (rc != PACK_NOT_LEAF) return rc;
    if (depth <= 0) return PACK_PYTHON;
    PyTypeObject *t = Py_TYPE(o);
    if (t == &PyDict_Type) {
        Py_ssize_t n = PyDict_GET_SIZE(o), pos = 0;
        PyObject *k, *v;
        if ((uint64_t)n > UINT32_MAX) return PACK_PYTHON;
        put_len(b, (size_t)n, 0x80, 16, 0, 0xDE); /* (room: pack_leaf made 9 bytes) */
        while (PyDict_Next(o, &pos, &k, &v)) {
            if ((rc = pack_leaf(b, k)) == PACK_NOT_LEAF) rc = pack_plain(b, k, depth - 1);
            if (rc != PACK_OK) return rc;
            if ((rc = pack_leaf(b, v)) == PACK_NOT_LEAF) rc = pack_plain(b, v, depth - 1);
            if (rc != PACK_OK) return rc;
        }
        return PACK_OK;
    }
    if (t == &PyList_Type || t == &PyTuple_Type) {
        PyObject **items = PySequence_Fast_ITEMS(o);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        if ((uint64_t)n > UINT32_MAX) return PACK_PYTHON;
        put_len(b, (size_t)n, 0x90, 16, 0, 0xDC);
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((rc = pack_leaf(b, items[i])) == PACK_NOT_LEAF) rc = pack_plain(b, items[i], depth - 1);
            if (rc != PACK_OK) return rc;
        }
        return PACK_OK;
    }
    return PACK_PYTHON;
}

/* The count messages of objs (a list) encoded into *b, as records (slices of b->p, which
 * must outlive them and not grow): PyMem_Free the result. NULL: some message is not a
 * plain_tree one, msgpack would refuse it or it is over max_payload, no error set (Python
 * encodes them all, and raises); NULL with an error set: no memory. The framing comes
 * with the encoding: no pass over the bytes to find where each message ends. */
static Msg *encode_batch(PyObject *objs, Py_ssize_t count, uint64_t max_payload, Buf *b) {
    Msg *msgs = PyMem_Malloc((size_t)count * sizeof(Msg)); /* (each one set below: no memset) */
    if (msgs == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    b->len = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t start = b->len;
        int rc = pack_plain(b, PyList_GET_ITEM(objs, i), PLAIN_DEPTH);
        if (rc != PACK_OK || b->len - start > max_payload) {
            PyMem_Free(msgs);
            if (rc == PACK_NOMEM) PyErr_NoMemory();
            return NULL;
        }
        msgs[i] = (Msg){.kind = REC_MSGPACK, .plen = (Py_ssize_t)(b->len - start)};
    }
    const char *p = (const char *)b->p; /* (the buffer may have moved while it grew) */
    for (Py_ssize_t i = 0; i < count; p += msgs[i].plen, i++) msgs[i].prefix = p;
    return msgs;
}

/* The records of objs, for put_objs and publish_objs: *b is the spare buffer, detached (give
 * it back with spare_return after the records are written). NULL as encode_batch. Only for
 * a codec without pack options (plain: msgpack's default bytes are the ones to write). */
static Msg *encode_objs(int plain, PyObject *objs, Py_ssize_t count, uint64_t max_payload, Buf *b) {
    *b = spare;
    spare = (Buf){0};
    if (!plain) return NULL;
    return encode_batch(objs, count, max_payload, b);
}

static void spare_return(Buf *b) {
    if (spare.p == NULL && b->cap <= SPARE_MAX) {
        spare = *b;
    } else {
        PyMem_Free(b->p);
    }
    *b = (Buf){0};
}

/* put_objs(list) -> written << 2 | PUT_*, or PUT_PYTHON: put_many's common case, encoding
 * included: a list of plain_tree messages is encoded by pack_plain into one buffer, the
 * records its slices (no object is made per message, and each one's end is known as it is
 * written). PUT_PYTHON (nothing done, no error): Python encodes and puts. */
static PyObject *fq_put_objs(FastQueue *q, PyObject *objs) {
    if (!PyList_CheckExact(objs)) {
        PyErr_SetString(PyExc_TypeError, "put_objs(list)");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(objs);
    if (q->ring == NULL || count == 0 || count > UINT32_MAX) return PyLong_FromLong(PUT_PYTHON);
    Buf b;
    Msg *msgs = encode_objs(q->plain, objs, count, q->max_payload, &b);
    /* (NULL from put_msgs: an error, raised: nothing for Python to redo) */
    PyObject *r = msgs != NULL ? put_msgs(q, msgs, count, 1) : PyErr_Occurred() ? NULL : PyLong_FromLong(PUT_PYTHON);
    PyMem_Free(msgs);
    spare_return(&b);
    return r;
}

/* put_many(list of encoded) -> written << 2 | PUT_*: put_many's common case. */
static PyObject *fq_put_many(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "put_many(list of (kind, prefix, body, n))");
        return NULL;
    }
    if (q->ring == NULL) return put_result(0, PUT_NOT_TAKEN);
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    Msg *msgs = parse_msgs(args[0]);
    if (msgs == NULL) return NULL;
    PyObject *r = put_msgs(q, msgs, count, 1);
    msgs_free(msgs, count);
    return r;
}

/* One record, as _ring.read and Queue._take check it. */
typedef struct {
    const unsigned char *payload;
    uint64_t end; /* the position after it */
    uint32_t length;
    uint16_t kind;
    uint8_t bin; /* a msgpack bin payload (a bytes message): its header's length, else 0 */
} Rec;

/* The length of the msgpack bin header of the n-byte payload p if it is one whose length
 * matches n exactly (_codec.extract_range's test: the message is its data), else 0. */
static uint8_t bin_header(const unsigned char *p, uint32_t n) {
    if (n >= 2 && p[0] == BIN8 && p[1] == n - 2) return 2;
    if (n >= 3 && p[0] == BIN16 && ((uint32_t)p[1] << 8 | p[2]) == n - 3) return 3;
    if (n >= 5 && p[0] == BIN32 &&
        ((uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4]) == n - 5)
        return 5;
    return 0;
}

/* The record at position t (tail <= t < head, head <= UINT64_MAX - 2 * cap), expected
 * to carry sequence number seq: -1 if Python would raise CorruptBus on it (or resync
 * tail_seq from it), 0 if it is sound but Python's to copy (a bytes or ndarray message),
 * 1 if sound and ours. Only the ring is addressed, whatever the header says. */
static int rec_at(FastQueue *q, uint64_t t, uint64_t head, uint64_t seq, uint64_t last, Rec *r) {
    uint64_t cap = q->cap, off = t % cap; /* a multiple of 16: the header is inside the ring */
    const unsigned char *rec = q->ring + off;
    uint32_t length;
    uint16_t kind, state;
    uint64_t rseq;
    memcpy(&kind, rec + REC_KIND, 2);
    memcpy(&state, rec + REC_STATE, 2);
    if (kind == REC_WRAP && state == STATE_COMMITTED) {
        t += cap - off; /* no overflow: t < head <= UINT64_MAX - 2 * cap */
        if (t >= head) return -1;
        off = 0;
        rec = q->ring;
        memcpy(&kind, rec + REC_KIND, 2);
        memcpy(&state, rec + REC_STATE, 2);
    }
    memcpy(&length, rec + REC_LENGTH, 4);
    memcpy(&rseq, rec + REC_SEQ, 8);
    if (state != STATE_COMMITTED || (kind != REC_MSGPACK && kind != REC_RAW && kind != REC_NDARRAY))
        return -1;
    /* Inside the ring first: then the span is at most cap, and t + span cannot overflow. */
    if (off + RECORD_SIZE + length > cap || t + span_of(length) > head || rseq != seq || rseq >= last) return -1;
    r->payload = rec + RECORD_SIZE;
    r->end = t + span_of(length);
    r->length = length;
    r->kind = kind;
    /* A msgpack bin payload (a bytes message) is copied without its header, as Python does;
     * one whose header does not match its length is Python's to decode (and refuse). */
    r->bin = kind == REC_MSGPACK ? bin_header(r->payload, length) : 0;
    if (kind == REC_NDARRAY) return 0;
    return r->bin || !(kind == REC_MSGPACK && length && rec[RECORD_SIZE] >= BIN8 && rec[RECORD_SIZE] <= BIN32);
}

/* (kind, payload), or (kind, (payload,)) for a bytes message; steals payload. Built by hand:
 * Py_BuildValue's format parsing was a fifth of a small message's get_many. */
static PyObject *record_tuple(uint16_t kind, PyObject *payload, int bin) {
    if (bin) {
        PyObject *one = PyTuple_New(1);
        if (one == NULL) {
            Py_DECREF(payload);
            return NULL;
        }
        PyTuple_SET_ITEM(one, 0, payload);
        payload = one;
    }
    PyObject *k = PyLong_FromLong(kind), *t = k == NULL ? NULL : PyTuple_New(2);
    if (t == NULL) {
        Py_XDECREF(k);
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, k);
    PyTuple_SET_ITEM(t, 1, payload);
    return t;
}

/* Under the tail lock, holding k items tokens (recorded at *tok): copy out up to k
 * records of the common case into out (a list, or NULL for one record returned
 * through *one) and commit them. Returns how many, or -1 with an exception set
 * (MemoryError) and nothing committed.
 *
 * Python takes the tokens we leave with Queue._take, which raises CorruptBus, with
 * nothing consumed, on a damaged record among the k: so first look at all k, and
 * take none if one is damaged (committing the first ones would lose them: Python
 * raises past them). Ours are then the leading records we can copy. */
/* A batch copied out in one piece (get_many's common case): the payloads of its records one
 * after the other behind a msgpack array32 header, so that one decoder call makes the list
 * of messages (a msgpack array is its items' encodings in a row), with no object per record. */
typedef struct {
    PyObject *bytes;  /* header + payloads; NULL: the records went out one by one */
    uint32_t *lens;   /* each payload's length (PyMem) */
    Py_ssize_t n;     /* the records in it */
    uint64_t used;    /* payload bytes copied: less than reserved if a record changed meanwhile */
} Batch;

#define ARRAY32_HEADER 5

static void batch_free(Batch *b) {
    Py_CLEAR(b->bytes);
    PyMem_Free(b->lens);
    b->lens = NULL;
    b->n = 0;
}

/* Copy ours records (all msgpack, none a bytes message: total payload bytes), as the scan
 * under this lock found them (seen: their places in the ring, checked then; a record is
 * not looked at twice), into b; advances *tailp and *seqp. -1 (MemoryError): nothing copied. */
static Py_ssize_t copy_batch(const Rec *seen, Py_ssize_t ours, uint64_t total, uint64_t *tailp, uint64_t *seqp,
                             uint64_t *nbytes, Batch *b) {
    b->lens = PyMem_Malloc((size_t)ours * sizeof(uint32_t));
    b->bytes = b->lens == NULL ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(ARRAY32_HEADER + total));
    if (b->bytes == NULL) {
        if (b->lens == NULL) PyErr_NoMemory();
        batch_free(b);
        return -1;
    }
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(b->bytes) + ARRAY32_HEADER;
    Py_ssize_t j = 0;
    for (; j < ours; j++) {
        const Rec *r = &seen[j];
        memcpy(dst + b->used, r->payload, r->length); /* (the lengths add up to total) */
        b->lens[j] = r->length;
        b->used += r->length;
        *nbytes += r->length;
        *tailp = r->end;
        (*seqp)++;
    }
    b->n = j;
    dst[-5] = 0xDD;
    for (int i = 0; i < 4; i++) dst[-4 + i] = (unsigned char)((uint64_t)j >> (24 - 8 * i));
    return j;
}

static Py_ssize_t take_records(FastQueue *q, Py_ssize_t k, uint64_t *tok, PyObject *out, PyObject **one,
                               Batch *batch) {
    uint64_t cap = q->cap;
    uint64_t tail = ld64(H64(q, Q_TAIL)), head = ld64(H64(q, Q_HEAD));
    /* _ring.check_positions, as Queue._take does (the top bound keeps every sum below from overflowing). */
    if (tail > head || head - tail > cap || (head | tail) & ALIGN_MASK || head > UINT64_MAX - 2 * cap)
        return 0;
    uint64_t seq = ld64(H64(q, Q_TAIL_SEQ));
    uint64_t last = ld64(H64(q, Q_NEXT_SEQ)); /* loaded after head, which producers store after it */
    Rec r;
    Py_ssize_t ours = 0, i = 0;
    uint64_t total = 0; /* payload bytes of ours, if all go in one batch */
    /* (ours as the scan finds them, for copy_batch; without the memory, one by one below) */
    Rec *seen = batch != NULL && k > 1 ? PyMem_Malloc((size_t)k * sizeof(Rec)) : NULL;
    int whole = seen != NULL;
    for (uint64_t t = tail, s = seq; i < k && t != head; i++, s++, t = r.end) {
        int v = rec_at(q, t, head, s, last, &r);
        if (v < 0) {
            PyMem_Free(seen);
            return 0;
        }
        if (v > 0 && ours == i) {
            if (seen != NULL) seen[ours] = r;
            ours++;
            whole = whole && r.kind == REC_MSGPACK && !r.bin;
            total += r.length; /* (at most cap per record: no overflow) */
        }
    }
    uint64_t nbytes = 0;
    Py_ssize_t j = 0;
    if (whole && ours > 1) {
        j = copy_batch(seen, ours, total, &tail, &seq, &nbytes, batch);
        if (j < 0) {
            PyMem_Free(seen);
            return -1;
        }
        ours = 0; /* (the loop below has nothing left to do) */
    }
    PyMem_Free(seen);
    for (; j < ours; j++) {
        if (rec_at(q, tail, head, seq, last, &r) <= 0) break; /* changed meanwhile: a hostile writer */
        /* (a bytes message as _codec.extract gives it: its data, in a 1-tuple: already final) */
        PyObject *payload = PyBytes_FromStringAndSize((const char *)r.payload + r.bin, r.length - r.bin);
        PyObject *item = payload == NULL ? NULL : record_tuple(r.kind, payload, r.bin);
        if (item == NULL || (out != NULL && PyList_Append(out, item) < 0)) {
            Py_XDECREF(item);
            Py_XDECREF(*one);
            *one = NULL;
            return -1;
        }
        if (out != NULL)
            Py_DECREF(item);
        else
            *one = item;
        tail = r.end;
        seq++;
        nbytes += r.length;
        if (out == NULL) { /* one record at most */
            j++;
            break;
        }
    }
    if (j) {
        FAULT("get:after-copy");
        st64(H64(q, Q_TAIL_SEQ), seq);
        FAULT("get:mid-commit");
        st64(H64(q, Q_TAIL), tail);
        /* Statistics after the commit, as in Python (modulo 2**64 there too); then the tokens field. */
        st64(H64(q, Q_BYTES_OUT), ld64(H64(q, Q_BYTES_OUT)) + nbytes);
        st64(tok, (uint64_t)(k - j));
        FAULT("get:before-unlock");
        if (ld32(H32(q, I_SPACE_WAITING))) {
            st32(H32(q, I_SPACE_WAITING), 0);
            sem_post(q->space);
        }
    }
    return j;
}

/* Poll the items semaphore for up to spin_s seconds, yielding the CPU between
 * polls (as _sync.Sem.spin_acquire does, and for the same reason: the process
 * we wait for may need this core). The GIL stays held: this is bounded by the
 * handle's spin (50 us by default) and by SPIN_MAX_S, well under the
 * interpreter's switch interval; Python spins (without the GIL) for the rest. */
static int spin_for_token(FastQueue *q, double spin_s) {
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long ns = (long long)(spin_s * 1e9);
    end.tv_sec += ns / 1000000000LL;
    end.tv_nsec += ns % 1000000000LL;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    for (;;) {
        int value;
        if (sem_getvalue(q->items, &value) == 0 && value > 0 && sem_trywait(q->items) == 0) return 1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec >= end.tv_nsec)) return 0;
        sched_yield();
    }
}

/* Hand n items tokens back (nothing was consumed with them) and clear the tokens
 * field if it was recorded: for an error, after which Python cannot learn how many
 * tokens it held. */
static void give_back(FastQueue *q, uint64_t *tok, Py_ssize_t n) {
    if (q->items != NULL)
        for (Py_ssize_t i = 0; i < n; i++) sem_post(q->items);
    if (tok != NULL) st64(tok, 0);
}

/* Take up to max tokens (have already held) and the tail lock, then take_records.
 * Returns the records taken (list or one tuple, or None for none) and sets *left to
 * the tokens still held for Python and *tokp to the tokens field they are recorded
 * in (NULL: not recorded); NULL on error, every token given back. */
static PyObject *take(FastQueue *q, PyObject *const *args, Py_ssize_t have, Py_ssize_t max, int many,
                      double spin_s, Py_ssize_t *left, uint64_t **tokp, Batch *batch) {
    Py_ssize_t tokens;
    *left = -1;
    *tokp = NULL;
    if ((tokens = PyLong_AsSsize_t(args[0])) == -1 && PyErr_Occurred()) {
        give_back(q, NULL, have);
        return NULL;
    }
    *left = have;
    if (q->ring == NULL || tokens <= 0 ||
        (size_t)tokens >= (size_t)(q->ring - (unsigned char *)q->h64) / 8)
        return Py_NewRef(Py_None);
    Py_ssize_t k = have;
    while (k < max && sem_trywait(q->items) == 0) k++;
    if (k == 0 && max > 0 && spin_s > 0 && spin_for_token(q, spin_s)) k = 1;
    while (k < max && sem_trywait(q->items) == 0) k++;
    *left = k;
    if (k == 0) return Py_NewRef(Py_None);
    uint64_t *tok = q->h64 + tokens;
    st64(tok, (uint64_t)k);
    *tokp = tok;
    FAULT("get:after-token");
    if (!take_lock(q, q->tail, I_TAIL_REPAIR)) return Py_NewRef(Py_None);
    FAULT("get:after-lock");
    PyObject *out = many ? PyList_New(0) : NULL, *one = NULL;
    Py_ssize_t j = many && out == NULL ? -1 : take_records(q, k, tok, out, &one, batch);
    if (j < 0) {
        /* Nothing was committed: every token goes back (before the unlock, as in
         * Queue._take), so no message is stranded. */
        Py_XDECREF(out);
        give_back(q, tok, k);
        lock_release(q->tail);
        *left = -1;
        *tokp = NULL;
        return NULL;
    }
    lock_release(q->tail);
    *left = k - j;
    if (many) return out;
    return one != NULL ? one : Py_NewRef(Py_None);
}

static int get_spin(PyObject *o, double *spin_s) {
    *spin_s = PyFloat_AsDouble(o);
    if (*spin_s == -1.0 && PyErr_Occurred()) return -1;
    if (*spin_s != *spin_s) *spin_s = 0.0; /* NaN: no spin, as in _sync.Sem.spin_acquire */
    if (*spin_s > SPIN_MAX_S) *spin_s = SPIN_MAX_S; /* the GIL is held: Python spins the rest */
    return 0;
}

/* Keep a new reference to what a get hands out, until the next get: if a signal
 * handler's exception is raised as the call returns (CPython runs handlers right
 * after a call), Python takes it back with take_last instead of losing it. */
static PyObject *keep_last(FastQueue *q, PyObject *out) {
    if (out != NULL) Py_XSETREF(q->last, Py_NewRef(out));
    return out;
}

/* 1 if the msgpack payload p may hold a timestamp (an ext of type -1, the byte 0xff right
 * after an ext header), which msgspec would decode as a datetime where msgpack gives a
 * Timestamp. False alarms (0xff inside a string, say) only send the payload to msgpack. */
static int may_hold_timestamp(const unsigned char *p, Py_ssize_t n) {
    const unsigned char *end = p + n, *x = p;
    while ((x = memchr(x, 0xFF, (size_t)(end - x))) != NULL) {
        Py_ssize_t j = x - p;
        if ((j >= 1 && x[-1] >= 0xD4 && x[-1] <= 0xD8) || (j >= 2 && x[-2] == 0xC7) || (j >= 3 && x[-3] == 0xC8) ||
            (j >= 5 && x[-5] == 0xC9))
            return 1;
        x++;
    }
    return 0;
}

/* After a failed decode: 0 (error cleared) if it was the decoder's, -1 (error kept) if it
 * was a signal handler's (KeyboardInterrupt, SystemExit: not an Exception), which an ext
 * hook's Python code may let run: that one must reach the caller, not be lost. */
static int decode_failed(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyErr_Clear();
    return 0;
}

/* A msgpack payload decoded as Codec.finish would (msgspec when it can, else msgpack's
 * unpackb); NULL with no error set: Python decodes it again (and raises DecodeError);
 * NULL with an error set: a signal handler's exception (decode_failed). */
static PyObject *decode_with(PyObject *fast_unpack, PyObject *unpack, PyObject *kwnames, PyObject *kwvalues,
                             PyObject *payload) {
    PyObject *msg = NULL;
    if (fast_unpack != NULL &&
        !may_hold_timestamp((const unsigned char *)PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))) {
        msg = PyObject_CallOneArg(fast_unpack, payload);
        /* msgpack decides: the same message, or its own error */
        if (msg == NULL && decode_failed() < 0) return NULL;
    }
    if (msg == NULL) {
        PyObject *argv[3] = {payload, PyTuple_GET_ITEM(kwvalues, 0), PyTuple_GET_ITEM(kwvalues, 1)};
        msg = PyObject_Vectorcall(unpack, argv, 1, kwnames);
        if (msg == NULL) decode_failed();
    }
    return msg;
}

static PyObject *decode_payload(FastQueue *q, PyObject *payload) {
    return decode_with(q->fast_unpack, q->unpack, q->kwnames, q->kwvalues, payload);
}

/* get_obj(tokens_index, spin_s) -> message | NoToken | HasToken | (kind, payload):
 * get's common case, decoding included (after the lock). A (kind, payload) tuple
 * is for Python to decode (no codec set, or decoding failed: Python decodes again
 * and raises DecodeError); a decoded message is never a tuple, since the codec
 * C decodes with has the default use_list. */
static PyObject *fq_get_obj(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_obj(tokens_index, spin_s)");
        return NULL;
    }
    Py_CLEAR(q->last);
    double spin_s;
    if (get_spin(args[1], &spin_s) < 0) return NULL;
    Py_ssize_t left;
    uint64_t *tok;
    PyObject *got = take(q, args, 0, 1, 0, spin_s, &left, &tok, NULL);
    if (got == NULL) return NULL;
    if (got == Py_None) {
        Py_DECREF(got);
        return Py_NewRef(left ? HasToken : NoToken);
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(got, 0));
    PyObject *payload = PyTuple_GET_ITEM(got, 1);
    if (kind == REC_RAW || PyTuple_Check(payload)) {
        /* a raw record's message is its bytes; a bytes message's, its data (in a 1-tuple) */
        PyObject *msg = Py_NewRef(kind == REC_RAW ? payload : PyTuple_GET_ITEM(payload, 0));
        Py_DECREF(got);
        return keep_last(q, msg);
    }
    if (q->unpack == NULL) return keep_last(q, got);
    PyObject *msg = decode_payload(q, payload);
    if (msg == NULL) {
        keep_last(q, got); /* (a handler's exception: Python keeps the record with take_last) */
        if (!PyErr_Occurred()) return got;
        Py_DECREF(got);
        return NULL;
    }
    Py_DECREF(got);
    return keep_last(q, msg);
}

/* take_last() -> what the last get_obj or take_many handed out, or None; forgets it. */
static PyObject *fq_take_last(FastQueue *q, PyObject *Py_UNUSED(unused)) {
    PyObject *last = q->last;
    q->last = NULL;
    return last != NULL ? last : Py_NewRef(Py_None);
}

/* set_codec(pack, unpack, unpack_kwargs, max_payload, fast_pack, fast_unpack, plain): what
 * put_obj/get_obj encode and decode with; pack None or unpack None turns that side off,
 * fast_pack or fast_unpack None leaves it to pack or unpack; plain true: pack is msgpack's
 * with no options, so a batch may be encoded by pack_plain instead. */
/* set_codec's work for FastQueue and FastTopic alike: parse args, store them in the fields. */
static PyObject *set_codec_into(PyObject *args, PyObject **pack_f, PyObject **unpack_f, PyObject **kwnames_f,
                                PyObject **kwvalues_f, PyObject **fast_pack_f, PyObject **fast_unpack_f,
                                uint64_t *max_payload_f, int *plain_f) {
    PyObject *pack, *unpack, *kw, *fast_pack = Py_None, *fast_unpack = Py_None;
    unsigned long long max_payload;
    int plain = 0;
    if (!PyArg_ParseTuple(args, "OOO!K|OOp", &pack, &unpack, &PyDict_Type, &kw, &max_payload, &fast_pack,
                          &fast_unpack, &plain))
        return NULL;
    if (PyDict_GET_SIZE(kw) != 2) {
        PyErr_SetString(PyExc_ValueError, "unpack_kwargs: two keyword arguments");
        return NULL;
    }
    PyObject *names = PyTuple_New(2), *values = PyTuple_New(2), *k, *v;
    if (names == NULL || values == NULL) {
        Py_XDECREF(names);
        Py_XDECREF(values);
        return NULL;
    }
    Py_ssize_t pos = 0, i = 0;
    while (PyDict_Next(kw, &pos, &k, &v)) {
        PyTuple_SET_ITEM(names, i, Py_NewRef(k));
        PyTuple_SET_ITEM(values, i, Py_NewRef(v));
        i++;
    }
    Py_XSETREF(*pack_f, pack == Py_None ? NULL : Py_NewRef(pack));
    Py_XSETREF(*unpack_f, unpack == Py_None ? NULL : Py_NewRef(unpack));
    Py_XSETREF(*fast_pack_f, fast_pack == Py_None || *pack_f == NULL ? NULL : Py_NewRef(fast_pack));
    Py_XSETREF(*fast_unpack_f, fast_unpack == Py_None || *unpack_f == NULL ? NULL : Py_NewRef(fast_unpack));
    Py_XSETREF(*kwnames_f, names);
    Py_XSETREF(*kwvalues_f, values);
    *max_payload_f = max_payload;
    *plain_f = plain && *pack_f != NULL;
    Py_RETURN_NONE;
}

static PyObject *fq_set_codec(FastQueue *q, PyObject *args) {
    return set_codec_into(args, &q->pack, &q->unpack, &q->kwnames, &q->kwvalues, &q->fast_pack, &q->fast_unpack,
                          &q->max_payload, &q->plain);
}

/* After the lock: replace each msgpack record of recs by its message, each raw record by
 * its bytes, as Codec.finish_many would; a record that fails stays, for Python to decode
 * again (and raise). A message is never a tuple (see get_obj), a record always is.
 * -1 (error set) if a signal handler's exception came meanwhile. */
static int decode_records(FastQueue *q, PyObject *recs) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(recs); i++) {
        PyObject *rec = PyList_GET_ITEM(recs, i);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(rec, 0));
        PyObject *payload = PyTuple_GET_ITEM(rec, 1);
        PyObject *msg = NULL;
        if (kind == REC_RAW || PyTuple_Check(payload))
            msg = Py_NewRef(kind == REC_RAW ? payload : PyTuple_GET_ITEM(payload, 0));
        else if (kind == REC_MSGPACK && (msg = decode_payload(q, payload)) == NULL && PyErr_Occurred())
            return -1; /* a signal handler's exception: the rest stay records */
        if (msg != NULL) PyList_SetItem(recs, i, msg); /* drops rec */
    }
    return 0;
}

/* The records of a batch as take_records gives them one by one: [(REC_MSGPACK, payload)...]. */
static PyObject *batch_records(const Batch *b) {
    PyObject *out = PyList_New(b->n);
    const char *p = PyBytes_AS_STRING(b->bytes) + ARRAY32_HEADER;
    for (Py_ssize_t i = 0; out != NULL && i < b->n; p += b->lens[i], i++) {
        PyObject *payload = PyBytes_FromStringAndSize(p, b->lens[i]);
        PyObject *item = payload == NULL ? NULL : record_tuple(REC_MSGPACK, payload, 0);
        if (item == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* Short ASCII strings decoded before, by their bytes: a batch's keys and repeated values
 * are made once, not once a message (as unpickling a list shares them through its memo).
 * A str is immutable: sharing one between messages changes nothing a user can see. */
#define STR_CACHE 512
#define STR_CACHE_MAX 16
typedef struct {
    uint64_t head, tail; /* the string's first and last 8 bytes (all of them if fewer) */
    size_t n;
    PyObject *s;
} CachedStr;
static CachedStr str_cache[STR_CACHE];

/* The str of the n bytes at p (base: the start of the buffer they are in). */
static PyObject *dec_str(const unsigned char *p, size_t n, const unsigned char *base) {
    if (n <= STR_CACHE_MAX) {
        uint64_t head = 0, tail = 0; /* (two words name the string: no memcmp) */
        if (n >= 8) {
            memcpy(&head, p, 8);
            memcpy(&tail, p + n - 8, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        } else if (n && (size_t)(p - base) >= 8 - n) { /* the 8 bytes that end with them: no loop */
            memcpy(&head, p + n - 8, 8);
            head >>= 8 * (8 - n); /* (as the loop below reads them: p[0] lowest) */
#endif
        } else {
            for (size_t i = 0; i < n; i++) head |= (uint64_t)p[i] << (8 * i);
        }
        if (!((head | tail) & 0x8080808080808080ULL)) { /* ASCII */
            uint64_t h = (head * 0x9E3779B97F4A7C15ULL) ^ (tail * 0xC2B2AE3D27D4EB4FULL) ^ n;
            CachedStr *c = &str_cache[(h >> 40) & (STR_CACHE - 1)];
            if (c->s != NULL && c->n == n && c->head == head && c->tail == tail) return Py_NewRef(c->s);
            PyObject *s = PyUnicode_New((Py_ssize_t)n, 127);
            if (s == NULL) return NULL;
            memcpy(PyUnicode_DATA(s), p, n);
            PyObject *old = c->s;
            *c = (CachedStr){.head = head, .tail = tail, .n = n, .s = Py_NewRef(s)};
            Py_XDECREF(old);
            return s;
        }
    }
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL); /* (strict, as msgpack) */
}

/* A reader over one payload. */
typedef struct {
    const unsigned char *p, *end;
    const unsigned char *base; /* the start of the buffer p is in */
    int short_read;            /* a number ran past the end: the payload fails */
} Rd;

/* The next n bytes of r as a big-endian number; 0 (and r->short_read set) if fewer are left. */
static inline uint64_t rd_be(Rd *r, size_t n) {
    uint64_t v = 0;
    if ((size_t)(r->end - r->p) < n) {
        r->short_read = 1;
        return 0;
    }
    if (n == 1) {
        v = r->p[0];
    } else if (n == 2) {
        uint16_t x;
        memcpy(&x, r->p, 2);
        v = BE16(x);
    } else if (n == 4) {
        uint32_t x;
        memcpy(&x, r->p, 4);
        v = BE32(x);
    } else {
        memcpy(&v, r->p, 8);
        v = BE64(v);
    }
    r->p += n;
    return v;
}

static PyObject *dec_plain(Rd *r, int depth);

static PyObject *dec_array(Rd *r, uint64_t n, int depth) {
    if (depth <= 0 || n > (uint64_t)(r->end - r->p)) return NULL; /* (each item takes a byte) */
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (uint64_t i = 0; list != NULL && i < n; i++) {
        PyObject *item = dec_plain(r, depth - 1);
        if (item == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static PyObject *dec_map(Rd *r, uint64_t n, int depth) {
    if (depth <= 0 || n > (uint64_t)(r->end - r->p) / 2) return NULL;
    PyObject *d = PyDict_New();
    for (uint64_t i = 0; d != NULL && i < n; i++) {
        PyObject *k = dec_plain(r, depth - 1), *v = NULL;
        /* (an array or map key: msgpack raises, and Codec.finish decides: Python's) */
        if (k != NULL && !PyList_CheckExact(k) && !PyDict_CheckExact(k)) v = dec_plain(r, depth - 1);
        if (v == NULL || PyDict_SetItem(d, k, v) < 0) Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return d;
}

/* The next object of r as msgpack's unpackb (the plain codec's options) gives it, if it
 * is made of nil, bool, int, float, str, bin, array and map only, no deeper than depth;
 * NULL, error set or not, otherwise (an ext, a malformed object): the batch is decoded
 * as before. No Python code runs, so no exception but MemoryError comes from here. */
static PyObject *dec_plain(Rd *r, int depth) {
    if (r->p >= r->end) return NULL;
    unsigned c = *r->p++;
    if (c <= 0x7F) return PyLong_FromLong((long)c);
    if (c >= 0xE0) return PyLong_FromLong((long)(int8_t)c);
    if (c <= 0x8F) return dec_map(r, c & 0x0F, depth);
    if (c <= 0x9F) return dec_array(r, c & 0x0F, depth);
    uint64_t n;
    if (c <= 0xBF) {
        n = c & 0x1F;
        goto str;
    }
    switch (c) {
    case 0xC0: return Py_NewRef(Py_None);
    case 0xC2: return Py_NewRef(Py_False);
    case 0xC3: return Py_NewRef(Py_True);
    case 0xC4: case 0xC5: case 0xC6: /* bin 8, 16, 32 */
        n = rd_be(r, (size_t)1 << (c - 0xC4));
        if (r->short_read || n > (uint64_t)(r->end - r->p)) return NULL;
        r->p += n;
        return PyBytes_FromStringAndSize((const char *)r->p - n, (Py_ssize_t)n);
    case 0xCA: {
        uint32_t u = (uint32_t)rd_be(r, 4);
        float f;
        memcpy(&f, &u, 4);
        return r->short_read ? NULL : PyFloat_FromDouble((double)f);
    }
    case 0xCB: {
        uint64_t u = rd_be(r, 8);
        double d;
        memcpy(&d, &u, 8);
        return r->short_read ? NULL : PyFloat_FromDouble(d);
    }
    case 0xCC: case 0xCD: case 0xCE: case 0xCF: /* uint 8 to 64 */
        n = rd_be(r, (size_t)1 << (c - 0xCC));
        return r->short_read ? NULL : PyLong_FromUnsignedLongLong(n);
    case 0xD0: case 0xD1: case 0xD2: case 0xD3: { /* int 8 to 64: sign-extended */
        int bits = 8 << (c - 0xD0);
        n = rd_be(r, (size_t)bits / 8);
        if (r->short_read) return NULL;
        int64_t v = bits == 64 ? (int64_t)n : (int64_t)(n ^ (1ULL << (bits - 1))) - (int64_t)(1ULL << (bits - 1));
        return PyLong_FromLongLong(v);
    }
    case 0xD9: case 0xDA: case 0xDB: /* str 8, 16, 32 */
        n = rd_be(r, (size_t)1 << (c - 0xD9));
        goto str;
    case 0xDC: case 0xDD:
        n = rd_be(r, c == 0xDC ? 2 : 4);
        return r->short_read ? NULL : dec_array(r, n, depth);
    case 0xDE: case 0xDF:
        n = rd_be(r, c == 0xDE ? 2 : 4);
        return r->short_read ? NULL : dec_map(r, n, depth);
    default: return NULL; /* ext (msgpack's ExtType or Timestamp), 0xC1 */
    }
str:
    if (r->short_read || n > (uint64_t)(r->end - r->p)) return NULL;
    r->p += n;
    return dec_str(r->p - n, (size_t)n, r->base);
}

/* The messages of a batch decoded record by record in C (each record exactly one object,
 * as decode_payload requires), or NULL: some record is not plain_tree's, or is damaged
 * (no error set: batch_messages decodes as before), or an error (set). */
static PyObject *batch_plain(const Batch *b) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(b->bytes) + ARRAY32_HEADER;
    PyObject *msgs = PyList_New(b->n);
    for (Py_ssize_t i = 0; msgs != NULL && i < b->n; p += b->lens[i], i++) {
        Rd r = {p, p + b->lens[i], (const unsigned char *)PyBytes_AS_STRING(b->bytes), 0};
        PyObject *msg = dec_plain(&r, PLAIN_DEPTH);
        if (msg != NULL && (r.p != r.end || r.short_read)) Py_CLEAR(msg); /* (more than one object: Python's to refuse) */
        if (msg == NULL) Py_CLEAR(msgs);
        else PyList_SET_ITEM(msgs, i, msg);
    }
    return msgs;
}

/* The messages of a batch (*done = 1): decoded by C itself when every record is a plain one
 * (batch_plain: nil, bool, int, float, str, bin, array and map, as the plain codec's unpackb
 * gives them), else by one call over its bytes: msgspec's when
 * installed and no payload may hold a timestamp, else msgpack's unpackb, with the keywords
 * decode_with gives it. Only when each payload is exactly one msgpack object: then the array
 * holds exactly the batch's messages, each decoded as decode_payload would (one more level
 * of nesting, and length limits from the whole buffer, which a well-formed object within its
 * payload never reaches). Otherwise, or if the call fails, its records, for decode_records
 * (which decides each as before); with *failed = 1 and the error set if a signal handler's
 * exception came (the records are for take_last). */
static PyObject *batch_messages(FastQueue *q, const Batch *b, int *done, int *failed) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(b->bytes) + ARRAY32_HEADER;
    int one_call = b->used == (uint64_t)(PyBytes_GET_SIZE(b->bytes) - ARRAY32_HEADER);
    if (one_call) { /* the common batch: C decodes it itself; else one decoder call, as below */
        PyObject *msgs = batch_plain(b);
        if (msgs != NULL) {
            *done = 1;
            return msgs;
        }
        PyErr_Clear(); /* (no memory: the way below meets it again, and says so) */
    }
    int fast = q->fast_unpack != NULL;
    for (Py_ssize_t i = 0; one_call && i < b->n; p += b->lens[i], i++)
        one_call = msgpack_span(p, b->lens[i]) == b->lens[i];
    p = (const unsigned char *)PyBytes_AS_STRING(b->bytes) + ARRAY32_HEADER;
    for (Py_ssize_t i = 0; one_call && fast && i < b->n; p += b->lens[i], i++)
        fast = !may_hold_timestamp(p, b->lens[i]);
    if (one_call) {
        PyObject *argv[3] = {b->bytes, PyTuple_GET_ITEM(q->kwvalues, 0), PyTuple_GET_ITEM(q->kwvalues, 1)};
        PyObject *msgs = fast ? PyObject_CallOneArg(q->fast_unpack, b->bytes)
                              : PyObject_Vectorcall(q->unpack, argv, 1, q->kwnames);
        if (msgs != NULL && PyList_CheckExact(msgs) && PyList_GET_SIZE(msgs) == b->n) {
            *done = 1;
            return msgs;
        }
        if (msgs == NULL && decode_failed() < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *recs = batch_records(b);
            if (recs == NULL) PyErr_Clear(); /* (no memory for them: the handler's exception wins) */
            PyErr_Restore(type, value, tb);
            *failed = 1;
            return recs;
        }
        Py_XDECREF(msgs);
    }
    return batch_records(b);
}

/* take_many(tokens_index, have, max, spin_s) -> (list of (kind, payload), tokens still held):
 * get_many's common case; have is 0 or the one token the caller waited for;
 * with none, it polls up to spin_s seconds for the first. */
static PyObject *take_many(FastQueue *q, PyObject *const *args, Py_ssize_t nargs, int decode) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "take_many(tokens_index, have, max, spin_s)");
        return NULL;
    }
    Py_CLEAR(q->last);
    double spin_s;
    if (get_spin(args[3], &spin_s) < 0) return NULL;
    Py_ssize_t have = PyLong_AsSsize_t(args[1]), max = PyLong_AsSsize_t(args[2]);
    if ((have == -1 || max == -1) && PyErr_Occurred()) return NULL;
    if (have < 0 || max < have) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= have <= max");
        return NULL;
    }
    Py_ssize_t left;
    uint64_t *tok;
    Batch batch = {0};
    int in_one = decode && q->unpack != NULL;
    PyObject *got = take(q, args, have, max, 1, spin_s, &left, &tok, in_one ? &batch : NULL);
    if (got == NULL) return NULL;
    if (got == Py_None) {
        Py_DECREF(got);
        got = PyList_New(0);
    }
    int done = 0, failed = 0; /* every message decoded, from the batch; a handler's exception */
    if (got != NULL && batch.bytes != NULL) Py_SETREF(got, batch_messages(q, &batch, &done, &failed));
    batch_free(&batch);
    if (failed && got == NULL) return NULL; /* (the exception set; the records could not be kept) */
    failed = failed || (got != NULL && decode && q->unpack != NULL && !done && decode_records(q, got) < 0);
    if (got != NULL && PyList_GET_SIZE(got)) keep_last(q, got);
    if (failed) Py_CLEAR(got); /* Python keeps them (take_last) and sees the handler's exception */
    Py_ssize_t undecoded = 0; /* records left for Python to decode (take_many_obj's third item) */
    for (Py_ssize_t i = 0; got != NULL && i < PyList_GET_SIZE(got); i++)
        undecoded += PyTuple_CheckExact(PyList_GET_ITEM(got, i));
    PyObject *r = got == NULL ? NULL
                  : decode    ? Py_BuildValue("(Nnn)", got, left, undecoded)
                              : Py_BuildValue("(Nn)", got, left);
    /* Python cannot learn how many tokens it held: hand them back here (the records
     * taken, if any, are lost, as in Python when a MemoryError follows a commit). */
    if (r == NULL) give_back(q, tok, left);
    return r;
}

static PyObject *fq_take_many(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    return take_many(q, args, nargs, 0);
}

/* take_many_obj(tokens_index, have, max, spin_s) -> (messages and records, tokens still held,
 * how many records are left for Python to decode):
 * take_many, with what it took decoded after the lock (decode_records); get_many's common case. */
static PyObject *fq_take_many_obj(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    return take_many(q, args, nargs, 1);
}

/* take_tokens(tokens_index, have, max) -> k: get_records' tokens. With have already held,
 * takes more items tokens (without waiting) up to max, and records the k held in the tokens
 * field before returning, as Queue._get_records does: one call for what was one Python call
 * per record. On a bad argument, the have tokens go back (Python cannot learn how many). */
static PyObject *fq_take_tokens(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t have = nargs == 3 ? PyLong_AsSsize_t(args[1]) : -1;
    if (have == -1 && (nargs != 3 || PyErr_Occurred())) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "take_tokens(tokens_index, have, max)");
        return NULL; /* (have unknown: nothing to give back) */
    }
    Py_ssize_t tokens = PyLong_AsSsize_t(args[0]), max = PyLong_AsSsize_t(args[2]);
    if ((tokens == -1 || max == -1) && PyErr_Occurred()) {
        give_back(q, NULL, have);
        return NULL;
    }
    if (q->ring == NULL || have < 0 || max < have || tokens <= 0 ||
        (size_t)tokens >= (size_t)(q->ring - (unsigned char *)q->h64) / 8) {
        give_back(q, NULL, have);
        PyErr_SetString(PyExc_ValueError, "take_tokens: a closed queue, a bad tokens index or 0 <= have <= max");
        return NULL;
    }
    Py_ssize_t k = have;
    while (k < max && sem_trywait(q->items) == 0) k++;
    PyObject *r = PyLong_FromSsize_t(k);
    if (r == NULL) {
        give_back(q, NULL, k);
        return NULL;
    }
    st64(q->h64 + tokens, (uint64_t)k);
    return r;
}

/* One Record(seq, kind, data) of scan_records: data a read-only slice of ro (the ring, so the
 * mapping counts it as an export); built as tuple.__new__(Record, ...) builds it (Record: a tuple
 * subclass with no attributes of its own, scan_records checks). NULL on error. */
static PyObject *make_record(PyTypeObject *rt, PyObject *names, PyObject *ro, uint64_t seq, const Rec *r,
                             const unsigned char *ring) {
    Py_ssize_t a = (Py_ssize_t)(r->payload - ring);
    PyObject *lo = PyLong_FromSsize_t(a), *hi = PyLong_FromSsize_t(a + (Py_ssize_t)r->length);
    PyObject *slice = lo == NULL || hi == NULL ? NULL : PySlice_New(lo, hi, NULL);
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    PyObject *data = slice == NULL ? NULL : PyObject_GetItem(ro, slice);
    Py_XDECREF(slice);
    PyObject *s = data == NULL ? NULL : PyLong_FromUnsignedLongLong(seq);
    PyObject *rec = s == NULL ? NULL : rt->tp_alloc(rt, 3);
    if (rec == NULL) {
        Py_XDECREF(s);
        Py_XDECREF(data);
        return NULL;
    }
    PyTuple_SET_ITEM(rec, 0, s);
    PyTuple_SET_ITEM(rec, 1, Py_NewRef(PyTuple_GET_ITEM(names, r->kind)));
    PyTuple_SET_ITEM(rec, 2, data);
    /* Never part of a cycle (an int, a str and a view whose references lead to the mapping, never
     * back): untracked, the collector does not walk a batch's thousands of them again and again. */
    PyObject_GC_UnTrack(rec);
    return rec;
}

/* Under the tail lock, the first pass of scan_records: how many records from tail (at most k)
 * rec_at finds sound, or -1 if one of them is not (Python raises on it, or resyncs tail_seq
 * first: its to do). Reads only. */
static Py_ssize_t count_records(FastQueue *q, Py_ssize_t k, uint64_t tail, uint64_t head, uint64_t seq,
                                uint64_t last) {
    Rec r;
    Py_ssize_t i = 0;
    for (uint64_t t = tail; i < k && t != head; i++, seq++, t = r.end)
        if (rec_at(q, t, head, seq, last, &r) < 0) return -1;
    return i;
}

/* scan_records(ro, Record, names, k) -> (records, ends_and_sizes) or None: Queue._records_locked's
 * common case, under the tail lock the caller holds. records: up to k Record(seq, names[kind],
 * read-only slice of ro) from tail; ends_and_sizes: bytes of 2 * n native u64, the tail after
 * each record, then the payload bytes up to each (what the batch's end commits). Reads only:
 * nothing is consumed here. None when Python must look (bad positions, a record rec_at refuses
 * anywhere among the k, tail_seq to resync): its path raises or resyncs as before. */
static PyObject *fq_scan_records(FastQueue *q, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyMemoryView_Check(args[0]) || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type) ||
        ((PyTypeObject *)args[1])->tp_dictoffset != 0 || /* (no attributes: make_record untracks it) */
        ((PyTypeObject *)args[1])->tp_basicsize != PyTuple_Type.tp_basicsize || !PyTuple_CheckExact(args[2]) ||
        PyTuple_GET_SIZE(args[2]) <= REC_NDARRAY) {
        PyErr_SetString(PyExc_TypeError, "scan_records(ring view, Record, kind names, k)");
        return NULL;
    }
    Py_ssize_t k = PyLong_AsSsize_t(args[3]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    const Py_buffer *v = PyMemoryView_GET_BUFFER(args[0]);
    if (q->ring == NULL || v->buf != (void *)q->ring || (uint64_t)v->len != q->cap || v->ndim != 1 ||
        v->itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "scan_records: the view is not this queue's ring");
        return NULL;
    }
    uint64_t cap = q->cap, tail = ld64(H64(q, Q_TAIL)), head = ld64(H64(q, Q_HEAD));
    if (tail > head || head - tail > cap || (head | tail) & ALIGN_MASK || head > UINT64_MAX - 2 * cap)
        return Py_NewRef(Py_None); /* (_ring.check_positions, as take_records) */
    uint64_t seq = ld64(H64(q, Q_TAIL_SEQ));
    uint64_t last = ld64(H64(q, Q_NEXT_SEQ)); /* loaded after head, which producers store after it */
    Py_ssize_t n = count_records(q, k, tail, head, seq, last);
    if (n < 0) return Py_NewRef(Py_None);
    PyObject *recs = PyList_New(n);
    PyObject *meta = recs == NULL ? NULL : PyBytes_FromStringAndSize(NULL, 16 * n);
    if (meta == NULL) {
        Py_XDECREF(recs);
        return NULL;
    }
    uint64_t *ends = (uint64_t *)PyBytes_AS_STRING(meta), *sizes = ends + n, nbytes = 0;
    Rec r;
    for (Py_ssize_t i = 0; i < n; i++, seq++, tail = r.end) {
        /* Looked at again (no copy of the first pass kept): a record changed meanwhile is Python's. */
        PyObject *rec = rec_at(q, tail, head, seq, last, &r) < 0 ? Py_NewRef(Py_None)
                        : make_record((PyTypeObject *)args[1], args[2], args[0], seq, &r, q->ring);
        if (rec == NULL || rec == Py_None) {
            Py_DECREF(recs);
            Py_DECREF(meta);
            return rec;
        }
        PyList_SET_ITEM(recs, i, rec);
        nbytes += r.length;
        ends[i] = r.end;
        sizes[i] = nbytes;
    }
    return Py_BuildValue("(NN)", recs, meta);
}

/* set_fault_hook(hook or None): call hook(step) at each named step (_faults arms and disarms it). */
static PyObject *set_fault_hook(PyObject *Py_UNUSED(module), PyObject *hook) {
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "set_fault_hook(callable or None)");
        return NULL;
    }
    Py_XSETREF(fault_hook, hook == Py_None ? NULL : Py_NewRef(hook));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_fault_hook", (PyCFunction)set_fault_hook, METH_O,
     "set_fault_hook(hook or None): call hook(step) at each crash-test step (shmbus/_faults.py)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *fq_close(FastQueue *q, PyObject *Py_UNUSED(unused)) {
    fq_release(q);
    Py_RETURN_NONE;
}

/* CONSTANTS: every constant of _format.h, as compiled, for _accel to compare with Python's. */
static PyObject *compiled_constants(void) {
    PyObject *d = PyDict_New(), *v = NULL;
    if (d == NULL) return NULL;
/* The name is stringified here, before it is expanded to its value. */
#define ADD(key, make)                                                              \
    if ((v = (make)) == NULL || PyDict_SetItemString(d, key, v) < 0) goto fail; \
    Py_CLEAR(v);
#define U(name) ADD(#name, PyLong_FromUnsignedLongLong((unsigned long long)(name)))
#define S(name) ADD(#name, PyLong_FromLongLong((long long)(name)))
    SHMBUS_CONSTANTS(U, S)
#undef U
#undef S
#undef ADD
    return d;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

static PyMethodDef fq_methods[] = {
    {"put", (PyCFunction)(void (*)(void))fq_put, METH_FASTCALL,
     "put(kind, prefix, body, n) -> written << 2 | code (0 not taken, 1 done)"},
    {"put_many", (PyCFunction)(void (*)(void))fq_put_many, METH_FASTCALL,
     "put_many(encoded list) -> written << 2 | code (0 not taken, 1 done, 2 lock held)"},
    {"take_many", (PyCFunction)(void (*)(void))fq_take_many, METH_FASTCALL,
     "take_many(tokens_index, have, max, spin_s) -> (records, tokens still held)"},
    {"take_many_obj", (PyCFunction)(void (*)(void))fq_take_many_obj, METH_FASTCALL,
     "take_many_obj(tokens_index, have, max, spin_s) -> (messages or records, tokens held, records left)"},
    {"take_tokens", (PyCFunction)(void (*)(void))fq_take_tokens, METH_FASTCALL,
     "take_tokens(tokens_index, have, max) -> items tokens held, recorded in the tokens field"},
    {"scan_records", (PyCFunction)(void (*)(void))fq_scan_records, METH_FASTCALL,
     "scan_records(ring view, Record, kind names, k) -> (records, ends and sizes) or None (Python's)"},
    {"put_objs", (PyCFunction)fq_put_objs, METH_O,
     "put_objs(list) -> written << 2 | code, or PUT_PYTHON: Python encodes and puts"},
    {"encode_many", (PyCFunction)fq_encode_many, METH_O,
     "encode_many(list) -> [(kind, payload, None, n)...], or None: Python encodes"},
    {"put_obj", (PyCFunction)(void (*)(void))fq_put_obj, METH_FASTCALL,
     "put_obj(obj) -> written << 2 | code, or -1: Python encodes and puts"},
    {"get_obj", (PyCFunction)(void (*)(void))fq_get_obj, METH_FASTCALL,
     "get_obj(tokens_index, spin_s) -> message, NO_TOKEN, HAS_TOKEN, or (kind, payload)"},
    {"take_last", (PyCFunction)fq_take_last, METH_NOARGS,
     "take_last() -> what the last get_obj/take_many returned (None if nothing), forgotten here"},
    {"set_codec", (PyCFunction)fq_set_codec, METH_VARARGS,
     "set_codec(pack, unpack, unpack_kwargs, max_payload, fast_pack=None, fast_unpack=None, plain=False): "
     "encode/decode in put_obj/put_objs/get_obj"},
    {"close", (PyCFunction)fq_close, METH_NOARGS, "Release the mapping, the semaphore handles, the codec."},
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

/* ---------------------------------------------------------------------------
 * FastTopic: the Topic's publish and a subscription's read in C.
 *
 * publish: the common case of shmbus/_topic.py's _write/_make_room/_commit_record,
 * with its stores in the same order (the new tail_seq and tail before a byte of
 * what they drop is overwritten; then the record, header last; then next_seq,
 * bytes_in, head, the time sample). A record that wraps, a rebase of an
 * empty ring, a damaged record to drop, a busy or broken lock: all
 * handed to Python. Wake-ups are Python's too: we only say a wait flag was set.
 *
 * read: shmbus/_subscription.py's _read/_next_record, lock-free: copy a record,
 * then re-check tail (the seqlock: tail past the cursor means the copy may be
 * torn, thrown away, cursor resynced); the cursor, next sequence number, lost
 * and received are the Subscription's attributes, read and written here (one
 * call: no signal handler can run between) and saved to its slot as _save does.
 * Whatever Python would raise on, or copies itself (a bytes or ndarray message),
 * is left to it at the record where it happens.
 */

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* the whole mapping; held until close() */
    int has_view;
    uint64_t *h64;
    uint32_t *h32;
    unsigned char *ring;
    uint64_t cap;
    uint64_t ring_offset;
    Py_ssize_t nflags; /* wait flag bytes at WAIT_FLAGS, one a slot */
    pthread_mutex_t *head;
    PyObject *pack, *unpack, *kwnames, *kwvalues; /* as FastQueue's (set_codec) */
    PyObject *fast_pack, *fast_unpack;            /* as FastQueue's: msgspec's pair, or NULL */
    int plain;                                    /* as FastQueue's */
    uint64_t max_payload;
} FastTopic;

/* The Subscription attributes read() keeps (interned at module init). */
static PyObject *s_cursor, *s_next, *s_lost, *s_received;

static void ft_release(FastTopic *t) {
    if (t->has_view) {
        PyBuffer_Release(&t->view);
        t->has_view = 0;
    }
    t->h64 = NULL;
    t->h32 = NULL;
    t->ring = NULL;
    t->head = NULL;
    Py_CLEAR(t->pack);
    Py_CLEAR(t->unpack);
    Py_CLEAR(t->kwnames);
    Py_CLEAR(t->kwvalues);
    Py_CLEAR(t->fast_pack);
    Py_CLEAR(t->fast_unpack);
}

static void ft_dealloc(FastTopic *t) {
    ft_release(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* FastTopic(mapping, ring_offset, capacity, max_subscribers). */
static int ft_init(FastTopic *t, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *buf;
    Py_ssize_t ring_offset, nflags;
    unsigned long long cap;
    if (!PyArg_ParseTuple(args, "OnKn", &buf, &ring_offset, &cap, &nflags)) return -1;
    ft_release(t);
    if (ring_offset < HEADER_MIN || ring_offset % 8 || nflags < 1 || nflags > MAX_SUBSCRIBERS) {
        PyErr_SetString(PyExc_ValueError, "bad ring offset or subscriber count");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &t->view, PyBUF_WRITABLE) < 0) return -1;
    t->has_view = 1;
    if (cap == 0 || cap % ALIGN || cap > UINT64_MAX / 4 || (uint64_t)t->view.len < (uint64_t)ring_offset + cap) {
        ft_release(t);
        PyErr_SetString(PyExc_ValueError, "mapping smaller than header + ring, or a bad capacity");
        return -1;
    }
    t->h64 = (uint64_t *)t->view.buf;
    t->h32 = (uint32_t *)t->view.buf;
    t->ring = (unsigned char *)t->view.buf + ring_offset;
    t->cap = cap;
    t->ring_offset = (uint64_t)ring_offset;
    t->nflags = nflags;
    t->head = (pthread_mutex_t *)((char *)t->view.buf + M_HEAD);
    return 0;
}

_Static_assert(WAIT_FLAGS + MAX_SUBSCRIBERS <= HEADER_MIN, "wait flags out of the header");

/* A record's header as _ring.read checks it: the record at t (a multiple of ALIGN,
 * t < head <= UINT64_MAX - 2 * cap), a wrap marker followed. 0 where _ring.read
 * raises CorruptBus. Only the ring is addressed, whatever the header says. */
typedef struct {
    uint64_t start, seq, end;
    uint32_t length;
    uint16_t kind;
} TRec;

static int trec_at(const unsigned char *ring, uint64_t cap, uint64_t t, uint64_t head, TRec *r) {
    uint64_t off = t % cap;
    uint32_t length;
    uint16_t kind, state;
    memcpy(&kind, ring + off + REC_KIND, 2);
    memcpy(&state, ring + off + REC_STATE, 2);
    if (kind == REC_WRAP && state == STATE_COMMITTED) {
        t += cap - off;
        if (t >= head) return 0;
        off = 0;
        memcpy(&kind, ring + REC_KIND, 2);
        memcpy(&state, ring + REC_STATE, 2);
    }
    memcpy(&length, ring + off + REC_LENGTH, 4);
    memcpy(&r->seq, ring + off + REC_SEQ, 8);
    if (state != STATE_COMMITTED || (kind != REC_MSGPACK && kind != REC_RAW && kind != REC_NDARRAY)) return 0;
    if (off + RECORD_SIZE + length > cap || t + span_of(length) > head) return 0;
    r->start = t;
    r->end = t + span_of(length);
    r->length = length;
    r->kind = kind;
    return 1;
}

/* _ring.evict for a record spanning [head, end) that needs no wrap: the new tail,
 * or 0 (with *ok 0) where Python raises on a damaged record or must restart an
 * empty ring (a rebase). */
static uint64_t evict_to(FastTopic *t, uint64_t tail, uint64_t head, uint64_t end, int *ok) {
    uint64_t cap = t->cap;
    TRec r;
    *ok = 0;
    while (tail < head && end - tail > cap) {
        uint64_t off = tail % cap;
        uint16_t kind, state;
        memcpy(&kind, t->ring + off + REC_KIND, 2);
        memcpy(&state, t->ring + off + REC_STATE, 2);
        if (kind == REC_WRAP && state == STATE_COMMITTED) {
            tail += cap - off; /* only padding: dropping it may be enough */
            continue;
        }
        if (!trec_at(t->ring, cap, tail, head, &r)) return 0;
        tail = r.end;
    }
    if (tail > end || end - tail > cap) return 0; /* a damaged marker, or the rebase: Python's */
    *ok = 1;
    return tail;
}

/* Under the head lock: write, publish and evict for as many of msgs as need no
 * wrap; returns how many. The stores of _make_room and _commit_record, in order. */
static Py_ssize_t publish_records(FastTopic *t, Msg *msgs, Py_ssize_t count) {
    uint64_t cap = t->cap;
    uint64_t head = ld64(t->h64 + Q_HEAD), tail = ld64(t->h64 + Q_TAIL), seq = ld64(t->h64 + Q_NEXT_SEQ);
    /* _ring.check_positions and check_room for the whole batch: Python raises there. */
    if (tail > head || head - tail > cap || (head | tail) & ALIGN_MASK || head > UINT64_MAX - 2 * cap ||
        seq > UINT64_MAX - (uint64_t)count)
        return 0;
    {
        uint64_t half = (UINT64_MAX - 2 * cap - head) / 2, total = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            total += span_of((uint64_t)msgs[i].plen + (uint64_t)msgs[i].blen);
            if (total > half) return 0;
        }
    }
    Py_ssize_t k = 0;
    for (; k < count; k++) {
        Msg *m = &msgs[k];
        uint64_t n = (uint64_t)m->plen + (uint64_t)m->blen, span = span_of(n), room = cap - head % cap;
        /* A wrap: Python's (_ring.evict places a record as here, with no early wrap). */
        if (n > UINT32_MAX || span > room) break;
        int ok;
        uint64_t new_tail = evict_to(t, tail, head, head + span, &ok);
        if (!ok) break;
        uint64_t rseq = seq + (uint64_t)k;
        if (new_tail != tail) {
            /* Read, not counted (as _make_room): the next record's number, or ours past head. */
            uint64_t tseq = rseq;
            if (new_tail < head) memcpy(&tseq, t->ring + new_tail % cap + REC_SEQ, 8);
            st64(t->h64 + Q_TAIL_SEQ, tseq);
            st64(t->h64 + Q_TAIL, new_tail);
            tail = new_tail;
            FAULT("publish:after-evict");
        }
        unsigned char *rec = t->ring + head % cap;
        memcpy(rec + RECORD_SIZE, m->prefix, (size_t)m->plen);
        if (m->blen) memcpy(rec + RECORD_SIZE + m->plen, m->body, (size_t)m->blen);
        uint32_t len32 = (uint32_t)n;
        uint16_t kind16 = (uint16_t)m->kind, state16 = STATE_COMMITTED;
        memcpy(rec + REC_LENGTH, &len32, 4);
        memcpy(rec + REC_KIND, &kind16, 2);
        memcpy(rec + REC_STATE, &state16, 2);
        memcpy(rec + REC_SEQ, &rseq, 8);
        head += span;
        st64(t->h64 + Q_NEXT_SEQ, rseq + 1);
        FAULT("publish:mid-publish");
        st64(t->h64 + Q_BYTES_IN, ld64(t->h64 + Q_BYTES_IN) + n);
        st64(t->h64 + Q_HEAD, head);
        if (rseq % SAMPLE_EVERY == 0) time_sample(t->h64, rseq);
    }
    return k;
}

/* After the release: a full fence (the new head is visible before we load the flags,
 * as the subscriber fences between its flag and its load of head), then any flag set. */
static int flags_set(FastTopic *t) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    const unsigned char *f = (const unsigned char *)t->h64 + WAIT_FLAGS;
    for (Py_ssize_t i = 0; i < t->nflags; i++)
        if (__atomic_load_n(f + i, __ATOMIC_RELAXED)) return 1;
    return 0;
}

static PyObject *pub_result(Py_ssize_t written, int code) {
    return PyLong_FromSsize_t(written << PUB_SHIFT | code);
}

/* Take the head lock, publish what we can, release it unless a batch has more for
 * Python (PUT_HELD); a single message we could not publish goes to Python whole. */
static PyObject *publish_msgs(FastTopic *t, Msg *msgs, Py_ssize_t count, int batch) {
    if (!lock_take(t->h32, t->head, I_HEAD_REPAIR)) return pub_result(0, PUT_NOT_TAKEN);
    FAULT("publish:after-lock");
    Py_ssize_t k = publish_records(t, msgs, count);
    if (k < count && (batch || k)) {
        PyObject *r = pub_result(k, PUT_HELD);
        if (r == NULL) lock_release(t->head); /* no one else would */
        return r;
    }
    lock_release(t->head);
    if (!k) return pub_result(0, PUT_NOT_TAKEN);
    return pub_result(k, PUT_DONE | (flags_set(t) ? PUB_WAKE : 0));
}

/* publish(kind, prefix, body, n) -> written << PUB_SHIFT | PUB_WAKE? | PUT_*. */
static PyObject *ft_publish(FastTopic *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "publish(kind, prefix, body, n)");
        return NULL;
    }
    Msg m;
    if (msg_parse(&m, args[0], args[1], args[2]) < 0) return NULL;
    int small = (uint64_t)m.plen + (uint64_t)m.blen <= t->max_payload;
    PyObject *r = t->ring == NULL || !small ? pub_result(0, PUT_NOT_TAKEN) : publish_msgs(t, &m, 1, 0);
    msg_release(&m);
    return r;
}

/* publish_obj(obj) -> as publish, or PUT_PYTHON: Python encodes and publishes (as FastQueue.put_obj). */
static PyObject *ft_publish_obj(FastTopic *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "publish_obj(obj)");
        return NULL;
    }
    if (t->ring == NULL || t->pack == NULL || !plain_type(args[0])) return PyLong_FromLong(PUT_PYTHON);
    PyObject *data = encode_with(t->fast_pack, t->pack, t->max_payload, args[0]);
    if (data == NULL) return PyLong_FromLong(PUT_PYTHON);
    Msg m = {.kind = REC_MSGPACK, .prefix = PyBytes_AS_STRING(data), .plen = PyBytes_GET_SIZE(data)};
    PyObject *r = publish_msgs(t, &m, 1, 0);
    Py_DECREF(data);
    return r;
}

/* publish_many(list of encoded) -> as publish; PUT_HELD: the first written, the lock still held. */
static PyObject *ft_publish_many(FastTopic *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "publish_many(list of (kind, prefix, body, n))");
        return NULL;
    }
    if (t->ring == NULL) return pub_result(0, PUT_NOT_TAKEN);
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    Msg *msgs = parse_msgs(args[0]);
    if (msgs == NULL) return NULL;
    int small = 1;
    for (Py_ssize_t i = 0; i < count; i++)
        small &= (uint64_t)msgs[i].plen + (uint64_t)msgs[i].blen <= t->max_payload;
    PyObject *r = small && count ? publish_msgs(t, msgs, count, 1) : pub_result(0, PUT_NOT_TAKEN);
    msgs_free(msgs, count);
    return r;
}

/* publish_objs(list) -> as publish_many, or PUT_PYTHON (nothing done, no error): Python
 * encodes and publishes. publish_many's common case, encoding included (as FastQueue.put_objs). */
static PyObject *ft_publish_objs(FastTopic *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "publish_objs(list)");
        return NULL;
    }
    PyObject *objs = args[0];
    Py_ssize_t count = PyList_GET_SIZE(objs);
    if (t->ring == NULL || t->pack == NULL || count == 0 || count > UINT32_MAX) return PyLong_FromLong(PUT_PYTHON);
    Buf b;
    Msg *msgs = encode_objs(t->plain, objs, count, t->max_payload, &b);
    PyObject *r = msgs != NULL ? publish_msgs(t, msgs, count, 1) : PyErr_Occurred() ? NULL : PyLong_FromLong(PUT_PYTHON);
    PyMem_Free(msgs);
    spare_return(&b);
    return r;
}

/* _next_record: 1 with *r the next record at or past *cursor (moved there), 0 when
 * nothing is new (*cursor moved as Python moves it), -1 where Python raises. */
static int next_record(FastTopic *t, uint64_t *cursorp, uint64_t nxt, TRec *r) {
    uint64_t cap = t->cap, cursor = *cursorp, skipped = 0;
    for (;;) {
        uint64_t head = ld64(t->h64 + Q_HEAD), tail = ld64(t->h64 + Q_TAIL);
        /* bad_positions; then the top bound keeps every sum below from overflowing (Python's own). */
        if ((head | tail | cursor) & ALIGN_MASK || (tail <= head && head - tail > cap) ||
            head > UINT64_MAX - 2 * cap)
            return -1;
        if (cursor >= head) {
            if (cursor > head && tail <= head) return -1;
            *cursorp = cursor;
            return 0;
        }
        if (cursor < tail) { /* lapped, with the tail just read */
            cursor = tail;
            continue;
        }
        if (!trec_at(t->ring, cap, cursor, head, r)) {
            if (ld64(t->h64 + Q_TAIL) > cursor) continue; /* overwritten while we looked */
            return -1;
        }
        if (r->seq >= ld64(t->h64 + Q_NEXT_SEQ)) {
            if (ld64(t->h64 + Q_TAIL) > cursor) continue;
            return -1;
        }
        if (r->seq < nxt) { /* published before we subscribed */
            skipped += r->end - cursor;
            if (skipped > cap) return -1;
            cursor = r->end;
            continue;
        }
        *cursorp = cursor;
        return 1;
    }
}

static int get_attr_u64(PyObject *o, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

static int set_attr_u64(PyObject *o, PyObject *name, uint64_t value) {
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    int rc = v == NULL ? -1 : PyObject_SetAttr(o, name, v);
    Py_XDECREF(v);
    return rc;
}

/* A subscriber's state: the Subscription's attributes while read() runs. */
typedef struct {
    uint64_t cursor, next, lost, received;
} SubState;

/* Copy out up to k records (a list of (kind, bytes)); *handback when Python must go on. */
static PyObject *read_records(FastTopic *t, SubState *s, Py_ssize_t k, int *handback, int *nothing) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    TRec r;
    while (PyList_GET_SIZE(out) < k) {
        uint64_t cursor = s->cursor;
        int v = next_record(t, &cursor, s->next, &r);
        if (v <= 0) {
            if (v < 0) *handback = 1;
            else {
                s->cursor = cursor;
                *nothing = 1;
            }
            break;
        }
        s->cursor = cursor;
        const unsigned char *p = t->ring + r.start % t->cap + RECORD_SIZE;
        /* An ndarray message: Python copies it (extract); a lost count past 2**64: Python's
         * to refuse. */
        if (r.kind == REC_NDARRAY || s->lost > UINT64_MAX - (r.seq - s->next) ||
            s->received >= UINT64_MAX - (uint64_t)k) {
            *handback = 1;
            break;
        }
        /* A bytes message (a msgpack bin whose header matches its length) is its data, as
         * extract copies it: handed out as a raw record, already final. A bin header that
         * does not match stays msgpack, for the decoder to refuse as Python's does. */
        uint8_t bin = r.kind == REC_MSGPACK ? bin_header(p, r.length) : 0;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)p + bin, r.length - bin);
        if (payload == NULL) goto fail;
        if (ld64(t->h64 + Q_TAIL) > cursor) { /* lapped: the copy may be torn, resync */
            Py_DECREF(payload);
            continue;
        }
        PyObject *item = PyTuple_New(2), *kind = item == NULL ? NULL : PyLong_FromLong(bin ? REC_RAW : r.kind);
        if (kind == NULL) {
            Py_XDECREF(item);
            Py_DECREF(payload);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 0, kind);
        PyTuple_SET_ITEM(item, 1, payload);
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        s->lost += r.seq - s->next;
        s->next = r.seq + 1;
        s->cursor = r.end;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* Store the state in the Subscription, then in its slot (as _save, in its order). */
static int save_state(PyObject *sub, uint64_t *slot, const SubState *s, int all) {
    if (set_attr_u64(sub, s_cursor, s->cursor) < 0) return -1;
    if (!all) return 0;
    if (set_attr_u64(sub, s_next, s->next) < 0 || set_attr_u64(sub, s_lost, s->lost) < 0 ||
        set_attr_u64(sub, s_received, s->received) < 0)
        return -1;
    st64(slot + S_CURSOR, s->cursor);
    st64(slot + S_NEXT_SEQ, s->next);
    st64(slot + S_LOST, s->lost);
    st64(slot + S_RECEIVED, s->received);
    return 0;
}

/* Poll head for up to spin_s seconds (bounded by SPIN_MAX_S: the GIL is held), yielding
 * between polls as Subscription._wait does; 1 once head is past the cursor. */
static int spin_for_head(FastTopic *t, uint64_t cursor, double spin_s) {
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long ns = (long long)(spin_s * 1e9);
    end.tv_sec += ns / 1000000000LL;
    end.tv_nsec += ns % 1000000000LL;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    for (;;) {
        if (ld64(t->h64 + Q_HEAD) > cursor) return 1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec >= end.tv_nsec)) return 0;
        sched_yield();
    }
}

/* The records as read() hands them out: mode 0 (kind, payload) records; 1 messages,
 * decoded (or the records as a tuple, for Python to decode and raise: no codec here,
 * or a payload that fails); 2 payloads. A new reference, or NULL. */
static PyObject *finish_records(FastTopic *t, PyObject *recs, int mode) {
    if (mode == 0) return Py_NewRef(recs);
    Py_ssize_t n = PyList_GET_SIZE(recs);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = PyList_GET_ITEM(recs, i), *payload = PyTuple_GET_ITEM(rec, 1), *msg;
        if (mode == 2 || PyLong_AsLong(PyTuple_GET_ITEM(rec, 0)) == REC_RAW) {
            msg = Py_NewRef(payload);
        } else {
            if (t->unpack == NULL) break;
            msg = decode_with(t->fast_unpack, t->unpack, t->kwnames, t->kwvalues, payload);
            if (msg == NULL) {
                PyErr_Clear(); /* Python decodes them all again and raises DecodeError */
                break;
            }
        }
        PyList_SET_ITEM(out, i, msg);
        if (i == n - 1) return out;
    }
    Py_DECREF(out);
    return PyList_AsTuple(recs);
}

/* read(sub, slot_base, k, mode, spin_s) -> list (1..k), None (nothing new: we looked,
 * spinning up to spin_s), [] (Python reads), or a tuple of records (Python decodes, and
 * reads on to k: C stopped at a record it leaves to Python). */
static PyObject *ft_read(FastTopic *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "read(sub, slot_base, k, mode, spin_s)");
        return NULL;
    }
    PyObject *sub = args[0];
    Py_ssize_t base = PyLong_AsSsize_t(args[1]), k = PyLong_AsSsize_t(args[2]);
    if (k == -1 && PyErr_Occurred()) { /* a count Python takes (a float, or past the C range): its own */
        PyErr_Clear();
        return PyList_New(0);
    }
    long mode = PyLong_AsLong(args[3]);
    double spin_s;
    if (((base == -1 || mode == -1) && PyErr_Occurred()) || get_spin(args[4], &spin_s) < 0) return NULL;
    if (t->ring == NULL || k < 1 || mode < 0 || mode > 2 || base < 0 ||
        (uint64_t)base * 8 + SUBSCRIBER_SIZE > t->ring_offset)
        return PyList_New(0);
    SubState s;
    if (get_attr_u64(sub, s_cursor, &s.cursor) < 0 || get_attr_u64(sub, s_next, &s.next) < 0 ||
        get_attr_u64(sub, s_lost, &s.lost) < 0 || get_attr_u64(sub, s_received, &s.received) < 0) {
        PyErr_Clear(); /* not a state we can hold (Python's to handle) */
        return PyList_New(0);
    }
    int handback = 0, nothing = 0;
    PyObject *recs = read_records(t, &s, k, &handback, &nothing);
    if (recs != NULL && nothing && !PyList_GET_SIZE(recs) && spin_s > 0 && spin_for_head(t, s.cursor, spin_s)) {
        Py_DECREF(recs);
        nothing = 0;
        recs = read_records(t, &s, k, &handback, &nothing);
    }
    if (recs == NULL) return NULL;
    Py_ssize_t got = PyList_GET_SIZE(recs);
    s.received += (uint64_t)got;
    if (save_state(sub, t->h64 + base, &s, got > 0) < 0) {
        Py_DECREF(recs);
        return NULL;
    }
    if (!got) {
        Py_DECREF(recs);
        return handback ? PyList_New(0) : Py_NewRef(Py_None);
    }
    /* Ended at a record Python must read: the batch goes on there, in Python, and is
     * decoded as one (so it ends, and fails, where Python's own read of k would). */
    PyObject *out = handback && mode ? PyList_AsTuple(recs) : finish_records(t, recs, (int)mode);
    Py_DECREF(recs);
    return out;
}

static PyObject *ft_set_codec(FastTopic *t, PyObject *args) {
    return set_codec_into(args, &t->pack, &t->unpack, &t->kwnames, &t->kwvalues, &t->fast_pack, &t->fast_unpack,
                          &t->max_payload, &t->plain);
}

static PyObject *ft_close(FastTopic *t, PyObject *Py_UNUSED(unused)) {
    ft_release(t);
    Py_RETURN_NONE;
}

static PyMethodDef ft_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))ft_publish, METH_FASTCALL,
     "publish(kind, prefix, body, n) -> written << PUB_SHIFT | PUB_WAKE? | code"},
    {"publish_obj", (PyCFunction)(void (*)(void))ft_publish_obj, METH_FASTCALL,
     "publish_obj(obj) -> as publish, or PUT_PYTHON: Python encodes and publishes"},
    {"publish_many", (PyCFunction)(void (*)(void))ft_publish_many, METH_FASTCALL,
     "publish_many(encoded list) -> as publish; PUT_HELD: the lock is still held"},
    {"publish_objs", (PyCFunction)(void (*)(void))ft_publish_objs, METH_FASTCALL,
     "publish_objs(list) -> as publish_many, or PUT_PYTHON: Python encodes and publishes"},
    {"read", (PyCFunction)(void (*)(void))ft_read, METH_FASTCALL,
     "read(sub, slot_base, k, mode, spin_s) -> list, None (nothing new), [] (Python reads), tuple"},
    {"set_codec", (PyCFunction)ft_set_codec, METH_VARARGS,
     "set_codec(pack, unpack, unpack_kwargs, max_payload, fast_pack=None, fast_unpack=None, plain=False): "
     "encode/decode in publish_obj/publish_objs/read"},
    {"close", (PyCFunction)ft_close, METH_NOARGS, "Release the mapping and the codec."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastTopicType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmbus._cfast.FastTopic",
    .tp_basicsize = sizeof(FastTopic),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The Topic's publish and a subscription's read in C (see _accel.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ft_init,
    .tp_dealloc = (destructor)ft_dealloc,
    .tp_methods = ft_methods,
};

/* Module init's part for FastTopic. */
static int add_topic(PyObject *m) {
    if (PyType_Ready(&FastTopicType) < 0) return -1;
    if ((s_cursor = PyUnicode_InternFromString("_cursor")) == NULL ||
        (s_next = PyUnicode_InternFromString("_next")) == NULL ||
        (s_lost = PyUnicode_InternFromString("lost")) == NULL ||
        (s_received = PyUnicode_InternFromString("received")) == NULL)
        return -1;
    Py_INCREF(&FastTopicType);
    if (PyModule_AddObject(m, "FastTopic", (PyObject *)&FastTopicType) < 0) {
        Py_DECREF(&FastTopicType);
        return -1;
    }
    return 0;
}

static struct PyModuleDef cfast_module = {
    PyModuleDef_HEAD_INIT, "shmbus._cfast", "The Queue's and the Topic's hot paths in C (optional).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__cfast(void) {
    if (PyType_Ready(&FastQueueType) < 0) return NULL;
    PyObject *m = PyModule_Create(&cfast_module);
    if (m == NULL) return NULL;
    NoToken = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    HasToken = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    span_steps_init();
    RecMsgpack = PyLong_FromLong(REC_MSGPACK);
    if (NoToken == NULL || HasToken == NULL || RecMsgpack == NULL || PyModule_AddObject(m, "NO_TOKEN", Py_NewRef(NoToken)) < 0 ||
        PyModule_AddObject(m, "HAS_TOKEN", Py_NewRef(HasToken)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FastQueueType);
    if (PyModule_AddObject(m, "FastQueue", (PyObject *)&FastQueueType) < 0) {
        Py_DECREF(&FastQueueType);
        Py_DECREF(m);
        return NULL;
    }
    if (add_topic(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "SPIN_MAX", PyFloat_FromDouble(SPIN_MAX_S)) < 0 ||
        PyModule_AddObject(m, "CONSTANTS", compiled_constants()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
