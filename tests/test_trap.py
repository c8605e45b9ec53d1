"""The seccomp trap (partition/bridge/trap.py) with real processes: a child makes kerf's calls
through ctypes exactly as kerf does, and the test, as supervisor, answers them. None of these
calls may ever reach the kernel: every child checks that it runs under a seccomp filter before
its first call, and the filter goes on before exec."""

import contextlib
import errno
import json
import os
import select
import stat
import struct
import subprocess
import sys
import time

import pytest

from helpers import no_descriptor_leaked

from partition.bridge.trap import (
    MAX_READ,
    PAGE_SIZE,
    RET_ALLOW,
    RET_KILL_PROCESS,
    RET_USER_NOTIF,
    SYSCALLS,
    Call,
    Trap,
    TrapError,
    notify_program,
    spawn_trapped,
)

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not SYSCALLS, reason="no system call table for this architecture")]

MAGIC1, MAGIC2 = 0xFEE1DEAD, 672274793
MK_START, MK_HALT, MK_FORCE_HALT = 0x4D4B4C49, 0x4D4B4C48, 0x4D4B4C46
KEXEC_UNLOAD, KEXEC_NO_INITRAMFS, KEXEC_MULTIKERNEL = 0x1, 0x4, 0x10
MK_ID = 7
CMDLINE = b"console=mktty0"

#: shared by every child: the safety check, then ``call(tag, name, *args)`` printing one JSON
#: line [tag, return value, errno] per call
PRELUDE = r'''
import ctypes, json, os, sys
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
if status.get("Seccomp", "").strip() != "2" or status.get("NoNewPrivs", "").strip() != "1":
    sys.exit(97)                 # not under the filter: never make a call that could reboot
NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long

def call(tag, name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(L(NR[name]), *args)
    print(json.dumps([tag, rc, ctypes.get_errno() if rc == -1 else 0]), flush=True)
    return rc
'''

KERF = PRELUDE + r'''
path = sys.argv[2]
mk = ctypes.c_int(7)
call("start", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C49), ctypes.byref(mk))
fd = os.open(path, os.O_RDONLY)
cmdline = b"console=mktty0"
call("load", "kexec_file_load", L(fd), L(-1), L(len(cmdline) + 1), ctypes.c_char_p(cmdline),
     L(0x10 | (7 << 5) & 0xFFE0 | 0x4))
call("unload", "kexec_file_load", L(-1), L(-1), L(0), None, L(0x1 | 0x10 | 7 << 5))
call("mount", "mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/nonexistent-mk"),
     ctypes.c_char_p(b"multikernel"), L(0), None)
call("unknown", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C00), ctypes.byref(mk))
call("bogus", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C48), L(0x10))
'''


def s32(raw: int) -> int:
    """An int argument as the kernel reads it: the low 32 bits, signed."""
    raw &= 0xFFFFFFFF
    return raw - (1 << 32) if raw & 0x80000000 else raw


@contextlib.contextmanager
def trapped(source, *extra, names=tuple(SYSCALLS), **kwargs):
    """A child running ``source`` under the trap; killed, reaped and closed whatever happens."""
    argv = [sys.executable, "-c", source, json.dumps(SYSCALLS), *extra]
    kwargs.setdefault("stdout", subprocess.PIPE)
    proc, trap = spawn_trapped(argv, names, stderr=subprocess.PIPE, **kwargs)
    try:
        yield proc, trap
    finally:
        trap.close()         # a call still waiting fails ENOSYS and the child goes on
        with proc:
            if proc.poll() is None:
                proc.kill()


