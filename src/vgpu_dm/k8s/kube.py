"""The agent's Kubernetes API calls: lightkube for requests, our own streaming for watches.

Every call goes through ``Kube.call``, which retries 409, 429, 5xx and transport errors with jittered
exponential backoff and gives up only when told to stop (or at a deadline).

Label changes are JSON merge patches of ``metadata.labels`` where RBAC allows ``patch``. The GPU
Operator grants ``nodes: update`` but not ``patch`` (reference/gpu-operator.md §1): when the authorizer
refuses the patch verb (403 ``Forbidden``, ``cannot patch resource "nodes"``; not an admission denial,
which would refuse an update too) the agent switches, for the life of the process, to GET + PUT of
the Node with its resourceVersion, changing only its own labels, and on 409 (another writer came in
between) starts again from the fresh object. The PUT sends back the JSON the server gave, not a typed
model: lightkube's models drop fields they do not know, and a PUT without them would erase a newer
server's Node fields.

Events are optional: the operator's RBAC does not grant them. A 403 on Event creation is said once, at
info, and no Event is attempted again; every Event not recorded is counted.

Watches are read with ``vgpu_dm.kubeapi.WatchStreams`` (shared with the DRA driver), not lightkube's
``Client.watch``; the loops that call ``stream`` (``watch.py``, ``wait_pods_gone``) decide when to
resume, relist and back off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError, Client
from lightkube.config.client_adapter import Client as HttpClient
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import SingleConfig
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Node, Pod
from lightkube.types import PatchType

from vgpu_dm import log
from vgpu_dm.backoff import Backoff
from vgpu_dm.kubeapi import (
    Gone,
    Stopped,
    WatchError,
    WatchStreams,
    call_with_retries,
    describe,
    raise_for_api_status,
    retriable,
    status_code,
)
from vgpu_dm.nodeconfig import load_kubeconfig

__all__ = [
    "Gone",
    "Kube",
    "Stopped",
    "WatchError",
    "describe",
    "raise_for_api_status",
    "retriable",
    "status_code",
]

COMPONENT = "nvidia-k8s-vgpu-dm"
T = TypeVar("T")
# From the node's current labels to the changes wanted (label → value; None removes it).
Decide = Callable[[Mapping[str, str]], Mapping[str, str | None]]
PATCH, UPDATE = "patch", "update"  # how node labels are written
# GET + PUT rounds tried at once when another writer keeps changing the Node in between; then the 409
# goes to Kube.call's backoff.
CONFLICT_TRIES = 5
_log = log.get("k8s")


def patch_not_allowed(exc: BaseException) -> bool:
    """Whether the API server refused a patch of nodes because the authorizer does not grant the verb:
    403 with reason ``Forbidden`` and the authorizer's message (``User "…" cannot patch resource
    "nodes" …``). Other 403s — an admission webhook or a ValidatingAdmissionPolicy that answers with
    Forbidden — refuse this change, not the verb, and an update would be refused the same way."""
    if status_code(exc) != 403 or not isinstance(exc, ApiError) or exc.status is None:
        return False
    return exc.status.reason == "Forbidden" and 'cannot patch resource "nodes"' in (exc.status.message or "")


@dataclass(frozen=True)
class ApiTiming:
    request_timeout: float = 10.0  # connect/read timeout of one ordinary request
    retry_initial: float = 0.2
    retry_max: float = 5.0
    shutdown_grace: float = 20.0  # calls that must still happen after SIGTERM are retried this long


def load_config(kubeconfig: str | None) -> SingleConfig:
    """The kubeconfig file's current context, or the in-cluster service account when no file is given."""
    return load_kubeconfig(kubeconfig)


