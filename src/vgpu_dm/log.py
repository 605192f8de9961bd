"""Log lines in the upstream (logrus) text style, or JSON for machines; everything goes to stderr.

Deliberately not the standard library's ``logging``: importing it (with traceback, string and
textwrap) costs about a third of the interpreter's own start-up, and the no-op ``assert`` writes a
single line. What the project needs is small: levels, one stderr sink shared by all threads, three
line formats, structured fields and a per-thread GPU prefix. Other libraries (the agent's HTTP client)
keep logging through the standard module, which this does not touch.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import NamedTuple, TextIO

from vgpu_dm.text import json_quote as _quote

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
LOGGER_NAME = "vgpu_dm"
# Structured fields a log call may carry (``extra=fields(gpu=…)``); JSON logs show them beside msg.
FIELDS = ("gpu", "address", "action", "type", "uuid")
# Compiled (and cached) by re on first use, not at import: the no-op assert path imports this module.
_CONTROL = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"
_START = time.monotonic()
_LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error", CRITICAL: "fatal"}


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


class Record(NamedTuple):
    """One log line before formatting."""

    name: str  # the logger: vgpu_dm, vgpu_dm.apply, …
    level: int
    message: str
    created: float  # time.time()
    fields: dict[str, object]  # the structured fields, in FIELDS order

    @property
    def level_name(self) -> str:
        return _LEVEL_NAMES.get(self.level, "info")


class TerminalFormatter:
    """``INFO[0003] message`` like logrus on a terminal."""

    def format(self, record: Record) -> str:
        level = record.level_name.upper()[:4]
        elapsed = int(time.monotonic() - _START)
        # A progress bar owns the current line: erase it first; the bar redraws itself below.
        erase = "\r\x1b[K" if bar.active else ""
        return f"{erase}{level}[{elapsed:04d}] {printable(record.message)}"


class KeyValueFormatter:
    """``time="…" level=info msg="…"`` like logrus when not on a terminal."""

    def format(self, record: Record) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        extra = "".join(f" {k}={_quote(str(v))}" for k, v in record.fields.items())
        return f"time={_quote(stamp)} level={record.level_name} msg={_quote(record.message)}{extra}"


class JSONFormatter:
    def format(self, record: Record) -> str:
        import json

        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        line = {"level": record.level_name, "msg": record.message, "time": stamp, **record.fields}
        return json.dumps(line, ensure_ascii=False, default=str)


# What setup() was last called with, so options given after the subcommand can change one of them.
settings = {"debug": False, "fmt": "text"}


class _Bar:
    """A progress bar drawn on the terminal below the log lines (see cli/progress.py)."""

    active = False


bar = _Bar()


class _Sink:
    """Where lines go: one stream, one formatter, one lock for every thread of the process."""

    def __init__(self, stream: TextIO, formatter: TerminalFormatter | KeyValueFormatter | JSONFormatter):
        self.stream = stream
        self.formatter = formatter
        self.level = INFO
        # Reentrant: a signal handler that logs (SIGTERM during apply) may run in the main thread
        # while it is inside a write; a plain lock would deadlock there.
        self.lock = threading.RLock()

    def emit(self, record: Record) -> None:
        line = self.formatter.format(record)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                # A closed or full stderr must not stop an apply half-way (nor its rollback).
                pass


_sink: _Sink | None = None  # set by setup()
# Until setup() is called (a library caller of apply_config, say), only warnings and errors are
# written, as the standard library's last-resort handler did.
_UNCONFIGURED_LEVEL = WARNING
_fallback: _Sink | None = None
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


class Logger:
    """The project's loggers (one per part, by name); the calls mirror the standard library's."""

    def __init__(self, name: str):
        self.name = name

    def isEnabledFor(self, level: int) -> bool:  # the standard library's name, for familiarity
        return level >= (_sink.level if _sink is not None else _UNCONFIGURED_LEVEL)

    def log(self, level: int, msg: object, extra: dict[str, object] | None = None) -> None:
        sink = _sink or _unconfigured()
        if level < sink.level:
            return
        text = str(msg)
        label = getattr(_context, "gpu", None)
        if label and label not in text:
            text = f"{label}: {text}"
        found = (extra or {}).get("fields")
        values = {k: found[k] for k in FIELDS if k in found} if isinstance(found, dict) else {}
        sink.emit(Record(self.name, level, text, time.time(), values))

    def debug(self, msg: object, extra: dict[str, object] | None = None) -> None:
        self.log(DEBUG, msg, extra)

    def info(self, msg: object, extra: dict[str, object] | None = None) -> None:
        self.log(INFO, msg, extra)

    def warning(self, msg: object, extra: dict[str, object] | None = None) -> None:
        self.log(WARNING, msg, extra)

    def error(self, msg: object, extra: dict[str, object] | None = None) -> None:
        self.log(ERROR, msg, extra)

    def exception(self, msg: object, extra: dict[str, object] | None = None) -> None:
        """An error line followed by the traceback of the exception being handled."""
        import traceback

        self.log(ERROR, f"{msg}\n{traceback.format_exc().rstrip()}", extra)


_loggers: dict[str, Logger] = {}


def _unconfigured() -> _Sink:
    global _fallback
    if _fallback is None or _fallback.stream is not sys.stderr:
        _fallback = _make_sink(sys.stderr, "text", _UNCONFIGURED_LEVEL)
    return _fallback


def get(name: str = "") -> Logger:
    full = f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME
    if full not in _loggers:
        _loggers[full] = Logger(full)
    return _loggers[full]


def setup(debug: bool = False, fmt: str = "text", stream: TextIO | None = None) -> _Sink:
    """Configure logging for this process (the CLI calls this first; again when -d or --log-format
    come after the subcommand). Lines go to ``stream``, by default the current standard error."""
    global _sink
    settings.update(debug=debug, fmt=fmt)
    _sink = _make_sink(stream if stream is not None else sys.stderr, fmt, DEBUG if debug else INFO)
    return _sink


def _make_sink(out: TextIO, fmt: str, level: int) -> _Sink:
    try:
        terminal = out.isatty()
    except (OSError, ValueError):  # closed
        terminal = False
    if fmt == "json":
        formatter: TerminalFormatter | KeyValueFormatter | JSONFormatter = JSONFormatter()
    elif terminal:
        formatter = TerminalFormatter()
    else:
        formatter = KeyValueFormatter()
    sink = _Sink(out, formatter)
    sink.level = level
    return sink


def setup_if_needed() -> None:
    """Configure logging with defaults if no command did (errors raised while parsing options)."""
    if _sink is None:
        setup()
