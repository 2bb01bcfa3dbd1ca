/* StreamRewriter in C: huddle/sfu/rewrite.py's StreamRewriter, state for state and byte for byte (that
   file explains the mapping; this one follows it line by line, and tests/unit/test_fastpath.py holds the
   two side by side), plus fanout(), Producer.receive's loop over its consumers in one call.

   The Python version keeps its counters as unbounded ints; here they are int64, which a stream cannot
   outgrow (one step per packet or frame). A ring slot of the Python version holds an offset or None (a
   number given to no packet); here DROPPED stands for None.

   fanout(consumers, packet, payload_offset, layer, seq, ts, clock_rate, now, info, size)
       Consumer.forward (huddle/sfu/consumer.py) for each consumer, line for line, where it sends the compiled
       way: the consumer's fields (ConsumerFields, its base class) are read as a struct, the packet is copied
       straight into the next slot of the port's held batch along its transport's route
       (huddle.rtc._fastpath.Route, through _fastpath.h), rewritten there, kept in the consumer's cache and protected in place with the libsrtp
       session of the consumer's SSRC alone (SrtpSession.stream_handle). Any other consumer (a pipe's, one
       on ICE-TCP or not connected yet) goes through its own forward(). Returns how many copies went out.
       What a cache keeps is (packet, head): `packet` itself, which the caller must not change afterwards,
       and the rewritten bytes it starts with; the rewritten packet is head + packet[len(head):].

   A packet too short for what is written into it (the RTP header, and the picture id and TL0PICIDX that
   `info` says are there) is refused like a packet of another source: nothing is read or written outside
   the buffer. The batch, the packet and the transports are used within the call only; the cache entries
   hold their own references. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#include "../rtc/_fastpath.h"

#define SEQ_WINDOW 1024
#define PICTURE_ID_WINDOW 256
#define SEQ_MASK (SEQ_WINDOW - 1)
#define PID_MASK (PICTURE_ID_WINDOW - 1)
#define NOT_YET ((int64_t)1 << 62)
#define DROPPED INT64_MIN
#define REBASE 1
#define CONTINUE 2
#define RTP_HEADER 12

static const HuddleFastpathApi *fastpath;

static PyObject *str_picture_id, *str_picture_id_15bit, *str_tl0picidx, *str_tid, *str_start_of_partition,
    *str_partition_index;

typedef struct {
    PyObject_HEAD
    long long ssrc;
    int has_source;
    long long source;
    int live;  /* == has_source and not paused */
    int rebase;

    int64_t in_hi, sent_hi, seq_off, seq_off0, in_base;
    int64_t *ring;
    int ringed;
    int64_t ring_from;

    int64_t ts_off, ts_last;
    int has_last_now;
    double last_now;
    int has_ts_source;
    long long ts_source;

    int pid_pending;
    int64_t pid_hi, pid_sent_hi, pid_off, pid_off0, pid_base;
    int64_t *pid_ring;
    int pid_ringed;
    int64_t pid_from;

    int tl0_pending;
    int64_t tl0_off, tl0_last;
} Rewriter;

static PyTypeObject RewriterType;

/* The VP8 descriptor fields rewrite() reads from a Vp8Info. */
typedef struct {
    int has_pid;
    int64_t pid;
    int m15;
    int has_tl0;
    int64_t tl0;
} Vp8Fields;

static int64_t unwrap16(int64_t hi, int64_t value) { return hi + (((value - hi + 0x8000) & 0xFFFF) - 0x8000); }

static int64_t ts_diff(int64_t a, int64_t b) { return ((a - b + 0x80000000LL) & 0xFFFFFFFFLL) - 0x80000000LL; }

