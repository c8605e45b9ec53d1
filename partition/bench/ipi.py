"""``mkctl bench ipi``: cross-instance round trips and streaming against raw baselines.

For every ordered pair of distinct cores (a, b) and every delivery mode, a ``role=ping`` echo
instance on a times ``--round-trips`` requests to an echo instance on b, and a ``role=stream``
instance on a sends ``--stream`` one-way 64-byte messages to it. Between the same two cores, in
the same run, bare Python baselines: a shared-memory spin ping-pong, and a blocking ping-pong
through each candidate wake mechanism for a doorbell (eventfd, an AF_UNIX socket pair, a pipe,
a futex on shared memory).
Poll and hybrid modes are compared with the spin baseline; interrupt mode with the fastest
wake-up among the raw ones a doorbell could be, measured beside it in the same repeat
(eventfd, pipe, AF_UNIX: whichever it was; on a VM the wake of a halted vCPU costs every
mechanism alike, and which one wins moves from run to run; the wake-up table says which it
was, and which one the emulator uses).

Targets (issues 13 and 20), judged on the median of the interleaved repeats of every CPU pair:
poll and hybrid p50 <= 2.0 us and <= 6x raw spin; interrupt p50 <= 1.05x the fastest raw
wake-up; streaming >= 1.5M msgs/s in poll and hybrid modes, >= 1.0M in interrupt mode. The bench
exits 1 on a miss, and each miss says how much of it the raw baseline beside it explains
(``explain``). ``--quick`` runs are indicative: printed, never judged (exit 0).
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import itertools
import json
import mmap
import os
import socket
import struct
import sys
import time
from typing import Any

from partition.abi import ring as ring_mod
from partition.bench.echo import RESULTS, read_results
from partition.host.machine import Machine
from partition.stats import environment, environment_line, summary

MODES = ("poll", "interrupt", "hybrid")
#: interrupt mode's baseline: the fastest of WAKE_MECHANISMS in the same repeat and CPU pair
FASTEST_WAKE = "fastest raw wake-up"
BASELINE_OF = {"poll": "raw-spin", "interrupt": FASTEST_WAKE, "hybrid": "raw-spin"}
#: the emulator's doorbell, among the wake mechanisms measured beside it: a pipe
#: (linux.doorbell: a sender can ring it, never read it)
DOORBELL = "raw-pipe"
TARGETS = {"poll_p50_us": 2.0, "poll_ratio": 6.0, "interrupt_ratio": 1.05,
           "stream_poll": 1_500_000, "stream_hybrid": 1_500_000, "stream_interrupt": 1_000_000}
#: the raw spin's p50 on the machine where the absolute targets (us, msgs/s) were set (the
#: project's Intel guest, 2026-11-25: 0.26-0.30 us): an absolute figure is scaled by how much
#: slower the raw spin beside it ran, to say how much of a miss belongs to the machine
REFERENCE_RAW_SPIN_US = 0.30


def tier(a: int, b: int) -> str:
    if a == b:
        return "T0"

    def read(cpu: int, what: str) -> str:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/{what}") as f:
                return f.read().strip()
        except OSError:
            return ""
    if read(a, "core_id") == read(b, "core_id") \
            and read(a, "physical_package_id") == read(b, "physical_package_id"):
        return "T1"
    return "T2" if read(a, "physical_package_id") == read(b, "physical_package_id") else "T3"


# -- raw baselines -------------------------------------------------------------------------
def _pin_child(cpu: int) -> None:
    os.sched_setaffinity(0, [cpu])


def raw_spin(a: int, b: int, n: int) -> list[float]:
    """Round trips by flipping one byte of shared memory, both sides spinning."""
    shm = mmap.mmap(-1, 4096)
    pid = os.fork()
    if pid == 0:
        try:
            _pin_child(b)
            shm[64] = 1                      # ready
            for i in range(n):
                want = (i & 0x7F) | 0x80
                while shm[0] != want:
                    pass
                shm[1] = want
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, [a])
        while shm[64] != 1:
            pass
        out = []
        perf = time.perf_counter_ns
        for i in range(n):
            want = (i & 0x7F) | 0x80
            t0 = perf()
            shm[0] = want
            while shm[1] != want:
                pass
            out.append((perf() - t0) / 1000.0)
        return out
    finally:
        os.waitpid(pid, 0)
        shm.close()


def _raw_blocking(a: int, b: int, n: int, pair: Any, hop: Any) -> list[float]:
    """Round trips through two channels made by ``pair()`` (each (read end, write end)), both
    sides blocking in ``hop``'s read: one wake-up per hop, as a doorbell gives."""
    (ping_r, ping_w), (pong_r, pong_w) = pair(), pair()
    ring, wait = hop
    pid = os.fork()
    if pid == 0:
        try:
            _pin_child(b)
            for _ in range(n):
                wait(ping_r)
                ring(pong_w)
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, [a])
        out = []
        perf = time.perf_counter_ns
        for _ in range(n):
            t0 = perf()
            ring(ping_w)
            wait(pong_r)
            out.append((perf() - t0) / 1000.0)
        return out
    finally:
        os.waitpid(pid, 0)
        for end in {ping_r, ping_w, pong_r, pong_w}:
            if isinstance(end, int):
                os.close(end)
            else:
                end.close()


