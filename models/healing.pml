/* Healing of the IPI ring, as partition/abi/ring.py and partition/host/hostipc.py implement it
 * (line numbers as of commit 373213d): a sender may die at any step of its send; the host,
 * which sees the death, marks that sender's unpublished claims ABANDONED
 * (Ring.abandon_claims_of, ring.py:647-657, called from HostIPC.sweep_claims_of); the
 * receiver drops an abandoned slot, and reclaims by itself a claim left unpublished for
 * ``abandon_after`` (ring.py _careful 598-601 and _abandoned 639-645), whoever made it.
 * With -DGARBAGE a hostile peer also writes a garbage head into the header once; the
 * receiver's ring check (kernel.py check_ring -> Ring.header_problem 205-227 and heal 229-236)
 * resets the ring.
 *
 * The receiver here looks at the ring whenever head != tail, so that only the healing is
 * under test; with -DSLEEPING it is a tickless kernel instead, which sleeps on its doorbell
 * after each drain, and the property is also that healing wakes it: the host rings the
 * receiver of a ring it marked claims in (HostIPC.sweep_claims_of), and rings the receiver
 * of a ring whose tail stays stalled on one claim (HostIPC.watch_rings), so that a claim
 * whose claimer died before writing its id is reclaimed in time.
 *
 * Senders: sender 0 sends NMSG messages and never dies; sender 1 sends NMSG and may die at
 * any step (at most once: the bound). Properties, checked exhaustively:
 *   - no message is delivered twice, none torn (its payload is the one its sender wrote for
 *     that seq), and each sender's messages are delivered in order (assertion in consume);
 *   - no published message is dropped: every message a sender published is delivered
 *     (Quiescence), whoever died; with GARBAGE, every message claimed after the reset is;
 *   - nobody stays stuck: at quiescence the ring is empty (head == tail).
 * Assumption A (the one the code states, ring.py's docstring): a claim is reclaimed by time
 * only if its claimer was dead when the receiver found it unpublished: ``abandon_after``
 * (1 s) is longer than any live sender's stop between its claim and its publish.
 * -DSLOW_CLAIMER drops it for sender 1 (its claims may be reclaimed while it lives, and it
 * goes on writing), and checks only sender 0's messages (ring.py says the slow one loses its
 * own): SPIN finds sender 0's message lost (docs/protocols.md, finding F2).
 * -DGARBAGE (a header reset) is a finding too (F3): a send in flight across the reset.
 * Assumption B: the host's sweep of a dead sender's claims is over before the receiver
 * reclaims one of them by time (the sweep runs milliseconds after the death; the reclaim
 * comes abandon_after after the receiver first met the claim). -DSWEEP_RACE drops it: SPIN
 * then finds the host marking ABANDONED a claim that another sender made in the slot the
 * receiver had just reclaimed (abandon_claims_of checks size and sender, then writes: not
 * atomically), and that sender's message is lost.
 *
 * Mutants, each of which SPIN must refute:
 *   SWEEP_NO_DOORBELL  (with SLEEPING) the sweep marks claims and rings nobody
 *   NO_STALL_DOORBELL  (with SLEEPING) nothing rings a receiver stalled on a dead claim
 *   RECLAIM_PUBLISHED  the timeout reclaims the slot at tail without looking at its size
 *                      (the published check of _careful, 598)
 *   SWEEP_ANY_SENDER   the host marks every unpublished claim, not only the dead sender's
 *                      (the sender check of abandon_claims_of, 654)
 * (-DNO_TICKET_CHECK, the receiver not comparing the slot's ticket with tail (604), is no
 * mutant: under assumptions A and B no slot ever holds a stale ticket, and SPIN finds no error
 * without the check. It matters only with the late writers of SLOW_CLAIMER and GARBAGE.)
 */

#define NSLOT 2
#define NPROD 2
#ifndef NMSG
#define NMSG 2
#endif
#define ABANDONED 255
#define GARBAGE_HEAD 200

