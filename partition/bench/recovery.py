"""``mkctl bench recovery``: kill a restarting echo instance again and again.

For each kill: kill -> detected (the host's pidfd handler starts), and kill -> active again and
answering an IPI. Each kill comes once the instance's next incarnation is parked (the host forks
it while the instance runs), as ``bench boot`` starts its clock once the image is resident.
Baselines in the same run, alternating with the kills: SIGKILL of a bare forked Python child ->
its pidfd readable, and a raw boot (fork + pin + handshake, as ``bench boot`` measures it).
Targets, as ratios to them (an absolute figure on a shared VM measures the VM): detection p50
<= 1.3x the raw pidfd notice (issue 20); kill -> answering again p50 <= 1.5x (raw pidfd notice +
raw boot).

A third baseline says how much of a detection miss is the machine's: the same bare child, but
holding as many private pages as the killed instance held (read from its smaps just before the
kill). The kernel frees a dying process's memory before it makes its pidfd readable, and a
Python kernel that ran owns a few MB a bare fork does not (0.25 us a page on the project VM);
the target scaled by that child's notice is what the machine allows, and a miss says how much
of it that explains.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Any

from partition.abi import message as M
from partition.bench.boot import raw_boot_once
from partition.host.machine import Machine
from partition.stats import environment, environment_line, summary

TARGETS = {"detect_ratio": 1.3, "recover_ratio": 1.5}


def private_bytes(pid: int) -> int:
    """Pages only this process maps (Private_Clean + Private_Dirty of its smaps): what the
    kernel frees when it dies, before its pidfd says so. 0 when it cannot be read."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def raw_pidfd_once(cpu: int, hold: int = 0) -> float:
    """SIGKILL of a bare forked child on ``cpu`` -> its pidfd readable, ms; with ``hold``, the
    child first writes that many bytes of fresh memory (its own pages, as an instance's)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, [cpu])
            if hold:
                own = bytearray(hold)
                for at in range(0, hold, 4096):
                    own[at] = 1
            os.write(w, b"!")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    fd = os.pidfd_open(pid)
    try:
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        select.select([fd], [], [], 10)
        dt = (time.perf_counter() - t0) * 1e3
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return dt


def run(kills: int = 50, progress: bool = False) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    detect, recover, raw, raw_boot, raw_sized = [], [], [], [], []
    held: list[float] = []
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    with Machine(cpus=cpus, host_cpus=[cpus[0]], oversubscribe=True, memory="64M",
                 kill_timeout=5.0) as m:
        m.create("victim", cpus=[cpu], memory="4M", recovery="restart",
                 max_restarts=kills + 1, restart_window=3600)
        m.load("victim", "partition.bench.echo:EchoKernel")
        m.exec("victim")
        m.request("victim", M.MK_MSG_USER, 0, timeout=5)
        for i in range(kills):
            raw.append(raw_pidfd_once(cpu))
            raw_boot.append(raw_boot_once(cpu, efd))
            # a restarting instance's next incarnation is parked while it runs: the kill comes
            # once it is (a failure moments after a boot waits for that load, faults.md)
            deadline = time.monotonic() + 30
            while not m.show("victim")["resident"] and time.monotonic() < deadline:
                m.poll(0.005)
            before = m.show("victim")["counters"]["restarts"]
            pid = m.instances["victim"].pid
            held.append(float(private_bytes(pid)) if pid else 0.0)
            raw_sized.append(raw_pidfd_once(cpu, int(held[-1])))
            t0 = time.perf_counter()
            m.fault("victim", "kill")
            while True:      # drive the host until the restart happened and it answers
                m.poll(0.01)
                d = m.describe(m.instances["victim"])
                if d["counters"]["restarts"] > before and d["state"] == "active":
                    break
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError(f"no recovery after 10 s: {d['state']} {d['failure']}")
            m.request("victim", M.MK_MSG_USER, i, timeout=5)
            recover.append((time.perf_counter() - t0) * 1e3)
            detect.append(m.instances["victim"].failures[-1]["detect_ms"])
            if progress:
                print(f"\rbench recovery: {i + 1}/{kills}", end="", file=sys.stderr, flush=True)
    os.close(efd)
    if progress:
        print(file=sys.stderr)
    keep = ("p50", "p99", "max")
    res: dict[str, Any] = {"benchmark": "recovery", "kills": kills, "cpu": cpu,
                           "environment": environment(),
                           "detect_ms": {k: summary(detect)[k] for k in keep},
                           "recover_ms": {k: summary(recover)[k] for k in keep},
                           "baseline_pidfd_ms": {k: summary(raw)[k] for k in keep},
                           "baseline_pidfd_sized_ms": {k: summary(raw_sized)[k] for k in keep},
                           "instance_private_mb": summary(held)["p50"] / 2**20,
                           "baseline_boot_ms": {k: summary(raw_boot)[k] for k in keep},
                           "targets": TARGETS}
    v = judge(res["detect_ms"]["p50"], res["recover_ms"]["p50"],
              res["baseline_pidfd_ms"]["p50"], res["baseline_boot_ms"]["p50"],
              res["baseline_pidfd_sized_ms"]["p50"])
    res.update(detect_ratio=v["detect_ratio"], recover_ratio=v["recover_ratio"],
               detect_explained=v["detect_explained"], meets_targets=v["met"])
    return res


def judge(detect: float, recover: float, raw_pidfd: float, raw_boot: float,
          raw_pidfd_sized: float) -> dict[str, Any]:
    """The targets from the p50s (ms). ``detect_explained``: of a detection miss, the share the
    bare child as big as the instance accounts for (the target scaled by its notice over the
    bare one's); None when detection met its target."""
    detect_ratio = detect / raw_pidfd
    recover_ratio = recover / (raw_pidfd + raw_boot)
    limit = TARGETS["detect_ratio"] * raw_pidfd
    explained = None
    if detect > limit:
        scaled = TARGETS["detect_ratio"] * raw_pidfd_sized
        explained = min(1.0, max(0.0, (scaled - limit) / (detect - limit)))
    return {"detect_ratio": detect_ratio, "recover_ratio": recover_ratio,
            "detect_explained": explained,
            "met": detect_ratio <= TARGETS["detect_ratio"]
            and recover_ratio <= TARGETS["recover_ratio"]}


def render(res: dict[str, Any]) -> str:
    row = "{:<34}{:>9.3f}{:>9.3f}{:>9.3f}"
    lines = [
        f"recovery of a restarting echo instance, {res['kills']} kills on CPU {res['cpu']}",
        f"machine: {environment_line(res['environment'])}",
        "{:<34}{:>9}{:>9}{:>9}".format("ms", "p50", "p99", "max"),
        row.format("raw SIGKILL -> pidfd readable", *res["baseline_pidfd_ms"].values()),
        row.format(f"  the same, child holding {res['instance_private_mb']:.1f} MB",
                   *res["baseline_pidfd_sized_ms"].values()),
        row.format("raw fork + pin + handshake", *res["baseline_boot_ms"].values()),
        row.format("kill -> detected by the host", *res["detect_ms"].values()),
        row.format("kill -> active and answering", *res["recover_ms"].values()),
        f"detection p50 {res['detect_ratio']:.2f}x the raw pidfd notice (target <= "
        f"{TARGETS['detect_ratio']:g}x); recovery p50 {res['recover_ratio']:.2f}x raw pidfd + "
        f"raw boot (target <= {TARGETS['recover_ratio']:g}x): "
        f"{'met' if res['meets_targets'] else 'MISSED'}",
    ]
    if res["detect_explained"] is not None:
        sized = res["baseline_pidfd_sized_ms"]["p50"] / res["baseline_pidfd_ms"]["p50"]
        share = res["detect_explained"]
        lines.append(
            f"  detection missed: a bare child holding the instance's {res['instance_private_mb']:.1f}"
            f" MB of private memory is noticed {sized:.2f}x as late as the bare one (the kernel "
            f"frees it first), so the raw baseline explains "
            f"{'all' if share >= 1 else f'{share:.0%}'} of the miss")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    if a.kills < 50:
        print("mkctl bench: error: --kills must be at least 50 [EINVAL]\n  fix: --kills 50 or more",
              file=sys.stderr)
        return 1
    res = run(a.kills, progress=sys.stderr.isatty())
    print(json.dumps(res, indent=2) if a.format == "json" else render(res))
    return 0 if res["meets_targets"] else 1      # a missed target it printed is a failure
