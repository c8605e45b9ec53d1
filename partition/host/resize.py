"""Runtime resource changes of one instance: the RESOURCE protocol of the real system.

An update is a list of steps in the kernel's fixed order (memory-remove, memory-add, cpu-remove,
cpu-add). The whole list is checked against a simulated state before anything changes; then each
step runs: if the instance's kernel is running it is told first (CPU_ADD, CPU_REMOVE, MEM_ADD,
MEM_REMOVE, sent as host commands it can verify) and must answer with a RES_ACK whose status is 0
within ``ACK_TIMEOUT_S``; only then does the host move the resource (pool, cgroup cpuset,
affinity of every thread). A refusal, a silence or a death undoes the steps already done, in
reverse order, so the machine is exactly as it was; the kernel is told of each undo but nobody
waits for its answer. Memory a step takes away is scrubbed only when the whole change commits.

The RES_ACK is read where only the kernel itself can write it: its own control page
(``res_ack_seq``, ``res_ack_status``, ``res_ack_reason``; docs/arena.md), keyed by the host
command's number. A response in the host's ring would not do: any peer can write one there,
claiming any sender, with a request id it read from the target's ring.

Memory added at run time is reserved, announced and visible in every view, but a protected
instance holds no arena descriptor after boot (by design: it could map its peers), so its kernel
cannot map a region added while it runs; the region is its from the next boot on. Documented in
docs/kerf.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partition.abi import message as M
from partition.abi.ring import RingError
from partition.errors import InvalidSpec, PermissionDenied, ResourceBusy, ResourceRefused
from partition.host.devicetree import MEMORY_GRANULE, UpdateOp
from partition.host.instance import Instance, State
from partition.host.ports import SYSTEM_OS, OSPort
from partition.units import (
    PAGE_SIZE,
    format_size,
    parse_cpulist,
    parse_size,
    require_page_aligned,
)

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.pool import PoolConfig, ResourcePool


@dataclass
class Resources:
    """What a resource change touches (this module and poolresize.py), each named: the pool
    and its configuration, the arena, the event log, the cgroups; ``command``: a host command
    to an instance (hostipc.py); ``wait``: drives the machine until a condition or deadline."""

    config: PoolConfig
    pool: ResourcePool
    pool_offset: int
    arena: Arena
    events: EventLog
    cgroups: Cgroups
    command: Callable[..., Any]
    wait: Callable[[Callable[[], bool], float | None], bool]
    pin_host: bool
    port: OSPort = SYSTEM_OS              # thread affinity (host/ports.py)

#: how long a running kernel has to answer one resource change (the real system's RES_ACK wait)
ACK_TIMEOUT_S = 10.0
#: how long the steps of one change (an overlay transaction) wait for their RES_ACKs together:
#: an overlay may chain 64 steps, and kernels answering each just before ACK_TIMEOUT_S would
#: hold the machine's other verbs (queued behind the change) for ten minutes
CHAIN_TIMEOUT_S = 30.0
OP_NAMES = {M.MK_MSG_CPU_ADD: "cpu-add", M.MK_MSG_CPU_REMOVE: "cpu-remove",
            M.MK_MSG_MEM_ADD: "memory-add", M.MK_MSG_MEM_REMOVE: "memory-remove"}
INVERSE = {M.MK_MSG_CPU_ADD: M.MK_MSG_CPU_REMOVE, M.MK_MSG_CPU_REMOVE: M.MK_MSG_CPU_ADD,
           M.MK_MSG_MEM_ADD: M.MK_MSG_MEM_REMOVE, M.MK_MSG_MEM_REMOVE: M.MK_MSG_MEM_ADD}


@dataclass
class Step:
    op: int                       # MK_MSG_CPU_ADD ... MK_MSG_MEM_REMOVE
    cpus: list[int]               # logical CPUs (cpu steps)
    base: int = 0                 # arena offset (memory steps)
    size: int = 0

    def payload(self, r: Resources, op: int | None = None) -> dict[str, Any]:
        if (op or self.op) in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE):
            return {"cpus": [r.config.physical_ids.get(c, c) for c in self.cpus],
                    "logical": list(self.cpus)}
        return {"base": self.base, "size": self.size}

    def describe(self) -> str:
        if self.cpus:
            return f"{OP_NAMES[self.op]} CPUs {self.cpus}"
        return f"{OP_NAMES[self.op]} {self.base:#x}+{self.size:#x}"


def plan(r: Resources, inst: Instance, op: UpdateOp) -> list[Step]:
    """Check a whole update against the instance as it would be after each step; change
    nothing. CPUs in ``op`` are physical ids; the steps carry logical ones."""
    cfg = r.config
    logical = {p: c for c, p in cfg.physical_ids.items()}
    if inst.state not in (State.READY, State.LOADED, State.ACTIVE):
        raise ResourceBusy(f"instance {inst.name!r} is {inst.state.value}; its resources can "
                           "change when it is ready, loaded or active",
                           f"wait for it to settle (mkctl show {inst.name})")
    cpus = list(inst.cpus)
    regions = list(inst.regions)
    steps: list[Step] = []
    pool_lo = r.pool_offset
    for base, size in op.memory_remove:
        if (base, size) == regions[0]:
            raise PermissionDenied(f"{inst.name}: memory-remove {base:#x}+{size:#x} is the "
                                   "boot region (it holds the kernel image)",
                                   "remove only regions added at run time, newest first")
        if (base, size) not in regions:
            raise InvalidSpec(f"{inst.name}: memory-remove {base:#x}+{size:#x} is not one of "
                              f"its regions ({', '.join(f'{b:#x}+{s:#x}' for b, s in regions)})",
                              "memory leaves an instance in whole regions")
        regions.remove((base, size))
        steps.append(Step(M.MK_MSG_MEM_REMOVE, [], base, size))
    freed = [(s.base, s.size) for s in steps if s.op == M.MK_MSG_MEM_REMOVE]
    for base, size in op.memory_add:
        if size <= 0 or base % MEMORY_GRANULE or size % MEMORY_GRANULE or size % PAGE_SIZE:
            raise InvalidSpec(f"{inst.name}: memory-add {base:#x}+{size:#x} is not aligned to "
                              f"the {MEMORY_GRANULE >> 20} MB memory granule",
                              "place and size added memory in whole granules (memory-granule)")
        why = r.pool.range_free(base - pool_lo, size)
        if why is not None and (base, size) not in freed:
            raise ResourceBusy(f"{inst.name}: memory-add {base:#x}+{size:#x}: {why}",
                               "pick a free range of the pool (/proc/iomem)")
        if any(b < base + size and base < b + s for b, s in regions):
            raise ResourceBusy(f"{inst.name}: memory-add {base:#x}+{size:#x} overlaps its own "
                               "memory", "pick a free range of the pool (/proc/iomem)")
        regions.append((base, size))
        steps.append(Step(M.MK_MSG_MEM_ADD, [], base, size))
    for step_op, ids in ((M.MK_MSG_CPU_REMOVE, op.cpu_remove), (M.MK_MSG_CPU_ADD, op.cpu_add)):
        if not ids:
            continue
        if len(set(ids)) != len(ids):
            raise InvalidSpec(f"{inst.name}: {OP_NAMES[step_op]} names a CPU twice ({ids})",
                              "name each CPU once")
        unknown = [p for p in ids if p not in logical]
        if unknown:
            raise InvalidSpec(f"{inst.name}: APIC IDs {unknown} are no CPU of this machine",
                              f"pool APIC IDs: {sorted(cfg.physical_ids[c] for c in cfg.cpus)}")
        want = [logical[p] for p in ids]
        if step_op == M.MK_MSG_CPU_REMOVE:
            missing = [cfg.physical_ids[c] for c in want if c not in cpus]
            if missing:
                raise InvalidSpec(f"{inst.name}: cpu-remove of APIC IDs {missing} it does not "
                                  "hold", "remove only its own CPUs")
            cpus = [c for c in cpus if c not in want]
        else:
            for c in want:
                if c not in cfg.cpus:
                    if c in cfg.host_cpus:
                        raise PermissionDenied(f"CPU {cfg.physical_ids[c]} is reserved for host "
                                               "kernel", "add CPUs of the pool only")
                    raise InvalidSpec(f"APIC ID {cfg.physical_ids[c]} is not in the pool",
                                      "add CPUs of the pool only")
                users = [u for u in r.pool.cpu_users[c] if u != inst.name]
                if users and not cfg.oversubscribe:
                    raise ResourceBusy(f"APIC IDs [{cfg.physical_ids[c]}] are not available "
                                       f"(allocated to {', '.join(users)})",
                                       "add a free CPU (cpus-available in the device tree)")
                if c in cpus:
                    raise InvalidSpec(f"{inst.name} already holds APIC ID {cfg.physical_ids[c]}",
                                      "add CPUs it does not hold")
            cpus += want
        steps.append(Step(step_op, want))
    if not cpus:
        raise InvalidSpec(f"{inst.name}: the update would leave it no CPU",
                          "keep at least one CPU")
    return steps


def run(r: Resources, inst: Instance, steps: list[Step],
        until: float | None = None) -> Callable[[], None]:
    """Do the steps; on any failure undo the done ones in reverse and raise. Returns the
    commit action (scrubbing memory that left the instance) and the undo is kept by the
    caller through ``undo_steps``. ``until``: when the whole change's RES_ACK waits end (an
    overlay's transaction shares one across its fragments); CHAIN_TIMEOUT_S from now if
    not given."""
    done: list[Step] = []
    if until is None:
        until = time.monotonic() + CHAIN_TIMEOUT_S
    try:
        for step in steps:
            _tell(r, inst, step, step.op, wait=True, until=until)
            _move(r, inst, step, step.op)
            done.append(step)
    except BaseException:
        undo_steps(r, inst, done)
        raise
    removed = [s for s in steps if s.op == M.MK_MSG_MEM_REMOVE]

    def commit() -> None:
        for s in removed:
            r.arena.scrub(s.base, s.size)
    return commit


def inverse(inst_name: str, steps: list[Step], r: Resources) -> UpdateOp:
    """The update that takes ``steps`` back, as a new change (``rmdir tx_<N>`` of an update):
    planned against the instance as it is then, and asked of its kernel like any other."""
    phys = r.config.physical_ids
    op = UpdateOp(inst_name)
    for s in steps:
        if s.op == M.MK_MSG_MEM_ADD:
            op.memory_remove.append((s.base, s.size))
        elif s.op == M.MK_MSG_MEM_REMOVE:
            op.memory_add.append((s.base, s.size))
        elif s.op == M.MK_MSG_CPU_ADD:
            op.cpu_remove += [phys.get(c, c) for c in s.cpus]
        else:
            op.cpu_add += [phys.get(c, c) for c in s.cpus]
    return op


def undo_steps(r: Resources, inst: Instance, done: list[Step]) -> None:
    """Move every done step back, newest first; the kernel is told, nobody waits for it."""
    for step in reversed(done):
        inverse = INVERSE[step.op]
        _move(r, inst, step, inverse)
        try:
            _tell(r, inst, step, inverse, wait=False)
        except RingError:
            pass
    if done:
        r.events.warning("resources_rolled_back", instance=inst.id, name=inst.name,
                         steps=[s.describe() for s in reversed(done)])


def _tell(r: Resources, inst: Instance, step: Step, op: int, wait: bool,
          until: float = math.inf) -> None:
    """A running kernel hears of the change first and must accept it. Its RES_ACK is read
    from its own control page (written by it alone: a peer can post a response into the
    host's ring claiming any sender, never write another instance's page), keyed by the
    command's number; a death, ``ACK_TIMEOUT_S`` of silence or the whole update's
    ``until`` (CHAIN_TIMEOUT_S) passing is no answer."""
    if inst.state != State.ACTIVE or inst.pid is None:
        return
    body = step.payload(r, op)
    try:
        r.command(inst, op, body)
    except RingError as exc:
        if not wait:
            return
        raise ResourceRefused(f"instance {inst.name!r} could not be told of "
                              f"{OP_NAMES[op]}: {exc.strerror}",
                              "its IPI ring is full or it is not answering; retry") from None
    if not wait:
        return
    seq, generation = inst.cmd_seq, inst.generation
    own = r.arena.own(inst.id)
    what = f"{OP_NAMES[op]} {body}"
    step_deadline = time.monotonic() + ACK_TIMEOUT_S
    deadline = min(step_deadline, until)

    def answered() -> bool:
        return own.res_ack_seq == seq or inst.pid is None or inst.generation != generation
    while own.res_ack_seq != seq:
        left = deadline - time.monotonic()
        gone = inst.pid is None or inst.generation != generation
        if gone or left <= 0:
            inst.resource_changes["unanswered"] += 1
            why = "it died" if gone else f"no RES_ACK within {ACK_TIMEOUT_S:g} s" \
                if deadline == step_deadline else \
                f"no RES_ACK within the {CHAIN_TIMEOUT_S:g} s its update's steps have together"
            r.events.warning("resource_unanswered", instance=inst.id, name=inst.name, op=what,
                             why=why)
            raise ResourceRefused(f"instance {inst.name!r} did not accept {what}: {why}",
                                  "the change was rolled back; check its console")
        # through the machine's wait, as a graceful kill waits: under the daemon its waiter
        # goes on answering read verbs (show, console) while a silent kernel holds the change
        # (the kernel rings the host's doorbell with its RES_ACK; 50 ms looks catch one that
        # does not)
        r.wait(answered, time.monotonic() + min(left, 0.05))
    status = own.res_ack_status
    if status != 0:
        inst.resource_changes["refused"] += 1
        reason = own.res_ack_reason or f"errno {status}"
        r.events.warning("resource_refused", instance=inst.id, name=inst.name, op=what,
                         reason=reason)
        raise ResourceRefused(f"instance {inst.name!r} refused {what}: {reason}",
                              "the change was rolled back; the kernel's on_* hook said no")
    inst.resource_changes["accepted"] += 1


def _move(r: Resources, inst: Instance, step: Step, op: int) -> None:
    """The host's half: pool, instance record, cgroup cpuset, thread affinity."""
    pool_lo = r.pool_offset
    if op == M.MK_MSG_MEM_ADD:
        r.pool.add_range(inst.name, step.base - pool_lo, step.size)
        inst.add_region(step.base, step.size)
    elif op == M.MK_MSG_MEM_REMOVE:
        r.pool.remove_range(inst.name, step.base - pool_lo, step.size)
        inst.remove_region(step.base, step.size)
    elif op == M.MK_MSG_CPU_ADD:
        r.pool.add_cpus(inst.name, step.cpus)
        inst.cpus = sorted(set(inst.cpus) | set(step.cpus))
    else:
        r.pool.remove_cpus(inst.name, step.cpus)
        inst.cpus = sorted(set(inst.cpus) - set(step.cpus))
    inst.physical_cpus = [r.config.physical_ids.get(c, c) for c in inst.cpus]
    if op in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE):
        _pin(r, inst)
    r.events.info("resources_changed", instance=inst.id, name=inst.name, op=OP_NAMES[op],
                  cpus=inst.physical_cpus, regions=[list(r) for r in inst.regions])


