"""An instance's userland: a program started in namespaces of its own, bounded by the
instance's cgroups, under the userland seccomp filter (guest/filters.py).

On the real machine a spawn kernel runs ordinary Linux programs; here the instance's kernel is
one Python process that may not fork, so its programs are started beside it, by this launcher,
and made to look and die as the instance's own:

* a **PID namespace** whose init is a tiny reaper: pid 1, it reaps orphans, and when it is told
  (SIGTERM) it kills every process left. Programs inside see only the userland's processes and
  can name, so signal or trace, nothing else;
* **UTS** (the hostname is the instance's name), **IPC**, **cgroup** and **network** namespaces
  (the network has only ``lo``, brought up here with SIOCSIFFLAGS: no ``ip`` binary needed);
* a **mount namespace**: the root read-only (the host's, or ``rootfs`` bound read-only and
  pivoted into), the directories in ``hide`` covered, a fresh read-only ``/proc`` of the new
  PID namespace (so ``/proc/sysrq-trigger`` and ``/proc/sys`` cannot be written), a minimal
  ``/dev`` (null, zero, full, random, urandom, tty, a ``console`` and a ``shm``), and private
  size-limited tmpfs on ``/tmp``, ``/run`` and ``/var/tmp``: tmpfs pages are charged to the
  memory cgroup of the process that writes them, which is the instance's; and the machine's
  shared regions the instance names, read-write at ``/mnt/shared/NAME`` (host/shared.py);
* the instance's **cgroups** (CPUs, memory, process limit; and the host's kill switch, so every
  process here dies when the instance dies) and its **CPUs** as the affinity;
* **no privileges**: every capability dropped, no_new_privs, the locked securebits, then the
  userland filter.

Used two ways. An instance's one userland (host/userlands.py): the host forks its init
(guest/userinit.py), which calls ``enter`` for the namespaces and mounts above, and every
``mkctl exec`` joins it (guest/userjoin.py). And a userland of its own for one program
(``start``: the bench's and the launcher's tests): three processes on the caller's side of the
namespace, the caller, the *relay* it forks (it makes the PID namespace, whose first child is
the init, and relays the init's status; SIGTERM/SIGHUP to it reach the init, and it ignores
SIGINT as a shell does while its job runs), and the init (``_init``), which kills what is left
when the program exits. The relay and the init die with their parent (PR_SET_PDEATHSIG), so
such a userland never outlives its caller. Every relay and init is sealed first (``seal``): not
dumpable, and holding no descriptor of its parent's but stdio (and the terminal while it is
handed over, or the init's pipe to the host), since an init never execs and a program inside
could otherwise take what it holds (``pidfd_getfd``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import termios
from dataclasses import dataclass, field

import setproctitle

from partition import linux
from partition.errors import MountNameEscapes, ProcessLimitZero, RootfsMissing, RootfsUnreadable
from partition.guest import filters
from partition.guest.containment import PR_SET_DUMPABLE, drop_privileges, join_cgroups

EXIT_CANNOT_START = 127
TMP_SIZE = 64 << 20                   # each of /tmp, /run, /var/tmp, /dev/shm, at most

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
#: the owner of a userland's /dev/pts (nobody): its programs, uid 0 without capabilities,
#: cannot create, rename or remove anything there; an exec's relay, privileged, can
PTS_OWNER = 65534
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
FD_LIMIT = 0x7FFFFFFF                 # past any descriptor number (closerange: close_range(2))

#: the device nodes a userland has: nothing that reaches hardware or the host's log; ``tty``
#: is the calling process's own controlling terminal, if it has one
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
           "tty": (5, 0)}
#: where programs write: private, size-limited, each a fresh tmpfs
SCRATCH = {"/tmp": "1777", "/var/tmp": "1777", "/run": "755"}
#: where the machine's shared regions an instance names appear, one directory each
SHARED_MOUNTS = "/mnt/shared"

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@dataclass(frozen=True)
class Identity:
    """Who the userland belongs to: what the host says of a running instance."""

    name: str                                  # the hostname inside
    cpus: list[int]
    cgroup_procs: list[str]                    # its cgroups' procs files (limits already set)
    rootfs: str | None = None                  # another root, bound read-only
    hide: list[str] = field(default_factory=list)   # host directories covered by an empty tmpfs
    console: str | None = None                 # a tty or fifo bound on /dev/console
    tmp_size: int = TMP_SIZE
    #: the instance's kernel: the userland is refused if it left the cgroups before the init
    #: joined them (a panic between the host's answer and the join: its kill already ran)
    kernel_pid: int | None = None
    #: the machine's shared regions it names: mount name -> host directory (host/shared.py),
    #: each bound read-write at /mnt/shared/NAME
    shared: dict[str, str] = field(default_factory=dict)
    #: execs join it (an instance's one userland, host/userlands.py): a /dev/pts of its own for
    #: their terminals, which their relays write and its programs cannot
    joinable: bool = False


def check(identity: Identity) -> None:
    """Refuse what can never run, before any process is made: a missing or unreadable root, a
    process limit of 0, a mount name that escapes its directory."""
    for name in identity.shared:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise MountNameEscapes(f"shared mount name {name[:80]!r} escapes "
                                   f"{SHARED_MOUNTS}: it must be one plain directory name",
                                   "name the region without '/' or '..'")
    if identity.rootfs is not None:
        if not os.path.isdir(identity.rootfs):
            raise RootfsMissing(f"rootfs {identity.rootfs!r} is not a directory",
                                "give an unpacked root (a directory holding bin/, etc/, ...)")
        try:
            os.listdir(identity.rootfs)
        except OSError as exc:
            raise RootfsUnreadable(f"rootfs {identity.rootfs!r} cannot be read: "
                                   f"{os.strerror(exc.errno or errno.EACCES)}",
                                   "make it readable by root") from None
    for procs in identity.cgroup_procs:
        try:
            with open(os.path.join(os.path.dirname(procs), "pids.max")) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit == "0":
            raise ProcessLimitZero(f"instance {identity.name!r} has a process limit of 0: no "
                                   "program can run in it", "give it a process limit of 1 or more")


class Userland:
    """A started userland, from the caller's side: the relay's pid, and its end."""

    def __init__(self, relay: int, why: int) -> None:
        self.pid = relay
        self._why = why
        self.reason = ""                # why the program could not be started, if it could not
        self.status: int | None = None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM or SIGHUP: the init kills every process and exits (128 + sig)."""
        if self.status is None:
            os.kill(self.pid, sig)

    def wait(self) -> int:
        """The main program's exit status: its code, 128 + N for a signal N (also when the
        whole userland was killed with its instance), 127 when it could not be started."""
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = exit_code(status)
            os.set_blocking(self._why, False)
            chunks = []
            try:
                while chunk := os.read(self._why, 4096):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            os.close(self._why)
            self.reason = b"".join(chunks).decode(errors="replace")
        return self.status


