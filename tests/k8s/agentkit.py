"""Running the agent in tests: in a thread of the test process (same code as the console script's
``run``, minus the signal handlers) or as the installed ``nvidia-k8s-vgpu-dm`` process; a simulated
host with a config file; and, for the real API server, a thread that plays kubelet + DaemonSet
controller for the sandbox operands while recording the node's label history from a watch.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.agent import Agent
from vgpu_dm.k8s.kube import ApiTiming, load_config
from vgpu_dm.k8s.settings import Settings
from vgpu_dm.k8s.watch import WatchTiming
from vgpu_dm.sim.layout import create_host

AGENT = Path(sys.executable).parent / "nvidia-k8s-vgpu-dm"
T4_CONFIG = """\
version: v1
vgpu-configs:
  default:
    - devices: all
      vgpu-devices: {"T4-8Q": 2}
  T4-4Q:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  T4-2Q:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
  T4-16Q:
    - devices: all
      vgpu-devices: {"T4-16Q": 1}
  T4-1Q:
    - devices: all
      vgpu-devices: {"T4-1Q": 16}
  too-many:
    - devices: all
      vgpu-devices: {"T4-16Q": 2}
"""
FAST_API = ApiTiming(request_timeout=5.0, retry_initial=0.05, retry_max=0.5, shutdown_grace=5.0)
FAST_WATCH = WatchTiming(timeout_min=240, timeout_max=360, restart_initial=0.1, restart_max=1.0)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition", step=0.05):
    """Poll ``predicate`` (test side only) until it is truthy; return its value or fail saying what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


@dataclass
class SimSetup:
    root: Path
    config: Path


def make_sim(base: Path, gpus: tuple[str, ...] = ("T4", "T4"), config: str = T4_CONFIG) -> SimSetup:
    root = base / "host"
    create_host(root, list(gpus))
    path = base / "config.yaml"
    path.write_text(config)
    return SimSetup(root, path)


def settings_for(node: str, namespace: str, sim: SimSetup, **overrides) -> Settings:
    base = Settings(
        node_name=node,
        namespace=namespace,
        config_file=str(sim.config),
        default_config="default",
        sim=str(sim.root),
        metrics_address="127.0.0.1:0",
        operand_timeout=20.0,
        retry_initial=60.0,
        retry_max=600.0,
        lock_timeout=5.0,
        gpu_clients_settle=0.0,  # not upstream's 30 s before a MIG mode change: tests set it when needed
    )
    return replace(base, **overrides)


@contextlib.contextmanager
def running_agent(
    kubeconfig: str, settings: Settings, api_timing=FAST_API, watch_timing=FAST_WATCH, pre_apply=None
) -> Iterator[Agent]:
    agent = Agent(
        settings,
        load_config(kubeconfig),
        api_timing=api_timing,
        watch_timing=watch_timing,
        pre_apply=pre_apply,
    )
    agent.start()
    try:
        yield agent
    finally:
        agent.request_stop()
        assert agent.join(timeout=30), "the agent did not stop within 30 s"


