"""The DRA driver's pure parts: config → devices, slice layouts and their limits, dropped-field
detection, and the gRPC contract (service paths, field numbers) of our own .proto files."""

from __future__ import annotations

import pytest

from vgpu_dm.dra import slices as S
from vgpu_dm.dra.devices import CounterSetSpec, DeviceSpec, NodeOffer, build_offer, quantity, slug
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import create_host
from vgpu_dm.spec import load_spec


def _device(gpu: int, n: int, mixed: bool) -> DeviceSpec:
    return DeviceSpec(
        f"gpu{gpu}-x-{n}", f"0000:{gpu:02x}:00.0", gpu, "L40S-8Q", "vendor-vfio", 8.0, mixed, {}
    )


def _offer(gpus: dict[int, tuple[int, bool]]) -> NodeOffer:
    devices = [_device(g, n, mixed) for g, (count, mixed) in gpus.items() for n in range(count)]
    sets = [CounterSetSpec(f"0000:{g:02x}:00.0", g, 48.0) for g, (_, mixed) in gpus.items() if mixed]
    return NodeOffer(tuple(devices), tuple(sets))


def test_quantities_and_names():
    assert quantity(16) == "16Gi" and quantity(0.5) == "512Mi" and quantity(1.5) == "1536Mi"
    assert slug("RTX6000-Ada-2Q") == "rtx6000-ada-2q"


def test_plain_slices_hold_128_devices_and_counter_slices_64():
    specs, problems = S.layout(_offer({0: (200, False)}), S.PLAIN)
    assert [len(s["devices"]) for s in specs] == [128, 72] and problems == []
    specs, _ = S.layout(_offer({0: (100, True)}), S.SPLIT)
    assert specs[0] == {
        "sharedCounters": [{"name": "gpu-0-framebuffer", "counters": {"framebuffer": {"value": "48Gi"}}}]
    }
    assert [len(s["devices"]) for s in specs[1:]] == [64, 36]


def test_split_layout_puts_at_most_8_counter_sets_in_a_slice():
    specs, _ = S.layout(_offer({g: (2, True) for g in range(10)}), S.SPLIT)
    counter_slices = [s for s in specs if "sharedCounters" in s]
    assert [len(s["sharedCounters"]) for s in counter_slices] == [8, 2]
    assert sum(len(s.get("devices", [])) for s in specs) == 20


def test_combined_layout_keeps_each_gpus_devices_with_its_counter_set():
    offer = _offer({0: (30, True), 1: (30, True), 2: (10, False), 3: (70, True)})
    specs, problems = S.layout(offer, S.COMBINED)
    (problem,) = problems
    assert problem.startswith("GPU 3 (0000:03:00.0): 70 devices share a counter set, more than the 64")
    for spec in specs:
        sets = {c["name"] for c in spec.get("sharedCounters", [])}
        used = {c["counterSet"] for d in spec["devices"] for c in d.get("consumesCounters", [])}
        assert used <= sets and len(spec["devices"]) <= 64
    assert sum(len(s["devices"]) for s in specs) == 70


def test_missing_fields_names_what_the_server_dropped():
    sent = {
        "devices": [{"name": "a", "consumesCounters": [{"counterSet": "x"}]}],
        "sharedCounters": [{"name": "x"}],
    }
    got = {"devices": [{"name": "a"}]}
    assert S.missing_fields(sent, got) == ["spec.devices[0].consumesCounters", "spec.sharedCounters"]
    assert S.missing_fields(sent, sent) == []


CONFIG = """\
version: v1
vgpu-configs:
  ok:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  too-many:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 5}
    - devices: [1]
      vgpu-devices: {"T4-2Q": 8}
  wrong:
    - devices: all
      vgpu-devices: {"T4-3Q": 1}
"""


@pytest.mark.parametrize(
    ("name", "devices", "problem"),
    [
        ("ok", 8, None),
        (
            "too-many",
            8,
            "GPU 0 (0000:3b:00.0) [vgpu-configs.too-many[0]]: 5 x T4-4Q offered, but the GPU holds at most 4",
        ),
        ("wrong", 0, "vGPU type T4-3Q is not supported on this GPU"),
    ],
)
def test_build_offer_checks_each_gpu_as_apply_does(tmp_path, name, devices, problem):
    create_host(tmp_path / "h", ["T4", "T4"])
    inventory = Inventory(SimHostRoot(tmp_path / "h"))
    _, entries = load_spec(CONFIG, "c.yaml").select(name)
    offer, _ = build_offer(entries, inventory)
    assert len(offer.devices) == devices
    if problem:
        assert any(problem in p for p in offer.problems), offer.problems
    else:
        assert offer.problems == ()