class FutexWord:
    """A futex on a word of shared memory (made before the fork, so both sides map it): the
    one wake mechanism with no descriptor. Python reaches futex(2) through ctypes, which adds
    about a microsecond a call to a wake-up that costs tens; ``bench ipi`` measures it beside
    the eventfd to see whether the wake itself is cheaper here (it was not: docs/benchmarks.md).
    One writer per word: ``ring`` counts it up and wakes, ``wait`` sleeps while it stands
    where this side last saw it."""

    FUTEX_WAIT, FUTEX_WAKE = 0, 1

    def __init__(self) -> None:
        import ctypes
        self._map = mmap.mmap(-1, mmap.PAGESIZE)        # MAP_SHARED: the child sees it
        self._word = ctypes.c_uint32.from_buffer(self._map)
        self._addr = ctypes.addressof(self._word)
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        # typed: untyped, ctypes would pass the address as a C int, and every wait would
        # fail at once (EFAULT) and spin
        syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        syscall.restype = ctypes.c_long
        self._syscall = syscall
        self._errno = ctypes.get_errno
        self._nr = 202 if os.uname().machine == "x86_64" else 98     # SYS_futex
        self._seen = 0

    def ring(self) -> None:
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF
        self._syscall(self._nr, self._addr, self.FUTEX_WAKE, 1, None, None, 0)

    def wait(self) -> None:
        while self._word.value == self._seen:      # EAGAIN (it moved) and EINTR: look again
            if self._syscall(self._nr, self._addr, self.FUTEX_WAIT, self._seen, None, None,
                             0) < 0 and self._errno() not in (errno.EAGAIN, errno.EINTR):
                raise OSError(self._errno(), "futex wait")      # never a silent spin
        self._seen = self._word.value

    def close(self) -> None:
        del self._word
        self._map.close()


def _futex_pair() -> tuple[FutexWord, FutexWord]:
    w = FutexWord()
    return w, w


def _eventfd_pair() -> tuple[int, int]:
    fd = os.eventfd(0)
    return fd, fd


def _socket_pair() -> tuple[int, int]:
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return r.detach(), w.detach()


#: the wake mechanisms interrupt mode is judged against: those a doorbell can be. A doorbell
#: is waited on with a timeout beside other descriptors and checked by a new host when it
#: adopts an instance, so it must be a descriptor; the futex has none. It is measured and shown
#: all the same, but never the baseline: through ctypes its exchange often misses the sleep
#: altogether (the peer answers within the microsecond a ctypes call takes), and once measured
#: a p50 of 1.8 us here, a spin, not a wake-up
DOORBELL_CANDIDATES = ("raw-eventfd", "raw-pipe", "raw-af-unix")

