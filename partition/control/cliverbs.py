"""What each ``mkctl`` verb does once its arguments are parsed: the call to the supervisor (or
the tool it runs) and the text or JSON it prints.

Separate from the parser (cliparse.py): a verb's behaviour and a verb's spelling change for
different reasons, and a reader looking for either should not have to page through the other.
The exit codes live here because every verb returns one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from partition.control import console
from partition.control.client import Client, start_supervisor, stop_supervisor
from partition.control.console import new_console_text as new_console_text  # (cli.py's)
from partition.control.show import format_metrics, render_show
from partition.errors import InvalidSpec
from partition.host import userspec
from partition.terminal import printable
from partition.units import format_cpulist, format_size

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    if getattr(args, "format", "text") == "json":
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        print(text)


def _one_line(i: dict[str, Any]) -> str:
    s = (f"instance {printable(i['name'], one_line=True)} (id {i['id']}): {i['state']}, "
         f"CPUs {format_cpulist(i['cpus'])}"
         f"{' (shared: ' + format_cpulist(i['shared_cpus']) + ')' if i['shared_cpus'] else ''}, "
         f"{format_size(i.get('memory_total', i['memory_bytes']))} at 0x{i['memory_base']:x}"
         + (f" (boot region {format_size(i['memory_bytes'])}, {i['regions_added']} added at "
            "run time)" if i.get("regions_added") else ""))
    if i.get("kernel"):
        s += f", kernel {printable(i['kernel'], one_line=True)}"
    if i.get("pid"):
        s += f", pid {i['pid']}"
    if i.get("llc_way_mask"):
        s += f", llc ways {i['llc_way_mask']}"
    if i.get("pids_max") not in (None, userspec.PIDS_MAX_DEFAULT):
        s += f", process limit {i['pids_max']}"
    if i.get("rootfs"):
        s += f", rootfs {printable(i['rootfs'], one_line=True)}"
    if i.get("signature"):
        s += f", signature {printable(str(i['signature']), one_line=True)}"
    if i.get("last_exit") and i["state"] != "active":        # the kernel's own words
        s += f"; last exit: {printable(i['last_exit']['reason'], one_line=True)}"
    if i.get("failure"):
        s += f"; FAILED: {printable(i['failure'], one_line=True)}"
    return s


def _kernel_spec(spec: str) -> str:
    """A path is sent absolute: the supervisor runs in another directory."""
    if os.path.isfile(spec) or spec.endswith(".py"):
        return os.path.abspath(spec)
    path, _, cls = spec.rpartition(":")
    if path.endswith(".py"):
        return os.path.abspath(path) + ":" + cls
    return spec


def _logical(apic_ids: list[int], what: str) -> list[int]:
    """Physical (APIC) ids of a device tree -> this machine's logical CPU numbers."""
    from partition import linux
    from partition.errors import InvalidSpec
    logical = {p: c for c, p in linux.physical_cpu_ids().items()}
    unknown = [p for p in apic_ids if p not in logical]
    if unknown:
        raise InvalidSpec(f"{what}: Invalid APIC ID(s) {unknown}. Valid APIC IDs on this "
                          f"system: {sorted(logical)}", "dump the tree on this machine")
    return sorted(logical[p] for p in apic_ids)


def cmd_init(a: argparse.Namespace) -> int:
    if a.input:                       # a baseline DTB/DTS, as kerf init --input takes
        from partition.host.devicetree import parse_baseline, read_tree_file
        base = parse_baseline(read_tree_file(a.input))
        a.cpus = ",".join(map(str, _logical(base.cpus, a.input)))
        a.memory = base.memory_bytes
        if base.llc_way_mask is not None and a.llc_way_mask is None:
            a.llc_way_mask = base.llc_way_mask
        if base.shared and not a.shared:
            a.shared = [f"{n}:{size}" for n, size in base.shared.items()]
    cfg = {"cpus": a.cpus, "memory": a.memory, "host_cpus": a.host_cpus,
           "oversubscribe": a.oversubscribe, "console_bytes": a.console_size,
           "kill_timeout": a.kill_timeout, "protection": a.protection,
           "survive_host": a.survive_host}
    from partition.host.pool import PoolConfig  # (not imported for the verbs that only ask)
    PoolConfig.build(a.cpus, a.memory, a.host_cpus, a.oversubscribe)   # refuse early, in the CLI
    cfg.update(_init_extras(a))
    info = start_supervisor(a.run_dir, cfg)
    if info.get("adopted"):
        print(f"mkctl init: a machine whose host died was left in {info['run_dir']}: adopted "
              "it (its pool, not the one asked for; mkctl shutdown first for a new pool)",
              file=sys.stderr)
    snap = Client(a.run_dir).call("show")
    text = (f"machine up in {info['run_dir']} (supervisor pid {info['pid']})"
            + (" [removed a stale run directory first]" if info.get("cleaned_stale") else "")
            + "\n" + render_show(snap).rstrip())
    _emit(a, snap, text)
    return EXIT_OK


