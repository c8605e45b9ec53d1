"""Measured traffic between instances: the probe agent every kernel (and the host) carries.

A scenario's ``[[probe]]`` asks for continuous traffic from one endpoint to another while faults
happen: round trips (``ping``) or one-way messages (``stream``). Researchers should not have to
write that into each kernel, so every kernel's runtime carries an agent, as a real kernel carries
its tracing hooks: the host starts a probe with a message, the agent runs it from the kernel's
main loop, and any kernel answers pings and counts stream messages. Samples go back to the host
in batches, so the figures are the instance's own clock readings (CLOCK_MONOTONIC is one clock
for every process on the machine), not the host's view of them.

Message types (emulator inventions, in the 0x3Fxx block next to MK_EMU_FAULT):

- ``MK_EMU_PROBE_START`` (host -> source, request): ``{id, target, kind, rate, payload, timeout}``.
- ``MK_EMU_PROBE_PING`` (source -> target, request): bytes; the response is the same bytes.
- ``MK_EMU_PROBE_DATA`` (source -> target): ``[probe id, bytes]``; the target counts it.
- ``MK_EMU_PROBE_REPORT`` (agent -> host): ``{"p": id, "t": send times, "r": round trips,
  "sent": n, "lost": n, "why": {errno: n}, "recv": {id: n}, "at": ns}``; ``t`` is packed u64
  CLOCK_MONOTONIC ns, ``r`` packed u32 ns, each a delta since the previous report (the host
  checks every field: a report is written by a possibly faulty instance).
- ``MK_EMU_PROBE_FLUSH`` (host -> agent, request): stop every probe, send what is pending,
  answer when it is on its way (reports travel ahead of the answer: one sender, one ring, FIFO).

What a probe costs the kernel it runs in: nothing that blocks. A ping is sent as a request and
the kernel goes on with its loop; the answer is matched by its id when a drain brings it in,
and the agent looks at it on the loop's next lap (the answer's doorbell wakes an idle kernel,
so the round trip measured is the one the kernel sees, loop included). A probe keeps at most
one ping in flight: a slot that comes due while one is pending is skipped, and nothing piles
up in the target's ring while the target does not answer. While a ping is pending the agent
looks at its target's liveness every ``LOOK_NS`` (an idle kernel wakes that often). Per
message the cost is one send and, in the loop, a dictionary look-up; samples leave in one
REPORT per ``BATCH_SAMPLES`` or ``REPORT_PERIOD_NS``.

Where the cores are shared (the oversubscribed mode) a probe's figures include the scheduler:
that is what they are for, and the report says which mode the machine ran in.
"""

from __future__ import annotations

import errno
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partition.abi.message import (
    MK_EMU_PROBE_DATA,
    MK_EMU_PROBE_FLUSH,
    MK_EMU_PROBE_PING,
    MK_EMU_PROBE_REPORT,
    MK_EMU_PROBE_START,
    NOT_FROM_HOST,
    Message,
)
from partition.abi.ring import RingError

if TYPE_CHECKING:
    from partition.guest.endpoint import Messenger

KINDS = ("ping", "stream")
BATCH_SAMPLES = 256              # 3 KB of samples: one report fits one 4096-byte slot
REPORT_PERIOD_NS = 100_000_000   # a report at least every 0.1 s while there is something to say
MAX_PAYLOAD = 3900               # what fits one slot with the mk_message header and msgpack
U32_MAX = 0xFFFFFFFF
LOOK_NS = 10_000_000             # a pending ping's target is looked at this often (a halt ends it)


@dataclass
class ProbeSpec:
    id: int
    target: int
    kind: str = "ping"
    rate: float = 1000.0         # per second; 0: as fast as possible
    payload: int = 64
    timeout: float = 1.0
    seed: int = 0                # the payload's bytes: random.Random(seed + id), reproducible

    @classmethod
    def from_wire(cls, d: Any) -> ProbeSpec:
        """From a START message. The host wrote it, but it crossed shared memory: check it."""
        if not isinstance(d, dict):
            raise ValueError("probe spec is not a map")
        spec = cls(id=int(d["id"]), target=int(d["target"]), kind=str(d["kind"]),
                   rate=float(d["rate"]), payload=int(d["payload"]), timeout=float(d["timeout"]),
                   seed=int(d.get("seed", 0)))
        if spec.kind not in KINDS or spec.rate < 0 or not 0 <= spec.payload <= MAX_PAYLOAD \
                or spec.timeout <= 0 or spec.id < 0:
            raise ValueError(f"bad probe spec {d!r}")
        return spec

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "target": self.target, "kind": self.kind, "rate": self.rate,
                "payload": self.payload, "timeout": self.timeout, "seed": self.seed}


