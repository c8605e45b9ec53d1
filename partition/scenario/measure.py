"""What a scenario's probes measured: samples in, checked; figures out.

Reports come from instances, through shared memory, so each one is checked before a sample is
kept: a known probe id, sent by that probe's source (or, for received counts, by its target or
a standby serving it), arrays of matching length, counts within bounds. A report that fails is
counted in ``bad_reports`` and dropped whole.
"""

from __future__ import annotations

import errno
import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from partition.guest.probes import BATCH_SAMPLES
from partition.stats import percentile

MAX_COUNT = 10**9          # no honest report carries more than this in one period


@dataclass
class ProbeRecord:
    """Everything measured for one probe during one run."""

    id: int
    name: str
    kind: str
    source: str               # instance name or "host"
    target: str
    source_ids: set[int] = field(default_factory=set)
    target_ids: set[int] = field(default_factory=set)
    t: array = field(default_factory=lambda: array("Q"))    # send times, CLOCK_MONOTONIC ns
    r: array = field(default_factory=lambda: array("I"))    # round trips, ns
    sent: int = 0
    lost: int = 0
    lost_why: dict[str, int] = field(default_factory=dict)   # errno name -> lost for it
    received: int = 0
    throughput: list[tuple[int, int]] = field(default_factory=list)   # (at ns, sent in period)
    losses: list[tuple[int, int]] = field(default_factory=list)   # (report time ns, lost in it)
    started_ns: int | None = None
    stopped_ns: int | None = None
    starts: int = 0           # how many times the source (re)started it

    # -- figures ---------------------------------------------------------------------------
    def round_trips_us(self, before_ns: int | None = None,
                       after_ns: int | None = None) -> list[float]:
        return sorted(r / 1000.0 for t, r in zip(self.t, self.r)
                      if (before_ns is None or t < before_ns) and (after_ns is None or t >= after_ns))

    def metrics(self, first_fault_ns: int | None) -> dict[str, Any]:
        rt = self.round_trips_us()
        span_s = ((self.stopped_ns or 0) - (self.started_ns or 0)) / 1e9
        out: dict[str, Any] = {
            "sent": self.sent, "lost": self.lost, "lost_why": dict(self.lost_why),
            "received": self.received if self.kind == "stream" else len(self.r),
        }
        if self.kind == "ping":
            out.update(p50_us=_num(percentile(rt, 50)), p99_us=_num(percentile(rt, 99)),
                       max_us=_num(rt[-1] if rt else math.nan),
                       mean_us=_num(sum(rt) / len(rt) if rt else math.nan))
            out["msgs_per_s"] = round(len(rt) / span_s, 1) if span_s > 0 else None
        else:
            out.update(p50_us=None, p99_us=None, max_us=None, mean_us=None)
            out["lost"] = max(0, self.sent - self.received) if self.stopped_ns else self.lost
            out["msgs_per_s"] = round(self.received / span_s, 1) if span_s > 0 else None
        if first_fault_ns is not None and self.kind == "ping":
            base = self.round_trips_us(before_ns=first_fault_ns)
            after = self.round_trips_us(after_ns=first_fault_ns)
            out.update(baseline_p50_us=_num(percentile(base, 50)),
                       baseline_p99_us=_num(percentile(base, 99)),
                       after_p99_us=_num(percentile(after, 99)),
                       baseline_samples=len(base))
        else:
            out.update(baseline_p50_us=None, baseline_p99_us=None, after_p99_us=None)
        return out

    def windows(self, origin_ns: int, width_ns: int = 100_000_000
                ) -> list[tuple[float, float, float, int]]:
        """(start s from ``origin_ns``, p50 us, p99 us, n) per window: the plot's lines."""
        buckets: dict[int, list[float]] = {}
        for t, r in zip(self.t, self.r):
            buckets.setdefault((t - origin_ns) // width_ns, []).append(r)
        out = []
        for k in sorted(buckets):
            vals = sorted(buckets[k])
            out.append((k * width_ns / 1e9, percentile(vals, 50) / 1000.0,
                        percentile(vals, 99) / 1000.0, len(vals)))
        return out


def _num(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 3)


class Collector:
    """The host's end of every probe: handler of MK_EMU_PROBE_REPORT, and of host probes."""

    def __init__(self) -> None:
        self.records: dict[int, ProbeRecord] = {}
        self.bad_reports = 0
        self.bad_reasons: list[str] = []

    def add(self, rec: ProbeRecord) -> None:
        self.records[rec.id] = rec

    def on_report(self, sender: int, payload: Any) -> bool:
        """One report; False (and counted) when it does not hold up."""
        why = self._apply(sender, payload)
        if why is None:
            return True
        self.bad_reports += 1
        if len(self.bad_reasons) < 20:
            self.bad_reasons.append(f"from instance {sender}: {why}")
        return False

    def _apply(self, sender: int, p: Any) -> str | None:
        if not isinstance(p, dict):
            return "not a map"
        recv = p.get("recv", {})
        if not isinstance(recv, dict):
            return "recv is not a map"
        for pid, n in recv.items():
            rec = self.records.get(pid) if isinstance(pid, int) else None
            if rec is None or sender not in rec.target_ids:
                return f"received count for probe {pid!r}, which this sender does not serve"
            if not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
                return f"received count {n!r} out of range"
        pid = p.get("p")
        if pid == -1:
            for k, n in recv.items():
                self.records[k].received += n
            return None
        rec = self.records.get(pid) if isinstance(pid, int) else None
        if rec is None or sender not in rec.source_ids:
            return f"report for probe {pid!r}, which this sender does not run"
        t, r, sent, lost = p.get("t"), p.get("r"), p.get("sent"), p.get("lost")
        if not (isinstance(t, bytes) and isinstance(r, bytes)) or len(t) % 8 or len(r) % 4 \
                or len(t) // 8 != len(r) // 4 or len(r) // 4 > BATCH_SAMPLES:
            return "sample arrays are malformed"
        for v in (sent, lost):
            if not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
                return f"count {v!r} out of range"
        assert isinstance(sent, int) and isinstance(lost, int)
        why = p.get("why", {})
        if not isinstance(why, dict) or not all(
                isinstance(k, int) and isinstance(n, int) and n >= 0 for k, n in why.items()) \
                or sum(why.values()) > lost:
            return "loss reasons are malformed"
        ts, rs = array("Q"), array("I")
        ts.frombytes(t)
        rs.frombytes(r)
        if len(rec.r) + len(rs) > rec.sent + sent:
            return f"more samples than messages sent ({len(rec.r) + len(rs)} > {rec.sent + sent})"
        if ts and rec.started_ns is not None and not (
                rec.started_ns - 10**9 <= min(ts) and max(ts) <= time.monotonic_ns() + 10**9):
            return "send times outside the run"
        rec.t.extend(ts)
        rec.r.extend(rs)
        rec.sent += sent
        rec.lost += lost
        if lost:               # when, to a report period: the plot marks them
            at_ns = p.get("at")
            rec.losses.append((at_ns if isinstance(at_ns, int) else time.monotonic_ns(), lost))
        for code, n in why.items():
            name = errno.errorcode.get(code, str(code))
            rec.lost_why[name] = rec.lost_why.get(name, 0) + n
        at = p.get("at")
        if isinstance(at, int) and rec.kind == "stream":
            rec.throughput.append((at, sent))
        return None

    def host_report(self, payload: dict[str, Any], source_id: int = 0) -> bool:
        """The host's own agent reports straight here (never fails: no ring between)."""
        self.on_report(source_id, payload)
        return True
