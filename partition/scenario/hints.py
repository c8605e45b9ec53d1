"""A refusal's text in the scenario's words: a scenario is told to set a key, not to pass a flag.

The machine's refusals speak mkctl's language (``pass --oversubscribe``, ``init the machine
with --host-cpus``), since most of them answer a command line. A scenario builds its machine
from keys, so when the runner shows such a refusal against a file, each flag becomes the key
that sets it (``set oversubscribe = true in [machine]``). Kept apart from schema.py, which
checks files and never sees a refusal.
"""

from __future__ import annotations

import re

#: mkctl's flags, as a scenario spells them (a hint from the machine speaks the CLI's words)
_FLAG_KEYS = {"oversubscribe": "oversubscribe = true", "no-protection": "protection = false",
              "host-cpus": "host_cpus", "cpu-count": "cpu_count", "max-restarts": "max_restarts",
              "restart-window": "restart_window", "standby-for": "standby_for",
              "preserve-memory": "preserve_memory = true"}
_FLAG = re.compile(r"(\bpass |\binit(?: the machine)? with )?--([a-z][a-z-]*)")
_INIT = re.compile(r"mkctl init --cpus (\S+) --oversubscribe")


def in_scenario_words(text: str) -> str:
    """A refusal's text with mkctl's flags turned into the scenario's keys: a scenario on a
    2-core machine is told to set ``oversubscribe = true``, not to "pass --oversubscribe"."""
    def key(m: re.Match[str]) -> str:
        k = _FLAG_KEYS.get(m.group(2), m.group(2).replace("-", "_"))
        return f"set {k} in [machine]" if m.group(1) else k
    text = _INIT.sub(r'set cpus = "\1" and oversubscribe = true in [machine]', text)
    return _FLAG.sub(key, text)
