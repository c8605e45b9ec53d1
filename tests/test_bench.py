"""The boot benchmark's shape (not its speed: timing targets live in the benchmark itself)."""

import subprocess
import sys

import pytest
from leaks import cgroup_entries, leaks, shm_entries

from partition.bench import boot
from partition.stats import percentile, summary

# scenarios and benchmarks: pytest -m "not slow" skips them (their figures are checked for
# shape and consistency, not against targets: those are test_bench_judgement.py's)
pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_percentiles_are_nearest_rank():
    v = list(range(1, 101))
    assert percentile(v, 50) == 50 and percentile(v, 99) == 99 and percentile(v, 100) == 100
    s = summary([3.0, 1.0, 2.0])
    assert s["p50"] == 2.0 and s["max"] == 3.0 and s["min"] == 1.0 and s["n"] == 3


def test_boot_bench_measures_both_sides():
    res = boot.run(boots=5)
    assert res["exec_to_active_ms"]["n"] == 5 and res["raw_fork_pin_handshake_ms"]["n"] == 5
    assert res["exec_to_active_ms"]["p50"] > 0 and res["raw_fork_pin_handshake_ms"]["p50"] > 0
    assert abs(res["ratio_p50"] - res["exec_to_active_ms"]["p50"] /
               res["raw_fork_pin_handshake_ms"]["p50"]) < 1e-9
    assert res["environment"]["python"]
    assert "ratio p50" in boot.render(res)


def test_bench_cli_refuses_too_few_boots():
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "bench", "boot", "--boots", "10"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "at least 50" in p.stderr


def test_demo_runs_and_checks_itself():
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "demo"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "demo: all checks passed" in p.stdout


def test_ipi_bench_shape_and_csv():
    from partition.bench import ipi
    res = ipi.run(round_trips=200, stream=500, modes=("poll", "interrupt"), repeats=2)
    by = {(r["cpu_a"], r["cpu_b"], r["variant"]) for r in res["results"]}
    pairs = {(r["cpu_a"], r["cpu_b"]) for r in res["results"]}
    for a, b in pairs:
        for v in ("raw-spin", "raw-eventfd", "poll", "interrupt"):
            assert (a, b, v) in by
    assert len(res["runs"]) == 2 * len(res["results"])            # every cell, every repeat
    for r in res["results"]:
        assert r["repeats"] == 2 and r["latency_us"]["n"] == 400 and r["latency_us"]["p50"] > 0
        lo, hi = r["p50_range_us"]
        assert lo <= r["latency_us"]["p50"] <= hi                  # a median of the repeats
        if r["variant"] in ("poll", "interrupt"):
            assert r["stream_received"] == 500 and r["msgs_per_s"] > 0
    text = ipi.render_csv(res).splitlines()
    assert text[0] == "test,variant,tier,cpu_a,cpu_b,mem_node,size,repeat,metric,value,unit"
    metrics = {line.split(",")[8] for line in text[1:]}
    assert metrics == {"p50", "p90", "p99", "p99.9", "max", "throughput"}
    assert {line.split(",")[7] for line in text[1:]} == {"1", "2"}  # rows per repeat
    # the candidate doorbells measured beside the eventfd, and every target judged
    for a, b in pairs:
        for v in ("raw-af-unix", "raw-pipe", "raw-futex"):
            assert (a, b, v) in by
    j = res["judgement"]
    assert set(j["wake_p50_us"]) == {"raw-eventfd", "raw-af-unix", "raw-pipe", "raw-futex"}
    assert j["doorbell"] == "raw-pipe" and j["fastest_wake"] in j["wake_p50_us"]
    assert {k.split()[0] for k in j["verdicts"]} == {"poll", "interrupt"}
    assert j["met"] == all(j["verdicts"].values())
    text = ipi.render(res)
    assert ("all met" in text) == j["met"] and ("MISSED" in text) != j["met"]


def test_ipi_bench_cli_refuses_few_round_trips():
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "bench", "ipi", "--round-trips",
                        "100"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "at least 10000" in p.stderr
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "show", "--format", "csv"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "invalid choice: 'csv'" in p.stderr   # bench's only


