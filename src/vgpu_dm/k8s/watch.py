"""Our watch loop on the agent's own Node: list → watch from the list's resourceVersion (field selector
``metadata.name=<node>``) → resume from the last resourceVersion when the server ends the stream at its
timeout → relist on 410 Gone, an error event, or a stream that broke or ended early; jittered backoff
between restarts. While nothing changes the agent holds one open watch and sends nothing else.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
from lightkube import ApiError

from vgpu_dm import log
from vgpu_dm.backoff import Backoff
from vgpu_dm.k8s.kube import Gone, Kube, Stopped, WatchError, describe

_log = log.get("k8s")


@dataclass(frozen=True)
class WatchTiming:
    timeout_min: int = 240  # timeoutSeconds of one watch request, drawn from [min, max]
    timeout_max: int = 360
    restart_initial: float = 0.5  # backoff between relists after a broken stream
    restart_max: float = 30.0
    silence_grace: float = 30.0  # a stream silent this much past its timeoutSeconds is dead


class NodeWatcher:
    """Feeds every observed state of the node (its labels, or None when it does not exist) to
    ``on_node``; reports restarts to ``on_restart(reason)``. Runs until ``stop`` is set."""

    def __init__(
        self,
        kube: Kube,
        on_node: Callable[[dict[str, str] | None], None],
        on_restart: Callable[[str], None],
        stop: threading.Event,
        timing: WatchTiming | None = None,
    ):
        self.kube = kube
        self.on_node = on_node
        self.on_restart = on_restart
        self.stop = stop
        self.timing = timing or WatchTiming()
        self.alive_at = time.monotonic()

    def run(self) -> None:
        backoff = Backoff(self.timing.restart_initial, self.timing.restart_max)
        rv: str | None = None
        while not self.stop.is_set():
            self.alive_at = time.monotonic()
            try:
                if rv is None:
                    labels, rv = self.kube.list_node()
                    if labels is None:
                        _log.warning(f"node {self.kube.node} does not exist (yet); waiting for it")
                    self.on_node(labels)
                rv, full = self._watch(rv)
                if full:
                    backoff.reset()  # the server ended a healthy stream at its timeout: resume, no relist
                    continue
                reason, why = "dropped", "the watch stream ended early"
            except Stopped:
                return
            except Gone:
                reason, why = "gone", "resourceVersion too old (410 Gone)"
            except WatchError as exc:
                reason, why = "error", str(exc)
            except (httpx2.HTTPError, ApiError) as exc:
                reason, why = (
                    ("dropped" if isinstance(exc, httpx2.TransportError) else "error"),
                    describe(exc),
                )
            if self.stop.is_set():
                return
            rv = None
            self.on_restart(reason)
            delay = backoff.next()
            _log.info(f"watch on node {self.kube.node}: {why}; relisting in {delay:.1f} s")
            if self.stop.wait(delay):
                return

    def _watch(self, rv: str) -> tuple[str, bool]:
        """One watch request from ``rv``; returns the last resourceVersion seen and whether the stream
        lasted its whole timeout (a healthy end) rather than ending early."""
        timeout = random.randint(self.timing.timeout_min, self.timing.timeout_max)
        params = {
            "watch": "1",
            "fieldSelector": f"metadata.name={self.kube.node}",
            "resourceVersion": rv,
            "timeoutSeconds": str(timeout),
            "allowWatchBookmarks": "true",
        }
        started = time.monotonic()
        for event in self.kube.stream("/api/v1/nodes", params, timeout + self.timing.silence_grace):
            self.alive_at = time.monotonic()
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
            kind = event.get("type")
            if kind in ("ADDED", "MODIFIED"):
                self.on_node(dict((obj.get("metadata") or {}).get("labels") or {}))
            elif kind == "DELETED":
                _log.warning(f"node {self.kube.node} was deleted")
                self.on_node(None)
        if self.stop.is_set():
            raise Stopped("watch")
        # The server closes a watch at timeoutSeconds; much earlier means something cut it.
        return rv, time.monotonic() - started >= timeout * 0.9
