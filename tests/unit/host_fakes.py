"""Fakes for the unit tests of the host's decisions: a clock that moves when told, an OS port
that records the calls it gets, an event log, a publisher and an arena of plain objects.
Nothing here starts a process, maps shared memory or touches a cgroup."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from partition.host.instance import Instance, Phase, State


class FakeClock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeOS:
    """Records every call; kills and signals are never sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def kill(self, pid: int, sig: int) -> None:
        self.calls.append(("kill", (pid, sig)))

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        self.calls.append(("pidfd_send_signal", (pidfd, sig)))

    def sched_setaffinity(self, pid: int, cpus: Any) -> None:
        self.calls.append(("sched_setaffinity", (pid, list(cpus))))

    def ring_doorbell(self, fd: int) -> None:
        self.calls.append(("ring_doorbell", (fd,)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


class FakeEvents:
    def __init__(self) -> None:
        self.said: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.said.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.said.append(("warning", event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.said if e == event]


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[Instance | None] = []
        self.transitions: list[tuple[str, State, str]] = []

    def transition(self, inst: Instance, new: State, cause: str, old: State | None = None,
                   **fields: Any) -> None:
        inst.state = new
        self.transitions.append((inst.name, new, cause))
        self.published.append(inst)

    def publish(self, inst: Instance | None = None) -> None:
        self.published.append(inst)


@dataclass
class Own:
    """An instance's own page, as the host reads it."""

    progress: int = 0
    heartbeats_sent: int = 0
    kho_out: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    kho_flags: int = 0
    kho_declared: int = 0
    kho_count: int = 0
    kho_in: list[tuple[str, int, int, int]] | None = None

    def kho_entries(self, out: bool = False) -> list[tuple[bytes, int, int, int]]:
        return list(self.kho_out) if out else []

    def write_kho(self, entries: list[tuple[str, int, int, int]], out: bool = False) -> None:
        self.kho_in = list(entries)


@dataclass
class Peer:
    redirect: int = 0
    peer_state: int = 0
    pid: int = 0
    cmd_seq: int = 0
    generation: int = 0


class FakeArena:
    """An arena of plain objects: own and peer pages by id, and a bytearray for the bytes."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.map = bytearray(size)
        self.owns: dict[int, Own] = {}
        self.peers: dict[int, Peer] = {}
        self.scrubbed: list[tuple[int, int]] = []

    def own(self, iid: int) -> Own:
        return self.owns.setdefault(iid, Own())

    def peer(self, iid: int) -> Peer:
        return self.peers.setdefault(iid, Peer())

    def scrub(self, base: int, size: int) -> None:
        self.scrubbed.append((base, size))
        self.map[base:base + size] = bytes(size)

    def read(self, base: int, size: int) -> bytes:
        return bytes(self.map[base:base + size])


def instance(iid: int = 1, name: str = "a", cpus: list[int] | None = None,
             memory_base: int = 0, memory_bytes: int = 64 << 10, **fields: Any) -> Instance:
    cpus = [1] if cpus is None else cpus
    inst = Instance(id=iid, name=name, cpus=cpus, physical_cpus=list(cpus),
                    memory_base=memory_base, memory_bytes=memory_bytes)
    for k, v in fields.items():       # (a run's fields are the run's: set there)
        setattr(inst.run if hasattr(inst.run, k) else inst, k, v)
    if inst.pid is not None:
        inst.run.phase = Phase.RUNNING
    return inst
