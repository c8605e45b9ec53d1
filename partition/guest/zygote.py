"""The zygote: a small process that forks every instance, so that none is a copy of its host.

Why: an instance forked from the supervisor shares the supervisor's heap copy-on-write, and
what the child touches of it (reference counts, malloc's free lists spread over a big heap)
becomes its own: measured here, 5.2 MB of private memory per instance at 16 instances and 8 MB
at 511, against 1.1 MB for a bare fork of a small interpreter. The zygote is a fresh
interpreter (``python -m partition.guest.zygote``) that imports the trampoline and nothing of
the host, then forks instances on request: their private memory is what they make themselves.

The host asks over a SOCK_SEQPACKET pair: one message with the boot parameters (msgpack) and,
by SCM_RIGHTS, the descriptors the instance needs; the zygote answers with the pid and the
numbers the descriptors have in the child (adoption takes the doorbells back by those numbers,
``pidfd_getfd``). The fork is a ``clone(CLONE_PARENT)``: the instance is the host's child, not
the zygote's, so the host waits for it, reads its exit status and holds its pidfd exactly as
when it forked it itself, and ``enter`` finds the host as its parent.

Each machine has one, made at its first load and closed with the machine; it also dies with
its host (parent-death signal) and when its socket closes, and a machine whose zygote died
makes another. Nothing an instance writes reaches it: it talks to the host alone, and forks
before any kernel code runs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import msgpack

from partition import linux
from partition.abi import layout as L
from partition.errors import ZygoteError

CLONE_PARENT = 0x00008000
SYS_CLONE = 56                  # x86_64
#: the boot parameters that are descriptors: sent by SCM_RIGHTS, renumbered on the way
FD_FIELDS = ("arena_fd", "doorbell_fd", "host_doorbell_fd", "channel_fd", "report_fd")
MAX_REQUEST = 1 << 20
#: how long the host waits for a new zygote, and then for each fork it asks for
READY_S = 30.0


def fork_as_sibling() -> int:
    """fork(2) whose child is our parent's child (``CLONE_PARENT``): 0 in the child, its pid
    here. Python's own fork bookkeeping (import lock, threads, at-fork hooks) around it, with
    the GIL held throughout (``ctypes.pythonapi`` and a PyDLL), as ``os.fork`` does; the
    zygote has one thread, so no lock of the C library is held by another. The raw system
    call skips the C library's own fork handling (other libraries' ``pthread_atfork``
    handlers, its random-number reseed): nothing the zygote loads registers any, and the
    child execs nothing but the trampoline."""
    api = ctypes.pythonapi
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    api.PyOS_BeforeFork()
    pid = libc.syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD),
                       ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0),
                       ctypes.c_void_p(0))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
    return int(pid)


def encode_params(params: Any, seq: int) -> tuple[bytes, list[int]]:
    """BootParams -> (the message, the descriptors to send), descriptors in FD_FIELDS order.
    The host's ``sys.path`` and environment go with it: the child resolves the image as a
    child of the host would (the daemon puts the caller's directory on the path for a load)."""
    fields = dataclasses.asdict(params)
    fields["layout"] = dataclasses.asdict(params.layout)
    fds = [fields.pop(name) for name in FD_FIELDS]
    # as bytes: an environment or a path need not be UTF-8
    request = {"params": fields, "path": [os.fsencode(p) for p in sys.path],
               "env": dict(os.environb), "seq": seq}
    raw = msgpack.packb(request, use_bin_type=True)
    if len(raw) > MAX_REQUEST:
        raise ZygoteError(f"a spawn request of {len(raw)} bytes is over {MAX_REQUEST}",
                          "a smaller environment, or MK_ZYGOTE=0")
    return raw, fds


def decode_params(raw: bytes, fds: list[int]) -> tuple[Any, list[str], dict[bytes, bytes], int]:
    from partition.guest.trampoline import BootParams
    request = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    fields = request["params"]
    fields["layout"] = L.ArenaLayout(**fields["layout"])
    fields["inherited"] = []                    # the zygote maps nothing of the arena
    fields["cpus"] = list(fields["cpus"])
    fields.update(zip(FD_FIELDS, fds, strict=True))
    return (BootParams(**fields), [os.fsdecode(p) for p in request["path"]],
            dict(request["env"]), int(request["seq"]))


def _sent(exc: ZygoteError) -> ZygoteError:
    """Mark an error that came after the request went: the zygote may have forked for it."""
    exc.sent = True
    return exc


class Zygote:
    """The host's end: ``spawn(params)`` -> (pid, the child's numbers of the doorbell and the
    host doorbell)."""

    def __init__(self) -> None:
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = host_end
        self.seq = 0
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "partition.guest.zygote", str(zygote_end.fileno())],
                pass_fds=(zygote_end.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            host_end.close()
            raise
        finally:
            zygote_end.close()
        # ready: it answers once it has imported what instances need
        self.sock.settimeout(READY_S)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"ready":
            self.close()
            raise ZygoteError("the zygote did not start", "run python -m partition.guest.zygote "
                                                          "by hand to see why")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, params: Any) -> tuple[int, tuple[int, int]]:
        """Raises ZygoteError when it cannot answer for a fork; ``sent`` on it when that came
        after the request went (the zygote may have forked: the caller closes this zygote, so
        that a late answer is never read as the next request's, and ends what may have been
        forked); without it nothing was forked, and the caller may fork itself."""
        self.seq += 1
        try:
            raw, fds = encode_params(params, self.seq)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ZygoteError(f"the boot parameters do not encode: {exc}", "MK_ZYGOTE=0") from None
        try:
            socket.send_fds(self.sock, [raw], fds)
            answer = msgpack.unpackb(self.sock.recv(4096), raw=False)
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            raise _sent(ZygoteError(f"the zygote did not answer: {exc}",
                                    "retry: a new zygote is made")) from None
        if not isinstance(answer, dict) or "pid" not in answer:
            why = answer.get("error") if isinstance(answer, dict) else answer
            raise ZygoteError(f"the zygote could not fork: {why}",
                              "see the host's limits (processes, memory)")
        if answer.get("seq") != self.seq:
            raise _sent(ZygoteError(f"the zygote answered request {answer.get('seq')!r}, not "
                                    f"{self.seq}", "retry: a new zygote is made"))
        return int(answer["pid"]), (int(answer["doorbell_fd"]), int(answer["host_doorbell_fd"]))

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve(sock: socket.socket) -> None:
    """The zygote's loop: a request, a fork, an answer; until the host closes the socket."""
    from partition.guest.trampoline import enter
    gc.collect()
    gc.freeze()                     # what is here now stays shared with every child
    sock.send(b"ready")
    while True:
        try:
            raw, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, len(FD_FIELDS))
        except InterruptedError:
            continue
        if not raw:
            return                  # the host closed its end
        try:
            params, path, env, seq = decode_params(raw, fds)
            pid = fork_as_sibling()
        except Exception as exc:     # (a bad request, or no fork: say so, go on)
            for fd in fds:
                os.close(fd)
            sock.send(msgpack.packb({"error": f"{type(exc).__name__}: {exc}", "seq": None}))
            continue
        if pid == 0:
            sock.close()
            sys.path[:] = path
            os.environb.clear()
            os.environb.update(env)
            os.set_blocking(params.report_fd, True)     # (shared with the host's end: set
            enter(params)           # never returns     #  here, as a forked child does)
        for fd in fds:
            os.close(fd)
        sock.send(msgpack.packb({"pid": pid, "doorbell_fd": params.doorbell_fd,
                                 "host_doorbell_fd": params.host_doorbell_fd, "seq": seq}))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    linux.set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the host's ^C is the host's
    import setproctitle
    # named, and the title machinery set up here, before any child changes its environment
    # (which would leave a child's own title to the 15-character comm alone)
    setproctitle.setproctitle(f"mk-zygote (host {os.getppid()})")
    sock = socket.socket(fileno=int(args[0]))
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
