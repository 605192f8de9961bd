"""The host lock: one apply at a time per host, so two runs never interleave their writes."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from types import TracebackType

from vgpu_dm import log
from vgpu_dm.errors import ApplyInterrupted, HostError
from vgpu_dm.host.root import HostRoot
from vgpu_dm.state_files import LOCK_FILE

__all__ = ["LOCK_FILE", "HostLock"]
_log = log.get("lock")


class HostLock:
    """An exclusive ``flock`` on ``run/nvidia-vgpu-dm.lock`` below the host root, holding our pid.

    flock is released by the kernel when the holder dies, so a killed apply never leaves a stale lock.
    """

    def __init__(
        self,
        host: HostRoot,
        timeout: float = 60.0,
        poll: float = 0.1,
        stop: threading.Event | None = None,
    ):
        self.path = host.path(LOCK_FILE)
        self.timeout = timeout
        self.poll = poll
        self.stop = stop  # a stop request ends the wait for another apply
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            with open(self.path) as fh:
                pid = fh.read().strip()
        except OSError:
            return "unknown pid"
        return f"pid {pid}" if pid else "unknown pid"

    def busy(self) -> str | None:
        """ "pid N" if another process holds the lock right now, else None (never waits)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._holder()
        finally:
            os.close(fd)
        return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        from vgpu_dm.waiting import Progress

        deadline = time.monotonic() + self.timeout
        waiting = False
        progress = Progress(
            lambda waited: _log.info(
                f"still waiting for the host lock after {waited:.0f} s: {self._holder()} is applying "
                f"(gives up after {self.timeout:g} s, --lock-timeout)"
            )
        )
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    # Otherwise a wait of up to --lock-timeout looks like a hang.
                    _log.info(
                        f"waiting for the host lock: another nvidia-vgpu-dm ({self._holder()}) is applying; "
                        f"up to {self.timeout:g} s (--lock-timeout)"
                    )
                if self.stop is not None and self.stop.is_set():
                    os.close(fd)
                    raise ApplyInterrupted(
                        f"apply interrupted while waiting for the host lock ({self._holder()} holds it); "
                        f"every GPU is unchanged"
                    ) from None
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise HostError(
                        f"another nvidia-vgpu-dm ({self._holder()}) holds the host lock {self.path}; "
                        f"gave up after waiting {self.timeout:g} s (--lock-timeout)"
                    ) from None
                progress.sleep(self.poll)
        if waiting:
            _log.info("got the host lock")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