static int64_t unwrap_pid(int64_t hi, int64_t pid, int m15) {
    if (m15) return hi + (((pid - hi + 0x4000) & 0x7FFF) - 0x4000);
    return hi + (((pid - hi + 0x40) & 0x7F) - 0x40);
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* An int attribute of `info` that may be None: 1 with *value, 0 for None, -1 on error. */
static int optional_int(PyObject *info, PyObject *name, int64_t *value) {
    PyObject *v = PyObject_GetAttr(info, name);
    if (v == NULL) return -1;
    if (v == Py_None) {
        Py_DECREF(v);
        return 0;
    }
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    *value = x;
    return 1;
}

static int truth(PyObject *info, PyObject *name) {
    PyObject *v = PyObject_GetAttr(info, name);
    if (v == NULL) return -1;
    int result = PyObject_IsTrue(v);
    Py_DECREF(v);
    return result;
}

static int read_fields(PyObject *info, Vp8Fields *f) {
    f->has_pid = f->has_tl0 = f->m15 = 0;
    if (info == Py_None) return 0;
    if ((f->has_pid = optional_int(info, str_picture_id, &f->pid)) < 0) return -1;
    if (f->has_pid && (f->m15 = truth(info, str_picture_id_15bit)) < 0) return -1;
    if ((f->has_tl0 = optional_int(info, str_tl0picidx, &f->tl0)) < 0) return -1;
    return 0;
}

static int64_t *new_ring(Py_ssize_t size) {
    int64_t *ring = PyMem_Malloc((size_t)size * sizeof(int64_t));
    if (ring == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < size; i++) ring[i] = DROPPED;
    return ring;
}

/* --- the ring helpers of rewrite.py (_cover_seqs and friends), same names ------------------------------ */

static int cover_seqs(Rewriter *self, int64_t lo) {
    if (self->ring == NULL && (self->ring = new_ring(SEQ_WINDOW)) == NULL) return -1;
    if (!self->ringed) {
        self->ringed = 1;
        self->ring_from = self->in_hi + 1;
    }
    int64_t start = self->ring_from;
    if (lo < start) {
        for (int64_t e = max64(lo, self->in_hi - SEQ_WINDOW + 1); e < start; e++)
            self->ring[e & SEQ_MASK] = self->seq_off0;
        self->ring_from = lo;
    }
    return 0;
}

static void fill_seqs(Rewriter *self, int64_t hi, int64_t ext, int64_t off) {
    for (int64_t e = max64(hi + 1, ext - SEQ_WINDOW); e < ext; e++) self->ring[e & SEQ_MASK] = off;
    self->ring[ext & SEQ_MASK] = off;
}

static int cover_pids(Rewriter *self, int64_t lo) {
    if (self->pid_ring == NULL && (self->pid_ring = new_ring(PICTURE_ID_WINDOW)) == NULL) return -1;
    if (!self->pid_ringed) {
        self->pid_ringed = 1;
        self->pid_from = self->pid_hi + 1;
    }
    int64_t start = self->pid_from;
    if (lo < start) {
        for (int64_t e = max64(lo, self->pid_hi - PICTURE_ID_WINDOW + 1); e < start; e++)
            self->pid_ring[e & PID_MASK] = self->pid_off0;
        self->pid_from = lo;
    }
    return 0;
}

static void fill_pids(Rewriter *self, int64_t hi, int64_t ext, int64_t off) {
    for (int64_t e = max64(hi + 1, ext - PICTURE_ID_WINDOW); e < ext + 1; e++) self->pid_ring[e & PID_MASK] = off;
}

static int skip_seqs(Rewriter *self, int64_t hi, int64_t ext) {
    if (cover_seqs(self, hi + 1) < 0) return -1;
    for (int64_t e = max64(hi + 1, ext - SEQ_WINDOW); e < ext; e++) self->ring[e & SEQ_MASK] = DROPPED;
    self->seq_off -= ext - hi - 1;
    self->in_hi = ext - 1;
    return 0;
}

static int skip_pids(Rewriter *self, int64_t hi, int64_t ext) {
    if (cover_pids(self, hi + 1) < 0) return -1;
    for (int64_t e = max64(hi + 1, ext - PICTURE_ID_WINDOW); e < ext; e++) self->pid_ring[e & PID_MASK] = DROPPED;
    self->pid_off -= ext - hi - 1;
    self->pid_hi = ext - 1;
    return 0;
}

/* 1 when the number is given back, 0 when not, -1 on error. */
static int drop_seq(Rewriter *self, int64_t hi, int64_t ext) {
    if (ext > hi) {
        if (cover_seqs(self, hi + 1) < 0) return -1;
        fill_seqs(self, hi, ext, self->seq_off);
        self->ring[ext & SEQ_MASK] = DROPPED;
        self->seq_off -= 1;
        self->in_hi = ext;
        return 1;
    }
    if (cover_seqs(self, ext) < 0) return -1;
    int64_t *ring = self->ring;
    int64_t slot = ext & SEQ_MASK;
    if (ring[slot] == DROPPED) return 0;
    ring[slot] = DROPPED;
    if (ext <= self->sent_hi) return 0;
    for (int64_t e = ext + 1; e < hi + 1; e++) {
        if (ring[e & SEQ_MASK] != DROPPED) ring[e & SEQ_MASK] -= 1;
    }
    self->seq_off -= 1;
    return 1;
}

/* Clock ticks since the newest forwarded packet, at least one, modulo 2**32 (all they are added to is a
   32-bit timestamp); Python's round() is round-half-even, as nearbyint() is by default. */
static int wall_ticks(Rewriter *self, long long clock_rate, double now, int64_t *ticks) {
    if (!self->has_last_now) {
        *ticks = 1;
        return 0;
    }
    double x = nearbyint((now - self->last_now) * (double)clock_rate);
    if (isnan(x)) {
        PyErr_SetString(PyExc_ValueError, "cannot convert float NaN to integer");
        return -1;
    }
    if (isinf(x)) {
        PyErr_SetString(PyExc_OverflowError, "cannot convert float infinity to integer");
        return -1;
    }
    if (x < 1) x = 1;
    *ticks = (int64_t)fmod(x, 4294967296.0);
    return 0;
}

static int start(Rewriter *self, int64_t seq, int64_t ts, long long clock_rate, double now) {
    self->rebase = 0;
    int64_t last_ts = self->ts_last, hi = self->in_hi, ticks;
    self->tl0_pending = 1;
    int same_clock = self->has_ts_source && self->ts_source == self->source;
    if (same_clock) {
        int64_t ext = unwrap16(hi, seq);
        if (hi - SEQ_WINDOW < ext && ext <= hi + SEQ_WINDOW) {
            if (ext - hi > 1 && skip_seqs(self, hi, ext) < 0) return -1;
            if (ext > hi && ts_diff(ts + self->ts_off, last_ts) < 0) {
                if (wall_ticks(self, clock_rate, now, &ticks) < 0) return -1;
                self->ts_off = (last_ts + ticks - ts) & 0xFFFFFFFFLL;
            }
            if (!self->pid_pending) self->pid_pending = CONTINUE;
            return 0;
        }
    }
    int64_t off;
    if (same_clock && ts_diff(ts + self->ts_off, last_ts) >= 0) {
        off = self->ts_off;
    } else if (!self->has_last_now) {
        off = last_ts + 1 - ts;
    } else {
        if (wall_ticks(self, clock_rate, now, &ticks) < 0) return -1;
        off = last_ts + ticks - ts;
    }
    int64_t nxt = hi + self->seq_off + 1;
    self->in_base = seq;
    self->in_hi = self->sent_hi = seq - 1;
    self->seq_off = self->seq_off0 = nxt - seq;
    self->ringed = 0;
    self->ring_from = NOT_YET;
    self->ts_off = off & 0xFFFFFFFFLL;
    self->has_ts_source = 1;
    self->ts_source = self->source;
    self->pid_pending = REBASE;
    return 0;
}

static void put16(char *p, uint64_t v) {
    p[0] = (char)(v >> 8);
    p[1] = (char)v;
}

static void put32(char *p, uint64_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

/* rewrite.py's StreamRewriter.rewrite on `buf`: 1 forwarded (nothing from `*written` on changed), 0 refused
   (buf untouched), -1 on error. */
static int rewrite(Rewriter *self, char *buf, Py_ssize_t len, Py_ssize_t payload_offset, long long source,
                   int64_t seq, int64_t ts, long long clock_rate, double now, PyObject *info,
                   const Vp8Fields *fields, Py_ssize_t *written) {
    if (!self->live || source != self->source) return 0;
    Vp8Fields f;
    if (fields != NULL)
        f = *fields; /* read once for every consumer of the packet */
    else if (read_fields(info, &f) < 0)
        return -1;
    Py_ssize_t need = f.has_pid ? (f.m15 ? 4 : 3) : 2;
    if (f.has_tl0) need += 1;
    if (len < RTP_HEADER || ((f.has_pid || f.has_tl0) && (payload_offset < 0 || payload_offset > len - need)))
        return 0;
    *written = (f.has_pid || f.has_tl0) ? payload_offset + need : RTP_HEADER;
    if (self->rebase && start(self, seq, ts, clock_rate, now) < 0) return -1;
    int64_t hi = self->in_hi;
    int64_t ext = unwrap16(hi, seq);
    int newest = ext > hi;
    int64_t seq_off;
    if (newest) {
        seq_off = self->seq_off;
    } else {
        if (ext < self->in_base || hi - ext >= SEQ_WINDOW) return 0;
        if (ext < self->ring_from) {
            seq_off = self->seq_off0;
        } else {
            seq_off = self->ring[ext & SEQ_MASK];
            if (seq_off == DROPPED) return 0;
        }
    }

    int new_frame = 0;
    int64_t pext = 0, pid_off = 0;
    if (f.has_pid) {
        int64_t pid = f.pid;
        int pending = self->pid_pending;
        if (pending && (pending == REBASE || !f.m15)) {
            int64_t nxt = self->pid_hi + self->pid_off + 1;
            self->pid_hi = self->pid_sent_hi = pid - 1;
            self->pid_base = pid;
            self->pid_off = self->pid_off0 = nxt - pid;
            self->pid_ringed = 0;
            self->pid_from = NOT_YET;
            self->pid_pending = pending = 0;
        }
        int64_t phi = self->pid_hi;
        pext = unwrap_pid(phi, pid, f.m15);
        if (pext > phi) {
            new_frame = 1;
            if (pending) {
                self->pid_pending = 0;
                if (pext - phi > 1) {
                    if (skip_pids(self, phi, pext) < 0) return -1;
                    phi = pext - 1;
                }
            }
            pid_off = self->pid_off;
            if (self->pid_ringed) fill_pids(self, phi, pext, pid_off);
            self->pid_hi = self->pid_sent_hi = pext;
        } else {
            if (pext < self->pid_base || phi - pext >= PICTURE_ID_WINDOW) {
                pid_off = DROPPED;
            } else if (pext < self->pid_from) {
                pid_off = self->pid_off0;
            } else {
                pid_off = self->pid_ring[pext & PID_MASK];
            }
            if (pid_off == DROPPED) {
                if (drop_seq(self, hi, ext) < 0) return -1;
                return 0;
            }
            if (pext > self->pid_sent_hi) self->pid_sent_hi = pext;
        }
    }

    if (newest) {
        if (self->ringed) {
            if (ext - hi == 1) {
                self->ring[ext & SEQ_MASK] = seq_off;
            } else {
                fill_seqs(self, hi, ext, seq_off);
            }
        }
        self->in_hi = self->sent_hi = ext;
    } else if (ext > self->sent_hi) {
        self->sent_hi = ext;
    }
    int64_t out_ts = ts + self->ts_off;
    put16(buf + 2, (uint64_t)(ext + seq_off));
    put32(buf + 4, (uint64_t)out_ts);
    put32(buf + 8, (uint64_t)self->ssrc);
    if (newest) {
        self->ts_last = out_ts & 0xFFFFFFFFLL;
        self->has_last_now = 1;
        self->last_now = now;
    }
    Py_ssize_t i = payload_offset + 2;
    if (f.has_pid) {
        int64_t out = pext + pid_off;
        if (f.m15) {
            buf[i] = (char)(0x80 | ((out >> 8) & 0x7F));
            buf[i + 1] = (char)(out & 0xFF);
            i += 2;
        } else {
            buf[i] = (char)(out & 0x7F);
            i += 1;
        }
    }
    if (f.has_tl0) {
        if (self->tl0_pending && newest) {
            self->tl0_pending = 0;
            if (!f.has_pid) {
                int s = truth(info, str_start_of_partition);
                if (s < 0) return -1;
                int part = s ? truth(info, str_partition_index) : 0;
                if (part < 0) return -1;
                new_frame = s && !part;
            }
            int base = 1;
            if (new_frame) {
                int t = truth(info, str_tid);
                if (t < 0) return -1;
                base = !t;
            }
            self->tl0_off = self->tl0_last + (new_frame && base ? 1 : 0) - f.tl0;
        }
        int64_t out = (f.tl0 + self->tl0_off) & 0xFF;
        buf[i] = (char)out;
        if (newest) self->tl0_last = out;
    }
    return 1;
}

/* --- the type ------------------------------------------------------------------------------------------- */

static void Rewriter_dealloc(Rewriter *self) {
    PyMem_Free(self->ring);
    PyMem_Free(self->pid_ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A start given or a random one: `bits` random bits when None. */
static int start_value(PyObject *given, int bits, long long mask, int64_t *out) {
    if (given == NULL || given == Py_None) {
        uint64_t r = 0;
        if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        *out = (int64_t)(r & ((1ULL << bits) - 1));
        return 0;
    }
    long long v = PyLong_AsLongLong(given);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = mask ? (v & mask) : v;
    return 0;
}

static int Rewriter_init(Rewriter *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"ssrc", "seq_start", "ts_start", "picture_id_start", "tl0picidx_start", NULL};
    long long ssrc;
    PyObject *seq_start = NULL, *ts_start = NULL, *pid_start = NULL, *tl0_start = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|$OOOO", names, &ssrc, &seq_start, &ts_start, &pid_start,
                                     &tl0_start))
        return -1;
    int64_t seq0, ts0, pid0, tl00;
    if (start_value(seq_start, 15, 0xFFFF, &seq0) < 0 || start_value(ts_start, 32, 0, &ts0) < 0 ||
        start_value(pid_start, 15, 0x7FFF, &pid0) < 0 || start_value(tl0_start, 8, 0, &tl00) < 0)
        return -1;
    int64_t *ring = self->ring, *pid_ring = self->pid_ring;
    memset((char *)self + offsetof(Rewriter, ssrc), 0, sizeof(Rewriter) - offsetof(Rewriter, ssrc));
    /* A second __init__ starts afresh but keeps the rings it allocated (their contents are never read
       before they are covered again). */
    self->ring = ring;
    self->pid_ring = pid_ring;
    self->ssrc = ssrc;
    self->in_hi = self->sent_hi = -1;
    self->seq_off = self->seq_off0 = seq0;
    self->ring_from = NOT_YET;
    self->ts_last = (ts0 - 1) & 0xFFFFFFFFLL;
    self->pid_pending = REBASE;
    self->pid_hi = self->pid_sent_hi = -1;
    self->pid_off = self->pid_off0 = pid0;
    self->pid_from = NOT_YET;
    self->tl0_pending = 1;
    self->tl0_last = tl00 - 1;
    return 0;
}

static int source_arg(PyObject *arg, long long *out) {
    *out = PyLong_AsLongLong(arg);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* switch(): forward `source` from its next packet. */
static void switch_to(Rewriter *self, long long source) {
    self->has_source = 1;
    self->source = source;
    self->live = 1;
    self->rebase = 1;
}

static PyObject *Rewriter_switch(Rewriter *self, PyObject *source) {
    long long s;
    if (source_arg(source, &s) < 0) return NULL;
    switch_to(self, s);
    Py_RETURN_NONE;
}

static PyObject *Rewriter_pause(Rewriter *self, PyObject *unused) {
    self->live = 0;
    Py_RETURN_NONE;
}

static PyObject *Rewriter_resume(Rewriter *self, PyObject *unused) {
    if (self->has_source) {
        self->live = 1;
        self->rebase = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *Rewriter_timestamp_for(Rewriter *self, PyObject *const *args, Py_ssize_t nargs) {
    long long source, ts;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "timestamp_for(source, ts)");
        return NULL;
    }
    if (source_arg(args[0], &source) < 0 || source_arg(args[1], &ts) < 0) return NULL;
    if (!self->has_ts_source || source != self->ts_source || !self->has_source || source != self->source)
        Py_RETURN_NONE;
    return PyLong_FromLongLong((ts + self->ts_off) & 0xFFFFFFFFLL);
}

/* The arguments rewrite() and fanout() share, from args[0]: payload_offset, source, seq, ts, clock_rate,
   now, info. */
typedef struct {
    Py_ssize_t payload_offset;
    long long source, seq, ts, clock_rate;
    double now;
    PyObject *info;
} PacketArgs;

static int packet_args(PyObject *const *args, PacketArgs *a) {
    a->payload_offset = PyLong_AsSsize_t(args[0]);
    if (a->payload_offset == -1 && PyErr_Occurred()) return -1;
    if (source_arg(args[1], &a->source) < 0 || source_arg(args[2], &a->seq) < 0 ||
        source_arg(args[3], &a->ts) < 0 || source_arg(args[4], &a->clock_rate) < 0)
        return -1;
    a->now = PyFloat_AsDouble(args[5]);
    if (a->now == -1.0 && PyErr_Occurred()) return -1;
    a->info = args[6];
    return 0;
}

static PyObject *Rewriter_rewrite(Rewriter *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "rewrite(buf, payload_offset, source, seq, ts, clock_rate, now, info)");
        return NULL;
    }
    PacketArgs a;
    if (packet_args(args + 1, &a) < 0) return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0) return NULL;
    Py_ssize_t written;
    int r = rewrite(self, buf.buf, buf.len, a.payload_offset, a.source, a.seq, a.ts, a.clock_rate, a.now, a.info,
                    NULL, &written);
    PyBuffer_Release(&buf);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