def _init_extras(a: argparse.Namespace) -> dict[str, object]:
    """The pool's LLC ways and the signature policy, checked here (the supervisor runs in
    another directory: the keyring goes as an absolute path)."""
    from partition.errors import InvalidSpec
    from partition.host import llc, signing
    out: dict[str, object] = {}
    if a.llc_way_mask is not None:
        out["llc_way_mask"] = llc.parse_mask(a.llc_way_mask, "the pool's llc-way-mask")
    if a.require_signed and not a.keyring:
        raise InvalidSpec("--require-signed needs --keyring: nothing could verify the images",
                          "mkctl init --require-signed --keyring CERT.pem")
    if a.keyring:
        out["keyring"] = signing.Keyring(a.keyring).path
        out["require_signed"] = bool(a.require_signed)
    if getattr(a, "shared", None):
        from partition.host.pool import PoolConfig
        from partition.host.shared import parse_specs
        parse_specs(a.shared, PoolConfig.build(a.cpus, a.memory, a.host_cpus,
                                               a.oversubscribe).memory_bytes)
        out["shared"] = list(a.shared)
    return out


def cmd_pack(a: argparse.Namespace) -> int:
    """A Python kernel as an ELF image (host/kimage.py): what kerf sign signs."""
    from partition.errors import InvalidSpec
    from partition.host.kimage import pack_elf
    try:
        with open(a.kernel, "rb") as f:
            source = f.read(16 << 20)
        compile(source, a.kernel, "exec")
    except OSError as exc:
        raise InvalidSpec(f"cannot read {a.kernel}: {exc.strerror}", "give a .py kernel file") \
            from None
    except (SyntaxError, ValueError) as exc:
        raise InvalidSpec(f"{a.kernel} is not Python source: {exc}",
                          "give a .py kernel file (mkctl load --kernel FILE checks it)") from None
    try:
        with open(a.output, "wb") as f:
            f.write(pack_elf(source))
    except OSError as exc:
        raise InvalidSpec(f"cannot write {a.output}: {exc.strerror}",
                          "give -o a path in a writable directory") from None
    print(f"packed {a.kernel} into {a.output} (ELF, section .mkpy); sign it with: kerf sign "
          f"{a.output} -o SIGNED --key KEY --cert CERT")
    return EXIT_OK


def cmd_adopt(a: argparse.Namespace) -> int:
    """A new host for the instances a dead supervisor left running (host/adoption.py)."""
    info = start_supervisor(a.run_dir, {"adopt": True})
    snap = Client(a.run_dir).call("show")
    text = (f"adopted the machine in {info['run_dir']} (supervisor pid {info['pid']}, "
            f"{snap['machine']['adopt_ms']} ms)\n" + render_show(snap).rstrip())
    _emit(a, snap, text)
    return EXIT_OK


def cmd_create(a: argparse.Namespace) -> int:
    if a.input:                       # an instance's dump (mkctl dump / kerf dump), DTB or DTS
        from partition.host.devicetree import parse_instance, read_tree_file
        dump = parse_instance(read_tree_file(a.input))
        a.name = a.name or dump.name
        a.id = dump.id if a.id is None else a.id
        a.cpus = ",".join(map(str, _logical(dump.cpus, a.input)))
        a.memory = dump.memory_bytes
        if dump.llc_way_mask is not None and a.llc_way_mask is None:
            a.llc_way_mask = dump.llc_way_mask
    elif a.name is None or a.memory is None or (a.cpus is None and a.cpu_count is None):
        print("mkctl create: give NAME, --memory and --cpus or --cpu-count (or --input FILE)",
              file=sys.stderr)
        return EXIT_USAGE
    extra: dict[str, Any] = {} if a.llc_way_mask is None else {"llc_way_mask": a.llc_way_mask}
    # checked here too, so that a bad value never reaches the supervisor, and a relative
    # rootfs is mkctl's (the supervisor's working directory is not the caller's)
    if a.pids_max is not None:
        extra["pids_max"] = userspec.check_pids_max(a.pids_max, repr(a.name))
    if a.rootfs is not None:
        extra["rootfs"] = userspec.check_rootfs(a.rootfs, repr(a.name))
    if a.shared:
        extra["shared"] = list(a.shared)
    r = Client(a.run_dir).call("create", name=a.name, memory=a.memory, cpus=a.cpus,
                               cpu_count=a.cpu_count, id=a.id, recovery=a.recovery,
                               max_restarts=a.max_restarts, restart_window=a.restart_window,
                               watchdog=a.watchdog, standby_for=a.standby_for,
                               preserve_memory=a.preserve_memory, **extra)
    _emit(a, r, _one_line(r))
    return EXIT_OK


