"""A small FUSE server speaking the kernel protocol over ``/dev/fuse`` itself.

kerf needs a filesystem at ``/sys/fs/multikernel``; the emulator presents a synthetic one to it
from the host. No libfuse is installed on the machines this project runs on, so this module
mounts ``/dev/fuse`` with mount(2) and answers the kernel's requests directly. It is single-threaded
and never blocks: the caller puts ``fileno()`` in its own select loop and calls
``serve_pending()`` when it is readable. Every timeout handed to the kernel is zero and files are
opened with ``FOPEN_DIRECT_IO``, so each lookup, stat, read and write reaches the backend: the
content changes underneath.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
import struct
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

from partition import linux

# -- the backend's side ---------------------------------------------------------------------


class Stat(NamedTuple):
    kind: Literal["dir", "file"]
    size: int          # bytes for files, 0 for dirs
    mode: int          # permission bits, e.g. 0o444, 0o200, 0o644, 0o755


class Handle(Protocol):
    """One per open(); errors are raised as ``OSError(errno, msg)``."""

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> int: ...
    def flush(self) -> None: ...
    def fsync(self) -> None: ...
    def release(self) -> None: ...


class Backend(Protocol):
    """Paths are absolute within the filesystem: "/" for the root, "/instances/web/id"."""

    def getattr(self, path: str) -> Stat: ...
    def readdir(self, path: str) -> list[str]: ...
    def open(self, path: str, flags: int) -> Handle: ...
    def rmdir(self, path: str) -> None: ...
    def mkdir(self, path: str, mode: int) -> None: ...
    def unlink(self, path: str) -> None: ...


# -- the protocol (include/uapi/linux/fuse.h) ----------------------------------------------

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR = 1, 2, 3, 4
FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR = 8, 9, 10, 11
FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE = 14, 15, 16, 17, 18
FUSE_FSYNC, FUSE_FLUSH, FUSE_INIT, FUSE_OPENDIR, FUSE_READDIR = 20, 25, 26, 27, 28
FUSE_RELEASEDIR, FUSE_FSYNCDIR, FUSE_ACCESS, FUSE_CREATE = 29, 30, 34, 35
FUSE_INTERRUPT, FUSE_DESTROY, FUSE_BATCH_FORGET = 36, 38, 42
_NO_REPLY = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT})

FUSE_KERNEL_VERSION = 7
FUSE_MINOR = 31                                  # the layouts below are those of 7.31
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FOPEN_DIRECT_IO = 1 << 0
MAX_WRITE = 131072
MAX_PAGES = 32
READ_BUFFER = MAX_WRITE + 4096                   # the kernel refuses reads under max_write + 80
ROOT_ID = 1

_IN_HEADER = struct.Struct("<IIQQIIIHH")         # fuse_in_header, 40 bytes
_OUT_HEADER = struct.Struct("<IiQ")              # fuse_out_header, 16 bytes
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")       # fuse_attr, 88 bytes
_ENTRY_HEAD = struct.Struct("<QQQQII")           # fuse_entry_out before its fuse_attr
_ATTR_HEAD = struct.Struct("<QII")               # fuse_attr_out before its fuse_attr
_INIT_IN = struct.Struct("<IIII")                # the part of fuse_init_in every minor has
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")     # fuse_init_out, 64 bytes
_OPEN_IN = struct.Struct("<II")                  # fuse_open_in
_OPEN_OUT = struct.Struct("<QII")                # fuse_open_out
_CREATE_IN = struct.Struct("<IIII")              # fuse_create_in
_READ_IN = struct.Struct("<QQIIQII")             # fuse_read_in, also READDIR's
_WRITE_IN = struct.Struct("<QQIIQII")            # fuse_write_in, 40 bytes, then the data
_WRITE_OUT = struct.Struct("<II")
_FH_IN = struct.Struct("<Q")                     # the fh that opens release/flush/fsync_in
_SETATTR_IN_SIZE = 88
_MKDIR_IN = struct.Struct("<II")                 # fuse_mkdir_in: mode, umask; then the name
_DIRENT = struct.Struct("<QQII")                 # fuse_dirent before its name
_KSTATFS = struct.Struct("<QQQQQIIII24x")        # fuse_kstatfs, 80 bytes

DT_DIR, DT_REG = 4, 8
_GONE = (errno.ENODEV, errno.ECONNABORTED)      # the connection is over: nothing more to serve
_MAX_ERRNO = 511                                 # the kernel rejects a reply with error <= -512


class _Request(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes                                  # the operation's arguments, extensions cut off


class _Malformed(Exception):
    """A request the server cannot trust; answered EINVAL when it carries a ``unique``."""

    def __init__(self, unique: int | None, why: str) -> None:
        super().__init__(why)
        self.unique = unique


def _parse_request(buf: bytes) -> _Request:
    """Split one request read from /dev/fuse, checking every length it states."""
    unique = struct.unpack_from("<Q", buf, 8)[0] if len(buf) >= 16 else None
    if len(buf) < _IN_HEADER.size:
        raise _Malformed(unique, f"{len(buf)} bytes: shorter than fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise _Malformed(unique, f"header says {length} bytes, {len(buf)} arrived")
    end = length - 8 * extlen
    if end < _IN_HEADER.size:
        raise _Malformed(unique, f"{8 * extlen} bytes of extensions in a {length}-byte request")
    return _Request(opcode, unique, nodeid, uid, gid, pid, bytes(buf[_IN_HEADER.size:end]))


def _out(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body), -error, unique) + body


def _errno_of(exc: OSError) -> int:
    e = exc.errno
    return e if isinstance(e, int) and 0 < e <= _MAX_ERRNO else errno.EIO


def _args(req: _Request, layout: struct.Struct) -> tuple[int, ...]:
    if len(req.body) < layout.size:
        raise _Malformed(req.unique, f"opcode {req.opcode}: {len(req.body)} bytes of arguments, "
                                     f"{layout.size} expected")
    return layout.unpack_from(req.body)


def _name(req: _Request, offset: int = 0) -> str:
    raw = req.body[offset:]
    nul = raw.find(b"\0")
    if nul <= 0 or b"/" in raw[:nul]:
        raise _Malformed(req.unique, f"opcode {req.opcode}: no valid NUL-terminated name")
    return os.fsdecode(raw[:nul])


def _bytes_of(data: object, limit: int) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a handle's read returned {type(data).__name__}, not bytes")
    return bytes(data[:limit])


class _Session:
    """The protocol without the device: one request's bytes in, the reply's bytes out."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.initialized = False
        self.destroyed = False
        self.minor = FUSE_MINOR
        self._ids: dict[str, int] = {"/": ROOT_ID}
        self._paths: dict[int, str] = {ROOT_ID: "/"}
        self._kinds: dict[int, str] = {ROOT_ID: "dir"}
        self._next_id = ROOT_ID + 1
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[str, int, int]] | None] = {}
        self._next_fh = 1
        self._time = int(time.time())
        self._handlers: dict[int, Callable[[_Request], bytes]] = {
            FUSE_INIT: self._init, FUSE_DESTROY: self._destroy,
            FUSE_LOOKUP: self._lookup, FUSE_GETATTR: self._getattr, FUSE_SETATTR: self._setattr,
            FUSE_OPEN: self._open, FUSE_READ: self._read, FUSE_WRITE: self._write,
            FUSE_FLUSH: self._flush, FUSE_FSYNC: self._fsync, FUSE_RELEASE: self._release,
            FUSE_OPENDIR: self._opendir, FUSE_READDIR: self._readdir,
            FUSE_RELEASEDIR: self._releasedir, FUSE_FSYNCDIR: self._empty,
            FUSE_MKDIR: self._mkdir, FUSE_RMDIR: self._rmdir, FUSE_UNLINK: self._unlink,
            FUSE_STATFS: self._statfs, FUSE_ACCESS: self._empty,
            FUSE_CREATE: self._create, FUSE_MKNOD: self._mknod,
        }

    def handle(self, buf: bytes) -> bytes | None:
        """The reply to one request, or None where the protocol wants none."""
        try:
            req = _parse_request(buf)
        except _Malformed as exc:
            return None if exc.unique is None else _out(exc.unique, error=errno.EINVAL)
        if req.opcode in _NO_REPLY:              # node ids are never reused: nothing to forget
            return None
        handler = self._handlers.get(req.opcode)
        if handler is None:
            return _out(req.unique, error=errno.ENOSYS)
        try:
            return _out(req.unique, handler(req))
        except _Malformed:
            return _out(req.unique, error=errno.EINVAL)
        except OSError as exc:
            return _out(req.unique, error=_errno_of(exc))
        except Exception:                        # a backend's bug must not stop the filesystem
            return _out(req.unique, error=errno.EIO)

    def release_all(self) -> None:
        """The connection is gone: no RELEASE will come for what is still open."""
        files, self._files = self._files, {}
        self._dirs.clear()
        for h in files.values():
            try:
                h.release()
            except Exception:
                pass

    # -- node ids and attributes ----------------------------------------------------------

    def _path(self, nodeid: int) -> str:
        path = self._paths.get(nodeid)
        if path is None:
            raise OSError(errno.ESTALE, f"unknown node id {nodeid}")
        return path

    def _child(self, req: _Request, name: str) -> str:
        parent = self._path(req.nodeid)
        if name == ".":
            return parent
        if name == "..":
            return posixpath.dirname(parent)
        return posixpath.join(parent, name)

    def _id_for(self, path: str, kind: str) -> int:
        """The stable id of a path; a path that changed kind is a new object with a new id."""
        nodeid = self._ids.get(path)
        if nodeid is None or (self._kinds[nodeid] != kind and nodeid != ROOT_ID):
            nodeid = self._next_id
            self._next_id += 1
            self._ids[path] = nodeid
            self._paths[nodeid] = path
            self._kinds[nodeid] = kind
        return nodeid

    def _stat(self, path: str) -> Stat:
        st = self.backend.getattr(path)
        if st.kind not in ("dir", "file"):
            raise OSError(errno.EIO, f"{path}: kind {st.kind!r}")
        return st

    def _attr(self, nodeid: int, st: Stat) -> bytes:
        perm = int(st.mode) & 0o7777
        if st.kind == "dir":
            mode, nlink, size = stat.S_IFDIR | perm, 2, 0
        else:
            mode, nlink, size = stat.S_IFREG | perm, 1, max(0, int(st.size))
        t = self._time
        return _ATTR.pack(nodeid, size, (size + 511) // 512, t, t, t, 0, 0, 0,
                          mode, nlink, 0, 0, 0, 4096, 0)

    def _entry(self, path: str) -> bytes:
        st = self._stat(path)
        nodeid = self._id_for(path, st.kind)
        return _ENTRY_HEAD.pack(nodeid, 0, 0, 0, 0, 0) + self._attr(nodeid, st)

    def _attr_out(self, req: _Request) -> bytes:
        st = self._stat(self._path(req.nodeid))
        if self._kinds.get(req.nodeid) != st.kind:
            raise OSError(errno.ENOENT, "the object behind this node id is gone")
        return _ATTR_HEAD.pack(0, 0, 0) + self._attr(req.nodeid, st)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _handle_of(self, req: _Request) -> Handle:
        (fh,) = _args(req, _FH_IN)
        h = self._files.get(fh)
        if h is None:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        return h

    # -- the operations ---------------------------------------------------------------------

    def _init(self, req: _Request) -> bytes:
        major, minor, max_readahead, _ = _args(req, _INIT_IN)
        if major < FUSE_KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"kernel speaks FUSE {major}.{minor}")
        # a newer major: answer with ours and the kernel sends INIT again
        self.minor = min(minor, FUSE_MINOR) if major == FUSE_KERNEL_VERSION else FUSE_MINOR
        self.initialized = major == FUSE_KERNEL_VERSION
        return _INIT_OUT.pack(FUSE_KERNEL_VERSION, self.minor, max_readahead,
                              FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES, 16, 12, MAX_WRITE, 1,
                              MAX_PAGES, 0, 0)

    def _destroy(self, req: _Request) -> bytes:
        self.destroyed = True
        return b""

    def _empty(self, req: _Request) -> bytes:
        return b""

    def _lookup(self, req: _Request) -> bytes:
        return self._entry(self._child(req, _name(req)))

    def _getattr(self, req: _Request) -> bytes:
        return self._attr_out(req)

    def _setattr(self, req: _Request) -> bytes:
        if len(req.body) < _SETATTR_IN_SIZE:
            raise _Malformed(req.unique, "short fuse_setattr_in")
        return self._attr_out(req)               # the backend's attributes stand (truncate too)

    def _open(self, req: _Request) -> bytes:
        flags, _ = _args(req, _OPEN_IN)
        h = self.backend.open(self._path(req.nodeid), flags)
        fh = self._new_fh()
        self._files[fh] = h
        return _OPEN_OUT.pack(fh, FOPEN_DIRECT_IO, 0)

    def _read(self, req: _Request) -> bytes:
        _, offset, size, *_ = _args(req, _READ_IN)
        return _bytes_of(self._handle_of(req).read(offset, size), size)

    def _write(self, req: _Request) -> bytes:
        _, offset, size, *_ = _args(req, _WRITE_IN)
        data = req.body[_WRITE_IN.size:]
        if len(data) != size:
            raise _Malformed(req.unique, f"write of {size} bytes carries {len(data)}")
        accepted = int(self._handle_of(req).write(offset, data))
        return _WRITE_OUT.pack(min(max(accepted, 0), size), 0)

    def _flush(self, req: _Request) -> bytes:
        self._handle_of(req).flush()
        return b""

    def _fsync(self, req: _Request) -> bytes:
        self._handle_of(req).fsync()
        return b""

    def _release(self, req: _Request) -> bytes:
        (fh,) = _args(req, _FH_IN)
        h = self._files.pop(fh, None)
        if h is not None:
            try:
                h.release()
            except Exception:
                pass
        return b""

    def _opendir(self, req: _Request) -> bytes:
        if self._stat(self._path(req.nodeid)).kind != "dir":
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._new_fh()
        self._dirs[fh] = None
        return _OPEN_OUT.pack(fh, 0, 0)

    def _listing(self, nodeid: int) -> list[tuple[str, int, int]]:
        path = self._path(nodeid)
        parent = posixpath.dirname(path)
        out = [(".", nodeid, DT_DIR), ("..", self._ids.get(parent, ROOT_ID), DT_DIR)]
        for name in self.backend.readdir(path):
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                continue
            child = posixpath.join(path, name)
            try:
                st = self._stat(child)
            except OSError:                      # gone since the backend listed it
                continue
            out.append((name, self._id_for(child, st.kind), DT_DIR if st.kind == "dir" else DT_REG))
        return out

    def _readdir(self, req: _Request) -> bytes:
        fh, offset, size, *_ = _args(req, _READ_IN)
        entries = self._dirs.get(fh)
        if entries is None or offset == 0:       # a fresh listing at every rewind
            entries = self._listing(req.nodeid)
            if fh in self._dirs:
                self._dirs[fh] = entries
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            raw = os.fsencode(name)
            record = _DIRENT.pack(ino, index + 1, len(raw), kind) + raw
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _releasedir(self, req: _Request) -> bytes:
        (fh,) = _args(req, _FH_IN)
        self._dirs.pop(fh, None)
        return b""

    def _mkdir(self, req: _Request) -> bytes:
        mode, _ = _args(req, _MKDIR_IN)
        path = self._child(req, _name(req, _MKDIR_IN.size))
        self.backend.mkdir(path, mode & 0o7777)
        return self._entry(path)

    def _rmdir(self, req: _Request) -> bytes:
        self.backend.rmdir(self._child(req, _name(req)))
        return b""

    def _unlink(self, req: _Request) -> bytes:
        self.backend.unlink(self._child(req, _name(req)))
        return b""

    def _create(self, req: _Request) -> bytes:
        # files are never created here (as in sysfs); an existing one, raced in, is opened
        flags, *_ = _args(req, _CREATE_IN)
        path = self._child(req, _name(req, _CREATE_IN.size))
        try:
            st = self._stat(path)
        except FileNotFoundError:
            raise OSError(errno.EACCES, "files cannot be created here") from None
        if flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        if st.kind != "file":
            raise OSError(errno.EISDIR, "a directory")
        entry = self._entry(path)
        h = self.backend.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
        fh = self._new_fh()
        self._files[fh] = h
        return entry + _OPEN_OUT.pack(fh, FOPEN_DIRECT_IO, 0)

    def _mknod(self, req: _Request) -> bytes:
        raise OSError(errno.EACCES, "files cannot be created here")

    def _statfs(self, req: _Request) -> bytes:
        return _KSTATFS.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)