/* drop(): -1 with an exception set, else whether the packet's number was given back. */
static int drop_packet(Rewriter *self, long long source, long long seq, PyObject *info) {
    if (!self->live || source != self->source || self->rebase) return 0;
    int64_t hi = self->in_hi;
    int64_t ext = unwrap16(hi, seq);
    int freed = 0;
    if (ext >= self->in_base && hi - ext < SEQ_WINDOW && (freed = drop_seq(self, hi, ext)) < 0) return -1;
    int64_t pid = 0;
    int has_pid = info == Py_None ? 0 : optional_int(info, str_picture_id, &pid);
    if (has_pid < 0) return -1;
    if (has_pid && !self->pid_pending) {
        int m15 = truth(info, str_picture_id_15bit);
        if (m15 < 0) return -1;
        int64_t phi = self->pid_hi;
        int64_t pext = unwrap_pid(phi, pid, m15);
        if (pext > phi) {
            if (cover_pids(self, phi + 1) < 0) return -1;
            fill_pids(self, phi, pext, self->pid_off);
            self->pid_ring[pext & PID_MASK] = DROPPED;
            self->pid_off -= 1;
            self->pid_hi = pext;
        } else if (pext >= self->pid_base && phi - pext < PICTURE_ID_WINDOW) {
            if (cover_pids(self, pext) < 0) return -1;
            int64_t *ring = self->pid_ring;
            if (ring[pext & PID_MASK] != DROPPED && pext > self->pid_sent_hi) {
                for (int64_t e = pext + 1; e < phi + 1; e++) {
                    if (ring[e & PID_MASK] != DROPPED) ring[e & PID_MASK] -= 1;
                }
                self->pid_off -= 1;
            }
            ring[pext & PID_MASK] = DROPPED;
        }
    }
    return freed;
}

