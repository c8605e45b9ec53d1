"""The expectation language: what it computes, and everything it refuses."""

import pytest

from partition.scenario import expr as E

METRICS = {"db": {"restarts": 1, "state": "active", "intact": True, "none": None},
           "rtt": {"p99_us": 120.5, "base": 100.0}}


def value(text):
    return E.evaluate(E.parse(text), lambda r: METRICS[r.name][r.metric])


@pytest.mark.parametrize("text, expected", [
    ("db.restarts == 1", True),
    ("db.restarts != 1", False),
    ("db.state == 'active'", True),
    ('db.state == "loaded"', False),
    ("rtt.p99_us < 1.5 * rtt.base", True),
    ("rtt.p99_us < 1.2 * rtt.base", False),
    ("rtt.p99_us <= rtt.base + 20.5", True),
    ("1 + 2 * 3 == 7", True),                       # * binds tighter than +
    ("(1 + 2) * 3 == 9", True),
    ("db.intact", True),
    ("not db.intact", False),
    ("not db.intact or db.restarts >= 1", True),    # not binds tighter than or
    ("db.intact and db.restarts > 1", False),
    ("true and not false", True),
    ("1e3 == 1000", True),
    (".5 * 4 == 2", True),
    ("'a' < 'b'", True),
])
def test_values(text, expected):
    assert value(text) is expected


@pytest.mark.parametrize("text, says", [
    ("__import__('os').system('true')", "not a metric reference"),
    ("db.restarts()", "unexpected '('"),
    ("db.state.upper == 1", "unexpected"),
    ("db.restarts ==", "ends too early"),
    ("1 < 2 < 3", "chained comparison"),
    ("db.restarts - 1 == 0", "unexpected '-'"),
    ("db.restarts = 1", "unexpected '='"),
    ("(db.restarts == 1", "missing ')'"),
    ("db.restarts == 1 db.state", "unexpected"),
    ("", "empty"),
    ("restarts == 1", "not a metric reference"),
])
def test_refusals_name_the_problem(text, says):
    with pytest.raises(E.ExprError) as ei:
        E.parse(text)
    assert says in ei.value.message
    assert ei.value.errno == 22                       # EINVAL, like every invalid spec


@pytest.mark.parametrize("text, says", [
    ("db.none < 5", "db.none has no value"),
    ("db.state < 5", "cannot order 'active' and 5"),
    ("db.state + 1 == 2", "'+' needs numbers"),
    ("db.restarts and true", "db.restarts is 1, not true or false"),
])
def test_undecidable_expectations_fail_with_a_reason(text, says):
    with pytest.raises(E.EvalError) as ei:
        value(text)
    assert says in str(ei.value)


def test_refs_lists_every_metric_read():
    node = E.parse("a.x < 2 * b.y and not (c.z == 'q')")
    assert [str(r) for r in E.refs(node)] == ["a.x", "b.y", "c.z"]
