"""Fault injection as carried out inside the faulting kernel, by its own code, in its own
process (the host asks with ``MK_EMU_FAULT``; host/faults.py checks the request and does the
outside kinds itself). Each kind is what a buggy kernel would really do, not a simulation."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition.abi.message import MK_EMU_STORM
from partition.abi.ring import RingError

if TYPE_CHECKING:
    from partition.guest.services import KernelServices


def carry_out(kernel: KernelServices, progress: Callable[[], None], kind: str,
              options: dict[str, Any]) -> None:
    """Run inside the faulting kernel (from its message handler), by its services;
    ``progress`` adds a lap to the loop's progress count."""
    kernel.printk(f"fault injected: {kind} {options or ''}".rstrip())
    if kind == "panic":
        kernel.panic("injected panic")
    elif kind == "hang-spin":
        while True:          # no progress, no ring, no return: only the watchdog ends this
            pass
    elif kind == "wild-write":
        kernel.poke(int(options["address"]), b"\xde\xad\xbe\xef" * max(1, int(options.get("bytes", 4)) // 4))
    elif kind == "ipi-storm":
        target, count = int(options["target"]), int(options.get("count", 100_000))
        sent = full = 0
        while sent + full < count:
            try:
                kernel.send(target, MK_EMU_STORM, b"storm")
                sent += 1
            except RingError as exc:
                if exc.errno != errno.ENOSPC:
                    break
                full += 1
        kernel.printk(f"ipi-storm: {sent} sent, {full} refused with ENOSPC")
    elif kind == "cpu-hog":
        end = time.monotonic() + float(options.get("seconds", 1.0))
        while time.monotonic() < end:
            progress()   # busy, but alive: a noisy neighbour, not a hang
    elif kind == "mem-hog":
        hog = []
        limit = int(options.get("bytes", 1 << 40))
        grabbed = 0
        while grabbed < limit:
            hog.append(bytearray(16 << 20))     # MemoryError at the heap limit: a panic
            grabbed += 16 << 20
        kernel.printk(f"mem-hog: grabbed {grabbed} bytes without hitting the limit")