static PyObject *Rewriter_drop(Rewriter *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"source", "seq", "info", NULL};
    long long source, seq;
    PyObject *info = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LL|O", names, &source, &seq, &info)) return NULL;
    int freed = drop_packet(self, source, seq, info);
    if (freed < 0) return NULL;
    return PyBool_FromLong(freed);
}

/* One consumer's compiled send of a packet already in hand: -1 with an exception set, 0 refused by the
   rewriter, 1 queued, 2 refused by libsrtp (the slot stays free). */
static int forward_packet(Rewriter *self, PyObject *packet_obj, const Py_buffer *packet, const PacketArgs *a,
                          const Vp8Fields *fields, PyObject *cache, PyObject *route, void *session) {
    Py_ssize_t room;
    char *slot = fastpath->reserve(route, &room);
    if (slot == NULL) return -1;
    if (packet->len > room) {
        PyErr_Format(PyExc_ValueError, "packet of %zd bytes is longer than %zd", packet->len, room);
        return -1;
    }
    memcpy(slot, packet->buf, (size_t)packet->len);
    Py_ssize_t written;
    int r = rewrite(self, slot, packet->len, a->payload_offset, a->source, a->seq, a->ts, a->clock_rate, a->now,
                    a->info, fields, &written);
    if (r <= 0) return r;
    if (cache != Py_None) {
        /* The publisher's packet (one for every subscriber) and this subscriber's rewritten head of it:
           a kilobyte copied per subscriber into a cache of 256 would cost more than all the rest here. */
        PyObject *head = PyBytes_FromStringAndSize(slot, written);
        if (head == NULL) return -1;
        PyObject *entry = PyTuple_Pack(2, packet_obj, head);
        Py_DECREF(head);
        if (entry == NULL) return -1;
        Py_ssize_t at = (((unsigned char)slot[2] << 8) | (unsigned char)slot[3]) % PyList_GET_SIZE(cache);
        PyObject *old = PyList_GET_ITEM(cache, at);
        PyList_SET_ITEM(cache, at, entry);
        Py_XDECREF(old);
    }
    int queued = fastpath->commit(route, slot, session, packet->len);
    return queued < 0 ? -1 : (queued ? 1 : 2);
}

