"""apply on a host where the DRA driver owns a GPU: refused before the first write, whatever the config
asks of that GPU — a vGPU layout, or a MIG change (whose step runs before the vGPUs are planned).
The host is simulated; the ownership record is written as nvidia-vgpu-dra writes it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from vgpu_dm.host.owner import DraOwnership, write_dra_owned
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host

REPO = Path(__file__).resolve().parents[2]
MIG_CONFIG = REPO / "examples" / "config-mig.yaml"
GPU1 = "0000:5e:00.0"


def dra_owns_gpu1_with_a_vgpu(cli, root: Path, vgpu: str) -> None:
    """GPU 1 carries one ``vgpu`` (as a prepared claim leaves it, nobody holding it) and is owned."""
    config = root.parent / "one.yaml"
    config.write_text(
        f'version: v1\nvgpu-configs:\n  one:\n    - devices: [1]\n      vgpu-devices: {{"{vgpu}": 1}}\n'
    )
    assert cli("apply", "--sim", str(root), "-f", str(config), "-c", "one").code == 0
    write_dra_owned(SimHostRoot(root), DraOwnership("vgpu.nvidia.com", "node-1", {GPU1: time.time()}))


@pytest.mark.parametrize("vendor_vfio", [False, True], ids=["mdev", "vendor-vfio"])
def test_a_mig_config_is_refused_before_the_mig_step_touches_a_dra_owned_gpu(cli, workdir, vendor_vfio):
    root = workdir / "host"
    create_host(root, ["A100", "A100"], vendor_vfio=vendor_vfio)
    dra_owns_gpu1_with_a_vgpu(cli, root, "A100-4C")
    before, logged = snapshot(root), len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", str(MIG_CONFIG), "-c", "A100-1-5C")
    assert result.code == 1
    assert f"GPU 1 ({GPU1})" in result.err and "owned by the DRA driver vgpu.nvidia.com" in result.err
    assert "nvidia-mig-parted" not in result.err  # the MIG step never started
    assert len(writes(root)) == logged and snapshot(root) == before
    assert [g.mig_mode for g in SimState.load(root).gpus] == [False, False]
    assert all(not g.gpu_instances for g in SimState.load(root).gpus)


def test_a_vgpu_config_is_refused_for_a_dra_owned_gpu_and_gpu_0_is_not_changed_either(cli, workdir):
    root = workdir / "host"
    create_host(root, ["T4", "T4"])
    dra_owns_gpu1_with_a_vgpu(cli, root, "T4-2Q")
    config = workdir / "all.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  all:\n    - devices: all\n      vgpu-devices: {"T4-4Q": 4}\n'
    )
    logged = len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "all")
    assert result.code == 1 and "owned by the DRA driver" in result.err
    assert len(writes(root)) == logged and layouts(root) == [{}, {"T4-2Q": 1}]


def test_a_config_that_leaves_the_owned_gpu_out_is_applied(cli, workdir):
    root = workdir / "host"
    create_host(root, ["A100", "A100"])
    dra_owns_gpu1_with_a_vgpu(cli, root, "A100-4C")
    config = workdir / "gpu0.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  gpu0:\n    - devices: [0]\n      vgpu-devices: {"A100-1-5C": 7}\n'
    )
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "gpu0")
    assert result.code == 0, result.err
    assert layouts(root) == [{"A100-1-5C": 7}, {"A100-4C": 1}]
    assert [g.mig_mode for g in SimState.load(root).gpus] == [True, False]
