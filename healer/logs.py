"""Structured logging: an event name plus fields, as text or as one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_RESERVED = ("ts", "level", "logger", "event")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update((k, v) for k, v in _fields(record).items() if k not in _RESERVED)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`ts level logger event key=value ...`, quoting values that hold spaces."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), record.name, record.getMessage()]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# What a client that went away mid-request looks like to the server: not healer's fault, not news.
HUNG_UP = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class ClientHungUp(logging.Filter):
    """Turns the traceback aiohttp logs when a client goes away mid-request into one short debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HUNG_UP) and type(exc).__name__ != "ClientConnectionResetError":
            return True
        record.msg, record.args, record.exc_info, record.exc_text = "client hung up", None, None, None
        record.fields = {"error": type(exc).__name__}
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("healer").isEnabledFor(logging.DEBUG)


def configure_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send healer's logs, and those of the libraries it runs on (aiohttp, asyncio), to stderr in the
    chosen format: in JSON mode every line is one JSON object, a traceback included as a field."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ClientHungUp())
    root = logging.getLogger("healer")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Libraries log through the root logger; without a handler there Python prints their records as
    # bare text (tracebacks over many lines), which breaks a JSON log pipeline.
    libraries = logging.getLogger()
    libraries.handlers[:] = [handler]
    libraries.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for a logging call's `extra`."""
    return {"fields": values}
