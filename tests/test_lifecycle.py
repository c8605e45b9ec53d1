"""Life cycle of instances on an in-process machine, with real processes and real pinning."""

import errno
import json
import os
import resource
import signal
import time

import psutil
import pytest

from helpers import no_descriptor_leaked, settled, wait_until
from kernels.counter import read_count
from partition import (BadKernelImage, BootTimeout, BootFailed, Machine, NoSuchInstance,
                       ResourceBusy)

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them


def boot(m: Machine, name: str, kernel: str = "kernels.idle:IdleKernel", cmdline: str = "",
         cpus: str | None = None, memory: str = "16M") -> dict:
    m.create(name, cpus=cpus or str(m.config.cpus[-1]), memory=memory)
    m.load(name, kernel, cmdline)
    return m.exec(name)


def test_exec_pins_process_to_instance_cores(machine):
    for cpu in machine.config.cpus:
        d = boot(machine, f"k{cpu}", cpus=str(cpu))
        assert d["state"] == "active"
        assert psutil.Process(d["pid"]).cpu_affinity() == [cpu]
        assert d["cpus"] == [cpu]


def test_full_state_machine_and_views(machine):
    name = "a"
    d = machine.create(name, cpus=str(machine.config.cpus[-1]), memory="16M")
    assert d["state"] == "ready"
    status = os.path.join(machine.run_dir, "sys/fs/multikernel/instances/a/status")
    kimage = os.path.join(machine.run_dir, "proc/kimage")
    assert open(status).read() == "ready\n"
    assert open(kimage).read() == "No kimages loaded\n"
    assert machine.load(name, "kernels.idle:IdleKernel")["state"] == "loaded"
    lines = open(kimage).read().splitlines()
    assert lines[0] == "MK_ID  Type        Start Address   Segments"
    assert lines[1] == "-----  ----------  --------------  --------"     # kerf splits on it
    assert lines[2] == "%5d  %-10s  0x%012lx  %8lu" % (d["id"], "multikernel", d["memory_base"], 1)
    iomem = open(os.path.join(machine.run_dir, "proc/iomem")).read().splitlines()
    pool = machine.show()["pool"]
    assert iomem[0] == "%08x-%08x : Multikernel Memory Pool" % (
        pool["memory_base"], pool["memory_base"] + pool["memory_bytes"] - 1)
    assert iomem[1] == "  %08x-%08x : mk-instance-%d-a-region-0" % (
        d["memory_base"], d["memory_base"] + d["memory_bytes"] - 1, d["id"])
    a = machine.exec(name)
    assert a["state"] == "active" and a["pid"]
    assert open(status).read() == "active\n"
    k = machine.kill(name)
    assert k["state"] == "loaded" and k["pid"] is None
    assert k["last_exit"]["how"] == "graceful"
    assert machine.unload(name)["state"] == "ready"
    assert machine.delete(name)["state"] == "empty"
    assert not os.path.exists(os.path.dirname(status))
    assert open(kimage).read() == "No kimages loaded\n"
    events = [json.loads(l) for l in open(os.path.join(machine.run_dir, "events.log"))]
    changes = [(e["old"], e["new"]) for e in events if e["event"] == "state_change"]
    assert changes == [("empty", "ready"), ("ready", "loaded"), ("loaded", "active"),
                       ("active", "loaded"), ("loaded", "ready"), ("ready", "empty")]


