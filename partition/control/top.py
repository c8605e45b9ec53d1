"""``mkctl top``: a live view of the machine, one row per instance, like top(1).

It only reads: the supervisor's ``show`` (a read-only op; it drives no instance) and, for CPU
use, each process's times from /proc through psutil. Rates are differences between two reads, so
the first frame of ``--once`` takes two reads ``interval`` apart. The time since a kernel's loop
last moved is the host's, which looks every 0.1 s: a kernel that is ``active`` but has not moved
for seconds is stopped or spinning outside its loop, and PROGRESS shows it, watchdog or not.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psutil
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from partition.control.client import Client
from partition.control.show import SHARED_NOTE, format_metrics
from partition.terminal import printable
from partition.units import format_cpulist, format_size

COLUMNS = ("id", "name", "state", "cpus", "memory", "pid", "cpu%", "rx/s", "tx/s", "ring-full",
           "progress", "restarts", "failures", "last-exit", "metrics")
SORT_KEYS = ("id", "name", "state", "cpu%", "rx/s", "tx/s", "progress", "restarts")


class Sampler:
    """Two reads make a frame: counters' rates, CPU use, progress age."""

    def __init__(self, run_dir: str | None) -> None:
        self.client = Client(run_dir)
        self.last: dict[int, dict[str, Any]] = {}
        self.cpu: dict[int, tuple[float, float]] = {}       # pid -> (cpu seconds, when)

    def read(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        snap = self.client.call("show")
        now = time.monotonic()
        rows = []
        for i in snap["instances"]:
            prev = self.last.get(i["id"])
            c = i["counters"]
            dt = now - prev["_t"] if prev else 0.0
            rx, tx = (self._rate(c, prev, k, dt) for k in ("ipi_received", "ipi_sent"))
            age = i.get("progress_age_s")        # the host watches every kernel's loop
            rows.append({
                "id": i["id"], "name": i["name"], "state": i["state"],
                # "*": a CPU shared with another instance or the host, as show marks it
                "cpus": format_cpulist(i["cpus"]) + ("*" if i["shared_cpus"] else ""),
                "memory": format_size(i["memory_total"]),
                "pid": i["pid"], "cpu%": self._cpu(i["pid"], now), "rx/s": rx, "tx/s": tx,
                "ring-full": c.get("ipi_ring_full", 0),
                "progress": age if i["state"] == "active" else None,
                # its kernel's word that it sleeps on its doorbell, unless its process is
                # stopped (a SIGSTOP in that sleep leaves the word set)
                "idle": bool(i.get("waiting")) and not self._stopped(i["pid"]),
                "restarts": c.get("restarts", 0), "failures": i["failures"],
                "last-exit": (i["last_exit"] or {}).get("how") or "-",
                # what its kernel published (Kernel.metric), as show NAME says it
                "metrics": format_metrics(i.get("metrics") or {}) or "-",
            })
            self.last[i["id"]] = {**i, "_t": now}
        return snap, rows

    @staticmethod
    def _rate(c: dict[str, int], prev: dict[str, Any] | None, key: str, dt: float) -> float | None:
        """Per second since the last read; None on the first read or across a restart (the
        counters of a new run start again)."""
        if not prev or dt <= 0:
            return None
        delta = c.get(key, 0) - prev["counters"].get(key, 0)
        return delta / dt if delta >= 0 else None

    @staticmethod
    def _stopped(pid: int | None) -> bool:
        try:
            return bool(pid) and psutil.Process(pid).status() in (psutil.STATUS_STOPPED,
                                                                 psutil.STATUS_TRACING_STOP)
        except psutil.Error:
            return False

    def _cpu(self, pid: int | None, now: float) -> float | None:
        if not pid:
            return None
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        used = t.user + t.system
        before = self.cpu.get(pid)
        self.cpu[pid] = (used, now)
        if before is None or now <= before[1]:
            return None
        return 100.0 * (used - before[0]) / (now - before[1])


def _cell(v: Any, col: str) -> str:
    """A cell as text; whatever a kernel may have written is escaped (terminal.py)."""
    return printable(_text(v, col), one_line=True)


def _text(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if col in ("cpu%", "rx/s", "tx/s"):
        return f"{v:,.0f}" if col != "cpu%" else f"{v:.1f}"
    if col == "progress":
        return "now" if v < 1.0 else f"{v:.0f}s ago"
    return str(v)


def frame(snap: dict[str, Any], rows: list[dict[str, Any]], sort: str) -> Table:
    m, pool = snap["machine"], snap["pool"]
    title = (f"mkctl top  {m['run_dir']}  host pid {m['supervisor_pid']}  pool CPUs "
             f"{format_cpulist(pool['cpus'])}  free {format_size(pool['memory_available'])}  "
             f"{len(rows)} instance(s)  sort: {sort}")
    shared = any("*" in r["cpus"] for r in rows)
    table = Table(title=title, title_justify="left", box=None, pad_edge=False,
                  caption=SHARED_NOTE if shared else None, caption_justify="left")
    for col in COLUMNS:
        table.add_column(col.upper(), justify="right" if col in ("id", "pid", "cpu%", "rx/s",
                                                               "tx/s", "ring-full",
                                                               "restarts", "failures")
                         else "left", no_wrap=True)
    reverse = sort in ("cpu%", "rx/s", "tx/s", "progress", "restarts")
    ordered = sorted(rows, key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0),
                     reverse=False)
    if reverse:
        ordered = sorted(rows, key=lambda r: r[sort] if r[sort] is not None else -1, reverse=True)
    for r in ordered:
        # a loop that stood still is yellow, unless its kernel sleeps on its doorbell: idle
        style = "bold red" if r["state"] == "failed" else \
            ("yellow" if r["progress"] is not None and r["progress"] > 2 and not r["idle"]
             else None)
        # Text, not str: a cell is never read as rich markup ("[link=...]" would be OSC 8)
        table.add_row(*(Text(_cell(r[c], c) + (" idle" if c == "progress" and r["idle"]
                                               and r[c] is not None and r[c] >= 1.0 else ""))
                        for c in COLUMNS), style=style)
    return table


def main(a: argparse.Namespace) -> int:
    sampler = Sampler(a.run_dir)
    sampler.read()                       # the first read: rates need a second one
    time.sleep(a.interval)
    if a.once:
        snap, rows = sampler.read()
        Console(width=200, force_terminal=False).print(frame(snap, rows, a.sort))
        return 0
    console = Console()
    try:
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                snap, rows = sampler.read()
                live.update(frame(snap, rows, a.sort), refresh=True)
                time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
