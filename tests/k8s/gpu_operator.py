"""The NVIDIA GPU Operator's side of running the vGPU Device Manager, as tests need it: its RBAC and the
environment its DaemonSet gives the container (reference/gpu-operator.md §1).

The rules are those of gpu-operator a22dbf671 ``assets/state-vgpu-device-manager/0200_role.yaml`` and
``0210_clusterrole.yaml``: nodes get/list/watch/update (no patch), pods get/list/watch in the operator's
namespace, no Events. The cluster-scoped names get the namespace appended, so that several tests (and
deploy/kubernetes' own ClusterRole of the same name) can live on one API server.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

SERVICEACCOUNT = "nvidia-vgpu-device-manager"


def rbac_docs(namespace: str) -> list[dict]:
    cluster_name = f"{SERVICEACCOUNT}-{namespace}"
    subject = [{"kind": "ServiceAccount", "name": SERVICEACCOUNT, "namespace": namespace}]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICEACCOUNT, "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": SERVICEACCOUNT, "namespace": namespace},
            "rules": [
                {
                    "apiGroups": ["security.openshift.io"],
                    "resources": ["securitycontextconstraints"],
                    "verbs": ["use"],
                    "resourceNames": ["privileged"],
                },
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": cluster_name},
            "rules": [
                {
                    "apiGroups": ["config.openshift.io"],
                    "resources": ["clusterversions"],
                    "verbs": ["get", "list"],
                },
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "update"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": SERVICEACCOUNT, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICEACCOUNT},
            "subjects": subject,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": cluster_name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
            "subjects": subject,
        },
    ]


@dataclass(frozen=True)
class OperatorRBAC:
    namespace: str
    token: str
    kubeconfig: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{SERVICEACCOUNT}"


def apply_rbac(apiserver, namespace: str) -> OperatorRBAC:
    """The operator's ServiceAccount, Role and ClusterRole in ``namespace``, and a real token of it."""
    text = yaml.safe_dump_all(rbac_docs(namespace))
    result = apiserver.kubectl("apply", "--validate=false", "-f", "-", input=text)
    assert result.returncode == 0, result.stderr
    token = apiserver.kubectl(
        "create", "token", SERVICEACCOUNT, "-n", namespace, "--duration=2h", check=True
    ).stdout.strip()
    return OperatorRBAC(namespace, token, apiserver.kubeconfig_for_token(token))


def delete_rbac(apiserver, namespace: str) -> None:
    name = f"{SERVICEACCOUNT}-{namespace}"
    apiserver.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found", "--wait=false")


def daemonset_env(namespace: str, node: str, config_file: str, default: str = "default") -> dict[str, str]:
    """What the operator's DaemonSet sets (0600_daemonset.yaml + TransformVGPUDeviceManager): no flags."""
    return {
        "NAMESPACE": namespace,
        "NODE_NAME": node,
        "CONFIG_FILE": config_file,
        "DEFAULT_VGPU_CONFIG": default,
    }