class _Probe:
    def __init__(self, spec: ProbeSpec, now: int) -> None:
        self.spec = spec
        self.data = random.Random(spec.seed + spec.id).randbytes(spec.payload)
        self.interval = int(1e9 / spec.rate) if spec.rate > 0 else 0
        self.next_due = now
        self.t = array("Q")
        self.r = array("I")
        self.sent = 0
        self.lost = 0
        self.why: dict[int, int] = {}      # errno -> messages lost for that reason
        self.errors_until = 0     # back off after a refused send instead of spinning on it
        #: the ping in flight: (request id, sent at, deadline, instance it reached, that
        #: one's incarnation, next liveness look), all times in ns
        self.pending: tuple[int, int, int, int, Any, int] | None = None
        self.full_since = 0       # the target's ring refused the pings since then (ENOSPC)


class ProbeAgent:
    """Runs probes from one endpoint. ``messenger`` sends its pings (without waiting for them),
    ``send`` its stream messages; ``report`` takes a REPORT payload (sends it to the host, or,
    on the host, records it) and returns False when it could not be delivered now (the batch
    is kept for the next try)."""

    def rebind(self, messenger: Messenger, send: Callable[..., Any]) -> None:
        """Send through another endpoint from now on (a scenario's new host after a crash): a
        ping in flight through the old one is given up, not counted."""
        for p in self.probes.values():
            p.pending = None
        self._msgr, self._send = messenger, send

    def __init__(self, messenger: Messenger, send: Callable[..., Any],
                 report: Callable[[dict[str, Any]], bool]) -> None:
        self._msgr = messenger
        self._send = send
        self._report = report
        self.probes: dict[int, _Probe] = {}
        self.received: dict[int, int] = {}      # stream messages counted as a target
        self._last_report = time.monotonic_ns()
        self._in_step = False

    # -- control ---------------------------------------------------------------------------
    def start(self, spec: ProbeSpec) -> None:
        self.probes[spec.id] = _Probe(spec, time.monotonic_ns())

    def on_data(self, probe_id: Any) -> None:
        if isinstance(probe_id, int):
            self.received[probe_id] = self.received.get(probe_id, 0) + 1

    def flush(self, deadline_s: float = 1.0) -> None:
        """Stop every probe and hand over everything pending (retrying a full host ring)."""
        stopped = list(self.probes.values())
        self.probes.clear()
        for p in stopped:             # a ping in flight has no outcome yet: neither sent nor lost
            if p.pending is not None:
                self._msgr.forget_request(p.pending[0])
                p.pending = None
        end = time.monotonic() + deadline_s
        for p in stopped:
            while (len(p.r) or p.sent or p.lost) and time.monotonic() < end:
                if not self._send_report(p):
                    time.sleep(0.001)
        while self.received and time.monotonic() < end:
            if not self._send_received():
                time.sleep(0.001)

    # -- the loop --------------------------------------------------------------------------
    def active(self) -> bool:
        return bool(self.probes) or bool(self.received)

    def wait_hint(self, default: float) -> float:
        """Seconds the endpoint may sleep before the agent needs the CPU again."""
        if not self.probes:
            return min(default, REPORT_PERIOD_NS / 1e9) if self.received else default
        now = time.monotonic_ns()
        due = min(p.next_due if p.pending is None else min(p.pending[2], p.pending[5])
                  for p in self.probes.values())
        return max(0.0, min(default, (due - now) / 1e9))

    def step(self) -> bool:
        """One round: each due probe does one unit of traffic; reports go out when due.
        Returns True when it did traffic (the caller's loop should not sleep)."""
        if self._in_step:            # a handler that waits drained a message into the loop
            return False
        self._in_step = True
        try:
            did = False
            now = time.monotonic_ns()
            for p in list(self.probes.values()):
                if p.spec.id not in self.probes:      # flushed by a message meanwhile
                    continue
                if p.pending is not None and not self._settle(p, now):
                    continue                 # still in flight: its slots are skipped
                if now >= p.next_due and now >= p.errors_until:
                    self._one(p, now)
                    did = True
                    now = time.monotonic_ns()
            if now - self._last_report >= REPORT_PERIOD_NS:
                self._last_report = now
                for p in list(self.probes.values()):
                    if len(p.r) or p.sent or p.lost:
                        self._send_report(p)
                if self.received:
                    self._send_received()
            return did
        finally:
            self._in_step = False

    def _one(self, p: _Probe, now: int) -> None:
        s = p.spec
        if p.interval:
            p.next_due += p.interval
            if now > p.next_due:     # fell behind (a stall, a lost ping): skip the missed
                p.next_due = now + p.interval   # slots rather than burst to catch up
        else:
            p.next_due = now
        if s.kind == "ping":
            # sent, not waited for: counted once its outcome is known (``_settle``), so a
            # FLUSH meanwhile does not report it as sent without an answer or a loss
            t0 = time.monotonic_ns()
            try:
                mid, to, incarnation = self._msgr.post_request(s.target, MK_EMU_PROBE_PING,
                                                               p.data)
            except RingError as exc:
                if exc.errno == errno.ENOSPC:      # back pressure: lost only if it lasts
                    p.full_since = p.full_since or t0
                    if t0 - p.full_since < s.timeout * 1e9:
                        p.errors_until = t0 + 50_000
                        return
                p.full_since = 0
                self._lose(p, exc.errno)
                return
            p.full_since = 0
            p.pending = (mid, t0, t0 + int(s.timeout * 1e9), to, incarnation, t0 + LOOK_NS)
            return
        else:
            try:
                self._send(s.target, MK_EMU_PROBE_DATA, [s.id, p.data])
            except RingError as exc:
                if exc.errno == errno.ENOSPC:          # back pressure, not loss: retry later
                    p.errors_until = time.monotonic_ns() + 50_000
                    return
                p.sent += 1
                p.lost += 1
                p.why[exc.errno] = p.why.get(exc.errno, 0) + 1
                p.errors_until = time.monotonic_ns() + 1_000_000
                return
            p.sent += 1                 # streams report counts per period, not per message
        if len(p.r) >= BATCH_SAMPLES:
            self._send_report(p)

    def _settle(self, p: _Probe, now: int) -> bool:
        """The ping in flight: its answer taken (a sample), or lost at its deadline or when
        the instance it went to is gone. True when it is no longer in flight."""
        assert p.pending is not None
        mid, t0, deadline, to, incarnation, look = p.pending
        if self._msgr.take_response(mid) is not None:
            p.pending = None
            p.sent += 1
            p.t.append(t0)
            p.r.append(min(time.monotonic_ns() - t0, U32_MAX))
            if len(p.r) >= BATCH_SAMPLES:
                self._send_report(p)
            return True
        if now >= deadline:
            code = errno.ETIMEDOUT
        elif now >= look:
            if self._msgr.answerer_alive(to, incarnation):
                p.pending = (mid, t0, deadline, to, incarnation, now + LOOK_NS)
                return False
            code = errno.ESRCH
        else:
            return False
        self._msgr.forget_request(mid)
        p.pending = None
        self._lose(p, code)
        return True

    def _lose(self, p: _Probe, code: int) -> None:
        p.sent += 1
        p.lost += 1
        p.why[code] = p.why.get(code, 0) + 1
        if code != errno.ETIMEDOUT:
            p.errors_until = time.monotonic_ns() + 1_000_000

    def _send_report(self, p: _Probe) -> bool:
        n = min(len(p.r), BATCH_SAMPLES)
        payload = {"p": p.spec.id, "at": time.monotonic_ns(), "t": p.t[:n].tobytes(),
                   "r": p.r[:n].tobytes(), "sent": p.sent, "lost": p.lost, "recv": {},
                   "why": dict(p.why)}
        if not self._report(payload):
            return False
        del p.t[:n]
        del p.r[:n]
        p.sent = p.lost = 0
        p.why.clear()
        return True

    def _send_received(self) -> bool:
        if not self._report({"p": -1, "at": time.monotonic_ns(), "t": b"", "r": b"", "sent": 0,
                             "lost": 0, "recv": dict(self.received)}):
            return False
        self.received.clear()
        return True


