"""From the node's selected config to the DRA devices it offers: one device per vGPU a GPU may host,
with its attributes, and a counter set for GPUs that mix framebuffer sizes.

A GPU whose config entry names one framebuffer size offers exactly the entry's vGPUs (the config pins
the type, so no mix can be allocated; every subset of a valid layout can be created). A GPU whose entry
names several sizes (mixed-size mode) offers each type up to its count, and every device consumes its
framebuffer from the GPU's counter set, so the scheduler never allocates more than the GPU holds; on a
GPU whose vGPUs each take an SR-IOV VF (vendor VFIO, mdev on VFs) it also consumes one of the set's
``vfs``.

In mixed-size mode NVIDIA's resource manager puts each vGPU at fixed placements (sim/placements.py has
the rule as read in its open kernel module source): a type's count there is the largest power of two
not above its equal-size maximum (fewer for 1 GB types on 48 GB boards; none for 512 MB types), so no
more than that is offered. Which placement the driver picks is its own choice, so placements can still
fragment: a prepare can then fail although the counters allowed the allocation (docs/dra.md).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from vgpu_dm.errors import HostError, PlanError
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.plan import GPUOffer, check_offer, governing_entries
from vgpu_dm.spec.model import ConfigEntry

PCI_BUS_ID = "resource.kubernetes.io/pciBusID"  # KEP-4381's standard attribute
FRAMEBUFFER = "framebuffer"  # the counter (and capacity) name
VFS = "vfs"  # the counter of SR-IOV VFs, on GPUs whose every vGPU takes one


def quantity(gb: float) -> str:
    """A Kubernetes quantity for ``gb`` GB of framebuffer (``16Gi``, ``512Mi``)."""
    mib = round(gb * 1024)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def slug(type_name: str) -> str:
    """``RTX6000-Ada-2Q`` → ``rtx6000-ada-2q``: a vGPU type as part of a DNS-label device name."""
    return re.sub(r"[^a-z0-9-]+", "-", type_name.lower()).strip("-")


class DeviceSpec(NamedTuple):
    """One vGPU the node offers: a DRA device in the node's pool."""

    name: str
    gpu: str  # PCI address of the physical GPU
    gpu_index: int
    type_name: str
    framework: str  # mdev or vendor-vfio
    framebuffer_gb: float
    mixed: bool  # the GPU mixes framebuffer sizes: the device consumes from counter_set
    attributes: dict[str, dict[str, Any]]
    uses_vf: bool = False  # mixed, and each vGPU of the GPU takes a VF: consumes one of the set's vfs

    @property
    def counter_set(self) -> str | None:
        return counter_set_name(self.gpu_index) if self.mixed else None

    def to_api(self) -> dict[str, Any]:
        device: dict[str, Any] = {
            "name": self.name,
            "attributes": self.attributes,
            "capacity": {FRAMEBUFFER: {"value": quantity(self.framebuffer_gb)}},
        }
        if self.mixed:
            counters: dict[str, Any] = {FRAMEBUFFER: {"value": quantity(self.framebuffer_gb)}}
            if self.uses_vf:
                counters[VFS] = {"value": "1"}
            device["consumesCounters"] = [{"counterSet": self.counter_set, "counters": counters}]
        return device

    @classmethod
    def from_api(cls, device: dict[str, Any]) -> DeviceSpec | None:
        """A device this driver published earlier (read back from a ResourceSlice), or None."""
        attrs = device.get("attributes") or {}

        def value(key: str, kind: str):
            return (attrs.get(key) or {}).get(kind)

        gpu, index, type_name = value(PCI_BUS_ID, "string"), value("gpuIndex", "int"), value("type", "string")
        if not (gpu and type_name and isinstance(index, int)):
            return None
        fb = (value("framebufferMiB", "int") or 512) / 1024
        consumes = device.get("consumesCounters") or []
        return cls(
            device["name"],
            gpu,
            index,
            type_name,
            value("framework", "string") or "",
            fb,
            bool(consumes),
            attrs,
            any(VFS in (c.get("counters") or {}) for c in consumes),
        )


def counter_set_name(gpu_index: int) -> str:
    return f"gpu-{gpu_index}-framebuffer"


class CounterSetSpec(NamedTuple):
    """The framebuffer (and VFs) of one mixed-size GPU, shared by its devices."""

    gpu: str
    gpu_index: int
    framebuffer_gb: float
    vfs: int | None = None  # the GPU's VFs, when each of its vGPUs takes one

    @property
    def name(self) -> str:
        return counter_set_name(self.gpu_index)

    def to_api(self) -> dict[str, Any]:
        counters: dict[str, Any] = {FRAMEBUFFER: {"value": quantity(self.framebuffer_gb)}}
        if self.vfs is not None:
            counters[VFS] = {"value": str(self.vfs)}
        return {"name": self.name, "counters": counters}


