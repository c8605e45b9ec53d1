"""``mkctl bench userland``: programs inside an instance's userland against the same on the host.

What it weighs: the userland's namespaces, cgroups and seccomp filter (guest/userland.py) on the
paths a program's speed hangs on. One machine with one running instance; each figure is the
same script run by the same interpreter, inside a fresh userland of that instance (its cgroups,
its CPU, its namespaces, its filter) and as a plain host process pinned to the same CPU, beside
it: runs alternate one host, one userland, so that load on the machine hits both alike, and the
medians are compared.

* **fork+exec**: fork, ``execv("/bin/true")``, waitpid, in a loop (a shell's hottest path).
  Target: the userland's rate at least 0.9x the host's.
* **sequential write** and **mmap write**: a file written in 1 MiB blocks, then a file of the
  same size written through a shared mapping; inside, in a shared region of the machine
  (host/shared.py: a tmpfs the machine owns, bound at ``/mnt/shared/bench``, its pages charged
  to the instance's memory cgroup as the writer's), on the host, in ``/dev/shm``. Target: at
  least 0.9x each. Both are tmpfs: what is weighed is the userland's way to the region (the
  bind mount, the cgroup's charge, the filter), not a different medium.

* **boot to first answer**: the instance is started (``start``: its kernel boots, the host
  starts its userland, whose init starts its boot program) and the bench asks the boot program
  on a unix socket until it answers; beside it, the same program is fork+exec'd raw on the host
  and asked the same way. The socket is in the machine's shared region (a tmpfs the host sees
  too): inside at ``/mnt/shared/bench/boot.sock``, on the host beside it, so the bench reaches
  both by the same path lookup, the same connect and the same question, polled at the same
  interval. The program answers with its host name, which inside is the instance's (its UTS
  namespace): an answer from anything but the instance's userland is refused. Target: at most
  1.5x the host's time. Each round is one boot (the instance is force-halted before the next).

``main`` exits 1 on a miss it prints; ``--quick`` allows tiny counts and judges nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from partition.guest import userland
from partition.host.machine import Machine
from partition.stats import environment, environment_line

TARGET_RATIO = 0.9
PYTHON = os.path.realpath(sys.executable)          # not a shim script: a shim forks
#: the figures, each a rate (more is better) judged against TARGET_RATIO
FIGURES = {"fork_exec": ("fork+exec /bin/true", "/s"),
           "write": ("sequential write", " MiB/s"),
           "mmap": ("mmap write", " MiB/s")}
#: the figures that are times (less is better), each judged against BOOT_TARGET_RATIO
TIMES = {"boot": ("boot to first answer", " ms")}
#: the instance's boot to its program's first answer: at most this many times the host's
BOOT_TARGET_RATIO = 1.5
#: the boot program's socket: its name in the shared region, inside and on the host
BOOT_SOCKET, HOST_SOCKET = "boot.sock", "boot-host.sock"
#: how long the bench waits between two questions to a program not answering yet (both sides)
ASK_EVERY_S = 0.001
#: how long the machine is driven after a halt before a boot is timed (``settle``)
SETTLE_S = 0.15
#: how long a boot may take to answer before the run is refused
ANSWER_WITHIN_S = 30.0
#: the smallest counts a judged run accepts (below them a ratio is noise)
MIN_LOOPS, MIN_ROUNDS = 100, 3
#: the most MiB a run writes (one file at a time: the region holds it and a page to spare)
MAX_WRITE_MIB = 32
#: the machine's shared region the inside file is written in, and where the userland sees it
REGION = "bench"
INSIDE_FILE = f"{userland.SHARED_MOUNTS}/{REGION}/bench-userland"

FORK_EXEC = """
import os, sys, time
n, cpu = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, [cpu])
t = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.execv('/bin/true', ['/bin/true'])
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - t))
"""

WRITES = """
import json, mmap, os, sys, time
path, mib, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, [cpu])
block = os.urandom(1 << 20)
fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
try:
    t = time.perf_counter()
    for _ in range(mib):
        os.write(fd, block)
    os.fsync(fd)
    write = mib / (time.perf_counter() - t)
finally:
    os.close(fd)
    os.unlink(path)
fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
try:
    os.ftruncate(fd, mib << 20)
    with mmap.mmap(fd, mib << 20) as m:
        t = time.perf_counter()
        for i in range(mib):
            m[i << 20:(i + 1) << 20] = block
        m.flush()
        mapped = mib / (time.perf_counter() - t)
