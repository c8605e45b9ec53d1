"""partition/host/devicetree.py against hostile bytes and a small fuzz.

Every byte of kerf-made blobs flipped, and a seeded fuzz of them: each parse either succeeds or
refuses with an MKError; nothing crashes. The surveys run in a forked child, so that a crash
inside libfdt fails the test instead of killing pytest.
"""

import faulthandler
import json
import os
import random
import select
import signal
import struct
import time
import traceback

import pytest
from dtrees import MB, _inst, _with, kerf_baseline, kerf_create
from kerf.dtc.overlay import OverlayGenerator

from partition.errors import InvalidSpec, MKError, NotSupported
from partition.host import devicetree as dt

# the byte-level tests run in a forked child, so that a crash inside libfdt fails the test
# instead of killing pytest
pytestmark = pytest.mark.system


# -- byte-level hostility, in a forked child --------------------------------------------------


def _in_child(fn, timeout=120.0):
    """Run ``fn()`` in a forked child; its JSON result, or the way the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - the child
        code = 0
        try:
            faulthandler.disable()                 # a crash is the parent's to report
            os.close(r)
            try:
                out = {"result": fn()}
            except BaseException:
                out, code = {"error": traceback.format_exc()}, 1
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child died of signal {os.WTERMSIG(status)} "
                    f"({signal.Signals(os.WTERMSIG(status)).name}): a crash in libfdt")
    out = json.loads(b"".join(chunks) or b"{}")
    if "error" in out:
        pytest.fail(f"the child failed:\n{out['error']}")
    return out["result"]


def _outcome(fn, blob) -> tuple[str, str]:
    try:
        fn(blob)
        return "ok", ""
    except (InvalidSpec, NotSupported) as exc:
        return type(exc).__name__, ""
    except MKError as exc:
        return f"MKError:{type(exc).__name__}", str(exc)
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}", repr(exc)


def _survey(cases) -> dict:
    """cases: (label, parse, blob). Counts per outcome, and a few examples of each one that is
    not a successful parse nor an InvalidSpec/NotSupported."""
    counts: dict[str, int] = {}
    examples: dict[str, list] = {}
    for label, fn, blob in cases:
        kind, why = _outcome(fn, blob)
        counts[kind] = counts.get(kind, 0) + 1
        if kind not in ("ok", "InvalidSpec", "NotSupported") and len(examples.setdefault(kind, [])) < 3:
            examples[kind].append([label, why, blob.hex()])
    return {"counts": counts, "examples": examples, "cases": sum(counts.values())}


def _samples() -> dict[str, tuple[bytes, object]]:
    web = _inst("web", 5, [1, 2], 8 * MB)
    gen = OverlayGenerator()
    return {
        "create": (kerf_create(web, _inst("db", None, [3], 2 * MB)), dt.parse_overlay),
        "remove": (bytes(gen.generate_removal_overlay("web")), dt.parse_overlay),
        "update": (bytes(gen.generate_update_overlay(
            "web", web, _with(web, cpus=[2, 3], memory_bytes=12 * MB),
            memory_add_base=0x4000000)), dt.parse_overlay),
        "shrink": (bytes(gen.generate_update_overlay(
            "web", web, _with(web, memory_bytes=4 * MB),
            memory_regions=[(0x200000, 4 * MB), (0x600000, 4 * MB)])), dt.parse_overlay),
        "baseline": (kerf_baseline((2, 3, 6), {0: 64 * MB, 1: 32 * MB}), dt.parse_baseline),
    }


def _flips():
    cases = []
    for name, (blob, parse) in _samples().items():
        off, size = struct.unpack_from(">I", blob, 8)[0], struct.unpack_from(">I", blob, 36)[0]
        for pos in range(off, off + size):
            for how in ("xor ff", "xor 01", "xor 80", "set 00", "set 03", "set 09"):
                b = bytearray(blob)
                op, value = how.split()
                b[pos] = b[pos] ^ int(value, 16) if op == "xor" else int(value, 16)
                if bytes(b) != blob:
                    cases.append((f"{name}@{pos - off} {how}", parse, bytes(b)))
    return cases


def _flip_survey():
    return _survey(_flips())


@pytest.fixture(scope="module")
def flip_survey():
    return _in_child(_flip_survey)


def test_flipped_structure_bytes_never_crash_nor_raise_an_unknown_error(flip_survey):
    """Every byte of the structure block of five kerf-made blobs, six ways: the parse either
    succeeds or refuses; nothing crashes. (libfdt's own exception is the known leak shown by
    the next test.)"""
    counts = flip_survey["counts"]
    assert flip_survey["cases"] > 3000
    assert counts.get("InvalidSpec", 0) > 500 and counts.get("ok", 0) > 100
    unknown = {k: v for k, v in counts.items()
               if k not in ("ok", "InvalidSpec", "NotSupported", "libfdt.FdtException")}
    assert not unknown, (unknown, {k: flip_survey["examples"][k] for k in unknown})


def test_flipped_structure_bytes_are_only_ever_invalid_spec_or_not_supported(flip_survey):
    counts = flip_survey["counts"]
    leaked = {k: v for k, v in counts.items() if k not in ("ok", "InvalidSpec", "NotSupported")}
    assert not leaked, (leaked, {k: flip_survey["examples"][k][:1] for k in leaked})

def _bad_name_offset_dts():
    """to_dts of an overlay whose first property's name offset points far past the strings
    block: libfdt's get_property_by_offset hands pylibfdt a name it never checked."""
    blob = bytearray(bytes(OverlayGenerator().generate_removal_overlay("web")))
    off = struct.unpack_from(">I", blob, 8)[0]
    assert struct.unpack_from(">I", blob, off + 8)[0] == 3          # FDT_PROP "compatible"
    blob[off + 16] ^= 0xFF                                          # its nameoff, high byte
    try:
        dt.to_dts(bytes(blob))
    except InvalidSpec as exc:
        return ["InvalidSpec", exc.message]
    return ["ok", ""]


