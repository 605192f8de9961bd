"""Plan-level tests: ``build_plan`` on simulated inventories, and the matching helpers on fake devices.

Planning must never write to the host; every test that plans on a simulated host checks that.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vgpu_dm.apply import apply_config
from vgpu_dm.errors import PlanError
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.host.model import MDEV, TypeInfo, VGPUDevice
from vgpu_dm.plan import _matches_as_is, _resolve, build_plan, governing_entries
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host
from vgpu_dm.sim.processes import add_holder
from vgpu_dm.spec import load_spec
from vgpu_dm.vgpu_type import VGPUType

SOURCE = "plan-test.yaml"


def entries(text: str, name: str | None = None):
    return load_spec(text, SOURCE).select(name)[1]


def one(vgpus: str, devices: str = "all", extra: str = "") -> str:
    """A config file with one config of one entry (plus optional further entries)."""
    head = "version: v1\nvgpu-configs:\n  c:\n"
    return f"{head}    - devices: {devices}\n      vgpu-devices: {{{vgpus}}}\n{extra}"


@pytest.fixture
def make_host(tmp_path):
    """Factory: a simulated host with the given GPUs (mdev everywhere); returns its root."""
    counter = iter(range(100))

    def make(*gpus: str, mixed_size: bool = True) -> Path:
        root = tmp_path / f"h{next(counter)}"
        create_host(root, list(gpus), vendor_vfio=False, mixed_size=mixed_size)
        return root

    return make


def inventory(root: Path) -> Inventory:
    return Inventory(SimHostRoot(root))


def populate(root: Path, text: str) -> None:
    apply_config(entries(text), SimHostRoot(root), source=SOURCE)


def plan_of(root: Path, text: str, name: str | None = None):
    """build_plan on a fresh inventory; also checks that planning wrote nothing."""
    inv = inventory(root)
    try:
        return build_plan(entries(text, name), inv, SOURCE), inv
    finally:
        assert inv.host.counters.writes == 0


def device(type_name: str, n: int = 0, parent: str = "0000:3b:00.0") -> VGPUDevice:
    return VGPUDevice(
        gpu="0000:3b:00.0",
        parent=parent,
        type_name=type_name,
        type_id=100,
        framework=MDEV,
        uuid=f"00000000-0000-4000-8000-{n:012d}",
    )


def devices(type_name: str, count: int) -> list[VGPUDevice]:
    return [device(type_name, n) for n in range(count)]


def wanted(**counts: int) -> dict[VGPUType, int]:
    return {VGPUType.parse(name.replace("_", "-")): count for name, count in counts.items()}


# -- which entry governs a GPU ---------------------------------------------------------------------
LAYERED = """\
version: v1
vgpu-configs:
  c:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
    - devices: [1]
      vgpu-devices: {"T4-16Q": 1}
    - device-filter: "0x1EB810DE"
      devices: [0]
      vgpu-devices: {"T4-4Q": 4}
    - device-filter: "0x223610DE"
      devices: [0, 1, 2]
      vgpu-devices: {"A10-4Q": 1}
"""


def test_later_entry_wins(make_host):
    root = make_host("T4", "T4", "T4")
    plan, inv = plan_of(root, LAYERED)
    chosen = governing_entries(entries(LAYERED), inv.gpus)
    # The A10 filter (last entry) matches no GPU here, so it overrides nothing.
    assert {i: e.path for i, e in chosen.items()} == {
        0: "vgpu-configs.c[2]",
        1: "vgpu-configs.c[1]",
        2: "vgpu-configs.c[0]",
    }
    assert [(gp.gpu.index, gp.entry.path, gp.wanted) for gp in plan.gpus] == [
        (0, "vgpu-configs.c[2]", {"T4-4Q": 4}),
        (1, "vgpu-configs.c[1]", {"T4-16Q": 1}),
        (2, "vgpu-configs.c[0]", {"T4-2Q": 8}),
    ]
    assert [len(gp.create) for gp in plan.gpus] == [4, 1, 8]
    assert {t.name for gp in plan.gpus for t in gp.create} == {"T4-4Q", "T4-16Q", "T4-2Q"}
    assert plan.writes == 13 and plan.unselected == ()


SOME_GPUS = """\
version: v1
vgpu-configs:
  c:
    - device-filter: "0x1EB810DE"
      devices: [0]
      vgpu-devices: {"T4-1Q": 4}
    - devices: [2]
      vgpu-devices: {}
