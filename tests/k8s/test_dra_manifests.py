"""deploy/dra and examples/dra checked offline: `kubectl kustomize` renders them, every object
validates strictly for each Kubernetes version from 1.34 (the first with resource.k8s.io/v1) that
kubernetes-validate bundles, the RBAC is exactly what the driver calls, and the DaemonSet, DeviceClass,
claim template and KubeVirt VM agree with each other and with the driver's flags.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tests.k8s.manifests import REPO, env_of, one, rendered
from vgpu_dm.dra.main import DEFAULT_DRIVER, command
from vgpu_dm.spec.loader import load_spec_file

DRA_DIR = REPO / "deploy" / "dra"
EXAMPLES = REPO / "examples" / "dra"
VERSIONS = sorted(
    {v for v in all_versions() if tuple(int(p) for p in v.split(".")[:2]) >= (1, 34)},
    key=lambda v: tuple(int(p) for p in v.split(".")),
)
KINDS = {
    "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "DeviceClass", "DaemonSet", "ConfigMap",
}  # fmt: skip


def _docs():
    return rendered(DRA_DIR)


def test_kustomize_renders_every_object():
    assert {d["kind"] for d in _docs()} == KINDS


@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_manifests_and_the_claim_template_validate_strictly(version):
    for doc in [*_docs(), *yaml.safe_load_all((EXAMPLES / "resourceclaimtemplate.yaml").read_text())]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_is_exactly_what_the_driver_calls():
    role = one(_docs(), "ClusterRole")
    rules = {
        (g, r): sorted(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {
        ("", "nodes"): ["get", "watch"],
        ("resource.k8s.io", "resourceslices"): ["create", "delete", "list", "update"],
        ("resource.k8s.io", "resourceclaims"): ["get", "list", "watch"],
    }
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    binding = one(_docs(), "ClusterRoleBinding")
    ds = one(_docs(), "DaemonSet")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
         "namespace": ds["metadata"]["namespace"]}
    ]  # fmt: skip
    policy = one(_docs(), "ValidatingAdmissionPolicy")
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    # The policy knows the driver by the end of its ServiceAccount's name (test_dra_rbac enforces it).
    assert f'endsWith("{account}")' in policy["spec"]["matchConditions"][0]["expression"]
    assert (
        one(_docs(), "ValidatingAdmissionPolicyBinding")["spec"]["policyName"] == policy["metadata"]["name"]
    )


def test_daemonset_mounts_what_the_kubelet_and_the_runtime_read_at_the_same_paths():
    docs = _docs()
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {k: v.get("value") for k, v in env_of(container).items()}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[env["HOST_ROOT_MOUNT"]]["hostPath"]["path"] == "/"
    # A containerised driver mounted at /run/nvidia/driver after the pod started must show up inside.
    (host_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["HOST_ROOT_MOUNT"]]
    assert host_mount.get("mountPropagation") == "HostToContainer"
    for key in ("KUBELET_REGISTRY_DIR", "KUBELET_PLUGINS_DIR", "CDI_DIR"):
        assert mounts[env[key]]["hostPath"]["path"] == env[key], f"{key} must be the same path on the host"
    assert container["securityContext"]["privileged"] is True and container["command"] == ["nvidia-vgpu-dra"]
    # Every environment variable is one the driver reads.
    known = {p.envvar for p in command.params if p.envvar} | {"NODE_NAME"}
    assert set(env) <= known
    configmap = one(docs, "ConfigMap")
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert Path(env["CONFIG_FILE"]).parent == Path(config_mount["mountPath"])
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]


def test_configmap_holds_a_valid_config_with_the_default(tmp_path):
    docs = _docs()
    env = {
        k: v.get("value")
        for k, v in env_of(one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]).items()
    }
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    spec = load_spec_file(path)
    assert env["DEFAULT_VGPU_CONFIG"] in spec.configs


def test_deviceclass_template_and_vm_fit_together():
    device_class = one(_docs(), "DeviceClass")
    assert device_class["metadata"]["name"] == DEFAULT_DRIVER
    assert f'device.driver == "{DEFAULT_DRIVER}"' in device_class["spec"]["selectors"][0]["cel"]["expression"]
    (template,) = yaml.safe_load_all((EXAMPLES / "resourceclaimtemplate.yaml").read_text())
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == DEFAULT_DRIVER and request["exactly"]["count"] == 1
    (vm,) = yaml.safe_load_all((EXAMPLES / "kubevirt-vm.yaml").read_text())
    spec = vm["spec"]["template"]["spec"]
    (claim,) = spec["resourceClaims"]
    assert claim["resourceClaimTemplateName"] == template["metadata"]["name"]
    assert vm["metadata"]["namespace"] == template["metadata"]["namespace"]
    (gpu,) = spec["domain"]["devices"]["gpus"]
    assert gpu["claimName"] == claim["name"] and gpu["requestName"] == request["name"]


def test_the_image_installs_the_dra_extra_and_its_program():
    dockerfile = (REPO / "deploy" / "container" / "Dockerfile").read_text()
    assert "[k8s,dra]" in dockerfile and "nvidia-vgpu-dra --help" in dockerfile
    import re
    from importlib import metadata

    dist = metadata.distribution("vgpu-device-manager")
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert callable(scripts["nvidia-vgpu-dra"].load())
    extra = {
        re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()
        for req in dist.requires or []
        if re.search(r"extra\s*==\s*.dra.", req)
    }
    assert extra == {"grpcio", "protobuf", "lightkube"}
