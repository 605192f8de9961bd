"""End to end: ``apply``, ``assert`` and ``list`` through the CLI on simulated vendor-specific-VFIO hosts.

Simulated Ada/Hopper GPUs (L4, L40S, H100, H200; an A10 when forced) start with their SR-IOV VFs
disabled, as after a reboot; apply runs the emulated ``sriov-manage -e`` and then writes type ids to
each VF's ``nvidia/current_vgpu_type``. Most tests run the CLI in-process (``cli``); a couple run the
installed entry point (``run_cli``). "Zero writes" means the simulated host's control-file write log
did not grow. The programs the tool runs on the host (sriov-manage, nvidia-smi) are counted with a
spy around ``SimHostRoot.run`` that still lets the simulator carry them out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import writes
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host

GPU0, GPU1, GPU2 = "0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0"  # the simulator's first addresses
SRIOV_MANAGE = "usr/lib/nvidia/sriov-manage"
LEARNED = "var/lib/nvidia-vgpu-dm/types"
T4_FILTER, L40S_FILTER, H100_FILTER = "0x1EB810DE", "0x26B910DE", "0x233110DE"


# -- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture
def vhost(tmp_path):
    """Factory: a simulated host; Ada/Hopper/Blackwell GPUs get vendor VFIO (VFs off) by default.

    (conftest's ``sim_host`` passes ``vendor_vfio=False``, which makes every SR-IOV GPU mdev-on-VF.)
    """
    counter = iter(range(1000))

    def make(*gpus: str, vendor_vfio: bool | None = None, mixed_size: bool = True) -> Path:
        root = tmp_path / f"vhost{next(counter)}"
        create_host(root, list(gpus), vendor_vfio=vendor_vfio, mixed_size=mixed_size)
        return root

    return make


@pytest.fixture
def host_runs(monkeypatch):
    """Every argv the tool runs on a simulated host (sriov-manage, nvidia-smi), in order."""
    calls: list[list[str]] = []
    original = SimHostRoot.run

    def spy(self, argv, chroot=None, timeout=300, **kwargs):
        calls.append(list(argv))
        return original(self, argv, chroot, timeout, **kwargs)

    monkeypatch.setattr(SimHostRoot, "run", spy)
    return calls


def sriov_runs(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if os.path.basename(c[0]) == "sriov-manage"]


def shm_runs(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if "-shm" in c]


def write_config(tmp_path: Path, **configs) -> str:
    """configs: name → {type: count} (one entry, all GPUs) or a list of full entries."""
    doc = {"version": "v1", "vgpu-configs": {}}
    for name, body in configs.items():
        entries = [{"devices": "all", "vgpu-devices": body}] if isinstance(body, dict) else body
        doc["vgpu-configs"][name] = entries
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def apply(cli, root: Path, cfg: str, name: str, *extra: str):
    return cli("apply", "--sim", str(root), "-f", cfg, "-c", name, *extra)


def check(cli, root: Path, cfg: str, name: str):
    return cli("assert", "--sim", str(root), "-f", cfg, "-c", name)


def report(cli, root: Path) -> list[dict]:
    result = cli("list", "--json", "--sim", str(root))
    assert result.code == 0, result.err
    return json.loads(result.out)["gpus"]


def layout(cli, root: Path) -> list[dict[str, int]]:
    """Per GPU (index order): vGPU type → count, as ``list --json`` shows it."""
    return [dict(Counter(v["type"] for v in gpu["vgpus"])) for gpu in report(cli, root)]


def vfs_of(root: Path, pf: str) -> list[str]:
    """The PF's VF addresses in virtfn order, read straight from the tree."""
    pf_dir = root / "sys/bus/pci/devices" / pf
    links = sorted((e for e in os.listdir(pf_dir) if e.startswith("virtfn")), key=lambda e: int(e[6:]))
    return [os.path.basename(os.readlink(pf_dir / e)) for e in links]


def vf_types(root: Path, pf: str) -> dict[str, int]:
    """VF → current_vgpu_type, straight from the tree."""
    return {
        vf: int((root / "sys/bus/pci/devices" / vf / "nvidia/current_vgpu_type").read_text())
        for vf in vfs_of(root, pf)
    }


def type_id(root: Path, pf: str, name: str) -> int:
    """The simulated driver's id of a type on a GPU."""
    gpu = next(g for g in SimState.load(root).gpus if g.address == pf)
    return next(t.type_id for t in gpu.types if t.name == name)


def ctl(vf: str) -> str:
    return f"sys/bus/pci/devices/{vf}/nvidia/current_vgpu_type"


def new_writes(root: Path, before: int) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in writes(root)[before:]]