# -- the server: /dev/fuse, the mount ---------------------------------------------------------

MNT_DETACH = 2
_libc = ctypes.CDLL("libc.so.6", use_errno=True)   # partition.linux wraps mount(2) but not umount2
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _umount2(target: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2 {target}: {os.strerror(err)}")


class FuseServer:
    """A FUSE filesystem served from ``backend`` at ``mountpoint``; drive it from a select loop."""

    def __init__(self, backend: Backend, mountpoint: str, fsname: str = "multikernel",
                 mount: bool = True) -> None:
        self._session = _Session(backend)
        self._mountpoint = mountpoint
        self._fsname = fsname
        self._closed = False
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        if mount:
            try:
                self.mount_here()
            except BaseException:
                os.close(self._fd)
                self._fd = -1
                self._closed = True
                raise

    def mount_here(self) -> None:
        """Mount the connection at the mount point, in the calling process's mount namespace.
        ``mount=False`` and this, called in a child between fork and exec, serve a filesystem
        that only the child's private namespace sees while the server stays outside it."""
        linux.mount(self._fsname, self._mountpoint, "fuse", linux.MS_NOSUID | linux.MS_NODEV,
                    f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other")

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the FUSE server is closed")
        return self._fd

    def serve_pending(self) -> int:
        """Answer every request the kernel has queued, without waiting for more; how many."""
        served = 0
        while not self._closed:
            try:
                buf = os.read(self._fd, READ_BUFFER)
            except BlockingIOError:
                break
            except OSError as exc:
                # unmounted (ENODEV), or the connection aborted (ECONNABORTED: an abort through
                # fusectl once the kernel reports aborts as such): whatever the program left
                # open is gone with it, and the bridge goes on to reap the program
                if exc.errno in _GONE:
                    self._closed = True
                    break
                raise
            served += 1
            reply = self._session.handle(buf)
            if reply is not None:
                self._send(reply)
        return served

    def _send(self, reply: bytes) -> None:
        try:
            os.write(self._fd, reply)
        except OSError as exc:
            if exc.errno in _GONE:
                self._closed = True
            elif exc.errno == errno.EINVAL:      # a reply the kernel refused: the caller would
                unique = _OUT_HEADER.unpack_from(reply)[2]          # hang, so tell it EIO
                try:
                    os.write(self._fd, _out(unique, error=errno.EIO))
                except OSError:
                    pass
            # ENOENT: the request was interrupted or aborted meanwhile; nobody waits for it

    def close(self) -> None:
        """Detach the mount and close the device; idempotent, quiet about a mount already gone."""
        if self._fd < 0:
            return
        self._closed = True
        failure: OSError | None = None
        try:
            _umount2(self._mountpoint, MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                failure = exc
        finally:
            os.close(self._fd)
            self._fd = -1
            self._session.release_all()
        if failure is not None:
            raise failure
