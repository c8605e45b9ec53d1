"""The FUSE server (partition/bridge/fuse.py) on real mounts, and its parser on bad bytes.

Each mount test forks a child that enters a mount namespace of its own, mounts a tmpfs and the
FUSE filesystem in it, serves it from a thread and works the files from its main thread; it
reports what it saw as JSON through a pipe. The namespace, and every mount in it, goes with the
child.
"""

import errno
import json
import os
import select
import signal
import stat
import struct
import threading
import time
import traceback

import pytest

from partition import linux
from partition.bridge import fuse
from partition.bridge.fuse import FuseServer, Stat

# -- a dict-backed backend ----------------------------------------------------------------------


class _Handle:
    def __init__(self, backend, path):
        self.b, self.path = backend, path

    def read(self, offset, size):
        self.b.check("read", self.path)
        return bytes(self.b.files[self.path][offset:offset + size])

    def write(self, offset, data):
        self.b.check("write", self.path)
        self.b.log.append(["write", self.path, offset, len(data)])
        buf = self.b.files[self.path]
        if len(buf) < offset:
            buf.extend(bytes(offset - len(buf)))
        buf[offset:offset + len(data)] = data
        return len(data)

    def flush(self):
        self.b.log.append(["flush", self.path])
        self.b.check("flush", self.path)

    def fsync(self):
        self.b.log.append(["fsync", self.path])
        self.b.check("fsync", self.path)

    def release(self):
        self.b.log.append(["release", self.path])
        raise OSError(errno.EIO, "ignored by the server")


class _Backend:
    def __init__(self):
        self.dirs = {"/": 0o755, "/instances": 0o755, "/instances/web": 0o755, "/overlays": 0o755,
                     "/many": 0o755}
        self.files = {"/instances/web/id": bytearray(b"1\n"),
                      "/instances/web/status": bytearray(b"loaded\n"),
                      "/overlays/new": bytearray()}
        self.modes = {"/instances/web/id": 0o444, "/overlays/new": 0o200}
        for i in range(300):
            self.files[f"/many/entry_with_a_fairly_long_name_{i:04d}"] = bytearray(b"x")
        self.log = []
        self.fail = {}         # (operation, path) -> errno
        self.boom = set()      # paths whose every operation raises RuntimeError

    def check(self, op, path):
        if path in self.boom:
            raise RuntimeError(f"a bug in the backend: {op} {path}")
        if (op, path) in self.fail:
            raise OSError(self.fail[op, path], f"{op} {path}")

    def getattr(self, path):
        self.check("getattr", path)
        if path in self.dirs:
            return Stat("dir", 0, self.dirs[path])
        if path in self.files:
            return Stat("file", len(self.files[path]), self.modes.get(path, 0o644))
        raise OSError(errno.ENOENT, path)

    def readdir(self, path):
        self.check("readdir", path)
        prefix = path.rstrip("/") + "/"
        return [p[len(prefix):] for p in [*self.dirs, *self.files]
                if p.startswith(prefix) and "/" not in p[len(prefix):] and p != prefix]

    def open(self, path, flags):
        self.check("open", path)
        if path not in self.files:
            raise OSError(errno.ENOENT, path)
        self.log.append(["open", path, flags])
        if flags & os.O_TRUNC:
            self.files[path] = bytearray()
        return _Handle(self, path)

    def mkdir(self, path, mode):
        self.check("mkdir", path)
        if not path.startswith("/overlays/"):
            raise OSError(errno.EPERM, path)
        self.dirs[path] = mode
        self.log.append(["mkdir", path, mode])

    def rmdir(self, path):
        self.check("rmdir", path)
        if path not in self.dirs:
            raise OSError(errno.ENOENT, path)
        if self.readdir(path):
            raise OSError(errno.ENOTEMPTY, path)
        del self.dirs[path]

    def unlink(self, path):
        self.check("unlink", path)
        if path not in self.files:
            raise OSError(errno.ENOENT, path)
        del self.files[path]


