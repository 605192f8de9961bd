"""nvidia-vgpu-dra run with the token of the ServiceAccount that deploy/dra creates (bound to a pod on
its node, as a DaemonSet pod's token is), against a real API server with those manifests applied: the
shipped RBAC is enough for publishing, preparing and unpreparing, and the admission policy refuses
slices of any other node."""

from __future__ import annotations

import json
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


def pod_bound_token(apiserver, node: str) -> str:
    """A token like a DaemonSet pod's on ``node``: bound to a pod scheduled there."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"dra-{node}", "namespace": NAMESPACE},
        "spec": {
            "nodeName": node,
            "serviceAccountName": ACCOUNT,
            "containers": [{"name": "dra", "image": "vgpu-device-manager:0.1.0"}],
        },
    }
    status, text = apiserver.request(
        "POST", f"/api/v1/namespaces/{NAMESPACE}/pods", body=json.dumps(pod).encode()
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
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{ACCOUNT}/token",
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
    # The same token may not write another node's slices.
    other = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{name}-intruder"},
        "spec": {
            "driver": K.DRIVER,
            "nodeName": f"{name}-other",
            "pool": {"name": f"{name}-other", "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "x"}],
        },
    }
    status, text = apiserver.request(
        "POST", "/apis/resource.k8s.io/v1/resourceslices", token=token, body=json.dumps(other).encode()
    )
    assert status in (403, 422) and "may only write ResourceSlices of that node" in text.decode()
    # And it may read nothing it does not need.
    status, _ = apiserver.request("GET", "/api/v1/secrets", token=token)
    assert status == 403
    apiserver.request("DELETE", f"/api/v1/nodes/{name}")
