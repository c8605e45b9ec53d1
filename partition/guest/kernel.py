"""The kernel author's API: subclass ``Kernel``, override ``boot``/``tick``/``shutdown``.

A kernel runs as the only code of its instance process, pinned to its CPUs, with exactly three
windows on the arena: its own partition (``self.memory``), its console (``printk``) and the shared
control area. The main loop is deliberately simple so that what the emulator measures is the
kernel's work and not a framework: ``tick`` does one unit of work and says whether there was any;
when there was none, the instance idles on its doorbell (the emulated HLT) until something rings
it or ``idle_timeout`` passes. A kernel with ``idle_timeout = None`` is tickless: nothing but a
doorbell wakes it, so an idle instance costs no CPU at all (511 of them on two CPUs once took a
twelfth of the machine, waking once a second each); its heartbeats then come only while it runs,
and a host watchdog rings it before it calls a quiet kernel hung (docs/faults.md).

Guarantees the loop gives a kernel:
- ``boot`` runs once, after pinning and mapping, before the first ``tick``;
- ``shutdown`` runs on a graceful halt (``mkctl kill`` without ``--force``), never on a forced one;
- an exception escaping any hook is a kernel panic: the traceback goes to the console, the
  reason to the control slot, and the host records it.
"""

from __future__ import annotations

import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from partition import linux
from partition.abi import layout as L
from partition.abi import message as M
from partition.abi import slot as S
from partition.abi.console import ConsoleWriter
from partition.abi.constants import DEFAULT_HEAP, IPI_SIGNAL
from partition.abi.ring import RingError
from partition.guest import probes as P
from partition.guest.endpoint import Endpoint, PeerTable
from partition.units import parse_size

__all__ = ["IPI_SIGNAL", "Kernel", "KernelContext", "KernelPanic", "RefuseResource", "parse_cmdline"]


#: how often the main loop checks its own ring's header (check_ring)
RING_CHECK_S = 0.1
#: a tickless kernel's wait (``idle_timeout = None``) as the wait calls take it: a safety net
#: of an hour, never a tick
TICKLESS_S = 3600.0
#: the main loop's bookkeeping (its progress count, heartbeats, the ring check) runs at most
#: this often: every iteration, it cost a poll-mode round trip a third of a microsecond
CHORES_S = 0.001