byte head, tail;
byte size[NSLOT], sender[NSLOT], ticket[NSLOT], payload[NSLOT];
/* ghosts: who claimed the slot last, who is dead, what was published and delivered */
byte claimer[NSLOT];
bit dead[NPROD];
byte published[NPROD];          /* bit seq: published */
byte delivered_bits[NPROD];     /* bit seq: delivered */
byte last_seq[NPROD];           /* seq + 1 of the last delivered message of each sender */
bit resetting, reset_done;
bit swept;                      /* the host's sweep is over */
#ifdef SLEEPING
bit doorbell, signaled;         /* the receiver's eventfd, and ring.py SIGNALED */
#endif
byte after_reset[NPROD];        /* bit seq: claimed after the reset */

#define MAY_DIE(p) if :: p == 1 && !dead[1] -> dead[1] = 1; goto out :: true fi

proctype Sender(byte p) {
    byte seq, h, t, s;
    do
    :: seq == NMSG -> break
    :: else ->
claim:  MAY_DIE(p);
        h = head;
        t = tail;
        if
        :: h - t >= NSLOT || h < t -> goto out          /* ENOSPC: this model's sender gives up */
        :: else
        fi;
        atomic {
            if
            :: head == h -> head = h + 1;
                s = h % NSLOT; claimer[s] = p;
                if :: reset_done -> after_reset[p] = after_reset[p] | (1 << seq) :: else fi
            :: else -> goto claim
            fi
        };
        MAY_DIE(p);
        sender[s] = p + 1;                              /* _fastring.c:276 (ring.py:284) */
        MAY_DIE(p);
        ticket[s] = h;                                  /* 277 */
        payload[s] = p * NMSG + seq + 1;                /* 280 */
        MAY_DIE(p);
        atomic { size[s] = 1;                           /* publish last, 283 */
                 published[p] = published[p] | (1 << seq) };
#ifdef SLEEPING
        /* the doorbell decision (288-294): WAKE and SIGNAL both end in the receiver's
         * eventfd (models/ring.pml tells them apart) */
        atomic { if :: !signaled -> signaled = 1; doorbell = 1 :: else fi };
#endif
        seq++
    od;
out:
    skip
}

/* the host after it saw sender 1 die: HostIPC.sweep_claims_of -> Ring.abandon_claims_of */
proctype Host() {
    byte t, h, k, s;
    bit marked;
end_alive:
    dead[1];                                            /* the pidfd says so */
    t = tail;                                           /* ring.py:650 */
    h = head;
    k = t;
    do
    :: k < h && k < t + NSLOT ->
        s = k % NSLOT;
#ifdef MUTANT_SWEEP_ANY_SENDER
        if
        :: size[s] == 0 -> size[s] = ABANDONED
        :: else
        fi;
#else
        if
        :: size[s] == 0 ->                              /* 653 */
            if
            :: sender[s] == 2 -> size[s] = ABANDONED; marked = 1    /* 654-655 */
            :: else
            fi
        :: else
        fi;
#endif
        k++
    :: else -> break
    od;
#if defined(SLEEPING) && !defined(MUTANT_SWEEP_NO_DOORBELL)
    /* HostIPC.sweep_claims_of: a ring it marked claims in, its receiver's doorbell rung */
    if :: marked -> doorbell = 1 :: else fi;
#endif
    swept = 1
}

#if defined(SLEEPING) && !defined(MUTANT_NO_STALL_DOORBELL)
/* HostIPC.watch_rings (every 0.1 s): a ring whose tail stays on one unpublished claim for
 * longer than its receiver's abandon_after has its receiver rung, so that a tickless one
 * wakes to reclaim it (time is not modelled: it may ring whenever the tail is stalled) */
proctype Watch() {
end_watch:
    do
    :: atomic { tail != head && size[tail % NSLOT] == 0 && !doorbell -> doorbell = 1 }
    od
}
#endif

#ifdef GARBAGE
/* a peer writes garbage into the header (any instance can write any ring) */
proctype Vandal() {
    head = GARBAGE_HEAD
}
#endif

