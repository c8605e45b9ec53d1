"""The benchmarks' judgements, as pure functions of given figures (no machine is measured here:
what a bench decides from its figures is tested apart from the figures themselves)."""

from __future__ import annotations

from typing import Any

import pytest

from partition.bench import ipi, recovery
from partition.control import scale
from partition.stats import environment


def _lat(p50: float) -> dict[str, float]:
    return {"p50": p50, "p90": p50, "p99": p50, "p99.9": p50, "max": p50, "n": 100}


def _ipi_res(*, spin: float = 0.30, wakes: dict[str, float] | None = None,
             poll: float = 1.5, interrupt: float = 40.0, stream: float = 2e6,
             baseline_range: list[float] | None = None, quick: bool = False) -> dict[str, Any]:
    """One CPU pair's medians as ``ipi.run`` gives them; interrupt's baseline is the fastest
    wake, as ``_one_repeat`` picks it."""
    wakes = wakes or {"raw-eventfd": 40.0, "raw-pipe": 39.0, "raw-af-unix": 42.0,
                      "raw-futex": 44.0}
    base = {name: _lat(v) for name, v in wakes.items()}
    fastest = ipi.baseline_of("interrupt", base)
    results: list[dict[str, Any]] = [{"cpu_a": 0, "cpu_b": 1, "variant": "raw-spin",
                                      "latency_us": _lat(spin)}]
    results += [{"cpu_a": 0, "cpu_b": 1, "variant": n, "latency_us": _lat(v)}
                for n, v in wakes.items()]
    for mode, p50, ref, ref_name in (("poll", poll, spin, "raw-spin"),
                                     ("interrupt", interrupt, wakes[fastest], fastest)):
        results.append({"cpu_a": 0, "cpu_b": 1, "variant": mode, "latency_us": _lat(p50),
                        "baseline": ref_name, "baseline_p50_us": ref,
                        "baseline_p50_range_us": baseline_range or [ref, ref],
                        "ratio_p50": p50 / ref, "msgs_per_s": stream})
    return {"results": results, "targets": ipi.TARGETS, "repeats": 1 if quick else 3,
            "reference_raw_spin_us": ipi.REFERENCE_RAW_SPIN_US, "quick": quick}


def test_interrupt_is_judged_against_the_fastest_raw_wake_up():
    # 40.5 us: 1.04x the pipe (39.0, the fastest), met even though eventfd is 40.0
    j = ipi.judge(_ipi_res(interrupt=40.5))
    assert j["verdicts"]["interrupt ratio 0->1"] and j["met"]
    # 41.5 us: 1.064x the pipe, missed, although it is within 1.05x of the eventfd
    j = ipi.judge(_ipi_res(interrupt=41.5))
    assert not j["verdicts"]["interrupt ratio 0->1"] and not j["met"]
    assert ipi.TARGETS["interrupt_ratio"] == 1.05
    base = {"raw-eventfd": _lat(40.0), "raw-pipe": _lat(41.0), "raw-spin": _lat(0.1),
            "raw-futex": _lat(1.8)}
    assert ipi.baseline_of("interrupt", base) == "raw-eventfd"     # never the spin, nor the
    assert "raw-futex" not in ipi.DOORBELL_CANDIDATES               # futex (no descriptor)
    assert ipi.baseline_of("poll", base) == "raw-spin"


def test_poll_ratio_target_is_6x_the_raw_spin():
    assert ipi.judge(_ipi_res(spin=0.25, poll=1.49))["verdicts"]["poll ratio 0->1"]
    assert not ipi.judge(_ipi_res(spin=0.25, poll=1.55))["verdicts"]["poll ratio 0->1"]


def test_a_miss_says_how_much_the_raw_baseline_explains():
    # poll 2.2 us against 2.0 on a machine whose raw spin ran 0.36 us (1.2x the 0.30 where
    # the target was set): scaled, the target is 2.4 us, so all of the miss is the machine's
    res = _ipi_res(spin=0.36, poll=2.2)
    c = {c["name"]: c for c in ipi.judge(res)["checks"]}["poll p50 0->1"]
    assert not c["met"] and c["explained"] == 1.0 and "2.40 us" in c["why"]
    # 2.2 us on a machine as fast as the reference: none of it
    c = {c["name"]: c for c in ipi.judge(_ipi_res(spin=0.30, poll=2.2, stream=1e6))["checks"]}
    assert c["poll p50 0->1"]["explained"] == 0.0
    # streaming 1.2M against 1.5M with the raw spin at 1.5x: scaled target 1.0M, all explained
    c = {c["name"]: c for c in ipi.judge(_ipi_res(spin=0.45, stream=1.2e6))["checks"]}
    assert c["poll stream 0->1"]["explained"] == 1.0
    # half of it: 0.33 us spin (1.1x) scales 2.0 to 2.2; a 2.4 us figure is 0.4 over
    c = {c["name"]: c for c in ipi.judge(_ipi_res(spin=0.33, poll=2.4))["checks"]}
    assert c["poll p50 0->1"]["explained"] == pytest.approx(0.5)
    # a ratio: 2% over while the baseline moved 4% between repeats: within its noise
    res = _ipi_res(wakes={"raw-eventfd": 40.0}, interrupt=42.8, baseline_range=[39.0, 40.56])
    c = {c["name"]: c for c in ipi.judge(res)["checks"]}["interrupt ratio 0->1"]
    assert not c["met"] and c["explained"] == 1.0 and "4.0%" in c["why"]
    res = _ipi_res(wakes={"raw-eventfd": 40.0}, interrupt=44.0, baseline_range=[39.6, 40.4])
    c = {c["name"]: c for c in ipi.judge(res)["checks"]}["interrupt ratio 0->1"]
    assert 0 < c["explained"] < 1 and "emulator's" in c["why"]
    text = ipi.render(_render_ready(res))
    assert "MISSED: " in text and "interrupt ratio 0->1: 1.10x against 1.05x" in text