def cmd_update(a: argparse.Namespace) -> int:
    client = Client(a.run_dir)
    r: dict[str, Any] = {}
    if a.kernel is not None:                            # a live update (host/liveupdate.py)
        u = client.call("live_update", name=a.name, kernel=_kernel_spec(a.kernel),
                        cmdline=a.cmdline)
        if u["rolled_back"]:
            print(printable(f"mkctl update: {a.name}: ROLLED BACK to {u['kernel']}: "
                            f"{u['reason']}"), file=sys.stderr)
            return EXIT_REFUSED
        _emit(a, u, f"instance {a.name}: live update {u['previous']} -> {u['kernel']} in "
                    f"{u['gap_ms']} ms (load {u['load_ms']} ms before, not in the gap); "
                    f"preserved: {', '.join(u['preserved']) or 'nothing'}")
        return EXIT_OK
    if a.cpus is not None or a.memory is not None:     # kerf update: one overlay transaction
        r = client.call("resize", name=a.name, cpus=a.cpus, memory=a.memory)
    policy = {"recovery": a.recovery, "max_restarts": a.max_restarts,
              "restart_window": a.restart_window, "watchdog": a.watchdog,
              "preserve_memory": a.preserve_memory}
    if any(v is not None for v in policy.values()) or not r:
        r = {**r, **client.call("update", name=a.name, **policy)}
    text = _one_line(r) + f"\n  recovery: {r['recovery']}"
    if r.get("transaction"):
        tx = r["transaction"]
        text += f"\n  transaction tx_{tx['id']} {tx['status']}: {'; '.join(tx['operations'])}"
    _emit(a, r, text)
    return EXIT_OK


def cmd_dump(a: argparse.Namespace) -> int:
    """An instance's device tree (or the root tree) as DTS text, or the DTB with --output."""
    from partition.host.devicetree import to_dts
    blob = Client(a.run_dir).call("dump", name=a.name)
    if a.output:
        with open(a.output, "wb") as f:
            f.write(blob)
    else:
        print(to_dts(blob), end="")
    return EXIT_OK


def cmd_kerf(a: argparse.Namespace) -> int:
    """The real kerf, unmodified, against this machine (partition/bridge/)."""
    from partition.bridge.session import run
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        print("mkctl kerf: give kerf's arguments after --, e.g. mkctl kerf -- show",
              file=sys.stderr)
        return EXIT_USAGE
    return run(args, a.run_dir, oversubscribe=a.oversubscribe, extras=_init_extras(a))


def cmd_fault(a: argparse.Namespace) -> int:
    opts = {k: getattr(a, k) for k in ("address", "bytes", "target", "count", "seconds")
            if getattr(a, k) is not None}
    r = Client(a.run_dir).call("fault", name=a.name, kind=a.kind, options=opts)
    _emit(a, r, f"fault {a.kind} injected into {r['name']} (id {r['id']})")
    return EXIT_OK


def cmd_load(a: argparse.Namespace) -> int:
    extra = {"programs": list(a.program)} if a.program else {}
    r = Client(a.run_dir).call("load", name=a.name, kernel=_kernel_spec(a.kernel),
                               cmdline=a.cmdline, cwd=os.getcwd(), **extra)
    _emit(a, r, _one_line(r))
    return EXIT_OK


