"""The daemons' structured log: one JSON object a line, on stderr (journald keeps it).

Every line carries ``ts`` (Unix time, ms precision); the record's own keys follow.

    emit = emitter("xfer.agent")
    emit({"event": "listening", "url": "https://10.0.4.1:7443"})
    # {"ts":1764700000.123,"event":"listening","url":"https://10.0.4.1:7443"}
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

Emit = Callable[[dict[str, Any]], None]


def line(record: dict[str, Any]) -> str:
    """The JSON text of one record, ``ts`` first (a record's own ``ts`` wins).

    >>> line({"ts": 1.5, "event": "x"})
    '{"ts":1.5,"event":"x"}'
    """
    return json.dumps({"ts": round(time.time(), 3), **record}, separators=(",", ":"), default=str)


def emitter(logger: str) -> Emit:
    """A function that logs one record as a JSON line on ``logger`` (at INFO)."""
    log = logging.getLogger(logger)

    def emit(record: dict[str, Any]) -> None:
        log.info(line(record))

    return emit


def log_lines_to_stderr(logger: str) -> None:
    """A daemon's log lines (already JSON) straight to stderr, for journald."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
