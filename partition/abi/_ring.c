/* _ring.c: the IPI ring's atomics and waits in C (reference: ring.py, which implements all of
 * it and is what runs without this extension).
 *
 * Boundary: the ring's per-message hot path and nothing else: claim-fill-publish and the
 * doorbell decision (send), consume of the well-formed prefix (drain), and the waits that end
 * in a drain (poll, halt). Anything unusual (an unpublished, abandoned or malformed slot, a
 * stale ticket) stops the drain and is left to ring.py's careful path.
 *
 * Why C: in Python a send costs ~1.75 us, 0.78 of it a ctypes call to libatomic for the
 * compare-and-swap, the rest struct packing and slicing; a drain costs as much again. Here both
 * are a few dozen instructions with the GCC atomic builtins inline.
 *
 * Every function takes the ring as a writable buffer (the Ring's memoryview), so every access is
 * bounds-checked against the mapping the caller holds; nothing is trusted from the ring itself:
 * sizes, tickets and sender ids are checked. */
#include "_fastring.h"
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* a halt of at least this long keeps its deadline on the caller's timer (struct halt_timer);
 * a shorter one sleeps with a timeout, as before */
#define HALT_TIMER_MIN_S 0.0002
/* how late past its deadline a halt on the timer may end (the timer is set again about once
 * this long of back-to-back waits): within a short wait's own length, 2 ms at most (ppoll's
 * own slack on a 0.5 s idle wait is 0.5 ms) */
#define HALT_SLACK_S 0.002

/* does a ring of this geometry fit a buffer of ``len`` bytes? */
int ring_fits(uint64_t len, uint64_t nslots, uint64_t stride, uint64_t slot_bytes)
{
    return nslots != 0 && stride >= SLOT_HEADER + slot_bytes &&
           len >= RING_HEADER_BYTES + nslots * stride;
}

/* a buffer held for the u64 (or two u32) at ``at``, ``align``-aligned: a pointer to it, or NULL
 * with the exception set (``what``) and nothing held */
char *hold_at(PyObject *o, Py_buffer *view, int flags, Py_ssize_t at, Py_ssize_t align,
              const char *what)
{
    if (PyObject_GetBuffer(o, view, flags) < 0)
        return NULL;
    if (at < 0 || at % align || at + 8 > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, what);
        return NULL;
    }
    return (char *)view->buf + at;
}

/* is the slot at tail published (a reason to drain on, or not to sleep)? */
/* Whether the slot at the tail is published. The slot alone says it (a free slot's header
 * is zeroed when it is consumed, and the ring starts zeroed): head is not read, so that the
 * senders' line stays with them (each read pulled it over, and the next sender's claim had to
 * pull it back: a miss on the critical path of every round trip). */
static int tail_published(const char *base, uint64_t nslots, uint64_t stride)
{
    uint64_t t = __atomic_load_n((uint64_t *)(base + TAIL), __ATOMIC_ACQUIRE);
    const char *slot = base + RING_HEADER_BYTES + (t % nslots) * stride;
    return __atomic_load_n((uint64_t *)(slot + S_SIZE), __ATOMIC_ACQUIRE) != 0;
}

int ring_args(PyObject *const *args, Py_buffer *buf, uint64_t *nslots, uint64_t *stride,
                     uint64_t *slot_bytes)
{
    if (PyObject_GetBuffer(args[0], buf, PyBUF_WRITABLE) < 0)
        return -1;
    *nslots = PyLong_AsUnsignedLongLong(args[1]);
    *stride = PyLong_AsUnsignedLongLong(args[2]);
    *slot_bytes = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) {
        PyBuffer_Release(buf);
        return -1;
    }
    if (!ring_fits((uint64_t)buf->len, *nslots, *stride, *slot_bytes)) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "ring geometry does not fit the buffer");
        return -1;
    }
    return 0;
}

/* Drop filters (an emulator invention, after Linux's spurious-interrupt detector, which
 * disables an IRQ line that keeps firing for nobody, and a NIC's receive filters): a receiver
 * that drops FILTER_AFTER messages of one type from one sender within FILTER_MS, unhandled,
 * sets a filter for that (sender, type) in its ring header. While the filter is in force that
 * sender's messages of that type are dropped inside its own send, counted here, and never
 * touch a slot, the doorbell or ``signalled``: a flood of junk costs its receiver nothing.
 * Renewed while the flood goes on (the receiver sees the filter's hits), it lapses FILTER_MS
 * after the flood stops; its other types go through as before. */
static uint32_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

static inline char *filter_at(char *base, int i)
{
    return base + FILTERS + 16 * i;
}

static inline int any_filter(const char *base)
{
    for (int i = 0; i < NFILTER; i++)
        if (*(volatile uint16_t *)(base + FILTERS + 16 * i + F_SENDER))
            return 1;
    return 0;
}