def _pin(r: Resources, inst: Instance) -> None:
    """Every thread of the instance's process (running or parked) to its CPUs: the cgroup's
    cpuset first (it bounds what affinity may name), then each thread's affinity."""
    if not inst.cpus:              # between a cpu-remove and the cpu-add of one change
        return
    r.cgroups.set_cpus(inst.id, inst.cpus)
    pid = inst.pid or (inst.parked.pid if inst.parked is not None else None)
    if pid is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            r.port.sched_setaffinity(tid, inst.cpus)
        except OSError:
            pass


def update_op(inst: Instance, cpus: str | list[int] | None, memory: str | int | None,
              config: PoolConfig, pool: ResourcePool, pool_offset: int) -> UpdateOp:
    """``mkctl update``'s CPUs and memory as the one overlay fragment ``kerf update`` writes:
    memory grows by a new region at the highest free, granule-aligned range of the pool and
    shrinks by whole regions, newest first. Checks what it can alone; ``plan`` the rest."""
    if cpus is None and memory is None:
        raise InvalidSpec("give --cpus or --memory (or both)", "e.g. mkctl update a --cpus 1,2")
    phys = config.physical_ids
    op = UpdateOp(inst.name)
    if cpus is not None:
        want = parse_cpulist(cpus, "CPU list")
        op.cpu_remove = [phys.get(c, c) for c in inst.cpus if c not in want]
        op.cpu_add = [phys.get(c, c) for c in want if c not in inst.cpus]
    if memory is None:
        return op
    nbytes = parse_size(memory, "memory")
    require_page_aligned(nbytes, "memory", memory)      # 64 meant 64M: the hint says so
    have = sum(size for _, size in inst.regions)
    if nbytes > have:
        grow = nbytes - have
        if grow % MEMORY_GRANULE:
            raise InvalidSpec(f"Cannot grow instance '{inst.name}' by {format_size(grow)}: "
                              f"memory is added in multiples of "
                              f"{format_size(MEMORY_GRANULE)}", "round the size")
        base = pool.highest_free(grow, MEMORY_GRANULE, pool_offset)
        if base is None:
            raise ResourceBusy(f"Cannot grow instance '{inst.name}' by {format_size(grow)}: "
                               "no pool chunk has a free range that large",
                               "shrink or delete another instance")
        op.memory_add = [(base, grow)]
    elif nbytes < have:
        take, total = [], 0
        for region in reversed(inst.extra_regions):
            if total >= have - nbytes:
                break
            take.append(region)
            total += region[1]
        if total != have - nbytes:
            raise InvalidSpec(f"Cannot shrink by {format_size(have - nbytes)}: memory "
                              "leaves an instance in whole regions, newest first "
                              f"(regions: {', '.join(format_size(s) for _, s in inst.regions)})",
                              "shrink to the size before a region was added")
        op.memory_remove = take
    return op