/* drop the slot at tail: zero its header, move tail (ring.py:613-616) */
inline take() {
    d_step { size[k] = 0; sender[k] = 0; ticket[k] = 0 };
    tail++
}

/* Ring._careful (ring.py:583-616): one slot at a time */
inline careful() {
    do
    :: tail == head -> break                            /* 589 */
    :: else ->
        k = tail % NSLOT;
        /* 594: size first (gone: a ghost, whether its claimer was dead by then) */
#ifdef SWEEP_RACE
        atomic { sz = size[k]; gone = dead[claimer[k]] };
#elif defined(SLOW_CLAIMER)
        atomic { sz = size[k]; gone = dead[claimer[k]] && swept || claimer[k] == 1 };
#else
        atomic { sz = size[k]; gone = dead[claimer[k]] && swept };
#endif
        if
        :: sz == 0 ->
            /* unpublished: wait, or reclaim once abandon_after has passed (598-601) */
            if :: gone -> take() :: true -> break fi
        :: sz == ABANDONED -> take()                    /* 602 */
        :: else ->
#ifdef MUTANT_RECLAIM_PUBLISHED
            if :: take(); goto next :: true fi;
#endif
#ifdef NO_TICKET_CHECK
            if
            :: false -> skip
#else
            if
            :: ticket[k] != tail -> take()              /* 604: bad, dropped, counted */
#endif
            :: else ->
                q = sender[k] - 1;
                pl = payload[k];
                assert(q < NPROD);
                assert(pl == q * NMSG + (pl - 1) % NMSG + 1);   /* its sender's payload */
                s = (pl - 1) % NMSG;
                assert(!(delivered_bits[q] & (1 << s)));        /* no duplicate */
                assert(s + 1 > last_seq[q]);                    /* in order */
                delivered_bits[q] = delivered_bits[q] | (1 << s);
                last_seq[q] = s + 1;
                take()
            fi
        fi
    od;
next: skip
}

proctype Receiver() {
    byte k, q, sz, pl, s, t;
    bit gone;
    do
    :: true ->
end_wait:
#ifdef GARBAGE
        (head != tail);
        /* kernel.py check_ring -> header_problem (211-215): tail first, then head */
        t = tail;
        if
        :: head < t || head - t > NSLOT ->
            atomic { resetting = 1 };
            /* heal -> reset: the whole ring zeroed (ring.py:198-203) */
            d_step {
                head = 0; tail = 0;
                for (k : 0 .. NSLOT - 1) { size[k] = 0; sender[k] = 0; ticket[k] = 0; payload[k] = 0 };
                k = 0; reset_done = 1
            }
        :: else
        fi;
#elif defined(SLEEPING)
        careful();
        /* the halt (_fastring.c fr_halt): clear the eventfd, re-arm, look, sleep */
        doorbell = 0;
        signaled = 0;
        if
        :: tail == head || size[tail % NSLOT] == 0 ->  /* tail_published: ABANDONED is */
end_sleep:  doorbell                                    /* tickless: a doorbell, nothing else */
        :: else
        fi;
        if :: signaled -> signaled = 0 :: else fi       /* the drain's re-arm */
#else
        (head != tail);
#endif
#ifndef SLEEPING
        careful()
#endif
    od
}

active proctype Quiescence() {
    byte p;
    timeout ->
    assert(head == tail);                               /* nobody stays stuck */
    for (p : 0 .. NPROD - 1) {
#ifdef GARBAGE
        assert((after_reset[p] & published[p]) == (after_reset[p] & published[p] & delivered_bits[p]));
#elif defined(SLOW_CLAIMER)
        /* the slow sender loses its own message (as ring.py says); the other must not */
        assert(p == 1 || published[p] == (published[p] & delivered_bits[p]))
#else
        assert(published[p] == (published[p] & delivered_bits[p]))   /* none dropped */
#endif
    }
}

init {
    atomic {
        run Sender(0); run Sender(1); run Host(); run Receiver();
#if defined(SLEEPING) && !defined(MUTANT_NO_STALL_DOORBELL)
        run Watch();
#endif
#ifdef GARBAGE
        run Vandal()
#endif
    }
}
