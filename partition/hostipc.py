"""The host's side of inter-kernel messaging: its ring, its handlers, its doorbells.

Instance 0 receives HALTED, SHUTDOWN_ACK and HEARTBEAT here, sends to instances through their
rings, and cleans up after dead senders. Kept apart from the machine so that the machine is
about life cycles and this is about messages.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from typing import TYPE_CHECKING

from . import layout as L
from . import message as M
from .instance import Instance, State
from .kernel import IPI_SIGNAL
from .message import Messenger
from .ring import DOORBELL_WAKE
from .ring import Ring, RingError

if TYPE_CHECKING:
    from .machine import Machine

HOST_ID = 0
_U64 = struct.Struct("<Q")


class HostIPC:
    def __init__(self, machine: "Machine") -> None:
        self.m = machine
        lay = machine.layout
        self._view = memoryview(machine.arena.map)[lay.ring_offset:lay.ring_offset + lay.ring_area_bytes]
        self._address = machine.arena.address + lay.ring_offset
        self.ring = self.ring_of(HOST_ID)
        self.ring.set_mode("interrupt")
        cfg = machine.config
        self.cpu = cfg.physical_ids.get(cfg.host_cpus[0], 0) if cfg.host_cpus else 0
        self.messenger = Messenger(HOST_ID, self._post, self._liveness)
        self.messenger.register(M.MK_MSG_HALTED, self._on_halted)
        self.messenger.register(M.MK_MSG_SHUTDOWN_ACK, self._on_shutdown_ack)
        self.messenger.register(M.MK_MSG_HEARTBEAT, self._on_heartbeat)
        self._filters_seen: dict[int, set[tuple[int, int]]] = {}   # instance id -> filters

    def close(self) -> None:
        self.ring = None  # type: ignore[assignment]
        self._view.release()

    def ring_of(self, instance_id: int) -> Ring:
        return Ring(self._view, self._address, self.m.layout, instance_id)

    def _liveness(self, target: int):  # type: ignore[no-untyped-def]
        """Alive while the run we sent to is the one running (the pidfd tells us of deaths)."""
        inst = self.m._by_id(target)
        pid = inst.pid if inst is not None else None
        return lambda: inst is not None and inst.pid == pid and inst.state == State.ACTIVE

    def _post(self, target: int, msg_type: int, data: bytes) -> int:
        inst = self.m._by_id(target)
        if inst is not None and inst.state != State.ACTIVE and inst.served_by is not None:
            inst = self.m._by_id(inst.served_by)        # a standby took over the role
        if inst is None or inst.state != State.ACTIVE or inst.pid is None:
            raise RingError(errno.ESRCH, f"instance {target} is not active")
        target = inst.id
        ring = self.ring_of(target)
        door = ring.send(HOST_ID, self.cpu, msg_type, data)
        inst.counters["host_sent"] += 1
        if door == DOORBELL_WAKE and inst.doorbell_fd is not None:
            os.eventfd_write(inst.doorbell_fd, 1)       # halted: wake its HLT directly
        elif door:
            try:
                os.kill(inst.pid, IPI_SIGNAL)
            except ProcessLookupError:
                pass
        return target

    def drain(self) -> None:
        msgr = self.messenger
        while self.ring.drain(msgr.deliver, 64, handled=None if msgr.waiting else msgr.handled):
            pass

    def _on_halted(self, msg: M.Message) -> None:
        inst = self.m._by_id(msg.sender)
        reason = str(msg.payload.get("reason", ""))[:200] if isinstance(msg.payload, dict) else ""
        self.m.events.info("halted_message", instance=msg.sender,
                           name=inst.name if inst else None, reason=reason)
        if inst is not None:
            inst.counters["halted_msgs"] += 1

    def _on_shutdown_ack(self, msg: M.Message) -> None:
        inst = self.m._by_id(msg.sender)
        if inst is not None:
            inst.shutdown_acked = True
            self.m.events.info("shutdown_ack", instance=inst.id, name=inst.name)

    def _on_heartbeat(self, msg: M.Message) -> None:
        inst = self.m._by_id(msg.sender)
        if inst is not None:
            inst.counters["heartbeats"] += 1
            inst.last_heartbeat = time.time()

    def sweep_claims_of(self, inst: Instance) -> None:
        """A dead sender's unpublished claims would block its peers' rings: abandon them."""
        n = self.ring.abandon_claims_of(inst.id)
        for other in self.m.instances.values():
            n += self.ring_of(other.id).abandon_claims_of(inst.id)
        if n:
            self.m.events.warning("claims_abandoned", instance=inst.id, name=inst.name, slots=n)
            self.drain()

    def filters(self, inst: Instance) -> list[dict[str, int]]:
        """The drop filters this instance's ring has in force (floods of junk)."""
        return self.ring_of(inst.id).filters()

    def watch_filters(self, instances: list[Instance]) -> None:
        """A receiver sets and clears its drop filters itself, in shared memory, where the
        event log cannot see it: the host looks now and then (Machine.poll, every 0.1 s) and
        logs each change as ``ipi_filter_set`` / ``ipi_filter_cleared``. The values are what
        the instance wrote: logged as read, never acted on."""
        for inst in instances:
            now = {(f["sender"], f["type"]) for f in self.ring_of(inst.id).filters()}
            before = self._filters_seen.get(inst.id, set())
            for sender, mtype in sorted(now - before):
                self.m.events.warning("ipi_filter_set", instance=inst.id, name=inst.name,
                                      sender=sender, msg_type=mtype)
            for sender, mtype in sorted(before - now):
                self.m.events.info("ipi_filter_cleared", instance=inst.id, name=inst.name,
                                   sender=sender, msg_type=mtype)
            if now:
                self._filters_seen[inst.id] = now
            else:
                self._filters_seen.pop(inst.id, None)

    def counters(self, inst: Instance) -> dict[str, int]:
        """What the instance and its ring report (untrusted: plain integers, shown as read)."""
        ring = self.ring_of(inst.id).counters()
        lay = self.m.layout
        base = lay.control_offset + lay.control_slot_at(inst.id)
        amap = self.m.arena.map

        def u64(off: int) -> int:
            return _U64.unpack_from(amap, base + off)[0]
        return {
            "ipi_sent": u64(L.SLOT_IPI_SENT), "ipi_received": ring["received"],
            "ipi_ring_full": u64(L.SLOT_IPI_RING_FULL), "ipi_esrch": u64(L.SLOT_IPI_ESRCH),
            "ipi_dropped_bad_size": ring["dropped_bad_size"],
            "ipi_dropped_unknown_type": ring["dropped_unknown_type"],
            "ipi_dropped_abandoned": ring["dropped_abandoned"],
            "ipi_doorbells": ring["doorbells"], "ipi_dropped_filtered": ring["dropped_filtered"],
            "heartbeats_sent": u64(L.SLOT_HEARTBEATS),
        }
