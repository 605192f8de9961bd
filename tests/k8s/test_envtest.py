"""The real-API-server harness itself: what the agent and deployment tests rely on."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.k8s.conftest import require_assets, unique_name
from tests.k8s.envtest import APIServer, client_from_kubeconfig


def test_node_label_patch_reads_back(apiserver, admin_client, k8s_node):
    from lightkube.resources.core_v1 import Node
    from lightkube.types import PatchType

    admin_client.patch(
        Node,
        k8s_node,
        {"metadata": {"labels": {"nvidia.com/vgpu.config": "A100-4C"}}},
        patch_type=PatchType.MERGE,
    )
    assert admin_client.get(Node, k8s_node).metadata.labels["nvidia.com/vgpu.config"] == "A100-4C"
    shown = apiserver.kubectl("get", "node", k8s_node, "-o", "json", check=True)
    assert json.loads(shown.stdout)["metadata"]["labels"]["nvidia.com/vgpu.config"] == "A100-4C"


def test_pod_on_node_needs_a_second_delete(apiserver, admin_client, k8s_node, k8s_namespace):
    """No kubelet runs: a bound pod's delete only marks it; grace 0 removes it (what a test must do)."""
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod

    pod = Pod(
        metadata=ObjectMeta(name="plugin", namespace=k8s_namespace, labels={"app": "x"}),
        spec=PodSpec(nodeName=k8s_node, containers=[Container(name="c", image="example.invalid/c")]),
    )
    admin_client.create(pod)
    admin_client.delete(Pod, "plugin", namespace=k8s_namespace)
    assert admin_client.get(Pod, "plugin", namespace=k8s_namespace).metadata.deletionTimestamp is not None
    admin_client.delete(Pod, "plugin", namespace=k8s_namespace, grace_period=0)
    listed = admin_client.list(Pod, namespace=k8s_namespace, fields={"spec.nodeName": k8s_node})
    assert list(listed) == []


def test_unknown_token_is_refused(apiserver):
    kubeconfig = apiserver.kubeconfig_for_token("not-a-token")
    result = apiserver.kubectl("get", "nodes", kubeconfig=kubeconfig)
    assert result.returncode != 0
    assert "Unauthorized" in result.stderr or "must be logged in" in result.stderr


def test_restart_keeps_data_and_url(apiserver, admin_client, k8s_node):
    url = apiserver.url
    apiserver.stop()
    try:
        down = apiserver.kubectl("get", "node", k8s_node, "--request-timeout=3s")
        assert down.returncode != 0 and "refused" in down.stderr
    finally:
        apiserver.start()
    assert apiserver.url == url
    # A client made before the restart keeps working: same port, same serving certificate.
    from lightkube.resources.core_v1 import Node

    assert admin_client.get(Node, k8s_node).metadata.name == k8s_node
    assert client_from_kubeconfig(apiserver.admin_kubeconfig).get(Node, k8s_node).metadata.name == k8s_node


def test_a_server_left_stopped_is_started_for_the_next_test(apiserver):
    apiserver.stop()
    assert not apiserver.running
    apiserver.ensure_running()
    assert apiserver.running
    assert apiserver.kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_names_are_unique_dns_labels(request):
    names = {unique_name(request, "ns") for _ in range(50)}
    assert len(names) == 50
    assert all(len(n) <= 63 and n == n.lower() and n[0].isalpha() for n in names)


def test_missing_assets_skip_locally_and_fail_in_ci():
    with pytest.raises(pytest.skip.Exception, match="KUBEBUILDER_ASSETS is unset"):
        require_assets({})
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_assets({"CI": "true"})
    assert require_assets({"KUBEBUILDER_ASSETS": "/x", "CI": "true"}) == "/x"


def test_setup_moves_to_another_port_when_its_port_is_taken():
    """The probed free port can be taken before kube-apiserver binds it (parallel sessions)."""
    server = APIServer(require_assets(os.environ))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        taken = server.port
        server.setup()
        try:
            assert server.port != taken and server.url.endswith(f":{server.port}")
            assert server.kubectl("get", "--raw", "/readyz").stdout == "ok"
        finally:
            server.teardown()
    assert not server.workdir.exists()
