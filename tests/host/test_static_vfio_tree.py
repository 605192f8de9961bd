"""The real host code against a hand-written vendor-specific-VFIO ``/sys`` tree (no simulator code).

The tree below ``tmp_path`` has, in PCI order:

* GPU 0 — a T4 with mdev on the PF (one T4-4Q mdev), plus its HD-audio function;
* GPU 1 — an L40S PF bound to ``nvidia`` with 12 VFs (``virtfn0``..``virtfn11``: ``virtfn10`` and
  ``virtfn11`` must sort after ``virtfn9``) at functions 0000:41:00.4 onwards, so the later ones sit
  on device number 01; three VFs (virtfn0, virtfn1, virtfn10) carry an L40S-12Q, the free ones list
  the 12 GB types (with blank lines and odd spacing);
* GPU 2 — an RTX PRO 6000 Blackwell whose VFs start at function .2 and whose type names have several
  words (``NVIDIA RTX Pro 6000 Blackwell DC-8Q``: the short name is the last word);
* GPU 3 — an H100 with SR-IOV but no VFs enabled yet;
* GPU 4 — an A40 bound to vfio-pci (passthrough: no vGPU framework).

The real ``HostRoot``/``Inventory`` and the CLI (``list``/``assert --host-root``) are pointed at it.
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

T4, T4_AUDIO = "0000:3b:00.0", "0000:3b:00.1"
L40S, DC, H100, A40 = "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0", "0000:e1:00.0"
T4_MDEV = "5d1c4a8e-0c3f-4b7e-9a51-6f2e7d8c9b01"
L40S_VFS = tuple(f"0000:41:{(4 + n) // 8:02x}.{(4 + n) % 8}" for n in range(12))
DC_VFS = tuple(f"0000:81:00.{2 + n}" for n in range(4))
L40S_12Q, L40S_12C = 1153, 1163
L40S_BUSY = (0, 1, 10)  # virtfn numbers that carry an L40S-12Q
DC_8Q, DC_8C = 3990, 3991
HEADER = "ID    : vGPU Name\n"

T4_TYPES = {222: "GRID T4-1Q", 223: "GRID T4-2Q", 224: "GRID T4-4Q", 225: "GRID T4-8Q", 226: "GRID T4-16Q"}
T4_MAX = {222: 16, 223: 8, 224: 4, 225: 2, 226: 1}


# -- building the tree by hand ---------------------------------------------------------------------
def put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent))


def pci_device(root: Path, address: str, files: dict[str, str], driver: str | None, group: int) -> Path:
    """sys/devices/pci0000:00/<address> with attribute files, driver/iommu_group links and its bus link."""
    dev = root / "sys/devices/pci0000:00" / address
    dev.mkdir(parents=True)
    for name, text in files.items():
        put(dev / name, text + "\n")
    if driver:
        (root / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
        link(dev / "driver", root / "sys/bus/pci/drivers" / driver)
    (root / "sys/kernel/iommu_groups" / str(group)).mkdir(parents=True, exist_ok=True)
    link(dev / "iommu_group", root / "sys/kernel/iommu_groups" / str(group))
    link(root / "sys/bus/pci/devices" / address, dev)
    return dev


def gpu_files(device: int, subsystem: int, numa: int = 0, total_vfs: int | None = None, num_vfs: int = 0):
    files = {
        "vendor": "0x10de",
        "device": f"0x{device:04x}",
        "class": "0x030200",
        "subsystem_vendor": "0x10de",
        "subsystem_device": f"0x{subsystem:04x}",
        "numa_node": str(numa),
    }
    if total_vfs is not None:
        files["sriov_totalvfs"] = str(total_vfs)
        files["sriov_numvfs"] = str(num_vfs)
    return files


def add_vfs(root: Path, pf: Path, vfs: tuple[str, ...], pf_files: dict[str, str], first_group: int):
    """The PF's VFs, bound to nvidia, each with an (empty for now) nvidia/ directory."""
    dirs = []
    for n, vf in enumerate(vfs):
        files = {k: v for k, v in pf_files.items() if not k.startswith("sriov_")}
        vf_dir = pci_device(root, vf, files, "nvidia", first_group + n)
        link(vf_dir / "physfn", pf)
        link(pf / f"virtfn{n}", vf_dir)
        (vf_dir / "vfio-dev" / f"vfio{n}").mkdir(parents=True)
        dirs.append(vf_dir)
    return dirs


def listing(lines: list[str]) -> str:
    return HEADER + "".join(line + "\n" for line in lines)


