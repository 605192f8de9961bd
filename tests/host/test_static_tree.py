"""The real host code against a hand-written ``/sys`` tree (no simulator code involved).

The tree below ``tmp_path`` is laid out like a real host's sysfs: device directories under
``sys/devices/pci…`` (one GPU behind a bridge, as on real machines), ``sys/bus/pci/devices`` links,
driver and IOMMU-group links, an mdev-on-PF T4 with two vGPUs, an A10 whose eleven VFs are mdev
parents (two of them hold a vGPU), an NVIDIA GPU bound to vfio-pci without vGPU support, an NVIDIA
audio function, an NVSwitch, a NIC, and an Intel iGPU with a GVT-g mdev that must be ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.table import LIST_COLUMNS, parse_table
from vgpu_dm.device_id import DeviceID
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.host.pci import discover_gpus
from vgpu_dm.host.root import HostRoot

T4 = "0000:3b:00.0"
T4_AUDIO = "0000:3b:00.1"
A40_VFIO = "0000:5e:00.0"
A10 = "0000:86:00.0"
NIC = "0000:af:00.0"
NVSWITCH = "0000:c1:00.0"
IGPU = "0000:00:02.0"
A10_VF_COUNT = 11  # enough for virtfn10 to sort after virtfn9
T4_VGPUS = ("2f6c2c77-3778-45d1-8669-045e81f13134", "9f099bfc-5a9b-416d-bf28-bff000ae2ac4")
A10_VGPUS = ("c0ffee00-0000-4000-8000-000000000001", "0badcafe-0000-4000-8000-00000000000a")
GVT_VGPU = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"


def vf_address(n: int) -> str:
    """The A10's VF n: functions .4 onwards, as observed on real A10 hosts."""
    slot, function = divmod(4 + n, 8)
    return f"0000:86:{slot:02x}.{function}"


A10_VFS = tuple(vf_address(n) for n in range(A10_VF_COUNT))
A10_VGPU_VFS = (A10_VFS[0], A10_VFS[10])  # virtfn0 and virtfn10


# -- building the tree by hand ---------------------------------------------------------------------
def put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent))


def pci_device(root: Path, parent: str, address: str, files: dict[str, str], driver: str | None, group: int):
    """sys/devices/<parent>/<address> with attribute files, driver and iommu_group links, bus link."""
    dev = root / "sys/devices" / parent / address
    dev.mkdir(parents=True)
    for name, value in files.items():
        put(dev / name, value + "\n")
    for name in ("config", "resource", "reset"):
        put(dev / name, "")
    if driver:
        drv = root / "sys/bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        link(dev / "driver", drv)
        link(drv / address, dev)
    grp = root / "sys/kernel/iommu_groups" / str(group)
    link(dev / "iommu_group", grp)
    link(grp / "devices" / address, dev)
    link(root / "sys/bus/pci/devices" / address, dev)
    return dev


def mdev_type(dev: Path, type_dir: str, name: str, available: int, description: str = "") -> Path:
    tdir = dev / "mdev_supported_types" / type_dir
    (tdir / "devices").mkdir(parents=True)
    put(tdir / "name", name + "\n")
    put(tdir / "available_instances", f"{available}\n")
    put(tdir / "device_api", "vfio-pci\n")
    put(tdir / "create", "")
    if description:
        put(tdir / "description", description + "\n")
    return tdir


def mdev_device(root: Path, dev: Path, type_dir: str, uuid: str, group: int) -> None:
    ddir = dev / uuid
    ddir.mkdir()
    link(ddir / "mdev_type", dev / "mdev_supported_types" / type_dir)
    link(dev / "mdev_supported_types" / type_dir / "devices" / uuid, ddir)
    grp = root / "sys/kernel/iommu_groups" / str(group)
    link(ddir / "iommu_group", grp)
    link(grp / "devices" / uuid, ddir)
    link(ddir / "driver", root / "sys/bus/mdev/drivers/vfio_mdev")
    put(ddir / "remove", "")
    link(root / "sys/bus/mdev/devices" / uuid, ddir)


def nvidia_gpu(device: str, sub_device: str, numa: str, cls: str = "0x030200") -> dict[str, str]:
    return {
        "vendor": "0x10de",
        "device": device,
        "class": cls,
        "subsystem_vendor": "0x10de",
        "subsystem_device": sub_device,
        "numa_node": numa,
    }


