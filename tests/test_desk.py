"""What a researcher meets at the desk: named processes, a followed console, mkctl top."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from partition.control.cli import new_console_text

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))


def mk(run_dir, *args, **kw):
    r = subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]], capture_output=True,
                       text=True, timeout=60, **kw)
    assert r.returncode == 0, f"mkctl {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r.stdout


def machine(run_dir, *kernels):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--memory", "64M", "--oversubscribe")
    for name, spec, cmdline in kernels:
        mk(run_dir, "create", name, "--cpus", str(CPUS[-1]), "--memory", "4M")
        mk(run_dir, "load", name, "--kernel", spec, "--cmdline", cmdline)


def pid_of(run_dir, name):
    import json
    return json.loads(mk(run_dir, "show", name, "--format", "json"))["pid"]


def title(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_processes_are_named_for_what_they_are(run_dir):
    machine(run_dir, ("db", "kernels.idle:IdleKernel", ""))
    sup = int(open(os.path.join(run_dir, "machine.pid")).read().split()[0])
    assert title(sup) == f"mk-host {run_dir}"
    # this machine's processes only: another's instance 1 may be a parked "db" as well
    parked = [p for p in psutil.Process(sup).children(recursive=True)
              if "mk[1:db] kernels.idle:IdleKernel (parked)" in " ".join(p.cmdline())]
    assert len(parked) == 1
    zygotes = [p for p in psutil.process_iter(["cmdline"])
               if f"mk-zygote (host {sup})" in " ".join(p.info["cmdline"] or [])]
    assert len(zygotes) == 1
    mk(run_dir, "start", "db")
    pid = pid_of(run_dir, "db")
    deadline = time.monotonic() + 5
    while title(pid) != "mk[1:db] kernels.idle:IdleKernel":
        assert time.monotonic() < deadline, title(pid)
        time.sleep(0.02)


def test_a_console_is_followed_line_by_line(run_dir):
    machine(run_dir, ("c", "kernels.counter:CounterKernel", "interval=0.01 report=10"))
    mk(run_dir, "start", "c")
    follow = subprocess.Popen(MKCTL + ["console", "--run-dir", run_dir, "c", "-f", "--interval",
                                       "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
    finally:
        follow.send_signal(signal.SIGINT)
        out, _ = follow.communicate(timeout=30)
    assert follow.returncode == 0
    lines = [line for line in out.splitlines() if line.strip()]
    stamps = [line.split("]")[0] for line in lines]
    assert len(lines) >= 10, out                    # a line every 0.1 s, for 1.5 s
    assert len(stamps) == len(set(stamps)), "a line was printed twice"
    assert stamps == sorted(stamps, key=lambda s: float(s.strip("[ ")))


def test_new_console_text_across_a_wrap():
    assert new_console_text("a\nb\n", "a\nb\nc\n") == "c\n"
    assert new_console_text("a\nb\nc\n", "c\nd\ne\n") == "d\ne\n"      # the ring dropped a, b
    assert new_console_text("x\n", "y\n") == "y\n"                     # nothing in common


def test_top_shows_every_instance_and_a_stopped_kernel(run_dir):
    machine(run_dir, ("busy", "kernels.counter:CounterKernel", "interval=0.01"),
            ("stuck", "kernels.idle:IdleKernel", ""))
    mk(run_dir, "start", "busy")
    mk(run_dir, "start", "stuck")
    mk(run_dir, "fault", "stuck", "hang-stop")          # active, and never moving again
    time.sleep(2.5)
    out = mk(run_dir, "top", "--once", "--interval", "0.3", "--sort", "progress")
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s*\d+\s", line)}
    assert set(rows) == {"busy", "stuck"}
    assert "active" in rows["busy"] and "now" in rows["busy"]
    age = re.search(r"(\d+)s ago", rows["stuck"])
    assert age and int(age.group(1)) >= 2, rows["stuck"]
    assert out.index("stuck") < out.index("busy")       # longest without progress first
    assert "PROGRESS" in out and "RX/S" in out
    mk(run_dir, "kill", "stuck", "--force")             # a stopped kernel answers no SHUTDOWN


def run_mk(*args, **kw):
    return subprocess.run(MKCTL + list(args), capture_output=True, text=True, timeout=60, **kw)


def test_the_small_things_a_new_user_met(run_dir, tmp_path):
    from partition import InvalidSpec, Machine, PermissionDenied
    # a size under a page: the fix names a size that works, not "4K or 4K"
    with Machine(memory="64M", run_dir=str(tmp_path / "m"), oversubscribe=True) as m:
        try:
            m.create("a", memory=1000, cpu_count=1)
        except InvalidSpec as exc:
            assert "4K or" not in exc.hint and "4K (the smallest size)" in exc.hint
        else:
            raise AssertionError("1000 bytes were taken")
    # the host's CPU with --oversubscribe: the fix says how to share it
    if len(CPUS) > 1:
        with Machine(cpus=str(CPUS[-1]), host_cpus=str(CPUS[0]), memory="64M",
                     oversubscribe=True, run_dir=str(tmp_path / "o")) as m:
            try:
                m.create("a", cpus=str(CPUS[0]), memory="4M")
            except PermissionDenied as exc:
                assert "--oversubscribe" in exc.hint and "mkctl init --cpus" in exc.hint
            else:
                raise AssertionError("the host's CPU was given")
    # a second init is EBUSY, said as such; errors in JSON when JSON was asked for
    mk(run_dir, "init", "--memory", "64M", "--oversubscribe", "--cpus", str(CPUS[-1]),
       "--host-cpus", ",".join(map(str, CPUS[:-1])) or "none")
    r = run_mk("init", "--run-dir", run_dir, "--memory", "64M")
    assert r.returncode == 1 and "[EBUSY]" in r.stderr and "already running" in r.stderr
    r = run_mk("show", "nosuch", "--run-dir", run_dir, "--format", "json")
    import json
    err = json.loads(r.stdout)
    assert r.returncode == 1 and err["ok"] is False and err["error"]["code"] == "ENOENT"
    # csv is bench's only
    r = run_mk("show", "--run-dir", run_dir, "--format", "csv")
    assert r.returncode == 2 and "invalid choice: 'csv'" in r.stderr
    # a kernel loaded by path is named by its file, and an injected kill says it was one
    kfile = tmp_path / "mine.py"
    kfile.write_text("from partition import Kernel\nclass Mine(Kernel):\n    pass\n")
    mk(run_dir, "create", "p", "--cpus", str(CPUS[-1]), "--memory", "4M")
    mk(run_dir, "load", "p", "--kernel", str(kfile))
    out = mk(run_dir, "start", "p")
    assert "mine.py:Mine" in out and "mk_kimage_" not in out
    mk(run_dir, "fault", "p", "kill")
    deadline = time.monotonic() + 10
    while True:
        shown = json.loads(mk(run_dir, "show", "p", "--format", "json"))
        if shown["last_exit"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "injected kill fault" in shown["last_exit"]["reason"]


def test_run_list_and_scenario_paths_beside_the_file(tmp_path):
    r = run_mk("run", "--list")
    assert r.returncode == 0 and re.search(r"^quickstart\s+\S", r.stdout, re.M)
    assert "live-update" in r.stdout and "host-crash" in r.stdout
    from partition.scenario.schema import load
    d = tmp_path / "exp"
    d.mkdir()
    (d / "k.py").write_text("from partition import Kernel\nclass K(Kernel):\n    pass\n")
    (d / "s.toml").write_text('[scenario]\nname = "s"\nduration = "1s"\n[machine]\n'
                              'oversubscribe = true\n[[instance]]\nname = "a"\nkernel = "k.py:K"\n')
    sc = load(str(d / "s.toml"))
    assert sc.instances[0]["kernel"] == f"{d / 'k.py'}:K"      # beside the file, not the cwd


def test_a_scenario_run_can_be_watched_not_changed(tmp_path):
    """mkctl run serves its machine read-only: top, show and console -f see the experiment as
    it runs; a verb that would change it is refused; the run is not disturbed."""
    f = tmp_path / "w.toml"
    f.write_text('expect = ["a.state == \'active\'"]\n[scenario]\nname = "w"\nduration = "3s"\n'
                 '[machine]\noversubscribe = true\n[[instance]]\nname = "a"\n'
                 'kernel = "kernels.counter:CounterKernel"\ncmdline = "interval=0.01"\n')
    run = subprocess.Popen(MKCTL + ["run", str(f), "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        line = run.stderr.readline()
        while "watch it live" not in line:
            assert line, "mkctl run never said where to watch it"
            line = run.stderr.readline()
        where = re.search(r"--run-dir (\S+)", line).group(1)
        top = run_mk("top", "--run-dir", where, "--once", "--interval", "0.2")
        assert top.returncode == 0 and re.search(r"^\s*1\s+a\s+active", top.stdout, re.M), top
        r = run_mk("kill", "a", "--run-dir", where)
        assert r.returncode == 1 and "[EPERM]" in r.stderr and "watched, not changed" in r.stderr
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate()
    assert run.returncode == 0 and "PASS" in out
    assert not os.path.exists(where)


def test_top_and_show_say_what_the_kernel_published_and_what_it_shares(run_dir):
    """top marks shared CPUs as show does, and both show what a kernel published with
    metric(), integers as integers (they came out as floats: ticks=1001.0)."""
    ticker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "ticker.py")
    machine(run_dir, ("t", f"{ticker}:Ticker", ""), ("u", "kernels.idle:IdleKernel", ""))
    mk(run_dir, "start", "t")
    mk(run_dir, "start", "u")                    # on t's CPU: both share it
    deadline = time.monotonic() + 10
    while True:
        shown = json.loads(mk(run_dir, "show", "t", "--format", "json"))
        if shown["metrics"].get("ticks", 0) > 2:
            break
        assert time.monotonic() < deadline, shown["metrics"]
        time.sleep(0.05)
    assert isinstance(shown["metrics"]["ticks"], int), shown["metrics"]
    assert isinstance(shown["metrics"]["max_gap_ms"], int), shown["metrics"]
    text = mk(run_dir, "show", "t")
    assert re.search(r"^  metrics: max_gap_ms=\d+ ticks=\d+$", text, re.M), text
    out = mk(run_dir, "top", "--once", "--interval", "0.2")
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s*\d+\s", line)}
    assert f" {CPUS[-1]}* " in rows["t"] and f" {CPUS[-1]}* " in rows["u"], out
    assert "* = CPU shared with another instance or the host" in out
    assert re.search(r"max_gap_ms=\d+ ticks=\d+\s*$", rows["t"]), rows["t"]
    assert "METRICS" in out and ".0" not in rows["t"].split("max_gap_ms=")[1]
    mk(run_dir, "kill", "t")
    mk(run_dir, "kill", "u")


def test_show_says_an_overlays_instance_was_deleted_since(machine_factory):
    """The last overlay changed e; e was deleted since: show's overlay line says so instead of
    reading as e's state."""
    from partition.control.show import render_show
    m = machine_factory(cpus=CPUS, host_cpus="none", oversubscribe=True, memory="256M")
    m.create("e", memory="16M", cpus=str(CPUS[-1]))
    m.create("f", memory="4M", cpus=str(CPUS[-1]))
    m.resize("e", memory="20M")                  # tx_1: memory-add ... on e
    assert "on e" in render_show(m.show()) and "deleted since" not in render_show(m.show())
    m.delete("e")
    line = [s for s in render_show(m.show()).splitlines() if s.startswith("overlays ")][0]
    assert line.endswith("on e [e deleted since]"), line


