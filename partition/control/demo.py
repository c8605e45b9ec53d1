"""``mkctl demo``: the built-in default run, one screen that shows what the emulator does.

It carves the workstation into a host and two partitions, boots a counter kernel and an idle
kernel as pinned processes, kills the counter from outside as a crash would, shows the host
noticing and the console surviving, reboots it (the count resumes: partition memory survives a
halt), and tears everything down, checking that nothing is left. Every claim it prints is
checked as it goes; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import psutil

from kernels.counter import read_count
from partition.abi import message as M
from partition.control.show import render_show
from partition.host.machine import Machine
from partition.terminal import printable
from partition.units import format_cpulist


class Demo:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def step(self, text: str) -> None:
        print(f"\n== {text}")

    def check(self, ok: bool, text: str) -> None:
        print(f"   [{'ok' if ok else 'FAILED'}] {text}")
        if not ok:
            self.failures.append(text)


def _wait_count(m: Machine, name: str, at_least: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    n = read_count(m.read_memory(name, 0, 24))
    while n < at_least and time.monotonic() < deadline:
        m.poll(0.02)
        n = read_count(m.read_memory(name, 0, 24))
    return n


def main(a: argparse.Namespace | None = None) -> int:
    d = Demo()
    cpus = sorted(os.sched_getaffinity(0))
    host = [cpus[0]]
    pool = cpus[1:] or cpus
    oversub = len(pool) < 2 or pool == cpus
    if oversub:
        pool = cpus
    d.step(f"machine: host (instance 0) on CPU {cpus[0]}, pool CPUs {format_cpulist(pool)}, 256M")
    if oversub:
        print(f"   only {len(cpus)} host cores: running OVERSUBSCRIBED, instances share cores "
              "(explicit, and shown in every view)")
    with Machine(cpus=pool, host_cpus=host, memory="256M", oversubscribe=oversub) as m:
        run_dir = m.run_dir
        print(f"   run directory {run_dir} (proc/kimage, sys/fs/multikernel/, events.log)")
        d.step("create two partitions, load a counter and an echo kernel, boot them")
        m.create("counter", cpus=[pool[-1]], memory="64M")
        m.create("echo", cpus=[pool[0]], memory="16M")
        m.load("counter", "kernels.counter:CounterKernel", "interval=0.002 report=100")
        m.load("echo", "kernels.echo:EchoKernel")
        t0 = time.perf_counter()
        c = m.exec("counter")
        boot_ms = (time.perf_counter() - t0) * 1e3
        i = m.exec("echo")
        print(f"   counter booted in {boot_ms:.2f} ms (pid {c['pid']})")
        for inst in (c, i):
            aff = psutil.Process(inst["pid"]).cpu_affinity()
            d.check(aff == inst["cpus"], f"{inst['name']} pid {inst['pid']} pinned to CPUs {aff}")
        print(render_show(m.snapshot()).rstrip().replace("\n", "\n   ").join(["   ", ""]))
        print("   proc/kimage:")
        with open(os.path.join(run_dir, "proc", "kimage")) as f:
            print("".join("     " + line for line in f))

        d.step("IPIs: the host pings the echo instance through its ring")
        rtts = []
        for k in range(200):
            t = time.perf_counter()
            ok = m.request("echo", M.MK_MSG_USER, k, timeout=5) == k
            rtts.append((time.perf_counter() - t) * 1e6)
            if not ok:
                break
        rtts.sort()
        d.check(len(rtts) == 200, f"200 request/response round trips, p50 {rtts[len(rtts) // 2]:.0f} us "
                                  "(interrupt mode: the echo sleeps on its doorbell)")

        d.step("the counter works in its own partition")
        n = _wait_count(m, "counter", 200)
        d.check(n >= 200, f"count read from the partition by the host: {n}")

        d.step("crash: SIGKILL the counter from outside")
        os.kill(c["pid"], signal.SIGKILL)
        t_kill = time.perf_counter()
        rec = m.wait_for("counter", "loaded", timeout=5)
        print(f"   host noticed after {(time.perf_counter() - t_kill) * 1e3:.2f} ms (pidfd)")
        d.check(rec["last_exit"]["signal_name"] == "SIGKILL",
                f"recorded: {rec['last_exit']['reason']}; state {rec['state']}")
        host_log = m.console("host").strip().splitlines()[-1]
        print(printable(f"   host console: {host_log}"))
        d.check("halted, CPUs parking in pool" in host_log, "host logged the halt")
        d.check(m.show("echo")["state"] == "active", "the echo instance kept running")
        tail = m.console("counter").strip().splitlines()[-2:]
        print(printable("   counter console after death:\n" + "\n".join("     " + t for t in tail)))
        d.check(bool(tail), "console readable after death")

        d.step("reboot the counter: its partition survived the halt")
        before = read_count(m.read_memory("counter", 0, 24))
        m.exec("counter")
        after = _wait_count(m, "counter", before + 50)
        d.check(after > before, f"count resumed from {before} and reached {after}")

        d.step("graceful halt of everything, then teardown")
        for name in ("counter", "echo"):
            r = m.kill(name)
            d.check(r["last_exit"]["how"] == "graceful", f"{name}: {r['last_exit']['reason']}")
        pids = [c["pid"], i["pid"]]
    d.check(not os.path.exists(run_dir), "run directory removed")
    d.check(not psutil.Process().children(recursive=True), "no child process left")
    d.check(not any(psutil.pid_exists(p) for p in pids), "instance processes gone")
    print()
    if d.failures:
        print(f"demo: {len(d.failures)} check(s) FAILED: {d.failures}")
        return 1
    print("demo: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
