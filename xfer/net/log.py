"""The daemons' structured log: one JSON object a line, on stderr (journald keeps it).

Every line starts with ``ts`` (Unix time, ms precision), ``level`` and ``event``;
the record's own keys follow. Lines that do not come from ``emit`` — a library's
warning, an exception with its traceback — are turned into the same shape by
``JsonFormatter``, so nothing but JSON reaches the stream.

    emit = emitter("xfer.agent")
    emit({"event": "listening", "url": "https://10.0.4.1:7443"})
    # {"ts":1764700000.123,"level":"info","event":"listening","url":"https://10.0.4.1:7443"}
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Emit(Protocol):
    def __call__(self, record: dict[str, Any], level: str = "info") -> None: ...


def line(record: dict[str, Any], level: str = "info") -> str:
    """The JSON text of one record: ``ts``, ``level``, ``event`` first.

    >>> line({"event": "x", "n": 1, "ts": 1.5})
    '{"ts":1.5,"level":"info","event":"x","n":1}'
    """
    head = {"ts": round(time.time(), 3), "level": level, "event": record.get("event", "log")}
    return json.dumps({**head, **record}, separators=(",", ":"), default=str)


def emitter(logger: str) -> Emit:
    """A function that logs one record as a JSON line on ``logger``."""
    log = logging.getLogger(logger)

    def emit(record: dict[str, Any], level: str = "info") -> None:
        number = _LEVELS[level]
        if log.isEnabledFor(number):
            log.log(number, line(record, level), extra={"xfer_json": True})

    return emit


def error_record(exc: BaseException, event: str = "internal error", **context: Any) -> dict[str, Any]:
    """A record for an exception nobody expected: its one-line reason and its traceback as a list
    of lines (inside the JSON, never loose in the stream)."""
    return {"event": event, **context, "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)).rstrip().splitlines()}


class JsonFormatter(logging.Formatter):
    """Passes ``emit``'s lines through; wraps any other record in the same JSON shape."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "xfer_json", False):
            return record.getMessage()
        body: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                "event": "log", "logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            body.update({k: v for k, v in error_record(record.exc_info[1]).items() if k != "event"})
        return json.dumps(body, separators=(",", ":"), default=str)


def daemon_logging(level: int = logging.INFO, stream: Any = None) -> Callable[[], None]:
    """Send the process's log records to stderr as JSON lines (a daemon's ``serve``): xfer's
    own from ``level`` up, other libraries' from WARNING up. Returns a function that undoes it.
    """
    root, ours = logging.getLogger(), logging.getLogger("xfer")
    saved = (root.handlers[:], root.level, ours.level)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))
    ours.setLevel(level)

    def undo() -> None:
        root.handlers = saved[0]
        root.setLevel(saved[1])
        ours.setLevel(saved[2])

    return undo
