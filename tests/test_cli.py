"""mkctl against a real supervisor daemon: the user's view, end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import mk, settled
from leaks import cgroup_entries, leaks, shm_entries

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

CPUS = sorted(os.sched_getaffinity(0))
MKCTL = [sys.executable, "-m", "partition.control.cli"]


def show(run_dir, name=None):
    args = ["show"] + ([name] if name else []) + ["--format", "json"]
    return json.loads(mk(run_dir, *args).stdout)


def events(run_dir):
    with open(os.path.join(run_dir, "events.log")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_full_session(run_dir):
    before = shm_entries(), cgroup_entries()
    out = mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
             "--memory", "256M", "--oversubscribe").stdout
    assert "OVERSUBSCRIBED" in out
    sup = show(run_dir)["machine"]["supervisor_pid"]
    assert psutil.Process(sup).cpu_affinity() == [CPUS[0]]      # the host sits on its CPU
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", "kernels.counter:CounterKernel",
       "--cmdline", "interval=0.001 report=10")
    mk(run_dir, "exec", "a")
    a = show(run_dir, "a")
    for key in ("id", "name", "state", "cpus", "memory_base", "memory_bytes", "kernel", "pid",
                "last_exit"):
        assert key in a
    assert a["state"] == "active" and a["pid"]
    assert psutil.Process(a["pid"]).cpu_affinity() == [CPUS[-1]]
    pool = show(run_dir)["pool"]
    assert set(pool) >= {"cpus", "cpus_available", "memory_bytes", "memory_available"}
    assert pool["memory_available"] == 240 * 2**20
    deadline = time.monotonic() + 10     # boot() has printed (it runs after the boot answer)
    while "counter kernel: boot 1" not in mk(run_dir, "console", "a").stdout:
        assert time.monotonic() < deadline, "the kernel's boot line never came"
        time.sleep(0.02)
    # death from outside is noticed by the daemon by itself, no command needed
    os.kill(a["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e["event"] == "instance_exit" for e in events(run_dir)):
        time.sleep(0.005)
    exit_ev = [e for e in events(run_dir) if e["event"] == "instance_exit"]
    assert exit_ev and exit_ev[0]["how"] == "killed" and exit_ev[0]["signal"] == 9
    # the views follow at the end of the daemon's turn (the event is logged as it happens)
    status = os.path.join(run_dir, "sys/fs/multikernel/instances/a/status")
    deadline = time.monotonic() + 5
    while open(status).read() != "loaded\n" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert open(status).read() == "loaded\n"
    a2 = show(run_dir, "a")
    assert a2["state"] == "loaded" and a2["pid"] is None
    assert a2["last_exit"]["signal_name"] == "SIGKILL"
    assert "counter kernel: boot 1" in mk(run_dir, "console", "a").stdout
    assert "Instance 1 (a) halted, CPUs parking in pool" in mk(run_dir, "console", "host").stdout
    kimage = open(os.path.join(run_dir, "proc/kimage")).read()
    assert kimage.startswith("MK_ID  Type        Start Address   Segments\n"
                             "-----  ----------  --------------  --------\n    1  multikernel")
    # every line of the event log is JSON with an event name and a timestamp
    assert all("event" in e and "timestamp" in e for e in events(run_dir))
    mk(run_dir, "exec", "a")
    pid = show(run_dir, "a")["pid"]
    r = mk(run_dir, "shutdown")
    assert "1 instance(s) halted" in r.stdout and "removed" in r.stdout
    assert exited(sup)         # gone, or a zombie its parent (pid 1 here) has yet to reap
    assert not psutil.pid_exists(pid)
    assert not os.path.exists(run_dir)
    assert leaks(*before) == ([], [])        # what other machines made meanwhile is theirs


def test_refusals_exit_nonzero_and_change_nothing(run_dir):
    mk(run_dir, "init", "--memory", "64M", "--host-cpus", str(CPUS[0]), "--cpus", str(CPUS[-1]),
       *(["--oversubscribe"] if len(CPUS) == 1 else []))
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    before = show(run_dir)
    cases = [
        (["create", "b", "--cpus", str(CPUS[-1]), "--memory", "16M"], "CPU overlap detected"),
        (["create", "b", "--cpu-count", "1", "--memory", "128M"], ""),
        (["create", "b", "--cpus", "999", "--memory", "16M"], "not in the pool"),
        (["create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M"], "already exists"),
        (["create", "c", "--cpus", str(CPUS[-1]), "--memory", "1000"], "4 KiB page"),
        (["create", "c", "--cpus", str(CPUS[-1]), "--memory", "4K", "--id", "600"], "out of range"),
        (["exec", "a"], "'start' needs state loaded"),      # boot's name, not exec's
        (["start", "a"], "'start' needs state loaded"),
        (["delete", "nope"], "no instance named 'nope'"),
        (["load", "a", "--kernel", "nosuch.mod:K"], "does not import"),
        (["kill", "a"], "'kill' needs state active"),
    ]
    for args, words in cases:
        p = mk(run_dir, *args, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert "error:" in p.stderr and "fix:" in p.stderr, p.stderr
        assert words in p.stderr, (args, p.stderr)
    after = show(run_dir)
    before["machine"].pop("events"), after["machine"].pop("events")
    assert settled(after) == settled(before)
    # usage errors are argparse's: exit 2
    assert mk(run_dir, "create", "x", check=False).returncode == 2
    # a second init on the same run directory is refused while the first runs
    p = mk(run_dir, "init", check=False)
    assert p.returncode == 1 and "already running" in p.stderr


def test_two_machines_side_by_side(run_dir):
    other = run_dir + "-b"
    try:
        for rd in (run_dir, other):
            mk(rd, "init", "--memory", "64M", "--cpus", ",".join(map(str, CPUS)),
               "--host-cpus", str(CPUS[0]), "--oversubscribe")
            mk(rd, "create", "same", "--cpus", str(CPUS[-1]), "--memory", "16M")
            mk(rd, "load", "same", "--kernel", "kernels.idle:IdleKernel")
            mk(rd, "exec", "same")
        a, b = show(run_dir), show(other)
        assert a["machine"]["supervisor_pid"] != b["machine"]["supervisor_pid"]
        assert a["instances"][0]["pid"] != b["instances"][0]["pid"]
        mk(other, "kill", "same", "--force")
        assert show(run_dir, "same")["state"] == "active"
        assert show(other, "same")["state"] == "loaded"
    finally:
        subprocess.run(MKCTL + ["--run-dir", other, "shutdown"], capture_output=True, timeout=60)
    assert not os.path.exists(other)


def test_no_machine_and_stale_machine(run_dir):
    p = mk(run_dir, "show", check=False)
    assert p.returncode == 1 and "no machine is running" in p.stderr and "mkctl init" in p.stderr
    # instances that die with their host (tests/test_survival.py: the default outlives it)
    mk(run_dir, "init", "--memory", "64M", "--oversubscribe", "--cpus", ",".join(map(str, CPUS)),
       "--no-survive-host")
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", "kernels.idle:IdleKernel")
    mk(run_dir, "exec", "a")
    inst_pid = show(run_dir, "a")["pid"]
    sup = show(run_dir)["machine"]["supervisor_pid"]
    os.kill(sup, signal.SIGKILL)                    # the host dies hard
    deadline = time.monotonic() + 5
    while psutil.pid_exists(inst_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not psutil.pid_exists(inst_pid), "instances must die with their host"
    p = mk(run_dir, "show", check=False)
    assert p.returncode == 1 and "stale" in p.stderr
    r = mk(run_dir, "shutdown")
    assert "stale" in r.stdout
    assert not os.path.exists(run_dir)


def test_kernel_by_relative_path_via_cli(run_dir, tmp_path):
    (tmp_path / "mykernel.py").write_text(
        "from partition import Kernel\n"
        "class Mine(Kernel):\n"
        "    def boot(self):\n"
        "        self.printk('mine booted with ' + self.cmdline)\n")
    mk(run_dir, "init", "--memory", "64M", "--oversubscribe", "--cpus", ",".join(map(str, CPUS)))
    mk(run_dir, "create", "m", "--cpu-count", "1", "--memory", "4K")
    p = subprocess.run(MKCTL + ["--run-dir", run_dir, "load", "m", "--kernel", "mykernel.py",
                                "--cmdline", "x=1"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    mk(run_dir, "exec", "m")
    deadline = time.monotonic() + 5
    while "mine booted with x=1" not in mk(run_dir, "console", "m").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_init_refusals_leave_nothing(run_dir):
    p = mk(run_dir, "init", "--cpus", "4000", check=False)
    assert p.returncode == 1 and "not available" in p.stderr
    p = mk(run_dir, "init", "--memory", "12345", check=False)
    assert p.returncode == 1 and "4 KiB page" in p.stderr
    assert not os.path.exists(run_dir)


def test_fault_and_update_through_the_supervisor(run_dir):
    mk(run_dir, "init", "--memory", "64M", "--oversubscribe", "--cpus", ",".join(map(str, CPUS)))
    mk(run_dir, "create", "db", "--cpus", str(CPUS[-1]), "--memory", "4M")
    mk(run_dir, "update", "db", "--recovery", "restart", "--max-restarts", "1",
       "--restart-window", "30")
    mk(run_dir, "load", "db", "--kernel", "kernels.echo:EchoKernel")
    mk(run_dir, "exec", "db")
    mk(run_dir, "fault", "db", "kill")
    deadline = time.monotonic() + 10
    while show(run_dir, "db")["counters"]["restarts"] < 1 or show(run_dir, "db")["state"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    mk(run_dir, "fault", "db", "panic")
    deadline = time.monotonic() + 10
    while show(run_dir, "db")["state"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    d = show(run_dir, "db")
    assert d["failures"] == 2 and d["last_failure"]["kind"] == "panic"
    p = mk(run_dir, "fault", "db", "kill", check=False)
    assert p.returncode == 1 and "needs it active" in p.stderr
    p = mk(run_dir, "update", "db", "--watchdog", "-3", check=False)
    assert p.returncode == 1 and "watchdog" in p.stderr


def test_start_boots_and_exec_is_its_deprecated_name(run_dir):
    mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
       "--memory", "64M", "--oversubscribe")
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", "kernels.idle:IdleKernel")
    assert "active" in mk(run_dir, "start", "a").stdout
    mk(run_dir, "kill", "a", "--force")
    p = mk(run_dir, "exec", "a")
    assert "deprecated: booting is 'mkctl start NAME'" in p.stderr and "active" in p.stdout
    mk(run_dir, "kill", "a", "--force")
    p = mk(run_dir, "exec", "a", "--", "ls", check=False)    # a command: needs it running
    assert p.returncode == 1 and "exec runs a command inside a running instance" in p.stderr
    assert show(run_dir, "a")["state"] == "loaded"        # nothing was done


def test_trees_in_and_out(run_dir, tmp_path):
    """mkctl dump writes a tree (DTS text, or the DTB with -o); init --input and create --input
    take either back; a malformed file is refused by name and changes nothing."""
    from partition import linux
    from partition.host.devicetree import from_dts, parse_baseline, to_dts
    phys = linux.physical_cpu_ids()
    apic = phys[CPUS[-1]]
    base = tmp_path / "pool.dts"
    base.write_text(f"/dts-v1/;\n/ {{\n\tresources {{\n\t\tcpus = /bits/ 64 <{apic}>;\n"
                    "\t\tmemory@0 { size = /bits/ 64 <0x4000000>; numa-node-id = <0>; };\n"
                    "\t};\n};\n")
    assert parse_baseline(from_dts(base.read_text())).cpus == [apic]
    mk(run_dir, "init", "--input", str(base), "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
    pool = show(run_dir)["pool"]
    assert pool["cpus"] == [CPUS[-1]] and pool["memory_bytes"] == 64 << 20
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M", "--id", "7")
    text = mk(run_dir, "dump", "a").stdout
    assert 'model = "a";' in text and f"cpus = /bits/ 64 <{apic:#x}>;" in text
    mk(run_dir, "dump", "a", "-o", str(tmp_path / "a.dtb"))
    blob = (tmp_path / "a.dtb").read_bytes()
    assert to_dts(blob) == text and from_dts(text) == blob      # text and blob are one tree
    mk(run_dir, "delete", "a")
    mk(run_dir, "create", "--input", str(tmp_path / "a.dtb"))    # name, id, CPUs, size
    a = show(run_dir, "a")
    assert (a["id"], a["cpus"], a["memory_bytes"]) == (7, [CPUS[-1]], 16 << 20)
    mk(run_dir, "delete", "a")
    (tmp_path / "a.dts").write_text(text.replace('model = "a"', 'model = "b"'))
    mk(run_dir, "create", "--input", str(tmp_path / "a.dts"))
    assert show(run_dir, "b")["id"] == 7
    before = show(run_dir)
    (tmp_path / "bad.dts").write_text("/dts-v1/;\n/ { model = \"c\"; resources { cpus = <1>;")
    p = mk(run_dir, "create", "--input", str(tmp_path / "bad.dts"), check=False)
    assert p.returncode == 1 and "DTS: the text ends inside a node" in p.stderr
    (tmp_path / "bad.dtb").write_bytes(blob[:40])
    p = mk(run_dir, "create", "--input", str(tmp_path / "bad.dtb"), check=False)
    assert p.returncode == 1 and "[EINVAL]" in p.stderr
    after = show(run_dir)
    before["machine"].pop("events")
    after["machine"].pop("events")
    assert settled(after) == settled(before)


def test_kernel_text_reaches_the_terminal_escaped(run_dir, misbehaving):
    """A kernel's printk and panic reason carry OSC 0 (title), OSC 52 (clipboard), a clear
    screen, a bidi override and a C1 CSI: console, show (table and one
    instance) and top print them escaped; console --raw alone gives the bytes as written."""
    ESCAPES = ("\x1b]0;pwned\x07", "\x1b]52;c;cm0gLXJmIH4=\x07", "\x1b[2J", "\u202e",
               "\x9b31m")                                 # as tests/kernels/misbehaving.py
    mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
       "--memory", "64M", "--oversubscribe")
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "4M")
    mk(run_dir, "load", "a", "--kernel", f"{misbehaving}:Escaper")
    mk(run_dir, "start", "a")
    deadline = time.monotonic() + 10
    while show(run_dir, "a")["state"] == "active":          # it panics at its first tick
        assert time.monotonic() < deadline, "the escaper never panicked"
        time.sleep(0.02)
    raw = mk(run_dir, "console", "a", "--raw").stdout
    assert all(e in raw for e in ESCAPES)                    # asked for: the kernel's bytes
    controls = ("\x1b", "\x07", "\u202e", "\x9b")
    outputs = {"console": mk(run_dir, "console", "a").stdout,
               "show": mk(run_dir, "show").stdout, "show a": mk(run_dir, "show", "a").stdout,
               "top": mk(run_dir, "top", "--once", "--interval", "0.05").stdout}
    for what, out in outputs.items():
        assert not any(c in out for c in controls), (what, out)
    assert "escaper: \\x1b]0;pwned\\x07\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\u202e" \
           "\\x9b31m" in outputs["console"]
    for what in ("show", "show a"):
        assert "escaper panics: \\x1b]0;pwned\\x07" in outputs[what], outputs[what]
    # the JSON view needs nothing: json.dumps escapes control characters itself
    assert "\x1b" not in mk(run_dir, "show", "a", "--format", "json").stdout
    # a refusal that quotes the kernel (its boot() raised) is escaped on stderr too
    mk(run_dir, "create", "b", "--cpus", str(CPUS[-1]), "--memory", "4M")
    mk(run_dir, "load", "b", "--kernel", f"{misbehaving}:EscaperAtBoot")
    p = mk(run_dir, "start", "b", check=False)
    assert p.returncode == 1 and "escaper at boot: \\x1b]0;pwned\\x07" in p.stderr, p.stderr
    assert not any(c in p.stderr for c in controls)


def test_printable_escapes_what_drives_a_terminal():
    from partition.terminal import printable
    assert printable("plain text, tabs\tand lines\n") == "plain text, tabs\tand lines\n"
    assert printable("\x1b]52;c;eA==\x07\x9b2J\x7f\x00") == \
        "\\x1b]52;c;eA==\\x07\\x9b2J\\x7f\\x00"
    assert printable("\u202eevil\u2066") == "\\u202eevil\\u2066"       # bidi override, isolate
    assert printable("\udcff") == "\\udcff"              # undecodable byte: printable on any stdout
    assert printable("a\nb\tc\rd", one_line=True) == "a\\x0ab\\x09c\\x0dd"
    assert printable("ünïcødé ✓ 日本") == "ünïcødé ✓ 日本"   # text is text


def test_options_before_dashes_are_mkctls_wherever_they_stand(run_dir):
    """``mkctl exec web --run-dir X -- cmd`` targets X: the option is not swallowed into the
    command (which would run on the default machine, or on none)."""
    mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
       "--memory", "64M", "--oversubscribe")
    mk(run_dir, "create", "web", "--cpus", str(CPUS[-1]), "--memory", "4M")
    mk(run_dir, "load", "web", "--kernel", "kernels.idle:IdleKernel")
    mk(run_dir, "start", "web")
    elsewhere = {**os.environ, "MK_RUN_DIR": f"{run_dir}-absent"}     # not this machine
    p = subprocess.run(MKCTL + ["exec", "web", "--run-dir", run_dir, "--", "echo", "--run-dir",
                                "inside"], capture_output=True, text=True, timeout=60,
                       env=elsewhere)
    assert p.returncode == 0 and p.stdout == "--run-dir inside\n", p.stderr   # after --: its own
    p = subprocess.run(MKCTL + ["exec", "web", "--format", "text", "--run-dir", run_dir, "--",
                                "true"], capture_output=True, text=True, timeout=60,
                       env=elsewhere)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(MKCTL + ["kerf", "--run-dir", f"{run_dir}-absent", "--"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "give kerf's arguments after --" in p.stderr


def test_usage_errors_name_the_fix_and_exit_2(run_dir):
    """What the wire or the terminal cannot carry is refused by the CLI, exit 2, with what to
    type instead (no traceback); a mistyped verb or choice gets its nearest spelling."""
    mk(run_dir, "init", "--memory", "64M", "--host-cpus", str(CPUS[0]), "--cpus", str(CPUS[-1]),
       "--oversubscribe")
    before = show(run_dir)
    cases = [
        (["create", "a", "--cpus", str(CPUS[-1]), "--memory", "4M", "--max-restarts",
          "99999999999999999999"], "--max-restarts: 99999999999999999999 is out of range 0..1000"),
        (["create", "a", "--cpus", str(CPUS[-1]), "--memory", "4M", "--id", "9" * 30],
         "is out of range"),
        (["create", "a", "--cpus", str(CPUS[-1]), "--memory", "4M", "--id", "9" * 5000],
         "is not an integer"),
        (["fault", "a", "wild-write", "--address", "0x" + "f" * 20], "is not an address"),
        (["console", "\udcff\udcfe"], "holds bytes that are not text"),
        (["console", "a\x1b]0;x\x07"], "holds bytes that are not text"),
        (["satrt", "a"], "did you mean 'start'?"),
        (["top", "--sort", "cpu"], "did you mean 'cpu%'?"),
    ]
    for args, says in cases:
        p = subprocess.run(MKCTL + ["--run-dir", run_dir, *args], capture_output=True,
                           timeout=60)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2 and says in err and "Traceback" not in err, (args, err)
        assert b"\x1b" not in p.stderr
    after = show(run_dir)
    before["machine"].pop("events")
    after["machine"].pop("events")
    assert settled(after) == settled(before)


def test_a_deep_device_tree_is_refused_by_name(run_dir, tmp_path):
    """A 20000-deep DTS given to init/create --input is an EINVAL refusal with its fix, not a
    RecursionError; nothing is started. A tree of ordinary depth still compiles."""
    from partition.host.devicetree import MAX_DTS_DEPTH, from_dts, to_dts
    deep = tmp_path / "deep.dts"
    deep.write_text("/dts-v1/;\n/ {" + " a {" * 20000 + " };" * 20000 + " };\n")
    for verb in ("init", "create"):
        p = mk(run_dir, verb, "--input", str(deep), check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert f"nodes nested more than {MAX_DTS_DEPTH} deep" in p.stderr and "fix:" in p.stderr
    assert not os.path.exists(run_dir)
    ok = "/dts-v1/;\n/ {" + " a {" * MAX_DTS_DEPTH + " };" * MAX_DTS_DEPTH + " };\n"
    assert to_dts(from_dts(ok)).count("a {") == MAX_DTS_DEPTH


def exited(pid):
    """``mkctl shutdown`` returns once the supervisor has exited (its pidfd readable): the
    supervisor is gone, or a zombie until its parent, pid 1 once ``mkctl init`` left,
    reaps it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