def start(identity: Identity, argv: list[str], env: dict[str, str] | None = None,
          stdout: int | None = None, terminal: int | None = None) -> Userland:
    """Start ``argv`` in a new userland of ``identity``; the caller waits on the result.
    Refusals (``check``) raise here; a program that cannot be started exits 127 with the
    reason in ``Userland.reason``. Its stdio is the caller's, but ``stdout`` if given.

    ``terminal``, a pty's slave (control/terminal.py holds its master), becomes the program's
    controlling terminal and its stdio: the program leads a session of its own inside the
    userland, so the pty's line discipline sends Ctrl-C and Ctrl-Z to the foreground job
    inside, and a shell there has job control. The relay and the init close their copies, so
    the master reads end-of-file (EIO) once the userland is gone."""
    check(identity)
    if not argv:
        raise ValueError("no program to run")
    r, w = os.pipe2(os.O_CLOEXEC)
    caller = os.getpid()
    relay = os.fork()
    if relay == 0:
        try:
            os.close(r)
            _relay(identity, argv, env, w, caller, stdout, terminal)
        except BaseException as exc:                  # report, then die
            tell(w, exc)
        os._exit(EXIT_CANNOT_START)
    os.close(w)
    return Userland(relay, r)


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def describe_error(exc: BaseException, program: str = "") -> str:
    """Why a program could not be started, as ``mkctl exec`` prints it."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f"{program}: " if program else ""
    return f"{where}{type(exc).__name__}: {text}"


def tell(fd: int, exc: BaseException, program: str = "") -> None:
    try:
        os.write(fd, describe_error(exc, program).encode()[:1000])
    except OSError:
        pass


def _relay(identity: Identity, argv: list[str], env: dict[str, str] | None, why: int,
           caller: int, stdout: int | None, terminal: int | None) -> None:
    """The caller-side child: dies with the caller, joins the instance's cgroups (so that it,
    the init and every program are killed with the instance), makes the PID namespace,
    relays."""
    # joined outside the new PID namespace, where the kernel's pid reads as the host's
    enter_relay(caller, signal.SIGKILL, identity.name, identity.cgroup_procs,
                identity.kernel_pid, why, stdout, terminal)
    linux.unshare(CLONE_NEWPID)
    init = os.fork()
    if init == 0:
        try:
            _init(identity, argv, env, why, stdout, terminal)
        except BaseException as exc:                  # report, then die
            tell(why, exc)
        os._exit(EXIT_CANNOT_START)
    os.close(why)                                     # the init reports from here on
    if terminal is not None:                          # the program's alone: its EOF is ours
        os.close(terminal)

    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(init, sig)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(init, 0)
    os._exit(exit_code(status))


def _init(identity: Identity, argv: list[str], env: dict[str, str] | None, why: int,
          stdout: int | None, terminal: int | None) -> None:
    """pid 1 of the userland: set everything up while it still may, then start the program and
    reap until it exits."""
    linux.set_parent_death_signal(signal.SIGKILL)
    seal(why, stdout, terminal)
    setproctitle.setproctitle(f"mk-init [{identity.name}]")
    if identity.cpus:
        os.sched_setaffinity(0, identity.cpus)
    enter(identity, terminal)
    drop_privileges()
    filters.install(filters.userland_filter())

    def stop(sig: int, _frame: object) -> None:
        kill_all()
        os._exit(128 + sig)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    main = os.fork()
    if main == 0:
        try:
            exec_program(argv, env, stdout, terminal)
        except BaseException as exc:                  # report, then die
            tell(why, exc, argv[0])
        os._exit(EXIT_CANNOT_START)
    os.close(why)
    if terminal is not None:
        os.close(terminal)
    while True:
        pid, status = os.wait()                       # the program, or an orphan it left
        if pid == main:
            break
    kill_all()
    os._exit(exit_code(status))


def enter(identity: Identity, terminal: int | None = None, console: int | None = None) -> None:
    """Make this process's own UTS, IPC, network, cgroup and mount namespaces the userland's:
    the hostname, ``lo`` up, the mounts (``_mounts``); ``console``, a descriptor, is bound on
    /dev/console (else ``identity.console``, a path). Called by pid 1 of a fresh PID
    namespace, with every privilege still held."""
    linux.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWCGROUP)
    _mounts(identity, terminal, console)
    socket.sethostname(identity.name)
    _loopback_up()


def enter_relay(caller: int, death: signal.Signals, name: str, cgroup_procs: list[str],
                kernel_pid: int | None, *keep: int | None) -> None:
    """The first steps of a caller-side relay (this module's and guest/userjoin.py's): it dies
    with ``caller`` (by ``death``), is sealed keeping ``keep``, ignores the terminal's SIGINT
    and SIGQUIT as a shell does for its job, and joins the instance's cgroups; an instance
    whose kernel left them meanwhile is a ProcessLookupError."""
    linux.set_parent_death_signal(death)
    if os.getppid() != caller:                        # it died before the line above
        os._exit(128 + death)
    seal(*keep)
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    join_cgroups(cgroup_procs)
    if kernel_pid is not None and not in_cgroups_of(kernel_pid, cgroup_procs):
        raise ProcessLookupError(f"instance {name!r} halted while the command was being set "
                                 "up")


def seal(*keep: int | None) -> None:
    """Make this process a wall, not a door: not dumpable (no process of the userland, though
    it has the same uid 0 and no capabilities as this one, may ptrace it, read its
    ``/proc/<pid>/fd`` links or take its descriptors with ``pidfd_getfd``), and holding no
    descriptor but stdio and ``keep``. The init never execs, so without this it would keep
    every descriptor of the mkctl that forked it: its run directory's socket, a pidfd of the
    instance's kernel (and through that, the kernel's channel to the host)."""
    linux.prctl(PR_SET_DUMPABLE, 0)
    low = 3
    for fd in sorted({fd for fd in keep if fd is not None and fd >= low}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, FD_LIMIT)


def in_cgroups_of(pid: int, procs: list[str]) -> bool:
    """``pid`` is still the instance's (in its cgroup): it did not die and get reused."""
    for path in procs:
        try:
            with open(path) as f:
                if str(pid) in f.read().split():
                    return True
        except OSError:
            pass
    return not procs