def serve(proc, trap, handle, timeout=30.0):
    """Answer calls until the child exits; its JSON lines by tag."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "the child did not finish"
        select.select([trap], [], [], 0.1)
        call = trap.receive()
        if call is not None:
            handle(call)
        elif proc.poll() is not None:
            break
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, (proc.returncode, err.decode())
    return {tag: (rc, e) for tag, rc, e in map(json.loads, out.decode().splitlines())}


def next_call(proc, trap, timeout=10.0) -> Call:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([trap], [], [], 0.1)
        call = trap.receive()
        if call is not None:
            return call
        assert proc.poll() is None, proc.communicate()
    raise AssertionError("no trapped call came")


def test_kerfs_calls_are_answered_by_the_supervisor(tmp_path):
    image = tmp_path / "vmlinuz"
    image.write_bytes(os.urandom(5000) + b"multikernel image")
    seen = {}

    def handle(trap, call):
        a = call.args
        if call.name == "reboot":
            assert (a[0] & 0xFFFFFFFF, s32(a[1])) == (MAGIC1, MAGIC2)
            cmd = a[2] & 0xFFFFFFFF
            if cmd not in (MK_START, MK_HALT, MK_FORCE_HALT):
                seen.setdefault("unknown", cmd)
                return trap.reply(call, error=errno.EINVAL)
            try:
                mk_id = int.from_bytes(trap.read_memory(call, a[3], 4), "little", signed=True)
            except TrapError as exc:
                seen["bogus"] = (cmd, a[3], exc.errno)
                return trap.reply(call, error=exc.errno)
            seen["start"] = (cmd, mk_id)
        elif call.name == "kexec_file_load":
            flags = a[4]
            if flags & KEXEC_UNLOAD:
                seen["unload"] = (s32(a[0]), s32(a[1]), a[2], a[3], flags, (flags & 0xFFE0) >> 5)
            else:
                fd = trap.take_fd(call, s32(a[0]))
                try:
                    assert not os.get_inheritable(fd) and stat.S_ISREG(os.fstat(fd).st_mode)
                    content = os.pread(fd, MAX_READ, 0)
                finally:
                    os.close(fd)
                cmdline = trap.read_string(call, a[3], limit=a[2])
                seen["load"] = (content, s32(a[1]), a[2], cmdline, flags, (flags & 0xFFE0) >> 5)
        elif call.name == "mount":
            seen["mount"] = (trap.read_string(call, a[0]), trap.read_string(call, a[1]),
                             trap.read_string(call, a[2]), a[3], a[4])
        else:
            raise AssertionError(call)
        assert trap.valid(call)
        trap.reply(call)

    with trapped(KERF, str(image)) as (proc, trap):
        results = serve(proc, trap, lambda call: handle(trap, call))
    assert seen == {
        "start": (MK_START, MK_ID),
        "load": (image.read_bytes(), -1, len(CMDLINE) + 1, CMDLINE,
                 KEXEC_MULTIKERNEL | MK_ID << 5 | KEXEC_NO_INITRAMFS, MK_ID),
        "unload": (-1, -1, 0, 0, KEXEC_UNLOAD | KEXEC_MULTIKERNEL | MK_ID << 5, MK_ID),
        "mount": (b"none", b"/nonexistent-mk", b"multikernel", 0, 0),
        "unknown": 0x4D4B4C00,
        "bogus": (MK_HALT, 0x10, errno.EFAULT),
    }
    assert results == {"start": (0, 0), "load": (0, 0), "unload": (0, 0), "mount": (0, 0),
                       "unknown": (-1, errno.EINVAL), "bogus": (-1, errno.EFAULT)}


STRINGS = PRELUDE + r'''
page = int(sys.argv[2])
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
base = libc.mmap(None, 2 * page, 3, 0x22, -1, 0)        # PROT_READ|WRITE, PRIVATE|ANONYMOUS
assert libc.munmap(ctypes.c_void_p(base + page), ctypes.c_size_t(page)) == 0

def mount(tag, source):
    call(tag, "mount", L(source), ctypes.c_char_p(b"/nonexistent-mk"),
         ctypes.c_char_p(b"multikernel"), L(0), None)

fits, over = ctypes.create_string_buffer(b"a" * 4095), ctypes.create_string_buffer(b"b" * 4096)
mount("fits", ctypes.addressof(fits))
mount("over", ctypes.addressof(over))
ctypes.memmove(base + page - 6, b"edge\0", 5)         # ends just before the unmapped page
mount("edge", base + page - 6)
ctypes.memmove(base + page - 4, b"cut!", 4)            # runs into it
mount("cut", base + page - 4)
mount("huge", base)
'''


def test_read_string_is_bounded_and_stops_at_the_first_nul():
    seen = {}
    tags = iter(["fits", "over", "edge", "cut", "huge"])

    def handle(trap, call):
        tag = next(tags)
        try:
            if tag == "huge":
                trap.read_memory(call, call.args[0], MAX_READ + 1)
            value = trap.read_string(call, call.args[0], limit=4096)
        except TrapError as exc:
            seen[tag] = exc.errno
            return trap.reply(call, error=exc.errno)
        seen[tag] = value
        trap.reply(call, value=len(value))

    with trapped(STRINGS, str(PAGE_SIZE)) as (proc, trap):
        results = serve(proc, trap, lambda call: handle(trap, call))
    assert seen == {"fits": b"a" * 4095, "over": errno.ENAMETOOLONG, "edge": b"edge",
                    "cut": errno.EFAULT, "huge": errno.EINVAL}
    assert results == {"fits": (4095, 0), "over": (-1, errno.ENAMETOOLONG), "edge": (4, 0),
                       "cut": (-1, errno.EFAULT), "huge": (-1, errno.EINVAL)}


OTHERS = PRELUDE + r'''
print(json.dumps(["pid", os.getpid(), 0]), flush=True)
print(json.dumps(["ppid", os.getppid(), 0]), flush=True)
call("mount", "mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/nonexistent-mk"),
     ctypes.c_char_p(b"multikernel"), L(0), None)
'''


def test_calls_outside_the_list_run_and_a_reply_value_comes_back():
    calls = []

    def handle(trap, call):
        calls.append(call.name)
        trap.reply(call, value=123)

    with trapped(OTHERS, names=["mount"]) as (proc, trap):
        results = serve(proc, trap, lambda call: handle(trap, call))
        assert results == {"pid": (proc.pid, 0), "ppid": (os.getpid(), 0), "mount": (123, 0)}
    assert calls == ["mount"]


def test_a_call_not_trapped_reaches_the_kernel():
    """With only reboot trapped, mount is the kernel's (and fails: no such mount point)."""
    with trapped(OTHERS, names=["reboot"]) as (proc, trap):
        results = serve(proc, trap, lambda call: pytest.fail(f"trapped {call}"))
    assert results["mount"] == (-1, errno.ENOENT)


