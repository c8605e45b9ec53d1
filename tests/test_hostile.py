"""A hostile kernel attacks the host, a bystander and unrelated processes; each attack harms
nothing but its author and is visible (an event, a failure record, or a refusal that names it).
The kernel is tests/kernels/hostile.py; every test keeps a bystander echo instance and checks
after the attack that it still answers, unchanged, and that the host process is whole."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import CPUS, up, wait_until

from partition import BadKernelImage, linux
from partition.abi import message as M

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTILE = os.path.join(HERE, "kernels", "hostile.py") + ":Hostile"


def notes(m, name):
    raw = m.read_memory(name, 0, 4096)
    n = int.from_bytes(raw[:4], "little")
    return raw[4:4 + n].decode()


def events(m):
    with open(os.path.join(m.run_dir, "events.log")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def pair(machine):
    """A bystander that answers, and a hostile instance booted with ``attack=``."""
    by = up(machine, "by", cpu=CPUS[-1])

    def attack(what, **extra):
        cmd = f"attack={what} " + " ".join(f"{k}={v}" for k, v in extra.items())
        return up(machine, "evil", HOSTILE, cmd, cpu=CPUS[-1])
    yield attack, by
    # the bystander answers, and is the same process it was
    assert machine.request("by", M.MK_MSG_USER, "still here", timeout=5) == "still here"
    assert machine.show("by")["pid"] == by["pid"] \
        and machine.show("by")["boots"] == by.get("boots", 1)


def dies_of_sigsys(machine):
    rec = machine.wait_for("evil", "loaded", timeout=10)
    assert rec["last_exit"]["signal_name"] == "SIGSYS"
    assert "a system call no instance may make" in rec["last_exit"]["reason"]
    assert any(e["event"] == "forbidden_syscall" for e in events(machine))
    assert rec["last_failure"]["kind"] == "crash"


def test_signalling_the_host_kills_the_signaller(machine, pair):
    attack, _ = pair
    attack("signal-host")
    dies_of_sigsys(machine)
    assert psutil.Process().is_running()           # the host (this process) is whole


def test_even_the_ipi_signal_by_kill_is_refused(machine, pair):
    attack, _ = pair
    attack("ipi-signal-host")
    dies_of_sigsys(machine)


def test_the_peer_table_is_the_hosts_word(machine, pair):
    attack, by = pair
    attack("forge-peer", target=by["id"])
    wait_until(machine, lambda: "redirect:" in notes(machine, "evil"))
    said = notes(machine, "evil")
    for field in ("peer_state", "force_halt", "redirect"):
        assert f"{field}: TypeError: cannot modify read-only memory" in said
    peer = machine.arena.peer(by["id"])
    assert (peer.force_halt, peer.redirect) == (0, 0)


def test_a_raw_store_into_the_peer_table_faults_in_its_author(machine, pair):
    attack, by = pair
    attack("forge-peer-raw", target=by["id"])
    rec = machine.wait_for("evil", "loaded", timeout=10)
    assert rec["last_exit"]["signal_name"] == "SIGSEGV"
    assert machine.arena.peer(by["id"]).force_halt == 0


def test_garbage_in_its_own_page_is_only_displayed(machine, pair):
    attack, _ = pair
    attack("garbage-own-page")
    rec = machine.wait_for("evil", "loaded", timeout=10)
    assert rec["last_exit"]["how"] == "voluntary"
    assert len(rec["last_exit"]["reason"]) <= 128       # clamped, decoded with replacement
    assert rec["progress"] == 2 ** 64 - 1               # shown as read, acted on by nobody


def test_the_hosts_descriptors_are_out_of_reach(machine, pair):
    attack, _ = pair
    attack("host-fds")
    wait_until(machine, lambda: "open host fd:" in notes(machine, "evil"))
    said = notes(machine, "evil")
    assert "list host fds: FileNotFoundError" in said     # /proc is an empty tmpfs in there
    assert "open host fd: FileNotFoundError" in said


def test_host_files_cannot_be_written(machine, pair):
    attack, _ = pair
    attack("write-files")
    wait_until(machine, lambda: "write run dir:" in notes(machine, "evil"))
    said = notes(machine, "evil")
    assert "write /etc: OSError: [Errno 30] Read-only file system" in said
    assert not os.path.exists("/etc/mk-hostile")


@pytest.mark.parametrize("what", ["repin", "sched-fifo", "pidfd-getfd", "fork-and-exit",
                                  "setown-signal", "prlimit-host", "socket", "flock",
                                  "clone-namespaces"])
def test_what_the_real_machine_forbids_kills_the_kernel(machine, pair, what):
    attack, _ = pair
    attack(what)
    dies_of_sigsys(machine)
    assert os.sched_getaffinity(0) == set(CPUS)        # nothing moved the host


def test_memory_past_the_partition_is_bounded(machine, pair):
    attack, _ = pair
    attack("memfd-hog")
    # the memory cgroup's OOM killer ends it: the partition (4M) + heap + allowance, not 1 GiB
    rec = machine.wait_for("evil", "loaded", timeout=60)
    assert rec["last_exit"]["signal_name"] == "SIGKILL"
    assert "killed by its memory limit" in rec["last_exit"]["reason"]
    assert any(e["event"] == "memory_limit_exceeded" for e in events(machine))
    assert "memfd 1 GiB: ok" not in notes(machine, "evil")
    assert rec["last_failure"]["kind"] == "crash"


def test_the_arena_cannot_be_resized_by_anyone(machine):
    import fcntl
    with pytest.raises(PermissionError):
        os.ftruncate(machine.arena.fd, 4096)
    seals = fcntl.fcntl(machine.arena.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW


@pytest.mark.alone      # the host must see the jam (0.5 s) before its claim is dropped (1 s)
@pytest.mark.parametrize("victim", ["by", "host"])
def test_a_claim_never_published_is_reclaimed(machine, pair, victim):
    attack, by = pair
    target = by["id"] if victim == "by" else 0
    attack("jam-ring", target=target, **{"as": by["id"] if victim == "host" else 0})
    wait_until(machine, lambda: "jam:" in notes(machine, "evil"))
    assert "jam: ok" in notes(machine, "evil")
    # the host asks the bystander: its question (ring "by") or its answer (ring 0) waits
    # behind the jam, until the receiver drops the claim (abandon_after: 1 s)
    assert machine.request("by", M.MK_MSG_USER, "through", timeout=5) == "through"
    ring = machine.ring_of(target)
    assert ring.counters()["dropped_abandoned"] == 1
    wait_until(machine, lambda: any(e["event"] == "ring_unjammed" for e in events(machine)))
    ev = [e for e in events(machine) if e["event"] in ("ring_jammed", "ring_unjammed")]
    assert [e["event"] for e in ev] == ["ring_jammed", "ring_unjammed"]
    assert ev[0]["instance"] == target
    if victim == "by":
        assert machine.show("by")["counters"]["ring_jams"] == 1     # mkctl show says so too


@pytest.mark.parametrize("victim", ["by", "host"])
def test_a_garbage_ring_header_is_reset_by_its_owner(machine, pair, victim):
    attack, by = pair
    target = by["id"] if victim == "by" else 0
    attack("garbage-header", target=target)
    wait_until(machine, lambda: "garbage header:" in notes(machine, "evil"))
    wait_until(machine, lambda: any(e["event"] == "ring_reset" and e["instance"] == target
                                    for e in events(machine)))
    assert machine.request("by", M.MK_MSG_USER, "after", timeout=5) == "after"
    if victim == "by":
        assert machine.show("by")["counters"]["ipi_ring_resets"] == 1
        assert "own ring reset, its header was garbage" in machine.console("by")
    assert machine.ring_of(target).header_problem() is None


def test_import_time_code_never_runs_in_the_host(machine, tmp_path):
    import sys as _sys
    k = tmp_path / "sly.py"
    k.write_text("import os, signal\n"
                 "IMPORTED_IN = os.getpid()\n"
                 "from partition import Kernel\n"
                 "class Sly(Kernel):\n    pass\n")
    machine.create("sly", cpus=str(CPUS[-1]), memory="4M")
    r = machine.load("sly", f"{k}:Sly")
    assert r["state"] == "loaded" and r["kernel"].endswith(":Sly")
    assert not any(getattr(mod, "IMPORTED_IN", None) is not None
                   for mod in list(_sys.modules.values()))        # not imported here


def test_hostile_import_time_code_fails_the_load_alone(machine, tmp_path):
    k = tmp_path / "assassin.py"
    k.write_text("import os, signal\n"
                 "os.kill(os.getppid(), signal.SIGKILL)\n"     # the host, at import time
                 "from partition import Kernel\n"
                 "class K(Kernel):\n    pass\n")
    machine.create("a", cpus=str(CPUS[-1]), memory="4M")
    with pytest.raises(Exception) as ei:
        machine.load("a", f"{k}:K")
    assert "did not load" in str(ei.value) or "loader" in str(ei.value)
    assert machine.show("a")["state"] == "ready"
    assert any(e["event"] == "loader_exit" for e in events(machine))
    assert psutil.Process().is_running()


SPIN = "def spin(*_):\n    while True:\n        pass\n"
RUNS_AT_IMPORT = {
    "_thread": "import _thread\n_thread.start_new_thread(spin, ())\n",
    "hidden-thread": "import threading\nthreading.Thread(target=spin, daemon=True).start()\n"
                     "threading.active_count = lambda: 1\n",
    "timer": "import signal\nsignal.signal(signal.SIGALRM, spin)\n"
             "signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)\n",
}


@pytest.mark.parametrize("how", sorted(RUNS_AT_IMPORT))
def test_an_image_that_runs_before_start_is_refused(machine, tmp_path, how):
    """Red team: a thread started at import with ``_thread`` passed the loader's
    ``threading.active_count()`` check; the instance showed ``loaded`` while its process burnt
    99% of a CPU. The host counts the process's real threads, and the loader refuses timers."""
    k = tmp_path / "early.py"
    k.write_text(SPIN + RUNS_AT_IMPORT[how] + "from partition import Kernel\n"
                 "class K(Kernel):\n    pass\n")
    machine.create("e", cpus=str(CPUS[-1]), memory="4M")
    with pytest.raises(BadKernelImage) as ei:
        machine.load("e", f"{k}:K")
    assert ei.value.errno == errno.ENOEXEC
    assert ("armed a timer" if how == "timer" else "thread(s)") in ei.value.message
    assert "not at import" in ei.value.hint
    d = machine.show("e")
    assert d["state"] == "ready" and d["pid"] is None and machine.instances["e"].parked is None
    if how != "timer":
        assert any(e["event"] == "image_not_inert" and e["name"] == "e" for e in events(machine))
    if machine.cgroups.mode is not None:
        assert machine.cgroups.members(d["id"]) == []


