"""The mdev backend: parents in ``sys/class/mdev_bus``, types in ``mdev_supported_types``, devices in
``sys/bus/mdev/devices``; create by writing a UUID, remove by writing 1.
"""

from __future__ import annotations

import os
import re

from vgpu_dm.errors import HostError
from vgpu_dm.host.model import MDEV, TypeInfo, VGPUDevice, framebuffer_of
from vgpu_dm.host.pci import GPU, PCI_DEVICES, link_name
from vgpu_dm.host.programs import HostTools, Programs
from vgpu_dm.host.root import HostRoot
from vgpu_dm.vgpu_type import InvalidVGPUType, VGPUType, short_type_name

MDEV_BUS = "sys/class/mdev_bus"
MDEV_DEVICES = "sys/bus/mdev/devices"
# The kernel names a type directory "<parent's driver>-<type id>": nvidia-575 normally, vfio-pci-575 on
# a VF bound to vfio-pci (seen on a real A40 host). The prefix says nothing about the vendor.
_TYPE_DIR = r"([a-z0-9_.-]+)-(\d+)"
_MAX_INSTANCE = r"max_instance=(\d+)"


class MdevBackend:
    """mdev devices of all GPUs, read once when first needed."""

    framework = MDEV

    def __init__(self, host: HostRoot, gpus: list[GPU], programs: Programs | None = None):
        self.host = host
        self.programs = programs or Programs(host, HostTools())
        self._pf_of: dict[str, str] = {}
        for gpu in gpus:
            self._pf_of[gpu.address] = gpu.address
            for vf in gpu.vfs:
                self._pf_of[vf] = gpu.address
        self._parents: dict[str, list[str]] | None = None
        self._devices: dict[str, list[VGPUDevice]] | None = None
        self._names: dict[tuple[str, int], str] = {}
        self._types: dict[str, dict[str, TypeInfo]] = {}
        self._type_dirs: dict[tuple[str, str], str] = {}
        self._full: set[tuple[str, str]] = set()  # (parent, type) seen with no room since the last removal

    # -- reading ---------------------------------------------------------------------------------
    def _load_parents(self) -> dict[str, list[str]]:
        if self._parents is None:
            parents: dict[str, list[str]] = {}
            for parent in self.host.listdir(MDEV_BUS):
                parents.setdefault(self._pf_of.get(parent, parent), []).append(parent)
            self._parents = parents
        return self._parents

    def parents(self, gpu: GPU) -> list[str]:
        return self._load_parents().get(gpu.address, [])

    def handles(self, gpu: GPU) -> bool:
        return bool(self.parents(gpu))

    def _type_name(self, gpu: str, parent: str, type_dir: str) -> str | None:
        """Short vGPU type name of a type directory, or None when it is not an NVIDIA vGPU type."""
        key = (gpu, int(type_dir.rsplit("-", 1)[1]))
        if key not in self._names:
            text = self.host.read_optional(f"{PCI_DEVICES}/{parent}/mdev_supported_types/{type_dir}/name")
            self._names[key] = _vgpu_name(text, type_dir)
        return self._names[key]

    def _load_devices(self) -> dict[str, list[VGPUDevice]]:
        if self._devices is not None:
            return self._devices
        found: dict[str, list[VGPUDevice]] = {}
        for uuid in self.host.listdir(MDEV_DEVICES):
            target = self.host.readlink(f"{MDEV_DEVICES}/{uuid}")
            if not target:
                continue
            parent = os.path.basename(os.path.dirname(target.rstrip("/")))
            type_dir = link_name(self.host, f"{MDEV_DEVICES}/{uuid}/mdev_type") or ""
            m = re.fullmatch(_TYPE_DIR, type_dir)
            gpu = self._pf_of.get(parent)
            if not m or gpu is None:
                continue  # not on a function of an NVIDIA GPU
            name = self._type_name(gpu, parent, type_dir)
            if name is None:
                continue  # another vendor's mdev type on an NVIDIA function (not seen, but not ours)
            group = link_name(self.host, f"{MDEV_DEVICES}/{uuid}/iommu_group")
            type_id = int(m[2])
            found.setdefault(gpu, []).append(
                VGPUDevice(
                    gpu=gpu,
                    parent=parent,
                    type_name=name,
                    type_id=type_id,
                    framework=MDEV,
                    uuid=uuid,
                    iommu_group=int(group) if group and group.isdigit() else None,
                )
            )
        for devices in found.values():
            devices.sort(key=lambda d: (d.parent, d.uuid or ""))
        self._devices = found
        return found

    def devices(self, gpu: GPU) -> list[VGPUDevice]:
        return list(self._load_devices().get(gpu.address, []))

    def types(self, gpu: GPU) -> dict[str, TypeInfo]:
        """Types the GPU's parents offer, with ``available`` summed over parents (read now)."""
        if gpu.address in self._types:
            return self._types[gpu.address]
        totals: dict[str, list] = {}
        seen: set[int] = set()
        for parent in self.parents(gpu):
            base = f"{PCI_DEVICES}/{parent}/mdev_supported_types"
            for type_dir in self.host.listdir(base):
                m = re.fullmatch(_TYPE_DIR, type_dir)
                if not m:
                    continue
                type_id = int(m[2])
                if type_id not in seen:  # name and description are the same on every parent
                    seen.add(type_id)
                    full = (self.host.read_optional(f"{base}/{type_dir}/name") or "").strip()
                    short = _vgpu_name(full, type_dir)
                    self._names[(gpu.address, type_id)] = short
                    if short is None:
                        continue
                    full = full or short
                    desc = self.host.read_optional(f"{base}/{type_dir}/description") or ""
                    mi = re.search(_MAX_INSTANCE, desc)
                    totals[short] = [type_id, full or short, 0, int(mi[1]) if mi else None]
                name = self._names[(gpu.address, type_id)]
                if name is None:
                    continue
                totals[name][2] += _to_int(self.host.read_optional(f"{base}/{type_dir}/available_instances"))
                self._type_dirs[(parent, name)] = type_dir
        result = {
            name: TypeInfo(name=name, type_id=tid, driver_name=full, available=avail, max_instances=mi)
            for name, (tid, full, avail, mi) in totals.items()
        }
        self._types[gpu.address] = result
        return result

    def slots(self, gpu: GPU) -> int | None:
        """How many vGPUs the GPU can hold at most because of its parents (one per VF)."""
        parents = self.parents(gpu)
        if parents and parents != [gpu.address]:
            return len(parents)
        return None

    def capacity(self, gpu: GPU, vtype: TypeInfo, current: list[VGPUDevice]) -> int | None:
        """Max devices of ``vtype`` this GPU holds once the devices of other types are gone."""
        same = [d for d in current if d.type_name == vtype.name]
        single_pf_parent = self.parents(gpu) == [gpu.address]
        if single_pf_parent and len(same) == len(current):
            # Exact: on a PF parent holding only this type (or nothing), available_instances counts
            # what still fits. Other types may zero it (drivers with one type per GPU), so not then.
            return vtype.available + len(same)
        if vtype.max_instances is not None:
            return vtype.max_instances
        from vgpu_dm import catalog

        return catalog.max_instances(vtype.name, gpu.device_id)

    def framebuffer_gb(self, gpu: GPU) -> int | None:
        """The GPU's framebuffer: from the catalog, else implied by the largest type it offers."""
        from vgpu_dm import catalog

        entry = catalog.for_device(gpu.device_id)
        if entry:
            return entry.framebuffer_gb
        sizes = [framebuffer_of(name) or 0 for name in self.types(gpu)]
        return (max(sizes) or None) if sizes else None

    # -- mixed-size mode ---------------------------------------------------------------------------
    # Mixed sizes exist on mdev hosts too (a V100 on driver 580 ran 1Q + 2Q with the mode enabled);
    # nvidia-smi reports and switches the mode the same way as on vendor-VFIO hosts.
    def mixed_size(self, gpu: GPU) -> tuple[bool, bool]:
        return self.programs.smi.mixed_size(gpu)

    def set_mixed_size(self, gpu: GPU, enabled: bool) -> None:
        self.programs.smi.set_mixed_size(gpu, enabled)

    # -- writing ---------------------------------------------------------------------------------
    def remove(self, device: VGPUDevice) -> None:
        self.host.write_text(f"{MDEV_DEVICES}/{device.uuid}/remove", "1")
        self._full.clear()

    def create(
        self, gpu: GPU, vtype: TypeInfo, ordinal: int = 0, uuid: str | None = None, parent: str | None = None
    ) -> VGPUDevice:
        """Create one device of ``vtype`` on the first parent with room (or on ``parent``, to restore one)."""
        self.types(gpu)
        for candidate in [parent] if parent else self.parents(gpu):
            type_dir = self._type_dirs.get((candidate, vtype.name))
            if type_dir is None or (candidate, vtype.name) in self._full:
                continue
            base = f"{PCI_DEVICES}/{candidate}/mdev_supported_types/{type_dir}"
            if _to_int(self.host.read_optional(f"{base}/available_instances")) <= 0:
                # Creating never frees room, so skip this parent for the rest of the run (reads stay linear).
                self._full.add((candidate, vtype.name))
                continue
            new = uuid or _random_uuid()
            self.host.write_text(f"{base}/create", new)
            return VGPUDevice(
                gpu=gpu.address,
                parent=candidate,
                type_name=vtype.name,
                type_id=vtype.type_id,
                framework=MDEV,
                uuid=new,
            )
        raise HostError(f"{gpu.describe()}: no parent device has room for another {vtype.name}")


def _vgpu_name(text: str | None, type_dir: str) -> str | None:
    """The short vGPU type name from a type's ``name`` (``NVIDIA A40-24A`` → ``A40-24A``).

    Decided by the name, not the directory prefix. ``name`` is optional in the mdev ABI: without one,
    only an ``nvidia-<id>`` directory is taken to be an NVIDIA type, under that directory name.
    """
    short = short_type_name(text or "")
    if short:
        try:
            VGPUType.parse(short)
        except InvalidVGPUType:
            return None
        return short
    return type_dir if type_dir.startswith("nvidia-") else None


def _to_int(text: str | None) -> int:
    try:
        return int((text or "0").strip())
    except ValueError:
        return 0


def _random_uuid() -> str:
    import uuid  # only creating needs it (it pulls in platform, which costs start-up)

    return str(uuid.uuid4())