def kill_all() -> None:
    """From pid 1: SIGKILL every other process of the namespace, and reap them."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def exec_program(argv: list[str], env: dict[str, str] | None, stdout: int | None,
          terminal: int | None) -> None:
    """The program: default signal dispositions (Python ignores SIGPIPE, the relay SIGINT),
    no descriptor but stdio, then exec. With a ``terminal``: a session of its own whose
    controlling terminal it is (setsid, TIOCSCTTY), and its stdio."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)
    if terminal is not None:
        os.setsid()
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(terminal, fd)
        if terminal > 2:
            os.close(terminal)
    if stdout is not None:
        os.dup2(stdout, 1)
    os.chdir("/")
    os.execvpe(argv[0], argv, dict(os.environ) if env is None else env)


def _mounts(identity: Identity, terminal: int | None = None,
            console_fd: int | None = None) -> None:
    # the console is a host path: held before the root and /dev change under it
    # (a descriptor's own mount is the old namespace's, which a bind refuses: by its name)
    # and cloned as a detached mount, which a rootfs's pivot does not take away
    path = os.ttyname(console_fd) if console_fd is not None else identity.console
    console = None if path is None else clone_mount(path)
    # the pty's name, as ttyname(3) inside will look it up (tty, ps, ssh); opened by path
    # here, in this mount namespace, as a bind mount's source must be
    pts = None if terminal is None else os.ttyname(terminal)
    pts_fd = None if pts is None else os.open(pts, os.O_PATH)
    # the shared regions too: the run directory they are under is covered below
    shared = {name: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
              for name, path in identity.shared.items()}
    linux.mount(None, "/", None, MS_REC | MS_PRIVATE)
    if identity.rootfs is not None:
        _pivot(identity.rootfs)
    else:
        for path in identity.hide:
            if os.path.isdir(path):
                linux.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
                            "size=4k,mode=555")
    linux.remount_tree_readonly("/")
    if os.path.isdir("/proc"):
        linux.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    if os.path.isdir("/dev"):
        _devices(identity, console, (pts, pts_fd) if pts and pts_fd is not None else None)
    if shared:
        _shared_regions(shared)
    if pts_fd is not None:
        os.close(pts_fd)
    if console is not None:
        os.close(console)
    # the emulator's own package, if a scratch directory is about to cover it (a clone in
    # /tmp): its tools (crashlog's writer) stay importable inside, read-only. The package
    # alone, not the checkout, and not recursively: a run directory inside the checkout (its
    # control socket) stays hidden
    home = _covered_home(identity.hide) if identity.rootfs is None else None
    home_fd = None if home is None else os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for path, mode in SCRATCH.items():
        if os.path.isdir(path) and not os.path.islink(path):
            linux.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
                        f"size={identity.tmp_size},mode={mode}")
    if home is not None and home_fd is not None:
        os.makedirs(home, 0o755, exist_ok=True)
        linux.mount(f"/proc/self/fd/{home_fd}", home, None, MS_BIND)
        linux.mount(None, home, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(home_fd)


def _covered_home(hidden: list[str]) -> str | None:
    """The ``partition`` package's directory, when it lies under one of the scratch
    directories a userland covers with its own tmpfs and holds no hidden directory; else
    None."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if any(os.path.realpath(h) == home or os.path.realpath(h).startswith(home + "/")
           for h in hidden):
        return None
    for path in SCRATCH:
        real = os.path.realpath(path)
        if home != real and home.startswith(real.rstrip("/") + "/"):
            return home
    return None


OPEN_TREE_CLONE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def clone_mount(path: str) -> int:
    """open_tree(OPEN_TREE_CLONE): a detached bind mount of ``path``, made in this mount
    namespace, to attach elsewhere later (``attach_mount``), also in another namespace or
    after a pivot that took the source's mount away."""
    nr = filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, "open_tree")
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(AT_FDCWD), path.encode(),
                       ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return int(fd)


