"""The deployment under deploy/kubernetes as the tests see it: rendered by `kubectl kustomize`, with
accessors for the pieces that must agree with each other (ServiceAccount, operand namespace, ConfigMap).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.envtest import KUBECTL

REPO = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO / "deploy" / "kubernetes"
OVERLAY_DIR = REPO / "examples" / "kubernetes-overlay"  # the README's site overlay on DEPLOY_DIR
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"

Doc = dict[str, Any]


def require_kubectl() -> None:
    if not os.access(KUBECTL, os.X_OK):
        reason = f"{KUBECTL} not found: needed to render deploy/kubernetes with kustomize"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


@cache
def _render(directory: Path) -> str:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def rendered(directory: Path = DEPLOY_DIR) -> list[Doc]:
    """The rendered manifests (a fresh copy each call, so tests may mutate them)."""
    require_kubectl()
    return [doc for doc in yaml.safe_load_all(_render(directory)) if doc]


def source_docs() -> list[tuple[str, Doc]]:
    """Every Kubernetes object written by hand under deploy/kubernetes, with its file name."""
    docs = []
    for path in sorted(DEPLOY_DIR.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "vgpu-config.yaml"):
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(docs: list[Doc], kind: str, namespace: str | None = None) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} in the rendered manifests, found {len(found)}"
    return found[0]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


@dataclass(frozen=True)
class Wiring:
    """The names the DaemonSet and the RBAC must agree on."""

    agent_namespace: str  # where the DaemonSet and its ServiceAccount live
    serviceaccount: str
    operand_namespace: str  # the DaemonSet's NAMESPACE: operand pods and Events


def wiring(docs: list[Doc]) -> Wiring:
    ds = one(docs, "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    return Wiring(
        agent_namespace=ds["metadata"]["namespace"],
        serviceaccount=ds["spec"]["template"]["spec"]["serviceAccountName"],
        operand_namespace=env_of(container)["NAMESPACE"]["value"],
    )