def t4_types(dev: Path, used: int) -> None:
    for type_id, name, max_instances in (("222", "T4-1Q", 16), ("223", "T4-2Q", 8), ("230", "T4-16Q", 1)):
        available = max_instances - used if name == "T4-1Q" else 0
        fb = 16384 * (1 if name == "T4-16Q" else 0) or (1024 if name == "T4-1Q" else 2048)
        mdev_type(
            dev,
            f"nvidia-{type_id}",
            f"GRID {name}",
            available,
            f"num_heads=4, frl_config=60, framebuffer={fb}M, max_resolution=5120x2880, "
            f"max_instance={max_instances}",
        )


def build_host(root: Path) -> None:
    (root / "sys/bus/mdev/devices").mkdir(parents=True)
    (root / "sys/bus/mdev/drivers/vfio_mdev").mkdir(parents=True)
    mdev_bus = root / "sys/class/mdev_bus"
    mdev_bus.mkdir(parents=True)
    (root / "proc").mkdir()

    # Non-NVIDIA devices: a host bridge, an Intel iGPU with a GVT-g mdev, a NIC.
    pci_device(
        root,
        "pci0000:00",
        "0000:00:00.0",
        {"vendor": "0x8086", "device": "0x2020", "class": "0x060000"},
        None,
        1,
    )
    igpu = pci_device(
        root,
        "pci0000:00",
        IGPU,
        {"vendor": "0x8086", "device": "0x3e92", "class": "0x030000", "numa_node": "-1"},
        "i915",
        2,
    )
    mdev_type(igpu, "i915-GVTg_V5_4", "GVTg_V5_4", 1, "low_gm_size: 128MB")
    link(mdev_bus / IGPU, igpu)
    mdev_device(root, igpu, "i915-GVTg_V5_4", GVT_VGPU, 3)
    pci_device(
        root,
        "pci0000:00",
        NIC,
        {"vendor": "0x15b3", "device": "0x1017", "class": "0x020000", "numa_node": "1"},
        "mlx5_core",
        4,
    )

    # Tesla T4: mdev types on the PF itself, two T4-1Q vGPUs.
    t4 = pci_device(root, "pci0000:00", T4, nvidia_gpu("0x1eb8", "0x12a2", "0"), "nvidia", 10)
    t4_types(t4, used=len(T4_VGPUS))
    link(mdev_bus / T4, t4)
    for n, uuid in enumerate(T4_VGPUS):
        mdev_device(root, t4, "nvidia-222", uuid, 40 + n)
    pci_device(
        root,
        "pci0000:00",
        T4_AUDIO,
        {"vendor": "0x10de", "device": "0x10f8", "class": "0x040300", "numa_node": "0"},
        "snd_hda_intel",
        10,
    )

    # An NVIDIA GPU bound to vfio-pci (passthrough), no vGPU support; no subsystem files, no NUMA.
    a40 = nvidia_gpu("0x2235", "", "-1", cls="0x030000")
    del a40["subsystem_vendor"], a40["subsystem_device"]
    a40.update(sriov_totalvfs="32", sriov_numvfs="0")
    pci_device(root, "pci0000:00", A40_VFIO, a40, "vfio-pci", 11)

    # NVIDIA A10 behind a PCIe bridge: an SR-IOV PF whose VFs are the mdev parents.
    bridge = "pci0000:85/0000:85:00.0"
    pf_files = nvidia_gpu("0x2236", "0x1482", "1")
    pf_files.update(sriov_totalvfs=str(A10_VF_COUNT), sriov_numvfs=str(A10_VF_COUNT))
    pf = pci_device(root, bridge, A10, pf_files, "nvidia", 12)
    # Create the VFs in reverse so nothing can rely on creation order.
    for n in reversed(range(A10_VF_COUNT)):
        vf_addr = A10_VFS[n]
        vf = pci_device(root, bridge, vf_addr, nvidia_gpu("0x2236", "0x1482", "1"), "nvidia", 60 + n)
        link(vf / "physfn", pf)
        link(pf / f"virtfn{n}", vf)
        busy = vf_addr in A10_VGPU_VFS
        mdev_type(vf, "nvidia-590", "NVIDIA A10-4Q", 0 if busy else 1, "framebuffer=4096M, max_instance=6")
        mdev_type(vf, "nvidia-593", "NVIDIA A10-24Q", 0, "framebuffer=24576M, max_instance=1")
        link(mdev_bus / vf_addr, vf)
    for k, (vf_addr, uuid) in enumerate(zip(A10_VGPU_VFS, A10_VGPUS, strict=True)):
        mdev_device(root, root / "sys/devices" / bridge / vf_addr, "nvidia-590", uuid, 90 + k)

    # An NVSwitch: NVIDIA, but not a display/3D controller.
    pci_device(
        root, "pci0000:00", NVSWITCH, {"vendor": "0x10de", "device": "0x1af1", "class": "0x068000"}, None, 13
    )


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """One tree for the module: every test only reads it (and each checks that nothing changed)."""
    root = tmp_path_factory.mktemp("static") / "host"
    build_host(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file's text and every link's target below ``sys/`` (the host's state we must not change).

    ``run/`` is left out: apply takes its host lock there, which is not a change to the machine.
    """
    found = {}
    for dirpath, dirs, files in os.walk(root / "sys"):
        for name in files + [d for d in dirs if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            found[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_text()
    return found


# -- discovery -------------------------------------------------------------------------------------
def test_a_missing_numa_node_file_is_none_not_minus_1(tmp_path):
    root = tmp_path / "host"
    build_host(root)
    (root / "sys/bus/pci/devices" / T4 / "numa_node").unlink()
    t4 = discover_gpus(HostRoot(root))[0]
    assert t4.address == T4 and t4.numa_node is None


def test_discover_gpus(host):
    gpus = discover_gpus(HostRoot(host))
    assert [(g.index, g.address) for g in gpus] == [(0, T4), (1, A40_VFIO), (2, A10)]
    t4, a40, a10 = gpus
    assert t4.device_id == DeviceID(0x1EB8, 0x10DE, 0x12A2, 0x10DE)
    assert str(t4.device_id) == "0x1EB810DE:0x12A210DE"
    assert (t4.numa_node, t4.driver, t4.sriov_totalvfs, t4.vfs) == (0, "nvidia", None, ())
    assert not t4.sriov_capable
    # Missing subsystem files read as 0 (upstream does the same); numa_node -1 (the kernel's "no NUMA
    # affinity") is None: there is no node to name.
    assert a40.device_id == DeviceID(0x2235, 0x10DE, 0, 0)
    assert (a40.numa_node, a40.driver, a40.sriov_totalvfs, a40.vfs) == (None, "vfio-pci", 32, ())
    assert a10.device_id == DeviceID(0x2236, 0x10DE, 0x1482, 0x10DE)
    assert (a10.numa_node, a10.driver, a10.sriov_totalvfs) == (1, "nvidia", A10_VF_COUNT)
    # VFs in virtfnN order (numeric: virtfn10 after virtfn9, not after virtfn1).
    assert a10.vfs == A10_VFS
    assert a10.vfs[9:] == ("0000:86:01.5", "0000:86:01.6")
    assert a10.describe() == "GPU 2 (0000:86:00.0)"


def test_discover_gpus_does_only_reads(host):
    root = HostRoot(host)
    before = snapshot(host)
    discover_gpus(root)
    assert root.counters.writes == 0 and root.counters.reads > 0
    assert snapshot(host) == before


def test_inventory_frameworks_and_devices(host):
    inventory = Inventory(HostRoot(host))
    t4, a40, a10 = inventory.gpus
    assert [inventory.framework(g) for g in inventory.gpus] == ["mdev", "none", "mdev"]
    assert inventory.backend_for(a40) is None
    assert inventory.devices(a40) == []

    t4_devices = inventory.devices(t4)
    assert sorted(d.uuid for d in t4_devices) == sorted(T4_VGPUS)
    assert {(d.gpu, d.parent, d.type_name, d.type_id, d.framework) for d in t4_devices} == {
        (T4, T4, "T4-1Q", 222, "mdev")
    }
    assert sorted(d.iommu_group for d in t4_devices) == [40, 41]

    a10_devices = inventory.devices(a10)
    assert {(d.uuid, d.parent) for d in a10_devices} == set(zip(A10_VGPUS, A10_VGPU_VFS, strict=True))
    assert {(d.gpu, d.type_name, d.type_id) for d in a10_devices} == {(A10, "A10-4Q", 590)}
    assert sorted(d.iommu_group for d in a10_devices) == [90, 91]

    mdev = inventory.mdev
    assert mdev.parents(t4) == [T4]
    assert sorted(mdev.parents(a10)) == sorted(A10_VFS)
    assert mdev.slots(t4) is None and mdev.slots(a10) == A10_VF_COUNT
    t4_types = mdev.types(t4)
    assert set(t4_types) == {"T4-1Q", "T4-2Q", "T4-16Q"}
    assert (t4_types["T4-1Q"].available, t4_types["T4-1Q"].max_instances) == (14, 16)
    assert t4_types["T4-1Q"].driver_name == "GRID T4-1Q"
    a10_types = mdev.types(a10)
    assert a10_types["A10-4Q"].available == A10_VF_COUNT - 2  # summed over the free VFs
    assert a10_types["A10-4Q"].max_instances == 6
    # The Intel GVT-g mdev belongs to no NVIDIA GPU and is not a vGPU of any of them.
    everything = [d.uuid for g in inventory.gpus for d in inventory.devices(g)]
    assert GVT_VGPU not in everything and len(everything) == 4
    assert inventory.host.counters.writes == 0


# -- the CLI on the static tree --------------------------------------------------------------------
def test_list_host_root(cli, host):
    before = snapshot(host)
    result = cli("list", "--host-root", str(host))
    assert result.code == 0, result.err
    rows = parse_table(result.out, LIST_COLUMNS, fill=LIST_COLUMNS[:6])
    assert len(rows) == 2 + 1 + 2
    assert sorted(r["UUID"] for r in rows if r["GPU"] == "0") == sorted(T4_VGPUS)
    assert all(
        (r["ADDRESS"], r["MODEL"], r["PARENT"], r["VGPU TYPE"]) == (T4, "Tesla T4", T4, "T4-1Q")
        for r in rows
        if r["GPU"] == "0"
    )
    (a40,) = [r for r in rows if r["GPU"] == "1"]
    assert list(a40.values()) == ["1", A40_VFIO, "NVIDIA A40", "none", "-", "-", "-", "-", "-", "-", "-", "-"]
    a10_rows = {r["UUID"]: r for r in rows if r["GPU"] == "2"}
    assert set(a10_rows) == set(A10_VGPUS)
    for uuid, vf in zip(A10_VGPUS, A10_VGPU_VFS, strict=True):
        assert a10_rows[uuid]["PARENT"] == vf and a10_rows[uuid]["VGPU TYPE"] == "A10-4Q"
    for absent in (T4_AUDIO, NIC, NVSWITCH, IGPU, GVT_VGPU, *A10_VFS[1:10]):
        assert absent not in result.out

    as_json = json.loads(cli("list", "--json", "--host-root", str(host)).out)["gpus"]
    assert [(g["index"], g["address"], g["device_id"]) for g in as_json] == [
        (0, T4, "0x1EB810DE:0x12A210DE"),
        (1, A40_VFIO, "0x223510DE:0x00000000"),
        (2, A10, "0x223610DE:0x148210DE"),
    ]
    assert [(g["driver"], g["numa_node"], g["framework"]) for g in as_json] == [
        ("nvidia", 0, "mdev"),
        ("vfio-pci", None, "none"),
        ("nvidia", 1, "mdev"),
    ]
    assert [len(g["vgpus"]) for g in as_json] == [2, 0, 2]
    assert {v["iommu_group"] for v in as_json[0]["vgpus"]} == {40, 41}
    assert snapshot(host) == before


CONFIGS = """\
version: v1
vgpu-configs:
  matching:
    - devices: [0]
      vgpu-devices: {"T4-1Q": 2}
    - device-filter: "0x223610DE:0x148210DE"
      devices: all
      vgpu-devices: {"A10-4Q": 2}
  t4-only:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-1Q": 2}
  t4-more:
    - devices: [0]
      vgpu-devices: {"T4-1Q": 3}
  a10-fewer:
    - devices: [2]
      vgpu-devices: {"A10-4Q": 1}
  a10-other-subsystem:
    - device-filter: "0x223610DE:0x14A910DE"
      devices: all
      vgpu-devices: {"A10-24Q": 1}
  passthrough-gpu:
    - devices: [1]
      vgpu-devices: {"A40-4Q": 1}
  too-many:
    - devices: [0]
      vgpu-devices: {"T4-1Q": 17}
  passthrough-empty:
    - devices: [1]
      vgpu-devices: {}
"""


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("matching", 0, "currently applied"),
        ("t4-only", 0, "currently applied"),
        # A config that selects none of the host's GPUs is an operator error (issue 8.11), not success.
        ("a10-other-subsystem", 1, "the selected config selects none of this host's 3 NVIDIA GPU(s)"),
        ("t4-more", 1, "GPU 0 (0000:3b:00.0): has 2 x T4-1Q, config 't4-more' wants 3 x T4-1Q"),
        ("a10-fewer", 1, "GPU 2 (0000:86:00.0): has 2 x A10-4Q, config 'a10-fewer' wants 1 x A10-4Q"),
        ("passthrough-gpu", 1, "GPU 1 (0000:5e:00.0) [vgpu-configs.passthrough-gpu[0]]: no vGPU parent"),
        ("too-many", 1, "17 x T4-1Q requested, but the GPU holds at most 16 x T4-1Q"),
        ("passthrough-empty", 0, "currently applied"),  # no vGPUs wanted, none there: holds
    ],
)
def test_assert_host_root(cli, host, tmp_path, name, code, message):
    cfg = tmp_path / "configs.yaml"
    cfg.write_text(CONFIGS)
    before = snapshot(host)
    result = cli("assert", "--host-root", str(host), "-f", str(cfg), "-c", name)
    assert result.code == code, result.err
    assert message in result.err
    assert snapshot(host) == before


def test_apply_host_root_when_already_matching_writes_nothing(cli, host, tmp_path):
    cfg = tmp_path / "configs.yaml"
    cfg.write_text(CONFIGS)
    before = snapshot(host)
    result = cli("apply", "--host-root", str(host), "-f", str(cfg), "-c", "matching")
    assert result.code == 0, result.err
    assert "already applied" in result.err
    refused = cli("apply", "--host-root", str(host), "-f", str(cfg), "-c", "passthrough-gpu")
    assert refused.code == 1
    assert "vfio-pci" in refused.err and "nothing was changed" in refused.err
    assert snapshot(host) == before


# -- an older driver: every other type reads 0 once a vGPU exists ---------------------------------
def build_old_driver_t4(root: Path) -> None:
    """A T4 holding 2 x T4-4C under a driver where all vGPUs of a GPU must be of one type (§2.4)."""
    (root / "sys/bus/mdev/devices").mkdir(parents=True)
    (root / "sys/bus/mdev/drivers/vfio_mdev").mkdir(parents=True)
    t4 = pci_device(root, "pci0000:00", T4, nvidia_gpu("0x1eb8", "0x12a2", "0"), "nvidia", 10)
    for type_id, name, max_instances, available in (
        ("224", "T4-4C", 4, 2),  # the type in use: 2 more fit
        ("225", "T4-4Q", 4, 0),  # same size, other series: refused by this driver while T4-4C exist
        ("222", "T4-1Q", 16, 0),
    ):
        mdev_type(t4, f"nvidia-{type_id}", f"GRID {name}", available, f"max_instance={max_instances}")
    link(root / "sys/class/mdev_bus" / T4, t4)
    for n in range(2):
        mdev_device(root, t4, "nvidia-224", f"4c4c4c4c-0000-4000-8000-00000000000{n}", 40 + n)


def test_switching_series_at_the_same_size_is_not_refused(cli, tmp_path):
    root = tmp_path / "old-driver"
    build_old_driver_t4(root)
    cfg = tmp_path / "four-q.yaml"
    cfg.write_text('version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {"T4-4Q": 4}\n')
    result = cli("assert", "--host-root", str(root), "-f", str(cfg))
    assert result.code == 1
    assert "holds at most" not in result.err  # once the 2 x T4-4C are gone, 4 x T4-4Q fit
    assert "has 2 x T4-4C, config 'c' wants 4 x T4-4Q" in result.err