def test_a_hook_set_at_import_does_not_run_the_parked_image(machine, tmp_path):
    """A trace hook set at import would run the image's code under the loader's own, after
    its checks (here: a thread started as the loader parks). It is taken back: the parked
    process burns nothing, and the kernel starts as any other."""
    k = tmp_path / "hooked.py"
    k.write_text(SPIN + "import _thread, sys\n"
                 "def hook(frame, event, arg):\n"
                 "    if event == 'call' and frame.f_code.co_name == '_park':\n"
                 "        _thread.start_new_thread(spin, ())\n"
                 "sys.settrace(hook)\n"
                 "from partition import Kernel\nclass K(Kernel):\n    pass\n")
    machine.create("h", cpus=str(CPUS[-1]), memory="4M")
    assert machine.load("h", f"{k}:K")["state"] == "loaded"
    parked = psutil.Process(machine.instances["h"].parked.pid)
    before = sum(parked.cpu_times()[:2])
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        machine.poll(0.05)
    assert parked.num_threads() == 1
    assert sum(parked.cpu_times()[:2]) - before < 0.1        # parked, not running
    assert machine.start("h")["state"] == "active"
    machine.kill("h", force=True)


def test_a_saturated_host_doorbell_harms_no_bystander(machine, pair):
    attack, by = pair
    attack("saturate-host-doorbell")
    for i in range(20):            # the bystander answers (and rings the host) all the while
        assert machine.request("by", M.MK_MSG_USER, i, timeout=5) == i
    wait_until(machine, lambda: "saturate:" in notes(machine, "evil"))
    assert machine.show("by")["failures"] == 0