@pytest.mark.parametrize("verb,state,prep", [
    ("exec", "ready", []),
    ("kill", "ready", []),
    ("unload", "ready", []),
    ("load", "loaded", ["load"]),
    ("delete", "loaded", ["load"]),
    ("delete", "active", ["load", "exec"]),
    ("unload", "active", ["load", "exec"]),
    ("exec", "active", ["load", "exec"]),
])
def test_illegal_transitions_are_refused_without_change(machine, verb, state, prep):
    machine.create("x", cpus=str(machine.config.cpus[-1]), memory="16M")
    for p in prep:
        if p == "load":
            machine.load("x", "kernels.idle:IdleKernel")
        else:
            machine.exec("x")
    before = machine.show("x")
    with pytest.raises(ResourceBusy) as ei:
        if verb == "load":
            machine.load("x", "kernels.idle:IdleKernel")
        else:
            getattr(machine, verb)("x")
    assert f"is {state}" in str(ei.value) and "needs state" in str(ei.value)
    assert ei.value.hint
    after = machine.show("x")
    assert settled(after) == settled(before)


def test_outside_sigkill_is_detected_and_recorded(machine):
    d = boot(machine, "victim")
    os.kill(d["pid"], signal.SIGKILL)
    rec = machine.wait_for("victim", "loaded", timeout=5)
    assert rec["last_exit"]["how"] == "killed"
    assert rec["last_exit"]["signal_name"] == "SIGKILL"
    assert "not sent by the host" in rec["last_exit"]["reason"]
    assert rec["pid"] is None
    assert f"Instance {d['id']} (victim) halted, CPUs parking in pool" in machine.console("host")
    assert not psutil.pid_exists(d["pid"]) or psutil.Process(d["pid"]).status() != "zombie"


def test_console_readable_after_death(machine):
    d = boot(machine, "c", kernel="kernels.counter:CounterKernel", cmdline="interval=0.001 report=10")
    deadline = time.monotonic() + 5
    while "count=10" not in machine.console("c") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(d["pid"], signal.SIGKILL)
    machine.wait_for("c", "loaded")
    text = machine.console("c")
    assert "counter kernel: boot 1" in text and "count=10" in text


def test_partition_survives_reboot_and_delete_scrubs(machine):
    boot(machine, "c", kernel="kernels.counter:CounterKernel", cmdline="interval=0.001")
    deadline = time.monotonic() + 5
    while read_count(machine.read_memory("c", 0, 24)) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    machine.kill("c")
    n = read_count(machine.read_memory("c", 0, 24))
    assert n >= 5
    machine.exec("c")     # returns once the boot CPU answered; boot() prints just after
    deadline = time.monotonic() + 10
    while f"resuming at count {n}" not in machine.console("c") and time.monotonic() < deadline:
        machine.poll(0.01)
    assert f"resuming at count {n}" in machine.console("c")
    machine.kill("c", force=True)
    machine.unload("c")
    base = machine.show("c")["memory_base"]
    machine.delete("c")
    assert machine.arena.read(base, 24) == bytes(24)


