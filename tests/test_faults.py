"""Fault injection, detection and recovery with real processes."""

import json
import os
import select
import time

import pytest
from helpers import CPUS, up, wait_until

from partition import InvalidSpec, NotLoaded
from partition.abi import message as M

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them



def last_failure(m, name):
    wait_until(m, lambda: m.show(name)["last_failure"] is not None)
    return m.show(name)["last_failure"]


def test_kill_is_detected_as_crash(machine):
    up(machine, "v")
    machine.fault("v", "kill")
    f = last_failure(machine, "v")
    assert f["kind"] == "crash" and f["fault"] == "kill"
    assert f["detect_ms"] is not None and f["detect_ms"] >= 0
    assert machine.show("v")["state"] == "loaded"      # policy none: the real system's behaviour


def test_the_failure_record_comes_before_what_can_wait(machine):
    """Issue 20: from the pidfd's notice the host first classifies the exit and makes the
    failure record; the cgroup's sweep (freeze, kill, thaw), the events and the views come
    after it, each still done."""
    up(machine, "v")
    inst = machine.instances["v"]
    seen = []
    sweep = machine.cgroups.kill

    def kill_watching(instance_id, **kw):       # the real sweep, noting what was recorded
        seen.append(len(inst.failures))
        return sweep(instance_id, **kw)
    machine.cgroups.kill = kill_watching
    try:
        machine.fault("v", "kill")
        f = last_failure(machine, "v")
    finally:
        machine.cgroups.kill = sweep
    assert seen and seen[0] == 1                    # recorded before the sweep began
    assert f["recorded_ms"] >= f["detect_ms"] >= 0
    events = [json.loads(line)["event"] for line in open(os.path.join(machine.run_dir,
                                                                      "events.log"))]
    assert events.index("instance_exit") < events.index("failure")   # both, in their order
    assert machine.show("v")["state"] == "loaded"


def test_a_death_is_handled_before_its_channels_hang_up(machine):
    """Issue 20: a process closes its descriptors just before its pidfd says it exited; when
    both are ready the host handles the death first (its record is timed to that handler), and
    the hang-up of the dead run's channel is no event of its own."""
    up(machine, "v")
    inst = machine.instances["v"]
    before = len(inst.failures)
    os.kill(inst.pid, 9)                        # a crash: not a fault the host injected
    select.select([inst.pidfd], [], [], 10)     # dead, and its channel hung up, before a turn
    machine.poll(0)                             # one turn handles it all
    assert inst.pid is None and len(inst.failures) == before + 1
    assert inst.failures[-1]["kind"] == "crash"
    assert [e for e in events(machine) if e["event"] == "channel_closed"] == []


