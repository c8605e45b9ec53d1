"""Scenario files: every problem is found before anything boots, and named precisely."""

import os
import re
import subprocess
import sys

import pytest

from partition.scenario import schema
from partition.scenario.schema import ScenarioInvalid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = {"scenario": {"name": "t"},
           "instance": [{"name": "a", "kernel": "kernels.idle:IdleKernel"}]}


def problems(doc):
    with pytest.raises(ScenarioInvalid) as ei:
        schema.check(doc, "t.toml")
    assert ei.value.errno == 22
    return ei.value.problems


def with_(**tables):
    doc = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in MINIMAL.items()}
    doc.update(tables)
    return doc


def test_minimal_scenario_gets_every_default():
    sc = schema.check(MINIMAL)
    assert sc.duration == 5.0 and sc.seed == 0
    assert sc.machine == {"cpus": None, "memory": 256 << 20, "host_cpus": None,
                          "oversubscribe": False, "protection": True, "llc_way_mask": None}
    a = sc.instances[0]
    assert (a["memory"], a["cpu_count"], a["mode"], a["recovery"], a["start"]) == \
        (4 << 20, 1, "interrupt", "none", True)


@pytest.mark.parametrize("doc, says", [
    (with_(scenario={"name": "t", "duraton": "5s"}),
     "[scenario]: unknown key 'duraton' (did you mean 'duration'?)"),
    (with_(scenario={"name": "t", "duration": "five"}),
     "[scenario]: key 'duration' is 'five'; expected a duration like \"5s\""),
    (with_(scenario={"name": "t", "duration": 0}), "expected a duration > 0"),
    (with_(scenario={}), "[scenario]: key 'name' is required"),
    (with_(machine={"protection": "yes"}), "[machine]: key 'protection' is 'yes'; expected true or false"),
    (with_(machine={"memory": "lots"}), "[machine]: key 'memory' is 'lots'; expected a size"),
    (with_(instance=[{"name": "a", "kernel": "k", "cpu_count": 0}]),
     "[[instance]] 'a': key 'cpu_count' is 0; expected an integer in 1..4096"),
    (with_(instance=[{"name": "a", "kernel": "k", "mode": "fast"}]),
     "key 'mode' is 'fast'; expected one of 'interrupt', 'poll', 'hybrid'"),
    (with_(instance=[{"name": "1a", "kernel": "k"}]), "key 'name' is '1a'; expected a name"),
    (with_(instance=[{"name": "a"}]), "[[instance]] 'a': key 'kernel' is required"),
    (with_(probe=[{"name": "p", "to": "nobody"}]),
     "[[probe]] 'p' key 'to': 'nobody' is no instance of this scenario (instances: a, host)"),
    (with_(probe=[{"name": "p", "from": "a", "to": "a"}]), "from and to are both 'a'"),
    (with_(probe=[{"name": "p", "payload": 5000}]), "key 'payload' is 5000; expected an integer in 0..3900"),
    (with_(fault=[{"name": "f", "kind": "explode"}]), "key 'kind' is 'explode'; expected one of 'kill'"),
    (with_(fault=[{"name": "f", "at": "9s"}]), "at = 9s is not before the end of the run (5s)"),
    (with_(fault=[{"name": "f", "kind": "kill", "seconds": 2}]),
     "key 'seconds' is not used by a 'kill' fault (only by cpu-hog)"),
    (with_(fault=[{"name": "f", "kind": "wild-write"}]), "a wild-write needs 'victim'"),
    (with_(fault=[{"name": "f", "kind": "ipi-storm"}]), "an ipi-storm needs 'victim'"),
    (with_(action=[{"name": "x", "do": "reboot"}]), "key 'do' is 'reboot'; expected one of 'start'"),
    (with_(action=[{"name": "x", "do": "load"}]), "load needs args.kernel"),
    (with_(action=[{"name": "x", "do": "exec", "args": {"force": True}}]),
     "args key 'force' is not used by 'exec'"),
    (with_(action=[{"name": "x", "do": "kill", "args": {"timeout": "soon"}}]),
     "args.timeout is 'soon'; expected a number of seconds > 0"),
    (with_(action=[{"name": "x", "do": "load", "args": {"kernel": 3}}]), "args.kernel is 3"),
    (with_(fault=[{"name": "a"}]), "'a': the name is already used by an instance"),
    (with_(probe=[{"name": "host"}]), "'host' is instance 0"),
    (with_(expect="a.state == 'active'"), "expect: must be a list of strings"),
    (with_(expect=["a.restart == 1"]), "expect[0]: a.restart: an instance has no metric 'restart'"),
    (with_(expect=["b.state == 'active'"]), "expect[0]: b.state names nothing in this scenario"),
    (with_(expect=["a.state == "]), "expect[0]: expectation 'a.state == ' ends too early"),
    (with_(probe=[{"name": "p"}], expect=["p.baseline_p99_us < 100"]),
     "measured before the first fault, and this scenario has none"),
    (with_(experiment={}), "unknown table 'experiment'"),
    (with_(instance=[]), "[[instance]]: at least one instance is needed"),
])
def test_each_problem_is_named(doc, says):
    found = problems(doc)
    assert any(says in p for p in found), found


