"""The seccomp filters built by libseccomp (partition/guest/filters.py).

The kernel filter replaced a classic BPF program assembled by hand from x86-64 numbers; the
differential test below runs that old program (frozen here as the reference, the assembler it
was) and the new one on the same system-call records through one BPF interpreter, and asserts
they decide the same for every system call number, the x32 ABI, another architecture and every
interesting argument. Then real forked processes try the calls under the loaded filters."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import struct
import time

import pytest

from partition import linux
from partition.abi.constants import IPI_SIGNAL
from partition.guest import filters

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="the reference program is x86-64's")

# -- the reference: guest/containment.py's hand-assembled program before issue 22 ------------
_NR_OFF, _ARCH_OFF, _ARG0_OFF = 0, 4, 16
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
X32_SYSCALL_BIT = 0x40000000
FORBIDDEN_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "process_mrelease": 448, "pidfd_open": 434, "pidfd_getfd": 438, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "quotactl_fd": 443, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
    "clock_adjtime": 305, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "syslog": 103, "add_key": 248, "request_key": 249, "keyctl": 250, "lookup_dcookie": 212,
    "vhangup": 153, "uselib": 134, "personality": 135, "memfd_secret": 447,
    "migrate_pages": 256, "move_pages": 279,
    "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142,
    "sched_setattr": 314, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "inotify_init": 253, "inotify_init1": 294, "timer_create": 222, "mq_open": 240,
    "fanotify_init": 300, "fanotify_mark": 301,
    "fork": 57, "vfork": 58, "socket": 41, "socketpair": 53, "connect": 42, "bind": 49,
    "listen": 50, "accept": 43, "accept4": 288, "flock": 73,
}
SELF_ONLY_X86_64 = {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                    "rt_tgsigqueueinfo": 297}
PRLIMIT64, FCNTL, IOCTL, CLONE, CLONE3, PIDFD_SEND_SIGNAL = 302, 72, 16, 56, 435, 424
SETPRIORITY, IOPRIO_SET, GET_ROBUST_LIST = 141, 251, 274
CLONE_THREAD = 0x00010000
RET_ERRNO_ENOSYS = 0x00050000 | 38


def _insn(code, jt, jf, k):
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _arg(n):
    return _ARG0_OFF + 8 * n


def _block(nr, body):
    return [(_JEQ_K, 0, len(body), nr), *body]


def _one_of(arg, values, hit, miss):
    out = [(_LD_W_ABS, 0, 0, _arg(arg))]
    for v in values:
        out += [(_JEQ_K, 0, 1, v), (_RET_K, 0, 0, hit)]
    return [*out, (_RET_K, 0, 0, miss)]


def _which_who(process, own_pid):
    return [(_LD_W_ABS, 0, 0, _arg(0)), (_JEQ_K, 1, 0, process), (_RET_K, 0, 0, RET_KILL_PROCESS),
            *_one_of(1, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS)]


def reference_program(own_pid):
    prog = [
        (_LD_W_ABS, 0, 0, _ARCH_OFF),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR_OFF),
        (_JSET_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    for nr in sorted(FORBIDDEN_X86_64.values()):
        prog += _block(nr, [(_RET_K, 0, 0, RET_KILL_PROCESS)])
    for nr in sorted(SELF_ONLY_X86_64.values()):
        prog += _block(nr, _one_of(0, (own_pid,), RET_ALLOW, RET_KILL_PROCESS))
    prog += _block(PRLIMIT64, _one_of(0, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS))
    prog += _block(SETPRIORITY, _which_who(0, own_pid))
    prog += _block(IOPRIO_SET, _which_who(1, own_pid))
    prog += _block(GET_ROBUST_LIST, _one_of(0, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS))
    prog += _block(PIDFD_SEND_SIGNAL, _one_of(1, (int(IPI_SIGNAL),), RET_ALLOW,
                                              RET_KILL_PROCESS))
    prog += _block(FCNTL, _one_of(1, filters.FCNTL_FORBIDDEN, RET_KILL_PROCESS, RET_ALLOW))
    prog += _block(IOCTL, _one_of(1, filters.IOCTL_FORBIDDEN, RET_KILL_PROCESS, RET_ALLOW))
    prog += _block(CLONE, [(_LD_W_ABS, 0, 0, _arg(0)), (_JSET_K, 0, 1, CLONE_THREAD),
                           (_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_KILL_PROCESS)])
    prog += _block(CLONE3, [(_RET_K, 0, 0, RET_ERRNO_ENOSYS)])
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    return b"".join(_insn(*insn) for insn in prog)


# -- a classic BPF interpreter, as the kernel runs a seccomp filter -------------------------
def decide(program: bytes, nr: int, args=(0,) * 6, arch=AUDIT_ARCH_X86_64) -> int:
    """The 32-bit action ``program`` returns for one seccomp_data record."""
    args = (*args, *(0,) * (6 - len(args)))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & ((1 << 64) - 1) for a in args])
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls, src = code & 0x07, code & 0x08
        if code == 0x20:                                   # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:                                 # ld #k
            a = k
        elif code == 0x60:                                 # ld M[k]
            a = mem[k]
        elif code == 0x02:                                 # st M[k]
            mem[k] = a
        elif code == 0x07:                                 # tax
            x = a
        elif code == 0x87:                                 # txa
            a = x
        elif cls == 0x04:                                  # alu
            v = x if src else k
            op = code & 0xF0
            a = {0x50: a & v, 0x40: a | v, 0xA0: a ^ v}[op] & 0xFFFFFFFF
        elif cls == 0x05:                                  # jmp
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            v = x if src else k
            hit = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}[op]
            pc += jt if hit else jf
        elif code == 0x06:                                 # ret #k
            return k
        elif code == 0x16:                                 # ret a
            return a
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")


OWN = 123457
#: values an argument is tried with: the boundaries around every value the policy names
POOL = sorted({0, 1, 2, 3, 5, 9, 15, 16, OWN - 1, OWN, OWN + 1, 0xFFFFFFFF, 0x7FFFFFFF,
               int(IPI_SIGNAL) - 1, int(IPI_SIGNAL), int(IPI_SIGNAL) + 1,
               CLONE_THREAD, CLONE_THREAD | 0x11, 0x11, 0x8900, 0x8901, 0x8902, 0x8903,
               *filters.FCNTL_FORBIDDEN, *(c + 1 for c in filters.FCNTL_FORBIDDEN)})
ARG_DEPENDENT = {*SELF_ONLY_X86_64.values(), PRLIMIT64, FCNTL, IOCTL, CLONE, CLONE3,
                 PIDFD_SEND_SIGNAL, SETPRIORITY, IOPRIO_SET, GET_ROBUST_LIST}


@pytest.fixture(scope="module")
def both():
    return reference_program(OWN), filters.program(filters.kernel_filter(OWN))


def test_kernel_filter_decides_as_the_hand_program_did(both):
    old, new = both
    for nr in range(0, 520):
        assert decide(new, nr) == decide(old, nr), nr
        # x32 ABI and another architecture: killed by both
        assert decide(new, nr | X32_SYSCALL_BIT) == decide(old, nr | X32_SYSCALL_BIT) \
            == RET_KILL_PROCESS
        assert decide(new, nr, arch=AUDIT_ARCH_I386) == RET_KILL_PROCESS
    for nr in sorted(ARG_DEPENDENT):
        for a0 in POOL:
            for a1 in POOL:
                args = (a0, a1, 0, 0, 0, 0)
                assert decide(new, nr, args) == decide(old, nr, args), (nr, a0, a1)


def test_kernel_filter_is_no_laxer_with_a_high_half(both):
    """The old program read the low 32 bits only; the new compares pids on all 64: a high
    half the kernel would ignore may only make it refuse more, never allow what was killed."""
    old, new = both
    for nr in sorted(ARG_DEPENDENT):
        for a0 in POOL:
            for hi in (1 << 32, 0xFFFFFFFF << 32):
                for args in ((a0 | hi, 0, 0, 0, 0, 0), (0, a0 | hi, 0, 0, 0, 0)):
                    if decide(old, nr, args) == RET_KILL_PROCESS:
                        assert decide(new, nr, args) == RET_KILL_PROCESS, (nr, args)


def test_outside_is_the_complement():
    values = (0, 7, 16, 100)
    cmps = filters._outside(0, values)
    for v in [*range(0, 130), 1 << 40, (1 << 64) - 1]:
        hit = False
        for c in cmps:
            op, a, b = c._op, c._data_a, c._data_b
            hit |= {filters.sc.LT: v < a, filters.sc.GT: v > a,
                    filters.sc.MASKED_EQ: (v & a) == b}[op]
        assert hit == (v not in values), v


def test_userland_filter_decisions():
    prog = filters.program(filters.userland_filter())
    nr = {n: filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, n)
          for n in ("socket", "clone", "unshare", "mount", "fork", "kill", "ptrace",
                    "sched_setscheduler", "setpriority", "reboot", "bpf", "setns", "ioctl",
                    "ioprio_set")}
    eperm = 0x00050000 | errno.EPERM
    assert decide(prog, nr["fork"]) == RET_ALLOW
    assert decide(prog, nr["kill"], (1, 9)) == RET_ALLOW
    assert decide(prog, nr["ptrace"]) == RET_ALLOW
    for refused in ("mount", "reboot", "bpf", "setns"):
        assert decide(prog, nr[refused]) == eperm, refused
    for family, ok in ((1, True), (2, True), (10, True), (16, True), (17, False), (0, False),
                       (3, False), (38, False), (1 | 1 << 32, False)):
        assert (decide(prog, nr["socket"], (family, 1, 0)) == RET_ALLOW) == ok, family
    assert decide(prog, nr["socket"], (2, 3, 1)) == eperm                 # SOCK_RAW
    assert decide(prog, nr["socket"], (2, 1 | 0x80000, 0)) == RET_ALLOW   # SOCK_CLOEXEC
    assert decide(prog, nr["socket"], (10, 3, 58)) == eperm               # raw ICMPv6
    assert decide(prog, nr["socket"], (16, 3, 0)) == RET_ALLOW            # ip(8)'s netlink
    assert decide(prog, nr["socket"], (16, 2, 9)) == eperm                # netlink audit
    assert decide(prog, nr["socket"], (16, 2, 0)) == RET_ALLOW            # netlink route
    assert decide(prog, nr["clone"], (0x01200011,)) == RET_ALLOW          # fork's flags
    assert decide(prog, nr["clone"], (0x10000011,)) == eperm              # CLONE_NEWUSER
    assert decide(prog, nr["unshare"], (0x400,)) == RET_ALLOW             # CLONE_FILES
    assert decide(prog, nr["unshare"], (0x20000000,)) == eperm            # CLONE_NEWPID
    assert decide(prog, nr["sched_setscheduler"], (0, 0)) == RET_ALLOW
    for policy in (1, 2, 6, 1 | 0x40000000):
        assert decide(prog, nr["sched_setscheduler"], (0, policy)) == eperm
    assert decide(prog, nr["setpriority"], (2, 0, 19)) == eperm           # PRIO_USER
    assert decide(prog, nr["setpriority"], (0, 0, 19)) == RET_ALLOW
    # ``which`` is an int: the kernel reads 0x100000002 as PRIO_USER, so must the filter
    assert decide(prog, nr["setpriority"], (2 | 1 << 32, 0, 19)) == eperm
    assert decide(prog, nr["ioprio_set"], (3 | 1 << 32, 0, 0)) == eperm   # IOPRIO_WHO_USER
    assert decide(prog, nr["ioprio_set"], (3, 0, 0)) == eperm
    assert decide(prog, nr["ioprio_set"], (1, 0, 0)) == RET_ALLOW         # IOPRIO_WHO_PROCESS
    assert decide(prog, nr["socket"], (2 | 1 << 32, 3, 1)) == eperm       # raw IP, high half
    assert decide(prog, nr["ioctl"], (0, 0x5412)) == eperm                # TIOCSTI
    # uid 0's per-user budgets, shared with the host: refused as if spent
    for name, error in (("inotify_init1", errno.EMFILE), ("mq_open", errno.EMFILE),
                        ("timer_create", errno.EAGAIN), ("fanotify_init", errno.EPERM)):
        nr_ = filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, name)
        assert decide(prog, nr_) == 0x00050000 | error, name
    assert decide(prog, filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, "pidfd_getfd")) \
        == eperm
    assert decide(prog, nr["ioctl"], (0, 0x5413)) == RET_ALLOW            # TIOCGWINSZ


def _child(body) -> int:
    """Run ``body`` in a forked child under no_new_privs; its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)        # PR_SET_NO_NEW_PRIVS
            body()
            os._exit(0)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(99)
    return os.waitpid(pid, 0)[1]


