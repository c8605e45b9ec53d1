#!/usr/bin/env python3
"""Verify the Promela models of the IPI ring's protocols (models/*.pml) with SPIN.

    python3 tools/verify_models.py            # every check; a table; exit 1 if one fails
    python3 tools/verify_models.py ring       # only the checks whose name starts with "ring"
    python3 tools/verify_models.py --list     # the checks, without running them
    python3 tools/verify_models.py --digest   # what the verdict depends on, as one hash

Each check is one model compiled with one set of -D switches (``spin -a``, then ``gcc`` to a
``pan`` verifier), searched exhaustively for assertion violations and invalid end states.
Three kinds, each with the verdict it must get:

- ``model``: the protocol as the code implements it, under the bounds and assumptions its file
  states: SPIN must find no error;
- ``mutant``: the same model with one safeguard of the code taken away (a barrier, the idle
  flag's order, a published check, ...): SPIN must refute it with a counterexample. A mutant
  that is not refuted means the model cannot see what that safeguard is for;
- ``finding``: the model with an assumption dropped that the code does not enforce; SPIN
  refutes it, and docs/protocols.md says what the counterexample means for the code. A finding
  that stops being refuted means the code or the model changed: docs/protocols.md is then
  out of date.

Why a script of its own and not a pytest plugin: CI runs it directly (.ci/run), and a person
changing the ring runs it without the test suite; tests/test_models.py runs it too, and is
skipped, saying why, where SPIN is not installed. Exit status: 0 all as expected, 1 a check
came out otherwise, 2 SPIN or a C compiler is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
#: the verifier's depth bound: far above the deepest model (about 620 steps); a search that
#: reaches it is incomplete, and counts as a failure
DEPTH = 20000
#: per check; the largest (the ring) takes about 2 s on a loaded 2-core machine
TIMEOUT_S = 120


@dataclass(frozen=True)
class Check:
    name: str
    model: str                  # file under models/
    defines: tuple[str, ...]    # -D switches for spin (the mutant's or the finding's)
    kind: str                   # "model", "mutant" or "finding"
    what: str                   # the property, or what the mutant takes away

    @property
    def expect_errors(self) -> bool:
        return self.kind != "model"


CHECKS = (
    Check("ring", "ring.pml", (), "model",
          "no loss, no duplicate, per-sender FIFO, full ring refused, no lost wake-up"),
    Check("ring/unhushed", "ring.pml", ("UNHUSHED",), "model",
          "the same, with the pure-Python drain (no hush)"),
    Check("ring/no-fence", "ring.pml", ("MUTANT_NO_FENCE",), "mutant",
          "no full barrier between publish and the flag reads"),
    Check("ring/idle-after-look", "ring.pml", ("MUTANT_IDLE_AFTER_LOOK",), "mutant",
          "idle flag set after the halt's look instead of before"),
    Check("ring/no-rearm", "ring.pml", ("MUTANT_NO_REARM",), "mutant",
          "the halt does not clear `signaled`"),
    Check("ring/publish-first", "ring.pml", ("MUTANT_PUBLISH_FIRST",), "mutant",
          "size stored before the payload"),
    Check("ring/full-off-by-one", "ring.pml", ("MUTANT_FULL_OFF_BY_ONE",), "mutant",
          "a full ring is not refused"),
    Check("ring/no-cas", "ring.pml", ("MUTANT_NO_CAS",), "mutant",
          "the claim without compare-and-swap"),
    Check("healing", "healing.pml", (), "model",
          "dead senders: sweep and reclaim drop or duplicate no published message"),
    Check("healing/reclaim-published", "healing.pml", ("MUTANT_RECLAIM_PUBLISHED",), "mutant",
          "a reclaim without the published check"),
    Check("healing/sweep-any-sender", "healing.pml", ("MUTANT_SWEEP_ANY_SENDER",), "mutant",
          "the host's sweep without the sender check"),
    Check("healing/sleeping", "healing.pml", ("SLEEPING",), "model",
          "a tickless receiver: the healing wakes it (no message left behind a dead claim)"),
    Check("healing/sweep-no-doorbell", "healing.pml", ("SLEEPING", "MUTANT_SWEEP_NO_DOORBELL"),
          "mutant", "the sweep rings nobody (the code before this model)"),
    Check("healing/no-stall-doorbell", "healing.pml", ("SLEEPING", "MUTANT_NO_STALL_DOORBELL"),
          "mutant", "nothing rings a receiver stalled on a dead claim (the code before)"),
    Check("healing/slow-claimer", "healing.pml", ("SLOW_CLAIMER",), "finding",
          "a claimer reclaimed by time writes on: another message lost"),
    Check("healing/sweep-race", "healing.pml", ("SWEEP_RACE",), "finding",
          "host sweep concurrent with a reclaim: another message lost"),
    Check("healing/garbage-reset", "healing.pml", ("GARBAGE",), "finding",
          "a send across a header reset: a later message lost"),
    Check("liveupdate", "liveupdate.pml", (), "model",
          "hand-over: each message once, in order, by the old or the new kernel"),
    Check("liveupdate/reset-on-handover", "liveupdate.pml", ("MUTANT_RESET_ON_HANDOVER",),
          "mutant", "the ring reset at the new boot"),
    Check("liveupdate/no-quiesce-wait", "liveupdate.pml", ("MUTANT_NO_QUIESCE_WAIT",),
          "mutant", "the new kernel boots before the old one exited"),
    Check("liveupdate/tickless", "liveupdate.pml", ("TICKLESS",), "model",
          "a tickless new kernel: no wake-up lost to the old kernel's doorbell"),
    Check("liveupdate/no-forward", "liveupdate.pml", ("TICKLESS", "MUTANT_NO_FORWARD"), "mutant",
          "the old doorbell closed at the hand-over (the code before this model)"),
)


@dataclass
class Result:
    check: Check
    errors: int
    states: int
    seconds: float
    detail: str                 # the failed assertion, or why the search is not valid

    @property
    def ok(self) -> bool:
        if self.errors < 0:
            return False
        return (self.errors > 0) == self.check.expect_errors


def inputs_digest() -> str:
    """A hash of what the verdict of a full run depends on in the tree: this script (its
    checks, switches and bounds) and every model. .ci/run exports it after a full run passed,
    so that tests/test_models.py does not search the same models again in the same job."""
    h = hashlib.sha256()
    for path in [os.path.abspath(__file__)] + sorted(
            os.path.join(MODELS, f) for f in os.listdir(MODELS) if f.endswith(".pml")):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def missing_tools() -> str | None:
    """What is missing to run the checks, said so that it can be installed; None: nothing."""
    for tool, how in (("spin", "apt-get install -y spin"), ("gcc", "apt-get install -y gcc")):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (install it: {how})"
    return None


def _run(argv: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)


def verify(check: Check) -> Result:
    """Compile and run one check in a directory of its own (pan writes its files in cwd)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pan-") as work:
        src = os.path.join(MODELS, check.model)
        spin = _run(["spin", *(f"-D{d}" for d in check.defines), "-a", src], work)
        if spin.returncode != 0:
            return Result(check, -1, 0, time.monotonic() - started,
                          f"spin -a failed: {(spin.stdout + spin.stderr).strip()[-300:]}")
        # SAFETY: assertions and end states (no cycle search: the models state their
        # liveness as quiescence assertions); no COLLAPSE: it stores the states in a third
        # less memory but costs the large searches a third more time (healing/sleeping: 3.1 s
        # and 290 MB with it, 2.0 s and 420 MB without; the suite runs these). Optimised only
        # for a full search: a mutant's counterexample comes within a few thousand states, and
        # -O2 would cost it a second of compiling (pan.c is 8,000 lines)
        opt = "-O0" if check.expect_errors else "-O2"
        gcc = _run(["gcc", opt, "-w", "-DSAFETY", "-o", "pan", "pan.c"], work)
        if gcc.returncode != 0:
            return Result(check, -1, 0, time.monotonic() - started,
                          f"gcc failed: {gcc.stderr.strip()[-300:]}")
        pan = _run(["./pan", f"-m{DEPTH}"], work)
        out = pan.stdout + pan.stderr
    seconds = time.monotonic() - started
    found = re.search(r"errors: (\d+)", out)
    states = re.search(r"(\d+) states, stored", out)
    if found is None or states is None:
        return Result(check, -1, 0, seconds, f"pan said nothing usable: {out.strip()[-300:]}")
    if "max search depth too small" in out:
        return Result(check, -1, int(states.group(1)), seconds,
                      f"search depth {DEPTH} reached: the search is not exhaustive")
    violated = re.search(r"pan:1: (.*?)(?: \(at depth \d+\))?$", out, re.MULTILINE)
    return Result(check, int(found.group(1)), int(states.group(1)), seconds,
                  violated.group(1) if violated else "")


