"""The agent as the NVIDIA GPU Operator runs it, against a real kube-apiserver: the operator's RBAC
(nodes get/list/watch/update without patch, pods get/list/watch, no Events), its environment and no
flags, on both kinds of node (the operator's driver container; a vGPU manager installed on the host
with the operator's /driver-root mounted but empty). And the same run with deploy/kubernetes' RBAC."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.k8s import gpu_operator
from tests.k8s.agentkit import (
    AGENT,
    FAST_API,
    ON_BOTH,
    PAUSED_BOTH,
    NodeStage,
    node_events,
    node_labels,
    set_labels,
    wait_for,
)
from tests.simstate import layouts
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.kube import UPDATE, Kube, load_config
from vgpu_dm.sim.layout import create_host

CONFIG = """\
version: v1
vgpu-configs:
  default:
    - devices: all
      vgpu-devices: {"L40S-24Q": 2}
  L40S-12Q:
    - devices: all
      vgpu-devices: {"L40S-12Q": 4}
  L40S-8Q:
    - devices: all
      vgpu-devices: {"L40S-8Q": 6}
"""
OTHER = "example.com/owner"  # a label of another controller, which must survive every write of ours


@pytest.fixture
def agent_log():
    lines = io.StringIO()
    log.setup(debug=True, stream=lines)
    yield lines
    log.setup()


@pytest.fixture
def operator_rbac(apiserver, k8s_namespace):
    rbac = gpu_operator.apply_rbac(apiserver, k8s_namespace)
    yield rbac
    gpu_operator.delete_rbac(apiserver, k8s_namespace)


def test_operator_rbac_grants_update_but_not_patch_nor_events(apiserver, operator_rbac):
    """The premise, checked on the server: what the operator's ServiceAccount may do."""

    def can(verb: str, resource: str, namespace: str | None = None) -> bool:
        args = ["auth", "can-i", verb, resource, f"--as={operator_rbac.username}"]
        args += ["-n", namespace] if namespace else []
        return apiserver.kubectl(*args).stdout.strip() == "yes"

    ns = operator_rbac.namespace
    assert can("update", "nodes") and can("watch", "nodes") and can("list", "pods", ns)
    assert not can("patch", "nodes") and not can("create", "events", ns)


def test_label_writes_fall_back_to_update_and_keep_a_racing_writers_labels(
    apiserver, admin_client, k8s_node, operator_rbac, agent_log
):
    """403 on patch → GET + PUT with resourceVersion for the rest of the process, said once; another
    writer changing unrelated labels between our GET and PUT makes the PUT fail with 409, and the next
    round starts from the fresh node: their labels survive, ours are set."""
    set_labels(admin_client, k8s_node, {OTHER: "0", L.VALIDATOR_LABEL: "true"})
    kube = Kube(
        load_config(operator_rbac.kubeconfig),
        k8s_node,
        operator_rbac.namespace,
        threading.Event(),
        timing=FAST_API,
    )
    raced: list[str] = []

    def other_writer(response) -> None:
        # Right after our GET of the node (the update path's read), before our PUT: someone else writes.
        request = response.request
        if request.method == "GET" and request.url.path == f"/api/v1/nodes/{k8s_node}" and len(raced) < 3:
            raced.append(str(len(raced) + 1))
            set_labels(admin_client, k8s_node, {OTHER: raced[-1]})

    kube._http.event_hooks["response"].append(other_writer)
    try:
        after = kube.patch_labels({L.STATE_LABEL: L.PENDING})
        more = kube.patch_labels({L.DEVICE_PLUGIN_LABEL: L.PAUSED, L.VALIDATOR_LABEL: None})
    finally:
        kube.close()
    assert raced == ["1", "2", "3"]  # three PUTs lost the race: 409 each, retried from the fresh node
    labels = node_labels(admin_client, k8s_node)
    assert labels[OTHER] == "3"  # the other writer's last value, not one our PUT carried back
    assert labels[L.STATE_LABEL] == L.PENDING and labels[L.DEVICE_PLUGIN_LABEL] == L.PAUSED
    assert L.VALIDATOR_LABEL not in labels  # None removes
    assert after[L.STATE_LABEL] == L.PENDING and more == labels
    assert kube.label_mode == UPDATE
    text = agent_log.getvalue()
    assert text.count("node labels are written by GET + update") == 1  # said once, at info
    assert "refused to patch node" in text and "HTTP 403" in text
    assert text.count("HTTP 409") == 3


def test_refused_events_are_said_once_and_counted(
    apiserver, admin_client, k8s_node, operator_rbac, agent_log
):
    lost: list[str] = []
    kube = Kube(
        load_config(operator_rbac.kubeconfig),
        k8s_node,
        operator_rbac.namespace,
        threading.Event(),
        timing=FAST_API,
        on_event_lost=lost.append,
    )
    try:
        kube.event("VGPUConfigApplied", "config 'a' applied")
        kube.event("VGPUConfigFailed", "config 'b': no", warning=True)
    finally:
        kube.close()
    assert lost == ["forbidden", "forbidden"]
    text = agent_log.getvalue()
    assert text.count("Events are not recorded") == 1
    assert "level=info" in next(line for line in text.splitlines() if "Events are not recorded" in line)
    assert "event VGPUConfigFailed not recorded" in text  # the second was not even tried
    assert node_events(admin_client, operator_rbac.namespace, k8s_node) == []


# -- the agent as the operator starts it -----------------------------------------------------------