def _holding(ns):
    """This process's descriptors that hold the namespace ``ns`` (a readlink of ns/mnt)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == ns:
                held.append(int(fd))
        except OSError:
            pass
    return held


def test_a_death_leaves_its_mount_namespace_to_the_host(machine):
    """Issue 20: a moment after a boot the host holds the run's mount namespace, so that its
    death is not the last reference (the teardown, an expedited RCU grace period of 0.05 ms to
    milliseconds, came before the pidfd's notice); it lets it go a moment after the failure's
    record, and every one when the machine closes."""
    up(machine, "v")
    inst = machine.instances["v"]
    pid = inst.pid
    ns = os.readlink(f"/proc/{pid}/ns/mnt")
    wait_until(machine, lambda: _holding(ns))
    os.kill(pid, 9)                             # a crash
    wait_until(machine, lambda: inst.pid is None)
    assert inst.failures[-1]["kind"] == "crash"
    assert _holding(ns)                         # held past the record
    wait_until(machine, lambda: not _holding(ns))
    up(machine, "w", cpu=CPUS[0])
    ns = os.readlink(f"/proc/{machine.instances['w'].pid}/ns/mnt")
    wait_until(machine, lambda: _holding(ns))
    machine.close()
    assert not _holding(ns)


def test_panic_is_detected_with_console_tail(machine):
    up(machine, "v")
    machine.fault("v", "panic")
    f = last_failure(machine, "v")
    assert f["kind"] == "panic" and "injected panic" in f["reason"]
    assert any("Kernel panic" in line for line in f["console_tail"])
    events = [json.loads(l) for l in open(os.path.join(machine.run_dir, "events.log"))]
    assert any(e["event"] == "halted_message" for e in events)


@pytest.mark.parametrize("kind", ["hang-stop", "hang-spin"])
def test_hangs_are_found_by_the_watchdog(machine, kind):
    up(machine, "v", watchdog=1.5)
    machine.request("v", M.MK_MSG_USER, "alive", timeout=5)
    machine.fault("v", kind)
    f = last_failure(machine, "v")
    assert f["kind"] == "hang" and f["fault"] == kind
    # the watchdog times the stall from the kernel's last progress, which an idle kernel makes
    # once per idle timeout (0.5 s): declared from watchdog - 0.5 s after the fault (the bound
    # scenarios/hang-watchdog.toml documents), never sooner
    assert f["detect_ms"] >= 1500 - 500
    assert machine.show("v")["state"] == "loaded"


def test_idle_instance_under_watchdog_is_not_declared_hung(machine):
    up(machine, "v", watchdog=1.5)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        machine.poll(0.05)
    assert machine.show("v")["state"] == "active" and machine.show("v")["failures"] == 0


def test_a_tickless_kernel_sleeps_until_rung_and_the_watchdog_rings_it_first(machine):
    """IdleKernel has no timer (idle_timeout None): its loop stands still until a doorbell. A
    watchdog rings it at half its period instead of calling it hung, and a stopped one is
    still caught."""
    up(machine, "t", "kernels.idle:IdleKernel")
    own = machine.arena.own(machine.show("t")["id"])
    wait_until(machine, lambda: machine.show("t")["waiting"], timeout=5)
    before = own.progress
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        machine.poll(0.05)
    assert own.progress == before                       # no lap: nothing woke it
    assert machine.show("t")["waiting"] and machine.show("t")["counters"]["watchdog_nudges"] == 0
    machine.send("t", M.MK_MSG_USER, "wake up")         # a doorbell: one lap at least
    wait_until(machine, lambda: own.progress != before, timeout=5)

    machine.update("t", watchdog=0.8)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        machine.poll(0.05)
    d = machine.show("t")
    assert d["state"] == "active" and d["failures"] == 0
    assert d["counters"]["watchdog_nudges"] >= 2
    machine.fault("t", "hang-stop")                     # rung, it cannot answer: hung
    f = last_failure(machine, "t")
    assert f["kind"] == "hang" and f["fault"] == "hang-stop"


def test_wild_write_with_protection_faults_in_the_offender(machine):
    victim = up(machine, "victim")
    up(machine, "bad", cpu=CPUS[0])
    before = machine.checksum("victim")
    machine.fault("bad", "wild-write", address=victim["memory_base"] + 128, bytes=64)
    f = last_failure(machine, "bad")
    assert f["kind"] == "panic" and "page fault" in f["reason"]
    assert machine.checksum("victim") == before
    assert machine.show("victim")["state"] == "active"


def test_wild_write_without_protection_corrupts_and_is_detected(machine_factory):
    m = machine_factory(cpus=CPUS, host_cpus=str(CPUS[0]), oversubscribe=True, memory="64M",
                        protection=False)
    victim = up(m, "victim")
    up(m, "bad", cpu=CPUS[0])
    before = m.checksum("victim")
    m.fault("bad", "wild-write", address=victim["memory_base"] + 128, bytes=64)
    wait_until(m, lambda: m.checksum("victim") != before)
    assert m.read_memory("victim", 128, 4) == b"\xde\xad\xbe\xef"
    assert m.show("bad")["state"] == "active"        # nothing stopped it: that is the point
    assert m.snapshot()["machine"]["protection"] is False
    # and the host knows who did it: the writer's page tables remember the write
    wait_until(m, lambda: m.show("victim")["foreign_writes"] == {"bad": 1})
    assert m.show("bad")["counters"]["wild_pages"] == 1
    assert m.show("victim")["counters"]["foreign_pages"] == 1


def test_own_writes_are_not_charged_and_a_multi_page_write_is(machine_factory):
    m = machine_factory(cpus=CPUS, host_cpus=str(CPUS[0]), oversubscribe=True, memory="64M",
                        protection=False)
    victim = up(m, "victim")
    bad = up(m, "bad", cpu=CPUS[0])
    m.fault("bad", "wild-write", address=bad["memory_base"] + 4096, bytes=3 * 4096)  # its own
    m.fault("bad", "wild-write", address=victim["memory_base"] + 4000, bytes=200)    # 2 pages
    wait_until(m, lambda: m.show("victim")["foreign_writes"].get("bad") == 2)
    m.kill("bad", force=True)         # the host scans a writer before it kills it
    assert m.show("bad")["foreign_writes"] == {}
    assert m.show("bad")["counters"]["wild_pages"] == 2
    events = [json.loads(line) for line in open(os.path.join(m.run_dir, "events.log"))]
    hits = [e for e in events if e["event"] == "foreign_write"]
    assert hits and all(e["victim"] == "victim" and e["name"] == "bad" for e in hits)


def test_ipi_storm_gets_back_pressure_and_victim_still_answers(machine):
    import signal
    victim = up(machine, "victim")
    up(machine, "storm", cpu=CPUS[0])
    os.kill(victim["pid"], signal.SIGSTOP)     # a victim that cannot drain: the ring must fill
    try:
        machine.fault("storm", "ipi-storm", target=victim["id"], count=20000)
        wait_until(machine, lambda: machine.show("storm")["counters"]["ipi_ring_full"] > 0, 30)
        ring = machine.ring_of(victim["id"])
        assert ring.head - ring.tail == ring.share       # the storm holds its fair share only
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    assert machine.request("victim", M.MK_MSG_USER, "still", timeout=10) == "still"
    wait_until(machine, lambda: machine.show("victim")["counters"]["ipi_dropped_unknown_type"] > 0)


def test_an_ipi_storm_of_junk_is_filtered_at_the_flooder(machine):
    """After the first few dozen messages the victim sets a drop filter for the storm: the
    flood goes on, dropped inside the flooder's own sends, without touching the victim's ring
    or doorbell, and the victim still answers others at once."""
    victim = up(machine, "victim")
    storm = up(machine, "storm", cpu=CPUS[0])
    machine.fault("storm", "ipi-storm", target=victim["id"], count=10_000_000)
    wait_until(machine, lambda: machine.show("victim")["counters"]["ipi_dropped_filtered"] > 1000,
               30)
    v = machine.show("victim")
    assert [(f["sender"], f["type"]) for f in v["ipi_filters"]] == [(storm["id"], M.MK_EMU_STORM)]
    c = v["counters"]
    assert c["ipi_dropped_unknown_type"] < 1000         # what reached the ring before the filter
    assert c["ipi_doorbells"] < 100
    assert machine.request("victim", M.MK_MSG_USER, "still", timeout=10) == "still"
    machine.kill("storm", force=True)
    wait_until(machine, lambda: any(e["event"] == "ipi_filter_set" for e in events(machine)))
    seen = [e for e in events(machine) if e["event"] == "ipi_filter_set"]
    assert [(e["name"], e["sender"], e["msg_type"]) for e in seen] == \
        [("victim", storm["id"], M.MK_EMU_STORM)]


def events(m):
    with open(os.path.join(m.run_dir, "events.log")) as f:
        return [json.loads(line) for line in f]


def test_cpu_hog_is_not_a_failure(machine):
    up(machine, "hog", watchdog=1.0)
    machine.fault("hog", "cpu-hog", seconds=2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:
        machine.poll(0.05)
    assert machine.show("hog")["state"] == "active" and machine.show("hog")["failures"] == 0


def test_mem_hog_fails_alone(machine):
    up(machine, "hog", cmdline="mk_heap=64M")
    up(machine, "other", cpu=CPUS[0])
    machine.fault("hog", "mem-hog")
    f = last_failure(machine, "hog")
    assert f["kind"] == "panic" and "MemoryError" in f["reason"]
    assert machine.request("other", M.MK_MSG_USER, 1, timeout=5) == 1


def test_restart_policy_brings_it_back(machine):
    up(machine, "db", recovery="restart", max_restarts=3, restart_window=10)
    machine.fault("db", "kill")
    wait_until(machine, lambda: machine.show("db")["counters"]["restarts"] == 1
               and machine.show("db")["state"] == "active")
    assert machine.request("db", M.MK_MSG_USER, "back", timeout=5) == "back"
    assert machine.show("db")["boots"] == 2


def test_restart_intensity_limit_ends_in_failed(machine):
    up(machine, "db", recovery="restart", max_restarts=2, restart_window=30)
    for n in (1, 2):
        machine.fault("db", "kill")
        wait_until(machine, lambda: machine.show("db")["counters"]["restarts"] == n
                   and machine.show("db")["state"] == "active")
    machine.fault("db", "kill")
    machine.wait_for("db", "failed", timeout=10)
    d = machine.show("db")
    assert "restart intensity exceeded" in d["failure"] and d["failures"] == 3


def test_update_validates_everything_first(machine):
    machine.create("db", cpus=str(CPUS[-1]), memory="4M")
    before = machine.show("db")["recovery"]
    for bad in ({"recovery": "pray"}, {"max_restarts": -1}, {"restart_window": 0},
                {"watchdog": -1}, {"recovery": "restart", "max_restarts": "x"}):
        with pytest.raises(InvalidSpec):
            machine.update("db", **bad)
        assert machine.show("db")["recovery"] == before
    d = machine.update("db", recovery="restart", watchdog=2)
    assert d["recovery"]["policy"] == "restart" and d["recovery"]["watchdog"] == 2.0


def test_fault_refusals(machine):
    machine.create("v", cpus=str(CPUS[-1]), memory="4M")
    with pytest.raises(NotLoaded):
        machine.fault("v", "kill")
    with pytest.raises(InvalidSpec, match="unknown fault kind"):
        machine.fault("v", "meteor")
    with pytest.raises(InvalidSpec, match="needs address"):
        machine.fault("v", "wild-write")
    with pytest.raises(InvalidSpec, match="takes no option"):
        machine.fault("v", "kill", seconds=1)


def test_standby_takes_over_the_role(machine):
    primary = up(machine, "db", recovery="standby")
    up(machine, "db2", cpu=CPUS[0], standby_for="db")
    # a peer that addresses the primary's id: a ping instance sending requests to it
    assert machine.request("db", M.MK_MSG_USER, "primary", timeout=5) == "primary"
    machine.fault("db", "kill")
    wait_until(machine, lambda: machine.show("db")["served_by"] is not None)
    assert machine.show("db")["served_by"] == machine.show("db2")["id"]
    assert machine.request("db", M.MK_MSG_USER, "via role", timeout=5) == "via role"
    assert machine.show("db2")["counters"]["ipi_received"] >= 1
    # an instance addressing the dead primary's id reaches the standby as well
    machine.create("peer", cpus=str(CPUS[-1]), memory="4M")
    machine.load("peer", "kernels.echo:EchoKernel", f"role=ping target={primary['id']} count=20")
    machine.exec("peer")
    from kernels.echo import RESULTS, read_results
    wait_until(machine, lambda: read_results(machine.read_memory("peer", 0, RESULTS.size))[0])
    assert read_results(machine.read_memory("peer", 0, RESULTS.size))[1] == 20
    # the primary, booted again, serves its own role
    machine.exec("db")
    assert machine.show("db")["served_by"] is None


def test_standby_for_must_name_an_instance(machine):
    before = machine.snapshot()["pool"]
    with pytest.raises(Exception, match="standby_for names no instance"):
        machine.create("s", cpus=str(CPUS[-1]), memory="4M", standby_for="ghost")
    assert [i["name"] for i in machine.snapshot()["instances"]] == []
    assert machine.snapshot()["pool"] == before


def test_restart_scrubs_the_partition_unless_preserved(machine):
    from kernels.counter import read_count
    for preserve in (False, True):
        name = f"c{int(preserve)}"
        up(machine, name, "kernels.counter:CounterKernel", "interval=0.001", recovery="restart",
           preserve_memory=preserve)
        wait_until(machine, lambda: read_count(machine.read_memory(name, 0, 24)) >= 20)
        machine.fault(name, "kill")
        wait_until(machine, lambda: machine.show(name)["counters"]["restarts"] == 1
                   and machine.show(name)["state"] == "active")
        # active means the boot CPU answered; boot() prints after that: wait for the second
        # run's own line, not the first run's
        def boot_lines():
            return [l for l in machine.console(name).splitlines() if "resuming at count" in l]
        wait_until(machine, lambda: len(boot_lines()) >= 2)
        boots = boot_lines()
        resumed = int(boots[-1].rsplit(" ", 1)[1])
        assert (resumed >= 20) if preserve else (resumed == 0), (preserve, boots)
        machine.kill(name, force=True)


@pytest.mark.alone      # times itself (0.1 s)
def test_messages_to_a_dead_peer_fail_at_once(machine):
    import errno
    from partition.abi.ring import RingError
    d = up(machine, "v")
    machine.fault("v", "kill")
    machine.wait_for("v", "loaded")
    t0 = time.monotonic()
    with pytest.raises(RingError) as ei:
        machine.send("v", M.MK_MSG_USER, 1)
    assert ei.value.errno == errno.ESRCH and time.monotonic() - t0 < 0.1
    peer_state = machine.arena.peer(d["id"]).peer_state
    assert peer_state == 2        # the peer-state table says loaded: every peer sees it


def test_a_fault_that_cannot_be_sent_changes_nothing(machine):
    import errno

    from partition import ResourceBusy
    from partition.abi.ring import RingError
    up(machine, "deaf", os.path.join(os.path.dirname(__file__), "kernels", "ipi.py") + ":Deaf")
    while True:                         # fill its ring: it never drains
        try:
            machine.send("deaf", M.MK_MSG_USER, b"x")
        except RingError as exc:
            assert exc.errno == errno.ENOSPC
            break
    before = machine.show("deaf")
    with pytest.raises(ResourceBusy) as ei:
        machine.fault("deaf", "panic")
    assert "could not be sent" in str(ei.value)
    after = machine.show("deaf")
    assert after["counters"]["faults_injected"] == before["counters"]["faults_injected"] == 0
    assert machine.instances["deaf"].pending_fault is None
    machine.kill("deaf", force=True)
    assert machine.show("deaf")["failures"] == 0      # the forced halt is no injected fault