#: the candidate doorbells: name -> (make a channel, (ring, wait))
WAKE_MECHANISMS: dict[str, tuple[Any, tuple[Any, Any]]] = {
    "raw-eventfd": (_eventfd_pair, (lambda fd: os.eventfd_write(fd, 1), os.eventfd_read)),
    "raw-af-unix": (_socket_pair, (lambda fd: os.write(fd, b"!"), lambda fd: os.read(fd, 1))),
    "raw-pipe": (os.pipe, (lambda fd: os.write(fd, b"!"), lambda fd: os.read(fd, 1))),
    "raw-futex": (_futex_pair, (FutexWord.ring, FutexWord.wait)),
}


# -- the emulator --------------------------------------------------------------------------
def wait_done(m: Machine, name: str, timeout: float, period: float = 0.2) -> tuple[int, float]:
    """Wait for an echo kernel's results: (count, elapsed). Quiet while it measures: the host
    shares a CPU with an instance, so it only looks at the result word and the instance's
    state (no snapshot, no view files) every ``period`` seconds."""
    deadline = time.monotonic() + timeout
    inst = m.instances[name]
    while True:
        done, n, elapsed = read_results(m.read_memory(name, 0, RESULTS.size))
        if done:
            return n, elapsed
        if inst.state.value != "active":
            d = m.show(name)
            # the peer's console too: a failed request often began with the peer's panic
            others = "".join(f"\n{o} ({m.show(o)['state']}):\n{m.console(o)[-1500:]}"
                             for o in m.instances if o != name)
            raise RuntimeError(f"{name} stopped: {d['last_exit']}; console:\n"
                               f"{m.console(name)[-1500:]}{others}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not finish in {timeout:g} s")
        m.poll(period)