PENDING = PRELUDE + r'''
import threading
mk = ctypes.c_int(7)
threading.Thread(target=call, daemon=True,
                 args=("start", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C49),
                       ctypes.byref(mk))).start()
sys.stdin.read(1)          # the supervisor holds the call
os._exit(0)
'''


def test_a_caller_that_exits_with_its_call_pending():
    with trapped(PENDING, stdin=subprocess.PIPE) as (proc, trap):
        call = next_call(proc, trap)
        assert call.name == "reboot" and call.pid != proc.pid       # from the thread
        assert trap.read_memory(call, call.args[3], 4) == MK_ID.to_bytes(4, "little")
        fd = trap.take_fd(call, 0)                  # by the thread's pid: its stdin pipe
        try:
            assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        proc.stdin.write(b"x")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
        assert not trap.valid(call)
        trap.reply(call)                            # the caller is gone: no error
        assert trap.receive() is None
        with pytest.raises(TrapError):
            trap.read_memory(call, call.args[3], 4)
        with pytest.raises(TrapError) as taken:
            trap.take_fd(call, 0)
        assert taken.value.errno == errno.EBADF


def test_a_caller_killed_before_its_call_is_received():
    source = PRELUDE + 'call("start", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C49), L(0))\n'
    with trapped(source) as (proc, trap):
        r, _, _ = select.select([trap], [], [], 10)
        assert r, "no call came"
        proc.kill()
        proc.wait(timeout=10)
        assert trap.receive() is None


