"""The machine's assembly: its arguments checked (``Settings``), and its collaborators built,
each given only what it uses (``assemble``). The facade (machine.py) is over what
this returns; nothing built here receives the machine, only the few verbs it calls back
(``Hooks``).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from partition import linux
from partition.abi import layout as L
from partition.abi.console import ConsoleWriter, format_console
from partition.abi.constants import HOST_ID, STATE_ACTIVE
from partition.errors import InvalidSpec
from partition.host import adoption, llc, rundir, signing, statefile
from partition.host.arena import Arena
from partition.host.cgroups import Cgroups
from partition.host.describe import Looks
from partition.host.events import EventLog
from partition.host.hostipc import HostBells, HostIPC
from partition.host.lifecycle import Lifecycle
from partition.host.liveupdate import LiveUpdate
from partition.host.loading import Loading
from partition.host.overlays import Overlays
from partition.host.pool import PoolConfig, ResourcePool, pool_shape
from partition.host.provision import Provisioning
from partition.host.publish import Publisher
from partition.host.reactor import Reactor, Watch
from partition.host.resize import Resources
from partition.host.shared import SharedRegions, parse_specs
from partition.host.supervision import Supervisor
from partition.host.sweep import Sweep
from partition.host.table import InstanceTable
from partition.host.turn import Turn
from partition.host.userlands import Userlands
from partition.host.views import ViewWriter
from partition.host.writewatch import WriteWatch
from partition.units import seconds


@dataclass
class Settings:
    """A machine's arguments, each checked (InvalidSpec) before anything is made."""

    config: PoolConfig
    #: the pool's chunks and window as a dead host left them (adoption: the state file),
    #: else one chunk of ``memory`` in a window with room to grow (host/poolresize.py)
    pool_shape: tuple[list[tuple[int, int]], int]
    pin_host: bool
    #: the LLC ways the pool hands out (the baseline's llc-way-mask; host/llc.py)
    llc_way_mask: int | None
    #: signed images (host/signing.py): the keyring kexec verifies against, and whether an
    #: unsigned or unverified image is refused (KEXEC_SIG_FORCE)
    keyring: signing.Keyring | None
    require_signed: bool
    #: instances outlive this host (no parent-death signal; a named arena; a state file a
    #: new host adopts them from: host/adoption.py). The supervisor's machines do.
    survive_host: bool
    adopting: bool
    console_bytes: int
    ring_slots: int
    ring_slot_bytes: int
    kill_timeout: float
    boot_timeout: float
    protection: bool
    #: the machine's shared regions, name -> bytes (host/shared.py)
    shared: dict[str, int]

    @classmethod
    def check(cls, cpus: str | list[int] | None, memory: str | int,
              host_cpus: str | list[int] | None, oversubscribe: bool, console_bytes: int,
              kill_timeout: float, boot_timeout: float, pin_host: bool, ring_slots: int,
              ring_slot_bytes: int, protection: bool, survive_host: bool, adopt: bool,
              pool_chunks: list[list[int]] | None, pool_window: int | None,
              llc_way_mask: int | str | None, require_signed: bool,
              keyring: str | None, shared: list[str] | dict[str, Any] | None = None
              ) -> Settings:
        config = PoolConfig.build(cpus, memory, host_cpus, oversubscribe)
        shape = pool_shape(config.memory_bytes, pool_chunks, pool_window)
        mask = None if llc_way_mask is None else \
            llc.parse_mask(llc_way_mask, "the pool's llc-way-mask")
        if not isinstance(require_signed, bool):
            raise InvalidSpec(f"require_signed must be true or false, got {require_signed!r}",
                              "--require-signed takes no value")
        if require_signed and not keyring:
            raise InvalidSpec("signed images are required but no keyring is given: nothing "
                              "could verify them", "mkctl init --require-signed --keyring CERT")
        ring = signing.Keyring(keyring) if keyring else None
        if not (isinstance(console_bytes, int) and console_bytes >= 4096
                and console_bytes % 4096 == 0):
            raise InvalidSpec(f"console size {console_bytes!r} must be a multiple of 4096 bytes",
                              "use e.g. 65536")
        kill_s = seconds(kill_timeout, "kill_timeout", 0, 86400)
        boot_s = seconds(boot_timeout, "boot_timeout", 0, 3600)
        # a bad name, a region larger than the pool
        regions = parse_specs(shared, config.memory_bytes)
        return cls(config, shape, bool(pin_host), mask, ring, require_signed,
                   bool(survive_host or adopt), bool(adopt), console_bytes, ring_slots,
                   ring_slot_bytes, kill_s, boot_s, bool(protection), regions)

    def check_rings(self) -> None:
        for what, v, lo, hi in (("ring_slots", self.ring_slots, 1, 4096),
                                ("ring_slot_bytes", self.ring_slot_bytes, 64, 1 << 20)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidSpec(f"{what} must be an integer in {lo}..{hi}, got {v!r}",
                                  f"e.g. {what}={64 if what == 'ring_slots' else 4096}")


@dataclass
class Hooks:
    """The machine's verbs its collaborators call back: an overlay's instance-create and
    instance-remove are ``create`` and ``delete``; ``wait`` drives the machine (its waiter's
    way under the daemon); ``closing`` says it is shutting down; ``console_text`` reads one."""

    create: Callable[..., Any]
    delete: Callable[[str], Any]
    wait: Callable[[Callable[[], bool], float | None], bool]
    closing: Callable[[], bool]
    console_text: Callable[[int], str]


class HostConsole:
    """The host's own console (instance 0's kmsg); silent once closed."""

    def __init__(self, view: memoryview, fresh: bool) -> None:
        if fresh:                      # an adopted machine keeps every console's lines
            format_console(view)
        self.writer: ConsoleWriter | None = ConsoleWriter(view)

    def printk(self, message: str) -> None:
        if self.writer is not None:
            self.writer.printk(message)

    def close(self) -> None:
        self.writer = None


@dataclass
class House:
    """Everything one machine is made of."""

    pool: ResourcePool
    layout: L.ArenaLayout
    arena: Arena
    table: InstanceTable
    reactor: Reactor
    events: EventLog
    views: ViewWriter
    console: HostConsole
    ipc: HostIPC
    bells: HostBells
    cgroups: Cgroups
    check_signature: signing.ImageCheck
    looks: Looks
    state: statefile.StateFile | None
    publisher: Publisher
    provision: Provisioning
    loading: Loading
    supervisor: Supervisor
    writes: WriteWatch | None
    lifecycle: Lifecycle
    liveupdate: LiveUpdate
    resources: Resources
    overlays: Overlays
    sweeper: Sweep
    turn: Turn
    shared: SharedRegions
    userlands: Userlands


def raise_fd_limit() -> None:
    """The host holds about six descriptors per instance: 511 need more than the usual soft
    limit of 1024 (the hard limit is the administrator's, and stays)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def assemble(s: Settings, run_dir: str, resctrl: llc.Resctrl, hooks: Hooks) -> House:
    """Build one machine's collaborators, in the order they need each other."""
    cfg = s.config
    s.check_rings()
    if s.pin_host and cfg.host_cpus:
        os.sched_setaffinity(0, cfg.host_cpus)
    raise_fd_limit()
    chunks, window = s.pool_shape
    cfg.memory_bytes = sum(n for _, n in chunks)
    pool = ResourcePool(cfg, window, chunks)
    lay = L.ArenaLayout(pool_bytes=window, console_bytes=s.console_bytes,
                        ring_slots=s.ring_slots, ring_slot_bytes=s.ring_slot_bytes)
    flags = (L.FLAG_OVERSUBSCRIBE if cfg.oversubscribe else 0) | \
        (0 if s.protection else L.FLAG_UNPROTECTED)
    arena = Arena(lay, tag=f"mk-arena:{rundir.machine_key(run_dir)}", flags=flags,
                  shm_name=statefile.arena_name(run_dir) if s.survive_host else None,
                  attach=s.adopting)
    # mounted first, released by the caller if a later step fails (shared.release_left)
    shared = SharedRegions(run_dir, s.shared, lay.arena_bytes)
    table = InstanceTable()
    events = EventLog(os.path.join(run_dir, rundir.EVENTS), run_dir=run_dir)
    reactor = Reactor(lambda watch, exc: handler_failed(events, watch, exc))
    views = ViewWriter(run_dir)
    views.shared(shared.describe())
    at = lay.console_at(HOST_ID)
    console = HostConsole(memoryview(arena.map)[at:at + s.console_bytes], not s.adopting)
    cpu = cfg.physical_ids.get(cfg.host_cpus[0], 0) if cfg.host_cpus else 0
    ipc = HostIPC(arena, lay, cpu, table, events, reactor)
    bells = HostBells(reactor, ipc.drain)
    cgroups = Cgroups(rundir.machine_key(run_dir), survivable=s.survive_host,
                      adopt=statefile.cgroup_bases(run_dir) if s.adopting else None)
    check_signature = signing.ImageCheck(s.keyring, s.require_signed, events)
    kept: list[Overlays] = []          # (the overlays are made below; the looks show them)
    looks = Looks(s, run_dir, table, pool, lay, arena, ipc, resctrl, events,
                  lambda: kept[0].visible())
    state = statefile.StateFile(
        run_dir, table, lambda: state_config(s, lay, pool, arena, resctrl, cgroups)) \
        if s.survive_host else None
    publisher = Publisher(table, arena, events, views, looks.pool_fields, looks.view_fields,
                          lambda: [t.to_dict() for t in kept[0].visible()], cfg.oversubscribe,
                          state.save if state is not None else None)

    provision = Provisioning(table, pool, cfg, lay, arena, cgroups, resctrl, s.llc_way_mask,
                             events, publisher)

    def llc_join(inst: Any, pid: int) -> None:
        llc.join(resctrl, events, inst, pid)
    loading = Loading(arena, lay, pool, cgroups, events, reactor, hooks.wait, llc_join,
                      bells.ring, run_dir, s.protection, s.survive_host)
    supervisor = Supervisor(table, arena, events, publisher, console.printk,
                            loading.forget_parked, hooks.console_text)
    writes = None if s.protection else WriteWatch(table.by_name, lay, arena, events)
    lifecycle = Lifecycle(table, arena, reactor, events, cgroups, loading, ipc, supervisor,
                          publisher, writes, hooks.wait, console.printk, hooks.closing,
                          s.survive_host, s.boot_timeout)
    liveupdate = LiveUpdate(lifecycle, loading, ipc.command, hooks.wait, events, arena,
                            check_signature)
    resources = Resources(cfg, pool, lay.pool_offset, arena, events, cgroups, ipc.command,
                          hooks.wait, s.pin_host)
    overlays = Overlays(resources, table, publisher, hooks.create, hooks.delete)
    kept.append(overlays)
    sweeper = Sweep(table, arena.own, views, looks.counters, ipc.watch)
    turn = Turn(table, reactor, ipc, supervisor, sweeper, writes, lifecycle, hooks.closing)

    def console_write(instance_id: int, text: str) -> None:
        """Append to an instance's console, whose header the instance writes too: never
        trusted (abi/console.py heals a head beyond reason, with an event, and writes on)."""
        at = lay.console_at(instance_id)
        with memoryview(arena.map)[at:at + lay.console_bytes] as view:
            writer = ConsoleWriter(view)
            try:
                if writer.healed:
                    events.warning("console_healed", instance=instance_id, why=writer.healed)
                writer.write(text)
            finally:
                writer.data.release()
    userlands = Userlands(table, reactor, events, cgroups, shared.mounts, console_write,
                          hooks.wait, run_dir,
                          lambda inst: supervisor.reboot(inst, lifecycle.force))
    lifecycle.parked_userland = userlands.parked_pid
    return House(pool, lay, arena, table, reactor, events, views, console, ipc, bells, cgroups,
                 check_signature, looks, state, publisher, provision, loading, supervisor, writes,
                 lifecycle, liveupdate, resources, overlays, sweeper, turn, shared, userlands)


def handler_failed(events: EventLog, watch: Watch, exc: Exception) -> None:
    """A reactor handler raised (reactor.py dropped its watch): said, with its instance."""
    inst = watch.inst
    events.error("handler_failed", kind=watch.kind,
                 instance=inst.id if inst is not None else None,
                 name=inst.name if inst is not None else None,
                 error=f"{type(exc).__name__}: {exc}"[:300])


def warn_missing(events: EventLog, cgroups: Cgroups, resctrl: llc.Resctrl,
                 llc_way_mask: int | None) -> None:
    """What this host lacks, said once in the event log."""
    if cgroups.mode is None:
        events.warning("containment_unavailable", what="cgroups", why=cgroups.why)
    if not linux.PIPE_NOWAIT:
        events.warning("doorbell_nowait_unavailable",
                       why="pipes refuse pwritev2(RWF_NOWAIT) before Linux 6.4: "
                           "doorbells are rung with plain writes, which a peer that "
                           "clears O_NONBLOCK on a ring end and fills it can block")
    if not linux.containment_supported():      # (each instance's console says so too)
        events.warning("containment_unavailable", what="namespaces",
                       why=f"no namespaces, capabilities or seccomp on "
                           f"{os.uname().machine}: {linux.UNCONTAINED_DOORBELLS}")
    if cgroups.reaped:
        events.warning("stale_instances_killed", count=cgroups.reaped)
    if llc_way_mask is not None and not resctrl.enforced:
        events.warning("llc_unenforced", mask=llc.fmt(llc_way_mask), why=resctrl.reason)


def state_config(s: Settings, lay: L.ArenaLayout, pool: ResourcePool, arena: Arena,
                 resctrl: llc.Resctrl, cgroups: Cgroups) -> dict[str, Any]:
    """The machine's part of the state file: what a new host is started with."""
    cfg = s.config
    return {
        "arena": arena.shm_name, "host_pid": os.getpid(),
        "config": {"cpus": cfg.cpus, "memory": cfg.memory_bytes, "host_cpus": cfg.host_cpus,
                   "oversubscribe": cfg.oversubscribe,
                   "console_bytes": lay.console_bytes, "ring_slots": lay.ring_slots,
                   "ring_slot_bytes": lay.ring_slot_bytes,
                   "kill_timeout": s.kill_timeout, "protection": s.protection,
                   "pool_chunks": [list(c) for c in pool.chunks],
                   "pool_window": pool.window,
                   "llc_way_mask": s.llc_way_mask, "resctrl_root": resctrl.root,
                   "require_signed": s.require_signed,
                   "keyring": s.keyring.path if s.keyring else None},
        "cgroups": cgroups.bases}


def open_house(h: House, s: Settings, run_dir: str,
               resctrl: llc.Resctrl) -> tuple[float | None, list[dict[str, Any]]]:
    """The host comes up in its arena: its peer entry and record, the instances it adopts (a
    new host of a survivable machine), its first words. Returns adoption's time (ms) and the
    records it refused (``[{"name", "why"}]``); None and none when it adopted nothing."""
    cfg = s.config
    host = h.arena.peer(HOST_ID)
    host.peer_state = STATE_ACTIVE
    host.pid = os.getpid()
    adopt_ms: float | None = None
    refused: list[dict[str, Any]] = []
    if s.adopting:
        h.arena.adopted()
        adopt_ms, refused = adoption.adopt(adoption.Adopter(
            run_dir, h.table, h.arena, h.pool, h.layout.pool_offset, cfg, h.cgroups, resctrl,
            s.llc_way_mask, h.events, h.console.printk, h.check_signature, s.require_signed,
            h.reactor, h.bells, h.lifecycle.on_exit))
    h.arena.write_record(HOST_ID, state="active", name="host", memory_base=0, memory_bytes=0,
                         cpus=cfg.host_cpus, pid=os.getpid(), boots=1, last_exit_ns=0,
                         last_exit_signal=0, last_exit_code=0, kernel="")
    h.console.printk(f"multikernel: pool CPUs {cfg.cpus}, host CPUs {cfg.host_cpus}, memory "
                     f"{cfg.memory_bytes} bytes, "
                     f"{'OVERSUBSCRIBED' if cfg.oversubscribe else 'dedicated'}")
    warn_missing(h.events, h.cgroups, resctrl, s.llc_way_mask)
    h.events.info("machine_init", pool=cfg.to_dict(), arena_bytes=h.layout.arena_bytes,
                  cgroups=h.cgroups.mode,
                  mode="oversubscribed" if cfg.oversubscribe else "dedicated")
    return adopt_ms, refused
