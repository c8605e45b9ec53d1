"""One userland per instance (host/userlands.py, guest/userinit.py, guest/userjoin.py): execs
that see each other, a server reached from another exec, a userland that ends with its kernel
and comes back fresh, boot programs and their statuses, /dev/console in the console log, and
the init's records checked. Real processes; every one reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import CPUS, MKCTL, host_pids, mk, until

from partition import scenario
from partition.guest import userinit
from partition.host.machine import Machine
from partition.scenario import ScenarioInvalid, report, schema

pytestmark = pytest.mark.system   # runs real processes (userlands, a supervisor)

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
PYTHON = os.path.realpath(sys.executable)


def boot(run_dir, *load_args):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", PICKY, *load_args)
    mk(run_dir, "start", "a")
    return run_dir


@pytest.fixture
def running(run_dir):
    return boot(run_dir)


def inside(run_dir, *argv, **kw):
    return mk(run_dir, "exec", "a", "--", *argv, check=False, **kw)


def in_background(run_dir, *argv, **kw):
    return subprocess.Popen(MKCTL + ["--run-dir", run_dir, "exec", "a", "--", *argv],
                            stderr=subprocess.PIPE, text=True, **kw)


def show(run_dir):
    return json.loads(mk(run_dir, "show", "--format", "json", "a").stdout)


def ended(proc):
    """A background exec, ended (mkctl terminated: its relay hangs the command up) and
    reaped."""
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=30)


LOOK = textwrap.dedent("""
    import os
    cmds = []
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                cmds.append(open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())
            except OSError:
                pass
    print(any(c.startswith('sleep 401') for c in cmds))
    print(open('/tmp/note').read().strip())
    print(os.readlink('/proc/self/ns/pid'))
""")


def test_two_execs_share_one_userland(running):
    first = in_background(running, "/bin/sh", "-c",
                          "echo shared > /tmp/note; readlink /proc/self/ns/pid; exec sleep 401",
                          stdout=subprocess.PIPE)
    try:
        ns = first.stdout.readline().strip()
        until(lambda: host_pids(b"sleep\x00401\x00"), what="the first exec's sleep")
        r = inside(running, PYTHON, "-c", LOOK)
        assert r.returncode == 0, r.stderr
        seen, note, ns2 = r.stdout.split()
        assert (seen, note, ns2) == ("True", "shared", ns)      # its process, its /tmp, its ns
    finally:
        ended(first)
    until(lambda: not host_pids(b"sleep\x00401\x00"), what="the sleep ended with its exec")


SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(); s.bind(('127.0.0.1', 4567)); s.listen()
    print('listening', flush=True)
    c, _ = s.accept(); c.sendall(c.recv(100).upper()); c.close()
""")
CLIENT = ("import socket; c = socket.create_connection(('127.0.0.1', 4567)); "
          "c.sendall(b'ping'); print(c.recv(100).decode())")


def test_a_server_in_one_exec_answers_a_client_in_another(running):
    server = in_background(running, PYTHON, "-c", SERVER, stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline() == "listening\n", server.stderr.read()
        r = inside(running, PYTHON, "-c", CLIENT)
        assert (r.returncode, r.stdout.strip()) == (0, "PING"), r.stderr
        assert server.wait(timeout=30) == 0
    finally:
        ended(server)


@pytest.mark.parametrize("end", [("fault", "a", "panic"), ("kill", "a")], ids=["panic", "halt"])
def test_the_userland_ends_with_its_kernel_and_comes_back_fresh(running, end):
    r = inside(running, "/bin/sh", "-c", "echo x > /tmp/mark; readlink /proc/self/ns/pid")
    assert r.returncode == 0, r.stderr
    sleeper = in_background(running, "sleep", "402", stdout=subprocess.DEVNULL)
    try:
        sleeps = until(lambda: host_pids(b"sleep\x00402\x00"), what="the sleep")
        init = show(running)["userland"]["pid"]
        mk(running, *end)
        assert sleeper.wait(timeout=30) == 128 + signal.SIGKILL     # killed with its instance
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in [init, *sleeps]),
              what="every process of the userland gone, its init too")
        assert show(running)["userland"] is None
    finally:
        ended(sleeper)
    with open(os.path.join(running, "events.log")) as f:
        exits = [e for e in map(json.loads, f) if e["event"] == "userland_exit"]
    assert exits and exits[-1]["pid"] == init
    mk(running, "start", "a")
    r = inside(running, "/bin/sh", "-c", "test -e /tmp/mark && echo kept || echo gone; "
                                         "readlink /proc/self/ns/pid")
    assert r.returncode == 0, r.stderr
    fresh, _ = r.stdout.split()
    assert fresh == "gone"                                     # a fresh userland: its /tmp,
    with open(os.path.join(running, "events.log")) as f:       # its own start
        starts = [e for e in map(json.loads, f) if e["event"] == "userland_start"]
    assert len(starts) == 2 and starts[-1]["generation"] > starts[0]["generation"]
    assert os.path.exists(f"/proc/{show(running)['userland']['pid']}")