def test_closing_the_listener_fails_the_call_with_enosys():
    source = PRELUDE + 'call("start", "reboot", L(0xFEE1DEAD), L(672274793), L(0x4D4B4C49), L(0))\n'
    with trapped(source) as (proc, trap):
        select.select([trap], [], [], 10)
        trap.close()
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out) == ["start", -1, errno.ENOSYS]


def test_the_program_traps_only_the_named_calls_and_checks_the_architecture():
    prog = notify_program(["reboot", "mount", "reboot"])
    insns = [prog[i:i + 8] for i in range(0, len(prog), 8)]
    ret_k = [int.from_bytes(i[4:], "little") for i in insns if i[:2] == b"\x06\x00"]
    assert ret_k[0] == RET_KILL_PROCESS and ret_k[-1] == RET_ALLOW
    assert ret_k.count(RET_USER_NOTIF) == 2
    jeq = {int.from_bytes(i[4:], "little") for i in insns if i[:2] == b"\x15\x00"}
    assert {SYSCALLS["reboot"], SYSCALLS["mount"]} <= jeq
    assert SYSCALLS["kexec_file_load"] not in jeq
    with pytest.raises(ValueError):
        notify_program(["reboot", "no_such_call"])


def test_bounds_are_checked_before_any_read():
    trap = Trap(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), os.getpid())
    call = Call(1, os.getpid(), "mount", (0, 0, 0, 0, 0, 0))
    try:
        for bad in (lambda: trap.read_memory(call, 0x1000, MAX_READ + 1),
                    lambda: trap.read_string(call, 0x1000, limit=0),
                    lambda: trap.read_string(call, 0x1000, limit=MAX_READ + 1)):
            with pytest.raises(TrapError) as exc:
                bad()
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(TrapError) as exc:
            trap.read_memory(call, 0, 8)
        assert exc.value.errno == errno.EFAULT
        with pytest.raises(ValueError):
            trap.reply(call, error=-1)
    finally:
        trap.close()
    trap.close()                                    # twice is harmless
    with pytest.raises(ValueError):
        trap.receive()


def test_spawn_failure_leaves_nothing_behind():
    with no_descriptor_leaked(), pytest.raises(FileNotFoundError):
        spawn_trapped(["/nonexistent/kerf"], SYSCALLS)


def test_a_child_whose_filter_cannot_go_on_never_runs(tmp_path):
    """The listener fails to install (here a first filter makes seccomp(2) fail with EPERM):
    spawn_trapped raises with the child's reason, and the program was never executed."""
    from partition import linux

    def _insn(code, jt, jf, k):
        return struct.pack("<HBBI", code, jt, jf, k)

    refuse_seccomp = b"".join([
        _insn(0x20, 0, 0, 0),                                   # ld nr
        _insn(0x15, 0, 1, {"x86_64": 317, "aarch64": 277}[os.uname().machine]),
        _insn(0x06, 0, 0, 0x00050000 | errno.EPERM),            # ret ERRNO(EPERM)
        _insn(0x06, 0, 0, RET_ALLOW),
    ])

    def first_filter():
        linux.prctl(38, 1)                                      # PR_SET_NO_NEW_PRIVS
        linux.install_seccomp(refuse_seccomp)

    proof = tmp_path / "ran"
    with no_descriptor_leaked():
        with pytest.raises(TrapError) as exc:
            spawn_trapped(["/bin/touch", str(proof)], SYSCALLS, preexec_fn=first_filter)
    assert exc.value.errno == errno.EPERM and "seccomp" in str(exc.value)
    assert not proof.exists()
