"""The read-only socket of a machine that another loop drives (``mkctl run``'s), so that
``mkctl top``, ``mkctl show`` and ``mkctl console -f`` can watch an experiment as it runs.

It answers ``ping``, ``show``, ``console`` and ``dump`` and refuses every other op with EPERM:
watching must not change the experiment. The runner calls ``step`` on each turn of its loop;
``step`` never waits. Requests are small and answered at once; a client that has not sent its
whole request within ``DEADLINE_S`` is dropped, so a stuck client costs the experiment nothing.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from partition.control import protocol
from partition.control.daemonops import READ_ONLY_OPS, dump_tree
from partition.control.wireargs import check_request
from partition.errors import MKError, PermissionDenied
from partition.host import rundir
from partition.host.machine import Machine

DEADLINE_S = 2.0
MAX_CONNS = 8


class Watcher:
    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.path = os.path.join(machine.run_dir, rundir.SOCKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self.sock.listen(MAX_CONNS)
        self.sock.setblocking(False)
        self.conns: dict[socket.socket, tuple[bytearray, float]] = {}

    def step(self) -> None:
        """Accept, read, answer what is complete; never blocks."""
        now = time.monotonic()
        while len(self.conns) < MAX_CONNS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            self.conns[conn] = (bytearray(), now + DEADLINE_S)
        for conn, (buf, deadline) in list(self.conns.items()):
            try:
                chunk = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError:
                chunk = b""
            if chunk:
                buf += chunk
            try:
                req = protocol.parse(buf)
            except protocol.ProtocolError:
                req, chunk = None, b""
            if req is not protocol.INCOMPLETE and req is not None:
                self._answer(conn, req)
            elif chunk == b"" or now > deadline:
                self._drop(conn)

    def _answer(self, conn: socket.socket, req: Any) -> None:
        """Answer one request; whatever it holds, the answer is that client's alone and the
        experiment goes on (this runs inside the runner's loop)."""
        try:
            reply = {"ok": True, "result": self._dispatch(req)}
        except MKError as exc:
            reply = {"ok": False, "error": exc.to_wire()}
        except Exception as exc:
            self.m.events.warning("request_failed", error=repr(exc),
                                  traceback=traceback.format_exc())
            reply = {"ok": False, "error": MKError(f"internal error: {exc!r}",
                                                   "see events.log in the run directory"
                                                   ).to_wire()}
        try:
            conn.setblocking(True)
            conn.settimeout(DEADLINE_S)
            conn.sendall(protocol.frame(reply))
        except OSError:
            pass
        self._drop(conn)

    def _dispatch(self, req: Any) -> Any:
        op, args = check_request(req, READ_ONLY_OPS)      # every field, as the daemon does
        name = args.get("name")
        if op == "ping":
            return {"pid": os.getpid(), "run_dir": self.m.run_dir}
        if op == "show":
            return self.m.show(name, bool(args.get("brief", False)))
        if op == "console":
            return self.m.console(args["name"])
        if op == "dump":
            return dump_tree(self.m, name)
        raise PermissionDenied(f"{op!r}: this machine runs an experiment (mkctl run); it can be "
                               "watched, not changed", "mkctl top, show, console -f, dump")

    def _drop(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self.conns):
            self._drop(conn)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
