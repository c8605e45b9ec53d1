"""Fork + exec of ``/bin/true`` in a loop inside a userland (guest/userland.py) against the
same loop on the host, beside it in one run (issue 22's ``bench userland``, its first figure).

What it weighs: the userland's namespaces and its seccomp filter on the hottest path a shell
has. The same interpreter runs the same loop (fork, execv, waitpid) in both places; runs
alternate one host, one userland, so that load on the machine hits both alike. Target: the
userland's rate at least 0.9x the host's; ``main`` exits 1 on a miss it prints. The CLI verb
(``mkctl bench userland``) is not wired yet; ``python -m partition.bench.userland`` runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from partition.guest import userland

TARGET_RATIO = 0.9
PYTHON = os.path.realpath(sys.executable)          # not a shim script: a shim forks
LOOP = """
import os, sys, time
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.execv('/bin/true', ['/bin/true'])
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - t))
"""


def host_rate(n: int) -> float:
    """fork+exec per second of the loop run as a plain host process."""
    out = subprocess.run([PYTHON, "-c", LOOP, str(n)], capture_output=True, text=True,
                         check=True, timeout=600)
    return float(out.stdout)


def userland_rate(identity: userland.Identity, n: int) -> float:
    """fork+exec per second of the same loop run inside a fresh userland of ``identity``."""
    r, w = os.pipe()
    try:
        started = userland.start(identity, [PYTHON, "-c", LOOP, str(n)], stdout=w)
    finally:
        os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    if started.wait() != 0:
        raise RuntimeError(f"the userland loop failed: {started.reason or started.status}")
    return float(out)


def compare(identity: userland.Identity, n: int = 300, rounds: int = 5) -> dict[str, float]:
    """Median rates of ``rounds`` alternating runs, and their ratio (userland / host)."""
    host, inside = [], []
    for _ in range(rounds):
        host.append(host_rate(n))
        inside.append(userland_rate(identity, n))
    h, u = statistics.median(host), statistics.median(inside)
    return {"host_per_s": h, "userland_per_s": u, "ratio": u / h}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m partition.bench.userland", description=__doc__)
    p.add_argument("--n", type=int, default=300, help="fork+exec per run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", type=int, default=sorted(os.sched_getaffinity(0))[-1])
    a = p.parse_args(argv)
    ident = userland.Identity(name="bench", cpus=[a.cpu], cgroup_procs=[])
    r = compare(ident, a.n, a.rounds)
    met = r["ratio"] >= TARGET_RATIO
    print(f"fork+exec /bin/true: host {r['host_per_s']:.0f}/s, userland "
          f"{r['userland_per_s']:.0f}/s, ratio {r['ratio']:.2f}x (target >= {TARGET_RATIO}x: "
          f"{'met' if met else 'MISSED'})")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