def test_a_bad_frame_on_the_watch_socket_is_refused_and_the_run_goes_on(tmp_path):
    """mkctl run's read-only socket checks every field as the daemon does: a show of a name
    that is a list, an unhashable op, a frame of junk are each refused (EINVAL) to their
    client, and the experiment ends as it would have (it used to exit with a traceback)."""
    import socket
    import struct

    import msgpack
    f = tmp_path / "w.toml"
    f.write_text('expect = ["a.state == \'active\'"]\n[scenario]\nname = "w"\nduration = "5s"\n'
                 '[machine]\noversubscribe = true\n[[instance]]\nname = "a"\n'
                 'kernel = "kernels.counter:CounterKernel"\n')
    run = subprocess.Popen(MKCTL + ["run", str(f), "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    def call(request):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(os.path.join(where, "mkctl.sock"))
        data = msgpack.packb(request, use_bin_type=True)
        s.sendall(struct.pack(">I", len(data)) + data)
        n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        reply = msgpack.unpackb(s.recv(n, socket.MSG_WAITALL), raw=False)
        s.close()
        return reply
    try:
        line = run.stderr.readline()
        while "watch it live" not in line:
            assert line, "mkctl run never said where to watch it"
            line = run.stderr.readline()
        where = re.search(r"--run-dir (\S+)", line).group(1)
        for bad, field in (({"op": "show", "args": {"name": [1]}}, "'name'"),
                           ({"op": "console", "args": {"name": {"a": 1}}}, "'name'"),
                           ({"op": "show", "args": {"brief": "yes"}}, "'brief'"),
                           ({"op": [1]}, "malformed"), ({"op": "show", "args": [1]}, "malformed")):
            r = call(bad)
            assert r["ok"] is False and r["error"]["class"] == "InvalidSpec", (bad, r)
            assert field in r["error"]["message"], (bad, r)
        assert call({"op": "show", "args": {"name": "a"}})["result"]["state"] == "active"
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate()
    assert run.returncode == 0 and "PASS" in out, err
    assert "Traceback" not in err
