"""Running scenarios: the shipped ones pass here, verdicts map to exit codes, invalid files boot
nothing, Ctrl-C tears down, and the report and plot hold what they promise."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from leaks import cgroup_entries, leaks, shm_entries

# scenarios and benchmarks: pytest -m "not slow" skips them
pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "scenarios")) if f.endswith(".toml"))
MKCTL = [sys.executable, "-m", "partition.control.cli"]

SHORT = """
expect = [{expect}]

[scenario]
name = "short"
duration = "{duration}"

[machine]
oversubscribe = true

[[instance]]
name = "a"
kernel = "kernels.echo:EchoKernel"
recovery = "restart"

[[probe]]
name = "rtt"
to = "a"
rate = 200

[[fault]]
name = "k"
at = "0.3s"
target = "a"
kind = "kill"
"""


def arenas():
    """A snapshot of /dev/shm and the cgroups, for ``left_since``."""
    return shm_entries(), cgroup_entries()


def left_since(before):
    """What this process tree left since ``before`` (not what other machines made: leaks.py)."""
    return leaks(*before)


#: the shipped scenarios run by a test of their own, which asserts what every shipped one must
#: (``assert_shipped_passed``) and more on the same run: each runs once in the suite (the
#: crash-consistency experiment alone is 17 s)
OWN_TEST = {"quickstart": "test_quickstart_measures_what_it_claims below",
            "crash-consistency": "tests/test_crash_consistency.py"}


def assert_shipped_passed(r):
    """What every shipped scenario's run must show: a pass, with every expectation held."""
    failed = [f"{e.text}: {e.detail}" for e in r.expectations if not e.passed]
    why = {n: m["lost_why"] for n, m in r.metrics.items() if m.get("lost_why")}
    assert r.passed and not failed, (failed, "losses by reason:", why)
    assert r.machine["oversubscribe"] is True          # the mode is stated, not implied
    assert not r.bad_reports


def test_the_scenarios_left_to_their_own_tests_are_shipped():
    assert set(OWN_TEST) <= set(SHIPPED)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in OWN_TEST])
def test_shipped_scenario_passes(run_scenario, name):
    assert_shipped_passed(run_scenario(os.path.join(ROOT, "scenarios", name + ".toml")))


def test_quickstart_measures_what_it_claims(run_scenario):
    r = run_scenario(os.path.join(ROOT, "scenarios", "quickstart.toml"))
    assert_shipped_passed(r)
    rtt = r.metrics["rtt"]
    assert rtt["sent"] > 1000 and rtt["received"] == rtt["sent"] - rtt["lost"]
    assert sum(rtt["lost_why"].values()) == rtt["lost"]      # every loss has its reason
    assert set(rtt["lost_why"]) <= {"ESRCH", "ETIMEDOUT"}   # the server was down, or silent
    assert rtt["baseline_samples"] > 500
    assert 0 < rtt["p50_us"] <= rtt["p99_us"] <= rtt["max_us"]
    kinds = [e["event"] for e in r.timeline]
    for ev in ("fault_fired", "failure", "restart", "probe_started"):
        assert ev in kinds
    fault_t = next(e["t"] for e in r.timeline if e["event"] == "fault_fired")
    assert 1.4 < fault_t < 2.5                           # at = "1.5s", on a loaded machine
    assert r.records["rtt"].starts == 1


def pair(expect, a_extra="", probe_extra="", events=""):
    """A 2 s scenario: echo instances a and b, a probe a -> b at 100/s, and ``events``."""
    return f"""
expect = {expect}
[scenario]
name = "pair"
duration = "2s"
[machine]
oversubscribe = true
[[instance]]
name = "a"
kernel = "kernels.echo:EchoKernel"
{a_extra}
[[instance]]
name = "b"
kernel = "kernels.echo:EchoKernel"
[[probe]]
name = "rtt"
from = "a"
to = "b"
rate = 100
{probe_extra}
{events}
"""


def test_a_probe_source_that_restarts_gets_its_probe_back(run_scenario):
    r = run_scenario(pair('["k.recovered"]', a_extra='recovery = "restart"', events="""
[[fault]]
name = "k"
at = "0.5s"
target = "a"
kind = "kill"
"""))
    assert r.passed
    rec = r.records["rtt"]
    assert rec.starts == 2                               # once per incarnation of the source
    after = [t for t in rec.t if (t - r.t0_ns) / 1e9 > 0.6]
    assert len(after) > 50                               # it kept measuring after the restart