class NodeOffer(NamedTuple):
    """Everything the node offers, in GPU order, plus why some GPUs offer nothing."""

    devices: tuple[DeviceSpec, ...] = ()
    counter_sets: tuple[CounterSetSpec, ...] = ()
    problems: tuple[str, ...] = ()

    def by_name(self) -> dict[str, DeviceSpec]:
        return {d.name: d for d in self.devices}

    def gpus(self) -> set[str]:
        return {d.gpu for d in self.devices}


def _model_name(gpu) -> str:
    from vgpu_dm import catalog

    entry = catalog.for_device(gpu.device_id)
    return entry.name if entry else str(gpu.device_id)


def mixed_size_count(type_gb: float, maximum: int, gpu_gb: float | None, arch: str) -> int:
    """How many vGPUs of a type fit in mixed-size mode: its placements (module doc)."""
    if type_gb < 1 or maximum < 1:
        return 0  # placementSize = whole GB: a 512 MB type has no placement
    count = 1 << (maximum.bit_length() - 1)
    if type_gb == 1 and gpu_gb == 48:
        count -= 2 if arch == "Ampere" else 16  # the deny lists of 1 GB placements on 48 GB boards
    return max(count, 0)


def gpu_devices(offer: GPUOffer) -> tuple[list[DeviceSpec], CounterSetSpec | None, list[str]]:
    """The devices (and counter set) of one GPU's checked offer, and notes on counts cut down."""
    from vgpu_dm import catalog

    gpu = offer.gpu
    model = _model_name(gpu)[:64]
    entry = catalog.for_device(gpu.device_id)
    arch = entry.arch if entry else ""
    uses_vf = offer.mixed and bool(gpu.vfs)
    devices = []
    notes = []
    for otype in offer.types:
        count = otype.count
        if offer.mixed:
            maximum = catalog.max_instances(otype.name, gpu.device_id) or otype.count
            fits = mixed_size_count(otype.framebuffer_gb, maximum, offer.framebuffer_gb, arch)
            if fits < count:
                notes.append(
                    f"{gpu.describe()}: offers {fits} x {otype.name}, not {count}: in mixed-size mode the "
                    f"driver places each vGPU at fixed positions, which hold at most {fits} of them"
                )
                count = fits
        for n in range(count):
            attrs = {
                "type": {"string": otype.name},
                "series": {"string": otype.name[-1]},
                "framework": {"string": offer.framework},
                PCI_BUS_ID: {"string": gpu.address},
                "gpuIndex": {"int": gpu.index},
                "model": {"string": model},
                **({"numaNode": {"int": gpu.numa_node}} if gpu.numa_node is not None else {}),
                "framebufferMiB": {"int": round(otype.framebuffer_gb * 1024)},
                "mixedSize": {"bool": offer.mixed},
            }
            name = f"gpu{gpu.index}-{slug(otype.name)}-{n}"
            devices.append(
                DeviceSpec(
                    name,
                    gpu.address,
                    gpu.index,
                    otype.name,
                    offer.framework,
                    otype.framebuffer_gb,
                    offer.mixed,
                    attrs,
                    uses_vf,
                )
            )
    counters = None
    if offer.mixed:
        if offer.framebuffer_gb is None:
            raise PlanError(
                [
                    f"{gpu.describe()}: the GPU's framebuffer size is unknown, so its mixed sizes "
                    f"cannot be shared out through a counter set"
                ]
            )
        counters = CounterSetSpec(
            gpu.address, gpu.index, offer.framebuffer_gb, len(gpu.vfs) if uses_vf else None
        )
    return devices, counters, notes


def build_offer(
    entries: tuple[ConfigEntry, ...], inventory: Inventory, refuse: dict[str, str] | None = None
) -> tuple[NodeOffer, dict[str, GPUOffer]]:
    """What the selected config's entries let this node offer. A GPU whose layout cannot be offered (an
    unsupported type, MIG-backed types, a count that does not fit) or that ``refuse`` names (address →
    why) offers nothing, and the reason is in ``problems``; the other GPUs are offered as usual."""
    refuse = refuse or {}
    devices: list[DeviceSpec] = []
    counters: list[CounterSetSpec] = []
    problems: list[str] = []
    offers: dict[str, GPUOffer] = {}
    chosen = governing_entries(entries, inventory.gpus)
    for gpu in inventory.gpus:
        entry = chosen.get(gpu.index)
        if entry is None or not entry.vgpu_devices:
            continue
        if gpu.address in refuse:
            problems.append(f"{gpu.describe()}: {refuse[gpu.address]}")
            continue
        try:
            offer = check_offer(gpu, entry, inventory)
            found, counter_set, notes = gpu_devices(offer)
            problems.extend(notes)
        except PlanError as exc:
            problems.extend(exc.problems)
            continue
        except HostError as exc:
            problems.append(f"{gpu.describe()}: {exc}")
            continue
        offers[gpu.address] = offer
        devices.extend(found)
        if counter_set is not None:
            counters.append(counter_set)
    return NodeOffer(tuple(devices), tuple(counters), tuple(problems)), offers
