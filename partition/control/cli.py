"""``mkctl``: the kerf-like command line of the emulator.

Verbs and their legal states follow kerf (init, create, load, start, exec, kill, unload, delete, show,
console); ``shutdown``, ``bench`` and ``demo`` are the emulator's own. Every refusal prints what
is wrong and how to fix it on stderr and exits 1; a usage error exits 2. Nothing is changed by a
refused command.

The command line is three modules: cliparse.py (the grammar), cliverbs.py (what each verb does)
and this one, the entry point (``mkctl = partition.control.cli:main``, ``python -m
partition.control.cli``), which turns a refusal into its exit code. The names tests and tools
import from here (``new_console_text``, ``build_parser``, ``parse``) stay importable from here.
"""

from __future__ import annotations

import json
import os
import sys

from partition.control.cliparse import TAKES_COMMAND, build_parser, parse
from partition.control.cliverbs import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, new_console_text
from partition.errors import MKError
from partition.terminal import printable

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "TAKES_COMMAND", "build_parser", "main",
           "new_console_text", "parse"]


def main(argv: list[str] | None = None) -> int:
    ap, a = parse(sys.argv[1:] if argv is None else list(argv))
    if a.format == "csv" and not (a.verb == "bench" and a.what == "ipi"):
        ap.error("--format csv is only for 'bench ipi' (mkbench columns)")
    try:
        return a.fn(a)
    except MKError as exc:
        if getattr(a, "format", "text") == "json":      # a script asked for JSON: it gets it
            print(json.dumps({"ok": False, "error": {**exc.to_wire(), "errno": exc.errno,
                                                     "code": exc.code}}, indent=2))
        # a refusal may quote the kernel (a boot() that raised, a resize it refused)
        print(printable(f"mkctl {a.verb}: error: {exc}"), file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"mkctl {a.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (mkctl ... | head): stop quietly, as a pipe tool does; whatever
        # ran has already been torn down by its own finally clauses
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13     # as if killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
