"""What a run prints and writes: the live progress line, the summary table, the JSON report."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from partition.scenario.runner import Runner, RunResult
from partition.stats import environment, environment_line


class Progress:
    """One status line, rewritten in place on a terminal (``\\r``); on a pipe or a CI log, a
    plain line every ``period`` seconds so that a long run still shows it is alive."""

    def __init__(self, stream: IO[str] = sys.stderr, period: float = 1.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.period = period
        self._last = 0.0
        self._width = 0

    def __call__(self, runner: Runner, elapsed: float) -> None:
        now = time.monotonic()
        if not self.tty and now - self._last < self.period:
            return
        self._last = now
        line = self.line(runner, elapsed)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @staticmethod
    def line(runner: Runner, elapsed: float) -> str:
        m = runner.m
        sc = runner.sc
        states = []
        if m is not None:
            for i in sc.instances:
                inst = m.instances.get(i["name"])
                if inst is not None:
                    states.append(f"{i['name']}:{inst.state.value}")
        rates = []
        for rec in runner.collector.records.values():
            span = max(1e-9, (time.monotonic_ns() - (rec.started_ns or 0)) / 1e9)
            n = len(rec.r) if rec.kind == "ping" else rec.sent
            rates.append(f"{rec.name} {n / span:.0f}/s")
        fired = sum(1 for f in runner.fired.values() if f["kind"] == "fault")
        return (f"[{elapsed:5.1f}/{sc.duration:g}s] {' '.join(states)} | "
                f"{', '.join(rates) or 'no probes'} | faults {fired}/{len(sc.faults)}")

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _v(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1e6 else f"{x:.3g}"
    return str(x)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def summary(result: RunResult) -> str:
    sc, mt = result.scenario, result.metrics
    mach = result.machine
    out = [f"scenario {sc.name}: {result.verdict.upper()} after {result.elapsed_s:.2f} s",
           f"machine: pool CPUs {mach['pool_cpus']}, host CPUs {mach['host_cpus']}, "
           + ("OVERSUBSCRIBED (instances share cores; latencies include the scheduler)"
              if mach["oversubscribe"] else "dedicated cores") + ", "
           f"protection {'on' if mach['protection'] else 'OFF'}"]
    drawn = [f"{i['name']} at {i['at']:g}s of random({i['at_random'][0]:g}s, "
             f"{i['at_random'][1]:g}s)" for i in sc.faults + sc.actions if "at_random" in i]
    if drawn:                                           # (draws.py)
        out.append(f"seed {sc.seed}: drew " + ", ".join(drawn))
    if sc.probes:
        rows = [["probe", "kind", "from->to", "sent", "lost", "msgs/s", "p50 us", "p99 us",
                 "max us", "base p50", "base p99"]]
        for p in sc.probes:
            v = mt[p["name"]]
            rows.append([p["name"], p["kind"], f"{p['from']}->{p['to']}", _v(v["sent"]),
                         _v(v["lost"]), _v(v["msgs_per_s"]), _v(v["p50_us"]), _v(v["p99_us"]),
                         _v(v["max_us"]), _v(v["baseline_p50_us"]), _v(v["baseline_p99_us"])])
        out += [""] + _table(rows)
        for p in sc.probes:
            why = mt[p["name"]].get("lost_why") or {}
            if why:     # ETIMEDOUT: no answer in time; ESRCH: the target was not active;
                out.append(f"  {p['name']} lost: " + ", ".join(   # ENOSPC: its ring was full
                    f"{n} {code}" for code, n in sorted(why.items())))
    if sc.faults:
        rows = [["fault", "kind", "target", "at s", "detected", "detect ms", "recover ms",
                 "recorded as"]]
        for f in sc.faults:
            v = mt[f["name"]]
            fired = next((x for x in result.timeline if x["event"] == "fault_fired"
                          and x.get("name") == f["name"]), None)
            rows.append([f["name"], f["kind"], f["target"], _v(fired["t"] if fired else None),
                         "yes" if v["detected"] else ("not fired: " + str(v["error"])
                                                      if not v["fired"] else "no"),
                         _v(v["detect_ms"]), _v(v["recover_ms"]), _v(v["failure_kind"])])
        out += [""] + _table(rows)
    if sc.actions:
        rows = [["action", "do", "target", "done", "took ms", "error"]]
        for a in sc.actions:
            v = mt[a["name"]]
            rows.append([a["name"], a["do"], a["target"], "yes" if v["done"] else "no",
                         _v(v["duration_ms"]), _v(v["error"])])
        out += [""] + _table(rows)
        for a in sc.actions:                            # what a run's program printed
            if a.get("metrics"):
                out.append(f"  {a['name']} printed: " + ", ".join(
                    f"{n} {_v(mt[a['name']].get(n))}" for n in a["metrics"]))
    rows = [["instance", "state", "cpus", "boots", "restarts", "failures", "memory"]]
    for i in sc.instances:
        v = mt[i["name"]]
        mem = "intact" if v["memory_intact"] else (
            "written by " + ", ".join(f"{k} ({n} page{'s' if n != 1 else ''})"
                                      for k, n in v["foreign_writers"].items())
            if v["foreign_writers"] else "mapped by " + ", ".join(v["foreign_mappers"]))
        rows.append([i["name"], v["state"], ",".join(map(str, v["cpus"]))
                     + (" (shared)" if v["shared_cpus"] else ""), _v(v["boots"]),
                     _v(v["restarts"]), _v(v["failures"]), mem])
    out += [""] + _table(rows)
    if result.programs:
        rows = [["program", "instance", "boot", "status", "argv"]]
        for p in result.programs:
            status = p["status"] if not p.get("reason") else f"{p['status']} ({p['reason']})"
            rows.append([str(p["index"]), p["instance"], str(p["generation"]),
                         _v(status)[:80], " ".join(p["argv"])[:80]])
        out += [""] + _table(rows)
    if result.bad_reports:
        out += ["", f"{len(result.bad_reports)} probe report(s) rejected:"] + \
               [f"  {r}" for r in result.bad_reports]
    if sc.expect:
        out.append("")
        for e in result.expectations:
            out.append(f"{'PASS' if e.passed else 'FAIL'}  {e.text}    [{e.detail}]")
    if result.interrupted:
        out += ["", "interrupted (Ctrl-C): figures cover the run up to that point"]
    return "\n".join(out)


def report(result: RunResult) -> dict[str, Any]:
    """The JSON report: scenario, machine actually used, metrics, timeline, verdict."""
    data = result.to_dict()
    data["environment"] = environment()
    data["environment_line"] = environment_line(data["environment"])
    data["series"] = {name: {"windows": [{"t": t, "p50_us": p50, "p99_us": p99, "n": n}
                                         for t, p50, p99, n in rec.windows(result.t0_ns)],
                             "throughput": [{"t": round((at - result.t0_ns) / 1e9, 3), "sent": n}
                                            for at, n in rec.throughput]}
                      for name, rec in result.records.items()}
    return data


def write_report(result: RunResult, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report(result), f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
