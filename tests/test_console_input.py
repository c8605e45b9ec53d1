"""Console input (issue 22, item 6): a line typed on an instance's console reaches its kernel's
``on_console_input`` (the real mktty's input), through ``mkctl console -i`` or, at a terminal,
``mkctl console -f``; refusals change nothing; a hook's failure is its kernel's alone."""

import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import helpers
import msgpack
import pytest
from helpers import MKCTL, mk, wait_until

from partition.abi.console import INPUT_LINE_MAX
from partition.control.console import LineReader, TooLong
from partition.errors import ConsoleLineTooLong, ConsoleNotText, NotLoaded
from partition.host.consoleinput import check_line

HERE = os.path.dirname(os.path.abspath(__file__))
CPUS = sorted(os.sched_getaffinity(0))
TYPIST = os.path.join(HERE, "kernels", "typist.py") + ":Typist"
TTY = "kernels.tty:TtyKernel"


# -- helpers ----------------------------------------------------------------------------------
def init(run_dir):
    mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
       "--memory", "128M", "--oversubscribe")


def up(run_dir, name, kernel=TTY, cmdline=""):
    mk(run_dir, "create", name, "--cpus", str(CPUS[-1]), "--memory", "8M")
    mk(run_dir, "load", name, "--kernel", kernel, *(["--cmdline", cmdline] if cmdline else []))
    mk(run_dir, "start", name)


def show(run_dir, name):
    return json.loads(mk(run_dir, "show", name, "--format", "json").stdout)


def console(run_dir, name):
    return mk(run_dir, "console", name, "--raw").stdout


def until(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.05)


def events(run_dir, name):
    with open(os.path.join(run_dir, "events.log")) as f:
        return [e for e in map(json.loads, filter(str.strip, f)) if e["event"] == name]


def typed(run_dir, name, data: bytes, *flags):
    """``mkctl console -i NAME`` with ``data`` piped in (bytes: bad UTF-8 included)."""
    return subprocess.run(MKCTL + ["--run-dir", run_dir, "console", "-i", *flags, name],
                          input=data, capture_output=True, timeout=60)