finally:
    os.close(fd)
    os.unlink(path)
st = os.statvfs(os.path.dirname(path))
print(json.dumps({"write": write, "mmap": mapped, "fs_bytes": st.f_blocks * st.f_frsize}))
"""


#: the boot program: listens on a unix socket, answers the first question with its host name
SERVER = """
import os, socket, sys
path, cpu = sys.argv[1], int(sys.argv[2])
os.sched_setaffinity(0, [cpu])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(1)
c, _ = s.accept()
c.recv(64)
c.sendall(socket.gethostname().encode() + b"\\n")
c.close()
"""


def server_argv(path: str, cpu: int) -> list[str]:
    """The boot program, the same on both sides (``-I``: nothing of either's environment)."""
    return [PYTHON, "-I", "-c", SERVER, path, str(cpu)]


def ask(path: str) -> str | None:
    """One question to the program listening at ``path``: its answer, or None while nothing
    listens there yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with s:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        s.settimeout(ANSWER_WITHIN_S)
        s.sendall(b"who\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            answer += chunk
    return answer.decode("utf-8", "replace").strip()


def first_answer(path: str, step: Callable[[], object], since: float) -> tuple[str, float]:
    """Ask at ``path`` until answered, ``step`` between two questions; the answer and the ms
    from ``since`` (perf_counter) to it."""
    while (answer := ask(path)) is None:
        if time.perf_counter() - since > ANSWER_WITHIN_S:
            raise RuntimeError(f"nothing answered at {path} within {ANSWER_WITHIN_S:g} s")
        step()
    return answer, (time.perf_counter() - since) * 1000


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def host_boot(path: str, cpu: int) -> float:
    """ms from a raw fork+exec of the boot program on the host to its first answer."""
    _unlink(path)
    since = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(PYTHON, server_argv(path, cpu))
        finally:
            os._exit(127)
    try:
        answer, ms = first_answer(path, lambda: time.sleep(ASK_EVERY_S), since)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        _unlink(path)
    _, status = os.waitpid(pid, 0)          # it ends once it answered
    if answer != socket.gethostname() or status != 0:
        raise RuntimeError(f"the host's boot program answered {answer!r}, status {status}")
    return ms


def instance_boot(m: Machine, name: str, path: str) -> float:
    """ms from ``start`` of instance ``name`` (halted first if it runs) to its boot program's
    first answer at ``path`` (the host's path of its socket), the machine driven meanwhile."""
    if m.get(name).state.value == "active":
        m.kill(name, force=True)
    _unlink(path)
    since = time.perf_counter()
    m.start(name)
    answer, ms = first_answer(path, lambda: m.poll(ASK_EVERY_S), since)
    _unlink(path)
    if answer != name:
        raise RuntimeError(f"the boot program of {name!r} answered {answer!r}, not its "
                           "instance's host name: not the instance's")
    return ms


def settle(m: Machine, name: str) -> None:
    """Halt ``name`` if it runs, then drive the machine a moment (SETTLE_S): what a halt sets
    going (its next incarnation's load, its next userland's parked init) is done before either
    side's boot is timed, so that a start is a start, not the tail of a kill, and the host's
    boot does not share the CPUs with it."""
    if m.get(name).state.value == "active":
        m.kill(name, force=True)
    until = time.monotonic() + SETTLE_S
    while (left := until - time.monotonic()) > 0:
        m.poll(left)


def measure_boot(m: Machine, name: str, region_path: str, cpu: int, rounds: int,
                 progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """The boot figure: ``rounds`` alternating boots, one on the host, one of the instance
    (loaded with ``server_argv`` as its boot program, its socket in ``region_path``)."""
    got: dict[str, list[float]] = {"host": [], "userland": []}
    for i in range(rounds):
        settle(m, name)
        got["host"].append(host_boot(os.path.join(region_path, HOST_SOCKET), cpu))
        got["userland"].append(instance_boot(m, name, os.path.join(region_path, BOOT_SOCKET)))
        if progress:
            print(f"\rbench userland: boot {i + 1}/{rounds}", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return {"boot": got}


def on_host(script: str, args: list[str]) -> str:
    """``script``'s output, run as a plain host process."""
    return subprocess.run([PYTHON, "-c", script, *args], capture_output=True, text=True,
                          check=True, timeout=600).stdout


def inside(identity: userland.Identity, script: str, args: list[str]) -> str:
    """``script``'s output, run inside a fresh userland of ``identity``."""
    r, w = os.pipe()
    try:
        started = userland.start(identity, [PYTHON, "-c", script, *args], stdout=w)
    finally:
        os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    if started.wait() != 0:
        raise RuntimeError(f"the userland's run failed: {started.reason or started.status}")
    return b"".join(chunks).decode()


def measure(identity: userland.Identity, cpu: int, loops: int, write_mib: int,
            progress: bool = False, rounds: int = 5,
            region_bytes: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Every figure's rates, host and userland, ``rounds`` alternating runs of each. With
    ``region_bytes``, the inside file's filesystem must be that big: the shared region, not
    some other directory that happens to exist."""
    got: dict[str, dict[str, list[float]]] = {k: {"host": [], "userland": []} for k in FIGURES}
    shm = f"/dev/shm/mk-bench-userland-{os.getpid()}"
    for i in range(rounds):
        got["fork_exec"]["host"].append(float(on_host(FORK_EXEC, [str(loops), str(cpu)])))
        got["fork_exec"]["userland"].append(
            float(inside(identity, FORK_EXEC, [str(loops), str(cpu)])))
        host = json.loads(on_host(WRITES, [shm, str(write_mib), str(cpu)]))
        ours = json.loads(inside(identity, WRITES, [INSIDE_FILE, str(write_mib), str(cpu)]))
        if region_bytes is not None and ours["fs_bytes"] != region_bytes:
            raise RuntimeError(f"{INSIDE_FILE} is on a filesystem of {ours['fs_bytes']} bytes, "
                               f"not in the {region_bytes}-byte shared region")
        for k in ("write", "mmap"):
            got[k]["host"].append(host[k])
            got[k]["userland"].append(ours[k])
        if progress:
            print(f"\rbench userland: round {i + 1}/{rounds}", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return got


def compare(identity: userland.Identity, n: int = 300, rounds: int = 5) -> dict[str, float]:
    """The fork+exec figure alone, in a userland of ``identity`` (no machine needed): median
    rates of ``rounds`` alternating runs, and their ratio (userland / host)."""
    cpu = identity.cpus[0] if identity.cpus else sorted(os.sched_getaffinity(0))[-1]
    host, ours = [], []
    for _ in range(rounds):
        host.append(float(on_host(FORK_EXEC, [str(n), str(cpu)])))
        ours.append(float(inside(identity, FORK_EXEC, [str(n), str(cpu)])))
    h, u = statistics.median(host), statistics.median(ours)
    return {"host_per_s": h, "userland_per_s": u, "ratio": u / h}


def judge(got: dict[str, dict[str, list[float]]], quick: bool) -> dict[str, Any]:
    """Medians, ratios (userland / host) and, unless ``quick``, each figure measured against
    its target: a rate (FIGURES) at least TARGET_RATIO, a time (TIMES) at most
    BOOT_TARGET_RATIO."""
    figures: dict[str, Any] = {}
    for k in (*FIGURES, *TIMES):
        if k not in got:
            continue
        h, u = statistics.median(got[k]["host"]), statistics.median(got[k]["userland"])
        ratio = u / h if h > 0 else 0.0
        if k in FIGURES:
            target, better, met = TARGET_RATIO, "higher", ratio >= TARGET_RATIO
        else:
            target, better, met = BOOT_TARGET_RATIO, "lower", 0 < ratio <= BOOT_TARGET_RATIO
        figures[k] = {"host": h, "userland": u, "ratio": ratio, "target": target,
                      "better": better, "met": None if quick else met}
    met_all = None if quick else all(f["met"] for f in figures.values())
    return {"figures": figures, "target_ratio": TARGET_RATIO,
            "boot_target_ratio": BOOT_TARGET_RATIO, "judged": not quick,
            "meets_target": met_all}


def run(loops: int = 300, rounds: int = 5, write_mib: int = 32, cpu: int | None = None,
        quick: bool = False, progress: bool = False,
        run_dir: str | None = None) -> dict[str, Any]:
    """A machine with one instance (in ``run_dir``, a fresh one by default) whose boot
    program answers on a unix socket: booted ``rounds`` times against the same program on
    the host, then, running, the other figures measured in it and beside it; the machine is
    gone on return."""
    if loops < 1 or rounds < 1 or not 1 <= write_mib <= MAX_WRITE_MIB:
        raise ValueError(f"loops and rounds must be >= 1, write size 1..{MAX_WRITE_MIB} MiB")
    affinity = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = affinity[-1]
    shared = cpu == 0 or len(affinity) == 1
    memory = (write_mib << 20) * 2 + (64 << 20)            # the file, its mapping, Python
    region = (write_mib + 1) << 20
    with Machine(cpus=[cpu], memory=memory + (32 << 20), host_cpus=None if shared else "0",
                 oversubscribe=shared, run_dir=run_dir, shared={REGION: str(region)}) as m:
        m.create("bench", cpus=[cpu], memory=memory, shared=[REGION])
        inside_socket = f"{userland.SHARED_MOUNTS}/{REGION}/{BOOT_SOCKET}"
        m.load("bench", "kernels.idle:IdleKernel", programs=[server_argv(inside_socket, cpu)])
        got = measure_boot(m, "bench", m.shared.mounts([REGION])[REGION], cpu, rounds,
                           progress)
        inst = m.get("bench")                             # running, from the last boot
        identity = userland.Identity(name="bench", cpus=[cpu],
                                     cgroup_procs=m.cgroups.procs_files(inst.id),
                                     kernel_pid=inst.pid,
                                     shared=m.shared.mounts(inst.shared))
        got.update(measure(identity, cpu, loops, write_mib, progress, rounds, region))
    res = {"benchmark": "userland", "cpu": cpu, "loops": loops, "rounds": rounds,
           "write_mib": write_mib, "region_bytes": region, "environment": environment(),
           "files": f"inside, in the machine's shared region {REGION!r} ({INSIDE_FILE}); on "
                    "the host, in /dev/shm (both tmpfs)",
           "boot": f"start of the instance, against a raw fork+exec on the host, to the "
                   f"first answer of the same program on a unix socket in the region "
                   f"({inside_socket} inside)"}
    res.update(judge(got, quick))
    return res


def render(res: dict[str, Any]) -> str:
    row = "{:<22}{:>14}{:>14}{:>8}  {}"
    lines = [f"userland against host, CPU {res['cpu']}: {res['rounds']} rounds, "
             f"{res['loops']} fork+exec and {res['write_mib']} MiB written per run",
             f"machine: {environment_line(res['environment'])}",
             row.format("", "host", "userland", "ratio", "")]
    for k, (label, unit) in {**FIGURES, **TIMES}.items():
        f = res["figures"].get(k)
        if f is None:
            continue
        sign = ">=" if k in FIGURES else "<="
        verdict = ("not judged (--quick)" if f["met"] is None else
                   f"target {sign} {f['target']:g}x: {'met' if f['met'] else 'MISSED'}")
        digits = 0 if k in FIGURES else 1
        lines.append(row.format(label, f"{f['host']:.{digits}f}{unit}",
                                f"{f['userland']:.{digits}f}{unit}", f"{f['ratio']:.2f}x",
                                verdict))
    lines.append(f"files: {res['files']}")
    if "boot" in res:
        lines.append(f"boot: {res['boot']}")
    return "\n".join(line.rstrip() for line in lines)


def main(a: argparse.Namespace) -> int:
    loops = a.loops
    rounds = a.repeat if a.repeat is not None else (1 if a.quick else 5)
    if not a.quick and (loops < MIN_LOOPS or rounds < MIN_ROUNDS):
        print(f"mkctl bench: error: userland needs --loops >= {MIN_LOOPS} and --repeat >= "
              f"{MIN_ROUNDS} for a ratio worth judging [EINVAL]\n"
              "  fix: raise them, or --quick for indicative figures (nothing judged)",
              file=sys.stderr)
        return 1
    try:
        res = run(loops, rounds, a.write_mib, a.cpu, a.quick, progress=sys.stderr.isatty(),
                  run_dir=getattr(a, "run_dir", None))
    except ValueError as exc:
        print(f"mkctl bench: error: {exc} [EINVAL]", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2) if a.format == "json" else render(res))
    return exit_code(res)


def exit_code(res: dict[str, Any]) -> int:
    """1 on a missed target it printed (a failure, as every bench's); 0 when met or not
    judged."""
    return 1 if res["meets_target"] is False else 0
