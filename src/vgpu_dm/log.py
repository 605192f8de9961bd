"""Log lines in the upstream (logrus) text style, or JSON for machines; everything goes to stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
from datetime import datetime, timezone

LOGGER_NAME = "vgpu_dm"
# Structured fields a log call may carry (``extra=fields(gpu=…)``); JSON logs show them beside msg.
FIELDS = ("gpu", "address", "action", "type", "uuid")
# Compiled (and cached) by re on first use, not at import: the no-op assert path imports this module.
_CONTROL = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"
_START = time.monotonic()
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "fatal"}


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _escape(char: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    code = ord(char)
    return named.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), so a name read from a file or the
    host can neither split a log line nor drive the terminal."""
    return re.sub(_CONTROL, lambda m: _escape(m[0]), text)


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: the structured fields (None values left out)."""
    return {"fields": {k: v for k, v in values.items() if v is not None}}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    found = getattr(record, "fields", None)
    return {k: found[k] for k in FIELDS if k in found} if isinstance(found, dict) else {}


class TerminalFormatter(logging.Formatter):
    """``INFO[0003] message`` like logrus on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelname, record.levelname.lower()).upper()[:4]
        elapsed = int(time.monotonic() - _START)
        # A progress bar owns the current line: erase it first; the bar redraws itself below.
        erase = "\r\x1b[K" if bar.active else ""
        return f"{erase}{level}[{elapsed:04d}] {printable(record.getMessage())}"


class KeyValueFormatter(logging.Formatter):
    """``time="…" level=info msg="…"`` like logrus when not on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        extra = "".join(f" {k}={_quote(str(v))}" for k, v in _fields(record).items())
        return f"time={_quote(stamp)} level={level} msg={_quote(record.getMessage())}{extra}"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        line = {"level": level, "msg": record.getMessage(), "time": stamp, **_fields(record)}
        return json.dumps(line, ensure_ascii=False)


# What setup() was last called with, so options given after the subcommand can change one of them.
settings = {"debug": False, "fmt": "text"}


class _Bar:
    """A progress bar drawn on the terminal below the log lines (see cli/progress.py)."""

    active = False


bar = _Bar()


_context = threading.local()


@contextlib.contextmanager
def gpu_context(label: str):
    """Within this block, this thread's log lines start with ``label`` (apply changes GPUs in parallel;
    the prefix keeps their lines apart). Lines that already name it are left alone."""
    previous = getattr(_context, "gpu", None)
    _context.gpu = label
    try:
        yield
    finally:
        _context.gpu = previous


class _GPUPrefix(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        label = getattr(_context, "gpu", None)
        if label and isinstance(record.msg, str) and label not in record.msg:
            record.msg = f"{label}: {record.msg}"
        return True


def setup(debug: bool = False, fmt: str = "text") -> logging.Logger:
    """Configure the project logger once per process (the CLI calls this first)."""
    settings.update(debug=debug, fmt=fmt)
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
    handler.addFilter(_GPUPrefix())
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
