"""The supervisor daemon: a Machine driven continuously, answering ``mkctl`` on a UNIX socket.

Single-threaded: one epoll loop watches the listening socket, every client connection, the
machine's own epoll (pidfds, host doorbell) and a signal wake-up pipe, with the machine's timers
(watchdog, write watch, restarts) as its timeout. A death therefore wakes the daemon at once,
and a hang is declared on time, even when no command is being served. Verbs run one at a time;
while one waits (a graceful kill), the loop keeps reading other clients, answers the read-only
ones and queues the rest. The socket is 0600 and a client must be root or the machine's owner
(SO_PEERCRED), on the host's side: not a process of an instance of any machine, kernel or
userland (peercheck.py; a userland's programs are uid 0 too).

The verbs it serves are daemonops.py's, the checks every request passes are wireargs.py's; this
module is the loop and the process's entry (``python -m partition.control.daemon``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import setproctitle

from partition.abi.constants import IPI_SIGNAL
from partition.control import peercheck, protocol
from partition.control.daemonops import READ_ONLY_OPS, dump_tree, ops
from partition.control.wireargs import ARGS, check_numbers, check_request
from partition.errors import InvalidSpec, MKError, NoSuchInstance, PermissionDenied, ResourceBusy
from partition.host import adoption, rundir
from partition.host.machine import Machine

#: the names this module had before the verbs and the checks moved out (tests, watch.py)
_ops = ops
_dump = dump_tree
__all__ = ["ARGS", "READ_ONLY_OPS", "Conn", "Daemon", "check_numbers", "check_request", "main"]

MAX_CLIENTS = 16          # connections at once; one more is answered EBUSY and closed
REQUEST_DEADLINE_S = 5.0  # a client must have sent its whole request by then
REPLY_DEADLINE_S = 30.0   # and must have read its reply by then


@dataclass
class Conn:
    """One client connection: a request read, a reply written, both without blocking."""

    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    request: Any = None       # decoded, waiting to be dispatched
    uid: int = -1


class Daemon:
    """One machine behind a socket, never blind: every connection is non-blocking inside the
    one event loop, with a byte budget and a deadline; the machine's own timers (watchdog,
    write watch, restarts) set the loop's timeout; a verb that waits (a graceful kill) lets the
    loop go on answering ``ping``/``show``/``console`` and queues other verbs behind it."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        machine.defer_state = True      # written after each verb and each turn (flush_state)
        self.ops = ops(machine)
        self.path = os.path.join(machine.run_dir, rundir.SOCKET)
        if len(self.path.encode()) > 107:
            raise InvalidSpec(f"socket path {self.path!r} is longer than 107 bytes",
                              "choose a shorter --run-dir")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if machine.adopting:           # the dead host's socket; the run directory's lock is ours
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        old = os.umask(0o177)          # the socket is born 0600, whatever the caller's umask
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.owner = os.getuid()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, "listen")
        self.sel.register(machine.fileno(), selectors.EVENT_READ, "machine")
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.conns: dict[int, Conn] = {}
        self.queue: list[Conn] = []     # complete requests waiting for the verb in progress
        self.busy = False               # a verb is being dispatched (and may be waiting)
        self.stopping = False
        machine.waiter = self.step

    # -- the loop --------------------------------------------------------------------------
    def loop(self) -> None:
        while not self.stopping:
            self.step(None)
            while self.queue and not self.stopping and not self.busy:
                self._dispatch(self.queue.pop(0))

    def step(self, limit: float | None) -> None:
        """One turn of the loop: wait for the first event or timer (at most ``limit``), then
        handle what is ready. Also the machine's ``waiter`` while a verb waits."""
        now = time.monotonic()
        timeout: float | None = None   # the machine's sweep keeps the counters views fresh
        for t in (limit, self.m.next_timer(),
                  *(c.deadline - now for c in self.conns.values())):
            if t is not None:
                timeout = max(0.0, t) if timeout is None else min(timeout, max(0.0, t))
        events = self.sel.select(timeout)
        self.m.poll(0)                  # deaths, doorbells and the machine's timers
        self.m.flush_state()
        for key, mask in events:
            if key.data == "listen":
                self._accept()
            elif key.data == "signal":
                os.read(self.wake_r, 512)
                self.m.events.info("supervisor_signal", action="shutdown")
                self.stopping = True
            elif isinstance(key.data, Conn):
                self._serve(key.data, mask)
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self.m.events.warning("client_timeout", uid=conn.uid,
                                  stage="reply" if conn.outbuf else "request")
            self._close(conn)

    # -- connections -----------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = Conn(sock, time.monotonic() + REQUEST_DEADLINE_S)
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_PEERCRED, 12))
            conn.uid = uid
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)
            origin = "one of this machine's kernels" if self._is_instance(pid) \
                else peercheck.refusal(sock, pid)
            if origin:
                self.m.events.warning("client_refused", uid=uid, pid=pid, reason="an instance",
                                      why=origin)
                self._reply(conn, _error(PermissionDenied(
                    f"an instance may not drive a machine: {origin}",
                    "mkctl is for the operator, on the host")))
            elif uid not in (0, self.owner):
                self.m.events.warning("client_refused", uid=uid, pid=pid, reason="credentials")
                self._reply(conn, _error(PermissionDenied(
                    f"uid {uid} may not use this machine (owner uid {self.owner})",
                    "run mkctl as the machine's owner or as root")))
            elif len(self.conns) > MAX_CLIENTS:
                self.m.events.warning("client_refused", uid=uid, pid=pid, reason="too many")
                self._reply(conn, _error(ResourceBusy(
                    f"the supervisor already serves {MAX_CLIENTS} clients",
                    "retry in a moment; a client that holds a connection open is what fills it")))

    def _is_instance(self, pid: int) -> bool:
        """The peer is one of this machine's instance processes (its credentials are root's
        too: the uid alone cannot tell them from the operator)."""
        for inst in self.m.instances.values():
            if pid in (inst.pid, inst.parked.pid if inst.parked else None):
                return True
        return False

    def _serve(self, conn: Conn, mask: int) -> None:
        """One client's turn. Whatever its frame does, it ends here, with that client: this
        runs inside another client's waiting verb too (``step`` is the machine's waiter), and
        an exception let out would fail that verb instead."""
        try:
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self.conns:
                self._write(conn)
        except Exception as exc:
            self.m.events.warning("request_failed", uid=conn.uid, error=repr(exc),
                                  traceback=traceback.format_exc())
            if conn.sock.fileno() in self.conns and not conn.outbuf:
                self._reply(conn, _error(MKError(f"internal error: {exc!r}",
                                                 "see events.log in the run directory")))
            else:
                self._close(conn)

    def _read(self, conn: Conn) -> None:
        if conn.request is not None or conn.outbuf:
            return                      # one request per connection; the rest is ignored
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
            return
        conn.inbuf += chunk
        try:
            req = protocol.parse(conn.inbuf)
        except protocol.ProtocolError as exc:
            self.m.events.warning("bad_request", uid=conn.uid, error=str(exc))
            self._reply(conn, _error(InvalidSpec(f"bad request frame: {exc}",
                                                 "use mkctl, or follow docs/architecture.md")))
            return
        if req is protocol.INCOMPLETE:
            return
        conn.request = req
        conn.deadline = math.inf        # it asked in time: its verb may take as long as it needs
        known = self.ops.keys() | {"shutdown"}
        try:                            # a frame that will be refused is refused at once
            op = check_request(req, known)[0]
        except MKError:
            op = None
        if self.busy and op in known and op not in READ_ONLY_OPS:
            self.queue.append(conn)     # served when the verb in progress is done
        else:
            self._dispatch(conn)        # (a read, or a request refused at once)

    def _dispatch(self, conn: Conn) -> None:
        outer = self.busy
        self.busy = True
        try:
            reply = self.dispatch(conn.request)
        finally:
            self.busy = outer
        self.m.flush_state()            # what the verb changed is on disk before its reply
        if conn.sock.fileno() in self.conns:
            self._reply(conn, reply)

    def _reply(self, conn: Conn, reply: dict[str, Any]) -> None:
        conn.outbuf = protocol.frame(reply)
        conn.deadline = time.monotonic() + REPLY_DEADLINE_S
        self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[n:]
        if not conn.outbuf:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if fd in self.conns:
            del self.conns[fd]
            self.sel.unregister(conn.sock)
        if conn in self.queue:
            self.queue.remove(conn)
        conn.sock.close()

    # -- requests --------------------------------------------------------------------------
    def dispatch(self, req: Any) -> dict[str, Any]:
        try:
            op, args = check_request(req, self.ops.keys() | {"shutdown"})
            if op == "shutdown":
                halted = sum(1 for i in self.m.instances.values() if i.pid is not None)
                self.m.close()
                self.stopping = True
                return {"ok": True, "result": {"halted": halted, "pid": os.getpid()}}
            if op not in self.ops:
                raise InvalidSpec(f"unknown operation {op!r}",
                                  f"one of: {', '.join(sorted(self.ops))}, shutdown")
            return {"ok": True, "result": self.ops[op][1](**args)}
        except MKError as exc:
            return _error(exc)
        except TypeError as exc:
            return _error(InvalidSpec(f"bad arguments: {exc}"))
        except Exception as exc:
            self.m.events.warning("request_failed", error=repr(exc),
                                  traceback=traceback.format_exc())
            return _error(MKError(f"internal error: {exc!r}", "see events.log in the run directory"))

    def close(self) -> None:
        self.m.waiter = None
        for conn in list(self.conns.values()):
            self._close(conn)
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def _error(exc: MKError) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_wire()}

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m partition.control.daemon")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", required=True, help="JSON machine arguments")
    ap.add_argument("--ready-fd", type=int, default=-1)
    ap.add_argument("--lock-fd", type=int, default=-1,
                    help="the run directory's lock, taken by mkctl init")
    a = ap.parse_args(argv)
    cfg = json.loads(a.config)

    def tell(text: str) -> None:
        if a.ready_fd >= 0:
            os.write(a.ready_fd, text.encode())
            os.close(a.ready_fd)

    signal.signal(IPI_SIGNAL, signal.SIG_IGN)   # an instance's doorbell is never the host's
    setproctitle.setproctitle(f"mk-host {a.run_dir}")   # not "python3 -m ... --config {...}"
    adopting = bool(cfg.get("adopt"))
    try:
        if adopting:               # a new host for the instances a dead one left (adoption.py)
            state = adoption.read_state(a.run_dir)
            if state is None:
                raise NoSuchInstance(f"no machine to adopt in {a.run_dir}: its state file is "
                                     "missing or unreadable",
                                     "mkctl shutdown removes what it left; mkctl init starts anew")
            cfg = {k: v for k, v in state["config"].items()
                   if k in adoption.CONFIG_KEYS} | {"adopt": True}
        run = rundir.claim(a.run_dir, a.lock_fd) if a.lock_fd >= 0 else a.run_dir
        machine = Machine(run_dir=run, pin_host=True, **cfg)
    except Exception as exc:
        err = exc if isinstance(exc, MKError) else MKError(
            f"the machine could not be {'adopted' if adopting else 'started'}: {exc!r}",
            "mkctl shutdown removes what a dead host left" if adopting else None)
        tell("error:" + json.dumps(err.to_wire()))
        if not adopting:           # an adoption that failed leaves everything for shutdown
            shutil.rmtree(a.run_dir, ignore_errors=True)
        return 1
    try:
        sup = Daemon(machine)
    except BaseException as exc:
        machine.close()
        wire = exc.to_wire() if isinstance(exc, MKError) else MKError(repr(exc)).to_wire()
        tell("error:" + json.dumps(wire))
        shutil.rmtree(a.run_dir, ignore_errors=True)
        return 1
    tell("ok")
    try:
        sup.loop()
    except BaseException as exc:
        if not machine.survive_host:
            raise
        # a crash of the host: its instances run on, for a new host to adopt (adoption.py)
        machine.events.error("host_crashed", error=repr(exc), traceback=traceback.format_exc())
        try:
            machine.flush_state()
        except Exception:
            pass
        os._exit(70)
    # the last reply ("shutdown") was already sent; now halt everything and clean up
    sup.close()
    machine.close()
    shutil.rmtree(a.run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
