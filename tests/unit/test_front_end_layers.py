"""Where the choice between the real and the simulated host lives: in ``vgpu_dm.host_choice``, which
the front ends call; they never import the simulator themselves (the CLI's ``sim`` commands aside),
and the Kubernetes agent's modules load without it."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

SRC = REPO / "src" / "vgpu_dm"


def _sim_imports(path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("vgpu_dm.sim")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgpu_dm.sim"):
            found.append(node.module)
    return found


def test_the_front_ends_choose_the_host_only_through_host_choice():
    found = {
        str(path.relative_to(SRC)): _sim_imports(path)
        for package in ("cli", "k8s", "dra")
        for path in sorted((SRC / package).glob("*.py"))
        if path.name != "sim_cmd.py"  # the simulator's own commands
    }
    assert {k: v for k, v in found.items() if v} == {}
    assert _sim_imports(SRC / "host_choice.py") == ["vgpu_dm.sim.host"]


def test_the_agent_loads_without_the_simulator():
    code = (
        "import sys, vgpu_dm.k8s.reconcile, vgpu_dm.k8s.agent; "
        "print(sorted(m for m in sys.modules if m.startswith('vgpu_dm.sim')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_open_host_or_sim_picks_the_simulator_only_when_asked(tmp_path):
    import pytest

    from vgpu_dm.host.root import NotAHostRoot
    from vgpu_dm.host_choice import open_host_or_sim
    from vgpu_dm.sim.layout import create_host

    create_host(tmp_path / "sim", ["T4"])
    assert open_host_or_sim("/", str(tmp_path / "sim")).simulated
    with pytest.raises(NotAHostRoot, match="simulated host"):
        open_host_or_sim(str(tmp_path / "sim"))
    with pytest.raises(NotAHostRoot, match="is not a simulated host"):
        open_host_or_sim("/", str(tmp_path))
