"""The vendor-specific VFIO backend (vGPU 17+): one vGPU per SR-IOV VF, set through the VF's
``nvidia/current_vgpu_type`` (type id to create, 0 to remove), with ``nvidia/creatable_vgpu_types``
listing what the VF can take right now.
"""

from __future__ import annotations

import re

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.model import VENDOR_VFIO, TypeInfo, VGPUDevice, framebuffer_of
from vgpu_dm.host.pci import GPU, PCI_DEVICES, is_pci_address
from vgpu_dm.host.root import HostRoot, note_change
from vgpu_dm.vgpu_type import short_type_name

# Where learned type id → name tables are kept: creatable lists stop naming a type once the GPU is full.
LEARNED_DIR = "var/lib/nvidia-vgpu-dm/types"
UNRESOLVED = -1
_HETERO_CAPABLE = r"(?i)Heterogen\w*\s+Multi-vGPU\s*:\s*(\w+)"
_HETERO_MODE = r"(?i)vGPU Heterogeneous Mode\s*:\s*(\w+)"

_log = log.get("vfio")


def parse_creatable(text: str) -> dict[int, str]:
    """``creatable_vgpu_types`` → {type id: driver name}; tolerates the header, blank and odd lines."""
    types: dict[int, str] = {}
    for line in text.splitlines():
        ident, sep, name = line.partition(":")
        ident = ident.strip()
        if not sep or not (ident.isascii() and ident.isdigit()):
            continue  # the "ID : vGPU Name" header, blank lines
        types[int(ident)] = name.strip()
    return types


def parse_smi_supported(text: str) -> dict[int, str]:
    """``nvidia-smi vgpu -s -v`` → {type id: name}; each ``vGPU Type ID : 0x…`` precedes its ``Name``."""
    types: dict[int, str] = {}
    pending: int | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "vGPU Type ID":
            try:
                pending = int(value, 16)
            except ValueError:
                pending = None
        elif key == "Name" and pending is not None:
            types[pending] = value
            pending = None
    return types


