"""Cgroups.frozen: read from the freezer files once, then known until the host freezes again
(the kill -> active path read two v1 freezer.state files on every kill, ~0.25 ms). The
directories are a temporary tree laid out as v1's freezer hierarchy, not the real one."""

from __future__ import annotations

import os
from pathlib import Path

from partition.host.cgroups import USERLAND, Cgroups


def _v1(tmp_path: Path, iid: int) -> tuple[Cgroups, Path]:
    cg = Cgroups.__new__(Cgroups)          # (no machine directories made under /sys/fs/cgroup)
    cg.mode, cg.bases, cg.reaped, cg._thawed = "v1", {"freezer": str(tmp_path)}, 0, set()
    d = tmp_path / f"i{iid}"
    os.makedirs(d / USERLAND)
    for where in (d, d / USERLAND):
        (where / "freezer.state").write_text("THAWED\n")
    return cg, d


def test_a_thawed_freezer_is_read_once(tmp_path: Path) -> None:
    cg, d = _v1(tmp_path, 3)
    assert not cg.frozen(3)
    (d / "freezer.state").write_text("FROZEN\n")      # not the host's doing: not looked for
    assert not cg.frozen(3)


def test_a_freeze_is_seen_until_thawed(tmp_path: Path) -> None:
    cg, d = _v1(tmp_path, 3)
    assert not cg.frozen(3)
    assert cg.freeze_userland(3)
    assert (d / USERLAND / "freezer.state").read_text() == "FROZEN"
    assert cg.frozen(3)
    cg.thaw(3)
    assert (d / "freezer.state").read_text() == "THAWED"
    (d / "freezer.state").write_text("FROZEN\n")
    assert not cg.frozen(3)                # thawed here: known without a read
    assert cg.freeze(3)
    assert cg.frozen(3)


def test_an_unseen_instance_is_read(tmp_path: Path) -> None:
    """A cgroup the host has not thawed or read (an adopted instance's, hang-stopped under the
    previous host) is read: its freeze is found."""
    cg, d = _v1(tmp_path, 4)
    (d / "freezer.state").write_text("FROZEN\n")
    assert cg.frozen(4)
    assert cg.frozen(4)
