"""The project's own log module: the text formats quote exactly as logrus/JSON do, every thread's lines
arrive whole, and a stderr that cannot be written never stops the caller."""

from __future__ import annotations

import io
import json
import re
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vgpu_dm import log
from vgpu_dm.text import json_quote


@pytest.fixture(autouse=True)
def default_logging():
    yield
    log.setup()


@given(st.text())
def test_quoting_is_json_string_quoting(text: str) -> None:
    # Log lines and config paths quote names without importing json; they must read as JSON does.
    assert json_quote(text) == json.dumps(text, ensure_ascii=False)


def test_key_value_line_with_fields_and_levels() -> None:
    out = io.StringIO()
    log.setup(stream=out)
    log.get("apply").info('made "x"\n', extra=log.fields(gpu=0, address="0000:3b:00.0", uuid=None))
    log.get("apply").debug("not shown without -d")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(r'level=info msg="made \"x\"\n" gpu="0" address="0000:3b:00.0"')
    assert line.startswith('time="') and 'Z" level=info' in line


def test_debug_lines_and_json_format() -> None:
    out = io.StringIO()
    log.setup(debug=True, fmt="json", stream=out)
    log.get().debug("seen", extra=log.fields(action="plan", gpu=1))
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["level"] == "debug" and record["msg"] == "seen"
    assert record["action"] == "plan" and record["gpu"] == 1 and record["time"].endswith("+00:00")


def test_gpu_prefix_is_per_thread_and_not_repeated() -> None:
    out = io.StringIO()
    log.setup(stream=out)
    with log.gpu_context("GPU 1"):
        log.get().info("removing")
        log.get().info("GPU 1: already named")
        other = threading.Thread(target=lambda: log.get().info("elsewhere"))
        other.start()
        other.join()
    messages = [line.split("msg=", 1)[1] for line in out.getvalue().splitlines()]
    assert messages == ['"GPU 1: removing"', '"GPU 1: already named"', '"elsewhere"']


def test_lines_from_many_threads_arrive_whole() -> None:
    out = io.StringIO()
    log.setup(stream=out)

    def talk(n: int) -> None:
        for i in range(200):
            log.get().info(f"thread {n} line {i} " + "x" * 200)

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1600
    assert all(line.startswith('time="') and line.endswith('x"') for line in lines)


def test_a_closed_or_broken_stderr_does_not_raise() -> None:
    closed = io.StringIO()
    log.setup(stream=closed)
    closed.close()
    log.get().error("nobody reads this")  # ValueError inside, swallowed

    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    log.setup(stream=Broken())
    log.get().error("nor this")


def test_exception_carries_the_traceback() -> None:
    out = io.StringIO()
    log.setup(stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.get("k8s").exception("reconcile crashed")
    text = out.getvalue()
    assert text.count("\n") == 1  # one line: the traceback's newlines are escaped by the quoting
    assert "reconcile crashed\\nTraceback" in text and "RuntimeError: boom" in text


def test_terminal_format_and_is_enabled_for() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    log.setup(stream=out)
    log.get().warning("careful\x1b[2J")
    assert re.fullmatch(r"WARN\[\d{4}\] careful\\x1b\[2J\n", out.getvalue())
    assert log.get().isEnabledFor(log.INFO) and not log.get().isEnabledFor(log.DEBUG)


def test_before_setup_only_warnings_and_errors_are_written(monkeypatch, capsys) -> None:
    # A library caller (apply_config from Python) that never configured logging sees what the standard
    # library's last-resort handler showed: warnings and errors, not the progress lines.
    monkeypatch.setattr(log, "_sink", None)
    monkeypatch.setattr(log, "_fallback", None)
    log.get("apply").info("progress")
    log.get("apply").warning("careful")
    assert not log.get().isEnabledFor(log.INFO) and log.get().isEnabledFor(log.WARNING)
    err = capsys.readouterr().err
    assert "progress" not in err and 'level=warning msg="careful"' in err


SIGNAL_DURING_WRITE = """
import io, signal
from vgpu_dm import log

class Interrupted(io.StringIO):
    fired = False

    def write(self, s):
        if not self.fired:
            self.fired = True
            signal.raise_signal(signal.SIGUSR1)  # the handler runs here, inside the sink's lock
        return super().write(s)

out = Interrupted()
log.setup(stream=out)
signal.signal(signal.SIGUSR1, lambda *_: log.get().warning("stopping"))
log.get().info("in the middle")
print(out.getvalue(), end="")
"""


def test_a_signal_handler_that_logs_during_a_write_does_not_deadlock() -> None:
    # SIGTERM during apply: the handler logs from the main thread, maybe while that thread is inside a
    # write. Run apart, so that a deadlock fails the test instead of hanging the suite.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_WRITE], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    messages = [line.split("msg=")[1] for line in proc.stdout.splitlines()]
    assert messages == ['"stopping"', '"in the middle"']
