/* SRTP protect for one outgoing SSRC with AEAD_AES_128_GCM (RFC 7714), the profile browsers negotiate with
   us: what libsrtp's srtp_protect does for a session that holds that SSRC alone (huddle.rtc.srtp's
   stream_handle), byte for byte, without its per-packet bookkeeping. In a 100-person call that bookkeeping
   (finding the stream in its session, the replay bitmap a sender never reads, the key-usage counter) cost
   more CPU than the cipher itself.

   GcmStream(ssrc, key, salt, window)
       `key` and `salt` are the session key and salt (derived from the master key by huddle.rtc.srtp), so
       nothing here but the cipher touches key material. `handle` is the address protect() takes.

   PROTECT: the address of `int protect(void *stream, void *packet, int *length)`, with srtp_protect's
   signature and meaning, so that the compiled forward (huddle/rtc/_fastpath.c's Batch, through
   huddle/sfu/_rewrite.c) and huddle.rtc.fastpath.protect call either through one pointer. The packet is
   encrypted in place and its 16-byte tag appended: the buffer must have that room.

   The packet index follows libsrtp's sender exactly (rdbx.c: srtp_rdbx_estimate_index, srtp_rdbx_check):
   a sequence number is placed against the highest one protected so far, a newer one moves it on, one
   already protected is protected again with the same index (allow_repeat_tx, for answers to NACKs), and
   one `window` or more behind is refused as too old. libsrtp's bitmap of which older numbers were seen
   decides only between "repeat" and "first time", which a sender that allows repeats treats alike, so it
   is not kept. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#define KEY_LENGTH 16
#define SALT_LENGTH 12
#define TAG_LENGTH 16
#define RTP_HEADER 12
#define SEQ_MEDIAN (1 << 15)
#define SEQ_MAX (1 << 16)

/* libsrtp's srtp_err_status_t values, so that a refusal reads the same whichever protect made it. */
#define ERR_BAD_PARAM 2
#define ERR_CIPHER_FAIL 8
#define ERR_REPLAY_OLD 10
#define ERR_NO_CTX 13

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    uint32_t ssrc;
    int32_t window;
    /* libsrtp's rdbx index: the rollover counter and the highest sequence number protected. */
    uint64_t index;
    uint8_t salt[SALT_LENGTH];
} GcmStream;

/* srtp_rdbx_estimate_index: the index `seq` is given and how far it is ahead of the highest (negative:
   behind). libsrtp counts no rollover until the index has passed 2^15. */
static int32_t estimate(uint64_t local, uint16_t seq, uint64_t *guess) {
    if (local <= SEQ_MEDIAN) {
        *guess = seq;
        return (int32_t)seq - (int32_t)(uint16_t)local;
    }
    uint32_t roc = (uint32_t)(local >> 16), guess_roc = roc;
    int32_t local_seq = (uint16_t)local, s = seq, difference = s - local_seq;
    if (local_seq < SEQ_MEDIAN) {
        if (s - local_seq > SEQ_MEDIAN) {
            guess_roc = roc - 1;
            difference -= SEQ_MAX;
        }
    } else if (local_seq - SEQ_MEDIAN > s) {
        guess_roc = roc + 1;
        difference += SEQ_MAX;
    }
    *guess = ((uint64_t)guess_roc << 16) | seq;
    return difference;
}

