"""The agent run with the token of the ServiceAccount that deploy/kubernetes creates, against a real API
server with those manifests applied: every call of a full change (node list/watch/get/patch, operand pod
list/watch, Events) is allowed by the shipped RBAC, and nothing had to be retried for lack of rights."""

from __future__ import annotations

import contextlib
import io
import time

import pytest

from tests.k8s.agentkit import (
    ON_BOTH,
    NodeStage,
    done,
    make_sim,
    node_events,
    node_labels,
    running_agent,
    set_labels,
    settings_for,
    wait_for,
)
from tests.simstate import layouts
from vgpu_dm import log
from vgpu_dm.k8s import labels as L


@pytest.fixture
def agent_log():
    """The agent's log lines (debug on), kept for the test to read."""
    lines = io.StringIO()
    log.setup(debug=True, stream=lines)
    yield lines
    log.setup()


def test_agent_runs_a_full_change_with_the_deployed_serviceaccount(
    apiserver, admin_client, deployed_rbac, k8s_node, workdir, agent_log
):
    sim = make_sim(workdir)
    namespace = deployed_rbac.namespace
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, namespace).start()
    settings = settings_for(k8s_node, namespace, sim)
    try:
        with running_agent(deployed_rbac.kubeconfig, settings) as agent:
            wait_for(done(agent, "default"), what="default applied")
            began = time.monotonic()
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-4Q"})
            wait_for(done(agent, "T4-4Q"), what="T4-4Q applied")
            wait_for(agent.ready.is_set, what="ready")
            api_retries = agent.metrics.api_retries._value.get()
    finally:
        stage.stop()
        from lightkube.resources.core_v1 import Pod

        for pod in admin_client.list(Pod, namespace=namespace, fields={"spec.nodeName": k8s_node}):
            with contextlib.suppress(Exception):
                admin_client.delete(Pod, pod.metadata.name, namespace=namespace, grace_period=0)
    assert layouts(sim.root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]
    assert stage.first("pods-gone", after=began) is not None  # it paused the operands and waited
    labels = node_labels(admin_client, k8s_node)
    assert labels[L.STATE_LABEL] == L.SUCCESS and {k: labels[k] for k in ON_BOTH} == ON_BOTH
    reasons = [e.reason for e in node_events(admin_client, namespace, k8s_node)]
    assert reasons == ["VGPUConfigApplied", "VGPUConfigApplied"]
    assert api_retries == 0
    # Any refused call would have been logged by the agent as "HTTP 403 (... forbidden ...)".
    refused = [line for line in agent_log.getvalue().splitlines() if "HTTP 403" in line]
    assert refused == []
    assert "Selected vGPU device configuration successfully applied" in agent_log.getvalue()
