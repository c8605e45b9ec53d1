"""The C drain, send, Port, codec and Waiter against hostile ring contents, under
AddressSanitizer, for a bounded time (MK_FUZZ_SECONDS, 15 by default). A read or write outside
a ring aborts the driver with ASan's report, and the test shows it."""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABI = os.path.join(ROOT, "partition", "abi")
#: every translation unit of the extension (_fastring.c, _ring.c, _message.c, _port.c,
#: _waiter.c)
SOURCES = sorted(glob.glob(os.path.join(ABI, "_*.c")))
pytestmark = [pytest.mark.system, pytest.mark.slow]


def _asan_runtime() -> str | None:
    try:
        path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return os.path.realpath(path) if path and os.path.isabs(path) and os.path.exists(path) \
        else None


def test_c_ring_survives_hostile_contents_under_asan(tmp_path):
    runtime = _asan_runtime()
    if runtime is None:
        if os.environ.get("MK_REQUIRE_C") == "1":
            pytest.fail("gcc's AddressSanitizer runtime (libasan) is missing, and CI requires "
                        "the fuzz test: apt-get install gcc", pytrace=False)
        pytest.skip("no gcc with AddressSanitizer here")
    from partition.abi.impl import source_digest
    digest = source_digest(ABI)
    so = tmp_path / ("_fastring" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address",
                    "-fno-omit-frame-pointer", f"-I{sysconfig.get_paths()['include']}",
                    f'-DFASTRING_SOURCE_SHA256="{digest}"', *SOURCES, "-o", str(so)],
                   check=True, timeout=120)
    seconds = os.environ.get("MK_FUZZ_SECONDS", "15")
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fuzz_ring.py"), str(so),
                        seconds, "1"], capture_output=True, text=True, env=env,
                       timeout=float(seconds) + 120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "no fault" in p.stdout
