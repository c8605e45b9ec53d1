"""The multikernel filesystem as kerf sees it at ``/sys/fs/multikernel``, served over FUSE.

Reads come from the machine's views under its run directory (host/views.py rewrites them on
every change, atomically), so they are always the host's current word. Writes are the kernel's
write side and go to the supervisor as they arrive: a whole DTB written to ``device_tree`` (the
baseline) or to ``overlays/new`` (an overlay) is acted on by the ``write()`` that completes it,
and that call fails with the host's errno (EINVAL, EBUSY, ENOMEM, EOPNOTSUPP, ...), as a sysfs
write fails with the kernel's. ``rmdir overlays/tx_<N>`` rolls a transaction back.

Before any pool exists no machine runs; the root tree then describes the host (no ``memory@``
node: kerf's sign of "no pool yet") and the baseline write starts the machine with the pool it
defines (``mkctl kerf`` passes ``start_machine``). A second baseline write is EBUSY.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections.abc import Callable
from typing import Any

from partition import linux
from partition.bridge.fuse import Stat
from partition.control.client import Client
from partition.errors import MKError, NotLoaded, ResourceBusy
from partition.host import devicetree, rundir
from partition.terminal import printable

SYS = ("sys", "fs", "multikernel")
TX = re.compile(r"^/overlays/tx_([0-9]{1,9})$")
WRITABLE = ("/device_tree", "/overlays/new")


def _say(exc: MKError) -> None:
    """The host's reason, on the bridge's stderr: kerf prints only the errno's name."""
    # a refusal may quote a kernel (the reason it refused a resize): escaped, as mkctl does
    print(printable(f"mkctl kerf: the host refused: {exc}"), file=sys.stderr, flush=True)


def refuse(exc: MKError) -> OSError:
    _say(exc)
    return OSError(exc.errno, exc.message)


class _Read:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EBADF, "opened for reading")

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        pass

    def release(self) -> None:
        pass


class _Blob:
    """A write of a whole DTB: bytes gather until the header's ``totalsize`` has arrived, then
    the write that completed it commits (and fails with the host's errno)."""

    def __init__(self, commit: Callable[[bytes], None]) -> None:
        self.buf = bytearray()
        self.commit = commit
        self.done = False

    def read(self, offset: int, size: int) -> bytes:
        raise OSError(errno.EBADF, "opened for writing")

    def write(self, offset: int, data: bytes) -> int:
        if self.done:
            raise OSError(errno.EBUSY, "this descriptor already wrote a whole tree")
        if offset != len(self.buf):
            raise OSError(errno.EINVAL, "a device tree is written in order, from offset 0")
        self.buf += data
        if len(self.buf) > devicetree.MAX_TREE_BYTES:
            raise OSError(errno.EFBIG, "a device tree is at most 1 MiB")
        if len(self.buf) >= 8:
            magic, total = int.from_bytes(self.buf[:4], "big"), int.from_bytes(self.buf[4:8], "big")
            if magic != 0xD00DFEED:
                self.done = True
                raise OSError(errno.EINVAL, "not a DTB (bad magic)")
            if total < 40 or total > devicetree.MAX_TREE_BYTES:
                self.done = True
                raise OSError(errno.EINVAL, f"DTB header says {total} bytes")
            if len(self.buf) >= total:
                self.done = True
                self.commit(bytes(self.buf[:total]))
        return len(data)

    def flush(self) -> None:
        if self.buf and not self.done:
            self.done = True
            raise OSError(errno.EINVAL, "closed before the whole DTB was written")

    def fsync(self) -> None:
        pass

    def release(self) -> None:
        pass


