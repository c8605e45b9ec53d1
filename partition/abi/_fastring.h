/* _fastring.h: what the C translation units of partition.abi._fastring share.
 *
 * The boundary, as docs/messages.md states it: the C half is the per-message hot path of the
 * IPI ring and nothing else (claim, publish and doorbell; wait and consume; the mk_message
 * codec on the slot; a Port's bound send and the dispatch of a handled message), and every
 * decision about an unusual slot or header is left to the Python reference, which implements
 * all of it and runs alone without this extension.
 *
 * Four translation units, each beside the Python module it must agree with (tests/
 * test_ring_differential.py drives both over the same inputs):
 *   _ring.c     the ring's atomics and waits: send, drain, poll, halt  (reference: ring.py)
 *   _message.c  the mk_message codec: encode, decode                  (reference: message.py)
 *   _port.c     Port, and the drain's reply matching and dispatch      (reference: port.py,
 *                                                  and Messenger.deliver in guest/endpoint.py)
 *   _waiter.c   Waiter: a kernel's wait and its requests' fast path    (reference: the waits
 *                              in guest/runtime.py, Messenger.request in guest/endpoint.py)
 * and _fastring.c, the module: its table, its layout and the digest of these sources.
 * The layout constants below are checked against ring_layout.py's by partition/abi/impl.py. */
#ifndef FASTRING_H
#define FASTRING_H
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE             /* ppoll */
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <signal.h>
#include <unistd.h>
#include <poll.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008   /* linux/fs.h: this write must not wait */
#endif

#define HEAD 0
#define TAIL 64
#define POLLING 192             /* u8 (of a u64): the receiver spins on the ring; not on the
                                 * counters' line, which the receiver writes per message */
#define COUNTERS 136            /* u64 x 5; [0] is "received" */
#define IDLE 176                /* u32: the receiver sleeps on its doorbell */
#define SIGNALED 184            /* u64: a doorbell was rung since the receiver's last drain */
#define DOORBELLS (COUNTERS + 32) /* u64: doorbells rung at this receiver (senders, atomic) */
#define FILTERS 200             /* NFILTER x 16 bytes: drop filters the receiver set */
#define F_SENDER 0              /*   u16 sender id + 1 (0: free entry) */
#define F_TYPE 4                /*   u32 the type it sends that nobody here handles */
#define F_UNTIL 8               /*   u32 CLOCK_MONOTONIC ms (low 32 bits) it lapses */
#define F_HITS 12               /*   u32 messages it dropped since the receiver last looked */
#define DROPPED_FILTERED 248    /* u64: messages the filters dropped at their senders */
#define NFILTER 3
#define FILTER_AFTER 16         /* unhandled (sender, type) messages within FILTER_MS */
#define FILTER_MS 10            /* a filter lapses this long after the flood stops */
#define S_CPU 0
#define S_TYPE 8
#define S_SENDER 12
#define S_SIZE 16
#define S_TICKET 24
#define RING_HEADER_BYTES 256
#define SLOT_HEADER 32
#define ABANDONED UINT64_MAX
#define REROUTE (-3)            /* a Port's answer: its peer entry names another incarnation */
#define SUB_REQUEST 0x40000000u
#define SUB_RESPONSE 0x80000000u

/* -- _ring.c ------------------------------------------------------------------------------ */
extern int pipe_nowait;         /* pipes take RWF_NOWAIT (Linux >= 6.4), asked at import */
int probe_pipe_nowait(void);
int ring_fits(uint64_t len, uint64_t nslots, uint64_t stride, uint64_t slot_bytes);
char *hold_at(PyObject *o, Py_buffer *view, int flags, Py_ssize_t at, Py_ssize_t align,
              const char *what);
long publish(char *base, uint64_t nslots, uint64_t stride, uint64_t slot_bytes,
             uint64_t sender, uint64_t cpu, uint64_t *count, uint64_t type,
             const void *head, uint64_t hlen, const void *body, uint64_t blen,
             uint64_t *tail_hint);
long ring_doorbell(long rc, long wake_fd, long signal_pid, long signo);
PyObject *fr_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_drain(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_halt(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_idle_enter(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
int ring_args(PyObject *const *args, Py_buffer *buf, uint64_t *nslots, uint64_t *stride,
              uint64_t *slot_bytes);
int spin_published(char *base, uint64_t nslots, uint64_t stride, double usec);
/* a halt's deadline kept on a timerfd set across waits (a Waiter's own), watched with the
 * doorbell by an epoll set: the sleep itself has no timeout, so no hrtimer is armed and
 * cancelled a sleep (on this VM a pipe round trip with a 0.5 ms ppoll timeout on one side
 * took 2.5-5 us more than with a blocking read, interleaved; through this, 0.3-0.9 us).
 * ``fd``/``ep`` -1: not made yet; ``armed``: the CLOCK_MONOTONIC expiry it is set to. */
struct halt_timer {
    int fd, ep;             /* the timerfd; the epoll set of it and ``door`` */
    int door;               /* the doorbell in ``ep`` (-1: none yet) */
    pid_t pid;              /* the process that made them (a fork's child makes its own) */
    double armed;
};
void halt_timer_close(struct halt_timer *timer);
int halt_wait(char *base, uint64_t nslots, uint64_t stride, int fd, double timeout,
              struct halt_timer *timer);

/* a drain in progress (_ring.c's consume), as the dispatch in _port.c sees it */
struct drain_state {
    char *base;
    uint64_t nslots, stride, slot_bytes;
    const uint8_t *bits;
    uint64_t nbits, dropped;
    uint32_t drop_tag[8], drop_type[8], drop_n[8];      /* unhandled, per (sender, type) */
    PyObject *deliver;                       /* deliver(type, sender, cpu, bytes) */
    PyObject *waiting, *responses;           /* replies: matched here, not delivered */
    PyObject *handlers, *ports, *after;      /* requests: dispatched here (see dispatch) */
    PyObject *et, *ev, *tb;                  /* the first Exception a handler raised */
    long delivered;
};

/* drain's work on a ring already held (released there): drain, and the waits after theirs */
PyObject *drain_held(Py_buffer *buf, uint64_t nslots, uint64_t stride, uint64_t slot_bytes,
                     PyObject *const *args, Py_ssize_t nargs);

/* -- _message.c --------------------------------------------------------------------------- */
extern PyTypeObject *message_type;           /* set by configure() */
PyObject *decode_raw(const unsigned char *p, Py_ssize_t n, PyObject *sender, PyObject *cpu,
                     PyObject *type_obj);
#define HEAD_MAX (20 + 5)                    /* the mk_message header and a bin 32's prefix */
int encode_head(uint32_t type, uint32_t sub, uint64_t mid, PyObject *payload,
                unsigned char *head, uint64_t *hlen, const void **body, uint64_t *blen,
                PyObject **packed);
int codec_init(void);
PyObject *fr_configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *fr_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* -- _waiter.c ---------------------------------------------------------------------------- */
extern PyTypeObject WaiterType;              /* a kernel's wait and request fast path */

/* -- _port.c ------------------------------------------------------------------------------ */
extern PyTypeObject PortType;
long port_request(PyObject *port, uint32_t type, uint64_t mid, PyObject *payload);
int take_reply(struct drain_state *d, PyObject **row, uint32_t type);
int dispatch(struct drain_state *d, PyObject **row, uint32_t type);
int held_in_c(struct drain_state *d, char *slot, uint64_t size, uint32_t type,
              uint32_t sender, uint64_t cpu, uint64_t *tail, uint64_t t, uint64_t *received);

#endif