def test_to_dts_refuses_a_property_whose_name_is_out_of_bounds():
    kind, message = _in_child(_bad_name_offset_dts, timeout=60)
    assert kind == "InvalidSpec", message


# -- 3. a small fuzz ---------------------------------------------------------------------------

FUZZ_SEED = 0x6D6B6474          # "mkdt"
FUZZ_CASES = 2000
INTERESTING = (0, 1, 2, 3, 4, 9, 0x10, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFF0, 0xD00DFEED)


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    kind = rng.randrange(7)
    if kind == 0:                                       # a few bit flips anywhere past magic
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(8, len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:                                     # random bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(8, len(b))] = rng.randrange(256)
    elif kind == 2:                                     # an interesting word, aligned
        pos = rng.randrange(2, len(b) // 4) * 4
        struct.pack_into(">I", b, pos, rng.choice(INTERESTING + (len(b), len(b) - pos)))
    elif kind == 3:                                     # a header field
        field = rng.randrange(2, 10)
        value = rng.choice(INTERESTING + (rng.randrange(len(b) + 64),))
        struct.pack_into(">I", b, 4 * field, value)
    elif kind == 4:                                     # cut a piece out
        a = rng.randrange(40, len(b))
        del b[a:a + rng.randint(1, 16)]
    elif kind == 5:                                     # duplicate a piece
        a = rng.randrange(40, len(b))
        piece = b[a:a + rng.randint(1, 24)]
        b[a:a] = piece
    else:                                               # truncate
        del b[rng.randrange(40, len(b)):]
    if rng.random() < 0.85 and len(b) >= 8:             # mostly, a totalsize that matches
        struct.pack_into(">I", b, 4, len(b))
    return bytes(b)


def _fuzz_cases():
    rng = random.Random(FUZZ_SEED)
    samples = list(_samples().items())
    cases = []
    for n in range(FUZZ_CASES):
        name, (blob, parse) = samples[n % len(samples)]
        mutated = _mutate(rng, blob)
        cases.append((f"{name}#{n}", parse, mutated))
        other = dt.parse_baseline if parse is dt.parse_overlay else dt.parse_overlay
        cases.append((f"{name}#{n} cross", other, mutated))
    return cases


def _fuzz_survey():
    t0 = time.monotonic()
    out = _survey(_fuzz_cases())
    out["seconds"] = time.monotonic() - t0
    out["digest"] = sum(len(b) for _, _, b in _fuzz_cases()[::2])
    return out


@pytest.fixture(scope="module")
def fuzz_survey():
    return _in_child(_fuzz_survey)


def test_the_fuzz_is_deterministic_and_quick(fuzz_survey):
    again = sum(len(b) for _, _, b in _fuzz_cases()[::2])
    assert fuzz_survey["digest"] == again
    assert fuzz_survey["cases"] == 2 * FUZZ_CASES
    assert fuzz_survey["seconds"] < 20, fuzz_survey["seconds"]


def test_fuzzed_kerf_blobs_never_crash_nor_raise_an_unknown_error(fuzz_survey):
    counts = fuzz_survey["counts"]
    assert counts.get("ok", 0) > 50 and counts.get("InvalidSpec", 0) > 1000, counts
    unknown = {k: v for k, v in counts.items() if k not in
               ("ok", "InvalidSpec", "NotSupported", "libfdt.FdtException")
               and not k.startswith("MKError:")}
    assert not unknown, (unknown, {k: fuzz_survey["examples"][k] for k in unknown})


def test_fuzzed_kerf_blobs_are_parsed_or_refused_as_mkerrors(fuzz_survey):
    counts = fuzz_survey["counts"]
    leaked = {k: v for k, v in counts.items()
              if k not in ("ok", "InvalidSpec", "NotSupported") and not k.startswith("MKError:")}
    assert not leaked, (leaked, {k: fuzz_survey["examples"][k][:1] for k in leaked})
