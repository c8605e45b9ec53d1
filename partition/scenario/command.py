"""``mkctl run [FILE] [--report out.json] [--plot out.png]``: exit 0 when every expectation
holds, 1 when one fails, 2 when the file (or an option) is invalid, 130 on Ctrl-C. An invalid
scenario is refused before anything boots."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from partition.errors import MKError
from partition.scenario.report import Progress, report, summary, write_report
from partition.scenario.runner import Runner
from partition.scenario.schema import ScenarioInvalid, load
from partition.terminal import printable

EXIT_PASS, EXIT_FAIL, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT = os.path.join("scenarios", "quickstart.toml")


def default_scenario() -> str:
    """scenarios/quickstart.toml here, or in the checkout this package was installed from."""
    if os.path.isfile(DEFAULT):
        return DEFAULT
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, DEFAULT)


def _check_output(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"{what} {path}: directory {parent} does not exist or is not writable"
    return None


def shipped() -> list[tuple[str, str]]:
    """(name, one-line purpose) of each shipped scenario, from its own [scenario] description."""
    folder = os.path.dirname(default_scenario())
    out = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.endswith(".toml"):
            try:
                out.append((f[:-5], load(os.path.join(folder, f)).description))
            except ScenarioInvalid as exc:
                out.append((f[:-5], f"(invalid: {exc.problems[0] if exc.problems else exc})"))
    return out


def main(a: argparse.Namespace, watch: Callable[[Any], Any] | None = None) -> int:
    if getattr(a, "list", False):
        rows = shipped()
        width = max((len(n) for n, _ in rows), default=0)
        for name, purpose in rows:
            print(f"{name:<{width}}  {purpose}")
        return EXIT_PASS
    path = a.file or default_scenario()
    problems = [p for p in (_check_output(a.report, "--report"), _check_output(a.plot, "--plot"))
                if p]
    if a.plot and importlib.util.find_spec("matplotlib") is None:   # before the run, not after
        problems.append("--plot needs matplotlib: pip install -e '.[plot]'")
    if problems:
        for p in problems:
            print(f"mkctl run: error: {p}", file=sys.stderr)
        return EXIT_INVALID
    overrides = {k: v for k, v in (("duration", a.duration), ("seed", a.seed)) if v is not None}
    try:
        sc = load(path, overrides)
    except ScenarioInvalid as exc:
        given = ", ".join(f"--{k} {v}" for k, v in overrides.items())
        print(f"mkctl run: invalid scenario {exc}"
              + (f"\n  (checked with {given} from the command line)" if given else ""),
              file=sys.stderr)
        return EXIT_INVALID
    as_json = getattr(a, "format", "text") == "json"
    progress = None if a.quiet else Progress(sys.stderr)
    if not as_json:
        print(f"scenario {sc.name} ({os.path.relpath(sc.path)}): {sc.duration:g} s, "
              f"{len(sc.instances)} instance(s), {len(sc.probes)} probe(s), "
              f"{len(sc.faults)} fault(s), {len(sc.actions)} action(s)", flush=True)
    def watched(m: Any) -> Any:
        listening = watch(m) if watch is not None else None     # its socket, then the news
        if not as_json:
            print(f"watch it live: mkctl top --run-dir {m.run_dir}   (or show, console -f)",
                  file=sys.stderr, flush=True)
        return listening
    try:
        result = Runner(sc, progress, watch=watched if watch is not None else None).run()
    except ScenarioInvalid as exc:
        if progress:
            progress.done()
        print(printable(f"mkctl run: invalid scenario {exc}"), file=sys.stderr)
        return EXIT_INVALID
    except MKError as exc:
        if progress:
            progress.done()
        print(printable(f"mkctl run: error during the run: {exc}"), file=sys.stderr)
        return EXIT_FAIL
    if progress:
        progress.done()
    if a.report:
        write_report(result, a.report)
    if a.plot:
        from partition.scenario.plot import plot
        plot(result, a.plot)
    if as_json:
        print(json.dumps(report(result), indent=1, default=str))
    else:
        print(printable(summary(result)))      # errors and rejected reports quote kernels
        for what, p in (("report", a.report), ("plot", a.plot)):
            if p:
                print(f"{what}: {p}")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASS if result.passed else EXIT_FAIL
