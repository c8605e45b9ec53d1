"""Kernel hand-over (host/kho.py) and live update (host/liveupdate.py).

Real machines, real kernel processes: a kernel preserves regions of its partition across a
restart, the host checks what it declared and scrubs the rest; a kernel's bytes changed from
outside make the next run panic; a running service is replaced ten times under request traffic
without losing a request or its count; a new image that dies in ``boot()`` is rolled back; a
bad image, a kernel that never quiesces, a peer forging SHUTDOWN with ``handover`` and flooding
the ring change nothing they should not. Kernels: tests/kernels/keeper.py (written for this
file), tests/kernels/stateful.py (Counter, CounterV2, Broken), tests/kernels/pingpong.py (Client).

The regressions at the end were bugs these tests found (state lost to messages taken during the
old kernel's shutdown, a refused image killing the running kernel, console lines overwritten,
KHO names the host refuses); each is fixed.
"""

import errno
import json
import os
import re
import signal
import time
import zlib

import pytest
from helpers import CPUS, mk, settled

from partition import BadKernelImage, BootFailed, InvalidSpec, NoSuchInstance, NotLoaded
from partition.abi import slot as S
from partition.host import lifecycle
from partition.host.instance import EXIT

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
KEEPER = os.path.join(HERE, "kernels", "keeper.py")
STATEFUL = os.path.join(HERE, "kernels", "stateful.py")
PINGPONG = os.path.join(HERE, "kernels", "pingpong.py")
COUNTER, COUNTER_V2, BROKEN, SLOWBOOT = (f"{STATEFUL}:{c}" for c in
                                         ("Counter", "CounterV2", "Broken", "SlowBoot"))
PAGE = 4096
PATTERN_A = bytes(range(256)) * 16          # as tests/kernels/keeper.py writes them
PATTERN_B = b"\xb5" * PAGE
COUNTS = re.compile(r"pingpong: asked (\d+) answered (\d+) lost (\d+) wrong (\d+)")
RESUMED = re.compile(r"counter v(\d): resumed at (\d+)")


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def m(machine_factory):
    """The service on the last CPU, its client on the first (the same one on a 1-CPU box)."""
    return machine_factory(cpus=",".join(map(str, CPUS[:2])), host_cpus="none",
                           oversubscribe=True, memory="256M")


def up(m, name, kernel, cmdline="", cpu=None, memory="4M"):
    m.create(name, cpus=str(CPUS[-1] if cpu is None else cpu), memory=memory)
    m.load(name, kernel, cmdline)
    m.start(name)
    return m.show(name)["id"]


