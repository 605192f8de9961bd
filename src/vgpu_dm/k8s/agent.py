"""The agent: a watch thread that keeps the latest view of the node, and a worker thread that
reconciles towards it. Level-triggered and coalescing: the worker always acts on the newest label
value, so values that arrive during an apply collapse into one (the latest wins). Transient failures
are retried with capped exponential backoff; config errors wait for the label or the file to change.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vgpu_dm import log
from vgpu_dm.backoff import Backoff
from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.kube import ApiTiming, Kube, Stopped, describe
from vgpu_dm.k8s.metrics import HealthServer, Metrics
from vgpu_dm.k8s.reconcile import FAILED, Outcome, PreApplyStep, Reconciler
from vgpu_dm.k8s.settings import Settings
from vgpu_dm.k8s.watch import NodeWatcher, WatchTiming

RECONCILED_KEPT = 256

_log = log.get("k8s")


class NodeView:
    """The latest labels seen on the node, with a sequence number; the watch writes, the worker waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.labels: dict[str, str] | None = None
        self.seen = False
        self.seq = 0

    def update(self, labels: dict[str, str] | None) -> None:
        with self._cond:
            self.labels = labels
            self.seen = True
            self.seq += 1
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, seq: int, timeout: float | None, stop: threading.Event) -> None:
        """Return when the view is newer than ``seq``, after ``timeout``, or when stopping."""
        with self._cond:
            self._cond.wait_for(lambda: self.seq != seq or stop.is_set(), timeout)


@dataclass
class _Retry:
    value: str
    due: float  # monotonic


class Agent:
    def __init__(
        self,
        settings: Settings,
        config,
        *,
        api_timing: ApiTiming | None = None,
        watch_timing: WatchTiming | None = None,
        pre_apply: list[PreApplyStep] | None = None,
    ):
        self.settings = settings
        self.stop_event = threading.Event()
        self.metrics = Metrics()
        self.kube = Kube(
            config,
            settings.node_name,
            settings.namespace,
            self.stop_event,
            on_retry=lambda what, why: self.metrics.api_retries.inc(),
            timing=api_timing,
            on_event_lost=lambda why: self.metrics.events_not_recorded.labels(why).inc(),
        )
        self.view = NodeView()
        self.watcher = NodeWatcher(
            self.kube,
            self.view.update,
            lambda reason: self.metrics.watch_restarts.labels(reason).inc(),
            self.stop_event,
            watch_timing,
        )
        self.reconciler = Reconciler(settings, self.kube, self.metrics, self.stop_event, pre_apply)
        self.ready = threading.Event()  # the first reconcile is done
        self.finished = threading.Event()  # the worker has ended
        # Called (from the worker thread) when it ends, e.g. to wake a main thread that waits for it.
        self.on_finished: Callable[[], None] = lambda: None
        self.server: HealthServer | None = None
        self._threads: list[threading.Thread] = []
        # The latest reconciles, oldest first (for tests and debugging); bounded, as the agent runs for
        # months and every label change adds one.
        self.reconciled: collections.deque[tuple[str, Outcome]] = collections.deque(maxlen=RECONCILED_KEPT)

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.log_driver_files()
        if self.settings.metrics_address:
            self._serve_metrics(self.settings.metrics_address)
        for target, name in ((self.watcher.run, "watch"), (self._work, "reconcile")):
            thread = threading.Thread(target=target, name=f"vgpu-dm-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve_metrics(self, address: str) -> None:
        """Open the metrics and probe endpoint. A port that cannot be bound is fatal (OSError) only when
        the address was asked for: the default :8080 may be taken on the host's network (GPU Operator
        with ``hostNetwork: true``), and upstream's agent opens no port at all, so then the agent runs
        on without the endpoint."""
        try:
            self.server = HealthServer(address, self.metrics, self.healthy, self.ready.is_set)
        except OSError as exc:
            if self.settings.metrics_required:
                raise
            _log.error(
                f"cannot serve metrics on {address} (the default): {exc.strerror or exc}; running without "
                f"/metrics, /healthz and /readyz (--metrics-address / VGPU_DM_METRICS_ADDRESS sets another "
                f"address, '' turns them off)"
            )
            return
        self.server.start()
        _log.info(f"metrics, /healthz and /readyz on {address} (port {self.server.port})")

    def log_driver_files(self) -> None:
        """Say which root serves nvidia-smi, sriov-manage and NVML (each looked for in the driver root,
        then the host root)."""
        try:
            found = self.reconciler.driver_files()
        except Exception as exc:  # the host is read again at every reconcile, which reports it
            _log.warning(f"cannot look for the driver's files: {describe(exc)}")
            return
        for file in found:
            (_log.info if file.ok else _log.warning)(f"driver files: {file.line}")

    def request_stop(self) -> None:
        """Begin a clean shutdown (SIGTERM): a running apply finishes or rolls back its current GPU,
        operand labels are restored, then the worker ends."""
        self.stop_event.set()
        self.view.poke()
        self.kube.abort_streams()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True when it has ended. The watch thread is stopped with it."""
        worker = self._threads[1]
        worker.join(timeout)
        if worker.is_alive():
            return False
        self.kube.abort_streams()
        self._threads[0].join(5)
        if self.server:
            self.server.stop()
        self.kube.close()
        return True

    def healthy(self) -> bool:
        return (
            bool(self._threads) and all(t.is_alive() for t in self._threads) and not self.stop_event.is_set()
        )

    # -- the worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._loop()
        finally:
            self.finished.set()
            self.on_finished()

    def _loop(self) -> None:
        handled: str | None = None  # the value the last reconcile was for
        retry: _Retry | None = None
        backoff = Backoff(self.settings.retry_initial, self.settings.retry_max)
        seq = -1
        first = True
        while not self.stop_event.is_set():
            timeout = None if retry is None else max(0.0, retry.due - time.monotonic())
            if self.view.seq == seq or not self.view.seen:
                self.view.wait(seq, timeout, self.stop_event)
            if self.stop_event.is_set():
                break
            seq = self.view.seq
            if not self.view.seen or self.view.labels is None:
                continue  # no node yet (or it was deleted): nothing to act on
            value = L.desired_config(self.view.labels, self.settings.default_config)
            due = retry is not None and retry.value == value and time.monotonic() >= retry.due
            if value == handled and not due and not first:
                continue
            if value != handled:
                backoff.reset()
                retry = None
            try:
                outcome = self.reconciler.reconcile(value)
            except Stopped:
                break
            except Exception as exc:  # a bug must not kill the loop silently: fail visibly, retry later
                _log.exception(f"reconcile of {value!r} crashed")
                outcome = Outcome(FAILED, "VGPUConfigFailed", f"internal error: {describe(exc)}", True)
            self.reconciled.append((value, outcome))
            handled = value
            if first:
                # Operand labels a crashed agent left paused: the reconcile above did not need them.
                self.reconciler.restore_operands()
                first = False
                self.ready.set()
            if outcome.transient and outcome.result == FAILED and not self.stop_event.is_set():
                delay = backoff.next()
                retry = _Retry(value, time.monotonic() + delay)
                self.metrics.apply_retries.inc()
                text = (
                    f"config {value!r} failed for a cause that may pass; "
                    f"retry {backoff.attempt} in {delay:.0f} s"
                )
                _log.warning(text)
                self.kube.event("VGPUConfigRetry", text, warning=True, ignore_stop=True)
            else:
                retry = None
        _log.info("agent stopped")