def _node_kind(workdir: Path, kind: str) -> tuple[Path, Path]:
    """The simulated host and the directory that stands for the pod's /driver-root mount."""
    root = workdir / "host"
    mount = workdir / "driver-root"
    if kind == "driver-container":
        create_host(root, ["L40S"], driver_root="run/nvidia/driver")
        os.symlink(root / "run/nvidia/driver", mount)  # a second path to the same files, as the mount is
    else:
        create_host(root, ["L40S"])
        mount.mkdir()  # hostPath DirectoryOrCreate: there, and empty
    return root, mount


def _changed_to(stage: NodeStage, value: str, since: float, timeout: float = 60):
    """The watch saw ``pending`` for ``value`` and then ``success``: (pending record, success record)."""
    pending = wait_for(
        lambda: stage.first(
            "labels",
            lambda x: x.get(L.STATE_LABEL) == L.PENDING and x.get(L.CONFIG_LABEL, "default") in (value,),
            since,
        ),
        timeout=timeout,
        what=f"pending for {value}",
    )
    success = wait_for(
        lambda: stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.SUCCESS, after=pending.at),
        timeout=timeout,
        what=f"success for {value}",
    )
    return pending, success


@pytest.mark.parametrize(
    "rbac,kind",
    [("operator", "host-installed"), ("operator", "driver-container"), ("ours", "host-installed")],
)
def test_agent_started_as_the_gpu_operator_does(
    apiserver, admin_client, k8s_node, k8s_namespace, deployed_rbac, workdir, rbac, kind
):
    if rbac == "operator":
        creds = gpu_operator.apply_rbac(apiserver, k8s_namespace)
        namespace, kubeconfig = k8s_namespace, creds.kubeconfig
    else:
        namespace, kubeconfig = deployed_rbac.namespace, deployed_rbac.kubeconfig
    root, mount = _node_kind(workdir, kind)
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    set_labels(admin_client, k8s_node, {**ON_BOTH, OTHER: "keep"})
    stage = NodeStage(admin_client, k8s_node, namespace).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}
    for key in ("KUBECONFIG", "HOST_ROOT_MOUNT", "DRIVER_ROOT_CTR_PATH", "DRIVER_INSTALL_DIR"):
        env.pop(key, None)
    env.update(gpu_operator.daemonset_env(namespace, k8s_node, str(config)))
    env.update(
        {
            # Stand-ins for what a pod has and this test machine cannot give: the in-cluster credentials
            # (a real token of the same ServiceAccount), the simulated host instead of /host, the
            # driver root's mount point, and a free metrics port instead of :8080.
            "KUBECONFIG": kubeconfig,
            "VGPU_DM_SIM": str(root),
            "DRIVER_ROOT_CTR_PATH": str(mount),
            "VGPU_DM_METRICS_ADDRESS": "127.0.0.1:0",
        }
    )
    err_path = workdir / "agent.log"
    began = time.monotonic()
    with open(err_path, "w") as err:
        proc = subprocess.Popen([str(AGENT)], stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        _changed_to(stage, "default", began)
        assert layouts(root) == [{"L40S-24Q": 2}]
        for value, layout in (("L40S-12Q", {"L40S-12Q": 4}), ("L40S-8Q", {"L40S-8Q": 6})):
            since = time.monotonic()
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: value})
            pending, success = _changed_to(stage, value, since)
            paused = stage.first(
                "labels", lambda x: all(x.get(k) == L.PAUSED for k in PAUSED_BOTH), pending.at
            )
            assert paused is not None and paused.at <= success.at, stage.history
            assert stage.first("pods-gone", after=pending.at) is not None  # it waited for the pods
            assert all(success.labels.get(k) == "true" for k in ON_BOTH)  # restored before success
            assert layouts(root) == [layout]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stage.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if rbac == "operator":
            gpu_operator.delete_rbac(apiserver, k8s_namespace)
        _delete_operand_pods(admin_client, namespace, k8s_node)
    text = err_path.read_text()
    assert "Traceback" not in text and "level=error" not in text, text
    labels = node_labels(admin_client, k8s_node)
    assert labels[L.STATE_LABEL] == L.SUCCESS and labels[OTHER] == "keep"
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    events = [e.reason for e in node_events(admin_client, namespace, k8s_node)]
    if rbac == "operator":
        assert text.count("node labels are written by GET + update") == 1
        assert text.count("Events are not recorded") == 1 and events == []
    else:
        assert text.count("node labels are written by JSON merge patch") == 1 and "HTTP 403" not in text
        assert events == ["VGPUConfigApplied"] * 3
    where = "driver root" if kind == "driver-container" else "host root"
    assert f"driver files: nvidia-smi: {where}" in text
    assert f"driver files: libnvidia-ml.so.1: {where}" in text
    assert f"driver files: sriov-manage: {where}" in text
    if kind == "driver-container":
        assert f"runs as: chroot {root} /run/nvidia/driver/usr/lib/nvidia/sriov-manage" in text
    assert "enabling SR-IOV virtual functions" in text  # sriov-manage really ran, and worked


def _delete_operand_pods(client, namespace: str, node: str) -> None:
    from lightkube.resources.core_v1 import Pod

    for pod in client.list(Pod, namespace=namespace, fields={"spec.nodeName": node}):
        with contextlib.suppress(Exception):
            client.delete(Pod, pod.metadata.name, namespace=namespace, grace_period=0)
