"""``mkctl``: the kerf-like command line of the emulator.

Verbs and their legal states follow kerf (init, create, load, start, exec, kill, unload, delete, show,
console); ``shutdown``, ``bench`` and ``demo`` are the emulator's own. Every refusal prints what
is wrong and how to fix it on stderr and exits 1; a usage error exits 2. Nothing is changed by a
refused command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
from typing import Any

from partition.control.client import Client, start_supervisor, stop_supervisor
from partition.control.show import format_metrics, render_show
from partition.errors import MKError
from partition.host import rundir
from partition.terminal import printable
from partition.units import format_cpulist, format_size

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2



#: the largest integer the wire carries (msgpack's int64); an option past it is a usage error
#: here instead of an OverflowError in the client
INT64_MAX = (1 << 63) - 1


def integer(lo: int = -INT64_MAX - 1, hi: int = INT64_MAX, example: str = "1"
            ) -> Any:
    """argparse type: an integer in ``lo..hi``. ``int`` alone takes a thousand digits, which
    the wire cannot carry (OverflowError); the bounds are checked before anything is sent."""
    def parse(text: str) -> int:
        try:
            v = int(text, 10) if len(text) <= 40 else None
        except ValueError:
            v = None
        if v is None:
            raise argparse.ArgumentTypeError(f"{printable(text[:40], one_line=True)!r}"
                                             f"{'...' if len(text) > 40 else ''} is not an "
                                             f"integer in {lo}..{hi}: give e.g. {example}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range {lo}..{hi}: give e.g. "
                                             f"{example}")
        return v
    parse.__name__ = "integer"
    return parse


def address(text: str) -> int:
    """argparse type: an address, 0x... or decimal, that the wire can carry."""
    try:
        v = int(text, 0) if len(text) <= 40 else -1
    except ValueError:
        v = -1
    if not 0 <= v <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"{printable(text[:40], one_line=True)!r} is not an "
                                         f"address in 0..{INT64_MAX:#x}: give e.g. 0x100000")
    return v


def finite(text: str) -> float:
    """argparse type: a finite number (``float`` alone takes "nan" and "inf")."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give e.g. 5")
    return v

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
    extra = {} if a.llc_way_mask is None else {"llc_way_mask": a.llc_way_mask}
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
    r = Client(a.run_dir).call("load", name=a.name, kernel=_kernel_spec(a.kernel),
                               cmdline=a.cmdline, cwd=os.getcwd())
    _emit(a, r, _one_line(r))
    return EXIT_OK


def cmd_simple(a: argparse.Namespace) -> int:
    extra = {"wait": False} if getattr(a, "no_wait", False) else {}
    op = a.verb
    if a.verb == "exec":
        command = a.command[1:] if a.command[:1] == ["--"] else a.command
        if command:                   # kerf 0.4: exec NAME -- CMD runs a command inside it
            from partition.control.inside import run
            return run(a.run_dir, a.name, command)
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
        if r.get("metrics"):                        # what its kernel published (metric())
            text += "\n  metrics: " + format_metrics(r["metrics"])
    else:
        text = render_show(r).rstrip()
    _emit(a, r, text)
    return EXIT_OK


def new_console_text(shown: str, text: str) -> str:
    """What ``text`` (a console read now) has that ``shown`` (read before) had not: the tail
    past the old text, or past its last line once the console's ring has wrapped."""
    if text.startswith(shown):
        return text[len(shown):]
    last = shown.rstrip("\n").rpartition("\n")[2]
    if last:
        at = text.rfind(last + "\n")
        if at >= 0:
            return text[at + len(last) + 1:]
    return text


def cmd_console(a: argparse.Namespace) -> int:
    client = Client(a.run_dir)
    shown = (lambda t: t) if a.raw else printable       # the kernel's bytes: escaped unless asked
    text = client.call("console", name=a.name)
    sys.stdout.write(shown(text))
    sys.stdout.flush()
    if not a.follow:
        return EXIT_OK
    try:                     # follow, as tail -f: reads only (the console op drives nothing)
        while True:
            time.sleep(a.interval)
            try:
                now = client.call("console", name=a.name)
            except MKError as exc:
                print(printable(f"mkctl console: stopped following: {exc}"), file=sys.stderr)
                return EXIT_OK
            sys.stdout.write(shown(new_console_text(text, now)))
            sys.stdout.flush()
            text = now
    except KeyboardInterrupt:
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