"""


def test_unselected_gpus_are_listed_and_not_planned(make_host):
    root = make_host("T4", "A10", "T4")
    plan, _ = plan_of(root, SOME_GPUS)
    assert [gp.gpu.index for gp in plan.gpus] == [0, 2]
    assert [g.index for g in plan.unselected] == [1]
    assert plan.gpus[1].wanted == {} and not plan.gpus[1].changes


# -- keep / remove / create ------------------------------------------------------------------------
def test_keep_remove_create(make_host):
    root = make_host("T4")
    populate(root, one('"T4-1Q": 16'))
    current = inventory(root).devices(inventory(root).gpus[0])
    assert len(current) == 16

    same, _ = plan_of(root, one('"T4-1Q": 16'))
    assert same.is_noop and same.writes == 0
    assert same.gpus[0].keep == tuple(current)

    fewer, _ = plan_of(root, one('"T4-1Q": 8'))
    gp = fewer.gpus[0]
    assert gp.keep == tuple(current[:8]) and gp.remove == tuple(current[8:]) and gp.create == ()
    assert fewer.writes == 8

    more, _ = plan_of(root, one('"T4-1Q": 16'))
    assert more.is_noop

    other, _ = plan_of(root, one('"T4-4Q": 4'))
    gp = other.gpus[0]
    assert gp.keep == () and gp.remove == tuple(current)
    assert [t.name for t in gp.create] == ["T4-4Q"] * 4
    assert other.writes == 20

    cleared, _ = plan_of(root, one(""))
    assert cleared.gpus[0].remove == tuple(current) and cleared.gpus[0].create == ()


def test_growing_keeps_everything_and_creates_the_difference(make_host):
    root = make_host("T4", "A10")
    populate(root, one('"T4-2Q": 3', "[0]", '    - devices: [1]\n      vgpu-devices: {"A10-6Q": 1}\n'))
    plan, inv = plan_of(
        root, one('"T4-2Q": 8', "[0]", '    - devices: [1]\n      vgpu-devices: {"A10-6Q": 4}\n')
    )
    t4, a10 = plan.gpus
    assert (len(t4.keep), len(t4.remove), len(t4.create)) == (3, 0, 5)
    assert (len(a10.keep), len(a10.remove), len(a10.create)) == (1, 0, 3)
    assert a10.framework == "mdev" and inv.mdev.slots(a10.gpu) == len(a10.gpu.vfs)


def test_shrinking_keeps_the_vgpus_a_vm_holds(make_host):
    root = make_host("T4")
    populate(root, one('"T4-1Q": 6'))
    inv = inventory(root)
    current = inv.devices(inv.gpus[0])
    busy = current[-1]  # would be removed first by plain order
    add_holder(root, f"/dev/vfio/{busy.iommu_group}")
    plan, _ = plan_of(root, one('"T4-1Q": 2'))
    gp = plan.gpus[0]
    assert busy in gp.keep and busy not in gp.remove
    assert len(gp.keep) == 2 and len(gp.remove) == 4


# -- suffix fallback -------------------------------------------------------------------------------
def _offers_nothing(name: str) -> bool:
    return False


def test_matches_as_is_exact_and_empty():
    assert _matches_as_is({}, [], _offers_nothing)
    assert not _matches_as_is({}, devices("T4-1Q", 1), _offers_nothing)
    assert not _matches_as_is(wanted(T4_1Q=1), [], _offers_nothing)
    assert _matches_as_is(wanted(T4_1Q=16), devices("T4-1Q", 16), _offers_nothing)
    assert not _matches_as_is(wanted(T4_1Q=16), devices("T4-1Q", 15), _offers_nothing)
    assert not _matches_as_is(wanted(T4_1Q=2), [*devices("T4-1Q", 2), device("T4-1B", 9)], _offers_nothing)
    assert _matches_as_is(
        wanted(T4_4Q=2, T4_4C=1), [*devices("T4-4Q", 2), device("T4-4C", 7)], _offers_nothing
    )
    assert not _matches_as_is(wanted(T4_4Q=2, T4_4C=1), devices("T4-4Q", 3), _offers_nothing)


def test_matches_as_is_with_suffix_fallback():
    gfx = {VGPUType.parse("DC-1-24QGFX"): 2}
    # The driver has no GFX variant: devices were created as the bare type and still match.
    assert _matches_as_is(gfx, devices("DC-1-24Q", 2), _offers_nothing)
    assert _matches_as_is(gfx, devices("DC-1-24QGFX", 2), _offers_nothing)
    assert not _matches_as_is(gfx, devices("DC-1-24Q", 1), _offers_nothing)
    assert not _matches_as_is(gfx, [*devices("DC-1-24Q", 2), device("DC-1-24QGFX", 5)], _offers_nothing)
    # NOME, like GFX, falls back to the bare driver type.
    nome_me = {VGPUType.parse("A100-1-5CNOME"): 1}
    assert _matches_as_is(nome_me, devices("A100-1-5C", 1), _offers_nothing)
    # Two wanted types that both fall back to the same driver type cannot both be satisfied.
    both = {VGPUType.parse("DC-1-24QGFX"): 1, VGPUType.parse("DC-1-24Q"): 1}
    assert not _matches_as_is(both, devices("DC-1-24Q", 2), _offers_nothing)
    # When the driver offers the suffixed type itself, a bare-type device does not stand for it.
    assert not _matches_as_is(gfx, devices("DC-1-24Q", 2), lambda name: name == "DC-1-24QGFX")


def _offer(*names: str) -> dict[str, TypeInfo]:
    return {n: TypeInfo(n, 300 + i, f"NVIDIA {n}", 1) for i, n in enumerate(names)}


def test_resolve_prefers_the_exact_type():
    offered = _offer("A100-1-5C", "A100-1-5CME", "DC-1-24Q")
    assert _resolve(VGPUType.parse("A100-1-5CME"), offered).name == "A100-1-5CME"
    assert _resolve(VGPUType.parse("A100-1-5C"), offered).name == "A100-1-5C"
    assert _resolve(VGPUType.parse("DC-1-24QGFX"), offered).name == "DC-1-24Q"
    assert _resolve(VGPUType.parse("A100-1-5CMEALL"), offered).name == "A100-1-5C"
    assert _resolve(VGPUType.parse("A100-2-10C"), offered) is None
    assert _resolve(VGPUType.parse("DC-1-24QGFX"), _offer("DC-1-24QGFX", "DC-1-24Q")).name == "DC-1-24QGFX"


def _hand_made_mdev(root: Path, vf: str, type_name: str, uuid: str) -> None:
    """Put an existing mdev of ``type_name`` on ``vf`` of the simulated tree, as the driver would show it."""
    gpu = SimState.load(root).gpus[0]
    type_id = next(t.type_id for t in gpu.types if t.name == type_name)
    vf_dir = root / "sys/devices/pci0000:00" / vf
    (vf_dir / uuid).mkdir()
    os.symlink(f"../mdev_supported_types/nvidia-{type_id}", vf_dir / uuid / "mdev_type")
    os.symlink(
        os.path.relpath(vf_dir / uuid, root / "sys/bus/mdev/devices"), root / "sys/bus/mdev/devices" / uuid
    )


def test_real_suffixed_type_is_not_satisfied_by_the_bare_type(make_host):
    root = make_host("A100")
    vf = SimState.load(root).gpus[0].vfs[0]
    _hand_made_mdev(root, vf, "A100-1-5C", "12345678-1234-4234-8234-123456789abc")
    inv = inventory(root)
    assert "A100-1-5CME" in inv.mdev.types(inv.gpus[0])  # the driver offers the ME variant itself
    assert [d.type_name for d in inv.devices(inv.gpus[0])] == ["A100-1-5C"]
    try:
        plan = build_plan(entries(one('"A100-1-5CME": 1')), inv, SOURCE)
    except PlanError:
        return  # refusing (MIG-backed types are not supported yet) is also correct
    assert not plan.is_noop, "a 1-5C vGPU was taken for the 1-5CME the config asks for"


# -- refusals --------------------------------------------------------------------------------------
def test_mixed_framebuffer_sizes_refused_on_mdev_gpus_without_mixed_size_support(make_host):
    root = make_host("T4", "A10", mixed_size=False)
    with pytest.raises(PlanError) as err:
        plan_of(
            root,
            one(
                '"T4-1Q": 2, "T4-2Q": 1',
                "[0]",
                '    - devices: [1]\n      vgpu-devices: {"A10-1Q": 1, "A10-2Q": 1}\n',
            ),
        )
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(
        "GPU 0 (0000:3b:00.0) [vgpu-configs.c[0]]: T4-1Q, T4-2Q have different framebuffer"
    )
    assert problems[1].startswith("GPU 1 (0000:5e:00.0) [vgpu-configs.c[1]]: A10-1Q, A10-2Q have different")
    assert all(
        "equal-size" in p and "Heterogeneous Time-Slice Sizes is not 'Supported'" in p for p in problems
    )


def test_same_size_different_series_is_not_mixed(make_host):
    root = make_host("T4")
    plan, _ = plan_of(root, one('"T4-4Q": 2, "T4-4C": 2'))
    assert sorted(t.name for t in plan.gpus[0].create) == ["T4-4C", "T4-4C", "T4-4Q", "T4-4Q"]
    assert not plan.gpus[0].enable_mixed_size


MANY_PROBLEMS = """\
version: v1
vgpu-configs:
  c:
    - devices: [0]
      vgpu-devices: {"A10-4Q": 1}
    - devices: [1]
      vgpu-devices: {"T4-1Q": 17}
    - devices: [2]
      vgpu-devices: {"A10-1Q": 2, "A10-2Q": 1}
    - devices: [3, 9]
      vgpu-devices: {"A10-4Q": 7}
    - devices: [4]
      vgpu-devices: {"A100-1-5C": 1}