def settle(m, seconds):
    """Drive the machine for ``seconds`` (the kernels run on their own meanwhile)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m.poll(min(0.01, max(0.0, end - time.monotonic())))


def wait_until(m, pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        m.poll(0.01)


def events(m, kind=None):
    with open(os.path.join(m.run_dir, "events.log")) as f:
        evs = [json.loads(line) for line in f if line.strip()]
    return [e for e in evs if kind is None or e["event"] == kind]


def counts(text):
    found = COUNTS.findall(text)
    return tuple(map(int, found[-1])) if found else (0, 0, 0, 0)


def handled(m, name="s"):
    """The count a stateful service saved in the first page of its partition at its last halt."""
    return int.from_bytes(m.read_memory(name, 8, 8), "little")


def service(m, kernel=COUNTER, interval="0.002"):
    """A service ``s`` and a pingpong client ``c`` asking it; returns the service's id once the
    client has had a few answers."""
    sid = up(m, "s", kernel)
    cid = up(m, "c", f"{PINGPONG}:Client", f"peer={sid} interval={interval}", cpu=CPUS[0])
    wait_until(m, lambda: m.arena.own(cid).ipi_sent >= 20, what="the client's first requests")
    return sid


def stop_client(m):
    """Halt the client gracefully; its last words are the final counts."""
    m.kill("c")
    assert m.show("c")["last_exit"]["how"] == "graceful"
    return counts(m.console("c"))


def entries(own, out=False):
    return [(raw.rstrip(b"\0").decode(), off, size, crc) for raw, off, size, crc in
            own.kho_entries(out=out)]


# -- 1. KHO across a plain restart ---------------------------------------------------------------
def test_kho_region_survives_a_restart_and_the_rest_is_scrubbed(m):
    kid = up(m, "k", f"{KEEPER}:Keeper")
    assert m.read_memory("k", PAGE, PAGE) == PATTERN_A
    assert m.read_memory("k", 2 * PAGE, PAGE) == PATTERN_B
    epoch = m.arena.peer(kid).epoch
    m.kill("k")
    cap = [e for e in events(m, "kho_captured") if e["name"] == "k"]
    assert cap[-1]["regions"] == [["a", PAGE, PAGE]] and cap[-1]["dropped"] == []
    assert cap[-1]["keep_rest"] is False

    m.start("k")
    assert m.console("k").strip().splitlines()[-1].endswith(f"keeper: restored {PATTERN_A[:8].hex()}")
    assert m.read_memory("k", PAGE, PAGE) == PATTERN_A          # preserved
    assert m.read_memory("k", 2 * PAGE, PAGE) == bytes(PAGE)    # scrubbed
    assert m.read_memory("k", 0, PAGE) == bytes(PAGE)
    assert entries(m.arena.own(kid)) == [("a", PAGE, PAGE, zlib.crc32(PATTERN_A))]
    assert entries(m.arena.own(kid), out=True) == []            # the table out starts empty
    assert events(m, "kho_handed_over")[-1]["scrubbed_rest"] is True
    assert m.arena.peer(kid).epoch == (epoch + 1) & 0xFFFFFFFF  # a plain boot: a new epoch

    # that run preserved nothing: the next one finds nothing handed over
    m.kill("k")
    m.start("k")
    assert m.console("k").strip().splitlines()[-1].endswith("keeper: fresh")
    assert m.arena.own(kid).kho_count == 0


def test_kho_keep_rest_keeps_the_whole_partition(m):
    up(m, "k", f"{KEEPER}:Keeper", "keep_rest=1")
    m.kill("k")
    assert [e for e in events(m, "kho_captured") if e["name"] == "k"][-1]["keep_rest"] is True
    m.start("k")
    assert "keeper: restored" in m.console("k")
    assert m.read_memory("k", PAGE, PAGE) == PATTERN_A
    assert m.read_memory("k", 2 * PAGE, PAGE) == PATTERN_B      # kept, not scrubbed
    assert events(m, "kho_handed_over")[-1]["scrubbed_rest"] is False


# -- 2. a hostile table out -----------------------------------------------------------------------
def test_kho_hostile_table_keeps_only_the_valid_entries(m):
    lid = up(m, "l", f"{KEEPER}:Lying", "declared=1000 flags=all")
    own = m.arena.own(lid)
    assert own.kho_declared == 1000                             # what it wrote: garbage
    m.kill("l")
    assert m.show("l")["state"] == "loaded" and m.show("l")["last_exit"]["how"] == "graceful"
    cap = [e for e in events(m, "kho_captured") if e["name"] == "l"][-1]
    assert cap["regions"] == [["good", 0, PAGE], ["second", 4 * PAGE, PAGE]]
    assert cap["keep_rest"] is True                             # bit 0 set among the junk
    dropped = cap["dropped"]
    assert len(dropped) == S.KHO_MAX - 2                        # 1000 declared, 16 read, 2 kept
    why = dict(d.split(": ", 1) for d in dropped if not d.startswith("''"))
    for name in ("'mis'", "'odd'", "'past'", "'far'", "'zero'"):
        assert "not page-aligned inside the partition" in why[name], name
    assert why["'over'"] == "it overlaps another preserved region"
    assert "its name is taken" in [d.split(": ", 1)[1] for d in dropped if d.startswith("'good'")]
    assert why["'a\\x00b'"].startswith("its name is not")
    assert why["'\\x01ctl'"].startswith("its name is not")
    assert any(d.startswith("'caf") and "its name is not" in d for d in dropped)
    assert sum(d.startswith("'':") for d in dropped) == 4       # empty name + 3 zeroed slots

    # the next run is handed the checked table only, CRCs of the bytes as the run left them
    m.start("l")
    assert entries(own) == [("good", 0, PAGE, zlib.crc32(PATTERN_A)),
                            ("second", 4 * PAGE, PAGE, zlib.crc32(PATTERN_B))]
    assert m.show("l")["state"] == "active"
    assert m.read_memory("l", 8 * PAGE, PAGE) == bytes(PAGE)    # keep_rest: nothing to lose
    m.kill("l")
    assert m.show("l")["last_exit"]["how"] == "graceful"


def test_kho_name_of_32_characters_is_dropped(m):
    lid = up(m, "l", f"{KEEPER}:LongName")
    m.kill("l")
    cap = [e for e in events(m, "kho_captured") if e["name"] == "l"][-1]
    assert cap["regions"] == [] and len(cap["dropped"]) == 1
    m.start("l")
    assert m.arena.own(lid).kho_count == 0


def test_kho_preserve_refuses_what_the_host_would_drop(m):
    m.create("k", cpus=str(CPUS[-1]), memory="4M")
    m.load("k", f"{KEEPER}:Keeper", "name=my%20state")
    try:
        m.start("k")
    except BootFailed as exc:          # refused at kho_preserve: the kernel learns at once
        assert "KHO name" in str(exc)
        return
    m.kill("k")
    m.start("k")                       # else the region must have survived
    assert "keeper: restored" in m.console("k")
    assert m.read_memory("k", PAGE, PAGE) == PATTERN_A


# -- 3. corruption between the runs ---------------------------------------------------------------
def test_kho_restore_panics_on_a_region_changed_after_the_hand_over(m):
    up(m, "k", f"{KEEPER}:Keeper")
    m.kill("k")
    base = m.show("k")["memory_base"]
    m.arena.map[base + PAGE + 10] ^= 0xFF                       # one bit flip, from outside
    with pytest.raises(BootFailed, match="changed since it was handed over"):
        m.start("k")
    d = m.show("k")
    assert d["last_exit"]["how"] == "panic"
    assert "KHO: region 'a' changed since it was handed over" in d["last_exit"]["reason"]
    assert "Kernel panic - not syncing: KHO" in m.console("k")
    assert [e for e in events(m, "instance_exit") if e["name"] == "k"][-1]["how"] == "panic"


# -- 4. live update under traffic -----------------------------------------------------------------
def test_ten_live_updates_under_traffic_lose_nothing(m):
    sid = service(m)
    peer = m.arena.peer(sid)
    epoch, gen, pids = peer.epoch, m.instances["s"].generation, {m.show("s")["pid"]}
    for i in range(10):
        new = COUNTER_V2 if i % 2 == 0 else COUNTER
        r = m.live_update("s", new)
        assert r["rolled_back"] is False and r["preserved"] == ["state"], r
        assert r["kernel"].endswith(new.rsplit(":", 1)[1]) and r["gap_ms"] < 1000
        d = m.show("s")
        assert d["state"] == "active" and d["kernel"] == r["kernel"]
        assert d["pid"] not in pids
        pids.add(d["pid"])
        assert peer.epoch == epoch                               # the same service
        settle(m, 0.03)
    assert m.instances["s"].generation == gen + 10
    assert m.show("s")["counters"]["live_updates"] == 10
    assert len([e for e in events(m, "live_update") if e["instance"] == "s"]) == 10
    exits = [e for e in events(m, "handover_exit") if e["name"] == "s"]
    assert [e["how"] for e in exits] == ["graceful"] * 10
    settle(m, 0.1)

    asked, answered, lost, wrong = stop_client(m)
    assert asked >= 50 and lost == 0 and wrong == 0 and answered == asked
    m.kill("s")
    # the count went on across every update, from one version to the next
    resumed = [(int(v), int(n)) for v, n in RESUMED.findall(m.console("s"))]
    assert [v for v, _ in resumed] == [2, 1] * 5
    assert [n for _, n in resumed] == sorted(n for _, n in resumed) and resumed[0][1] > 0
    # none answered twice, none answered and not counted: the handed-over count is the answers
    assert resumed[-1][1] <= handled(m) == answered


def test_requests_during_the_old_kernels_shutdown_are_counted_by_the_new_one(m):
    service(m, f"{KEEPER}:Slow")
    r = m.live_update("s", COUNTER)             # Slow's shutdown() lingers 0.3 s after saving
    assert r["rolled_back"] is False
    settle(m, 0.1)
    asked, answered, lost, wrong = stop_client(m)
    assert lost == 0 and wrong == 0 and answered == asked
    m.kill("s")
    assert handled(m) == answered


def test_the_old_kernels_last_words_stay_on_the_console(m):
    up(m, "s", COUNTER)
    m.live_update("s", COUNTER_V2)
    text = m.console("s")
    assert "counter v1: halting at 0, handing over: True" in text
    assert "counter v2: resumed at 0" in text


def test_a_hand_over_whose_doorbell_watch_fails_still_forgets_the_old_kernel(m, monkeypatch):
    """The host keeps the old kernel's doorbell to forward late rings; near its descriptor
    limit (511 instances) that open fails with EMFILE (injected here). Late rings are then
    lost, nothing else: the exit is handled to the end (pidfd, ring end, pid), the update
    completes, and an event says why. It used to leave on_exit half-way, with the old run's
    pidfd still registered and its pid kept."""
    up(m, "s", COUNTER)
    old = m.show("s")["pid"]

    def emfile(fd):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(lifecycle.linux, "doorbell_watch", emfile)
    r = m.live_update("s", COUNTER_V2)
    assert r["rolled_back"] is False
    d = m.show("s")
    assert d["state"] == "active" and d["pid"] not in (None, old)
    assert m.instances["s"].old_doorbell_fd is None
    failed = events(m, "doorbell_watch_failed")
    assert failed and failed[-1]["name"] == "s" and "Too many open files" in failed[-1]["error"]
    settle(m, 0.1)
    assert m.kill("s")["last_exit"]["how"] == "graceful"


def test_a_host_lost_after_a_live_update_leaves_no_descriptor(run_dir, machine_factory):
    """``abandon`` (a scenario's host-crash) closes every descriptor the host held, the kept
    doorbell of a live update's predecessor too (it stayed open in the runner)."""
    from partition.host import rundir
    old = machine_factory(cpus=",".join(map(str, CPUS[:2])), host_cpus="none",
                          oversubscribe=True, memory="64M", run_dir=run_dir, survive_host=True)
    up(old, "s", COUNTER)
    old.live_update("s", COUNTER_V2)
    kept = old.instances["s"].old_doorbell_fd
    assert kept is not None
    link = os.readlink(f"/proc/self/fd/{kept}")
    cfg = old.abandon()
    try:
        assert os.readlink(f"/proc/self/fd/{kept}") != link, "the kept doorbell is still open"
    except FileNotFoundError:
        pass
    run = rundir.claim(run_dir)
    run.owned = True                     # removed when the new host closes
    new = machine_factory(run_dir=run, adopt=True, **cfg)
    assert new.show("s")["state"] == "active"


# -- 5. rollback ----------------------------------------------------------------------------------
def test_a_new_kernel_that_dies_in_boot_is_rolled_back(m):
    sid = service(m)
    before = m.show("s")
    epoch = m.arena.peer(sid).epoch
    r = m.live_update("s", BROKEN)
    assert r["rolled_back"] is True
    assert "broken: this update does not boot" in r["reason"]
    assert r["kernel"] == before["kernel"] and r["preserved"] == ["state"]
    d = m.show("s")
    assert d["state"] == "active" and d["kernel"] == before["kernel"]
    assert d["kernel_spec"] == before["kernel_spec"] and d["pid"] != before["pid"]
    assert d["counters"]["live_updates"] == 0 and m.arena.peer(sid).epoch == epoch
    tail = m.console("s").strip().splitlines()[-2:]
    assert "Kernel panic - not syncing: broken" in tail[0]
    assert RESUMED.search(tail[1]) and int(RESUMED.search(tail[1]).group(2)) > 0
    names = [e["event"] for e in events(m) if e.get("name") == "s" or e.get("instance") == "s"]
    assert names.index("live_update_failed") < names.index("live_update_rolled_back")
    settle(m, 0.1)

    # the rolled-back service is a normal one: it updates again, and lost nothing meanwhile
    assert m.live_update("s", COUNTER_V2)["rolled_back"] is False
    settle(m, 0.05)
    asked, answered, lost, wrong = stop_client(m)
    assert lost == 0 and wrong == 0 and answered == asked


def test_a_new_kernel_whose_boot_outlasts_the_deadline_is_killed_before_the_rollback(
        m, monkeypatch):
    """Red team: the new kernel answered the mailbox, then its boot() outlasted the deadline;
    the rollback booted the old image beside it (two processes of one instance, the host
    knowing one), and a kill -9 of the lost one then hung the host in waitpid on the live
    replacement. The new process is killed and reaped before the rollback boots."""
    monkeypatch.setattr(lifecycle, "BOOT_RETURN_S", 1.0)
    sid = service(m)
    r = m.live_update("s", SLOWBOOT, "seconds=60")
    assert r["rolled_back"] is True and "has not returned within 1 s" in r["reason"]
    lost = int(re.search(r"slowboot: pid (\d+)", m.console("s")).group(1))
    with pytest.raises(ProcessLookupError):      # killed and reaped (not even a zombie)
        os.kill(lost, 0)
    d = m.show("s")
    assert d["state"] == "active" and d["pid"] != lost
    assert RESUMED.search(m.console("s").strip().splitlines()[-1])
    if m.cgroups.mode is not None:                # one process of the instance, the host's
        assert m.cgroups.members(sid) == [d["pid"]]
    said = [e for e in events(m) if e.get("name") == "s" or e.get("instance") == "s"]
    gone = [e for e in said if e["event"] == "handover_exit" and e["pid"] == lost]
    assert len(gone) == 1 and gone[0]["how"] == "boot-failed"
    assert gone[0]["reason"] == "its boot() did not return in time; forced halt"
    assert said.index(gone[0]) < said.index(
        next(e for e in said if e["event"] == "live_update_rolled_back"))
    assert m.show("s")["counters"]["boot_failures"] == 1
    # every pidfd the host watches belongs to exactly one incarnation: the running one
    exits = [k for k in m.selector.get_map().values()
             if k.data is not None and k.data[0] == EXIT and k.data[1].name == "s"]
    assert [k.fd for k in exits] == [m.instances["s"].pidfd]

    # the running kernel's death is its own, recorded against it, and the host answers
    # (the gap outlasts the client's 1 s request timeout by design: one request may time out)
    asked, answered, lost_requests, wrong = stop_client(m)
    assert wrong == 0 and lost_requests <= 1 and answered + lost_requests == asked
    os.kill(d["pid"], signal.SIGKILL)
    rec = m.wait_for("s", "loaded", timeout=5)
    assert rec["last_exit"]["signal_name"] == "SIGKILL"
    assert [e for e in events(m, "instance_exit") if e["name"] == "s"][-1]["pid"] == d["pid"]


# -- 6. bad images --------------------------------------------------------------------------------
@pytest.fixture
def bad_image(tmp_path):
    path = tmp_path / "syntax_error.py"
    path.write_text("from partition import Kernel\n\nclass K(Kernel:\n    pass\n")
    return str(path)


@pytest.mark.parametrize("which", ["syntax-error", "no-such-class"])
def test_a_bad_image_is_refused_with_enoexec(m, bad_image, which):
    up(m, "s", COUNTER)
    before = m.show("s")
    spec = bad_image if which == "syntax-error" else f"{STATEFUL}:NoSuchKernel"
    with pytest.raises(BadKernelImage) as info:
        m.live_update("s", spec)
    assert info.value.errno == 8                                # ENOEXEC
    assert ("SyntaxError" if which == "syntax-error" else "NoSuchKernel") in str(info.value)
    d = m.describe(m.instances["s"])                           # no poll: as the verb left it
    assert d["kernel"] == before["kernel"] and d["kernel_spec"] == before["kernel_spec"]
    assert not [e for e in events(m, "live_update") if e["instance"] == "s"]
    assert not [e for e in events(m, "handover_exit") if e["name"] == "s"]


@pytest.mark.parametrize("which", ["syntax-error", "no-such-class"])
def test_a_bad_image_leaves_the_running_kernel_untouched(m, bad_image, which):
    service(m)
    pid = m.show("s")["pid"]
    spec = bad_image if which == "syntax-error" else f"{STATEFUL}:NoSuchKernel"
    with pytest.raises(BadKernelImage):
        m.live_update("s", spec)
    settle(m, 0.2)
    d = m.show("s")
    assert d["state"] == "active" and d["pid"] == pid
    assert not [e for e in events(m, "instance_exit") if e["name"] == "s"]
    asked, answered, lost, wrong = stop_client(m)
    assert lost == 0 and wrong == 0 and answered == asked


# -- 7. not running -------------------------------------------------------------------------------
def test_live_update_needs_a_running_kernel(m):
    m.create("r", cpus=str(CPUS[-1]), memory="4M")
    m.create("l", cpus=str(CPUS[-1]), memory="4M")
    m.load("l", COUNTER)
    for name in ("r", "l"):
        before = m.show(name)
        with pytest.raises(NotLoaded) as info:
            m.live_update(name, COUNTER_V2)
        assert info.value.errno == 3                            # ESRCH
        assert f"instance {name!r} is {before['state']}" in str(info.value)
        assert settled(m.show(name)) == settled(before)
    with pytest.raises(NoSuchInstance):
        m.live_update("nobody", COUNTER_V2)
    up(m, "s", COUNTER)
    before = m.show("s")
    with pytest.raises(InvalidSpec):
        m.live_update("s", COUNTER_V2, quiesce=-1)
    settle(m, 0.05)
    assert m.show("s")["pid"] == before["pid"] and m.show("s")["kernel"] == before["kernel"]
    assert not events(m, "live_update")


# -- 8. a kernel that never quiesces -------------------------------------------------------------
@pytest.mark.alone      # times itself
def test_a_kernel_that_never_quiesces_is_forced_and_replaced(m):
    sid = up(m, "s", f"{KEEPER}:Stuck")
    old = m.show("s")
    t0 = time.monotonic()
    r = m.live_update("s", COUNTER, quiesce=1.0)
    took = time.monotonic() - t0
    assert r["rolled_back"] is False and r["kernel"].endswith(":Counter")
    assert r["quiesce_ms"] >= 900 and took < 5.0
    forced = [e for e in events(m, "handover_forced") if e["name"] == "s"]
    assert len(forced) == 1 and forced[0]["quiesce_s"] == 1.0
    assert [e for e in events(m, "handover_exit") if e["name"] == "s"][-1]["how"] == "forced"
    d = m.show("s")
    assert d["state"] == "active" and d["pid"] != old["pid"]
    assert m.arena.peer(sid).force_halt == 0                    # the new kernel is not told to halt
    assert "counter v1: resumed at 0" in m.console("s")        # what it preserved before sleeping
    # the new kernel serves
    up(m, "c", f"{PINGPONG}:Client", f"peer={sid} interval=0.002", cpu=CPUS[0])
    wait_until(m, lambda: counts(m.console("c"))[1] >= 50, what="50 answers from the new kernel")
    asked, answered, lost, wrong = stop_client(m)
    assert lost == 0 and wrong == 0 and answered == asked
    m.kill("s")
    assert m.show("s")["last_exit"]["how"] == "graceful" and handled(m) == answered


# -- 9. mkctl update NAME --kernel ----------------------------------------------------------------
def test_mkctl_update_kernel(run_dir):
    mk(run_dir, "init", "--memory", "64M", "--oversubscribe", "--cpus", ",".join(map(str, CPUS)),
       "--host-cpus", str(CPUS[0]))
    try:
        mk(run_dir, "create", "s", "--cpus", str(CPUS[-1]), "--memory", "8M")
        rel = os.path.relpath(STATEFUL)                         # relative: the CLI makes it absolute
        mk(run_dir, "load", "s", "--kernel", f"{rel}:Counter")
        mk(run_dir, "start", "s")
        pid = json.loads(mk(run_dir, "show", "s", "--format", "json").stdout)["pid"]

        out = mk(run_dir, "update", "s", "--kernel", f"{rel}:CounterV2")
        assert out.returncode == 0
        assert "instance s: live update" in out.stdout and ":Counter -> " in out.stdout
        assert ":CounterV2" in out.stdout and "preserved: state" in out.stdout
        shown = json.loads(mk(run_dir, "show", "s", "--format", "json").stdout)
        assert shown["state"] == "active" and shown["kernel"].endswith(":CounterV2")
        assert shown["pid"] != pid and shown["counters"]["live_updates"] == 1

        bad = mk(run_dir, "update", "s", "--kernel", f"{rel}:Broken", check=False)
        assert bad.returncode == 1
        assert "ROLLED BACK" in bad.stderr and "broken: this update does not boot" in bad.stderr
        shown = json.loads(mk(run_dir, "show", "s", "--format", "json").stdout)
        assert shown["state"] == "active" and shown["kernel"].endswith(":CounterV2")
        assert "counter v2: resumed at" in mk(run_dir, "console", "s").stdout

        # the verb's refusal when nothing runs: the error class, not a traceback
        mk(run_dir, "kill", "s")
        refused = mk(run_dir, "update", "s", "--kernel", f"{rel}:Counter", check=False)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "live update replaces a running kernel" in refused.stderr
    finally:
        mk(run_dir, "shutdown")
    assert not os.path.exists(run_dir)


# -- 10. a hostile peer during live updates ---------------------------------------------------------
def test_a_peer_forging_shutdown_and_flooding_changes_nothing(m):
    sid = service(m)
    xid = up(m, "x", f"{KEEPER}:Spoiler", f"target={sid} seconds=1", cpu=CPUS[0])
    wait_until(m, lambda: m.arena.own(sid).forged_commands > 0, what="the first forgeries")
    for i in range(4):
        r = m.live_update("s", COUNTER_V2 if i % 2 == 0 else COUNTER)
        assert r["rolled_back"] is False and r["preserved"] == ["state"]
        settle(m, 0.05)
    wait_until(m, lambda: "spoiler: forged" in m.console_text(xid), what="the spoiler's end")
    forged, flooded, _ = map(int, re.search(r"spoiler: forged (\d+) flooded (\d+) refused (\d+)",
                                            m.console_text(xid)).groups())
    assert forged > 0 and flooded > 0
    settle(m, 0.1)

    asked, answered, lost, wrong = stop_client(m)
    assert lost == 0 and wrong == 0 and answered == asked
    d = m.show("s")
    assert d["state"] == "active" and d["counters"]["live_updates"] == 4
    assert d["counters"]["halts"] == 4 and d["counters"]["crashes"] == 0   # no halt it did not ask
    assert 0 < m.arena.own(sid).forged_commands <= forged                   # none obeyed
    assert not [e for e in events(m, "instance_exit") if e["name"] == "s"]
    m.kill("x")
    m.kill("s")
    assert m.show("s")["last_exit"]["how"] == "graceful"