def agent_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The installed entry point as a separate process (stderr captured)."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_") or k == "VGPU_DM_SIM_MIG_PARTED"
    }
    for key in ("KUBECONFIG", "NODE_NAME", "NAMESPACE", "CONFIG_FILE", "DEFAULT_VGPU_CONFIG"):
        base.pop(key, None)
    base.update(env or {})
    return subprocess.Popen(
        [str(AGENT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base
    )


# -- the real API server: node labels and events, kubelet + DaemonSet controller, label history ------

PAUSED_BOTH = {L.DEVICE_PLUGIN_LABEL: L.PAUSED, L.VALIDATOR_LABEL: L.PAUSED}
ON_BOTH = {L.DEVICE_PLUGIN_LABEL: "true", L.VALIDATOR_LABEL: "true"}


def node_labels(client, node: str) -> dict[str, str]:
    from lightkube.resources.core_v1 import Node

    return dict(client.get(Node, node).metadata.labels or {})


def set_labels(client, node: str, labels: dict[str, str | None]) -> None:
    from lightkube.resources.core_v1 import Node
    from lightkube.types import PatchType

    client.patch(Node, node, {"metadata": {"labels": labels}}, patch_type=PatchType.MERGE)


def node_events(client, namespace: str, node: str) -> list:
    from lightkube.resources.core_v1 import Event

    found = client.list(Event, namespace=namespace, fields={"involvedObject.name": node})
    # Oldest first. creationTimestamp has whole seconds; resourceVersion (one etcd here) orders exactly.
    return sorted(
        (e for e in found if e.involvedObject.kind == "Node"), key=lambda e: int(e.metadata.resourceVersion)
    )


def state_is(client, node: str, state: str, config: str | None = None):
    def check():
        labels = node_labels(client, node)
        return labels.get(L.STATE_LABEL) == state and (config is None or labels.get(L.CONFIG_LABEL) == config)

    return check


def done(agent, value: str):
    """The agent's latest reconcile was for ``value`` and succeeded (its state label is then written)."""

    def check():
        return (
            agent.reconciled
            and agent.reconciled[-1][0] == value
            and agent.reconciled[-1][1].state == L.SUCCESS
        )

    return check


@dataclass
class Record:
    at: float  # time.monotonic()
    what: str  # "labels", "pods-gone", "pods-created", "apply"
    labels: dict[str, str] = field(default_factory=dict)


class NodeStage:
    """Plays the kubelet and the DaemonSet controller for the two sandbox operands on one node:
    when an operand's label is paused its pods are deleted (a delete, then a second one with
    ``gracePeriodSeconds=0`` as a kubelet does); when it is ``true`` again the pods come back.
    Records every label state seen by its watch, with times."""

    def __init__(self, client, node: str, namespace: str, delete_pods: bool = True):
        self.client = client
        self.node = node
        self.namespace = namespace
        self.delete_pods = delete_pods
        self.history: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> NodeStage:
        for label in L.OPERANDS:
            self._create_pod(label)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reacting. The watch thread ends at its next event (the node's deletion at the latest)."""
        self._stop.set()

    def note(self, what: str, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self.history.append(Record(time.monotonic(), what, dict(labels or {})))

    def label_states(self) -> list[dict[str, str]]:
        with self._lock:
            return [r.labels for r in self.history if r.what == "labels"]

    def first(self, what: str, pred: Callable[[dict[str, str]], bool] = lambda _: True, after: float = 0.0):
        with self._lock:
            for r in self.history:
                if r.what == what and r.at >= after and pred(r.labels):
                    return r
        return None

    def _pod_name(self, label: str) -> str:
        return f"{label.rsplit('.', 1)[-1]}-{self.node}"[:63]

    def _create_pod(self, label: str) -> None:
        from lightkube.models.core_v1 import Container, PodSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Pod

        app = L.OPERANDS[label].split("=", 1)[1]
        pod = Pod(
            metadata=ObjectMeta(name=self._pod_name(label), namespace=self.namespace, labels={"app": app}),
            spec=PodSpec(nodeName=self.node, containers=[Container(name="operand", image="operand:test")]),
        )
        with contextlib.suppress(Exception):  # already there
            self.client.create(pod)

    def _delete_pod(self, label: str) -> None:
        from lightkube.resources.core_v1 import Pod

        name = self._pod_name(label)
        with contextlib.suppress(Exception):
            self.client.delete(Pod, name, namespace=self.namespace)
        with contextlib.suppress(Exception):
            self.client.delete(Pod, name, namespace=self.namespace, grace_period=0)

    def _run(self) -> None:
        from lightkube.resources.core_v1 import Node

        rv = None
        while not self._stop.is_set():
            try:
                for kind, node in self.client.watch(
                    Node, fields={"metadata.name": self.node}, resource_version=rv, server_timeout=60
                ):
                    if self._stop.is_set() or kind == "DELETED":
                        return
                    rv = node.metadata.resourceVersion
                    self._react(dict(node.metadata.labels or {}))
            except Exception:  # the API server restart test stops it under us
                rv = None
                time.sleep(0.2)

    def _react(self, labels: dict[str, str]) -> None:
        self.note("labels", labels)
        deleted = []
        for label in L.OPERANDS:
            value = labels.get(label)
            if value == L.PAUSED and self.delete_pods:
                self._delete_pod(label)
                deleted.append(label)
            elif value == "true":
                self._create_pod(label)
        if deleted:
            self.note("pods-gone", labels)
