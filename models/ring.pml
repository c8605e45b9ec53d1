/* The IPI ring as partition/abi/_fastring.c and partition/abi/ring.py implement it (line
 * numbers as of commit 373213d): several senders (claim, write, publish, doorbell decision),
 * one receiver (drain with the hush flag, halt with the idle flag and the doorbell re-arm),
 * and "ring the receiver's doorbell" as the only wake-up. No sender dies here: deaths and the
 * healing that answers them are models/healing.pml.
 *
 * Properties (checked exhaustively, bound: NPROD senders of NMSG messages each into a ring
 * of NSLOT slots; ENOSPC is reached, the ring wraps):
 *   - every delivered message is the next one of its sender: per-sender FIFO, no duplicate,
 *     no skip (assertion in consume);
 *   - a claim is never written over a slot the receiver has not consumed: a full ring is
 *     refused (assertion in Sender);
 *   - no lost wake-up: when nothing else can move (SPIN's timeout), the receiver sleeps on its
 *     doorbell and every message was delivered (assertion in Quiescence). The receiver sleeps
 *     with no timeout (a tickless kernel): only a doorbell wakes it.
 *
 * -DUNHUSHED: the drain of the pure-Python ring (ring.py drain 510-528), which never raises
 * ``polling``; the same properties hold.
 *
 * Mutants (spin -DMUTANT_x), each of which SPIN must refute:
 *   NO_FENCE        the sender reads the receiver's flags before its publish is visible (the
 *                   full barrier after publish, _fastring.c:288, ring.py:293, taken away: the
 *                   store-load reordering a store buffer allows)
 *   IDLE_AFTER_LOOK the halt looks at the ring before it sets idle and re-arms (the order of
 *                   _fastring.c:899-902 reversed)
 *   NO_REARM        the halt does not clear ``signaled`` (_fastring.c:901, ring.py:459)
 *   PUBLISH_FIRST   size is stored before the payload (no "publish last": _fastring.c:283)
 *   FULL_OFF_BY_ONE the claim accepts h - t == NSLOT (_fastring.c:257, ring.py:278)
 *   NO_CAS          the claim reads head and stores head + 1 without a compare-and-swap
 */

#ifndef NSLOT
#define NSLOT 2
#endif
#ifndef NPROD
#define NPROD 2
#endif
#ifndef NMSG
#define NMSG 2
#endif
#define TOTAL (NPROD * NMSG)

/* the ring header (ring.py HEAD, TAIL, POLLING, IDLE, SIGNALED) */
byte head, tail;
bit polling, idle, signaled;
/* the slots: S_SIZE (0: free or claimed, 1: published), S_SENDER (id + 1), S_TICKET, and the
 * payload, which names the message: sender * NMSG + seq + 1. The receiver zeroes the header
 * of a consumed slot, never its payload (_fastring.c:456: memset of SLOT_HEADER bytes). */
byte size[NSLOT], sender[NSLOT], ticket[NSLOT], payload[NSLOT];
/* the receiver's doorbell: an eventfd, read (cleared) by the halt, written by a sender */
bit doorbell;
/* a busy receiver is signalled instead (ring.py DOORBELL_SIGNAL); its handler writes the
 * eventfd at the next bytecode (kernel.py _on_ipi), and a signal that comes while the receiver
 * is inside ppoll ends the sleep (EINTR, _fastring.c:916) */
bit sigpending, in_ppoll;
/* what the receiver has seen: the next seq per sender, and the count delivered */
byte next_seq[NPROD];
byte delivered;

/* "ring the receiver's doorbell", after ring.py Ring.send answered WAKE or SIGNAL
 * (_fastring.c ring_doorbell, 303-316; the Port rings it itself, port_send 1159-1166) */
inline ring_doorbell() {
    if
    :: idle -> doorbell = 1                             /* DOORBELL_WAKE: its eventfd */
    :: else ->                                          /* DOORBELL_SIGNAL: interrupt it */
        atomic { if :: in_ppoll -> doorbell = 1 :: else -> sigpending = 1 fi }
    fi
}

/* publish()'s doorbell decision (_fastring.c:288-294, ring.py:293-299), after its fence */
inline doorbell_decision() {
    if
    :: polling -> skip                                  /* a poller sees it: no doorbell */
    :: else ->
        atomic { was = signaled; signaled = 1 };        /* exchange, seq_cst */
        if
        :: was -> skip                                  /* rung since the last drain */
        :: else -> ring_doorbell()
        fi
    fi
}

