/* The live-update hand-over of a ring (partition/host/liveupdate.py update, lifecycle.py boot
 * with handover=True and _mark_booted; the guest side in partition/guest/kernel.py _main and
 * run; line numbers as of commit 373213d). The old kernel quiesces and exits; the ring is not
 * reset (lifecycle.py:93-97); the new kernel boots on the same ring; the host then writes the
 * new pid into the peer table and rings the new kernel's doorbell (lifecycle.py:149-155). A
 * sender keeps sending throughout through a bound Port: the Port checks the peer entry
 * (state, pid) before each send and answers REROUTE when it changed (_fastring.c port_send
 * 1159-1166), after which the sender binds to the new incarnation's doorbell
 * (guest/endpoint.py post, _bind); a doorbell goes to the incarnation the Port was bound to.
 *
 * Properties, exhaustive (bound: one sender of NMSG messages, NSLOT slots):
 *   - each message is delivered once, by the old or the new kernel, in order (assertion in
 *     consume): the tail the old kernel left is where the new one starts;
 *   - every message is delivered: the new kernel ends (in this model) once the sender is done
 *     and the ring is empty, and then asserts it saw all. Its sleeps end on a doorbell or on
 *     its idle timer (SPIN's timeout: the timer fires when nothing else can happen).
 *   - with -DTICKLESS the new kernel sleeps with no timer (idle_timeout = None): a doorbell
 *     must wake it, and at quiescence everything was delivered. A Port that checked the entry
 *     before the host wrote the new pid may publish after the new kernel's last look and ring
 *     the old kernel's eventfd, leaving ``signaled`` set; the host keeps that eventfd and
 *     forwards its rings to the new kernel's (lifecycle.py _handed_over and
 *     forward_old_doorbell). Without the forwarding (mutant NO_FORWARD, the code before this
 *     model) SPIN finds the new kernel asleep with the messages in its ring.
 *
 * Mutants, each of which SPIN must refute:
 *   RESET_ON_HANDOVER  the host resets the ring at the new boot as at any other boot (the
 *                      ``if not handover`` of lifecycle.py:93)
 *   NO_QUIESCE_WAIT    the host boots the new kernel without waiting for the old one to
 *                      exit (the m.wait of liveupdate.py:73): two receivers on one ring
 *   NO_FORWARD         (with TICKLESS) the old kernel's doorbell is closed at its exit
 */

#define NSLOT 2
#ifndef NMSG
#define NMSG 3
#endif
#define OLD 1
#define NEW 2

byte head, tail;
bit idle, signaled;
byte size[NSLOT], ticket[NSLOT], payload[NSLOT];
byte entry = OLD;               /* the peer table's pid for the instance: which incarnation */
bit db[3];                      /* each incarnation's own eventfd (db[OLD], db[NEW]) */
bit quiesce, old_exited, new_running;
bit sigpending, in_ppoll;       /* the new kernel's */
byte next_seq, delivered;
bit sender_done;

inline consume() {
    do
    :: size[tail % NSLOT] == 0 -> break
    :: else ->
        k = tail % NSLOT;
        assert(ticket[k] == tail);
        assert(payload[k] == next_seq + 1);             /* once each, in order */
        next_seq++;
        delivered++;
        d_step { size[k] = 0; ticket[k] = 0 };
        tail++
    od
}

proctype Sender() {
    byte seq, h, t, s, bound;
    bit was;
    bound = OLD;
    do
    :: seq == NMSG -> break
    :: else ->
        if                                              /* port_current (1143-1149) */
        :: entry != bound -> bound = entry              /* REROUTE: bind again (_bind) */
        :: else
        fi;
claim:  h = head;
        t = tail;
        if
        :: h - t >= NSLOT -> (tail != t); goto claim
        :: else
        fi;
        atomic { if :: head == h -> head = h + 1 :: else -> goto claim fi };
        s = h % NSLOT;
        ticket[s] = h;
        payload[s] = seq + 1;
        size[s] = 1;                                    /* publish */
        atomic { was = signaled; signaled = 1 };        /* fence; exchange (288-292) */
        if
        :: was -> skip
        :: else ->
            if
            :: idle -> db[bound] = 1                    /* the bound incarnation's eventfd */
            :: else ->
                atomic {                                /* signal through the bound pidfd */
                    if
                    :: bound == NEW && in_ppoll -> db[NEW] = 1
                    :: bound == NEW && !in_ppoll -> sigpending = 1
                    :: else -> skip                     /* the old kernel: ESRCH, or it is
                                                         * busy and looks before it sleeps */
                    fi
                }
            fi
        fi;
        seq++
    od;
    sender_done = 1
}

/* the old kernel: drains until the SHUTDOWN (handover) ends its loop, then exits; what is
 * left waits in the ring (kernel.py _main 648-665) */
proctype Old() {
    byte k;
    do
    :: quiesce -> break
    :: else ->
        if :: signaled -> signaled = 0 :: else fi;
        consume()
    od;
    old_exited = 1
}

proctype Host() {
    quiesce = 1;                                        /* liveupdate.py: SHUTDOWN, handover */
#ifndef MUTANT_NO_QUIESCE_WAIT
    old_exited;                                         /* m.wait(inst.pid is None) */
#endif
#ifdef MUTANT_RESET_ON_HANDOVER
    d_step { head = 0; tail = 0; size[0] = 0; size[1] = 0; ticket[0] = 0; ticket[1] = 0 };
#endif
    new_running = 1;                                    /* boot: ready = 1, the new CPU acks */
    entry = NEW;                                        /* _mark_booted: pid in the peer table */
    db[NEW] = 1                                         /* ... and its doorbell rung */
}

#ifndef MUTANT_NO_FORWARD
/* the host's selector, after the old kernel exited: a ring of its eventfd is drained and the
 * running kernel's rung (lifecycle.py forward_old_doorbell); none before the new one boots */
proctype Forward() {
    old_exited;
end_forward:
    do
    :: atomic { db[OLD] -> db[OLD] = 0; if :: new_running -> db[NEW] = 1 :: else fi }
    od
}
#endif

/* the new kernel: kernel.py run, interrupt mode, as models/ring.pml's Receiver (hush left out) */
proctype New() {
    byte k;
    bit r;
    new_running;
    if :: signaled -> signaled = 0 :: else fi;          /* first lap: poll_ipis -> drain */
    consume();
    do
    :: sender_done && head == tail -> break
    :: else ->
        if
        :: sigpending -> sigpending = 0; db[NEW] = 1
        :: else
        fi;
        db[NEW] = 0;                                    /* halt: read(fd) */
        idle = 1;
        signaled = 0;
        if                                              /* tail_published */
        :: tail == head -> r = 0
        :: else -> r = (size[tail % NSLOT] != 0)
        fi;
        if
        :: !r ->
            in_ppoll = 1;
#ifdef TICKLESS
end_sleep:  db[NEW];
#else
            if
            :: db[NEW]
            :: timeout                                  /* the idle timer */
            fi;
#endif
            in_ppoll = 0
        :: else
        fi;
        idle = 0;
        if :: signaled -> signaled = 0 :: else fi;
        consume()
    od;
    assert(delivered == NMSG)
}

#ifdef TICKLESS
active proctype Quiescence() {
    timeout -> assert(delivered == NMSG)
}
#endif

init {
    atomic {
        run Sender(); run Old(); run Host(); run New();
#ifndef MUTANT_NO_FORWARD
        run Forward()
#endif
    }
}
