"""Data the host layer hands upward: vGPU devices, the types a GPU offers, and the backend interface."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from vgpu_dm.host.pci import GPU
from vgpu_dm.vgpu_type import InvalidVGPUType, VGPUType

MDEV = "mdev"
VENDOR_VFIO = "vendor-vfio"
# An mdev UUID as the kernel, libvirt and mdevctl write it (36 characters, hyphenated, either case).
UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UNRESOLVED = -1  # TypeInfo.type_id of a type whose id on this GPU is not known yet (vendor VFIO)


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class VGPUDevice(NamedTuple):
    """One existing vGPU: an mdev (with a UUID) or a VF with a vGPU type set (vendor VFIO)."""

    gpu: str  # address of the physical GPU (PF)
    parent: str  # mdev parent device, or the VF carrying the vGPU
    type_name: str  # short type name, e.g. T4-1Q
    type_id: int
    framework: str
    uuid: str | None = None
    iommu_group: int | None = None

    @property
    def key(self) -> str:
        """What identifies the device to an operator: its UUID (mdev) or VF address."""
        return self.uuid or self.parent

    @property
    def framebuffer_gb(self) -> int | None:
        return framebuffer_of(self.type_name)


class TypeInfo(NamedTuple):
    """A vGPU type as the driver offers it on one GPU."""

    name: str  # short name (last word of the driver's name)
    type_id: int
    driver_name: str  # the driver's full name text, e.g. "NVIDIA A10-4Q"
    available: int  # creatable now, summed over the GPU's parents
    max_instances: int | None = None  # per GPU, when the driver says so


def unnamed(device: VGPUDevice) -> bool:
    """True for a vendor-VFIO vGPU whose type id nothing could name (it reads ``type-<id>``)."""
    return device.type_name == f"type-{device.type_id}"


def framebuffer_of(type_name: str) -> int | None:
    try:
        return VGPUType.parse(type_name).framebuffer_gb
    except InvalidVGPUType:
        return None


class Backend(Protocol):
    """What plan and apply need from a kernel interface; one implementation per framework."""

    framework: str

    def devices(self, gpu: GPU) -> list[VGPUDevice]: ...

    def handles(self, gpu: GPU) -> bool: ...

    def types(self, gpu: GPU) -> dict[str, TypeInfo]: ...

    def capacity(self, gpu: GPU, vtype: TypeInfo, current: list[VGPUDevice]) -> int | None: ...

    def slots(self, gpu: GPU) -> int | None: ...

    def remove(self, device: VGPUDevice) -> None: ...

    def create(self, gpu: GPU, vtype: TypeInfo) -> VGPUDevice: ...
