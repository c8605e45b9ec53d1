"""Overlay transactions: ``overlays/new`` and ``overlays/tx_<N>/`` of the multikernel filesystem.

A written overlay (devicetree.py parses it) becomes one transaction: every fragment is checked
first, then applied in order; if one fails, those already applied are undone in reverse and the
transaction is recorded as ``failed`` (the write fails with the first failure's errno). An applied
transaction can be removed (``rmdir tx_<N>``), which undoes its operations in reverse order: an
instance it created is deleted (it must be ready again), one it removed is created again with the
same id, CPUs and memory, and a resource update is changed back, with the running kernel told.
Ids count up from 1 for the machine's life; a removed transaction's directory goes away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from partition.errors import InvalidSpec, MKError, NoSuchInstance, PermissionDenied, ResourceBusy
from partition.host import poolresize, resize
from partition.host.devicetree import CreateOp, Overlay, PoolOp, RemoveOp, UpdateOp, parse_overlay

if TYPE_CHECKING:
    from partition.host.publish import Publisher
    from partition.host.resize import Resources
    from partition.host.table import InstanceTable

STATUSES = ("applied", "failed", "removed", "pending")
#: transactions kept for reading back; older failed or removed ones are forgotten first
MAX_KEPT = 1024


@dataclass
class Transaction:
    id: int
    status: str
    target: str                      # the first fragment's target path (tx_N/instance)
    operations: list[str]            # what it did, for the views and events
    names: list[str] = field(default_factory=list)   # the instances it changed, in order
    error: str = ""
    created: float = field(default_factory=time.time)
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    on_commit: list[Callable[[], None]] = field(default_factory=list, repr=False)
    #: when its resource changes stop waiting for RES_ACKs, all fragments together (resize.py)
    ack_until: float = field(default_factory=lambda: time.monotonic() + resize.CHAIN_TIMEOUT_S,
                             repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "instance": self.target,
                "operations": list(self.operations), "error": self.error}


class Overlays:
    """The transaction log of one machine."""

    def __init__(self, res: Resources, table: InstanceTable, publisher: Publisher,
                 create: Callable[..., Any], delete: Callable[[str], Any]) -> None:
        """``create`` and ``delete``: the machine's verbs, which an instance-create or
        instance-remove fragment is (checked and published as those verbs are)."""
        self.r = res
        self.table = table
        self.publisher = publisher
        self.create = create
        self.delete = delete
        self.transactions: dict[int, Transaction] = {}
        self.next_id = 1

    def visible(self) -> list[Transaction]:
        """The ``tx_<N>`` directories: every transaction not removed."""
        return [t for t in self.transactions.values() if t.status != "removed"]

    def apply(self, data: bytes) -> Transaction:
        return self.run(parse_overlay(data))      # EINVAL/EOPNOTSUPP: no transaction at all

    def run(self, overlay: Overlay) -> Transaction:
        tx = Transaction(self.next_id, "pending", overlay.target, [])
        self.next_id += 1
        self._remember(tx)
        commits: list[Callable[[], None]] = []
        try:
            for op in overlay.operations:
                if isinstance(op, CreateOp):
                    self._create(tx, op)
                elif isinstance(op, RemoveOp):
                    self._remove(tx, op)
                elif isinstance(op, PoolOp):
                    poolresize.run(self.r, tx, op)
                else:
                    self._update(tx, op, commits)
        except BaseException as exc:
            for undo in reversed(tx.undo):
                undo()
            tx.undo.clear()
            tx.status = "failed"
            tx.error = f"{exc.message} [{exc.code}]" if isinstance(exc, MKError) else repr(exc)
            self.r.events.warning("overlay_failed", tx=tx.id, target=tx.target, error=tx.error)
            self.publisher.publish()
            raise
        for commit in commits:
            commit()
        for hook in tx.on_commit:
            hook()
        tx.status = "applied"
        self.r.events.info("overlay_applied", tx=tx.id, target=tx.target, operations=tx.operations)
        self.publisher.publish()
        return tx

    def remove(self, tx_id: int) -> Transaction:
        """Roll a transaction back (``rmdir tx_<N>``): its undo actions, newest first."""
        tx = self.transactions.get(tx_id)
        if tx is None or tx.status == "removed":
            raise NoSuchInstance(f"no transaction tx_{tx_id}", "list overlays/ for the ids")
        if tx.status == "applied":
            for i in range(len(tx.undo) - 1, -1, -1):
                tx.undo[i]()                # an undo that refuses leaves the rest in place
                tx.undo.pop(i)
        tx.status = "removed"
        self.r.events.info("overlay_removed", tx=tx.id, target=tx.target)
        self.publisher.publish()
        return tx

    def _remember(self, tx: Transaction) -> None:
        self.transactions[tx.id] = tx
        if len(self.transactions) > MAX_KEPT:
            old = next((i for i, t in self.transactions.items() if t.status != "applied"), None)
            if old is not None:
                del self.transactions[old]

    # -- operations ----------------------------------------------------------------------------
    def _logical(self, cpus: list[int]) -> list[int]:
        logical = {p: c for c, p in self.r.config.physical_ids.items()}
        unknown = [p for p in cpus if p not in logical]
        if unknown:
            pool = sorted(self.r.config.physical_ids[c] for c in self.r.config.cpus)
            raise InvalidSpec(f"Invalid APIC IDs requested: {unknown}. Available APIC IDs: {pool}",
                              "name pool CPUs by their APIC id (/proc/cpuinfo apicid)")
        return [logical[p] for p in cpus]

    def _create(self, tx: Transaction, op: CreateOp) -> None:
        """instance-create, checked in kerf's words and APIC ids first (a tree can come from
        anything that writes overlays/new, not only kerf), then as ``mkctl create``."""
        cfg = self.r.config
        cpus = self._logical(op.cpus)
        pairs = list(zip(op.cpus, cpus))
        host = [p for p, c in pairs if c not in cfg.cpus and c in cfg.host_cpus]
        if host:
            raise PermissionDenied(f"{op.name}: CPUs {host} are reserved for host kernel",
                                   f"Use available CPUs: {sorted(cfg.physical_ids[c] for c in cfg.cpus)}")
        if not cfg.oversubscribe:
            busy = {p: self.r.pool.cpu_users[c] for p, c in pairs if self.r.pool.cpu_users.get(c)}
            if busy:
                users = ", ".join(f"{u} uses APIC IDs {sorted(p for p, us in busy.items() if u in us)}"
                                  for u in sorted({u for us in busy.values() for u in us}))
                raise ResourceBusy(f"APIC IDs {sorted(busy)} are not available ({users})",
                                   "pick CPUs from cpus-available (kerf show)")
        self.create(op.name, op.memory_bytes, cpus=cpus, id=op.id, llc_way_mask=op.llc_way_mask)
        tx.operations.append(f"instance-create {op.name}")
        tx.names.append(op.name)

        def undo() -> None:
            inst = self.table.by_name.get(op.name)
            if inst is None:
                return
            if inst.state.value != "ready":
                raise ResourceBusy(f"transaction tx_{tx.id} created {op.name!r}, which is "
                                   f"{inst.state.value} now", f"kerf unload {op.name} first")
            self.delete(op.name)
        tx.undo.append(undo)

    def _remove(self, tx: Transaction, op: RemoveOp) -> None:
        inst = self.table.by_name.get(op.name)
        if inst is None:
            raise NoSuchInstance(f"Instance '{op.name}' does not exist",
                                 "list instances/ for the names")
        name, memory, cpus, iid = inst.name, inst.memory_bytes, list(inst.cpus), inst.id
        added = list(inst.extra_regions)
        llc_way_mask = inst.llc_way_mask or None
        # as the real instance-remove (and mkctl delete): an instance that is not running is
        # destroyed with whatever it holds; regions added at run time go back to the pool too
        self.delete(op.name)
        tx.operations.append(f"instance-remove {op.name}")
        tx.names.append(op.name)

        def undo() -> None:
            self.create(name, memory, cpus=cpus, id=iid, llc_way_mask=llc_way_mask)
            back = self.table.by_name[name]
            lost = []
            for base, size in added:        # free again unless a later change took them
                if self.r.pool.range_free(base - self.r.pool_offset, size) is None:
                    self.r.pool.add_range(name, base - self.r.pool_offset, size)
                    back.add_region(base, size)
                else:
                    lost.append([base, size])
            if lost:
                self.r.events.warning("instance_recreated_smaller", tx=tx.id, name=name, lost=lost)
            self.publisher.publish(back)
        tx.undo.append(undo)

    def _update(self, tx: Transaction, op: UpdateOp, commits: list[Callable[[], None]]) -> None:
        inst = self.table.by_name.get(op.name)
        if inst is None:
            raise NoSuchInstance(f"Instance '{op.name}' does not exist",
                                 "list instances/ for the names")
        if op.empty():
            return
        steps = resize.plan(self.r, inst, op)
        commits.append(resize.run(self.r, inst, steps, tx.ack_until))
        tx.operations += [f"{s.describe()} on {op.name}" for s in steps]
        tx.names.append(op.name)
        done = [False]

        def undo() -> None:
            if not done[0]:             # the same transaction failed later: move it straight back
                resize.undo_steps(self.r, inst, steps)
                return
            if self.table.by_name.get(inst.name) is not inst:
                raise ResourceBusy(f"transaction tx_{tx.id} changed {inst.name!r}, which was "
                                   "deleted since", "nothing to roll back: leave it")
            back = resize.inverse(inst.name, steps, self.r)
            resize.run(self.r, inst, resize.plan(self.r, inst, back))()   # checked now, then committed
            self.publisher.publish(inst)
        tx.undo.append(undo)
        tx.on_commit.append(lambda: done.__setitem__(0, True))
        self.publisher.publish(inst)
