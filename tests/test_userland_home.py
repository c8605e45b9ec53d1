"""The emulator imported from under a scratch directory (a clone in /tmp, as CI makes): its
``partition`` package stays importable inside an instance's userland (a boot program or an
exec can run the emulator's own tools, such as the crash-consistency writer), and nothing else
of that checkout is seen: not a run directory inside it, whose control socket would let a
program drive the machine. Real processes; every one reaped, the copy removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import CPUS

pytestmark = pytest.mark.system

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PICKY = os.path.join(HERE, "kernels", "picky.py")


def test_a_checkout_under_tmp_shows_its_package_and_hides_its_run_dir():
    home = tempfile.mkdtemp(prefix="mk-home-", dir="/tmp")
    run_dir = os.path.join(home, "run")
    shutil.copytree(os.path.join(ROOT, "partition"), os.path.join(home, "partition"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=home)
    mkctl = [sys.executable, "-m", "partition.control.cli", "--run-dir", run_dir]

    def mk(*args, check=True):
        p = subprocess.run(mkctl + list(args), capture_output=True, text=True, timeout=60,
                           env=env, cwd=home)
        assert not check or p.returncode == 0, f"{args}: {p.stdout}{p.stderr}"
        return p
    try:
        mk("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
           ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
        mk("create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
        mk("load", "a", "--kernel", PICKY)
        mk("start", "a")
        probe = ("import json, os, partition; print(json.dumps([partition.__file__, "
                 f"sorted(os.listdir({home!r})), os.path.exists({run_dir!r})]))")
        p = mk("exec", "a", "--", sys.executable, "-c", probe, check=False)
        assert p.returncode == 0, p.stderr
        where, listing, sees_run_dir = json.loads(p.stdout.strip().splitlines()[-1])
        assert where == os.path.join(home, "partition", "__init__.py")
        assert listing == ["partition"] and not sees_run_dir
        # read-only inside: the package cannot be changed by a program of the instance
        p = mk("exec", "a", "--", "/bin/sh", "-c",
               f"echo x > {home}/partition/evil.py", check=False)
        assert p.returncode != 0 and not os.path.exists(os.path.join(home, "partition",
                                                                      "evil.py"))
    finally:
        mk("shutdown", check=False)
        shutil.rmtree(home, ignore_errors=True)