def emulated(m: Machine, a: int, b: int, mode: str, n: int, stream: int, size: int) -> dict[str, Any]:
    memory = max(4 << 20, (RESULTS.size + 8 * n + 4095) // 4096 * 4096)
    m.create("echo", cpus=[b], memory="4M")
    m.create("ping", cpus=[a], memory=memory)
    try:
        echo = m.load("echo", "partition.bench.echo:EchoKernel", f"mk_mode={mode}")
        m.exec("echo")
        m.load("ping", "partition.bench.echo:EchoKernel",
               f"role=ping target={echo['id']} count={n} size={size} mk_mode={mode}")
        m.exec("ping")
        count, _ = wait_done(m, "ping", 120)
        raw = m.read_memory("ping", RESULTS.size, 8 * count)
        rtts = list(struct.unpack(f"<{count}d", raw))
        m.kill("ping", force=True)
        m.unload("ping")
        m.delete("ping")              # scrubbed: the stream run starts from a zeroed partition
        m.create("ping", cpus=[a], memory=memory)
        m.load("ping", "partition.bench.echo:EchoKernel",
               f"role=stream target={echo['id']} count={stream} size={size} mk_mode={mode}")
        m.exec("ping")
        got, elapsed = wait_done(m, "ping", 300)
        enospc = struct.unpack_from("<d", m.read_memory("ping", RESULTS.size, 8))[0]
    finally:
        for name in ("ping", "echo"):
            if m.show(name)["state"] == "active":
                m.kill(name, force=True)
            if m.show(name)["state"] in ("loaded", "failed"):
                m.unload(name)
            m.delete(name)
    return {"rtt_us": rtts, "stream_received": got, "stream_sent": stream,
            "stream_seconds": elapsed, "stream_enospc": int(enospc),
            "msgs_per_s": got / elapsed if elapsed > 0 else 0.0}


def baseline_of(mode: str, base: dict[str, dict[str, float]]) -> str:
    """The raw variant a mode's ratio is taken against, among those of one repeat: the spin for
    poll and hybrid; for interrupt mode the wake mechanism with the lowest p50 among those a
    doorbell can be (DOORBELL_CANDIDATES)."""
    if BASELINE_OF[mode] != FASTEST_WAKE:
        return BASELINE_OF[mode]
    return min((name for name in DOORBELL_CANDIDATES if name in base),
               key=lambda name: base[name]["p50"])


def _one_repeat(m: Machine, pairs: list[tuple[int, int]], modes: tuple[str, ...],
                round_trips: int, stream: int, size: int, repeat: int,
                progress: bool) -> list[dict[str, Any]]:
    """Every cell once; ratios against the baselines measured in this same repeat."""
    saved = os.sched_getaffinity(0)
    out: list[dict[str, Any]] = []
    for a, b in pairs:
        base = {"raw-spin": summary(raw_spin(a, b, round_trips))}
        for name, (make, hop) in WAKE_MECHANISMS.items():
            base[name] = summary(_raw_blocking(a, b, round_trips, make, hop))
        os.sched_setaffinity(0, saved)
        for variant, s in base.items():
            out.append({"repeat": repeat, "cpu_a": a, "cpu_b": b, "tier": tier(a, b),
                        "variant": variant, "latency_us": s})
        for mode in modes:
            if progress:
                print(f"\rbench ipi: repeat {repeat}, CPU {a} -> {b}, {mode} ...", end="",
                      file=sys.stderr, flush=True)
            e = emulated(m, a, b, mode, round_trips, stream, size)
            lat = summary(e["rtt_us"])
            baseline = baseline_of(mode, base)
            ref = base[baseline]
            out.append({
                "repeat": repeat, "cpu_a": a, "cpu_b": b, "tier": tier(a, b), "variant": mode,
                "latency_us": lat, "baseline": baseline,
                "baseline_p50_us": ref["p50"],
                "ratio_p50": lat["p50"] / ref["p50"], "ratio_p99": lat["p99"] / ref["p99"],
                "msgs_per_s": e["msgs_per_s"], "stream_enospc": e["stream_enospc"],
                "stream_received": e["stream_received"]})
    return out


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _combine(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's repeats -> the median of each figure (the VM's noise comes in runs, so a
    median of interleaved repeats is what a figure can be trusted to be), and the range."""
    first = cells[0]
    out = {k: first[k] for k in ("cpu_a", "cpu_b", "tier", "variant")}
    out["repeats"] = len(cells)
    out["latency_us"] = {k: _median([c["latency_us"][k] for c in cells])
                         for k in first["latency_us"] if k != "n"}
    out["latency_us"]["n"] = sum(c["latency_us"]["n"] for c in cells)
    out["p50_range_us"] = [min(c["latency_us"]["p50"] for c in cells),
                           max(c["latency_us"]["p50"] for c in cells)]
    for k in ("ratio_p50", "ratio_p99", "msgs_per_s", "stream_enospc"):
        if k in first:
            out[k] = _median([c[k] for c in cells])
    if "baseline" in first:       # for interrupt mode, the fastest wake of each repeat
        names = sorted({c["baseline"] for c in cells})
        out["baseline"] = names[0] if len(names) == 1 else "/".join(names)
        out["stream_received"] = min(c["stream_received"] for c in cells)
        out["ratio_p50_range"] = [min(c["ratio_p50"] for c in cells),
                                  max(c["ratio_p50"] for c in cells)]
        out["baseline_p50_us"] = _median([c["baseline_p50_us"] for c in cells])
        out["baseline_p50_range_us"] = [min(c["baseline_p50_us"] for c in cells),
                                        max(c["baseline_p50_us"] for c in cells)]
    return out


def run(round_trips: int = 10_000, stream: int = 100_000, size: int = 64,
        modes: tuple[str, ...] = MODES, progress: bool = False,
        repeats: int = 3, quick: bool = False) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    pairs = list(itertools.permutations(cpus, 2)) or [(cpus[0], cpus[0])]
    runs: list[dict[str, Any]] = []
    with Machine(cpus=cpus, host_cpus=[cpus[0]], oversubscribe=True, memory="512M",
                 kill_timeout=5.0) as m:
        for r in range(1, repeats + 1):            # interleaved: every cell once per repeat
            runs += _one_repeat(m, pairs, modes, round_trips, stream, size, r, progress)
    if progress:
        print(file=sys.stderr)
    keys = []
    for c in runs:
        k = (c["cpu_a"], c["cpu_b"], c["variant"])
        if k not in keys:
            keys.append(k)
    results = [_combine([c for c in runs if (c["cpu_a"], c["cpu_b"], c["variant"]) == k])
               for k in keys]
    res: dict[str, Any] = {"benchmark": "ipi", "round_trips": round_trips, "stream_messages": stream,
            "payload_bytes": size, "repeats": repeats, "environment": environment(),
            "host_cpu": cpus[0], "oversubscribed": True,
            "ring_implementation": ring_mod.IMPLEMENTATION, "ring_stale": ring_mod.STALE,
            "results": results, "runs": runs,
            "targets": TARGETS, "reference_raw_spin_us": REFERENCE_RAW_SPIN_US, "quick": quick}
    res["judgement"] = judge(res)
    return res


def judge(res: dict[str, Any]) -> dict[str, Any]:
    """Every target against every CPU pair's medians; which wake mechanism was fastest; and for
    each check, how much of a miss the raw baseline beside it explains (``explain``). A quick
    run's checks are worked out and printed, but not judged: ``judged`` is false."""
    t = res["targets"]
    ref_spin = res.get("reference_raw_spin_us", REFERENCE_RAW_SPIN_US)
    cells = {(r["cpu_a"], r["cpu_b"], r["variant"]): r for r in res["results"]}
    checks: list[dict[str, Any]] = []
    for (a, b, variant), r in cells.items():
        pair = f"{a}->{b}"
        spin = cells.get((a, b, "raw-spin"))
        scale = spin["latency_us"]["p50"] / ref_spin if spin else None
        if variant in ("poll", "hybrid"):
            checks.append(explain(f"{variant} p50 {pair}", r["latency_us"]["p50"],
                                  t["poll_p50_us"], "us", scale=scale))
        if variant in ("poll", "hybrid", "interrupt"):
            checks.append(explain(
                f"{variant} ratio {pair}", r["ratio_p50"],
                t["interrupt_ratio" if variant == "interrupt" else "poll_ratio"], "x",
                baseline=r["baseline"], baseline_range=r.get("baseline_p50_range_us")))
        if "msgs_per_s" in r:
            checks.append(explain(f"{variant} stream {pair}", r["msgs_per_s"],
                                  t[f"stream_{variant}"], "msgs/s", scale=scale,
                                  higher_is_better=True))
    verdicts = {c["name"]: c["met"] for c in checks}
    wake = {name: _median([r["latency_us"]["p50"] for r in res["results"]
                           if r["variant"] == name])
            for name in WAKE_MECHANISMS
            if any(r["variant"] == name for r in res["results"])}
    return {"verdicts": verdicts, "checks": checks, "met": all(verdicts.values()),
            "judged": not res.get("quick", False), "wake_p50_us": wake,
            "fastest_wake": min(wake, key=lambda k: wake[k]) if wake else None,
            "doorbell": DOORBELL}


def explain(name: str, figure: float, target: float, unit: str, *,
            scale: float | None = None, baseline: str | None = None,
            baseline_range: list[float] | None = None,
            higher_is_better: bool = False) -> dict[str, Any]:
    """One check, and how much of a miss the raw baseline beside it explains
    (``explained``, 0..1, None when nothing measured can say).

    An absolute target (us, msgs/s) was set on a machine where the raw spin took
    REFERENCE_RAW_SPIN_US; ``scale`` is how much slower the raw spin beside this figure ran.
    Scaled by it, the target is what this machine could be asked for; the share of the miss
    between the target and the scaled target belongs to the machine. A ratio target already
    divides by its baseline: what the baseline can still explain is its own movement between
    the interleaved repeats (``baseline_range``, p50s in us), a noise the ratio inherits."""
    met = figure >= target if higher_is_better else figure <= target
    out: dict[str, Any] = {"name": name, "figure": figure, "target": target, "unit": unit,
                           "met": met, "explained": None, "why": ""}
    if met:
        return out
    if unit != "x":
        if scale is None:
            out["why"] = "no raw spin beside it to scale the target by"
            return out
        scaled = target / scale if higher_is_better else target * scale
        share = (target - scaled) / (target - figure) if higher_is_better \
            else (scaled - target) / (figure - target)
        out["explained"] = min(1.0, max(0.0, share))
        out["why"] = (f"the raw spin beside it ran {scale:.2f}x its time where the target was "
                      f"set; scaled by it the target is {_fmt(scaled, unit)}, so the machine "
                      f"explains {_share(out['explained'])} of the miss")
        return out
    over = figure / target - 1.0
    if not baseline_range or baseline_range[0] <= 0:
        out["why"] = f"{over:.1%} over; no baseline beside it"
        return out
    lo, hi = baseline_range
    if hi == lo:
        out["why"] = (f"{over:.1%} over; one repeat, so how much {baseline} itself moves "
                      f"between repeats is not known here (--repeat 3 says)")
        return out
    noise = hi / lo - 1.0
    out["explained"] = min(1.0, noise / over)
    out["why"] = (f"{over:.1%} over; {baseline} beside it moved {noise:.1%} between repeats "
                  f"({lo:.2f}-{hi:.2f} us), so the raw baseline explains "
                  f"{_share(out['explained'])} of the miss"
                  + ("" if noise >= over else f" and {over - noise:.1%} is the emulator's"))
    return out


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}" if unit == "msgs/s" else f"{value:.2f} {unit}"


