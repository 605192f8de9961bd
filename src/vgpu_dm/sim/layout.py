"""Build a simulated host tree from catalog GPU names, shaped like a real host's ``/sys``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vgpu_dm.errors import HostError
from vgpu_dm.host.root import SIM_MARKER
from vgpu_dm.sim.files import DRIVER_LOCK, STATE_FILE
from vgpu_dm.sim.placements import deny_list

if TYPE_CHECKING:
    from vgpu_dm import catalog

DRIVER_VERSION = "580.105.06"
# PCI buses of the simulated GPUs, in the order they are added (more than a real server has, for the
# benchmarks' 32-GPU hosts).
_BUSES = (
    0x3B, 0x5E, 0x86, 0xAF, 0xD8, 0x18, 0x1A, 0x1C, 0x41, 0x45, 0x4B, 0x61, 0x81, 0x85, 0xC1, 0xC5,
    0x07, 0x09, 0x0B, 0x0D, 0x21, 0x23, 0x25, 0x27, 0x51, 0x53, 0x55, 0x57, 0x91, 0x93, 0x95, 0x97,
)  # fmt: skip
# Observed hosts put the first VF at function .4 (A10, L40S, H200).
_FIRST_VF_FUNCTION = 4


@dataclass
class SimType:
    name: str  # short name, e.g. T4-1Q
    type_id: int
    max_instances: int
    framebuffer_gb: int
    mig_backed: bool


@dataclass
class SimGPU:
    address: str
    model: str  # catalog product name
    prefix: str
    framework: str  # mdev-pf | mdev-vf | vendor-vfio
    device: int
    subsystem_device: int
    name_prefix: str  # "GRID " or "NVIDIA "
    total_vfs: int
    vfs: list[str] = field(default_factory=list)
    types: list[SimType] = field(default_factory=list)
    framebuffer_gb: int = 0
    mixed_capable: bool = False
    mixed_enabled: bool = False
    # Mixed-size mode: "framebuffer" or "placements" (the mixed_size_rule option, sim/placements.py),
    # the placement IDs 1 GB types may not use, and vGPU (mdev UUID or VF) → [placement ID, slots].
    mixed_rule: str = "framebuffer"
    placement_deny: list[int] = field(default_factory=list)
    placements: dict[str, list[int]] = field(default_factory=dict)
    # MIG (see sim/mig.py): instance profile → max count; empty = not MIG-capable in the simulator.
    mig_profiles: dict[str, int] = field(default_factory=dict)
    mig_mode: bool = False  # current MIG mode
    mig_pending: bool | None = None  # a mode set that waits for a GPU reset
    gpu_instances: list[dict] = field(default_factory=list)  # {"id", "profile", "start"}
    mig_hosts: dict[str, int] = field(default_factory=dict)  # vGPU (mdev UUID or VF) → GPU instance id
    mig_types: dict[str, int] = field(default_factory=dict)  # vGPU (mdev UUID or VF) → type id
    # mdevs whose remove waits for a VM (sim/driver.py, begin_mdev_remove): UUID → parent, type id,
    # IOMMU group and the nodes the wait is for. Gone from sysfs, they still hold their capacity.
    removing: dict[str, dict] = field(default_factory=dict)
    # Driver of the VFs on mdev-vf GPUs. The kernel names mdev type directories <parent driver>-<id>, so
    # VFs bound to vfio-pci offer vfio-pci-<id> (seen on a real A40 host: vfio-pci-575 "NVIDIA A40-24A").
    vf_driver: str = "nvidia"
    arch: str = ""  # catalog architecture (Ampere, Hopper, ...): decides "auto" MIG mode changes
    # Driver of the GPU itself: "nvidia", or "vfio-pci" for a GPU passed through whole to a VM, which
    # NVML (nvidia-smi, nvidia-mig-parted) does not see at all.
    pf_driver: str = "nvidia"

    @property
    def type_dir_prefix(self) -> str:
        return "vfio-pci" if self.framework == "mdev-vf" and self.vf_driver == "vfio-pci" else "nvidia"


# Host behaviours the reference does not settle; each is a choice when the host is created.
OPTION_VALUES = {
    "mig_reset": ("auto", "required", "immediate"),
    "mig_off_with_vfs": ("refuse", "allow"),
    "mig_on_with_vfs": ("refuse", "allow"),
    "mig_after_reboot": ("keep", "lose"),
    "reset_with_vgpus": ("refuse", "destroy"),
    "sriov_manage_without_sysfs": ("fail", "noop"),
}
DEFAULT_OPTIONS = {
    # "required": a MIG mode change stays pending until a GPU reset (Ampere: nvidia-mig-parted resets the
    # GPUs itself); "immediate": it takes effect at once (reported for Hopper and Blackwell, gpu-operator
    # PR #2603, unconfirmed); "auto": required on Ampere, immediate on Hopper and Blackwell, as the
    # nvidia-mig-parted mock's own default (shared/mig-parted-mock/README.md).
    "mig_reset": "auto",
    # Whether MIG mode may be switched off while SR-IOV VFs are enabled ("refuse" is observed on
    # vendor-VFIO hosts, host-interfaces.md 3.6; unknown on mdev hosts).
    "mig_off_with_vfs": "refuse",
    # Whether MIG mode may be switched on while SR-IOV VFs are enabled: not known (the observed order
    # is mode first, then VFs, 3.6), so both can be simulated.
    "mig_on_with_vfs": "refuse",
    # What a GPU reset does to a GPU that has vGPUs that no VM holds: "refuse" = the reset fails as if
    # the GPU were in use, "destroy" = it succeeds and the vGPUs are gone. Not known; a held vGPU
    # always makes the reset fail (nvidia-smi -r: "In use by another client").
    "reset_with_vgpus": "refuse",
    # MIG mode after a reboot: "keep" (host-interfaces.md 3.2: it survives, GPU instances do not) or
    # "lose" (gpu-operator PR #2603 reports it lost on the vGPU host path).
    "mig_after_reboot": "keep",
    # mdevctl's udev rule starts a parent's auto definitions when the parent registers with the mdev
    # core (kvm-host.md §E). Whether NVIDIA's VFs, enabled by sriov-manage, raise that event is
    # unconfirmed, and udev handles events after the kernel queued them: "later" (queued until udev is
    # waited for, or the next driver write), "start" (handled before sriov-manage returns) or "ignore".
    "mdevctl_on_vfs": "later",
    # What sriov-manage does when it runs chrooted into a root without the host's sysfs, as the GPU
    # Operator's driver container root is published (design.md "Three roots"; issue 16 item 6). That
    # it cannot enable VFs there is the fact; how it says so is unknown (the script reads sysfs and
    # lspci, reference/host-interfaces.md 3.2), so both are modelled: "fail" = an error exit, "noop" =
    # exit 0 having made no VFs.
    "sriov_manage_without_sysfs": "fail",
    # Which vGPUs fit side by side in mixed-size (heterogeneous) mode. "placements": NVIDIA's resource
    # manager places each at fixed slots (read in its open kernel module source, sim/placements.py; not
    # observed on hardware); "framebuffer": each type up to its maximum, all within the framebuffer
    # (the simpler guess). Which one a given driver release follows is unconfirmed.
    "mixed_size_rule": "framebuffer",
    # What a remove of an mdev that a VM holds blocks besides itself. The kernel's part is known:
    # mdev_device_remove() (drivers/vfio/mdev/mdev_core.c) holds only its parent's unreg_sem, for
    # reading, while vfio_unregister_group_dev() waits for the VM, so other devices and GPUs go on
    # ("device"). Whether NVIDIA's remove callback holds a driver-wide lock across that wait is not
    # known (host-interfaces.md §10: "mdev removal of an in-use device"), so "host" models a driver
    # that does: every other create or remove on the host waits too.
    "held_remove_blocks": "device",
}


@dataclass
class SimState:
    gpus: list[SimGPU]
    next_group: int = 100
    options: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    # Where the driver's programs (nvidia-smi, sriov-manage) live, relative to the host root: "" = the
    # host itself, "run/nvidia/driver" = the GPU Operator's containerised driver.
    driver_root: str = ""
    driver_version: str = DRIVER_VERSION

    def save(self, root: str | os.PathLike[str]) -> None:
        path = Path(root, SIM_MARKER, STATE_FILE)
        tmp = path.with_suffix(".tmp")
        # Written at every emulated create, under the driver lock: the fields as they are (a shallow
        # copy, which is what asdict's deep copy gives JSON too) and compact separators, so json's C
        # encoder does the work (indent would switch to the pure-Python one).
        gpus = [{**vars(g), "types": [vars(t) for t in g.types]} for g in self.gpus]
        raw = {**vars(self), "gpus": gpus}
        tmp.write_text(json.dumps(raw, separators=(",", ":")))
        os.replace(tmp, path)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> SimState:
        path = Path(root, SIM_MARKER, STATE_FILE)
        try:
            raw = json.loads(path.read_text())
            gpus = [SimGPU(**{**g, "types": [SimType(**t) for t in g["types"]]}) for g in raw["gpus"]]
            options = {**DEFAULT_OPTIONS, **raw.get("options", {})}
            return cls(
                gpus=gpus,
                next_group=int(raw.get("next_group", 100)),
                options=options,
                driver_root=str(raw.get("driver_root", "")),
                driver_version=str(raw.get("driver_version", DRIVER_VERSION)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # ValueError covers JSONDecodeError and UnicodeDecodeError.
            raise HostError(
                f"the simulator's state file {path} is corrupt ({type(exc).__name__}: {exc}); "
                f"make a new simulated host with 'nvidia-vgpu-dm sim create'"
            ) from None

    def nvml_gpus(self) -> list[SimGPU]:
        """The GPUs NVML sees, in its order: GPUs on the nvidia driver (not the ones bound to vfio-pci
        for pass-through), by PCI address (NVML enumerates in PCI bus order)."""
        from vgpu_dm.host.pci import address_key

        return sorted((g for g in self.gpus if g.pf_driver == "nvidia"), key=lambda g: address_key(g.address))

    def mode_change(self, gpu: SimGPU) -> str:
        """ "required" or "immediate": how a MIG mode change of ``gpu`` takes effect."""
        setting = self.options["mig_reset"]
        if setting == "auto":
            return "immediate" if gpu.arch in ("Hopper", "Blackwell") else "required"
        return setting

    def gpu_of(self, address: str) -> SimGPU | None:
        for gpu in self.gpus:
            if gpu.address == address or address in gpu.vfs:
                return gpu
        return None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def vf_address(bus: int, n: int, domain: str = "0000") -> str:
    slot, function = divmod(_FIRST_VF_FUNCTION + n, 8)
    return f"{domain}:{bus:02x}:{slot:02x}.{function}"


def _pci_device(root: Path, address: str, attrs: dict[str, str], driver: str | None, group: int) -> Path:
    dev = root / "sys/devices/pci0000:00" / address
    dev.mkdir(parents=True)
    for name, value in attrs.items():
        _write(dev / name, value + "\n")
    if driver:
        (root / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
        _link(dev / "driver", root / "sys/bus/pci/drivers" / driver)
    (root / "sys/kernel/iommu_groups" / str(group)).mkdir(parents=True, exist_ok=True)
    _link(dev / "iommu_group", root / "sys/kernel/iommu_groups" / str(group))
    _link(root / "sys/bus/pci/devices" / address, dev)
    return dev


# GPUs that only ship with vGPU 17+ stacks: simulated with the vendor-specific VFIO framework by default.
_VENDOR_VFIO_ARCHS = ("Ada", "Hopper", "Blackwell")


def _framework_for(entry: catalog.CatalogGPU, vendor_vfio: bool | None) -> str:
    if entry.framework == "mdev-pf":
        return "mdev-pf"
    if vendor_vfio is None:
        vendor_vfio = entry.arch in _VENDOR_VFIO_ARCHS
    return "vendor-vfio" if vendor_vfio else "mdev-vf"


def create_host(
    root: str | os.PathLike[str],
    gpu_names: list[str],
    vendor_vfio: bool | None = None,
    mixed_size: bool = True,
    options: dict[str, str] | None = None,
    pci_domain: int = 0,
    vf_driver: str = "nvidia",
    driver_root: str = "",
    driver_version: str = DRIVER_VERSION,
    passthrough: tuple[int, ...] = (),
    mig_parted: bool = True,
) -> SimState:
    """Create a simulated host at ``root`` (an empty or missing directory) with the given GPUs.

    ``pci_domain`` puts the GPUs in that PCI domain (Intel VMD uses domains >= 0x10000);
    ``vf_driver`` binds the VFs of mdev-on-VF GPUs to ``nvidia`` or ``vfio-pci``; ``driver_root`` puts
    nvidia-smi and sriov-manage below that directory (the GPU Operator's containerised driver);
    ``passthrough`` binds the GPUs at those positions of ``gpu_names`` to vfio-pci (passed through whole
    to a VM: no vGPUs, and NVML does not see them); ``mig_parted`` puts ``nvidia-mig-parted`` on the
    host's ``/usr/bin`` (the simulator answers for it).
    """
    from vgpu_dm import catalog

    base = Path(root)
    if base.exists() and any(base.iterdir()):
        raise FileExistsError(f"{base} is not empty; choose a new directory for the simulated host")
    if not 0 <= pci_domain <= 0xFFFFFFFF:
        raise ValueError(f"PCI domain {pci_domain:#x} does not fit in 8 hex digits")
    if vf_driver not in ("nvidia", "vfio-pci"):
        raise ValueError(f"VF driver must be nvidia or vfio-pci, not {vf_driver!r}")
    if len(gpu_names) > len(_BUSES):
        raise ValueError(f"at most {len(_BUSES)} simulated GPUs are supported")
    entries = [catalog.find(name) for name in gpu_names]
    base.mkdir(parents=True, exist_ok=True)
    for sub in (
        "sys/bus/pci/devices",
        "sys/bus/pci/drivers",
        "sys/bus/mdev/devices",
        "sys/class/mdev_bus",
        "proc",
        "dev/vfio/devices",
        "run",
        "etc",
    ):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _write(base / "etc/machine-id", "5f1c2e7a9b3d4c6e8f0a1b2c3d4e5f60\n")
    # A host always has processes; pid 1 holds no VFIO device.
    _write(base / "proc/1/comm", "systemd\n")
    (base / "proc/1/fd").mkdir()
    os.symlink("/dev/null", base / "proc/1/fd/0")
    # Stand-ins for the driver's files, where the driver is installed: on the host itself, or only in
    # the GPU Operator's driver container root (reference/gpu-operator.md §1). The simulator emulates
    # what running the programs does; NVML is where the driver installs it (behind its soname link, in
    # one of the directories upstream searches: cmd/nvidia-k8s-vgpu-dm/find.go).
    driver_dir = base / driver_root.strip("/")
    for program in ("usr/lib/nvidia/sriov-manage", "usr/bin/nvidia-smi"):
        _write(driver_dir / program, "#!/bin/sh\n# emulated by the nvidia-vgpu-dm simulator\n")
    libdir = driver_dir / "usr/lib/x86_64-linux-gnu"
    _write(libdir / f"libnvidia-ml.so.{driver_version}", "# NVML stand-in of the nvidia-vgpu-dm simulator\n")
    os.symlink(f"libnvidia-ml.so.{driver_version}", libdir / "libnvidia-ml.so.1")
    if mig_parted:
        _write(base / "usr/bin/nvidia-mig-parted", "#!/bin/sh\n# emulated by the nvidia-vgpu-dm simulator\n")
    _write(base / "sys/module/nvidia/version", f"{driver_version}\n")
    (base / SIM_MARKER).mkdir()
    # The simulated driver's lock: made now, so that reading the host later needs no write access.
    (base / SIM_MARKER / DRIVER_LOCK).touch()
    # Non-GPU devices a discovery must skip: a host bridge and an NVIDIA HD-audio function.
    _pci_device(base, "0000:00:00.0", {"vendor": "0x8086", "device": "0x2020", "class": "0x060000"}, None, 1)
    state = SimState(gpus=[], driver_root=driver_root.strip("/"), driver_version=driver_version)
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise ValueError(f"unknown simulator option {key!r}")
        if key in OPTION_VALUES and value not in OPTION_VALUES[key]:
            raise ValueError(
                f"simulator option {key}: {value!r} is not one of {', '.join(OPTION_VALUES[key])}"
            )
        state.options[key] = value
    if state.options["mixed_size_rule"] not in ("framebuffer", "placements"):
        rule = state.options["mixed_size_rule"]
        raise ValueError(f"mixed_size_rule must be framebuffer or placements, not {rule!r}")
    bad = [i for i in passthrough if not 0 <= i < len(entries)]
    if bad:
        raise ValueError(f"--passthrough {bad[0]}: there are only {len(entries)} GPUs")
    domain = f"{pci_domain:04x}"
    group = 10
    for i, entry in enumerate(entries):
        bus = _BUSES[i]
        address = f"{domain}:{bus:02x}:00.0"
        dev_id = entry.device_ids[0]
        framework = _framework_for(entry, vendor_vfio)
        total_vfs = 0 if framework == "mdev-pf" else (entry.sriov_vfs or max(entry.min_vfs, 16))
        catalog_index = catalog.load().index(entry)
        types = []
        for n, (name, max_count) in enumerate(entry.vgpu_types.items()):
            from vgpu_dm.vgpu_type import VGPUType

            parsed = VGPUType.parse(name)
            types.append(
                SimType(
                    name, 200 + catalog_index * 40 + n, max_count, parsed.framebuffer_gb, parsed.is_mig_backed
                )
            )
        gpu = SimGPU(
            address=address,
            model=entry.name,
            prefix=entry.prefix,
            framework=framework,
            device=dev_id.device,
            subsystem_device=dev_id.subsystem_device or 0x1000 + i,
            name_prefix="GRID " if entry.arch in ("Turing", "Volta") else "NVIDIA ",
            total_vfs=total_vfs,
            types=types,
            framebuffer_gb=entry.framebuffer_gb,
            # NVIDIA states mixed sizes for Volta and later (a V100 on driver 580 ran 1Q + 2Q);
            # --no-mixed-size models GPUs whose nvidia-smi says "Not Supported" (P40, H100 NVL captures).
            mixed_capable=mixed_size and entry.arch not in ("Maxwell", "Pascal"),
            mixed_rule=state.options["mixed_size_rule"],
            placement_deny=deny_list(entry.arch, entry.framebuffer_gb),
            vf_driver=vf_driver,
            # MIG is simulated on the GPUs whose instance profiles the catalog knows.
            mig_profiles=dict(entry.mig_gi_profiles),
            arch=entry.arch,
            pf_driver="vfio-pci" if i in passthrough else "nvidia",
        )
        attrs = {
            "vendor": "0x10de",
            "device": f"0x{gpu.device:04x}",
            "class": "0x030200",
            "subsystem_vendor": "0x10de",
            "subsystem_device": f"0x{gpu.subsystem_device:04x}",
            "numa_node": str(i % 2),
        }
        if total_vfs:
            attrs["sriov_totalvfs"] = str(total_vfs)
            attrs["sriov_numvfs"] = "0"
        group += 1
        pf_dir = _pci_device(base, address, attrs, gpu.pf_driver, group)
        if gpu.pf_driver != "nvidia":
            # Passed through whole: the VM opens the GPU's own VFIO group; the vGPU driver has no part.
            add_vfio_nodes(base, pf_dir, group)
            gpu.types = []
        elif framework == "mdev-pf":
            _link(base / "sys/class/mdev_bus" / address, pf_dir)
        elif framework == "mdev-vf":
            group = enable_vfs(base, gpu, group)
        # NVIDIA GPUs also expose an audio function; it must not count as a GPU.
        group += 1
        _pci_device(
            base,
            f"{domain}:{bus:02x}:00.1",
            {"vendor": "0x10de", "device": "0x10fa", "class": "0x040300"},
            None,
            group,
        )
        state.gpus.append(gpu)
    state.next_group = group + 1
    state.save(base)
    from vgpu_dm.sim.driver import refresh_all

    refresh_all(base, state)
    return state


def add_vfio_nodes(base: Path, dev_dir: Path, group: int) -> None:
    """``vfio-dev/vfioN`` in the device's sysfs dir plus ``/dev/vfio/<group>`` and
    ``/dev/vfio/devices/vfioN`` (kernel ABI sysfs-devices-vfio-dev); N is the group number here, which
    is unique per device in the simulator."""
    (dev_dir / "vfio-dev" / f"vfio{group}").mkdir(parents=True)
    _write(base / "dev/vfio/devices" / f"vfio{group}", "")
    _write(base / "dev/vfio" / str(group), "")


def enable_vfs(base: Path, gpu: SimGPU, group: int) -> int:
    """Create the GPU's VFs (what ``sriov-manage -e`` does); returns the next free IOMMU group."""
    domain, bus_text = gpu.address.split(":")[:2]
    bus = int(bus_text, 16)
    pf_dir = base / "sys/devices/pci0000:00" / gpu.address
    gpu.vfs = []
    for n in range(gpu.total_vfs):
        vf = vf_address(bus, n, domain)
        group += 1
        attrs = {
            "vendor": "0x10de",
            "device": f"0x{gpu.device:04x}",
            "class": "0x030200",
            "subsystem_vendor": "0x10de",
            "subsystem_device": f"0x{gpu.subsystem_device:04x}",
            "numa_node": (pf_dir / "numa_node").read_text().strip(),
        }
        driver = gpu.vf_driver if gpu.framework == "mdev-vf" else "nvidia"
        vf_dir = _pci_device(base, vf, attrs, driver, group)
        _link(vf_dir / "physfn", pf_dir)
        _link(pf_dir / f"virtfn{n}", vf_dir)
        if gpu.framework == "mdev-vf":
            _link(base / "sys/class/mdev_bus" / vf, vf_dir)
        else:
            (vf_dir / "nvidia").mkdir()
            _write(vf_dir / "nvidia/current_vgpu_type", "0\n")
            _write(vf_dir / "nvidia/creatable_vgpu_types", "")
        if gpu.framework == "vendor-vfio" or driver == "vfio-pci":
            # A VFIO-bound device gets a group node and an iommufd cdev (the nvidia driver registers
            # vendor-VFIO VFs itself); a VF that only parents mdevs is no VFIO device of its own.
            add_vfio_nodes(base, vf_dir, group)
        gpu.vfs.append(vf)
    (pf_dir / "sriov_numvfs").write_text(f"{gpu.total_vfs}\n")
    return group
