"""Kernel-written text on the operator's terminal: control characters made visible.

An instance is untrusted, and so is every string it writes: its printk, its panic reason, the
reason its boot() raised, a refusal it answers a resize with. Printed as is, such text drives
the terminal that shows it: OSC 0 retitles the window, OSC 52 writes the operator's clipboard,
CSI 2J clears the screen (and hides what came before), a carriage return overwrites a line, a
bidi override reorders what is read. So whatever prints kernel text to a terminal (mkctl
console, show, top, an error message, a scenario's summary) passes it through ``printable``:
each such character becomes its escape (``\\x1b``, ``\\u202e``), the rest is unchanged.
``mkctl console --raw`` is the one way to get the bytes as written.

JSON output needs none of this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re

#: C0 controls, DEL, C1 controls (0x9b is a one-character CSI on some terminals), bidi
#: marks, embeddings, overrides and isolates, and lone surrogates (undecodable bytes kept by
#: surrogateescape: they cannot even be encoded for a strict UTF-8 stdout)
_CONTROLS = ("\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
             "\ud800-\udfff")
_IN_TEXT = re.compile(f"[{_CONTROLS}]")             # keeps newlines and tabs: a log's lines
_IN_CELL = re.compile(f"[\t\n{_CONTROLS}]")         # a table cell or one line: nothing kept


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every terminal control character escaped. Newlines and tabs are kept
    (a console's lines stay lines) unless ``one_line``: a table's cell, or a field inside a
    line of mkctl's own, must not start a row of its own either."""
    return (_IN_CELL if one_line else _IN_TEXT).sub(_escape, text)
