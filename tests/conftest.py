import os
import resource
import subprocess
import sys
import uuid

import psutil
import pytest
from leaks import (
    LEDGER,
    cgroup_entries,
    explain_cgroup,
    explain_shm,
    leaks,
    mark_session,
    shm_entries,
)

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "kernels", "misbehaving.py")

mark_session()      # what the tests start is the session's, daemons included (leaks.py)

#: the fixtures that start real machines, daemons or kernels: a test that asks for one is a
#: ``system`` test without saying so (tests that start them in their body carry the mark
#: themselves, usually as their module's ``pytestmark``)
SYSTEM_FIXTURES = frozenset({"machine", "machine_factory", "run_scenario", "run_dir",
                             "misbehaving"})


#: xdist workers for the whole suite: most tests wait on processes, not on the CPU, so 4 keep a
#: 2-core machine busy without starving the timing tests (those marked ``alone`` run by
#: themselves); more only add contention. MK_TEST_WORKERS=N tries another count.
WORKERS = int(os.environ.get("MK_TEST_WORKERS", "4"))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): ``WORKERS`` for the suite, none where starting them
    costs more than they save: a run that leaves the system tests out (``-m "not system"``,
    a few seconds in one process) or one that names test files."""
    from _pytest.mark.expression import Expression

    markexpr = config.getoption("markexpr") or ""
    if markexpr and not Expression.compile(markexpr).evaluate(lambda name, **_: name == "system"):
        return 0
    named = [a.split("::")[0] for a in config.args]
    if named and all(os.path.isfile(a) for a in named):
        return 0
    return WORKERS


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
    # the tests that run alone first, one after the other (the other workers wait for them
    # once), then the slow ones (on xdist workers a 40 s test handed out last would run on by
    # itself while the others wait at the end), each in their order
    items.sort(key=lambda item: (not _alone(item), item.get_closest_marker("slow") is None))


def _reaped() -> tuple[float, ...]:
    """What this process's reaped children have used: it moves whenever a child the test
    started (a forked instance, a subprocess) ran and was waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime, ru.ru_stime, ru.ru_minflt, ru.ru_majflt, ru.ru_nvcsw, ru.ru_nivcsw)


def pytest_configure(config):
    """An xdist controller names its run itself, to remove the run's lock at the end."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        if getattr(config.option, "testrunuid", None) is None:
            config.option.testrunuid = uuid.uuid4().hex
        LEDGER.of_run(config.option.testrunuid)


def pytest_sessionfinish(session):
    LEDGER.close(controller=not hasattr(session.config, "workerinput"))


class UnmarkedSystemTest(AssertionError):
    """A test started a process but is not marked ``system``."""


_STARTED: dict[str, tuple[float, ...]] = {}


def _alone(item) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, a test marked ``alone`` runs while no other worker runs one (leaks.Ledger:
    a run-wide lock, shared by every other test; kept through a run of ``alone`` tests)."""
    LEDGER.enter(alone=_alone(item))
    try:
        yield
    finally:
        LEDGER.leave(keep=_alone(item) and _alone(nextitem))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    """Note what reaped children have used before any of the test's fixtures is set up (a
    module-scoped fixture that starts a machine is the first test's); tell the other xdist
    workers this one runs a test (leaks.Ledger)."""
    LEDGER.running()
    _STARTED[item.nodeid] = _reaped()
    yield


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Fail a test that started a process (a machine, a daemon, a fork, a subprocess) without
    the ``system`` mark, once its fixtures are torn down: ``-m "not system"`` is the quick
    loop, and a process that slipped into it would make it slow and its promise untrue."""
    yield
    before = _STARTED.pop(item.nodeid, None)
    if item.get_closest_marker("system") is None and before is not None:
        alive = psutil.Process().children(recursive=True)
        if alive or _reaped() != before:
            raise UnmarkedSystemTest(
                f"{item.nodeid} started processes but is not marked `system`: give it "
                "@pytest.mark.system (or its module a pytestmark), so that "
                "`pytest -m \"not system\"` stays free of real processes")


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must reap what it started and remove the shared-memory objects and the
    cgroups it made; what other machines on the host made meanwhile is theirs (leaks.py)."""
    before = shm_entries()
    cg_before = cgroup_entries()
    yield
    LEDGER.checking()
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        k.kill()
    new, cg_new = leaks(before, cg_before)
    assert not kids, f"test left child processes: {[k.pid for k in kids]}"
    assert not new, f"test left /dev/shm entries: {[explain_shm(e) for e in new]}"
    assert not cg_new, f"test left cgroups: {[explain_cgroup(e) for e in cg_new]}"

@pytest.fixture
def misbehaving() -> str:
    return MISBEHAVING

def mkctl_cmd() -> list[str]:
    return [sys.executable, "-m", "partition.control.cli"]

@pytest.fixture
def run_dir():
    """A run directory for a supervisor a test starts; whatever happened, nothing is left:
    the machine is shut down, or a stale directory removed."""
    path = f"/dev/shm/mkt-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.exists(path):
        subprocess.run(mkctl_cmd() + ["--run-dir", path, "shutdown"], capture_output=True,
                       timeout=60)
    assert not os.path.exists(path)