/* sender: is (tag, type) filtered here? Then count the drop, there and in the total. */
static int filtered(char *base, uint32_t tag, uint32_t type)
{
    if (tag == 1)                    /* the host (id 0) is never filtered: its commands would */
        return 0;                    /* vanish behind a filter any peer can forge */
    for (int i = 0; i < NFILTER; i++) {
        char *f = filter_at(base, i);
        if (*(volatile uint16_t *)(f + F_SENDER) == tag && *(volatile uint32_t *)(f + F_TYPE) == type) {
            __atomic_fetch_add((uint32_t *)(f + F_HITS), 1, __ATOMIC_RELAXED);
            __atomic_fetch_add((uint64_t *)(base + DROPPED_FILTERED), 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}

/* receiver: renew the filters that dropped something since the last look, clear those whose
 * time is up (or whose time is one we never wrote: the header is shared memory) */
static void review_filters(char *base, uint32_t now)
{
    for (int i = 0; i < NFILTER; i++) {
        char *f = filter_at(base, i);
        if (*(volatile uint16_t *)(f + F_SENDER) == 0)
            continue;
        if (__atomic_exchange_n((uint32_t *)(f + F_HITS), 0, __ATOMIC_RELAXED) != 0) {
            *(volatile uint32_t *)(f + F_UNTIL) = now + FILTER_MS;
            continue;
        }
        int32_t left = (int32_t)(*(volatile uint32_t *)(f + F_UNTIL) - now);
        if (left <= 0 || left > 100 * FILTER_MS)
            __atomic_store_n((uint16_t *)(f + F_SENDER), 0, __ATOMIC_RELEASE);
    }
}

/* receiver: filter (tag, type) from now on; a full table filters nothing more. Junk sent
 * before the filter was visible to its sender still reaches the ring and may be tallied again:
 * then the filter in force is renewed, not duplicated. */
static void add_filter(char *base, uint32_t tag, uint32_t type, uint32_t now)
{
    for (int i = 0; i < NFILTER; i++) {
        char *f = filter_at(base, i);
        if (*(volatile uint16_t *)(f + F_SENDER) == tag && *(volatile uint32_t *)(f + F_TYPE) == type) {
            *(volatile uint32_t *)(f + F_UNTIL) = now + FILTER_MS;
            return;
        }
    }
    for (int i = 0; i < NFILTER; i++) {
        char *f = filter_at(base, i);
        if (*(volatile uint16_t *)(f + F_SENDER) != 0)
            continue;
        *(volatile uint32_t *)(f + F_TYPE) = type;
        *(volatile uint32_t *)(f + F_UNTIL) = now + FILTER_MS;
        *(volatile uint32_t *)(f + F_HITS) = 0;
        __atomic_store_n((uint16_t *)(f + F_SENDER), (uint16_t)tag, __ATOMIC_RELEASE);
        return;
    }
}

/* The receiver's private tally of unhandled messages per (sender, type), across drains: a slow
 * flood wakes its receiver for every few messages, so one drain may never see FILTER_AFTER.
 * Private to this process, as a receiver's bookkeeping should be; keyed by ring, since a test
 * may drain several rings in one process. */
static struct suspect {
    const char *ring;
    uint32_t tag, type, n, since;
} suspects[8];

static int tally(const char *ring, uint32_t tag, uint32_t type, uint32_t n, uint32_t now)
{
    struct suspect *slot = NULL, *victim = &suspects[0];
    for (int i = 0; i < 8; i++) {
        struct suspect *x = &suspects[i];
        if (x->ring == ring && x->tag == tag && x->type == type) {
            slot = x;
            break;
        }
        if (x->ring == NULL || (victim->ring != NULL && (int32_t)(x->since - victim->since) < 0))
            victim = x;
    }
    if (slot == NULL || (uint32_t)(now - slot->since) > FILTER_MS) {
        if (slot == NULL)
            slot = victim;
        slot->ring = ring;
        slot->tag = tag;
        slot->type = type;
        slot->n = 0;
        slot->since = now;
    }
    slot->n += n;
    if (slot->n < FILTER_AFTER)
        return 0;
    slot->ring = NULL;
    return 1;
}

/* The claim-fill-publish of one message and the doorbell decision after it: send's body, and
 * Port's. The message is ``head`` (hlen bytes, may be 0) then ``body``: a Port writes the
 * mk_message header and the payload straight into the slot, with no bytes object between.
 * Returns an errno (> 0), 0 (no doorbell needed), -1 (wake: the receiver is idle) or -2
 * (interrupt: it is busy). */
/* ``tail_hint`` (NULL: none): a tail this sender read before, for a ring whose tail only moves
 * on while the sender lives (an instance's Port: it lasts one incarnation of its receiver, and
 * the host resets a ring only at a boot). While head stands less than the fair share ahead of
 * it there is room whatever the tail says now (the tail is never behind the hint), so the
 * tail's line, which the receiver writes at every message, is not pulled over to this core at
 * every send (a cache miss on the critical path of every round trip); past the share the tail
 * is read, and the hint follows it. A receiver that rewinds its own tail (a heal, or garbage it
 * wrote) can only lose messages to itself, as it could anyway. */
long publish(char *base, uint64_t nslots, uint64_t stride, uint64_t slot_bytes,
             uint64_t sender, uint64_t cpu, uint64_t *count, uint64_t type,
             const void *head, uint64_t hlen, const void *body, uint64_t blen,
             uint64_t *tail_hint)
{
    uint64_t n = hlen + blen;
    if (n == 0 || n > slot_bytes)
        return EMSGSIZE;
    uint64_t *headp = (uint64_t *)(base + HEAD), *tail = (uint64_t *)(base + TAIL);
    if (filtered(base, (uint32_t)(sender + 1), (uint32_t)type)) {
        if (count != NULL)          /* sent, as far as the sender can tell; dropped here */
            *count += 1;
        return 0;
    }
    uint64_t h, share = nslots - nslots / 8;
    for (;;) {
        h = __atomic_load_n(headp, __ATOMIC_ACQUIRE);
        uint64_t t;
        if (tail_hint != NULL && h - *tail_hint < share)     /* (unsigned: hint <= h too) */
            t = *tail_hint;
        else {
            t = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
            if (tail_hint != NULL)
                *tail_hint = t;
        }
        if (h - t >= nslots)
            return ENOSPC;
        if (h - t >= share) {
            /* fair share: one sender may hold at most 7/8 of the slots, so that a flood
             * never leaves the others without room (they get ENOSPC only when several
             * senders fill the ring together). Counting is only needed past the share. */
            uint64_t mine = 0;
            for (uint64_t k = t; k < h; k++)
                mine += *(volatile uint32_t *)(base + RING_HEADER_BYTES + (k % nslots) * stride
                                               + S_SENDER) == (uint32_t)(sender + 1);
            if (mine >= share)
                return ENOSPC;
        }
        if (__atomic_compare_exchange_n(headp, &h, h + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            break;
    }
    char *slot = base + RING_HEADER_BYTES + (h % nslots) * stride;
    *(uint64_t *)(slot + S_CPU) = cpu;
    *(uint32_t *)(slot + S_TYPE) = (uint32_t)type;
    *(uint32_t *)(slot + S_SENDER) = (uint32_t)(sender + 1);
    *(uint64_t *)(slot + S_TICKET) = h;
    if (hlen)
        memcpy(slot + SLOT_HEADER, head, hlen);
    memcpy(slot + SLOT_HEADER + hlen, body, blen);
    if (count != NULL)
        *count += 1;
    __atomic_store_n((uint64_t *)(slot + S_SIZE), n, __ATOMIC_RELEASE);   /* publish last */
    /* The doorbell decision, after a full barrier (our publish must be visible before we read
     * the receiver's flags, as its flags are before it looks at the ring): none for a poller;
     * none if someone rang since the receiver's last drain (it will see us in that drain or
     * be rung by whoever finds the flag clear); else wake it if idle, interrupt it if busy. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (*(volatile uint8_t *)(base + POLLING))
        return 0;
    if (__atomic_exchange_n((uint64_t *)(base + SIGNALED), 1, __ATOMIC_SEQ_CST) != 0)
        return 0;
    __atomic_fetch_add((uint64_t *)(base + DOORBELLS), 1, __ATOMIC_RELAXED);
    return *(volatile uint32_t *)(base + IDLE) ? -1 : -2;
}

/* Ring the doorbell publish() asked for (rc < 0), here: the Python between a send and its
 * doorbell is on the critical path of every interrupt-mode round trip (measured: 3 us of a
 * 61 us round trip, cold caches after a vCPU halt). A halted receiver: write its doorbell; a
 * busy one: signal it (signal_pid 0: the receiver is the host, whose doorbell is always
 * written; below 0: no signal possible). What cannot be rung here is left to the caller: the
 * answer stays negative.
 * A doorbell is the write end of a pipe (linux.doorbell, linux.host_doorbell: a sender can
 * ring it, never read it), shared by every sender: written with RWF_NOWAIT, since any holder
 * can clear O_NONBLOCK on it, and a full pipe is rung already. Before Linux 6.4 pipes refuse
 * RWF_NOWAIT (EOPNOTSUPP): pipe_nowait, asked at import as linux.PIPE_NOWAIT is, then says
 * write(2), on the end the host made non-blocking. */
int pipe_nowait = 1;

int probe_pipe_nowait(void)
{
    int fds[2];
    uint64_t one = 1;
    struct iovec iov = {&one, sizeof one};
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0)
        return 0;
    int ok = pwritev2(fds[1], &iov, 1, -1, RWF_NOWAIT) == (ssize_t)sizeof one;
    close(fds[0]);
    close(fds[1]);
    return ok;
}

long ring_doorbell(long rc, long wake_fd, long signal_pid, long signo)
{
    uint64_t one = 1;
    if (rc == -1 || signal_pid == 0) {
        struct iovec iov = {&one, sizeof one};
        if (wake_fd >= 0 && ((pipe_nowait ? pwritev2((int)wake_fd, &iov, 1, -1, RWF_NOWAIT)
                                          : write((int)wake_fd, &one, sizeof one)) ==
                             (ssize_t)sizeof one || errno == EAGAIN))
            return 0;
    } else if (signal_pid > 0 && (syscall(SYS_pidfd_send_signal, (int)signal_pid, (int)signo,
                                          NULL, 0) == 0 || errno == ESRCH)) {
        return 0;           /* signal_pid is a pidfd the host gave: it names one process */
    }
    return rc;
}

/* send(ring, nslots, stride, slot_bytes, sender_id, sender_cpu, counters, offset, msg_type,
 *      data) -> errno (> 0), or the doorbell still to ring: 0 none, -1 wake (the receiver is
 *      idle: ring its doorbell), -2 interrupt (it is busy: signal it). (A Port rings the
 *      doorbell itself.)
 * The fixed arguments come first so that a sender can bind them once (functools.partial).
 * With ``counters`` (a writable buffer; None: none) the u64 at ``offset`` in it counts the send
 * just before it is published: once the slot is visible the receiver may answer, and whoever
 * reads the sender's counters after that answer must find this send in them. */
PyObject *fr_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf, data, counters = {0};
    uint64_t nslots, stride, slot_bytes;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "send takes 10 arguments");
        return NULL;
    }
    PyObject *type_arg = args[8], *data_arg = args[9];
    if (ring_args(args, &buf, &nslots, &stride, &slot_bytes) < 0)
        return NULL;
    uint64_t sender = PyLong_AsUnsignedLongLong(args[4]);
    uint64_t cpu = PyLong_AsUnsignedLongLong(args[5]);
    uint64_t type = PyLong_AsUnsignedLongLong(type_arg);
    if (PyErr_Occurred() || PyObject_GetBuffer(data_arg, &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint64_t *count = NULL;
    if (args[6] != Py_None) {
        Py_ssize_t off = PyLong_AsSsize_t(args[7]);
        if ((off == -1 && PyErr_Occurred()) ||
            (count = (uint64_t *)hold_at(args[6], &counters, PyBUF_WRITABLE, off, 8,
                                         "counter offset outside the buffer")) == NULL) {
            PyBuffer_Release(&data);
            PyBuffer_Release(&buf);
            return NULL;
        }
    }
    long rc = publish((char *)buf.buf, nslots, stride, slot_bytes, sender, cpu,
                      count, type, NULL, 0, data.buf, (uint64_t)data.len, NULL);
    if (count != NULL)
        PyBuffer_Release(&counters);
    PyBuffer_Release(&data);
    PyBuffer_Release(&buf);
    return PyLong_FromLong(rc);
}

/* drain(ring, nslots, stride, slot_bytes, limit, handled, deliver[, hush[, replies]])
 *      -> (delivered, more, consumed) after calling deliver(type, sender_id, cpu, bytes) for
 *         each message (no list, no tuples: the Python loop over a batch is the first thing
 *         after a wake-up, on cold caches; a False answer counts as dropped_unknown_type)
 * Consumes published, well-formed slots in order; stops after ``limit``, at an empty ring, or at
 * the first slot that is not well formed, and then ``more`` is True: ring.py's careful path
 * takes over from there. Each consumed slot is zeroed, then tail moves; the ring's "received"
 * counter counts them before the caller delivers any (a handler's reply may be seen at once).
 * With ``handled`` (a bitmap: bit t set = type t is handled; types past its end count as
 * handled), a slot of a type not in it is consumed and counted as dropped_unknown_type here,
 * without a Python object: a flood of junk costs its receiver tens of nanoseconds a message.
 * The caller passes it only when no request of its own is pending (an awaited response may be
 * of any type).
 * ``hush``: the receiver raises ``polling`` while it consumes and delivers,
 * so senders ring no doorbell for messages it is about to take anyway (a signal during a drain
 * was pure cost: its handler cannot drain then); it clears the flag with a full barrier and
 * looks again, and drains on while messages keep coming, so nothing published meanwhile is
 * left without either a doorbell or this drain. */
/* One pass over the ring: up to ``room`` slots, in order. Each slot is copied out, zeroed,
 * tail moves past it and it is counted, and only then is it handed over (delivered): a handler's reply may be seen at once, and whoever acts on it must see
 * the count; and a handler that waits (a request from inside a handler) drains on from the
 * ring in order, with nothing of this pass taken but not yet delivered. Returns slots
 * consumed, or -1 with an exception set (a BaseException from a handler, or no memory). */
static long consume(struct drain_state *d, long room, int *more)
{
    char *base = d->base;
    uint64_t *head = (uint64_t *)(base + HEAD), *tail = (uint64_t *)(base + TAIL);
    uint64_t *received = (uint64_t *)(base + COUNTERS), *unknown = (uint64_t *)(base + COUNTERS + 16);
    long done;
    for (done = 0; done < room; done++) {
        uint64_t t = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
        char *slot = base + RING_HEADER_BYTES + (t % d->nslots) * d->stride;
        /* the slot first, head only when it is not published: a receiver that read head for
         * every message pulled the senders' line to its core between their claims (a stream
         * ran at two thirds of its speed once the receiver kept up) */
        uint64_t size = __atomic_load_n((uint64_t *)(slot + S_SIZE), __ATOMIC_ACQUIRE);
        /* and not at all once this pass took something: a claim not yet published at the
         * tail (a sender mid-write, or one that died there) is found by the next pass, which
         * starts here with nothing taken (a ping-pong's every drain read head after its one
         * message, and the peer's next claim pulled the line back) */
        if (size == 0 && (done > 0 || t == __atomic_load_n(head, __ATOMIC_ACQUIRE)))
            break;
        uint64_t ticket = *(volatile uint64_t *)(slot + S_TICKET);
        uint32_t sender = *(volatile uint32_t *)(slot + S_SENDER);
        if (size == 0 || size == ABANDONED || size > d->slot_bytes || ticket != t || sender == 0) {
            *more = 1;                       /* the careful path in ring.py decides */
            break;
        }
        uint32_t type = *(volatile uint32_t *)(slot + S_TYPE);
        if (d->bits != NULL && type < d->nbits && !(d->bits[type >> 3] & (1u << (type & 7)))) {
            d->dropped++;                    /* nobody handles it: it dies in the ring */
            for (int i = 0; i < 8; i++) {
                if ((d->drop_tag[i] == sender && d->drop_type[i] == type) || d->drop_tag[i] == 0) {
                    d->drop_tag[i] = sender;
                    d->drop_type[i] = type;
                    d->drop_n[i]++;
                    break;
                }
            }
            memset(slot, 0, SLOT_HEADER);
            __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);
            *received += 1;
            *unknown += 1;
            continue;
        }
        if (d->waiting != NULL && size >= 20) {
            int in_c = held_in_c(d, slot, size, type, sender,
                                 *(volatile uint64_t *)(slot + S_CPU), tail, t, received);
            if (in_c == 1) {
                d->delivered++;
                continue;
            }
            if (in_c == -1 || in_c == -2)    /* a reply's exception; or no memory (left in */
                return -1;                   /* the ring: nothing is lost) */
            if (in_c == -3) {                /* a handler's: as from deliver, below */
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    return -1;
                if (d->et == NULL)
                    PyErr_Fetch(&d->et, &d->ev, &d->tb);
                else
                    PyErr_Clear();
                continue;
            }
        }
        PyObject *row[4];
        row[0] = PyLong_FromUnsignedLong(type);
        row[1] = PyLong_FromUnsignedLong(sender - 1);
        row[2] = PyLong_FromUnsignedLongLong(*(volatile uint64_t *)(slot + S_CPU));
        row[3] = PyBytes_FromStringAndSize(slot + SLOT_HEADER, (Py_ssize_t)size);
        if (!row[0] || !row[1] || !row[2] || !row[3]) {
            for (int k = 0; k < 4; k++)
                Py_XDECREF(row[k]);
            return -1;                       /* (left in the ring: nothing is lost) */
        }
        memset(slot, 0, SLOT_HEADER);
        __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);     /* the slot is free from here on */
        *received += 1;
        if (d->waiting != NULL) {
            int taken = take_reply(d, row, type);
            if (taken != 0) {
                for (int k = 0; k < 4; k++)
                    Py_DECREF(row[k]);
                if (taken < 0)
                    return -1;
                d->delivered++;
                continue;
            }
        }
        /* A handler's Exception waits until the rest of the pass is delivered, then is raised;
         * a BaseException (a kernel panic, an exit) is raised at once, the rest left in the
         * ring. */
        int here = d->handlers != NULL ? dispatch(d, row, type) : 0;
        PyObject *r = here > 0 ? Py_NewRef(Py_True) : here < 0 ? NULL
                      : PyObject_Vectorcall(d->deliver, row, 4, NULL);
        for (int k = 0; k < 4; k++)
            Py_DECREF(row[k]);
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return -1;
            if (d->et == NULL)
                PyErr_Fetch(&d->et, &d->ev, &d->tb);
            else
                PyErr_Clear();
            continue;
        }
        if (r == Py_False)                   /* nobody handled it: counted, as ring.py does */
            *unknown += 1;
        Py_DECREF(r);
        d->delivered++;
    }
    return done;
}


/* drain's work on a ring already held in ``buf`` (released here), ``args`` as drain takes
 * them: drain, and poll and halt after their wait, without parsing the ring again */
PyObject *drain_held(Py_buffer *buf, uint64_t nslots, uint64_t stride,
                            uint64_t slot_bytes, PyObject *const *args, Py_ssize_t nargs)
{
    struct drain_state d;
    memset(&d, 0, sizeof d);
    d.nslots = nslots;
    d.stride = stride;
    d.slot_bytes = slot_bytes;
    d.deliver = args[6];
    if (!PyCallable_Check(d.deliver)) {
        PyErr_SetString(PyExc_TypeError, "deliver must be callable");
        PyBuffer_Release(buf);
        return NULL;
    }
    if (nargs == 9 && args[8] != Py_None) {
        PyObject *t = args[8];
        Py_ssize_t n = PyTuple_Check(t) ? PyTuple_GET_SIZE(t) : 0;
        if ((n != 2 && n != 5) || !PyDict_Check(PyTuple_GET_ITEM(t, 0))
                || !PyDict_Check(PyTuple_GET_ITEM(t, 1)) || message_type == NULL
                || (n == 5 && (!PyDict_Check(PyTuple_GET_ITEM(t, 2))
                               || !PyDict_Check(PyTuple_GET_ITEM(t, 3))
                               || !PyCallable_Check(PyTuple_GET_ITEM(t, 4))))) {
            PyErr_SetString(PyExc_TypeError, "replies: (waiting, responses[, handlers, ports, "
                                             "after]), dicts and a callable, after configure()");
            PyBuffer_Release(buf);
            return NULL;
        }
        d.waiting = PyTuple_GET_ITEM(t, 0);
        d.responses = PyTuple_GET_ITEM(t, 1);
        if (n == 5) {
            d.handlers = PyTuple_GET_ITEM(t, 2);
            d.ports = PyTuple_GET_ITEM(t, 3);
            d.after = PyTuple_GET_ITEM(t, 4);
        }
    }
    int hush = nargs >= 8 && PyObject_IsTrue(args[7]) == 1;
    Py_buffer handled = {0};                 /* bitmap: bit t set = type t has a handler */
    int filter = args[5] != Py_None;
    if (filter && PyObject_GetBuffer(args[5], &handled, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(buf);
        return NULL;
    }
    d.bits = filter ? (const uint8_t *)handled.buf : NULL;
    d.nbits = filter ? (uint64_t)handled.len * 8 : 0;
    long limit = PyLong_AsLong(args[4]);
    if (limit == -1 && PyErr_Occurred()) {
        if (filter)
            PyBuffer_Release(&handled);
        PyBuffer_Release(buf);
        return NULL;
    }
    char *base = d.base = (char *)buf->buf;
    long total = 0;
    int more = 0, failed = 0;
    volatile uint8_t *polling = (volatile uint8_t *)(base + POLLING);
    int hushed = hush && *polling == 0;
    if (hushed)
        __atomic_store_n((uint8_t *)polling, 1, __ATOMIC_SEQ_CST);
    /* doorbells rung from here on are for messages this drain may not see: let them ring
     * (a store only when it was set: a poller's drains never find it set, and each store was
     * a full barrier) */
    if (__atomic_load_n((uint64_t *)(base + SIGNALED), __ATOMIC_ACQUIRE) != 0)
        __atomic_store_n((uint64_t *)(base + SIGNALED), 0, __ATOMIC_SEQ_CST);
    for (;;) {
        long n = consume(&d, limit - total, &more);
        if (n < 0) {
            failed = 1;
            break;
        }
        total += n;
        if (!hushed)
            break;
        /* lower the flag with a full barrier, then look: a sender that saw it raised
         * published before it and is seen here; one that did not rings as usual */
        __atomic_store_n((uint8_t *)polling, 0, __ATOMIC_SEQ_CST);
        if (more || total >= limit || d.et != NULL
                || !tail_published(base, d.nslots, d.stride))
            break;
        __atomic_store_n((uint8_t *)polling, 1, __ATOMIC_SEQ_CST);
    }
    if (hushed && failed)
        __atomic_store_n((uint8_t *)polling, 0, __ATOMIC_SEQ_CST);
    if (total >= limit)
        more = 1;
    if (d.dropped || any_filter(base)) {
        uint32_t now = now_ms();
        review_filters(base, now);
        for (int i = 0; i < 8 && d.drop_tag[i]; i++)
            if (tally(base, d.drop_tag[i], d.drop_type[i], d.drop_n[i], now))
                add_filter(base, d.drop_tag[i], d.drop_type[i], now);
    }
    if (filter)
        PyBuffer_Release(&handled);
    PyBuffer_Release(buf);
    if (failed) {
        Py_XDECREF(d.et);
        Py_XDECREF(d.ev);
        Py_XDECREF(d.tb);
        return NULL;
    }
    if (d.et != NULL) {
        PyErr_Restore(d.et, d.ev, d.tb);
        return NULL;
    }
    /* (delivered, more, total), built directly: Py_BuildValue parsed its format on every
     * drain, and a poller's drain that took an answer is on the round trip's critical path */
    PyObject *res = PyTuple_New(3);
    if (res == NULL)
        return NULL;
    PyObject *v0 = PyLong_FromLong(d.delivered), *v1 = PyLong_FromLong(more),
             *v2 = PyLong_FromLong(total);
    if (v0 == NULL || v1 == NULL || v2 == NULL) {
        Py_XDECREF(v0);
        Py_XDECREF(v1);
        Py_XDECREF(v2);
        Py_DECREF(res);
        return NULL;
    }
    PyTuple_SET_ITEM(res, 0, v0);
    PyTuple_SET_ITEM(res, 1, v1);
    PyTuple_SET_ITEM(res, 2, v2);
    return res;
}

PyObject *fr_drain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    uint64_t nslots, stride, slot_bytes;
    if (nargs < 7 || nargs > 9) {
        PyErr_SetString(PyExc_TypeError, "drain takes 7 to 9 arguments");
        return NULL;
    }
    if (ring_args(args, &buf, &nslots, &stride, &slot_bytes) < 0)
        return NULL;
    return drain_held(&buf, nslots, stride, slot_bytes, args, nargs);
}

/* A poller's spin: until the slot at tail is published, at most ``usec`` microseconds. It
 * watches the slot, not head: head's line is the senders', and a receiver reading it between
 * their claims moved it to its own core and back for every message; the slot's line has to
 * come over once anyway, with the message in it. A claim not yet published (or abandoned) also
 * ends the spin, seen on the slower look at head every 64 turns, when the clock is read. */
int spin_published(char *base, uint64_t nslots, uint64_t stride, double usec)
{
    uint64_t *head = (uint64_t *)(base + HEAD), *tail = (uint64_t *)(base + TAIL);
    uint64_t t = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
    volatile uint64_t *size = (volatile uint64_t *)(base + RING_HEADER_BYTES + (t % nslots) * stride
                                                    + S_SIZE);
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_nsec += (long)(usec * 1000.0);
    end.tv_sec += end.tv_nsec / 1000000000L;
    end.tv_nsec %= 1000000000L;
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(size, __ATOMIC_ACQUIRE) != 0)
            return 1;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if ((i & 63) == 63) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            /* head once, at the end: a claim at the tail that is not published (a sender
             * mid-write or dead there) is the drain's to wait for or abandon. Read at every
             * 64th turn it pulled the senders' line over once a round trip, and their next
             * claim pulled it back */
            if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec >= end.tv_nsec))
                return __atomic_load_n(head, __ATOMIC_ACQUIRE) != t;
        }
    }
}