def test_a_channel_shut_by_its_instance_does_not_spin_the_host(machine, pair):
    attack, _ = pair
    attack("close-channel")
    wait_until(machine, lambda: any(e["event"] == "channel_closed" for e in events(machine)))
    t0 = time.process_time()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        machine.poll(0.05)
    assert time.process_time() - t0 < 0.5          # the host is idle again, not spinning


def test_a_flood_of_halted_messages_is_counted_not_logged(machine, pair):
    attack, _ = pair
    attack("halted-flood")
    wait_until(machine, lambda: "halted flood:" in notes(machine, "evil"), timeout=15)
    logged = [e for e in events(machine) if e["event"] == "halted_message"]
    assert len(logged) <= 1
    assert machine.show("evil")["counters"]["halted_msgs"] > 100
    assert os.path.getsize(os.path.join(machine.run_dir, "events.log")) < 1 << 20


def test_the_hosts_sysv_memory_is_out_of_reach(machine, pair):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x4D4B5400 + os.getpid() % 256
    shm = libc.shmget(key, 4096, 0o600 | 0o1000)        # IPC_CREAT, as some host service would
    assert shm >= 0
    try:
        attack, _ = pair
        attack("sysv-shm", key=key)
        wait_until(machine, lambda: "shmget:" in notes(machine, "evil"))
        assert "shmget: FileNotFoundError: [Errno 2]" in notes(machine, "evil")  # its own IPC ns
    finally:
        libc.shmctl(shm, 0, None)                        # IPC_RMID