class VendorVfioBackend:
    """vGPUs on VFs bound to ``nvidia`` that expose ``nvidia/current_vgpu_type``."""

    framework = VENDOR_VFIO

    def __init__(self, host: HostRoot, gpus: list[GPU], sriov_manage: str, nvidia_smi: str = "nvidia-smi"):
        self.host = host
        self.sriov_manage = sriov_manage
        self.nvidia_smi = nvidia_smi
        self._current: dict[str, int] = {}  # VF → current type id
        self._names: dict[str, dict[int, str]] = {}  # GPU → learned id → driver name
        self._handles: dict[str, bool] = {}
        self._types: dict[str, dict[str, TypeInfo]] = {}
        self._smi_asked: set[str] = set()

    # -- detection -------------------------------------------------------------------------------
    def handles(self, gpu: GPU) -> bool:
        if gpu.address not in self._handles:
            self._handles[gpu.address] = bool(gpu.vfs) and self.host.exists(
                f"{PCI_DEVICES}/{gpu.vfs[0]}/nvidia/current_vgpu_type"
            )
        return self._handles[gpu.address]

    def needs_vfs(self, gpu: GPU) -> bool:
        """An SR-IOV GPU on the nvidia driver with no VFs yet: vendor VFIO once sriov-manage enables them."""
        return gpu.sriov_capable and not gpu.vfs and gpu.driver == "nvidia"

    # -- reading ---------------------------------------------------------------------------------
    def _vf_type(self, vf: str) -> int:
        if vf not in self._current:
            text = self.host.read_optional(f"{PCI_DEVICES}/{vf}/nvidia/current_vgpu_type") or "0"
            try:
                self._current[vf] = int(text.strip() or 0)
            except ValueError:
                raise HostError(f"{vf}: unreadable current_vgpu_type {text.strip()!r}") from None
        return self._current[vf]

    def _learned(self, gpu: GPU) -> dict[int, str]:
        if gpu.address not in self._names:
            text = self.host.read_optional(f"{LEARNED_DIR}/{gpu.address}.json")
            names: dict[int, str] = {}
            if text:
                import json

                try:
                    names = {int(k): str(v) for k, v in json.loads(text).items()}
                except (ValueError, AttributeError):
                    names = {}
            self._names[gpu.address] = names
        return self._names[gpu.address]

    def _learn(self, gpu: GPU, found: dict[int, str]) -> None:
        names = self._learned(gpu)
        if all(names.get(k) == v for k, v in found.items()):
            return
        names.update(found)
        import json

        self.host.save_state(f"{LEARNED_DIR}/{gpu.address}.json", json.dumps(names, sort_keys=True))

    def _creatable(self, vf: str) -> dict[int, str]:
        return parse_creatable(
            self.host.read_optional(f"{PCI_DEVICES}/{vf}/nvidia/creatable_vgpu_types") or ""
        )

    def _name_of(self, gpu: GPU, type_id: int) -> str:
        name = self._learned(gpu).get(type_id)
        if name is None:
            # Creatable lists on free VFs may still name it (equal-size mode lists the same size).
            for vf in gpu.vfs:
                if self._vf_type(vf) == 0:
                    found = self._creatable(vf)
                    self._learn(gpu, found)
                    if type_id in found:
                        break
            name = self._learned(gpu).get(type_id)
        if name is None:
            self._learn(gpu, self._smi_types(gpu))
            name = self._learned(gpu).get(type_id)
        return short_type_name(name) if name else f"type-{type_id}"

    def _smi_types(self, gpu: GPU) -> dict[int, str]:
        """Every type of the GPU from ``nvidia-smi vgpu -s -v`` (ids in hex there), or {} if unavailable.

        The driver's list of supported types does not shrink as the GPU fills, unlike creatable lists.
        """
        if gpu.address in self._smi_asked:
            return {}
        self._smi_asked.add(gpu.address)
        try:
            proc = self._run([self.nvidia_smi, "vgpu", "-s", "-v", "-i", gpu.address])
        except HostError:
            return {}
        if proc.returncode != 0:
            return {}
        return parse_smi_supported(proc.stdout)

    def devices(self, gpu: GPU) -> list[VGPUDevice]:
        if not self.handles(gpu):
            return []
        found = []
        for vf in gpu.vfs:
            type_id = self._vf_type(vf)
            if type_id:
                found.append(
                    VGPUDevice(
                        gpu=gpu.address,
                        parent=vf,
                        type_name=self._name_of(gpu, type_id),
                        type_id=type_id,
                        framework=VENDOR_VFIO,
                    )
                )
        return found

    def types(self, gpu: GPU) -> dict[str, TypeInfo]:
        """Types offered now on the GPU's free VFs, plus types learned earlier (available 0)."""
        if gpu.address in self._types:
            return self._types[gpu.address]
        offered: dict[int, int] = {}
        for vf in gpu.vfs:
            if self._vf_type(vf):
                continue
            found = self._creatable(vf)
            self._learn(gpu, found)
            for type_id in found:
                offered[type_id] = offered.get(type_id, 0) + 1
        result: dict[str, TypeInfo] = {}
        for type_id, full in self._learned(gpu).items():
            short = short_type_name(full)
            result[short] = TypeInfo(short, type_id, full, offered.get(type_id, 0))
        self._types[gpu.address] = result
        return result

    def framebuffer_gb(self, gpu: GPU) -> int | None:
        """The GPU's framebuffer: from the catalog, else implied by the largest type it offers."""
        from vgpu_dm import catalog

        entry = catalog.for_device(gpu.device_id)
        if entry:
            return entry.framebuffer_gb
        sizes = [framebuffer_of(name) or 0 for name in self.types(gpu)]
        return max(sizes) or None if sizes else None

    def capacity(self, gpu: GPU, vtype: TypeInfo, current: list[VGPUDevice]) -> int | None:
        from vgpu_dm import catalog

        known = catalog.max_instances(vtype.name)
        if known is not None:
            return known
        fb, size = self.framebuffer_gb(gpu), framebuffer_of(vtype.name)
        if fb is None or size is None:
            return None
        return fb * 2 if size == 0 else fb // size

    def slots(self, gpu: GPU) -> int | None:
        return len(gpu.vfs) or gpu.sriov_totalvfs

    # -- mixed-size mode ---------------------------------------------------------------------------
    def mixed_size(self, gpu: GPU) -> tuple[bool, bool]:
        """(supported, enabled) for heterogeneous time-sliced vGPUs, from ``nvidia-smi -q``."""
        proc = self._run([self.nvidia_smi, "-q", "-i", gpu.address])
        if proc.returncode != 0:
            raise HostError(
                f"{gpu.describe()}: 'nvidia-smi -q' failed: {(proc.stderr or proc.stdout).strip()}"
            )
        capable = re.search(_HETERO_CAPABLE, proc.stdout)
        mode = re.search(_HETERO_MODE, proc.stdout)
        return (
            bool(capable and capable[1].lower() == "supported"),
            bool(mode and mode[1].lower() == "enabled"),
        )

    def set_mixed_size(self, gpu: GPU, enabled: bool) -> None:
        verb, action = ("enabling", "mixed-size-on") if enabled else ("disabling", "mixed-size-off")
        _log.info(
            f"{gpu.describe()}: {verb} mixed-size (heterogeneous) vGPU mode",
            extra=log.fields(gpu=gpu.index, address=gpu.address, action=action),
        )
        note_change()
        proc = self._run([self.nvidia_smi, "vgpu", "-i", gpu.address, "-shm", "1" if enabled else "0"])
        if proc.returncode != 0:
            raise HostError(
                f"{gpu.describe()}: could not {'enable' if enabled else 'disable'} mixed-size vGPU mode "
                f"(nvidia-smi exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
            )

    # -- writing ---------------------------------------------------------------------------------
    def _run(self, argv: list[str]):
        try:
            return self.host.run(argv)
        except FileNotFoundError:
            raise HostError(f"{argv[0]} not found on the host") from None

    def enable_vfs(self, gpu: GPU) -> None:
        """Run ``sriov-manage -e <PF>`` (never through a shell; the address is checked first)."""
        if not is_pci_address(gpu.address):
            raise HostError(f"refusing to pass {gpu.address!r} to sriov-manage: not a PCI address")
        if not self.host.exists(self.sriov_manage.lstrip("/")):
            where = self.host.path(self.sriov_manage)
            raise HostError(
                f"{gpu.describe()} has no VFs and sriov-manage was not found at {where}; enable them "
                f"yourself ('/usr/lib/nvidia/sriov-manage -e {gpu.address}') or point --sriov-manage at it "
                f"(containerised drivers: /run/nvidia/driver/usr/lib/nvidia/sriov-manage)"
            )
        _log.info(f"{gpu.describe()}: enabling SR-IOV virtual functions (sriov-manage -e {gpu.address})")
        note_change()
        proc = self._run([self.sriov_manage, "-e", gpu.address])
        if proc.returncode != 0:
            raise HostError(
                f"{gpu.describe()}: 'sriov-manage -e {gpu.address}' failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()} — if it says 'Cannot obtain unbindLock', stop the "
                f"NVML clients (nvidia-smi, DCGM, dcgm-exporter) using the GPU and retry"
            )

    def remove(self, device: VGPUDevice) -> None:
        self.host.write_text(f"{PCI_DEVICES}/{device.parent}/nvidia/current_vgpu_type", "0")
        self._current[device.parent] = 0
        self._types.pop(device.gpu, None)

    def create(
        self, gpu: GPU, vtype: TypeInfo, ordinal: int = 0, uuid: str | None = None, parent: str | None = None
    ) -> VGPUDevice:
        """Set ``vtype`` on the first free VF whose creatable list offers it (or on ``parent``)."""
        type_id = vtype.type_id
        for vf in [parent] if parent else gpu.vfs:
            if self._vf_type(vf):
                continue
            if parent and type_id != UNRESOLVED:
                # Restoring a known type onto a known VF: the driver's answer to the write decides, so a
                # list we cannot read (EIO) does not stop a rollback.
                found = {type_id: vtype.driver_name}
            else:
                # Lists shrink as siblings are assigned: re-read right before writing.
                found = self._creatable(vf)
                self._learn(gpu, found)
            if type_id == UNRESOLVED:
                type_id = next((i for i, n in found.items() if short_type_name(n) == vtype.name), UNRESOLVED)
            if type_id not in found:
                continue
            self.host.write_text(f"{PCI_DEVICES}/{vf}/nvidia/current_vgpu_type", str(type_id))
            self._current[vf] = type_id
            self._types.pop(gpu.address, None)
            return VGPUDevice(
                gpu=gpu.address, parent=vf, type_name=vtype.name, type_id=type_id, framework=VENDOR_VFIO
            )
        raise HostError(f"{gpu.describe()}: no free virtual function offers {vtype.name} any more")
