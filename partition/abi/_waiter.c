/* _waiter.c: a kernel's wait and its requests' fast path, bound once (reference: the waits in
 * guest/runtime.py, _wait_poll, _spin_take and _wait_halt, and Messenger.request in
 * guest/endpoint.py, which run without this extension and take every case this does not).
 *
 * Boundary: nothing of its own about the ring: it calls _ring.c's waits (spin_published,
 * halt_wait) and drain (drain_held) and _port.c's send (port_request), with what they need held
 * in one object instead of passed, parsed and bound again through Python frames on every wait.
 * A round trip's critical path has no Python frame from the request's call to its return but the
 * handlers' own. */
#include "_fastring.h"

/* Waiter: a poller's whole wait bound once, for the wait of every poll-mode request (the
 * Messenger's ``wait``) and the kernel's poll-mode loop: ``waiter(timeout_s)`` spins on the ring
 * up to min(50 us, timeout) and drains what came, as poll and runtime.py's _wait_poll did
 * together; ``waiter.spin(usec)`` is _spin_take's (None: nothing came). The owner's
 * ``_in_drain`` is raised for the call and put back after it, as _wait_poll did (the IPI
 * signal's handler must not drain meanwhile); ``handled`` is passed only while no request of
 * the owner's is pending (``waiting`` empty); a drain that stopped at a slot it leaves to the
 * careful path goes on through ``finish(got, limit, handled, deliver)`` (Ring.finish). What it
 * saves: a Python frame, its attribute look-ups and a functools.partial between the request's
 * send and its reply (a third of the Python left on a poll-mode round trip). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *args[9];          /* drain_held's: ring, nslots, stride, slot_bytes, limit,
                                 * handled, deliver, hush, replies */
    PyObject *owner, *finish, *waiting, *responses;
    long rc;                    /* ask: the Port's answer to the last request it sent */
    /* request (after bind): the Messenger, its Ports, its request ids, its own request */
    PyObject *msgr, *ports, *request_id, *slow;
    double first_wait;
    PyObject *spin_of;          /* hybrid: its ``kernel.spin_us`` bounds ask's spin (NULL:
                                 * poll, 50 us); interrupt: its ``kernel.idle_timeout`` bounds
                                 * ask's halt, as _wait_halt's */
    int doorbell;               /* interrupt mode: the doorbell its waits halt on; -1: spin */
    struct halt_timer timer;    /* interrupt mode: its halts' deadline, set across waits */
} Waiter;

static PyObject *str_in_drain, *str_requested, *str_wait, *str_last_target, *str_kernel,
                *str_spin_us, *str_idle_timeout;

/* a Waiter and its owner (the runtime), its Messenger and the Messenger's ``request`` refer to
 * each other: collected as a cycle */
static int waiter_traverse(Waiter *w, visitproc visit, void *arg)
{
    for (int i = 0; i < 9; i++)
        Py_VISIT(w->args[i]);
    Py_VISIT(w->owner);
    Py_VISIT(w->finish);
    Py_VISIT(w->waiting);
    Py_VISIT(w->responses);
    Py_VISIT(w->msgr);
    Py_VISIT(w->ports);
    Py_VISIT(w->request_id);
    Py_VISIT(w->slow);
    Py_VISIT(w->spin_of);
    return 0;
}

static int waiter_clear(Waiter *w)
{
    for (int i = 0; i < 9; i++)
        Py_CLEAR(w->args[i]);
    Py_CLEAR(w->owner);
    Py_CLEAR(w->finish);
    Py_CLEAR(w->waiting);
    Py_CLEAR(w->responses);
    Py_CLEAR(w->msgr);
    Py_CLEAR(w->ports);
    Py_CLEAR(w->request_id);
    Py_CLEAR(w->slow);
    Py_CLEAR(w->spin_of);
    return 0;
}

static void waiter_dealloc(Waiter *w)
{
    PyObject_GC_UnTrack(w);
    waiter_clear(w);
    halt_timer_close(&w->timer);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *waiter_take(Waiter *w, double usec, int none_if_idle);

static PyObject *waiter_call(Waiter *w, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "waiter(timeout_s)");
        return NULL;
    }
    double timeout = PyFloat_AsDouble(args[0]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    double usec = timeout * 1e6;
    return waiter_take(w, usec < 50.0 || w->doorbell >= 0 ? usec : 50.0, 0);
}