def build_tree(root: Path) -> Path:
    for sub in ("sys/bus/pci/devices", "sys/class/mdev_bus", "sys/bus/mdev/devices", "proc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pci_device(root, "0000:00:00.0", {"vendor": "0x8086", "device": "0x2020", "class": "0x060000"}, None, 1)

    # GPU 0: T4, mdev on the PF, one T4-4Q.
    t4 = pci_device(root, T4, gpu_files(0x1EB8, 0x12A2), "nvidia", 10)
    link(root / "sys/class/mdev_bus" / T4, t4)
    for type_id, name in T4_TYPES.items():
        tdir = t4 / "mdev_supported_types" / f"nvidia-{type_id}"
        fb = 16384 // T4_MAX[type_id]
        put(tdir / "name", name + "\n")
        put(
            tdir / "description",
            f"num_heads=4, frl_config=60, framebuffer={fb}M, max_resolution=5120x2880, "
            f"max_instance={T4_MAX[type_id]}\n",
        )
        put(tdir / "available_instances", ("3" if type_id == 224 else "0") + "\n")
        put(tdir / "device_api", "vfio-pci\n")
        put(tdir / "create", "")
        (tdir / "devices").mkdir()
    mdev = t4 / T4_MDEV
    mdev.mkdir()
    link(mdev / "mdev_type", t4 / "mdev_supported_types/nvidia-224")
    put(mdev / "remove", "")
    (root / "sys/kernel/iommu_groups/300").mkdir(parents=True)
    link(mdev / "iommu_group", root / "sys/kernel/iommu_groups/300")
    link(root / "sys/bus/mdev/devices" / T4_MDEV, mdev)
    pci_device(root, T4_AUDIO, {"vendor": "0x10de", "device": "0x10fa", "class": "0x040300"}, None, 11)

    # GPU 1: L40S, vendor VFIO, 12 VFs, three of them carrying an L40S-12Q (equal-size mode).
    l40s_files = gpu_files(0x26B9, 0x1851, numa=0, total_vfs=32, num_vfs=12)
    l40s = pci_device(root, L40S, l40s_files, "nvidia", 20)
    free_lists = [
        listing([f"{L40S_12Q}  : NVIDIA L40S-12Q", f"{L40S_12C}  : NVIDIA L40S-12C"]),
        "\n"
        + HEADER
        + "\n"
        + f"{L40S_12Q}  :   NVIDIA L40S-12Q   \n\n"
        + f"  {L40S_12C}:NVIDIA L40S-12C\n\n",
    ]
    for n, vf_dir in enumerate(add_vfs(root, l40s, L40S_VFS, l40s_files, 100)):
        busy = n in L40S_BUSY
        put(vf_dir / "nvidia/current_vgpu_type", f"{L40S_12Q}\n" if busy else "0\n")
        put(vf_dir / "nvidia/creatable_vgpu_types", HEADER if busy else free_lists[n % 2])

    # GPU 2: RTX PRO 6000 Blackwell, VFs from function .2, multi-word type names; one DC-8Q.
    dc_files = gpu_files(0x2BB5, 0x204E, numa=1, total_vfs=48, num_vfs=4)
    dc = pci_device(root, DC, dc_files, "nvidia", 40)
    for n, vf_dir in enumerate(add_vfs(root, dc, DC_VFS, dc_files, 200)):
        put(vf_dir / "nvidia/current_vgpu_type", f"{DC_8Q}" if n == 0 else "0")  # no newline: tolerated
        names = [
            f"{DC_8Q}  : NVIDIA RTX Pro 6000 Blackwell DC-8Q",
            f"{DC_8C}  : NVIDIA RTX Pro 6000 Blackwell DC-8C",
        ]
        put(vf_dir / "nvidia/creatable_vgpu_types", HEADER if n == 0 else listing(names))

    # GPU 3: H100 with SR-IOV, VFs not enabled.  GPU 4: A40 on vfio-pci (passthrough).
    pci_device(root, H100, gpu_files(0x2331, 0x1626, numa=1, total_vfs=20), "nvidia", 50)
    pci_device(root, A40, gpu_files(0x2235, 0x145A, numa=1, total_vfs=32), "vfio-pci", 60)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """One tree for the tests that only read it (our learned tables below var/ may appear)."""
    return build_tree(tmp_path_factory.mktemp("static-vfio") / "host")


@pytest.fixture
def own_tree(tmp_path) -> Path:
    """A fresh tree for a test that changes it."""
    return build_tree(tmp_path / "host")


def snapshot(root: Path) -> dict[str, str]:
    """Every regular file below sys/ and its content (to prove nothing was written)."""
    found = {}
    for dirpath, _dirs, files in os.walk(root / "sys"):
        for name in files:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path.read_text()
    return found


def config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\nvgpu-configs:\n" + body)
    return str(path)


# -- discovery -------------------------------------------------------------------------------------
def test_gpus_found_in_pci_order_with_their_vfs_in_virtfn_order(tree):
    gpus = discover_gpus(HostRoot(tree))
    assert [(g.index, g.address) for g in gpus] == [(0, T4), (1, L40S), (2, DC), (3, H100), (4, A40)]
    by_addr = {g.address: g for g in gpus}
    # Numeric virtfn order: virtfn10/virtfn11 come last although "virtfn10" < "virtfn2" as strings.
    assert by_addr[L40S].vfs == L40S_VFS
    assert by_addr[L40S].vfs[9:] == ("0000:41:01.5", "0000:41:01.6", "0000:41:01.7")
    assert by_addr[DC].vfs == DC_VFS
    assert by_addr[H100].vfs == () and by_addr[T4].vfs == ()
    assert by_addr[L40S].sriov_totalvfs == 32 and by_addr[T4].sriov_totalvfs is None
    assert by_addr[L40S].driver == "nvidia" and by_addr[A40].driver == "vfio-pci"
    assert by_addr[L40S].device_id == DeviceID(0x26B9, 0x10DE, 0x1851, 0x10DE)
    assert by_addr[DC].numa_node == 1


def test_framework_detected_per_gpu(tree):
    inventory = Inventory(HostRoot(tree))
    assert {g.address: inventory.framework(g) for g in inventory.gpus} == {
        T4: "mdev",
        L40S: "vendor-vfio",
        DC: "vendor-vfio",
        H100: "sriov-vfs-off",
        A40: "none",
    }


def test_vendor_vfio_devices_are_the_vfs_with_a_type_set(tree):
    inventory = Inventory(HostRoot(tree))
    gpus = {g.address: g for g in inventory.gpus}
    l40s = inventory.devices(gpus[L40S])
    assert [d.parent for d in l40s] == [L40S_VFS[n] for n in L40S_BUSY]
    assert {(d.type_name, d.type_id, d.framework, d.gpu, d.uuid) for d in l40s} == {
        ("L40S-12Q", L40S_12Q, "vendor-vfio", L40S, None)
    }
    assert [d.key for d in l40s] == [L40S_VFS[0], L40S_VFS[1], "0000:41:01.6"]
    dc = inventory.devices(gpus[DC])
    assert [(d.parent, d.type_name, d.type_id) for d in dc] == [(DC_VFS[0], "DC-8Q", DC_8Q)]
    t4 = inventory.devices(gpus[T4])
    assert [(d.uuid, d.type_name, d.framework, d.iommu_group) for d in t4] == [
        (T4_MDEV, "T4-4Q", "mdev", 300)
    ]
    assert inventory.devices(gpus[H100]) == [] and inventory.devices(gpus[A40]) == []


def test_offered_types_come_from_the_free_vfs_creatable_lists(tree):
    inventory = Inventory(HostRoot(tree))
    gpus = {g.address: g for g in inventory.gpus}
    l40s = inventory.vfio.types(gpus[L40S])
    free = len(L40S_VFS) - len(L40S_BUSY)
    assert {n: (t.type_id, t.driver_name, t.available) for n, t in l40s.items()} == {
        "L40S-12Q": (L40S_12Q, "NVIDIA L40S-12Q", free),
        "L40S-12C": (L40S_12C, "NVIDIA L40S-12C", free),
    }
    dc = inventory.vfio.types(gpus[DC])
    assert {n: (t.type_id, t.driver_name, t.available) for n, t in dc.items()} == {
        "DC-8Q": (DC_8Q, "NVIDIA RTX Pro 6000 Blackwell DC-8Q", 3),
        "DC-8C": (DC_8C, "NVIDIA RTX Pro 6000 Blackwell DC-8C", 3),
    }


def test_reading_never_writes_a_control_file(tree):
    before = snapshot(tree)
    host = HostRoot(tree)
    inventory = Inventory(host)
    for gpu in inventory.gpus:
        inventory.devices(gpu)
        backend = inventory.backend_for(gpu)
        if backend:
            backend.types(gpu)
    assert host.counters.writes == 0
    assert snapshot(tree) == before


def test_names_learned_from_free_vfs_are_remembered(own_tree):
    tree = own_tree
    assert not (tree / "var").exists()
    reader = Inventory(HostRoot(tree))  # list and assert: read-only, learn in memory only
    for gpu in reader.gpus:
        reader.devices(gpu)
    assert not (tree / "var").exists()
    inventory = Inventory(HostRoot(tree), writable=True)  # apply
    for gpu in inventory.gpus:
        inventory.devices(gpu)
    learned = json.loads((tree / "var/lib/nvidia-vgpu-dm/types" / f"{L40S}.json").read_text())
    assert learned["key"] == {"gpu": L40S, "device_id": "0x26B910DE:0x185110DE", "driver_version": None}
    assert learned["types"][str(L40S_12Q)] == "NVIDIA L40S-12Q"


def test_full_gpu_names_its_vgpus_from_a_learned_table(own_tree):
    """The GPU full and every creatable list header-only: only the learned table knows the name."""
    tree = own_tree
    for n, vf in enumerate(L40S_VFS):
        vf_dir = tree / "sys/bus/pci/devices" / vf / "nvidia"
        (vf_dir / "current_vgpu_type").write_text("1150\n" if n < 2 else "0\n")
        (vf_dir / "creatable_vgpu_types").write_text(HEADER)
    gpu = next(g for g in discover_gpus(HostRoot(tree)) if g.address == L40S)

    unnamed = Inventory(HostRoot(tree)).devices(gpu)
    assert [d.type_name for d in unnamed] == ["type-1150", "type-1150"]  # honest, no guess

    table = tree / "var/lib/nvidia-vgpu-dm/types" / f"{L40S}.json"
    put(table, json.dumps({"1150": "NVIDIA L40S-24Q"}))  # an old, unkeyed table: not trusted
    assert [d.type_name for d in Inventory(HostRoot(tree)).devices(gpu)] == ["type-1150", "type-1150"]

    key = {"gpu": L40S, "device_id": str(gpu.device_id), "driver_version": None}
    put(table, json.dumps({"key": key, "types": {"1150": "NVIDIA L40S-24Q"}}))
    named = Inventory(HostRoot(tree)).devices(gpu)
    assert [(d.parent, d.type_name, d.type_id) for d in named] == [
        (L40S_VFS[0], "L40S-24Q", 1150),
        (L40S_VFS[1], "L40S-24Q", 1150),
    ]
    # The same table after a driver upgrade (ids may have moved) or for a swapped GPU is ignored.
    put(tree / "sys/module/nvidia/version", "580.159.01\n")
    assert [d.type_name for d in Inventory(HostRoot(tree)).devices(gpu)] == ["type-1150", "type-1150"]
    put(
        table,
        json.dumps({"key": {**key, "driver_version": "580.159.01"}, "types": {"1150": "NVIDIA L40S-24Q"}}),
    )
    assert [d.type_name for d in Inventory(HostRoot(tree)).devices(gpu)] == ["L40S-24Q", "L40S-24Q"]
    put(
        table,
        json.dumps(
            {
                "key": {**key, "driver_version": "580.159.01", "device_id": "0x233110DE:0x162610DE"},
                "types": {"1150": "NVIDIA L40S-24Q"},
            }
        ),
    )
    assert [d.type_name for d in Inventory(HostRoot(tree)).devices(gpu)] == ["type-1150", "type-1150"]


# -- the CLI on the tree ---------------------------------------------------------------------------
def test_list_json_reports_each_gpu_and_its_vfs(cli, tree):
    result = cli("list", "--json", "--host-root", str(tree))
    assert result.code == 0, result.err
    report = {g["address"]: g for g in json.loads(result.out)["gpus"]}
    assert list(report) == [T4, L40S, DC, H100, A40]
    assert [g["index"] for g in report.values()] == [0, 1, 2, 3, 4]
    assert [g["framework"] for g in report.values()] == [
        "mdev",
        "vendor-vfio",
        "vendor-vfio",
        "sriov-vfs-off",
        "none",
    ]
    assert report[L40S]["model"] == "NVIDIA L40S"
    assert report[L40S]["device_id"] == "0x26B910DE:0x185110DE"
    assert [(v["type"], v["type_id"], v["parent"], v["uuid"]) for v in report[L40S]["vgpus"]] == [
        ("L40S-12Q", L40S_12Q, L40S_VFS[n], None) for n in L40S_BUSY
    ]
    assert [(v["type"], v["parent"]) for v in report[DC]["vgpus"]] == [("DC-8Q", DC_VFS[0])]
    assert [(v["type"], v["uuid"], v["parent"]) for v in report[T4]["vgpus"]] == [("T4-4Q", T4_MDEV, T4)]
    assert report[H100]["vgpus"] == [] and report[A40]["vgpus"] == []


def test_list_table_shows_short_names(cli, tree):
    result = cli("list", "--host-root", str(tree))
    assert result.code == 0, result.err
    rows = parse_table(result.out, LIST_COLUMNS, fill=LIST_COLUMNS[:6])
    dc = [r for r in rows if r["GPU"] == "2"]
    assert dc[0]["MODEL"] == "NVIDIA RTX PRO 6000 Blackwell Server Edition"
    assert (dc[0]["FRAMEWORK"], dc[0]["VGPU TYPE"], dc[0]["UUID"], dc[0]["PARENT"]) == (
        "vendor-vfio",
        "DC-8Q",
        "-",
        DC_VFS[0],
    )
    assert sum(1 for r in rows if r["VGPU TYPE"] == "L40S-12Q") == 3
    assert "Blackwell DC-8Q" not in result.out  # the driver's long name is not shown as the type


ALL_MATCH = """\
  ok:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-4Q": 1}
    - device-filter: "0x26B910DE"
      devices: all
      vgpu-devices: {"L40S-12Q": 3}
    - devices: [2]
      vgpu-devices: {"DC-8Q": 1}
"""


def test_assert_matching_config_holds_and_writes_nothing(cli, tree, tmp_path):
    before = snapshot(tree)
    result = cli("assert", "--host-root", str(tree), "-f", config(tmp_path, ALL_MATCH), "-c", "ok")
    assert result.code == 0, result.err
    assert "currently applied" in result.err
    assert snapshot(tree) == before


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ('{"L40S-12Q": 2}', "GPU 1 (0000:41:00.0): has 3 x L40S-12Q, config 'c' wants 2 x L40S-12Q"),
        ('{"L40S-12Q": 4}', "GPU 1 (0000:41:00.0): has 3 x L40S-12Q, config 'c' wants 4 x L40S-12Q"),
        ('{"L40S-12C": 3}', "wants 3 x L40S-12C"),
        ('{"L40S-4Q": 3}', "GPU 1 (0000:41:00.0): has 3 x L40S-12Q"),
        ("{}", "wants no vGPUs"),
    ],
    ids=["fewer", "more", "other-series", "other-size-full-gpu", "none"],
)
def test_assert_reports_the_difference_on_the_l40s(cli, tree, tmp_path, body, expect):
    before = snapshot(tree)
    text = f'  c:\n    - device-filter: "0x26B910DE"\n      devices: all\n      vgpu-devices: {body}\n'
    result = cli("assert", "--host-root", str(tree), "-f", config(tmp_path, text), "-c", "c")
    assert result.code == 1
    assert expect in result.err
    assert "assertion failure" in result.err
    assert snapshot(tree) == before