static int check_cache(PyObject *cache) {
    if (cache != Py_None && (!PyList_CheckExact(cache) || PyList_GET_SIZE(cache) == 0)) {
        PyErr_SetString(PyExc_TypeError, "cache must be a non-empty list or None");
        return -1;
    }
    return 0;
}

static void *session_arg(PyObject *handle) {
    void *session = PyLong_AsVoidPtr(handle);
    if (session == NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null session");
    return session;
}

/* Attribute names fanout() reads, interned once. */
static PyObject *str_stream_handle, *str_forward, *str_is_keyframe;

/* Whether `value` (an int, or None or NULL) is the int `n`; -1 with an exception set. */
static int is_int(PyObject *value, long long n) {
    if (value == NULL || value == Py_None) return 0;
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    return v == n;
}

/* huddle.sfu.consumer.Consumer's base: the fields its per-packet decision reads, in a C struct, so that
   fanout() reads them as fields of one object rather than looking up attributes of a thousand (which cost
   as much as the Python it replaced). Python sees ordinary attributes. */
typedef struct {
    PyObject_HEAD
    PyObject *route, *ready, *rewriter, *cache, *current, *target, *max_tid, *audible;
    long long packets, octets;
    /* The libsrtp session of this consumer's SSRC alone (SrtpSession.stream_handle), for `srtp_owner`. */
    PyObject *srtp_owner;
    long long session_ssrc;
    void *session;
} Fields;

static int Fields_traverse(Fields *self, visitproc visit, void *arg) {
    Py_VISIT(self->route);
    Py_VISIT(self->ready);
    Py_VISIT(self->rewriter);
    Py_VISIT(self->cache);
    Py_VISIT(self->current);
    Py_VISIT(self->target);
    Py_VISIT(self->max_tid);
    Py_VISIT(self->audible);
    Py_VISIT(self->srtp_owner);
    return 0;
}

static int Fields_clear(Fields *self) {
    Py_CLEAR(self->route);
    Py_CLEAR(self->ready);
    Py_CLEAR(self->rewriter);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->current);
    Py_CLEAR(self->target);
    Py_CLEAR(self->max_tid);
    Py_CLEAR(self->audible);
    Py_CLEAR(self->srtp_owner);
    return 0;
}

