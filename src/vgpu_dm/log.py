"""Log lines in the upstream (logrus) text style, or JSON for machines; everything goes to stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

LOGGER_NAME = "vgpu_dm"
_START = time.monotonic()
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "fatal"}


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


class TerminalFormatter(logging.Formatter):
    """``INFO[0003] message`` like logrus on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelname, record.levelname.lower()).upper()[:4]
        elapsed = int(time.monotonic() - _START)
        return f"{level}[{elapsed:04d}] {record.getMessage()}"


class KeyValueFormatter(logging.Formatter):
    """``time="…" level=info msg="…"`` like logrus when not on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        return f"time={_quote(stamp)} level={level} msg={_quote(record.getMessage())}"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        return json.dumps({"level": level, "msg": record.getMessage(), "time": stamp}, ensure_ascii=False)


def setup(debug: bool = False, fmt: str = "text") -> logging.Logger:
    """Configure the project logger once per process (the CLI calls this first)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    elif sys.stderr.isatty():
        handler.setFormatter(TerminalFormatter())
    else:
        handler.setFormatter(KeyValueFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    return logger


def get(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_if_needed() -> None:
    """Configure logging with defaults if no command did (errors raised while parsing options)."""
    if not logging.getLogger(LOGGER_NAME).handlers:
        setup()
