"""``mkctl``'s grammar: every verb, its options and their types, and the split at ``--`` that keeps
mkctl's options apart from a command run inside an instance.

Separate from the verbs (cliverbs.py): the argparse types here refuse what the wire cannot carry
before anything is sent, and the "did you mean" parser answers a typo; neither needs to know
what a verb does.
"""

from __future__ import annotations

import argparse
import difflib
import math
from typing import Any

from partition.control.cliverbs import (
    cmd_adopt,
    cmd_bench,
    cmd_console,
    cmd_create,
    cmd_demo,
    cmd_dump,
    cmd_fault,
    cmd_init,
    cmd_kerf,
    cmd_kill,
    cmd_load,
    cmd_pack,
    cmd_run,
    cmd_show,
    cmd_shutdown,
    cmd_simple,
    cmd_top,
    cmd_update,
)
from partition.host import rundir
from partition.terminal import printable

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
    p.add_argument("--shared", action="append", default=None, metavar="NAME:SIZE",
                   help="a shared region of the machine, e.g. db:16M (repeatable): a tmpfs "
                        "the instances naming it mount at /mnt/shared/NAME (docs/userland.md)")
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
    p.add_argument("--shared", action="append", default=None, metavar="NAME",
                   help="a shared region of the machine its programs see at /mnt/shared/NAME "
                        "(repeatable)")
    p.add_argument("--pids-max", default=None, metavar="N",
                   help="its process limit: processes and threads of the kernel and every "
                        "program inside, 1..4194304 (default 64; the pids cgroup)")
    p.add_argument("--rootfs", default=None, metavar="DIR",
                   help="the root of its userland (mkctl exec), e.g. an unpacked container "
                        "image (default: the host's root, read-only)")
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
    p.add_argument("--program", action="append", default=None, metavar="'CMD ARGS'",
                   help="a command its userland starts at every boot (split as a shell would, "
                        "without one); repeatable")
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
        if verb == "exec":
            p.add_argument("-i", "--interactive", action="store_true",
                           help="-- CMD: relay mkctl's stdin to it (as plain exec does; with "
                                "-t, through its terminal)")
            p.add_argument("-t", "--tty", action="store_true",
                           help="-- CMD: give it a terminal (a pty, its controlling terminal "
                                "inside: job control, Ctrl-C to it, window size); needs one "
                                "on mkctl's stdin. A shell: mkctl exec -it NAME -- sh")
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

    p = sub.add_parser("console", parents=[common],
                       help="an instance's kmsg ('host' for instance 0); -i to type on it")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines as they come (Ctrl-C stops); at a terminal, "
                        "lines typed are sent too, as with -i")
    p.add_argument("--input", "-i", action="store_true",
                   help="two-way: send each line of stdin to the instance (its kernel's "
                        "on_console_input, its userland's /dev/console) while following; "
                        "end of input (Ctrl-D) ends it after a short drain")
    p.add_argument("--interval", type=finite, default=0.2, help="-f/-i: seconds between reads")
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
    p.add_argument("what", choices=("boot", "ipi", "recovery", "isolation", "update", "scale",
                                    "userland"))
    p.add_argument("--sizes", default=None,
                   help="scale: machine sizes, increasing (default 16,64,256,511)")
    p.add_argument("--updates", type=int, default=50,
                   help="update: live updates to time under traffic (at least 50)")
    p.add_argument("--kills", type=int, default=50, help="recovery: kills to time (at least 50)")
    p.add_argument("--boots", type=int, default=100, help="boot: boots to time (at least 50)")
    p.add_argument("--round-trips", type=int, default=10_000,
                   help="ipi: round trips per pair and mode (at least 10000)")
    p.add_argument("--stream", type=int, default=100_000, help="ipi: one-way messages to stream")
    p.add_argument("--loops", type=int, default=300,
                   help="userland: fork+exec per run (at least 100)")
    p.add_argument("--write-mib", type=int, default=32,
                   help="userland: MiB written per run, by write and by mmap (1..32)")
    p.add_argument("--quick", action="store_true",
                   help="ipi, userland: allow fewer round trips or loops, one repeat: "
                        "indicative figures, no target judged (exit 0)")
    p.add_argument("--repeat", type=int, default=None,
                   help="ipi, isolation, scale, userland: interleaved repeats, medians "
                        "reported (default 3; userland 5; ipi, userland: 1 with --quick)")
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