static void Fields_dealloc(Fields *self) {
    PyObject_GC_UnTrack(self);
    Fields_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Fields_members[] = {
    {"_route", T_OBJECT, offsetof(Fields, route), 0, "the transport's Route the compiled path sends along"},
    {"ready", T_OBJECT, offsetof(Fields, ready), 0, "forwarding has started"},
    {"rewriter", T_OBJECT, offsetof(Fields, rewriter), 0, "the StreamRewriter"},
    {"cache", T_OBJECT, offsetof(Fields, cache), 0, "sent video packets (None: audio)"},
    {"current", T_OBJECT, offsetof(Fields, current), 0, "the layer being sent"},
    {"target", T_OBJECT, offsetof(Fields, target), 0, "the layer wanted"},
    {"max_tid", T_OBJECT, offsetof(Fields, max_tid), 0, "highest temporal layer forwarded"},
    {"audible", T_OBJECT, offsetof(Fields, audible), 0, "audio: heard now"},
    {"packets", T_LONGLONG, offsetof(Fields, packets), 0, "packets forwarded"},
    {"octets", T_LONGLONG, offsetof(Fields, octets), 0, "payload octets forwarded"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "huddle.sfu._rewrite.ConsumerFields",
    .tp_basicsize = sizeof(Fields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a Consumer that fanout() reads for every packet.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Fields_traverse,
    .tp_clear = (inquiry)Fields_clear,
    .tp_dealloc = (destructor)Fields_dealloc,
    .tp_members = Fields_members,
};

static int truthy(PyObject *value) { return value == NULL ? 0 : PyObject_IsTrue(value); }

/* What fanout() reads once per packet rather than once per consumer. */
typedef struct {
    PyObject *packet_obj;
    Py_buffer packet;
    PacketArgs a;
    PyObject *layer_obj, *seq_obj, *ts_obj, *offset_obj, *size_obj, *now_obj;
    Py_ssize_t size;
    Vp8Fields fields;
    int keyframe;
    int has_tid;
    int64_t tid;
} Fanned;

/* The consumer's own libsrtp session from `srtp` (an SrtpSession's stream_handle), asked for once and kept;
   NULL with an exception set. */
static void *consumer_session(Fields *c, PyObject *srtp, long long ssrc) {
    if (srtp == c->srtp_owner && ssrc == c->session_ssrc) return c->session;
    PyObject *number = PyLong_FromLongLong(ssrc);
    if (number == NULL) return NULL;
    PyObject *handle = PyObject_CallMethodOneArg(srtp, str_stream_handle, number);
    Py_DECREF(number);
    if (handle == NULL) return NULL;
    void *session = session_arg(handle);
    Py_DECREF(handle);
    if (session == NULL) return NULL;
    Py_INCREF(srtp);
    Py_XSETREF(c->srtp_owner, srtp);
    c->session_ssrc = ssrc;
    c->session = session;
    return session;
}

/* 1 when Consumer.forward turns this packet away before it changes anything: a video layer other than the one
   sent, unless it is the target's keyframe; a voice that is not among the loudest and is paused already.
   That is most copies of most packets in a large call (in call-100, 7 voices of 10 go to nobody, and each
   thumbnail's viewers take one layer of three), so it is decided before the transport's route is looked up.
   0 when forward() must run; -1 with an exception set. */
static int turned_away(Fields *c, long long layer, int keyframe) {
    if (c->cache != NULL && c->cache != Py_None) { /* video */
        int on = is_int(c->current, layer);
        if (on != 0) return on < 0 ? -1 : 0;
        int aimed = is_int(c->target, layer);
        if (aimed < 0) return -1;
        return !aimed || !keyframe;
    }
    if (((Rewriter *)c->rewriter)->live) return 0;
    int audible = truthy(c->audible);
    return audible < 0 ? -1 : !audible;
}

/* 1 when a Consumer with a Route takes nothing of this packet and changes nothing: not ready, or (with
   a compiled rewriter) turned_away(); 0 when its forward must run; -1 with an exception set. */
static int passes_over(Fields *c, long long layer, int keyframe) {
    int ready = truthy(c->ready);
    if (ready <= 0) return ready < 0 ? -1 : 1;
    if (c->rewriter == NULL || !Py_IS_TYPE(c->rewriter, &RewriterType)) return 0;
    return turned_away(c, layer, keyframe);
}

/* Consumer.forward (huddle/sfu/consumer.py) for one consumer, line for line, where it sends the compiled way;
   anything else (not a Consumer with a Route, ICE-TCP, not connected yet, a Python rewriter) goes
   to its own forward(). -1 with an exception set, else whether a packet went out. */
static int fan_one(PyObject *consumer, Fanned *f) {
    int route = 0;
    void *session = NULL;
    Fields *c = (Fields *)consumer;
    if (PyObject_TypeCheck(consumer, &FieldsType) && c->route != NULL && c->route != Py_None) {
        int over = passes_over(c, f->a.source, f->keyframe);
        if (over != 0) return over < 0 ? -1 : 0;
        PyObject *srtp = fastpath->srtp(c->route);
        if (srtp == NULL) return -1;
        route = srtp != Py_None && c->rewriter != NULL && Py_IS_TYPE(c->rewriter, &RewriterType);
        if (route && (session = consumer_session(c, srtp, ((Rewriter *)c->rewriter)->ssrc)) == NULL) return -1;
    }
    if (!route) {
        PyObject *args[] = {consumer, f->packet_obj, f->layer_obj, f->seq_obj, f->ts_obj,
                            f->offset_obj, f->a.info, f->size_obj, f->now_obj};
        PyObject *value = PyObject_VectorcallMethod(str_forward, args, 9 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (value == NULL) return -1;
        int r = PyObject_IsTrue(value);
        Py_DECREF(value);
        return r;
    }
    int r = -1;
    /* Held while this consumer is handled: nothing below runs Python code, but the batch's full-page send
       releases the GIL. */
    PyObject *cache = c->cache == NULL ? Py_None : c->cache;
    Rewriter *rw = (Rewriter *)c->rewriter;
    PyObject *via = c->route;
    Py_INCREF(cache);
    Py_INCREF(rw);
    Py_INCREF(via);
    long long layer = f->a.source;
    if (check_cache(cache) < 0) goto done;
    if (cache != Py_None) { /* video */
        int on = is_int(c->current, layer);
        if (on < 0) goto done;
        if (!on) {
            int aimed = is_int(c->target, layer);
            if (aimed < 0) goto done;
            if (!aimed || !f->keyframe) {
                r = 0;
                goto done;
            }
            /* The target layer's keyframe: switch here, so the decoder never sees a broken frame. */
            switch_to(rw, layer);
            Py_INCREF(f->layer_obj);
            Py_XSETREF(c->current, f->layer_obj);
        } else if (f->has_tid && c->max_tid != NULL && c->max_tid != Py_None) {
            long long max_tid = PyLong_AsLongLong(c->max_tid);
            if (max_tid == -1 && PyErr_Occurred()) goto done;
            if (f->tid > max_tid) {
                /* A frame nothing depends on below max_tid: skipped without a gap the subscriber would NACK. */
                r = drop_packet(rw, layer, f->a.seq, f->a.info) < 0 ? -1 : 0;
                goto done;
            }
        }
    } else {
        int audible = truthy(c->audible);
        if (audible < 0) goto done;
        if (!audible) {
            rw->live = 0;
            r = 0;
            goto done;
        }
        if (!rw->live) switch_to(rw, layer); /* audio: first packet, or back among the loudest */
    }
    int sent = forward_packet(rw, f->packet_obj, &f->packet, &f->a, &f->fields, cache, via, session);
    if (sent < 0) goto done;
    if (sent == 0) {
        r = 0;
        goto done;
    }
    c->packets += 1;
    c->octets += f->size;
    r = sent == 1;
done:
    Py_DECREF(cache);
    Py_DECREF(rw);
    Py_DECREF(via);
    return r;
}

/* taken(consumers, layer, keyframe) -> bool: whether fanout() could send a packet of `layer` to anyone, with
   nothing changed. False only when fanout() would pass over every consumer (passes_over()): the producer
   then skips the packet's copy and rewriting. Any other consumer (a pipe, a sink) counts as taking it. */
static PyObject *taken(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "taken(consumers: list, layer, keyframe)");
        return NULL;
    }
    long long layer = PyLong_AsLongLong(args[1]);
    if (layer == -1 && PyErr_Occurred()) return NULL;
    int keyframe = PyObject_IsTrue(args[2]);
    if (keyframe < 0) return NULL;
    PyObject *consumers = args[0];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(consumers); i++) {
        PyObject *consumer = PyList_GET_ITEM(consumers, i);
        Fields *c = (Fields *)consumer;
        if (!PyObject_TypeCheck(consumer, &FieldsType) || c->route == NULL || c->route == Py_None)
            Py_RETURN_TRUE;
        int over = passes_over(c, layer, keyframe);
        if (over < 0) return NULL;
        if (!over) Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *fanout(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "fanout(consumers: list, packet, payload_offset, layer, seq, ts, clock_rate, now, info, size)");
        return NULL;
    }
    Fanned f;
    f.packet_obj = args[1];
    f.offset_obj = args[2];
    f.layer_obj = args[3];
    f.seq_obj = args[4];
    f.ts_obj = args[5];
    f.now_obj = args[7];
    f.size_obj = args[9];
    PyObject *packed[] = {args[2], args[3], args[4], args[5], args[6], args[7], args[8]};
    if (packet_args(packed, &f.a) < 0) return NULL;
    f.size = PyLong_AsSsize_t(args[9]);
    if (f.size == -1 && PyErr_Occurred()) return NULL;
    f.keyframe = 0;
    f.has_tid = 0;
    f.tid = 0;
    if (f.a.info != Py_None) {
        PyObject *key = PyObject_GetAttr(f.a.info, str_is_keyframe);
        if (key == NULL) return NULL;
        f.keyframe = PyObject_IsTrue(key);
        Py_DECREF(key);
        if (f.keyframe < 0) return NULL;
        int has = optional_int(f.a.info, str_tid, &f.tid);
        if (has < 0) return NULL;
        f.has_tid = has;
    }
    if (read_fields(f.a.info, &f.fields) < 0) return NULL;
    if (PyObject_GetBuffer(f.packet_obj, &f.packet, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t sent = 0;
    PyObject *consumers = args[0];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(consumers); i++) {
        PyObject *consumer = PyList_GET_ITEM(consumers, i);
        Py_INCREF(consumer);
        int r = fan_one(consumer, &f);
        Py_DECREF(consumer);
        if (r < 0) {
            PyBuffer_Release(&f.packet);
            return NULL;
        }
        sent += r;
    }
    PyBuffer_Release(&f.packet);
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef module_methods[] = {
    {"fanout", (PyCFunction)(void (*)(void))fanout, METH_FASTCALL,
     "fanout(consumers, packet, payload_offset, layer, seq, ts, clock_rate, now, info, size) -> how many sent:"
     " Producer.receive's loop of Consumer.forward calls, in one"},
    {"taken", (PyCFunction)(void (*)(void))taken, METH_FASTCALL,
     "taken(consumers, layer, keyframe) -> bool: whether fanout() could send such a packet to anyone"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Rewriter_get_paused(Rewriter *self, void *closure) { return PyBool_FromLong(!self->live); }

static PyObject *Rewriter_get_source(Rewriter *self, void *closure) {
    if (!self->has_source) Py_RETURN_NONE;
    return PyLong_FromLongLong(self->source);
}

static PyObject *Rewriter_get_ssrc(Rewriter *self, void *closure) { return PyLong_FromLongLong(self->ssrc); }

static PyMethodDef Rewriter_methods[] = {
    {"switch", (PyCFunction)Rewriter_switch, METH_O, "switch(source): forward `source` from its next packet"},
    {"pause", (PyCFunction)Rewriter_pause, METH_NOARGS, "pause(): forward nothing until switch() or resume()"},
    {"resume", (PyCFunction)Rewriter_resume, METH_NOARGS, "resume(): switch() back to the current source"},
    {"timestamp_for", (PyCFunction)(void (*)(void))Rewriter_timestamp_for, METH_FASTCALL,
     "timestamp_for(source, ts) -> the output timestamp, or None"},
    {"rewrite", (PyCFunction)(void (*)(void))Rewriter_rewrite, METH_FASTCALL,
     "rewrite(buf, payload_offset, source, seq, ts, clock_rate, now, info) -> whether it goes"},
    {"drop", (PyCFunction)(void (*)(void))Rewriter_drop, METH_VARARGS | METH_KEYWORDS,
     "drop(source, seq, info=None) -> whether its number was given back"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Rewriter_getset[] = {
    {"paused", (getter)Rewriter_get_paused, NULL, "True while nothing is forwarded", NULL},
    {"source", (getter)Rewriter_get_source, NULL, "the source forwarded (or waited for, or paused)", NULL},
    {"ssrc", (getter)Rewriter_get_ssrc, NULL, "the output SSRC", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RewriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "huddle.sfu._rewrite.StreamRewriter",
    .tp_basicsize = sizeof(Rewriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "huddle.sfu.rewrite.StreamRewriter, compiled.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Rewriter_init,
    .tp_dealloc = (destructor)Rewriter_dealloc,
    .tp_methods = Rewriter_methods,
    .tp_getset = Rewriter_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "huddle.sfu._rewrite",
    .m_doc = "Compiled StreamRewriter and a Consumer's per-packet send.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__rewrite(void) {
    /* PyCapsule_Import walks attributes from the package down: the submodule must be imported first. */
    PyObject *rtc = PyImport_ImportModule("huddle.rtc._fastpath");
    if (rtc == NULL) return NULL;
    Py_DECREF(rtc);
    fastpath = PyCapsule_Import(HUDDLE_FASTPATH_CAPSULE, 0);
    if (fastpath == NULL) return NULL;
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&str_picture_id, "picture_id"},
        {&str_picture_id_15bit, "picture_id_15bit"},
        {&str_tl0picidx, "tl0picidx"},
        {&str_tid, "tid"},
        {&str_start_of_partition, "start_of_partition"},
        {&str_partition_index, "partition_index"},
        {&str_stream_handle, "stream_handle"},
        {&str_forward, "forward"},
        {&str_is_keyframe, "is_keyframe"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    }
    if (PyType_Ready(&RewriterType) < 0 || PyType_Ready(&FieldsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RewriterType);
    if (PyModule_AddObject(m, "StreamRewriter", (PyObject *)&RewriterType) < 0) {
        Py_DECREF(&RewriterType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FieldsType);
    if (PyModule_AddObject(m, "ConsumerFields", (PyObject *)&FieldsType) < 0) {
        Py_DECREF(&FieldsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
