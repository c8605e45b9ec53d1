"""Scenario files: TOML in, a checked ``Scenario`` out, or every problem at once.

A scenario is input from a person (or a generator): each key is checked for spelling, type and
range before anything boots, and all problems are reported together, each with the file, the
table and key, what was found and what is expected. The tables of keys below are the single
source of truth: ``docs/scenarios.md`` documents them key by key, and a test checks that it
names every one.

Why over 400 lines: those tables are most of it, one entry per key of every table of the
format, and the cross-table checks (names, references, timings) need them all in one place.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from partition.errors import InvalidSpec, MKError
from partition.guest.probes import KINDS as PROBE_KINDS
from partition.guest.probes import MAX_PAYLOAD
from partition.host.faults import KINDS as FAULT_KINDS
from partition.host.llc import parse_mask
from partition.host.userrun import check_programs
from partition.host.userspec import PIDS_MAX_DEFAULT, check_pids_max
from partition.scenario import draws, runstep
from partition.scenario import expr as E
from partition.units import parse_cpulist, parse_size, require_page_aligned

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,30}$")
#: ``start`` boots (kerf 0.4's verb); ``exec`` is its older spelling, still read
ACTIONS = ("start", "exec", "kill", "kill --force", "load", "unload", "update", "host-crash", "run")
MODES = ("interrupt", "poll", "hybrid")
RECOVERY = ("none", "restart", "standby")


class ScenarioInvalid(InvalidSpec):
    """The file is not a valid scenario; ``problems`` lists each one (exit status 2)."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n"
                         + "\n".join(f"  - {p}" for p in problems),
                         "docs/scenarios.md lists every key with its type and default")