/* poll(ring, nslots, stride, slot_bytes, usec, limit, handled, deliver, hush[, replies])
 *      -> drain's answer, or None when nothing came within ``usec``
 * A poll-mode receiver's wait and the drain after it in one call: spin as ``spin`` does, then
 * drain as ``drain`` does. Two calls from Python were two trips through the interpreter
 * between a message's arrival and its handler. */
PyObject *fr_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "poll takes 9 or 10 arguments");
        return NULL;
    }
    double usec = PyFloat_AsDouble(args[4]);
    if (usec == -1.0 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    uint64_t nslots, stride, slot_bytes;
    if (ring_args(args, &buf, &nslots, &stride, &slot_bytes) < 0)
        return NULL;
    if (!spin_published((char *)buf.buf, nslots, stride, usec)) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    PyObject *drain_args[9] = {args[0], args[1], args[2], args[3], args[5], args[6], args[7],
                               args[8], nargs == 10 ? args[9] : Py_None};
    return drain_held(&buf, nslots, stride, slot_bytes, drain_args, 9);
}

/* idle_enter(ring, nslots, stride, slot_bytes) -> bool: announce "idle" with a full barrier,
 * then say whether a published message is already waiting (then do not sleep). Paired with the
 * barrier in send, no wake-up is lost between the announcement and the sleep. */
