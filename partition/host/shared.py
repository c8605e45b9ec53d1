"""The machine's shared regions: DAXFS-like memory that every instance naming it mounts, and
that outlives any one instance's kernel.

On the real machine DAXFS is a filesystem laid out in DAX memory (pmem, CXL, a reserved
range) that several kernels mount at once; files written there by a kernel that then panics
are still there for the next one (../shared/reference/devices.md). The emulator's stand-in,
its own invention: each region is a **tmpfs of exactly its size** mounted by the host at
``RUN/shared/NAME`` and owned by the machine (not by any instance), so its pages are plain
shared memory that a program maps zero-copy with mmap, that a second instance sees, and that
no instance's death frees. It is removed (unmounted) with the machine. It is *extra* memory
beside the pool, not carved from it; a region larger than the whole pool is refused all the
same, as the real one could never be. No DAXFS on-disk layout (superblock, hash overlay,
base image) is emulated: files are ordinary tmpfs files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from partition import linux
from partition.errors import InvalidSpec, NoSuchSharedRegion, SharedRegionTooLarge
from partition.units import format_size, parse_size

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 2
#: what a region may be called: one path component, nothing that climbs out of it
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
PAGE = 4096


@dataclass(frozen=True)
class Region:
    """One shared region: its name, its size in bytes (a whole number of pages) and where the
    host mounted it."""

    name: str
    size: int
    path: str
    #: its address in ``/proc/iomem``: past the arena, since it is not in it
    base: int


def check_name(name: object) -> str:
    """A region's name: one directory entry, so ``/mnt/shared/NAME`` stays in ``/mnt/shared``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise InvalidSpec(f"shared region name {str(name)[:80]!r} is not a plain name",
                          "use letters, digits, '_', '-' and '.' (not '/' or '..'), "
                          "at most 64 characters")
    return name


def parse_specs(specs: list[str] | dict[str, Any] | None, pool_bytes: int) -> dict[str, int]:
    """``["db:16M", ...]`` (CLI) or ``{"db": "16M"}`` (a scenario's table) -> name -> bytes,
    each checked: a plain name, given once, a size of whole pages no larger than the pool."""
    if specs is None:
        return {}
    if isinstance(specs, dict):
        pairs = [(k, v) for k, v in specs.items()]
    elif isinstance(specs, list):
        pairs = []
        for spec in specs:
            if not isinstance(spec, str) or ":" not in spec:
                raise InvalidSpec(f"shared region {str(spec)[:80]!r} is not NAME:SIZE",
                                  "e.g. --shared db:16M")
            name, _, size = spec.partition(":")
            pairs.append((name, size))
    else:
        raise InvalidSpec(f"shared regions must be a list of NAME:SIZE, got {specs!r}",
                          "e.g. shared = [\"db:16M\"]")
    out: dict[str, int] = {}
    for name, size in pairs:
        check_name(name)
        if name in out:
            raise InvalidSpec(f"shared region {name!r} is given twice", "name each region once")
        nbytes = parse_size(size, f"shared region {name!r}")
        if nbytes % PAGE:
            raise InvalidSpec(f"shared region {name!r} size {nbytes} is not a whole number of "
                              "4 KiB pages", "e.g. 16M")
        if nbytes > pool_bytes:
            raise SharedRegionTooLarge(
                f"shared region {name!r} of {format_size(nbytes)} is larger than the pool "
                f"({format_size(pool_bytes)})", "give it at most the pool's size")
        out[name] = nbytes
    return out


class SharedRegions:
    """The machine's regions, mounted under ``RUN/shared``; ``close`` unmounts every one."""

    def __init__(self, run_dir: str, sizes: dict[str, int], base: int) -> None:
        self.root = os.path.join(run_dir, "shared")
        self.regions: dict[str, Region] = {}
        if not sizes:
            return
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
            for name, size in sizes.items():
                path = os.path.join(self.root, name)
                os.mkdir(path, 0o755)
                try:
                    linux.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
                                f"size={size},mode=1777")
                except BaseException:
                    os.rmdir(path)
                    raise
                self.regions[name] = Region(name, size, path, base)
                base += size
        except BaseException:
            self.close()
            raise

    def mounts(self, names: list[str]) -> dict[str, str]:
        """Region name -> host path, for the regions an instance names."""
        return {n: self.regions[n].path for n in names if n in self.regions}

    def check(self, names: object) -> list[str]:
        """The regions a ``create --shared`` names, each one the machine has, once each."""
        if names is None:
            return []
        if not isinstance(names, list) or any(not isinstance(n, str) for n in names):
            raise InvalidSpec(f"shared must be a list of region names, got {names!r}",
                              "e.g. --shared db")
        for n in names:
            if n not in self.regions:
                have = ", ".join(sorted(self.regions)) or "none"
                raise NoSuchSharedRegion(
                    f"the machine has no shared region {n!r} (it has: {have})",
                    "declare it with the machine: mkctl init --shared NAME:SIZE, or a "
                    "scenario's [machine] shared table")
        return list(dict.fromkeys(names))

    def describe(self) -> list[dict[str, Any]]:
        """For ``mkctl show``: each region's name, size, mount point and bytes in use."""
        out = []
        for r in self.regions.values():
            try:
                st = os.statvfs(r.path)
                used = (st.f_blocks - st.f_bfree) * st.f_frsize
            except OSError:
                used = 0
            out.append({"name": r.name, "size": r.size, "path": r.path, "used": used,
                        "base": r.base})
        return out

    def close(self) -> None:
        """Unmount and remove every region, also those a dead host left that this one
        adopted without knowing (lazily if a program still holds one open: its pages go with
        the last reference), then the ``shared`` directory."""
        self.regions.clear()
        release_left(os.path.dirname(self.root))


def release_left(run_dir: str) -> None:
    """Unmount whatever is mounted under ``RUN/shared`` (deepest first) and remove the
    directories: what a machine's close does, and what ``mkctl shutdown`` does for a dead
    host's run directory before removing it (a mount would survive ``rmtree``)."""
    root = os.path.join(run_dir, "shared")
    if not os.path.isdir(root):
        return
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        points = []
    # (mountinfo escapes a space as \040; the host's run directories hold none)
    for point in sorted((p for p in points if p.startswith(root + "/")), key=len, reverse=True):
        try:
            linux.umount(point, MNT_DETACH)
        except OSError:
            pass
    for entry in os.listdir(root):
        try:
            os.rmdir(os.path.join(root, entry))
        except OSError:
            pass
    try:
        os.rmdir(root)
    except OSError:
        pass
