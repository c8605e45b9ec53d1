/* _port.c: a Port (a send bound to one peer's ring and incarnation) and the drain's reply
 * matching and handler dispatch, in C (reference: port.py's Port, and the Messenger's deliver in
 * guest/endpoint.py, which the careful path and every other case still use).
 *
 * Boundary: what keeps Python frames off a round trip's critical path between a publish and a
 * handler, and back: a bound send that checks its peer entry, encodes into the slot and rings
 * the doorbell in one call; a drain that stores an awaited reply, or calls a handler and sends
 * its answer through the requester's Port, with no Python frame of its own. Anything else (no
 * handler, no Port, a refused answer) goes back to Python. */
#include "_fastring.h"

typedef struct Port Port;
static long port_put(Port *p, uint32_t t32, uint32_t s32, uint64_t m64, PyObject *payload);
static int match_reply(struct drain_state *d, PyObject *msg, PyObject *sender, uint32_t type);
static int run_handler(struct drain_state *d, PyObject *handler, PyObject *msg, PyObject *key,
                       PyObject *sender, uint32_t type);

/* Port: a send bound to one peer's ring, for the peer's current incarnation (message.py's
 * ``encode`` and ring.py's ``Ring.sender`` in one object). What a bound send re-did on every
 * call, it does once: the ring, counter and peer-table buffers are held (so the mapping cannot
 * go while a Port uses it; ``close`` lets go), the geometry and the doorbell are C fields.
 *
 * With a peer table (an instance's Port; the host's have none: its own records route), each
 * send first checks the target's entry, which only the host writes: unless it still says
 * ``state`` and ``pid`` (the incarnation the Port was made for), nothing is sent and the answer
 * is REROUTE (-3), and the caller routes afresh (a death, a restart, a takeover). That check was
 * PeerTable.route in Python on every send.
 *
 * ``port(type, data)`` sends bytes; ``port.message(type, sub, id, payload)`` writes the
 * mk_message header and the payload straight into the slot: bytes as msgpack bin, None, small
 * ints and booleans here, anything else through the configured packer. Answers as send: an
 * errno, 0, or the doorbell it could not ring (-1, -2), or REROUTE. */

struct Port {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Py_buffer ring, counters, peers;
    int open, has_counters, has_peers;
    uint64_t nslots, stride, slot_bytes, sender, cpu, *count;
    long wake_fd, signal_pid, signo;
    Py_ssize_t peer_at;
    uint32_t want_state, want_pid;
    uint64_t tail_hint;                  /* see publish: an instance's Port only */
};

