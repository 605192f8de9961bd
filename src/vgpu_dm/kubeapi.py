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
import random
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


def raise_for_api_status(resp: httpx2.Response) -> None:
    """An error answer as an exception: ApiError when the server sent a Status (JSON), else httpx's own
    HTTPStatusError (a proxy's or load balancer's page). The body must have been read."""
    if resp.status_code >= 400:
        if "json" in resp.headers.get("content-type", ""):
            raise ApiError(request=resp.request, response=resp)
        resp.raise_for_status()


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
                    raise_for_api_status(resp)
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

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> dict:
        """One plain GET; ApiError (or HTTPStatusError) on an error status."""
        resp = self.http.request("GET", path, params=dict(params or {}))
        raise_for_api_status(resp)
        return resp.json()


class ListWatch:
    """Keeps a consumer up to date with a collection, as an informer does: list (in pages) → watch from
    the list's resourceVersion → resume from the last resourceVersion when the server ends a healthy
    stream at its timeout → relist on 410 Gone, an error event, or a stream that broke or ended early,
    with jittered backoff between relists. ``synced`` is True from a complete list until the next
    failure: while it is False the consumer's copy may be missing changes."""

    def __init__(
        self,
        streams: WatchStreams,
        path: str,
        *,
        on_list: Callable[[list[dict]], None],
        on_event: Callable[[str, dict], None],
        params: Mapping[str, str] | None = None,
        page: int = 500,
        timeout: tuple[int, int] = (240, 360),
        silence_grace: float = 30.0,
        restart: tuple[float, float] = (0.5, 30.0),
        logger=None,
        name: str | None = None,
    ):
        """``name``: follow one object, listed by a GET of ``path/name`` (RBAC ``get`` rather than
        ``list``) and watched with the field selector ``metadata.name``."""
        self.streams = streams
        self.path = path
        self.on_list = on_list
        self.on_event = on_event
        self.name = name
        self.params = dict(params or {})
        if name is not None:
            self.params["fieldSelector"] = f"metadata.name={name}"
        self.page = page
        self.timeout = timeout
        self.silence_grace = silence_grace
        self.restart = restart
        self.log = logger or _log
        self.synced = False
        self.lists = 0  # how many complete lists were made (tests and logs)

    def _list(self) -> str:
        if self.name is not None:
            try:
                obj = self.streams.get_json(f"{self.path}/{self.name}")
            except ApiError as exc:
                if status_code(exc) != 404:
                    raise
                # Not there (yet): watch from "now"; the server sends it as ADDED once it exists.
                self.on_list([])
                self.lists += 1
                return ""
            self.on_list([obj])
            self.lists += 1
            return (obj.get("metadata") or {}).get("resourceVersion") or ""
        items: list[dict] = []
        token = ""
        while True:
            params = {**self.params, "limit": str(self.page)}
            if token:
                params["continue"] = token
            found = self.streams.get_json(self.path, params)
            items.extend(found.get("items") or [])
            meta = found.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                self.on_list(items)
                self.lists += 1
                return meta.get("resourceVersion") or ""

    def _watch(self, rv: str) -> tuple[str, bool]:
        timeout = random.randint(*self.timeout)
        params = {
            **self.params,
            "watch": "1",
            "resourceVersion": rv,
            "timeoutSeconds": str(timeout),
            "allowWatchBookmarks": "true",
        }
        started = time.monotonic()
        for event in self.streams.stream(self.path, params, timeout + self.silence_grace):
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self.on_event(event["type"], obj)
        if self.streams.stop.is_set():
            raise Stopped(self.path)
        # The server closes a watch at timeoutSeconds; much earlier means something cut it.
        return rv, time.monotonic() - started >= timeout * 0.9

    def run(self) -> None:
        stop = self.streams.stop
        backoff = Backoff(*self.restart)
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    self.synced = True
                rv, full = self._watch(rv)
                if full:
                    backoff.reset()
                    continue
                why = "the watch stream ended early"
            except Stopped:
                return
            except Gone:
                why = "resourceVersion too old (410 Gone)"
            except WatchError as exc:
                why = str(exc)
            except (httpx2.HTTPError, ApiError, ValueError) as exc:
                why = describe(exc)
            self.synced = False
            rv = None
            if stop.is_set():
                return
            delay = backoff.next()
            self.log.info(f"watch {self.path}: {why}; relisting in {delay:.1f} s")
            if stop.wait(delay):
                return