def test_a_forged_loader_report_is_refused(machine, tmp_path):
    k = tmp_path / "liar.py"
    k.write_text("import os\n"
                 "for fd in range(3, 64):\n"
                 "    try:\n"
                 "        os.write(fd, b'{\"ok\": true, \"label\": ' + b'[' * 5000 + b']' * 5000 + b'}')\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "os._exit(0)\n")
    machine.create("l", cpus=str(CPUS[-1]), memory="4M")
    with pytest.raises(Exception) as ei:
        machine.load("l", f"{k}")
    assert type(ei.value).__name__ == "BadKernelImage"
    assert machine.show("l")["state"] == "ready"


def test_host_commands_from_a_peer_are_refused(machine, pair):
    attack, by = pair
    attack("forge-commands", target=by["id"], base=by["memory_base"])
    wait_until(machine, lambda: "raw shutdown" in notes(machine, "evil").split("\n")[-2])
    wait_until(machine, lambda: machine.show("by")["counters"]["forged_commands"] >= 5)
    assert machine.request("by", M.MK_MSG_USER, "alive", timeout=5) == "alive"
    d = machine.show("by")
    assert d["state"] == "active" and d["boots"] == 1 and d["failures"] == 0
    assert machine.read_memory("by", 0, 64) != b"\xde\xad\xbe\xef" * 16
    assert "not from the host, ignored" in machine.console("by")
    # the host's own commands still work: a graceful kill is a SHUTDOWN
    assert machine.kill("evil", timeout=5)["last_exit"]["how"] == "graceful"


def test_an_ipi_signal_flood_coalesces(machine, pair):
    # the doorbell a peer is legitimately given, rung as fast as it goes: the signal is a
    # standard one (pending once) and an instance's RLIMIT_SIGPENDING is small, so the
    # bystander keeps answering (with SIGRTMIN and root's budget, the red team saw 4 s stalls)
    attack, by = pair
    attack("ipi-flood", target=by["id"], seconds=3)
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:
        assert machine.request("by", M.MK_MSG_USER, "x", timeout=2) == "x"
    wait_until(machine, lambda: "flood:" in notes(machine, "evil"))
    assert "flood: ok" in notes(machine, "evil")


def test_a_host_command_replayed_into_the_next_run_is_refused(machine, pair):
    attack, by = pair
    machine.kill("by", timeout=5)              # the host's SHUTDOWN, command 1 of that run
    machine.start("by")
    by["pid"] = machine.show("by")["pid"]      # (the fixture's own check: same process after)
    by["boots"] = 2
    attack("replay-shutdown", target=by["id"])
    wait_until(machine, lambda: machine.show("by")["counters"]["forged_commands"] >= 2)
    assert machine.request("by", M.MK_MSG_USER, "still", timeout=5) == "still"
    assert machine.show("by")["state"] == "active"


@pytest.mark.parametrize("what", ["renice-all", "fanotify"])
def test_shared_root_budgets_are_out_of_reach(machine, pair, what):
    attack, _ = pair
    attack(what)
    dies_of_sigsys(machine)


def test_a_forged_filter_never_holds_back_the_host(machine, pair):
    attack, by = pair
    attack("filter-host", target=by["id"])
    wait_until(machine, lambda: "filter host:" in notes(machine, "evil"))
    # the bystander resets the forged table, and the host's SHUTDOWN gets through meanwhile
    d = machine.kill("by", timeout=5)
    assert d["last_exit"]["how"] == "graceful"
    machine.start("by")
    by["pid"], by["boots"] = machine.show("by")["pid"], 2


def test_a_forged_halted_does_not_make_a_bystander_look_halted(machine, pair):
    attack, by = pair
    attack("forge-halted", target=by["id"])
    wait_until(machine, lambda: "halted as by:" in notes(machine, "evil"))
    machine.poll(0.2)
    assert not any(e["event"] == "halted_message" and e["name"] == "by" for e in events(machine))
    assert machine.show("by")["state"] == "active"


def test_garbage_in_the_hosts_ring_cannot_flood_the_event_log(machine, pair):
    attack, _ = pair
    attack("host-ring-garbage")
    wait_until(machine, lambda: "host ring garbage:" in notes(machine, "evil"), timeout=15)
    resets = [e for e in events(machine) if e["event"] == "ring_reset" and e["instance"] == 0]
    assert 1 <= len(resets) <= 5                                # about one a second
    assert os.path.getsize(os.path.join(machine.run_dir, "events.log")) < 256 << 10


@pytest.mark.alone      # times itself
def test_a_peer_cannot_swallow_a_bystanders_doorbell(machine):
    """A kernel reading, in a loop, the doorbell the host gives it for a peer: the peer's
    requests and its graceful kill are as quick as without it (with an eventfd every read
    swallowed a wake-up: the kill was "forced after 3013 ms", requests took 205-500 ms). The
    handle a sender gets rings and cannot be read."""
    by = up(machine, "by", cpu=CPUS[-1])
    up(machine, "evil", HOSTILE,          # stealing until the bystander is killed (or 6 s)
       f"attack=steal-doorbell target={by['id']} seconds=6 until=gone:{by['id']}", cpu=CPUS[0])
    wait_until(machine, lambda: "stealing" in notes(machine, "evil"))
    worst = 0.0
    for i in range(30):
        t0 = time.monotonic()
        assert machine.request("by", M.MK_MSG_USER, i, timeout=5) == i
        worst = max(worst, time.monotonic() - t0)
        machine.poll(0.01)            # the bystander goes back to sleep on its doorbell
    assert worst < 0.1, f"a request took {worst * 1000:.0f} ms"
    t0 = time.monotonic()
    rec = machine.kill("by", timeout=5)
    assert rec["last_exit"]["how"] == "graceful"
    assert time.monotonic() - t0 < 1.0
    wait_until(machine, lambda: "steal:" in notes(machine, "evil"), timeout=15)
    assert "steal: PermissionError" in notes(machine, "evil"), notes(machine, "evil")


def test_where_containment_cannot_run_the_doorbells_are_named_unprotected(machine_factory,
                                                                          monkeypatch):
    """On an architecture with no system call table here no namespace is made: an instance's
    /proc is not covered, and a peer can reopen a doorbell's ring end for reading. The host's
    event and the instance's console say so, naming the doorbells (the docs promised "ring
    only" unconditionally)."""
    monkeypatch.setattr(linux, "_NR", {})           # as on such an architecture
    m = machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True)
    m.use_zygote = False          # forked from here: the instance sees that architecture too
    said = [e for e in events(m) if e["event"] == "containment_unavailable"
            and e.get("what") == "namespaces"]
    assert said and "doorbells are not ring only" in said[0]["why"], said
    up(m, "v", "kernels.idle:IdleKernel")
    line = next((x for x in m.console("v").splitlines() if "not contained here" in x), "")
    assert "doorbells are not ring only" in line, m.console("v")


