"""The pool grows and shrinks at run time: ``/resources`` fragments of an overlay transaction.

As the real kernel does it (Documentation/multikernel/overlays.rst):

* ``memory-add { memory@N { size; }; }`` grows the pool by a chunk of ``size`` bytes whose base
  the pool picks (a ``reg`` is refused);
* ``memory-remove { memory@N { reg; }; }`` gives back a whole chunk, named as the root
  ``device_tree`` reports it (``memory@<base>``'s ``reg``);
* ``cpu-add`` moves a CPU of the host into the pool, ``cpu-remove`` a free pool CPU back;
* resources leave the pool before any join it: cpu-remove, memory-remove, memory-add, cpu-add.

Refusals, all checked before anything moves: a CPU lent to an instance or a chunk holding an
instance's memory is EBUSY, and so is a memory-remove that would strand parked CPUs (the real
host parks every pool CPU in an area of pool memory: a pool left with CPUs and no memory has
nowhere to park them; returning the CPUs first in the same fragment empties the pool).

What backs the pool: the arena's pool area is a window reserved at init (``pool.pool_window``:
the pool asked for plus the host's RAM). It is address space only (the arena is sparse), so
growing the pool reserves a free range of the window, no mapping moves and no instance notices;
a chunk that leaves has its pages punched out of the arena when the transaction commits, so
the host gets the memory back. Resizing the arena itself would remap it under every view of it
the host holds (its size is sealed, for that reason, on a memfd).

Rolling back (``rmdir tx_<N>``) walks the steps in reverse with the real kernel's two
exceptions: a pool memory-add is not undone (the overlay never recorded the base the pool
chose; a warning event says so) and a pool memory-remove regrows the pool by the same size, at
a base the pool picks again. A transaction that fails is undone exactly, as every failed
transaction is (host/overlays.py): the machine is as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from partition import linux
from partition.errors import InvalidSpec, OutOfMemory, ResourceBusy
from partition.host.devicetree import PoolOp
from partition.host.pool import place_chunk
from partition.units import format_cpulist, format_size

if TYPE_CHECKING:
    from partition.host.overlays import Transaction
    from partition.host.resize import Resources


#: chunks the pool keeps at most: each is a line of /proc/iomem and a node of the root tree
#: that every view renders again (kerf adds one per growing init)
MAX_POOL_CHUNKS = 256


@dataclass
class PoolStep:
    kind: str                 # cpu-remove, memory-remove, memory-add, cpu-add
    cpu: int = -1             # logical CPU
    physical: int = -1        # its APIC id
    offset: int = 0           # pool-relative (memory steps)
    size: int = 0

    def describe(self, pool_lo: int) -> str:
        if self.cpu >= 0:
            return f"pool {self.kind} APIC ID {self.physical}"
        return f"pool {self.kind} {pool_lo + self.offset:#x}+{self.size:#x}"


def plan(r: Resources, op: PoolOp) -> list[PoolStep]:
    """Check a whole ``/resources`` fragment against the pool as it would be after each step,
    in the real order; change nothing."""
    cfg, pool, lo = r.config, r.pool, r.pool_offset
    for kind, ids in (("cpu-remove", op.cpu_remove), ("cpu-add", op.cpu_add)):
        if len(set(ids)) != len(ids):
            raise InvalidSpec(f"/resources {kind} names a CPU twice ({ids})", "name each CPU once")
    steps: list[PoolStep] = []
    cpus = list(cfg.cpus)
    host = list(cfg.host_cpus)
    chunks = list(pool.chunks)
    in_pool = {cfg.physical_ids.get(c, c): c for c in cfg.cpus}
    for p in op.cpu_remove:
        c = in_pool.get(p)
        if c is None:
            raise InvalidSpec(f"/resources cpu-remove: APIC ID {p} is not in the pool (pool APIC "
                              f"IDs: {sorted(in_pool)})", "return only CPUs the pool holds")
        users = pool.cpu_users.get(c) or []
        if users:
            raise ResourceBusy(f"/resources cpu-remove: APIC ID {p} is lent to "
                               f"{', '.join(repr(u) for u in sorted(set(users)))}",
                               "take it back from the instance first (kerf update NAME --cpus)")
        cpus.remove(c)
        host = sorted(set(host) | {c})
        steps.append(PoolStep("cpu-remove", cpu=c, physical=p))
    for base, size in op.memory_remove:
        off = base - lo
        if (off, size) not in chunks:
            have = ", ".join(f"{lo + b:#x}+{n:#x}" for b, n in chunks) or "none"
            raise InvalidSpec(f"/resources memory-remove {base:#x}+{size:#x} is not a pool chunk "
                              f"(chunks: {have})", "name a whole chunk as the root device_tree "
                              "reports it (memory@<base> reg)")
        owner = pool.chunk_owner(off, size)
        if owner is not None:
            raise ResourceBusy(f"/resources memory-remove {base:#x}+{size:#x}: the chunk holds "
                               f"memory of instance {owner!r}",
                               f"delete {owner} or shrink it out of the chunk first")
        chunks.remove((off, size))
        if cpus and not chunks:
            raise ResourceBusy(f"/resources memory-remove {base:#x}+{size:#x} would strand the "
                               f"pool's parked CPUs (APIC IDs "
                               f"{sorted(cfg.physical_ids.get(c, c) for c in cpus)}): their "
                               "park area needs pool memory",
                               "return the pool's CPUs in the same fragment (cpu-remove) or "
                               "keep a chunk")
        steps.append(PoolStep("memory-remove", offset=off, size=size))
    for size in op.memory_add:
        if len(chunks) >= MAX_POOL_CHUNKS:
            raise OutOfMemory(f"/resources memory-add: the pool holds {len(chunks)} chunks, the "
                              f"most it keeps ({MAX_POOL_CHUNKS})",
                              "grow it by fewer, larger chunks, or give small ones back first")
        room = pool.window - sum(n for _, n in chunks)
        at = place_chunk(chunks, pool.window, size, lo) if size <= room else None
        if at is None:
            raise OutOfMemory(f"/resources memory-add of {format_size(size)}: the host has "
                              f"{format_size(room) if room > 0 else 'nothing'} left to give the "
                              f"pool (the pool's window is {format_size(pool.window)}: what init "
                              "asked for and the host's RAM)"
                              + ("" if size > room else ", not in one piece"),
                              "grow the pool by less")
        chunks.append((at, size))
        steps.append(PoolStep("memory-add", offset=at, size=size))
    # the host's online CPUs, not this process's affinity: a supervisor is pinned to the
    # host's CPUs (pin_host), and a CPU neither the host's nor the pool's is this host's too
    online = {p: c for c, p in sorted(linux.physical_cpu_ids().items())}
    for p in op.cpu_add:
        c = online.get(p)
        if c is None:
            raise InvalidSpec(f"/resources cpu-add: APIC ID {p} is no CPU of this host (APIC "
                              f"IDs: {sorted(online)})", "name a host CPU by its apicid")
        if c in cpus:
            raise InvalidSpec(f"/resources cpu-add: APIC ID {p} is in the pool already",
                              "add a CPU the host holds")
        if host == [c] and not cfg.oversubscribe:
            raise ResourceBusy(f"/resources cpu-add: APIC ID {p} is the host kernel's last CPU",
                               "leave the host a CPU, or init the machine with --oversubscribe")
        cpus.append(c)
        if not (cfg.oversubscribe and host == [c]):
            host = [h for h in host if h != c]
        steps.append(PoolStep("cpu-add", cpu=c, physical=p))
    return steps


def run(r: Resources, tx: Transaction, op: PoolOp) -> None:
    """Apply a checked fragment step by step; each step's undo goes on the transaction."""
    lo = r.pool_offset
    steps = plan(r, op)
    committed = [False]
    tx.on_commit.append(lambda: committed.__setitem__(0, True))
    for step in steps:
        tx.undo.append(_do(r, tx, step, committed))
        tx.operations.append(step.describe(lo))
    if steps:
        _pin_host(r)


