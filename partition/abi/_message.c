/* _message.c: the mk_message codec in C (reference: message.py's ``encode`` and ``decode_py``).
 *
 * Boundary: the header and the payload forms a round trip uses most (bytes as msgpack bin,
 * None, small ints, booleans) are read and written here, byte for byte as msgpack writes them;
 * every other payload goes through the msgpack callables configure() hands over.
 *
 * configure(Message, fallback[, pack]) is called once (by partition/abi/impl.py): ``Message`` is
 * the named tuple a delivered message is, ``fallback`` decodes a msgpack payload that is not one
 * of the forms read here (msgpack.unpackb with the emulator's options), ``pack`` encodes one
 * that is not one of the forms written here. On the caches a wake-up finds, the Python decode
 * took 1.65-2 us of an echo kernel's 2.9-3.4 us from wake-up to answer. */
#include "_fastring.h"

PyTypeObject *message_type = NULL;
static PyObject *payload_fallback = NULL;
static PyObject *payload_pack = NULL;       /* a payload not encoded here */


PyObject *fr_configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 2 && nargs != 3) || !PyType_Check(args[0])
            || !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)
            || !PyCallable_Check(args[1]) || (nargs == 3 && !PyCallable_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "configure(tuple subclass, callable[, callable])");
        return NULL;
    }
    Py_XSETREF(message_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(payload_fallback, Py_NewRef(args[1]));
    if (nargs == 3)
        Py_XSETREF(payload_pack, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* decode(data, sender, cpu) -> Message, or None for bytes that are not one mk_message (a short
 * header, a payload_len that does not match, a payload that is not msgpack) */
/* An mk_message from ``n`` bytes at ``p`` (a bytes object's, or a slot's still held by the
 * drain), with the sender and cpu objects: the Message, None for one that is malformed, or
 * NULL with an exception. Every field is read once into a local; the payload is copied out,
 * so a sender that rewrites its slot meanwhile changes at most what it said. */
static PyObject *sub_objects[2];          /* SUB_REQUEST, SUB_RESPONSE: made once, at import */

PyObject *decode_raw(const unsigned char *p, Py_ssize_t n, PyObject *sender, PyObject *cpu,
                     PyObject *type_obj)
{
    uint32_t mtype, sub, plen;
    uint64_t mid;
    if (n < 20)
        Py_RETURN_NONE;
    memcpy(&mtype, p, 4);                    /* little-endian, as the host: x86 */
    memcpy(&sub, p + 4, 4);
    memcpy(&mid, p + 8, 8);
    memcpy(&plen, p + 16, 4);
    if ((Py_ssize_t)plen != n - 20)
        Py_RETURN_NONE;
    const unsigned char *body = p + 20;
    unsigned char b0 = plen >= 1 ? body[0] : 0, b1 = plen >= 2 ? body[1] : 0;
    PyObject *payload;
    if (plen >= 2 && b0 == 0xC4 && b1 == plen - 2)                    /* bin 8 */
        payload = PyBytes_FromStringAndSize((const char *)body + 2, plen - 2);
    else if (plen == 1 && b0 == 0xC0)                                 /* nil */
        payload = Py_NewRef(Py_None);
    else if (plen == 1 && b0 <= 0x7F)                                 /* positive fixint */
        payload = PyLong_FromLong(b0);
    else {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)body, plen);
        payload = raw ? PyObject_CallOneArg(payload_fallback, raw) : NULL;
        Py_XDECREF(raw);
        if (payload == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();                   /* garbage from a faulty peer: not a message */
            Py_RETURN_NONE;
        }
    }
    if (payload == NULL)
        return NULL;
    PyObject *msg = message_type->tp_alloc(message_type, 6);
    /* the type the caller already holds (a handler's key) and the two subtypes of a round
     * trip are shared objects, not made again for every message */
    PyObject *a = type_obj != NULL && PyLong_AsUnsignedLong(type_obj) == mtype
                  ? Py_NewRef(type_obj) : PyLong_FromUnsignedLong(mtype);
    PyObject *b = sub == SUB_REQUEST && sub_objects[0] != NULL ? Py_NewRef(sub_objects[0])
                  : sub == SUB_RESPONSE && sub_objects[1] != NULL ? Py_NewRef(sub_objects[1])
                  : PyLong_FromUnsignedLong(sub);
    PyObject *c = PyLong_FromUnsignedLongLong(mid);
    if (msg == NULL || a == NULL || b == NULL || c == NULL) {
        Py_XDECREF(msg);
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(msg, 0, a);
    PyTuple_SET_ITEM(msg, 1, b);
    PyTuple_SET_ITEM(msg, 2, c);
    PyTuple_SET_ITEM(msg, 3, payload);
    PyTuple_SET_ITEM(msg, 4, Py_NewRef(sender));
    PyTuple_SET_ITEM(msg, 5, Py_NewRef(cpu));
    return msg;
}

PyObject *fr_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || message_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "decode(data, sender, cpu), after configure()");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *msg = decode_raw((const unsigned char *)buf.buf, buf.len, args[1], args[2], NULL);
    PyBuffer_Release(&buf);
    return msg;
}

