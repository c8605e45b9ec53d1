/* partition.abi._fastring: the C half of the IPI ring, one extension of four translation units
 * (_ring.c, _message.c, _port.c, _waiter.c; _fastring.h says what each is and what they
 * share). This file is only the module: its function table, the layout partition/abi/impl.py
 * checks against ring_layout.py's, and the digest of the sources it was built from.
 *
 * The boundary, in one sentence (docs/messages.md, "The C half"): C does the per-message hot
 * path of the IPI ring and nothing else (claim, publish and doorbell; wait and consume; the
 * mk_message codec on the slot; a Port's bound send and the dispatch of a handled message),
 * and leaves every decision about an unusual slot or header to the Python reference, which
 * implements all of it and runs alone without this extension. */
#include "_fastring.h"

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))fr_configure, METH_FASTCALL, "set Message, fallback"},
    {"decode", (PyCFunction)(void (*)(void))fr_decode, METH_FASTCALL, "one mk_message"},
    {"encode", (PyCFunction)(void (*)(void))fr_encode, METH_FASTCALL, "one mk_message, as bytes"},
    {"halt", (PyCFunction)(void (*)(void))fr_halt, METH_FASTCALL, "sleep on the doorbell, drain"},
    {"idle_enter", (PyCFunction)(void (*)(void))fr_idle_enter, METH_FASTCALL, "announce idle"},
    {"send", (PyCFunction)(void (*)(void))fr_send, METH_FASTCALL, "claim, fill, publish"},
    {"drain", (PyCFunction)(void (*)(void))fr_drain, METH_FASTCALL, "consume published slots"},
    {"poll", (PyCFunction)(void (*)(void))fr_poll, METH_FASTCALL, "spin, then drain"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastring", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastring(void)
{
    if (PyType_Ready(&PortType) < 0 || PyType_Ready(&WaiterType) < 0)
        return NULL;
    if (codec_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    pipe_nowait = probe_pipe_nowait();
    if (PyModule_AddObjectRef(m, "Port", (PyObject *)&PortType) < 0 ||
            PyModule_AddObjectRef(m, "Waiter", (PyObject *)&WaiterType) < 0 ||
            PyModule_AddIntConstant(m, "REROUTE", REROUTE) < 0 ||
            PyModule_AddIntConstant(m, "PIPE_NOWAIT", pipe_nowait) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "HEAD", HEAD, "TAIL", TAIL, "COUNTERS", COUNTERS, "POLLING", POLLING, "IDLE", IDLE,
        "SIGNALED", SIGNALED, "FILTERS", FILTERS, "DROPPED_FILTERED", DROPPED_FILTERED,
        "NFILTER", NFILTER, "FILTER_AFTER", FILTER_AFTER, "FILTER_MS", FILTER_MS, "S_CPU", S_CPU, "S_TYPE", S_TYPE, "S_SENDER", S_SENDER,
        "S_SIZE", S_SIZE, "S_TICKET", S_TICKET, "RING_HEADER_BYTES", RING_HEADER_BYTES,
        "RING_SLOT_HEADER", SLOT_HEADER);
#ifndef FASTRING_SOURCE_SHA256
#define FASTRING_SOURCE_SHA256 ""
#endif
    /* the digest of the sources this was built from (setup.py): impl.py refuses a stale build */
    if (PyModule_AddStringConstant(m, "SOURCE_SHA256", FASTRING_SOURCE_SHA256) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    if (layout == NULL || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