"""


def test_all_problems_are_collected_across_gpus(make_host):
    root = make_host("T4", "T4", "A10", "A10", "A100", mixed_size=False)
    populate(root, one('"T4-16Q": 1', "[0, 1]"))
    before = [d.uuid for g in inventory(root).gpus for d in inventory(root).devices(g)]
    with pytest.raises(PlanError) as err:
        plan_of(root, MANY_PROBLEMS)
    problems = err.value.problems
    assert len(problems) == 6, problems
    assert problems[0] == (
        f"{SOURCE}:10: vgpu-configs.c[3].devices: GPU index 9 does not exist (this host has GPUs 0-4)"
    )
    by_gpu = problems[1:]
    assert by_gpu[0].startswith("GPU 0 (0000:3b:00.0) [vgpu-configs.c[0]]: vGPU type A10-4Q is not supported")
    assert by_gpu[1].startswith("GPU 1 (0000:5e:00.0) [vgpu-configs.c[1]]: 17 x T4-1Q requested")
    assert by_gpu[2].startswith("GPU 2 (0000:86:00.0) [vgpu-configs.c[2]]: A10-1Q, A10-2Q have different")
    assert by_gpu[3].startswith("GPU 3 (0000:af:00.0) [vgpu-configs.c[3]]: 7 x A10-4Q requested")
    # Planning alone (no MIG step): MIG mode is off, so the MIG-backed type cannot be created.
    assert by_gpu[4].startswith("GPU 4 (0000:d8:00.0) [vgpu-configs.c[4]]: A100-1-5C cannot be created now")
    # Nothing was changed by the failed planning.
    assert [d.uuid for g in inventory(root).gpus for d in inventory(root).devices(g)] == before


def test_out_of_range_index_on_a_host_without_gpus(make_host):
    root = make_host()
    with pytest.raises(PlanError) as err:
        plan_of(root, one('"T4-1Q": 1', "[0]"))
    assert err.value.problems == [
        f"{SOURCE}:4: vgpu-configs.c[0].devices: GPU index 0 does not exist (this host has no NVIDIA GPUs)"
    ]
    plan, _ = plan_of(root, one('"T4-1Q": 1'))
    assert plan.gpus == () and plan.is_noop