def raw_call(run_dir, request):
    """One frame on the supervisor's socket, as any client could write it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.path.join(run_dir, "mkctl.sock"))
        data = msgpack.packb(request, use_bin_type=True)
        s.sendall(struct.pack(">I", len(data)) + data)
        n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        return msgpack.unpackb(s.recv(n, socket.MSG_WAITALL), raw=False)


def unchanged(run_dir, name):
    """What a refused line must leave as it was: the instance's state, its console, the lines
    counted and sent, the console_input events."""
    s = show(run_dir, name)
    return (s["state"], console(run_dir, name), s["counters"]["console_lines"],
            s["counters"]["host_sent"], len(events(run_dir, "console_input")))


# -- mkctl console -i --------------------------------------------------------------------------
@pytest.mark.system
def test_a_piped_line_reaches_the_kernel_hook(run_dir):
    init(run_dir)
    up(run_dir, "t")
    until(lambda: "tty kernel: type a line" in console(run_dir, "t"), "boot line")
    p = typed(run_dir, "t", b"hello\nuptime\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    # the log first, then what the kernel answered (shown within the drain after EOF)
    assert out.index("tty kernel: type a line") < out.index("console: hello") < \
        out.index("console: uptime")
    text = console(run_dir, "t")
    assert "console: hello" in text and "2 line(s) typed" in text
    s = show(run_dir, "t")
    assert s["counters"]["console_lines"] == 2 and s["metrics"]["console_lines"] == 2
    with open(os.path.join(run_dir, "sys/fs/multikernel/instances/t/counters")) as f:
        assert "console_lines 2\n" in f.read()                  # the views count it too
    ev = events(run_dir, "console_input")
    assert [(e["name"], e["bytes"], e["userland"]) for e in ev] == [("t", 5, False), ("t", 6, False)]
    with open(os.path.join(run_dir, "events.log")) as f:
        assert "hello" not in f.read()                           # lengths, never content
    # a last line without its newline is a line; an empty input sends nothing and ends at once
    assert typed(run_dir, "t", "café".encode()).returncode == 0
    until(lambda: "console: café" in console(run_dir, "t"), "the unterminated line")
    assert typed(run_dir, "t", b"").returncode == 0
    assert show(run_dir, "t")["counters"]["console_lines"] == 3
    # NAME may be the instance's id, as for every verb
    assert typed(run_dir, str(show(run_dir, "t")["id"]), b"by id\n").returncode == 0
    until(lambda: "console: by id" in console(run_dir, "t"), "the line typed by id")


@pytest.mark.system
def test_refused_lines_exit_1_and_change_nothing(run_dir):
    """Too long, not UTF-8, more than one line is impossible by pipe (it splits), a halted
    instance: each a refusal (mkctl's code for one: 1) that says what is wrong and the fix,
    and nothing moves: no line counted, no command sent, nothing printed by the kernel."""
    init(run_dir)
    up(run_dir, "t")
    until(lambda: "tty kernel: type a line" in console(run_dir, "t"), "boot line")
    cases = [
        (b"x" * (INPUT_LINE_MAX + 1) + b"\n", f"console input of {INPUT_LINE_MAX + 1} bytes: "
                                              f"a line is at most {INPUT_LINE_MAX} bytes"),
        (b"y" * 100_000, "console input of 100000 bytes"),     # never held whole by mkctl
        (b"\xff\xfeabc\n", "not UTF-8 text: byte 0 (0xff)"),
        (b"ok\xc3\n", "not UTF-8 text: byte 2 (0xc3)"),
    ]
    for data, words in cases:
        before = unchanged(run_dir, "t")
        p = typed(run_dir, "t", data)
        err = p.stderr.decode()
        assert p.returncode == 1, (data[:20], err)
        assert "error:" in err and "fix:" in err and words in err, err
        assert unchanged(run_dir, "t") == before
    mk(run_dir, "kill", "t")
    before = unchanged(run_dir, "t")
    p = typed(run_dir, "t", b"anyone there?\n")
    err = p.stderr.decode()
    assert p.returncode == 1 and "instance 't' is loaded" in err and "mkctl start t" in err, err
    assert unchanged(run_dir, "t") == before
    # and a name that is no instance, and the host's console (its own log, never typed on)
    p = typed(run_dir, "nope", b"hi\n")
    assert p.returncode == 1 and "no instance named 'nope'" in p.stderr.decode()
    for host in ("host", "0"):
        p = typed(run_dir, host, b"hi\n")
        assert p.returncode == 1 and "the host's console takes no input" in p.stderr.decode()
        assert p.stdout == b""                      # refused before anything is read or sent


@pytest.mark.system
def test_a_hook_that_raises_panics_only_its_instance(run_dir):
    init(run_dir)
    up(run_dir, "a", TYPIST)
    up(run_dir, "b")
    p = typed(run_dir, "a", b"first\nboom\n")
    assert p.returncode == 0, p.stderr                  # delivered; what the kernel does is its own
    until(lambda: show(run_dir, "a")["state"] != "active", "a's panic")
    a = show(run_dir, "a")
    assert a["last_exit"]["how"] == "panic", a["last_exit"]
    assert "the hook blew up" in a["last_exit"]["reason"]
    assert "typist: first" in console(run_dir, "a")
    # its neighbour and the host go on: b answers, the supervisor serves
    assert show(run_dir, "b")["state"] == "active"
    assert typed(run_dir, "b", b"still here\n").returncode == 0
    until(lambda: "console: still here" in console(run_dir, "b"), "b's answer")
    assert show(run_dir, "b")["last_exit"] is None


@pytest.mark.system
def test_a_peer_cannot_type_on_another_console(run_dir):
    """MKTY input is a host command: a peer that sends one (as itself, with command numbers
    the host may use) is ignored and counted as a forgery; the hook never sees it."""
    init(run_dir)
    up(run_dir, "t")
    up(run_dir, "f", TYPIST, "forge=t")
    until(lambda: "typist: forged MKTY input to t" in console(run_dir, "f"), "the forgery")
    until(lambda: show(run_dir, "t")["counters"]["forged_commands"] >= 3, "t counting forgeries")
    text = console(run_dir, "t")
    assert "not from the host, ignored" in text and "console: forged" not in text
    assert show(run_dir, "t")["counters"]["console_lines"] == 0


@pytest.mark.system
def test_a_bad_console_input_frame_harms_only_its_sender(run_dir):
    """Every field is checked before the verb runs; a bad frame is refused to its sender by
    name (EINVAL), the host's refusals of a line's meaning come back as theirs, and the same
    supervisor serves the next client as before."""
    init(run_dir)
    up(run_dir, "t")
    before = unchanged(run_dir, "t")
    for args, field in [({"name": "t", "data": 5}, "data"),
                        ({"name": "t", "data": [b"x"]}, "data"),
                        ({"name": "t", "data": b"x" * 5000}, "data"),
                        ({"name": ["t"], "data": b"x"}, "name"),
                        ({"name": "t"}, "data"),
                        ({"data": b"x"}, "name"),
                        ({"name": "t", "data": b"x", "echo": True}, "echo")]:
        r = raw_call(run_dir, {"op": "console_input", "args": args})
        assert r["ok"] is False and r["error"]["class"] == "InvalidSpec", (args, r)
        assert repr(field) in r["error"]["message"], (args, r)
    for data, cls in [(b"\xff\n", "ConsoleNotText"),
                      (b"x" * (INPUT_LINE_MAX + 1), "ConsoleLineTooLong"),
                      (b"one\ntwo\n", "ConsoleLineTooLong")]:
        r = raw_call(run_dir, {"op": "console_input", "args": {"name": "t", "data": data}})
        assert r["ok"] is False and r["error"]["class"] == cls, (data[:20], r)
    r = raw_call(run_dir, {"op": "console_input", "args": {"name": "nope", "data": b"x"}})
    assert r["error"]["class"] == "NoSuchInstance"
    assert unchanged(run_dir, "t") == before
    r = raw_call(run_dir, {"op": "console_input", "args": {"name": "t", "data": "fine\r\n"}})
    assert r["ok"] is True and r["result"] == {"name": "t", "bytes": 4, "kernel": True,
                                               "userland": False}
    until(lambda: "console: fine\n" in console(run_dir, "t"), "the good line")


@pytest.mark.system
def test_follow_alone_reads_no_input_and_ctrl_c_ends_it(run_dir):
    init(run_dir)
    up(run_dir, "t")
    p = subprocess.Popen(MKCTL + ["--run-dir", run_dir, "console", "-f", "t"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"not for the kernel\n")
        p.stdin.flush()
        until(lambda: "tty kernel: type a line" in console(run_dir, "t"), "boot line")
        time.sleep(1.0)                    # -f reads its console all this time, never stdin
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert b"tty kernel: type a line" in out
    assert "not for the kernel" not in console(run_dir, "t")
    assert show(run_dir, "t")["counters"]["console_lines"] == 0


def _at_terminal(run_dir, keys, ending):
    """``mkctl console -f t`` on a pty, as a person at a terminal: each of ``keys`` typed
    after a pause, then ``ending`` (Ctrl-D or Ctrl-C); what the terminal showed, and the exit
    status."""
    pid, fd = pty.fork()
    if pid == 0:                                    # (the child: mkctl, on the pty's slave)
        try:
            os.execv(sys.executable, MKCTL + ["--run-dir", run_dir, "console", "-f", "t"])
        finally:
            os._exit(127)
    shown = bytearray()
    reaped = False

    def pump(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    shown.extend(os.read(fd, 65536))
                except OSError:                     # (the child is gone: EIO)
                    return
    try:
        pump(1.5)
        for k in keys:
            os.write(fd, k)
            pump(0.5)
        os.write(fd, ending)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pump(0.2)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                return shown.decode(errors="replace"), os.waitstatus_to_exitcode(status)
        raise AssertionError(f"mkctl console -f did not end: {shown[-500:]!r}")
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.system
def test_at_a_terminal_follow_is_two_way(run_dir):
    """At a terminal a person types: each line goes when Enter is pressed, a refused one is
    said and the session goes on; Ctrl-D ends it (after the drain), Ctrl-C too."""
    init(run_dir)
    up(run_dir, "t")
    until(lambda: "tty kernel: type a line" in console(run_dir, "t"), "boot line")
    shown, status = _at_terminal(run_dir, [b"hi there\n", b"z" * 3000 + b"\n", b"uptime\n"],
                                 b"\x04")
    assert status == 0, shown[-500:]
    assert "line not sent: console input of 3000 bytes" in shown
    assert "console: hi there" in shown and "console: uptime" in shown     # shown as it came
    text = console(run_dir, "t")
    assert "console: hi there" in text and "2 line(s) typed" in text and "zzz" not in text
    shown, status = _at_terminal(run_dir, [b"again\n"], b"\x03")
    assert status == 0 and "console: again" in shown, shown[-500:]
    assert show(run_dir, "t")["counters"]["console_lines"] == 3


# -- the host's side, in process: the userland's seam ----------------------------------------
@pytest.mark.system
def test_console_input_feeds_the_userland_sinks(machine):
    """``console_in.sinks``: where the userland's /dev/console is wired in (its ``feed``). A
    sink gets the line with its newline after the kernel got it; ``userland`` says whether one
    took it; a sink whose console went away is logged, and the kernel still had its line."""
    helpers.up(machine, "t", TTY)
    fed = []
    machine.console_in.sinks.append(lambda name, data: fed.append((name, data)) or True)
    assert machine.console_input("t", "ls -l\n")["userland"] is True
    assert fed == [("t", b"ls -l\n")]

    def gone(name, data):
        raise BrokenPipeError(32, "its console went away")
    machine.console_in.sinks[:] = [gone]
    assert machine.console_input("t", "again")["userland"] is False
    wait_until(machine, lambda: "console: again" in machine.console("t"))
    assert machine.show("t")["counters"]["console_lines"] == 2
    machine.kill("t")
    machine.console_in.sinks[:] = [lambda name, data: fed.append((name, data)) or True]
    with pytest.raises(NotLoaded):
        machine.console_input("t", "late")
    assert fed == [("t", b"ls -l\n")]           # a refused line reaches no userland either


@pytest.mark.system
def test_a_typed_line_reaches_the_kernel_and_the_userland_console(machine):
    """Once the instance-wide userland is wired in (``console_in.sinks`` holds its ``feed``:
    host/consoleinput.py), one line reaches both: the kernel's hook and a program reading the
    userland's /dev/console."""
    import inspect
    if "programs" not in inspect.signature(type(machine).load).parameters:
        pytest.skip("the instance-wide userland (issue 22, helper ul) is not merged yet")
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", TTY, "", programs=[
        ["/bin/sh", "-c", 'echo ready > /dev/console; read line < /dev/console; '
                          'echo "got $line" > /dev/console']])
    m.exec("a")
    wait_until(m, lambda: "[console] ready" in m.console("a"))
    assert m.console_input("a", "hello\n")["userland"] is True
    wait_until(m, lambda: "[console] got hello" in m.console("a"))
    # the kernel's answer too: in its own time (its printk and the program's line race)
    wait_until(m, lambda: "console: hello" in m.console("a"))