def _share(fraction: float) -> str:
    return "all" if fraction >= 1.0 else "none" if fraction <= 0.0 else f"{fraction:.0%}"


def _implementation(res: dict[str, Any]) -> str:
    if res.get("ring_implementation") == "c":
        return "C (partition/abi/_fastring.c: _ring.c, _message.c, _port.c, _waiter.c)"
    if res.get("ring_stale"):
        return "pure Python (the C extension is STALE, built from another source: pip install -e .)"
    return "pure Python (no C extension built, or MK_PURE_RING=1)"


def render(res: dict[str, Any]) -> str:
    lines = [f"IPI round trips ({res['round_trips']} per cell and repeat, "
             f"{res['payload_bytes']}-byte payload) and one-way streaming "
             f"({res['stream_messages']} messages); each figure is the median of "
             f"{res['repeats']} interleaved repeat(s), ratios taken within a repeat",
             f"machine: {environment_line(res['environment'])}",
             f"host on CPU {res['host_cpu']} (shared with an instance: oversubscribed); ring "
             f"hot paths in {_implementation(res)}",
             "{:<8}{:<13}{:>9}{:>9}{:>9}{:>9}{:>10}{:>10}{:>12}".format(
                 "cpus", "variant", "p50 us", "p90", "p99", "p99.9", "max", "x base", "msgs/s")
             + "   p50 range"]
    for r in res["results"]:
        lat = r["latency_us"]
        lo, hi = r["p50_range_us"]
        lines.append("{:<8}{:<13}{:>9.2f}{:>9.2f}{:>9.2f}{:>9.2f}{:>10.1f}{:>10}{:>12}".format(
            f"{r['cpu_a']}->{r['cpu_b']}", r["variant"], lat["p50"], lat["p90"], lat["p99"],
            lat["p99.9"], lat["max"],
            f"{r['ratio_p50']:.2f}x" if "ratio_p50" in r else "-",
            f"{r['msgs_per_s']:,.0f}" if "msgs_per_s" in r else "-")
            + f"   {lo:.2f}-{hi:.2f}")
    t = res["targets"]
    j = res["judgement"]
    wake = j["wake_p50_us"]
    lines.append("wake-up per hop, bare (p50 round trip, us): " + ", ".join(
        f"{k[4:]} {v:.1f}" for k, v in sorted(wake.items(), key=lambda kv: kv[1]))
        + f"; the emulator's doorbell is {j['doorbell'][4:]}"
        + ("" if j["fastest_wake"] == j["doorbell"]
           else f" ({j['fastest_wake'][4:]} woke faster here)"))
    lines.append(f"targets: poll and hybrid p50 <= {t['poll_p50_us']} us and <= "
                 f"{t['poll_ratio']}x raw-spin; interrupt p50 <= {t['interrupt_ratio']}x "
                 f"the fastest raw doorbell wake-up beside it (eventfd, pipe, af-unix); "
                 f"stream >= {t['stream_poll']:,} msgs/s (poll, hybrid), >= "
                 f"{t['stream_interrupt']:,} (interrupt)")
    missed = [c for c in j["checks"] if not c["met"]]
    if not j["judged"]:
        lines.append("--quick: these figures are indicative (fewer round trips, "
                     f"{res['repeats']} repeat(s)) and judge nothing; run without --quick "
                     "to judge the targets")
        lines += [f"  would miss {c['name']}: {_fmt(c['figure'], c['unit'])} against "
                  f"{_fmt(c['target'], c['unit'])}; {c['why']}" for c in missed]
        return "\n".join(lines)
    if not missed:
        lines.append("all met")
        return "\n".join(lines)
    lines.append("MISSED: " + "; ".join(c["name"] for c in missed))
    lines += [f"  {c['name']}: {_fmt(c['figure'], c['unit'])} against "
              f"{_fmt(c['target'], c['unit'])}; {c['why']}" for c in missed]
    return "\n".join(lines)