static PyObject *port_call(Port *p, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static void port_release(Port *p)
{
    if (!p->open)
        return;
    p->open = 0;
    PyBuffer_Release(&p->ring);
    if (p->has_counters)
        PyBuffer_Release(&p->counters);
    if (p->has_peers)
        PyBuffer_Release(&p->peers);
    p->has_counters = p->has_peers = 0;
    p->tail_hint = 0;
}

static void port_dealloc(Port *p)
{
    port_release(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* Port(ring, nslots, stride, slot_bytes, sender_id, sender_cpu, counters, offset, wake_fd,
 *      signal_pidfd, signo, peers, peer_offset, state, pid); peers None: no entry check */
static PyObject *port_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *ring, *counters, *peers;
    unsigned long long nslots, stride, slot_bytes, sender, cpu;
    Py_ssize_t off, peer_at;
    long wake_fd, signal_pid, signo;
    unsigned int state, pid;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Port takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OKKKKKOnlllOnII", &ring, &nslots, &stride, &slot_bytes, &sender,
                          &cpu, &counters, &off, &wake_fd, &signal_pid, &signo, &peers, &peer_at,
                          &state, &pid))
        return NULL;
    Port *p = (Port *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    if (PyObject_GetBuffer(ring, &p->ring, PyBUF_WRITABLE) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    p->open = 1;
    if (!ring_fits((uint64_t)p->ring.len, nslots, stride, slot_bytes)) {
        Py_DECREF(p);
        PyErr_SetString(PyExc_ValueError, "ring geometry does not fit the buffer");
        return NULL;
    }
    if (counters != Py_None) {
        p->count = (uint64_t *)hold_at(counters, &p->counters, PyBUF_WRITABLE, off, 8,
                                       "counter offset outside the buffer");
        if (p->count == NULL) {
            Py_DECREF(p);
            return NULL;
        }
        p->has_counters = 1;
    }
    if (peers != Py_None) {
        if (hold_at(peers, &p->peers, PyBUF_SIMPLE, peer_at, 4,
                    "peer entry outside the table") == NULL) {
            Py_DECREF(p);
            return NULL;
        }
        p->has_peers = 1;
        p->peer_at = peer_at;
    }
    p->nslots = nslots;
    p->stride = stride;
    p->slot_bytes = slot_bytes;
    p->sender = sender;
    p->cpu = cpu;
    p->wake_fd = wake_fd;
    p->signal_pid = signal_pid;
    p->signo = signo;
    p->want_state = state;
    p->want_pid = pid;
    p->vectorcall = (vectorcallfunc)port_call;
    return (PyObject *)p;
}

/* the entry check: still the incarnation this Port was made for? (state, pid adjacent) */
static inline int port_current(Port *p)
{
    if (!p->has_peers)
        return 1;
    const char *e = (const char *)p->peers.buf + p->peer_at;
    return *(volatile uint32_t *)e == p->want_state && *(volatile uint32_t *)(e + 4) == p->want_pid;
}

static int port_open(Port *p)
{
    if (p->open)
        return 1;
    PyErr_SetString(PyExc_ValueError, "the port is closed");
    return 0;
}

static long port_send(Port *p, uint64_t type, const void *head, uint64_t hlen, const void *body,
                      uint64_t blen)
{
    if (!port_current(p))
        return REROUTE;
    long rc = publish((char *)p->ring.buf, p->nslots, p->stride, p->slot_bytes, p->sender, p->cpu,
                      p->count, type, head, hlen, body, blen,
                      p->has_peers ? &p->tail_hint : NULL);
    return rc < 0 ? ring_doorbell(rc, p->wake_fd, p->signal_pid, p->signo) : rc;
}

static PyObject *port_call(Port *p, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "port(msg_type, data)");
        return NULL;
    }
    if (!port_open(p))
        return NULL;
    uint64_t type = PyLong_AsUnsignedLongLong(args[0]);
    Py_buffer data;
    if ((type == (uint64_t)-1 && PyErr_Occurred()) ||
            PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    long rc = port_send(p, type & 0xFFFFFFFFu, NULL, 0, data.buf, (uint64_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromLong(rc);
}

/* message(type, sub, id, payload): the mk_message (_message.c's encode_head) written into the
 * slot, with no bytes object between. */
#define PUT_FAILED LONG_MIN              /* port_put: a Python exception is set */

/* one mk_message written into the ring by ``p``: send's answer (0, an errno, a doorbell it
 * could not ring, REROUTE), or PUT_FAILED. message, messages and the C dispatch's answers */
static long port_put(Port *p, uint32_t t32, uint32_t s32, uint64_t m64, PyObject *payload)
{
    if (!port_open(p))
        return PUT_FAILED;
    unsigned char head[HEAD_MAX];
    uint64_t hlen, blen;
    const void *body;
    PyObject *packed;
    int rc = encode_head(t32, s32, m64, payload, head, &hlen, &body, &blen, &packed);
    if (rc != 0)
        return rc < 0 ? PUT_FAILED : rc;
    if (!port_open(p)) {                     /* (the packer ran Python: it may have closed us) */
        Py_XDECREF(packed);
        return PUT_FAILED;
    }
    long sent = port_send(p, t32, head, hlen, body, blen);
    Py_XDECREF(packed);
    return sent;
}

/* a request (SUB_REQUEST) written into the ring by ``port``, which must be a Port: send's
 * answer, or PUT_FAILED (LONG_MIN) with an exception set. The Waiter's ask (_ring.c) */
long port_request(PyObject *port, uint32_t type, uint64_t mid, PyObject *payload)
{
    if (!Py_IS_TYPE(port, &PortType)) {
        PyErr_SetString(PyExc_TypeError, "ask: not a Port");
        return PUT_FAILED;
    }
    return port_put((Port *)port, type, SUB_REQUEST, mid, payload);
}

/* a message's type and subtype, u32 each: 0, or -1 with an exception set */
static int message_kind(PyObject *type_arg, PyObject *sub_arg, uint32_t *type, uint32_t *sub)
{
    unsigned long t = PyLong_AsUnsignedLong(type_arg);
    if (t == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    unsigned long s = PyLong_AsUnsignedLong(sub_arg);
    if (s == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (t > 0xFFFFFFFFul || s > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "message type and subtype are u32");
        return -1;
    }
    *type = (uint32_t)t;
    *sub = (uint32_t)s;
    return 0;
}

static PyObject *port_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Port *p = (Port *)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "message(msg_type, subtype, msg_id, payload)");
        return NULL;
    }
    if (!port_open(p))
        return NULL;
    uint32_t type, sub;
    if (message_kind(args[0], args[1], &type, &sub) < 0)
        return NULL;
    unsigned long long mid = PyLong_AsUnsignedLongLong(args[2]);
    if (mid == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long rc = port_put(p, type, sub, mid, args[3]);
    return rc == PUT_FAILED ? NULL : PyLong_FromLong(rc);
}

/* messages(type, sub, first_id, payloads) -> (sent, rc): ``message`` for each payload in turn,
 * ids first_id, first_id + 1, ...; each one published as it is written (a receiver sees the
 * first while the rest are still being written), the doorbell rung at most once (the first
 * ring sets ``signalled``). Stops at the first answer that is not 0: ``rc`` says why (ENOSPC:
 * the ring is full, back pressure; REROUTE; a doorbell it could not ring, after the message
 * that needed it, which counts as sent), and ``sent`` payloads went. One call for a
 * batch: the per-message Python of a stream was most of its sender's cost. */
static PyObject *port_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "messages(msg_type, subtype, first_id, payloads)");
        return NULL;
    }
    unsigned long long first = PyLong_AsUnsignedLongLong(args[2]);
    if (first == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (!PySequence_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "payloads must be a sequence");
        return NULL;
    }
    /* a tuple of our own: the packer runs Python, which must not shrink what we iterate */
    PyObject *seq = PySequence_Tuple(args[3]);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), sent = 0;
    long rc = 0;
    uint32_t type = 0, sub = 0;
    if (n > 0 && message_kind(args[0], args[1], &type, &sub) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    for (; sent < n; sent++) {
        rc = port_put((Port *)self, type, sub, first + (unsigned long long)sent,
                      PyTuple_GET_ITEM(seq, sent));
        if (rc == PUT_FAILED) {
            Py_DECREF(seq);
            return NULL;
        }
        if (rc != 0) {
            if (rc < 0 && rc != REROUTE)
                sent++;              /* published; its doorbell is the caller's to ring */
            break;
        }
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nl)", sent, rc);
}