def test_boot_programs_run_at_every_boot_with_their_statuses(run_dir):
    boot(run_dir, "--program", "/bin/sh -c 'echo booted > /dev/console; exit 3'",
         "--program", "/no/such/program", "--program", "/bin/sleep 403")

    def statuses():
        return [p["status"] for p in show(run_dir)["programs"]]
    until(lambda: statuses() == [3, 127, "running"], what="the programs' statuses")
    d = show(run_dir)
    assert d["programs"][0]["argv"] == ["/bin/sh", "-c", "echo booted > /dev/console; exit 3"]
    assert "/no/such/program" in d["programs"][1]["reason"]
    assert "No such file" in d["programs"][1]["reason"]
    assert len({p["generation"] for p in d["programs"]}) == 1
    text = mk(run_dir, "show", "a").stdout
    assert "exit 3" in text and "/no/such/program" in text and "running" in text
    until(lambda: "[console] booted" in mk(run_dir, "console", "a").stdout,
          what="the program's line in the console")
    first = d["programs"][0]["generation"]
    mk(run_dir, "kill", "a")
    mk(run_dir, "start", "a")
    until(lambda: show(run_dir)["programs"][0]["generation"] != first
          and statuses() == [3, 127, "running"], what="the programs of the second boot")
    assert len(host_pids(b"/bin/sleep\x00403\x00")) == 1        # the first boot's went with it
    with open(os.path.join(run_dir, "events.log")) as f:
        exits = [e for e in map(json.loads, f) if e["event"] == "program_exit"]
    assert sorted(e["status"] for e in exits) == [3, 3, 127, 127]


def test_boot_programs_refused_when_not_commands(run_dir):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    r = mk(run_dir, "load", "a", "--kernel", PICKY, "--program", "/bin/echo 'unclosed",
           check=False)
    assert r.returncode != 0 and "cannot be split" in r.stderr
    assert show(run_dir)["state"] == "ready"                  # nothing loaded


# -- in-process: the console pty and the init's records ------------------------------------
@pytest.fixture
def machine():
    with Machine(cpus=str(CPUS[-1]), memory="64M", host_cpus=str(CPUS[0]),
                 oversubscribe=True) as m:
        yield m
        inits = [r.pid for r in m.userlands.runs.values()]
    assert not any(os.path.exists(f"/proc/{p}") for p in inits)    # reaped at close


def _wait(m, pred, what):
    deadline = time.monotonic() + 10
    while not (value := pred()):
        assert time.monotonic() < deadline, f"{what} never held"
        m.poll(0.05)
    return value


def test_the_console_is_a_pty_the_host_reads_and_feeds(machine):
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.echo:EchoKernel", "", programs=[
        ["/bin/sh", "-c", 'echo ready > /dev/console; read line < /dev/console; '
                          'echo "got $line" > /dev/console']])
    m.exec("a")
    _wait(m, lambda: "[console] ready" in m.console("a"), "the program's first line")
    assert m.userlands.feed("a", b"hello\n")
    _wait(m, lambda: "[console] got hello" in m.console("a"), "the answer to the typed line")
    assert "hello\n" not in m.console("a").replace("got hello", "")   # typed input not echoed
    _wait(m, lambda: m.describe(m.get("a"))["programs"][0]["status"] == 0, "its exit")


def test_a_hostile_init_record_is_refused(machine):
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.echo:EchoKernel", "")
    m.exec("a")
    init = m.userlands.ensure(m.get("a"))["init"]
    # the init's end of its pipe to the host, written as a process inside could if it had it
    with open(f"/proc/{init}/fd/3", "wb", buffering=0) as pipe:
        pipe.write(userinit.encode(userinit.EXITED, index=7, status=0))   # no program 7
    _wait(m, lambda: m.events.counts.get("userland_record_refused"), "the refusal")
    assert os.path.exists(f"/proc/{init}")                  # refused, nothing acted on
    assert m.describe(m.get("a"))["userland"]["pid"] == init


