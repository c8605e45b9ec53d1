"""``mkctl bench boot``: start -> active latency against a raw fork + pin + handshake.

The baseline does the irreducible part of a boot in the same process, the same way: fork, pin
the child to the target CPU, the child signals an eventfd, the parent wakes. The emulator's boot
wakes the instance's process, parked since ``load`` with its image imported (the trampoline's
mapping and containment happened then): it answers the spawn mailbox, and the host does its
bookkeeping (state, table, views, event log). Timed: ``exec --no-wait``, the real system's
answer; the next incarnation is resident before each boot. Runs alternate one of each so that
load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from partition.host.machine import Machine
from partition.stats import environment, environment_line, summary

TARGET_RATIO = 1.5


def raw_boot_once(cpu: int, efd: int) -> float:
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, [cpu])
            os.eventfd_write(efd, 1)
        finally:
            os._exit(0)
    os.eventfd_read(efd)
    t1 = time.perf_counter_ns()
    os.waitpid(pid, 0)
    return (t1 - t0) / 1e6


def run(boots: int = 100, cpu: int | None = None, progress: bool = False) -> dict[str, Any]:
    if boots < 1:
        raise ValueError("boots must be >= 1")
    affinity = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = affinity[-1]
    shared = cpu == 0 or len(affinity) == 1
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    raw: list[float] = []
    emu: list[float] = []
    try:
        with Machine(cpus=[cpu], memory="64M", host_cpus=None if shared else "0",
                     oversubscribe=shared) as m:
            m.create("bench", cpus=[cpu], memory="16M")
            m.load("bench", "kernels.idle:IdleKernel")
            for i in range(boots):
                raw.append(raw_boot_once(cpu, efd))
                # the image is resident (its process imported it and parked) before the clock
                # starts: what is timed is the boot, start -> active, not the load
                deadline = time.monotonic() + 30
                while not m.show("bench")["resident"] and time.monotonic() < deadline:
                    m.poll(0.005)
                t0 = time.perf_counter_ns()
                m.exec("bench", wait=False)
                emu.append((time.perf_counter_ns() - t0) / 1e6)
                m.kill("bench", force=True)
                if progress and (i % 10 == 9 or i == boots - 1):
                    print(f"\rboot bench: {i + 1}/{boots}", end="", file=sys.stderr, flush=True)
    finally:
        os.close(efd)
        if progress:
            print(file=sys.stderr)
    r, e = summary(raw), summary(emu)
    return {
        "benchmark": "boot", "cpu": cpu, "boots": boots, "unit": "ms",
        "environment": environment(),
        "raw_fork_pin_handshake_ms": r, "exec_to_active_ms": e,
        "ratio_p50": e["p50"] / r["p50"], "ratio_p99": e["p99"] / r["p99"],
        "target_ratio_p50": TARGET_RATIO, "meets_target": e["p50"] / r["p50"] <= TARGET_RATIO,
    }


def render(res: dict[str, Any]) -> str:
    r, e = res["raw_fork_pin_handshake_ms"], res["exec_to_active_ms"]
    row = "{:<28}{:>9.3f}{:>9.3f}{:>9.3f}{:>9.3f}"
    lines = [
        f"boot latency, {res['boots']} boots on CPU {res['cpu']}",
        f"machine: {environment_line(res['environment'])}",
        "{:<28}{:>9}{:>9}{:>9}{:>9}".format("ms", "p50", "p90", "p99", "max"),
        row.format("raw fork+pin+handshake", r["p50"], r["p90"], r["p99"], r["max"]),
        row.format("mkctl start -> active", e["p50"], e["p90"], e["p99"], e["max"]),
        f"ratio p50 {res['ratio_p50']:.2f}x, p99 {res['ratio_p99']:.2f}x "
        f"(target p50 <= {res['target_ratio_p50']:g}x: {'met' if res['meets_target'] else 'MISSED'})",
    ]
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    if a.boots < 50:
        print("mkctl bench: error: --boots must be at least 50 for a p99 worth quoting [EINVAL]\n"
              "  fix: --boots 50 or more", file=sys.stderr)
        return 1
    res = run(a.boots, a.cpu, progress=sys.stderr.isatty())
    print(json.dumps(res, indent=2) if a.format == "json" else render(res))
    return 0 if res["meets_target"] else 1      # a missed target it printed is a failure
