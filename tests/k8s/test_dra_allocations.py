"""Which devices are allocated, and what a relabel may withdraw: nvidia-vgpu-dra against the real API
server and scheduler. The driver keeps a cache of ResourceClaims with one list + watch (a resync costs
no API call); while it cannot list them it withdraws nothing; a device the scheduler allocated from an
older generation of the pool is prepared all the same; and a prepare answers within the kubelet's
deadline, with an error it retries, when the host lock is held by someone else.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from tests.k8s import drakit as K
from tests.k8s.agentkit import wait_for
from tests.k8s.test_dra_apiserver import published
from vgpu_dm.host.lock import HostLock
from vgpu_dm.sim.host import SimHostRoot


@pytest.fixture
def node(apiserver, kube_scheduler, workdir):
    K.ensure_device_class(apiserver)
    name = f"dra-{uuid.uuid4().hex[:10]}"
    K.ready_node(apiserver, name)
    K.set_label(apiserver, name, "T4-2Q")
    made = K.DraNode(name, workdir / name, apiserver.admin_kubeconfig, gpus=("T4", "T4"))
    yield made
    made.stop()
    apiserver.request("DELETE", f"/api/v1/nodes/{name}")
    for s in K.slices(apiserver, name):
        apiserver.request("DELETE", f"/apis/resource.k8s.io/v1/resourceslices/{s['metadata']['name']}")


def request_count(apiserver, verb: str, resource: str) -> int:
    """The API server's own count of requests (its /metrics)."""
    status, text = apiserver.request("GET", "/metrics")
    assert status == 200
    total = 0
    for line in text.decode().splitlines():
        ours = f'resource="{resource}"' in line and f'verb="{verb}"' in line
        if line.startswith("apiserver_request_total{") and ours:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_resyncs_read_the_claim_cache_not_the_api(apiserver, node):
    node.start()
    published(apiserver, node, 16)
    time.sleep(1.5)  # the claim watch has listed
    lists = request_count(apiserver, "LIST", "resourceclaims")
    time.sleep(5)  # five resyncs (--resync-interval 1)
    K.set_label(apiserver, node.name, "T4-4Q")  # and a relabel
    published(apiserver, node, 8)
    assert request_count(apiserver, "LIST", "resourceclaims") == lists


def limited_kubeconfig(apiserver, name: str) -> str:
    """A ServiceAccount with deploy/dra's rights except reading ResourceClaims in bulk (get only): the
    driver's claim watch can never list them."""
    namespace = "dra-limited"
    apiserver.request(
        "POST", "/api/v1/namespaces", body=json.dumps({"metadata": {"name": namespace}}).encode()
    )
    apiserver.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body=json.dumps({"metadata": {"name": name}}).encode(),
    )
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "watch"]},
            {
                "apiGroups": ["resource.k8s.io"],
                "resources": ["resourceslices"],
                "verbs": ["create", "delete", "list", "update"],
            },
            {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
        ],
    }
    status, text = apiserver.request(
        "POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", body=json.dumps(role).encode()
    )
    assert status == 201, text
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }
    status, text = apiserver.request(
        "POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", body=json.dumps(binding).encode()
    )
    assert status == 201, text
    status, text = apiserver.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        body=json.dumps(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
        ).encode(),
    )
    assert status == 201, text
    return apiserver.kubeconfig_for_token(json.loads(text)["status"]["token"])


def test_while_claims_cannot_be_read_a_relabel_withdraws_nothing(apiserver, node, k8s_namespace):
    node.kubeconfig = limited_kubeconfig(apiserver, f"limited-{node.name}")
    node.start()
    before = published(apiserver, node, 16)
    K.create_claim(apiserver, k8s_namespace, "c1")
    K.create_pod(apiserver, k8s_namespace, "vm", "c1", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "c1")
    device = claim["status"]["allocation"]["devices"]["results"][0]["device"]
    K.set_label(apiserver, node.name, "T4-4Q")
    wait_for(lambda: "not known yet" in node.tail(200), what="the driver holds the layout back")
    time.sleep(2)  # resyncs
    assert set(K.pool_devices(apiserver, node.name)) == set(before)  # nothing withdrawn
    uid = claim["metadata"]["uid"]
    assert node.kubelet().prepare(K.identity(claim)).claims[uid].error == ""
    assert K.pool_devices(apiserver, node.name)[device]


def set_allocation(apiserver, namespace: str, name: str, node: str, device: str, admin=False) -> dict:
    """Write a claim's allocation as the scheduler's PreBind does (status.allocation)."""
    result = {"request": "vgpu", "driver": K.DRIVER, "pool": node, "device": device}
    if admin:
        result["adminAccess"] = True
    patch = {
        "status": {
            "allocation": {
                "devices": {"results": [result]},
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                    ]
                },
            }
        }
    }
    status, text = apiserver.request(
        "PATCH",
        f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}/status",
        body=json.dumps(patch).encode(),
        content_type="application/merge-patch+json",
    )
    assert status == 200, text
    return json.loads(text)