class Parser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped verb or choice: ``mkctl satrt a`` is
    answered with the verb it was meant to be, not only the list of all of them."""

    def error(self, message: str) -> Any:       # NoReturn in argparse
        import re
        m = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)$", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            near = difflib.get_close_matches(m.group(1), choices, n=2, cutoff=0.6)
            if near:
                message += "; did you mean " + " or ".join(repr(n) for n in near) + "?"
        super().error(printable(message))


#: verbs whose trailing command follows ``--`` (mkctl exec NAME -- CMD, mkctl kerf -- ARGS)
TAKES_COMMAND = {"exec": "command", "kerf": "args"}


def _recovery_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--recovery", choices=("none", "restart", "standby"), default=d("none"),
                   help="what the host does when the instance fails (default none)")
    p.add_argument("--max-restarts", type=integer(0, 1000, "3"), default=d(3),
                   help="restart intensity: at most N ...")
    p.add_argument("--restart-window", type=finite, default=d(5.0), help="... in T seconds")
    p.add_argument("--watchdog", type=finite, default=d(0.0),
                   help="seconds without progress before the instance is declared hung (0: off)")
    p.add_argument("--preserve-memory", action=argparse.BooleanOptionalAction, default=d(False),
                   help="a restart keeps the partition (default: scrubbed before reuse)")


def _init_options(p: argparse.ArgumentParser) -> None:
    """What a pool is started with beyond CPUs and memory (init, and kerf init's pool)."""
    p.add_argument("--llc-way-mask", default=None,
                   help="the LLC ways the pool hands out, e.g. 0xffff (the baseline's "
                        "llc-way-mask; a baseline --input may carry it)")
    p.add_argument("--keyring", default=None,
                   help="X.509 certificate(s) (PEM/DER file or directory) that signed kernel "
                        "images are verified against")
    p.add_argument("--require-signed", action="store_true",
                   help="refuse unsigned or unverified images (KEXEC_SIG_FORCE): EKEYREJECTED")


def build_parser(command_after_dashes: bool = False) -> argparse.ArgumentParser:
    """``command_after_dashes``: the parser of what stands before ``--`` (see ``parse``): the
    verbs that take a command take it from after ``--`` only."""
    def options(default: bool, formats: tuple[str, ...] = ("text", "json")) -> Parser:
        # Sub-commands repeat the global options with SUPPRESS defaults, so that
        # "mkctl --run-dir X show" and "mkctl show --run-dir X" both work and neither
        # placement silently resets the other.
        p = Parser(add_help=False)
        p.add_argument("--run-dir", default=None if default else argparse.SUPPRESS,
                       help=f"machine run directory (default: ${rundir.ENV} or "
                            f"{rundir.default_run_dir()})")
        p.add_argument("--format", choices=formats,
                       default="text" if default else argparse.SUPPRESS,
                       help="output: " + ", ".join(formats) + (" (csv: bench ipi's mkbench "
                                                              "columns)" if "csv" in formats else ""))
        return p

    common = options(default=False)
    with_csv = options(default=False, formats=("text", "json", "csv"))
    ap = Parser(prog="mkctl", description="Multikernel partition emulator.",
                parents=[options(default=True, formats=("text", "json", "csv"))])
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)

    p = sub.add_parser("init", parents=[common], help="define the pool and start the supervisor")
    p.add_argument("--input", "-i", default=None,
                   help="a baseline device tree (.dtb, or .dts text): its CPUs and memory")
    p.add_argument("--no-survive-host", dest="survive_host", action="store_false",
                   help="instances die with the supervisor (default: they run on, and "
                        "mkctl adopt gives them a new host)")
    p.add_argument("--cpus", default=None, help="pool CPUs, e.g. 1-3 (default: all but the host's)")
    p.add_argument("--memory", default="1G", help="pool memory, e.g. 1G (default 1G)")
    p.add_argument("--host-cpus", default="0", help="CPUs kept by the host, instance 0 (default 0; 'none')")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow instances to share host cores (shown in every view)")
    p.add_argument("--console-size", type=integer(example="65536"), default=64 * 1024,
                   help="kmsg bytes per instance")
    p.add_argument("--no-protection", dest="protection", action="store_false",
                   help="map the whole arena into every instance (wild writes land)")
    p.add_argument("--kill-timeout", type=finite, default=30.0,
                   help="seconds a graceful kill waits before forcing (default 30)")
    _init_options(p)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("pack", help="a Python kernel as an ELF image, for kerf sign")
    p.add_argument("kernel", help="the kernel's .py file")
    p.add_argument("--output", "-o", required=True, help="the ELF image to write")
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("adopt", parents=[common],
                       help="a new host for the instances a dead supervisor left running")
    p.set_defaults(fn=cmd_adopt)

    p = sub.add_parser("create", parents=[common], help="reserve CPUs and memory (-> ready)")
    p.add_argument("name", nargs="?")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cpus", help="CPU list, e.g. 1 or 1-2")
    g.add_argument("--cpu-count", type=integer(1, 8192, "1"),
                   help="number of CPUs, picked from the free pool")
    g.add_argument("--input", "-i", default=None,
                   help="an instance's device tree (mkctl dump / kerf dump; .dtb or .dts)")
    p.add_argument("--memory", default=None, help="partition size, multiple of 4K, e.g. 64M")
    p.add_argument("--id", type=integer(example="1"), default=None,
                   help="instance id 1..511 (default: lowest free)")
    _recovery_options(p, defaults=True)
    p.add_argument("--standby-for", default=None,
                   help="make this instance the pre-booted standby of that one")
    p.add_argument("--llc-way-mask", default=None,
                   help="its own LLC ways, e.g. 0x0f: a subset of the pool's no other instance "
                        "holds (enforced through resctrl where the host has it)")
    p.set_defaults(fn=cmd_create)

    p = sub.add_parser("update", parents=[common],
                       help="change CPUs or memory (an overlay transaction), recovery or watchdog")
    p.add_argument("name")
    p.add_argument("--cpus", default=None, help="the CPUs it should hold, e.g. 1-2 (logical)")
    p.add_argument("--memory", default=None,
                   help="the memory it should hold, e.g. 64M: grows by a new region, shrinks by "
                        "whole regions, newest first")
    p.add_argument("--kernel", default=None,
                   help="live update: replace the running kernel with this image (KHO state "
                        "handed over; rolled back if it fails to boot)")
    p.add_argument("--cmdline", default=None, help="live update: the new kernel's command line")
    _recovery_options(p, defaults=False)
    p.set_defaults(fn=cmd_update)

    p = sub.add_parser("dump", parents=[common],
                       help="an instance's device tree as DTS text (no name: the root tree)")
    p.add_argument("name", nargs="?")
    p.add_argument("--output", "-o", default=None, help="write the DTB here instead")
    p.set_defaults(fn=cmd_dump)

    p = sub.add_parser("kerf", parents=[common],
                       help="run the real kerf against this machine: mkctl kerf -- ARGS")
    p.add_argument("--oversubscribe", action="store_true",
                   help="a pool kerf init defines may share the host's CPUs")
    _init_options(p)
    if not command_after_dashes:
        p.add_argument("args", nargs=argparse.REMAINDER, help="kerf's arguments, after --")
    p.set_defaults(fn=cmd_kerf)

    p = sub.add_parser("fault", parents=[common], help="inject a fault into an active instance")
    p.add_argument("name")
    p.add_argument("kind", help="kill, hang-stop, panic, hang-spin, wild-write, ipi-storm, "
                                "cpu-hog, mem-hog")
    p.add_argument("--address", type=address, help="wild-write: physical address")
    p.add_argument("--bytes", type=integer(example="4096"), help="wild-write / mem-hog: how many bytes")
    p.add_argument("--target", type=integer(example="2"), help="ipi-storm: instance id to flood")
    p.add_argument("--count", type=integer(example="1000"), help="ipi-storm: messages to send")
    p.add_argument("--seconds", type=finite, help="cpu-hog: how long")
    p.set_defaults(fn=cmd_fault)

    p = sub.add_parser("load", parents=[common], help="load a kernel image (ready -> loaded)")
    p.add_argument("name")
    p.add_argument("--kernel", required=True, help="module:Class or path/to/kernel.py[:Class]")
    p.add_argument("--cmdline", default="", help="kernel command line, e.g. 'interval=0.1'")
    p.set_defaults(fn=cmd_load)

    for verb, helptext in (("start", "boot the loaded image (loaded -> active)"),
                           ("exec", "NAME -- CMD: run CMD inside the running instance (NAME "
                                    "alone: the deprecated spelling of start)"),
                           ("unload", "drop the image (loaded -> ready)"),
                           ("delete", "free the partition (ready -> gone)")):
        p = sub.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("name")
        if verb in ("start", "exec"):
            p.add_argument("--no-wait", action="store_true",
                           help="return when the boot CPU answers, before the kernel's boot() "
                                "returns (the real system's answer)")
        if verb == "exec" and not command_after_dashes:
            p.add_argument("command", nargs=argparse.REMAINDER,
                           help="-- CMD [ARGS...]: the command to run inside the instance "
                                "(kerf 0.4); mkctl's options go before --")
        p.set_defaults(fn=cmd_simple)

    p = sub.add_parser("kill", parents=[common], help="halt an instance (active -> loaded)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--timeout", type=finite, default=None,
                   help="graceful wait before forcing (default: the machine's --kill-timeout)")
    p.set_defaults(fn=cmd_kill)

    p = sub.add_parser("show", parents=[common], help="the machine, or one instance")
    p.add_argument("name", nargs="?")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("console", parents=[common], help="an instance's kmsg ('host' for instance 0)")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines as they come (Ctrl-C stops)")
    p.add_argument("--interval", type=finite, default=0.2, help="-f: seconds between reads")
    p.add_argument("--raw", action="store_true",
                   help="the kernel's bytes as written, terminal control sequences included "
                        "(default: control characters shown escaped, e.g. \\x1b)")
    p.set_defaults(fn=cmd_console)

    p = sub.add_parser("top", parents=[common],
                       help="a live view: one row per instance (state, CPU, IPI rates, progress)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    p.add_argument("--interval", type=finite, default=1.0, help="seconds between frames")
    p.add_argument("--sort", default="id", choices=("id", "name", "state", "cpu%", "rx/s",
                                                   "tx/s", "progress", "restarts"),
                   help="the column rows are ordered by")
    p.set_defaults(fn=cmd_top)

    p = sub.add_parser("shutdown", parents=[common],
                       help="halt everything, stop the supervisor, remove arena and run directory")
    p.set_defaults(fn=cmd_shutdown)

    p = sub.add_parser("bench", parents=[with_csv], help="benchmarks against raw baselines")
    p.add_argument("what", choices=("boot", "ipi", "recovery", "isolation", "update", "scale"))
    p.add_argument("--sizes", default=None,
                   help="scale: machine sizes, increasing (default 16,64,256,511)")
    p.add_argument("--updates", type=int, default=50,
                   help="update: live updates to time under traffic (at least 50)")
    p.add_argument("--kills", type=int, default=50, help="recovery: kills to time (at least 50)")
    p.add_argument("--boots", type=int, default=100, help="boot: boots to time (at least 50)")
    p.add_argument("--round-trips", type=int, default=10_000,
                   help="ipi: round trips per pair and mode (at least 10000)")
    p.add_argument("--stream", type=int, default=100_000, help="ipi: one-way messages to stream")
    p.add_argument("--quick", action="store_true",
                   help="ipi: allow fewer round trips, one repeat: indicative figures, no "
                        "target judged (exit 0)")
    p.add_argument("--repeat", type=int, default=None,
                   help="ipi, isolation, scale: interleaved repeats, medians reported "
                        "(default 3; ipi: 1 with --quick)")
    p.add_argument("--cpu", type=integer(0, 8191, "1"), default=None,
                   help="CPU to boot on (default: last pool CPU)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("run", parents=[common],
                       help="run a scenario file: a verdict, a report, a plot (docs/scenarios.md)")
    p.add_argument("file", nargs="?", default=None,
                   help="scenario TOML (default: scenarios/quickstart.toml)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG of latency over time here "
                                                "(needs matplotlib: pip install -e '.[plot]')")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--duration", default=None,
                   help="override [scenario] duration, e.g. 30s (checked like the file's)")
    p.add_argument("--seed", type=int, default=None, help="override [scenario] seed")
    p.add_argument("--list", action="store_true",
                   help="list the shipped scenarios, each with its one-line purpose")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", parents=[common], help="the built-in default demonstration")
    p.set_defaults(fn=cmd_demo)
    return ap


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """mkctl's options are mkctl's wherever they stand before ``--``: ``mkctl exec web
    --run-dir X -- cmd`` targets X and runs ``cmd`` (argparse's REMAINDER alone would take
    ``--run-dir X`` into the command). What follows the first ``--`` is the command, as is."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut + 1:]
    ap = build_parser()
    bad = next((t for t in head if printable(t) != t), None)
    if bad is not None:                 # undecodable bytes (surrogates), or control characters
        ap.error(f"argument '{printable(bad, one_line=True)}' holds bytes that are not "
                 "text (not UTF-8, or control characters): names, sizes and CPU lists are "
                 "plain text; retype it")
    if cut < len(argv):
        split = build_parser(command_after_dashes=True)
        a = split.parse_args(head)
        field = TAKES_COMMAND.get(a.verb)
        if field is not None:
            setattr(a, field, tail)
            return split, a
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, a = parse(sys.argv[1:] if argv is None else list(argv))
    if a.format == "csv" and not (a.verb == "bench" and a.what == "ipi"):
        ap.error("--format csv is only for 'bench ipi' (mkbench columns)")
    try:
        return a.fn(a)
    except MKError as exc:
        if getattr(a, "format", "text") == "json":      # a script asked for JSON: it gets it
            print(json.dumps({"ok": False, "error": {**exc.to_wire(), "errno": exc.errno,
                                                     "code": exc.code}}, indent=2))
        # a refusal may quote the kernel (a boot() that raised, a resize it refused)
        print(printable(f"mkctl {a.verb}: error: {exc}"), file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"mkctl {a.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (mkctl ... | head): stop quietly, as a pipe tool does; whatever
        # ran has already been torn down by its own finally clauses
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13     # as if killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
