"""IPIs and messages between real instances and the host."""

import errno
import json
import os
import struct
import time

import pytest
from helpers import CPUS, up, wait_until

from partition.abi import message as M
from partition.abi import ring as ring_mod
from partition.abi.ring import RingError
from ringtool import claim, fill, publish

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
IPI = os.path.join(HERE, "kernels", "ipi.py")


def collected(m, name):
    raw = m.read_memory(name, 0, 8 + 8 * 4096)
    n = struct.unpack_from("<I", raw, 0)[0]
    return [struct.unpack_from("<II", raw, 8 + 8 * i) for i in range(n)]


@pytest.mark.parametrize("mode", ["interrupt", "poll", "hybrid"])
def test_request_response_in_every_mode(machine, mode):
    up(machine, "echo", "kernels.echo:EchoKernel", f"mk_mode={mode}")
    for i in range(20):
        assert machine.request("echo", M.MK_MSG_USER, {"i": i}, timeout=5) == {"i": i}
    d = machine.show("echo")
    assert d["counters"]["ipi_received"] == 20 and d["counters"]["ipi_sent"] == 20


@pytest.mark.parametrize("mode", ["poll", "hybrid", "interrupt"])
def test_thousands_of_round_trips_between_instances_lose_nothing(machine, mode):
    """A receiver that looks at a slot while its sender is still writing it must never take a
    half-written header (a torn read dropped about one message in 10,000 as malformed)."""
    from kernels.echo import RESULTS, read_results
    echo = up(machine, "echo", "kernels.echo:EchoKernel", f"mk_mode={mode}")
    n = 5000
    up(machine, "ping", "kernels.echo:EchoKernel",
       f"role=ping target={echo['id']} count={n} mk_mode={mode}", cpu=CPUS[0],
       memory=str(max(4 << 20, (RESULTS.size + 8 * n + 4095) // 4096 * 4096)))
    wait_until(machine, lambda: read_results(machine.read_memory("ping", 0, RESULTS.size))[0]
               or machine.show("ping")["state"] != "active", timeout=120)
    assert machine.show("ping")["state"] == "active", machine.console("ping")[-600:]
    assert read_results(machine.read_memory("ping", 0, RESULTS.size))[1] == n
    c = machine.show("echo")["counters"]
    assert c["ipi_received"] == n and c["ipi_dropped_bad_size"] == 0


@pytest.mark.parametrize("batch", [1, 32])
def test_a_stream_arrives_whole_sent_one_by_one_or_in_batches(machine, batch):
    """``send_many`` (a Port publishing a batch in one call) against a ring of 64 slots: 3001
    messages, far more than fit, so batches are cut short by back pressure and resumed; the
    echo counts every one."""
    from kernels.echo import RESULTS, read_results
    echo = up(machine, "echo", "kernels.echo:EchoKernel", "mk_mode=hybrid")
    up(machine, "stream", "kernels.echo:EchoKernel",
       f"role=stream target={echo['id']} count=3001 batch={batch} mk_mode=hybrid", cpu=CPUS[0])
    wait_until(machine, lambda: read_results(machine.read_memory("stream", 0, RESULTS.size))[0]
               or machine.show("stream")["state"] != "active", timeout=60)
    assert read_results(machine.read_memory("stream", 0, RESULTS.size))[1] == 3001, \
        machine.console("stream")[-600:]
    c = machine.show("echo")["counters"]
    assert c["ipi_received"] == 3002 and c["ipi_dropped_bad_size"] == 0   # and the COUNT


def test_order_per_sender_and_no_loss_with_concurrent_senders(machine):
    up(machine, "sink", IPI + ":Collector", cpu=CPUS[-1], memory="4M")
    sink_id = machine.show("sink")["id"]
    n = 300
    senders = []
    for k in range(3):
        d = up(machine, f"s{k}", IPI + ":Sequencer", f"target={sink_id} count={n}",
               cpu=CPUS[k % len(CPUS)])
        senders.append(d["id"])
    wait_until(machine, lambda: len(collected(machine, "sink")) >= 3 * n, timeout=30)
    got = collected(machine, "sink")
    assert len(got) == 3 * n
    for sid in senders:
        seqs = [seq for s, seq in got if s == sid]
        assert seqs == list(range(n)), f"sender {sid} out of order or lossy"


def test_back_pressure_on_full_ring_and_third_party_unaffected(machine):
    up(machine, "deaf", IPI + ":Deaf")
    up(machine, "echo", "kernels.echo:EchoKernel", cpu=CPUS[0])
    sent = 0
    with pytest.raises(RingError) as ei:
        for _ in range(1000):
            machine.send("deaf", M.MK_MSG_USER, b"x" * 64)
            sent += 1
    assert ei.value.errno == errno.ENOSPC
    # one sender gets its fair share (7/8 of the ring), never the whole ring
    slots = machine.layout.ring_slots
    assert sent == slots - slots // 8 == machine.ring_of(machine.show("deaf")["id"]).share
    # the flooded instance's full ring does not stop another from answering
    assert machine.request("echo", M.MK_MSG_USER, "still here", timeout=5) == "still here"


def test_flooded_peer_still_answers_a_third_party(machine):
    """An instance flooding the echo gets ENOSPC back pressure; the host still gets answers."""
    echo = up(machine, "echo", "kernels.echo:EchoKernel")
    up(machine, "flood", "kernels.echo:EchoKernel",
       f"role=stream target={echo['id']} count=200000", cpu=CPUS[0])
    wait_until(machine, lambda: machine.show("flood")["counters"]["ipi_ring_full"] > 0, timeout=30)
    for i in range(20):
        assert machine.request("echo", M.MK_MSG_USER, i, timeout=10) == i
    assert machine.show("flood")["state"] == "active"


@pytest.mark.alone      # times itself
def test_oversize_and_bad_target(machine):
    up(machine, "echo", "kernels.echo:EchoKernel")
    with pytest.raises(RingError) as ei:
        machine.send("echo", M.MK_MSG_USER, b"x" * 5000)
    assert ei.value.errno == errno.EMSGSIZE
    machine.create("idle", cpus=str(CPUS[-1]), memory="4M")
    t0 = time.monotonic()
    with pytest.raises(RingError) as ei:
        machine.send("idle", M.MK_MSG_USER, 1)
    assert ei.value.errno == errno.ESRCH and time.monotonic() - t0 < 0.5


def test_corrupted_slots_are_dropped_and_counted(machine):
    up(machine, "echo", "kernels.echo:EchoKernel")
    ring = machine.ring_of(machine.show("echo")["id"])
    # a slot claiming more bytes than a slot holds
    off = fill(ring, claim(ring), 0, 0, M.MK_MSG_USER, b"garbage!")
    publish(ring, off, machine.layout.ring_slot_bytes + 1)
    # a slot whose bytes are not an mk_message
    off = fill(ring, claim(ring), 0, 0, M.MK_MSG_USER, b"\xff" * 40)
    publish(ring, off, 40)
    # a message of a type nobody handles
    machine.send("echo", 0x7777, "nobody")
    assert machine.request("echo", M.MK_MSG_USER, "ok", timeout=5) == "ok"
    c = machine.show("echo")["counters"]
    assert c["ipi_dropped_bad_size"] == 1
    assert c["ipi_dropped_unknown_type"] == 1


def test_sender_killed_mid_send_leaves_ring_usable(machine):
    up(machine, "echo", "kernels.echo:EchoKernel")
    echo_id = machine.show("echo")["id"]
    d = up(machine, "dies", IPI + ":DiesMidSend", f"target={echo_id}", cpu=CPUS[0])
    wait_until(machine, lambda: "stalling before publish" in machine.console("dies"))
    ring = machine.ring_of(echo_id)
    assert ring.head - ring.tail == 1         # the half-written claim blocks the ring's tail
    os.kill(d["pid"], 9)
    machine.wait_for("dies", "loaded")
    assert machine.request("echo", M.MK_MSG_USER, "after", timeout=5) == "after"
    assert machine.show("echo")["counters"]["ipi_dropped_abandoned"] == 1
    events = [json.loads(l) for l in open(os.path.join(machine.run_dir, "events.log"))]
    assert any(e["event"] == "claims_abandoned" and e["slots"] == 1 for e in events)


def test_ring_is_reset_on_respawn(machine):
    up(machine, "deaf", IPI + ":Deaf")
    for _ in range(5):
        machine.send("deaf", M.MK_MSG_USER, "stale")
    machine.kill("deaf", force=True)
    machine.exec("deaf")
    ring = machine.ring_of(machine.show("deaf")["id"])
    assert ring.head == ring.tail == 0


def test_graceful_halt_is_acknowledged(machine):
    up(machine, "echo", "kernels.echo:EchoKernel")
    r = machine.kill("echo", timeout=5)
    assert r["last_exit"]["how"] == "graceful"
    events = [json.loads(l) for l in open(os.path.join(machine.run_dir, "events.log"))]
    assert any(e["event"] == "shutdown_ack" for e in events)


def test_graceful_halt_ignored_then_forced(machine):
    up(machine, "deaf", IPI + ":Deaf")
    t0 = time.monotonic()
    r = machine.kill("deaf", timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    assert r["last_exit"]["how"] == "forced"


def test_halted_message_after_panic(machine):
    up(machine, "c", "kernels.counter:CounterKernel", "interval=0.001 panic_at=3")
    machine.wait_for("c", "loaded")
    events = [json.loads(l) for l in open(os.path.join(machine.run_dir, "events.log"))]
    halted = [e for e in events if e["event"] == "halted_message"]
    assert halted and "panic_at=3" in halted[0]["reason"]


def test_heartbeats_reach_the_host(machine):
    up(machine, "idle", "kernels.counter:CounterKernel", "interval=0.05")   # a loop that laps
    wait_until(machine, lambda: machine.show("idle")["counters"].get("heartbeats", 0) >= 2,
               timeout=10)
    assert machine.show("idle")["last_heartbeat"] is not None


def test_second_handler_is_refused_and_request_times_out(machine):
    machine.register_handler(0x4100, lambda msg: None)
    with pytest.raises(RingError) as ei:
        machine.register_handler(0x4100, lambda msg: None)
    assert ei.value.errno == errno.EEXIST
    up(machine, "echo", "kernels.echo:EchoKernel")
    with pytest.raises(RingError) as ei:
        machine.request("echo", 0x4999, None, timeout=0.3)     # nobody answers that type
    assert ei.value.errno == errno.ETIMEDOUT


def test_counters_in_sys_view(machine):
    up(machine, "echo", "kernels.echo:EchoKernel")
    for i in range(3):
        machine.request("echo", M.MK_MSG_USER, i, timeout=5)
    path = os.path.join(machine.run_dir, "sys/fs/multikernel/instances/echo/counters")
    machine.show()      # a look refreshes the views (the daemon also does it every second)
    lines = dict(line.split() for line in open(path))
    assert lines["ipi_received"] == "3" and lines["ipi_sent"] == "3"
    assert lines["ipi_dropped_bad_size"] == "0"


@pytest.mark.parametrize("mode", ["interrupt", "poll", "hybrid"])
def test_a_handler_can_make_a_request_of_its_own(machine, mode):
    """A chained RPC: the relay's handler waits for the echo's answer from inside its own
    drain (its response has to be delivered by a nested drain)."""
    echo = up(machine, "echo")
    relay = up(machine, "relay", kernel=os.path.join(HERE, "kernels", "relay.py") + ":Relay",
               cmdline=f"next={echo['id']} mk_mode={mode}", cpu=CPUS[0])
    for i in range(20):
        assert machine.request("relay", M.MK_MSG_USER, i, timeout=10) == [relay["id"], i]


@pytest.mark.parametrize("mode", ["poll", "hybrid", "interrupt"])
def test_a_kernels_request_times_out_or_fails_as_its_peer_does(machine, mode):
    """A kernel's own request in every mode (poll mode's send and first wait are one C call,
    Ring.waiter's ``ask``): answered; unanswered (ETIMEDOUT at its deadline, and the next
    request still answered); to a peer that dies on it (ESRCH, not the timeout)."""
    relay_py = os.path.join(HERE, "kernels", "relay.py")
    echo = up(machine, "echo")
    up(machine, "asker", kernel=relay_py + ":Asker",
       cmdline=f"next={echo['id']} mk_mode={mode}", cpu=CPUS[0])
    assert machine.request("asker", M.MK_MSG_USER, [M.MK_MSG_USER, "hi", 5.0],
                           timeout=10) == ["ok", "hi"]
    fast = ring_mod.IMPLEMENTATION == "c"
    assert machine.request("asker", M.MK_MSG_USER + 1, None, timeout=10) == \
        ("builtin_function_or_method" if fast else "method")
    t0 = time.monotonic()
    assert machine.request("asker", M.MK_MSG_USER, [0x4999, None, 0.3],
                           timeout=10) == ["error", "ETIMEDOUT"]
    assert 0.3 <= time.monotonic() - t0 < 5
    assert machine.request("asker", M.MK_MSG_USER, [M.MK_MSG_USER, 7, 5.0],
                           timeout=10) == ["ok", 7]
    machine.kill("asker", force=True)
    machine.unload("asker")
    machine.delete("asker")
    quitter = up(machine, "quitter", kernel=relay_py + ":Quitter")
    up(machine, "asker", kernel=relay_py + ":Asker",
       cmdline=f"next={quitter['id']} mk_mode={mode}", cpu=CPUS[0])
    t0 = time.monotonic()
    assert machine.request("asker", M.MK_MSG_USER, [M.MK_MSG_USER, "bye", 8.0],
                           timeout=15) == ["error", "ESRCH"]
    assert time.monotonic() - t0 < 8