def test_all_problems_come_at_once():
    doc = with_(scenario={"name": "t", "duraton": 1},
                instance=[{"name": "a", "kernel": "k", "memroy": "4M"}],
                expect=["a.nope == 1"])
    assert len(problems(doc)) == 3


def test_expect_written_after_a_table_gets_a_toml_hint(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[scenario]\nname = "t"\n[[instance]]\nname = "a"\nkernel = "k"\n'
                 'expect = ["a.state == \'active\'"]\n')
    with pytest.raises(ScenarioInvalid) as ei:
        schema.load(str(f))
    assert "'expect' belongs at the top of the file" in ei.value.problems[0]


def test_unreadable_files(tmp_path):
    with pytest.raises(ScenarioInvalid) as ei:
        schema.load(str(tmp_path / "missing.toml"))
    assert "no such file" in ei.value.problems[0]
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname=1")
    with pytest.raises(ScenarioInvalid) as ei:
        schema.load(str(bad))
    assert "not valid TOML" in ei.value.problems[0]


def test_every_shipped_scenario_is_valid():
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "scenarios")) if f.endswith(".toml"))
    assert len(files) >= 10
    for f in files:
        if f == "crash-consistency.toml" and "programs" not in schema.INSTANCE_KEYS:
            continue            # its writer is a boot program (tests/test_crash_consistency.py)
        sc = schema.load(os.path.join(ROOT, "scenarios", f))
        assert sc.expect, f"{f} asserts nothing"


def test_docs_describe_every_key_and_metric():
    text = open(os.path.join(ROOT, "docs", "scenarios.md")).read()
    tables = {"[scenario]": schema.SCENARIO_KEYS, "[machine]": schema.MACHINE_KEYS,
              "[[instance]]": schema.INSTANCE_KEYS, "[[probe]]": schema.PROBE_KEYS,
              "[[fault]]": schema.FAULT_KEYS, "[[action]]": schema.ACTION_KEYS}
    for table, keys in tables.items():
        section = text.split(f"### `{table}`")[1].split("###")[0]
        for key in keys:
            assert re.search(rf"^\| `{key}` \|", section, re.M), f"{table} key {key} undocumented"
    for kind, metrics in schema.METRICS.items():
        for m in metrics:
            assert f"`{m}`" in text, f"{kind} metric {m} undocumented"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinite_times_are_refused(bad):
    said = problems(with_(scenario={"name": "t", "duration": bad}))
    assert any("key 'duration'" in p and "finite" in p for p in said)
    said = problems(with_(fault=[{"name": "f", "kind": "kill", "target": "a", "at": bad}]))
    assert any("key 'at'" in p for p in said)


MINIMAL_TOML = '[scenario]\nname = "t"\nduration = "1s"\n\n[[instance]]\nname = "a"\n' \
               'kernel = "kernels.idle:IdleKernel"\n'


@pytest.mark.parametrize("expect,says", [
    ("(" * 40 + "a.boots" + ")" * 40 + " == 1", "nests parentheses or 'not' more than 32 deep"),
    ("not " * 40 + "a.state == 'active'", "nests parentheses or 'not' more than 32 deep"),
    ("(" * 5000 + "a.boots" + ")" * 5000 + " == 1", "more than 400"),
    (" + ".join(["a.boots"] * 3000) + " == 1", "more than 400"),     # a left-deep tree
    ("a.boots == " + "9" * 5000, "has more than 30 digits"),
], ids=["40 parentheses", "40 nots", "5000 parentheses", "3000 sums", "5000 digits"])
def test_expectations_past_the_bounds_are_scenario_errors(expect, says):
    """A deep or huge expectation is named as such (exit 2 in mkctl run), not Python's
    RecursionError or int()'s ValueError."""
    said = problems(with_(expect=[expect]))
    assert any(says in p for p in said), said
    assert all(len(p) < 400 for p in said)            # the expectation is quoted, cut short


@pytest.mark.system
@pytest.mark.parametrize("text,says", [
    ("x = " + "[" * 50000 + "]" * 50000 + "\n", "nested deeper than the TOML reader follows"),
    ("seed = " + "9" * 5000 + "\n", "4300 digits"),
], ids=["50000-deep array", "5000-digit integer"])
def test_toml_past_the_readers_bounds_is_an_invalid_file(tmp_path, text, says):
    f = tmp_path / "s.toml"
    f.write_text(text + MINIMAL_TOML)
    with pytest.raises(ScenarioInvalid) as ei:
        schema.load(str(f))
    assert says in ei.value.problems[0]
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "run", str(f), "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr


@pytest.mark.system
def test_hints_speak_the_scenarios_words(tmp_path):
    """A unitless memory is taken for MiB in the hint; the machine's refusal on a 2-core box
    names the scenario key (oversubscribe = true), not mkctl's flag."""
    said = problems(with_(instance=[{"name": "a", "kernel": "k", "memory": 64}]))
    assert any("did you mean 64M?" in p for p in said), said
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: a pool that holds the host's")
    f = tmp_path / "s.toml"
    f.write_text(MINIMAL_TOML.replace('duration = "1s"\n', 'duration = "1s"\n\n[machine]\n'
                                      f'cpus = {cpus[:2]}\nhost_cpus = [{cpus[0]}]\n'))
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "run", str(f), "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "set oversubscribe = true in [machine]" in p.stderr, p.stderr
    assert "--oversubscribe" not in p.stderr and "--cpus" not in p.stderr
