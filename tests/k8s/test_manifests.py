"""deploy/kubernetes and deploy/container checked offline: strict schema validation for every
Kubernetes version from 1.30 that kubernetes-validate bundles, least-privilege RBAC, and the wiring
between the DaemonSet, its ServiceAccount, the RBAC, the ConfigMap and the agent's flags.
"""

from __future__ import annotations

import copy
import re
import subprocess
from importlib import metadata
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes_validate.utils import ValidationError, all_versions

from tests.k8s.manifests import (
    DEPLOY_DIR,
    DOCKERFILE,
    OVERLAY_DIR,
    REPO,
    env_of,
    one,
    rendered,
    source_docs,
    wiring,
)
from vgpu_dm.spec.loader import load_spec_file

MIN_VERSION = (1, 30)
VERSIONS = sorted(
    {v for v in all_versions() if tuple(int(p) for p in v.split(".")[:2]) >= MIN_VERSION},
    key=lambda v: tuple(int(p) for p in v.split(".")),
)
# The shipped deployment, and the README's site overlay on it (other image, configs, operand namespace):
# each must be consistent on its own. The second value is the example its ConfigMap must hold.
DEPLOYMENTS = {
    "base": (DEPLOY_DIR, REPO / "examples" / "config-t4.yaml"),
    "overlay": (OVERLAY_DIR, REPO / "examples" / "config-h100.yaml"),
}
deployments = pytest.mark.parametrize("which", list(DEPLOYMENTS))
EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "DaemonSet",
}


def _container(docs):
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def test_bundled_schemas_cover_1_30_to_the_test_server():
    assert VERSIONS[0].startswith("1.30.")
    assert any(v.startswith("1.36.") for v in VERSIONS), "no schema for the 1.36 test server"


@deployments
def test_kustomize_renders_every_object(which):
    assert {d["kind"] for d in rendered(DEPLOYMENTS[which][0])} == EXPECTED_KINDS


@deployments
@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_manifests_validate_strictly(which, version):
    for doc in rendered(DEPLOYMENTS[which][0]):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_source_files_validate_strictly(version):
    docs = source_docs()
    assert {d["kind"] for _, d in docs} == EXPECTED_KINDS - {"ConfigMap"}  # the ConfigMap is generated
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as err:
            raise AssertionError(f"deploy/kubernetes/{name}: {doc['kind']}: {err.message}") from err


