"""Seeded random times (scenario/draws.py) and the run action's own checks and figures
(scenario/runstep.py), as the scenario checker sees them: no machine."""

import pytest

from partition.scenario import draws, runstep, schema
from partition.scenario.schema import ScenarioInvalid

BASE = """
expect = ["a.state == 'active'"]
[scenario]
name = "t"
duration = "10s"
{seed}
[[instance]]
name = "a"
kernel = "kernels.idle:IdleKernel"
"""


def load(tmp_path, extra, seed="seed = 5", overrides=None):
    path = tmp_path / "t.toml"
    path.write_text(BASE.format(seed=seed) + extra)
    return schema.load(str(path), overrides)


def fault(name, at):
    return f'[[fault]]\nname = "{name}"\nkind = "panic"\nat = "{at}"\n'


def test_a_random_time_is_drawn_from_the_seed_within_its_range(tmp_path):
    sc = load(tmp_path, fault("p1", "random(2s, 6s)") + fault("p2", "random(250ms, 1s)")
              + fault("p3", "1.5s"))
    p1, p2, p3 = sc.faults
    assert 2 <= p1["at"] <= 6 and p1["at_random"] == [2.0, 6.0]
    assert 0.25 <= p2["at"] <= 1 and p2["at_random"] == [0.25, 1.0]
    assert p3["at"] == 1.5 and "at_random" not in p3
    assert p1["at"] == draws.draw(5, "p1", 2.0, 6.0) == round(p1["at"], 3)
    assert sc.to_dict()["faults"][0]["at_random"] == [2.0, 6.0]         # in the report


def test_draws_repeat_and_depend_on_the_seed_and_the_name_only(tmp_path):
    one = load(tmp_path, fault("p1", "random(1s, 9s)")).faults[0]["at"]
    again = load(tmp_path, fault("p1", "random(1s, 9s)")).faults[0]["at"]
    others = load(tmp_path, fault("p0", "random(1s, 9s)") + fault("p1", "random(1s, 9s)"))
    assert one == again == others.faults[1]["at"]       # another item changes nothing
    assert one == 8.74                                   # the same on every machine
    seeds = {load(tmp_path, fault("p1", "random(1s, 9s)"), f"seed = {s}").faults[0]["at"]
             for s in range(8)}
    assert len(seeds) == 8
    over = load(tmp_path, fault("p1", "random(1s, 9s)"), overrides={"seed": 6})
    assert over.seed == 6 and over.faults[0]["at"] == draws.draw(6, "p1", 1.0, 9.0)


def test_actions_draw_too(tmp_path):
    sc = load(tmp_path, '[[action]]\nname = "k"\ndo = "kill"\nat = "random(1s, 2s)"\n')
    assert 1 <= sc.actions[0]["at"] <= 2 and sc.actions[0]["at_random"] == [1.0, 2.0]


@pytest.mark.parametrize("at, why", [
    ("random(2s)", "random(LOW, HIGH)"),
    ("random(3s, 2s)", "LOW < HIGH"),
    ("random(2s, 2s)", "LOW < HIGH"),
    ("random(2s, soon)", "two durations"),
    ("random(-1s, 2s)", "two durations"),
    ("randomly", "random(LOW, HIGH)"),
    ("random(1s, 10s)", "reaches past the end of the run"),
    ("random(1s, 11s)", "reaches past the end of the run"),
])
def test_bad_random_times_are_refused(tmp_path, at, why):
    with pytest.raises(ScenarioInvalid) as ei:
        load(tmp_path, fault("p", at))
    assert any(why in p for p in ei.value.problems), ei.value.problems


RUN = '[[action]]\nname = "c"\ndo = "run"\nat = "1s"\n'


def test_a_run_action_is_checked(tmp_path):
    sc = load(tmp_path, RUN + 'metrics = ["records", "bad_words"]\n'
              'args = { program = "python3 -m m check /f", timeout = 5 }\n')
    assert sc.actions[0]["metrics"] == ["records", "bad_words"]
    for extra, why in [
        ("", "run needs args.program"),
        ('args = { program = "" }\n', "expected a command line"),
        ("args = { program = \"a 'b\" }\n", "expected a command line"),
        ("args = { program = [1] }\n", "expected a command line"),
        ('args = { program = "x", kernel = "k" }\n', "args key 'kernel' is not used by 'run'"),
        ('args = { program = "x", timeout = 0 }\n', "args.timeout is 0"),
        ('metrics = ["done"]\nargs = { program = "x" }\n', "names of the host's own metrics"),
    ]:
        with pytest.raises(ScenarioInvalid) as ei:
            load(tmp_path, RUN + extra)
        assert any(why in p for p in ei.value.problems), (extra, ei.value.problems)
    with pytest.raises(ScenarioInvalid) as ei:
        load(tmp_path, '[[action]]\nname = "k"\ndo = "kill"\nmetrics = ["x"]\n')
    assert "a 'kill' action has none" in ei.value.problems[0]


def test_expect_reads_a_run_actions_declared_figures_only(tmp_path):
    text = RUN + 'metrics = ["records"]\nargs = { program = "x" }\n'
    path = tmp_path / "e.toml"
    path.write_text('expect = ["c.records > 0 and c.exit_status == 0"]\n'
                    + BASE.format(seed="").split("\n", 2)[2] + text)
    assert len(schema.load(str(path)).expect) == 1
    path.write_text('expect = ["c.torn_pages == 0"]\n' + BASE.format(seed="").split("\n", 2)[2]
                    + text)
    with pytest.raises(ScenarioInvalid, match="an action has no metric 'torn_pages'"):
        schema.load(str(path))


def test_a_programs_figures_are_numbers_or_booleans_it_declared():
    line = '{"records": 5, "bad": 0.5, "ok": true, "s": "x", "inf": 1e999, "extra": 1}'
    assert runstep._figures(line, ["records", "bad", "ok", "s", "inf", "missing"]) == {
        "records": 5, "bad": 0.5, "ok": True, "s": None, "inf": None, "missing": None}
    assert runstep._figures("not json", ["records"]) == {"records": None}
    assert runstep._figures("[1, 2]", ["records"]) == {"records": None}
    assert runstep.argv_of("python3 -m x 'a b'") == ["python3", "-m", "x", "a b"]
    assert runstep.argv_of(["a", "b c"]) == ["a", "b c"]
    for bad in ("", "   ", "a 'b", [], ["a", 1], ["a\0"], 5):
        assert runstep.argv_of(bad) is None, bad
