"""nvidia-vgpu-dra run with the token of the ServiceAccount that deploy/dra creates (bound to a pod on
its node, as a DaemonSet pod's token is), against a real API server with those manifests applied: the
shipped RBAC is enough for publishing, preparing and unpreparing, and the admission policy refuses
creating, updating and deleting slices of any other node — also when deploy/dra is used through a
kustomize overlay that changes the namespace and prefixes the names."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.k8s import drakit as K
from tests.k8s.test_dra_apiserver import published
from tests.k8s.test_dra_manifests import DRA_DIR

NAMESPACE = "nvidia-vgpu-dra"
ACCOUNT = "nvidia-vgpu-dra"


@pytest.fixture(scope="module")
def deployed_dra(apiserver):
    result = apiserver.kubectl("apply", "-k", str(DRA_DIR), "--validate=false")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def overlaid_dra(apiserver, tmp_path_factory):
    """deploy/dra through an overlay that moves it to another namespace and prefixes every name (so
    its cluster-wide objects do not replace the base's): (namespace, ServiceAccount)."""
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: gpu-dra-elsewhere\n"
        f"namePrefix: site-\nresources:\n  - {os.path.relpath(DRA_DIR, overlay)}\n"
    )
    result = apiserver.kubectl("apply", "-k", str(overlay), "--validate=false")
    assert result.returncode == 0, result.stderr
    return "gpu-dra-elsewhere", f"site-{ACCOUNT}"


def pod_bound_token(apiserver, node: str, namespace: str = NAMESPACE, account: str = ACCOUNT) -> str:
    """A token like a DaemonSet pod's on ``node``: bound to a pod scheduled there."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"dra-{node}", "namespace": namespace},
        "spec": {
            "nodeName": node,
            "serviceAccountName": account,
            "containers": [{"name": "dra", "image": "vgpu-device-manager:0.1.0"}],
        },
    }
    status, text = apiserver.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods", body=json.dumps(pod).encode()
    )
    assert status == 201, text
    uid = json.loads(text)["metadata"]["uid"]
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": 3600,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": uid,
            },
        },
    }
    status, text = apiserver.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        body=json.dumps(request).encode(),
    )
    assert status == 201, text
    return json.loads(text)["status"]["token"]


def test_driver_works_with_the_deployed_rbac_and_only_on_its_own_node(
    apiserver, kube_scheduler, deployed_dra, workdir, k8s_namespace
):
    name = f"dra-{uuid.uuid4().hex[:10]}"
    K.ready_node(apiserver, name)
    K.set_label(apiserver, name, "T4-2Q")
    token = pod_bound_token(apiserver, name)
    node = K.DraNode(name, workdir / name, apiserver.kubeconfig_for_token(token), gpus=("T4",))
    try:
        node.start()
        published(apiserver, node, 8)
        K.create_claim(apiserver, k8s_namespace, "c1")
        K.create_pod(apiserver, k8s_namespace, "vm", "c1", name)
        claim = K.allocated(apiserver, k8s_namespace, "c1")
        uid = claim["metadata"]["uid"]
        kubelet = node.kubelet()
        assert kubelet.prepare(K.identity(claim)).claims[uid].error == ""
        assert kubelet.unprepare(K.identity(claim)).claims[uid].error == ""
        K.release(apiserver, k8s_namespace, "c1", "vm")
        K.set_label(apiserver, name, "T4-4Q")  # republish: update and delete its own slices
        published(apiserver, node, 4)
    finally:
        node.stop()
    assert "403" not in node.log.read_text()
    assert_only_its_own_node(apiserver, token, name)
    # And it may read nothing it does not need.
    status, _ = apiserver.request("GET", "/api/v1/secrets", token=token)
    assert status == 403
    apiserver.request("DELETE", f"/api/v1/nodes/{name}")


def slice_body(name: str, node: str, resource_version: str | None = None) -> bytes:
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": K.DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "x"}],
        },
    }
    if resource_version:
        body["metadata"]["resourceVersion"] = resource_version
    return json.dumps(body).encode()


def assert_only_its_own_node(apiserver, token: str, node: str) -> None:
    """The driver token of ``node`` may not create, update or delete another node's slices (its RBAC
    would allow all three); an admin made the other node's slice."""
    base = "/apis/resource.k8s.io/v1/resourceslices"
    refused = "may only write ResourceSlices of that node"
    status, text = apiserver.request(
        "POST", base, token=token, body=slice_body(f"{node}-intruder", f"{node}-x")
    )
    assert status in (403, 422) and refused in text.decode(), text
    status, text = apiserver.request("POST", base, body=slice_body(f"{node}-other", f"{node}-other"))
    assert status == 201, text
    version = json.loads(text)["metadata"]["resourceVersion"]
    other = f"{base}/{node}-other"
    status, text = apiserver.request(
        "PUT", other, token=token, body=slice_body(f"{node}-other", f"{node}-other", version)
    )
    assert status in (403, 422) and refused in text.decode(), text
    status, text = apiserver.request("DELETE", other, token=token)
    assert status in (403, 422) and refused in text.decode(), text
    status, _ = apiserver.request("GET", other)
    assert status == 200  # still there
    # Its own node's slice: allowed.
    status, text = apiserver.request("POST", base, token=token, body=slice_body(f"{node}-own", node))
    assert status == 201, text
    status, text = apiserver.request("DELETE", f"{base}/{node}-own", token=token)
    assert status == 200, text
    apiserver.request("DELETE", other)


def test_the_policy_holds_under_a_namespace_and_name_prefix_overlay(apiserver, deployed_dra, overlaid_dra):
    namespace, account = overlaid_dra
    name = f"dra-{uuid.uuid4().hex[:10]}"
    K.ready_node(apiserver, name)
    try:
        assert_only_its_own_node(apiserver, pod_bound_token(apiserver, name, namespace, account), name)
    finally:
        apiserver.request("DELETE", f"/api/v1/nodes/{name}")
