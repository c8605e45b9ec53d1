"""The host's end of inter-kernel messaging: its ring, its handlers, its doorbells.

Instance 0 receives HALTED, SHUTDOWN_ACK and HEARTBEAT here, sends to instances through their
rings, and cleans up after dead senders. It is the guest's ``Endpoint`` with a directory of its
own: where an instance reads the shared peer-state table, the host reads its own records (the
pid it forked, the doorbell it created, the standby it chose), so nothing an instance wrote
decides where the host's messages go or whom it signals.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.abi import doorbell
from partition.abi import message as M
from partition.abi import slot as S
from partition.abi.constants import HOST_ID, IPI_SIGNAL, MAX_INSTANCES
from partition.abi.ring import Ring, RingError
from partition.guest.endpoint import NO_DOORBELL, Doorbell, Endpoint
from partition.host.instance import Instance, State
from partition.host.lifecycle import ring as ring_doorbell

if TYPE_CHECKING:
    from partition.abi.layout import ArenaLayout
    from partition.host.arena import Arena
    from partition.host.events import EventLog
    from partition.host.reactor import Reactor
    from partition.host.table import InstanceTable

STALL_REPORT_S = 0.5        # a claim unpublished this long at a ring's tail is reported
#: a claim unpublished this long at a ring's tail: its receiver is rung (and again as often),
#: so that its drain reclaims it (the receivers' abandon_after, kernel.py: 1 s)
RECLAIM_WAKE_S = 1.0
DRAIN_TURN = 1024           # host messages handled per turn of the reactor
#: how long the host waits for an instance's pidfd once its doorbell channel hung up: its exit
#: is notified microseconds after its descriptors close; a kernel that shut its channel and
#: lives on costs the host this once per run (then the channel is no longer watched)
HANGUP_EXIT_S = 0.002
LOG_INTERVAL_S = 1.0        # events a writer of shared memory can repeat: at most this often


class HostDirectory:
    """The host's ``PeerDirectory``: its own records of each instance, never the slots."""

    def __init__(self, table: InstanceTable) -> None:
        self.table = table

    def route(self, target: int) -> tuple[int, int]:
        inst = self.table.by_id(target)
        if inst is not None and inst.state != State.ACTIVE and inst.served_by is not None:
            inst = self.table.by_id(inst.served_by)        # a standby took over the role
        if inst is None or inst.state != State.ACTIVE or inst.pid is None:
            raise RingError(errno.ESRCH, f"instance {target} is not active")
        return inst.id, inst.pid

    def doorbell(self, target: int, pid: int) -> tuple[Doorbell, list[int]]:
        inst = self.table.by_id(target)
        if inst is None or inst.pid != pid or inst.doorbell_fd is None or inst.pidfd is None:
            return NO_DOORBELL, []
        # the instance record owns both descriptors: nothing for the endpoint to close
        return (inst.doorbell_fd, inst.pidfd, int(IPI_SIGNAL)), []

    def retry(self, target: int) -> bool:
        return False

    def entry(self, target: int, pid: int) -> None:
        return None         # the host routes every send by its own records

    def incarnation(self, target: int) -> Any:
        inst = self.table.by_id(target)
        return inst.pid if inst is not None else None

    def alive(self, target: int, incarnation: Any) -> bool:
        """Alive while the run we sent to is the one running (the pidfd tells us of deaths)."""
        inst = self.table.by_id(target)
        return (inst is not None and incarnation is not None and inst.pid == incarnation
                and inst.state == State.ACTIVE)

    def refused(self, code: int) -> None:
        pass