static PyObject *port_close(Port *p, PyObject *unused)
{
    port_release(p);
    Py_RETURN_NONE;
}

static PyObject *port_get_current(Port *p, void *closure)
{
    return PyBool_FromLong(p->open && port_current(p));
}

static PyMethodDef port_methods[] = {
    {"message", (PyCFunction)(void (*)(void))port_message, METH_FASTCALL, "encode and send"},
    {"messages", (PyCFunction)(void (*)(void))port_messages, METH_FASTCALL, "a batch, in turn"},
    {"close", (PyCFunction)port_close, METH_NOARGS, "let go of the buffers"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef port_getset[] = {
    {"current", (getter)port_get_current, NULL, "the peer entry still names this incarnation",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject PortType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "partition.abi._fastring.Port",
    .tp_basicsize = sizeof(Port),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "a send bound to one peer's ring and incarnation",
    .tp_new = port_new,
    .tp_dealloc = (destructor)port_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Port, vectorcall),
    .tp_methods = port_methods,
    .tp_getset = port_getset,
};

/* Replies, matched in C (endpoint.py's Messenger.deliver does the same for the careful path):
 * with ``replies`` = (waiting, responses), a slot whose mk_message has SUB_RESPONSE is decoded
 * here and, when its id is awaited from this sender (or from anyone: -1), stored in
 * ``responses``; any other response is consumed and dropped, as deliver would. Calling deliver
 * for a reply was a Python frame on every round trip's critical path.
 * Returns 1 (taken), 0 (not a reply: deliver it), -1 (an exception). */
int take_reply(struct drain_state *d, PyObject **row, uint32_t type)
{
    const char *p = PyBytes_AS_STRING(row[3]);
    if (PyBytes_GET_SIZE(row[3]) < 20)
        return 0;
    uint32_t sub;
    memcpy(&sub, p + 4, 4);
    if (!(sub & SUB_RESPONSE))
        return 0;
    PyObject *msg = decode_raw((const unsigned char *)p, PyBytes_GET_SIZE(row[3]), row[1], row[2],
                               row[0]);
    return match_reply(d, msg, row[1], type);
}

/* A decoded response (``msg``, a reference taken over; NULL: decoding failed) matched against
 * the requests awaited: stored in ``responses`` when its id is awaited from this sender (or
 * from anyone: -1), else dropped. Returns 1 (taken), -1 (an exception). */
static int match_reply(struct drain_state *d, PyObject *msg, PyObject *sender, uint32_t type)
{
    if (msg == NULL)
        return -1;
    if (msg == Py_None || PyLong_AsUnsignedLong(PyTuple_GET_ITEM(msg, 0)) != type) {
        Py_DECREF(msg);                      /* a slot that lies about its message */
        return PyErr_Occurred() ? -1 : 1;
    }
    PyObject *mid = PyTuple_GET_ITEM(msg, 2);
    PyObject *to = PyDict_GetItemWithError(d->waiting, mid);
    int rc = 1;
    if (to != NULL) {
        long want = PyLong_AsLong(to);
        long from = PyLong_AsLong(sender);
        if (PyErr_Occurred())
            rc = -1;
        else if ((want == from || want == -1) && PyDict_SetItem(d->responses, mid, msg) < 0)
            rc = -1;                         /* (the sender id is a claim: a peer could still */
    } else if (PyErr_Occurred())             /*  forge it, knowing the id) */
        rc = -1;
    Py_DECREF(msg);
    return rc;
}


/* What the drain answers in C (a reply to match; a message whose type has a handler),
 * decoded straight from its slot before the slot is freed: the slot's bytes are copied once,
 * into the Message, not first into a bytes object and again by the decode, and a reply needs
 * no type object (two objects fewer per message on a round trip's critical path, each side).
 * What consume promises holds: the slot is copied out (decoded), zeroed, tail moved past it
 * and it is counted before anything is handed over. Returns 0 (not one of those: nothing done,
 * the slot untouched), 1 (done), -1 (a reply's exception), -3 (a handler's exception), -2 (no
 * memory, or an exception while decoding: the slot left in the ring). */
int held_in_c(struct drain_state *d, char *slot, uint64_t size, uint32_t type,
              uint32_t sender, uint64_t cpu, uint64_t *tail, uint64_t t, uint64_t *received)
{
    const unsigned char *p = (const unsigned char *)slot + SLOT_HEADER;
    uint32_t sub;
    memcpy(&sub, p + 4, 4);
    int reply = (sub & SUB_RESPONSE) != 0;
    PyObject *key = NULL, *handler = NULL;
    if (!reply) {
        if (d->handlers == NULL)
            return 0;
        key = PyLong_FromUnsignedLong(type);
        if (key == NULL)
            return -2;
        handler = PyDict_GetItemWithError(d->handlers, key);
        if (handler == NULL) {
            Py_DECREF(key);
            return PyErr_Occurred() ? -2 : 0;
        }
        Py_INCREF(handler);                  /* ours: decoding may run Python (msgpack) */
    }
    PyObject *from = PyLong_FromUnsignedLong(sender - 1);
    PyObject *on = PyLong_FromUnsignedLongLong(cpu);
    PyObject *msg = from != NULL && on != NULL ? decode_raw(p, (Py_ssize_t)size, from, on, key)
                                               : NULL;
    if (msg == NULL) {
        Py_XDECREF(from);
        Py_XDECREF(on);
        Py_XDECREF(key);
        Py_XDECREF(handler);
        return -2;
    }
    memset(slot, 0, SLOT_HEADER);
    __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);     /* the slot is free from here on */
    *received += 1;
    int rc = reply ? match_reply(d, msg, from, type)
                   : run_handler(d, handler, msg, key, from, type) < 0 ? -3 : 1;
    Py_DECREF(from);
    Py_DECREF(on);
    Py_XDECREF(key);
    return rc;
}


/* Messages with a handler, dispatched in C (Messenger.deliver's body, which the careful path
 * and every other case still use): with ``replies`` = (waiting, responses, handlers, ports,
 * after), a well-formed message whose type has a handler is decoded here, the handler called,
 * and a request's answer written by the sender's Port straight into its ring. Anything else
 * (no handler, no Port for the sender) is left to deliver (0). A Port that cannot send the
 * answer as it is (REROUTE, a refusal, a doorbell it could not ring) hands it to
 * ``after(sender, rc, type, id, result)``, the Endpoint's slow path. Returns 1 (done), 0 (left
 * to deliver), -1 (an exception, raised by the handler or its answer: as from deliver). */
int dispatch(struct drain_state *d, PyObject **row, uint32_t type)
{
    PyObject *handler = PyDict_GetItemWithError(d->handlers, row[0]);
    if (handler == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(handler);                      /* ours: decoding may run Python (msgpack), and */
    PyObject *dargs[3] = {row[3], row[1], row[2]};   /* the handler may unregister itself */
    return run_handler(d, handler, fr_decode(NULL, dargs, 3), row[0], row[1], type);
}

/* The handler (a reference taken over) called with a decoded message (``msg``, taken over;
 * NULL: decoding failed), and a request's answer written by the sender's Port. ``key``: the
 * type as the handlers dict has it. Returns 1 (done), -1 (an exception). */
static int run_handler(struct drain_state *d, PyObject *handler, PyObject *msg, PyObject *key,
                       PyObject *sender, uint32_t type)
{
    if (msg == NULL) {
        Py_DECREF(handler);
        return -1;
    }
    if (msg == Py_None || PyLong_AsUnsignedLong(PyTuple_GET_ITEM(msg, 0)) != type) {
        Py_DECREF(msg);                      /* a slot that lies about its message: consumed */
        Py_DECREF(handler);
        return PyErr_Occurred() ? -1 : 1;
    }
    uint32_t sub = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(msg, 1));
    PyObject *result = PyObject_CallOneArg(handler, msg);
    Py_DECREF(handler);
    if (result == NULL) {
        Py_DECREF(msg);
        return -1;
    }
    int rc = 1;
    if (sub & SUB_REQUEST) {
        PyObject *mid = PyTuple_GET_ITEM(msg, 2);
        PyObject *port = PyDict_GetItemWithError(d->ports, sender);
        long sent = REROUTE;
        if (port != NULL && Py_IS_TYPE(port, &PortType)) {
            unsigned long long m64 = PyLong_AsUnsignedLongLong(mid);
            Py_INCREF(port);
            if (!(m64 == (unsigned long long)-1 && PyErr_Occurred()))
                sent = port_put((Port *)port, type, SUB_RESPONSE, m64, result);
            Py_DECREF(port);
            if (PyErr_Occurred())
                rc = -1;                     /* the answer cannot be encoded: as from deliver */
        } else if (PyErr_Occurred())
            rc = -1;
        if (rc > 0 && sent != 0) {
            PyObject *code = PyLong_FromLong(sent);
            PyObject *argv[5] = {sender, code, key, mid, result};
            PyObject *done = code != NULL ? PyObject_Vectorcall(d->after, argv, 5, NULL) : NULL;
            Py_XDECREF(code);
            if (done == NULL)
                rc = -1;
            Py_XDECREF(done);
        }
    }
    Py_DECREF(result);
    Py_DECREF(msg);
    return rc;
}