def _render_ready(res: dict[str, Any]) -> dict[str, Any]:
    for r in res["results"]:
        r["p50_range_us"] = [r["latency_us"]["p50"]] * 2
    res.update(round_trips=100, payload_bytes=64, stream_messages=100, host_cpu=0,
               environment=environment(), ring_implementation="c")
    res["judgement"] = ipi.judge(res)
    return res


def test_quick_runs_are_indicative_and_judge_nothing(capsys, monkeypatch):
    res = _render_ready(_ipi_res(poll=5.0, interrupt=80.0, quick=True))
    j = res["judgement"]
    assert not j["judged"] and not j["met"]
    text = ipi.render(res)
    assert "MISSED" not in text and "indicative" in text and "judge nothing" in text
    assert "would miss poll p50 0->1" in text
    # main exits 0 on a quick run's misses, 1 on a judged run's
    import argparse
    for quick, rc in ((True, 0), (False, 1)):
        monkeypatch.setattr(ipi, "run", lambda *a, quick=quick, **k: _render_ready(
            _ipi_res(poll=5.0, quick=quick)))
        args = argparse.Namespace(round_trips=10_000, quick=quick, repeat=None, stream=10,
                                  format="table")
        assert ipi.main(args) == rc
        assert ("MISSED" in capsys.readouterr().out) == (rc == 1)


def _scale_res(boot16: float, boot511: float, raw16: float, raw511: float) -> dict[str, Any]:
    def row(n: int, boot: float, raw: float) -> dict[str, Any]:
        return {"n": n, "boot_ms_last": boot, "raw_boot_ms": raw, "idle_host_cpu_pct": 0.2,
                "show_cli_ms": 60.0, "python_ms": 40.0, "shutdown_s": 1.0, "uss_mb": 3.6}
    return {"results": [row(16, boot16, raw16), row(511, boot511, raw511)],
            "targets": scale.TARGETS}


def test_scale_judges_boot_growth_against_the_raw_growth_beside_it():
    # 1.51x against the raw's 1.34x: missed (the run); under an absolute 1.3x the raw
    # baseline's own 2.71x growth made a 1.56x figure a miss that belonged to the machine
    v = scale.judge(_scale_res(1.0, 1.51, 1.0, 1.34))
    assert not v["boot_growth_vs_raw"]
    v = scale.judge(_scale_res(1.258, 1.967, 1.488, 4.035))
    assert v["boot_growth_vs_raw"] and all(v.values())
    assert scale.judge(_scale_res(1.0, 1.30, 1.0, 1.30))["boot_growth_vs_raw"]


def test_recovery_judges_detection_at_1_3x_and_explains_a_miss():
    assert recovery.TARGETS["detect_ratio"] == 1.3
    v = recovery.judge(detect=1.2, recover=3.0, raw_pidfd=1.0, raw_boot=2.0,
                       raw_pidfd_sized=1.25)
    assert v["met"] and v["detect_ratio"] == pytest.approx(1.2)
    # a bare child as big as the instance took 1.4/1.3 of the bare notice: the target scaled
    # by it is 1.4 ms, half way to the 1.5 measured
    v = recovery.judge(detect=1.5, recover=3.0, raw_pidfd=1.0, raw_boot=2.0,
                       raw_pidfd_sized=1.4 / 1.3)
    assert not v["met"] and v["detect_explained"] == pytest.approx(0.5)
    v = recovery.judge(detect=1.5, recover=3.0, raw_pidfd=1.0, raw_boot=2.0,
                       raw_pidfd_sized=1.4)
    assert not v["met"] and v["detect_explained"] == 1.0
    v = recovery.judge(detect=1.5, recover=3.0, raw_pidfd=1.0, raw_boot=2.0,
                       raw_pidfd_sized=1.0)
    assert v["detect_explained"] == 0.0