static int protect(void *session, void *packet, int *length) {
    GcmStream *self = session;
    uint8_t *p = packet;
    int n = *length;
    if (n < RTP_HEADER) return ERR_BAD_PARAM;
    int header = RTP_HEADER + 4 * (p[0] & 0x0F);
    if (p[0] & 0x10) {
        if (n < header + 4) return ERR_BAD_PARAM;
        header += 4 + 4 * ((p[header + 2] << 8) | p[header + 3]);
    }
    if (n < header) return ERR_BAD_PARAM;
    uint32_t ssrc = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) | ((uint32_t)p[10] << 8) | p[11];
    if (ssrc != self->ssrc) return ERR_NO_CTX;
    uint64_t index;
    int32_t delta = estimate(self->index, (uint16_t)((p[2] << 8) | p[3]), &index);
    if (delta <= -self->window) return ERR_REPLAY_OLD;
    if (delta > 0) self->index = index;

    /* RFC 7714 §8.1: 00 00 || SSRC || ROC || SEQ, XOR the session salt. */
    uint8_t iv[SALT_LENGTH] = {0, 0, p[8], p[9], p[10], p[11], (uint8_t)(index >> 40), (uint8_t)(index >> 32),
                               (uint8_t)(index >> 24), (uint8_t)(index >> 16), p[2], p[3]};
    for (int i = 0; i < SALT_LENGTH; i++) iv[i] ^= self->salt[i];
    int out;
    EVP_CIPHER_CTX *ctx = self->ctx;
    if (!EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) || !EVP_EncryptUpdate(ctx, NULL, &out, p, header) ||
        !EVP_EncryptUpdate(ctx, p + header, &out, p + header, n - header) ||
        !EVP_EncryptFinal_ex(ctx, p + n, &out) ||
        !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LENGTH, p + n))
        return ERR_CIPHER_FAIL;
    *length = n + TAG_LENGTH;
    return 0;
}

static void GcmStream_dealloc(GcmStream *self) {
    EVP_CIPHER_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int GcmStream_init(GcmStream *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"ssrc", "key", "salt", "window", NULL};
    unsigned long ssrc;
    Py_buffer key, salt;
    int window;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ky*y*i", names, &ssrc, &key, &salt, &window)) return -1;
    int ok = 0;
    if (ssrc > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "ssrc must fit 32 bits");
    } else if (key.len != KEY_LENGTH || salt.len != SALT_LENGTH) {
        PyErr_Format(PyExc_ValueError, "a %d-byte session key and a %d-byte salt are needed", KEY_LENGTH,
                     SALT_LENGTH);
    } else if (window < 64 || window >= SEQ_MEDIAN) {
        /* libsrtp's own bounds for a replay window */
        PyErr_SetString(PyExc_ValueError, "window must be in [64, 32768)");
    } else {
        EVP_CIPHER_CTX_free(self->ctx);
        self->ctx = EVP_CIPHER_CTX_new();
        if (self->ctx == NULL || !EVP_EncryptInit_ex(self->ctx, EVP_aes_128_gcm(), NULL, key.buf, NULL)) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-128-GCM");
        } else {
            self->ssrc = (uint32_t)ssrc;
            self->window = (window + 31) & ~31; /* libsrtp's bitmap is whole 32-bit words */
            self->index = 0;
            memcpy(self->salt, salt.buf, SALT_LENGTH);
            ok = 1;
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    return ok ? 0 : -1;
}

static PyObject *GcmStream_handle(GcmStream *self, void *closure) { return PyLong_FromVoidPtr(self); }

static PyGetSetDef GcmStream_getset[] = {
    {"handle", (getter)GcmStream_handle, NULL, "the address PROTECT takes; valid while this object lives", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GcmStreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "huddle.rtc._srtp_gcm.GcmStream",
    .tp_basicsize = sizeof(GcmStream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SRTP AEAD_AES_128_GCM protect state of one outgoing SSRC.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)GcmStream_init,
    .tp_dealloc = (destructor)GcmStream_dealloc,
    .tp_getset = GcmStream_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "huddle.rtc._srtp_gcm",
    .m_doc = "SRTP AEAD_AES_128_GCM protect of one outgoing SSRC, as libsrtp does it.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__srtp_gcm(void) {
    if (PyType_Ready(&GcmStreamType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&GcmStreamType);
    if (PyModule_AddObject(m, "GcmStream", (PyObject *)&GcmStreamType) < 0 ||
        PyModule_AddObject(m, "PROTECT", PyLong_FromVoidPtr((void *)protect)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
