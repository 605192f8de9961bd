"""The DRA driver's Kubernetes API calls (lightkube): its Node, its pool's ResourceSlices, the
ResourceClaims it prepares, and the watches of its Node and of ResourceClaims (``kubeapi.ListWatch``).
Transient failures (409 on a stale update aside, 429, 5xx, broken connections) are retried with
jittered backoff for a bounded time; anything else is raised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError, Client
from lightkube.config.client_adapter import Client as HttpClient
from lightkube.config.client_adapter import ConnectionParams
from lightkube.resources.core_v1 import Node
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

from vgpu_dm import log
from vgpu_dm.dra.allocations import Allocations
from vgpu_dm.dra.slices import SliceInvalid
from vgpu_dm.kubeapi import ListWatch, WatchStreams, call_with_retries, describe, status_code
from vgpu_dm.nodeconfig import load_kubeconfig

__all__ = ["COMPONENT", "DraApi", "describe", "status_code"]

T = TypeVar("T")
COMPONENT = "nvidia-vgpu-dra"
_log = log.get("dra")


class DraApi:
    """API access for one node's DRA driver; thread-safe (gRPC handlers and the publisher share it)."""

    def __init__(self, kubeconfig: str | None, node: str, stop: threading.Event, deadline: float = 20.0):
        self.node = node
        self.stop = stop
        self.deadline = deadline  # seconds a call is retried (prepare must answer within the kubelet's 45 s)
        config = load_kubeconfig(kubeconfig)
        self.client = Client(config, trust_env=False, timeout=httpx2.Timeout(10.0), field_manager=COMPONENT)
        # Watches (the node's labels, ResourceClaims): our stream reader over the same credentials.
        http = HttpClient(config, ConnectionParams(timeout=httpx2.Timeout(10.0), trust_env=False))
        self.watches = WatchStreams(http, stop, 10.0)
        self.node_uid: str | None = None

    def close(self) -> None:
        self.watches.abort()
        self.client.close()
        self.watches.http.close()

    def call(self, what: str, fn: Callable[[], T], deadline: float | None = None) -> T:
        """``fn()``, retried while the failure is transient, for at most ``self.deadline`` seconds (and
        not past ``deadline``, monotonic). A 409 is not retried: the writes here send the resourceVersion
        they read, so a retry would conflict too."""
        end = time.monotonic() + self.deadline
        return call_with_retries(
            what,
            fn,
            stop=self.stop,
            deadline=end if deadline is None else min(end, deadline),
            conflicts=False,
            logger=_log,
        )

    # -- the node --------------------------------------------------------------------------------------

    def node_labels(self) -> dict[str, str]:
        def once() -> dict[str, str]:
            node = self.client.get(Node, self.node)
            self.node_uid = node.metadata.uid
            return dict(node.metadata.labels or {})

        return self.call(f"get node {self.node}", once)

    def node_watch(self, on_labels: Callable[[dict[str, str]], None]) -> ListWatch:
        """A list + watch of this node that feeds its labels to ``on_labels`` (run it in a thread)."""

        def labels_of(node: dict) -> dict[str, str]:
            return dict((node.get("metadata") or {}).get("labels") or {})

        def on_list(items: list[dict]) -> None:
            for node in items:
                on_labels(labels_of(node))

        return ListWatch(
            self.watches,
            "/api/v1/nodes",
            name=self.node,
            on_list=on_list,
            on_event=lambda kind, node: on_labels(labels_of(node)) if kind != "DELETED" else None,
            logger=_log,
        )

    # -- ResourceSlices --------------------------------------------------------------------------------

    def list_slices(self, node: str, driver: str) -> list[dict[str, Any]]:
        def once() -> list[dict[str, Any]]:
            found = self.client.list(ResourceSlice, fields={"spec.nodeName": node, "spec.driver": driver})
            return [s.to_dict() for s in found]

        return self.call("list ResourceSlices", once)

    def put_slice(
        self,
        name: str,
        spec: dict[str, Any],
        annotations: dict[str, str],
        existing: dict[str, Any] | None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Create or replace the slice ``name``; returns it as stored (with ``dry_run``: as it would be
        stored, nothing written). Raises SliceInvalid when the server refuses it (422: e.g. a layout this
        Kubernetes version does not accept, or an admission policy)."""
        if self.node_uid is None:
            self.node_labels()
        body = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": name,
                "annotations": annotations,
                "labels": {"app.kubernetes.io/managed-by": COMPONENT},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": self.node,
                        "uid": self.node_uid,
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
        }
        if existing is not None:
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        obj = ResourceSlice.from_dict(body)

        def once() -> dict[str, Any]:
            if existing is None:
                return self.client.create(obj, dry_run=dry_run).to_dict()
            return self.client.replace(obj, dry_run=dry_run).to_dict()

        try:
            return self.call(f"{'dry-run ' if dry_run else ''}write ResourceSlice {name}", once)
        except ApiError as exc:
            if status_code(exc) == 422:
                raise SliceInvalid(describe(exc)) from None
            raise

    def delete_slice(self, name: str) -> None:
        def once() -> None:
            try:
                self.client.delete(ResourceSlice, name)
            except ApiError as exc:
                if status_code(exc) != 404:
                    raise

        self.call(f"delete ResourceSlice {name}", once)

    # -- ResourceClaims --------------------------------------------------------------------------------

    def get_claim(self, namespace: str, name: str, deadline: float | None = None) -> dict[str, Any] | None:
        def once() -> dict[str, Any] | None:
            try:
                return self.client.get(ResourceClaim, name, namespace=namespace).to_dict()
            except ApiError as exc:
                if status_code(exc) == 404:
                    return None
                raise

        return self.call(f"get ResourceClaim {namespace}/{name}", once, deadline)

    def claim_watch(self, allocations: Allocations) -> ListWatch:
        """A list + watch of ResourceClaims in every namespace that keeps ``allocations`` up to date (run
        it in a thread). Claims have no field selector for their allocation, hence every namespace."""
        watch = ListWatch(
            self.watches,
            "/apis/resource.k8s.io/v1/resourceclaims",
            on_list=allocations.replace,
            on_event=allocations.update,
            logger=_log,
        )
        allocations.synced = lambda: watch.synced
        return watch
