"""``-w`` with ``-k`` against a real kube-apiserver, on a simulated A100 host with simulated systemd: around
a MIG *mode* change the agent stops the running GPU clients and then the kubelet, and starts the kubelet
and then the clients again (upstream's order: cmd/nvidia-k8s-vgpu-dm/reconfigure_mig.go appends the
kubelet to the units to stop and starts them in reverse) as soon as the MIG stage is over, before the
vGPUs; a change of GPU instances only leaves the kubelet alone; failures on the way start every unit
again."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from tests.k8s.agentkit import (
    ON_BOTH,
    NodeStage,
    SimSetup,
    node_labels,
    running_agent,
    set_labels,
    settings_for,
    state_is,
    wait_for,
)
from tests.simstate import arm, layouts
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.sim import services
from vgpu_dm.sim.layout import create_host

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "config-mig.yaml"
DCGM, KUBELET, OTHER = "nvidia-dcgm.service", "k3s-agent.service", "nvsm.service"


@pytest.fixture
def agent_log():
    lines = io.StringIO()
    log.setup(debug=True, stream=lines)
    yield lines
    log.setup()


def test_kubelet_stops_after_the_gpu_clients_around_a_mig_mode_change(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log
):
    root = workdir / "host"
    create_host(root, ["A100", "A100"])
    services.set_units(root, {DCGM: True, KUBELET: True, OTHER: True})
    clients = workdir / "gpu-clients.yaml"
    clients.write_text(f"version: v1\nsystemd-services:\n  - {DCGM}\n")
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    settings = settings_for(
        k8s_node,
        k8s_namespace,
        SimSetup(root, CONFIG),
        default_config="A100-40C",
        with_shutdown_host_gpu_clients=True,
        gpu_clients_file=str(clients),
        host_kubelet_systemd_service=KUBELET,
        gpu_clients_settle=0.2,
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings) as agent:
            wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
            assert services.calls(root) == []  # no MIG change: nothing stopped
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
            wait_for(
                lambda: agent.reconciled and agent.reconciled[-1][0] == "A100-1-5C", timeout=60, what="1-5C"
            )
            mode_change = services.calls(root), services.modes_at(root)
            vgpus = services.vgpus_at(root)
            # Instances only (MIG mode stays on): the GPU clients, not the kubelet.
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-2-10C"})
            wait_for(lambda: agent.reconciled[-1][0] == "A100-2-10C", timeout=60, what="2-10C")
            outcomes = [o.state for _, o in agent.reconciled]
    finally:
        stage.stop()
    assert outcomes == [L.SUCCESS] * 3
    assert layouts(root) == [{"A100-2-10C": 3}, {"A100-2-10C": 3}]
    calls, modes = mode_change
    acts = [(c[1], c[-1]) for c in calls if c[1] in ("stop", "start")]
    assert acts == [("stop", DCGM), ("stop", KUBELET), ("start", KUBELET), ("start", DCGM)]
    at = {(c[1], c[-1]): m for c, m in zip(calls, modes, strict=True) if c[1] in ("stop", "start")}
    assert at[("stop", KUBELET)] == [False, False]  # stopped before the mode changed
    assert at[("start", KUBELET)] == [True, True]  # started again after it
    # ... right after the MIG stage, as upstream (main.go: MIG, then clients started, then vGPUs): not
    # after the 14 vGPUs of the new layout are made (the old ones went before the MIG change).
    made = {(c[1], c[-1]): n for c, n in zip(calls, vgpus, strict=False) if c[1] in ("stop", "start")}
    assert made == {("stop", DCGM): 2, ("stop", KUBELET): 2, ("start", KUBELET): 0, ("start", DCGM): 0}
    later = [(c[1], c[-1]) for c in services.calls(root)[len(calls) :] if c[1] in ("stop", "start")]
    assert later == [("stop", DCGM), ("start", DCGM)]
    assert services.load(root)["units"] == {DCGM: "active", KUBELET: "active", OTHER: "active"}
    assert "waiting 0.2 s for the stopped host services to settle" in agent_log.getvalue()
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH


def test_stop_while_waiting_for_services_to_settle_starts_them_again(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir
):
    root = workdir / "host"
    create_host(root, ["A100"])
    services.set_units(root, {KUBELET: True})
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    settings = settings_for(
        k8s_node,
        k8s_namespace,
        SimSetup(root, CONFIG),
        default_config="A100-40C",
        with_shutdown_host_gpu_clients=True,
        host_kubelet_systemd_service=KUBELET,
        gpu_clients_settle=600.0,
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings):
            wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
            wait_for(
                lambda: ["systemctl", "stop", "--", KUBELET] in services.calls(root), what="kubelet stopped"
            )
        # running_agent's exit sent the stop (SIGTERM's path) during the 600 s wait.
    finally:
        stage.stop()
    assert [c[1:] for c in services.calls(root) if c[1] in ("stop", "start")] == [
        ["stop", "--", KUBELET],
        ["start", "--", KUBELET],
    ]
    assert services.load(root)["units"] == {KUBELET: "active"}
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH


def _mode_change_with_units(apiserver, admin_client, node, namespace, workdir, agent_log, prepare):
    """A100-40C applied, then A100-1-5C (a MIG mode change) with -w -k; ``prepare(root, cli_arm)`` arms
    the failure after the first apply. Returns (root, the last outcome, the systemctl stop/start calls)."""
    root = workdir / "host"
    create_host(root, ["A100"])
    services.set_units(root, {DCGM: True, KUBELET: True})
    clients = workdir / "gpu-clients.yaml"
    clients.write_text(f"version: v1\nsystemd-services:\n  - {DCGM}\n")
    set_labels(admin_client, node, ON_BOTH)
    stage = NodeStage(admin_client, node, namespace).start()
    settings = settings_for(
        node,
        namespace,
        SimSetup(root, CONFIG),
        default_config="A100-40C",
        with_shutdown_host_gpu_clients=True,
        gpu_clients_file=str(clients),
        host_kubelet_systemd_service=KUBELET,
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings) as agent:
            wait_for(state_is(admin_client, node, L.SUCCESS), what="A100-40C applied")
            prepare(root)
            set_labels(admin_client, node, {L.CONFIG_LABEL: "A100-1-5C"})
            wait_for(
                lambda: agent.reconciled and agent.reconciled[-1][0] == "A100-1-5C", timeout=60, what="1-5C"
            )
            outcome = agent.reconciled[-1][1]
    finally:
        stage.stop()
    acts = [(c[1], c[-1]) for c in services.calls(root) if c[1] in ("stop", "start")]
    labels = node_labels(admin_client, node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH  # operands restored, whatever failed
    assert labels[L.STATE_LABEL] == L.FAILED
    return root, outcome, acts


def test_kubelet_that_cannot_be_stopped_fails_the_change_and_restarts_the_clients(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log
):
    root, outcome, acts = _mode_change_with_units(
        apiserver,
        admin_client,
        k8s_node,
        k8s_namespace,
        workdir,
        agent_log,
        lambda root: services.fail(root, [f"stop {KUBELET}"]),
    )
    assert outcome.state == L.FAILED and f"could not stop {KUBELET}" in outcome.message
    # The refused stop, then the clients stopped before it are started again.
    assert acts == [("stop", DCGM), ("stop", KUBELET), ("start", DCGM)]
    assert services.load(root)["units"] == {DCGM: "active", KUBELET: "active"}
    assert layouts(root) == [{"A100-40C": 1}]  # nothing of the MIG change was done


def test_mig_parted_failing_while_the_kubelet_is_stopped_starts_everything_again(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log, cli
):
    root, outcome, acts = _mode_change_with_units(
        apiserver,
        admin_client,
        k8s_node,
        k8s_namespace,
        workdir,
        agent_log,
        lambda root: arm(cli, root, "--mig-parted", "apply"),
    )
    assert outcome.state == L.FAILED and "nvidia-mig-parted" in outcome.message
    assert acts == [("stop", DCGM), ("stop", KUBELET), ("start", KUBELET), ("start", DCGM)]
    assert services.load(root)["units"] == {DCGM: "active", KUBELET: "active"}
    assert layouts(root) == [{"A100-40C": 1}]  # rolled back


def test_a_kubelet_unit_the_host_does_not_have_is_said_and_skipped(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log
):
    """k3s: no kubelet.service. Upstream says 'Skipping ... (no-exist)'; before, we said nothing."""
    root = workdir / "host"
    create_host(root, ["A100"])
    services.set_units(root, {DCGM: True})
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    settings = settings_for(
        k8s_node,
        k8s_namespace,
        SimSetup(root, CONFIG),
        default_config="A100-40C",
        with_shutdown_host_gpu_clients=True,
        host_kubelet_systemd_service="kubelet.service",
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings) as agent:
            wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
            wait_for(lambda: agent.reconciled[-1][0] == "A100-1-5C", timeout=60, what="1-5C")
            outcome = agent.reconciled[-1][1]
    finally:
        stage.stop()
    assert outcome.state == L.SUCCESS, outcome
    assert "host unit kubelet.service: not found on the host; skipped" in agent_log.getvalue()


def test_an_nvml_failure_stops_no_unit(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log, cli
):
    """The mode change is taken from the plan, which reads the MIG state with export (16.4): when NVML
    fails, that fails loudly before anything is paused or stopped. Before, 'mig-parted assert
    --mode-only' failing on the NVML error was taken for a mode change: the kubelet was stopped and the
    agent waited 30 s for nothing."""
    root = workdir / "host"
    create_host(root, ["A100"])
    services.set_units(root, {DCGM: True, KUBELET: True})
    clients = workdir / "gpu-clients.yaml"
    clients.write_text(f"version: v1\nsystemd-services:\n  - {DCGM}\n")
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    settings = settings_for(
        k8s_node,
        k8s_namespace,
        SimSetup(root, CONFIG),
        default_config="A100-40C",
        with_shutdown_host_gpu_clients=True,
        gpu_clients_file=str(clients),
        host_kubelet_systemd_service=KUBELET,
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings) as agent:
            wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
            arm(cli, root, "--mig-parted", "nvml")
            began = time.monotonic()
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
            wait_for(lambda: agent.reconciled[-1][0] == "A100-1-5C", timeout=60, what="1-5C")
            outcome = agent.reconciled[-1][1]
    finally:
        stage.stop()
    assert outcome.state == L.FAILED, outcome
    assert [c for c in services.calls(root) if c[0] == "systemctl"] == []  # nothing stopped, nothing started
    assert services.load(root)["units"] == {DCGM: "active", KUBELET: "active"}
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    assert stage.first("labels", lambda x: x.get(L.DEVICE_PLUGIN_LABEL) == L.PAUSED, after=began) is None
    assert layouts(root) == [{"A100-40C": 1}]