@pytest.mark.parametrize("raw, why", [
    (b"EVIL" + bytes(12), "bad magic"),
    (userinit.HEADER.pack(userinit.MAGIC, 99, 0, 0, 0), "unknown kind"),
    (userinit.HEADER.pack(userinit.MAGIC, userinit.EXITED, 5, 0, 0), "program index 5"),
    (userinit.HEADER.pack(userinit.MAGIC, userinit.EXITED, 0, -1, 0), "status -1"),
    (userinit.HEADER.pack(userinit.MAGIC, userinit.EXITED, 0, 4096, 0), "status 4096"),
    (userinit.HEADER.pack(userinit.MAGIC, userinit.FAILED, 0, 127, 60000), "reason of 60000"),
], ids=["magic", "kind", "index", "negative-status", "big-status", "long-reason"])
def test_the_records_are_checked_field_by_field(raw, why):
    got = userinit.parse(bytearray(raw + userinit.encode(userinit.READY)), programs=2)
    assert len(got) == 1 and isinstance(got[0], userinit.BadRecord) and why in str(got[0])


def test_a_good_record_split_across_reads_waits_for_its_rest():
    raw = userinit.encode(userinit.FAILED, 1, 127, "no such file")
    buf = bytearray(raw[:20])
    assert userinit.parse(buf, programs=2) == []
    buf += raw[20:]
    [rec] = userinit.parse(buf, programs=2)
    assert rec == userinit.Record("failed", 1, 127, "no such file") and not buf


# -- a scenario's programs ------------------------------------------------------------------
def test_a_scenario_names_boot_programs_and_reports_their_statuses():
    doc = {"scenario": {"name": "t", "duration": 1.0},
           "instance": [{"name": "a", "kernel": "kernels.idle:IdleKernel",
                         "cpus": str(CPUS[-1]),
                         "programs": ["/bin/sh -c 'exit 5'", ["/bin/echo", "to the console"],
                                      "/no/such/program"]},
                        {"name": "b", "kernel": "kernels.idle:IdleKernel",
                         "cpus": str(CPUS[-1])}],
           "machine": {"cpus": str(CPUS[-1]), "host_cpus": str(CPUS[0]), "memory": "64M",
                       "oversubscribe": True}}
    sc = schema.check(doc)
    assert sc.instances[0]["programs"][0] == ["/bin/sh", "-c", "exit 5"]
    assert "programs" not in sc.instances[1]
    result = scenario.run(sc)
    got = [(p["instance"], p["index"], p["argv"][0], p["status"]) for p in result.programs]
    assert got == [("a", 0, "/bin/sh", 5), ("a", 1, "/bin/echo", 0),
                   ("a", 2, "/no/such/program", 127)]
    assert result.to_dict()["programs"][2]["reason"].startswith("/no/such/program: ")
    assert "[console] to the console" in result.consoles["a"]
    assert "/no/such/program" in report.summary(result)


@pytest.mark.parametrize("bad", [[""], ["/bin/echo 'unclosed"], [[]], [["/bin/echo", 3]],
                                 "/bin/echo", [None]])
def test_a_scenario_refuses_programs_that_are_not_commands(bad):
    doc = {"scenario": {"name": "t"},
           "instance": [{"name": "a", "kernel": "kernels.idle:IdleKernel", "programs": bad}]}
    with pytest.raises(ScenarioInvalid) as ei:
        schema.check(doc, "t.toml")
    assert any("programs" in p for p in ei.value.problems), ei.value.problems


# -- the kernel's changes, followed ---------------------------------------------------------
STATEFUL = os.path.join(HERE, "kernels", "stateful.py")


def _sleeps(tag: bytes) -> list[int]:
    return host_pids(b"sleep\x00" + tag + b"\x00")


def test_a_live_update_restarts_the_userland_under_the_new_kernel(machine_factory):
    m = machine_factory(cpus=str(CPUS[-1]), host_cpus=str(CPUS[0]), oversubscribe=True,
                        memory="64M")
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", f"{STATEFUL}:Counter", "", programs=["sleep 405"])
    m.exec("a")
    [old] = _wait(m, lambda: _sleeps(b"405"), "the first boot's sleep")
    init = m.describe(m.get("a"))["userland"]["pid"]
    first = m.describe(m.get("a"))["programs"][0]["generation"]
    m.live_update("a", f"{STATEFUL}:CounterV2")
    _wait(m, lambda: (d := m.describe(m.get("a")))["programs"][0]["generation"] != first
          and d["programs"][0]["status"] == "running", "the new kernel's programs")
    _wait(m, lambda: not os.path.exists(f"/proc/{old}") and not os.path.exists(f"/proc/{init}"),
          "the old userland gone")
    assert m.describe(m.get("a"))["userland"]["pid"] != init
    assert len(_sleeps(b"405")) == 1


