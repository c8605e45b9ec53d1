"""The init of an instance's userland, and the records it sends the host.

One userland per running instance (host/userlands.py starts it): the host forks this process as
pid 1 of a fresh PID namespace, and it makes the rest of the userland (guest/userland.py's
namespaces, mounts and containment), then tells the host it is ready, starts the instance's
boot programs, reaps every orphan of the namespace, and reports each boot program's exit.
``mkctl exec`` joins its namespaces (guest/userland.py's ``join``); it never execs and never
exits on its own: it ends when the instance's kernel ends (the host kills it, and with it the
whole PID namespace).

The records go to the host over a pipe: a fixed header, then a reason of at most
``REASON_MAX`` bytes. Though the init is the host's own code, it lives inside the instance, so
the host checks every field of every record (``parse``) and trusts none of them as a pid.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import struct
from dataclasses import dataclass

import setproctitle

from partition import linux
from partition.guest import filters, userland
from partition.guest.containment import drop_privileges, join_cgroups

#: magic, kind, program index, status, reason length
HEADER = struct.Struct("<4sBxHiH")
MAGIC = b"MKUL"
READY, STARTED, EXITED, FAILED, UNSET, REBOOT = 1, 2, 3, 4, 5, 6
KINDS = {READY: "ready", STARTED: "started", EXITED: "exited", FAILED: "failed",
         UNSET: "unset", REBOOT: "reboot"}
#: reboot(2)'s magic numbers, and the commands that restart the instance (LINUX_REBOOT_*)
REBOOT_MAGIC1, REBOOT_MAGIC2 = 0xFEE1DEAD, (672274793, 85072278, 369367448, 537993216)
REBOOT_RESTART = (0x01234567, 0xA1B2C3D4)
#: where a command run by ``mkctl exec`` (its own filter, guest/userjoin.py) sends the init its
#: seccomp listener, so that its reboot(2) is answered too: an abstract datagram socket of the
#: userland's own network namespace
REBOOT_INBOX = "\0mk-init-reboot"
#: at most this many foreign listeners held (one per exec'd command alive; no process inside
#: can make a listener of its own to send: each runs under a filter with one already, and the
#: kernel allows one listener per filter chain, EBUSY)
LISTENERS_MAX = 256
#: datagrams read from the inbox per wake-up: a process that floods it does not hold the init
#: (its reaping, its answers to reboot(2)) in one turn
RECEIVES_PER_WAKE = 32
# struct seccomp_notif {u64 id; u32 pid; u32 flags; s32 nr; u32 arch; u64 ip; u64 args[6]};
# struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")
IOCTL_NOTIF_RECV, IOCTL_NOTIF_SEND = 0xC0502100, 0xC0182101
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
REASON_MAX = 512
#: at most this many boot programs an instance names (the records' index is 16 bits)
PROGRAMS_MAX = 64
#: a status is an exit code (0..255) or 128 + a signal number (up to 128 + 64)
STATUS_MAX = 128 + 64
EXIT_CANNOT_START = 127
#: what the host writes on a parked init's go pipe when its kernel is active
GO = b"g"


@dataclass(frozen=True)
class Record:
    """One checked record of the init: what happened to which boot program."""

    kind: str                  # ready, unset (the init could not set up), started, exited,
    #                            failed (a program could not be started), reboot (asked for)
    index: int                 # the boot program (0 for ready)
    status: int                # exit status (exited, failed), 0 otherwise
    reason: str                # why a program could not be started (failed)


class BadRecord(ValueError):
    """A record the host refuses: its field, and why."""


def encode(kind: int, index: int = 0, status: int = 0, reason: str = "") -> bytes:
    raw = reason.encode("utf-8", "replace")[:REASON_MAX]
    return HEADER.pack(MAGIC, kind, index, status, len(raw)) + raw


def parse(buf: bytearray, programs: int) -> list[Record | BadRecord]:
    """Take every whole record off the front of ``buf`` (the bytes read so far), each checked:
    its magic, kind, index (below ``programs``), status (0..STATUS_MAX) and reason length
    (at most REASON_MAX, valid UTF-8). A bad one is returned as a ``BadRecord`` and the rest of
    the buffer dropped: after a bad header nothing says where the next record starts."""
    out: list[Record | BadRecord] = []
    while len(buf) >= HEADER.size:
        magic, kind, index, status, length = HEADER.unpack_from(buf, 0)
        why = None
        if magic != MAGIC:
            why = f"bad magic {bytes(magic)!r}"
        elif kind not in KINDS:
            why = f"unknown kind {kind}"
        elif length > REASON_MAX:
            why = f"reason of {length} bytes (at most {REASON_MAX})"
        elif kind not in (READY, UNSET, REBOOT) and not index < programs:
            why = f"program index {index} (the instance has {programs})"
        elif not 0 <= status <= STATUS_MAX:
            why = f"status {status} out of 0..{STATUS_MAX}"
        if why is not None:
            out.append(BadRecord(why))
            del buf[:]
            return out
        if len(buf) < HEADER.size + length:
            break                                   # the rest of it is still on its way
        raw = bytes(buf[HEADER.size:HEADER.size + length])
        del buf[:HEADER.size + length]
        try:
            reason = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(BadRecord("reason is not UTF-8"))
            continue
        out.append(Record(KINDS[kind], index, status, reason))
    return out


def run(identity: userland.Identity, console: int, report: int, programs: list[list[str]],
        die_with_host: bool, go: int = -1) -> None:
    """pid 1 of the instance's userland, in the host's child: join the instance's cgroups, make
    the userland (guest/userland.py), say ready, start the boot programs, reap for good.
    Never returns; an error before ready is reported as an UNSET record and exits 127.

    With ``go`` (a pipe's read end) the init is made ahead of its kernel's boot (parked, as
    host/userlands.py's ``park``): everything set up, then it waits there for one byte, sent
    when the kernel is active, before it says anything or starts any program; end-of-file
    without it (the host let it go) ends it quietly."""
    try:
        if die_with_host:
            linux.set_parent_death_signal(signal.SIGKILL)
        signal.set_wakeup_fd(-1)                    # (a daemon's, whose descriptor goes below)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):    # no handler of the host's
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        userland.seal(report, console, go)
        if go == 3:                                 # 3 becomes the pipe to the host below
            go = os.dup(go)
            os.close(3)
        # (no look at the kernel here: a process of the new PID namespace cannot see it in
        # the cgroup; a kernel that ends meanwhile ends this too, host/userlands.py's stop)
        join_cgroups(identity.cgroup_procs)
        setproctitle.setproctitle(f"mk-init [{identity.name}]")
        if identity.cpus:
            os.sched_setaffinity(0, identity.cpus)
        userland.enter(identity, console=console)
        os.close(console)
        # stdio on the userland's /dev/null, the pipe to the host on 3: nothing else held
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        if report != 3:
            os.dup2(report, 3, inheritable=False)
            os.close(report)
            report = 3
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC)
        inbox.bind(REBOOT_INBOX)                    # (before any program could squat on it)
        reboot_nr = filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, "reboot")
        drop_privileges()
        own = filters.userland_filter(reboot_notify=True)
        filters.install(own)
        listener = filters.listener(own)
    except BaseException as exc:                    # report, then die
        _send(report, encode(UNSET, 0, EXIT_CANNOT_START, userland.describe_error(exc)))
        os._exit(EXIT_CANNOT_START)
    if go >= 0 and not _await_go(go):
        os._exit(0)
    signal.signal(signal.SIGTERM, lambda *_: _stop(signal.SIGTERM))
    # an orphan's exit wakes the poll below (through the wakeup pipe)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(report, encode(READY))
    started: dict[int, int] = {}                    # pid -> boot program index
    for index, argv in enumerate(programs[:PROGRAMS_MAX]):
        pid = _start_program(index, argv, report)
        if pid is not None:
            started[pid] = index
    poller = select.poll()
    for fd in (wake_r, listener, inbox.fileno()):
        poller.register(fd, select.POLLIN)
    foreign: set[int] = set()                       # the listeners execs sent
    while True:
        _reap(started, report)
        for fd, events in poller.poll():
            if fd == wake_r:
                while True:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        break
            elif fd == inbox.fileno():
                _take_listeners(inbox, foreign, poller)
            elif events & select.POLLIN:
                _answer_reboot(fd, reboot_nr, report)
            elif fd in foreign:                     # its command and children are gone
                poller.unregister(fd)
                foreign.discard(fd)
                os.close(fd)


def _await_go(go: int) -> bool:
    """A parked init's wait for its kernel to be active: True at the host's byte, False at
    end-of-file (its kernel never came up, or the init is not the one wanted)."""
    try:
        while True:
            try:
                got = os.read(go, 1)
            except InterruptedError:
                continue
            return got == GO
    except OSError:
        return False
    finally:
        os.close(go)


def _take_listeners(inbox: socket.socket, foreign: set[int], poller: select.poll) -> None:
    """The seccomp listeners commands sent (guest/userjoin.py), kept and watched; anything
    else sent there (any process inside may send to it) closed; at most RECEIVES_PER_WAKE
    datagrams a turn (the rest wake the next one). A listener only ever lets the init answer
    reboot(2) for the processes of its filter: the sender's own."""
    for _ in range(RECEIVES_PER_WAKE):
        try:
            _, fds, _, _ = socket.recv_fds(inbox, 16, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        for fd in fds:
            try:
                kind = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                kind = ""
            if kind != "anon_inode:seccomp notify" or len(foreign) >= LISTENERS_MAX:
                os.close(fd)
                continue
            os.set_inheritable(fd, False)
            foreign.add(fd)
            poller.register(fd, select.POLLIN)


def _reap(started: dict[int, int], report: int) -> None:
    """Every child that exited (a boot program, or an orphan of the namespace), reaped; a boot
    program's status told to the host."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        done = started.pop(pid, -1)
        if done >= 0:
            _send(report, encode(EXITED, done, userland.exit_code(status)))


def _answer_reboot(listener: int, reboot_nr: int, report: int) -> None:
    """A process of the userland called reboot(2) (a filter's user notification): a restart
    command with the right magic asks the host to restart the instance's kernel (the pipe says
    which instance: its own; the host decides) and returns 0, as the call never returns on the
    real machine; anything else is refused EPERM, as an unprivileged reboot."""
    buf = ctypes.create_string_buffer(_NOTIF.size)          # zeroed, as RECV demands
    if _libc.ioctl(listener, IOCTL_NOTIF_RECV, ctypes.addressof(buf)) < 0:
        return                                              # the caller died meanwhile
    cookie, _pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf.raw)
    magic1, magic2, cmd = (a & 0xFFFFFFFF for a in args[:3])
    restart = nr == reboot_nr and magic1 == REBOOT_MAGIC1 and magic2 in REBOOT_MAGIC2 \
        and cmd in REBOOT_RESTART
    resp = ctypes.create_string_buffer(
        _RESP.pack(cookie, 0, 0 if restart else -errno.EPERM, 0), _RESP.size)
    _libc.ioctl(listener, IOCTL_NOTIF_SEND, ctypes.addressof(resp))   # (gone: no matter)
    if restart:
        _send(report, encode(REBOOT))


def _start_program(index: int, argv: list[str], report: int) -> int | None:
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.close(report)
            os.setsid()                             # its own session: no terminal of the init's
            with open("/dev/null", "rb") as null:
                os.dup2(null.fileno(), 0)
            with open("/dev/console", "wb", buffering=0) as console:
                os.dup2(console.fileno(), 1)
                os.dup2(console.fileno(), 2)
            userland.exec_program(argv, None, None, None)
        except BaseException as exc:
            os.write(w, userland.describe_error(exc, argv[0] if argv else "").encode()[:REASON_MAX])
        os._exit(EXIT_CANNOT_START)
    os.close(w)
    why = b""
    while chunk := os.read(r, REASON_MAX):          # EOF at its exec (O_CLOEXEC) or its exit
        why += chunk
    os.close(r)
    if why:
        os.waitpid(pid, 0)
        _send(report, encode(FAILED, index, EXIT_CANNOT_START, why.decode(errors="replace")))
        return None
    _send(report, encode(STARTED, index))
    return pid


def _send(report: int, record: bytes) -> None:
    try:
        os.write(report, record)
    except OSError:                                 # the host is gone: nobody to tell
        pass


def _stop(sig: int) -> None:
    """The host asks the userland to end (a halt that reaches it first): every process goes."""
    userland.kill_all()
    os._exit(128 + sig)
