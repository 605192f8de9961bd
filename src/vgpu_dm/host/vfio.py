"""The vendor-specific VFIO backend (vGPU 17+): one vGPU per SR-IOV VF, set through the VF's
``nvidia/current_vgpu_type`` (type id to create, 0 to remove), with ``nvidia/creatable_vgpu_types``
listing what the VF can take right now.
"""

from __future__ import annotations

import time

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.model import UNRESOLVED, VENDOR_VFIO, TypeInfo, VGPUDevice, framebuffer_of
from vgpu_dm.host.pci import GPU, PCI_DEVICES, is_pci_address, link_name
from vgpu_dm.host.programs import Programs
from vgpu_dm.host.root import HostRoot, note_change
from vgpu_dm.state_files import LEARNED_DIR
from vgpu_dm.vgpu_type import short_type_name

DRIVER_VERSION = "sys/module/nvidia/version"
# sriov-manage: how often to retry "Cannot obtain unbindLock" (usually a passing NVML client), the
# pause between tries, and how long to wait for the new VFs' nvidia/ directories afterwards.
UNBIND_RETRIES = 3
VF_POLL = 0.2

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


class VendorVfioBackend:
    """vGPUs on VFs bound to ``nvidia`` that expose ``nvidia/current_vgpu_type``."""

    framework = VENDOR_VFIO

    def __init__(self, host: HostRoot, gpus: list[GPU], programs: Programs, writable: bool = False):
        self.host = host
        self.programs = programs
        self.sriov_manage = programs.tools.sriov_manage
        # Only apply writes the learned tables; list and assert read them and learn in memory only.
        self.writable = writable
        self._current: dict[str, int] = {}  # VF → current type id
        self._names: dict[str, dict[int, str]] = {}  # GPU → learned id → driver name
        self._handles: dict[str, bool] = {}
        self._types: dict[str, dict[str, TypeInfo]] = {}
        self._smi_asked: set[str] = set()
        self.smi_errors: dict[str, str] = {}  # GPU → why nvidia-smi could not name its types
        self._driver_version: str | None = None

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

    def learned_vendor_vfio(self, gpu: GPU) -> bool:
        """Apply learned a type table on this GPU's vendor-VFIO VFs under this driver release (tables are
        kept only for them): its VFs are vendor-VFIO ones, also while they are off (after a reboot)."""
        return bool(self._learned(gpu))

    # -- reading ---------------------------------------------------------------------------------
    def _vf_type(self, vf: str) -> int:
        if vf not in self._current:
            text = self.host.read_optional(f"{PCI_DEVICES}/{vf}/nvidia/current_vgpu_type") or "0"
            try:
                self._current[vf] = int(text.strip() or 0)
            except ValueError:
                raise HostError(f"{vf}: unreadable current_vgpu_type {text.strip()!r}") from None
        return self._current[vf]

    def _table_key(self, gpu: GPU) -> dict[str, str | None]:
        """What a learned table is valid for: type ids belong to a GPU model and a driver release."""
        if self._driver_version is None:
            self._driver_version = (self.host.read_optional(DRIVER_VERSION) or "").strip()
        return {
            "gpu": gpu.address,
            "device_id": str(gpu.device_id),
            "driver_version": self._driver_version or None,
        }

    def _learned(self, gpu: GPU) -> dict[int, str]:
        if gpu.address not in self._names:
            text = self.host.read_optional(f"{LEARNED_DIR}/{gpu.address}.json")
            names: dict[int, str] = {}
            if text:
                import json

                try:
                    raw = json.loads(text)
                    if raw.get("key") == self._table_key(gpu):
                        names = {int(k): str(v) for k, v in raw["types"].items()}
                    else:
                        # Another GPU in this slot, another driver, or an old unkeyed table: ignore it.
                        _log.debug(f"{gpu.describe()}: learned type table does not match; ignored")
                except (ValueError, AttributeError, KeyError, TypeError):
                    names = {}
            self._names[gpu.address] = names
        return self._names[gpu.address]

    def _learn(self, gpu: GPU, found: dict[int, str]) -> None:
        names = self._learned(gpu)
        if all(names.get(k) == v for k, v in found.items()):
            return
        names.update(found)
        if self.writable:
            import json

            table = {"key": self._table_key(gpu), "types": {str(k): v for k, v in sorted(names.items())}}
            self.host.save_state(f"{LEARNED_DIR}/{gpu.address}.json", json.dumps(table, indent=1))

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
            return self.programs.smi.supported_types(gpu)
        except HostError as exc:
            self.smi_errors[gpu.address] = str(exc)
            return {}

    def devices(self, gpu: GPU) -> list[VGPUDevice]:
        if not self.handles(gpu):
            return []
        found = []
        for vf in gpu.vfs:
            type_id = self._vf_type(vf)
            if type_id:
                # The VF's own IOMMU group (what /dev/vfio/<group> a VM opens), as for an mdev.
                group = link_name(self.host, f"{PCI_DEVICES}/{vf}/iommu_group")
                found.append(
                    VGPUDevice(
                        gpu=gpu.address,
                        parent=vf,
                        type_name=self._name_of(gpu, type_id),
                        type_id=type_id,
                        framework=VENDOR_VFIO,
                        iommu_group=int(group) if group and group.isdigit() else None,
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

        known = catalog.max_instances(vtype.name, gpu.device_id)
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
        """(supported, enabled) for heterogeneous time-sliced vGPUs, from the GPU's nvidia-smi -q block."""
        return self.programs.smi.mixed_size(gpu)

    def set_mixed_size(self, gpu: GPU, enabled: bool) -> None:
        self.programs.smi.set_mixed_size(gpu, enabled)

    # -- writing ---------------------------------------------------------------------------------
    def enable_vfs(self, gpu: GPU) -> None:
        """Run ``sriov-manage -e <PF>`` (never through a shell; the address is checked first), retry a
        transient ``Cannot obtain unbindLock``, then wait for the VFs' ``nvidia/`` directories."""
        if not is_pci_address(gpu.address):
            raise HostError(f"refusing to pass {gpu.address!r} to sriov-manage: not a PCI address")
        found = self.programs.locate(self.sriov_manage)
        if not found.found:
            raise HostError(
                f"{gpu.describe()} has no VFs and sriov-manage was not found (looked for "
                f"{self.sriov_manage} in {found.places()}); enable them yourself "
                f"('/usr/lib/nvidia/sriov-manage -e {gpu.address}'), or name the driver's root "
                f"(nvidia-vgpu-dm --driver-root; --driver-root-ctr-path of nvidia-k8s-vgpu-dm and "
                f"nvidia-vgpu-dra) or the script (nvidia-vgpu-dm --sriov-manage PATH)"
            )
        _log.info(f"{gpu.describe()}: enabling SR-IOV virtual functions (sriov-manage -e {gpu.address})")
        argv = [self.sriov_manage, "-e", gpu.address]
        note_change()
        for attempt in range(1, UNBIND_RETRIES + 1):
            proc = self.programs.run(argv, "sriov-manage")
            output = "\n".join(x.strip() for x in (proc.stdout, proc.stderr) if x and x.strip())
            if proc.returncode == 0:
                break
            if "unbindLock" in output and attempt < UNBIND_RETRIES:
                _log.warning(
                    f"{gpu.describe()}: sriov-manage could not obtain the driver's unbind lock "
                    f"(try {attempt} of {UNBIND_RETRIES}); retrying in {self.programs.tools.unbind_pause:g} s"
                )
                time.sleep(self.programs.tools.unbind_pause)
                continue
            hint = (
                " — stop the NVML clients (nvidia-smi, DCGM, dcgm-exporter) using the GPU and retry"
                if "unbindLock" in output
                else ""
            )
            raise HostError(
                f"{gpu.describe()}: 'sriov-manage -e {gpu.address}' failed (exit {proc.returncode}): "
                f"{output or 'no output'}{hint}"
            )
        self._wait_for_vfs(gpu, output)

    def disable_vfs(self, gpu: GPU) -> None:
        """Run ``sriov-manage -d <PF>`` and wait until the VFs are gone (a MIG mode change needs them off,
        host-interfaces.md 3.6). The caller has removed their vGPUs."""
        if not is_pci_address(gpu.address):
            raise HostError(f"refusing to pass {gpu.address!r} to sriov-manage: not a PCI address")
        _log.info(f"{gpu.describe()}: disabling SR-IOV virtual functions (sriov-manage -d {gpu.address})")
        note_change()
        proc = self.programs.run([self.sriov_manage, "-d", gpu.address], "sriov-manage")
        said = "\n".join(x.strip() for x in (proc.stdout, proc.stderr) if x and x.strip())
        if proc.returncode != 0:
            raise HostError(
                f"{gpu.describe()}: 'sriov-manage -d {gpu.address}' failed (exit {proc.returncode}): "
                f"{said or 'no output'}"
            )
        deadline = time.monotonic() + self.programs.tools.vf_wait
        while any(e.startswith("virtfn") for e in self.host.listdir(f"{PCI_DEVICES}/{gpu.address}")):
            if time.monotonic() >= deadline:
                raise HostError(
                    f"{gpu.describe()}: its virtual functions are still there "
                    f"{self.programs.tools.vf_wait:g} s "
                    f"after sriov-manage -d"
                )
            time.sleep(VF_POLL)

    def _wait_for_vfs(self, gpu: GPU, output: str) -> None:
        """sriov-manage may return before the VFs' control files exist, or exit 0 having made no
        VFs at all (SR-IOV off in the BIOS, or not supported by this driver): poll, bounded."""
        from vgpu_dm.waiting import Progress

        dev = f"{PCI_DEVICES}/{gpu.address}"
        wait = self.programs.tools.vf_wait
        deadline = time.monotonic() + wait
        vfs: list[str] = []
        ready: list[str] = []
        progress = Progress(
            lambda waited: _log.info(
                f"{gpu.describe()}: waiting for its virtual functions' vGPU control files: "
                f"{len(ready)} of {len(vfs)} ready after {waited:.0f} s (gives up after {wait:g} s)"
            )
        )
        while True:
            vfs = [e for e in self.host.listdir(dev) if e.startswith("virtfn")]
            # A VF is ready once it shows its vGPU control files: nvidia/ (vendor VFIO) or
            # mdev_supported_types (an mdev-on-VF host, reference 3.5).
            ready = [
                v
                for v in vfs
                if self.host.exists(f"{dev}/{v}/nvidia/current_vgpu_type")
                or self.host.exists(f"{dev}/{v}/mdev_supported_types")
            ]
            if vfs and len(ready) == len(vfs):
                return
            if time.monotonic() >= deadline:
                break
            progress.sleep(VF_POLL)
        said = f" (it said: {output})" if output else ""
        if not vfs:
            raise HostError(
                f"{gpu.describe()}: sriov-manage -e exited 0 but created no virtual functions{said}; "
                f"SR-IOV may be disabled in the BIOS or not supported by this GPU and driver"
            )
        raise HostError(
            f"{gpu.describe()}: {len(vfs) - len(ready)} of {len(vfs)} virtual functions still have no "
            f"vGPU control files (nvidia/ or mdev_supported_types) {wait:g} s after sriov-manage -e{said}; "
            f"is the vGPU manager loaded?"
        )

    def remove(self, device: VGPUDevice) -> None:
        self.host.write_text(f"{PCI_DEVICES}/{device.parent}/nvidia/current_vgpu_type", "0")
        self._current[device.parent] = 0
        self._types.pop(device.gpu, None)

    def create(
        self,
        gpu: GPU,
        vtype: TypeInfo,
        ordinal: int = 0,
        uuid: str | None = None,
        parent: str | None = None,
        avoid: frozenset[str] = frozenset(),
        last: frozenset[str] = frozenset(),
    ) -> VGPUDevice:
        """Set ``vtype`` on the first free VF whose creatable list offers it (or on ``parent``); never on
        a VF in ``avoid``, and on one in ``last`` only when no other VF takes it."""
        type_id = vtype.type_id
        order = [parent] if parent else [v for v in gpu.vfs if v not in avoid and v not in last]
        if not parent:
            order += [v for v in gpu.vfs if v in last and v not in avoid]
        for vf in order:
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
