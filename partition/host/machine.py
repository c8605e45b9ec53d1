"""The emulated machine: the host kernel (instance 0) and its kexec loader, as one facade.

``Machine`` is a single-threaded reactor. It owns the arena, the resource pool, one pidfd per
running instance and the host's doorbell; nothing happens behind the caller's back on another
thread. That is what makes it safe to fork instances straight from it (a fork from a
multi-threaded process can inherit a lock held by a thread that no longer exists), and it is what
a researcher wants from an instrument: events are handled when the machine is driven, by
``poll()``, by any verb, or by the supervisor daemon's loop, which drives it continuously.

Guarantees: a verb either completes or raises an ``MKError`` and changes nothing; a death is
noticed the next time the machine is driven (at once in the daemon) and recorded before any
other verb runs; ``close()`` leaves no process, mapping, descriptor or file behind.

This module is the public surface alone, the verbs and the views; assembly.py builds the
collaborators (docs/architecture.md's module map), each with only what it uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from partition.abi import message as M
from partition.abi.console import read_console
from partition.abi.constants import HOST_ID
from partition.abi.ring import Ring
from partition.errors import InvalidSpec, MKError, NotLoaded
from partition.host import consoleinput, faults, llc, rundir, statefile
from partition.host.assembly import Hooks, Settings, assemble, open_house
from partition.host.devicetree import Overlay
from partition.host.instance import Instance, State, check_transition
from partition.host.kimage import check_spec
from partition.host.resize import update_op
from partition.host.shared import release_left
from partition.host.sweep import COUNTERS_BATCH, SWEEP_BATCH, SWEEP_IDLE_MAX_S, SWEEP_PERIOD_S
from partition.host.userrun import check_programs
from partition.host.verbs import owned as _owned
from partition.host.verbs import verb
from partition.units import seconds

__all__ = ["COUNTERS_BATCH", "SWEEP_BATCH", "SWEEP_IDLE_MAX_S", "SWEEP_PERIOD_S", "Machine"]

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
                 require_signed: bool = False, keyring: str | None = None,
                 shared: list[str] | dict[str, Any] | None = None) -> None:
        s = Settings.check(cpus, memory, host_cpus, oversubscribe, console_bytes, kill_timeout,
                           boot_timeout, pin_host, ring_slots, ring_slot_bytes, protection,
                           survive_host, adopt, pool_chunks, pool_window, llc_way_mask,
                           require_signed, keyring, shared)
        self.settings = s
        self.config, self.pin_host, self.llc_way_mask = s.config, s.pin_host, s.llc_way_mask
        self.keyring, self.require_signed = s.keyring, s.require_signed
        self.survive_host, self.adopting = s.survive_host, s.adopting
        self.kill_timeout, self.boot_timeout = s.kill_timeout, s.boot_timeout
        self.protection = s.protection
        self._closed = False
        self._closing = False
        self._run = run_dir if isinstance(run_dir, rundir.RunDir) else rundir.claim(run_dir)
        self.run_dir = self._run.path
        # named for the run directory's key, as the arena and the cgroups: stable across
        # hosts (an adopted machine's groups are found again, and an abandoned one's removed)
        self.resctrl = llc.Resctrl(resctrl_root, prefix=statefile.resctrl_prefix(self.run_dir))
        try:
            if self.llc_way_mask is not None:
                self.resctrl.check_pool(self.llc_way_mask)
            h = assemble(s, self.run_dir, self.resctrl,
                         Hooks(self.create, self.delete, self.wait, lambda: self.closing,
                               self.console_text))
        except BaseException:
            release_left(self.run_dir)
            self._run.release()
            raise
        self.house = h
        self.pool, self.layout, self.arena, self.table = h.pool, h.layout, h.arena, h.table
        self.instances: dict[str, Instance] = h.table.by_name
        self.reactor, self.selector, self.events = h.reactor, h.reactor.selector, h.events
        self.views, self.ipc, self.cgroups, self.looks = h.views, h.ipc, h.cgroups, h.looks
        self.state, self.publisher, self.loading = h.state, h.publisher, h.loading
        self.supervisor, self.writes, self.lifecycle = h.supervisor, h.writes, h.lifecycle
        self.overlays, self.sweeper, self.check_signature = h.overlays, h.sweeper, h.check_signature
        self.shared = h.shared          # the machine's shared regions (host/shared.py)
        self.userlands = h.userlands    # one userland per running instance (host/userlands.py)
        self.console_in = consoleinput.ConsoleInput(h.ipc.command, h.events, s.ring_slot_bytes,
                                                    [h.userlands.feed])
        #: called instead of ``poll`` while a verb waits (see ``wait``); must drive ``poll``
        self.waiter: Callable[[float | None], None] | None = None
        self.started = time.time()
        #: adoption's time, and the records it refused: [{"name", "why"}] (its event's)
        self.adopt_ms, self.adopt_refused = open_house(h, s, self.run_dir, self.resctrl)
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
            self.userlands.close()      # every userland killed and reaped (host/userlands.py)
            for inst in self.instances.values():
                self.lifecycle.forget_process(inst)
            self.loading.zygotes.close()
            self.cgroups.close()
            for inst in self.instances.values():
                llc.leave(self.resctrl, self.events, inst)
            self._teardown(unlink=True)

    def _teardown(self, unlink: bool) -> None:
        """What ``close`` and ``abandon`` both close: shared regions, reactor, doorbells, the
        host's ring, console, arena (removed with ``unlink``), event log, lock."""
        self.shared.close()
        try:
            self.reactor.close()
        finally:
            self.house.bells.close()
            self.ipc.close()
            self.house.console.close()
            if unlink:
                self.arena.unlink()
            self.arena.close()
            self.events.close()
            if unlink:
                self._run.release()
            elif self._run.lock_fd >= 0:
                os.close(self._run.lock_fd)
                self._run.lock_fd = -1

    def abandon(self) -> dict[str, Any]:
        """Throw this host away as its sudden death would: nothing halted or removed, descriptors
        and lock gone; the instances run on for a ``Machine(adopt=True)`` (returns its arguments)."""
        if not self.survive_host:
            raise InvalidSpec("only a machine whose instances outlive their host can lose it",
                              "Machine(survive_host=True)")
        self._check_open()
        assert self.state is not None
        self.state.save()
        state = statefile.read_state(self.run_dir)
        assert state is not None
        self._closed = True
        self.userlands.close()          # they die with their host (their parent-death signal)
        for inst in self.instances.values():
            self.lifecycle.drop_descriptors(inst)
        self.loading.zygotes.close()
        self._teardown(unlink=False)
        return {k: v for k, v in state["config"].items() if k in statefile.CONFIG_KEYS}

    # -- host services ---------------------------------------------------------------------
    def printk(self, message: str) -> None:
        """The host's own console (instance 0's kmsg)."""
        self.house.console.printk(message)

    def refresh_views(self) -> None:
        """Rewrite the counters views that moved (the rest follow each published change)."""
        if not (self._closed or self._closing):
            for inst in self.instances.values():
                self.views.counters(inst.name, self.looks.counters(inst))

    def fileno(self) -> int:
        """Readable when the machine has events to handle; lets a daemon nest it in its loop."""
        return self.reactor.fileno()

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str | int) -> Instance:
        """The instance a verb names, by name or id (NoSuchInstance)."""
        return self.table.get(name)

    def by_id(self, instance_id: int) -> Instance | None:
        """The instance with this id, None if there is none."""
        return self.table.by_id(instance_id)

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise MKError("the machine has been shut down", "create a new Machine")

    # -- state the collaborators own, under the names callers know (read there)
    changes = _owned("table.changes", "published changes so far (caches key on it)")
    zygote = _owned("loading.zygotes.current", "the zygote forking instances, if one runs")
    use_zygote = _owned("loading.zygotes.enabled", "False: instances forked from the host", True)
    defer_state = _owned("publisher.defer_state", "state file at flush_state only", True)
    extra_host_doorbells = _owned("house.bells.extra", "an old host's doorbells, adopted")
    _filters_due = _owned("sweeper.due", "when the next sweep is due", True)
    _sweep_period = _owned("sweeper.period", "the sweep's period now")

    # -- verbs -----------------------------------------------------------------------------
    @verb
    def create(self, name: str, memory: str | int, cpus: str | list[int] | None = None,
               cpu_count: int | None = None, id: int | None = None, recovery: str = "none",
               max_restarts: int = 3, restart_window: float = 5.0,
               watchdog: float = 0.0, standby_for: str | None = None,
               preserve_memory: bool = False,
               llc_way_mask: int | str | None = None, pids_max: int | str | None = None,
               rootfs: str | None = None, shared: list[str] | None = None) -> dict[str, Any]:
        """Reserve CPUs and a partition (empty -> ready); ``llc_way_mask``: LLC ways of its own
        (host/llc.py); ``pids_max``, ``rootfs``: its userland's process limit and root
        (host/userspec.py); ``shared``: the machine's regions it mounts (host/shared.py)."""
        regions = self.shared.check(shared)
        policy = {"policy": recovery, "max_restarts": max_restarts,
                  "restart_window": restart_window, "watchdog": watchdog,
                  "preserve_memory": preserve_memory}
        return self.describe(self.house.provision.create(name, memory, cpus, cpu_count, id, policy,
                                                         standby_for, llc_way_mask,
                                                         pids_max, rootfs, regions))

    @verb
    def load(self, name: str, kernel: str, cmdline: str = "",
             programs: list[Any] | None = None) -> dict[str, Any]:
        """Load a kernel image (ready -> loaded). A spec that is not a kernel leaves it ready.
        ``programs``: commands its userland starts at every boot (host/userlands.py)."""
        inst = self.get(name)
        check_transition("load", inst.name, inst.state)
        boot_programs = check_programs(programs)
        self.loading.load(inst, check_spec(kernel, cmdline), self.check_signature)
        self.userlands.set_programs(inst, boot_programs)
        self.transition(inst, State.LOADED, "load")
        return self.describe(inst)

    def start(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Boot the loaded image (loaded|failed -> active): kerf 0.4's ``start``. Returns once
        ``boot()`` returned (``wait=False``: at the spawn mailbox's answer, the real system's
        semantics); a kernel that dies in ``boot()`` raises BootFailed. ``exec``: its old name."""
        return self.exec(name, wait)

    @verb
    def exec(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Boot the loaded image: the name the real tree's first kerf used (``start`` now)."""
        inst = self.get(name)
        check_transition("start", inst.name, inst.state)
        assert inst.kimage is not None
        self.lifecycle.boot(inst, wait_boot=bool(wait))
        return self.describe(inst)

    @verb
    def kill(self, name: str, force: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Halt an instance: graceful (SIGTERM, then SIGKILL after ``timeout``) or forced."""
        inst = self.get(name)
        check_transition("kill --force" if force else "kill", inst.name, inst.state)
        if inst.state == State.ACTIVE:
            t = self.kill_timeout if timeout is None else seconds(timeout, "timeout", 0, 86400)
            if force:
                self.lifecycle.force(inst)
                self.wait(lambda: inst.pid is None, None)
            else:
                self.lifecycle.halt_many([inst], t)
        return self.describe(inst)

    @verb
    def update(self, name: str, recovery: str | None = None, max_restarts: int | None = None,
               restart_window: float | None = None, watchdog: float | None = None,
               preserve_memory: bool | None = None) -> dict[str, Any]:
        """Change an instance's recovery policy or watchdog, in any state (all or nothing)."""
        inst = self.get(name)
        self.supervisor.update_policy(inst, policy=recovery, max_restarts=max_restarts,
                                      restart_window=restart_window, watchdog=watchdog,
                                      preserve_memory=preserve_memory)
        return self.describe(inst)

    @verb
    def fault(self, name: str, kind: str, **options: Any) -> dict[str, Any]:
        """Inject a fault into an active instance (see faults.py for the kinds)."""
        opts = faults.validate(kind, options)
        return faults.inject(self.get(name), kind, opts, self.by_id, self.describe, self.writes,
                             self.ipc.command, self.events, freeze=self.cgroups.freeze,
                             unfreeze=self.lifecycle.unfreeze, frozen=self.cgroups.frozen,
                             freeze_userland=self.cgroups.freeze_userland)

    def checksum(self, name: str) -> int:
        """CRC32 of an instance's whole partition, as the host reads it."""
        return self.looks.checksum(self.get(name))

    @verb
    def unload(self, name: str) -> dict[str, Any]:
        """Drop the loaded image (loaded|failed -> ready)."""
        inst = self.get(name)
        check_transition("unload", inst.name, inst.state)
        self.loading.unload(inst)
        self.transition(inst, State.READY, "unload")
        return self.describe(inst)

    @verb
    def delete(self, name: str) -> dict[str, Any]:
        """Free the partition and CPUs (ready -> gone); the partition is scrubbed."""
        inst = self.get(name)
        check_transition("delete", inst.name, inst.state)
        out = self.describe(inst)
        self.house.provision.delete(inst)
        out["state"] = State.EMPTY.value
        return out

    @verb
    def live_update(self, name: str, kernel: str, cmdline: str | None = None,
                    quiesce: float = 10.0) -> dict[str, Any]:
        """Replace a running kernel with a new image, its state handed over (KHO), messages
        kept; rolls back to the old image if the new one fails to boot (host/liveupdate.py)."""
        return self.house.liveupdate.update(self.get(name), kernel, cmdline,
                                            seconds(quiesce, "quiesce", 0, 3600))

    # -- the real control plane: overlays and runtime resources --------------------------------
    @verb
    def apply_overlay(self, data: bytes) -> dict[str, Any]:
        """Apply a DTBO as one transaction (``overlays/new``); see host/overlays.py."""
        return self.overlays.apply(data).to_dict()

    @verb
    def remove_overlay(self, tx: int) -> dict[str, Any]:
        """Roll a transaction back (``rmdir overlays/tx_<N>``)."""
        if isinstance(tx, bool) or not isinstance(tx, int):
            raise InvalidSpec(f"transaction id {tx!r} is not an integer", "e.g. tx 3")
        return self.overlays.remove(tx).to_dict()

    @verb
    def resize(self, name: str, cpus: str | list[int] | None = None,
               memory: str | int | None = None) -> dict[str, Any]:
        """Change a ready, loaded or running instance's CPUs or memory as ``kerf update`` does:
        one overlay transaction (memory-remove, memory-add, cpu-remove, cpu-add), the running
        kernel asked first (host/resize.py)."""
        inst = self.get(name)
        op = update_op(inst, cpus, memory, self.config, self.pool, self.layout.pool_offset)
        tx = self.overlays.run(Overlay([op], f"/instances/{inst.name}"))
        return {**self.describe(inst), "transaction": tx.to_dict()}

    # -- observation -----------------------------------------------------------------------
    def describe(self, inst: Instance) -> dict[str, Any]:
        return {**self.looks.describe(inst), **self.userlands.describe(inst)}

    def describe_brief(self, inst: Instance) -> dict[str, Any]:
        return self.looks.describe_brief(inst)

    def show(self, name: str | None = None, brief: bool = False) -> dict[str, Any]:
        """One instance (describe) or the machine (snapshot; ``brief``: a table's fields)."""
        self._check_open()
        if not isinstance(brief, bool):
            raise InvalidSpec(f"brief must be true or false, got {brief!r}",
                              "leave it out for everything")
        self.poll(0)
        if name is not None:
            d = self.describe(self.get(name))
            self.views.counters(d["name"], d["counters"])   # counters move: refresh on look
            return d
        snap = self.snapshot(brief)
        if not brief:
            for d in snap["instances"]:
                self.views.counters(d["name"], d["counters"])
        return snap

    def snapshot(self, brief: bool = False) -> dict[str, Any]:
        return self.looks.snapshot(brief, self.started, self.adopt_ms, self.shared.describe())

    @verb
    def console(self, name: str | int) -> str:
        """The instance's kmsg; readable whatever its state, also after it died."""
        if name in ("host", 0, "0"):
            return self.console_text(HOST_ID)
        return self.console_text(self.get(name).id)

    @verb
    def console_input(self, name: str | int, data: bytes | str) -> dict[str, Any]:
        """A line typed on its console: to its kernel, then its userland (consoleinput.py)."""
        return self.console_in.deliver(self.get(name), data)

    def console_text(self, instance_id: int) -> str:
        off = self.layout.console_at(instance_id)
        return read_console(self.arena.read(off, self.layout.console_bytes))

    def read_memory(self, name: str, offset: int, size: int) -> bytes:
        """Bytes of an instance's partition, as the host sees them."""
        self._check_open()
        return self.looks.read(self.get(name), offset, size)

    def pid_of(self, name: str) -> int:
        inst = self.get(name)
        if inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}, no process runs",
                            f"mkctl start {inst.name}")
        return inst.pid

    def wait_for(self, name: str, state: str | State, timeout: float = 5.0) -> dict[str, Any]:
        """Drive the machine until the instance reaches ``state``; TimeoutError otherwise."""
        want = State(state)
        inst = self.get(name)
        if not self.wait(lambda: inst.state == want, time.monotonic() + timeout):
            raise TimeoutError(f"instance {inst.name!r} is {inst.state.value}, not "
                               f"{want.value}, after {timeout}s")
        return self.describe(inst)

    # -- the reactor -----------------------------------------------------------------------
    def poll(self, timeout: float | None = 0) -> int:
        """Handle pending events (deaths, doorbells); wait up to ``timeout`` for the first."""
        if self._closed:
            return 0
        return self.house.turn.run(timeout)

    def next_timer(self) -> float | None:
        """Seconds until the machine's own timed work (watchdog, write watch, restarts), None
        if none: a loop nesting the machine (the daemon) calls ``poll`` by then."""
        return self.house.turn.next_timer()

    def wait(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Drive the machine until ``done()`` or ``deadline`` (each step the daemon's waiter's)."""
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
        return self.ipc.send(self.get(name).id, msg_type, payload)

    def command(self, name: str | int, msg_type: int, body: Any = None,
                timeout: float = 10.0) -> Any:
        """A host command (abi/message.py HOST_COMMANDS) as a request: the kernel obeys only
        what the host's peer table digests (it came from the host), and answers."""
        self._check_open()
        inst = self.get(name)
        if msg_type not in M.HOST_COMMANDS:
            raise InvalidSpec(f"message type {msg_type:#x} is not a host command",
                              "send it with request()")
        return self.ipc.command(inst, msg_type, body, request=True, timeout=timeout,
                                wait=self._drive)

    def request(self, name: str | int, msg_type: int, payload: Any = None,
                timeout: float = 10.0) -> Any:
        """Send a request and drive the machine until its response arrives (ETIMEDOUT)."""
        self._check_open()
        target = self.get(name).id
        return self.ipc.messenger.request(target, msg_type, payload, timeout, self._drive)

    def _drive(self, left: float) -> None:
        """A request's wait: drive the machine, looking again at least every 50 ms."""
        self.poll(min(left, 0.05))

    # -- state publication (host/publish.py) -----------------------------------------------
    def transition(self, inst: Instance, new: State, cause: str, old: State | None = None,
                   **fields: Any) -> None:
        self.publisher.transition(inst, new, cause, old, **fields)

    def publish(self, inst: Instance | None = None) -> None:
        self.publisher.publish(inst)

    def flush_state(self) -> None:
        """Write the state file for the changes published since the last write, and the
        ``kimage`` and ``iomem`` views (with ``defer_state``). The daemon calls it after each
        verb, before its reply goes out, and after each turn of its loop."""
        self.publisher.flush()
