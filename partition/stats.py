"""Percentiles and the environment record every benchmark prints with its figures.

Figures from different machines are not comparable without knowing the machine, so each report
carries CPU model, hypervisor flag, cpuidle driver, kernel and Python version.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[max(0, min(len(sorted_values), rank) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"n": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90),
            "p99": percentile(v, 99), "p99.9": percentile(v, 99.9), "max": v[-1] if v else float("nan"),
            "min": v[0] if v else float("nan")}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def environment() -> dict[str, Any]:
    model = None
    hypervisor = False
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and " hypervisor" in line:
            hypervisor = True
    return {
        "cpu_model": model, "hypervisor": hypervisor, "online_cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "kernel": platform.release(), "python": sys.version.split()[0],
    }


def environment_line(env: dict[str, Any]) -> str:
    return (f"{env['cpu_model']}, {env['online_cpus']} CPUs, "
            f"{'virtual machine' if env['hypervisor'] else 'bare metal'}, cpuidle "
            f"{env['cpuidle_driver'] or 'none'}, Linux {env['kernel']}, Python {env['python']}")