class HostIPC:
    """The host's endpoint: receives from instances, sends to them, tidies after the dead.
    ``cpu``: the physical CPU the host runs on (its messages say so)."""

    def __init__(self, arena: Arena, layout: ArenaLayout, cpu: int, table: InstanceTable,
                 events: EventLog, reactor: Reactor) -> None:
        self.arena = arena
        self.table = table
        self.events = events
        self.reactor = reactor
        lay = layout
        self._view = memoryview(arena.map)[lay.ring_offset:
                                           lay.ring_offset + lay.ring_area_bytes]
        own = arena.own(HOST_ID)
        self.endpoint = Endpoint(HOST_ID, cpu, self._view, arena.address + lay.ring_offset,
                                 lay, HostDirectory(table),
                                 sent_counter=(own.buf, own.base + S.OWN_IPI_SENT))
        self.ring = self.endpoint.ring_of(HOST_ID)
        self.ring.set_mode("interrupt")
        self.messenger = self.endpoint.messenger
        self.messenger.register(M.MK_MSG_HALTED, self._on_halted)
        self.messenger.register(M.MK_MSG_SHUTDOWN_ACK, self._on_shutdown_ack)
        self.messenger.register(M.MK_MSG_HEARTBEAT, self._on_heartbeat)
        self._filters_seen: dict[int, set[tuple[int, int]]] = {}   # instance id -> filters
        self.ring_resets = 0                 # of the host's own ring
        self._resets_seen: dict[int, int] = {}       # instance id -> own.ring_resets logged
        self._logged: dict[tuple[str, int], tuple[float, int]] = {}  # rate limit (_log)
        #: ring id -> (the ticket waiting at its tail, since when, reported)
        self._stalled: dict[int, tuple[int, float, bool]] = {}
        self._reclaim_rung: dict[int, float] = {}    # instance id -> when rung to reclaim

    def close(self) -> None:
        self.endpoint.close()
        self._view.release()

    def ring_of(self, instance_id: int) -> Ring:
        return self.endpoint.ring_of(instance_id)

    def forget(self, instance_id: int) -> None:
        """The instance's run ended: drop the send bound to its doorbell."""
        self.endpoint.forget(instance_id)

    def send(self, target: int, msg_type: int, payload: Any = None) -> int:
        """Send from the host; counted as ``host_sent`` on the instance it reached."""
        mid = self.messenger.send(target, msg_type, payload)
        inst = self.table.by_id(self.messenger.last_target)
        if inst is not None:
            inst.count("host_sent")
        return mid

    def command(self, inst: Instance, msg_type: int, body: Any = None, request: bool = False,
                timeout: float = 10.0, wait: Callable[[float], None] | None = None) -> Any:
        """A host command (abi/message.py HOST_COMMANDS) to ``inst``: numbered, its digest
        published in the instance's peer entry first (only the host writes there), then sent;
        the kernel obeys it only if the two match. ``request``: wait for the answer."""
        seq = inst.run.next_command()
        self.arena.peer(inst.id).publish_command(
            seq, M.command_digest(seq, inst.generation, msg_type, body))
        payload = {"seq": seq, "body": body}
        if not request:
            return self.send(inst.id, msg_type, payload)
        assert wait is not None
        return self.messenger.request(inst.id, msg_type, payload, timeout, wait)

    def serve_doorbells(self, inst: Instance) -> None:
        """Answer ``inst``'s doorbell requests (abi/doorbell.py) from the host's own records:
        the doorbell's ring end it made and the pidfd it holds for the target's running
        incarnation (never the end the target reads: a peer must ring it, not consume it). At
        most 16 a turn, so a chatty instance cannot keep the reactor to itself."""
        chan = inst.channel
        if chan is None:
            return
        for _ in range(16):
            try:
                data = chan.recv(64, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:                 # it shut its end: stop listening, or EOF spins us
                self.reactor.unwatch(chan)
                # most often its process is exiting (it closes its descriptors just before
                # its pidfd says so): the exit is handled now, and says why the channel shut
                if inst.pidfd is not None and self.reactor.expect(inst.pidfd, HANGUP_EXIT_S):
                    return
                self.events.warning("channel_closed", instance=inst.id, name=inst.name)
                return
            if len(data) != doorbell.REQUEST.size:
                inst.count("bad_doorbell_requests")
                continue
            (target,) = doorbell.REQUEST.unpack(data)
            peer = self.table.by_id(target) if target < MAX_INSTANCES else None
            if peer is None or peer.state != State.ACTIVE or peer.pid is None \
                    or peer.doorbell_fd is None or peer.pidfd is None or peer is inst:
                doorbell.answer(chan, target, errno.ESRCH)
                continue
            inst.count("doorbells_given")
            doorbell.answer(chan, target, 0, peer.pid, peer.generation,
                            (peer.doorbell_fd, peer.pidfd))

    def drain(self) -> None:
        """Take what waits in the host's ring, at most DRAIN_TURN messages at a time: a flood
        from one instance must not keep the reactor from its other work (what is left is taken
        on the next turn: ``pending`` makes the machine come back at once)."""
        problem = self.ring.header_problem()
        if problem is not None:         # the host's ring is as writable as any: heal it
            self.ring.heal("interrupt", False)
            self.ring_resets += 1
            self._log("ring_reset", HOST_ID, "host", reason=problem)
        msgr = self.messenger
        for _ in range(DRAIN_TURN // 64):
            if not self.ring.drain(msgr.deliver, 64,
                                   handled=None if msgr.waiting else msgr.handled):
                break

    def pending(self) -> bool:
        """Published messages wait in the host's ring (a claim still unpublished at its tail
        is not work: the 0.1 s look reclaims it in time)."""
        return self.ring.head != self.ring.tail and self.ring.stalled() is None

    def _on_halted(self, msg: M.Message) -> None:
        """Counted; its reason is logged once, when the run ends (lifecycle.on_exit), so that
        neither a flood nor a forged one (under another instance's id) reaches the log."""
        inst = self.table.by_id(msg.sender)
        if inst is None:
            return
        inst.count("halted_msgs")
        # the sender id is a claim: the reason is kept, and logged only if this instance's
        # run really ends (lifecycle.on_exit), so a peer cannot make an active one look halted
        reason = str(msg.payload.get("reason", ""))[:200] if isinstance(msg.payload, dict) else ""
        inst.run.said_halted(reason)

    def _on_shutdown_ack(self, msg: M.Message) -> None:
        inst = self.table.by_id(msg.sender)
        if inst is not None and inst.halt_requested == "graceful" and not inst.shutdown_acked:
            inst.run.acked_shutdown()        # once, and only when a shutdown was asked for
            self.events.info("shutdown_ack", instance=inst.id, name=inst.name)

    def _on_heartbeat(self, msg: M.Message) -> None:
        inst = self.table.by_id(msg.sender)
        if inst is not None:
            inst.count("heartbeats")
            inst.run.heartbeat(time.time())

    def sweep_claims_of(self, inst: Instance) -> None:
        """A dead sender's unpublished claims would block its peers' rings: abandon them, and
        ring each receiver whose ring had one. The messages behind such a claim rang it
        already, and it drained up to the claim and went back to sleep: a tickless one would
        sleep on until its safety net (models/healing.pml, healing/sweep-no-doorbell)."""
        n = self.ring.abandon_claims_of(inst.id)
        for other in self.table:
            marked = self.ring_of(other.id).abandon_claims_of(inst.id)
            if marked and other.doorbell_fd is not None:
                ring_doorbell(other.doorbell_fd)
            n += marked
        if n:
            self.events.warning("claims_abandoned", instance=inst.id, name=inst.name, slots=n)
            self.drain()

    def filters(self, inst: Instance) -> list[dict[str, int]]:
        """The drop filters this instance's ring has in force (floods of junk)."""
        return self.ring_of(inst.id).filters()

    def watch(self, instances: list[Instance]) -> None:
        """The sweep's look at a batch of instances: their drop filters, then their rings."""
        self.watch_filters(instances)
        self.watch_rings(instances)

    def watch_filters(self, instances: list[Instance]) -> None:
        """A receiver sets and clears its drop filters itself, in shared memory, where the
        event log cannot see it: the host looks now and then (the machine's poll, every 0.1 s) and
        logs each change as ``ipi_filter_set`` / ``ipi_filter_cleared``. The values are what
        the instance wrote: logged as read, never acted on."""
        for inst in instances:
            now = {(f["sender"], f["type"]) for f in self.ring_of(inst.id).filters()}
            before = self._filters_seen.get(inst.id, set())
            for sender, mtype in sorted(now - before):
                self._log("ipi_filter_set", inst.id, inst.name, sender=sender, msg_type=mtype)
            for sender, mtype in sorted(before - now):
                self._log("ipi_filter_cleared", inst.id, inst.name, sender=sender,
                          msg_type=mtype)
            if now:
                self._filters_seen[inst.id] = now
            else:
                self._filters_seen.pop(inst.id, None)

    def watch_rings(self, instances: list[Instance]) -> None:
        """Every 0.1 s (the machine's poll): the host's ring is drained if anything waits in it (a
        claim that was never published is reclaimed by the drain after its bound, and only a
        drain gets there); each instance's own resets and every stalled ring are logged. What
        an instance reports is logged as read."""
        if self.ring.head != self.ring.tail:
            self.drain()
        now = time.monotonic()
        for iid, name, ring in [(HOST_ID, "host", self.ring)] + \
                [(i.id, i.name, self.ring_of(i.id)) for i in instances]:
            ticket = ring.stalled()
            seen = self._stalled.get(iid)
            if ticket is not None and seen is not None and seen[0] == ticket:
                self._wake_to_reclaim(iid, now - seen[1], now)
                if not seen[2] and now - seen[1] > STALL_REPORT_S:
                    self._log("ring_jammed", iid, name, ticket=ticket,
                              waiting_s=round(now - seen[1], 3))
                    jammed = self.table.by_id(iid)
                    if jammed is not None:
                        jammed.count("ring_jams")
                    self._stalled[iid] = (ticket, seen[1], True)     # once per episode
            elif ticket is not None:
                # another ticket: the jammed claim is gone (the tail moved past it), and this
                # look caught the next sender mid-write, as a busy or loaded machine often
                # does; the episode ends here, or its end would never be logged
                if seen is not None and seen[2]:
                    self._reclaim_rung.pop(iid, None)
                    self._log("ring_unjammed", iid, name)
                self._stalled[iid] = (ticket, now, False)
            elif seen is not None:
                del self._stalled[iid]
                self._reclaim_rung.pop(iid, None)
                if seen[2]:
                    self._log("ring_unjammed", iid, name)
        for inst in instances:
            resets = self.arena.own(inst.id).ring_resets
            logged = self._resets_seen.get(inst.id, 0)
            if resets != logged:
                self._resets_seen[inst.id] = resets
                self._log("ring_reset", inst.id, inst.name, resets=resets)

    def _wake_to_reclaim(self, iid: int, stalled_s: float, now: float) -> None:
        """A claim unpublished at a ring's tail for longer than its receiver's abandon_after
        is reclaimed only by a drain, and a tickless receiver drains only when rung: ring it,
        once every RECLAIM_WAKE_S while the stall lasts (its own clock for the claim may have
        started later than ours). A claimer that died before it wrote its id leaves such a
        claim, which no sweep can name (models/healing.pml, healing/no-stall-doorbell). The
        host's own ring is drained here every 0.1 s anyway."""
        inst = self.table.by_id(iid) if iid != HOST_ID else None
        if inst is None or inst.doorbell_fd is None or stalled_s <= RECLAIM_WAKE_S \
                or now - self._reclaim_rung.get(iid, 0.0) < RECLAIM_WAKE_S:
            return
        self._reclaim_rung[iid] = now
        inst.count("reclaim_wakes")
        ring_doorbell(inst.doorbell_fd)

    def _log(self, event: str, iid: int, name: str, **fields: Any) -> None:
        """Log an event an instance's writes into shared memory can cause, at most once per
        ``LOG_INTERVAL_S`` per (event, instance): what it could repeat as fast as it writes
        must not fill the run directory's tmpfs. The next one says how many were held back."""
        key = (event, iid)
        now = time.monotonic()
        last, held = self._logged.get(key, (-LOG_INTERVAL_S, 0))
        if now - last < LOG_INTERVAL_S:
            self._logged[key] = (last, held + 1)
            return
        self._logged[key] = (now, 0)
        extra = {"suppressed": held} if held else {}
        level = "info" if event in ("ipi_filter_cleared", "ring_unjammed") else "warning"
        getattr(self.events, level)(event, instance=iid, name=name, **fields, **extra)

    def counters(self, inst: Instance) -> dict[str, int]:
        """What the instance and its ring report (untrusted: plain integers, shown as read)."""
        ring = self.ring_of(inst.id).counters()
        slot = self.arena.own(inst.id).counts()
        return {
            "ipi_sent": slot["ipi_sent"], "ipi_received": ring["received"],
            "ipi_ring_full": slot["ipi_ring_full"], "ipi_esrch": slot["ipi_esrch"],
            "ipi_dropped_bad_size": ring["dropped_bad_size"],
            "ipi_dropped_unknown_type": ring["dropped_unknown_type"],
            "ipi_dropped_abandoned": ring["dropped_abandoned"],
            "ipi_doorbells": ring["doorbells"], "ipi_dropped_filtered": ring["dropped_filtered"],
            "heartbeats_sent": slot["heartbeats_sent"], "ipi_ring_resets": slot["ring_resets"],
            "forged_commands": slot["forged_commands"],
        }


class HostBells:
    """The host's doorbells: its own (it reads ``fd``; instances hold ``ring``, a pipe's write
    end, which rings and cannot be read: linux.host_doorbell), and those of a dead host that
    adopted instances still ring (host/adoption.py). Any of them rung: the host drains."""

    def __init__(self, reactor: Reactor, drain: Callable[[], None]) -> None:
        self.reactor = reactor
        self.drain = drain
        self.fd, self.ring = linux.host_doorbell()
        self.extra: list[int] = []
        self.ids: set[int] = set()             # the pipes of ``extra`` (their inodes)
        reactor.watch(self.fd, "host-doorbell", None, lambda _: self._rung(self.fd))

    def add(self, fd: int, ident: int | None) -> None:
        """An old host doorbell an adopted instance rings: watched from now on."""
        self.reactor.watch(fd, "host-doorbell", None, lambda _: self._rung(fd))
        self.extra.append(fd)
        if ident is not None:
            self.ids.add(ident)

    def _rung(self, fd: int) -> None:
        linux.doorbell_clear(fd)
        self.drain()

    def close(self) -> None:
        """Close every descriptor (the reactor's selector is closed first, or already)."""
        os.close(self.fd)
        os.close(self.ring)
        for fd in self.extra:
            os.close(fd)