static PyObject *waiter_spin(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "spin(usec)");
        return NULL;
    }
    double usec = PyFloat_AsDouble(args[0]);
    if (usec == -1.0 && PyErr_Occurred())
        return NULL;
    return waiter_take((Waiter *)self, usec, 1);
}

/* Waiter(ring, nslots, stride, slot_bytes, limit, handled, deliver, replies, owner, finish,
 *        waiting, doorbell_fd); doorbell_fd -1: a poller's (spin), else an interrupt-mode
 *        kernel's: its waits halt on that doorbell (halt's wait) for as long as they are given */
static PyObject *waiter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *a[12];
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Waiter takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Waiter", 12, 12, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5],
                           &a[6], &a[7], &a[8], &a[9], &a[10], &a[11]))
        return NULL;
    long doorbell = PyLong_AsLong(a[11]);
    if (doorbell == -1 && PyErr_Occurred())
        return NULL;
    if (!PyCallable_Check(a[6]) || !PyCallable_Check(a[9]) || !PyDict_Check(a[10])
            || !PyTuple_Check(a[7]) || PyTuple_GET_SIZE(a[7]) < 2
            || !PyDict_Check(PyTuple_GET_ITEM(a[7], 1))) {
        PyErr_SetString(PyExc_TypeError, "Waiter: deliver and finish callable, waiting a dict, "
                                         "replies (waiting, responses, ...)");
        return NULL;
    }
    if (str_in_drain == NULL && (str_in_drain = PyUnicode_InternFromString("_in_drain")) == NULL)
        return NULL;
    Waiter *w = (Waiter *)type->tp_alloc(type, 0);
    if (w == NULL)
        return NULL;
    PyObject *bound[9] = {a[0], a[1], a[2], a[3], a[4], a[5], a[6], Py_True, a[7]};
    for (int i = 0; i < 9; i++)
        w->args[i] = Py_NewRef(bound[i]);
    w->owner = Py_NewRef(a[8]);
    w->finish = Py_NewRef(a[9]);
    w->waiting = Py_NewRef(a[10]);
    w->responses = Py_NewRef(PyTuple_GET_ITEM(a[7], 1));
    w->doorbell = doorbell < 0 ? -1 : (int)doorbell;
    w->timer.fd = w->timer.ep = w->timer.door = -1;
    w->vectorcall = (vectorcallfunc)waiter_call;
    return (PyObject *)w;
}

/* a Waiter whose references the collector cleared (a cycle being freed) is of no use */
static int waiter_cleared(Waiter *w)
{
    if (w->owner != NULL)
        return 0;
    PyErr_SetString(PyExc_ValueError, "the Waiter was cleared");
    return 1;
}

static PyObject *waiter_take(Waiter *w, double usec, int none_if_idle)
{
    if (waiter_cleared(w))
        return NULL;
    PyObject *outer = PyObject_GetAttr(w->owner, str_in_drain);
    if (outer == NULL)
        return NULL;
    if (PyObject_SetAttr(w->owner, str_in_drain, Py_True) < 0) {
        Py_DECREF(outer);
        return NULL;
    }
    PyObject *res = NULL;
    Py_buffer buf;
    uint64_t nslots, stride, slot_bytes;
    if (ring_args(w->args, &buf, &nslots, &stride, &slot_bytes) < 0)
        goto out;
    int came = w->doorbell >= 0 ? halt_wait((char *)buf.buf, nslots, stride, w->doorbell,
                                            usec / 1e6, &w->timer)
                                 : spin_published((char *)buf.buf, nslots, stride, usec);
    if (came <= 0) {
        PyBuffer_Release(&buf);
        if (came == 0)
            res = none_if_idle ? Py_NewRef(Py_None) : PyLong_FromLong(0);
        goto out;
    }
    PyObject *dargs[9];
    memcpy(dargs, w->args, sizeof dargs);
    if (PyDict_GET_SIZE(w->waiting))
        dargs[5] = Py_None;              /* a request pending: its answer may be of any type */
    PyObject *got = drain_held(&buf, nslots, stride, slot_bytes, dargs, 9);
    if (got == NULL)
        goto out;
    if (PyObject_IsTrue(PyTuple_GET_ITEM(got, 1))) {      /* more: the careful path goes on */
        PyObject *fargs[4] = {got, dargs[4], dargs[5], dargs[6]};
        res = PyObject_Vectorcall(w->finish, fargs, 4, NULL);
    } else
        res = Py_NewRef(PyTuple_GET_ITEM(got, 2));
    Py_DECREF(got);
out:;
    /* put ``_in_drain`` back whatever happened (the try/finally of _wait_poll) */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (PyObject_SetAttr(w->owner, str_in_drain, outer) < 0) {
        if (et != NULL)
            PyErr_Clear();
        else
            Py_CLEAR(res);
    }
    if (et != NULL)
        PyErr_Restore(et, ev, tb);
    Py_DECREF(outer);
    return res;
}

