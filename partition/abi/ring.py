"""The IPI ring: one per receiving instance, many senders, one receiver, in shared memory.

Protocol (the real tree's, plus what a user-space emulation needs to survive dead senders):

- A sender claims slot ``head % nslots`` by compare-and-swap of ``head`` from h to h+1, refused
  with ENOSPC when ``head - tail == nslots``. It writes ``sender_cpu``, ``type``, its id + 1 and
  the payload, then publishes by storing ``data_size`` **last**. ``data_size == 0`` means claimed,
  not yet written.
- The receiver drains at most ``limit`` slots, in order, from ``tail``; it stops at the first
  unpublished slot; a slot whose size is out of range is dropped and counted; every consumed
  slot is zeroed before ``tail`` moves on, so a slot is free again exactly when ``tail`` passes it.
- A sender that dies between claim and publish would block the ring for ever. The host, which
  sees every death, marks that sender's unpublished slots ``ABANDONED``; the receiver drops them
  (counted). A claimer that died before even writing its id (a window of a few hundred
  nanoseconds after the claim) cannot be named: its slot is dropped after ``abandon_after``
  seconds (1 s). A sender stopped for longer than that inside that same window loses its
  message, and its late write could meet a later claim of the same slot: every slot carries the
  ticket it was claimed with, and the receiver drops (and counts as bad) a slot whose ticket is
  not the one it expects.
- ``polling`` is set by a receiver that spins on its ring; senders then skip the doorbell, so a
  polled send costs no system call (Linux's polling-idle flag). A receiver leaving the polling
  state clears it with a full barrier and looks at the ring once more before it sleeps.

Everything read from a ring is untrusted: sizes are range-checked, types are plain integers the
dispatcher looks up, and no field is used as an index without a bound.

Why over 400 lines: this is the reference implementation of the whole protocol (send, drain,
the careful drain's recovery from abandoned and stale slots, the drop filters, the halt and
spin waits), the one _ring.c is checked against and the one that runs without it. Each part
reads the same header fields; split, they would each re-derive them. The byte layout is in
ring_layout.py; the C paths (ring_c.py) are bound over the methods of the same names by the
selector at the bottom (``use``), the only place here that knows whether C runs.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from partition import linux
from partition.abi import impl, ring_c
from partition.abi import layout as L
from partition.abi.constants import MAX_INSTANCES
from partition.abi.port import NO_DOORBELL, Port

# (the layout's names are re-exported: callers and tests take them from ring, as before)
from partition.abi.ring_layout import (  # noqa: F401
    _COUNTERS,
    _FILTER,
    _Q,
    _SLOT_HDR,
    _ZERO_HDR,
    ABANDONED,
    COUNTER_LIMIT,
    COUNTER_NAMES,
    COUNTERS,
    DOORBELL_NONE,
    DOORBELL_SIGNAL,
    DOORBELL_WAKE,
    DOORBELLS,
    DROPPED_FILTERED,
    FENCE,
    FILTER_AFTER,
    FILTER_MS,
    FILTERS,
    HEAD,
    IDLE,
    MODE,
    MODES,
    NFILTER,
    POLLING,
    REROUTE,
    S_CPU,
    S_SENDER,
    S_SIZE,
    S_TICKET,
    S_TYPE,
    SIGNALED,
    TAIL,
    RingError,
)

#: a Messenger's (waiting, responses): what a drain may match replies against in C
Replies = tuple[dict[int, int], dict[int, Any]]
#: which implementation this process uses ("c" or "python"), and whether a stale build was
#: refused (partition/abi/impl.py decides; benchmarks and .ci/run report it)
IMPLEMENTATION, STALE = impl.IMPLEMENTATION, impl.STALE


def _now_ms() -> int:
    """CLOCK_MONOTONIC in ms, low 32 bits: the clock _ring.c's filters are kept in."""
    return (time.monotonic_ns() // 1_000_000) & 0xFFFFFFFF


_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    """``n`` zero bytes, made once per size: a fresh ``bytes(n)`` of a ring's size is a new
    mapping whose every page faults when read, on the boot's clock (``reset``); a kept one's
    pages stay mapped (the zero page: no memory), in the host and in its forks."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


class Ring:
    """One instance's receive ring, seen from any process that maps the ring area."""

    def __init__(self, area: memoryview, area_address: int, layout: L.ArenaLayout,
                 instance_id: int) -> None:
        off = instance_id * layout.ring_bytes
        self.id = instance_id
        self.buf = area[off:off + layout.ring_bytes]
        self.addr = area_address + off
        self.nslots = layout.ring_slots
        self.slot_bytes = layout.ring_slot_bytes
        self.stride = layout.slot_stride
        # fair share: one sender holds at most 7/8 of the slots (rings of 8 or more)
        self.share = self.nslots - self.nslots // 8 if self.nslots >= 8 else self.nslots + 1
        self._pending_since: dict[int, float] = {}
        self._suspects: dict[tuple[int, int], tuple[int, int]] = {}  # (tag, type) -> (ms, n)

    # -- small accessors -------------------------------------------------------------------
    def _u64(self, off: int) -> int:
        return int.from_bytes(self.buf[off:off + 8], "little")

    def _put_u64(self, off: int, v: int) -> None:
        self.buf[off:off + 8] = v.to_bytes(8, "little")

    @property
    def head(self) -> int:
        return self._u64(HEAD)

    @property
    def tail(self) -> int:
        return self._u64(TAIL)

    def _slot(self, ticket: int) -> int:
        return L.RING_HEADER_BYTES + (ticket % self.nslots) * self.stride

    def set_polling(self, on: bool) -> None:
        if on:
            self.buf[POLLING] = 1
        else:
            # full barrier: our "not polling" must be visible before we look at the ring again
            word = self.addr + POLLING - (POLLING % 8)
            cur = self._u64(POLLING - (POLLING % 8))
            linux.exchange_u64(word, cur & ~0xFF)

    def set_mode(self, mode: str) -> None:
        self.buf[MODE:MODE + 4] = MODES[mode].to_bytes(4, "little")

    def counters(self) -> dict[str, int]:
        out = dict(zip(COUNTER_NAMES, _COUNTERS.unpack_from(self.buf, COUNTERS)))
        out["dropped_filtered"] = self._u64(DROPPED_FILTERED)
        return out

    def _bump(self, index: int, n: int = 1) -> None:
        off = COUNTERS + 8 * index
        self._put_u64(off, self._u64(off) + n)

    def reset(self) -> None:
        """Host, before the owner (re)boots: stale messages and dead claims are dropped."""
        self.buf[:] = _zeros(len(self.buf))
        self._pending_since.clear()
        self._suspects.clear()

    # -- healing: whoever can write a ring can write garbage into its header ---------------
    def header_problem(self) -> str | None:
        """What is wrong with the header, as its receiver checks it (None: nothing). Any
        instance can write here: a ``head`` behind ``tail`` or more than a ring ahead would
        refuse every sender (ENOSPC) or stall the drain for ever; counters near 2^64 and
        impossible filters are garbage someone wrote."""
        # tail first: only the receiver moves it (the caller is the receiver, with its own
        # drains held off), while senders only ever move head on, and never past tail + nslots
        tail = self._u64(TAIL)
        head = self._u64(HEAD)
        if head < tail or head - tail > self.nslots:
            return f"head {head} and tail {tail} are not a ring of {self.nslots} slots"
        mode = int.from_bytes(self.buf[MODE:MODE + 4], "little")
        if mode not in MODES.values():
            return f"mode {mode} is none of {sorted(MODES.values())}"
        if any(v > COUNTER_LIMIT for v in _COUNTERS.unpack_from(self.buf, COUNTERS)) or \
                self._u64(DROPPED_FILTERED) > COUNTER_LIMIT:
            return "a counter beyond 2^62: not counted, written"
        for _, tag, _, _, _ in self._filter_entries():
            if tag > MAX_INSTANCES:
                return f"a drop filter names sender {tag - 1}, which cannot exist"
            if tag == 1:
                return "a drop filter names the host, which no receiver ever filters"
        return None

    def heal(self, mode: str, polling: bool) -> None:
        """The receiver's answer to a bad header: everything in the ring is dropped, the header
        starts over (its mode and polling flag as the receiver set them). Senders in the middle
        of a send lose that message (its ticket no longer matches); nobody stays stuck."""
        self.reset()
        self.set_mode(mode)
        self.set_polling(polling)

    def stalled(self) -> int | None:
        """The ticket of an unpublished claim at the tail, where the drain waits (for at most
        ``abandon_after``), or None. Seen from outside by the host, which reports a ticket that
        stays there: on a busy ring a sender is often mid-write at the tail for a moment."""
        tail = self._u64(TAIL)
        head = self._u64(HEAD)
        if head == tail or head < tail or head - tail > self.nslots:
            return None
        return tail if self._u64(self._slot(tail) + S_SIZE) == 0 else None

    # -- sending ---------------------------------------------------------------------------
    def send(self, sender_id: int, sender_cpu: int, msg_type: int, data: bytes,
             counter: tuple[memoryview, int] | None = None) -> int:
        """Claim, fill, publish: the hot path, kept to a handful of buffer operations.
        ``counter`` (buffer, offset of a u64) counts the send just before it is published: the
        receiver may answer at once, and the answer must not be seen before the count.

        Returns the doorbell the sender must ring: DOORBELL_NONE (the receiver polls, or was
        already rung since its last drain: one doorbell per drain, as Linux raises one IPI for
        a queue that was empty), DOORBELL_WAKE (it sleeps: ring its doorbell) or
        DOORBELL_SIGNAL (it is busy: interrupt it)."""
        n = len(data)
        if n > self.slot_bytes or not n:
            self.refuse(errno.EMSGSIZE, n)
        buf = self.buf
        unpack = _Q.unpack_from
        if self._filtered(sender_id + 1, msg_type & 0xFFFFFFFF):
            if counter is not None:     # sent, as far as the sender can tell; dropped here
                cbuf, coff = counter
                _Q.pack_into(cbuf, coff, _Q.unpack_from(cbuf, coff)[0] + 1)
            return DOORBELL_NONE
        while True:
            h = unpack(buf, HEAD)[0]
            t = unpack(buf, TAIL)[0]
            if h - t >= self.nslots or (h - t >= self.share and self._held_by(sender_id, t, h)
                                        >= self.share):
                self.refuse(errno.ENOSPC, n)
            if linux.cas_u64(self.addr + HEAD, h, h + 1):
                break
        off = L.RING_HEADER_BYTES + (h % self.nslots) * self.stride
        _SLOT_HDR.pack_into(buf, off, sender_cpu, msg_type & 0xFFFFFFFF, sender_id + 1, 0, h)
        p = off + L.RING_SLOT_HEADER
        buf[p:p + n] = data
        if counter is not None:
            cbuf, coff = counter
            _Q.pack_into(cbuf, coff, _Q.unpack_from(cbuf, coff)[0] + 1)
        _Q.pack_into(buf, off + S_SIZE, n)          # publish last
        # the doorbell decision, as in _ring.c: a full barrier first (an exchange on a
        # word of its own), so that no flag is read before the publish is visible
        linux.exchange_u64(self.addr + FENCE, 0)
        if buf[POLLING]:
            return DOORBELL_NONE
        if linux.exchange_u64(self.addr + SIGNALED, 1):
            return DOORBELL_NONE
        linux.add_u64(self.addr + DOORBELLS, 1)
        return DOORBELL_WAKE if buf[IDLE] else DOORBELL_SIGNAL

    def sender(self, sender_id: int, sender_cpu: int,
               counter: tuple[memoryview, int] | None = None,
               doorbell: tuple[int, int, int] | None = None) -> Callable[[int, bytes], int]:
        """``send`` with everything but the type and the bytes bound once, for a hot sender:
        ``f(msg_type, data)`` returns the doorbell as a negative number (0, -1 wake,
        -2 signal) or an errno (> 0: ENOSPC, EMSGSIZE) without raising; ``refuse(rc, n)``
        turns the latter into the RingError ``send`` would have raised.

        ``doorbell`` = (wake_fd, signal_pidfd, signo): the bound send rings the doorbell itself
        (writes ``wake_fd`` for a halted receiver, sends ``signo`` through the pidfd
        ``signal_pidfd`` for a busy one; 0: always ``wake_fd``, the host's way; below 0: no
        signal), and a negative answer then means the doorbell could not be rung and is the
        caller's to ring."""
        return Port(self, sender_id, sender_cpu, counter, doorbell or NO_DOORBELL, None)

    def port(self, sender_id: int, sender_cpu: int, counter: tuple[memoryview, int] | None,
             doorbell: tuple[int, int, int], entry: tuple[Any, int, int, int] | None) -> Any:
        """A ``_fastring.Port`` to this ring (``sender`` as one C object that also encodes the
        message in place, see _port.c), or None without the C ring. ``entry`` = (peer
        table, offset of the target's (state, pid), state, pid): each send checks it first
        and answers REROUTE instead of sending when it changed; None: no check."""
        return None

    def _held_by(self, sender_id: int, t: int, h: int) -> int:
        """Slots in [t, h) claimed by ``sender_id`` (for the fair share, as _ring.c)."""
        mark = (sender_id + 1).to_bytes(4, "little")
        return sum(1 for k in range(t, h)
                   if self.buf[self._slot(k) + S_SENDER:self._slot(k) + S_SENDER + 4] == mark)

    def refuse(self, code: int, n: int) -> None:
        """Raise the RingError for a refused send (``code``: ENOSPC or EMSGSIZE)."""
        if code == errno.ENOSPC:
            raise RingError(errno.ENOSPC, f"IPI ring of instance {self.id} is full "
                                          f"({self.nslots} slots)")
        raise RingError(errno.EMSGSIZE, f"message of {n} bytes does not fit a "
                                        f"{self.slot_bytes}-byte IPI slot")

    # -- drop filters (see _ring.c: a flood of junk is dropped at its sender) ---------------
    def _filter_entries(self) -> list[tuple[int, int, int, int, int]]:
        """(offset, sender + 1, type, until ms, hits) of each entry of the table, free ones
        (sender + 1 == 0) included."""
        out = []
        for off in range(FILTERS, FILTERS + 16 * NFILTER, 16):
            tag, _, mtype, until, hits = _FILTER.unpack_from(self.buf, off)
            out.append((off, tag, mtype, until, hits))
        return out

    def filters(self) -> list[dict[str, int]]:
        """The filters in force: sender id, type, and the drops since the receiver last looked
        (values as read from shared memory: for display only). A filter stays in force until
        its receiver looks and finds it idle for FILTER_MS, so a sleeping receiver's filter
        keeps dropping."""
        return [{"sender": tag - 1, "type": mtype, "drops_unreviewed": hits}
                for _, tag, mtype, _, hits in self._filter_entries() if tag]

    def _filtered(self, tag: int, mtype: int) -> bool:
        """Sender: is (tag, type) filtered here? Then count the drop (atomically). The host
        (tag 1) never is: a filter naming it can only have been forged by a peer."""
        if tag == 1:
            return False
        for off, ftag, ftype, _, _ in self._filter_entries():
            if ftag == tag and ftype == mtype:
                linux.add_u32(self.addr + off + 12, 1)
                linux.add_u64(self.addr + DROPPED_FILTERED, 1)
                return True
        return False

    def _review_filters(self, now: int) -> None:
        """Receiver: renew the filters that dropped something since the last look; clear the
        ones whose time is up (or is a time we never wrote)."""
        for off, tag, _, until, _ in self._filter_entries():
            if not tag:
                continue
            if linux.exchange_u32(self.addr + off + 12, 0):
                struct.pack_into("<I", self.buf, off + 8, (now + FILTER_MS) & 0xFFFFFFFF)
                continue
            left = (until - now + (1 << 31)) % (1 << 32) - (1 << 31)
            if left <= 0 or left > 100 * FILTER_MS:
                struct.pack_into("<H", self.buf, off, 0)

    def _add_filter(self, tag: int, mtype: int, now: int) -> None:
        """Receiver: filter (tag, type); one already in force is renewed, not duplicated (junk
        sent before the filter was visible still reaches the ring and is tallied again)."""
        entries = self._filter_entries()
        for off, ftag, ftype, _, _ in entries:
            if ftag == tag and ftype == mtype:
                struct.pack_into("<I", self.buf, off + 8, (now + FILTER_MS) & 0xFFFFFFFF)
                return
        for off, ftag, _, _, _ in entries:
            if not ftag:
                struct.pack_into("<III", self.buf, off + 4, mtype,
                                 (now + FILTER_MS) & 0xFFFFFFFF, 0)
                struct.pack_into("<H", self.buf, off, tag)      # the entry is live from here
                return

    def _tally(self, tag: int, mtype: int, n: int, now: int) -> bool:
        """Receiver: count ``n`` more unhandled messages of (tag, type); True when they reached
        FILTER_AFTER within FILTER_MS (then the tally starts again)."""
        key = (tag, mtype)
        since, count = self._suspects.get(key, (now, 0))
        if (now - since) & 0xFFFFFFFF > FILTER_MS:
            since, count = now, 0
        count += n
        if count >= FILTER_AFTER:
            self._suspects.pop(key, None)
            return True
        if len(self._suspects) >= 8 and key not in self._suspects:
            self._suspects.pop(min(self._suspects, key=lambda k: self._suspects[k][0]))
        self._suspects[key] = (since, count)
        return False

    def unfilter_type(self, mtype: int) -> None:
        """Receiver: it handles ``mtype`` now; no filter may drop it any more."""
        for off, tag, ftype, _, _ in self._filter_entries():
            if tag and ftype == mtype:
                struct.pack_into("<H", self.buf, off, 0)

    # -- receiving -------------------------------------------------------------------------
    def idle_enter(self) -> bool:
        """Announce "idle" (with a full barrier), then say whether a published message already
        waits: paired with the barrier in ``send``, no wake-up is lost before the sleep."""
        linux.exchange_u64(self.addr + IDLE, 1)      # IDLE's u32 and the unused one after it
        linux.exchange_u64(self.addr + SIGNALED, 0)  # re-arm the doorbell (see _ring.c)
        return self.pending()

    def idle_leave(self) -> None:
        self.buf[IDLE] = 0

    def receiver_idle(self) -> bool:
        """Whether the receiver says it sleeps on its doorbell (its word: for display)."""
        return bool(self.buf[IDLE])

    def spin(self, usec: float) -> bool:
        """Busy-wait up to ``usec`` microseconds for a claimed slot (the Python ring's poller
        wait). Python only: with the C ring a poller spins inside ``poller()``, and a C spin of
        its own had no caller outside the tests."""
        end = time.monotonic() + usec / 1e6
        buf, unpack = self.buf, _Q.unpack_from
        while unpack(buf, HEAD)[0] == unpack(buf, TAIL)[0]:
            if time.monotonic() >= end:
                return False
        return True

    def poll(self, usec: float, deliver: Callable[[int, int, int, bytes], bool],
             limit: int = 64, abandon_after: float = 1.0,
             handled: bytes | bytearray | None = None, hush: bool = False,
             replies: Replies | None = None) -> int | None:
        """``spin`` then ``drain``: None when nothing was claimed within ``usec``
        microseconds, else what ``drain`` returns. (With the C ring a poller takes
        ``poller()``, both in one call.)"""
        if not self.spin(usec):
            return None
        return self.drain(deliver, limit, abandon_after, handled, hush, replies)

    def poller(self) -> Callable[..., Any] | None:
        """``poll``'s C half with the ring bound once, for a poller's hot wait:
        ``f(usec, limit, handled, deliver, hush, replies)`` answers as _fastring.poll does (None,
        or drain's (delivered, more, consumed); with ``more`` the caller goes on with
        ``finish``). None without the C ring."""
        return None

    def waiter(self, limit: int, handled: bytes | bytearray,
               deliver: Callable[[int, int, int, bytes], bool], replies: Replies, owner: Any,
               waiting: dict[int, int], doorbell_fd: int = -1) -> Any:
        """A poller's whole wait with everything bound once (the C half's Waiter):
        ``w(timeout_s)`` spins up to min(50 us, timeout) and drains, and ``w.spin(usec)``
        spins up to ``usec`` and drains (None: nothing came); ``owner._in_drain`` is raised
        meanwhile, ``handled`` passed only while ``waiting`` is empty, and a drain that stops
        at a slot for the careful path goes on with ``finish``. With ``doorbell_fd`` (an
        interrupt-mode kernel's own end) its waits halt on it as ``halt`` does, for as long
        as they are given. Its ``ask`` and ``request`` are a request's fast path
        (Messenger.use_asker). None without the C ring (the runtime's Python waits do the
        same)."""
        return None

    def finish(self, fast: tuple[int, int, int], limit: int, handled: bytes | bytearray | None,
               deliver: Callable[[int, int, int, bytes], bool],
               abandon_after: float = 1.0) -> int:
        """After a C drain that stopped at a slot it leaves to the careful path: go on there."""
        return self._rest(fast, limit, abandon_after, handled, deliver)

    def pending(self) -> bool:
        t = self.tail
        return t != self.head and self._u64(self._slot(t) + S_SIZE) != 0

    def drain(self, deliver: Callable[[int, int, int, bytes], bool], limit: int = 64,
              abandon_after: float = 1.0, handled: bytes | bytearray | None = None,
              hush: bool = False, replies: Replies | None = None) -> int:
        """Hand up to ``limit`` published slots to ``deliver(type, sender_id, sender_cpu,
        payload)``, which returns False for a type nobody handles (dropped, counted). Returns
        how many slots were consumed, dropped ones included. ``handled``: a bitmap of the types
        someone handles (bit t of byte t >> 3; types past its end count as handled), given when
        nothing else can be awaited; other types are dropped and counted, not handed up.
        ``hush``: no doorbells while this drain consumes and delivers (see _ring.c; the
        C path only: the Python ring rings as usual). ``replies`` = (waiting, responses), the
        Messenger's: the C path matches responses itself, as ``deliver`` would."""
        linux.exchange_u64(self.addr + SIGNALED, 0)     # as the C drain does first
        return self._careful(limit, abandon_after, handled, deliver)

    def halt(self, doorbell_fd: int, timeout: float,
             deliver: Callable[[int, int, int, bytes], bool], limit: int = 64,
             handled: bytes | bytearray | None = None, abandon_after: float = 1.0,
             hush: bool = False, replies: Replies | None = None) -> int | None:
        """The receiver's whole interrupt-mode wait: clear the doorbell, announce idle, sleep
        on the doorbell (unless a message already waits) up to ``timeout`` seconds, leave
        idle, drain as ``drain`` does. None: the wait timed out, nothing was taken. The
        doorbell must be non-blocking: an instance's own end (linux.doorbell), or an eventfd."""
        linux.doorbell_clear(doorbell_fd)
        rung = self.idle_enter()
        try:
            if not rung:
                rung = linux.wait_readable(doorbell_fd, timeout)
        except InterruptedError:            # (PEP 475 retries; a handler may raise instead)
            rung = True
        finally:
            self.idle_leave()
        return self.drain(deliver, limit, abandon_after, handled, hush) if rung else None

    def _rest(self, fast: tuple[int, int, int], limit: int, abandon_after: float,
              handled: bytes | bytearray | None,
              deliver: Callable[[int, int, int, bytes], bool]) -> int:
        """After a C drain (delivered, more, consumed): where it stopped at a slot it leaves to
        the reference (unpublished, abandoned, bad), the careful path goes on."""
        _, more, consumed = fast
        if more and consumed < limit:
            consumed += self._careful(limit - consumed, abandon_after, handled, deliver)
        return consumed

    def _careful(self, limit: int, abandon_after: float,
                 handled: bytes | bytearray | None,
                 deliver: Callable[[int, int, int, bytes], bool]) -> int:
        """The reference drain: every case of the protocol (unpublished, abandoned, bad size,
        stale ticket). Each slot is consumed and counted before it is given to ``deliver``:
        a handler's reply can reach the host at once, and
        whoever acts on it must see the count; and a handler that waits (a request from inside
        a handler) drains on from the ring, in order. An Exception from ``deliver`` is raised
        after the rest is delivered; a BaseException at once. Returns slots consumed."""
        buf = self.buf
        unpack = _Q.unpack_from
        nslots, stride, cap = self.nslots, self.stride, self.slot_bytes
        t = unpack(buf, TAIL)[0]
        if self._pending_since:               # claims seen unpublished, consumed since
            for k in [k for k in self._pending_since if k < t]:
                del self._pending_since[k]
        done = 0
        per_kind: dict[tuple[int, int], int] = {}   # unhandled messages per (sender + 1, type)
        failure: Exception | None = None
        while done < limit:
            t = unpack(buf, TAIL)[0]            # (a handler's nested drain may have moved it)
            if t == unpack(buf, HEAD)[0]:
                break
            off = L.RING_HEADER_BYTES + (t % nslots) * stride
            # size first, the rest after: a sender may be writing this slot right now, and
            # only fields read *after* a published size are the ones it wrote before it
            size = unpack(buf, off + S_SIZE)[0]
            cpu, mtype, sender, _, ticket = _SLOT_HDR.unpack_from(buf, off)
            item = None
            drop = 0                # the counter a dropped slot goes to (COUNTER_NAMES index)
            if size == 0:
                if not self._abandoned(t, off, abandon_after):
                    break
                drop = 3                                    # dropped_abandoned
            elif size == ABANDONED:
                drop = 3
            elif size > cap or ticket != t:
                drop = 1                                    # dropped_bad_size
            elif handled is not None and mtype < 8 * len(handled) and \
                    not handled[mtype >> 3] >> (mtype & 7) & 1:
                drop = 2                                    # dropped_unknown_type
                per_kind[(sender, mtype)] = per_kind.get((sender, mtype), 0) + 1
            else:
                p = off + L.RING_SLOT_HEADER
                item = (mtype, sender - 1, cpu, bytes(buf[p:p + size]))
            buf[off:off + L.RING_SLOT_HEADER] = _ZERO_HDR
            if self._pending_since:
                self._pending_since.pop(t, None)
            _Q.pack_into(buf, TAIL, t + 1)          # the slot is free from here on
            done += 1
            if drop in (0, 2):
                self._bump(0)                       # received: every well-formed message
            if drop:
                self._bump(drop)
            if item is None:
                continue
            try:
                if not deliver(*item):
                    self._bump(2)
            except Exception as exc:      # the rest first; a BaseException goes at once
                failure = failure or exc
        if per_kind or any(tag for _, tag, _, _, _ in self._filter_entries()):
            now = _now_ms()             # as _ring.c: review, then add
            self._review_filters(now)
            for (tag, mtype), n in per_kind.items():
                if self._tally(tag, mtype, n, now):
                    self._add_filter(tag, mtype, now)
        if failure is not None:
            raise failure
        return done

    def _abandoned(self, ticket: int, off: int, abandon_after: float) -> bool:
        """A claim still unpublished ``abandon_after`` seconds after the drain first met it is
        dropped, whoever claimed it: its claimer died, or is hostile and wrote some other
        sender's id (a live one, whose claims the host never sweeps), or stalled. The host
        sweeps the claims of senders it saw die at once (ABANDONED); time settles the rest."""
        first = self._pending_since.setdefault(ticket, time.monotonic())
        return time.monotonic() - first > abandon_after

    def abandon_claims_of(self, sender_id: int) -> int:
        """Host, after ``sender_id`` died: mark its unpublished slots so receivers drop them."""
        n = 0
        t, h = self.tail, self.head
        for ticket in range(t, min(h, t + self.nslots)):
            off = self._slot(ticket)
            if self._u64(off + S_SIZE) == 0 and \
                    int.from_bytes(self.buf[off + S_SENDER:off + S_SENDER + 4], "little") == sender_id + 1:
                self._put_u64(off + S_SIZE, ABANDONED)
                n += 1
        return n


# -- the selector: Ring's hot paths bound once, to the C half or to the reference above -------
_REFERENCE = {name: Ring.__dict__[name] for name in ring_c.PATHS}


def use(fast: ModuleType | None) -> str:
    """Bind Ring's hot paths (ring_c.PATHS) to the C extension ``fast`` (impl.FAST) or, for
    None, to the reference methods above; every Ring, made before or after, takes them. Done
    once at import; the tests call it to drive both. Returns the implementation now bound."""
    ring_c.fast = fast
    for name in ring_c.PATHS:
        setattr(Ring, name, ring_c.PATHS[name] if fast is not None else _REFERENCE[name])
    return "c" if fast is not None else "python"


use(impl.FAST)