def test_resizing_a_bystanders_doorbell_kills_the_kernel(machine, pair):
    """A peer holds the write end of the bystander's doorbell pipe: F_SETPIPE_SZ on it would
    resize another instance's object (down to a page, up to pipe-max-size). Forbidden as
    F_SETOWN and the locks are: the kernel dies of SIGSYS, the bystander's doorbell is as
    it was (the pair fixture checks it still answers)."""
    attack, by = pair
    attack("resize-doorbell", target=by["id"])
    dies_of_sigsys(machine)
    assert "resize: ok" not in notes(machine, "evil")


def test_a_peer_that_blocks_and_fills_a_doorbell_stalls_no_sender(machine):
    """Every sender of a doorbell shares one file: a peer clears its O_NONBLOCK and fills the
    pipe of a target that cannot drain it (stopped: a hang). The host's watchdog rings the
    hung target at half its period: with a plain write it would wait in it for good; it rings
    with RWF_NOWAIT, takes a full pipe for rung, and declares the hang on time."""
    import signal as sig

    by = up(machine, "by", cpu=CPUS[-1], watchdog=3.0)
    machine.fault("by", "hang-stop")
    up(machine, "evil", HOSTILE, f"attack=block-doorbell target={by['id']} seconds=6",
       cpu=CPUS[0])
    wait_until(machine, lambda: "full" in notes(machine, "evil"))

    def stuck(*_):
        raise TimeoutError("the host is stuck (in a doorbell write?)")
    old = sig.signal(sig.SIGALRM, stuck)
    sig.setitimer(sig.ITIMER_REAL, 10)
    try:
        rec = machine.wait_for("by", "loaded", timeout=8)
    finally:
        sig.setitimer(sig.ITIMER_REAL, 0)
        sig.signal(sig.SIGALRM, old)
    assert rec["last_failure"]["kind"] == "hang"
    assert rec["counters"]["watchdog_nudges"] >= 1        # it was rung, into a full pipe
    assert any(e["event"] == "watchdog_expired" for e in events(machine))


@pytest.mark.alone      # times itself
def test_a_peer_cannot_swallow_the_hosts_doorbell(machine):
    """Every instance holds the host's doorbell to ring it; one that reads it in a loop
    swallowed the host's wake-ups (on an eventfd): a boot, which the host waits for on its
    doorbell, then waited for the host's next timer. The ring end cannot be read."""
    up(machine, "evil", HOSTILE,          # stealing until the six boots are done (or 8 s)
       "attack=steal-host-doorbell seconds=8 until=booted:6", cpu=CPUS[0])
    wait_until(machine, lambda: "stealing" in notes(machine, "evil"))
    slowest = 0.0
    for i in range(6):
        machine.create(f"b{i}", cpus=str(CPUS[-1]), memory="4M")
        machine.load(f"b{i}", "kernels.echo:EchoKernel")
        machine.wait_for(f"b{i}", "loaded")
        t0 = time.monotonic()
        machine.exec(f"b{i}")
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 0.2, f"a boot took {slowest * 1000:.0f} ms"
    wait_until(machine, lambda: "steal host:" in notes(machine, "evil"), timeout=15)
    assert "steal host: PermissionError" in notes(machine, "evil"), notes(machine, "evil")
