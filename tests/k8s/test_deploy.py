"""deploy/kubernetes against a real kube-apiserver: it applies, passes the server's strict field
validation, and its ServiceAccount can make every call the agent makes and nothing more.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tests.k8s import manifests
from tests.k8s.conftest import apply_deployment
from tests.k8s.envtest import APIServer

NODE_VERBS = "get list watch patch"
# Extra rows `kubectl auth can-i --list` shows for the agent's ServiceAccount beyond what every
# ServiceAccount gets anyway (discovery, self-reviews): (resource, verbs).
EXPECTED_IN_OPERAND_NS = {("nodes", NODE_VERBS), ("pods", "list watch"), ("events", "create")}
EXPECTED_ELSEWHERE = {("nodes", NODE_VERBS)}


def _path(doc: dict) -> str:
    """The REST path of one object of the kinds the deployment holds."""
    kind, meta = doc["kind"], doc["metadata"]
    plural = {
        "Namespace": "namespaces",
        "ServiceAccount": "serviceaccounts",
        "ConfigMap": "configmaps",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "DaemonSet": "daemonsets",
    }[kind]
    group = doc["apiVersion"]
    base = "/api/v1" if group == "v1" else f"/apis/{group}"
    namespace = f"/namespaces/{meta['namespace']}" if "namespace" in meta else ""
    return f"{base}{namespace}/{plural}/{meta['name']}"


def _strict_dry_run_update(apiserver: APIServer, doc: dict) -> tuple[int, dict]:
    """PUT the object as rendered (dry run) with the server's strict field validation.

    An unconditional update of the applied object: unlike a server-side apply patch (which answers an
    unknown field with a 500), strict decoding names every unknown or duplicate field in a 400.
    """
    status, body = apiserver.request(
        "PUT", _path(doc) + "?dryRun=All&fieldValidation=Strict", body=json.dumps(doc).encode()
    )
    return status, json.loads(body or b"{}")


def test_every_object_passes_the_servers_strict_field_validation(apiserver, deployed_rbac):
    for doc in manifests.rendered():
        status, body = _strict_dry_run_update(apiserver, doc)
        assert status == 200, f"{doc['kind']} {doc['metadata']['name']}: {status} {body.get('message')}"


def test_the_server_refuses_an_unknown_field(apiserver, deployed_rbac):
    ds = manifests.one(manifests.rendered(), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    status, body = _strict_dry_run_update(apiserver, ds)
    assert (
        status == 400 and 'unknown field "spec.template.spec.containers[0].livenesProbe"' in body["message"]
    )


def test_apply_again_changes_nothing(apiserver, deployed_rbac):
    lines = apply_deployment(apiserver).stdout.strip().splitlines()
    assert len(lines) == len(manifests.rendered())
    assert all(line.endswith(" unchanged") for line in lines), lines


def test_serviceaccount_can_make_every_call_the_agent_makes(apiserver, admin_client, deployed_rbac, k8s_node):
    """The agent's calls, made with the ServiceAccount's own token (lightkube, as the agent does)."""
    from lightkube.models.core_v1 import EventSource, ObjectReference
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Event, Node, Pod
    from lightkube.types import PatchType

    from tests.k8s.envtest import client_from_kubeconfig

    ns = deployed_rbac.namespace
    sa = client_from_kubeconfig(deployed_rbac.kubeconfig, field_manager="nvidia-k8s-vgpu-dm")
    node = sa.get(Node, k8s_node)
    assert [n.metadata.name for n in sa.list(Node, fields={"metadata.name": k8s_node})] == [k8s_node]
    patch = {"metadata": {"labels": {"nvidia.com/vgpu.config.state": "pending"}}}
    sa.patch(Node, k8s_node, patch, patch_type=PatchType.MERGE)
    assert admin_client.get(Node, k8s_node).metadata.labels["nvidia.com/vgpu.config.state"] == "pending"
    assert list(sa.list(Pod, namespace=ns, fields={"spec.nodeName": k8s_node})) == []
    for path in (
        f"/api/v1/nodes?watch=1&fieldSelector=metadata.name%3D{k8s_node}&timeoutSeconds=1",
        f"/api/v1/namespaces/{ns}/pods?watch=1&fieldSelector=spec.nodeName%3D{k8s_node}&timeoutSeconds=1",
    ):
        status, _ = apiserver.request("GET", path, token=deployed_rbac.token)
        assert status == 200, path
    event = Event(
        metadata=ObjectMeta(generateName=f"{k8s_node}.", namespace=ns),
        involvedObject=ObjectReference(
            apiVersion="v1", kind="Node", name=k8s_node, uid=node.metadata.uid, namespace=ns
        ),
        reason="VGPUConfigApplied",
        message="test",
        type="Normal",
        source=EventSource(component="nvidia-k8s-vgpu-dm", host=k8s_node),
    )
    created = sa.create(event)
    assert admin_client.get(Event, created.metadata.name, namespace=ns).involvedObject.name == k8s_node


def _forbidden_calls(rbac, node: str) -> list[tuple[str, str, dict | None]]:
    ns, own = rbac.namespace, rbac.agent_namespace
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "x."}, "involvedObject": {}}
    return [
        ("PUT", f"/api/v1/nodes/{node}", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        ("DELETE", f"/api/v1/nodes/{node}", None),
        ("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "x"}}),
        ("PATCH", f"/api/v1/nodes/{node}/status", {"status": {}}),
        ("GET", f"/api/v1/namespaces/{ns}/secrets", None),
        ("GET", f"/api/v1/namespaces/{own}/secrets", None),
        ("GET", "/api/v1/secrets", None),
        ("GET", f"/api/v1/namespaces/{ns}/pods/some-pod", None),
        ("DELETE", f"/api/v1/namespaces/{ns}/pods/some-pod", None),
        ("PATCH", f"/api/v1/namespaces/{ns}/pods/some-pod", {"metadata": {}}),
        ("POST", f"/api/v1/namespaces/{ns}/pods/some-pod/eviction", {"apiVersion": "policy/v1"}),
        ("GET", "/api/v1/pods", None),
        ("GET", "/api/v1/namespaces/kube-system/pods", None),
        ("GET", f"/api/v1/namespaces/{own}/pods", None),
        ("GET", f"/api/v1/namespaces/{own}/configmaps", None),
        ("POST", "/api/v1/namespaces/default/events", event),
        ("PATCH", f"/api/v1/namespaces/{ns}/events/some-event", {"count": 2}),
        ("POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events", {"apiVersion": "events.k8s.io/v1"}),
        ("GET", f"/apis/apps/v1/namespaces/{own}/daemonsets", None),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", None),
    ]


def test_serviceaccount_is_refused_everything_else(apiserver, deployed_rbac, k8s_node):
    wrong = []
    for method, path, body in _forbidden_calls(deployed_rbac, k8s_node):
        data = json.dumps(body).encode() if body is not None else None
        ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
        status, _ = apiserver.request(method, path, token=deployed_rbac.token, body=data, content_type=ctype)
        if status != 403:
            wrong.append(f"{method} {path}: {status}")
    assert wrong == []


def _can_i_rows(apiserver: APIServer, namespace: str, kubeconfig: str | None = None, user: str | None = None):
    args = ["auth", "can-i", "--list", "-n", namespace]
    if user:
        args.append(f"--as={user}")
    result = apiserver.kubectl(*args, kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    titles = header.split("  ")
    assert [t.strip() for t in titles if t.strip()] == [
        "Resources",
        "Non-Resource URLs",
        "Resource Names",
        "Verbs",
    ]
    parsed = set()
    for row in rows:
        cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        verbs = " ".join(cells[3].strip("[]").split())
        parsed.add((cells[0], cells[1], cells[2], verbs))
    return parsed


@pytest.mark.parametrize("where", ["operand", "agent", "default"])
def test_can_i_list_shows_nothing_beyond_the_agents_needs(apiserver, deployed_rbac, where):
    namespace = {"operand": deployed_rbac.namespace, "agent": deployed_rbac.agent_namespace}.get(where, where)
    # The baseline: a ServiceAccount in the same namespace with no bindings of its own.
    nobody = f"system:serviceaccount:{deployed_rbac.agent_namespace}:nobody-{uuid.uuid4().hex[:6]}"
    baseline = _can_i_rows(apiserver, namespace, user=nobody)
    expected = EXPECTED_IN_OPERAND_NS if where == "operand" else EXPECTED_ELSEWHERE
    expected_rows = {(resource, "[]", "[]", verbs) for resource, verbs in expected}
    # Once as seen by an admin impersonating the ServiceAccount, once with the ServiceAccount's token.
    for rows in (
        _can_i_rows(apiserver, namespace, user=deployed_rbac.username),
        _can_i_rows(apiserver, namespace, kubeconfig=deployed_rbac.kubeconfig),
    ):
        extra = {(r[0], r[1], r[2], " ".join(sorted(r[3].split()))) for r in rows - baseline}
        assert extra == {(r, u, n, " ".join(sorted(v.split()))) for r, u, n, v in expected_rows}
