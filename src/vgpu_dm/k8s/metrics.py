"""Prometheus metrics of the agent and its HTTP endpoint: ``/metrics``, ``/healthz`` (the loops are
alive) and ``/readyz`` (the first reconcile is done). prometheus-client is imported only here, and only
the agent imports this module.

Every counter is exported from the start, with each of its label values at 0, so that a query or an
alert sees the series before the first event (``increase()`` misses a series' first increment).
The HTTP server sleeps in ``select`` until a request or a stop comes: an idle agent never wakes up.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from vgpu_dm import log
from vgpu_dm.k8s.labels import STATES

_log = log.get("k8s")

# Label values of the counters, all exported from the start.
APPLY_RESULTS = ("success", "unchanged", "failed", "interrupted", "rebooting")
WATCH_RESTART_REASONS = ("gone", "dropped", "error")
EVENT_LOSS_REASONS = ("forbidden", "failed")


class Metrics:
    """One registry per agent (tests run several agents in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.apply_duration = Histogram(
            "vgpu_dm_apply_duration_seconds",
            "Time spent applying a vGPU config to the host (operand pause and pod wait excluded).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.applies = Counter(
            "vgpu_dm_applies_total",
            "Reconciles of the node's vGPU config by result (success, unchanged, failed, interrupted, "
            "rebooting).",
            ["result"],
            registry=r,
        )
        self.state = Gauge(
            "vgpu_dm_config_state",
            "1 for the current value of the nvidia.com/vgpu.config.state label, 0 for the others.",
            ["state"],
            registry=r,
        )
        self.watch_restarts = Counter(
            "vgpu_dm_watch_restarts_total",
            "Relists of the node watch by reason (gone = 410, dropped = stream broke or ended early, error).",
            ["reason"],
            registry=r,
        )
        self.apply_retries = Counter(
            "vgpu_dm_apply_retries_total",
            "Retries scheduled after an apply failed for a cause that can go away by itself.",
            registry=r,
        )
        self.api_retries = Counter(
            "vgpu_dm_api_retries_total",
            "Kubernetes API requests retried (409, 429, 5xx, transport errors).",
            registry=r,
        )
        self.events_not_recorded = Counter(
            "vgpu_dm_events_not_recorded_total",
            "Events the agent did not record, by reason (forbidden = RBAC grants no Events, as the GPU "
            "Operator's; failed = the API call failed).",
            ["reason"],
            registry=r,
        )
        self.last_success = Gauge(
            "vgpu_dm_last_success_timestamp_seconds",
            "Unix time of the last reconcile that ended in state success.",
            registry=r,
        )
        for state in STATES:
            self.state.labels(state).set(0)
        for counter, values in (
            (self.applies, APPLY_RESULTS),
            (self.watch_restarts, WATCH_RESTART_REASONS),
            (self.events_not_recorded, EVENT_LOSS_REASONS),
        ):
            for value in values:
                counter.labels(value)  # the series exists, at 0

    def set_state(self, state: str) -> None:
        for known in STATES:
            self.state.labels(known).set(1 if known == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` → (host, port); ValueError with a reason otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. :8080 or 127.0.0.1:8080)")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthServer:
    """Serves the metrics and probes on its own daemon thread."""

    def __init__(
        self, address: str, metrics: Metrics, healthy: Callable[[], bool], ready: Callable[[], bool]
    ):
        host, port = parse_address(address)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer.healthy()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"agent loop not running\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"first reconcile not done\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: quiet
                _log.debug(f"http {self.address_string()} {format % args}")

        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        # handle_request() after select said "readable": it must not wait again.
        self.server.timeout = 0
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        """Block until a connection or stop() (socketserver's serve_forever wakes every 0.5 s instead)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                self.server.handle_request()

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join(5)
        self.server.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)