PyObject *fr_idle_enter(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    uint64_t nslots, stride, slot_bytes;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "idle_enter takes 4 arguments");
        return NULL;
    }
    if (ring_args(args, &buf, &nslots, &stride, &slot_bytes) < 0)
        return NULL;
    char *base = (char *)buf.buf;
    __atomic_store_n((uint32_t *)(base + IDLE), 1, __ATOMIC_SEQ_CST);
    /* re-arm the doorbell: a sender may have set ``signalled`` after our last drain had
     * already taken its message; left set, it would keep every later sender from ringing
     * while we sleep. From here on a sender either finds it clear and rings, or published
     * before this store, and then the look below sees its message. */
    __atomic_store_n((uint64_t *)(base + SIGNALED), 0, __ATOMIC_SEQ_CST);
    int pending = tail_published(base, nslots, stride);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(pending);
}

/* halt(ring, nslots, stride, slot_bytes, doorbell_fd, timeout_s, limit, handled[, deliver[,
 *      hush[, replies]]])
 *      -> drain's answer, or None when the wait timed out with nothing to take
 * The interrupt-mode wait in one call: clear the doorbell (its own end, non-blocking), announce
 * idle (the barrier of idle_enter), sleep on the doorbell unless a message is already waiting
 * (ppoll, nanosecond timeout: poll(2) would round up to a millisecond), leave idle, drain. In
 * Python these were a dozen calls between a wake-up and the first byte of work, each slow on
 * caches a vCPU halt has left cold. A signal during the sleep runs its Python handler here
 * (the IPI signal, SIGTERM), then the drain goes on; an exception from a handler is raised. */
