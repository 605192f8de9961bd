"""Who holds a vGPU: processes whose open files point at the vGPU's VFIO device nodes.

Neither framework exposes an in-use flag, so we scan ``proc/<pid>/fd`` (through the host root; in a
container this needs the host's PID namespace) for links to ``/dev/vfio/<group>`` or
``/dev/vfio/devices/vfioN``.
"""

from __future__ import annotations

from typing import NamedTuple

from vgpu_dm.errors import HostError
from vgpu_dm.host.mdev import MDEV_DEVICES
from vgpu_dm.host.model import MDEV, VGPUDevice
from vgpu_dm.host.pci import PCI_DEVICES, link_name
from vgpu_dm.host.root import HostRoot

# What /proc/<pid>/fd/<n> reads for a file whose node was unlinked while open (fs/d_path.c).
DELETED = " (deleted)"


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class Holder(NamedTuple):
    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name})"


class HolderIndex:
    """Scans ``proc`` once, on first use, and answers "who holds this device"."""

    def __init__(self, host: HostRoot):
        self.host = host
        self._by_node: dict[str, list[int]] | None = None
        self._names: dict[int, str] = {}

    def _scan(self) -> dict[str, list[int]]:
        if self._by_node is None:
            if getattr(self.host, "container", None):
                raise HostError(
                    f"cannot tell which vGPUs VMs are using: this process runs in a container "
                    f"({self.host.container}) with host root /, so /proc shows the container's processes, "
                    f"not the host's; mount the host's / at /host and pass --host-root /host (the host's "
                    f"/proc there lists the host's processes even without hostPID; reading their open "
                    f"files needs CAP_SYS_PTRACE), or pass --force to remove vGPUs without this check"
                )
            pids = [p for p in self.host.listdir("proc") if p.isdigit()]
            if not pids:
                raise HostError(
                    f"cannot tell which vGPUs VMs are using: {self.host.path('proc')} lists no processes "
                    f"(mount the host's /proc; in Kubernetes run with hostPID); pass --force to remove "
                    f"vGPUs without this check"
                )
            by_node: dict[str, list[int]] = {}
            for pid in pids:
                if not pid.isdigit():
                    continue
                for fd in self.host.listdir(f"proc/{pid}/fd"):
                    target = self.host.readlink(f"proc/{pid}/fd/{fd}")
                    if target and target.endswith(DELETED):
                        # The node was unlinked while open: an mdev whose remove has begun loses its
                        # cdev before the kernel waits for the VM (vfio_unregister_group_dev).
                        target = target[: -len(DELETED)]
                    if target and target.startswith("/dev/vfio/"):
                        pids = by_node.setdefault(target, [])
                        if int(pid) not in pids:
                            pids.append(int(pid))
            self._by_node = by_node
        return self._by_node

    def nodes(self, device: VGPUDevice) -> list[str]:
        """The device nodes a VM opens to use ``device``."""
        # Both node kinds, for mdevs too: QEMU opens the group (legacy container) or, with iommufd, the
        # device's cdev /dev/vfio/devices/vfioN (kernel ABI sysfs-devices-vfio-dev, Linux >= 6.2).
        if device.framework == MDEV:
            where = f"{MDEV_DEVICES}/{device.uuid}"
        else:
            where = f"{PCI_DEVICES}/{device.parent}"
        group = str(device.iommu_group) if device.iommu_group is not None else None
        nodes = [f"/dev/vfio/devices/{name}" for name in self.host.listdir(f"{where}/vfio-dev")]
        group = group or link_name(self.host, f"{where}/iommu_group")
        if group and group.isdigit():
            nodes.append(f"/dev/vfio/{group}")
        return nodes

    def holders(
        self, device: VGPUDevice, required: bool = True, nodes: list[str] | None = None
    ) -> list[Holder]:
        """Processes holding ``device`` (through ``nodes``, default: what sysfs says now); with
        ``required=False`` an unreadable proc means "none known"."""
        try:
            by_node = self._scan()
        except HostError:
            if required:
                raise
            return []
        if not by_node:
            return []  # nothing has any VFIO device open
        nodes = self.nodes(device) if nodes is None else nodes
        pids = sorted({pid for node in nodes for pid in by_node.get(node, [])})
        return [Holder(pid, self._name(pid)) for pid in pids]

    def open_nodes(self) -> dict[str, list[int]]:
        """Every VFIO device node some process has open → those pids (HostError if proc is unreadable)."""
        return {node: list(pids) for node, pids in self._scan().items()}

    def name(self, pid: int) -> str:
        return self._name(pid)

    def _name(self, pid: int) -> str:
        if pid not in self._names:
            text = self.host.read_optional(f"proc/{pid}/comm")
            self._names[pid] = (text or "?").strip()
        return self._names[pid]