class SysfsBackend:
    """``/sys/fs/multikernel`` for one run directory."""

    def __init__(self, run_dir: str, start_machine: Callable[[devicetree.Baseline], None]) -> None:
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, *SYS)
        self.start_machine = start_machine

    # -- where things are --------------------------------------------------------------------
    def live(self) -> bool:
        return rundir.live_owner(self.run_dir) is not None and os.path.isdir(self.root)

    def _disk(self, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") or p.endswith(".tmp") for p in parts):
            raise OSError(errno.ENOENT, path)
        return os.path.join(self.root, *parts)

    def _client(self) -> Client:
        return Client(self.run_dir)

    # -- Backend ---------------------------------------------------------------------------------
    def getattr(self, path: str) -> Stat:
        if path == "/overlays/new":
            return Stat("file", 0, 0o200)
        if not self.live():
            virtual = {"/": Stat("dir", 0, 0o755), "/instances": Stat("dir", 0, 0o755),
                       "/overlays": Stat("dir", 0, 0o755),
                       "/device_tree": Stat("file", len(self._host_tree()), 0o644)}
            if path in virtual:
                return virtual[path]
            raise OSError(errno.ENOENT, path)
        st = os.lstat(self._disk(path))
        if stat.S_ISDIR(st.st_mode):
            return Stat("dir", 0, 0o755)
        return Stat("file", st.st_size, 0o644 if path == "/device_tree" else 0o444)

    def readdir(self, path: str) -> list[str]:
        extra = ["new"] if path == "/overlays" else []
        if not self.live():
            listing = {"/": ["device_tree", "instances", "overlays"], "/instances": [],
                       "/overlays": []}
            if path not in listing:
                raise OSError(errno.ENOENT, path)
            return listing[path] + extra
        names = [n for n in os.listdir(self._disk(path)) if not n.endswith(".tmp")]
        return sorted(names) + extra

    def open(self, path: str, flags: int) -> Any:
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if writing:
            if path == "/device_tree":
                return _Blob(self._baseline)
            if path == "/overlays/new":
                return _Blob(self._overlay)
            raise OSError(errno.EACCES, f"{path} is read-only")
        if path == "/overlays/new":
            raise OSError(errno.EACCES, "overlays/new is write-only")
        if not self.live():
            if path == "/device_tree":
                return _Read(self._host_tree())
            raise OSError(errno.ENOENT, path)
        with open(self._disk(path), "rb") as f:
            return _Read(f.read(devicetree.MAX_TREE_BYTES))

    def rmdir(self, path: str) -> None:
        m = TX.match(path)
        if not m:
            raise OSError(errno.EPERM, f"{path} cannot be removed")
        if not self.live():
            raise OSError(errno.ENOENT, path)
        try:
            self._client().call("overlay_remove", tx=int(m.group(1)))
        except MKError as exc:
            raise refuse(exc) from None

    def mkdir(self, path: str, mode: int) -> None:
        raise OSError(errno.EPERM, "instances are made with overlays, not mkdir")

    def unlink(self, path: str) -> None:
        raise OSError(errno.EPERM, f"{path} cannot be removed")

    # -- the write side ----------------------------------------------------------------------
    def _host_tree(self) -> bytes:
        phys = linux.physical_cpu_ids()
        return devicetree.host_tree([phys.get(c, c) for c in sorted(os.sched_getaffinity(0))])

    def _baseline(self, data: bytes) -> None:
        try:
            base = devicetree.parse_baseline(data)
        except MKError as exc:
            raise refuse(exc) from None
        if self.live():
            raise refuse(_busy())
        try:
            self.start_machine(base)
        except MKError as exc:
            raise refuse(exc) from None

    def _overlay(self, data: bytes) -> None:
        if not self.live():
            raise refuse(_no_pool())
        try:
            self._client().call("overlay", data=data)
        except MKError as exc:
            raise refuse(exc) from None


def _busy() -> MKError:
    return ResourceBusy("the baseline device tree was written already; a live pool changes "
                        "by /resources overlay",
                        "kerf init on a live pool writes one (it grows and shrinks the pool)")


def _no_pool() -> MKError:
    return NotLoaded("no pool: the baseline device tree has not been written",
                     "run kerf init first")