def _do(r: Resources, tx: Transaction, step: PoolStep, committed: list[bool]) -> Callable[[], None]:
    cfg, pool, lo = r.config, r.pool, r.pool_offset
    was_host = step.cpu in cfg.host_cpus
    if step.kind == "cpu-remove":
        pool.remove_pool_cpu(step.cpu)
    elif step.kind == "cpu-add":
        pool.add_pool_cpu(step.cpu, step.physical,
                          keep_host=cfg.oversubscribe and cfg.host_cpus == [step.cpu])
    elif step.kind == "memory-remove":
        pool.remove_chunk(step.offset, step.size)
        tx.on_commit.append(lambda: r.arena.scrub(lo + step.offset, step.size))
    else:
        pool.add_chunk(step.offset, step.size)
    _changed(r, step.kind, step)

    def undo() -> None:
        if step.kind == "cpu-remove":
            pool.add_pool_cpu(step.cpu, step.physical, keep_host=was_host)
            _changed(r, "cpu-add", step, rollback=tx.id)
        elif step.kind == "cpu-add":
            users = pool.cpu_users.get(step.cpu) or []
            if users:
                raise ResourceBusy(f"transaction tx_{tx.id} added APIC ID {step.physical} to the "
                                   f"pool, which is lent to {', '.join(sorted(set(users)))} now",
                                   "take it back from the instance first")
            pool.remove_pool_cpu(step.cpu, to_host=was_host)
            _changed(r, "cpu-remove", step, rollback=tx.id)
        elif step.kind == "memory-add":
            if committed[0]:
                # the real kernel: the base was the pool's choice and the overlay never
                # recorded it, so no chunk can be named for a shrink; it warns and goes on
                r.events.warning("pool_rollback_kept", tx=tx.id, op="memory-add",
                                 base=lo + step.offset, size=step.size,
                                 why="the pool chose the chunk's base; the overlay does not "
                                     "name it, so the chunk stays")
                return
            pool.remove_chunk(step.offset, step.size)
            _changed(r, "memory-remove", step, rollback=tx.id)
        else:
            at = step.offset
            if committed[0]:
                # regrown by the same size, at a base the pool picks again (the old range
                # went back to the host)
                found = pool.place_chunk(step.size, lo)
                if found is None or step.size > pool.window - cfg.memory_bytes:
                    raise OutOfMemory(f"transaction tx_{tx.id} cannot regrow the pool by "
                                      f"{format_size(step.size)}: no room left in its window",
                                      "shrink the pool elsewhere first")
                at = found
            pool.add_chunk(at, step.size)
            _changed(r, "memory-add", PoolStep("memory-add", offset=at, size=step.size),
                     rollback=tx.id)
        _pin_host(r)
    return undo


def _changed(r: Resources, op: str, step: PoolStep, rollback: int | None = None) -> None:
    cfg = r.config
    fields: dict[str, object] = {"op": op, "cpus": [cfg.physical_ids.get(c, c) for c in cfg.cpus],
                                 "memory_bytes": cfg.memory_bytes,
                                 "chunks": [[r.pool_offset + b, n] for b, n in r.pool.chunks]}
    if step.cpu >= 0:
        fields["cpu"] = step.physical
    else:
        fields["base"], fields["size"] = r.pool_offset + step.offset, step.size
    if rollback is not None:
        fields["rollback_of"] = rollback
    r.events.info("pool_changed", **fields)


def _pin_host(r: Resources) -> None:
    """A supervisor pinned to the host's CPUs follows them (a CPU that joined the pool is no
    longer the host's; one that left it is again)."""
    if r.pin_host and r.config.host_cpus:
        try:
            r.port.sched_setaffinity(0, r.config.host_cpus)
        except OSError as exc:
            r.events.warning("host_pin_failed", cpus=format_cpulist(r.config.host_cpus),
                             why=exc.strerror)