def table(results: list[Result]) -> str:
    rows = [("check", "kind", "states", "time", "result", "property / counterexample")]
    for r in results:
        if r.errors < 0:
            verdict = "FAILED"
        elif r.check.expect_errors:
            verdict = "refuted" if r.errors else "NOT REFUTED"
        else:
            verdict = "holds" if not r.errors else "VIOLATED"
        note = r.check.what if not r.detail else f"{r.check.what}: {r.detail}"
        rows.append((r.check.name, r.check.kind, str(r.states), f"{r.seconds:.1f}s", verdict,
                     note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5]
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("only", nargs="*", help="run the checks whose name starts with one of these")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--digest", action="store_true",
                        help="print the hash of this script and the models, and exit")
    args = parser.parse_args(argv)
    if args.digest:
        print(inputs_digest())
        return 0
    checks = [c for c in CHECKS if not args.only or any(c.name.startswith(o) for o in args.only)]
    if not checks:
        print(f"no check is named {' or '.join(args.only)}: see --list", file=sys.stderr)
        return 2
    if args.list:
        for c in checks:
            flags = " ".join(f"-D{d}" for d in c.defines)
            print(f"{c.name:32} {c.kind:8} models/{c.model} {flags}")
        return 0
    missing = missing_tools()
    if missing is not None:
        print(f"cannot verify the models: {missing}", file=sys.stderr)
        return 2
    started = time.monotonic()
    # one check per CPU: each is a compiler, then one single-threaded search
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(verify, checks))
    print(table(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results)} checks in {time.monotonic() - started:.1f}s: "
          + ("all as expected" if not bad else f"{len(bad)} not as expected: "
             + ", ".join(r.check.name for r in bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