@pytest.mark.skipif(len(CPUS) < 2, reason="a CPU change needs a pool of two CPUs")
def test_a_cpu_resize_moves_the_userland(machine_factory):
    m = machine_factory(cpus=CPUS[:2], host_cpus="none", oversubscribe=True, memory="256M")
    m.create("a", cpus=[m.config.cpus[0]], memory="16M")
    m.load("a", "kernels.idle:IdleKernel", "", programs=["sleep 406"])
    m.exec("a")
    [pid] = _wait(m, lambda: _sleeps(b"406"), "the boot program")
    assert os.sched_getaffinity(pid) == {m.config.cpus[0]}
    m.resize("a", cpus=[m.config.cpus[1]])
    assert os.sched_getaffinity(pid) == {m.config.cpus[1]}
    init = m.describe(m.get("a"))["userland"]["pid"]
    assert os.sched_getaffinity(init) == {m.config.cpus[1]}


def test_what_an_exec_leaves_goes_with_it_unless_it_left_its_group(running):
    r = inside(running, "/bin/sh", "-c",
               "sleep 408 & setsid sleep 409 >/dev/null 2>&1 & sleep 0.5; exit 0")
    assert r.returncode == 0, r.stderr
    until(lambda: not host_pids(b"sleep\x00408\x00"), what="the straggler in its group killed")
    [kept] = until(lambda: host_pids(b"sleep\x00409\x00"), what="the setsid'd sleep")
    init = show(running)["userland"]["pid"]
    with open(f"/proc/{kept}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) == init     # reparented to the init
    os.kill(kept, signal.SIGTERM)
    until(lambda: not os.path.exists(f"/proc/{kept}"), what="the orphan reaped by the init")


REBOOT_WHEN_TOLD = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    print('cad', libc.reboot(0x89ABCDEF), ctypes.get_errno(), flush=True)   # not a restart
    with open('/dev/console') as console:
        console.readline()
    print('rebooting', flush=True)
    print('returned', libc.reboot(0x01234567), flush=True)                # RB_AUTOBOOT
""")


def test_reboot_inside_restarts_the_instance(machine):
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.echo:EchoKernel", "", programs=[[PYTHON, "-c", REBOOT_WHEN_TOLD]])
    m.exec("a")
    first = m.get("a").generation
    _wait(m, lambda: "[console] cad -1 1" in m.console("a"), "the refused ctrl-alt-del")
    assert m.userlands.feed("a", b"go\n")
    _wait(m, lambda: m.get("a").generation > first and m.get("a").state.value == "active"
          and m.describe(m.get("a"))["programs"][0]["generation"] > first,
          "the instance restarted")
    assert m.events.counts.get("userland_reboot") == 1
    assert m.get("a").last_exit.how == "forced"


REBOOT = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
          "print(libc.reboot(0xCDEF0123), ctypes.get_errno(), flush=True); "    # halt: refused
          "print(libc.reboot(0x01234567), flush=True); import time; time.sleep(30)")


def test_reboot_from_an_exec_restarts_its_instance_only(run_dir):
    boot(run_dir)
    mk(run_dir, "create", "b", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "b", "--kernel", PICKY)
    mk(run_dir, "start", "b")
    before = {n: json.loads(mk(run_dir, "show", "--format", "json", n).stdout)
              for n in ("a", "b")}
    r = inside(run_dir, PYTHON, "-c", REBOOT)
    assert r.stdout.splitlines()[0] == "-1 1", r.stdout                  # EPERM
    assert r.returncode == 128 + signal.SIGKILL                       # its userland went
    after = until(lambda: (d := show(run_dir))["state"] == "active"
                  and d["boots"] > before["a"]["boots"] and d, what="a restarted")
    assert after["last_exit"]["how"] == "forced" and after["pid"] != before["a"]["pid"]
    b = json.loads(mk(run_dir, "show", "--format", "json", "b").stdout)
    assert (b["pid"], b["boots"]) == (before["b"]["pid"], before["b"]["boots"])


JUNK = textwrap.dedent("""
    import array, os, socket
    r, w = os.pipe()
    f = os.open('/etc/hostname', os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for _ in range(50):
            s.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [r, w, f]))],
                      0, '\\0mk-init-reboot')
    print('sent')
""")


def test_the_init_keeps_nothing_but_listeners_sent_to_it(running):
    assert show(running)["userland"] is None          # none until the first exec needs it
    assert inside(running, "/bin/true").returncode == 0
    init = show(running)["userland"]["pid"]

    def links():
        return sorted(os.readlink(f"/proc/{init}/fd/{fd}") for fd in os.listdir(f"/proc/{init}/fd"))
    before = links()
    r = inside(running, PYTHON, "-c", JUNK)
    assert (r.returncode, r.stdout.strip()) == (0, "sent"), r.stderr
    time.sleep(0.3)                           # the init's next turns read its inbox
    until(lambda: links() == before, what="each closed (the exec's listener gone with it)")
