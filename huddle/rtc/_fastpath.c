/* The media port's per-packet work in C: SRTP protect and batched UDP sends (huddle.rtc.batch wraps it).

   protect(function, session, packet, out) -> length
       Copy an RTP packet into `out` and protect it there with libsrtp's srtp_protect, called through the
       function pointer that pylibsrtp's own cffi module exposes (`function`, `session`: addresses as
       ints). The cipher is pylibsrtp's libsrtp itself, so the bytes are those of pylibsrtp by
       construction; what this saves is cffi's per-call conversions and the buffer slice assignment.

   Batch(fd, capacity, slot, protect=0)
       Datagrams queued with add(data, address) are copied into slots of its own and sent with one
       sendmmsg(2) by flush(). A datagram the kernel refuses does not stop the ones after it: each is tried
       once, in order, as a loop of sendto would, and flush() says how many went, how many found the send
       buffer full (EAGAIN) and how many failed otherwise. `packets` and `octets` count what was queued.
       Other extension modules queue RTP through the table in _fastpath.h: written straight into a slot,
       protected there with `protect` (srtp_protect's address), and sent as soon as the batch is full (the
       next flush() reports those sends too). `holding`: whether the port is handling a received datagram,
       so that sends wait in the batch until its flush() (huddle.rtc.port.MediaPort.holding).

   Route()
       Where a transport's RTP goes the compiled way, kept by the transport (huddle.rtc.transport) whenever
       its SRTP session or its ICE pair changes: set(batch, srtp, address) parses the address once, so a
       Consumer's per-packet send reads a struct instead of looking up four attributes and parsing a tuple
       for every copy. A route is on only with a Batch, an SRTP session and a UDP address the batch takes
       (`on` says so); anything else (ICE-TCP, not connected) goes the reference way.

   Nothing here keeps a Python object: addresses are parsed into sockaddrs when queued, and the socket is
   an fd whose owner must flush before closing it. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "_fastpath.h"

typedef int (*protect_fn)(void *session, void *packet, int *length);

/* The longest trailer srtp_protect may append (a GCM tag, or an MKI and an 80-bit tag): srtp.TRAILER. */
#define TRAILER 30

/* EINTR is retried this many times per datagram before it counts as failed (the socket is non-blocking,
   so it does not really happen; the bound keeps the loop finite regardless). */
#define EINTR_RETRIES 3

static PyObject *fastpath_protect(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "protect(function, session, packet, out)");
        return NULL;
    }
    protect_fn function = (protect_fn)PyLong_AsVoidPtr(args[0]);
    void *session = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (function == NULL || session == NULL) {
        PyErr_SetString(PyExc_ValueError, "null function or session");
        return NULL;
    }
    Py_buffer packet, out;
    if (PyObject_GetBuffer(args[2], &packet, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    PyObject *result = NULL;
    if (packet.len > out.len - TRAILER || packet.len > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "packet of %zd bytes is longer than %zd", packet.len,
                     out.len - TRAILER);
    } else {
        memcpy(out.buf, packet.buf, (size_t)packet.len);
        int length = (int)packet.len;
        int status = function(session, out.buf, &length);
        if (status) {
            PyErr_Format(PyExc_ValueError, "libsrtp error %d", status);
        } else {
            result = PyLong_FromLong(length);
        }
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&packet);
    return result;
}

typedef struct {
    PyObject_HEAD
    int fd;
    int family;
    unsigned capacity;
    unsigned count;
    Py_ssize_t slot;
    protect_fn protect;
    /* What sends made by commit() on a full batch did, until flush() reports it. */
    unsigned sent, blocked, failed;
    unsigned long long packets, octets;
    int holding;
    char *data;
    struct iovec *iov;
    struct mmsghdr *msgs;
    struct sockaddr_storage *addrs;
} Batch;

static PyTypeObject BatchType;

static void Batch_free_buffers(Batch *self) {
    PyMem_Free(self->data);
    PyMem_Free(self->iov);
    PyMem_Free(self->msgs);
    PyMem_Free(self->addrs);
    self->data = NULL;
    self->iov = NULL;
    self->msgs = NULL;
    self->addrs = NULL;
}