def test_recovery_bench_shape():
    from partition.bench import recovery
    res = recovery.run(kills=5)
    for key in ("detect_ms", "recover_ms", "baseline_pidfd_ms", "baseline_boot_ms"):
        assert set(res[key]) == {"p50", "p99", "max"} and res[key]["p50"] > 0
    assert res["recover_ms"]["p50"] >= res["detect_ms"]["p50"]
    # targets are ratios to the baselines of the same run
    assert res["recover_ratio"] == pytest.approx(res["recover_ms"]["p50"] / (
        res["baseline_pidfd_ms"]["p50"] + res["baseline_boot_ms"]["p50"]))
    assert res["meets_targets"] == (res["detect_ratio"] <= recovery.TARGETS["detect_ratio"]
                                    and res["recover_ratio"] <= recovery.TARGETS["recover_ratio"])
    text = recovery.render(res)
    assert "kill -> detected" in text and ("MISSED" in text) != res["meets_targets"]


def test_scale_bench_shape_and_cleanup():
    """Small sizes, one repeat: every figure is there, every machine is gone afterwards."""
    from partition.control import scale
    before = shm_entries(), cgroup_entries()
    res = scale.run(sizes=(2, 4), repeats=1, idle_s=0.5)
    assert [r["n"] for r in res["results"]] == [2, 4]
    for r in res["results"]:
        assert r["boot_ms_last"] > 0 and r["show_cli_ms"] > r["show_wire_ms"] > 0
        assert r["uss_mb"] > 0 and r["shutdown_s"] > 0 and r["idle_host_cpu_pct"] >= 0
        assert r["raw_boot_ms"] > 0 and r["python_ms"] > 0
        assert r["idle_instances_cpu_pct"] >= 0 and r["idle_other_cpu_pct"] >= 0
    assert res["baselines"]["raw_fork_uss_mb"] > 0
    assert set(res["verdicts"]) == set(scale.TARGETS)
    text = scale.render(res)
    assert "targets at N=4" in text
    assert ("MISSED" in text) == (not all(res["verdicts"].values()))
    assert leaks(*before) == ([], [])        # what other machines made meanwhile is theirs


def test_scale_bench_refuses_bad_sizes():
    for bad in ("0,16", "16,8", "600", "x", "nan"):
        p = subprocess.run([sys.executable, "-m", "partition.control.cli", "bench", "scale",
                            "--sizes", bad], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "--sizes" in p.stderr and "fix:" in p.stderr, bad


def test_isolation_bench_shape():
    from partition.bench import isolation
    res = isolation.run(n=50, kinds=("kill", "wild-write"), repeats=2)
    kinds = {r["kind"]: r for r in res["kinds"]}
    assert all(r["repeats"] == 2 and len(r["runs"]) == 2 for r in res["kinds"])
    lo, hi = kinds["kill"]["p99_ratio_range"]
    assert lo <= kinds["kill"]["p99_ratio"] <= hi
    assert set(kinds) == {"kill", "wild-write", "wild-write-unprotected"}
    assert kinds["wild-write"]["bytes_intact"] is True           # protection: the offender faulted
    assert kinds["wild-write-unprotected"]["bytes_intact"] is False
    assert kinds["wild-write-unprotected"]["ok"] is True          # the corruption was caught
    assert kinds["kill"]["victim_failure"] == "crash"
    for r in res["kinds"]:
        assert r["baseline"]["n"] == 50 and r["during"]["n"] == 50 and r["p99_ratio"] > 0


def test_update_bench_shape_and_counts():
    """Live updates under traffic: every update timed, the pinger's answers counted against
    what it asked and what the service (its count handed over by KHO) says it served."""
    from partition.bench import update
    res = update.run(updates=6, colds=3)
    assert res["service_gap_ms"]["n"] == 6 and res["cold_start_ms"]["n"] == 3
    q = res["requests"]
    assert q["asked"] > 50 and q["lost"] == 0 and q["duplicated"] == 0
    assert q["served_by_service"] == q["answered"]       # KHO carried the count through all 6
    assert res["rolled_back"] == 0
    assert res["service_gap_ms"]["p50"] >= res["switch_ms"]["p50"] * 0.5
    text = update.render(res)
    assert "service gap" in text and "cold start" in text


def test_update_bench_cli_refuses_few_updates():
    p = subprocess.run([sys.executable, "-m", "partition.control.cli", "bench", "update",
                        "--updates", "10"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "at least 50" in p.stderr
