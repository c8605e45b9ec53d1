"""The kernel author's API: subclass ``Kernel``, override its hooks, reach the rest through
``self.os``.

A kernel runs as the only code of its instance process, pinned to its CPUs, with exactly three
windows on the arena: its own partition (``self.os.memory``), its console (``self.os.printk``)
and the shared control area. What an author sees is deliberately small: the hooks below
(``boot``, ``tick``, ``shutdown``, the ``on_cpu_*``/``on_memory_*`` resource hooks,
``on_console_input`` and, for the few that need it, ``run``), four class attributes that
configure the loop, and one services object, ``self.os`` (guest/services.py: messages,
console, metrics, peers, memory, KHO). The loop, the drain, the host's commands and every other
piece of bookkeeping live in the runtime (guest/runtime.py), which makes the kernel object and
holds it; the kernel's own namespace is the author's, so an attribute an author names ``ring``
or ``messenger`` breaks nothing.

The main loop is simple so that what the emulator measures is the kernel's work and not a
framework: ``tick`` does one unit of work and says whether there was any; when there was none,
the instance idles on its doorbell (the emulated HLT) until something rings it or
``idle_timeout`` passes. A kernel with ``idle_timeout = None`` is tickless: nothing but a
doorbell wakes it, so an idle instance costs no CPU at all (511 of them on two CPUs once took a
twelfth of the machine, waking once a second each); its heartbeats then come only while it runs,
and a host watchdog rings it before it calls a quiet kernel hung (docs/faults.md).

Guarantees the loop gives a kernel:
- ``boot`` runs once, after pinning and mapping, before the first ``tick``;
- ``shutdown`` runs on a graceful halt (``mkctl kill`` without ``--force``), never on a forced one;
- an exception escaping any hook is a kernel panic: the traceback goes to the console, the
  reason to the control slot, and the host records it.

The services used to be methods of ``Kernel`` itself (``self.printk``, ``self.send``, ...).
Those spellings still work, through ``__getattr__`` below: each warns once (DeprecationWarning)
and then costs what the new spelling costs.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from partition.abi import slot as S
from partition.abi.console import ConsoleWriter
from partition.abi.constants import DEFAULT_HEAP, IPI_SIGNAL
from partition.units import parse_size

if TYPE_CHECKING:
    from partition.guest.services import KernelServices

__all__ = ["IPI_SIGNAL", "Kernel", "KernelContext", "KernelPanic", "RefuseResource", "parse_cmdline"]


class KernelPanic(BaseException):
    """Raised by ``self.os.panic``; BaseException so that a kernel's ``except Exception`` cannot
    swallow its own panic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RefuseResource(Exception):
    """Raised by an ``on_cpu_*``/``on_memory_*`` hook to refuse a runtime resource change; the
    host rolls the whole transaction back. The message travels in the RES_ACK as the reason."""


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
    own: S.OwnPage                      # its own page of the control area
    doorbell_fd: int
    host_doorbell_fd: int
    oversubscribed: bool
    boot_generation: int
    layout: Any = None                  # ArenaLayout
    peers: memoryview | None = None     # the host's peer table, read-only
    channel: socket.socket | None = None  # asks the host for peers' doorbells
    rings: memoryview | None = None     # the whole ring area
    rings_address: int = 0
    arena_all: memoryview | None = None  # the whole arena: only on machines without protection
    table: memoryview | None = None     # the host's instance table, read-only (peer names)


def parse_cmdline(cmdline: str) -> dict[str, str]:
    """``a=1 quiet b=x`` -> {'a': '1', 'quiet': '', 'b': 'x'}: the usual kernel convention."""
    out: dict[str, str] = {}
    for word in cmdline.split():
        k, _, v = word.partition("=")
        out[k] = v
    return out


def heap_of(cmdline: str) -> int:
    """The kernel's private heap: ``mk_heap=`` on its cmdline, else DEFAULT_HEAP (InvalidSpec
    for a size that does not parse). The trampoline's RLIMIT_AS and the host's memory cgroup
    limit both come from here."""
    text = parse_cmdline(cmdline).get("mk_heap")
    return parse_size(text, "mk_heap") if text else DEFAULT_HEAP


#: the old spellings of ``self.os``'s services, which ``Kernel.__getattr__`` still answers:
#: a name whose value never changes in a run is kept on the instance after its first use (a
#: bound method: the old spelling then costs what the new one does); the others are read anew
#: at each use (``halting``, ``cpus``: they change)
STABLE = frozenset({
    "id", "name", "memory", "cmdline", "printk", "panic", "halt", "idle", "register_handler",
    "send", "send_ipi_data", "send_many", "request", "poll_ipis", "peer_id", "metric", "poke",
    "check_ring", "kho_preserve", "kho_keep_rest", "kho_restore", "added_memory"})