/* The mk_message for ``payload``: its header (message.py HEADER "<IIQI") and the start of its
 * payload in ``head`` (*hlen bytes, at most HEAD_MAX), then *blen bytes at *body (a bytes
 * payload's own, or those of *packed, a reference the caller releases; NULL: none). The forms
 * encoded here are byte for byte what msgpack's Packer(use_bin_type=True) writes, and the
 * decode above reads the same ones back. Returns 0, EMSGSIZE, or -1 with an exception set. */
int encode_head(uint32_t type, uint32_t sub, uint64_t mid, PyObject *payload,
                unsigned char *head, uint64_t *hlen, const void **body, uint64_t *blen,
                PyObject **packed)
{
    memcpy(head, &type, 4);                  /* little-endian, as the host: x86 */
    memcpy(head + 4, &sub, 4);
    memcpy(head + 8, &mid, 8);
    *packed = NULL;
    *body = NULL;
    *hlen = 20;
    *blen = 0;
    if (PyBytes_CheckExact(payload)) {
        Py_ssize_t n = PyBytes_GET_SIZE(payload);
        *body = PyBytes_AS_STRING(payload);
        *blen = (uint64_t)n;
        if (n <= 0xFF) {                     /* bin 8 */
            head[20] = 0xC4;
            head[21] = (unsigned char)n;
            *hlen = 22;
        } else if (n <= 0xFFFF) {            /* bin 16, big-endian length */
            head[20] = 0xC5;
            head[21] = (unsigned char)(n >> 8);
            head[22] = (unsigned char)n;
            *hlen = 23;
        } else if ((uint64_t)n <= 0xFFFFFFFFu) {   /* bin 32 */
            head[20] = 0xC6;
            head[21] = (unsigned char)(n >> 24);
            head[22] = (unsigned char)(n >> 16);
            head[23] = (unsigned char)(n >> 8);
            head[24] = (unsigned char)n;
            *hlen = 25;
        } else
            return EMSGSIZE;
    } else if (payload == Py_None) {
        head[20] = 0xC0;
        *hlen = 21;
    } else if (payload == Py_True || payload == Py_False) {
        head[20] = payload == Py_True ? 0xC3 : 0xC2;
        *hlen = 21;
    } else if (PyLong_CheckExact(payload) && PyLong_AsLong(payload) >= 0
               && PyLong_AsLong(payload) <= 0x7F) {
        head[20] = (unsigned char)PyLong_AsLong(payload);    /* positive fixint */
        *hlen = 21;
    } else {
        PyErr_Clear();                       /* (a long too big for AsLong) */
        if (payload_pack == NULL) {
            PyErr_SetString(PyExc_TypeError, "configure() the packer first");
            return -1;
        }
        PyObject *p = PyObject_CallOneArg(payload_pack, payload);
        if (p == NULL)
            return -1;
        if (!PyBytes_Check(p)) {
            Py_DECREF(p);
            PyErr_SetString(PyExc_TypeError, "the packer must return bytes");
            return -1;
        }
        *packed = p;
        *body = PyBytes_AS_STRING(p);
        *blen = (uint64_t)PyBytes_GET_SIZE(p);
    }
    uint64_t payload_len = *hlen - 20 + *blen;
    if (payload_len > 0xFFFFFFFFu) {
        Py_CLEAR(*packed);
        return EMSGSIZE;
    }
    uint32_t plen = (uint32_t)payload_len;
    memcpy(head + 16, &plen, 4);
    return 0;
}

/* encode(type, sub, id, payload) -> bytes: what a Port writes into its slot, as bytes (for the
 * differential test against message.encode; the send path encodes straight into the slot) */
PyObject *fr_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "encode(msg_type, subtype, msg_id, payload)");
        return NULL;
    }
    unsigned long t = PyLong_AsUnsignedLong(args[0]), s = PyLong_AsUnsignedLong(args[1]);
    unsigned long long mid = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (t > 0xFFFFFFFFul || s > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "message type and subtype are u32");
        return NULL;
    }
    unsigned char head[HEAD_MAX];
    uint64_t hlen, blen;
    const void *body;
    PyObject *packed;
    int rc = encode_head((uint32_t)t, (uint32_t)s, mid, args[3], head, &hlen, &body, &blen,
                         &packed);
    if (rc < 0)
        return NULL;
    if (rc > 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(hlen + blen));
    if (out != NULL) {
        memcpy(PyBytes_AS_STRING(out), head, hlen);
        if (blen)
            memcpy(PyBytes_AS_STRING(out) + hlen, body, blen);
    }
    Py_XDECREF(packed);
    return out;
}

/* the shared subtype objects (once, at import) */
int codec_init(void)
{
    if (sub_objects[0] == NULL) {
        sub_objects[0] = PyLong_FromUnsignedLong(SUB_REQUEST);
        sub_objects[1] = PyLong_FromUnsignedLong(SUB_RESPONSE);
        if (sub_objects[0] == NULL || sub_objects[1] == NULL)
            return -1;
    }
    return 0;
}
