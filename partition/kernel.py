"""The kernel author's API: subclass ``Kernel``, override ``boot``/``tick``/``shutdown``.

A kernel runs as the only code of its instance process, pinned to its CPUs, with exactly three
windows on the arena: its own partition (``self.memory``), its console (``printk``) and the shared
control area. The main loop is deliberately simple so that what the emulator measures is the
kernel's work and not a framework: ``tick`` does one unit of work and says whether there was any;
when there was none, the instance idles on its doorbell (the emulated HLT) until something rings
it or ``idle_timeout`` passes.

Guarantees the loop gives a kernel:
- ``boot`` runs once, after pinning and mapping, before the first ``tick``;
- ``shutdown`` runs on a graceful halt (``mkctl kill`` without ``--force``), never on a forced one;
- an exception escaping any hook is a kernel panic: the traceback goes to the console, the
  reason to the control slot, and the host records it.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from typing import NoReturn

from . import layout as L
from .console import ConsoleWriter


class KernelPanic(BaseException):
    """Raised by ``Kernel.panic``; BaseException so that a kernel's ``except Exception`` cannot
    swallow its own panic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class KernelContext:
    """What the trampoline hands a kernel at boot (its boot manifest, like /chosen)."""

    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    cmdline: str
    memory_base: int
    memory: memoryview
    console: ConsoleWriter
    slot: memoryview
    doorbell_fd: int
    host_doorbell_fd: int
    oversubscribed: bool
    boot_generation: int


def parse_cmdline(cmdline: str) -> dict[str, str]:
    """``a=1 quiet b=x`` -> {'a': '1', 'quiet': '', 'b': 'x'}: the usual kernel convention."""
    out: dict[str, str] = {}
    for word in cmdline.split():
        k, _, v = word.partition("=")
        out[k] = v
    return out


class Kernel:
    """Base class of every kernel image."""

    #: longest idle wait between two ticks, in seconds (the kernel's timer tick when idle)
    idle_timeout: float = 0.5

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx
        self._halting = False
        self._halt_reason = ""

    # -- identity and resources ------------------------------------------------------------
    @property
    def id(self) -> int:
        return self.ctx.id

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def cpus(self) -> list[int]:
        """Host (logical) CPU numbers this instance is pinned to; the first is the boot CPU."""
        return list(self.ctx.cpus)

    @property
    def physical_cpus(self) -> list[int]:
        """Physical (APIC) ids of ``cpus``, what messages carry (arch_cpu_physical_id)."""
        return list(self.ctx.physical_cpus)

    @property
    def memory(self) -> memoryview:
        """The instance's partition; offset 0 is physical address ``memory_base``."""
        return self.ctx.memory

    @property
    def cmdline(self) -> str:
        return self.ctx.cmdline

    @property
    def params(self) -> dict[str, str]:
        return parse_cmdline(self.ctx.cmdline)

    @property
    def halting(self) -> bool:
        return self._halting

    # -- hooks -----------------------------------------------------------------------------
    def boot(self) -> None:
        """Called once after the trampoline handed over; set up state in ``self.memory``."""

    def tick(self) -> bool:
        """Do one unit of work; return True if there was work (the loop then ticks again at
        once), False to idle until the doorbell rings or ``idle_timeout`` passes."""
        return False

    def shutdown(self) -> None:
        """Graceful halt requested by the host: flush state, the process exits afterwards."""

    # -- services --------------------------------------------------------------------------
    def printk(self, message: str) -> None:
        self.ctx.console.printk(message)

    def panic(self, reason: str) -> NoReturn:
        raise KernelPanic(str(reason))

    def halt(self, reason: str = "voluntary halt") -> None:
        """Leave the main loop after the current tick and exit cleanly (state -> loaded)."""
        self._halting = True
        self._halt_reason = reason

    def idle(self, timeout: float | None = None) -> bool:
        """The emulated HLT: block on the doorbell. Returns True if it was rung."""
        t = self.idle_timeout if timeout is None else timeout
        r, _, _ = select.select([self.ctx.doorbell_fd], [], [], t)
        if r:
            try:
                os.eventfd_read(self.ctx.doorbell_fd)
            except BlockingIOError:
                return False
            return True
        return False

    # -- the loop (called by the trampoline) -----------------------------------------------
    def _on_halt_request(self, signum: int, frame: object) -> None:
        self._halting = True
        self._halt_reason = "graceful halt requested by host"
        try:
            os.eventfd_write(self.ctx.doorbell_fd, 1)   # wake the idle wait
        except OSError:
            pass

    def _progress(self) -> None:
        slot = self.ctx.slot
        n = int.from_bytes(slot[L.SLOT_PROGRESS:L.SLOT_PROGRESS + 8], "little") + 1
        slot[L.SLOT_PROGRESS:L.SLOT_PROGRESS + 8] = (n & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")

    def _force_halt_requested(self) -> bool:
        return self.ctx.slot[L.SLOT_FORCE_HALT] != 0

    def run(self) -> None:
        """Main loop. Overriding it is allowed, but then the kernel must watch ``halting``."""
        while not self._halting and not self._force_halt_requested():
            self._progress()
            if not self.tick():
                self.idle()

    def _main(self) -> str:
        self.boot()
        self.run()
        if self._halting and self._halt_reason == "graceful halt requested by host":
            self.shutdown()
        return self._halt_reason or "halted"


def now_ns() -> int:
    return time.monotonic_ns()