def test_graceful_kill_falls_back_to_force_after_timeout(machine, misbehaving):
    boot(machine, "s", misbehaving + ":Stubborn")
    t0 = time.monotonic()
    r = machine.kill("s", timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    assert r["state"] == "loaded"
    assert r["last_exit"]["how"] == "forced"
    assert "not acknowledged" in r["last_exit"]["reason"]


def test_force_kill_is_immediate_and_idempotent(machine):
    boot(machine, "f")
    r = machine.kill("f", force=True)
    assert r["last_exit"]["how"] == "forced" and r["state"] == "loaded"
    again = machine.kill("f", force=True)     # loaded + --force: allowed, no-op
    assert again["state"] == "loaded" and again["last_exit"] == r["last_exit"]


def test_panic_is_recorded_with_reason_and_console(machine, misbehaving):
    boot(machine, "p", misbehaving + ":CrashInTick")
    rec = machine.wait_for("p", "loaded")
    assert rec["last_exit"]["how"] == "panic"
    assert "ZeroDivisionError" in rec["last_exit"]["reason"]
    text = machine.console("p")
    assert "Oops" in text and "Traceback" in text and "Kernel panic - not syncing" in text


def test_voluntary_halt(machine, misbehaving):
    boot(machine, "h", misbehaving + ":Halter")
    rec = machine.wait_for("h", "loaded")
    assert rec["last_exit"]["how"] == "voluntary"
    assert rec["last_exit"]["reason"] == "work finished"


def test_panic_during_boot_hook(machine, misbehaving):
    # the trampoline answers the mailbox; the kernel's boot hook then panics: exec waits for
    # boot() and reports the panic, with its reason, as a failure
    with pytest.raises(BootFailed) as ei:
        boot(machine, "pb", misbehaving + ":PanicAtBoot")
    assert "failed in boot(): panic: test panic at boot" in str(ei.value)
    rec = machine.wait_for("pb", "loaded")
    assert rec["last_exit"]["reason"] == "panic: test panic at boot"
    assert rec["counters"]["failures"] == 1 and rec["last_failure"]["kind"] == "panic"
    # it never came up: a boot failure (it was a crash only), said in an event
    assert rec["counters"]["boot_failures"] == 1 and rec["counters"]["crashes"] == 1
    with open(machine.events.path) as f:
        assert any('"died_in_boot"' in line and '"pb"' in line for line in f)


def test_exec_without_wait_answers_at_the_mailbox(machine, misbehaving):
    # the real system's semantics: active as soon as the boot CPU answered
    machine.create("pb", cpus=str(machine.config.cpus[-1]), memory="16M")
    machine.load("pb", misbehaving + ":PanicAtBoot")
    r = machine.exec("pb", wait=False)        # no BootFailed: the mailbox was answered
    assert r["boots"] == 1            # (it may already be loaded again: boot() panics at once)
    rec = machine.wait_for("pb", "loaded")
    assert rec["last_exit"]["reason"] == "panic: test panic at boot"


def test_boot_cpu_that_never_answers_marks_failed(machine_factory):
    m = machine_factory(cpus=sorted(os.sched_getaffinity(0)), host_cpus="0", oversubscribe=True,
                        memory="64M", boot_timeout=0.3)
    m.create("z", cpus=str(m.config.cpus[-1]), memory="16M")
    m.load("z", "kernels.idle:IdleKernel", "mk_debug=stall_boot")
    with pytest.raises(BootTimeout) as ei:
        m.exec("z")
    assert "did not answer the spawn mailbox" in str(ei.value)
    d = m.show("z")
    assert d["state"] == "failed" and d["pid"] is None
    assert "spawn mailbox" in d["failure"]
    # the instance can be retried once its image behaves: unload, load, exec
    m.unload("z")
    m.load("z", "kernels.idle:IdleKernel")
    assert m.exec("z")["state"] == "active"


def test_bad_kernel_specs_are_refused_at_load(machine, tmp_path):
    machine.create("k", cpus=str(machine.config.cpus[-1]), memory="16M")
    notkernel = tmp_path / "notkernel.py"
    notkernel.write_text("class Foo:\n    pass\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import does_not_exist_anywhere\n")
    for spec, words in [
        ("no.such.module:K", "does not import"),
        ("kernels.idle:NoSuchClass", "has no attribute"),
        ("kernels.idle:Kernel", "base class"),
        (str(notkernel) + ":Foo", "is not a kernel"),
        (str(notkernel), "defines 0 kernel classes"),
        (str(broken), "does not import"),
        (str(tmp_path / "missing.py"), "does not exist"),
        ("", "empty kernel spec"),
    ]:
        with pytest.raises(BadKernelImage) as ei:
            machine.load("k", spec)
        assert machine.show("k")["state"] == "ready", spec
        assert words in str(ei.value), (spec, str(ei.value))


def test_a_kernel_that_does_not_import_is_refused_with_its_line(machine, tmp_path):
    """A SyntaxError names the file, the line and the line's text; an import that raises names
    the kernel's own line, not importlib's; a file with two kernels says how to name one."""
    machine.create("k", cpus=str(machine.config.cpus[-1]), memory="16M")
    bad = tmp_path / "kv.py"
    bad.write_text("from partition import Kernel\n\nclass KV(Kernel)\n    pass\n")
    with pytest.raises(BadKernelImage) as ei:
        machine.load("k", str(bad))
    assert f"at {bad}:3: class KV(Kernel)" in ei.value.message, ei.value.message
    assert ei.value.hint == f"correct line 3 of {bad}"
    bad.write_text("from partition import Kernel\nimport does_not_exist_anywhere\n")
    with pytest.raises(BadKernelImage) as ei:
        machine.load("k", str(bad))
    assert f"at {bad}:2: import does_not_exist_anywhere" in ei.value.message
    two = tmp_path / "two.py"
    two.write_text("from partition import Kernel\n\nclass A(Kernel):\n    pass\n\n"
                   "class B(Kernel):\n    pass\n")
    with pytest.raises(BadKernelImage) as ei:
        machine.load("k", str(two))
    assert ei.value.hint == f"name one: {two}:A"
    assert machine.show("k")["state"] == "ready"


def test_kernel_by_path_boots(machine, misbehaving):
    boot(machine, "w", misbehaving + ":Scribbler")
    deadline = time.monotonic() + 5
    while "scribbled" not in machine.console("w") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert machine.read_memory("w", 0, 8) == b"SCRIBBLE"
    assert machine.read_memory("w", 16 * 2**20 - 4, 4) == b"TAIL"


def test_instance_holds_only_its_own_handles_and_mappings(machine):
    a = boot(machine, "a", memory="16M")
    b = boot(machine, "b", memory="32M")
    pid = a["pid"]
    fds = os.listdir(f"/proc/{pid}/fd")
    # stdin/out/err on /dev/null + own doorbell (a pipe, read and written: linux.doorbell) +
    # host doorbell (a pipe's write end) + its doorbell channel
    assert len(fds) == 6, fds
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
    assert not any("eventfd" in t for t in targets), targets
    assert sum("pipe" in t for t in targets) == 2
    assert sum("socket" in t for t in targets) == 1
    assert not any("memfd" in t for t in targets), targets
    arena_maps = {}
    for line in open(f"/proc/{pid}/maps"):
        if "mk-arena" in line:
            rng, perms, off = line.split()[:3]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            arena_maps[(int(off, 16), hi - lo)] = perms[:2]
    lay = machine.layout
    expected = {(a["memory_base"], a["memory_bytes"]): "rw",
                (lay.console_at(a["id"]), lay.console_bytes): "rw",
                (lay.control_offset, lay.peer_table_bytes): "r-",   # the host's word: read only
                (lay.table_offset, 512 * 256): "r-",                # instance table: peer names
                (lay.own_at(a["id"]), 4096): "rw",                  # its own page, nobody else's
                (lay.ring_offset, lay.ring_area_bytes): "rw"}       # IPI rings: shared by design
    assert arena_maps == expected
    assert (b["memory_base"], b["memory_bytes"]) not in set(arena_maps)


def test_unknown_instance(machine):
    with pytest.raises(NoSuchInstance) as ei:
        machine.exec("ghost")
    assert "no instance named 'ghost'" in str(ei.value)


def test_instances_die_with_their_host(machine_factory, tmp_path):
    """A host killed with SIGKILL must not leave pinned instances behind (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    script = tmp_path / "host.py"
    script.write_text(
        "import os, sys, time\n"
        "from partition import Machine\n"
        "m = Machine(cpus=sorted(os.sched_getaffinity(0)), host_cpus='0', oversubscribe=True, memory='64M')\n"
        "m.create('a', cpus='0', memory='16M'); m.load('a', 'kernels.idle:IdleKernel')\n"
        "print(m.exec('a')['pid'], m.run_dir, flush=True)\n"
        "time.sleep(60)\n")
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_dir = None
    try:
        line = host.stdout.readline().split()
        if len(line) != 2:
            host.wait(30)
            pytest.fail(f"host script failed: {host.stderr.read()}")
        pid, run_dir = line
        host.kill()
        host.wait()
        deadline = time.monotonic() + 5
        while psutil.pid_exists(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not psutil.pid_exists(int(pid))
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
        host.stderr.close()
        if run_dir:
            import shutil
            shutil.rmtree(run_dir, ignore_errors=True)
        from partition.host import cgroups
        cgroups.reap_stale()            # what mkctl shutdown of a stale machine does too


def test_boot_failure_when_trampoline_cannot_pin(machine_factory):
    """An instance whose CPU vanished from the host's reach fails at boot and says why."""
    cpus = sorted(os.sched_getaffinity(0))
    m = machine_factory(cpus=cpus, host_cpus=str(cpus[0]), oversubscribe=True, memory="64M")
    m.create("gone", cpus=str(cpus[-1]), memory="16M")
    m.load("gone", "kernels.idle:IdleKernel")
    # white-box: simulate an offlined CPU, which took the parked process with it
    m.loading.forget_parked(m.instances["gone"])
    m.instances["gone"].cpus = [4095]
    with pytest.raises(BootFailed):
        m.exec("gone")
    d = m.show("gone")
    assert d["state"] == "failed" and "trampoline" in d["failure"]


# -- the zygote (guest/zygote.py) -------------------------------------------------------------
def events_of(m: Machine, kind: str) -> list[dict]:
    with open(os.path.join(m.run_dir, "events.log")) as f:
        return [e for e in map(json.loads, f) if e.get("event") == kind]


def test_instances_come_from_the_zygote_as_children_of_the_host(machine):
    """Forked by a small process, yet the host's children: the host reaps them and reads how
    they died, as when it forked them itself."""
    d = boot(machine, "a")
    z = machine.zygote
    assert z is not None and z.alive()
    proc = psutil.Process(d["pid"])
    assert proc.ppid() == os.getpid() != z.proc.pid
    assert z.proc.pid not in [p.pid for p in proc.parents()]
    machine.kill("a", force=True)
    assert machine.show("a")["last_exit"]["signal_name"] == "SIGKILL"


def test_a_zygote_that_died_is_replaced_at_the_next_load(machine):
    boot(machine, "a")
    first = machine.zygote
    first.proc.kill()
    first.proc.wait()
    d = boot(machine, "b", cpus=str(machine.config.cpus[0]))
    assert d["state"] == "active" and machine.zygote is not first and machine.zygote.alive()
    assert events_of(machine, "zygote_died")


def test_without_the_zygote_the_host_forks_instances_itself(machine_factory, monkeypatch):
    monkeypatch.setenv("MK_ZYGOTE", "0")
    m = machine_factory(cpus=sorted(os.sched_getaffinity(0)), host_cpus="0", oversubscribe=True,
                        memory="64M")
    d = boot(m, "a")
    assert m.zygote is None and psutil.Process(d["pid"]).ppid() == os.getpid()


def test_a_zygote_that_cannot_fork_is_dropped_and_the_host_forks(machine, monkeypatch):
    """A failed spawn closes that zygote (a late answer must never be read as the next
    request's) and the load goes on with a fork of the host's own; the next load makes a new
    zygote."""
    from partition.errors import ZygoteError
    from partition.guest import zygote

    boot(machine, "a")
    first = machine.zygote

    def refuse(self, params):
        raise ZygoteError("refused for the test")
    monkeypatch.setattr(zygote.Zygote, "spawn", refuse)
    d = boot(machine, "b", cpus=str(machine.config.cpus[0]))
    assert d["state"] == "active" and psutil.Process(d["pid"]).ppid() == os.getpid()
    assert machine.zygote is None and not first.alive()
    assert events_of(machine, "zygote_failed")
    monkeypatch.undo()
    machine.create("c", cpus=str(machine.config.cpus[-1]), memory="16M")
    machine.load("c", "kernels.idle:IdleKernel")
    assert machine.zygote is not None and machine.zygote.alive()


def test_the_zygote_passes_an_environment_that_is_not_utf8(machine_factory, monkeypatch):
    monkeypatch.setenv(b"MK_TEST_BYTES".decode(), os.fsdecode(b"\xff\xfe"))
    m = machine_factory(cpus=sorted(os.sched_getaffinity(0)), host_cpus="0", oversubscribe=True,
                        memory="64M")
    d = boot(m, "a")                   # (a title over the environment hides it from /proc)
    assert d["state"] == "active" and m.zygote is not None and m.zygote.alive()
    assert not events_of(m, "zygote_failed")


def test_deferred_state_drops_the_record_of_an_instance_deleted_and_named_again(machine_factory):
    """Under the daemon the state is written once per verb: a delete and a create of the same
    name in one batch must still remove the deleted instance's record (a stale record would be
    adopted in its place, and the live instance refused and killed)."""
    from partition.host import adoption
    m = machine_factory(cpus=sorted(os.sched_getaffinity(0)), host_cpus="0", oversubscribe=True,
                        memory="64M", survive_host=True)
    m.defer_state = True
    m.create("a", cpus="1", memory="4M")
    m.create("x", cpus="1", memory="4M")
    m.flush_state()
    ids = {name: m.show(name)["id"] for name in ("a", "x")}
    m.delete("x")
    m.delete("a")
    m.create("x", cpus="1", memory="4M")
    m.flush_state()
    records = sorted(os.listdir(adoption.records_path(m.run_dir)))
    assert records == [f"{m.show('x')['id']}.json"], (ids, records)
    assert [r["name"] for r in adoption.read_state(m.run_dir)["instances"]] == ["x"]


def test_a_zygote_lost_after_a_request_fails_that_load_cleanly(machine, monkeypatch):
    """When the zygote may have forked (it stopped answering after the request went), the load
    fails with a clear error rather than forking a second process for the same instance; the
    instance can be loaded again, through a new zygote."""
    from partition.errors import ZygoteError
    from partition.guest import zygote

    boot(machine, "a")

    def lost(self, params):
        raise zygote._sent(ZygoteError("lost for the test", "retry"))
    monkeypatch.setattr(zygote.Zygote, "spawn", lost)
    machine.create("b", cpus=str(machine.config.cpus[0]), memory="16M")
    with pytest.raises(ZygoteError):
        machine.load("b", "kernels.idle:IdleKernel")
    assert machine.zygote is None and machine.show("b")["state"] == "ready"
    monkeypatch.undo()
    machine.load("b", "kernels.idle:IdleKernel")
    assert machine.exec("b")["state"] == "active" and machine.zygote.alive()


def test_a_load_that_runs_out_of_descriptors_leaves_none_open(machine):
    """EMFILE part-way through the descriptors a spawn opens (near 511 instances): what it
    had opened is closed, the instance stays ready and loads once descriptors are free. The
    doorbell, two descriptors since it became a pipe, was opened first and leaked when the
    socket pair after it failed."""
    boot(machine, "warm")                   # the zygote runs: the load opens only its own
    # (and the host holds the warm run's namespace, a moment after its boot: lifecycle.py)
    wait_until(machine, lambda: machine.lifecycle.when_due() is None)
    machine.create("v", cpus=str(machine.config.cpus[-1]), memory="16M")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with no_descriptor_leaked():
        before = sorted(os.listdir("/proc/self/fd"))
        filler: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, before)) + 64, hard))
        try:
            try:
                while True:
                    filler.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
            for _ in range(3):                  # room for the doorbell, none for what follows it
                os.close(filler.pop())
            with pytest.raises(OSError) as e:
                machine.load("v", "kernels.idle:IdleKernel")
            assert e.value.errno == errno.EMFILE
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert machine.show("v")["state"] == "ready"
    assert machine.load("v", "kernels.idle:IdleKernel")["state"] == "loaded"