# -- enabling VFs, listing, homogeneous layouts ----------------------------------------------------
def test_fresh_host_vfs_enabled_once_then_vgpus_on_vfs(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S")
    cfg = write_config(tmp_path, l40s={"L40S-8Q": 6})
    before = report(cli, root)
    assert [(g["framework"], g["vgpus"]) for g in before] == [("sriov-vfs-off", [])]
    assert vfs_of(root, GPU0) == []

    result = apply(cli, root, cfg, "l40s")
    assert result.code == 0, result.err
    assert sriov_runs(host_runs) == [["/usr/lib/nvidia/sriov-manage", "-e", GPU0]]
    assert result.err.count("enabling SR-IOV virtual functions") == 1
    vfs = vfs_of(root, GPU0)
    assert len(vfs) == 32
    assert (root / "sys/bus/pci/devices" / GPU0 / "sriov_numvfs").read_text().strip() == "32"
    tid = type_id(root, GPU0, "L40S-8Q")
    assert writes(root) == [f"{ctl(vf)}\t{tid}" for vf in vfs[:6]]

    (gpu,) = report(cli, root)
    assert gpu["framework"] == "vendor-vfio" and gpu["model"] == "NVIDIA L40S"
    assert [(v["type"], v["type_id"], v["parent"], v["uuid"]) for v in gpu["vgpus"]] == [
        ("L40S-8Q", tid, vf, None) for vf in vfs[:6]
    ]
    assert vfs[:6] == [
        "0000:3b:00.4",
        "0000:3b:00.5",
        "0000:3b:00.6",
        "0000:3b:00.7",
        "0000:3b:01.0",
        "0000:3b:01.1",
    ]
    assert check(cli, root, cfg, "l40s").code == 0

    # Second apply: nothing to do, and sriov-manage is not run again.
    tree_before = {vf: os.readlink(root / "sys/bus/pci/devices" / vf / "iommu_group") for vf in vfs}
    n = len(writes(root))
    again = apply(cli, root, cfg, "l40s")
    assert again.code == 0, again.err
    assert "already applied" in again.err and "enabling SR-IOV" not in again.err
    assert len(sriov_runs(host_runs)) == 1
    assert len(writes(root)) == n
    assert {vf: os.readlink(root / "sys/bus/pci/devices" / vf / "iommu_group") for vf in vfs} == tree_before


HOMOGENEOUS = [
    ("L4", {"L4-6Q": 4}, None),
    ("L4", {"L4-1Q": 24}, None),  # every VF used
    ("L40S", {"L40S-16Q": 3}, None),
    ("L40S", {"L40S-24C": 2}, None),
    ("H100", {"H100-20C": 4}, None),
    ("H100", {"H100-80C": 1}, None),
    ("H200", {"H200-35C": 4}, None),
    ("H200", {"H200-4C": 32}, None),
    ("A10", {"A10-4Q": 6}, True),  # Ampere forced to vendor VFIO
]


@pytest.mark.parametrize(
    ("gpu", "types", "vendor_vfio"),
    HOMOGENEOUS,
    ids=[f"{name}x{count}" for _, types, _ in HOMOGENEOUS for name, count in types.items()],
)
def test_homogeneous_apply_assert_list(cli, vhost, tmp_path, host_runs, gpu, types, vendor_vfio):
    root = vhost(gpu, vendor_vfio=vendor_vfio)
    cfg = write_config(tmp_path, c=types)
    assert check(cli, root, cfg, "c").code == 1

    result = apply(cli, root, cfg, "c")
    assert result.code == 0, result.err
    assert len(sriov_runs(host_runs)) == 1
    ((name, count),) = types.items()
    vfs = vfs_of(root, GPU0)
    assert writes(root) == [f"{ctl(vf)}\t{type_id(root, GPU0, name)}" for vf in vfs[:count]]
    (entry,) = report(cli, root)
    assert entry["framework"] == "vendor-vfio"
    assert Counter(v["type"] for v in entry["vgpus"]) == Counter(types)
    assert {v["parent"] for v in entry["vgpus"]} <= set(vfs)
    assert check(cli, root, cfg, "c").code == 0

    n = len(writes(root))
    assert apply(cli, root, cfg, "c").code == 0
    assert len(writes(root)) == n
    assert len(sriov_runs(host_runs)) == 1


def test_entry_point_apply_assert_list(run_cli, vhost, tmp_path):
    root = vhost("L40S")
    cfg = write_config(tmp_path, c={"L40S-6Q": 8})
    first = run_cli("apply", "--sim", str(root), "-f", cfg, "-c", "c")
    assert first.code == 0, first.err
    assert first.err.count("enabling SR-IOV virtual functions") == 1
    assert "successfully applied" in first.err
    again = run_cli("apply", "--sim", str(root), "-f", cfg, "-c", "c")
    assert again.code == 0 and "enabling SR-IOV" not in again.err
    assert len(writes(root)) == 8
    assert run_cli("assert", "--sim", str(root), "-f", cfg, "-c", "c").code == 0
    listed = run_cli("list", "--sim", str(root), "--json")
    (gpu,) = json.loads(listed.out)["gpus"]
    assert gpu["framework"] == "vendor-vfio"
    assert [v["parent"] for v in gpu["vgpus"]] == vfs_of(root, GPU0)[:8]


def test_only_selected_gpus_get_vfs_enabled_each_once(cli, vhost, tmp_path, host_runs):
    root = vhost("T4", "L40S", "H100")
    assert [g["framework"] for g in report(cli, root)] == ["mdev", "sriov-vfs-off", "sriov-vfs-off"]
    cfg = write_config(
        tmp_path,
        l40s=[{"device-filter": L40S_FILTER, "devices": "all", "vgpu-devices": {"L40S-4Q": 2}}],
        both=[
            {"devices": [1], "vgpu-devices": {"L40S-4Q": 2}},
            {"devices": [2], "vgpu-devices": {"H100-10C": 8}},
        ],
    )
    assert apply(cli, root, cfg, "l40s").code == 0
    assert sriov_runs(host_runs) == [["/usr/lib/nvidia/sriov-manage", "-e", GPU1]]
    assert [g["framework"] for g in report(cli, root)] == ["mdev", "vendor-vfio", "sriov-vfs-off"]

    result = apply(cli, root, cfg, "both")
    assert result.code == 0, result.err
    assert sriov_runs(host_runs) == [
        ["/usr/lib/nvidia/sriov-manage", "-e", GPU1],
        ["/usr/lib/nvidia/sriov-manage", "-e", GPU2],
    ]
    assert layout(cli, root) == [{}, {"L40S-4Q": 2}, {"H100-10C": 8}]
    assert [g["framework"] for g in report(cli, root)] == ["mdev", "vendor-vfio", "vendor-vfio"]


# -- minimal change ----------------------------------------------------------------------------------
def test_reducing_a_count_removes_only_the_surplus(cli, vhost, tmp_path):
    root = vhost("L40S")
    cfg = write_config(tmp_path, twelve={"L40S-4Q": 12}, eight={"L40S-4Q": 8}, ten={"L40S-4Q": 10})
    assert apply(cli, root, cfg, "twelve").code == 0
    tid = type_id(root, GPU0, "L40S-4Q")
    before = vf_types(root, GPU0)
    busy = [vf for vf, t in before.items() if t]
    assert len(busy) == 12 and {before[vf] for vf in busy} == {tid}

    n = len(writes(root))
    assert apply(cli, root, cfg, "eight").code == 0
    changes = new_writes(root, n)
    assert len(changes) == 4 and all(data == "0" for _, data in changes)
    removed = {path.split("/")[4] for path, _ in changes}
    assert removed <= set(busy)
    after = vf_types(root, GPU0)
    assert {vf: t for vf, t in after.items() if t} == {vf: tid for vf in busy if vf not in removed}
    assert layout(cli, root) == [{"L40S-4Q": 8}]

    n = len(writes(root))
    assert apply(cli, root, cfg, "ten").code == 0
    changes = new_writes(root, n)
    assert [data for _, data in changes] == [str(tid), str(tid)]
    final = vf_types(root, GPU0)
    assert all(final[vf] == tid for vf, t in after.items() if t)  # the eight kept their VFs


def test_same_size_types_of_another_series_coexist_without_rebuilding(cli, vhost, tmp_path):
    root = vhost("L40S")
    cfg = write_config(tmp_path, q={"L40S-4Q": 4}, qc={"L40S-4Q": 2, "L40S-4C": 2})
    assert apply(cli, root, cfg, "q").code == 0
    kept_before = vf_types(root, GPU0)
    n = len(writes(root))
    result = apply(cli, root, cfg, "qc")
    assert result.code == 0, result.err
    changes = new_writes(root, n)
    c_id = type_id(root, GPU0, "L40S-4C")
    assert sorted(data for _, data in changes) == sorted(["0", "0", str(c_id), str(c_id)])
    assert layout(cli, root) == [{"L40S-4Q": 2, "L40S-4C": 2}]
    q_id = type_id(root, GPU0, "L40S-4Q")
    still_q = [vf for vf, t in vf_types(root, GPU0).items() if t == q_id]
    assert len(still_q) == 2 and all(kept_before[vf] == q_id for vf in still_q)
    assert check(cli, root, cfg, "qc").code == 0


# -- mixed sizes -------------------------------------------------------------------------------------
MIXED = {"L40S-12Q": 2, "L40S-4Q": 4}


def test_mixed_size_config_applied_and_asserted(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S")
    cfg = write_config(tmp_path, mixed=MIXED, fewer={"L40S-12Q": 2, "L40S-4Q": 2})
    result = apply(cli, root, cfg, "mixed")
    assert result.code == 0, result.err
    # nvidia-smi runs as the file found in its root, by its path.
    assert shm_runs(host_runs) == [["/usr/bin/nvidia-smi", "vgpu", "-i", GPU0, "-shm", "1"]]
    assert layout(cli, root) == [MIXED]
    ids = Counter(t for t in vf_types(root, GPU0).values() if t)
    assert ids == {type_id(root, GPU0, "L40S-12Q"): 2, type_id(root, GPU0, "L40S-4Q"): 4}
    assert check(cli, root, cfg, "mixed").code == 0

    n = len(writes(root))
    assert apply(cli, root, cfg, "mixed").code == 0
    assert len(writes(root)) == n and len(shm_runs(host_runs)) == 1

    # Fewer of one size: only two 4Q go, the 12Q stay where they are.
    twelve = type_id(root, GPU0, "L40S-12Q")
    where_12q = [vf for vf, t in vf_types(root, GPU0).items() if t == twelve]
    assert apply(cli, root, cfg, "fewer").code == 0
    assert [data for _, data in new_writes(root, n)] == ["0", "0"]
    assert [vf for vf, t in vf_types(root, GPU0).items() if t == twelve] == where_12q
    assert layout(cli, root) == [{"L40S-12Q": 2, "L40S-4Q": 2}]


def test_switching_an_equal_size_gpu_to_mixed_sizes_rebuilds_it(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S")
    cfg = write_config(tmp_path, q={"L40S-4Q": 4}, mixed=MIXED)
    assert apply(cli, root, cfg, "q").code == 0
    n = len(writes(root))
    result = apply(cli, root, cfg, "mixed")
    assert result.code == 0, result.err
    data = [d for _, d in new_writes(root, n)]
    assert data[:4] == ["0"] * 4 and "0" not in data[4:] and len(data) == 10  # removals before creations
    assert len(shm_runs(host_runs)) == 1
    assert layout(cli, root) == [MIXED]


def test_mixed_size_refused_without_mixed_size_support(cli, vhost, tmp_path):
    root = vhost("L40S", mixed_size=False)
    cfg = write_config(tmp_path, mixed=MIXED, q={"L40S-4Q": 4})
    result = apply(cli, root, cfg, "mixed")
    assert result.code == 1
    assert writes(root) == []
    assert "GPU 0 (0000:3b:00.0)" in result.err
    assert "mixed-size (heterogeneous)" in result.err and "does not support it" in result.err
    assert "nothing was changed" in result.err

    # With an equal-size layout in place, it stays exactly as it was.
    assert apply(cli, root, cfg, "q").code == 0
    n, before = len(writes(root)), vf_types(root, GPU0)
    again = apply(cli, root, cfg, "mixed")
    assert again.code == 1 and "heterogeneous" in again.err
    assert len(writes(root)) == n and vf_types(root, GPU0) == before
    assert check(cli, root, cfg, "mixed").code == 1


OVERFLOW = {"L40S-24Q": 2, "L40S-12Q": 1}  # 60 GB on a 48 GB GPU; each count alone fits


def test_mixed_size_framebuffer_overflow_refused(cli, vhost, tmp_path):
    root = vhost("L40S")
    cfg = write_config(tmp_path, over=OVERFLOW, q={"L40S-8Q": 3})
    assert apply(cli, root, cfg, "q").code == 0
    n, before = len(writes(root)), vf_types(root, GPU0)
    result = apply(cli, root, cfg, "over")
    assert result.code == 1
    assert len(writes(root)) == n and vf_types(root, GPU0) == before
    assert "GPU 0 (0000:3b:00.0)" in result.err
    assert "need 60 GB of framebuffer, but the GPU has 48 GB" in result.err


def test_mixed_size_framebuffer_overflow_refused_on_fresh_host(cli, vhost, tmp_path):
    root = vhost("L40S")
    cfg = write_config(tmp_path, over=OVERFLOW)
    result = apply(cli, root, cfg, "over")
    assert result.code == 1
    assert writes(root) == []
    assert "60 GB" in result.err and "48 GB" in result.err


@pytest.mark.parametrize(
    ("mixed_size", "types"), [(False, MIXED), (True, OVERFLOW)], ids=["unsupported", "overflow"]
)
def test_refused_mixed_size_config_does_not_enable_vfs(cli, vhost, tmp_path, host_runs, mixed_size, types):
    root = vhost("L40S", mixed_size=mixed_size)
    cfg = write_config(tmp_path, c=types)
    assert apply(cli, root, cfg, "c").code == 1
    assert sriov_runs(host_runs) == []
    assert vfs_of(root, GPU0) == []


# -- refusals before any write ---------------------------------------------------------------------
@pytest.mark.parametrize("enabled", [False, True], ids=["vfs-off", "vfs-on"])
def test_capacity_overflow_refused(cli, vhost, tmp_path, host_runs, enabled):
    root = vhost("L40S")
    cfg = write_config(tmp_path, over={"L40S-24Q": 3}, ok={"L40S-24Q": 1})
    if enabled:
        assert apply(cli, root, cfg, "ok").code == 0
    runs, n, before = len(sriov_runs(host_runs)), len(writes(root)), report(cli, root)
    result = apply(cli, root, cfg, "over")
    assert result.code == 1
    assert "GPU 0 (0000:3b:00.0)" in result.err and "L40S-24Q" in result.err
    assert "at most 2" in result.err and "nothing was changed" in result.err
    assert len(writes(root)) == n and report(cli, root) == before
    assert len(sriov_runs(host_runs)) == runs  # not even the VFs were enabled


@pytest.mark.parametrize("enabled", [False, True], ids=["vfs-off", "vfs-on"])
def test_unsupported_type_refused(cli, vhost, tmp_path, host_runs, enabled):
    root = vhost("L40S")
    cfg = write_config(tmp_path, bad={"T4-1Q": 1}, ok={"L40S-24Q": 1})
    if enabled:
        assert apply(cli, root, cfg, "ok").code == 0
    runs, n, before = len(sriov_runs(host_runs)), len(writes(root)), report(cli, root)
    result = apply(cli, root, cfg, "bad")
    assert result.code == 1
    assert "GPU 0 (0000:3b:00.0)" in result.err and "T4-1Q" in result.err
    assert ("not supported on this GPU" if enabled else "not a type of the NVIDIA L40S") in result.err
    assert len(writes(root)) == n and report(cli, root) == before
    assert len(sriov_runs(host_runs)) == runs
    assert check(cli, root, cfg, "bad").code == 1


def test_mig_backed_type_refused_before_anything(cli, vhost, tmp_path, host_runs):
    # Without the MIG step (--skip-mig) the VFs would have to be enabled after the GPU instances
    # exist, which destroys them: refused before any write. With it, see tests/e2e/test_mig_apply.py.
    root = vhost("H100")
    cfg = write_config(tmp_path, mig={"H100-1-10C": 7})
    result = apply(cli, root, cfg, "mig", "--skip-mig")
    assert result.code == 1
    assert "GPU 0 (0000:3b:00.0)" in result.err and "MIG-backed" in result.err
    assert writes(root) == [] and sriov_runs(host_runs) == []


def test_too_many_for_the_vfs_refused(cli, vhost, tmp_path):
    root = vhost("H100")  # 20 VFs
    cfg = write_config(tmp_path, ok={"H100-4C": 20}, over=[{"devices": [0], "vgpu-devices": {"H100-4C": 21}}])
    assert apply(cli, root, cfg, "ok").code == 0
    n = len(writes(root))
    result = apply(cli, root, cfg, "over")
    assert result.code == 1 and len(writes(root)) == n
    assert "GPU 0 (0000:3b:00.0)" in result.err and "H100-4C" in result.err


# -- clearing ------------------------------------------------------------------------------------------
def test_clearing_with_empty_vgpu_devices(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S")
    cfg = write_config(tmp_path, some={"L40S-8Q": 6}, none={})
    # On a fresh host clearing is already true: no VFs are enabled for it.
    assert check(cli, root, cfg, "none").code == 0
    assert apply(cli, root, cfg, "none").code == 0
    assert writes(root) == [] and sriov_runs(host_runs) == []

    assert apply(cli, root, cfg, "some").code == 0
    busy = [vf for vf, t in vf_types(root, GPU0).items() if t]
    n = len(writes(root))
    result = apply(cli, root, cfg, "none")
    assert result.code == 0, result.err
    assert new_writes(root, n) == [(ctl(vf), "0") for vf in busy]
    assert set(vf_types(root, GPU0).values()) == {0}
    (gpu,) = report(cli, root)
    assert gpu["framework"] == "vendor-vfio" and gpu["vgpus"] == []
    assert check(cli, root, cfg, "none").code == 0
    n = len(writes(root))
    assert apply(cli, root, cfg, "none").code == 0
    assert len(writes(root)) == n


# -- a mixed mdev + vendor-VFIO host -------------------------------------------------------------------
def test_t4_and_l40s_with_device_filters(cli, vhost, tmp_path, host_runs):
    root = vhost("T4", "L40S")
    cfg = write_config(
        tmp_path,
        both=[
            {"device-filter": T4_FILTER, "devices": "all", "vgpu-devices": {"T4-4Q": 4}},
            {"device-filter": L40S_FILTER, "devices": "all", "vgpu-devices": {"L40S-6Q": 8}},
        ],
        l40s_only=[{"device-filter": L40S_FILTER, "devices": "all", "vgpu-devices": {"L40S-6Q": 4}}],
    )
    result = apply(cli, root, cfg, "both")
    assert result.code == 0, result.err
    assert sriov_runs(host_runs) == [["/usr/lib/nvidia/sriov-manage", "-e", GPU1]]
    t4, l40s = report(cli, root)
    assert (t4["framework"], l40s["framework"]) == ("mdev", "vendor-vfio")
    assert Counter(v["type"] for v in t4["vgpus"]) == {"T4-4Q": 4}
    assert all(v["uuid"] and v["parent"] == GPU0 for v in t4["vgpus"])
    assert Counter(v["type"] for v in l40s["vgpus"]) == {"L40S-6Q": 8}
    assert [v["parent"] for v in l40s["vgpus"]] == vfs_of(root, GPU1)[:8]
    assert all(v["uuid"] is None for v in l40s["vgpus"])
    assert check(cli, root, cfg, "both").code == 0

    n = len(writes(root))
    assert apply(cli, root, cfg, "both").code == 0
    assert len(writes(root)) == n

    t4_uuids = {v["uuid"] for v in t4["vgpus"]}
    assert apply(cli, root, cfg, "l40s_only").code == 0
    changes = new_writes(root, n)
    assert len(changes) == 4 and {p for p, _ in changes} <= {ctl(vf) for vf in vfs_of(root, GPU1)}
    t4_after, _ = report(cli, root)
    assert {v["uuid"] for v in t4_after["vgpus"]} == t4_uuids  # the unselected T4 is untouched
    assert layout(cli, root) == [{"T4-4Q": 4}, {"L40S-6Q": 4}]


# -- sriov-manage --------------------------------------------------------------------------------------
def test_missing_sriov_manage_tells_what_to_do(cli, vhost, tmp_path):
    root = vhost("L40S")
    (root / SRIOV_MANAGE).unlink()
    cfg = write_config(tmp_path, c={"L40S-8Q": 2})
    result = apply(cli, root, cfg, "c")
    assert result.code == 1
    assert "GPU 0 (0000:3b:00.0) has no VFs and sriov-manage was not found" in result.err
    assert f"sriov-manage -e {GPU0}" in result.err and "--sriov-manage" in result.err
    assert writes(root) == [] and vfs_of(root, GPU0) == []
    assert report(cli, root)[0]["framework"] == "sriov-vfs-off"


def test_missing_sriov_manage_via_entry_point(run_cli, vhost, tmp_path):
    root = vhost("H200")
    (root / SRIOV_MANAGE).unlink()
    cfg = write_config(tmp_path, c={"H200-35C": 4})
    result = run_cli("apply", "--sim", str(root), "-f", cfg, "-c", "c")
    assert result.code == 1
    assert "sriov-manage was not found" in result.err and "--sriov-manage" in result.err
    assert "Traceback" not in result.err
    assert writes(root) == []


def test_sriov_manage_elsewhere(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S", "L4")
    (root / "opt/nvidia").mkdir(parents=True)
    shutil.move(root / SRIOV_MANAGE, root / "opt/nvidia/sriov-manage")
    cfg = write_config(
        tmp_path,
        l40s=[{"devices": [0], "vgpu-devices": {"L40S-8Q": 2}}],
        l4=[{"devices": [1], "vgpu-devices": {"L4-8Q": 3}}],
    )
    result = apply(cli, root, cfg, "l40s", "--sriov-manage", "/opt/nvidia/sriov-manage")
    assert result.code == 0, result.err
    assert sriov_runs(host_runs) == [["/opt/nvidia/sriov-manage", "-e", GPU0]]
    # The same through the environment variable.
    result = cli(
        "apply",
        "--sim",
        str(root),
        "-f",
        cfg,
        "-c",
        "l4",
        env={"VGPU_DM_SRIOV_MANAGE": "/opt/nvidia/sriov-manage"},
    )
    assert result.code == 0, result.err
    assert sriov_runs(host_runs)[-1] == ["/opt/nvidia/sriov-manage", "-e", GPU1]
    assert layout(cli, root) == [{"L40S-8Q": 2}, {"L4-8Q": 3}]


def test_sriov_manage_not_needed_once_vfs_exist(cli, vhost, tmp_path, host_runs):
    root = vhost("L40S")
    cfg = write_config(tmp_path, a={"L40S-8Q": 2}, b={"L40S-16Q": 3})
    assert apply(cli, root, cfg, "a").code == 0
    (root / SRIOV_MANAGE).unlink()
    result = apply(cli, root, cfg, "b")
    assert result.code == 0, result.err
    assert len(sriov_runs(host_runs)) == 1
    assert layout(cli, root) == [{"L40S-16Q": 3}]


# -- type names when the GPU is full ---------------------------------------------------------------
def full_l40s(cli, vhost, tmp_path) -> tuple[Path, str]:
    root = vhost("L40S")
    cfg = write_config(tmp_path, full={"L40S-48Q": 1}, half={"L40S-24Q": 2})
    assert apply(cli, root, cfg, "full").code == 0
    # Precondition: the GPU is full, so no VF's creatable list names any type any more.
    for vf in vfs_of(root, GPU0):
        text = (root / "sys/bus/pci/devices" / vf / "nvidia/creatable_vgpu_types").read_text()
        assert text.strip() == "ID    : vGPU Name"
    return root, cfg


def test_full_gpu_names_its_vgpu_from_the_learned_table(cli, vhost, tmp_path):
    root, cfg = full_l40s(cli, vhost, tmp_path)
    learned = json.loads((root / LEARNED / f"{GPU0}.json").read_text())
    tid = type_id(root, GPU0, "L40S-48Q")
    assert learned["types"][str(tid)] == "NVIDIA L40S-48Q"
    assert learned["key"]["gpu"] == GPU0 and learned["key"]["driver_version"] == "580.105.06"
    (gpu,) = report(cli, root)
    assert [(v["type"], v["type_id"], v["parent"]) for v in gpu["vgpus"]] == [
        ("L40S-48Q", tid, vfs_of(root, GPU0)[0])
    ]
    result = check(cli, root, cfg, "full")
    assert result.code == 0, result.err
    n = len(writes(root))
    assert apply(cli, root, cfg, "full").code == 0
    assert len(writes(root)) == n


def test_full_gpu_without_learned_table_stays_sensible(cli, vhost, tmp_path):
    root, cfg = full_l40s(cli, vhost, tmp_path)
    (root / LEARNED / f"{GPU0}.json").unlink()
    full_id, half_id = type_id(root, GPU0, "L40S-48Q"), type_id(root, GPU0, "L40S-24Q")
    n = len(writes(root))

    # The creatable lists name nothing on a full GPU; `nvidia-smi vgpu -s -v` (hex ids) still does.
    (gpu,) = report(cli, root)
    ((vgpu,),) = [gpu["vgpus"]]
    assert (vgpu["type_id"], vgpu["type"]) == (full_id, "L40S-48Q")
    result = check(cli, root, cfg, "full")
    assert result.code == 0, result.err
    assert len(writes(root)) == n

    # apply to another type still works: the catalog knows L40S-24Q, the driver's list gives its id.
    result = apply(cli, root, cfg, "half")
    assert result.code == 0, result.err
    vfs = vfs_of(root, GPU0)
    assert new_writes(root, n) == [
        (ctl(vfs[0]), "0"),
        (ctl(vfs[0]), str(half_id)),
        (ctl(vfs[1]), str(half_id)),
    ]
    assert Counter(t for t in vf_types(root, GPU0).values() if t) == {half_id: 2}


def test_full_gpu_converges_after_learned_table_lost(cli, vhost, tmp_path):
    root, cfg = full_l40s(cli, vhost, tmp_path)
    (root / LEARNED / f"{GPU0}.json").unlink()
    assert apply(cli, root, cfg, "full").code == 0  # may rebuild once to learn the name
    n = len(writes(root))
    assert apply(cli, root, cfg, "full").code == 0
    assert len(writes(root)) == n
    assert layout(cli, root) == [{"L40S-48Q": 1}]


def test_assert_holds_right_after_apply_without_learned_table(cli, vhost, tmp_path):
    root, cfg = full_l40s(cli, vhost, tmp_path)
    (root / LEARNED / f"{GPU0}.json").unlink()
    assert apply(cli, root, cfg, "half").code == 0
    assert layout(cli, root) == [{"L40S-24Q": 2}]
    assert check(cli, root, cfg, "half").code == 0


def test_list_shows_the_iommu_group_of_each_vgpus_vf(cli, vhost, tmp_path):
    """Each VF has its own IOMMU group (its iommu_group link), as an mdev does: -o wide and JSON show
    it (they said '-' / null for every vendor-VFIO vGPU)."""
    root = vhost("L40S")
    cfg = write_config(tmp_path, c=[{"devices": "all", "vgpu-devices": {"L40S-24Q": 2}}])
    assert apply(cli, root, cfg, "c").code == 0
    (gpu,) = report(cli, root)
    groups = {v["parent"]: v["iommu_group"] for v in gpu["vgpus"]}
    links = {vf: os.readlink(root / "sys/bus/pci/devices" / vf / "iommu_group") for vf in groups}
    assert groups == {vf: int(os.path.basename(link)) for vf, link in links.items()}
    wide = cli("list", "--sim", str(root), "-o", "wide").out.splitlines()
    header = wide[0]
    column = header.index("IOMMU GROUP")
    assert [line[column:].split()[0] for line in wide[1:]] == [str(groups[vf]) for vf in groups]
