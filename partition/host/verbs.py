"""The facade's two helpers, written once for every verb and forwarded attribute of
``Machine`` (host/machine.py): the verb preamble and the property that reads a collaborator's
attribute under the machine's old name. Kept apart so the facade holds only verbs and views."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

V = TypeVar("V", bound=Callable[..., Any])


def verb(fn: V) -> V:
    """A verb's preamble, written once: the machine must be open, and what happened since the
    last call (a death, a doorbell) is handled first, so the verb sees the machine as it is."""
    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        self.poll(0)
        return fn(self, *args, **kwargs)
    return run  # type: ignore[return-value]


def owned(path: str, doc: str, settable: bool = False) -> Any:
    """A property of the machine that is a collaborator's attribute (``path`` from the
    machine), read (and with ``settable`` written) there: the collaborator owns it, callers
    keep its old name."""
    *owners, attr = path.split(".")

    def owner(m: Any) -> Any:
        return functools.reduce(getattr, owners, m)
    return property(lambda m: getattr(owner(m), attr),
                    (lambda m, v: setattr(owner(m), attr, v)) if settable else None, doc=doc)
