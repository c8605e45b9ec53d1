"""Creating and deleting instances: their CPUs and partition reserved from the pool and given
back, their arena slots made fresh, their LLC group made and removed.

``create`` checks everything before its first change (the userland's process limit and root,
the pool's plan, the LLC mask, the recovery policy, the standby's primary; the resctrl group is
the last that can fail) and ``delete`` scrubs every region before it goes back to the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from partition.abi.console import format_console
from partition.errors import NoSuchInstance
from partition.host import llc
from partition.host.instance import Instance, State
from partition.host.recovery import RecoveryPolicy
from partition.host.userspec import PIDS_MAX_DEFAULT, check_pids_max, check_rootfs

if TYPE_CHECKING:
    from partition.abi.layout import ArenaLayout
    from partition.host.arena import Arena
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.pool import PoolConfig, ResourcePool
    from partition.host.publish import Publisher
    from partition.host.table import InstanceTable


class Provisioning:
    """The instances of one machine come and go here."""

    def __init__(self, table: InstanceTable, pool: ResourcePool, config: PoolConfig,
                 layout: ArenaLayout, arena: Arena, cgroups: Cgroups, resctrl: llc.Resctrl,
                 llc_way_mask: int | None, events: EventLog, publisher: Publisher) -> None:
        self.table = table
        self.pool = pool
        self.config = config
        self.layout = layout
        self.arena = arena
        self.cgroups = cgroups
        self.resctrl = resctrl
        self.llc_way_mask = llc_way_mask      # the pool's LLC ways (None: not divided)
        self.events = events
        self.publisher = publisher

    def create(self, name: str, memory: str | int, cpus: str | list[int] | None,
               cpu_count: int | None, id: int | None, policy: dict[str, Any],
               standby_for: str | None, llc_way_mask: int | str | None,
               pids_max: object = None, rootfs: object = None,
               shared: list[str] | None = None) -> Instance:
        """Reserve CPUs and a partition (empty -> ready). ``pids_max`` and ``rootfs``: its
        userland's process limit and root, checked before anything is reserved; ``shared``:
        the machine's shared regions it mounts (already checked by host/shared.py)."""
        limit = PIDS_MAX_DEFAULT if pids_max is None else check_pids_max(pids_max, repr(name))
        root = None if rootfs is None else check_rootfs(rootfs, repr(name))
        r = self.pool.plan(name, memory, cpus=cpus, cpu_count=cpu_count, instance_id=id)
        mask = 0
        if llc_way_mask is not None:
            mask = llc.parse_mask(llc_way_mask)
            llc.check_instance(name, mask, self.llc_way_mask,
                               {i.name: i.llc_way_mask for i in self.table if i.llc_way_mask})
        recovery = RecoveryPolicy.build(**policy)
        if standby_for is not None and standby_for not in self.table:
            raise NoSuchInstance(f"standby_for names no instance: {standby_for!r}",
                                 "create the primary first")
        if mask:
            self.resctrl.make_group(r.id, mask)     # (the last that can fail)
        self.pool.commit(r)
        inst = Instance(id=r.id, name=r.name, cpus=r.cpus,
                        physical_cpus=[self.config.physical_ids.get(c, c) for c in r.cpus],
                        memory_base=self.layout.pool_offset + r.memory_offset,
                        memory_bytes=r.memory_bytes, recovery=recovery, standby_for=standby_for,
                        llc_way_mask=mask, pids_max=limit, rootfs=root,
                        shared=list(shared or []))
        self.table.add(inst)
        self._clear_slots(inst)
        self.events.info("instance_created", instance=inst.id, name=name, cpus=inst.cpus,
                         memory_base=inst.memory_base, memory_bytes=inst.memory_bytes,
                         shared_cpus=self.pool.shared_cpus(name, inst.cpus),
                         pids_max=limit, **({"rootfs": root} if root else {}),
                         **({"shared": list(shared)} if shared else {}),
                         **({"llc_way_mask": llc.fmt(mask), "llc_enforced": self.resctrl.enforced}
                            if mask else {}))
        self.publisher.transition(inst, State.READY, "create", old=State.EMPTY)
        return inst

    def delete(self, inst: Instance) -> None:
        """Free the partition and CPUs (ready -> gone); the partition is scrubbed."""
        self.cgroups.remove(inst.id)
        llc.leave(self.resctrl, self.events, inst)
        for base, size in inst.regions:
            self.arena.scrub(base, size)
        self._clear_slots(inst)
        self.arena.clear_record(inst.id)
        self.pool.release(inst.name, inst.id, inst.cpus)
        self.table.remove(inst)
        self.events.info("state_change", instance=inst.id, name=inst.name, old="ready",
                         new="empty", cause="delete")
        self.publisher.publish()

    def _clear_slots(self, inst: Instance) -> None:
        """A fresh console and peer and own slots for an instance's id."""
        off = self.layout.console_at(inst.id)
        format_console(memoryview(self.arena.map)[off:off + self.layout.console_bytes])
        self.arena.peer(inst.id).clear()
        self.arena.own(inst.id).clear()
