"""The emulated machine: the host kernel (instance 0) and its kexec loader, in one object.

``Machine`` is a single-threaded reactor. It owns the arena, the resource pool, one pidfd per
running instance and the host's doorbell; nothing happens behind the caller's back on another
thread. That is what makes it safe to fork instances straight from it (a fork from a
multi-threaded process can inherit a lock held by a thread that no longer exists), and it is what
a researcher wants from an instrument: events are handled when the machine is driven, by
``poll()``, by any verb, or by the supervisor daemon's loop, which drives it continuously.

Guarantees:
- a verb either completes or raises an ``MKError`` and changes nothing;
- a death is noticed the next time the machine is driven (at once in the daemon: the pidfd wakes
  it); the exit is reaped, classified and recorded before any other verb runs;
- ``close()`` halts every instance and leaves no process, mapping, descriptor or file behind.

Why this module is longer than 400 lines: it is the machine's whole public surface, the verbs
(create, load, exec, kill, update, fault, unload, delete, send, request), the views of its state
(describe, snapshot, console, memory) and the reactor that drives it, each verb with its checks
before its first change. Booting and reaping live in lifecycle.py, supervision in
supervision.py, messaging in hostipc.py; what is left is one job, the API, and splitting it
would scatter each verb's check-then-change order over files.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import time
import zlib
from collections.abc import Callable
from typing import Any

from partition import linux
from partition.abi import layout as L
from partition.abi import message as M
from partition.abi.console import ConsoleWriter, format_console, read_console
from partition.abi.constants import HOST_ID, STATE_ACTIVE, STATE_CODES
from partition.abi.ring import Ring, RingError
from partition.errors import InvalidSpec, MKError, NoSuchInstance, NotLoaded, ResourceBusy
from partition.guest.trampoline import readable_label
from partition.guest.zygote import Zygote
from partition.host import adoption, faults, liveupdate, llc, rundir, signing
from partition.host.arena import Arena
from partition.host.cgroups import Cgroups
from partition.host.devicetree import MEMORY_GRANULE, Overlay, UpdateOp
from partition.host.events import EventLog
from partition.host.hostipc import HostIPC
from partition.host.instance import (
    CHANNEL,
    EXIT,
    OLD_DOORBELL,
    PARKED_EXIT,
    REPORT,
    Instance,
    State,
    check_transition,
)
from partition.host.kimage import KIMAGE_TYPE, KImage, check_spec
from partition.host.lifecycle import Lifecycle
from partition.host.loading import Loading
from partition.host.overlays import Overlays
from partition.host.pool import PoolConfig, ResourcePool, pool_shape
from partition.host.recovery import RecoveryPolicy
from partition.host.supervision import Supervisor
from partition.host.views import ViewWriter
from partition.host.writewatch import WriteWatch
from partition.units import (
    format_size,
    parse_cpulist,
    parse_size,
    require_page_aligned,
    seconds,
)

#: the host's sweep (``Machine._sweep``): its period, and how many instances it looks at each
SWEEP_PERIOD_S = 0.25
#: ... and its longest period: a sweep that finds nothing moved (no loop or heartbeat, no event
#: or change since the last one) doubles the period up to this; anything that moves brings it
#: back to SWEEP_PERIOD_S. A turn of 32 instances costs its host about 4 ms on the caches an
#: idle VM wakes up to: at 511 tickless kernels the host used 0.6-1.0% of a CPU at rest with
#: 1 s here, 0.14-0.40% with 2 s (docs/benchmarks.md)
SWEEP_IDLE_MAX_S = 2.0
SWEEP_BATCH = 32
#: counters views rewritten per sweep, when they moved: each every 0.25 s up to 8 instances,
#: every 16 s at 511 (its first is written at the instance's first look)
COUNTERS_BATCH = 8


def _turn(items: list[Instance], at: int, size: int) -> tuple[list[Instance], int]:
    """The next ``size`` of ``items`` from position ``at``, wrapping round, and where the turn
    after it starts: all of them when they are no more than ``size``."""
    n = len(items)
    if n <= size:
        return items, 0
    start = at % n
    end = start + size
    # (sliced, never the whole list copied: a copy touches every instance object, 511 cache
    # misses a sweep on the caches an idle host wakes up to)
    return (items[start:end] if end <= n else items[start:] + items[:end - n]), end


class Machine:
    """One emulated multikernel machine. Use as a context manager so it is always torn down."""

    def __init__(self, cpus: str | list[int] | None = None, memory: str | int = "1G",
                 host_cpus: str | list[int] | None = "0", oversubscribe: bool = False,
                 run_dir: str | rundir.RunDir | None = None, console_bytes: int = 64 * 1024,
                 kill_timeout: float = 30.0, boot_timeout: float = 1.0,
                 pin_host: bool = False, ring_slots: int = 64,
                 ring_slot_bytes: int = 4096, protection: bool = True,
                 survive_host: bool = False, adopt: bool = False,
                 pool_chunks: list[list[int]] | None = None,
                 pool_window: int | None = None,
                 llc_way_mask: int | str | None = None, resctrl_root: str = llc.RESCTRL_ROOT,
                 require_signed: bool = False, keyring: str | None = None) -> None:
        self.config = PoolConfig.build(cpus, memory, host_cpus, oversubscribe)
        #: the pool's chunks and window as a dead host left them (adoption: the state file),
        #: else one chunk of ``memory`` in a window with room to grow (host/poolresize.py)
        self._pool_shape = pool_shape(self.config.memory_bytes, pool_chunks, pool_window)
        self.pin_host = bool(pin_host)
        #: the LLC ways the pool hands out (the baseline's llc-way-mask), and what enforces
        #: instances' shares of them (host/llc.py): resctrl where the host has it
        self.llc_way_mask = None if llc_way_mask is None else \
            llc.parse_mask(llc_way_mask, "the pool's llc-way-mask")
        #: signed images (host/signing.py): the keyring kexec verifies against, and whether
        #: an unsigned or unverified image is refused (KEXEC_SIG_FORCE)
        if not isinstance(require_signed, bool):
            raise InvalidSpec(f"require_signed must be true or false, got {require_signed!r}",
                              "--require-signed takes no value")
        if require_signed and not keyring:
            raise InvalidSpec("signed images are required but no keyring is given: nothing "
                              "could verify them", "mkctl init --require-signed --keyring CERT")
        self.keyring = signing.Keyring(keyring) if keyring else None
        self.require_signed = require_signed
        #: instances outlive this host (no parent-death signal; a named arena; a state file a
        #: new host adopts them from: host/adoption.py). The supervisor's machines do.
        self.survive_host = bool(survive_host or adopt)
        self.adopting = bool(adopt)
        if not (isinstance(console_bytes, int) and console_bytes >= 4096 and console_bytes % 4096 == 0):
            raise InvalidSpec(f"console size {console_bytes!r} must be a multiple of 4096 bytes",
                              "use e.g. 65536")
        self.kill_timeout = seconds(kill_timeout, "kill_timeout", 0, 86400)
        self.boot_timeout = seconds(boot_timeout, "boot_timeout", 0, 3600)
        self.protection = bool(protection)
        self._closed = False
        self._closing = False
        self._run = run_dir if isinstance(run_dir, rundir.RunDir) else rundir.claim(run_dir)
        self.run_dir = self._run.path
        # named for the run directory's key, as the arena and the cgroups: stable across
        # hosts (an adopted machine's groups are found again, and an abandoned one's removed)
        self.resctrl = llc.Resctrl(resctrl_root, prefix=adoption.resctrl_prefix(self.run_dir))
        try:
            if self.llc_way_mask is not None:
                self.resctrl.check_pool(self.llc_way_mask)
            self._setup(console_bytes, pin_host, ring_slots, ring_slot_bytes)
        except BaseException:
            self._run.release()
            raise

    # -- construction and teardown ---------------------------------------------------------
    def _setup(self, console_bytes: int, pin_host: bool, ring_slots: int,
               ring_slot_bytes: int) -> None:
        cfg = self.config
        for what, v, lo, hi in (("ring_slots", ring_slots, 1, 4096),
                                ("ring_slot_bytes", ring_slot_bytes, 64, 1 << 20)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidSpec(f"{what} must be an integer in {lo}..{hi}, got {v!r}",
                                  f"e.g. {what}={64 if what == 'ring_slots' else 4096}")
        if pin_host and cfg.host_cpus:
            os.sched_setaffinity(0, cfg.host_cpus)
        # the host holds about six descriptors per instance: 511 need more than the usual
        # soft limit of 1024 (the hard limit is the administrator's, and stays)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        chunks, window = self._pool_shape
        cfg.memory_bytes = sum(n for _, n in chunks)
        self.pool = ResourcePool(cfg, window, chunks)
        self.layout = L.ArenaLayout(pool_bytes=window, console_bytes=console_bytes,
                                    ring_slots=ring_slots, ring_slot_bytes=ring_slot_bytes)
        flags = (L.FLAG_OVERSUBSCRIBE if cfg.oversubscribe else 0) | \
            (0 if self.protection else L.FLAG_UNPROTECTED)
        shm = adoption.arena_name(self.run_dir) if self.survive_host else None
        self.arena = Arena(self.layout, tag=f"mk-arena:{rundir.machine_key(self.run_dir)}",
                           flags=flags, shm_name=shm, attach=self.adopting)
        self.instances: dict[str, Instance] = {}
        self._ids: dict[int, Instance] = {}
        self.changes = 0                      # published changes so far (caches key on it)
        #: the machine's part of the state file as last written (adoption.save_state)
        self.state_head: str | None = None
        #: write the state file when told (flush_state), not at every change: the daemon's way
        self.defer_state = False
        self._state_dirty: list[Instance | None] = []
        #: called instead of ``poll`` while a verb waits (see ``wait``); must drive ``poll``
        self.waiter: Callable[[float | None], None] | None = None
        self.selector = selectors.EpollSelector()
        #: the host's doorbell: it reads ``host_doorbell``; instances hold ``host_ring``, a
        #: pipe's write end, which rings and cannot be read (linux.host_doorbell)
        self.host_doorbell, self.host_ring = linux.host_doorbell()
        self.selector.register(self.host_doorbell, selectors.EVENT_READ, None)
        self.events = EventLog(os.path.join(self.run_dir, rundir.EVENTS), run_dir=self.run_dir)
        self.views = ViewWriter(self.run_dir)
        host_console = memoryview(self.arena.map)[self.layout.console_at(HOST_ID):
                                                  self.layout.console_at(HOST_ID) + console_bytes]
        if not self.adopting:               # an adopted machine keeps every console's lines
            format_console(host_console)
        self._host_console = ConsoleWriter(host_console)
        self.ipc = HostIPC(self)
        self.lifecycle = Lifecycle(self)
        self.loading = Loading(self)
        #: the process that forks this machine's instances (guest/zygote.py), made at the first
        #: load; MK_ZYGOTE=0 forks them from this process instead (to compare)
        self.zygote: Zygote | None = None
        self.use_zygote = os.environ.get("MK_ZYGOTE", "1") != "0"
        self.supervisor = Supervisor(self)
        self.overlays = Overlays(self)
        self.writes = None if self.protection else WriteWatch(self)
        self.cgroups = Cgroups(rundir.machine_key(self.run_dir), survivable=self.survive_host,
                               adopt=adoption.cgroup_bases(self.run_dir) if self.adopting else None)
        self._filters_due = 0.0               # next sweep (see _sweep)
        self._sweep_period = SWEEP_PERIOD_S     # longer while nothing moves
        self._handled = 0                       # events the reactor handled, ever
        self._swept_at = (-1, -1)               # (changes, events handled) at the last sweep
        self._sweep_at = self._counters_at = 0
        self._running: tuple[int, list[Instance]] = (-1, [])
        host = self.arena.peer(HOST_ID)
        host.peer_state = STATE_ACTIVE
        host.pid = os.getpid()
        self.started = time.time()
        self.extra_host_doorbells: list[int] = []   # adopted instances ring these
        self.extra_host_doorbell_ids: set[int] = set()
        self.adopt_ms: float | None = None
        #: the records adoption refused: [{"name", "why"}] (as its ``adopted`` event says)
        self.adopt_refused: list[dict[str, Any]] = []
        if self.adopting:
            self.arena.adopted()
            adoption.adopt(self)
        self.arena.write_record(HOST_ID, state="active", name="host", memory_base=0,
                                memory_bytes=0, cpus=cfg.host_cpus, pid=os.getpid(), boots=1,
                                last_exit_ns=0, last_exit_signal=0, last_exit_code=0, kernel="")
        self.printk(f"multikernel: pool CPUs {cfg.cpus}, host CPUs {cfg.host_cpus}, memory "
                    f"{cfg.memory_bytes} bytes, {'OVERSUBSCRIBED' if cfg.oversubscribe else 'dedicated'}")
        if self.cgroups.mode is None:
            self.events.warning("containment_unavailable", what="cgroups", why=self.cgroups.why)
        if not linux.PIPE_NOWAIT:
            self.events.warning("doorbell_nowait_unavailable",
                                why="pipes refuse pwritev2(RWF_NOWAIT) before Linux 6.4: "
                                    "doorbells are rung with plain writes, which a peer that "
                                    "clears O_NONBLOCK on a ring end and fills it can block")
        if not linux.containment_supported():      # (each instance's console says so too)
            self.events.warning("containment_unavailable", what="namespaces",
                                why=f"no namespaces, capabilities or seccomp on "
                                    f"{os.uname().machine}: {linux.UNCONTAINED_DOORBELLS}")
        if self.cgroups.reaped:
            self.events.warning("stale_instances_killed", count=self.cgroups.reaped)
        if self.llc_way_mask is not None and not self.resctrl.enforced:
            self.events.warning("llc_unenforced", mask=llc.fmt(self.llc_way_mask),
                                why=self.resctrl.reason)
        self.events.info("machine_init", pool=cfg.to_dict(), arena_bytes=self.layout.arena_bytes,
                         cgroups=self.cgroups.mode,
                         mode="oversubscribed" if cfg.oversubscribe else "dedicated")
        self.publish()

    @property
    def closing(self) -> bool:
        return self._closed or self._closing

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Halt every instance (gracefully, then by force) and remove everything created."""
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            running = [i for i in self.instances.values() if i.pid is not None]
            self.lifecycle.halt_many(running, self.kill_timeout if timeout is None else timeout)
            self.events.info("machine_shutdown", instances=len(self.instances))
        finally:
            self._closed = True
            for inst in self.instances.values():
                self.lifecycle.forget_process(inst)
            self._close_zygote()
            self.cgroups.close()
            for inst in self.instances.values():
                self._llc_leave(inst)
            try:
                self.selector.close()
            finally:
                os.close(self.host_doorbell)
                os.close(self.host_ring)
                for fd in self.extra_host_doorbells:
                    os.close(fd)
                self.ipc.close()
                self._host_console = None  # type: ignore[assignment]
                self.arena.unlink()
                self.arena.close()
                self.events.close()
                self._run.release()

    def _close_zygote(self) -> None:
        """Close the zygote, if any (the next load makes a new one)."""
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None

    def abandon(self) -> dict[str, Any]:
        """Throw this host away as its sudden death would: nothing is halted, signalled or
        removed; its descriptors close (the instances' doorbell channels see their host go),
        its lock goes, its state file and arena stay. The instances run on, for a
        ``Machine(adopt=True)`` on the same run directory (a scenario's ``host-crash``).
        Returns the machine arguments a new host adopts with."""
        if not self.survive_host:
            raise InvalidSpec("only a machine whose instances outlive their host can lose it",
                              "Machine(survive_host=True)")
        self._check_open()
        adoption.save_state(self)
        state = adoption.read_state(self.run_dir)
        assert state is not None
        self._closed = True
        for inst in self.instances.values():
            for fd in (inst.pidfd, inst.doorbell_fd, inst.old_doorbell_fd):
                if fd is not None:
                    os.close(fd)
            if inst.channel is not None:
                inst.channel.close()
            p = inst.parked
            if p is not None:
                for fd in (p.pidfd, p.doorbell_fd, p.report_fd):
                    if fd >= 0:
                        os.close(fd)
                p.channel.close()
        self._close_zygote()
        self.selector.close()
        os.close(self.host_doorbell)
        os.close(self.host_ring)
        for fd in self.extra_host_doorbells:
            os.close(fd)
        self.ipc.close()
        self._host_console = None  # type: ignore[assignment]
        self.arena.close()
        self.events.close()
        if self._run.lock_fd >= 0:
            os.close(self._run.lock_fd)
            self._run.lock_fd = -1
        return {k: v for k, v in state["config"].items() if k in adoption.CONFIG_KEYS}

    # -- host services ---------------------------------------------------------------------
    def printk(self, message: str) -> None:
        """The host's own console (instance 0's kmsg)."""
        if self._host_console is not None:
            self._host_console.printk(message)

    def refresh_views(self) -> None:
        """Rewrite the counters views that moved (counters move between state changes; the
        rest of the views follow each change as it is published)."""
        if not (self._closed or self._closing):
            for inst in self.instances.values():
                self.views.counters(inst.name, self._counters(inst))

    def fileno(self) -> int:
        """Readable when the machine has events to handle; lets a daemon nest it in its loop."""
        return self.selector.fileno()

    # -- lookup ----------------------------------------------------------------------------
    def _get(self, name: str | int) -> Instance:
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            inst = self.by_id(int(name))
            if inst is None:
                raise NoSuchInstance(f"no instance with id {int(name)}",
                                     "mkctl show lists the instances")
            return inst
        found = self.instances.get(name)
        if found is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise NoSuchInstance(f"no instance named {name!r} (instances: {known})",
                                 "mkctl create NAME first, or check the spelling")
        return found

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise MKError("the machine has been shut down", "create a new Machine")

    # -- verbs -----------------------------------------------------------------------------
    def create(self, name: str, memory: str | int, cpus: str | list[int] | None = None,
               cpu_count: int | None = None, id: int | None = None, recovery: str = "none",
               max_restarts: int = 3, restart_window: float = 5.0,
               watchdog: float = 0.0, standby_for: str | None = None,
               preserve_memory: bool = False,
               llc_way_mask: int | str | None = None) -> dict[str, Any]:
        """Reserve CPUs and a partition (empty -> ready); ``llc_way_mask``: its own LLC ways,
        a subset of the pool's that no other instance holds (host/llc.py)."""
        self._check_open()
        self.poll(0)
        r = self.pool.plan(name, memory, cpus=cpus, cpu_count=cpu_count, instance_id=id)
        mask = 0
        if llc_way_mask is not None:
            mask = llc.parse_mask(llc_way_mask)
            llc.check_instance(name, mask, self.llc_way_mask,
                               {i.name: i.llc_way_mask for i in self.instances.values()
                                if i.llc_way_mask})
        policy = RecoveryPolicy.build(recovery, max_restarts, restart_window, watchdog,
                                      preserve_memory)
        if standby_for is not None and standby_for not in self.instances:
            raise NoSuchInstance(f"standby_for names no instance: {standby_for!r}",
                                 "create the primary first")
        if mask:
            self.resctrl.make_group(r.id, mask)     # (the last that can fail)
        self.pool.commit(r)
        inst = Instance(id=r.id, name=r.name, cpus=r.cpus,
                        physical_cpus=[self.config.physical_ids.get(c, c) for c in r.cpus],
                        memory_base=self.layout.pool_offset + r.memory_offset,
                        memory_bytes=r.memory_bytes, recovery=policy, standby_for=standby_for,
                        llc_way_mask=mask)
        self.instances[name] = inst
        format_console(self._console_view(inst))
        self.arena.peer(inst.id).clear()
        self.arena.own(inst.id).clear()
        self.events.info("instance_created", instance=inst.id, name=name, cpus=inst.cpus,
                         memory_base=inst.memory_base, memory_bytes=inst.memory_bytes,
                         shared_cpus=self.pool.shared_cpus(name, inst.cpus),
                         **({"llc_way_mask": llc.fmt(mask), "llc_enforced": self.resctrl.enforced}
                            if mask else {}))
        self.transition(inst, State.READY, "create", old=State.EMPTY)
        return self.describe(inst)

    def load(self, name: str, kernel: str, cmdline: str = "") -> dict[str, Any]:
        """Load a kernel image (ready -> loaded). A spec that is not a kernel leaves it ready."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        check_transition("load", inst.name, inst.state)
        kimage = check_spec(kernel, cmdline)
        self._check_signature(inst, kimage)
        inst.kimage = kimage
        try:
            report = self.loading.await_loaded(inst)  # imported in its own process, not here
        except BaseException:
            inst.kimage = None
            raise
        inst.kimage.label = readable_label(str(report.get("label") or ""),
                                           str(report.get("source") or ""))
        inst.kimage.source = str(report.get("source") or "")
        self.events.info("kimage_loaded", instance=inst.id, name=inst.name, kernel=inst.kimage.label,
                         source=inst.kimage.source, cmdline=cmdline)
        self.transition(inst, State.LOADED, "load")
        return self.describe(inst)

    def _check_signature(self, inst: Instance, kimage: KImage, file: bytes | None = None) -> None:
        """kexec_file_load's signature check (host/signing.py): a refusal leaves the instance
        as it was; the checked image goes to the loader. ``file``: the image's bytes, read
        already (a dead host's, which a new host checks again: host/adoption.py)."""
        try:
            checked = signing.check_image(kimage.spec, self.keyring, self.require_signed) \
                if file is None else \
                signing.check_data(kimage.spec, file, self.keyring, self.require_signed)
        except MKError as exc:
            self.events.warning("kimage_rejected", instance=inst.id, name=inst.name,
                                kernel=kimage.spec, error=exc.message, code=exc.code)
            raise
        kimage.image, kimage.signature, kimage.file = \
            checked.image, checked.signature, checked.file
        if checked.signature.startswith("unverified"):
            self.events.warning("kimage_signature_unverified", instance=inst.id, name=inst.name,
                                kernel=kimage.spec, why=checked.signature)
        elif checked.signature:
            self.events.info("kimage_signature_verified", instance=inst.id, name=inst.name,
                             kernel=kimage.spec, signer=checked.signature)

    def _llc_join(self, inst: Instance, pid: int) -> None:
        """Its process into its resctrl group (host/llc.py); a refusal is an event, not a
        failed load: the mask stays checked and shown, and the views say it is not held."""
        try:
            self.resctrl.join(inst.id, pid)
        except MKError as exc:
            self.events.warning("llc_join_failed", instance=inst.id, name=inst.name, pid=pid,
                                error=exc.message)

    def _llc_leave(self, inst: Instance) -> None:
        """Remove its resctrl group, if it has one. A group that cannot go is said (an
        ``llc_group_left`` event) and what called goes on: a delete whose cgroups are gone
        already, or the rest of a teardown."""
        if not inst.llc_way_mask:
            return
        try:
            self.resctrl.remove_group(inst.id)
        except OSError as exc:
            self.events.warning("llc_group_left", instance=inst.id, name=inst.name,
                                error=exc.strerror)

    def start(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Boot the loaded image on the instance's CPUs (loaded|failed -> active): kerf 0.4's
        ``start``. Returns once the kernel's ``boot()`` returned; ``wait=False`` returns at the
        spawn mailbox's answer, the real system's semantics. A kernel that dies in ``boot()``
        raises BootFailed. ``exec`` is the same verb under its older name."""
        return self.exec(name, wait)

    def exec(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Boot the loaded image: the name the real tree's first kerf used (``start`` now)."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        check_transition("start", inst.name, inst.state)
        assert inst.kimage is not None
        self.lifecycle.boot(inst, wait_boot=bool(wait))
        return self.describe(inst)

    def kill(self, name: str, force: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Halt an instance: graceful (SIGTERM, then SIGKILL after ``timeout``) or forced."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        check_transition("kill --force" if force else "kill", inst.name, inst.state)
        if inst.state == State.ACTIVE:
            t = self.kill_timeout if timeout is None else seconds(timeout, "timeout", 0, 86400)
            if force:
                self.lifecycle.force(inst)
                self.wait(lambda: inst.pid is None, None)
            else:
                self.lifecycle.halt_many([inst], t)
        return self.describe(inst)

    def update(self, name: str, recovery: str | None = None, max_restarts: int | None = None,
               restart_window: float | None = None, watchdog: float | None = None,
               preserve_memory: bool | None = None) -> dict[str, Any]:
        """Change an instance's recovery policy or watchdog, in any state (all or nothing)."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        inst.recovery.update(policy=recovery, max_restarts=max_restarts,
                             restart_window=restart_window, watchdog=watchdog,
                             preserve_memory=preserve_memory)
        inst.progress_seen = (self.arena.own(inst.id).progress, time.monotonic())
        self.events.info("instance_updated", instance=inst.id, name=inst.name,
                         recovery=inst.recovery.to_dict())
        self.publish(inst)
        return self.describe(inst)

    def fault(self, name: str, kind: str, **options: Any) -> dict[str, Any]:
        """Inject a fault into an active instance (see faults.py for the kinds)."""
        self._check_open()
        self.poll(0)
        opts = faults.validate(kind, options)
        inst = self._get(name)
        if inst.state != State.ACTIVE or inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; a fault needs it active",
                            f"mkctl start {inst.name} first")
        if kind == "ipi-storm" and self.by_id(opts["target"]) is None:
            raise InvalidSpec(f"ipi-storm target {opts['target']} is no instance",
                              "give the id of an instance (mkctl show)")
        out = self.describe(inst)     # before the fault: nothing slow between it and detection
        if self.writes is not None:
            self.writes.scan(only=inst)       # what it wrote so far, before its page tables go
        injected = time.monotonic()
        if kind == "kill":
            inst.halt_requested = "fault"      # the record says so, and it is still a crash
            os.kill(inst.pid, signal.SIGKILL)
        elif kind == "hang-stop":
            os.kill(inst.pid, signal.SIGSTOP)
        else:
            try:
                self.ipc.command(inst, M.MK_EMU_FAULT, {"kind": kind, "options": opts})
            except RingError as exc:       # nothing was injected: nothing is recorded
                raise ResourceBusy(f"fault {kind!r} could not be sent to {inst.name!r}: "
                                   f"{exc.strerror}", "its IPI ring is full or it is not "
                                   "answering; retry, or inject kill or hang-stop") from None
        inst.pending_fault = (kind, injected)
        inst.counters["faults_injected"] += 1
        self.events.warning("fault_injected", instance=inst.id, name=inst.name, kind=kind,
                            options=opts)
        return out

    def checksum(self, name: str) -> int:
        """CRC32 of an instance's whole partition, as the host reads it."""
        inst = self._get(name)
        view = memoryview(self.arena.map)[inst.memory_base:inst.memory_base + inst.memory_bytes]
        try:
            return zlib.crc32(view)
        finally:
            view.release()

    def by_id(self, instance_id: int) -> Instance | None:
        """The instance with this id (an index, checked against ``instances`` on each use and
        rebuilt when it disagrees, so that no path that adds or removes one can stale it)."""
        inst = self._ids.get(instance_id)
        if inst is not None and self.instances.get(inst.name) is inst:
            return inst
        self._ids = {i.id: i for i in self.instances.values()}
        return self._ids.get(instance_id)

    def unload(self, name: str) -> dict[str, Any]:
        """Drop the loaded image (loaded|failed -> ready)."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        check_transition("unload", inst.name, inst.state)
        self.loading.forget_parked(inst)
        inst.kimage = None
        inst.failure = None
        self.events.info("kimage_unloaded", instance=inst.id, name=inst.name)
        self.transition(inst, State.READY, "unload")
        return self.describe(inst)

    def delete(self, name: str) -> dict[str, Any]:
        """Free the partition and CPUs (ready -> gone); the partition is scrubbed."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        check_transition("delete", inst.name, inst.state)
        out = self.describe(inst)
        self.cgroups.remove(inst.id)
        self._llc_leave(inst)
        for base, size in inst.regions:
            self.arena.scrub(base, size)
        format_console(self._console_view(inst))
        self.arena.peer(inst.id).clear()
        self.arena.own(inst.id).clear()
        self.arena.clear_record(inst.id)
        self.pool.release(inst.name, inst.id, inst.cpus)
        del self.instances[inst.name]
        self.events.info("state_change", instance=inst.id, name=inst.name, old="ready",
                         new="empty", cause="delete")
        self.publish()
        out["state"] = State.EMPTY.value
        return out

    def live_update(self, name: str, kernel: str, cmdline: str | None = None,
                    quiesce: float = 10.0) -> dict[str, Any]:
        """Replace a running kernel with a new image, its state handed over (KHO), messages
        kept; rolls back to the old image if the new one fails to boot (host/liveupdate.py)."""
        self._check_open()
        self.poll(0)
        return liveupdate.update(self, self._get(name), kernel, cmdline,
                                 seconds(quiesce, "quiesce", 0, 3600))

    # -- the real control plane: overlays and runtime resources --------------------------------
    def apply_overlay(self, data: bytes) -> dict[str, Any]:
        """Apply a DTBO as one transaction (``overlays/new``); see host/overlays.py."""
        self._check_open()
        self.poll(0)
        return self.overlays.apply(data).to_dict()

    def remove_overlay(self, tx: int) -> dict[str, Any]:
        """Roll a transaction back (``rmdir overlays/tx_<N>``)."""
        self._check_open()
        self.poll(0)
        if isinstance(tx, bool) or not isinstance(tx, int):
            raise InvalidSpec(f"transaction id {tx!r} is not an integer", "e.g. tx 3")
        return self.overlays.remove(tx).to_dict()

    def resize(self, name: str, cpus: str | list[int] | None = None,
               memory: str | int | None = None) -> dict[str, Any]:
        """Change a ready, loaded or running instance's CPUs or memory as ``kerf update`` does:
        one overlay transaction (memory-remove, memory-add, cpu-remove, cpu-add), the running
        kernel asked first (host/resize.py). Memory grows by a new region at the highest free,
        granule-aligned range of the pool and shrinks by whole regions, newest first."""
        self._check_open()
        self.poll(0)
        inst = self._get(name)
        if cpus is None and memory is None:
            raise InvalidSpec("give --cpus or --memory (or both)", "e.g. mkctl update a --cpus 1,2")
        phys = self.config.physical_ids
        op = UpdateOp(inst.name)
        if cpus is not None:
            want = parse_cpulist(cpus, "CPU list")
            op.cpu_remove = [phys.get(c, c) for c in inst.cpus if c not in want]
            op.cpu_add = [phys.get(c, c) for c in want if c not in inst.cpus]
        if memory is not None:
            nbytes = parse_size(memory, "memory")
            require_page_aligned(nbytes, "memory", memory)      # 64 meant 64M: the hint says so
            have = sum(size for _, size in inst.regions)
            if nbytes > have:
                grow = nbytes - have
                if grow % MEMORY_GRANULE:
                    raise InvalidSpec(f"Cannot grow instance '{inst.name}' by {format_size(grow)}: "
                                      f"memory is added in multiples of "
                                      f"{format_size(MEMORY_GRANULE)}", "round the size")
                base = self.pool.highest_free(grow, MEMORY_GRANULE, self.layout.pool_offset)
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
        tx = self.overlays.run(Overlay([op], f"/instances/{inst.name}"))
        return {**self.describe(inst), "transaction": tx.to_dict()}

    # -- observation -----------------------------------------------------------------------
    def describe(self, inst: Instance) -> dict[str, Any]:
        running = inst.pid is not None
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
            "progress": self.arena.own(inst.id).progress,
            "metrics": self.arena.own(inst.id).metrics(),      # what its kernel published
            # seconds since its main loop last moved: a stopped or wedged kernel shows here
            "progress_age_s": round(time.monotonic() - inst.progress_mark[1], 1)
            if running and inst.progress_mark[0] >= 0 else None,
            # its kernel says it sleeps on its doorbell (the idle HLT): a still loop that is
            # idle, not stuck (the ring's own word: shown, never acted on)
            "waiting": running and self.ipc.ring_of(inst.id).receiver_idle(),
            "counters": self._counters(inst),
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
        }

    def show(self, name: str | None = None, brief: bool = False) -> dict[str, Any]:
        """One instance (describe) or the machine (snapshot); ``brief``: the machine with
        each instance as ``describe_brief`` says it, for a table."""
        self._check_open()
        if not isinstance(brief, bool):
            raise InvalidSpec(f"brief must be true or false, got {brief!r}",
                              "leave it out for everything")
        self.poll(0)
        if name is not None:
            d = self.describe(self._get(name))
            self.views.counters(d["name"], d["counters"])   # counters move: refresh on look
            return d
        snap = self.snapshot(brief)
        if not brief:
            for d in snap["instances"]:
                self.views.counters(d["name"], d["counters"])
        return snap

    def snapshot(self, brief: bool = False) -> dict[str, Any]:
        cfg = self.config
        describe = self.describe_brief if brief else self.describe
        return {
            "machine": {
                "run_dir": self.run_dir, "supervisor_pid": os.getpid(),
                "host_cpus": list(cfg.host_cpus), "oversubscribe": cfg.oversubscribe,
                "mode": "oversubscribed" if cfg.oversubscribe else "dedicated",
                "protection": self.protection,
                "arena_bytes": self.layout.arena_bytes, "started": self.started,
                "survive_host": self.survive_host, "adopt_ms": self.adopt_ms,
                "events": dict(self.events.counts),
                "signatures": {"required": self.require_signed,
                               "keyring": self.keyring.path if self.keyring else None,
                               "keys": self.keyring.subjects() if self.keyring else []},
            },
            "pool": self._pool_fields(),
            # (with the instances each changed: show says which were deleted since)
            "overlays": [{**t.to_dict(), "names": t.names} for t in self.overlays.visible()],
            "host": {"id": HOST_ID, "cpus": list(cfg.host_cpus), "pid": os.getpid()},
            "instances": [describe(i) for i in sorted(self.instances.values(), key=lambda i: i.id)],
        }

    def console(self, name: str | int) -> str:
        """The instance's kmsg; readable whatever its state, also after it died."""
        self._check_open()
        self.poll(0)
        if name in ("host", 0, "0"):
            return self.console_text(HOST_ID)
        return self.console_text(self._get(name).id)

    def console_text(self, instance_id: int) -> str:
        off = self.layout.console_at(instance_id)
        return read_console(self.arena.read(off, self.layout.console_bytes))

    def read_memory(self, name: str, offset: int, size: int) -> bytes:
        """Bytes of an instance's partition, as the host sees them."""
        self._check_open()
        inst = self._get(name)
        if offset < 0 or size < 0 or offset + size > inst.memory_bytes:
            raise InvalidSpec(f"range {offset}+{size} is outside the {inst.memory_bytes}-byte "
                              f"partition of {inst.name!r}", "stay within 0..memory_bytes")
        return self.arena.read(inst.memory_base + offset, size)

    def pid_of(self, name: str) -> int:
        inst = self._get(name)
        if inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}, no process runs",
                            f"mkctl start {inst.name}")
        return inst.pid

    def wait_for(self, name: str, state: str | State, timeout: float = 5.0) -> dict[str, Any]:
        """Drive the machine until the instance reaches ``state``; TimeoutError otherwise."""
        want = State(state)
        inst = self._get(name)
        if not self.wait(lambda: inst.state == want, time.monotonic() + timeout):
            raise TimeoutError(f"instance {inst.name!r} is {inst.state.value}, not "
                               f"{want.value}, after {timeout}s")
        return self.describe(inst)

    # -- the reactor -----------------------------------------------------------------------
    def poll(self, timeout: float | None = 0) -> int:
        """Handle pending events (deaths, doorbells); wait up to ``timeout`` for the first."""
        if self._closed:
            return 0
        handled = 0
        watched = self.supervisor.watched()
        if watched:
            period = min(i.recovery.watchdog for i in watched) / 4
            timeout = period if timeout is None else min(timeout, period)
        for key, _ in self.selector.select(timeout):
            if key.data is None:           # the host doorbell (or an adopted run's old one)
                linux.doorbell_clear(key.fd)
                self.ipc.drain()
                handled += 1
                continue
            kind, inst = key.data
            if kind == EXIT:
                self.lifecycle.on_exit(inst)
            elif kind == CHANNEL:
                self.ipc.serve_doorbells(inst)
            elif kind == REPORT:
                self.loading.on_report(inst)
            elif kind == PARKED_EXIT:
                self.loading.on_parked_exit(inst)
            elif kind == OLD_DOORBELL:
                self.lifecycle.forward_old_doorbell(inst)
            handled += 1
        if self.ipc.pending():
            self.ipc.drain()               # what a flood left over from the last turn
        if watched:
            self.supervisor.watchdog(watched)
        now = time.monotonic()
        if handled:
            self._handled += handled
            if self._sweep_period > SWEEP_PERIOD_S:     # something moves: look again soon
                self._sweep_period = SWEEP_PERIOD_S
                self._filters_due = min(self._filters_due, now + SWEEP_PERIOD_S)
        if now >= self._filters_due:
            moved = self._sweep(now)
            quiet = not moved and self._swept_at == (self.changes, self._handled)
            self._sweep_period = min(2 * self._sweep_period, SWEEP_IDLE_MAX_S) if quiet \
                else SWEEP_PERIOD_S
            self._swept_at = (self.changes, self._handled)
            self._filters_due = now + self._sweep_period
        if self.writes is not None and self.writes.due(now):
            self.writes.scan()
        self.supervisor.run_restarts()
        if self.lifecycle.successors_due:
            self.lifecycle.spawn_successors()
        return handled

    def _sweep(self, now: float) -> bool:
        """The host's look at what instances write where no event tells it: when each loop
        last moved (mkctl top), heartbeats, drop filters, stalled rings, and the counters
        views (COUNTERS_BATCH at a time). Every SWEEP_PERIOD_S it looks at the next
        SWEEP_BATCH running instances in turn, so its cost stays flat as a machine grows: each
        instance is seen every 0.25 s up to 32 instances, every 4 s at 511 (longer while nothing
        moves: SWEEP_IDLE_MAX_S). What it reads is the instances' own words: counted and shown,
        never acted on. Returns whether anything it read had moved."""
        if self._running[0] != self.changes:
            self._running = (self.changes, [i for i in self.instances.values()
                                            if i.state == State.ACTIVE and i.pid is not None])
        running = self._running[1]
        batch, self._sweep_at = _turn(running, self._sweep_at, SWEEP_BATCH)
        wall = time.time()
        moved = False
        views = self.views
        for inst in batch:
            if not views.counted(inst.name):    # its first look writes its counters file
                views.counters(inst.name, self._counters(inst))
            own = self.arena.own(inst.id)
            progress = own.progress
            if progress != inst.progress_mark[0]:
                inst.progress_mark = (progress, now)
                moved = True
            beats = own.heartbeats_sent
            if beats != inst.heartbeats_seen:
                moved = True
                if inst.heartbeats_seen >= 0:
                    beat = beats - inst.heartbeats_seen
                    inst.counters["heartbeats"] += beat if 0 < beat < 1 << 20 else 1
                    inst.last_heartbeat = wall
                inst.heartbeats_seen = beats
        # the counters views then, fewer at a time: each that moved is a file write
        written, self._counters_at = _turn(running, self._counters_at, COUNTERS_BATCH)
        for inst in written:
            views.counters(inst.name, self._counters(inst))
        self.ipc.watch_filters(batch)
        self.ipc.watch_rings(batch)
        return moved

    def next_timer(self) -> float | None:
        """Seconds until the machine has timed work of its own (a watchdog look, a write-watch
        scan, a queued restart), None if none: a loop that nests the machine (the daemon)
        wakes by then and calls ``poll``, so that no timer depends on outside traffic."""
        due: list[float] = []
        watched = self.supervisor.watched()
        if watched:
            due.append(min(i.recovery.watchdog for i in watched) / 4)
        if self.writes is not None:
            due.append(max(0.0, self.writes.next_due - time.monotonic()))
        if self.supervisor.pending() or self.ipc.pending():
            due.append(0.0)
        if self.lifecycle.successors_due:
            due.append(max(0.0, min(t for t, _ in self.lifecycle.successors_due)
                           - time.monotonic()))
        if self.instances:
            due.append(max(0.0, self._filters_due - time.monotonic()))
        return min(due) if due else None

    def wait(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Drive the machine until ``done()`` or ``deadline``. With a ``waiter`` set (the
        daemon's), each step is the waiter's, which serves its own clients meanwhile."""
        while not done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return done()
            if self.waiter is not None:
                self.waiter(remaining)
            else:
                self.poll(remaining)
        return True

    # -- IPIs and messages (the host's side lives in hostipc.py) ---------------------------
    def ring_of(self, instance_id: int) -> Ring:
        return self.ipc.ring_of(instance_id)

    def register_handler(self, msg_type: int, handler: Callable[[M.Message], Any]) -> None:
        """Host-side handler for messages instances send to instance 0."""
        self.ipc.messenger.register(msg_type, handler)

    def send(self, name: str | int, msg_type: int, payload: Any = None) -> int:
        """Send a message from the host to an instance; RingError(ESRCH/ENOSPC/EMSGSIZE)."""
        self._check_open()
        return self.ipc.send(self._get(name).id, msg_type, payload)

    def command(self, name: str | int, msg_type: int, body: Any = None,
                timeout: float = 10.0) -> Any:
        """A host command (SHUTDOWN, EMU_FAULT, PROBE_START, PROBE_FLUSH) as a request: the
        kernel checks it came from the host (its digest is in the host's peer table) before
        it obeys, and answers."""
        self._check_open()
        inst = self._get(name)
        if msg_type not in M.HOST_COMMANDS:
            raise InvalidSpec(f"message type {msg_type:#x} is not a host command",
                              "send it with request()")
        return self.ipc.command(inst, msg_type, body, request=True, timeout=timeout,
                                wait=self._drive)

    def request(self, name: str | int, msg_type: int, payload: Any = None,
                timeout: float = 10.0) -> Any:
        """Send a request and drive the machine until its response arrives (ETIMEDOUT)."""
        self._check_open()
        target = self._get(name).id
        return self.ipc.messenger.request(target, msg_type, payload, timeout, self._drive)

    def _drive(self, left: float) -> None:
        """A request's wait: drive the machine, looking again at least every 50 ms."""
        self.poll(min(left, 0.05))

    # -- arena helpers ---------------------------------------------------------------------
    def _console_view(self, inst: Instance) -> memoryview:
        off = self.layout.console_at(inst.id)
        return memoryview(self.arena.map)[off:off + self.layout.console_bytes]

    # -- state publication -----------------------------------------------------------------
    def transition(self, inst: Instance, new: State, cause: str, old: State | None = None,
                    **fields: Any) -> None:
        before = inst.state if old is None else old
        inst.state = new
        peer = self.arena.peer(inst.id)
        peer.peer_state = STATE_CODES[new.value]
        peer.pid = inst.pid or 0
        self.events.info("state_change", instance=inst.id, name=inst.name, old=before.value,
                         new=new.value, cause=cause, **fields)
        self.publish(inst)

    def publish(self, inst: Instance | None = None) -> None:
        self.changes += 1
        if inst is not None:
            le = inst.last_exit
            self.arena.write_record(
                inst.id, state=inst.state.value, name=inst.name, memory_base=inst.memory_base,
                memory_bytes=inst.memory_bytes, cpus=inst.cpus, pid=inst.pid or 0,
                boots=inst.boots, last_exit_ns=int(le.time * 1e9) if le else 0,
                last_exit_signal=(le.signal or 0) if le else 0,
                last_exit_code=(le.code or 0) if le else 0,
                kernel=inst.kimage.label if inst.kimage else "")
        self._publish_views(inst)
        if self.survive_host:
            if self.defer_state:
                self._state_dirty.append(inst)
            else:
                adoption.save_state(self, [inst] if inst is not None else None)

    def flush_state(self) -> None:
        """Write the state file for the changes published since the last write, and the
        ``kimage`` and ``iomem`` views (with ``defer_state``; all three are whole tables).
        The daemon calls it after each verb, before its reply goes out, and after each turn
        of its loop: a boot publishes three or four changes, and at 511 instances each write
        of the state file was half a megabyte."""
        self.views.flush()
        dirty, self._state_dirty = self._state_dirty, []
        if dirty and self.survive_host:
            # by identity (a verb may delete an instance and create another of the same name);
            # None is a change of the machine (a delete among them): records no instance has
            # any more are removed
            adoption.save_state(self, list({id(i): i for i in dirty if i is not None}.values()),
                                prune=None in dirty)

    def _pool_fields(self) -> dict[str, Any]:
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

    def _counters(self, inst: Instance) -> dict[str, int]:
        """The host's counters of an instance and what it and its ring report."""
        return {**inst.counters, **self.ipc.counters(inst)}

    def _view_fields(self, inst: Instance) -> dict[str, Any]:
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

    def _publish_views(self, inst: Instance | None) -> None:
        """The views follow one change: the changed instance alone, unless the set of
        instances or of their CPUs moved (then every instance is looked at, and only those
        whose files differ are written: who shares a CPU may have changed)."""
        v = self.views
        v.pool(self._pool_fields(), self.config.oversubscribe)
        if inst is not None and inst.name in self.instances and v.has(inst.name, inst.cpus):
            v.instance(self._view_fields(inst))
        else:
            for gone in v.names - set(self.instances):
                v.remove(gone)
            for i in self.instances.values():
                v.instance(self._view_fields(i))
        v.overlays([t.to_dict() for t in self.overlays.visible()])
        if not self.defer_state:        # (else once per verb and turn: flush_state)
            v.flush()