def test_strict_validation_catches_a_misspelt_field():
    """The check above is worth something: a typo in the DaemonSet is refused, not ignored."""
    docs = rendered()
    ds = copy.deepcopy(one(docs, "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    with pytest.raises(ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(ds, VERSIONS[0], strict=True)


def test_kustomize_reports_a_broken_kustomization(tmp_path):
    broken = tmp_path / "kustomization.yaml"
    broken.write_text("resources:\n  - missing.yaml\n")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "missing.yaml" in result.stderr


# -- RBAC ------------------------------------------------------------------------------------------


def _rules(doc):
    return {
        (group, resource): sorted(rule["verbs"])
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


@deployments
def test_rbac_grants_exactly_what_the_agent_calls(which):
    docs = rendered(DEPLOYMENTS[which][0])
    w = wiring(docs)
    assert _rules(one(docs, "ClusterRole")) == {("", "nodes"): ["get", "list", "patch", "watch"]}
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == w.operand_namespace
    # core/v1 Events (not events.k8s.io): what vgpu_dm.k8s creates, in its --namespace.
    assert _rules(role) == {("", "pods"): ["list", "watch"], ("", "events"): ["create"]}
    for doc in (one(docs, "ClusterRole"), role):
        for rule in doc["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs"
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "update" not in rule["verbs"] and "secrets" not in rule["resources"]


@deployments
def test_bindings_point_at_the_daemonsets_serviceaccount(which):
    docs = rendered(DEPLOYMENTS[which][0])
    w = wiring(docs)
    sa = one(docs, "ServiceAccount")
    assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == (w.agent_namespace, w.serviceaccount)
    subject = {"kind": "ServiceAccount", "name": w.serviceaccount, "namespace": w.agent_namespace}
    crb, rb = one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")
    assert crb["subjects"] == [subject] and rb["subjects"] == [subject]
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(docs, "ClusterRole")["metadata"]["name"],
    }
    assert rb["metadata"]["namespace"] == w.operand_namespace
    assert rb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": one(docs, "Role")["metadata"]["name"],
    }


# -- DaemonSet -------------------------------------------------------------------------------------


@deployments
def test_daemonset_runs_on_vgpu_nodes_with_the_host_root(which):
    docs = rendered(DEPLOYMENTS[which][0])
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = _container(docs)
    env = env_of(container)
    assert one(docs, "Namespace")["metadata"]["name"] == ds["metadata"]["namespace"]
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.workload.config": "vm-vgpu"}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["runAsUser"] == 0
    host_root = env["HOST_ROOT_MOUNT"]["value"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts[host_root]["name"]]["hostPath"]["path"] == "/"
    assert not mounts[host_root].get("readOnly", False)
    # A driver container's root (found as <host root>/run/nvidia/driver) may be mounted after the pod.
    assert mounts[host_root]["mountPropagation"] == "HostToContainer"
    # Long enough for an apply interrupted by SIGTERM to roll back and restore the operands.
    assert pod["terminationGracePeriodSeconds"] >= 60
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


@deployments
def test_probes_hit_the_metrics_endpoint_the_agent_serves(which):
    container = _container(rendered(DEPLOYMENTS[which][0]))
    args = container["args"]
    address = next(a.split("=", 1)[1] for a in args if a.startswith("--metrics-address="))
    port = int(address.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port


@deployments
def test_configmap_holds_the_example_and_the_default_config_exists(which, tmp_path):
    directory, example = DEPLOYMENTS[which]
    docs = rendered(directory)
    container = _container(docs)
    env = env_of(container)
    config_file = Path(env["CONFIG_FILE"]["value"])
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_file.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap")
    # kustomize gave the generated ConfigMap a content hash; the volume must follow that name.
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["metadata"]["namespace"] == one(docs, "DaemonSet")["metadata"]["namespace"]
    content = cm["data"][config_file.name]
    # The copy kustomize packs must not drift from the example the README and the tests use.
    assert content == example.read_text()
    assert content == (directory / "vgpu-config.yaml").read_text()
    (tmp_path / config_file.name).write_text(content)
    spec = load_spec_file(tmp_path / config_file.name)  # our own loader: every config in it is valid
    assert env["DEFAULT_VGPU_CONFIG"]["value"] in spec.configs


def test_overlay_moves_the_operand_namespace_and_the_image():
    base, overlay = rendered(DEPLOY_DIR), rendered(OVERLAY_DIR)
    assert wiring(base).operand_namespace == "gpu-operator"
    assert wiring(overlay).operand_namespace == "nvidia-gpu-operator"
    assert _container(overlay)["image"] == "registry.example.com/gpu/vgpu-device-manager:0.1.0"
    # Everything but the Role and RoleBinding stays where the base puts it.
    assert {(d["kind"], d["metadata"].get("namespace")) for d in overlay} - {
        (d["kind"], d["metadata"].get("namespace")) for d in base
    } == {("Role", "nvidia-gpu-operator"), ("RoleBinding", "nvidia-gpu-operator")}


def test_image_tag_is_the_project_version():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    image = _container(rendered())["image"]
    assert version and image.rsplit(":", 1)[1] == version.group(1)


# -- container image -------------------------------------------------------------------------------


def _stages(dockerfile: str) -> tuple[list[str], list[list[str]]]:
    """(instructions before the first FROM, one list of instructions per stage)."""
    preamble: list[str] = []
    stages: list[list[str]] = []
    for raw in dockerfile.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([line])
        else:
            (stages[-1] if stages else preamble).append(line)
    return preamble, stages


def _arg(preamble: list[str], name: str) -> str:
    return next(line.split("=", 1)[1] for line in preamble if line.startswith(f"ARG {name}="))


def test_dockerfile_is_the_gpu_operators_image():
    """Checked statically (no container engine runs here): what the GPU Operator relies on when a user
    points ClusterPolicy.spec.vgpuDeviceManager at this image (reference/gpu-operator.md §1-2)."""
    preamble, stages = _stages(DOCKERFILE.read_text())
    assert [stage[0] for stage in stages] == [
        "FROM ${MIG_MANAGER_IMAGE} AS mig-manager",
        "FROM ${PYTHON_IMAGE} AS builder",
        "FROM ${PYTHON_IMAGE}",
    ]
    _, builder, final = stages
    assert re.fullmatch(r"python:3\.\d+-slim-bookworm", _arg(preamble, "PYTHON_IMAGE"))
    # nvidia-mig-parted: NVIDIA's published MIG manager image, pinned to upstream's version, copied from
    # the path upstream's own Dockerfile copies it from.
    assert _arg(preamble, "MIG_MANAGER_IMAGE") == "nvcr.io/nvidia/cloud-native/k8s-mig-manager:v0.15.0"
    assert "COPY --from=mig-manager /usr/bin/nvidia-mig-parted /usr/bin/nvidia-mig-parted" in final
    assert any("pip wheel" in line and "--no-deps" in line for line in builder)
    assert "COPY --from=builder /opt/vgpu-dm /opt/vgpu-dm" in final
    final_text = "\n".join(final)
    # Nothing is built or fetched in the final stage, and nothing in it runs at build time either.
    assert not re.search(r"\b(apt-get|apk|gcc|build-essential|pip|RUN|ADD|curl|wget)\b", final_text)
    # Root unless the pod says otherwise: the operator sets no runAsUser (upstream's image: USER 0:0).
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] in ("0", "root")
    # The operator gives no command and no args: the entry point needs none (its required settings come
    # from NODE_NAME, NAMESPACE, CONFIG_FILE, DEFAULT_VGPU_CONFIG; tests/k8s/test_gpu_operator.py).
    assert [line for line in final if line.startswith(("ENTRYPOINT", "CMD"))] == [
        'ENTRYPOINT ["nvidia-k8s-vgpu-dm"]'
    ]
    assert "NVIDIA_VISIBLE_DEVICES=void" in final_text


# Modules that fetch from the network; the Kubernetes API client (lightkube, httpx2) is the one allowed.
NETWORK_MODULES = ("urllib.request", "http.client", "requests", "urllib3", "ftplib", "pip", "ensurepip")
# Programs that download or install: as a program to run they appear as a string of their own.
FETCHING_PROGRAMS = {"curl", "wget", "pip", "pip3", "apt", "apt-get", "dnf", "yum", "apk"}


def fetching_code(root: Path) -> list[str]:
    """Where the Python files under ``root`` import a network or installer module (the Kubernetes API
    client, lightkube and httpx2, is the one allowed) or name a downloader or installer as a program (a
    string of its own, as in an argv). Read from the syntax tree: a message telling a person to
    `pip install` something is not code that does."""
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.strip() in FETCHING_PROGRAMS:
                    found.append(f"{where}:{node.lineno}: runs {node.value!r}")
                continue
            else:
                continue
            for name in names:
                if any(name == m or name.startswith(m + ".") for m in NETWORK_MODULES):
                    found.append(f"{where}:{node.lineno}: imports {name}")
    return found


def test_nothing_is_downloaded_at_run_time():
    """The image runs only what it carries: no code path of the package fetches or installs anything."""
    assert fetching_code(REPO / "src" / "vgpu_dm") == []


def test_the_download_check_sees_code_that_downloads(tmp_path):
    (tmp_path / "a.py").write_text("import subprocess\nsubprocess.run(['curl', '-O', 'https://x'])\n")
    (tmp_path / "b.py").write_text("from urllib.request import urlopen\n")
    (tmp_path / "c.py").write_text("import pip\n")
    (tmp_path / "ok.py").write_text("HINT = \"pip install 'vgpu-device-manager[k8s]'\"\nimport http.server\n")
    assert fetching_code(tmp_path) == [
        "a.py:2: runs 'curl'",
        "b.py:1: imports urllib.request",
        "b.py:1: imports urllib.request.urlopen",
        "c.py:1: imports pip",
    ]


def test_distribution_has_both_programs_and_the_agent_extra():
    """What the Dockerfile installs (the wheel with its k8s extra) provides the ENTRYPOINT program.

    Read from the installed distribution's metadata (built from the same pyproject.toml as the wheel);
    building a wheel here would need the network or the `wheel` package.
    """
    dist = metadata.distribution("vgpu-device-manager")
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    # The image's ENTRYPOINT and the program its build step runs both resolve to a function.
    for program in ("nvidia-k8s-vgpu-dm", "nvidia-vgpu-dm"):
        assert callable(scripts[program].load()), program
    k8s_extra = {
        re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()
        for req in dist.requires or []
        if re.search(r"extra\s*==\s*.k8s.", req)
    }
    assert k8s_extra == {"lightkube", "prometheus-client"}
