"""What the machine says of itself and its instances (``describe``, ``snapshot``, the views'
fields): read-only looks at the instance table, the pool, the arena and the host's ring.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import TYPE_CHECKING, Any

from partition.abi.constants import HOST_ID
from partition.errors import InvalidSpec
from partition.host import llc
from partition.host.devicetree import MEMORY_GRANULE
from partition.host.instance import Instance
from partition.host.kimage import KIMAGE_TYPE

if TYPE_CHECKING:
    from collections.abc import Callable

    from partition.abi.layout import ArenaLayout
    from partition.host.arena import Arena
    from partition.host.assembly import Settings
    from partition.host.events import EventLog
    from partition.host.hostipc import HostIPC
    from partition.host.overlays import Transaction
    from partition.host.pool import ResourcePool
    from partition.host.table import InstanceTable


class Looks:
    """The read-only looks at one machine's state."""

    def __init__(self, settings: Settings, run_dir: str, table: InstanceTable,
                 pool: ResourcePool, layout: ArenaLayout, arena: Arena, ipc: HostIPC,
                 resctrl: llc.Resctrl, events: EventLog,
                 overlays: Callable[[], list[Transaction]]) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.table = table
        self.events = events
        self.overlays = overlays
        config = settings.config
        llc_way_mask = settings.llc_way_mask
        self.config = config
        self.pool = pool
        self.layout = layout
        self.arena = arena
        self.ipc = ipc
        self.resctrl = resctrl
        self.llc_way_mask = llc_way_mask

    def pool_fields(self) -> dict[str, Any]:
        cfg = self.config
        lo = self.layout.pool_offset
        chunks = [[lo + b, n] for b, n in self.pool.chunks]
        return {
            "cpus": list(cfg.cpus), "cpus_available": self.pool.cpus_available(),
            "memory_base": chunks[0][0] if chunks else lo, "memory_bytes": cfg.memory_bytes,
            # each chunk as the root tree's memory@<base> says it (what a pool memory-remove
            # names), and the window they lie in (what the pool can grow into)
            "chunks": chunks, "window_bytes": self.pool.window,
            "memory_available": self.pool.memory_available,
            "physical_ids": {str(c): p for c, p in sorted(cfg.physical_ids.items())},
            "memory_granule": MEMORY_GRANULE,
            "llc_way_mask": self.llc_way_mask,
            "llc": self.resctrl.state(),
        }

    def counters(self, inst: Instance) -> dict[str, int]:
        """The host's counters of an instance and what it and its ring report."""
        return {**inst.counters, **self.ipc.counters(inst)}

    def view_fields(self, inst: Instance) -> dict[str, Any]:
        """What the views say of an instance: describe()'s fields, without its reads of the
        instance's pages (those are for a look, not for every change)."""
        return {"id": inst.id, "name": inst.name, "state": inst.state.value,
                "cpus": inst.cpus, "physical_cpus": inst.physical_cpus,
                "shared_cpus": self.pool.shared_cpus(inst.name, inst.cpus),
                "regions": inst.regions, "memory_base": inst.memory_base,
                "llc_way_mask": inst.llc_way_mask,
                "kernel": inst.kimage.label if inst.kimage else None,
                "kimage_type": KIMAGE_TYPE,
                "segments": len(inst.kimage.segments) if inst.kimage else 0}

    def describe(self, inst: Instance) -> dict[str, Any]:
        running = inst.pid is not None
        own = self.arena.own(inst.id)
        return {
            **self.describe_brief(inst),
            "physical_cpus": list(inst.physical_cpus),
            "regions": [list(r) for r in inst.regions],
            "resource_changes": dict(inst.resource_changes),
            "kernel_spec": inst.kimage.spec if inst.kimage else None,
            "cmdline": inst.kimage.cmdline if inst.kimage else None,
            "kimage_type": KIMAGE_TYPE,
            "segments": len(inst.kimage.segments) if inst.kimage else 0,
            "signature": inst.kimage.signature if inst.kimage else None,
            # loaded image resident: its process imported it and waits for exec
            "resident": inst.parked is not None and bool((inst.parked.report or {}).get("ok")),
            "boots": inst.boots,
            "progress": own.progress,
            "metrics": own.metrics(),      # what its kernel published
            # seconds since its main loop last moved: a stopped or wedged kernel shows here
            "progress_age_s": round(time.monotonic() - inst.progress_mark[1], 1)
            if running and inst.progress_mark[0] >= 0 else None,
            # its kernel says it sleeps on its doorbell (the idle HLT): a still loop that is
            # idle, not stuck (the ring's own word: shown, never acted on)
            "waiting": running and self.ipc.ring_of(inst.id).receiver_idle(),
            "counters": self.counters(inst),
            "ipi_filters": self.ipc.filters(inst),
            "last_heartbeat": inst.last_heartbeat,
            "recovery": inst.recovery.to_dict(),
            "standby_for": inst.standby_for,
            "served_by": inst.served_by,
            "failures": len(inst.failures),
            "last_failure": inst.failures[-1] if inst.failures else None,
            "foreign_writes": dict(inst.foreign_writes),
        }

    def describe_brief(self, inst: Instance) -> dict[str, Any]:
        """What ``mkctl show``'s table says of an instance: the part of describe() that needs
        no read of the instance's pages and ring (a table of 511 asks only for these; describe
        starts from it)."""
        return {
            "id": inst.id, "name": inst.name, "state": inst.state.value, "cpus": list(inst.cpus),
            "shared_cpus": self.pool.shared_cpus(inst.name, inst.cpus),
            "memory_base": inst.memory_base, "memory_bytes": inst.memory_bytes,
            # what it holds: the boot region (memory_base/memory_bytes) and every region
            # added at run time, which every view shows (the pool's free memory counts them)
            "memory_total": inst.memory_bytes + sum(size for _, size in inst.extra_regions),
            "regions_added": len(inst.extra_regions),
            "kernel": inst.kimage.label if inst.kimage else None,
            "pid": inst.pid, "last_exit": inst.last_exit.to_dict() if inst.last_exit else None,
            "failure": inst.failure,
            "llc_way_mask": llc.fmt(inst.llc_way_mask) if inst.llc_way_mask else None,
            "pids_max": inst.pids_max, "rootfs": inst.rootfs,
            **({"shared": list(inst.shared)} if inst.shared else {}),
        }

    def snapshot(self, brief: bool, started: float, adopt_ms: float | None,
                 shared: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The machine: its settings, pool, overlays, shared regions (host/shared.py), host and
        every instance (each as ``describe_brief`` says it with ``brief``)."""
        s, cfg = self.settings, self.config
        describe = self.describe_brief if brief else self.describe
        return {
            "machine": {
                "run_dir": self.run_dir, "supervisor_pid": os.getpid(),
                "host_cpus": list(cfg.host_cpus), "oversubscribe": cfg.oversubscribe,
                "mode": "oversubscribed" if cfg.oversubscribe else "dedicated",
                "protection": s.protection,
                "arena_bytes": self.layout.arena_bytes, "started": started,
                "survive_host": s.survive_host, "adopt_ms": adopt_ms,
                "events": dict(self.events.counts),
                "signatures": {"required": s.require_signed,
                               "keyring": s.keyring.path if s.keyring else None,
                               "keys": s.keyring.subjects() if s.keyring else []},
                **({"shared": shared} if shared else {}),
            },
            "pool": self.pool_fields(),
            # (with the instances each changed: show says which were deleted since)
            "overlays": [{**t.to_dict(), "names": t.names} for t in self.overlays()],
            "host": {"id": HOST_ID, "cpus": list(cfg.host_cpus), "pid": os.getpid()},
            "instances": [describe(i) for i in sorted(self.table, key=lambda i: i.id)],
        }

    def checksum(self, inst: Instance) -> int:
        """CRC32 of an instance's whole partition, as the host reads it."""
        view = memoryview(self.arena.map)[inst.memory_base:inst.memory_base + inst.memory_bytes]
        try:
            return zlib.crc32(view)
        finally:
            view.release()

    def read(self, inst: Instance, offset: int, size: int) -> bytes:
        """Bytes of an instance's partition, as the host sees them."""
        if offset < 0 or size < 0 or offset + size > inst.memory_bytes:
            raise InvalidSpec(f"range {offset}+{size} is outside the {inst.memory_bytes}-byte "
                              f"partition of {inst.name!r}", "stay within 0..memory_bytes")
        return self.arena.read(inst.memory_base + offset, size)