/* ask(port, msg_type, msg_id, payload, target, first_wait_s): a poll-mode request's send and
 * its first wait in one call (Messenger.request's fast path). The request goes through
 * ``port``; unless the Port answered 0 (sent, doorbell done), nothing more is done and the
 * Waiter itself comes back, its ``rc`` the Port's answer (the caller settles it as it would
 * port.message's). Sent: ``waiting[msg_id]`` becomes ``target``, the wait spins up to
 * min(50 us, first_wait_s) and drains as ``waiter(first_wait_s)`` does (unless the answer is
 * there already), and then either the answer's payload comes back, its entries in ``waiting``
 * and ``responses`` removed, or the Waiter (not answered yet; ``rc`` 0: the caller waits on). */
static PyObject *waiter_ask(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Waiter *w = (Waiter *)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "ask(port, msg_type, msg_id, payload, target, "
                                         "first_wait_s)");
        return NULL;
    }
    unsigned long type = PyLong_AsUnsignedLong(args[1]);
    if (type == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (type > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "message type is u32");
        return NULL;
    }
    unsigned long long mid = PyLong_AsUnsignedLongLong(args[2]);
    if (mid == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    double first = PyFloat_AsDouble(args[5]);
    if (first == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *key = args[2];
    if (waiter_cleared(w))
        return NULL;
    long rc = port_request(args[0], (uint32_t)type, mid, args[3]);
    if (rc == LONG_MIN)
        return NULL;
    w->rc = rc;
    if (rc != 0)
        return Py_NewRef(self);
    if (PyDict_SetItem(w->waiting, key, args[4]) < 0)
        return NULL;
    int has = PyDict_Contains(w->responses, key);
    if (has == 0) {
        double usec = first * 1e6, cap = 50.0;
        if (w->spin_of != NULL) {   /* hybrid: the kernel's spin, as _wait_hybrid; interrupt:
                                     * its idle_timeout (None: tickless), as _wait_halt */
            PyObject *k = PyObject_GetAttr(w->spin_of, str_kernel);
            PyObject *v = k != NULL ? PyObject_GetAttr(k, w->doorbell >= 0 ? str_idle_timeout
                                                                          : str_spin_us) : NULL;
            cap = v == NULL ? -1.0 : v == Py_None ? 3600e6
                  : PyFloat_AsDouble(v) * (w->doorbell >= 0 ? 1e6 : 1.0);
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (PyErr_Occurred())
                return NULL;
        } else if (w->doorbell >= 0)
            cap = usec;
        PyObject *took = waiter_take(w, usec < cap ? usec : cap, 0);
        if (took == NULL)
            return NULL;
        Py_DECREF(took);
        has = PyDict_Contains(w->responses, key);
    }
    if (has <= 0)
        return has < 0 ? NULL : Py_NewRef(self);
    PyObject *msg = PyDict_GetItemWithError(w->responses, key);
    if (msg == NULL)
        return NULL;
    Py_INCREF(msg);
    PyObject *payload = NULL;
    if (PyDict_DelItem(w->responses, key) == 0) {
        if (PyDict_DelItem(w->waiting, key) < 0)   /* (a handler may have dropped it) */
            PyErr_Clear();
        payload = PyTuple_Check(msg) && PyTuple_GET_SIZE(msg) > 3
                  ? Py_NewRef(PyTuple_GET_ITEM(msg, 3)) : PyObject_GetAttrString(msg, "payload");
    }
    Py_DECREF(msg);
    return payload;
}

/* bind(messenger, ports, request_id, first_wait_s, request, spin_of): what ``request`` needs
 * of the Messenger (its Ports by target, its id source, FIRST_WAIT_S, and its own Python
 * request, which takes every call the fast path does not); ``spin_of``: None (poll mode: ask
 * spins up to 50 us), or the runtime of a hybrid kernel (ask spins its ``kernel.spin_us``) or
 * of an interrupt-mode one (ask halts up to first_wait_s, capped by ``kernel.idle_timeout``) */
static PyObject *waiter_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Waiter *w = (Waiter *)self;
    if (nargs != 6 || !PyDict_Check(args[1]) || !PyCallable_Check(args[2])
            || !PyCallable_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "bind(messenger, ports, request_id, first_wait_s, "
                                         "request, spin_of)");
        return NULL;
    }
    double first = PyFloat_AsDouble(args[3]);
    if (first == -1.0 && PyErr_Occurred())
        return NULL;
    if (str_requested == NULL && ((str_requested = PyUnicode_InternFromString("requested")) == NULL
            || (str_wait = PyUnicode_InternFromString("wait")) == NULL
            || (str_last_target = PyUnicode_InternFromString("last_target")) == NULL
            || (str_kernel = PyUnicode_InternFromString("kernel")) == NULL
            || (str_spin_us = PyUnicode_InternFromString("spin_us")) == NULL
            || (str_idle_timeout = PyUnicode_InternFromString("idle_timeout")) == NULL))
        return NULL;
    Py_XSETREF(w->spin_of, args[5] == Py_None ? NULL : Py_NewRef(args[5]));
    Py_XSETREF(w->msgr, Py_NewRef(args[0]));
    Py_XSETREF(w->ports, Py_NewRef(args[1]));
    Py_XSETREF(w->request_id, Py_NewRef(args[2]));
    Py_XSETREF(w->slow, Py_NewRef(args[4]));
    w->first_wait = first;
    Py_RETURN_NONE;
}