def test_mig_backed_types_are_not_offered(tmp_path):
    create_host(tmp_path / "h", ["A100"])
    inventory = Inventory(SimHostRoot(tmp_path / "h"))
    spec = load_spec(
        'version: v1\nvgpu-configs:\n  m:\n    - devices: all\n      vgpu-devices: {"A100-1-5C": 7}\n'
    )
    offer, _ = build_offer(spec.select("m")[1], inventory)
    assert (
        offer.devices == ()
        and "MIG-backed types (A100-1-5C) cannot be offered one at a time" in offer.problems[0]
    )


def test_our_protos_match_the_kubelets_contract():
    """Service paths and field numbers the kubelet uses (Kubernetes 1.36, docs/dra.md)."""
    from vgpu_dm.dra.proto import dra_v1_pb2, dra_v1beta1_pb2, registration_v1_pb2

    reg = registration_v1_pb2.DESCRIPTOR
    assert reg.package == "pluginregistration"
    assert list(reg.services_by_name["Registration"].methods_by_name) == [
        "GetInfo",
        "NotifyRegistrationStatus",
    ]
    numbers = {f.name: f.number for f in reg.message_types_by_name["PluginInfo"].fields}
    assert numbers == {"type": 1, "name": 2, "endpoint": 3, "supported_versions": 4}
    for pb, version in ((dra_v1_pb2, "v1"), (dra_v1beta1_pb2, "v1beta1")):
        d = pb.DESCRIPTOR
        assert d.package == f"k8s.io.kubelet.pkg.apis.dra.{version}"
        service = d.services_by_name["DRAPlugin"]
        assert list(service.methods_by_name) == ["NodePrepareResources", "NodeUnprepareResources"]
        fields = {
            m: {f.name: f.number for f in d.message_types_by_name[m].fields} for m in d.message_types_by_name
        }
        assert fields["Claim"] == {"namespace": 1, "uid": 2, "name": 3}
        assert fields["Device"] == {
            "request_names": 1,
            "pool_name": 2,
            "device_name": 3,
            "cdi_device_ids": 4,
            "share_id": 5,
        }
        assert fields["NodePrepareResourceResponse"] == {"devices": 1, "error": 2}
        assert fields["NodeUnprepareResourceResponse"] == {"error": 1}
        assert (
            fields["NodePrepareResourcesRequest"] == fields["NodeUnprepareResourcesRequest"] == {"claims": 1}
        )


def test_a_vgpu_without_an_iommu_group_gets_no_cdi_spec(tmp_path):
    """A CDI spec with /dev/vfio/vfio alone would hand the VM nothing it can open."""
    from vgpu_dm.dra.checkpoint import PREPARED, ClaimRecord, PreparedDevice
    from vgpu_dm.dra.claimfiles import ClaimFiles
    from vgpu_dm.errors import HostError

    files = ClaimFiles("vgpu.nvidia.com", str(tmp_path / "plugin"), str(tmp_path / "cdi"))
    device = PreparedDevice("vgpu", "gpu0-t4-2q-0", "0000:3b:00.0", "T4-2Q", "mdev", "5d1c…", None)
    record = ClaimRecord("uid-1", "ns", "c1", PREPARED, (device,))
    with pytest.raises(HostError, match="has no IOMMU group"):
        files.write(record, "node-1")
    assert not (tmp_path / "cdi").exists()
    spec = files.device_spec(record._replace(devices=(device._replace(iommu_group=42),)))
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/vfio/vfio"},
        {"path": "/dev/vfio/42"},
    ]


def test_mixed_size_counts_agree_with_the_simulated_placements():
    """The driver counts a type's mixed-size vGPUs (devices.mixed_size_count); the simulator places
    them slot by slot (sim/placements.py). Written apart from the same source, they must agree on
    every catalog GPU with SR-IOV and every time-sliced type."""
    from vgpu_dm import catalog
    from vgpu_dm.dra.devices import mixed_size_count
    from vgpu_dm.sim import placements as P
    from vgpu_dm.sim.layout import SimGPU, SimType
    from vgpu_dm.vgpu_type import VGPUType

    checked = 0
    for entry in catalog.load():
        if entry.framework == "mdev-pf":
            continue
        types = []
        for n, (name, most) in enumerate(entry.vgpu_types.items()):
            parsed = VGPUType.parse(name)
            types.append(SimType(name, n, most, parsed.framebuffer_gb, parsed.is_mig_backed))
        gpu = SimGPU(
            "0000:3b:00.0", entry.name, entry.prefix, "vendor-vfio", 0, 0, "NVIDIA ", 16, types=types,
            framebuffer_gb=entry.framebuffer_gb, placement_deny=P.deny_list(entry.arch, entry.framebuffer_gb),
        )  # fmt: skip
        for vtype in types:
            if vtype.mig_backed:
                continue
            counted = mixed_size_count(
                vtype.framebuffer_gb, vtype.max_instances, gpu.framebuffer_gb, entry.arch
            )
            assert counted == len(P.supported(gpu, vtype)), (entry.name, vtype.name)
            checked += 1
    assert checked > 100