class Kube:
    """API access for one node's agent. Thread-safe: the watch thread and the worker share it."""

    def __init__(
        self,
        config: SingleConfig,
        node: str,
        namespace: str,
        stop: threading.Event,
        on_retry: Callable[[str, str], None] | None = None,
        timing: ApiTiming | None = None,
        on_event_lost: Callable[[str], None] | None = None,
    ):
        self.node = node
        self.namespace = namespace
        self.stop = stop
        self.timing = timing or ApiTiming()
        self.on_retry = on_retry or (lambda what, why: None)
        self.on_event_lost = on_event_lost or (lambda why: None)
        self.label_mode: str | None = None  # PATCH or UPDATE once the first label write said which
        self.events_forbidden = False
        self._mode_lock = threading.Lock()
        timeout = httpx2.Timeout(self.timing.request_timeout)
        self.client = Client(config, trust_env=False, timeout=timeout, field_manager=COMPONENT)
        # Watches: same server, TLS and credentials; no read timeout of their own (see ``stream``).
        self._http = HttpClient(config, ConnectionParams(timeout=timeout, trust_env=False))
        self._watches = WatchStreams(self._http, stop, self.timing.request_timeout)
        self.node_uid: str | None = None

    def close(self) -> None:
        self.abort_streams()
        self.client.close()
        self._http.close()

    # -- retries -------------------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], T], *, deadline: float | None = None, ignore_stop=False) -> T:
        """``fn()``, retried while the failure is transient; raises Stopped when the agent stops
        (unless ``ignore_stop``: restoring operand labels must go on while shutting down), and the last
        error once ``deadline`` (monotonic) would be passed."""
        return call_with_retries(
            what,
            fn,
            stop=self.stop,
            initial=self.timing.retry_initial,
            cap=self.timing.retry_max,
            deadline=deadline,
            ignore_stop=ignore_stop,
            shutdown_grace=self.timing.shutdown_grace,
            on_retry=self.on_retry,
        )

    # -- the node --------------------------------------------------------------------------------------

    def list_node(self) -> tuple[dict[str, str] | None, str]:
        """The node's labels (None if there is no such node) and the list's resourceVersion."""

        def once() -> tuple[dict[str, str] | None, str]:
            found = self.client.list(Node, fields={"metadata.name": self.node})
            items = list(found)
            labels = None
            if items:
                self.node_uid = items[0].metadata.uid
                labels = dict(items[0].metadata.labels or {})
            return labels, found.resourceVersion

        return self.call(f"list node {self.node}", once)

    def labels(self, **kw: Any) -> dict[str, str]:
        def once() -> dict[str, str]:
            node = self.client.get(Node, self.node)
            self.node_uid = node.metadata.uid
            return dict(node.metadata.labels or {})

        return self.call(f"get node {self.node}", once, **kw)

    def patch_labels(self, labels: Mapping[str, str | None], **kw: Any) -> dict[str, str]:
        """Set (None: remove) these labels of the node and no others; returns the node's labels after.
        A JSON merge patch, or GET + update once the server refused a patch (see the module doc)."""
        shown = ", ".join(f"{k}={v}" for k, v in labels.items())
        return self._write(
            f"set labels of node {self.node} ({shown})",
            lambda: self._merge_patch(labels),
            lambda: self._update_labels(lambda _current: labels),
            **kw,
        )

    def change_labels(self, decide: Decide, what: str, **kw: Any) -> dict[str, str]:
        """Change labels as ``decide(current labels)`` says (label → value, None removes; nothing: no
        write), decided on the very object that is written: a GET, then a merge patch that carries the
        GET's resourceVersion or an update; when someone wrote in between (409), decided again on the
        fresh node. Returns the node's labels after. (A decision on one GET and an absolute write after
        it would overwrite, e.g., an operand label the admin set to ``false`` in between.)"""
        return self._write(
            f"{what} on node {self.node}",
            lambda: self._conditional_patch(decide),
            lambda: self._update_labels(decide),
            **kw,
        )

    def _write(self, what: str, patch: Callable[[], T], update: Callable[[], T], **kw: Any) -> T:
        """``patch`` until the server refuses the verb, then ``update`` for the life of the process."""
        if self.label_mode != UPDATE:
            _log.debug(f"{what}: by merge patch")
            try:
                result = self.call(what, patch, **kw)
            except ApiError as exc:
                if not patch_not_allowed(exc):
                    raise
                self._use_mode(UPDATE, f"the API server refused to patch node {self.node} ({describe(exc)})")
            else:
                self._use_mode(PATCH)
                return result
        _log.debug(f"{what}: by GET + update")
        return self.call(what, update, **kw)

    def _use_mode(self, mode: str, why: str = "") -> None:
        """Remember how labels are written; say it once, at info."""
        with self._mode_lock:
            if self.label_mode == mode or self.label_mode == UPDATE:
                return
            self.label_mode = mode
        if mode == PATCH:
            _log.info(f"node labels are written by JSON merge patch of node {self.node}'s metadata.labels")
        else:
            _log.info(
                f"{why}: node labels are written by GET + update of node {self.node} with its "
                f"resourceVersion from now on (RBAC does not grant nodes 'patch'; the GPU Operator's grants "
                f"'update' instead); only this agent's labels are changed"
            )

    def _merge_patch(self, labels: Mapping[str, str | None]) -> dict[str, str]:
        node = self.client.patch(
            Node, self.node, {"metadata": {"labels": dict(labels)}}, patch_type=PatchType.MERGE
        )
        return dict(node.metadata.labels or {})

    def _request(self, method: str, path: str, **kw: Any) -> dict:
        """One plain JSON request with the agent's credentials; ApiError on an API error."""
        resp = self._http.request(method, path, **kw)
        raise_for_api_status(resp)
        return resp.json()

    def _fresh(self, decide: Decide) -> tuple[dict, dict[str, str], dict[str, str]]:
        """GET the node; (the node as JSON, its labels, the labels ``decide`` wants)."""
        node = self._request("GET", f"/api/v1/nodes/{self.node}")
        meta = node.setdefault("metadata", {})
        self.node_uid = meta.get("uid", self.node_uid)
        current = dict(meta.get("labels") or {})
        wanted = dict(current)
        for key, value in decide(current).items():
            if value is None:
                wanted.pop(key, None)
            else:
                wanted[key] = value
        return node, current, wanted

    def _conditional_patch(self, decide: Decide) -> dict[str, str]:
        """GET, decide, then a merge patch carrying the GET's resourceVersion (the server refuses it with
        409 when the node changed since); a 409 decides again on the fresh node."""
        path = f"/api/v1/nodes/{self.node}"
        for attempt in range(1, CONFLICT_TRIES + 1):
            node, current, wanted = self._fresh(decide)
            if wanted == current:
                return current
            keys = set(current) | set(wanted)
            changes = {k: wanted.get(k) for k in keys if current.get(k) != wanted.get(k)}
            version = node["metadata"].get("resourceVersion")
            body = {"metadata": {"resourceVersion": version, "labels": changes}}
            try:
                patched = self._request(
                    "PATCH",
                    path,
                    json=body,
                    params={"fieldManager": COMPONENT},
                    headers={"Content-Type": PatchType.MERGE.value},
                )
            except ApiError as exc:
                if status_code(exc) != 409 or attempt == CONFLICT_TRIES:
                    raise
                _log.debug(f"patch of node {self.node}: {describe(exc)}; deciding again on the fresh node")
                continue
            return dict((patched.get("metadata") or {}).get("labels") or {})
        raise AssertionError("unreachable")

    def _update_labels(self, decide: Decide) -> dict[str, str]:
        """GET the node, change only the labels ``decide`` names, PUT it back with its resourceVersion; a
        409 means someone wrote in between: decide again on the fresh object (their change kept)."""
        path = f"/api/v1/nodes/{self.node}"
        for attempt in range(1, CONFLICT_TRIES + 1):
            node, current, wanted = self._fresh(decide)
            if wanted == current:
                return current
            node["metadata"]["labels"] = wanted
            try:
                updated = self._request("PUT", path, json=node, params={"fieldManager": COMPONENT})
            except ApiError as exc:
                if status_code(exc) != 409 or attempt == CONFLICT_TRIES:
                    raise
                _log.debug(f"update of node {self.node}: {describe(exc)}; again from the fresh node")
                continue
            return dict((updated.get("metadata") or {}).get("labels") or {})
        raise AssertionError("unreachable")

    # -- events ----------------------------------------------------------------------------------------

    def event(self, reason: str, message: str, warning: bool = False, **kw: Any) -> None:
        """A core/v1 Event about the Node, created in the agent's namespace. A failure to record it is
        logged, never fatal: the state label already tells the outcome."""
        now = datetime.now(timezone.utc)
        event = Event(
            metadata=ObjectMeta(generateName=f"{self.node}.vgpu-dm.", namespace=self.namespace),
            # The API server wants an Event's involvedObject.namespace to be the Event's own; for a
            # cluster-scoped Node that means the agent's namespace (where RBAC lets it create Events).
            involvedObject=ObjectReference(
                apiVersion="v1", kind="Node", name=self.node, uid=self.node_uid, namespace=self.namespace
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=EventSource(component=COMPONENT, host=self.node),
            reportingComponent=COMPONENT,
            reportingInstance=self.node,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        if self.events_forbidden:
            self.on_event_lost("forbidden")
            _log.debug(f"event {reason} not recorded (Events are not allowed): {message}")
            return
        try:
            self.call(f"create event {reason}", lambda: self.client.create(event), **kw)
        except Stopped:
            raise
        except Exception as exc:  # an Event is best effort; the state label is the contract
            if status_code(exc) == 403:
                self.events_forbidden = True
                self.on_event_lost("forbidden")
                _log.info(
                    f"Events are not recorded: creating one in namespace {self.namespace} was refused "
                    f"({describe(exc)}); the state label nvidia.com/vgpu.config.state and this log tell "
                    f"the outcome (the GPU Operator's RBAC grants no Events); counted in "
                    f"vgpu_dm_events_not_recorded_total"
                )
                return
            self.on_event_lost("failed")
            _log.warning(f"could not record event {reason} on node {self.node}: {describe(exc)}")

    # -- watches ---------------------------------------------------------------------------------------

    def stream(self, path: str, params: Mapping[str, Any], read_timeout: float | None) -> Iterator[dict]:
        """One watch request's events (``kubeapi.WatchStreams.stream``)."""
        return self._watches.stream(path, params, read_timeout)

    def abort_streams(self) -> None:
        """Close open watch streams (from another thread) so their readers return now."""
        self._watches.abort()

    # -- operand pods ----------------------------------------------------------------------------------

    def _pod_names(self, selector: str) -> tuple[set[str], str]:
        found = self.client.list(
            Pod, namespace=self.namespace, labels=_selector(selector), fields={"spec.nodeName": self.node}
        )
        names = {p.metadata.name for p in found}
        return names, found.resourceVersion

    def wait_pods_gone(self, selector: str, deadline: float) -> set[str]:
        """Wait until no pod matching ``selector`` runs on this node (pods being deleted count until they
        are gone); returns the names still there at ``deadline`` (empty = all gone). List, then watch
        from the list's resourceVersion; relist when a watch ends."""
        backoff = Backoff(self.timing.retry_initial, self.timing.retry_max)
        names: set[str] = set()
        while True:
            names, rv = self.call(
                f"list pods {selector} on {self.node}", lambda: self._pod_names(selector), deadline=deadline
            )
            remaining = deadline - time.monotonic()
            if not names or remaining <= 0:
                return names
            _log.info(
                f"waiting for {len(names)} pod(s) {selector} to leave node {self.node}: {sorted(names)}"
            )
            params = {
                "watch": "1",
                "labelSelector": selector,
                "fieldSelector": f"spec.nodeName={self.node}",
                "resourceVersion": rv,
                "timeoutSeconds": str(max(1, int(remaining + 0.999))),
                "allowWatchBookmarks": "true",
            }
            try:
                for event in self.stream(f"/api/v1/namespaces/{self.namespace}/pods", params, remaining + 5):
                    name = (event.get("object") or {}).get("metadata", {}).get("name")
                    if event["type"] in ("ADDED", "MODIFIED") and name:
                        names.add(name)
                    elif event["type"] == "DELETED":
                        names.discard(name)
                        if not names:
                            return names
            except Gone:
                continue
            except Stopped:
                raise
            except (httpx2.HTTPError, ApiError, WatchError) as exc:
                if self.stop.is_set():
                    raise Stopped("wait for operand pods") from None
                delay = backoff.next()
                self.on_retry("watch operand pods", describe(exc))
                _log.warning(f"watching pods {selector}: {describe(exc)}; relisting in {delay:.1f} s")
                if self.stop.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                    raise Stopped("wait for operand pods") from None
            if self.stop.is_set():
                raise Stopped("wait for operand pods")


def _selector(text: str) -> dict[str, str]:
    """``a=b,c=d`` → lightkube's label selector mapping."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out