/* request(target, msg_type, payload=None, timeout=10.0, wait=None): Messenger.request for a
 * poll-mode kernel, its fast path in C: with no ``wait`` given and a Port to ``target``, the
 * id, ``waiting``, the send and the first wait (ask) with no Python frame; answered, the
 * payload. Anything else goes on in Python: not answered yet, the Messenger's ``requested``
 * from the send's answer on; no Port, a ``wait`` of the caller's, or arguments it does not
 * read, the Messenger's own request. */
static PyObject *waiter_request(PyObject *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames)
{
    Waiter *w = (Waiter *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (w->msgr == NULL) {
        PyErr_SetString(PyExc_TypeError, "request: the Waiter is not bound to a Messenger");
        return NULL;
    }
    if (nargs < 2 || nargs > 5)
        goto slow;
    PyObject *target = args[0], *type = args[1];
    PyObject *payload = nargs > 2 ? args[2] : NULL, *timeout_o = nargs > 3 ? args[3] : NULL;
    PyObject *wait = nargs > 4 ? args[4] : NULL;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), **slot;
        if (PyUnicode_CompareWithASCIIString(name, "payload") == 0)
            slot = &payload;
        else if (PyUnicode_CompareWithASCIIString(name, "timeout") == 0)
            slot = &timeout_o;
        else if (PyUnicode_CompareWithASCIIString(name, "wait") == 0)
            slot = &wait;
        else
            goto slow;                       /* (the Messenger's request says what is wrong) */
        if (*slot != NULL)
            goto slow;
        *slot = args[nargs + i];
    }
    if (wait != NULL && wait != Py_None)
        goto slow;
    if (payload == NULL)
        payload = Py_None;
    double timeout = 10.0;
    if (timeout_o != NULL) {
        timeout = PyFloat_AsDouble(timeout_o);
        if (timeout == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            goto slow;
        }
    }
    PyObject *port = PyDict_GetItemWithError(w->ports, target);
    if (port == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto slow;
    }
    Py_INCREF(port);
    PyObject *bits = PyLong_FromLong(63), *drawn = NULL, *mid = NULL, *one = NULL;
    if (bits != NULL)
        drawn = PyObject_CallOneArg(w->request_id, bits);
    if (drawn != NULL && (one = PyLong_FromLong(1)) != NULL)
        mid = PyNumber_Or(drawn, one);
    Py_XDECREF(bits);
    Py_XDECREF(drawn);
    Py_XDECREF(one);
    PyObject *minus = mid != NULL ? PyLong_FromLong(-1) : NULL;
    /* before sending: the answer may come in an interrupt at once */
    if (minus == NULL || PyDict_SetItem(w->waiting, mid, minus) < 0) {
        Py_XDECREF(minus);
        Py_XDECREF(mid);
        Py_DECREF(port);
        return NULL;
    }
    Py_DECREF(minus);
    PyObject *first = PyFloat_FromDouble(timeout < w->first_wait ? timeout : w->first_wait);
    PyObject *got = NULL;
    if (first != NULL) {
        PyObject *aargs[6] = {port, type, mid, payload, target, first};
        got = waiter_ask(self, aargs, 6);
        Py_DECREF(first);
    }
    Py_DECREF(port);
    if (got == NULL) {                       /* as request's ``except BaseException`` */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyDict_DelItem(w->waiting, mid) < 0)
            PyErr_Clear();
        if (PyDict_DelItem(w->responses, mid) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        Py_DECREF(mid);
        return NULL;
    }
    if (got != self) {
        Py_DECREF(mid);
        if (PyObject_SetAttr(w->msgr, str_last_target, target) < 0) {
            Py_DECREF(got);
            return NULL;
        }
        return got;
    }
    Py_DECREF(got);
    /* not answered yet: the Messenger goes on from the send's answer */
    PyObject *rc = PyLong_FromLong(w->rc);
    PyObject *waitf = PyObject_GetAttr(w->msgr, str_wait);
    PyObject *t = timeout_o != NULL ? Py_NewRef(timeout_o) : PyFloat_FromDouble(10.0);
    PyObject *res = NULL;
    if (rc != NULL && waitf != NULL && t != NULL) {
        PyObject *rargs[8] = {w->msgr, target, type, payload, t, waitf, mid, rc};
        res = PyObject_VectorcallMethod(str_requested, rargs, 8, NULL);
    }
    Py_XDECREF(rc);
    Py_XDECREF(waitf);
    Py_XDECREF(t);
    Py_DECREF(mid);
    return res;
