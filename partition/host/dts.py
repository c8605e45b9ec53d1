"""DTS, the text form of a device tree: ``to_dts`` prints a tree as ``mkctl dump`` shows it,
``from_dts`` compiles the same shape back, and ``read_tree_file`` takes either form from disk.

Separate because it is a small compiler of its own (a tokenizer and a recursive descent with a
depth bound) that only the command line needs; the host's wire speaks DTB alone.
"""

from __future__ import annotations

import re
import struct

import libfdt

from partition.errors import InvalidSpec
from partition.host.dtb import MAX_TREE_BYTES, Tree
from partition.host.dtbuild import finish


def to_dts(data: bytes) -> str:
    """DTS text of a tree, as ``mkctl dump`` prints it: strings, cells (u64 for ``cpus``,
    ``reg`` and sizes) and bytes."""
    t = Tree(data)
    lines = ["/dts-v1/;", ""]

    def value(prop: str, v: bytes) -> str:
        if not v:
            return ""
        if v.endswith(b"\0") and all(32 <= b < 127 for b in v[:-1].replace(b"\0", b"")) \
                and len(v) > 1 and b"\0\0" not in v:
            return " = " + ", ".join(f'"{s.decode()}"' for s in v[:-1].split(b"\0"))
        if len(v) % 8 == 0 and (prop in ("cpus", "cpus-available", "reg", "shared-cpus")
                                or len(v) == 8):
            cells = struct.unpack(f">{len(v) // 8}Q", v)
            return " = /bits/ 64 <" + " ".join(f"{c:#x}" for c in cells) + ">"
        if len(v) % 4 == 0:
            cells = struct.unpack(f">{len(v) // 4}I", v)
            return " = <" + " ".join(f"{c:#x}" for c in cells) + ">"
        return " = [" + " ".join(f"{b:02x}" for b in v) + "]"

    def node(off: int, depth: int) -> None:
        pad = "\t" * depth
        name = t.fdt.get_name(off) or "/"
        lines.append(f"{pad}{name} {{")
        p = t.fdt.first_property_offset(off, libfdt.QUIET_NOTFOUND)
        while p >= 0:
            prop = t.fdt.get_property_by_offset(p)
            lines.append(f"{pad}\t{prop.name}{value(prop.name, bytes(prop))};")
            p = t.fdt.next_property_offset(p, libfdt.QUIET_NOTFOUND)
        for _, child in t.children(off):
            node(child, depth + 1)
        lines.append(f"{pad}}};")

    node(0, 0)
    return "\n".join(lines) + "\n"


_TOKEN = re.compile(r'\s*(?:(//[^\n]*|/\*.*?\*/)|("(?:[^"\\]|\\.)*")|(/bits/)|(/dts-v1/)|'
                    r'([A-Za-z0-9_,.+@#?-]+)|(\[[0-9a-fA-F\s]*\])|(<[^>]*>)|([{};=/]))', re.S)


#: how deep ``from_dts`` follows nested nodes (libfdt's own walks stop at 64)
MAX_DTS_DEPTH = 32


def from_dts(text: str) -> bytes:
    """Compile DTS text of the shape ``to_dts`` (and kerf's ``dump --dts``) prints into a DTB:
    nodes, string lists, cells (``/bits/ 64`` for 64-bit ones), byte strings. No labels,
    references, includes or arithmetic (dtc has them; the emulator's trees never need them)."""
    if len(text) > MAX_TREE_BYTES * 4:
        raise InvalidSpec("the DTS text is too long", "a multikernel tree is a few hundred bytes")
    toks: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise InvalidSpec(f"DTS: cannot read {text[pos:pos + 20]!r}",
                                  "write nodes, properties, strings and <cells> only")
            break
        pos = m.end()
        kinds = ("comment", "string", "bits", "header", "word", "bytes", "cells", "punct")
        for kind, value in zip(kinds, m.groups()):
            if value is not None and kind != "comment":
                toks.append((kind, value))
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    i = 0

    def take(kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        nonlocal i
        if i >= len(toks):
            raise InvalidSpec("DTS: the text ends inside a node", "close every node with };")
        tok = toks[i]
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            raise InvalidSpec(f"DTS: expected {value or kind}, found {tok[1]!r}",
                              "check the braces and semicolons")
        i += 1
        return tok

    def prop_value() -> bytes:
        out = b""
        while True:
            kind, value = take()
            if kind == "string":
                out += value[1:-1].encode().decode("unicode_escape").encode() + b"\0"
            elif kind == "bits":
                width = int(take("word")[1])
                if width not in (8, 16, 32, 64):
                    raise InvalidSpec(f"DTS: /bits/ {width}", "use /bits/ 64 or 32")
                cells = take("cells")[1][1:-1].split()
                out += b"".join(int(c, 0).to_bytes(width // 8, "big") for c in cells)
            elif kind == "cells":
                out += b"".join(int(c, 0).to_bytes(4, "big") for c in value[1:-1].split())
            elif kind == "bytes":
                out += bytes.fromhex(value[1:-1])
            else:
                raise InvalidSpec(f"DTS: unexpected {value!r} in a property value",
                                  'values are "strings", <cells> or [bytes]')
            sep = take("punct")[1]
            if sep == ";":
                return out
            if sep != ",":
                raise InvalidSpec(f"DTS: expected , or ; after a value, found {sep!r}", "")

    def node(name: str, depth: int = 0) -> None:
        # the parser recurses once a level: a 20000-deep file is refused here by name, not
        # by Python's RecursionError (a multikernel tree nests 4 deep)
        if depth > MAX_DTS_DEPTH:
            raise InvalidSpec(f"DTS: nodes nested more than {MAX_DTS_DEPTH} deep",
                              "a multikernel tree nests a few levels: give mkctl dump's output")
        sw.begin_node(name)
        take("punct", "{")
        while toks[i:i + 1] != [("punct", "}")]:
            if i >= len(toks):
                raise InvalidSpec("DTS: the text ends inside a node", "close every node with };")
            _, word = take("word")
            nxt = take("punct")[1]
            if nxt == "{":
                i_back()
                node(word, depth + 1)
            elif nxt == ";":
                sw.property(word, b"")
            elif nxt == "=":
                sw.property(word, prop_value())
            else:
                raise InvalidSpec(f"DTS: unexpected {nxt!r} after {word!r}", "")
        take("punct", "}")
        take("punct", ";")
        sw.end_node()

    def i_back() -> None:
        nonlocal i
        i -= 1

    try:
        if toks[:1] == [("header", "/dts-v1/")]:
            take()
            take("punct", ";")
        take("punct", "/")
        node("")
        if i != len(toks):
            raise InvalidSpec("DTS: text after the root node", "one root node, / { ... };")
        return finish(sw)
    except (ValueError, IndexError, libfdt.FdtException) as exc:
        raise InvalidSpec(f"DTS: {exc}", "check the syntax against mkctl dump's output") from None


def read_tree_file(path: str) -> bytes:
    """A ``--input`` file: a DTB as is, DTS text compiled (``/dts-v1/`` first)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TREE_BYTES * 4 + 1)
    except OSError as exc:
        raise InvalidSpec(f"cannot read {path}: {exc.strerror}", "give a .dtb or .dts file") from None
    if data.lstrip().startswith(b"/dts-v1/"):
        return from_dts(data.decode("utf-8", errors="replace"))
    return data

