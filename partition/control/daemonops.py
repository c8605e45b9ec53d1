"""The verbs the supervisor serves, each bound to one Machine: op -> (the argument names it
takes, the handler), and the few adapters the real control plane's calls need (an instance by
id, reboot's commands, a tree's bytes, a load relative to the caller's directory).

Separate from the daemon's loop (daemon.py): which verbs exist and what each calls is the
control plane's vocabulary, read by the docs test and the scenario watcher too; how requests
are read, queued and answered is the loop's business.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition.errors import InvalidSpec, NotLoaded

if TYPE_CHECKING:
    from partition.host.machine import Machine


def ops(m: Machine) -> dict[str, tuple[set[str], Callable[..., Any]]]:
    """op -> (argument names allowed, handler), every handler bound to ``m``. wireargs.ARGS
    checks the same names (tests/test_supervisor.py holds the two to each other)."""
    return {
        "ping": (set(), lambda: {"pid": os.getpid(), "run_dir": m.run_dir}),
        "show": ({"name", "brief"}, m.show),
        "create": ({"name", "memory", "cpus", "cpu_count", "id", "recovery", "max_restarts",
                    "restart_window", "watchdog", "standby_for", "preserve_memory",
                    "llc_way_mask", "shared", "pids_max", "rootfs"}, m.create),
        "update": ({"name", "recovery", "max_restarts", "restart_window", "watchdog",
                    "preserve_memory"}, m.update),
        "fault": ({"name", "kind", "options"}, lambda name, kind, options=None:
                  m.fault(name, kind, **(options or {}))),
        "load": ({"name", "kernel", "cmdline", "cwd", "programs"},
                 lambda **kw: _load_with_cwd(m, **kw)),
        "start": ({"name", "wait"}, m.start),
        "exec": ({"name", "wait"}, m.start),          # the wire's old name for start
        "kill": ({"name", "force", "timeout"}, m.kill),
        "unload": ({"name"}, m.unload),
        "delete": ({"name"}, m.delete),
        "console": ({"name"}, m.console),
        "console_input": ({"name", "data"}, m.console_input),
        # the real control plane (mkctl kerf: partition/bridge/)
        "overlay": ({"data"}, m.apply_overlay),
        "overlay_remove": ({"tx"}, m.remove_overlay),
        "resize": ({"name", "cpus", "memory"}, m.resize),
        "dump": ({"name"}, lambda name=None: dump_tree(m, name)),
        "kexec_load": ({"id", "kernel", "cmdline"},
                       lambda id, kernel, cmdline="": m.load(_by_id(m, id), kernel, cmdline)),
        "kexec_unload": ({"id"}, lambda id: m.unload(_by_id(m, id))),
        "mk_reboot": ({"cmd", "id"}, lambda cmd, id: _reboot(m, cmd, id)),
        "exec_into": ({"name", "argv"}, lambda name, argv=(): _exec_into(m, name, argv)),
        "live_update": ({"name", "kernel", "cmdline", "quiesce"}, m.live_update),
    }


def _exec_into(m: Machine, name: str, argv: Any = ()) -> dict[str, Any]:
    """What ``mkctl exec NAME -- CMD`` needs to put a process into a running instance's
    userland (started now if it has none, host/userlands.py): its init (pid and start time,
    to join its namespaces by a pidfd), the kernel's pid, the CPUs and cgroups. The command
    itself runs in mkctl's child, with mkctl's stdio; the host records that it was asked."""
    inst = m.get(name)
    if inst.state.value != "active" or inst.pid is None:
        raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; exec runs a command "
                        "inside a running instance", f"mkctl start {inst.name} first")
    m.events.info("exec_command", instance=inst.id, name=inst.name,
                  argv=[str(a)[:200] for a in list(argv)[:32]])
    init = m.userlands.ensure(inst)
    return {"id": inst.id, "pid": inst.pid, "cpus": list(inst.cpus),
            "procs": m.cgroups.procs_files(inst.id), "generation": inst.generation,
            "shared": m.shared.mounts(inst.shared), "rootfs": inst.rootfs,
            "init": init["init"], "init_start": init["start"]}


def _by_id(m: Machine, mk_id: Any) -> str:
    """The instance a kexec or reboot names by id (the real calls carry only the id)."""
    if isinstance(mk_id, bool) or not isinstance(mk_id, int) or not 1 <= mk_id <= 511:
        raise InvalidSpec(f"multikernel id {mk_id!r} is out of range 1..511",
                          "kerf encodes the id in the flags (id << 5)")
    inst = m.by_id(mk_id)
    if inst is None:
        raise NotLoaded(f"no instance has id {mk_id}", "create it first (kerf create)")
    return inst.name


def _reboot(m: Machine, cmd: Any, mk_id: Any) -> Any:
    """reboot(LINUX_REBOOT_CMD_MULTIKERNEL*): start, graceful halt, forced halt."""
    name = _by_id(m, mk_id)
    if cmd == "start":
        return m.start(name)
    if cmd in ("halt", "force"):
        return m.kill(name, force=cmd == "force")
    raise InvalidSpec(f"reboot command {cmd!r} is not start, halt or force", "kerf start/kill")


def dump_tree(m: Machine, name: str | None) -> bytes:
    """The DTB ``sys/fs/multikernel`` serves: the root tree, or an instance's."""
    from partition.host.views import render_instance_tree, render_pool_tree
    if name is None:
        return render_pool_tree(m.snapshot())
    return render_instance_tree(m.show(name))


def _load_with_cwd(m: Machine, name: str, kernel: str, cmdline: str = "",
                   cwd: str | None = None, programs: Any = None) -> Any:
    """Resolve module specs relative to the caller's directory, as a shell user expects."""
    added = None
    if cwd and os.path.isdir(cwd) and cwd not in sys.path:
        sys.path.insert(0, cwd)
        added = cwd
    try:
        return m.load(name, kernel, cmdline, programs)
    finally:
        if added is not None:
            sys.path.remove(added)


#: what may be answered while another verb is still waiting (they change nothing)
READ_ONLY_OPS = frozenset({"ping", "show", "console", "dump"})