static void Batch_dealloc(Batch *self) {
    Batch_free_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Batch_init(Batch *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"fd", "capacity", "slot", "protect", NULL};
    int fd;
    unsigned capacity = 64;
    Py_ssize_t slot = 2048;
    PyObject *protect = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|InO", names, &fd, &capacity, &slot, &protect))
        return -1;
    protect_fn function = NULL;
    if (protect != NULL) {
        function = (protect_fn)PyLong_AsVoidPtr(protect);
        if (PyErr_Occurred()) return -1;
    }
    if (capacity == 0 || capacity > 1024 || slot < 64 + TRAILER || slot > 65536) {
        PyErr_SetString(PyExc_ValueError, "capacity must be 1-1024 and slot 64-65536 bytes");
        return -1;
    }
    int family;
    socklen_t size = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &size) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (family != AF_INET && family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "an AF_INET or AF_INET6 socket is needed");
        return -1;
    }
    Batch_free_buffers(self);
    self->fd = fd;
    self->family = family;
    self->capacity = capacity;
    self->count = 0;
    self->slot = slot;
    self->protect = function;
    self->sent = self->blocked = self->failed = 0;
    self->packets = self->octets = 0;
    self->data = PyMem_Malloc((size_t)capacity * (size_t)slot);
    self->iov = PyMem_Calloc(capacity, sizeof(struct iovec));
    self->msgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->addrs = PyMem_Calloc(capacity, sizeof(struct sockaddr_storage));
    if (!self->data || !self->iov || !self->msgs || !self->addrs) {
        Batch_free_buffers(self);
        PyErr_NoMemory();
        return -1;
    }
    for (unsigned i = 0; i < capacity; i++) {
        self->iov[i].iov_base = self->data + (size_t)i * (size_t)slot;
        self->msgs[i].msg_hdr.msg_iov = &self->iov[i];
        self->msgs[i].msg_hdr.msg_iovlen = 1;
        self->msgs[i].msg_hdr.msg_name = &self->addrs[i];
    }
    return 0;
}

/* A numeric (host, port[, flowinfo, scope_id]) of the socket's family, as the kernel gave it to recvmsg.
   Returns the sockaddr's length, or 0 with ValueError set for anything else (the caller then sends that
   datagram with socket.sendto, which knows every other form). */
static socklen_t parse_address(int family, PyObject *address, struct sockaddr_storage *out) {
    if (!PyTuple_Check(address) || PyTuple_GET_SIZE(address) < 2) goto unsupported;
    PyObject *host = PyTuple_GET_ITEM(address, 0);
    if (!PyUnicode_Check(host)) goto unsupported;
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL) return 0;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(address, 1));
    if (port == -1 && PyErr_Occurred()) return 0;
    if (port < 0 || port > 65535) goto unsupported;
    if (family == AF_INET) {
        if (PyTuple_GET_SIZE(address) != 2) goto unsupported;
        struct sockaddr_in *sin = (struct sockaddr_in *)out;
        memset(sin, 0, sizeof(*sin));
        if (inet_pton(AF_INET, text, &sin->sin_addr) != 1) goto unsupported;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        return sizeof(*sin);
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
    memset(sin6, 0, sizeof(*sin6));
    if (inet_pton(AF_INET6, text, &sin6->sin6_addr) != 1) goto unsupported;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    if (PyTuple_GET_SIZE(address) >= 3) {
        unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(address, 2));
        if (flowinfo == (unsigned long)-1 && PyErr_Occurred()) return 0;
        sin6->sin6_flowinfo = htonl((uint32_t)flowinfo);
    }
    if (PyTuple_GET_SIZE(address) >= 4) {
        unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(address, 3));
        if (scope == (unsigned long)-1 && PyErr_Occurred()) return 0;
        sin6->sin6_scope_id = (uint32_t)scope;
    }
    return sizeof(*sin6);
unsupported:
    PyErr_SetString(PyExc_ValueError, "not a numeric address of the socket's family");
    return 0;
}

/* add(data, address) -> datagrams queued. The caller flushes when the count reaches `capacity`. */
static PyObject *Batch_add(Batch *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(data, address)");
        return NULL;
    }
    if (self->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "uninitialised Batch");
        return NULL;
    }
    if (self->count >= self->capacity) {
        PyErr_SetString(PyExc_OverflowError, "batch full: flush first");
        return NULL;
    }
    unsigned i = self->count;
    socklen_t length = parse_address(self->family, args[1], &self->addrs[i]);
    if (length == 0) return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) return NULL;
    if (data.len > self->slot) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "datagram longer than a slot");
        return NULL;
    }
    memcpy(self->iov[i].iov_base, data.buf, (size_t)data.len);
    self->iov[i].iov_len = (size_t)data.len;
    PyBuffer_Release(&data);
    self->msgs[i].msg_hdr.msg_namelen = length;
    self->count = i + 1;
    self->packets++;
    self->octets += self->iov[i].iov_len;
    return PyLong_FromUnsignedLong(self->count);
}

