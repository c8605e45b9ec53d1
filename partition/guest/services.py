"""What a kernel may ask of the machine it runs on: ``self.os``, the one object its author uses.

The runtime (guest/runtime.py) makes one ``KernelServices`` per run and hands it to the kernel
before the kernel's ``__init__``. It is the kernel's whole view of the runtime: messages (send,
request, handlers), its console, panics and halts, its resources (CPUs, partition, cmdline),
peers by name, metrics, hand-over state (KHO), and the emulated HLT. Everything else the
runtime keeps to itself.

The messaging services are the hot path of every round trip: ``send``, ``send_many``,
``request`` and ``register_handler`` are bound once here, straight to the endpoint's
``Messenger`` where it does the whole job, so that ``self.os.request`` is one attribute hop
and no frame more than the messenger's own (a frame less than ``Kernel.request`` was).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from partition.abi import layout as L
from partition.abi import message as M
from partition.abi import slot as S
from partition.guest.kernel import KernelPanic, parse_cmdline

if TYPE_CHECKING:
    from partition.guest.probes import ProbeAgent
    from partition.guest.runtime import KernelRuntime


class KernelServices:
    """The services of one kernel run (``self.os``)."""

    def __init__(self, runtime: KernelRuntime) -> None:
        self._rt = runtime
        ctx = runtime.ctx
        self._ctx = ctx
        msgr = runtime.messenger
        #: send(target, msg_type, payload=None, subtype=0) -> msg_id: one message to instance
        #: ``target`` (0 = host); RingError ENOSPC (ring full), EMSGSIZE, ESRCH (not active)
        self.send: Callable[..., int] = msgr.send
        #: the real tree's name of ``send``
        self.send_ipi_data: Callable[..., int] = msgr.send
        #: send_many(target, msg_type, payloads) -> how many went: one message per payload,
        #: in order, as far as the target's ring has room (retry the rest after a drain);
        #: RingError ESRCH, or EMSGSIZE for a payload too large (those before it went)
        self.send_many: Callable[[int, int, list[Any]], int] = msgr.send_many
        #: request(target, msg_type, payload=None, timeout=10.0): send and wait for the
        #: response, delivering what comes meanwhile (RingError ETIMEDOUT, ESRCH)
        self.request: Callable[..., Any] = msgr.request
        #: poll_ipis(limit=64) -> how many: deliver pending messages now
        self.poll_ipis: Callable[..., int] = runtime.poll_ipis
        #: idle(timeout=None) -> rung: the emulated HLT, block on the doorbell
        self.idle: Callable[..., bool] = runtime.idle
        #: check_ring() -> reset: look at the own ring's header (the loop does, every 0.1 s)
        self.check_ring: Callable[..., bool] = runtime.check_ring
        #: the main loop, for ``Kernel.run``'s default
        self.loop: Callable[[], None] = runtime.loop
        #: printk(message): a line on the kernel's console
        self.printk: Callable[[str], None] = ctx.console.printk
        #: memory added at run time (base, size): announced, not mapped (docs/kerf.md)
        self.added_memory: list[tuple[int, int]] = runtime.commands.added_memory
        #: its instance id and name, its partition (offset 0 is ``memory_base``), cmdline
        self.id: int = ctx.id
        self.name: str = ctx.name
        self.memory: memoryview = ctx.memory
        self.memory_base: int = ctx.memory_base
        self.cmdline: str = ctx.cmdline

    # -- identity and resources ------------------------------------------------------------
    @property
    def cpus(self) -> list[int]:
        """Host (logical) CPU numbers this instance is pinned to; the first is the boot CPU."""
        return list(self._ctx.cpus)

    @property
    def physical_cpus(self) -> list[int]:
        """Physical (APIC) ids of ``cpus``, what messages carry (arch_cpu_physical_id)."""
        return list(self._ctx.physical_cpus)

    @property
    def params(self) -> dict[str, str]:
        """The cmdline as ``key=value`` words."""
        return parse_cmdline(self._ctx.cmdline)

    @property
    def halting(self) -> bool:
        """True once a halt was requested: a kernel with its own ``run`` leaves its loop."""
        return self._rt.halting

    @property
    def handing_over(self) -> bool:
        """This halt hands over to a new image (a live update): ``shutdown`` may preserve."""
        return self._rt.commands.handing_over

    @property
    def probe_agent(self) -> ProbeAgent | None:
        """The scenario probe agent, once the host started a probe from this kernel: a kernel
        with its own ``run`` calls its ``step()`` (docs/scenarios.md)."""
        return self._rt.probes.agent

    def register_handler(self, msg_type: int, handler: Callable[[M.Message], Any]) -> None:
        """One handler per type; a second registration raises RingError(EEXIST). A handler's
        return value is the response when the message was a request."""
        self._rt.register_handler(msg_type, handler)

    def peer_id(self, name: str) -> int | None:
        """The id of the instance called ``name`` (0 for "host"), from the host's instance
        table; None if there is none. Ids are the host's to give (scenarios: ``id =``)."""
        if name == "host":
            return 0
        table = self._ctx.table
        if table is None:
            return None
        want = name.encode()[:L.NAME_BYTES]
        for iid in range(1, len(table) // L.TABLE_RECORD_BYTES):
            state, rid, raw = L.TABLE_RECORD.unpack_from(table, iid * L.TABLE_RECORD_BYTES)[:3]
            if state and rid == iid and raw.rstrip(b"\0") == want:
                return iid
        return None

    def metric(self, name: str, value: float) -> None:
        """Publish a number: ``mkctl show``/``top``, a scenario's report and its ``expect``
        read it (``client.errors == 0``). Up to 16 names of 1-23 printable characters; a name
        published again is updated."""
        if not (isinstance(name, str) and 0 < len(name) < 24
                and all(32 < ord(c) < 127 for c in name)):
            raise ValueError("a metric name is 1-23 printable ASCII characters")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"metric {name!r}: {value!r} is not a finite number")
        self._ctx.own.set_metric(name, v)

    # -- life and death --------------------------------------------------------------------
    def panic(self, reason: str) -> NoReturn:
        """Stop now: the console says ``Kernel panic - not syncing: reason``."""
        raise KernelPanic(str(reason))

    def halt(self, reason: str = "voluntary halt") -> None:
        """Leave the main loop after the current tick and exit cleanly (state -> loaded)."""
        self._rt.halt(reason)

    def poke(self, phys: int, data: bytes) -> None:
        """Write ``data`` at physical address ``phys``, through this kernel's page tables: its
        own partition always; any address when the machine runs without protection; anything
        else is a page fault, which, in a kernel, is an oops."""
        ctx = self._ctx
        base, size = ctx.memory_base, len(ctx.memory)
        if base <= phys and phys + len(data) <= base + size:
            ctx.memory[phys - base:phys - base + len(data)] = data
        elif ctx.arena_all is not None and phys >= 0 and phys + len(data) <= len(ctx.arena_all):
            ctx.arena_all[phys:phys + len(data)] = data
        else:
            raise KernelPanic(f"BUG: unable to handle page fault for address {phys:#x} "
                              "(not mapped: outside this instance's partition)")

    # -- kernel hand-over (KHO): state that survives into the next run -------------------
    def kho_preserve(self, name: str, offset: int, size: int) -> None:
        """Keep ``size`` bytes at ``offset`` of the partition (both page-aligned) for the next
        run of this instance, same image or a new one (a live update: ``handing_over``); it
        finds them with ``kho_restore(name)``. At most 16 regions; a name is 1-31 ASCII."""
        if not (isinstance(name, str) and 0 < len(name) < 32
                and all(32 < ord(ch) < 127 for ch in name)):
            raise ValueError("a KHO name is 1-31 printable ASCII characters, no spaces")
        memory = self._ctx.memory
        if offset % 4096 or size % 4096 or size <= 0 or offset < 0 or \
                offset + size > len(memory):
            raise ValueError(f"KHO region {offset:#x}+{size:#x} must be page-aligned and inside "
                             f"the partition ({len(memory):#x} bytes)")
        own = self._ctx.own
        entries = [(n.rstrip(b"\0").decode(errors="replace"), o, z, 0)
                   for n, o, z, _ in own.kho_entries(out=True)]
        entries = [e for e in entries if e[0] != name] + [(name, offset, size, 0)]
        if len(entries) > S.KHO_MAX:
            raise ValueError(f"at most {S.KHO_MAX} KHO regions")
        own.write_kho(entries, out=True)

    def kho_keep_rest(self, keep: bool = True) -> None:
        """Keep the rest of the partition too at the next run (by default it is scrubbed when
        regions are preserved)."""
        own = self._ctx.own
        own.kho_flags = (own.kho_flags | S.KHO_KEEP_REST) if keep else \
            (own.kho_flags & ~S.KHO_KEEP_REST)

    def kho_restore(self, name: str) -> memoryview | None:
        """The region preserved as ``name`` by the previous run, checked against the CRC the
        host took when that run ended; None if there is none. A region whose bytes changed
        since is a panic (KHO corruption), as on the real system."""
        memory = self._ctx.memory
        for raw, offset, size, crc in self._ctx.own.kho_entries():
            if raw.rstrip(b"\0").decode(errors="replace") != name:
                continue
            if offset + size > len(memory):
                return None
            view = memory[offset:offset + size]
            if zlib.crc32(view) != crc:
                self.panic(f"KHO: region {name!r} changed since it was handed over")
            return view
        return None

    def _internal(self, name: str) -> Any:
        """A runtime internal by its old name on ``Kernel`` (``ctx``, ``endpoint``, ...): for
        the old spellings' shim only (kernel.py), never part of the services."""
        rt = self._rt
        return {"ctx": rt.ctx, "endpoint": rt.endpoint, "messenger": rt.messenger,
                "ring": rt.ring, "probes": rt.probes,
                "host_command": rt.commands.verify}[name]
