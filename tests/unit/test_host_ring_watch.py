"""The host's look at stalled rings (host/hostipc.py ``watch_rings``) against fake rings: when a
jam is reported, and that its end is, whatever the next look at the ring catches."""

from host_fakes import FakeArena, FakeEvents

from partition.host.hostipc import STALL_REPORT_S, HostIPC
from partition.host.table import InstanceTable


class Ring:
    """A ring as the host sees it from outside: the ticket an unpublished claim holds at its
    tail, if any."""

    def __init__(self) -> None:
        self.head = self.tail = 0
        self.at_tail: int | None = None

    def stalled(self) -> int | None:
        return self.at_tail


def _watcher() -> tuple[HostIPC, Ring, FakeEvents]:
    """A HostIPC holding only what ``watch_rings`` reads (no arena is mapped)."""
    ipc = object.__new__(HostIPC)
    ring, events = Ring(), FakeEvents()
    ipc.ring, ipc.table, ipc.arena, ipc.events = ring, InstanceTable(), FakeArena(), events
    ipc._stalled, ipc._reclaim_rung, ipc._logged, ipc._resets_seen = {}, {}, {}, {}
    return ipc, ring, events


def _jam(ipc: HostIPC, ring: Ring, ticket: int) -> None:
    """A claim at ``ticket`` that stays past STALL_REPORT_S, seen twice: reported."""
    ring.at_tail = ticket
    ipc.watch_rings([])
    since = ipc._stalled[0][1]
    ipc._stalled[0] = (ticket, since - 2 * STALL_REPORT_S, False)
    ipc.watch_rings([])


def test_a_jam_is_reported_once_and_its_end_when_the_ring_is_clear():
    ipc, ring, events = _watcher()
    _jam(ipc, ring, 5)
    ipc.watch_rings([])
    assert len(events.named("ring_jammed")) == 1 and not events.named("ring_unjammed")
    ring.at_tail = None
    ipc.watch_rings([])
    assert len(events.named("ring_unjammed")) == 1


def test_a_jams_end_is_reported_when_the_next_look_finds_a_sender_mid_write():
    """The flake of test_hostile.py::test_a_claim_never_published_is_reclaimed under load: the
    jam was reclaimed, and the next look found the next message claimed but not yet published
    (another ticket at the tail). The episode had ended; its end was never logged."""
    ipc, ring, events = _watcher()
    _jam(ipc, ring, 5)
    ring.at_tail = 6                                 # a sender mid-write, one ticket on
    ipc.watch_rings([])
    assert len(events.named("ring_unjammed")) == 1
    ring.at_tail = None
    ipc.watch_rings([])
    assert len(events.named("ring_unjammed")) == 1   # one end per episode
    assert len(events.named("ring_jammed")) == 1
