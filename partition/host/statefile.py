"""The state file of a machine whose instances outlive its host (host/adoption.py reads it).

``<run-dir>/machine.json`` (the machine) and ``<run-dir>/machine.d/<id>.json`` (one record per
instance), each written atomically as things change; and the names a survivable machine's arena
and groups go by, derived from its run directory, so that a new host finds them again.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable
from typing import Any

import posix_ipc

from partition.host import cgroups, rundir
from partition.host.instance import Instance
from partition.host.table import InstanceTable

STATE_FILE = "machine.json"
#: one record per instance, ``<id>.json``: a change rewrites its own instance's record alone
#: (one file of the whole machine was 370 KB at 511 instances, 0.45 ms to write at every verb)
RECORDS_DIR = "machine.d"
STATE_VERSION = 2
_RECORD = re.compile(r"([0-9]{1,3})\.json")
#: how far the recorded start time of an adopted process may be from the one the kernel gives
START_TOLERANCE_S = 0.01
#: the keys of a state file's ``config`` that a new host is started with (the machine's
#: arguments; save_state writes them): what ``abandon`` hands on and the supervisor passes
CONFIG_KEYS = ("cpus", "memory", "host_cpus", "oversubscribe", "console_bytes", "ring_slots",
               "ring_slot_bytes", "kill_timeout", "protection", "pool_chunks", "pool_window",
               "llc_way_mask", "resctrl_root", "require_signed", "keyring")


def arena_name(run_dir: str) -> str:
    """The POSIX shared-memory name of a survivable machine's arena: its run directory's key,
    so that two directories with one basename never share it."""
    return f"/mk-arena-{rundir.machine_key(run_dir)}"


def resctrl_prefix(run_dir: str) -> str:
    """What a machine's resctrl groups are named after (``<prefix>-<id>``, host/llc.py): its run
    directory's key, so that a new host, or the shutdown of an abandoned machine, finds them."""
    return f"multikernel-{rundir.machine_key(run_dir)}"


def state_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_FILE)


def records_path(run_dir: str) -> str:
    return os.path.join(run_dir, RECORDS_DIR)


def read_state(run_dir: str) -> dict[str, Any] | None:
    """The state a machine left, or None: the machine's file, with its instances' records
    (in id order) under ``instances``. Written by the host alone, in a directory only root
    reads (and every instance has covered), yet still shape-checked before use."""
    try:
        with open(state_path(run_dir)) as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or \
            not isinstance(state.get("config"), dict):
        return None
    state["instances"] = _read_records(run_dir)
    return state


def _read_records(run_dir: str) -> list[Any]:
    """Every ``<id>.json`` of the records directory, parsed; one that does not parse is kept as
    ``{"id": <id>, "unreadable": True}``, which adoption refuses (and kills its cgroup). A
    torn write's ``.tmp`` and anything else there is not a record."""
    d = records_path(run_dir)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    found: list[tuple[int, Any]] = []
    for name in names:
        match = _RECORD.fullmatch(name)
        if match is None:
            continue
        iid = int(match.group(1))
        try:
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError, RecursionError):
            rec = {"id": iid, "unreadable": True}
        found.append((iid, rec))
    return [rec for _, rec in sorted(found, key=lambda x: x[0])]


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_state(run_dir: str, state: dict[str, Any]) -> None:
    """Write a whole state as ``read_state`` returns it: the machine's file and one record per
    entry of ``instances`` (by its ``id``); records of other ids go. The host writes through
    ``save_state``; this is for tools and tests that edit a state."""
    d = records_path(run_dir)
    os.makedirs(d, exist_ok=True)
    keep = set()
    for rec in state.get("instances", []):
        name = f"{int(rec['id'])}.json"
        keep.add(name)
        _write_atomically(os.path.join(d, name), json.dumps(rec))
    _prune(d, keep)
    _write_atomically(state_path(run_dir), json.dumps(
        {k: v for k, v in state.items() if k != "instances"}))


