"""The files a prepared claim gets: a CDI spec that hands the vGPU's VFIO device nodes to the container,
and the KEP-5304 device metadata file (with its own CDI spec that bind-mounts it) that KubeVirt's
virt-launcher reads to find the mdev UUID or the VF's PCI address.

Paths follow the Kubernetes 1.36 kubelet-plugin helper: metadata at
``<plugin dir>/dra-device-metadata/<ns>_<claim>/<request>/metadata.json``, its CDI spec
``<cdi dir>/<driver>_metadata_<claimUID>_<request>.json`` (kind ``<driver>/metadata``, device
``<claimUID>_<request>``), mounted in the container at
``/var/run/kubernetes.io/dra-device-attributes/{resourceclaims/<claim>|resourceclaimtemplates/<pod claim
name>}/<request>/<driver>-metadata.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

from vgpu_dm.dra.checkpoint import ClaimRecord, PreparedDevice
from vgpu_dm.dra.devices import PCI_BUS_ID
from vgpu_dm.errors import HostError
from vgpu_dm.host.model import MDEV

CDI_VERSION = "0.5.0"
CDI_CLASS = "vgpu"  # CDI kind <driver>/vgpu for the vGPU devices
METADATA_API = "metadata.resource.k8s.io/v1alpha1"
METADATA_SUBDIR = "dra-device-metadata"
CONTAINER_METADATA_DIR = "/var/run/kubernetes.io/dra-device-attributes"
MDEV_UUID = "mdevUUID"  # the key KubeVirt reads (kubevirt pkg/dra/utils.go), lower-case "mdev"


def _write_json(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class ClaimFiles:
    """Writes and removes the CDI specs and metadata files of prepared claims."""

    def __init__(self, driver: str, plugin_dir: str, cdi_dir: str):
        self.driver = driver
        self.plugin_dir = plugin_dir
        self.cdi_dir = cdi_dir

    # -- paths -----------------------------------------------------------------------------------------

    def device_spec_path(self, uid: str) -> str:
        return os.path.join(self.cdi_dir, f"{self.driver}_{CDI_CLASS}_{uid}.json")

    def metadata_path(self, namespace: str, name: str, request: str) -> str:
        return os.path.join(self.plugin_dir, METADATA_SUBDIR, f"{namespace}_{name}", request, "metadata.json")

    def metadata_spec_path(self, uid: str, request: str) -> str:
        return os.path.join(self.cdi_dir, f"{self.driver}_metadata_{uid}_{request}.json")

    def container_metadata_path(self, record: ClaimRecord, request: str) -> str:
        if record.pod_claim_name:
            where = f"resourceclaimtemplates/{record.pod_claim_name}"
        else:
            where = f"resourceclaims/{record.name}"
        return f"{CONTAINER_METADATA_DIR}/{where}/{request}/{self.driver}-metadata.json"

    @staticmethod
    def cdi_name(uid: str, device: PreparedDevice) -> str:
        return f"{uid}-{device.device}"

    def cdi_ids(self, record: ClaimRecord) -> dict[str, list[str]]:
        """Device name → its CDI device ids (the metadata id goes with each request's first device)."""
        ids: dict[str, list[str]] = {}
        seen: set[str] = set()
        for device in record.devices:
            ids[device.device] = [f"{self.driver}/{CDI_CLASS}={self.cdi_name(record.uid, device)}"]
            if device.request not in seen:
                seen.add(device.request)
                ids[device.device].append(f"{self.driver}/metadata={record.uid}_{device.request}")
        return ids

    # -- content ---------------------------------------------------------------------------------------

    def device_spec(self, record: ClaimRecord) -> dict[str, Any]:
        devices = []
        for device in record.devices:
            if device.iommu_group is None:
                # /dev/vfio/vfio alone gives a VM nothing to open: never hand that out as a vGPU.
                raise HostError(
                    f"vGPU {device.key or device.device} of claim {record.namespace}/{record.name} has no "
                    f"IOMMU group (no iommu_group link in sysfs), so no VFIO device node can be given to "
                    f"the VM; is the IOMMU on (intel_iommu=on / amd_iommu=on)?"
                )
            nodes = [{"path": "/dev/vfio/vfio"}, {"path": f"/dev/vfio/{device.iommu_group}"}]
            devices.append(
                {
                    "name": self.cdi_name(record.uid, device),
                    "containerEdits": {
                        # A VM gets the vGPU through VFIO; the NVIDIA container runtime must not add GPUs.
                        "env": ["NVIDIA_VISIBLE_DEVICES=void"],
                        "deviceNodes": nodes,
                    },
                }
            )
        return {"cdiVersion": CDI_VERSION, "kind": f"{self.driver}/{CDI_CLASS}", "devices": devices}

    def metadata(self, record: ClaimRecord, request: str, pool: str) -> dict[str, Any]:
        devices = []
        for device in record.devices:
            if device.request != request:
                continue
            # mdevUUID first: KubeVirt takes a device with it as an mdev; a vendor-VFIO vGPU is a PCI VF.
            if device.framework == MDEV:
                attrs = {MDEV_UUID: {"string": device.key}, "parentPciBusID": {"string": device.gpu}}
            else:
                attrs = {PCI_BUS_ID: {"string": device.key}, "parentPciBusID": {"string": device.gpu}}
            attrs["type"] = {"string": device.type_name}
            devices.append({"driver": self.driver, "pool": pool, "name": device.device, "attributes": attrs})
        meta: dict[str, Any] = {
            "apiVersion": METADATA_API,
            "kind": "DeviceMetadata",
            "metadata": {
                "name": record.name,
                "namespace": record.namespace,
                "uid": record.uid,
                "generation": 1,
            },
            "requests": [{"name": request, "devices": devices}],
        }
        if record.pod_claim_name:
            meta["podClaimName"] = record.pod_claim_name
        return meta

    def metadata_spec(self, record: ClaimRecord, request: str) -> dict[str, Any]:
        return {
            "cdiVersion": CDI_VERSION,
            "kind": f"{self.driver}/metadata",
            "devices": [
                {
                    "name": f"{record.uid}_{request}",
                    "containerEdits": {
                        "mounts": [
                            {
                                "hostPath": self.metadata_path(record.namespace, record.name, request),
                                "containerPath": self.container_metadata_path(record, request),
                                "options": ["ro", "bind"],
                            }
                        ]
                    },
                }
            ],
        }

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, record: ClaimRecord, pool: str) -> None:
        """Every file of a prepared claim (rewritten whole: idempotent)."""
        _write_json(self.device_spec_path(record.uid), json.dumps(self.device_spec(record), indent=2))
        for request in dict.fromkeys(d.request for d in record.devices):
            # A stream with one object per metadata version, newest first; we write v1alpha1 only.
            text = json.dumps(self.metadata(record, request, pool), indent=2) + "\n"
            _write_json(self.metadata_path(record.namespace, record.name, request), text)
            _write_json(
                self.metadata_spec_path(record.uid, request), json.dumps(self.metadata_spec(record, request))
            )

    def sweep(self, keep: Iterable[ClaimRecord]) -> list[str]:
        """Remove this driver's CDI specs and metadata directories that belong to none of ``keep`` (left
        by a driver killed between writing them and recording its claim); returns what went."""
        keep = list(keep)
        uids = {r.uid for r in keep}
        dirs = {f"{r.namespace}_{r.name}" for r in keep}
        gone = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.cdi_dir)):
                for prefix in (f"{self.driver}_{CDI_CLASS}_", f"{self.driver}_metadata_"):
                    if name.startswith(prefix) and name.endswith(".json"):
                        uid = name[len(prefix) : -len(".json")].split("_", 1)[0]
                        if uid not in uids:
                            os.unlink(os.path.join(self.cdi_dir, name))
                            gone.append(os.path.join(self.cdi_dir, name))
        top = os.path.join(self.plugin_dir, METADATA_SUBDIR)
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(top)):
                if name not in dirs:
                    shutil.rmtree(os.path.join(top, name), ignore_errors=True)
                    gone.append(os.path.join(top, name))
        return gone

    def remove(self, record: ClaimRecord) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.device_spec_path(record.uid))
        for request in {d.request for d in record.devices}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.metadata_spec_path(record.uid, request))
        shutil.rmtree(
            os.path.join(self.plugin_dir, METADATA_SUBDIR, f"{record.namespace}_{record.name}"),
            ignore_errors=True,
        )