# -- mkctl's reader, alone ---------------------------------------------------------------------
def test_the_line_reader_bounds_what_it_holds():
    r = LineReader(limit=8)
    assert r.feed(b"ab") == [] and r.feed(b"c\r\nde") == [b"abc\r\n"]
    assert r.feed(b"f\n12345678\n") == [b"def\n", b"12345678\n"]
    assert r.feed(b"123456789\n") == [TooLong(9)]
    assert r.feed(b"x" * 20) == [] and len(r._buf) == 0         # dropped as it comes
    assert r.feed(b"x" * 5 + b"\nok") == [TooLong(25)]
    assert r.feed(b"") == [b"ok\n"] and r.eof
    r = LineReader(limit=8)
    assert r.feed(b"y" * 30) == [] and r.feed(b"") == [TooLong(30)]
    assert LineReader().feed(b"") == []


@pytest.mark.system
def test_a_line_its_ring_slot_cannot_carry_is_refused_before_it_is_sent(machine_factory):
    """On a machine of small ring slots the bound is the slot's: said with the size and the
    fix, and no command is numbered or sent for it."""
    cpus = sorted(os.sched_getaffinity(0))
    m = machine_factory(cpus=cpus, memory="64M", host_cpus=[cpus[0]], oversubscribe=True,
                        ring_slot_bytes=512)
    helpers.up(m, "t", TTY)
    sent = m.show("t")["counters"]["host_sent"]
    with pytest.raises(ConsoleLineTooLong, match="does not fit this machine's 512-byte ring"):
        m.console_input("t", "x" * 1000)
    assert m.show("t")["counters"]["host_sent"] == sent
    assert m.show("t")["counters"]["console_lines"] == 0
    m.console_input("t", "y" * 400)
    wait_until(m, lambda: "console: " + "y" * 400 in m.console("t"))


def test_the_host_judges_a_line_as_documented():
    assert check_line(b"ls -l\r\n") == "ls -l" and check_line("ls\n") == "ls"
    assert check_line(b"") == "" and check_line(b"\n") == "" and check_line(b"a\rb") == "a\rb"
    assert check_line("é" * (INPUT_LINE_MAX // 2)) == "é" * (INPUT_LINE_MAX // 2)
    for bad, cls in [("é" * (INPUT_LINE_MAX // 2) + "x", ConsoleLineTooLong),
                     (b"a\nb", ConsoleLineTooLong), (b"a\n\n", ConsoleLineTooLong),
                     (b"\xc3", ConsoleNotText), ("\udcff", ConsoleNotText),
                     (b"\xed\xa0\x80", ConsoleNotText)]:          # (a UTF-8 surrogate)
        with pytest.raises(cls):
            check_line(bad)
