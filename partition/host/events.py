"""Structured event log: one JSON object per line in ``<run-dir>/events.log``.

Each machine gets its own bound structlog logger (no global ``structlog.configure``), so two
machines in one process, or a machine inside a user's program that configures structlog for
itself, never mix their streams.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import IO, Any

import structlog

#: ``listener(event, fields, monotonic_time)``; called in the machine's thread, must be quick
Listener = Callable[[str, dict[str, Any], float], None]


class EventLog:
    def __init__(self, path: str, **context: Any) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", buffering=1, encoding="utf-8")
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self._file),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
        ).bind(host_pid=os.getpid(), **context)
        self.counts: dict[str, int] = {}
        self.listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """In-process observers (a scenario's timeline) get each event with a monotonic time,
        which the ISO wall-clock stamp in the file cannot give them precisely."""
        self.listeners.append(listener)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        if self.listeners:
            now = time.monotonic()
            for listener in self.listeners:
                listener(event, fields, now)
        if not self._file.closed:
            getattr(self._log, level)(event, **fields)

    def close(self) -> None:
        self._file.close()
