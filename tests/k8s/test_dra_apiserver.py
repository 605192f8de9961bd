"""nvidia-vgpu-dra against the real kube-apiserver and kube-scheduler, on simulated hosts: the slices it
publishes, claims the scheduler allocates from them (or leaves pending), a fake kubelet preparing and
unpreparing them over the driver's Unix sockets, and a relabelled node.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.k8s import drakit as K
from tests.k8s.agentkit import wait_for
from vgpu_dm.sim.processes import add_holder, device_node, release_holder


@pytest.fixture
def dra(request, apiserver, kube_scheduler, workdir):
    """Factory: ``dra(gpus=("T4", "T4"), label=None)`` → a started DraNode on a ready Node."""
    made: list[K.DraNode] = []
    K.ensure_device_class(apiserver)

    def make(gpus=("T4", "T4"), label: str | None = None, start: bool = True, **kw) -> K.DraNode:
        name = f"dra-{uuid.uuid4().hex[:10]}"
        K.ready_node(apiserver, name)
        if label:
            K.set_label(apiserver, name, label)
        node = K.DraNode(name, workdir / name, apiserver.admin_kubeconfig, gpus=tuple(gpus), **kw)
        made.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in made:
        node.stop()
        apiserver.request("DELETE", f"/api/v1/nodes/{node.name}")
        for s in K.slices(apiserver, node.name):
            apiserver.request("DELETE", f"/apis/resource.k8s.io/v1/resourceslices/{s['metadata']['name']}")


def published(apiserver, node: K.DraNode, count: int | None = None, timeout: float = 30.0) -> dict[str, dict]:
    def check():
        try:
            devices = K.pool_devices(apiserver, node.name)
        except AssertionError:
            return None
        return devices if devices and (count is None or len(devices) == count) else None

    return wait_for(check, timeout=timeout, what=f"{count} devices published by {node.name}:\n{node.tail()}")


def attr(device: dict, key: str):
    return next(iter(device["attributes"][key].values()))


def test_homogeneous_config_publishes_the_pinned_type_per_gpu(apiserver, dra):
    node = dra(label="T4-2Q")
    devices = published(apiserver, node, 16)
    assert sorted(devices) == sorted(f"gpu{g}-t4-2q-{n}" for g in (0, 1) for n in range(8))
    d = devices["gpu1-t4-2q-7"]
    assert attr(d, "type") == "T4-2Q" and attr(d, "framework") == "mdev" and attr(d, "gpuIndex") == 1
    assert attr(d, "resource.kubernetes.io/pciBusID") == "0000:5e:00.0"
    assert attr(d, "model") == "Tesla T4" and attr(d, "numaNode") == 1 and attr(d, "framebufferMiB") == 2048
    assert d["capacity"]["framebuffer"]["value"] == "2Gi" and "consumesCounters" not in d
    (only,) = K.slices(apiserver, node.name)
    assert only["spec"]["pool"] == {"name": node.name, "generation": 1, "resourceSliceCount": 1}
    assert only["spec"]["nodeName"] == node.name and only["spec"]["driver"] == K.DRIVER
    (owner,) = only["metadata"]["ownerReferences"]
    assert owner["kind"] == "Node" and owner["name"] == node.name and owner["controller"] is True
    # The GPUs are the DRA driver's now: apply refuses them, with zero writes.
    owned = json.loads((node.sim / "var/lib/nvidia-vgpu-dm/dra-owned.json").read_text())
    assert sorted(owned["gpus"]) == ["0000:3b:00.0", "0000:5e:00.0"] and owned["driver"] == K.DRIVER


def test_mixed_size_config_shares_each_gpus_framebuffer_through_counters(apiserver, dra):
    node = dra(gpus=("L40S",), label="L40S-mixed")
    devices = published(apiserver, node, 10)
    items = K.slices(apiserver, node.name)
    # Kubernetes 1.36 keeps counter sets in a slice of their own (split layout), same pool and generation.
    assert len(items) == 2 and {s["spec"]["pool"]["resourceSliceCount"] for s in items} == {2}
    (counters,) = [s for s in items if s["spec"].get("sharedCounters")]
    # Each vGPU of a vendor-VFIO GPU takes one of its 32 VFs: counted too.
    assert counters["spec"]["sharedCounters"] == [
        {"name": "gpu-0-framebuffer", "counters": {"framebuffer": {"value": "48Gi"}, "vfs": {"value": "32"}}}
    ]
    d = devices["gpu0-l40s-24q-1"]
    assert d["consumesCounters"] == [
        {
            "counterSet": "gpu-0-framebuffer",
            "counters": {"framebuffer": {"value": "24Gi"}, "vfs": {"value": "1"}},
        }
    ]
    assert attr(d, "framework") == "vendor-vfio" and attr(d, "mixedSize") is True
    # One size again: no counters, one slice; the counter slice of the old generation is deleted.
    K.set_label(apiserver, node.name, "L40S-8Q")
    assert sorted(published(apiserver, node, 6)) == [f"gpu0-l40s-8q-{n}" for n in range(6)]
    (only,) = wait_for(lambda: len(K.slices(apiserver, node.name)) == 1 and K.slices(apiserver, node.name))
    assert only["spec"]["pool"]["generation"] == items[0]["spec"]["pool"]["generation"] + 1
    assert only["spec"]["pool"]["resourceSliceCount"] == 1 and "sharedCounters" not in only["spec"]


def test_claim_with_a_cel_selector_is_allocated_prepared_and_released(apiserver, dra, k8s_namespace):
    node = dra(label="T4-2Q")
    published(apiserver, node, 16)
    K.create_claim(
        apiserver, k8s_namespace, "vm-disk", cel=f'device.attributes["{K.DRIVER}"].type == "T4-2Q"'
    )
    K.create_pod(apiserver, k8s_namespace, "vm", "vm-disk", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "vm-disk")
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    assert result["driver"] == K.DRIVER and result["pool"] == node.name and result["device"].startswith("gpu")

    kubelet = node.kubelet()
    assert kubelet.versions == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert kubelet.endpoint == str(node.plugin_dir / "dra.sock")
    response = kubelet.prepare(K.identity(claim))
    entry = response.claims[claim["metadata"]["uid"]]
    assert entry.error == ""
    (device,) = entry.devices
    assert device.pool_name == node.name and device.device_name == result["device"]
    assert list(device.request_names) == ["vgpu"]
    uid = claim["metadata"]["uid"]
    assert list(device.cdi_device_ids) == [
        f"{K.DRIVER}/vgpu={uid}-{result['device']}",
        f"{K.DRIVER}/metadata={uid}_vgpu",
    ]
    # The vGPU exists in the simulated sysfs, on the allocated device's GPU.
    found = K.kubevirt_read_metadata(node, "vm-disk", "vgpu")
    mdev = node.sim / "sys/bus/mdev/devices" / found["mdev"]
    assert mdev.exists()
    gpu = os.path.basename(os.path.dirname(os.path.realpath(mdev)))
    gpu_index = int(result["device"].split("-")[0][3:])
    assert gpu == ("0000:3b:00.0", "0000:5e:00.0")[gpu_index]
    assert os.path.basename(os.readlink(mdev / "mdev_type")).startswith("nvidia-")
    # The CDI spec hands the VM the vGPU's VFIO group and nothing that makes the runtime add GPUs.
    spec = json.loads((node.cdi / f"{K.DRIVER}_vgpu_{uid}.json").read_text())
    group = os.path.basename(os.readlink(mdev / "iommu_group"))
    (cdi_device,) = spec["devices"]
    assert spec["kind"] == f"{K.DRIVER}/vgpu" and cdi_device["name"] == f"{uid}-{result['device']}"
    assert cdi_device["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/vfio/vfio"},
        {"path": f"/dev/vfio/{group}"},
    ]
    assert cdi_device["containerEdits"]["env"] == ["NVIDIA_VISIBLE_DEVICES=void"]
    assert node.checkpoint["claims"][uid]["state"] == "prepared"

    response = kubelet.unprepare(K.identity(claim))
    assert response.claims[uid].error == ""
    assert not mdev.exists() and not list(node.cdi.glob("*.json"))
    assert not (node.plugin_dir / "dra-device-metadata" / f"{k8s_namespace}_vm-disk").exists()
    assert node.checkpoint["claims"] == {}
    K.release(apiserver, k8s_namespace, "vm-disk", "vm")


def test_a_claim_that_cannot_fit_stays_pending(apiserver, dra, k8s_namespace):
    node = dra(label="T4-4Q")
    published(apiserver, node, 8)
    # Nothing offers T4-1Q here, and 9 x T4-4Q are more than the 8 the node offers.
    K.create_claim(
        apiserver, k8s_namespace, "wrong-type", cel=f'device.attributes["{K.DRIVER}"].type == "T4-1Q"'
    )
    K.create_pod(apiserver, k8s_namespace, "vm-a", "wrong-type", node.name)
    K.create_claim(apiserver, k8s_namespace, "too-many", count=9)
    K.create_pod(apiserver, k8s_namespace, "vm-b", "too-many", node.name)
    K.create_claim(apiserver, k8s_namespace, "fits", count=8)
    K.create_pod(apiserver, k8s_namespace, "vm-c", "fits", node.name)
    K.allocated(apiserver, k8s_namespace, "fits")
    wait_for(
        lambda: "FailedScheduling" in K.pod_event_reasons(apiserver, k8s_namespace, "vm-b"),
        what="the scheduler to report vm-b unschedulable",
    )
    for name in ("wrong-type", "too-many"):
        assert not (K.get_claim(apiserver, k8s_namespace, name).get("status") or {}).get("allocation")


def test_mixed_size_counters_keep_claims_within_the_framebuffer(apiserver, dra, k8s_namespace):
    node = dra(gpus=("L40S",), label="L40S-mixed")
    published(apiserver, node, 10)
    sel = 'device.attributes["{}"].type == "{}"'
    K.create_claim(apiserver, k8s_namespace, "big", cel=sel.format(K.DRIVER, "L40S-24Q"))
    K.create_pod(apiserver, k8s_namespace, "vm-big", "big", node.name)
    big = K.allocated(apiserver, k8s_namespace, "big")
    K.create_claim(apiserver, k8s_namespace, "mid", cel=sel.format(K.DRIVER, "L40S-12Q"), count=2)
    K.create_pod(apiserver, k8s_namespace, "vm-mid", "mid", node.name)
    mid = K.allocated(apiserver, k8s_namespace, "mid")
    # 24 + 2 x 12 GB fill the 48 GB: one more 8Q cannot be allocated, though 4 are published.
    K.create_claim(apiserver, k8s_namespace, "small", cel=sel.format(K.DRIVER, "L40S-8Q"))
    K.create_pod(apiserver, k8s_namespace, "vm-small", "small", node.name)
    wait_for(
        lambda: "FailedScheduling" in K.pod_event_reasons(apiserver, k8s_namespace, "vm-small"),
        what="the scheduler to report vm-small unschedulable",
    )
    # Prepared on the simulated host in mixed-size mode: a 24Q and two 12Q VFs on one GPU.
    kubelet = node.kubelet()
    for claim in (big, mid):
        entry = kubelet.prepare(K.identity(claim)).claims[claim["metadata"]["uid"]]
        assert entry.error == "", entry.error
    types = sorted(
        (node.sim / "sys/bus/pci/devices" / vf / "nvidia/current_vgpu_type").read_text().strip()
        for vf in os.listdir(node.sim / "sys/bus/pci/devices")
        if (node.sim / "sys/bus/pci/devices" / vf / "nvidia/current_vgpu_type").exists()
    )
    assert len([t for t in types if t != "0"]) == 3
    meta = K.kubevirt_read_metadata(node, "big", "vgpu")
    assert "pci" in meta and meta["pci"] != "0000:3b:00.0"  # the VF, not the GPU
    assert (node.sim / "sys/bus/pci/devices" / meta["pci"] / "physfn").exists()
    vf_group = os.path.basename(os.readlink(node.sim / "sys/bus/pci/devices" / meta["pci"] / "iommu_group"))
    spec = json.loads((node.cdi / f"{K.DRIVER}_vgpu_{big['metadata']['uid']}.json").read_text())
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/vfio/vfio"},
        {"path": f"/dev/vfio/{vf_group}"},
    ]
    for claim in (big, mid):
        assert kubelet.unprepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error == ""


def test_relabel_republishes_without_withdrawing_allocated_devices(apiserver, dra, k8s_namespace):
    node = dra(gpus=("T4",), label="T4-2Q")
    published(apiserver, node, 8)
    K.create_claim(apiserver, k8s_namespace, "c1")
    K.create_pod(apiserver, k8s_namespace, "vm", "c1", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "c1")
    kept = claim["status"]["allocation"]["devices"]["results"][0]["device"]
    kubelet = node.kubelet()
    assert kubelet.prepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error == ""
    generation = K.slices(apiserver, node.name)[0]["spec"]["pool"]["generation"]
    K.set_label(apiserver, node.name, "T4-4Q")
    # The GPU holds a T4-2Q: T4-4Q devices next to it could never be created, so the GPU offers only
    # its allocated device until the claim is released.
    devices = published(apiserver, node, 1)
    assert list(devices) == [kept]
    assert K.slices(apiserver, node.name)[0]["spec"]["pool"]["generation"] > generation
    assert kubelet.unprepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error == ""
    K.release(apiserver, k8s_namespace, "c1", "vm")
    devices = published(apiserver, node, 4)
    assert sorted(devices) == [f"gpu0-t4-4q-{n}" for n in range(4)]


def test_relabel_while_prepared_keeps_the_prepared_devices_until_released(apiserver, dra, k8s_namespace):
    node = dra(gpus=("T4",), label="T4-2Q")
    published(apiserver, node, 8)
    K.create_claim(apiserver, k8s_namespace, "c1", count=5)
    K.create_pod(apiserver, k8s_namespace, "vm", "c1", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "c1")
    uid = claim["metadata"]["uid"]
    allocated = sorted(r["device"] for r in claim["status"]["allocation"]["devices"]["results"])
    kubelet = node.kubelet()
    first = kubelet.prepare(K.identity(claim)).claims[uid]
    assert first.error == "" and len(first.devices) == 5
    mdevs = sorted(os.listdir(node.sim / "sys/bus/mdev/devices"))
    node.config.write_text(K.CONFIG + '  T4-2Q-half:\n    - devices: all\n      vgpu-devices: {"T4-2Q": 4}\n')
    K.set_label(apiserver, node.name, "T4-2Q-half")
    # Five devices are allocated and the new layout has four: the GPU offers exactly its allocated
    # devices (nothing new can be allocated next to them) until they are released.
    devices = published(apiserver, node, 5)
    assert sorted(devices) == allocated
    # The prepared vGPUs are untouched and a repeated prepare returns the same devices.
    again = kubelet.prepare(K.identity(claim)).claims[uid]
    assert again.error == "" and sorted(d.device_name for d in again.devices) == allocated
    assert sorted(os.listdir(node.sim / "sys/bus/mdev/devices")) == mdevs
    assert kubelet.unprepare(K.identity(claim)).claims[uid].error == ""
    K.release(apiserver, k8s_namespace, "c1", "vm")
    assert sorted(published(apiserver, node, 4)) == [f"gpu0-t4-2q-{n}" for n in range(4)]


def test_unprepare_of_a_vgpu_a_vm_holds_fails_and_is_retried(apiserver, dra, k8s_namespace):
    node = dra(gpus=("T4",), label="T4-2Q")
    published(apiserver, node, 8)
    K.create_claim(apiserver, k8s_namespace, "c1")
    K.create_pod(apiserver, k8s_namespace, "vm", "c1", node.name)
    claim = K.allocated(apiserver, k8s_namespace, "c1")
    uid = claim["metadata"]["uid"]
    kubelet = node.kubelet()
    assert kubelet.prepare(K.identity(claim)).claims[uid].error == ""
    mdev = K.kubevirt_read_metadata(node, "c1", "vgpu")["mdev"]
    pid = add_holder(node.sim, device_node(node.sim, mdev))
    error = kubelet.unprepare(K.identity(claim)).claims[uid].error
    assert "in use by pid" in error and mdev in error
    assert (node.sim / "sys/bus/mdev/devices" / mdev).exists() and uid in node.checkpoint["claims"]
    release_holder(node.sim, pid)
    assert kubelet.unprepare(K.identity(claim)).claims[uid].error == ""
    assert not (node.sim / "sys/bus/mdev/devices" / mdev).exists()
