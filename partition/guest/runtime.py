"""The kernel runtime: the loop, the drain and the bookkeeping around a kernel's hooks.

One ``KernelRuntime`` per run of an instance, made by the trampoline once the host marked the
run active: it sets up the endpoint (guest/endpoint.py), the host's commands
(guest/commands.py), the probe handlers (guest/probes.py) and the kernel's services
(guest/services.py), then makes the kernel object and holds it. No kernel author subclasses or
sees it: a kernel reaches it only through ``self.os``. Its ``main`` runs ``boot``, the loop and
``shutdown``; its ``on_ipi`` and ``on_halt_request`` are the process's signal handlers.

The wait and the drain are the round trip's critical path (``_wait_ipi``: every request's wait,
``mkctl bench ipi``); what they need is bound once at construction.
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable
from typing import Any

from partition import linux
from partition.abi import message as M
from partition.abi import slot as S
from partition.abi.constants import IPI_SIGNAL
from partition.abi.ring import RingError
from partition.guest import probes as P
from partition.guest.commands import HostCommands
from partition.guest.endpoint import Endpoint
from partition.guest.kernel import Kernel, KernelContext, parse_cmdline
from partition.guest.peers import PeerTable
from partition.guest.services import KernelServices

#: how often the main loop checks its own ring's header (check_ring)
RING_CHECK_S = 0.1
#: a tickless kernel's wait (``idle_timeout = None``) as the wait calls take it: a safety net
#: of an hour, never a tick
TICKLESS_S = 3600.0
#: the main loop's bookkeeping (its progress count, heartbeats, the ring check) runs at most
#: this often: every iteration, it cost a poll-mode round trip a third of a microsecond
CHORES_S = 0.001


class KernelRuntime:
    """One run of a kernel: its endpoint, its loop, its state, and the kernel object."""

    def __init__(self, kernel_cls: type[Kernel], ctx: KernelContext) -> None:
        self.ctx = ctx
        self.halting = False
        self._halt_reason = ""
        self._graceful = False
        self._in_drain = False
        self._booted = False       # messages wait in the ring until boot() registered handlers
        mode = parse_cmdline(ctx.cmdline).get("mk_mode", kernel_cls.mode)
        if mode not in ("interrupt", "poll", "hybrid"):
            raise ValueError(f"mk_mode must be interrupt, poll or hybrid, not {mode!r}")
        self.mode = mode
        assert ctx.peers is not None and ctx.rings is not None
        self.endpoint = Endpoint(
            ctx.id, ctx.physical_cpus[0], ctx.rings, ctx.rings_address, ctx.layout,
            PeerTable(ctx.peers, ctx.own, ctx.host_doorbell_fd, ctx.channel),
            sent_counter=(ctx.own.buf, ctx.own.base + S.OWN_IPI_SENT))
        self.messenger = msgr = self.endpoint.messenger
        self._deliver = msgr.deliver        # bound once: poll_ipis is the hot loop
        # the C drain matches responses to our requests and dispatches handled messages itself,
        # as deliver would (deliver stays the careful path's)
        self._replies = self.endpoint.drain_state()
        self.commands = HostCommands(ctx, msgr, self._request_graceful_halt, self._fault)
        self.probes = P.ProbeHandlers(msgr, msgr.send, self.commands.verify)
        self.ring = self.endpoint.ring_of(ctx.id)
        self.ring.set_mode(mode)
        self.ring.set_polling(mode != "interrupt")
        # poll and hybrid with the C ring: the spin and the drain after it, with all they need
        # bound once, in one C call and no Python frame (Ring.waiter; None: the Python waits)
        self._waiter = self.ring.waiter(64, msgr.handled, self._deliver, self._replies, self,
                                        msgr.waiting) if mode != "interrupt" else None
        self._wait_ipi: Callable[[float], int] = {
            "poll": self._waiter or self._wait_poll, "hybrid": self._wait_hybrid,
            "interrupt": self._wait_halt,
        }[mode]
        msgr.wait = self._wait_ipi              # bound once: every request passes it
        # a request's fast path: one C call (the send, the first wait, the answer); interrupt
        # mode's first wait halts on the doorbell, as _wait_halt does
        asker = self._waiter if mode != "interrupt" else \
            self.ring.waiter(64, msgr.handled, self._deliver, self._replies, self,
                             msgr.waiting, ctx.doorbell_fd)
        if asker is not None:
            msgr.use_asker(asker, None if mode == "poll" else self)
        self._hlt: select.poll | None = None     # the doorbell's poll object, made on first idle
        self._next_ring_check = 0.0
        self._peers = ctx.peers
        self._progress_at = ctx.own.base + S.OWN_PROGRESS       # the loop's two fields: its own
        self._force_halt_at = ctx.id * S.PEER_BYTES + S.PEER_FORCE_HALT  # and the host's word
        self.services = KernelServices(self)
        # the kernel last: its services are there before its own __init__ runs
        kernel = kernel_cls.__new__(kernel_cls)
        kernel.__dict__["os"] = self.services
        kernel.mode = mode
        kernel.__init__(ctx)        # type: ignore[misc]  # (a kernel's own, or Kernel's)
        self.kernel = kernel
        self.commands.kernel = kernel
        self._next_heartbeat = time.monotonic() + (kernel.heartbeat_interval or 0)

    # -- what the services call --------------------------------------------------------------
    def register_handler(self, msg_type: int, handler: Callable[[M.Message], Any]) -> None:
        self.messenger.register(msg_type, handler)
        self.ring.unfilter_type(msg_type)   # a drop filter set while nobody handled it

    def halt(self, reason: str) -> None:
        self.halting = True
        self._halt_reason = reason

    def _fault(self, kind: str, options: dict[str, Any]) -> None:
        from partition.guest import faults
        faults.carry_out(self.services, self._progress, kind, options)

    def _idle_s(self) -> float:
        """The idle wait in seconds: ``idle_timeout``, or TICKLESS_S for a tickless kernel."""
        t = self.kernel.idle_timeout
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

    # -- IPIs: the wait and the drain ----------------------------------------------------------
    def poll_ipis(self, limit: int = 64) -> int:
        """Deliver up to ``limit`` pending messages now; returns how many. Inside a drain (the
        IPI signal arriving while handlers run) it does nothing: that drain goes on anyway."""
        return 0 if self._in_drain else self._take(limit)

    def on_ipi(self, signum: int, frame: object) -> None:
        """The interrupt (IPI_SIGNAL's handler): drain between two bytecodes, and wake an idle
        wait."""
        if self._booted:
            self.poll_ipis()
        linux.ring_doorbell(self.ctx.doorbell_fd)

    # The waits: each waits for messages and delivers them, and returns how many slots it
    # consumed (0: none came); ``_wait_ipi`` is the mode's, chosen once at construction (the
    # mode does not change in a run). Callers have just drained, and each wait looks at the
    # ring before it waits (spin returns at once on a claimed slot, halt on a published one),
    # so there is no drain up front. A handler may wait too (a request from inside a
    # handler): then the wait drains on from inside the outer drain, in ring order, and other
    # handlers may run meanwhile, as they would on a kernel that takes interrupts while one
    # of its handlers sleeps. Only the IPI signal's own drain stays out of a drain
    # (``_in_drain``).

    def _wait_poll(self, timeout: float) -> int:
        """Poll mode without the C ring: spin on the ring's head, bounded so that the caller's
        loop (deadlines, halting, heartbeats) still comes round at least every 50 us; then
        drain. (With the C ring the mode's wait is the Waiter itself: Ring.waiter.)"""
        return self._spin_take(min(50.0, timeout * 1e6)) or 0

    def _wait_hybrid(self, timeout: float) -> int:
        """Hybrid mode: spin ``spin_us``, then block on the doorbell as interrupt mode does."""
        waiter = self._waiter           # (_spin_take's C case, without its frame)
        took = self._spin_take(self.kernel.spin_us) if waiter is None else \
            waiter.spin(self.kernel.spin_us)
        if took is not None:
            return took
        self.ring.set_polling(False)
        try:
            rung = self.ring.pending() or self.idle(min(timeout, self._idle_s()))
        finally:
            self.ring.set_polling(True)
        return self._take() if rung else 0

    def _wait_halt(self, timeout: float) -> int:
        """Interrupt mode: the emulated HLT and the drain after it in one call (Ring.halt):
        between a wake-up and the work it brings there is no Python but the handlers' own."""
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
        waiter = self._waiter
        if waiter is not None:
            took: int | None = waiter.spin(usec)
            return took
        outer = self._in_drain
        self._in_drain = True
        try:
            msgr = self.messenger
            return self.ring.poll(usec, self._deliver, 64, 1.0,
                                  None if msgr.waiting else msgr.handled, True, self._replies)
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

    # -- bookkeeping -----------------------------------------------------------------------------
    def _request_graceful_halt(self) -> None:
        self._graceful = True
        self.halting = True
        self._halt_reason = "graceful halt requested by host"

    def on_halt_request(self, signum: int, frame: object) -> None:
        """SIGTERM's handler: the fallback the host uses when SHUTDOWN cannot be queued."""
        self._request_graceful_halt()
        linux.ring_doorbell(self.ctx.doorbell_fd)   # wake the idle wait

    def _heartbeat(self, now: float) -> None:
        """A heartbeat is a count in the kernel's own page, which the host's sweep reads; it is
        no IPI: a machine of 511 instances would wake its host 511 times a second for them
        (measured: a fifth of a CPU, idle). MK_MSG_HEARTBEAT is still heard from a kernel
        that sends one itself."""
        self._next_heartbeat = now + (self.kernel.heartbeat_interval or 0)
        S.bump(self.ctx.own.buf, self.ctx.own.base + S.OWN_HEARTBEATS)

    def _progress(self, laps: int = 1) -> None:
        """Add ``laps`` main-loop iterations to the progress count in the own page (the
        watchdog's sign of life; the loop adds its laps every ``CHORES_S``)."""
        S.bump(self.ctx.own.buf, self._progress_at, laps)

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
        self.ctx.console.printk(f"ipi: own ring reset, its header was garbage: {problem}")
        return True

    # -- the loop ----------------------------------------------------------------------------
    def loop(self) -> None:
        """The main loop (``Kernel.run``'s default).

        Each lap: deliver what waits, the bookkeeping when due, tick, then wait for messages
        unless there is work. A wait that drained the ring (fewer than a batch) leaves
        nothing for the next lap's drain, so that lap goes straight to ``tick``: in poll
        mode an echo's lap is the wait, its handler and the tick."""
        kernel = self.kernel
        hb = kernel.heartbeat_interval
        peers, force_at = self._peers, self._force_halt_at
        probes = self.probes
        wait_ipi = self._wait_ipi
        monotonic = time.monotonic
        laps = 0                    # iterations not yet added to the progress count
        chores_at = 0.0
        drained = False
        while not self.halting and peers[force_at] == 0:
            laps += 1
            got = 0 if drained else self.poll_ipis()
            drained = False
            now = monotonic()
            if now >= chores_at:
                chores_at = now + CHORES_S
                self._progress(laps)
                laps = 0
                if hb is not None and now >= self._next_heartbeat:
                    self._heartbeat(now)
                if now >= self._next_ring_check:
                    self.check_ring(now)
            busy = kernel.tick()
            agent = probes.agent
            if agent is not None and agent.active():
                busy = agent.step() or busy
                if busy or got:
                    continue
                drained = 0 < wait_ipi(agent.wait_hint(self._idle_s())) < 64
                continue
            if busy or got:
                continue
            wait = kernel.idle_timeout      # (read each lap: a tick may change it)
            drained = 0 < wait_ipi(TICKLESS_S if wait is None else wait) < 64
        # (the laps since the last bookkeeping are not added: the loop is over, and the count
        # stays what it was last seen as, whatever the kernel wrote there)

    def main(self) -> str:
        """The run: ``boot``, tell the host, the loop (``run``), then ``shutdown`` on a
        graceful halt; returns the halt's reason."""
        kernel = self.kernel
        kernel.boot()
        self._booted = True
        self.ctx.own.booted = self.ctx.boot_generation      # exec waits for this:
        linux.ring_doorbell(self.ctx.host_doorbell_fd)      # ring, or it waits for a timer
        kernel.run()
        # the loop is over: no message is taken any more (an IPI signal would drain the ring
        # from here on), so what is left waits in the ring, for a live update's new kernel
        signal.pthread_sigmask(signal.SIG_BLOCK, {IPI_SIGNAL})
        self._booted = False
        if self._graceful:
            kernel.shutdown()
            try:
                self.messenger.send(0, M.MK_MSG_SHUTDOWN_ACK, {"reason": self._halt_reason})
            except RingError:
                pass
        elif self.halting:
            self.tell_halted(self._halt_reason or "halted")
        return self._halt_reason or "halted"

    def tell_halted(self, reason: str) -> None:
        """HALTED to the host while we can still talk; best effort."""
        try:
            self.messenger.send(0, M.MK_MSG_HALTED, {"reason": reason})
        except Exception:
            pass