def test_assert_unsupported_type_names_gpu_and_type(cli, tree, tmp_path):
    text = '  c:\n    - devices: [1]\n      vgpu-devices: {"T4-1Q": 1}\n'
    result = cli("assert", "--host-root", str(tree), "-f", config(tmp_path, text), "-c", "c")
    assert result.code == 1
    assert "GPU 1 (0000:41:00.0)" in result.err and "T4-1Q" in result.err
    assert "not supported" in result.err


def test_assert_on_gpu_with_vfs_off_is_false_and_enables_nothing(cli, tree, tmp_path):
    text = (
        '  c:\n    - device-filter: "0x233110DE"\n      devices: all\n      vgpu-devices: {"H100-20C": 4}\n'
    )
    result = cli("assert", "--host-root", str(tree), "-f", config(tmp_path, text), "-c", "c")
    assert result.code == 1
    assert "GPU 3 (0000:c1:00.0): has no vGPUs" in result.err and "4 x H100-20C" in result.err
    assert not [e for e in os.listdir(tree / "sys/bus/pci/devices" / H100) if e.startswith("virtfn")]


def test_assert_on_passthrough_gpu_explains_no_vgpu_support(cli, tree, tmp_path):
    text = '  c:\n    - devices: [4]\n      vgpu-devices: {"A40-4Q": 1}\n'
    result = cli("assert", "--host-root", str(tree), "-f", config(tmp_path, text), "-c", "c")
    assert result.code == 1
    assert "GPU 4 (0000:e1:00.0)" in result.err and "no vGPU parent devices found" in result.err
    assert "vfio-pci" in result.err