def render_csv(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["test", "variant", "tier", "cpu_a", "cpu_b", "mem_node", "size", "repeat",
                "metric", "value", "unit"])
    for r in res["runs"]:                # every repeat, numbered: the raw data, not medians
        for metric in ("p50", "p90", "p99", "p99.9", "max"):
            w.writerow(["ipi_rtt", r["variant"], r["tier"], r["cpu_a"], r["cpu_b"], 0,
                        res["payload_bytes"], r["repeat"], metric,
                        f"{r['latency_us'][metric]:.3f}", "us"])
        if "msgs_per_s" in r:
            w.writerow(["ipi_stream", r["variant"], r["tier"], r["cpu_a"], r["cpu_b"], 0,
                        res["payload_bytes"], r["repeat"], "throughput",
                        f"{r['msgs_per_s']:.0f}", "msgs/s"])
    return buf.getvalue()


def main(a: argparse.Namespace) -> int:
    if a.round_trips < 10_000 and not a.quick:
        print("mkctl bench: error: --round-trips must be at least 10000 for a p99.9 worth quoting "
              "[EINVAL]\n  fix: --round-trips 10000 or more (or --quick for a smoke run)",
              file=sys.stderr)
        return 1
    repeats = a.repeat if a.repeat is not None else (1 if a.quick else 3)
    if repeats < 1:
        print("mkctl bench: error: --repeat must be at least 1 [EINVAL]\n  fix: --repeat 3",
              file=sys.stderr)
        return 1
    res = run(a.round_trips, a.stream, 64, progress=sys.stderr.isatty(), repeats=repeats,
              quick=a.quick)
    if a.format == "json":
        print(json.dumps(res, indent=2))
    elif a.format == "csv":
        sys.stdout.write(render_csv(res))
    else:
        print(render(res))
    j = res["judgement"]        # a missed target it printed is a failure; a quick run judges none
    return 0 if j["met"] or not j["judged"] else 1
