"""Last-level-cache way masks (``llc-way-mask``), the real device-tree property, and their
enforcement through resctrl.

The baseline's ``/resources`` names the LLC ways the pool may hand out; an instance's
``resources`` names its share: a non-zero subset of the pool's mask that no other instance holds
(the real design's "non-overlapping subsets of the baseline's"). The rules are checked here,
before anything changes, so a bad mask leaves the machine as it was.

Where the host has resctrl (an ``L3`` line in ``<root>/schemata``: ``mount -t resctrl resctrl
/sys/fs/resctrl``), an instance with a mask gets its own resctrl group, whose ``schemata`` is that
mask on every L3 domain, and its process joins the group's ``tasks`` when it is forked (what it
forks or starts later inherits the group). Where it has none, as on most VMs, the mask is kept,
checked and shown, and the views say plainly that nothing enforces it (``llc.enforced`` false, with
the reason, and an ``llc_unenforced`` event at start). The root is a parameter so that the resctrl
path is exercised against a directory tree of the same shape.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from partition.errors import InvalidSpec, MKError, ResourceBusy

RESCTRL_ROOT = "/sys/fs/resctrl"
#: the widest mask a property may carry: a u32 cell (the real example) or a u64
MAX_MASK = (1 << 64) - 1
_SCHEMA_LINE = re.compile(r"^\s*(L3(?:CODE|DATA)?)\s*:\s*(.*)$")


def fmt(mask: int) -> str:
    return f"{mask:#x}"


def parse_mask(value: object, what: str = "llc-way-mask") -> int:
    """A mask from the CLI, a scenario or the wire: an int or a hex/decimal string; non-zero."""
    if isinstance(value, bool):
        raise InvalidSpec(f"{what} must be a bit mask, got {value!r}", "e.g. 0x0f")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"(0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20})", text):
            raise InvalidSpec(f"{what} {value[:40]!r} is not a bit mask",
                              "give the ways in hex, e.g. 0x0f for the lowest four")
        value = int(text, 0)
    if not isinstance(value, int) or not 0 <= value <= MAX_MASK:
        raise InvalidSpec(f"{what} {value!r} is not a bit mask of at most 64 ways",
                          "give the ways in hex, e.g. 0x0f for the lowest four")
    if value == 0:
        raise InvalidSpec(f"Invalid {what} 0: an instance needs at least one LLC way",
                          "set at least one bit, or leave llc-way-mask out")
    return value


def check_instance(name: str, mask: int, pool_mask: int | None,
                   others: dict[str, int]) -> None:
    """The real rules for an instance's mask: the pool has one, it is a subset of it, and no
    other instance holds one of its ways (EBUSY, naming who)."""
    if pool_mask is None:
        raise InvalidSpec(f"instance {name!r} asks for llc-way-mask {fmt(mask)} but the pool "
                          "has none", "add llc-way-mask to the baseline's /resources "
                          "(mkctl init --llc-way-mask MASK)")
    outside = mask & ~pool_mask
    if outside:
        raise InvalidSpec(f"llc-way-mask {fmt(mask)} of instance {name!r} is not a subset of the "
                          f"pool's {fmt(pool_mask)} (ways {fmt(outside)} are not in the pool)",
                          f"choose ways within {fmt(pool_mask)}")
    taken = {other: m & mask for other, m in others.items() if other != name and m & mask}
    if taken:
        who = ", ".join(f"{o} holds {fmt(m)}" for o, m in sorted(taken.items()))
        free = pool_mask & ~_union(m for o, m in others.items() if o != name)
        raise ResourceBusy(f"llc-way-mask {fmt(mask)} of instance {name!r} overlaps another "
                           f"instance's ({who})",
                           f"choose ways no instance holds: {fmt(free)} are free"
                           if free else "no LLC way of the pool is free")


def _union(masks: object) -> int:
    out = 0
    for m in masks:          # type: ignore[attr-defined]
        out |= m
    return out


class Resctrl:
    """The host's resctrl filesystem at ``root``, or the plain statement that there is none."""

    def __init__(self, root: str = RESCTRL_ROOT, prefix: str = "mk") -> None:
        self.root = root
        self.prefix = prefix
        self.domains: dict[str, list[str]] = {}     # L3 / L3CODE / L3DATA -> domain ids
        self.cbm_mask: int | None = None
        self.reason = ""
        try:
            with open(os.path.join(root, "schemata")) as f:
                for line in f:
                    m = _SCHEMA_LINE.match(line)
                    if m:
                        self.domains[m.group(1)] = [d.split("=", 1)[0].strip()
                                                    for d in m.group(2).split(";") if "=" in d]
        except OSError as exc:
            self.reason = (f"no resctrl at {root} ({exc.strerror}): LLC way masks are checked "
                           "and shown but not enforced")
            return
        if not self.domains:
            self.reason = (f"resctrl at {root} has no L3 cache allocation: LLC way masks are "
                           "checked and shown but not enforced")
            return
        try:
            with open(os.path.join(root, "info", "L3", "cbm_mask")) as f:
                self.cbm_mask = int(f.read().strip(), 16)
        except (OSError, ValueError):
            self.cbm_mask = None

    @property
    def enforced(self) -> bool:
        return bool(self.domains)

    def state(self) -> dict[str, object]:
        return {"enforced": self.enforced, "root": self.root, "reason": self.reason,
                "cbm_mask": fmt(self.cbm_mask) if self.cbm_mask is not None else None}

    def check_pool(self, mask: int) -> None:
        """The baseline's mask against the cache's own ways, where resctrl says what they are."""
        if self.cbm_mask is not None and mask & ~self.cbm_mask:
            raise InvalidSpec(f"llc-way-mask {fmt(mask)} names ways the L3 cache does not have "
                              f"(its ways: {fmt(self.cbm_mask)}, {self.root}/info/L3/cbm_mask)",
                              f"choose ways within {fmt(self.cbm_mask)}")

    def group(self, instance_id: int) -> str:
        return os.path.join(self.root, f"{self.prefix}-{instance_id}")

    def make_group(self, instance_id: int, mask: int) -> None:
        """The instance's group with its mask on every L3 domain; nothing left on failure."""
        if not self.enforced:
            return
        d = self.group(instance_id)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass                       # a group this machine left (a restart): rewritten
        except OSError as exc:
            raise self._error(exc, f"cannot make the resctrl group {d}") from None
        lines = "".join(f"{res}:" + ";".join(f"{dom}={mask:x}" for dom in doms) + "\n"
                        for res, doms in self.domains.items())
        try:
            with open(os.path.join(d, "schemata"), "w") as f:
                f.write(lines)
        except OSError as exc:
            self.remove_group(instance_id)
            raise self._error(exc, f"resctrl refused the mask {fmt(mask)} in {d}/schemata") \
                from None

    def join(self, instance_id: int, pid: int) -> None:
        """Move a process (its main thread; what it starts later inherits the group)."""
        if not self.enforced:
            return
        d = self.group(instance_id)
        try:
            with open(os.path.join(d, "tasks"), "a") as f:
                f.write(f"{pid}\n")
        except OSError as exc:
            raise self._error(exc, f"cannot move pid {pid} into {d}") from None

    def remove_group(self, instance_id: int) -> None:
        """rmdir: resctrl moves the group's tasks back to the default group. A root that is a
        plain directory tree (not a resctrl mount) has the files this class wrote: removed."""
        if not self.enforced:
            return
        d = self.group(instance_id)
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            for name in ("schemata", "tasks"):
                try:
                    os.unlink(os.path.join(d, name))
                except FileNotFoundError:
                    pass
            os.rmdir(d)

    def remove_groups(self, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Every group of this prefix but those of the instances in ``keep``, found by name
        as a machine's cgroups are: what a dead host left (the instances a new host did not
        adopt; all of them at the shutdown of an abandoned machine). Returns the ids removed;
        a group that cannot be removed is left (the rest still are)."""
        if not self.enforced:
            return []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        pattern = re.compile(re.escape(self.prefix) + r"-([0-9]{1,3})")
        removed = []
        for name in names:
            found = pattern.fullmatch(name)
            if found is None or int(found.group(1)) in keep:
                continue
            try:
                self.remove_group(int(found.group(1)))
            except OSError:
                continue
            removed.append(int(found.group(1)))
        return removed

    @staticmethod
    def _error(exc: OSError, what: str) -> MKError:
        """resctrl's own refusal: EINVAL (a mask the CPU cannot take) as InvalidSpec; the rest
        (ENOSPC: no class of service left) as EIO with its reason."""
        cls = InvalidSpec if exc.errno == errno.EINVAL else MKError
        return cls(f"{what}: {exc.strerror}",
                   "check the mask against info/L3 (cbm_mask, min_cbm_bits, num_closids)")


def join(resctrl: Resctrl, events: Any, inst: Any, pid: int) -> None:
    """An instance's process into its resctrl group; a refusal is an event, not a failed
    load: the mask stays checked and shown, and the views say it is not held."""
    try:
        resctrl.join(inst.id, pid)
    except MKError as exc:
        events.warning("llc_join_failed", instance=inst.id, name=inst.name, pid=pid,
                       error=exc.message)


def leave(resctrl: Resctrl, events: Any, inst: Any) -> None:
    """Remove an instance's resctrl group, if it has one. A group that cannot go is said (an
    ``llc_group_left`` event) and what called goes on: a delete whose cgroups are gone
    already, or the rest of a teardown."""
    if not inst.llc_way_mask:
        return
    try:
        resctrl.remove_group(inst.id)
    except OSError as exc:
        events.warning("llc_group_left", instance=inst.id, name=inst.name, error=exc.strerror)