def test_pending_ping_to_a_halted_target_fails_fast(run_scenario):
    # the target is stopped (no answer), then killed; the probe's timeout is 30 s, the run 2 s:
    # the pending ping can only be counted lost if the halt ended it early
    r = run_scenario(pair('["rtt.lost >= 1"]', probe_extra='timeout = "30s"', events="""
[[fault]]
name = "stop"
at = "0.5s"
target = "b"
kind = "hang-stop"
[[action]]
name = "halt"
at = "1s"
do = "kill --force"
target = "b"
"""))
    assert r.passed, [e.detail for e in r.expectations]


def test_a_probe_does_not_block_the_kernel_it_runs_in(run_scenario):
    """The probe's target stops answering for 1.2 s (SIGSTOP, then a forced kill): a ping
    waited for in the source's own loop (its timeout 1 s) stalled that loop for the whole
    timeout; sent and matched asynchronously, the loop goes on ticking every 5 ms."""
    kernels = os.path.join(ROOT, "tests", "kernels")
    text = pair('["rtt.lost >= 1", "a.ticks > 50"]', events="""
[[fault]]
name = "stop"
at = "0.3s"
target = "b"
kind = "hang-stop"
[[action]]
name = "halt"
at = "1.5s"
do = "kill --force"
target = "b"
""").replace('name = "a"\nkernel = "kernels.echo:EchoKernel"',
             f'name = "a"\nkernel = "{kernels}/ticker.py:Ticker"\n'
             'metrics = ["ticks", "max_gap_ms"]')
    r = run_scenario(text)
    assert r.passed, [(e.text, e.detail) for e in r.expectations]
    assert r.metrics["rtt"]["received"] > 20            # it measured before the stop
    assert r.metrics["a"]["max_gap_ms"] < 400, r.metrics["a"]     # blocked: about 1000


