"""The docs state constants and name modules; these tests hold them to the code, so a change
on one side without the other fails here instead of misleading a reader."""

import os
import re
import struct

import pytest

from partition.abi import layout as L
from partition.abi import message as M
from partition.abi import ring as R
from partition.abi import slot as S
from partition.control import daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return f.read()


def _section(text, heading):
    """The text under a markdown heading, up to the next heading of any level."""
    start = text.index(heading)
    nxt = re.search(r"^#{1,6} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + nxt.start()] if nxt else text[start:]


def _table(text):
    """Rows (lists of cells) of the first markdown table in ``text``, header and rule dropped."""
    rows: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def _offsets(fmt, names):
    """name -> (offset, size) of a little-endian struct's fields."""
    out, off = {}, 0
    codes = re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<"))
    for (count, code), name in zip(codes, names, strict=True):
        size = struct.calcsize("<" + (count or "") + code)
        out[name] = (off, size)
        off += size
    return out


def test_arena_header_table_matches_the_struct():
    rows = _table(_section(_doc("arena.md"), "## Header"))
    want = _offsets(L.HEADER.format, L.HEADER_FIELDS)
    doc = {r[2]: (int(r[0]), int(r[1])) for r in rows if not r[2].startswith("(pad")}
    assert doc == {k: v for k, v in want.items() if not k.startswith("_pad")}
    version = next(r[3] for r in rows if r[2] == "version")
    assert version == str(L.VERSION)
    assert want["generation"][0] == L.GENERATION_OFFSET


def test_arena_table_record_matches_the_struct():
    rows = _table(_section(_doc("arena.md"), "## Instance table record"))
    offs = sorted(_offsets(L.TABLE_RECORD.format, L.TABLE_FIELDS).values())
    doc = [(int(r[0]), int(r[1])) for r in rows if "reserved" not in r[2]]
    assert doc == offs
    assert f"{L.TABLE_RECORD_BYTES} bytes" in _section(_doc("arena.md"), "## Instance table record")


@pytest.mark.parametrize("heading, fields, size", [
    ("### Peer table entry", S.PEER_FIELDS, f"{S.PEER_BYTES} bytes"),
    ("### Own page", S.OWN_FIELDS, "4 KiB")])
def test_arena_control_tables_match_the_fields(heading, fields, size):
    text = _section(_doc("arena.md"), heading)
    rows = _table(text)
    doc = {r[2]: (int(r[0]), int(r[1]), r[3]) for r in rows if r[2] != "reserved"}
    assert {k: v[:2] for k, v in doc.items()} == \
        {name: (f.offset, f.width) for name, f in fields.items()}
    for name, f in fields.items():        # the writer column agrees with the code's
        assert doc[name][2] == f.writer, name
    assert size in text


def test_arena_regions_at_the_documented_offsets():
    lay = L.ArenaLayout(pool_bytes=1 << 30)
    rows = _table(_section(_doc("arena.md"), "| region |"))
    cell = {r[0]: r[1] for r in rows}
    assert f"`{lay.table_offset:#x}`" in cell["instance table"]
    assert f"`{lay.control_offset:#x}`" in cell["control area"]
    assert f"`{lay.console_offset:#x}`" in cell["consoles"]
    assert f"`{lay.ring_offset:#x}`" in cell["IPI rings"]
    assert f"`{lay.pool_offset:#x}`" in cell["memory pool"]


def test_console_header_matches():
    rows = _table(_section(_doc("arena.md"), "## Console"))
    assert rows[0][2].endswith(f"`{L.CONSOLE_MAGIC:#X}`".replace("0X", "0x") + " ('KMSG')")
    assert rows[-1][0] == str(L.CONSOLE_DATA)


def test_ring_header_and_slot_tables_match_ring_py():
    text = _doc("messages.md")
    header = {r[2].split(":")[0].split(" ")[0]: int(r[0]) for r in _table(_section(text, "Ring header"))}
    assert header["head"] == R.HEAD and header["tail"] == R.TAIL
    assert header["polling"] == R.POLLING and header["mode"] == R.MODE
    assert header["counters"] == R.COUNTERS and header["idle"] == R.IDLE
    assert header["signalled"] == R.SIGNALED and header["scratch"] == R.FENCE
    assert header["drop"] == R.FILTERS and header["dropped_filtered"] == R.DROPPED_FILTERED
    slot = {r[2].split(" ")[0].rstrip(":,"): int(r[0]) for r in _table(_section(text, "Slot `i`"))}
    assert (slot["sender_cpu"], slot["type"], slot["data_size"], slot["payload"]) == \
        (R.S_CPU, R.S_TYPE, R.S_SIZE, L.RING_SLOT_HEADER)
    assert slot["the"] == R.S_TICKET and slot["sender"] == R.S_SENDER
    assert f"{L.RING_HEADER_BYTES} bytes" in _section(text, "Ring header")


def test_message_type_numbers_match_message_py():
    text = _doc("messages.md")
    for name, value in vars(M).items():
        if not name.startswith(("MK_MSG_", "MK_EMU_")):
            continue
        short = name.removeprefix("MK_MSG_")
        found = re.search(rf"\b(?:{name}|{short})`? (0x[0-9A-Fa-f]+)", text)
        if found:
            assert int(found.group(1), 16) == value, name
    assert f"`{M.SUB_REQUEST:#x}`" in text and f"`{M.SUB_RESPONSE:#x}`" in text


def _module_map():
    text = _section(_doc("architecture.md"), "## Where things live")
    return re.findall(r"`(partition/[\w/.]+|tools/[\w/.]+)`", text)


def test_architecture_module_map_is_the_tree():
    named = set(_module_map())
    on_disk = {"partition/__init__.py"}           # the public facade; packages' own are not
    for base in ("partition", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith((".py", ".c")) and f != "__init__.py":
                    on_disk.add(os.path.relpath(os.path.join(dirpath, f), ROOT))
    assert sorted(on_disk - named) == []          # every module has its line
    assert sorted(named - on_disk) == []          # and every line names a module that exists


def test_architecture_wire_ops_are_the_daemons():
    text = _section(_doc("architecture.md"), "## Wire protocol")
    ops = re.search(r"Ops: (.*?)\.", text, re.S).group(1)
    doc = set(re.findall(r"`(\w+)`", ops))

    class _Stub:       # _ops only takes bound methods off the machine
        run_dir = ""

        def __getattr__(self, name):
            return None
    assert doc == set(daemon._ops(_Stub())) | {"shutdown"}


def test_readme_starts_with_the_set_up_and_says_how_long_the_tests_take():
    """A new user copies the first two commands; the second runs for minutes, which the line
    right after them says (a silent run of that length reads as a hang)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = "```sh\npip install -e . && mkctl run\npip install -e '.[test]' && python3 -m pytest -q\n```\n"
    assert text.startswith("# multikernel partition emulator\n\n" + block)
    after = text[len("# multikernel partition emulator\n\n" + block):].lstrip("\n")
    first = after.split("\n\n", 1)[0]
    assert re.search(r"test suite\s+takes \*\*\d+-\d+ minutes\*\*", first), first


def test_readme_names_only_folders_that_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = _section(f.read(), "## Layout of the repository")
    folders = set(re.findall(r"`([\w./-]+)/`", text))
    assert folders, "the README's layout section names no folder"
    for folder in folders:
        assert os.path.isdir(os.path.join(ROOT, folder)), folder


@pytest.mark.parametrize("cls_name", ["Machine", "Kernel"])
def test_api_page_names_every_public_attribute(cls_name):
    import partition
    cls = getattr(partition, cls_name)
    rows = _table(_section(_doc("api.md"), f"## {cls_name}"))
    documented = {r[0].strip("`") for r in rows}
    public = {n for n in dir(cls) if not n.startswith("_")}
    assert sorted(public - documented) == []        # every public name has its row
    assert sorted(documented - public) == []        # and every row names one that exists


@pytest.mark.system
def test_api_page_example_runs():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the example pins the host to CPU 0 and db to CPU 1")
    code = re.search(r"```python\n(.*?)```", _doc("api.md"), re.S).group(1)
    exec(compile(code, "docs/api.md", "exec"), {})


def test_userland_bench_targets_and_the_nested_cgroup_are_the_documented_ones():
    """bench userland's targets (a rate at least 0.9x, the boot at most 1.5x), its asking
    interval, and the userland's nested cgroup a hang-spin freezes, as the docs state them."""
    from partition.bench import userland as ub
    from partition.host import cgroups
    for name, heading in (("benchmarks.md", "## `mkctl bench userland`"),
                          ("userland.md", "## Measured")):
        text = _section(_doc(name), heading)
        assert f"{ub.TARGET_RATIO:g}x" in text and f"{ub.BOOT_TARGET_RATIO:g}x" in text, name
    cli = _doc("cli.md")
    assert f">= {ub.TARGET_RATIO:g}x" in cli and f"<= {ub.BOOT_TARGET_RATIO:g}x" in cli
    measured = _section(_doc("userland.md"), "## Measured")
    assert f"every {ub.ASK_EVERY_S * 1000:g} ms" in measured
    assert f"/mnt/shared/{ub.REGION}/{ub.BOOT_SOCKET}" in measured
    faults = _section(_doc("userland.md"), "## Faults")
    assert f"`i<id>/{cgroups.USERLAND}`" in faults
