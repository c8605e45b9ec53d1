"""The supervisor daemon: a Machine driven continuously, answering ``mkctl`` on a UNIX socket.

Single-threaded: one epoll loop watches the listening socket, the machine's own epoll (pidfds,
host doorbell) and a signal wake-up pipe. A death therefore wakes the daemon at once even when no
command is being served. Requests are served one at a time, to completion; a verb that waits (a
graceful kill) keeps driving the machine while it waits, so other deaths are still recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from partition.control import protocol
from partition.errors import InvalidSpec, MKError
from partition.host import rundir
from partition.host.machine import Machine

VIEW_REFRESH_S = 1.0      # counters in sys/ views are at most this old


# op -> (argument names allowed, handler)
def _ops(m: Machine) -> dict[str, tuple[set[str], Callable[..., Any]]]:
    return {
        "ping": (set(), lambda: {"pid": os.getpid(), "run_dir": m.run_dir}),
        "show": ({"name"}, m.show),
        "create": ({"name", "memory", "cpus", "cpu_count", "id", "recovery", "max_restarts",
                    "restart_window", "watchdog", "standby_for", "preserve_memory"}, m.create),
        "update": ({"name", "recovery", "max_restarts", "restart_window", "watchdog",
                    "preserve_memory"}, m.update),
        "fault": ({"name", "kind", "options"}, lambda name, kind, options=None:
                  m.fault(name, kind, **(options or {}))),
        "load": ({"name", "kernel", "cmdline", "cwd"},
                 lambda **kw: _load_with_cwd(m, **kw)),
        "exec": ({"name"}, m.exec),
        "kill": ({"name", "force", "timeout"}, m.kill),
        "unload": ({"name"}, m.unload),
        "delete": ({"name"}, m.delete),
        "console": ({"name"}, m.console),
    }


def _load_with_cwd(m: Machine, name: str, kernel: str, cmdline: str = "",
                   cwd: str | None = None) -> Any:
    """Resolve module specs relative to the caller's directory, as a shell user expects."""
    added = None
    if cwd and os.path.isdir(cwd) and cwd not in sys.path:
        sys.path.insert(0, cwd)
        added = cwd
    try:
        return m.load(name, kernel, cmdline)
    finally:
        if added is not None:
            sys.path.remove(added)


class Daemon:
    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.ops = _ops(machine)
        self.path = os.path.join(machine.run_dir, rundir.SOCKET)
        if len(self.path.encode()) > 107:
            raise InvalidSpec(f"socket path {self.path!r} is longer than 107 bytes",
                              "choose a shorter --run-dir")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, "listen")
        self.sel.register(machine.fileno(), selectors.EVENT_READ, "machine")
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.stopping = False

    def loop(self) -> None:
        next_refresh = time.monotonic() + VIEW_REFRESH_S
        while not self.stopping:
            events = self.sel.select(max(0.0, next_refresh - time.monotonic()))
            if time.monotonic() >= next_refresh:
                self.m.refresh_views()
                next_refresh = time.monotonic() + VIEW_REFRESH_S
            for key, _ in events:
                if key.data == "machine":
                    self.m.poll(0)
                elif key.data == "listen":
                    self.serve_one()
                elif key.data == "signal":
                    os.read(self.wake_r, 512)
                    self.m.events.info("supervisor_signal", action="shutdown")
                    self.stopping = True

    def serve_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5.0)
            try:
                req = protocol.recv(conn)
            except (protocol.ProtocolError, OSError) as exc:
                self.m.events.warning("bad_request", error=str(exc))
                return
            reply = self.dispatch(req)
            try:
                protocol.send(conn, reply)
            except OSError:
                pass

    def dispatch(self, req: Any) -> dict[str, Any]:
        try:
            if not isinstance(req, dict) or not isinstance(req.get("op"), str) or \
                    not isinstance(req.get("args", {}), dict):
                raise InvalidSpec("malformed request: expected {op: str, args: map}",
                                  "use mkctl, or follow docs/architecture.md")
            op, args = req["op"], req.get("args", {})
            if op == "shutdown":
                halted = sum(1 for i in self.m.instances.values() if i.pid is not None)
                self.m.close()
                self.stopping = True
                return {"ok": True, "result": {"halted": halted, "pid": os.getpid()}}
            if op not in self.ops:
                raise InvalidSpec(f"unknown operation {op!r}",
                                  f"one of: {', '.join(sorted(self.ops))}, shutdown")
            allowed, fn = self.ops[op]
            extra = set(args) - allowed
            if extra:
                raise InvalidSpec(f"unknown argument(s) {sorted(extra)} for {op!r}",
                                  f"allowed: {sorted(allowed)}")
            return {"ok": True, "result": fn(**args)}
        except MKError as exc:
            return {"ok": False, "error": exc.to_wire()}
        except TypeError as exc:
            return {"ok": False, "error": InvalidSpec(f"bad arguments: {exc}").to_wire()}
        except Exception as exc:
            self.m.events.warning("request_failed", error=repr(exc),
                                  traceback=traceback.format_exc())
            return {"ok": False, "error": MKError(f"internal error: {exc!r}",
                                                  "see events.log in the run directory").to_wire()}

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m partition.control.daemon")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", required=True, help="JSON machine arguments")
    ap.add_argument("--ready-fd", type=int, default=-1)
    a = ap.parse_args(argv)
    cfg = json.loads(a.config)

    def tell(text: str) -> None:
        if a.ready_fd >= 0:
            os.write(a.ready_fd, text.encode())
            os.close(a.ready_fd)

    try:
        machine = Machine(run_dir=a.run_dir, pin_host=True, **cfg)
    except MKError as exc:
        tell("error:" + json.dumps(exc.to_wire()))
        shutil.rmtree(a.run_dir, ignore_errors=True)
        return 1
    try:
        sup = Daemon(machine)
    except BaseException as exc:
        machine.close()
        err = exc.to_wire() if isinstance(exc, MKError) else MKError(repr(exc)).to_wire()
        tell("error:" + json.dumps(err))
        shutil.rmtree(a.run_dir, ignore_errors=True)
        return 1
    tell("ok")
    try:
        sup.loop()
    finally:
        # the last reply ("shutdown") was already sent; now halt everything and clean up
        sup.close()
        machine.close()
        shutil.rmtree(a.run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