def test_failing_expectation_exits_1_and_says_why(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="1.2s",
                              expect='"a.restarts == 1", "a.restarts == 5", "k.detect_ms < 0"'))
    p = subprocess.run(MKCTL + ["run", str(f), "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "PASS  a.restarts == 1" in p.stdout
    assert "FAIL  a.restarts == 5    [a.restarts=1]" in p.stdout
    assert "FAIL  k.detect_ms < 0" in p.stdout
    assert "scenario short: FAIL" in p.stdout


def test_invalid_scenario_exits_2_and_boots_nothing(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="1s", expect='"a.restart == 1"').replace(
        'rate = 200', 'rate = 200\nsped = 3'))
    before = arenas()
    p = subprocess.Popen(MKCTL + ["run", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    children = set()
    while p.poll() is None:                     # watch for any instance it might fork
        try:
            run = psutil.Process(p.pid)
            exe = run.exe()
            for c in run.children(recursive=True):
                try:
                    if c.exe() == exe:          # a fork of mkctl: an instance
                        children.add(c.pid)
                except psutil.Error:
                    pass
        except psutil.Error:
            break
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert not children
    assert "unknown key 'sped' (did you mean 'seed'?)" in err or "unknown key 'sped'" in err
    assert "a.restart: an instance has no metric 'restart'" in err
    assert str(f) in err                                 # the file is named
    assert left_since(before) == ([], [])


def test_scenario_that_does_not_fit_this_machine_is_invalid(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="1s", expect='"a.restarts == 1"').replace(
        '[[instance]]\nname = "a"', '[[instance]]\nname = "a"\ncpus = "0-4095"'))
    p = subprocess.run(MKCTL + ["run", str(f), "--quiet"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stderr
    assert "[[instance]] 'a'" in p.stderr


def test_report_and_plot(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="1.5s", expect='"a.restarts == 1", "k.recovered"'))
    rep, png = tmp_path / "r.json", tmp_path / "p.png"
    p = subprocess.run(MKCTL + ["run", str(f), "--report", str(rep), "--plot", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[  " in p.stderr and "faults" in p.stderr          # the progress line
    data = json.loads(rep.read_text())
    assert data["verdict"] == "pass"
    assert data["scenario"]["probes"][0]["rate"] == 200
    assert data["machine"]["oversubscribe"] is True and data["machine"]["pool_cpus"]
    assert data["metrics"]["rtt"]["sent"] > 0
    assert any(e["event"] == "restart" for e in data["timeline"])
    assert [e["passed"] for e in data["expectations"]] == [True, True]
    assert data["series"]["rtt"]["windows"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = tmp_path / "p.svg"
    p = subprocess.run(MKCTL + ["run", str(f), "--quiet", "--plot", str(svg)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and svg.read_text().lstrip().startswith("<?xml")
    text = svg.read_text()
    assert "F1" in text and "detected +" in text and "active again +" in text   # the key


def test_bad_output_path_is_refused_before_the_run(tmp_path):
    p = subprocess.run(MKCTL + ["run", os.path.join(ROOT, "scenarios", "quickstart.toml"),
                                "--report", "/nonexistent/dir/r.json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "/nonexistent/dir" in p.stderr


def test_ctrl_c_tears_down(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="30s", expect='"a.restarts == 1"'))
    before = arenas()
    p = subprocess.Popen(MKCTL + ["run", str(f)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    pids = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(pids) < 1:
        try:
            pids = {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    time.sleep(0.8)                                       # into the run, past the fault
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert "interrupted" in out
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert left_since(before) == ([], [])


def test_a_closed_pipe_ends_quietly(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="0.5s", expect='"a.state == \'active\'"').replace(
        'at = "0.3s"', 'at = "0.2s"'))
    p = subprocess.Popen(MKCTL + ["run", str(f), "--quiet"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()                        # the reader goes away (mkctl run ... | head -0)
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=60) == 141        # 128 + SIGPIPE, like any pipe tool
    assert "Traceback" not in err


@pytest.mark.alone      # times itself
def test_duration_and_seed_overrides_are_checked_like_the_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SHORT.format(duration="5s", expect='"a.restarts == 1"'))
    rep = tmp_path / "r.json"
    p = subprocess.run(MKCTL + ["run", str(f), "--duration", "1s", "--seed", "7", "--quiet",
                                "--report", str(rep)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(rep.read_text())
    assert data["scenario"]["duration_s"] == 1.0 and data["scenario"]["seed"] == 7
    assert data["elapsed_s"] < 3
    p = subprocess.run(MKCTL + ["run", str(f), "--duration", "0.2s", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2                       # the fault at 0.3 s no longer fits the run
    assert "is not before the end of the run (0.2s)" in p.stderr
    assert "checked with --duration 0.2s" in p.stderr


def test_no_kernel_code_runs_for_a_scenario_found_invalid(tmp_path):
    marker = tmp_path / "imported"
    kernel = tmp_path / "k.py"
    kernel.write_text(f"open({str(marker)!r}, 'w').close()\n"
                      "from partition import Kernel\nclass K(Kernel):\n    pass\n")
    f = tmp_path / "s.toml"
    f.write_text(f"""
[scenario]
name = "unfit"
duration = "1s"
[machine]
oversubscribe = true
[[instance]]
name = "a"
kernel = "{kernel}:K"
[[instance]]
name = "b"
kernel = "{kernel}:K"
memory = "1G"
""")
    p = subprocess.run(MKCTL + ["run", str(f), "--quiet"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "[[instance]] 'b'" in p.stderr, p.stderr
    assert not marker.exists()        # the kernel file was never imported


def test_a_kernel_that_fails_to_boot_is_a_failure(run_scenario):
    # its boot() panics after its CPU answered the mailbox: exec reports it, the host counts a
    # boot failure (it was counted as a crash only), and the verdict fails though every
    # expectation written holds (it used to pass, exit 0, the instance quietly loaded)
    misbehaving = os.path.join(os.path.dirname(__file__), "kernels", "misbehaving.py")
    text = pair('["a.failures == 1", "b.failures == 0"]').replace(
        'name = "a"\nkernel = "kernels.echo:EchoKernel"',
        f'name = "a"\nkernel = "{misbehaving}:PanicAtBoot"')
    r = run_scenario(text)
    assert r.metrics["a"]["failures"] == 1
    assert r.metrics["a"]["boot_failures"] == 1 and r.metrics["b"]["boot_failures"] == 0
    assert not r.passed and r.verdict == "fail"
    failed = [e for e in r.expectations if not e.passed]
    assert [e.text for e in failed] == ["a came up"], failed
    assert "test panic at boot" in failed[0].detail
    assert "expect_boot_failure = true" in failed[0].detail
    assert any(ev["event"] == "boot_failed" and ev["instance"] == "a" for ev in r.timeline)


def test_an_instance_refused_at_a_host_crash_fails_the_verdict(run_scenario, monkeypatch):
    """A new host can refuse one record alone (a damaged one: adoption.py); that instance is
    then gone from the machine. The verdict says so (it raised KeyError in _came_up, and
    the result's show of it NoSuchInstance), and the rest of the run is measured."""
    from partition.host import adoption
    from partition.host.machine import Machine
    abandon, victim = Machine.abandon, []

    def abandon_and_damage(self):
        cfg = abandon(self)
        state = adoption.read_state(self.run_dir)
        rec = next(r for r in state["instances"] if r["name"] == "client")
        victim.append(rec["pid"])
        rec["cpus"] = [4095]
        adoption.write_state(self.run_dir, state)
        return cfg
    monkeypatch.setattr(Machine, "abandon", abandon_and_damage)
    try:
        r = run_scenario(os.path.join(ROOT, "scenarios", "host-crash.toml"))
    finally:
        for pid in victim:             # killed through its cgroup; our child: reaped here
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    assert not r.passed
    failed = {e.text: e.detail for e in r.expectations if not e.passed}
    assert "not adopted by the new host: bad record" in failed.get("client came up", ""), failed
    assert r.metrics["client"]["state"] == "empty"
    assert r.metrics["server"]["state"] == "active"
    assert any(ev["event"] == "not_adopted" and ev["instance"] == "client" for ev in r.timeline)


def test_a_boot_failure_the_scenario_expects_passes_and_must_happen(run_scenario):
    misbehaving = os.path.join(os.path.dirname(__file__), "kernels", "misbehaving.py")
    expected = pair('["a.boot_failures == 1"]', a_extra="expect_boot_failure = true").replace(
        'name = "a"\nkernel = "kernels.echo:EchoKernel"',
        f'name = "a"\nkernel = "{misbehaving}:PanicAtBoot"')
    r = run_scenario(expected)
    assert r.passed, [(e.text, e.detail) for e in r.expectations]
    assert "a fails to boot (expect_boot_failure)" in [e.text for e in r.expectations]
    r = run_scenario(pair('[]', a_extra="expect_boot_failure = true"))   # it boots after all
    assert not r.passed
    assert [e.detail for e in r.expectations if not e.passed] == \
        ["it came up: expect_boot_failure = true says it should not"]


def test_a_cmdline_the_loader_refuses_makes_the_scenario_invalid(tmp_path):
    # mk_heap=bogus: refused at load, in the instance's loader, before anything boots
    f = tmp_path / "s.toml"
    f.write_text(pair('["b.failures == 0"]', a_extra='cmdline = "mk_heap=bogus"'))
    p = subprocess.run(MKCTL + ["run", str(f), "--quiet"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "cannot parse mk_heap size 'bogus'" in p.stderr, p.stderr


NAMED = """
expect = ["client.errors == 0", "client.answered > 20", "echo.state == 'active'"]

[scenario]
name = "named"
duration = "1s"

[machine]
oversubscribe = true

[[instance]]
name = "client"
kernel = "{kernels}/named.py:Asker"
cmdline = "peer=echo"
metrics = ["answered", "errors"]

[[instance]]
name = "echo"
kernel = "kernels.echo:EchoKernel"
id = 9
"""


def test_kernels_find_peers_by_name_and_publish_metrics(run_scenario, tmp_path):
    """The client finds "echo" by name though its id (9) is not the file-order one, publishes
    its own counts, and expect reads them; the report carries every console's tail."""
    path = tmp_path / "named.toml"
    path.write_text(NAMED.format(kernels=os.path.join(ROOT, "tests", "kernels")))
    r = run_scenario(str(path))
    assert r.passed, [(e.text, e.detail) for e in r.expectations]
    assert r.metrics["client"]["answered"] > 20 and r.metrics["client"]["errors"] == 0
    assert any("echo is instance 9" in line for line in r.consoles["client"])
    assert r.to_dict()["consoles"]["client"]


def test_an_undeclared_kernel_metric_is_refused(tmp_path):
    from partition.scenario.schema import ScenarioInvalid, load
    bad = NAMED.replace('metrics = ["answered", "errors"]', 'metrics = ["answered"]')
    path = tmp_path / "bad.toml"
    path.write_text(bad.format(kernels="k"))
    with pytest.raises(ScenarioInvalid) as ei:
        load(str(path))
    assert any("no metric 'errors'" in p for p in ei.value.problems)
    path.write_text(bad.replace('metrics = ["answered"]', 'metrics = ["state"]').format(kernels="k"))
    with pytest.raises(ScenarioInvalid) as ei:
        load(str(path))
    assert any("host's own metrics" in p for p in ei.value.problems)


def test_plot_bands_follow_the_timeline():
    """Each fault's band: fired, detected by the host, active again; an action has none."""
    from partition.scenario.plot import bands

    from types import SimpleNamespace
    result = SimpleNamespace(timeline=[
            {"t": 1.0, "event": "fault_fired", "name": "k", "target": "a", "what": "kill"},
            {"t": 1.001, "event": "failure", "name": "a"},
            {"t": 1.009, "event": "state_change", "name": "a", "new": "active"},
            {"t": 2.0, "event": "action_fired", "name": "u", "target": "a", "what": "update"},
            {"t": 3.0, "event": "fault_fired", "name": "h", "target": "a", "what": "hang-stop"},
    ])
    got = bands(result)
    assert [(b.tag, b.fired, b.detected, b.recovered) for b in got] == [
        ("F1", 1.0, 1.001, 1.009), ("A2", 2.0, None, None), ("F3", 3.0, None, None)]
    assert "detected +1.0 ms, active again +9.0 ms" in got[0].describe()
    assert "not recovered" in got[2].describe()