class KernelPanic(BaseException):
    """Raised by ``Kernel.panic``; BaseException so that a kernel's ``except Exception`` cannot
    swallow its own panic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RefuseResource(Exception):
    """Raised by an ``on_cpu_*``/``on_memory_*`` hook to refuse a runtime resource change; the
    host rolls the whole transaction back. The message travels in the RES_ACK as the reason."""


@dataclass
class KernelContext:
    """What the trampoline hands a kernel at boot (its boot manifest, like /chosen)."""

    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    cmdline: str
    memory_base: int
    memory: memoryview
    console: ConsoleWriter
    own: S.OwnPage                      # its own page of the control area
    doorbell_fd: int
    host_doorbell_fd: int
    oversubscribed: bool
    boot_generation: int
    layout: Any = None                  # ArenaLayout
    peers: memoryview | None = None     # the host's peer table, read-only
    channel: socket.socket | None = None  # asks the host for peers' doorbells
    rings: memoryview | None = None     # the whole ring area
    rings_address: int = 0
    arena_all: memoryview | None = None  # the whole arena: only on machines without protection
    table: memoryview | None = None     # the host's instance table, read-only (peer names)


def parse_cmdline(cmdline: str) -> dict[str, str]:
    """``a=1 quiet b=x`` -> {'a': '1', 'quiet': '', 'b': 'x'}: the usual kernel convention."""
    out: dict[str, str] = {}
    for word in cmdline.split():
        k, _, v = word.partition("=")
        out[k] = v
    return out


def heap_of(cmdline: str) -> int:
    """The kernel's private heap: ``mk_heap=`` on its cmdline, else DEFAULT_HEAP (InvalidSpec
    for a size that does not parse). The trampoline's RLIMIT_AS and the host's memory cgroup
    limit both come from here."""
    text = parse_cmdline(cmdline).get("mk_heap")
    return parse_size(text, "mk_heap") if text else DEFAULT_HEAP


class Kernel:
    """Base class of every kernel image."""

    #: longest idle wait between two ticks, in seconds (the kernel's timer tick when idle);
    #: None: tickless, only a doorbell ends the wait
    idle_timeout: float | None = 0.5
    #: IPI delivery: "interrupt" (block on the doorbell), "poll" (spin on the ring), "hybrid"
    #: (spin ``spin_us`` then block); the cmdline's ``mk_mode=`` overrides it
    mode: str = "interrupt"
    spin_us: float = 50.0
    #: seconds between HEARTBEAT messages to the host; None: none
    heartbeat_interval: float | None = 1.0

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx
        self._halting = False
        self._halt_reason = ""
        self._graceful = False
        self._in_drain = False
        self._booted = False       # messages wait in the ring until boot() registered handlers
        self.mode = self.params.get("mk_mode", self.mode)
        if self.mode not in ("interrupt", "poll", "hybrid"):
            raise ValueError(f"mk_mode must be interrupt, poll or hybrid, not {self.mode!r}")
        assert ctx.peers is not None and ctx.rings is not None
        self.endpoint = Endpoint(
            ctx.id, ctx.physical_cpus[0], ctx.rings, ctx.rings_address, ctx.layout,
            PeerTable(ctx.peers, ctx.own, ctx.host_doorbell_fd, ctx.channel),
            sent_counter=(ctx.own.buf, ctx.own.base + S.OWN_IPI_SENT))
        self.messenger = self.endpoint.messenger
        self._deliver = self.messenger.deliver       # bound once: poll_ipis is the hot loop
        # the C drain matches responses to our requests and dispatches handled messages itself,
        # as deliver would (deliver stays the careful path's)
        self._replies = self.endpoint.drain_state()
        self.messenger.register(M.MK_MSG_SHUTDOWN, self._on_shutdown)
        self.messenger.register(M.MK_EMU_FAULT, self._on_fault)
        for op in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE, M.MK_MSG_MEM_ADD, M.MK_MSG_MEM_REMOVE,
                   M.MK_MSG_QUERY):
            self.messenger.register(op, self._on_resource)
        #: memory added at run time (base, size): announced, not mapped (docs/kerf.md)
        self.added_memory: list[tuple[int, int]] = []
        #: this halt hands over to a new image (a live update): shutdown() may kho_preserve
        self.handing_over = False
        self.probes = P.ProbeHandlers(self)         # answers pings; runs probes it is given
        self.ring = self.endpoint.ring_of(ctx.id)
        self.ring.set_mode(self.mode)
        self.ring.set_polling(self.mode != "interrupt")
        self._poller = self.ring.poller()       # poll and hybrid: spin and drain, one C call
        self._wait = self._wait_ipi             # bound once: every request passes it
        self._next_heartbeat = time.monotonic() + (self.heartbeat_interval or 0)  # one interval in
        self._hlt: select.poll | None = None     # the doorbell's poll object, made on first idle
        self._next_ring_check = 0.0
        # the last host command obeyed (host_command): a run starts past its predecessors'
        self._peers = ctx.peers             # the host's peer table (read-only)
        self._last_command = S.peer_of(ctx.peers, ctx.id).cmd_seq
        self._progress_at = ctx.own.base + S.OWN_PROGRESS       # the loop's two fields: its own
        self._force_halt_at = ctx.id * S.PEER_BYTES + S.PEER_FORCE_HALT  # and the host's word

    # -- identity and resources ------------------------------------------------------------
    @property
    def id(self) -> int:
        return self.ctx.id

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def cpus(self) -> list[int]:
        """Host (logical) CPU numbers this instance is pinned to; the first is the boot CPU."""
        return list(self.ctx.cpus)

    @property
    def physical_cpus(self) -> list[int]:
        """Physical (APIC) ids of ``cpus``, what messages carry (arch_cpu_physical_id)."""
        return list(self.ctx.physical_cpus)

    @property
    def memory(self) -> memoryview:
        """The instance's partition; offset 0 is physical address ``memory_base``."""
        return self.ctx.memory

    def peer_id(self, name: str) -> int | None:
        """The id of the instance called ``name`` (0 for "host"), from the host's instance
        table; None if there is none. Ids are the host's to give (scenarios: ``id =``)."""
        if name == "host":
            return 0
        table = self.ctx.table
        if table is None:
            return None
        want = name.encode()[:L.NAME_BYTES]
        for iid in range(1, len(table) // L.TABLE_RECORD_BYTES):
            state, rid, raw = L.TABLE_RECORD.unpack_from(table, iid * L.TABLE_RECORD_BYTES)[:3]
            if state and rid == iid and raw.rstrip(b"\0") == want:
                return iid
        return None

    def metric(self, name: str, value: float) -> None:
        """Publish a number: ``mkctl show``/``top``, a scenario's report and its ``expect``
        read it (``client.errors == 0``). Up to 16 names of 1-23 printable characters; a name
        published again is updated."""
        import math
        if not (isinstance(name, str) and 0 < len(name) < 24
                and all(32 < ord(c) < 127 for c in name)):
            raise ValueError("a metric name is 1-23 printable ASCII characters")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"metric {name!r}: {value!r} is not a finite number")
        self.ctx.own.set_metric(name, v)

    @property
    def cmdline(self) -> str:
        return self.ctx.cmdline

    @property
    def params(self) -> dict[str, str]:
        return parse_cmdline(self.ctx.cmdline)

    @property
    def halting(self) -> bool:
        return self._halting

    # -- hooks -----------------------------------------------------------------------------
    def boot(self) -> None:
        """Called once after the trampoline handed over; set up state in ``self.memory``."""

    def tick(self) -> bool:
        """Do one unit of work; return True if there was work (the loop then ticks again at
        once), False to idle until the doorbell rings or ``idle_timeout`` passes."""
        return False

    def shutdown(self) -> None:
        """Graceful halt requested by the host: flush state, the process exits afterwards."""

    # runtime resource changes (kerf update, mkctl update): each is asked before the host moves
    # anything; return normally to accept, raise RefuseResource("why") to refuse (the host then
    # rolls the whole change back). CPUs are physical (APIC) ids, as the messages carry them.
    def on_cpu_add(self, cpus: list[int]) -> None:
        """CPU_ADD: these CPUs join the instance (the host pins it to them after the ack)."""

    def on_cpu_remove(self, cpus: list[int]) -> None:
        """CPU_REMOVE: stop using these CPUs; the host unpins them after the ack."""

    def on_memory_add(self, base: int, size: int) -> None:
        """MEM_ADD: [base, base+size) becomes the instance's (reserved and accounted; a running
        kernel cannot map it in the emulator: see docs/kerf.md)."""

    def on_memory_remove(self, base: int, size: int) -> None:
        """MEM_REMOVE: [base, base+size) leaves the instance; the host scrubs it."""

    # -- services --------------------------------------------------------------------------
    def printk(self, message: str) -> None:
        self.ctx.console.printk(message)

    def panic(self, reason: str) -> NoReturn:
        raise KernelPanic(str(reason))

    def halt(self, reason: str = "voluntary halt") -> None:
        """Leave the main loop after the current tick and exit cleanly (state -> loaded)."""
        self._halting = True
        self._halt_reason = reason

    def _idle_s(self) -> float:
        """The idle wait in seconds: ``idle_timeout``, or TICKLESS_S for a tickless kernel."""
        t = self.idle_timeout
        return TICKLESS_S if t is None else t

    def idle(self, timeout: float | None = None) -> bool:
        """The emulated HLT: block on the doorbell. Returns True if it was rung.

        Order: clear the doorbell, announce idle, look at the ring once more, sleep; a sender
        that publishes after that look sees us idle and rings, so no wake-up is lost. Clearing
        before the sleep rather than after the wake keeps a read(2) off the path from a
        wake-up to the work it brings (interrupt round trip, median of 3x2 cells: 1.27x the
        raw eventfd baseline against 1.32x). The poll object is made once; waits shorter than
        2 ms use select(2), since poll(2) rounds its timeout up to a whole millisecond."""
        t = self._idle_s() if timeout is None else timeout
        fd = self.ctx.doorbell_fd
        linux.doorbell_clear(fd)    # clear the doorbell now, before sleeping, not after waking
        ring = self.ring
        if ring.idle_enter():       # halted: senders ring our doorbell; a message already
            ring.idle_leave()       # there: no sleep
            return True
        if self._hlt is None:
            self._hlt = select.poll()
            self._hlt.register(fd, select.POLLIN)
        try:
            if t >= 0.002:
                rung = bool(self._hlt.poll(t * 1000.0))
            else:       # poll(2) counts whole milliseconds; a timer this short needs select(2)
                rung = linux.wait_readable(fd, t)
        finally:
            ring.idle_leave()
        return rung

    # -- IPIs and messages -----------------------------------------------------------------
    def register_handler(self, msg_type: int, handler: Callable[[M.Message], Any]) -> None:
        """One handler per type; a second registration raises RingError(EEXIST). A handler's
        return value is the response when the message was a request."""
        self.messenger.register(msg_type, handler)
        self.ring.unfilter_type(msg_type)   # a drop filter set while nobody handled it

    def send_ipi_data(self, target: int, msg_type: int, payload: Any = None,
                      subtype: int = 0) -> int:
        """Send one message to instance ``target`` (0 = host). Raises RingError with ENOSPC
        (ring full), EMSGSIZE (too large) or ESRCH (target not active). Returns the msg_id."""
        return self.messenger.send(target, msg_type, payload, subtype)

    send = send_ipi_data

    def send_many(self, target: int, msg_type: int, payloads: list[Any]) -> int:
        """Send one message per payload to ``target``, in order, as far as its ring has room;
        returns how many went (the rest: retry them after draining, as after ENOSPC). Each
        message is published as soon as it is written, as ``send`` would; the batch saves the
        Python of a call per message (a stream's sender). Raises RingError with ESRCH
        (target not active) or EMSGSIZE (a payload too large: those before it went)."""
        return self.messenger.send_many(target, msg_type, payloads)

    def request(self, target: int, msg_type: int, payload: Any = None,
                timeout: float = 10.0) -> Any:
        """Send a request and wait for its response (RingError ETIMEDOUT after ``timeout``)."""
        return self.messenger.request(target, msg_type, payload, timeout, self._wait)

    def poll_ipis(self, limit: int = 64) -> int:
        """Deliver up to ``limit`` pending messages now; returns how many. Inside a drain (the
        IPI signal arriving while handlers run) it does nothing: that drain goes on anyway."""
        return 0 if self._in_drain else self._take(limit)

    def _on_ipi(self, signum: int, frame: object) -> None:
        """The interrupt: drain between two bytecodes, and wake an idle wait."""
        if self._booted:
            self.poll_ipis()
        linux.ring_doorbell(self.ctx.doorbell_fd)

    def _wait_ipi(self, timeout: float) -> int:
        """Wait for messages and deliver them; returns how many slots it consumed (0: none
        came). Callers have just drained, and each branch looks at the ring before it waits
        (spin returns at once on a claimed slot, halt on a published one), so there is no
        drain up front.

        A handler may wait too (a request from inside a handler): then this drains on from
        inside the outer drain, in ring order, and other handlers may run meanwhile, as they
        would on a kernel that takes interrupts while one of its handlers sleeps. Only the
        IPI signal's own drain stays out of a drain (``_in_drain``)."""
        if self.mode == "poll":
            # spin on the ring's head, bounded so that the caller's loop (deadlines, halting,
            # heartbeats) still comes round at least every 50 us; then drain, in the same call.
            # _spin_take's C case inlined: this is every poll-mode request's wait
            poller = self._poller
            if poller is None:
                return self._spin_take(min(50.0, timeout * 1e6)) or 0
            outer = self._in_drain
            self._in_drain = True
            try:
                msgr = self.messenger
                handled = None if msgr.waiting else msgr.handled
                got = poller(min(50.0, timeout * 1e6), 64, handled, self._deliver, True,
                             self._replies)
                if got is None or not got[1]:
                    return got[2] if got else 0
                return self.ring.finish(got, 64, handled, self._deliver)
            finally:
                self._in_drain = outer
        if self.mode == "hybrid":
            took = self._spin_take(self.spin_us)
            if took is not None:
                return took
            self.ring.set_polling(False)
            try:
                rung = self.ring.pending() or self.idle(min(timeout, self._idle_s()))
            finally:
                self.ring.set_polling(True)
            return self._take() if rung else 0
        # the emulated HLT and the drain after it in one call (Ring.halt): between a wake-up
        # and the work it brings there is no Python but the handlers' own
        outer = self._in_drain
        self._in_drain = True
        try:
            msgr = self.messenger
            return self.ring.halt(self.ctx.doorbell_fd, min(timeout, self._idle_s()),
                                  self._deliver, 64, None if msgr.waiting else msgr.handled,
                                  1.0, True, self._replies) or 0
        finally:
            self._in_drain = outer

    def _spin_take(self, usec: float) -> int | None:
        """Spin up to ``usec`` microseconds for a message, then drain: None if none came."""
        outer = self._in_drain
        self._in_drain = True
        try:
            msgr = self.messenger
            handled = None if msgr.waiting else msgr.handled
            poller = self._poller
            if poller is None:
                return self.ring.poll(usec, self._deliver, 64, 1.0, handled, True,
                                      self._replies)
            got = poller(usec, 64, handled, self._deliver, True, self._replies)
            if got is None or not got[1]:
                return got and got[2]
            return self.ring.finish(got, 64, handled, self._deliver)
        finally:
            self._in_drain = outer

    def _take(self, limit: int = 64) -> int:
        """The drain: from the loop, from a waiter, also from inside a handler (a request a
        handler makes drains on from there)."""
        outer = self._in_drain
        self._in_drain = True
        try:
            msgr = self.messenger       # no request pending: unhandled types die in the ring
            # hush: no doorbells for what this drain takes anyway (it looks again before it
            # returns, so nothing is left unrung)
            return self.ring.drain(self._deliver, limit, 1.0,
                                   None if msgr.waiting else msgr.handled, True, self._replies)
        finally:
            self._in_drain = outer

    def host_command(self, msg: M.Message) -> Any:
        """The body of a host command (abi/message.py HOST_COMMANDS), or ``M.NOT_FROM_HOST``.

        Any instance can write a message into this kernel's ring, the sender id included; the
        host alone can write the peer table. So a command is obeyed only when the host's peer
        entry for this instance publishes its digest: its number is new, within the last
        ``COMMAND_WINDOW``, and type, number and body hash to what the host wrote. Anything
        else is counted (``forged_commands`` in the own page) and said on the console."""
        p = msg.payload
        peer = S.peer_of(self._peers, self.ctx.id)
        if msg.sender == 0 and isinstance(p, dict) and \
                isinstance(p.get("seq"), int) and set(p) == {"seq", "body"}:
            seq, last = p["seq"], peer.cmd_seq
            if self._last_command < seq <= last and last - seq < S.COMMAND_WINDOW and \
                    peer.digest(seq) == M.command_digest(seq, self.ctx.boot_generation,
                                                         msg.msg_type, p["body"]):
                self._last_command = seq
                return p["body"]
        S.bump(self.ctx.own.buf, self.ctx.own.base + S.OWN_FORGED_COMMANDS)
        self.printk(f"ipi: a command of type {msg.msg_type:#x} not from the host, ignored "
                    f"(claimed sender {msg.sender})")
        return M.NOT_FROM_HOST

    def _on_fault(self, msg: M.Message) -> None:
        from partition.guest import faults
        p = self.host_command(msg)
        if p is M.NOT_FROM_HOST or not isinstance(p, dict):
            return
        faults.carry_out(self, str(p.get("kind")), dict(p.get("options") or {}))

    def poke(self, phys: int, data: bytes) -> None:
        """Write ``data`` at physical address ``phys``, through this kernel's page tables: its
        own partition always; any address when the machine runs without protection; anything
        else is a page fault, which, in a kernel, is an oops."""
        base, size = self.ctx.memory_base, len(self.ctx.memory)
        if base <= phys and phys + len(data) <= base + size:
            self.ctx.memory[phys - base:phys - base + len(data)] = data
        elif self.ctx.arena_all is not None and phys >= 0 and phys + len(data) <= len(self.ctx.arena_all):
            self.ctx.arena_all[phys:phys + len(data)] = data
        else:
            raise KernelPanic(f"BUG: unable to handle page fault for address {phys:#x} "
                              "(not mapped: outside this instance's partition)")

    def _on_resource(self, msg: M.Message) -> Any:
        """A RESOURCE command: the hook decides; the RES_ACK goes into this kernel's own
        control page (the one place no peer can write), then the host's doorbell rings. QUERY
        answers as a request's response (informational only). A panic in a hook is a panic:
        the host sees the death."""
        import errno
        body = self.host_command(msg)
        if body is M.NOT_FROM_HOST or not isinstance(body, dict):
            return None
        seq = self._last_command
        op = msg.msg_type
        if op == M.MK_MSG_QUERY:
            return {"type": M.MK_MSG_RES_ACK, "status": 0, "cpus": self.physical_cpus,
                    "logical": self.cpus, "memory_base": self.ctx.memory_base,
                    "memory_bytes": len(self.ctx.memory), "added": self.added_memory}
        try:
            if op in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE):
                phys = [int(c) for c in body.get("cpus", [])]
                logical = [int(c) for c in body.get("logical", [])]
                (self.on_cpu_add if op == M.MK_MSG_CPU_ADD else self.on_cpu_remove)(phys)
                pairs = dict(zip(self.ctx.cpus, self.ctx.physical_cpus))
                if op == M.MK_MSG_CPU_ADD:
                    pairs.update(zip(logical, phys))
                else:
                    for c in logical:
                        pairs.pop(c, None)
                self.ctx.cpus, self.ctx.physical_cpus = list(pairs), list(pairs.values())
            else:
                base, size = int(body.get("base", 0)), int(body.get("size", 0))
                if op == M.MK_MSG_MEM_ADD:
                    self.on_memory_add(base, size)
                    self.added_memory.append((base, size))
                else:
                    self.on_memory_remove(base, size)
                    if (base, size) in self.added_memory:
                        self.added_memory.remove((base, size))
        except RefuseResource as exc:
            self.printk(f"multikernel: refused {msg.msg_type:#x}: {exc}")
            self._res_ack(seq, errno.ECANCELED, str(exc))
            return None
        self._res_ack(seq, 0)
        return None

    def _res_ack(self, seq: int, status: int, reason: str = "") -> None:
        self.ctx.own.res_ack(seq, status, reason)
        linux.ring_doorbell(self.ctx.host_doorbell_fd)

    def _on_shutdown(self, msg: M.Message) -> None:
        body = self.host_command(msg)
        if body is not M.NOT_FROM_HOST:
            self.handing_over = isinstance(body, dict) and body.get("handover") is True
            self._request_graceful_halt()

    # -- kernel hand-over (KHO): state that survives into the next run -------------------
    def kho_preserve(self, name: str, offset: int, size: int) -> None:
        """Keep ``size`` bytes at ``offset`` of the partition (both page-aligned) for the next
        run of this instance, same image or a new one (a live update: ``handing_over``); it
        finds them with ``kho_restore(name)``. At most 16 regions; a name is 1-31 ASCII."""
        if not (isinstance(name, str) and 0 < len(name) < 32
                and all(32 < ord(ch) < 127 for ch in name)):
            raise ValueError("a KHO name is 1-31 printable ASCII characters, no spaces")
        if offset % 4096 or size % 4096 or size <= 0 or offset < 0 or \
                offset + size > len(self.ctx.memory):
            raise ValueError(f"KHO region {offset:#x}+{size:#x} must be page-aligned and inside "
                             f"the partition ({len(self.ctx.memory):#x} bytes)")
        own = self.ctx.own
        entries = [(n.rstrip(b"\0").decode(errors="replace"), o, z, 0)
                   for n, o, z, _ in own.kho_entries(out=True)]
        entries = [e for e in entries if e[0] != name] + [(name, offset, size, 0)]
        if len(entries) > S.KHO_MAX:
            raise ValueError(f"at most {S.KHO_MAX} KHO regions")
        own.write_kho(entries, out=True)

    def kho_keep_rest(self, keep: bool = True) -> None:
        """Keep the rest of the partition too at the next run (by default it is scrubbed when
        regions are preserved)."""
        own = self.ctx.own
        own.kho_flags = (own.kho_flags | S.KHO_KEEP_REST) if keep else \
            (own.kho_flags & ~S.KHO_KEEP_REST)

    def kho_restore(self, name: str) -> memoryview | None:
        """The region preserved as ``name`` by the previous run, checked against the CRC the
        host took when that run ended; None if there is none. A region whose bytes changed
        since is a panic (KHO corruption), as on the real system."""
        import zlib
        for raw, offset, size, crc in self.ctx.own.kho_entries():
            if raw.rstrip(b"\0").decode(errors="replace") != name:
                continue
            if offset + size > len(self.ctx.memory):
                return None
            view = self.ctx.memory[offset:offset + size]
            if zlib.crc32(view) != crc:
                self.panic(f"KHO: region {name!r} changed since it was handed over")
            return view
        return None

    def _request_graceful_halt(self) -> None:
        self._graceful = True
        self._halting = True
        self._halt_reason = "graceful halt requested by host"

    def _heartbeat(self, now: float) -> None:
        """A heartbeat is a count in the kernel's own page, which the host's sweep reads; it is
        no IPI: a machine of 511 instances would wake its host 511 times a second for them
        (measured: a fifth of a CPU, idle). MK_MSG_HEARTBEAT is still heard from a kernel
        that sends one itself."""
        self._next_heartbeat = now + (self.heartbeat_interval or 0)
        S.bump(self.ctx.own.buf, self.ctx.own.base + S.OWN_HEARTBEATS)

    # -- the loop (called by the trampoline) -----------------------------------------------
    def _on_halt_request(self, signum: int, frame: object) -> None:
        """SIGTERM: the fallback the host uses when SHUTDOWN cannot be queued."""
        self._request_graceful_halt()
        linux.ring_doorbell(self.ctx.doorbell_fd)   # wake the idle wait

    def _progress(self, laps: int = 1) -> None:
        """Add ``laps`` main-loop iterations to the progress count in the own page (the
        watchdog's sign of life; the loop adds its laps every ``CHORES_S``)."""
        S.bump(self.ctx.own.buf, self._progress_at, laps)

    def run(self) -> None:
        """Main loop. Overriding it is allowed, but then the kernel must watch ``halting`` and
        call ``poll_ipis()``, or the host's SHUTDOWN is never seen and the halt is forced.

        Each lap: deliver what waits, the bookkeeping when due, tick, then wait for messages
        unless there is work. A wait that drained the ring (fewer than a batch) leaves
        nothing for the next lap's drain, so that lap goes straight to ``tick``: in poll
        mode an echo's lap is the wait, its handler and the tick."""
        hb = self.heartbeat_interval
        peers, force_at = self._peers, self._force_halt_at
        laps = 0                    # iterations not yet added to the progress count
        chores_at = 0.0
        drained = False
        while not self._halting and peers[force_at] == 0:
            laps += 1
            got = 0 if drained else self.poll_ipis()
            drained = False
            now = time.monotonic()
            if now >= chores_at:
                chores_at = now + CHORES_S
                self._progress(laps)
                laps = 0
                if hb is not None and now >= self._next_heartbeat:
                    self._heartbeat(now)
                if now >= self._next_ring_check:
                    self.check_ring(now)
            busy = self.tick()
            agent = self.probes.agent
            if agent is not None and agent.active():
                busy = agent.step() or busy
                if busy or got:
                    continue
                drained = 0 < self._wait_ipi(agent.wait_hint(self._idle_s())) < 64
                continue
            if busy or got:
                continue
            wait = self.idle_timeout        # (read each lap: a tick may change it)
            drained = 0 < self._wait_ipi(TICKLESS_S if wait is None else wait) < 64
        # (the laps since the last bookkeeping are not added: the loop is over, and the count
        # stays what it was last seen as, whatever the kernel wrote there)

    def check_ring(self, now: float | None = None) -> bool:
        """Look at this instance's own ring header, which any peer can write: garbage there
        would refuse every sender or stall every drain, so the ring is reset (its messages
        dropped), counted in the own page and said on the console. The main loop does this
        every ``RING_CHECK_S``; a kernel with its own ``run`` calls it now and then."""
        self._next_ring_check = (time.monotonic() if now is None else now) + RING_CHECK_S
        outer = self._in_drain
        self._in_drain = True           # the IPI signal's drain must not move tail meanwhile
        try:
            problem = self.ring.header_problem()
            if problem is None:
                return False
            self.ring.heal(self.mode, self.mode != "interrupt")
        finally:
            self._in_drain = outer
        S.bump(self.ctx.own.buf, self.ctx.own.base + S.OWN_RING_RESETS)
        self.printk(f"ipi: own ring reset, its header was garbage: {problem}")
        return True

    def _main(self) -> str:
        self.boot()
        self._booted = True
        self.ctx.own.booted = self.ctx.boot_generation      # exec waits for this:
        linux.ring_doorbell(self.ctx.host_doorbell_fd)      # ring, or it waits for a timer
        self.run()
        # the loop is over: no message is taken any more (an IPI signal would drain the ring
        # from here on), so what is left waits in the ring, for a live update's new kernel
        signal.pthread_sigmask(signal.SIG_BLOCK, {IPI_SIGNAL})
        self._booted = False
        if self._graceful:
            self.shutdown()
            try:
                self.send(0, M.MK_MSG_SHUTDOWN_ACK, {"reason": self._halt_reason})
            except RingError:
                pass
        elif self._halting:
            self._tell_halted(self._halt_reason or "halted")
        return self._halt_reason or "halted"

    def _tell_halted(self, reason: str) -> None:
        """HALTED to the host while we can still talk; best effort."""
        try:
            self.send(0, M.MK_MSG_HALTED, {"reason": reason})
        except Exception:
            pass