def reporter(send: Callable[[int, int, Any], Any]) -> Callable[[dict[str, Any]], bool]:
    """A ``report`` callable for an instance: a REPORT message to the host; False on ENOSPC."""
    def report(payload: dict[str, Any]) -> bool:
        try:
            send(0, MK_EMU_PROBE_REPORT, payload)
            return True
        except RingError as exc:
            if exc.errno == errno.ENOSPC:
                return False
            raise
    return report


class ProbeHandlers:
    """The probe messages every kernel answers, registered on its messenger at construction:
    pings are echoed, stream data counted, and the agent is made by the first START."""

    def __init__(self, messenger: Messenger, send: Callable[..., Any],
                 verify: Callable[[Message], Any]) -> None:
        self._messenger = messenger
        self._send = send
        self._verify = verify       # a host command's body, or NOT_FROM_HOST (commands.py)
        self.agent: ProbeAgent | None = None
        reg = messenger.register
        reg(MK_EMU_PROBE_START, self._on_start)
        reg(MK_EMU_PROBE_PING, lambda msg: msg.payload)
        reg(MK_EMU_PROBE_DATA, self._on_data)
        reg(MK_EMU_PROBE_FLUSH, self._on_flush)

    def _agent(self) -> ProbeAgent:
        if self.agent is None:
            self.agent = ProbeAgent(self._messenger, self._send, reporter(self._send))
        return self.agent

    def _on_start(self, msg: Message) -> Any:
        body = self._verify(msg)
        if body is NOT_FROM_HOST:
            return {"error": "a probe is started by the host only"}
        try:
            spec = ProbeSpec.from_wire(body)
        except (KeyError, TypeError, ValueError) as exc:
            return {"error": f"bad probe spec: {exc}"}
        self._agent().start(spec)
        return {"ok": True}

    def _on_data(self, msg: Message) -> None:
        p = msg.payload
        if isinstance(p, list) and p:
            self._agent().on_data(p[0])

    def _on_flush(self, msg: Message) -> Any:
        if self._verify(msg) is NOT_FROM_HOST:
            return {"error": "a flush comes from the host only"}
        if self.agent is not None:
            self.agent.flush()
        return {"ok": True}
