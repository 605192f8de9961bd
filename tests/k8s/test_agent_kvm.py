"""The agent on a host with libvirt VM definitions and a hooks file, against a real kube-apiserver.

A node can run both (a host with libvirt VMs that is also a Kubernetes node): a vGPU that a shut-off
libvirt VM is defined to use is refused like one a running VM holds — state ``failed`` and a
``VGPUDeviceAssigned`` Event naming the VM — and retried until the VM's definition no longer names it.
Hooks given with ``--hooks-file`` run inside the apply, as with the CLI.
"""

from __future__ import annotations

import pytest

from tests.k8s.agentkit import (
    ON_BOTH,
    NodeStage,
    make_sim,
    node_events,
    running_agent,
    set_labels,
    settings_for,
    state_is,
    wait_for,
)
from tests.simstate import layouts, snapshot
from vgpu_dm import log
from vgpu_dm.k8s import labels as L


@pytest.fixture(autouse=True)
def fresh_logging():
    log.setup(debug=True)


@pytest.fixture
def sim(workdir):
    return make_sim(workdir)


@pytest.fixture
def stage(admin_client, k8s_node, k8s_namespace):
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    yield stage
    stage.stop()


def test_vgpu_of_a_defined_vm_is_refused_with_an_event_until_undefined(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, cli
):
    settings = settings_for(k8s_node, k8s_namespace, sim, retry_initial=0.5, retry_max=0.5)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        uuid = snapshot(sim.root)[0][2]
        defined = cli("sim", "define", str(sim.root), "win10", "--vgpu", uuid)
        assert defined.code == 0, defined.err
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-16Q"})
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
        wait_for(
            lambda: any(
                e.reason == "VGPUDeviceAssigned" for e in node_events(admin_client, k8s_namespace, k8s_node)
            ),
            what="a VGPUDeviceAssigned Event",
        )
        event = next(
            e for e in node_events(admin_client, k8s_namespace, k8s_node) if e.reason == "VGPUDeviceAssigned"
        )
        assert event.type == "Warning"
        assert uuid in event.message and "VM 'win10' (shut off)" in event.message
        # The operator's options, not the CLI's flags (the agent has neither --allow-assigned nor --force).
        assert "change or undefine the VM" in event.message and "retries by itself" in event.message
        assert "or pass --allow-assigned" not in event.message and "(or --force)" not in event.message
        wait_for(lambda: agent.metrics.apply_retries._value.get() >= 1, what="a retry")
        assert uuid in [d[2] for d in snapshot(sim.root)]
        assert cli("sim", "undefine", str(sim.root), "win10").code == 0
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="applied once the VM was undefined")
    assert layouts(sim.root) == [{"T4-16Q": 1}, {"T4-16Q": 1}]


def test_hooks_run_around_the_agents_apply(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, workdir
):
    trace = workdir / "trace"
    hooks = workdir / "hooks.yaml"
    hooks.write_text(
        "version: v1\nhooks:\n"
        + "".join(
            f'  {name}:\n    - command: /bin/sh\n      args: ["-c", "echo {name} $VGPU_DM_SELECTED_CONFIG '
            f'$VGPU_DM_RESULT >> {trace}"]\n'
            for name in ("apply-start", "pre-change", "post-change", "apply-exit")
        )
    )
    settings = settings_for(k8s_node, k8s_namespace, sim, hooks_file=str(hooks))
    with running_agent(apiserver.admin_kubeconfig, settings):
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
    assert trace.read_text().splitlines() == [
        "apply-start default",
        "pre-change default",
        "post-change default success",
        "apply-exit default success",
    ]