def _prune(records: str, keep: set[str]) -> None:
    """Remove every record file in ``records`` not named in ``keep``."""
    for name in os.listdir(records):
        if name not in keep:
            os.unlink(os.path.join(records, name))


def cgroup_bases(run_dir: str) -> dict[str, str]:
    """The machine's cgroup directories, found by name under this host's own cgroups (the
    state file's word is not taken for where to kill)."""
    out: dict[str, str] = {}
    for c, path in cgroups.survivable_dirs(rundir.machine_key(run_dir)):
        out.setdefault(c, path)
    return out


def _arena_exists(run_dir: str) -> bool:
    try:
        posix_ipc.SharedMemory(arena_name(run_dir), 0).close_fd()
    except (posix_ipc.ExistentialError, ValueError):
        return False
    return True


def abandoned(run_dir: str) -> bool:
    """A survivable machine whose host is gone: its state file and its arena remain."""
    return read_state(run_dir) is not None and _arena_exists(run_dir)


def leftovers(run_dir: str) -> bool:
    """Anything a survivable machine of this run directory left: its arena or its cgroups
    (an unreadable state file included)."""
    return _arena_exists(run_dir) or bool(cgroups.survivable_dirs(rundir.machine_key(run_dir)))


def _state_record(inst: Instance) -> str:
    k = inst.kimage
    return json.dumps({
        "id": inst.id, "name": inst.name, "cpus": inst.cpus,
        "physical_cpus": inst.physical_cpus, "memory_base": inst.memory_base,
        "memory_bytes": inst.memory_bytes, "extra_regions": inst.extra_regions,
        "state": inst.state.value, "pid": inst.pid,
        "pid_start": inst.pid_start if inst.pid else 0.0,
        "generation": inst.generation, "cmd_seq": inst.cmd_seq, "boots": inst.boots,
        "child_fds": list(inst.child_fds),
        "kimage": {"spec": k.spec, "cmdline": k.cmdline, "label": k.label,
                   "source": k.source,
                   # a checked image (signed or ELF: signing.py) goes with it, as its file was
                   # read, so that a restart under the new host runs what was checked, not the
                   # file as it is now; the new host checks it again (_rebuild)
                   **({"file": base64.b64encode(k.file).decode()} if k.file else {})}
        if k else None,
        "recovery": inst.recovery.to_dict(), "counters": inst.counters,
        "standby_for": inst.standby_for,
        "llc_way_mask": inst.llc_way_mask,
        "pids_max": inst.pids_max, "rootfs": inst.rootfs,
    })


class StateFile:
    """Everything a new host needs to adopt this machine's instances. ``config``: the
    machine's part (its arguments and its cgroups), asked at each write."""

    def __init__(self, run_dir: str, table: InstanceTable,
                 config: Callable[[], dict[str, Any]]) -> None:
        self.run_dir = run_dir
        self.table = table
        self.config = config
        #: the machine's part of the state file as last written
        self.head: str | None = None

    def save(self, changed: list[Instance] | None = None, prune: bool = False) -> None:
        """Each file written atomically: with ``changed``, those instances' records alone (a
        deleted one's removed; ``prune``: and every record no instance has now), and the
        machine's file when it differs from the last one written; else all of it. A change
        costs the same at 511 instances as at 16."""
        head = json.dumps({"version": STATE_VERSION, **self.config()})
        d = records_path(self.run_dir)
        names = self.table.by_name
        if changed is None or self.head is None:
            os.makedirs(d, exist_ok=True)
            changed = list(names.values())
            prune = True
        if prune:                                   # (records of instances gone meanwhile)
            _prune(d, {f"{inst.id}.json" for inst in names.values()})
        for inst in changed:
            path = os.path.join(d, f"{inst.id}.json")
            if names.get(inst.name) is inst:
                _write_atomically(path, _state_record(inst))
            elif self.table.by_id(inst.id) is None:     # deleted (and its id not taken again)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if head != self.head:
            _write_atomically(state_path(self.run_dir), head)
            self.head = head
