"""Client side of the supervisor socket, and starting/stopping the supervisor itself."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from typing import Any

from partition import linux
from partition.control import protocol
from partition.errors import MKError, NoSuchInstance, SupervisorUnavailable
from partition.host import rundir

# (psutil, subprocess, shutil and the cgroups module are imported where a supervisor is started
# or stopped: every mkctl verb imports this module, and they were a third of `mkctl show`)


class Client:
    def __init__(self, run_dir: str | None = None, timeout: float = 120.0) -> None:
        self.run_dir = rundir.resolve(run_dir)
        self.path = os.path.join(self.run_dir, rundir.SOCKET)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.path)
            except BlockingIOError:
                raise SupervisorUnavailable(
                    f"the supervisor in {self.run_dir} accepts no connection now (its queue "
                    "is full)", "retry in a moment") from None
            except (FileNotFoundError, ConnectionRefusedError):
                stale = " (stale run directory: its supervisor is gone)" if \
                    os.path.exists(self.run_dir) and rundir.live_owner(self.run_dir) is None else ""
                if stale and os.path.exists(os.path.join(self.run_dir, "machine.json")):
                    raise SupervisorUnavailable(
                        f"the host of the machine in {self.run_dir} died (stale: its "
                        "supervisor is gone); its instances may still run",
                        "mkctl adopt gives them a new host; mkctl shutdown removes them and "
                        "clears the stale directory") from None
                raise SupervisorUnavailable(
                    f"no machine is running in {self.run_dir}{stale}",
                    "start one with mkctl init, or point --run-dir / MK_RUN_DIR at a running one"
                    + ("; mkctl shutdown clears the stale directory" if stale else "")) from None
            try:
                protocol.send(s, {"op": op, "args": {k: v for k, v in args.items() if v is not None}})
            except (BrokenPipeError, ConnectionResetError):
                pass    # refused before it read us (too many clients): its answer is waiting
            reply = protocol.recv(s)
        except protocol.ProtocolError as exc:
            raise SupervisorUnavailable(f"supervisor in {self.run_dir} did not answer properly: {exc}",
                                        "see supervisor.log and events.log in the run directory"
                                        ) from exc
        finally:
            s.close()
        if not reply.get("ok"):
            raise MKError.from_wire(reply.get("error", {}))
        return reply.get("result")


def start_supervisor(run_dir: str | None, config: dict[str, Any], wait: float = 30.0) -> dict[str, Any]:
    """Start the daemon in the background; return once it answers, or raise its error.

    The run directory's lock is taken here, before anything else, and handed to the daemon
    (an inherited descriptor shares the lock): a second ``mkctl init`` racing this one is
    refused at once and touches nothing, and a stale directory is cleared only by the one
    that holds the lock."""
    from partition.host import adoption  # the host side: only when a machine starts
    path = rundir.resolve(run_dir)
    lock_fd = rundir.lock(path)
    try:
        if adoption.abandoned(path):     # its host died, its instances run: adopt them
            return _spawn(path, lock_fd, {"adopt": True}, wait) | {"adopted": True}
        if config.get("adopt"):
            raise NoSuchInstance(f"no machine to adopt in {path} (no state, or no arena)",
                                 "mkctl init starts a new machine")
        if adoption.leftovers(path):     # a dead machine that cannot be adopted: its instances
            adoption.remove_abandoned(path)      # go first, then its directory
        cleaned = bool(os.listdir(path))
        if cleaned:
            from partition.host import shared
            shared.release_left(path)    # a dead host's shared regions: mounts first
            rundir.clear(path)           # stale: its owner is dead (we hold its lock)
        return _spawn(path, lock_fd, config, wait) | {"cleaned_stale": cleaned}
    finally:
        os.close(lock_fd)


def _spawn(path: str, lock_fd: int, config: dict[str, Any], wait: float) -> dict[str, Any]:
    import shutil
    import subprocess
    r, w = os.pipe()
    log = open(os.path.join(path, rundir.SUPERVISOR_LOG), "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "partition.control.daemon", "--run-dir", path,
             "--config", json.dumps(config), "--ready-fd", str(w), "--lock-fd", str(lock_fd)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w, lock_fd),
            start_new_session=True, close_fds=True)
    finally:
        os.close(w)
        log.close()
    deadline = time.monotonic() + wait
    data = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([r], [], [], remaining)[0]:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    text = data.decode(errors="replace")
    if text.startswith("error:"):
        proc.wait(timeout=10)
        raise MKError.from_wire(json.loads(text[len("error:"):]))
    if text != "ok":
        try:
            with open(os.path.join(path, rundir.SUPERVISOR_LOG), errors="replace") as f:
                tail = f.read()[-2000:]
        except OSError:
            tail = ""
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if not config.get("adopt"):      # what a dead host left stays, for mkctl shutdown
            shutil.rmtree(path, ignore_errors=True)
        raise SupervisorUnavailable(f"supervisor did not start (exit {proc.returncode}): {tail}",
                                    "run python -m partition.control.daemon by hand to see why")
    info: dict[str, Any] = Client(path).call("ping")
    return info


def stop_supervisor(run_dir: str | None, timeout: float = 60.0) -> dict[str, Any]:
    """Shut the machine down and wait until its supervisor is gone and the directory removed."""
    import shutil

    from partition.host import cgroups
    client = Client(run_dir)
    path = client.run_dir
    if not os.path.exists(path):
        raise SupervisorUnavailable(f"no machine is running in {path}", "nothing to shut down")
    owner = rundir.live_owner(path)
    if owner is None:
        from partition.host import adoption
        lock_fd = rundir.lock(path)       # nobody else clears it meanwhile
        try:
            # an abandoned survivable machine: its instances (in its cgroups only) and its arena
            killed = adoption.remove_abandoned(path)
            from partition.host import shared
            shared.release_left(path)     # its shared regions: mounts rmtree cannot remove
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(lock_fd)
        killed += cgroups.reap_stale()    # and what its instances forked, if anything lives
        return {"halted": killed, "stale_removed": True, "run_dir": path}
    # a pidfd taken before the request is readable once the supervisor has exited, zombie or
    # not: psutil's wait on a process that is not our child would poll until pid 1 reaps it
    # (a second here). Taken first, so that a reused pid is never mistaken for it.
    try:
        pidfd: int | None = linux.pidfd_open(owner)
    except ProcessLookupError:
        pidfd = None
    try:
        result = client.call("shutdown")
        if pidfd is not None and not select.select([pidfd], [], [], timeout)[0]:
            raise MKError(f"supervisor pid {owner} did not exit within {timeout} s",
                          f"kill -9 {owner}; then mkctl shutdown again")
        try:
            os.waitpid(owner, os.WNOHANG)     # ours to reap when we started it (tests do)
        except ChildProcessError:
            pass                              # its parent's (pid 1's, once mkctl init left)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    deadline = time.monotonic() + 5
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    result["run_dir"] = path
    result["removed"] = not os.path.exists(path)
    return result
