"""Fixtures for tests against a real kube-apiserver (envtest assets named by KUBEBUILDER_ASSETS).

- ``apiserver`` (session): a running etcd + kube-apiserver; see tests/k8s/envtest.py for its interface
  (url, ca_file, admin_token, admin_kubeconfig, kubeconfig_for_token, stop/start/restart, kubectl).
- ``admin_client`` (session): a lightkube Client with the admin token.
- ``k8s_node`` / ``k8s_namespace`` (function): a fresh Node / Namespace, deleted after the test.
- ``deployed_rbac`` (session): deploy/kubernetes applied with `kubectl apply -k` and a token of its
  ServiceAccount (see DeployedRBAC): run the agent with ``--kubeconfig deployed_rbac.kubeconfig
  --namespace deployed_rbac.namespace`` to prove the shipped RBAC is enough.

Without KUBEBUILDER_ASSETS the tests skip with a reason, except under CI=true, where they fail: CI
must run them (`make test` prepares the assets when ../shared/envtest is present).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

from tests.k8s import manifests
from tests.k8s.envtest import APIServer, EnvtestError, Scheduler, client_from_kubeconfig

__all__ = ["client_from_kubeconfig"]

_started: list[APIServer] = []


def in_ci(env: Mapping[str, str]) -> bool:
    return env.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_assets(env: Mapping[str, str]) -> str:
    """The envtest directory, or skip (fail under CI) saying how to get one."""
    assets = env.get("KUBEBUILDER_ASSETS", "")
    if assets:
        return assets
    reason = (
        "KUBEBUILDER_ASSETS is unset: no real kube-apiserver/etcd for tests/k8s "
        "(`make test` sets it when ../shared/envtest/kube-apiserver.xz exists; or point it at a "
        "directory holding kube-apiserver and etcd)"
    )
    if in_ci(env):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def unique_name(request: pytest.FixtureRequest, prefix: str) -> str:
    """A DNS-label name (<= 63 chars) that says which test made it and never repeats."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    return f"{prefix}-{stem[: 63 - len(prefix) - 10].strip('-')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def apiserver() -> Iterator[APIServer]:
    server = APIServer(require_assets(os.environ))
    try:
        server.setup()
    except EnvtestError as err:
        pytest.fail(str(err), pytrace=False)
    _started.append(server)
    try:
        yield server
    finally:
        server.teardown()


@pytest.fixture(scope="session")
def kube_scheduler(apiserver: APIServer) -> Iterator[Scheduler]:
    """A real kube-scheduler on the session's API server (the DRA tests' allocator). Missing from
    KUBEBUILDER_ASSETS: skipped, or failed under CI=true (`make test` unpacks it)."""
    try:
        scheduler = Scheduler(apiserver)
    except EnvtestError as err:
        if in_ci(os.environ):
            pytest.fail(f"CI=true but {err}", pytrace=False)
        pytest.skip(str(err))
    try:
        scheduler.start()
    except EnvtestError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield scheduler
    finally:
        scheduler.stop()


@pytest.fixture(scope="session")
def admin_client(apiserver: APIServer):
    return client_from_kubeconfig(apiserver.admin_kubeconfig)


@pytest.fixture
def k8s_node(request: pytest.FixtureRequest, apiserver: APIServer, admin_client) -> Iterator[str]:
    """A fresh Node (no kubelet behind it: nothing ever changes it but the test and the agent)."""
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Node

    name = unique_name(request, "node")
    admin_client.create(Node(metadata=ObjectMeta(name=name, labels={"kubernetes.io/hostname": name})))
    try:
        yield name
    finally:
        apiserver.ensure_running()  # a restart test that failed half-way may have left it stopped
        with contextlib.suppress(Exception):
            admin_client.delete(Node, name)


@pytest.fixture
def k8s_namespace(request: pytest.FixtureRequest, apiserver: APIServer, admin_client) -> Iterator[str]:
    """A fresh Namespace for operand pods; emptied and really deleted afterwards."""
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    name = unique_name(request, "ns")
    admin_client.create(Namespace(metadata=ObjectMeta(name=name)))
    try:
        yield name
    finally:
        delete_namespace(apiserver, name)


def delete_namespace(apiserver: APIServer, name: str) -> None:
    """Delete a namespace although no namespace controller runs: remove its pods, then its finalizer."""
    apiserver.ensure_running()
    # Pods bound to a node only get a deletionTimestamp; grace 0 removes them (what a kubelet does).
    apiserver.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", "--wait=false")
    apiserver.kubectl("delete", "namespace", name, "--wait=false")
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "spec": {"finalizers": []}}
    apiserver.request("PUT", f"/api/v1/namespaces/{name}/finalize", body=json.dumps(body).encode())


@dataclass(frozen=True)
class DeployedRBAC:
    """deploy/kubernetes applied to the test server, and a token of the agent's ServiceAccount."""

    namespace: str  # the operand namespace: the agent's --namespace / NAMESPACE (pods, Events)
    serviceaccount: str
    token: str
    kubeconfig: str  # a kubeconfig file that authenticates as that ServiceAccount
    agent_namespace: str  # where the DaemonSet and the ServiceAccount live

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.agent_namespace}:{self.serviceaccount}"


@pytest.fixture(scope="session")
def deployed_rbac(apiserver: APIServer) -> DeployedRBAC:
    wiring = manifests.wiring(manifests.rendered())
    # The operand namespace belongs to the GPU Operator; the deployment expects it to exist.
    if apiserver.kubectl("get", "namespace", wiring.operand_namespace).returncode != 0:
        apiserver.kubectl("create", "namespace", wiring.operand_namespace, check=True)
    apply_deployment(apiserver)
    token = apiserver.kubectl(
        "create", "token", wiring.serviceaccount, "-n", wiring.agent_namespace, "--duration=6h", check=True
    ).stdout.strip()
    return DeployedRBAC(
        namespace=wiring.operand_namespace,
        serviceaccount=wiring.serviceaccount,
        token=token,
        kubeconfig=apiserver.kubeconfig_for_token(token),
        agent_namespace=wiring.agent_namespace,
    )


def apply_deployment(apiserver: APIServer):
    """`kubectl apply -k deploy/kubernetes`, as the README says.

    --validate=false only because kubectl 1.32's client-side validation fetches the protobuf OpenAPI v2
    document, which this 1.36 test server fails to produce (503); the schema is checked strictly
    elsewhere: offline with kubernetes-validate and on this server with fieldValidation=Strict.
    """
    result = apiserver.kubectl("apply", "-k", str(manifests.DEPLOY_DIR), "--validate=false")
    assert result.returncode == 0, f"kubectl apply -k failed:\n{result.stderr}"
    return result


def pytest_terminal_summary(terminalreporter) -> None:
    for server in _started:
        figures = ", ".join(f"{s:.1f} s" for s in server.startup_seconds)
        terminalreporter.write_line(f"envtest: kube-apiserver start to /readyz: {figures}")