def attach_mount(tree: int, target: str) -> None:
    """move_mount(2) the detached mount ``tree`` onto ``target`` (an existing file)."""
    nr = filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, "move_mount")
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD),
                     target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_mount {target}: {os.strerror(err)}")


def _shared_regions(regions: dict[str, int]) -> None:
    """Each region (an O_PATH descriptor of its host directory) bound read-write at
    /mnt/shared/NAME, on a small tmpfs covering /mnt that is then made read-only: programs
    write in the regions, not beside them."""
    if not os.path.isdir("/mnt") or os.path.islink("/mnt"):
        raise FileNotFoundError(errno.ENOENT, "the root has no /mnt directory to mount the "
                                "shared regions under")
    linux.mount("tmpfs", "/mnt", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    for name, fd in regions.items():
        target = os.path.join(SHARED_MOUNTS, name)
        os.makedirs(target, 0o755)
        linux.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        # the descriptor's mount is this namespace's copy, made read-only with the root
        linux.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        os.close(fd)
    linux.mount(None, "/mnt", None,
                MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _pivot(rootfs: str) -> None:
    """Make ``rootfs`` the root of this mount namespace (the host's root detached)."""
    linux.mount(rootfs, rootfs, None, MS_BIND | MS_REC)
    os.chdir(rootfs)
    nr = filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, "pivot_root")
    if _libc.syscall(ctypes.c_long(nr), b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount the host's root: {os.strerror(err)}")
    os.chdir("/")


def _devices(identity: Identity, console: int | None,
             terminal: tuple[str, int] | None = None) -> None:
    linux.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)              # not the caller's umask
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    if console is not None:                      # the detached clone, attached here
        os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY, 0o600))
        attach_mount(console, "/dev/console")
    else:                                        # nothing to wire it to yet: a sink
        os.mknod("/dev/console", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    # /dev/pts: a tmpfs of its own, writable, owned by nobody: an exec's relay shows its pty
    # there (guest/userjoin.py) without /dev ever being made writable, and no program inside
    # can plant a link or a file there for the privileged relay to follow
    if identity.joinable or (terminal is not None and terminal[0].startswith("/dev/pts/")):
        os.mkdir("/dev/pts", 0o755)
        linux.mount("tmpfs", "/dev/pts", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    f"size=16k,mode=755,uid={PTS_OWNER},gid={PTS_OWNER}")
    if terminal is not None and terminal[0].startswith("/dev/pts/"):
        # that one pty only, under its own name: not the host's devpts, which holds every
        # other terminal of the machine
        name, fd = terminal
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600))
        try:
            linux.mount(f"/proc/self/fd/{fd}", name, None, MS_BIND)
        except OSError:          # under a rootfs the host's /dev is detached: a nameless tty
            os.unlink(name)
    os.mkdir("/dev/shm", 0o1777)
    linux.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                f"size={identity.tmp_size},mode=1777")
    linux.mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _loopback_up() -> None:
    """``ip link set lo up``, by ioctl: the new network namespace's only device."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack_from("16sH", got)[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