/* halt's wait on a ring held at ``base``: clear the doorbell, announce idle, sleep unless a
 * message waits, leave idle. Returns 1 (rung, or a message waits), 0 (timed out), -1 (an
 * exception: an OSError, or a signal handler's) */
/* CLOCK_MONOTONIC in seconds (the timerfd's clock); 0 if it cannot be read */
static double halt_clock(void)
{
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) < 0)
        return 0;
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* set ``timer`` to end a sleep at ``deadline`` or at most ``slack`` (capped at HALT_SLACK_S)
 * after it, touching it only when its expiry is outside that window: a wait after a wait (a
 * round trip after a round trip) keeps it as it is, and it is set again about once a slack.
 * Returns 0, or -1 (no timer: the caller sleeps with a timeout, as without one). */
static int halt_timer_arm(struct halt_timer *timer, double deadline, double slack)
{
    if (slack > HALT_SLACK_S)
        slack = HALT_SLACK_S;
    pid_t pid = getpid();
    if (timer->fd >= 0 && timer->pid != pid)
        halt_timer_close(timer);            /* a fork's copies: the parent's, not ours */
    if (timer->fd >= 0 && timer->armed >= deadline && timer->armed <= deadline + slack)
        return 0;
    if (timer->fd < 0) {
        timer->fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (timer->fd < 0)
            return -1;
        timer->pid = pid;
        timer->ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {EPOLLIN, {.fd = timer->fd}};
        if (timer->ep < 0 || epoll_ctl(timer->ep, EPOLL_CTL_ADD, timer->fd, &ev) < 0) {
            halt_timer_close(timer);
            return -1;
        }
    }
    double at = deadline + slack;
    struct itimerspec spec = {{0, 0}, {(time_t)at, (long)((at - (double)(time_t)at) * 1e9)}};
    if (timerfd_settime(timer->fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0) {
        timer->armed = 0;
        return -1;
    }
    timer->armed = at;                      /* (setting it also clears a past expiry) */
    return 0;
}

/* ``timer``'s epoll set watching ``door`` beside the timer: 0, or -1 (the caller sleeps with a
 * timeout instead) */
static int halt_timer_watch(struct halt_timer *timer, int door)
{
    if (timer->door == door)
        return 0;
    struct epoll_event ev = {EPOLLIN, {.fd = door}};
    if (timer->door >= 0)
        epoll_ctl(timer->ep, EPOLL_CTL_DEL, timer->door, NULL);
    timer->door = -1;
    if (epoll_ctl(timer->ep, EPOLL_CTL_ADD, door, &ev) < 0)
        return -1;
    timer->door = door;
    return 0;
}

void halt_timer_close(struct halt_timer *timer)
{
    if (timer->fd >= 0 && timer->pid == getpid()) {
        close(timer->fd);
        if (timer->ep >= 0)
            close(timer->ep);
    }
    timer->fd = timer->ep = timer->door = -1;
    timer->armed = 0;
}

int halt_wait(char *base, uint64_t nslots, uint64_t stride, int fd, double timeout,
              struct halt_timer *timer)
{
    char junk[4096];        /* clear the doorbell: all of it (a pipe holds what peers wrote) */
    ssize_t got;
    while ((got = read(fd, junk, sizeof junk)) == (ssize_t)sizeof junk)
        ;
    if (got < 0 && errno != EAGAIN) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* a wait from inside a hushed drain (a handler's request) must be rung: lower the flag */
    __atomic_store_n((uint8_t *)(base + POLLING), 0, __ATOMIC_SEQ_CST);
    __atomic_store_n((uint32_t *)(base + IDLE), 1, __ATOMIC_SEQ_CST);
    __atomic_store_n((uint64_t *)(base + SIGNALED), 0, __ATOMIC_SEQ_CST);   /* as idle_enter */
    int rung = tail_published(base, nslots, stride);
    if (!rung) {
        if (timeout < 0)
            timeout = 0;
        double deadline = 0;
        struct pollfd pfd = {fd, POLLIN, 0};
        struct timespec ts;
        int untimed = timer != NULL && timeout >= HALT_TIMER_MIN_S
                      && (deadline = halt_clock()) > 0
                      && halt_timer_arm(timer, deadline += timeout, timeout) == 0
                      && halt_timer_watch(timer, fd) == 0;
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        int n, err;
        for (;;) {
            struct epoll_event evs[2];
            Py_BEGIN_ALLOW_THREADS
            n = untimed ? epoll_wait(timer->ep, evs, 2, -1) : ppoll(&pfd, 1, &ts, NULL);
            err = errno;
            Py_END_ALLOW_THREADS
            if (n > 0 && untimed && !(evs[0].data.fd == fd || (n > 1 && evs[1].data.fd == fd))) {
                /* only the timer: past the deadline, timed out; before it (the timer set
                 * again by a wait of another thread's), set it again and sleep on */
                double now = halt_clock();
                if (now < deadline && now > 0
                        && halt_timer_arm(timer, deadline, deadline - now) == 0)
                    continue;
                n = 0;
            }
            break;
        }
        if (n > 0)
            rung = 1;
        else if (n < 0 && err == EINTR) {
            rung = 1;                       /* a signal: its handler first, then look */
            if (PyErr_CheckSignals() < 0) {
                __atomic_store_n((uint32_t *)(base + IDLE), 0, __ATOMIC_SEQ_CST);
                return -1;
            }
        } else if (n < 0) {
            __atomic_store_n((uint32_t *)(base + IDLE), 0, __ATOMIC_SEQ_CST);
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    __atomic_store_n((uint32_t *)(base + IDLE), 0, __ATOMIC_SEQ_CST);
    return rung;
}

PyObject *fr_halt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    uint64_t nslots, stride, slot_bytes;
    if (nargs < 8 || nargs > 11) {
        PyErr_SetString(PyExc_TypeError, "halt takes 8 to 11 arguments");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[4]);
    double timeout = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (ring_args(args, &buf, &nslots, &stride, &slot_bytes) < 0)
        return NULL;
    int rung = halt_wait((char *)buf.buf, nslots, stride, fd, timeout, NULL);
    if (rung <= 0) {
        PyBuffer_Release(&buf);
        if (rung < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *drain_args[9] = {args[0], args[1], args[2], args[3], args[6], args[7],
                               nargs >= 9 ? args[8] : Py_None, nargs >= 10 ? args[9] : Py_False,
                               nargs == 11 ? args[10] : Py_None};
    return drain_held(&buf, nslots, stride, slot_bytes, drain_args, 9);
}