def cmd_simple(a: argparse.Namespace) -> int:
    extra = {"wait": False} if getattr(a, "no_wait", False) else {}
    op = a.verb
    if a.verb == "exec":
        command = a.command[1:] if a.command[:1] == ["--"] else a.command
        if command:                   # kerf 0.4: exec NAME -- CMD runs a command inside it
            from partition.control.inside import run
            return run(a.run_dir, a.name, command, tty=a.tty, interactive=a.interactive)
        print("mkctl exec: deprecated: booting is 'mkctl start NAME' (kerf 0.4); 'exec NAME' "
              "still boots in this release", file=sys.stderr)
        op = "start"
    r = Client(a.run_dir).call(op, name=a.name, **extra)
    _emit(a, r, _one_line(r))
    return EXIT_OK


def cmd_kill(a: argparse.Namespace) -> int:
    r = Client(a.run_dir).call("kill", name=a.name, force=a.force, timeout=a.timeout)
    _emit(a, r, _one_line(r))
    return EXIT_OK


def cmd_show(a: argparse.Namespace) -> int:
    brief = not a.name and getattr(a, "format", "text") == "text"     # the table's fields
    r = Client(a.run_dir).call("show", name=a.name, **({"brief": True} if brief else {}))
    if a.name:
        counters = " ".join(f"{k}={v}" for k, v in r["counters"].items())
        text = f"{_one_line(r)}\n  counters: {counters}"
        if "pids_max" in r:
            root = printable(r["rootfs"], one_line=True) if r.get("rootfs") else "the host's"
            text += f"\n  userland: process limit {r['pids_max']}, root {root}"
            if r.get("userland"):
                text += f", init pid {r['userland']['pid']}"
        for p in r.get("programs") or []:           # its boot programs, this boot's
            argv = printable(shlex.join(p["argv"]), one_line=True)
            why = f" ({printable(p['reason'], one_line=True)})" if p.get("reason") else ""
            text += f"\n  program {p['index']} (boot {p['generation']}): {argv}: " \
                    f"{p['status']}{why}"
        if r.get("metrics"):                        # what its kernel published (metric())
            text += "\n  metrics: " + format_metrics(r["metrics"])
    else:
        text = render_show(r).rstrip()
    _emit(a, r, text)
    return EXIT_OK


def cmd_console(a: argparse.Namespace) -> int:
    """The log; ``-f`` follows it; ``-i`` (or ``-f`` at a terminal) types on it too
    (control/console.py)."""
    host = a.name in ("host", "0")
    if a.input and host:
        raise InvalidSpec("the host's console takes no input: it is the host's own log",
                          "mkctl console -i NAME types on an instance's console")
    client = Client(a.run_dir)
    shown = (lambda t: t) if a.raw else printable       # the kernel's bytes: escaped unless asked
    text = client.call("console", name=a.name)
    sys.stdout.write(shown(text))
    sys.stdout.flush()
    try:
        if a.input or (a.follow and not host and console.at_terminal()):
            console.Session(client.call, a.name, shown, text, a.interval,
                            tty=os.isatty(0)).run()
        elif a.follow:
            console.follow(client.call, a.name, shown, text, a.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_top(a: argparse.Namespace) -> int:
    from partition.control import top
    return top.main(a)


def cmd_shutdown(a: argparse.Namespace) -> int:
    r = stop_supervisor(a.run_dir)
    if r.get("stale_removed"):
        text = f"removed stale run directory {r['run_dir']} (its supervisor was already gone)"
    else:
        text = (f"machine in {r['run_dir']} shut down: {r['halted']} instance(s) halted, "
                f"run directory {'removed' if r['removed'] else 'NOT removed'}")
    _emit(a, r, text)
    return EXIT_OK if r.get("removed", True) else EXIT_REFUSED


def cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "ipi":
        from partition.bench import ipi
        return ipi.main(a)
    if a.what == "isolation":
        from partition.bench import isolation
        return isolation.main(a)
    if a.what == "recovery":
        from partition.bench import recovery
        return recovery.main(a)
    if a.what == "update":
        from partition.bench import update
        return update.main(a)
    if a.what == "userland":
        from partition.bench import userland
        return userland.main(a)
    if a.what == "scale":
        from partition.control import scale
        return scale.main(a)
    from partition.bench import boot
    return boot.main(a)


def cmd_run(a: argparse.Namespace) -> int:
    from partition.control.watch import Watcher
    from partition.scenario import command
    return command.main(a, watch=Watcher)


def cmd_demo(a: argparse.Namespace) -> int:
    from partition.control import demo
    return demo.main(a)