def test_a_device_allocated_from_an_older_generation_is_prepared(apiserver, node, k8s_namespace):
    """The scheduler allocated gpu0-t4-2q-3 from generation 1 just as the driver switched the GPU to
    T4-4Q (generation 2): the allocation is the scheduler's decision, and the device is one this node
    published, so the prepare makes it; the next publish then holds the GPU to it."""
    node.start()
    published(apiserver, node, 16)
    K.set_label(apiserver, node.name, "T4-4Q")
    devices = published(apiserver, node, 8)
    assert "gpu0-t4-2q-3" not in devices
    K.create_claim(apiserver, k8s_namespace, "late")
    claim = set_allocation(apiserver, k8s_namespace, "late", node.name, "gpu0-t4-2q-3")
    uid = claim["metadata"]["uid"]
    answer = node.kubelet().prepare(K.identity(claim)).claims[uid]
    assert answer.error == "" and answer.devices[0].device_name == "gpu0-t4-2q-3"
    assert K.kubevirt_read_metadata(node, "late", "vgpu")["mdev"]
    # GPU 0 now offers that device alone; GPU 1 follows T4-4Q.
    wait_for(
        lambda: (
            sorted(K.pool_devices(apiserver, node.name))
            == ["gpu0-t4-2q-3", *[f"gpu1-t4-4q-{i}" for i in range(4)]]
        ),
        what="GPU 0 held to the prepared device",
    )


def test_a_device_this_node_never_published_is_refused(apiserver, node, k8s_namespace):
    node.start()
    published(apiserver, node, 16)
    K.create_claim(apiserver, k8s_namespace, "odd")
    claim = set_allocation(apiserver, k8s_namespace, "odd", node.name, "gpu0-t4-16q-0")
    error = node.kubelet().prepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error
    assert "gpu0-t4-16q-0 was never offered by this node's DRA driver" in error


def test_prepare_answers_within_the_kubelets_deadline_when_the_host_lock_is_held(
    apiserver, node, k8s_namespace
):
    """--lock-timeout is 20 s, the call's deadline 8 s: the prepare gives up waiting in time and answers
    an error of its own; the kubelet's retry after the lock is free prepares the claim."""
    node.start()
    published(apiserver, node, 16)
    K.create_claim(apiserver, k8s_namespace, "c1")
    K.create_pod(apiserver, k8s_namespace, "vm", "c1", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "c1")
    uid = claim["metadata"]["uid"]
    kubelet = node.kubelet()
    lock = HostLock(SimHostRoot(node.sim), timeout=5)
    lock.acquire()
    try:
        began = time.monotonic()
        answer = kubelet.prepare(K.identity(claim), timeout=8).claims[uid]
        took = time.monotonic() - began
    finally:
        lock.release()
    assert took < 8 and re.search(r"host lock|deadline", answer.error), (took, answer.error)
    assert node.checkpoint["claims"] == {}  # recorded as preparing, dropped again
    assert kubelet.prepare(K.identity(claim)).claims[uid].error == ""


def test_an_admin_access_allocation_creates_no_vgpu(apiserver, node, k8s_namespace):
    """Admin access lets a claim share a device others use (monitoring); a vGPU exists only for the
    claim it was made for, so such a claim is refused with a reason and nothing is created."""
    node.start()
    published(apiserver, node, 16)
    label = {"metadata": {"labels": {"resource.kubernetes.io/admin-access": "true"}}}
    apiserver.request(
        "PATCH",
        f"/api/v1/namespaces/{k8s_namespace}",
        body=json.dumps(label).encode(),
        content_type="application/merge-patch+json",
    )
    K.create_claim(apiserver, k8s_namespace, "admin")
    claim = set_allocation(apiserver, k8s_namespace, "admin", node.name, "gpu0-t4-2q-0", admin=True)
    error = node.kubelet().prepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error
    assert "allocated with admin access, which a vGPU does not support" in error
    assert not list((node.sim / "sys/bus/mdev/devices").iterdir())
    assert not (node.plugin_dir / "checkpoint.json").exists() or node.checkpoint["claims"] == {}


def test_a_restart_after_a_relabel_follows_the_new_label_without_waiting_for_a_resync(apiserver, node):
    """Relabelled while the driver was down: at start it does not know yet what is allocated, so the
    first publish keeps the old devices; the claim watch's first list must wake the publisher at once,
    not at the next resync (30 s here)."""
    node.extra_args = ("--resync-interval", "30")
    node.start()
    published(apiserver, node, 16)
    node.stop()
    K.set_label(apiserver, node.name, "T4-4Q")
    node.start()
    began = time.monotonic()
    published(apiserver, node, 8, timeout=20)
    assert time.monotonic() - began < 15