/* Every queued datagram tried once, in order; the batch empties and the outcome adds to what flush()
   reports next. */
static void Batch_send(Batch *self) {
    unsigned count = self->count, at = 0, interrupted = 0;
    self->count = 0;
    while (at < count) {
        int n, error;
        Py_BEGIN_ALLOW_THREADS
        n = sendmmsg(self->fd, self->msgs + at, count - at, 0);
        error = errno;
        Py_END_ALLOW_THREADS
        if (n > 0) {
            self->sent += (unsigned)n;
            at += (unsigned)n;
            interrupted = 0;
            continue;
        }
        /* sendmmsg reports an error only for the first datagram it was given: skip that one alone. */
        if (n < 0 && error == EINTR && ++interrupted <= EINTR_RETRIES) continue;
        if (n < 0 && (error == EAGAIN || error == EWOULDBLOCK)) {
            self->blocked++;
        } else {
            self->failed++;
        }
        interrupted = 0;
        at++;
    }
}

/* flush() -> (sent, would_block, failed): every queued datagram tried once, in order; the batch empties.
   The figures include the sends commit() made since the last flush(). */
static PyObject *Batch_flush(Batch *self, PyObject *unused) {
    Batch_send(self);
    PyObject *result = Py_BuildValue("(III)", self->sent, self->blocked, self->failed);
    self->sent = self->blocked = self->failed = 0;
    return result;
}

typedef struct {
    PyObject_HEAD
    PyObject *batch; /* a Batch that takes RTP, or NULL: the route is off */
    PyObject *srtp;
    struct sockaddr_storage address;
    socklen_t address_length;
} Route;

static PyTypeObject RouteType;

static int route_on(Route *route) { return route->batch != NULL; }

static int Route_traverse(Route *self, visitproc visit, void *arg) {
    Py_VISIT(self->batch);
    Py_VISIT(self->srtp);
    return 0;
}

static int Route_clear(Route *self) {
    Py_CLEAR(self->batch);
    Py_CLEAR(self->srtp);
    return 0;
}

