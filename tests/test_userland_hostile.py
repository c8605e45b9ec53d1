"""A hostile userland: programs started with ``mkctl exec`` try to get out of their instance.
Each attempt is refused (or bounded) and the host, the instance's kernel and a peer instance
are whole afterwards. Real processes throughout; the attacks run as one script per exec."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PYTHON = os.path.realpath(sys.executable)


def mk(run_dir, *args, timeout=60, **kw):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]],
                          capture_output=True, text=True, timeout=timeout, **kw)


def state(run_dir, name):
    r = mk(run_dir, "show", "--format", "json", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def two(run_dir):
    """Instance ``a`` (the attacker's) and a peer ``b``, both running; afterwards both still
    run the same kernels and the host process is whole."""
    for args in (("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
                  ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe"),
                 ("create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M"),
                 ("create", "b", "--cpus", str(CPUS[-1]), "--memory", "16M"),
                 ("load", "a", "--kernel", PICKY), ("load", "b", "--kernel", PICKY),
                 ("start", "a"), ("start", "b")):
        r = mk(run_dir, *args)
        assert r.returncode == 0, r.stderr
    before = {n: state(run_dir, n)["pid"] for n in ("a", "b")}
    yield run_dir, before
    after = state(run_dir, "b")
    assert after["state"] == "active" and after["pid"] == before["b"]


def inside(run_dir, code, *args, timeout=60):
    return mk(run_dir, "exec", "a", "--", PYTHON, "-c", textwrap.dedent(code), *map(str, args),
              timeout=timeout)


ATTACKS = r"""
    import ctypes, errno, json, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    def err(f):
        try:
            f()
            return 0
        except OSError as e:
            return e.errno
    def sys_(name, *a):
        nr = {"kexec_load": 246, "bpf": 321, "setns": 308, "unshare": 272, "reboot": 169,
              "init_module": 175, "perf_event_open": 298, "io_uring_setup": 425,
              "userfaultfd": 323, "keyctl": 250, "ptrace": 101}[name]
        def call():
            if libc.syscall(nr, *a) == -1:
                raise OSError(ctypes.get_errno(), name)
        return err(call)
    host, peer_kernel, own_kernel = map(int, sys.argv[1:4])
    out["mount"] = err(lambda: (libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == 0
                                or (_ for _ in ()).throw(OSError(ctypes.get_errno(), "m"))))
    out["unshare_user"] = sys_("unshare", 0x10000000)
    out["unshare_net"] = sys_("unshare", 0x40000000)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    out["setns"] = sys_("setns", fd, 0)
    out["kexec"] = sys_("kexec_load", 0, 0, 0, 0)
    out["bpf"] = sys_("bpf", 0, 0, 0)
    out["module"] = sys_("init_module", 0, 0, 0)
    out["perf"] = sys_("perf_event_open", 0, 0, -1, -1, 0)
    out["io_uring"] = sys_("io_uring_setup", 1, 0)
    out["userfaultfd"] = sys_("userfaultfd", 0)
    out["keyctl"] = sys_("keyctl", 0, 0)
    # (a restart command restarts its own instance: tests/test_userland_shared.py; a halt
    # of the machine is refused, as an unprivileged reboot)
    out["reboot"] = sys_("reboot", 0xfee1dead, 672274793, 0xCDEF0123, 0)
    out["packet"] = err(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
    out["raw_ip"] = err(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
    out["fifo"] = err(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)))
    out["affinity"] = err(lambda: os.sched_setaffinity(0, range(os.cpu_count())))
    out["cpus_after"] = sorted(os.sched_getaffinity(0))
    out["kill_host"] = err(lambda: os.kill(host, 0))
    out["kill_peer"] = err(lambda: os.kill(peer_kernel, 9))
    out["kill_own_kernel"] = err(lambda: os.kill(own_kernel, 9))
    out["ptrace_host"] = sys_("ptrace", 16, host, 0, 0)          # PTRACE_ATTACH
    out["proc"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
    out["see_peer"] = os.path.exists(f"/proc/{peer_kernel}")
    out["see_host"] = os.path.exists(f"/proc/{host}")
    def write(path):
        with open(path, "w") as f:
            f.write("x")
    for name, path in (("etc", "/etc/evil"), ("root", "/root/evil"), ("sysrq",
                       "/proc/sysrq-trigger"), ("core_pattern", "/proc/sys/kernel/core_pattern"),
                       ("cgroup", "/sys/fs/cgroup/pids/cgroup.procs")):
        out["write_" + name] = err(lambda: write(path))
    out["write_tmp"] = err(lambda: write("/tmp/fine"))
    print(json.dumps(out))
"""


def test_escapes_from_a_shell_are_refused(two):
    run_dir, kernels = two
    r = inside(run_dir, ATTACKS, os.getpid(), kernels["b"], kernels["a"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for call in ("mount", "unshare_user", "unshare_net", "setns", "kexec", "bpf", "module",
                 "perf", "io_uring", "userfaultfd", "keyctl", "reboot", "packet", "raw_ip",
                 "fifo"):
        assert out[call] == 1, (call, out[call])              # EPERM, the process alive
    # re-pinning: the cpuset confines it to the instance's CPU whatever it asks
    assert out["cpus_after"] == [CPUS[-1]]
    # the host, the peer's kernel and its own kernel: not in its PID namespace
    for target in ("kill_host", "kill_peer", "kill_own_kernel", "ptrace_host"):
        assert out[target] == 3, (target, out[target])       # ESRCH
    assert not out["see_peer"] and not out["see_host"]
    assert out["proc"] == ["1", "2"]
    for path in ("etc", "root", "core_pattern", "cgroup"):
        assert out["write_" + path] == 30, (path, out["write_" + path])   # EROFS
    # (a kernel built without magic SysRq has no trigger to write: ENOENT)
    assert out["write_sysrq"] == (30 if os.path.exists("/proc/sysrq-trigger") else 2)
    assert out["write_tmp"] == 0
    assert state(run_dir, "a")["pid"] == kernels["a"]


def test_kill_everything_kills_only_the_userland(two):
    run_dir, kernels = two
    # kill(-1): every process it may signal but itself (and the namespace's init)
    r = mk(run_dir, "exec", "a", "--", "/bin/sh", "-c", "sleep 305 & kill -9 -1; wait $!; "
                                                        "echo $?")
    assert (r.returncode, r.stdout.strip()) == (0, "137"), r.stderr
    a = state(run_dir, "a")
    assert a["state"] == "active" and a["pid"] == kernels["a"]


FORK_BOMB = """
    import os, time
    n = 0
    try:
        while n < 1000:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
    except OSError as e:
        print(n, e.errno)
"""


def test_a_fork_bomb_is_bounded_by_the_process_limit(two):
    run_dir, _ = two
    r = inside(run_dir, FORK_BOMB)
    assert r.returncode == 0, r.stderr
    forked, why = map(int, r.stdout.split())
    assert 0 < forked < 64 and why == 11                       # EAGAIN at pids.max
    # the init killed the sleepers when the bomb's parent exited: the kernel forks again fine
    assert state(run_dir, "a")["state"] == "active"


def test_exceeding_memory_is_an_oom_inside_the_instance_only(two):
    run_dir, _ = two
    r = inside(run_dir, "x = bytearray(1 << 30); print(len(x))", timeout=120)
    assert r.returncode == 128 + 9 and not r.stdout            # the instance's OOM killer
    r = inside(run_dir, "print(open('/tmp/f', 'wb').write(bytes(100 << 20)))", timeout=120)
    assert r.returncode == 1 and "No space left" in r.stderr  # /tmp is size-limited
    assert state(run_dir, "a")["state"] == "active"


#: a uid no process has: were the call let through, it would renice nothing
NOBODYS_UID = 54321


def _nr(name: str) -> int:
    from partition.guest import filters
    return filters.sc.resolve_syscall(filters.sc.Arch.NATIVE, name)


RENICE_EVERY_ROOT_PROCESS = """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    nr, which, who, value = map(int, sys.argv[1:5])
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(which), ctypes.c_long(who),
                      ctypes.c_long(value))
    print(0 if rc == 0 else ctypes.get_errno())
"""


def test_a_user_wide_renice_with_a_high_half_is_refused(two):
    """``which`` is an int: the kernel reads 0x100000002 as PRIO_USER (every process of the
    uid, and the userland's uid is the host's root). The filter must read it so too: EPERM,
    not ESRCH (no process of that uid: the call went through)."""
    run_dir, _ = two
    for name, which, value in (("setpriority", 2, 19), ("ioprio_set", 3, (3 << 13) | 7)):
        for high in (0, 1 << 32):
            r = inside(run_dir, RENICE_EVERY_ROOT_PROCESS, _nr(name), which | high,
                       NOBODYS_UID, value)
            assert r.returncode == 0, r.stderr
            assert int(r.stdout) == 1, (name, hex(which | high), r.stdout)      # EPERM


TAKE_THE_KERNELS_DESCRIPTORS = """
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd_open, pidfd_getfd, process_vm_readv = map(int, sys.argv[1:4])
    def call(nr, *args):
        rc = libc.syscall(ctypes.c_long(nr), *map(ctypes.c_long, args))
        return rc if rc >= 0 else -ctypes.get_errno()
    out = {"open": {}, "took": []}
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        pidfd = call(pidfd_open, pid, 0)
        out["open"][pid] = pidfd
        if pidfd >= 0:                   # the attack: its descriptors, then the kernel's
            for fd in range(64):
                got = call(pidfd_getfd, pidfd, fd, 0)
                if got >= 0:
                    out["took"].append([pid, fd, os.readlink(f"/proc/self/fd/{got}")])
    # the init's memory: EPERM (not dumpable), not EFAULT (reached, at a bad address)
    local = ctypes.create_string_buffer(8)
    iov = (ctypes.c_void_p * 2)(ctypes.addressof(local), 8)
    far = (ctypes.c_void_p * 2)(0x1000, 8)
    rc = libc.syscall(ctypes.c_long(process_vm_readv), ctypes.c_long(1), iov, ctypes.c_long(1),
                      far, ctypes.c_long(1), ctypes.c_long(0))
    out["vm_read_init"] = ctypes.get_errno() if rc < 0 else 0
    try:
        out["init_fds"] = sorted(int(fd) for fd in os.listdir("/proc/1/fd"))
    except OSError as exc:
        out["init_fds"] = exc.errno
    links = {}
    for fd in out["init_fds"] if isinstance(out["init_fds"], list) else []:
        try:
            links[fd] = os.readlink(f"/proc/1/fd/{fd}")
        except OSError as exc:
            links[fd] = exc.errno
    out["init_links"] = links
    print(json.dumps(out), flush=True)
    sys.stdin.read()                     # held until the test has looked at the relay and init
"""


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += map(int, f.read().split())
    return kids


def _fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_program_cannot_take_its_kernels_descriptors(two):
    """The reviewer's attack: ``pidfd_getfd(pidfd_open(1), 3)`` took the kernel's pidfd the
    init had inherited from mkctl, then the kernel's host channel through it. Refused at
    every step: no pidfd (the filter), nothing to take (the relay and the init hold only
    stdio), and the init is not dumpable (no ptrace, no process_vm_readv, no fd links)."""
    run_dir, _ = two
    proc = subprocess.Popen(
        MKCTL + ["exec", "--run-dir", run_dir, "a", "--", PYTHON, "-c",
                 textwrap.dedent(TAKE_THE_KERNELS_DESCRIPTORS), str(_nr("pidfd_open")),
                 str(_nr("pidfd_getfd")), str(_nr("process_vm_readv"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        out = json.loads(line)
        [relay] = _children(proc.pid)
        # the userland's init is the host's child (host/userlands.py), named by the host
        init = state(run_dir, "a")["userland"]["pid"]
        relay_fds, init_fds = _fds(relay), _fds(init)
        init_links = {fd: os.readlink(f"/proc/{init}/fd/{fd}") for fd in init_fds}
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    assert out["open"] and set(out["open"].values()) == {-1}, out        # EPERM, every pid
    assert out["took"] == []
    assert out["vm_read_init"] == 1, out                                 # EPERM
    # the init holds its stdio (/dev/null), its pipe to the host (3), the seccomp listeners
    # (reboot: its own and this exec's), the socket execs send theirs to and its signal
    # wakeup pipe: nothing of mkctl's, nothing of the kernel's
    assert out["init_fds"] == 13 or set(out["init_fds"]) == set(init_fds), out
    assert all(link == 13 for link in out["init_links"].values()), out   # EACCES: not dumpable
    assert set(relay_fds) <= {0, 1, 2}, relay_fds
    assert init_links[3].startswith("pipe:"), init_links
    assert all(link == "/dev/null" or link.startswith(("pipe:", "socket:"))
               or link == "anon_inode:seccomp notify" for link in init_links.values()), init_links
    assert sum(link.startswith("socket:") for link in init_links.values()) == 1, init_links


SPEND_ROOTS_BUDGETS = """
    import ctypes, errno, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    def errno_of(rc):
        return 0 if rc >= 0 else ctypes.get_errno()
    out = {"inotify_init1": errno_of(libc.inotify_init1(0)),
           "inotify_init": errno_of(libc.inotify_init()),
           "mq_open": errno_of(libc.mq_open(b"/mkt-budget", os.O_CREAT | os.O_RDWR, 0o600,
                                            None)),
           "timer_create": errno_of(libc.timer_create(1, None,
                                                      ctypes.byref(ctypes.c_void_p())))}
    print(json.dumps(out))
"""


def test_roots_shared_budgets_are_refused(two):
    """Inotify instances, message queue bytes and queued timer signals are counted per user,
    and the userland's uid is the host's root: a userland that spent them starved the host
    (EMFILE on every root process's inotify_init). Refused inside as if already spent."""
    run_dir, _ = two
    r = inside(run_dir, SPEND_ROOTS_BUDGETS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"inotify_init1": errno.EMFILE, "inotify_init": errno.EMFILE,
                                    "mq_open": errno.EMFILE, "timer_create": errno.EAGAIN}
