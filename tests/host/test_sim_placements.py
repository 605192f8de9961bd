"""The simulator's two mixed-size rules (option mixed_size_rule), driven through apply's one-vGPU verbs
on simulated vendor-VFIO and mdev hosts: "placements" (sim/placements.py, after NVIDIA's resource
manager source) and "framebuffer" (each type up to its maximum within the framebuffer)."""

from __future__ import annotations

import pytest

from tests.simstate import layouts
from vgpu_dm.apply import create_one, remove_one
from vgpu_dm.errors import PlanError
from vgpu_dm.sim import placements as P
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host


def gpu_of(root, name: str = "L40S"):
    return SimState.load(root).gpus[0]


def type_of(gpu, name: str):
    return next(t for t in gpu.types if t.name == name)


def test_placement_ids_follow_the_recursive_halving(tmp_path):
    create_host(tmp_path / "h", ["L40S"], options={"mixed_size_rule": "placements"})
    gpu = gpu_of(tmp_path / "h")
    assert P.region(gpu) == 48
    assert P.supported(gpu, type_of(gpu, "L40S-24Q")) == [0, 24]
    assert P.supported(gpu, type_of(gpu, "L40S-16Q")) == [0, 32]  # max 3: one per half, at its outer end
    assert P.supported(gpu, type_of(gpu, "L40S-12Q")) == [0, 12, 24, 36]
    assert P.supported(gpu, type_of(gpu, "L40S-8Q")) == [0, 16, 24, 40]  # max 6: four, not six
    # 1 GB on a 48 GB GSP board: 32 placements less the 16 of the deny list.
    ones = P.supported(gpu, type_of(gpu, "L40S-1Q"))
    assert len(ones) == 16 and not set(ones) & set(P.DENY_GSP)


def test_ampere_denies_two_1gb_placements(tmp_path):
    create_host(tmp_path / "h", ["A40"], options={"mixed_size_rule": "placements"})
    a40 = gpu_of(tmp_path / "h")
    ones = P.supported(a40, type_of(a40, "A40-1Q"))
    assert len(ones) == 30 and 8 not in ones and 32 not in ones


@pytest.mark.parametrize("rule", ["framebuffer", "placements"])
@pytest.mark.parametrize("gpu", ["L40S", "A40"])  # vendor VFIO, mdev on VFs
def test_fragmentation_depends_on_the_rule(tmp_path, rule, gpu):
    root = tmp_path / "h"
    create_host(root, [gpu], options={"mixed_size_rule": rule})
    host = SimHostRoot(root)
    address = SimState.load(root).gpus[0].address
    made = [
        create_one(host, None, address, f"{gpu}-{t}", mixed_size=True) for t in ("12Q", "8Q", "8Q", "12Q")
    ]
    if rule == "framebuffer":
        create_one(host, None, address, f"{gpu}-8Q", mixed_size=True)
        assert layouts(root) == [{f"{gpu}-12Q": 2, f"{gpu}-8Q": 3}]
        return
    assert gpu_of(root).placements == {
        made[0].key: [0, 12],
        made[1].key: [16, 8],
        made[2].key: [24, 8],
        made[3].key: [36, 12],
    }
    with pytest.raises(PlanError, match=f"no room for another {gpu}-8Q"):
        create_one(host, None, address, f"{gpu}-8Q", mixed_size=True)
    remove_one(host, None, address, made[1].key)  # slots 16-23 free again
    create_one(host, None, address, f"{gpu}-8Q", mixed_size=True)
    assert sorted(p for p, _ in gpu_of(root).placements.values()) == [0, 16, 24, 36]
