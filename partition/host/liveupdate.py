"""Live kernel update: replace a running instance's kernel with a new image, its state handed
over (KHO), its service never down for long and no message lost.

The order, and why:

1. The new image is loaded first, beside the running kernel, in a parked process of the same
   instance (its cgroup, its CPUs): a broken image is refused here and the old kernel never
   noticed.
2. The old kernel is asked to quiesce: a SHUTDOWN host command with ``handover`` (its
   ``shutdown()`` hook sees ``handing_over`` and preserves its state with ``kho_preserve``). It
   answers what it has taken from its ring and exits.
3. Meanwhile the peer table keeps the instance active with the same service epoch: peers go on
   writing into its ring (nothing is refused with ESRCH), and a request the old kernel did not
   take is not given up by its sender. The host takes the old run's KHO table (kho.py).
4. The new kernel boots on the same CPUs from the same ring: the messages that arrived during
   the switch are its first, each delivered once (the ring's tail moved only for what the old
   kernel took), and its preserved regions are where ``kho_restore`` finds them.
5. If the new kernel dies in ``boot()``, the preserved bytes are put back and the old image
   boots again with them (rollback); the command says so.

The service gap (from the quiesce request to the new kernel's ``boot()`` returning) is measured
and reported; ``mkctl bench update`` measures it under traffic.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition.abi import message as M
from partition.abi.ring import RingError
from partition.errors import BadKernelImage, BootFailed, BootTimeout, NotLoaded
from partition.guest.trampoline import readable_label
from partition.host import kho
from partition.host.instance import Instance, State
from partition.host.kimage import check_spec

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.events import EventLog
    from partition.host.lifecycle import Lifecycle
    from partition.host.loading import Loading, Wait

#: how long the old kernel has to quiesce before it is forced (its state is then what it was)
QUIESCE_S = 10.0


class LiveUpdate:
    """Live updates of one machine's instances. ``lifecycle`` boots and forces (lifecycle.py),
    ``loading`` loads the new image beside the old, ``command`` is a host command to the
    instance (hostipc.py), ``wait`` drives the machine, ``check_signature`` is kexec's check."""

    def __init__(self, lifecycle: Lifecycle, loading: Loading, command: Callable[..., Any],
                 wait: Wait, events: EventLog, arena: Arena,
                 check_signature: Callable[..., None]) -> None:
        self.lifecycle = lifecycle
        self.loading = loading
        self.command = command
        self.wait = wait
        self.events = events
        self.arena = arena
        self.check_signature = check_signature

    def update(self, inst: Instance, kernel: str, cmdline: str | None = None,
               quiesce: float = QUIESCE_S) -> dict[str, Any]:
        """The live update of ``inst`` (see the module's docstring)."""
        if inst.state != State.ACTIVE or inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; a live update replaces "
                            "a running kernel", f"mkctl start {inst.name}, or load the new image")
        old = inst.kimage
        assert old is not None
        new = check_spec(kernel, old.cmdline if cmdline is None else cmdline)
        self.check_signature(inst, new)           # the new image, as kexec load would check it
        t0 = time.monotonic()
        if inst.parked is not None:            # a successor of the old image (restart policy)
            self.loading.forget_parked(inst)
        self.loading.set_image(inst, new)
        try:
            self.loading.await_loaded(inst)       # 1. the new image, checked in its own process
        except BaseException:
            self.loading.set_image(inst, old)
            raise
        report = inst.parked.report if inst.parked is not None else None
        new.label = readable_label(str((report or {}).get("label") or ""),
                                   str((report or {}).get("source") or ""))
        new.source = str((report or {}).get("source") or "")
        loaded = time.monotonic()

        inst.run.hand_over(True)              # 2. the old kernel quiesces
        inst.run.halt("graceful")
        try:
            try:
                self.command(inst, M.MK_MSG_SHUTDOWN, {"timeout_s": quiesce, "handover": True})
            except RingError:
                if inst.pidfd is not None:
                    signal.pidfd_send_signal(inst.pidfd, signal.SIGTERM)
            if not self.wait(lambda: inst.pid is None, time.monotonic() + quiesce):
                self.events.warning("handover_forced", instance=inst.id, name=inst.name,
                                 quiesce_s=quiesce)
                inst.run.halt("forced")
                self.lifecycle.force(inst)
                self.wait(lambda: inst.pid is None, None)
        finally:
            inst.run.hand_over(False)
        quiet = time.monotonic()
        kept = list(inst.kho or [])            # 3. what it preserved (checked, CRCs taken)
        keep_rest = inst.kho_keep_rest
        saved = [(off, bytes(self.arena.read(inst.memory_base + off, size)))
                 for _, off, size, _ in kept]

        inst.run.hand_over(True)              # 4. the new kernel, same CPUs, same ring; a death
        try:                                   #    in its boot() keeps the service up for the old
            try:
                self.lifecycle.boot(inst, wait_boot=True, handover=True)
            except (BootFailed, BootTimeout, BadKernelImage) as exc:
                return self._roll_back(inst, old, new, kept, keep_rest, saved, exc, t0, quiet)
        finally:
            inst.run.hand_over(False)
        done = time.monotonic()
        out = {"instance": inst.name, "kernel": new.label, "previous": old.label,
               "rolled_back": False, "load_ms": round((loaded - t0) * 1e3, 3),
               "quiesce_ms": round((quiet - loaded) * 1e3, 3),
               "gap_ms": round((done - loaded) * 1e3, 3),
               "preserved": [n for n, _, _, _ in kept]}
        inst.count("live_updates")
        self.events.info("live_update", **out)
        return out

    def _roll_back(self, inst: Instance, old: Any, new: Any,
                   kept: list[tuple[str, int, int, int]], keep_rest: bool,
                   saved: list[tuple[int, bytes]], exc: Exception, t0: float,
                   quiet: float) -> dict[str, Any]:
        """5. The new kernel failed in boot(): the old image, the preserved bytes as they were.

        A new kernel whose boot() outlasted the deadline still runs, on the instance's CPUs, ring
        and cgroup: it is killed and reaped first (recorded as its own exit, a boot failure), so
        that the old image never boots beside it and each pidfd the host watches stays one
        incarnation's."""
        self.events.warning("live_update_failed", instance=inst.id, name=inst.name,
                         kernel=new.label, reason=str(exc))
        if inst.pid is not None:
            self.lifecycle.force(inst)
            inst.run.halt("boot-return-timeout")
            self.wait(lambda: inst.pid is None, None)
        for off, data in saved:
            self.arena.map[inst.memory_base + off:inst.memory_base + off + len(data)] = data
        kho.put_back(inst, kept, keep_rest)
        self.loading.set_image(inst, old)
        if inst.parked is not None:
            self.loading.forget_parked(inst)
        self.lifecycle.boot(inst, wait_boot=True, handover=True)
        out = {"instance": inst.name, "kernel": old.label, "previous": old.label,
               "rolled_back": True, "reason": f"the new kernel failed to boot: {exc}",
               "gap_ms": round((time.monotonic() - quiet) * 1e3, 3),
               "preserved": [n for n, _, _, _ in kept]}
        self.events.warning("live_update_rolled_back", **out)
        return out
