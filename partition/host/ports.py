"""The host's seams: the clock and the OS calls its decisions make, each a small protocol.

The watchdog, the sweep's back-off, restart intensity and the other decisions of the host take
a ``Clock`` and an ``OSPort``, defaulting to the real ones (``SYSTEM_CLOCK``, ``SYSTEM_OS``),
so that a unit test can drive them with a fake clock and record the calls a fake port receives,
without a process, a mapping or a cgroup (tests/unit/test_host_*.py).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Protocol

from partition import linux


class Clock(Protocol):
    """Time as the host's decisions read it."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """CLOCK_MONOTONIC and the wall clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class OSPort(Protocol):
    """The OS calls the host's decisions make: signals, affinity, doorbells."""

    def kill(self, pid: int, sig: int) -> None: ...

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None: ...

    def sched_setaffinity(self, pid: int, cpus: Iterable[int]) -> None: ...

    def ring_doorbell(self, fd: int) -> None: ...


class SystemOS:
    """The real calls."""

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        signal.pidfd_send_signal(pidfd, sig)

    def sched_setaffinity(self, pid: int, cpus: Iterable[int]) -> None:
        os.sched_setaffinity(pid, cpus)

    def ring_doorbell(self, fd: int) -> None:
        linux.ring_doorbell(fd)


SYSTEM_CLOCK: Clock = SystemClock()
SYSTEM_OS: OSPort = SystemOS()
