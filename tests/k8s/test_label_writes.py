"""How the agent writes node labels, against a real kube-apiserver: which refusals switch it from merge
patches to GET + update (only the authorizer refusing the verb ``patch``), and which leave it alone (an
admission policy's 403, a 422), and what happens when both ways are refused."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
import yaml
from lightkube import ApiError

from tests.k8s.agentkit import FAST_API, node_labels, set_labels, wait_for
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.kube import PATCH, UPDATE, Kube, load_config

FROZEN = "example.com/frozen"


@pytest.fixture
def agent_log() -> Iterator[io.StringIO]:
    lines = io.StringIO()
    log.setup(debug=True, stream=lines)
    yield lines
    log.setup()


def kube_for(kubeconfig: str, node: str, namespace: str) -> Kube:
    return Kube(load_config(kubeconfig), node, namespace, threading.Event(), timing=FAST_API)


@pytest.fixture
def frozen_node_policy(apiserver, admin_client, k8s_node) -> Iterator[str]:
    """A ValidatingAdmissionPolicy that refuses, with reason Forbidden (HTTP 403), any write of this
    node while it carries the label example.com/frozen: an admission denial, not an RBAC one."""
    name = k8s_node
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["UPDATE"],
                            "resources": ["nodes"],
                            "resourceNames": [k8s_node],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "!has(object.metadata.labels) || "
                        f"!('{FROZEN}' in object.metadata.labels)",
                        "message": "this node is frozen by its owner",
                        "reason": "Forbidden",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]
    result = apiserver.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(docs))
    assert result.returncode == 0, result.stderr
    set_labels(admin_client, k8s_node, {FROZEN: "true"})

    def in_force() -> bool:  # the policy is loaded asynchronously
        try:
            set_labels(admin_client, k8s_node, {"example.com/probe": "x"})
        except ApiError as exc:
            return exc.status.code == 403
        return False

    wait_for(in_force, timeout=30, what="the admission policy to be in force", step=0.2)
    try:
        yield name
    finally:
        apiserver.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, "--ignore-not-found"
        )


def test_an_admission_policys_403_does_not_switch_to_update(
    apiserver, admin_client, k8s_node, k8s_namespace, frozen_node_policy, agent_log
):
    """Before: any 403 on a patch meant 'RBAC has no patch', so a policy's refusal switched the agent
    to GET + update for good, with a log line blaming RBAC."""
    kube = kube_for(apiserver.admin_kubeconfig, k8s_node, k8s_namespace)
    try:
        with pytest.raises(ApiError) as refused:
            kube.patch_labels({L.STATE_LABEL: L.PENDING})
        status = refused.value.status
        # The premise, as the real server says it: 403 Forbidden, by the policy, not the authorizer.
        assert (status.code, status.reason) == (403, "Forbidden")
        assert "ValidatingAdmissionPolicy" in status.message and "cannot patch" not in status.message
        assert kube.label_mode is None
        set_labels(admin_client, k8s_node, {FROZEN: None})  # the owner lifts it
        wait_for(
            lambda: _try(lambda: kube.patch_labels({L.STATE_LABEL: L.PENDING})),
            timeout=10,
            what="the patch to go through",
        )
    finally:
        kube.close()
    assert kube.label_mode == PATCH
    assert node_labels(admin_client, k8s_node)[L.STATE_LABEL] == L.PENDING
    text = agent_log.getvalue()
    assert "GET + update" not in text and "by JSON merge patch" in text


def _try(fn) -> bool:
    try:
        fn()
    except ApiError:
        return False
    return True


def test_a_422_leaves_the_mode_alone(apiserver, admin_client, k8s_node, k8s_namespace):
    kube = kube_for(apiserver.admin_kubeconfig, k8s_node, k8s_namespace)
    try:
        with pytest.raises(ApiError) as invalid:
            kube.patch_labels({L.STATE_LABEL: "not a label value!"})
        assert invalid.value.status.code == 422
        assert kube.label_mode is None
        kube.patch_labels({L.STATE_LABEL: L.SUCCESS})
    finally:
        kube.close()
    assert kube.label_mode == PATCH
    assert node_labels(admin_client, k8s_node)[L.STATE_LABEL] == L.SUCCESS


@pytest.fixture
def read_only_token(apiserver, k8s_namespace) -> Iterator[str]:
    """A ServiceAccount that may read nodes but neither patch nor update them."""
    name = f"read-nodes-{k8s_namespace}"
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "reader", "namespace": k8s_namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}],
        },
    ]
    result = apiserver.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(docs))
    assert result.returncode == 0, result.stderr
    token = apiserver.kubectl("create", "token", "reader", "-n", k8s_namespace, check=True).stdout.strip()
    try:
        yield apiserver.kubeconfig_for_token(token)
    finally:
        apiserver.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found")


def test_patch_and_update_both_refused(
    apiserver, admin_client, k8s_node, k8s_namespace, read_only_token, agent_log
):
    kube = kube_for(read_only_token, k8s_node, k8s_namespace)
    try:
        with pytest.raises(ApiError) as refused:
            kube.patch_labels({L.STATE_LABEL: L.PENDING})
        # The patch's refusal switched the mode; the update's refusal is what the caller gets.
        assert refused.value.status.code == 403
        assert 'cannot update resource "nodes"' in refused.value.status.message
        assert kube.label_mode == UPDATE
        with pytest.raises(ApiError):
            kube.patch_labels({L.STATE_LABEL: L.FAILED})
    finally:
        kube.close()
    assert L.STATE_LABEL not in node_labels(admin_client, k8s_node)
    text = agent_log.getvalue()
    assert text.count("the API server refused to patch node") == 1 and "cannot patch resource" in text
    assert text.count("node labels are written by GET + update") == 1


# -- decisions made on the node that is written ----------------------------------------------------


@pytest.fixture(params=["patch", "update"])
def labels_kube(request, apiserver, k8s_node, k8s_namespace) -> Iterator[Kube]:
    """A Kube that already writes labels by merge patch (our RBAC) or by GET + update (the GPU
    Operator's RBAC)."""
    from tests.k8s import gpu_operator

    if request.param == "patch":
        kubeconfig = apiserver.admin_kubeconfig
    else:
        kubeconfig = gpu_operator.apply_rbac(apiserver, k8s_namespace).kubeconfig
        request.addfinalizer(lambda: gpu_operator.delete_rbac(apiserver, k8s_namespace))
    kube = kube_for(kubeconfig, k8s_node, k8s_namespace)
    kube.patch_labels({"example.com/learn-mode": "x"})
    assert kube.label_mode == {"patch": PATCH, "update": UPDATE}[request.param]
    yield kube
    kube.close()


def admin_writes_after_first_get(kube: Kube, admin_client, node: str, labels: dict[str, str]) -> list[str]:
    """Right after the agent's first GET of the node (whichever of its HTTP clients reads it), the admin
    writes ``labels``: the window between a decision and the write it leads to."""
    done: list[str] = []

    def hook(response) -> None:
        request = response.request
        if request.method == "GET" and request.url.path == f"/api/v1/nodes/{node}" and not done:
            done.append(request.url.path)
            set_labels(admin_client, node, labels)

    for client in (kube._http, kube.client._client._client):
        client.event_hooks["response"].append(hook)
    return done


def reconciler_for(kube: Kube, node: str, namespace: str):
    from vgpu_dm.k8s.metrics import Metrics
    from vgpu_dm.k8s.reconcile import Reconciler
    from vgpu_dm.k8s.settings import Settings

    settings = Settings(node_name=node, namespace=namespace, config_file="unused", default_config="unused")
    return Reconciler(settings, kube, Metrics(), threading.Event())


def test_restore_keeps_an_operand_the_admin_switched_off_meanwhile(admin_client, k8s_node, labels_kube):
    """Before: restore decided on one GET and then wrote 'true' absolutely (the update path even read
    the node again, saw 'false', and wrote 'true' over it)."""
    set_labels(admin_client, k8s_node, {L.DEVICE_PLUGIN_LABEL: L.PAUSED, L.VALIDATOR_LABEL: L.PAUSED})
    raced = admin_writes_after_first_get(
        labels_kube, admin_client, k8s_node, {L.DEVICE_PLUGIN_LABEL: "false"}
    )
    reconciler_for(labels_kube, k8s_node, "unused").restore_operands()
    assert raced
    labels = node_labels(admin_client, k8s_node)
    assert labels[L.DEVICE_PLUGIN_LABEL] == "false"  # the admin's
    assert labels[L.VALIDATOR_LABEL] == "true"  # ours, restored


def test_pause_leaves_an_operand_the_admin_switched_off_meanwhile(
    admin_client, k8s_node, k8s_namespace, labels_kube
):
    set_labels(admin_client, k8s_node, {L.DEVICE_PLUGIN_LABEL: "true", L.VALIDATOR_LABEL: "true"})
    raced = admin_writes_after_first_get(labels_kube, admin_client, k8s_node, {L.VALIDATOR_LABEL: "false"})
    paused = reconciler_for(labels_kube, k8s_node, k8s_namespace)._pause_operands()
    assert raced
    assert paused == [L.DEVICE_PLUGIN_LABEL]  # only the paused one is waited for and restored later
    labels = node_labels(admin_client, k8s_node)
    assert (labels[L.DEVICE_PLUGIN_LABEL], labels[L.VALIDATOR_LABEL]) == (L.PAUSED, "false")
