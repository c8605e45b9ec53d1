"""Structured event log: one JSON object per line in ``<run-dir>/events.log``.

Each machine gets its own bound structlog logger (no global ``structlog.configure``), so two
machines in one process, or a machine inside a user's program that configures structlog for
itself, never mix their streams.
"""

from __future__ import annotations

import os
from typing import IO, Any

import structlog


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

    def info(self, event: str, **fields: Any) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        if not self._file.closed:
            self._log.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        if not self._file.closed:
            self._log.warning(event, **fields)

    def close(self) -> None:
        self._file.close()