CHANGING = frozenset({"cpus", "physical_cpus", "params", "halting", "handing_over"})
#: runtime internals kernels once reached through ``self`` (never documented as services;
#: tests' hostile kernels attack through them): answered from the runtime, with the warning
INTERNALS = frozenset({"ctx", "endpoint", "messenger", "ring", "probes", "host_command"})

# (a kernel that never set up its services: only a Kernel made by hand, outside a runtime)
_NO_SERVICES = cast("KernelServices", None)


class Kernel:
    """Base class of every kernel image: the hooks an author overrides, the loop's settings,
    and ``os``, the services (guest/services.py). The runtime (guest/runtime.py) makes the
    object and calls the hooks; nothing here is the runtime's state."""

    #: longest idle wait between two ticks, in seconds (the kernel's timer tick when idle);
    #: None: tickless, only a doorbell ends the wait. Read at every lap: a tick may change it
    idle_timeout: float | None = 0.5
    #: IPI delivery: "interrupt" (block on the doorbell), "poll" (spin on the ring), "hybrid"
    #: (spin ``spin_us`` then block); the cmdline's ``mk_mode=`` overrides it (the runtime
    #: writes the mode in force here before ``__init__``)
    mode: str = "interrupt"
    spin_us: float = 50.0
    #: seconds between heartbeats, counted in the own page for the host; None: none
    heartbeat_interval: float | None = 1.0
    #: the services: set on each kernel object by the runtime before its ``__init__`` runs
    os: KernelServices = _NO_SERVICES

    def __init__(self, ctx: KernelContext | None = None) -> None:
        """Nothing to set up: the runtime gave this object ``os`` already. A kernel that
        overrides ``__init__`` calls ``super().__init__(ctx)`` as before (ctx: its boot
        manifest, the same one ``self.os`` serves)."""

    # -- hooks -----------------------------------------------------------------------------
    def boot(self) -> None:
        """Called once after the trampoline handed over; set up state in ``self.os.memory``
        and register handlers (messages wait in the ring until ``boot`` returned)."""

    def tick(self) -> bool:
        """Do one unit of work; return True if there was work (the loop then ticks again at
        once), False to idle until the doorbell rings or ``idle_timeout`` passes."""
        return False

    def shutdown(self) -> None:
        """Graceful halt requested by the host: flush state, the process exits afterwards
        (``self.os.handing_over``: a live update's hand-over, preserve state with KHO)."""

    # runtime resource changes (kerf update, mkctl update): each is asked before the host moves
    # anything; return normally to accept, raise RefuseResource("why") to refuse (the host then
    # rolls the whole change back). CPUs are physical (APIC) ids, as the messages carry them.
    def on_cpu_add(self, cpus: list[int]) -> None:
        """CPU_ADD: these CPUs join the instance (the host pins it to them after the ack)."""

    def on_cpu_remove(self, cpus: list[int]) -> None:
        """CPU_REMOVE: stop using these CPUs; the host unpins them after the ack."""

    def on_memory_add(self, base: int, size: int) -> None:
        """MEM_ADD: [base, base+size) becomes the instance's (reserved and accounted; a running
        kernel cannot map it in the emulator: see docs/kerf.md)."""

    def on_memory_remove(self, base: int, size: int) -> None:
        """MEM_REMOVE: [base, base+size) leaves the instance; the host scrubs it."""

    def on_console_input(self, line: str) -> None:
        """A line typed on the instance's console (``mkctl console -i NAME``; the real
        mktty's input): UTF-8 text without its newline, at most 2 KiB, which the host checked
        before it sent it. Called from the message loop, as a handler is: an exception
        escaping it is this kernel's panic. The default ignores it."""

    def run(self) -> None:
        """The main loop (the runtime's). Overriding it is allowed, but then the kernel must
        watch ``self.os.halting`` and call ``self.os.poll_ipis()``, or the host's SHUTDOWN is
        never seen and the halt is forced; and ``self.os.check_ring()`` now and then."""
        self.os.loop()

    # -- the old spellings -----------------------------------------------------------------
    if not TYPE_CHECKING:       # (type checkers see the new spellings only)
        def __getattr__(self, name: str) -> Any:
            """``self.printk`` and the rest of the services' old spellings, with a
            DeprecationWarning; only called for a name the object and its class lack."""
            services = self.__dict__.get("os")
            internal = name in INTERNALS
            if services is None or not (internal or name in STABLE or name in CHANGING):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            instead = "nothing: a runtime internal, not the kernel API" if internal else \
                f"self.os.{name}"
            warnings.warn(f"Kernel.{name} is deprecated: use {instead}", DeprecationWarning,
                          stacklevel=2)
            value = services._internal(name) if internal else getattr(services, name)
            if name not in CHANGING:
                self.__dict__[name] = value     # warned once; from now on a plain attribute
            return value
