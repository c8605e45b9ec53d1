"""A kernel that attacks: each ``attack=`` on its cmdline is something a hostile or buggy kernel
author would try against the host, its peers or unrelated processes. It records in its own
partition how far each step got ("ok" or the exception), so that a test can tell a blocked
attack from one that was never tried. Loaded by path in tests/test_hostile.py."""

import ctypes
import mmap
import os
import signal
import time

from partition import Kernel


class Hostile(Kernel):
    heartbeat_interval = None

    def note(self, text: str) -> None:
        data = (text + "\n").encode()
        at = int.from_bytes(self.memory[0:4], "little") + 4
        self.memory[at:at + len(data)] = data
        self.memory[0:4] = (at - 4 + len(data)).to_bytes(4, "little")
        self.printk(f"hostile: {text}")

    def step(self, what: str, fn) -> object:
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - what stopped it is the result
            self.note(f"{what}: {type(exc).__name__}: {exc}")
            return None
        self.note(f"{what}: ok")
        return out

    def host_pid(self) -> int:
        return int.from_bytes(self.ctx.peers[28:32], "little")      # the host's peer entry

    def ends_early(self):
        """When a timed attack may stop before its ``seconds`` are up (``until=`` on its
        cmdline), so that its test waits for what it measures, not for the clock:
        ``gone:ID`` once instance ID is no longer active in the peer table (the bystander the
        test killed), ``booted:N`` once N instances besides the host and this one are active
        (the test's boots all done). Without it only the clock ends the attack. Looked at
        every 20 ms (a read of the peer table, which the host writes)."""
        kind, _, arg = self.params.get("until", "").partition(":")
        peers, me, every = self.ctx.peers, self.id, 0.02
        active = (3).to_bytes(4, "little")              # STATE_CODES["active"]

        def state_active(i: int) -> bool:
            return bytes(peers[i * 64 + 24:i * 64 + 28]) == active

        def done() -> bool:
            if kind == "gone":
                return not state_active(int(arg))
            if kind == "booted":
                return sum(state_active(i) for i in range(1, len(peers) // 64)
                           if i != me) >= int(arg)
            return False
        next_look = [0.0]

        def now_done() -> bool:
            t = time.monotonic()
            if t < next_look[0]:
                return False
            next_look[0] = t + every
            return done()
        return now_done

    def boot(self) -> None:
        self.attack = self.params.get("attack", "")
        self.target = int(self.params.get("target", "0"))
        self.note(f"attack {self.attack}")

    def tick(self) -> bool:
        if self.attack:
            attack, self.attack = self.attack, ""
            getattr(self, "attack_" + attack.replace("-", "_"))()
        return False

    # -- the attacks -----------------------------------------------------------------------
    def attack_signal_host(self) -> None:
        self.step("kill host", lambda: os.kill(self.host_pid(), signal.SIGKILL))

    def attack_ipi_signal_host(self) -> None:
        self.step("kill host IPI", lambda: os.kill(self.host_pid(), signal.SIGURG))

    def attack_forge_peer(self) -> None:
        off = self.target * 64
        self.step("peer_state", lambda: self.ctx.peers.__setitem__(slice(off + 24, off + 28),
                                                                    (3).to_bytes(4, "little")))
        self.step("force_halt", lambda: self.ctx.peers.__setitem__(slice(off + 12, off + 16),
                                                                    (1).to_bytes(4, "little")))
        self.step("redirect", lambda: self.ctx.peers.__setitem__(
            slice(off + 32, off + 36), (self.id + 1).to_bytes(4, "little")))

    def attack_forge_peer_raw(self) -> None:
        # below Python's read-only memoryview: a raw store into the read-only mapping
        addr = _ro_address(self.ctx.peers) + self.target * 64 + 12
        self.step("raw store", lambda: ctypes.memmove(addr, b"\x01", 1))

    def attack_garbage_own_page(self) -> None:
        own = self.ctx.own
        def scribble():
            own.reason_len = 0xFFFFFFFF
            own.buf[own.base + 128:own.base + 256] = b"\xff" * 128
            own.progress = 2 ** 64 - 1
            own.ack_generation = 12345
        self.step("scribble own page", scribble)
        self.halt("scribbled")

    def attack_host_fds(self) -> None:
        host = self.host_pid()
        self.step("list host fds", lambda: os.listdir(f"/proc/{host}/fd"))
        self.step("open host fd", lambda: os.open(f"/proc/{host}/fd/3", os.O_RDWR))

    def attack_write_files(self) -> None:
        self.step("write /etc", lambda: open("/etc/mk-hostile", "w").close())
        self.step("write run dir", lambda: open(os.environ.get("MK_VICTIM_FILE",
                                                               "/dev/shm/mk-hostile"), "w"))

    def attack_fork_and_exit(self) -> None:
        pid = os.fork()
        if pid == 0:                        # the child outlives its kernel, or tries to
            while True:
                time.sleep(1)
        self.note(f"child {pid}")
        self.halt("forked and left")

    def attack_setown_signal(self) -> None:
        import fcntl
        r, w = os.pipe()
        def aim():
            fcntl.fcntl(r, fcntl.F_SETOWN, self.host_pid())     # SIGIO at the host
            fcntl.fcntl(r, 10, signal.SIGKILL)                   # F_SETSIG
            fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
            os.write(w, b"x")
        self.step("F_SETOWN", aim)

    def attack_prlimit_host(self) -> None:
        import resource
        self.step("prlimit host", lambda: resource.prlimit(self.host_pid(),
                                                           resource.RLIMIT_NOFILE, (8, 8)))

    def attack_socket(self) -> None:
        import socket
        self.step("socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))

    def attack_flock(self) -> None:
        import fcntl
        fd = os.open("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd",
                     os.O_RDONLY)
        self.step("flock", lambda: fcntl.flock(fd, fcntl.LOCK_EX))

    def attack_clone_namespaces(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        # clone(CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD): a fork with namespaces
        self.step("clone", lambda: libc.syscall(56, 0x10000000 | 0x40000000 | 17, 0, 0, 0, 0))

    def attack_saturate_host_doorbell(self) -> None:
        def flood():
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    os.eventfd_write(self.ctx.host_doorbell_fd, 0xFFFFFFFFFFFFFFFE)
                except BlockingIOError:
                    pass
        self.step("saturate", flood)

    def attack_close_channel(self) -> None:
        import socket
        self.step("shutdown channel", lambda: self.ctx.channel.shutdown(socket.SHUT_WR))

    def attack_halted_flood(self) -> None:
        from partition.abi.message import MK_MSG_HALTED
        def flood():
            end = time.monotonic() + 2
            while time.monotonic() < end:
                try:
                    self.send(0, MK_MSG_HALTED, {"reason": "x" * 100})
                except Exception:  # noqa: BLE001 - a full ring: keep going
                    pass
        self.step("halted flood", flood)

    def attack_sysv_shm(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        key = int(self.params.get("key", "0"))
        self.step("shmget", lambda: _check(libc.shmget(key, 0, 0)))

    def attack_repin(self) -> None:
        self.step("sched_setaffinity", lambda: os.sched_setaffinity(0, {0}))

    def attack_sched_fifo(self) -> None:
        self.step("SCHED_FIFO", lambda: os.sched_setscheduler(0, os.SCHED_FIFO,
                                                             os.sched_param(50)))

    def attack_pidfd_getfd(self) -> None:
        self.step("pidfd_open host", lambda: os.pidfd_open(self.host_pid()))

    def attack_jam_ring(self) -> None:
        # a claim in the target's ring, written with another sender's id, never published
        from ringtool import claim, fill
        ring = self.endpoint.ring_of(self.target)
        forged = int(self.params.get("as", "0"))
        self.step("jam", lambda: fill(ring, claim(ring), forged, 0, 0x4000, b"never"))

    def attack_garbage_header(self) -> None:
        ring = self.endpoint.ring_of(self.target)
        def scribble():
            tail = int.from_bytes(ring.buf[64:72], "little")
            ring.buf[0:8] = (tail + 1000).to_bytes(8, "little")       # head far past the ring
            ring.buf[136:144] = (2 ** 64 - 5).to_bytes(8, "little")   # "received"
        self.step("garbage header", scribble)

    def attack_forge_commands(self) -> None:
        from ringtool import claim, fill, publish

        from partition.abi import message as M
        by = self.target
        base = int(self.params.get("base", "0"))
        self.step("shutdown", lambda: self.send(by, M.MK_MSG_SHUTDOWN, {"timeout_s": 1}))
        self.step("panic", lambda: self.send(by, M.MK_EMU_FAULT, {"kind": "panic", "options": {}}))
        self.step("wild", lambda: self.send(by, M.MK_EMU_FAULT, {
            "kind": "wild-write", "options": {"address": base, "bytes": 64}}))
        # and as the host itself, in a raw slot: the sender id and a plausible command number
        seq = int.from_bytes(self.ctx.peers[by * 64 + 36:by * 64 + 40], "little")
        ring = self.endpoint.ring_of(by)
        for s in (seq, seq + 1):
            data = M.encode(M.MK_MSG_SHUTDOWN, 0, 1, {"seq": s, "body": {"timeout_s": 1}})
            def raw(data=data):
                off = fill(ring, claim(ring), 0, 0, M.MK_MSG_SHUTDOWN, data)   # sender: host
                publish(ring, off, len(data))
            self.step(f"raw shutdown {s}", raw)

    def attack_ipi_flood(self) -> None:
        from partition.abi import doorbell
        from partition.abi.constants import IPI_SIGNAL
        st, _, _, fds = doorbell.ask(self.ctx.channel, self.target, 2.0)
        def flood():
            if st:
                raise OSError(st, "no doorbell")
            end, n = time.monotonic() + float(self.params.get("seconds", "3")), 0
            while time.monotonic() < end:
                signal.pidfd_send_signal(fds[1], IPI_SIGNAL)
                n += 1
            self.note(f"sent {n}")
        self.step("flood", flood)

    def attack_steal_doorbell(self) -> None:
        """The doorbell a peer is legitimately given, read in a loop: on an eventfd every
        read swallowed the target's wake-up (a host's graceful kill of it took 3 s)."""
        from partition.abi import doorbell
        st, _, _, fds = doorbell.ask(self.ctx.channel, self.target, 2.0)

        def steal():
            if st:
                raise OSError(st, "no doorbell")
            self.note("stealing")
            end, took, refused = time.monotonic() + float(self.params.get("seconds", "3")), 0, 0
            done = self.ends_early()
            while time.monotonic() < end and not done():
                try:
                    took += len(os.read(fds[0], 64))
                except BlockingIOError:
                    pass
                except OSError:
                    refused += 1
                os.sched_yield()
            self.note(f"took {took} bytes, refused {refused} reads")
            if refused and not took:
                raise PermissionError("the doorbell could not be read")
        self.step("steal", steal)

    def attack_resize_doorbell(self) -> None:
        """The doorbell a peer is given, its pipe resized (F_SETPIPE_SZ) to one page."""
        import fcntl

        from partition.abi import doorbell
        st, _, _, fds = doorbell.ask(self.ctx.channel, self.target, 2.0)

        def resize():
            if st:
                raise OSError(st, "no doorbell")
            self.note("resizing")
            fcntl.fcntl(fds[0], 1031, 4096)           # F_SETPIPE_SZ
        self.step("resize", resize)

    def attack_steal_host_doorbell(self) -> None:
        """The host's doorbell, which every instance holds to ring it, read in a loop."""
        def steal():
            self.note("stealing")
            fd = self.ctx.host_doorbell_fd
            end, took, refused = time.monotonic() + float(self.params.get("seconds", "3")), 0, 0
            done = self.ends_early()
            while time.monotonic() < end and not done():
                try:
                    took += len(os.read(fd, 64))
                except BlockingIOError:
                    pass
                except OSError:
                    refused += 1
                os.sched_yield()
            self.note(f"took {took} bytes, refused {refused} reads")
            if refused and not took:
                raise PermissionError("the host doorbell could not be read")
        self.step("steal host", steal)

    def attack_block_doorbell(self) -> None:
        """The doorbell a peer is given is one file shared by every sender, the host
        included: make it blocking (a file flag: every holder's) and keep it full, so that
        a sender's plain write would wait until the target drains it."""
        from partition.abi import doorbell
        st, _, _, fds = doorbell.ask(self.ctx.channel, self.target, 2.0)

        def block():
            if st:
                raise OSError(st, "no doorbell")
            os.set_blocking(fds[0], True)
            end, n, full = time.monotonic() + float(self.params.get("seconds", "3")), 0, False
            while time.monotonic() < end:
                try:
                    n += os.pwritev(fds[0], [bytes(4096)], -1, os.RWF_NOWAIT)
                except BlockingIOError:
                    if not full:
                        self.note("full")
                        full = True
                    time.sleep(0.001)
            self.note(f"wrote {n}")
        self.step("block", block)

    def _raw(self, ring_id: int, sender: int, mtype: int, payload: object) -> None:
        from ringtool import claim, fill, publish

        from partition.abi import message as M
        ring = self.endpoint.ring_of(ring_id)
        data = M.encode(mtype, 0, 1, payload)
        off = fill(ring, claim(ring), sender, 0, mtype, data)
        publish(ring, off, len(data))

    def attack_replay_shutdown(self) -> None:
        from partition.abi import message as M
        by = self.target
        seq = int.from_bytes(self.ctx.peers[by * 64 + 36:by * 64 + 40], "little")
        for body in ({"timeout_s": 5.0}, {"timeout_s": 5}):      # the host's last command
            self.step(f"replay {seq}", lambda body=body: self._raw(by, 0, M.MK_MSG_SHUTDOWN,
                                                                  {"seq": seq, "body": body}))

    def attack_renice_all(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.step("PRIO_USER", lambda: _check(libc.setpriority(2, 0, 19)))

    def attack_fanotify(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.step("fanotify", lambda: _check(libc.fanotify_init(0, 0)))

    def attack_filter_host(self) -> None:
        from partition.abi import message as M
        ring = self.endpoint.ring_of(self.target)
        def forge():        # sender 0 + 1, type SHUTDOWN, until far ahead, as the table holds it
            ring.buf[200:216] = (1).to_bytes(2, "little") + bytes(2) + \
                M.MK_MSG_SHUTDOWN.to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little") + bytes(4)
        self.step("filter host", forge)

    def attack_forge_halted(self) -> None:
        from partition.abi import message as M
        self.step("halted as by", lambda: self._raw(0, self.target, M.MK_MSG_HALTED,
                                                    {"reason": "panic: forged by a peer"}))

    def attack_host_ring_garbage(self) -> None:
        def loop():
            ring = self.endpoint.ring_of(0)
            end = time.monotonic() + 2
            while time.monotonic() < end:
                tail = int.from_bytes(ring.buf[64:72], "little")
                ring.buf[0:8] = (tail + 100000).to_bytes(8, "little")
                try:
                    os.eventfd_write(self.ctx.host_doorbell_fd, 1)
                except BlockingIOError:
                    pass
                time.sleep(0.0002)
        self.step("host ring garbage", loop)

    def attack_memfd_hog(self) -> None:
        chunk = b"\x01" * (1 << 20)

        def hog():                 # page cache, not address space: RLIMIT_AS does not see it
            fd = os.memfd_create("hog")
            for i in range(1024):
                os.write(fd, chunk)
                if i % 64 == 0:
                    self.note(f"wrote {i} MiB")
        self.step("memfd 1 GiB", hog)


def _check(rc: int) -> int:
    if rc < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc


def _ro_address(view: memoryview) -> int:
    """The address of a read-only mapping, through the buffer protocol's pointer."""
    class Py_buffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                    ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                    ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                    ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]
    b = Py_buffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(b), 0)
    try:
        return int(b.buf)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(b))
