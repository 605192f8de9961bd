"""Saying how a long wait is going, so that it never looks like a hang: a line at least every
PROGRESS_EVERY seconds while the tool waits for VFs to appear, for another apply's lock, for a VM to
let go of a vGPU, or for a host program to finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# At most this long without a line while waiting (issue 18.13: "at least every 5 s").
PROGRESS_EVERY = 5.0


class Progress:
    """Call ``tick()`` from a polling loop; ``say(seconds waited)`` runs every PROGRESS_EVERY seconds."""

    def __init__(self, say: Callable[[float], None], every: float | None = None):
        self.say = say
        self.every = PROGRESS_EVERY if every is None else every
        self.start = time.monotonic()
        self._next = self.start + self.every

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self.say(now - self.start)
            while self._next <= now:
                self._next += self.every

    def sleep(self, seconds: float) -> None:
        """Sleep, but not past the next line."""
        time.sleep(max(0.0, min(seconds, self._next - time.monotonic())))
        self.tick()