static void Route_dealloc(Route *self) {
    PyObject_GC_UnTrack(self);
    Route_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set(batch, srtp, address) -> whether the route is on: off unless `batch` is a Batch that takes RTP,
   `srtp` is not None and the batch takes `address` (a TCP address or None turns it off, as does any
   address the batch cannot send to). */
static PyObject *Route_set(Route *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set(batch, srtp, address)");
        return NULL;
    }
    Route_clear(self);
    PyObject *batch = args[0], *srtp = args[1], *address = args[2];
    if (!PyObject_TypeCheck(batch, &BatchType) || ((Batch *)batch)->data == NULL ||
        ((Batch *)batch)->protect == NULL || srtp == Py_None)
        Py_RETURN_FALSE;
    socklen_t length = parse_address(((Batch *)batch)->family, address, &self->address);
    if (length == 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    self->address_length = length;
    Py_INCREF(batch);
    Py_INCREF(srtp);
    self->batch = batch;
    self->srtp = srtp;
    Py_RETURN_TRUE;
}

static PyObject *Route_on(Route *self, void *closure) { return PyBool_FromLong(route_on(self)); }

static PyMethodDef Route_methods[] = {
    {"set", (PyCFunction)(void (*)(void))Route_set, METH_FASTCALL,
     "set(batch, srtp, address) -> bool: route RTP to `address` through `batch`, protected by `srtp`"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Route_getset[] = {
    {"on", (getter)Route_on, NULL, "whether RTP can go this way", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RouteType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "huddle.rtc._fastpath.Route",
    .tp_basicsize = sizeof(Route),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Where a transport's RTP goes the compiled way: a batch, an SRTP session, a parsed address.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Route_traverse,
    .tp_clear = (inquiry)Route_clear,
    .tp_dealloc = (destructor)Route_dealloc,
    .tp_methods = Route_methods,
    .tp_getset = Route_getset,
};

static PyObject *Route_srtp(PyObject *route) {
    if (!PyObject_TypeCheck(route, &RouteType)) {
        PyErr_SetString(PyExc_TypeError, "a huddle.rtc._fastpath.Route is needed");
        return NULL;
    }
    Route *self = (Route *)route;
    if (!route_on(self) || !((Batch *)self->batch)->holding) return Py_None;
    return self->srtp;
}

static char *Route_reserve(PyObject *route, Py_ssize_t *room) {
    Route *r = (Route *)route;
    if (!PyObject_TypeCheck(route, &RouteType) || !route_on(r)) {
        PyErr_SetString(PyExc_ValueError, "reserve() on a route that is off");
        return NULL;
    }
    Batch *self = (Batch *)r->batch;
    if (self->count >= self->capacity) Batch_send(self); /* only if a commit() never came */
    unsigned i = self->count;
    memcpy(&self->addrs[i], &r->address, r->address_length);
    self->msgs[i].msg_hdr.msg_namelen = r->address_length;
    *room = self->slot - TRAILER;
    return self->iov[i].iov_base;
}

static int Route_commit(PyObject *route, char *slot, void *session, Py_ssize_t length) {
    Route *r = (Route *)route;
    if (!PyObject_TypeCheck(route, &RouteType) || !route_on(r)) {
        PyErr_SetString(PyExc_ValueError, "commit() on a route that is off");
        return -1;
    }
    Batch *self = (Batch *)r->batch;
    unsigned i = self->count;
    if (i >= self->capacity || slot != self->iov[i].iov_base || length < 0 || length > self->slot - TRAILER) {
        PyErr_SetString(PyExc_RuntimeError, "commit() of a slot that is not the next free one");
        return -1;
    }
    int size = (int)length;
    if (self->protect(session, self->iov[i].iov_base, &size)) return 0;
    self->iov[i].iov_len = (size_t)size;
    self->count = i + 1;
    self->packets++;
    self->octets += (size_t)size;
    if (self->count >= self->capacity) Batch_send(self);
    return 1;
}

static const HuddleFastpathApi api = {Route_srtp, Route_reserve, Route_commit};

static PyObject *Batch_len(Batch *self, void *closure) { return PyLong_FromUnsignedLong(self->count); }

static PyObject *Batch_capacity(Batch *self, void *closure) { return PyLong_FromUnsignedLong(self->capacity); }

static PyObject *Batch_packets(Batch *self, void *closure) { return PyLong_FromUnsignedLongLong(self->packets); }

static PyObject *Batch_octets(Batch *self, void *closure) { return PyLong_FromUnsignedLongLong(self->octets); }

static PyMethodDef Batch_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Batch_add, METH_FASTCALL,
     "add(data, address) -> count: queue a copy of a datagram for `address`"},
    {"flush", (PyCFunction)Batch_flush, METH_NOARGS,
     "flush() -> (sent, would_block, failed): send every queued datagram with sendmmsg(2)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Batch_get_holding(Batch *self, void *closure) { return PyBool_FromLong(self->holding); }

static int Batch_set_holding(Batch *self, PyObject *value, void *closure) {
    int holding = value == NULL ? 0 : PyObject_IsTrue(value);
    if (holding < 0) return -1;
    self->holding = holding;
    return 0;
}

static PyGetSetDef Batch_getset[] = {
    {"holding", (getter)Batch_get_holding, (setter)Batch_set_holding,
     "whether the port holds sends until flush(): only then does a Route send through this batch", NULL},
    {"count", (getter)Batch_len, NULL, "datagrams queued", NULL},
    {"capacity", (getter)Batch_capacity, NULL, "datagrams a flush sends at most", NULL},
    {"packets", (getter)Batch_packets, NULL, "datagrams queued since it was made", NULL},
    {"octets", (getter)Batch_octets, NULL, "bytes of the datagrams queued since it was made", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "huddle.rtc._fastpath.Batch",
    .tp_basicsize = sizeof(Batch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Datagrams for one UDP socket, sent together with sendmmsg(2).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Batch_init,
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
};

static PyMethodDef module_methods[] = {
    {"protect", (PyCFunction)(void (*)(void))fastpath_protect, METH_FASTCALL,
     "protect(function, session, packet, out) -> length: srtp_protect a copy of `packet` in `out`"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "huddle.rtc._fastpath",
    .m_doc = "Compiled per-packet path of the media port.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&BatchType) < 0 || PyType_Ready(&RouteType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&BatchType);
    if (PyModule_AddObject(m, "Batch", (PyObject *)&BatchType) < 0) {
        Py_DECREF(&BatchType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RouteType);
    if (PyModule_AddObject(m, "Route", (PyObject *)&RouteType) < 0) {
        Py_DECREF(&RouteType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New((void *)&api, HUDDLE_FASTPATH_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
