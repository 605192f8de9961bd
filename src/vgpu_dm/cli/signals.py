"""SIGINT/SIGTERM during apply: turn the signal into a stop request instead of dying mid-change.

systemd and Kubernetes stop a process with SIGTERM (Ctrl-C gives SIGINT). Dying there would leave a
half-changed GPU, so the first signal only sets the apply's stop event: apply finishes the write in
progress, issues no new one, rolls back this run's writes and raises ApplyInterrupted. Further signals
while that happens are ignored, with a message, so the rollback is never cut short.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from vgpu_dm import log

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_log = log.get()


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set ``self.event`` (first one) or are ignored."""

    def __init__(self, event: threading.Event | None = None):
        self.event = event or threading.Event()
        self.received: int | None = None  # number of the first signal
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """The shell convention for "ended by signal N": 128 + N (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.received or signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self.event.set()
            _log.warning(
                f"received {name}: stopping; no new write starts, and this run's changes are rolled back"
            )
        else:
            _log.warning(f"received {name} again: ignored, the rollback must finish to leave the GPUs whole")

    def __enter__(self) -> StopOnSignal:
        # Handlers can only be installed from the main thread; elsewhere the caller owns the event.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # type: ignore[arg-type]
        self._previous.clear()
