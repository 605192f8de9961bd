"""The front ends' layering (design.md): the agent (vgpu_dm.k8s) and the DRA driver (vgpu_dm.dra) never
import each other; what both need lives in neutral modules (nodeconfig, kubeapi, backoff)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import vgpu_dm.dra
import vgpu_dm.k8s


def _modules(package) -> list[str]:
    return [
        f"{package.__name__}.{m.name}"
        for m in pkgutil.walk_packages(package.__path__)
        if not m.name.startswith("proto.")
    ]


@pytest.mark.parametrize(
    "package, other", [(vgpu_dm.dra, "vgpu_dm.k8s"), (vgpu_dm.k8s, "vgpu_dm.dra")], ids=["dra", "k8s"]
)
def test_one_front_end_never_imports_the_other(package, other):
    code = (
        "import importlib, sys\n"
        f"for name in {_modules(package)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {other!r} or m.startswith({other + '.'!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
