"""Kubernetes API machinery both front ends share — the agent (``vgpu_dm.k8s``) and the DRA driver
(``vgpu_dm.dra``), neither of which imports the other: an API error's status and how to say it, which
failures go away by themselves, a bounded retry loop with jittered backoff, and one watch request read
as a stream of events.

Watches are read here, not through lightkube's ``Client.watch``: that one silently re-opens a stream
that ends without an error, which turns a proxy that drops streams at once into a request storm, and
hides every restart. ``WatchStreams.stream`` opens one watch request and yields its events; the loops
that call it decide when to resume, relist and back off.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError

from vgpu_dm import log
from vgpu_dm.backoff import Backoff

T = TypeVar("T")
_log = log.get("k8s")


class Stopped(Exception):
    """Told to stop while a call was waiting to be retried or a watch was open."""


class Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


class WatchError(Exception):
    """The server ended a watch with an error event other than 410."""


def status_code(exc: BaseException) -> int | None:
    """HTTP status of an API error, else None (transport errors, timeouts)."""
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.code:
        return int(exc.status.code)
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def describe(exc: BaseException) -> str:
    code = status_code(exc)
    if code is not None:
        message = exc.status.message if isinstance(exc, ApiError) and exc.status else ""
        return f"HTTP {code}" + (f" ({message})" if message else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def retriable(exc: BaseException, conflicts: bool = True) -> bool:
    """Throttling, server errors and broken connections go away by themselves; so do conflicts for a
    caller that reads the object afresh on each try (``conflicts``), but not for one that sends the
    same resourceVersion again."""
    if isinstance(exc, httpx2.TransportError):
        return True
    code = status_code(exc)
    return code is not None and (code == 429 or code >= 500 or (conflicts and code == 409))


def call_with_retries(
    what: str,
    fn: Callable[[], T],
    *,
    stop: threading.Event,
    initial: float = 0.2,
    cap: float = 5.0,
    deadline: float | None = None,
    ignore_stop: bool = False,
    shutdown_grace: float = 20.0,
    conflicts: bool = True,
    on_retry: Callable[[str, str], None] | None = None,
    logger=None,
) -> T:
    """``fn()``, retried while the failure is transient (``retriable``). Raises Stopped when ``stop``
    is set (unless ``ignore_stop``: a call that must still happen while shutting down is then retried
    for ``shutdown_grace`` seconds), and the last error once ``deadline`` (monotonic) would be passed."""
    backoff = Backoff(initial, cap)
    while True:
        if stop.is_set():
            if not ignore_stop:
                raise Stopped(what)
            if deadline is None:
                deadline = time.monotonic() + shutdown_grace
        try:
            return fn()
        except (httpx2.HTTPError, ApiError) as exc:
            if not retriable(exc, conflicts):
                raise
            delay = backoff.next()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            why = describe(exc)
            if on_retry is not None:
                on_retry(what, why)
            (logger or _log).warning(f"{what}: {why}; retrying in {delay:.1f} s")
            if stop.wait(delay) and not ignore_stop:
                raise Stopped(what) from None


class WatchStreams:
    """Watch requests over one HTTP client (lightkube's adapter: the server, TLS and credentials), and
    closing them from another thread when told to stop."""

    def __init__(self, http, stop: threading.Event, request_timeout: float):
        self.http = http
        self.stop = stop
        self.request_timeout = request_timeout
        self._open: set[httpx2.Response] = set()
        self._lock = threading.Lock()

    def stream(self, path: str, params: Mapping[str, Any], read_timeout: float | None) -> Iterator[dict]:
        """One watch request: yields its events (``{"type": …, "object": {…}}``) until the server ends
        the stream. Raises Gone on 410, WatchError on other error events, HTTP/transport errors as is.

        ``read_timeout`` bounds the silence between two lines, so a connection that died without a FIN
        (a crashed node, a lost route) is noticed instead of waited on forever.
        """
        timeout = httpx2.Timeout(self.request_timeout, read=read_timeout)
        with self.http.stream("GET", path, params=dict(params), timeout=timeout) as resp:
            with self._lock:
                self._open.add(resp)
                # A stop that came before this stream was registered found nothing to abort: check it
                # here, under the same lock as abort, so no stream outlives a stop.
                stopping = self.stop.is_set()
            try:
                if stopping:
                    raise Stopped(path)
                if resp.status_code == 410:
                    raise Gone(f"{path}: HTTP 410")
                if resp.status_code >= 400:
                    resp.read()
                    if "json" in resp.headers.get("content-type", ""):
                        raise ApiError(request=resp.request, response=resp)
                    resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        if status.get("code") == 410:
                            raise Gone(status.get("message", "410 Gone"))
                        raise WatchError(f"HTTP {status.get('code')}: {status.get('message', '')}")
                    yield event
            finally:
                with self._lock:
                    self._open.discard(resp)

    def abort(self) -> None:
        """Close open watch streams (from another thread) so their readers return now."""
        with self._lock:
            streams = list(self._open)
        for resp in streams:
            # resp.close() alone does not wake a thread blocked in recv() on the socket; shutting the
            # socket down does. Either may race with the reader's own close: it is closed either way.
            with contextlib.suppress(Exception):
                stream = resp.extensions.get("network_stream")
                sock = stream.get_extra_info("socket") if stream is not None else None
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                resp.close()