proctype Sender(byte p) {
    byte seq, h, t, s;
    bit was;
    do
    :: seq == NMSG -> break
    :: else ->
claim:  h = head;                                       /* _fastring.c:255 acquire */
        t = tail;                                       /* _fastring.c:256 acquire */
#ifdef MUTANT_FULL_OFF_BY_ONE
        if
        :: h - t > NSLOT -> (tail != t); goto claim
#else
        if
        :: h - t >= NSLOT -> (tail != t); goto claim    /* ENOSPC (257): retried when room */
#endif
        :: else
        fi;
#ifdef MUTANT_NO_CAS
        head = h + 1;
#else
        atomic {                                        /* compare-and-swap, _fastring.c:270 */
            if
            :: head == h -> head = h + 1
            :: else -> goto claim
            fi
        };
#endif
        s = h % NSLOT;
        /* the slot must be free: the receiver consumed ticket h - NSLOT (full ring refused) */
        assert(tail + NSLOT > h);
        sender[s] = p + 1;                              /* _fastring.c:274-277 */
        ticket[s] = h;
#ifdef MUTANT_PUBLISH_FIRST
        size[s] = 1;
        payload[s] = p * NMSG + seq + 1;
        doorbell_decision();
#else
        payload[s] = p * NMSG + seq + 1;                /* memcpy, 279-280 */
#ifdef MUTANT_NO_FENCE
        /* the flags read before the publish is visible: a store-load reordering */
        doorbell_decision();
        size[s] = 1;
#else
        size[s] = 1;                                    /* publish last, release: 283 */
        doorbell_decision();                            /* fence, then the flags: 288-294 */
#endif
#endif
        seq++
    od
}

/* tail_published (_fastring.c:83-90, ring.py pending 506) */
inline look() {
    if
    :: tail == head -> r = 0
    :: else -> r = (size[tail % NSLOT] != 0)
    fi
}

/* consume (_fastring.c:408-457; ring.py _careful 583-616): in order from tail, stop at the
 * first slot not published */
inline consume() {
    do
    :: size[tail % NSLOT] == 0 -> break                 /* 420-422: empty, or claimed only */
    :: else ->
        k = tail % NSLOT;
        assert(ticket[k] == tail);                      /* 425: a stale ticket never meets */
        q = sender[k] - 1;
        assert(q < NPROD);
        assert(payload[k] == q * NMSG + next_seq[q] + 1);  /* FIFO, no duplicate, no tear */
        next_seq[q]++;
        delivered++;
        d_step { size[k] = 0; sender[k] = 0; ticket[k] = 0 };  /* memset, 456 */
        tail++                                          /* release, 457: the slot is free */
    od
}

/* drain_held with hush (_fastring.c:669-697; kernel.py _take and halt pass hush=True) */
inline drain() {
#ifdef UNHUSHED
    hushed = 0;                                         /* ring.py drain: hush is C's alone */
#else
    hushed = !polling;
#endif
    if
    :: hushed -> polling = 1                            /* 672 */
    :: else
    fi;
    if
    :: signaled -> signaled = 0                         /* 676-677: re-arm for later ones */
    :: else
    fi;
    do
    :: consume();
        if
        :: !hushed -> break
        :: else
        fi;
        polling = 0;                                    /* 689, seq_cst */
        /* (without this look nothing is lost either: the halt's own look, after idle is
         * set, finds what a sender left unrung while polling was raised. The look saves
         * that message the trip through a halt.) */
        look();                                         /* 690-691 */
        if
        :: !r -> break
        :: else -> polling = 1                          /* 693 */
        fi
    od
}

/* the interrupt-mode receiver: kernel.py run -> _wait_ipi -> Ring.halt (_fastring.c fr_halt
 * 878-938), then the drain after it; a pending signal's handler writes the eventfd between two
 * calls (kernel.py _on_ipi 342-349) */
proctype Receiver() {
    bit r, hushed;
    byte k, q;
    do
    :: if
        :: sigpending -> sigpending = 0; doorbell = 1   /* _on_ipi: eventfd_write */
        :: else
        fi;
        doorbell = 0;                                   /* read(fd): clear the doorbell, 894 */
        polling = 0;                                    /* 899 */
#ifdef MUTANT_IDLE_AFTER_LOOK
        look();
        idle = 1;
        signaled = 0;
#else
        idle = 1;                                       /* 900, seq_cst */
#ifndef MUTANT_NO_REARM
        signaled = 0;                                   /* 901, seq_cst */
#endif
        look();                                         /* 902 */
#endif
        if
        :: !r ->
            in_ppoll = 1;
end_sleep:  doorbell;                                   /* ppoll, no timeout (tickless) */
            in_ppoll = 0
        :: else
        fi;
        idle = 0;                                       /* 931 */
        drain()
    od
}

/* quiescence: nobody can move; the receiver sleeps. Everything sent must have been delivered,
 * or a wake-up was lost (or a message: the assertions in consume say which). */
active proctype Quiescence() {
    timeout -> assert(delivered == TOTAL)
}

init {
    byte i;
    atomic {
        for (i : 0 .. NPROD - 1) { run Sender(i) };
        run Receiver()
    }
}