# -- the rig: a child in its own mount namespace ------------------------------------------------


class _Rig:
    """The server, mounted at ``mnt`` and served by a thread until ``stop_serving``."""

    def __init__(self, mnt):
        self.mnt = mnt
        self.backend = _Backend()
        self.server = FuseServer(self.backend, mnt)
        self.errors = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        try:
            while True:
                ready, _, _ = select.select([self.server.fileno(), self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                self.server.serve_pending()
                if self.server.closed:
                    return
        except BaseException:
            self.errors.append(traceback.format_exc())

    def stop_serving(self):
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(10)
            assert not self._thread.is_alive()

    def path(self, rel):
        return os.path.join(self.mnt, rel.lstrip("/"))

    def wait_for(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _errno_name(fn, *args):
    """What a call ends in: "ok" or the errno's name."""
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def _child(ns, scenario):
    try:
        linux.unshare(linux.CLONE_NEWNS)
    except OSError as exc:
        return {"skip": f"unshare(CLONE_NEWNS) failed: {exc}"}
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("fuse-test", ns, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=0755")
    mnt = os.path.join(ns, "mnt")
    os.mkdir(mnt)
    rig = _Rig(mnt)
    try:
        out = scenario(rig)
    finally:
        rig.stop_serving()
        rig.server.close()
    out["server_errors"] = rig.errors
    out["mounted_after_close"] = os.path.ismount(mnt)
    return out


def _in_namespace(tmp_path, scenario, timeout=60.0):
    """Run ``scenario(rig)`` in a forked child; its JSON-able report."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        pytest.skip(f"/dev/fuse cannot be opened: {exc}")
    ns = tmp_path / "ns"
    ns.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                result = _child(str(ns), scenario)
            except BaseException:
                result = {"crash": traceback.format_exc()}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        ns.rmdir()             # empty: the tmpfs was mounted in the child's namespace only
    assert chunks, f"the child reported nothing within {timeout} s"
    result = json.loads(b"".join(chunks))
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "crash" not in result, result["crash"]
    assert result.pop("server_errors") == []
    assert result.pop("mounted_after_close") is False
    return result


# -- the mount tests ------------------------------------------------------------------------------


def _files_scenario(rig):
    b, out = rig.backend, {}
    out["root"] = sorted(os.listdir(rig.mnt))
    out["web"] = sorted(os.listdir(rig.path("/instances/web")))
    st = os.stat(rig.path("/instances/web/id"))
    out["id_stat"] = [stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size]
    st = os.stat(rig.path("/instances"))
    out["dir_stat"] = [stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode)]
    out["new_mode"] = stat.S_IMODE(os.stat(rig.path("/overlays/new")).st_mode)

    # content changing underneath: seen by a new open, by the same open, and by stat
    idp = rig.path("/instances/web/id")
    with open(idp, "rb") as f:
        out["first"] = f.read().decode()
    b.files["/instances/web/id"] = bytearray(b"a much longer id than before\n")
    out["second_size"] = os.stat(idp).st_size
    with open(idp, "rb") as f:
        out["second"] = f.read().decode()
        b.files["/instances/web/id"] = bytearray(b"third\n")
        out["same_open"] = os.pread(f.fileno(), 100, 0).decode()

    # open(..., "wb") passes O_TRUNC to the backend, and close flushes
    status = "/instances/web/status"
    b.log.clear()
    with open(rig.path(status), "wb") as f:
        f.write(b"hello")
    out["trunc_flags"] = [e[2] for e in b.log if e[:2] == ["open", status]]
    out["after_trunc"] = b.files[status].decode()
    out["flushed"] = ["flush", status] in b.log

    # one write(2) of 200 KiB: several FUSE writes, in order, none over max_write
    payload = os.urandom(200 * 1024)
    b.log.clear()
    fd = os.open(rig.path(status), os.O_WRONLY)
    try:
        out["written"] = os.write(fd, payload)
    finally:
        os.close(fd)
    out["big_writes"] = [e[2:] for e in b.log if e[:2] == ["write", status]]
    out["big_stored"] = bytes(b.files[status]) == payload
    fd = os.open(rig.path(status), os.O_RDONLY)
    try:
        back = os.read(fd, 300 * 1024)
    finally:
        os.close(fd)
    out["read_back"] = [len(back), back == payload]
    out["size_after"] = os.stat(rig.path(status)).st_size

    # fsync reaches the handle; the last close releases it (asynchronously)
    fd = os.open(rig.path(status), os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    out["fsynced"] = ["fsync", status] in b.log
    out["released"] = rig.wait_for(lambda: sum(e[0] == "release" for e in b.log)
                                   == sum(e[0] == "open" for e in b.log))
    sv = os.statvfs(rig.mnt)
    out["statvfs"] = [sv.f_bsize, sv.f_namemax]
    return out


@pytest.mark.system
@pytest.mark.alone      # flaked once on four loaded workers (a FUSE round trip)
def test_files_reach_the_backend(tmp_path):
    out = _in_namespace(tmp_path, _files_scenario)
    assert out["root"] == ["instances", "many", "overlays"]
    assert out["web"] == ["id", "status"]
    assert out["id_stat"] == [True, 0o444, 2]
    assert out["dir_stat"] == [True, 0o755]
    assert out["new_mode"] == 0o200
    assert out["first"] == "1\n"
    assert out["second_size"] == len("a much longer id than before\n")
    assert out["second"] == "a much longer id than before\n"
    assert out["same_open"] == "third\n"                       # no page cache in the way
    assert len(out["trunc_flags"]) == 1 and out["trunc_flags"][0] & os.O_TRUNC
    assert out["trunc_flags"][0] & os.O_ACCMODE == os.O_WRONLY
    assert out["after_trunc"] == "hello" and out["flushed"]
    assert out["written"] == 200 * 1024
    writes = out["big_writes"]
    assert len(writes) >= 2 and all(0 < n <= fuse.MAX_WRITE for _, n in writes)
    offsets = [0]
    for _, n in writes:
        offsets.append(offsets[-1] + n)
    assert [off for off, _ in writes] == offsets[:-1] and offsets[-1] == 200 * 1024
    assert out["big_stored"]
    assert out["read_back"] == [200 * 1024, True]
    assert out["size_after"] == 200 * 1024
    assert out["fsynced"] and out["released"]
    assert out["statvfs"] == [4096, 255]


def _errors_scenario(rig):
    b, out = rig.backend, {}
    idp, status = "/instances/web/id", "/instances/web/status"
    out["missing"] = _errno_name(os.stat, rig.path("/instances/nope"))
    out["missing_open"] = _errno_name(os.open, rig.path("/instances/nope"), os.O_RDONLY)

    b.fail["write", status] = errno.EBUSY
    fd = os.open(rig.path(status), os.O_WRONLY)
    out["write_ebusy"] = _errno_name(os.write, fd, b"1")
    out["close_after_failed_write"] = _errno_name(os.close, fd)
    del b.fail["write", status]

    b.fail["flush", status] = errno.EBUSY
    fd = os.open(rig.path(status), os.O_WRONLY)
    out["write_then_flush_fails"] = _errno_name(os.write, fd, b"1")
    out["close_ebusy"] = _errno_name(os.close, fd)
    del b.fail["flush", status]

    b.fail["read", idp] = errno.ENXIO
    fd = os.open(rig.path(idp), os.O_RDONLY)
    out["read_enxio"] = _errno_name(os.read, fd, 10)
    os.close(fd)
    del b.fail["read", idp]
    b.fail["open", idp] = errno.EACCES
    out["open_eacces"] = _errno_name(os.open, rig.path(idp), os.O_RDONLY)
    del b.fail["open", idp]

    # a backend bug is EIO to the caller, and the server goes on
    b.boom.add(idp)
    out["bug_stat"] = _errno_name(os.stat, rig.path(idp))
    b.boom.discard(idp)
    fd = os.open(rig.path(idp), os.O_RDONLY)
    b.boom.add(idp)
    out["bug_read"] = _errno_name(os.read, fd, 10)
    b.boom.discard(idp)
    out["read_after_bug"] = os.read(fd, 10).decode()
    os.close(fd)

    out["create"] = _errno_name(os.open, rig.path("/instances/web/fresh"), os.O_CREAT | os.O_WRONLY)
    out["create_existing_excl"] = _errno_name(os.open, rig.path(idp),
                                              os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    out["xattr"] = _errno_name(os.getxattr, rig.path(idp), "user.x")
    out["rename"] = _errno_name(os.rename, rig.path(idp), rig.path("/instances/web/id2"))
    return out


@pytest.mark.system
def test_backend_errors_reach_the_caller(tmp_path):
    out = _in_namespace(tmp_path, _errors_scenario)
    assert out == {
        "missing": "ENOENT", "missing_open": "ENOENT",
        "write_ebusy": "EBUSY", "close_after_failed_write": "ok",
        "write_then_flush_fails": "ok", "close_ebusy": "EBUSY",
        "read_enxio": "ENXIO", "open_eacces": "EACCES",
        "bug_stat": "EIO", "bug_read": "EIO", "read_after_bug": "1\n",
        "create": "EACCES", "create_existing_excl": "EEXIST",
        "xattr": errno.errorcode[errno.EOPNOTSUPP], "rename": "ENOSYS",
    }


def _dirs_scenario(rig):
    b, out = rig.backend, {}
    out["mkdir"] = _errno_name(os.mkdir, rig.path("/overlays/tx_3"), 0o750)
    out["mkdir_mode"] = b.dirs.get("/overlays/tx_3")
    out["listed"] = "tx_3" in os.listdir(rig.path("/overlays"))
    out["is_dir"] = stat.S_ISDIR(os.stat(rig.path("/overlays/tx_3")).st_mode)
    out["mkdir_eperm"] = _errno_name(os.mkdir, rig.path("/instances/db"))
    out["rmdir_notempty"] = _errno_name(os.rmdir, rig.path("/instances/web"))
    out["rmdir"] = _errno_name(os.rmdir, rig.path("/overlays/tx_3"))
    out["gone"] = _errno_name(os.stat, rig.path("/overlays/tx_3"))
    out["unlink"] = _errno_name(os.unlink, rig.path("/overlays/new"))
    out["unlinked"] = "/overlays/new" not in b.files and os.listdir(rig.path("/overlays")) == []
    out["many"] = sorted(os.listdir(rig.path("/many"))) == sorted(
        p.rsplit("/", 1)[1] for p in b.files if p.startswith("/many/"))
    # a node id stays with its path
    ino = os.stat(rig.path("/instances/web/id")).st_ino
    out["stable_ino"] = ino == os.stat(rig.path("/instances/web/id")).st_ino and ino != 1
    out["root_ino"] = os.stat(rig.mnt).st_ino
    out["listdir_of_a_file"] = _errno_name(os.listdir, rig.path("/instances/web/id"))
    return out


@pytest.mark.system
def test_directories(tmp_path):
    out = _in_namespace(tmp_path, _dirs_scenario)
    assert out == {
        "mkdir": "ok", "mkdir_mode": 0o750, "listed": True, "is_dir": True,
        "mkdir_eperm": "EPERM", "rmdir_notempty": "ENOTEMPTY", "rmdir": "ok", "gone": "ENOENT",
        "unlink": "ok", "unlinked": True, "many": True, "stable_ino": True, "root_ino": 1,
        "listdir_of_a_file": "ENOTDIR",
    }


def _unmount_scenario(rig):
    out = {}
    out["served"] = os.listdir(rig.path("/instances")) == ["web"]
    rig.stop_serving()
    fuse._umount2(rig.mnt, fuse.MNT_DETACH)         # unmounted behind the server's back
    tries = 0
    while not rig.server.closed and tries < 100:
        select.select([rig.server.fileno()], [], [], 1.0)
        rig.server.serve_pending()
        tries += 1
    out["closed_on_enodev"] = rig.server.closed
    out["serve_after"] = rig.server.serve_pending()
    rig.server.close()
    rig.server.close()
    try:
        rig.server.fileno()
        out["fileno_after_close"] = "returned"
    except ValueError:
        out["fileno_after_close"] = "ValueError"
    return out


@pytest.mark.system
def test_an_unmount_behind_its_back_closes_the_server(tmp_path):
    out = _in_namespace(tmp_path, _unmount_scenario)
    assert out == {"served": True, "closed_on_enodev": True, "serve_after": 0,
                   "fileno_after_close": "ValueError"}


@pytest.mark.system
def test_close_unmounts(tmp_path):
    def scenario(rig):
        with open(rig.path("/instances/web/id"), "rb") as f:
            content = f.read().decode()
        return {"content": content, "mounted": os.path.ismount(rig.mnt)}
    # _child checks that the mount is gone after close (and closes twice: once more here)
    assert _in_namespace(tmp_path, scenario) == {"content": "1\n", "mounted": True}


# -- the protocol without the kernel ---------------------------------------------------------------

_HDR = struct.Struct("<IIQQIIIHH")


def _req(opcode, body=b"", nodeid=1, unique=7, length=None, extlen=0):
    return _HDR.pack(40 + len(body) if length is None else length, opcode, unique, nodeid,
                     0, 0, 0, extlen, 0) + body


def _reply(raw):
    length, error, unique = struct.unpack_from("<IiQ", raw)
    assert length == len(raw)
    return error, unique, raw[16:]


def _session():
    s = fuse._Session(_Backend())
    error, _, _ = _reply(s.handle(_req(fuse.FUSE_INIT, struct.pack("<IIII", 7, 45, 65536, 0))))
    assert error == 0
    return s


def test_the_parser_rejects_lying_lengths():
    good = _req(fuse.FUSE_GETATTR, bytes(16), unique=99)
    assert fuse._parse_request(good).unique == 99
    for bad in (_req(fuse.FUSE_GETATTR, bytes(16), unique=99, length=200),   # claims more
                _req(fuse.FUSE_GETATTR, bytes(16), unique=99, length=41),    # claims less
                _req(fuse.FUSE_GETATTR, bytes(16), unique=99, length=8),     # under a header
                _req(fuse.FUSE_GETATTR, bytes(16), unique=99, extlen=3)):    # extensions > body
        with pytest.raises(fuse._Malformed) as info:
            fuse._parse_request(bad)
        assert info.value.unique == 99
        assert _reply(fuse._Session(_Backend()).handle(bad)) == (-errno.EINVAL, 99, b"")
    for scrap in (b"", b"\x01" * 15):                                         # no unique at all
        with pytest.raises(fuse._Malformed) as info:
            fuse._parse_request(scrap)
        assert info.value.unique is None
        assert fuse._Session(_Backend()).handle(scrap) is None
    # 24 bytes: the unique is there, the header is not
    assert _reply(fuse._Session(_Backend()).handle(good[:24]))[:2] == (-errno.EINVAL, 99)


def test_short_arguments_are_einval_and_the_session_goes_on():
    s = _session()
    for opcode, body in ((fuse.FUSE_WRITE, struct.pack("<QQIIQII", 1, 0, 10, 0, 0, 0, 0) + b"abc"),
                         (fuse.FUSE_READ, bytes(12)), (fuse.FUSE_LOOKUP, b"no-nul"),
                         (fuse.FUSE_LOOKUP, b"a/b\0"), (fuse.FUSE_SETATTR, bytes(20)),
                         (fuse.FUSE_MKDIR, b"\0\0"), (fuse.FUSE_INIT, b"\7\0")):
        assert _reply(s.handle(_req(opcode, body)))[:2] == (-errno.EINVAL, 7), opcode
    error, _, body = _reply(s.handle(_req(fuse.FUSE_LOOKUP, b"instances\0")))
    assert error == 0 and len(body) == 128


def test_replies_and_silences():
    s = fuse._Session(_Backend())
    error, unique, body = _reply(s.handle(_req(fuse.FUSE_INIT, struct.pack("<IIII", 7, 45, 4096, 0))))
    assert (error, unique, len(body)) == (0, 7, 64)
    major, minor, readahead, flags, bg, cong, max_write, gran, pages = \
        struct.unpack_from("<IIIIHHIIH", body)
    assert (major, minor, readahead, flags, bg, cong, max_write, gran, pages) == \
        (7, 31, 4096, (1 << 3) | (1 << 5), 16, 12, 131072, 1, 32)
    old = fuse._Session(_Backend())
    assert struct.unpack_from("<II", _reply(old.handle(
        _req(fuse.FUSE_INIT, struct.pack("<IIII", 7, 28, 0, 0))))[2]) == (7, 28)
    assert s.handle(_req(fuse.FUSE_FORGET, struct.pack("<Q", 1), nodeid=5)) is None
    assert s.handle(_req(fuse.FUSE_BATCH_FORGET, struct.pack("<IIQQ", 1, 0, 5, 1))) is None
    assert s.handle(_req(fuse.FUSE_INTERRUPT, struct.pack("<Q", 3))) is None
    assert _reply(s.handle(_req(4242)))[:2] == (-errno.ENOSYS, 7)
    assert _reply(s.handle(_req(22,            # GETXATTR
                                struct.pack("<II", 0, 0) + b"user.x\0")))[0] == -errno.ENOSYS
    assert _reply(s.handle(_req(fuse.FUSE_GETATTR, bytes(16), nodeid=12345)))[0] == -errno.ESTALE
    assert _reply(s.handle(_req(fuse.FUSE_DESTROY))) == (0, 7, b"")


def test_a_backend_bug_is_eio():
    s = _session()
    s.backend.boom.add("/")
    assert _reply(s.handle(_req(fuse.FUSE_GETATTR, bytes(16))))[0] == -errno.EIO
    s.backend.boom.clear()
    error, _, body = _reply(s.handle(_req(fuse.FUSE_GETATTR, bytes(16))))
    assert error == 0 and len(body) == 104
    mode = struct.unpack_from("<I", body, 16 + 60)[0]
    assert mode == stat.S_IFDIR | 0o755


def _readdir_all(s, nodeid, size):
    error, _, body = _reply(s.handle(_req(fuse.FUSE_OPENDIR, bytes(8), nodeid=nodeid)))
    assert error == 0
    fh = struct.unpack_from("<Q", body)[0]
    names, offset, calls = [], 0, 0
    while True:
        error, _, body = _reply(s.handle(_req(fuse.FUSE_READDIR, struct.pack(
            "<QQIIQII", fh, offset, size, 0, 0, 0, 0), nodeid=nodeid)))
        assert error == 0 and len(body) <= size
        if not body:
            break
        calls += 1
        pos = 0
        while pos < len(body):
            _, off, namelen, _ = struct.unpack_from("<QQII", body, pos)
            names.append(body[pos + 24:pos + 24 + namelen].decode())
            pos += (24 + namelen + 7) & ~7
            offset = off
    s.handle(_req(fuse.FUSE_RELEASEDIR, struct.pack("<QIIQ", fh, 0, 0, 0), nodeid=nodeid))
    return names, calls


def test_readdir_honours_offset_and_size():
    s = _session()
    error, _, body = _reply(s.handle(_req(fuse.FUSE_LOOKUP, b"many\0")))
    assert error == 0
    many = struct.unpack_from("<Q", body)[0]
    names, calls = _readdir_all(s, many, 4096)
    assert names[:2] == [".", ".."] and calls > 1
    assert sorted(names[2:]) == sorted(f"entry_with_a_fairly_long_name_{i:04d}" for i in range(300))
    names, calls = _readdir_all(s, 1, 40)          # one record at a time
    assert names == [".", "..", "instances", "overlays", "many"] and calls == 5