# -- value checkers: each returns the converted value or raises ValueError(what is expected) --
def duration(v: Any) -> float:
    """"5s", "250ms", "2m", "100us" or a number of seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration like \"5s\" or \"250ms\"")
    if isinstance(v, (int, float)):
        seconds = float(v)
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m)?\s*", v)
        if not m:
            raise ValueError("a duration like \"5s\" or \"250ms\"")
        seconds = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                                       None: 1.0}[m.group(2)]
    else:
        raise ValueError("a duration like \"5s\" or \"250ms\"")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a finite duration >= 0")
    if seconds > 86400:
        raise ValueError("a duration of at most 24h")
    return seconds


def _positive_duration(v: Any) -> float:
    s = duration(v)
    if s <= 0:
        raise ValueError("a duration > 0, like \"5s\"")
    return s


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _shared_table(v: Any) -> dict[str, Any]:
    """``[machine.shared]``: region name -> size (host/shared.py judges both)."""
    if not isinstance(v, dict) or not all(isinstance(s, (str, int)) and not isinstance(s, bool)
                                          for s in v.values()):
        raise ValueError('a table of region name = size, e.g. { db = "16M" }')
    return dict(v)


def _region_names(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise ValueError('a list of the machine\'s shared region names, e.g. ["db"]')
    return list(v)


def _programs(v: Any) -> list[list[str]]:
    try:
        return check_programs(v)
    except MKError as exc:
        raise ValueError(f'commands, each "cmd arg" or ["cmd", "arg"] ({exc.message})') from None


def _name(v: Any) -> str:
    if not isinstance(v, str) or not NAME.match(v):
        raise ValueError("a name of letters, digits and _ (not starting with a digit, "
                         "at most 31 characters)")
    return v


def _metric_names(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(n, str) and NAME.match(n) and len(n) < 24
                                          for n in v):
        raise ValueError('a list of metric names, e.g. ["errors", "served"] (letters, digits, '
                         "_; at most 23 characters)")
    clash = [n for n in v if n in METRICS["instance"] + METRICS["action"]]
    if clash:
        raise ValueError(f"names of the host's own metrics, {clash}: choose others")
    return list(v)


def resolve_kernel(spec: str, base: str) -> str:
    """A kernel given by path (``dir/k.py`` or ``k.py:Class``) is the scenario file's
    neighbour, not the current directory's: relative paths resolve from ``base`` (falling back
    to the current directory when the file is not there). ``module:Class`` stays as it is."""
    path, sep, cls = spec.partition(":")
    if not (path.endswith(".py") or "/" in path) or os.path.isabs(path):
        return spec
    beside = os.path.join(base, path)
    if os.path.exists(beside) or not os.path.exists(path):
        return os.path.normpath(beside) + sep + cls
    return spec


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"an integer in {lo}..{hi}")
        return v
    return check


def _number(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"a number in {lo:g}..{hi:g}")
        return float(v)
    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return v
    return check


def _size(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("a size like \"4M\" or a number of bytes")
    try:
        n = parse_size(v)
        require_page_aligned(n, typed=v)       # every size here is a partition's or a pool's
    except MKError as exc:
        raise ValueError(f"a size like \"4M\" ({exc.message}"
                         + (f"; {exc.hint}" if exc.hint else "") + ")") from None
    return n


def _cpus(v: Any) -> list[int]:
    if isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in v):
        v = ",".join(map(str, v))
    if not isinstance(v, str):
        raise ValueError("a CPU list like \"0-1\" or [0, 1]")
    try:
        return parse_cpulist(v)
    except MKError as exc:
        raise ValueError(f"a CPU list like \"0-1\" ({exc.message})") from None


def _mask(v: Any) -> int:
    try:
        return parse_mask(v)
    except MKError as exc:
        raise ValueError(f"an LLC way mask like \"0x0f\" ({exc.message})") from None


def _pids_max(v: Any) -> int:
    if isinstance(v, str):          # (TOML has integers: "64" is a mistake worth naming)
        raise ValueError(f"an integer like 256, not the text {v!r}")
    try:
        return check_pids_max(v)
    except MKError as exc:
        raise ValueError(f"a process limit like 256 ({exc.message})") from None


def _args(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("a table, e.g. { kernel = \"kernels.idle:IdleKernel\" }")
    return v


REQUIRED = object()
#: a key left out of the checked table when the file does not give it (a later addition that
#: changes nothing for scenarios without it)
ABSENT = object()


@dataclass(frozen=True)
class Key:
    check: Callable[[Any], Any]
    default: Any
    doc: str


SCENARIO_KEYS = {
    "name": Key(_str, REQUIRED, "what the run is called in reports"),
    "description": Key(_str, "", "one paragraph: what the experiment shows"),
    "duration": Key(_positive_duration, 5.0, "how long probes run, from the first boot"),
    "seed": Key(_int(0, 2**32 - 1), 0, "seeds probe payloads and random(..) times; in the report"),
}
MACHINE_KEYS = {
    "cpus": Key(_cpus, None, "pool CPUs; default: every CPU this process may use"),
    "memory": Key(_size, 256 << 20, "pool memory"),
    "host_cpus": Key(_cpus, None, "the host's CPUs; default: the first pool CPU"),
    "oversubscribe": Key(_bool, False, "let instances share cores with the host and each other"),
    "protection": Key(_bool, True, "map each instance's own partition only"),
    "llc_way_mask": Key(_mask, None, "the LLC ways instances may hold (the baseline's "
                                     "llc-way-mask); default: none"),
    "shared": Key(_shared_table, ABSENT, "shared regions, name = size: a tmpfs each that "
                                       "instances naming it mount at /mnt/shared/NAME"),
}
INSTANCE_KEYS = {
    "name": Key(_name, REQUIRED, "instance name (also the name in expectations)"),
    "kernel": Key(_str, REQUIRED, "module:Class or path/to/file.py[:Class]"),
    "cpus": Key(_cpus, None, "exact CPUs; default: cpu_count CPUs chosen by the pool"),
    "cpu_count": Key(_int(1, 4096), 1, "how many CPUs when cpus is not given"),
    "memory": Key(_size, 4 << 20, "partition size"),
    "cmdline": Key(_str, "", "the kernel command line (key=value words)"),
    "mode": Key(_choice(MODES), "interrupt", "IPI delivery (appended as mk_mode=)"),
    "recovery": Key(_choice(RECOVERY), "none", "what the host does when it fails"),
    "max_restarts": Key(_int(0, 1000), 3, "restart intensity: restarts allowed ..."),
    "restart_window": Key(_positive_duration, 5.0, "... within this window"),
    "watchdog": Key(lambda v: duration(v), 0.0, "hang detection period; 0: off"),
    "standby_for": Key(_name, None, "this instance is the standby of that one"),
    "preserve_memory": Key(_bool, False, "restart without scrubbing the partition"),
    "llc_way_mask": Key(_mask, None, "its own LLC ways: a subset of the machine's that no "
                                     "other instance holds; default: none"),
    "pids_max": Key(_pids_max, PIDS_MAX_DEFAULT, "its process limit: processes and threads of "
                    "its kernel and its programs, 1..4194304 (the pids cgroup)"),
    "start": Key(_bool, True, "boot at time 0; false: created and loaded, booted by an action"),
    "expect_boot_failure": Key(_bool, False, "its boot is the experiment's failure: the verdict "
                               "requires that it fails (else an instance that never came up "
                               "fails the verdict)"),
    "id": Key(_int(1, 511), None, "instance id; default: the lowest free, in file order "
                                  "(standbys last)"),
    "metrics": Key(_metric_names, [], "metrics its kernel publishes (self.metric), for expect"),
    "shared": Key(_region_names, ABSENT, "the machine's shared regions its programs mount"),
    "programs": Key(_programs, ABSENT, "commands its userland starts at every boot (shlex)"),
}
PROBE_KEYS = {
    "name": Key(_name, REQUIRED, "probe name (also the name in expectations)"),
    "from": Key(_name, "host", "source: an instance name, or host"),
    "to": Key(_name, None, "target: an instance name, or host; default: the first instance"),
    "kind": Key(_choice(PROBE_KINDS), "ping", "ping (round trips) or stream (one-way)"),
    "rate": Key(_number(0, 1e6), 1000.0, "messages per second; 0: as fast as possible"),
    "payload": Key(_int(0, MAX_PAYLOAD), 64, "payload bytes per message"),
    "timeout": Key(_positive_duration, 1.0, "a ping unanswered this long is lost"),
}
FAULT_KEYS = {
    "name": Key(_name, REQUIRED, "fault name (also the name in expectations)"),
    "at": Key(draws.timed(duration), 1.0, "when, from the start of the run; or random(LOW, HIGH)"),
    "target": Key(_name, None, "the instance hit; default: the first instance"),
    "kind": Key(_choice(FAULT_KINDS), "kill", "what happens (docs/faults.md)"),
    "victim": Key(_name, None, "wild-write / ipi-storm: the instance aimed at"),
    "offset": Key(_int(0, 2**40), 0, "wild-write: offset in the victim's partition"),
    "address": Key(_int(0, 2**48), None, "wild-write: physical address (instead of victim)"),
    "bytes": Key(_int(1, 1 << 40), None, "wild-write: bytes written (64); mem-hog: bytes "
                 "allocated (default of docs/faults.md)"),
    "count": Key(_int(1, 10**8), None, "ipi-storm: how many messages (100000)"),
    "seconds": Key(_positive_duration, None, "cpu-hog: how long (2s)"),
}
#: fault keys that carry options, and the kinds that use each
FAULT_OPTIONS = {"victim": ("wild-write", "ipi-storm"), "offset": ("wild-write",),
                 "address": ("wild-write",), "bytes": ("wild-write", "mem-hog"),
                 "count": ("ipi-storm",), "seconds": ("cpu-hog",)}
ACTION_KEYS = {
    "name": Key(_name, REQUIRED, "action name (also the name in expectations)"),
    "at": Key(draws.timed(duration), 1.0, "when, from the start of the run; or random(LOW, HIGH)"),
    "do": Key(_choice(ACTIONS), "start", "the verb, as mkctl spells it"),
    "target": Key(_name, None, "the instance; default: the first instance"),
    "args": Key(_args, {}, "load, update: kernel, cmdline; kill: timeout; run: program, timeout"),
    "metrics": Key(_metric_names, ABSENT, "run: figures its program prints, for expect"),
}
TOP_KEYS = ("scenario", "machine", "instance", "probe", "fault", "action", "expect")

# metrics each kind of named thing offers to expectations (documented in docs/scenarios.md)
METRICS = {
    "instance": ("state", "restarts", "failures", "crashes", "boot_failures", "boots",
                 "memory_intact", "foreign_pages", "served_by", "last_exit", "ipi_received",
                 "ipi_dropped",
                 "ipi_ring_full", "ipi_doorbells", "ipi_dropped_filtered"),
    "probe": ("p50_us", "p99_us", "max_us", "mean_us", "lost", "sent", "received",
              "msgs_per_s", "baseline_p50_us", "baseline_p99_us", "after_p99_us"),
    "fault": ("fired", "detected", "detect_ms", "recovered", "recover_ms", "failure_kind"),
    "action": ("done", "error", "duration_ms", "update_gap_ms", "rolled_back", "adopted",
               "adopt_ms", "exit_status"),
}


@dataclass
class Scenario:
    path: str
    name: str
    description: str
    duration: float
    seed: int
    machine: dict[str, Any]
    instances: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    faults: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    expect: list[tuple[str, E.Node]] = field(default_factory=list)

    def kind_of(self, name: str) -> str | None:
        for kind, items in (("instance", self.instances), ("probe", self.probes),
                            ("fault", self.faults), ("action", self.actions)):
            if any(i["name"] == name for i in items):
                return kind
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "description": self.description,
                "duration_s": self.duration, "seed": self.seed, "machine": self.machine,
                "instances": self.instances, "probes": self.probes, "faults": self.faults,
                "actions": self.actions, "expect": [text for text, _ in self.expect]}


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def table(self, where: str, raw: Any, keys: dict[str, Key]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: must be a table of keys, got {type(raw).__name__}")
            return {}
        out: dict[str, Any] = {}
        for k, v in raw.items():
            if k not in keys and k in TOP_KEYS:
                self.problems.append(f"{where}: {k!r} belongs at the top of the file: in TOML "
                                     f"a key after a [table] header is part of that table; "
                                     f"move {k} above the first [table]")
                continue
            if k not in keys:
                near = difflib.get_close_matches(k, keys, n=1)
                self.problems.append(f"{where}: unknown key {k!r}"
                                     + (f" (did you mean {near[0]!r}?)" if near else
                                        f" (known: {', '.join(keys)})"))
                continue
            try:
                out[k] = keys[k].check(v)
            except ValueError as exc:
                self.problems.append(f"{where}: key {k!r} is {v!r}; expected {exc}")
        for k, spec in keys.items():
            if k not in out and k not in raw:
                if spec.default is REQUIRED:
                    self.problems.append(f"{where}: key {k!r} is required ({spec.doc})")
                elif spec.default is not ABSENT:
                    out[k] = spec.default
        return out

    def array(self, doc: dict[str, Any], key: str, keys: dict[str, Key]) -> list[dict[str, Any]]:
        raw = doc.get(key, [])
        if not isinstance(raw, list):
            self.problems.append(f"[[{key}]]: write each {key} as a [[{key}]] table")
            return []
        out = []
        for i, item in enumerate(raw):
            label = item.get("name") if isinstance(item, dict) else None
            out.append(self.table(f"[[{key}]] {label!r}" if isinstance(label, str)
                                  else f"[[{key}]] #{i + 1}", item, keys))
        return out


def load(path: str, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read and check a scenario file; ScenarioInvalid lists every problem. ``overrides``
    replace ``[scenario]`` keys (duration, seed) *before* the check, so that every rule (a
    fault must come before the end, types, ranges) holds for the values actually used."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioInvalid(path, ["no such file (scenarios/ holds the shipped ones)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioInvalid(path, [f"not valid TOML: {exc}"]) from None
    except RecursionError:              # tomllib recurses once per nested array or table
        raise ScenarioInvalid(path, ["not valid here: arrays or inline tables nested deeper than "
                                     "the TOML reader follows (a scenario nests 3 deep at "
                                     "most)"]) from None
    except ValueError as exc:           # int()'s bound: an integer of more than 4300 digits
        raise ScenarioInvalid(path, [f"not valid here: {str(exc).partition(':')[0]} (no value "
                                     "in a scenario has that many digits)"]) from None
    except OSError as exc:
        raise ScenarioInvalid(path, [f"cannot read it: {exc.strerror}"]) from None
    if overrides:
        table = doc.get("scenario")
        if isinstance(table, dict):
            table.update(overrides)
    return check(doc, path)


def check(doc: dict[str, Any], path: str = "<scenario>") -> Scenario:
    c = _Checker(path)
    for k in doc:
        if k not in TOP_KEYS:
            near = difflib.get_close_matches(k, TOP_KEYS, n=1)
            c.problems.append(f"unknown table {k!r}" + (f" (did you mean {near[0]!r}?)" if near
                                                         else f" (known: {', '.join(TOP_KEYS)})"))
    if "scenario" not in doc:
        c.problems.append("[scenario] is required (at least: name)")
    sc = c.table("[scenario]", doc.get("scenario", {}), SCENARIO_KEYS)
    machine = c.table("[machine]", doc.get("machine", {}), MACHINE_KEYS)
    instances = c.array(doc, "instance", INSTANCE_KEYS)
    here = os.path.dirname(os.path.abspath(path))
    for i in instances:
        if isinstance(i.get("kernel"), str):
            i["kernel"] = resolve_kernel(i["kernel"], here)
    probes = c.array(doc, "probe", PROBE_KEYS)
    faults = c.array(doc, "fault", FAULT_KEYS)
    actions = c.array(doc, "action", ACTION_KEYS)
    for a in actions:
        args = a.get("args")
        if isinstance(args, dict) and isinstance(args.get("kernel"), str):
            a["args"] = {**args, "kernel": resolve_kernel(args["kernel"], here)}
    if not instances:
        c.problems.append("[[instance]]: at least one instance is needed")
    draws.resolve(c.problems, sc.get("seed", 0), [("fault", f) for f in faults]
                  + [("action", a) for a in actions], sc.get("duration", 5.0))
    _check_references(c, instances, probes, faults, actions, sc.get("duration", 5.0))
    c.problems += runstep.check_actions(actions)
    scenario = Scenario(path=os.path.abspath(path) if path != "<scenario>" else path,
                        name=sc.get("name", ""), description=sc.get("description", ""),
                        duration=sc.get("duration", 5.0), seed=sc.get("seed", 0),
                        machine=machine, instances=instances, probes=probes, faults=faults,
                        actions=actions)
    scenario.expect = _check_expectations(c, doc.get("expect", []), scenario)
    if c.problems:
        raise ScenarioInvalid(path, c.problems)
    return scenario


def _check_references(c: _Checker, instances: list[dict[str, Any]], probes: list[dict[str, Any]],
                      faults: list[dict[str, Any]], actions: list[dict[str, Any]],
                      duration_s: float) -> None:
    names: dict[str, str] = {}
    for kind, items in (("instance", instances), ("probe", probes), ("fault", faults),
                        ("action", actions)):
        for item in items:
            n = item.get("name")
            if n is None:
                continue
            if n == "host":
                c.problems.append(f"[[{kind}]] {n!r}: 'host' is instance 0, choose another name")
            elif n in names:
                c.problems.append(f"[[{kind}]] {n!r}: the name is already used by an "
                                  f"{names[n]} (names are shared by every table)")
            names[n] = kind
    inst = {i["name"] for i in instances if "name" in i}
    first = instances[0].get("name") if instances else None

    def need(where: str, value: str | None, host_ok: bool) -> None:
        if value is None or (host_ok and value == "host") or value in inst:
            return
        c.problems.append(f"{where}: {value!r} is no instance of this scenario (instances: "
                          f"{', '.join(sorted(inst)) or 'none'}{', host' if host_ok else ''})")

    for i in instances:
        if i.get("standby_for") is not None:
            need(f"[[instance]] {i.get('name')!r} key 'standby_for'", i["standby_for"], False)
            if i["standby_for"] == i.get("name"):
                c.problems.append(f"[[instance]] {i.get('name')!r}: cannot be its own standby")
        if "cpus" in i and i.get("cpus") is not None and i.get("cpu_count", 1) != 1 \
                and len(i["cpus"]) != i["cpu_count"]:
            c.problems.append(f"[[instance]] {i.get('name')!r}: give cpus or cpu_count, not "
                              "both with different counts")
    for p in probes:
        p.setdefault("to", None)
        if p.get("to") is None:
            p["to"] = first
        need(f"[[probe]] {p.get('name')!r} key 'from'", p.get("from"), True)
        need(f"[[probe]] {p.get('name')!r} key 'to'", p.get("to"), True)
        if p.get("from") == p.get("to") and p.get("from") is not None:
            c.problems.append(f"[[probe]] {p.get('name')!r}: from and to are both "
                              f"{p['from']!r}; a probe measures between two endpoints")
    for kind, items in (("fault", faults), ("action", actions)):
        for f in items:
            if f.get("target") is None:
                f["target"] = first
            need(f"[[{kind}]] {f.get('name')!r} key 'target'", f.get("target"), False)
            if f.get("at", 0) >= duration_s:
                c.problems.append(f"[[{kind}]] {f.get('name')!r}: at = {f['at']:g}s is not "
                                  f"before the end of the run ({duration_s:g}s)")
    for f in faults:
        where = f"[[fault]] {f.get('name')!r}"
        for k, kinds in FAULT_OPTIONS.items():
            if f.get(k) not in (None, 0) and f.get("kind") is not None \
                    and f.get("kind") not in kinds:
                c.problems.append(f"{where}: key {k!r} is not used by a {f.get('kind')!r} fault "
                                  f"(only by {', '.join(kinds)})")
        if f.get("victim") is not None:
            need(f"{where} key 'victim'", f["victim"], False)
        if f.get("kind") == "wild-write" and f.get("victim") is None and f.get("address") is None:
            c.problems.append(f"{where}: a wild-write needs 'victim' (plus 'offset') or "
                              "'address'")
        if f.get("kind") == "ipi-storm" and f.get("victim") is None:
            c.problems.append(f"{where}: an ipi-storm needs 'victim' (the instance it floods)")
    for a in actions:
        args = a.get("args", {})
        allowed = {"load": {"kernel", "cmdline"}, "update": {"kernel", "cmdline"},
                   "kill": {"timeout"}, "run": {"program", "timeout"}}.get(a.get("do", ""), set())
        for k in args:
            if k not in allowed:
                c.problems.append(f"[[action]] {a.get('name')!r}: args key {k!r} is not used by "
                                  f"{a.get('do')!r} (it takes: {', '.join(sorted(allowed)) or 'none'})")
        if a.get("do") in ("load", "update") and "kernel" not in args:
            c.problems.append(f"[[action]] {a.get('name')!r}: {a.get('do')} needs args.kernel")
        for k, want, ok in (("kernel", "a string like \"kernels.idle:IdleKernel\"",
                             lambda v: isinstance(v, str) and v.strip()),
                            ("cmdline", "a string", lambda v: isinstance(v, str)),
                            ("timeout", "a number of seconds > 0", lambda v: not isinstance(
                                v, bool) and isinstance(v, (int, float)) and v > 0)):
            if k in args and k in allowed and not ok(args[k]):
                c.problems.append(f"[[action]] {a.get('name')!r}: args.{k} is {args[k]!r}; "
                                  f"expected {want}")


def _check_expectations(c: _Checker, raw: Any, sc: Scenario) -> list[tuple[str, E.Node]]:
    if not isinstance(raw, list):
        c.problems.append("expect: must be a list of strings, e.g. expect = [\"db.restarts == 1\"]")
        return []
    out = []
    for i, text in enumerate(raw):
        where = f"expect[{i}]"
        try:
            node = E.parse(text)
        except E.ExprError as exc:
            c.problems.append(f"{where}: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
            continue
        ok = True
        for ref in E.refs(node):
            kind = sc.kind_of(ref.name)
            if kind is None:
                c.problems.append(f"{where}: {ref} names nothing in this scenario (names: "
                                  f"{', '.join(_all_names(sc)) or 'none'})")
                ok = False
            elif ref.metric not in METRICS[kind] and ref.metric not in next(
                    (i.get("metrics", []) for i in sc.instances + sc.actions
                     if i["name"] == ref.name), []):
                c.problems.append(f"{where}: {ref}: an {kind} has no metric {ref.metric!r} "
                                  f"(it has: {', '.join(METRICS[kind])})")
                ok = False
            elif ref.metric.startswith("baseline_") and not sc.faults:
                c.problems.append(f"{where}: {ref} is measured before the first fault, and "
                                  "this scenario has none")
                ok = False
        if ok:
            out.append((text, node))
    return out


def _all_names(sc: Scenario) -> list[str]:
    return [i["name"] for group in (sc.instances, sc.probes, sc.faults, sc.actions)
            for i in group if "name" in i]
