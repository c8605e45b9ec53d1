"""``mkctl bench userland``: its output's shape with tiny counts (a real machine, real
userlands, a real boot), and its judgement: every rate against 0.9x, the boot time against
1.5x, a miss printed and exit 1, --quick judging nothing."""

import json
import os
import subprocess
import sys

import pytest

from helpers import until
from partition.bench import userland as bench
from partition.stats import environment

MKCTL = [sys.executable, "-m", "partition.control.cli"]


def left_by(run_dir, pid):
    """What a bench run in ``run_dir`` by ``pid`` would leave in /dev/shm: its machine's run
    directory and arena, the host side's file."""
    key = os.path.basename(run_dir)
    return [n for n in os.listdir("/dev/shm")
            if key in n or n == f"mk-bench-userland-{pid}"]


def test_bench_userland_quick_prints_every_figure_unjudged(run_dir):
    p = subprocess.Popen(MKCTL + ["bench", "userland", "--run-dir", run_dir, "--quick",
                                  "--loops", "5", "--write-mib", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert left_by(run_dir, p.pid) == []        # the machine and the host's file are gone
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("userland against host, CPU ") and "1 rounds" in lines[0]
    assert lines[1].startswith("machine: ")
    assert lines[2].split() == ["host", "userland", "ratio"]
    for line, label in zip(lines[3:7], ("fork+exec /bin/true", "sequential write",
                                        "mmap write", "boot to first answer")):
        assert line.startswith(label) and line.endswith("not judged (--quick)"), line
        assert line.split()[-4].endswith("x")                    # the ratio
    assert lines[6].split()[4:6] == ["ms", "ms"] or " ms" in lines[6], lines[6]
    assert lines[7] == ("files: inside, in the machine's shared region 'bench' "
                        "(/mnt/shared/bench/bench-userland); on the host, in /dev/shm (both tmpfs)")
    assert lines[8] == ("boot: start of the instance, against a raw fork+exec on the host, to "
                        "the first answer of the same program on a unix socket in the region "
                        "(/mnt/shared/bench/boot.sock inside)")
    assert len(lines) == 9
    r = subprocess.run(MKCTL + ["bench", "userland", "--run-dir", run_dir, "--quick",
                                "--loops", "5", "--write-mib", "1", "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["judged"] is False and res["meets_target"] is None
    assert res["region_bytes"] == 2 << 20          # the inside file's filesystem: checked
    assert set(res["figures"]) == {"fork_exec", "write", "mmap", "boot"}
    for f in res["figures"].values():
        assert f["host"] > 0 and f["userland"] > 0 and f["met"] is None
        assert abs(f["ratio"] - f["userland"] / f["host"]) < 1e-9
    assert (res["figures"]["boot"]["target"], res["figures"]["boot"]["better"]) == (1.5, "lower")
    assert res["boot_target_ratio"] == 1.5


@pytest.mark.system
def test_bench_userland_refuses_counts_too_small_to_judge():
    r = subprocess.run(MKCTL + ["bench", "userland", "--loops", "5"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "[EINVAL]" in r.stderr and "--quick" in r.stderr
    r = subprocess.run(MKCTL + ["bench", "userland", "--quick", "--write-mib", "33"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "[EINVAL]" in r.stderr


def rates(host, inside):
    return {k: {"host": [host[k]] * 3, "userland": [inside[k]] * 3} for k in bench.FIGURES}


def test_bench_userland_judges_each_figure_against_its_target():
    host = {"fork_exec": 500.0, "write": 2000.0, "mmap": 1000.0}
    met = bench.judge(rates(host, {"fork_exec": 450.0, "write": 1900.0, "mmap": 1200.0}),
                      quick=False)
    assert met["meets_target"] is True and bench.exit_code(met) == 0
    assert [f["met"] for f in met["figures"].values()] == [True, True, True]
    assert met["figures"]["fork_exec"]["ratio"] == 0.9             # the target itself is met
    missed = bench.judge(rates(host, {"fork_exec": 500.0, "write": 1700.0, "mmap": 1000.0}),
                         quick=False)
    assert missed["meets_target"] is False and bench.exit_code(missed) == 1
    assert missed["figures"]["write"]["met"] is False and missed["figures"]["mmap"]["met"]
    quick = bench.judge(rates(host, {"fork_exec": 1.0, "write": 1.0, "mmap": 1.0}), quick=True)
    assert quick["meets_target"] is None and bench.exit_code(quick) == 0
    # the median, not the mean: one slow run does not decide
    got = rates(host, host)
    got["write"]["userland"] = [2000.0, 10.0, 2000.0]
    assert bench.judge(got, quick=False)["figures"]["write"]["met"]


def test_bench_userland_prints_a_miss():
    host = {"fork_exec": 500.0, "write": 2000.0, "mmap": 1000.0}
    res = {"cpu": 1, "rounds": 3, "loops": 300, "write_mib": 32,
           "environment": environment(), "files": "here and there"}
    res.update(bench.judge(rates(host, {"fork_exec": 400.0, "write": 2000.0, "mmap": 1000.0}),
                           quick=False))
    lines = bench.render(res).splitlines()
    assert lines[3].startswith("fork+exec /bin/true") and "0.80x" in lines[3]
    assert lines[3].endswith("target >= 0.9x: MISSED")
    assert lines[4].endswith("target >= 0.9x: met") and lines[5].endswith("met")


def boots(host_ms, inside_ms):
    return {"boot": {"host": list(host_ms), "userland": list(inside_ms)}}


def test_bench_userland_judges_the_boot_time_at_most_1_5x_the_host():
    """A time, not a rate: less is better, and the target is a ceiling."""
    met = bench.judge(boots([40.0] * 3, [60.0] * 3), quick=False)     # 1.5x: the target itself
    assert met["figures"]["boot"]["met"] is True and met["meets_target"] is True
    assert met["figures"]["boot"]["ratio"] == 1.5 and bench.exit_code(met) == 0
    missed = bench.judge(boots([40.0] * 3, [61.0] * 3), quick=False)
    assert missed["figures"]["boot"]["met"] is False and bench.exit_code(missed) == 1
    faster = bench.judge(boots([40.0] * 3, [20.0] * 3), quick=False)   # faster than the host
    assert faster["figures"]["boot"]["met"] is True
    # the median: one slow boot (a cold first one) does not decide
    assert bench.judge(boots([40.0] * 3, [50.0, 400.0, 55.0]), quick=False)["meets_target"]
    # with the rates: one miss of either kind fails the run
    host = {"fork_exec": 500.0, "write": 2000.0, "mmap": 1000.0}
    got = rates(host, host) | boots([40.0] * 3, [80.0] * 3)
    res = bench.judge(got, quick=False)
    assert [f["met"] for f in res["figures"].values()] == [True, True, True, False]
    assert res["meets_target"] is False and bench.exit_code(res) == 1
    quick = bench.judge(got, quick=True)
    assert quick["figures"]["boot"]["met"] is None and bench.exit_code(quick) == 0


def test_bench_userland_prints_a_boot_miss():
    host = {"fork_exec": 500.0, "write": 2000.0, "mmap": 1000.0}
    res = {"cpu": 1, "rounds": 3, "loops": 300, "write_mib": 32,
           "environment": environment(), "files": "here and there", "boot": "how"}
    res.update(bench.judge(rates(host, host) | boots([40.0] * 3, [72.5] * 3), quick=False))
    lines = bench.render(res).splitlines()
    assert lines[6].split()[:6] == ["boot", "to", "first", "answer", "40.0", "ms"], lines[6]
    assert "72.5 ms" in lines[6] and "1.81x" in lines[6]
    assert lines[6].endswith("target <= 1.5x: MISSED")
    assert lines[3].endswith("target >= 0.9x: met")
    assert lines[-1] == "boot: how"


@pytest.mark.system
def test_the_boot_figure_times_real_boots_of_the_instance(run_dir):
    """The boot program answers from inside the instance (its host name is the instance's),
    the host's from the host."""
    from partition.host.machine import Machine
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with Machine(cpus=[cpu], memory="96M", oversubscribe=True, run_dir=run_dir,
                 shared={"r": "1M"}) as m:
        m.create("srv", cpus=[cpu], memory="32M", shared=["r"])
        inside = f"/mnt/shared/r/{bench.BOOT_SOCKET}"
        m.load("srv", "kernels.idle:IdleKernel", programs=[bench.server_argv(inside, cpu)])
        region = m.shared.mounts(["r"])["r"]
        got = bench.measure_boot(m, "srv", region, cpu, rounds=2)["boot"]
        assert len(got["host"]) == len(got["userland"]) == 2
        assert all(0 < ms < bench.ANSWER_WITHIN_S * 1000 for ms in got["host"] + got["userland"])
        assert m.show("srv")["state"] == "active"
        assert os.listdir(region) == []                         # both sockets removed
        # the instance's program answered as the instance (its UTS name): run again, with
        # the region's socket path taken by a host program first, it is still the instance
        # that answers (the bench clears the path before each boot)
        squatter = subprocess.Popen(bench.server_argv(os.path.join(region, bench.BOOT_SOCKET),
                                                      cpu))
        try:
            until(lambda: os.path.exists(os.path.join(region, bench.BOOT_SOCKET)),
                  what="the host's program listening")
            assert bench.instance_boot(m, "srv", os.path.join(region, bench.BOOT_SOCKET)) > 0
        finally:
            squatter.kill()
            squatter.wait()


@pytest.mark.system
def test_bench_userland_refuses_an_inside_file_outside_the_region():
    """The write figures count only if the inside file is in the shared region: a directory
    of another filesystem bound where the region should be is refused, not measured."""
    elsewhere = f"/dev/shm/mk-test-bench-elsewhere-{os.getpid()}"
    os.mkdir(elsewhere)
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        identity = bench.userland.Identity(name="bench", cpus=[cpu], cgroup_procs=[],
                                           shared={bench.REGION: elsewhere})
        with pytest.raises(RuntimeError, match="not in the 2097152-byte shared region"):
            bench.measure(identity, cpu, loops=1, write_mib=1, rounds=1, region_bytes=2 << 20)
        assert os.listdir(elsewhere) == []              # the script removed its files
    finally:
        os.rmdir(elsewhere)
