"""A progress bar for long applies, drawn on stderr only when it is a terminal (and logs are text)."""

from __future__ import annotations

import sys

from vgpu_dm import log

WIDTH = 30


class TerminalBar:
    """``progress(done, total)`` draws ``[#####.....] 12/32 vGPU writes``; log lines erase it first."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.drawn = False

    @classmethod
    def wanted(cls) -> bool:
        settings = log.settings
        return settings["fmt"] == "text" and not settings["debug"] and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        total = max(total, 1)
        filled = WIDTH * min(done, total) // total
        self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total} vGPU writes")
        self.stream.flush()
        self.drawn = True
        log.bar.active = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        log.bar.active = False