@pytest.mark.system
def test_loaded_kernel_filter_kills_a_real_process():
    def signal_another():
        filters.install(filters.kernel_filter(os.getpid()))
        os.kill(os.getpid(), 0)                            # itself: allowed
        os.kill(1, 0)

    def fork():
        filters.install(filters.kernel_filter(os.getpid()))
        os.fork()

    def thread_ok():
        import threading
        filters.install(filters.kernel_filter(os.getpid()))
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    for body in (signal_another, fork):
        status = _child(body)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    assert _child(thread_ok) == 0


@pytest.mark.system
def test_loaded_userland_filter_refuses_without_killing():
    def body():
        filters.install(filters.userland_filter())
        pid = os.fork()                                    # allowed
        if pid == 0:
            os._exit(7)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM):
            pass
        for family, kind in ((socket.AF_PACKET, socket.SOCK_RAW),
                             (socket.AF_INET, socket.SOCK_RAW)):
            try:
                socket.socket(family, kind)
            except PermissionError:
                pass
            else:
                raise AssertionError("a raw socket was opened")
        try:
            linux.unshare(0x10000000)          # CLONE_NEWUSER
        except PermissionError:
            pass
        else:
            raise AssertionError("a user namespace was made")
    assert _child(body) == 0


def test_measured(both):
    """Program lengths and build times of the two kernel filters, side by side in one
    process (the figures the commit quotes; printed with -s)."""
    old, new = both
    t0 = time.perf_counter()
    for _ in range(20):
        reference_program(OWN)
    t1 = time.perf_counter()
    for _ in range(20):
        filters.program(filters.kernel_filter(OWN))
    t2 = time.perf_counter()
    print(f"\nhand: {len(old) // 8} insns, {(t1 - t0) / 20 * 1e3:.2f} ms; "
          f"libseccomp: {len(new) // 8} insns, {(t2 - t1) / 20 * 1e3:.2f} ms; "
          f"userland: {len(filters.program(filters.userland_filter())) // 8} insns")
    assert len(new) // 8 < 4096                            # BPF_MAXINSNS