slow:
    return PyObject_Vectorcall(w->slow, args, nargsf, kwnames);
}

static PyObject *waiter_get_rc(Waiter *w, void *closure)
{
    return PyLong_FromLong(w->rc);
}

static PyGetSetDef waiter_getset[] = {
    {"rc", (getter)waiter_get_rc, NULL, "the Port's answer to ask's last request", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef waiter_methods[] = {
    {"ask", (PyCFunction)(void (*)(void))waiter_ask, METH_FASTCALL,
     "a request's send and first wait: its payload, or the Waiter (not answered yet)"},
    {"bind", (PyCFunction)(void (*)(void))waiter_bind, METH_FASTCALL,
     "bind(messenger, ports, request_id, first_wait_s, request, spin_of), for request"},
    {"request", (PyCFunction)(void (*)(void))waiter_request, METH_FASTCALL | METH_KEYWORDS,
     "Messenger.request with its fast path in C"},
    {"spin", (PyCFunction)(void (*)(void))waiter_spin, METH_FASTCALL,
     "spin up to usec for a message, then drain: None if none came"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject WaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "partition.abi._fastring.Waiter",
    .tp_basicsize = sizeof(Waiter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "a poller's wait and drain, bound once",
    .tp_traverse = (traverseproc)waiter_traverse,
    .tp_clear = (inquiry)waiter_clear,
    .tp_new = waiter_new,
    .tp_dealloc = (destructor)waiter_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Waiter, vectorcall),
    .tp_methods = waiter_methods,
    .tp_getset = waiter_getset,
};
