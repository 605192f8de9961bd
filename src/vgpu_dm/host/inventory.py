"""What is on the host right now: the GPUs, which backend drives each, and their vGPU devices."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from vgpu_dm.host.mdev import MdevBackend
from vgpu_dm.host.model import Backend, VGPUDevice
from vgpu_dm.host.pci import GPU, discover_gpus
from vgpu_dm.host.programs import DEFAULT_SRIOV_MANAGE, HostTools, Programs
from vgpu_dm.host.root import HostRoot

if TYPE_CHECKING:
    from vgpu_dm.host.holders import HolderIndex
    from vgpu_dm.host.libvirt import Domain, DomainIndex
    from vgpu_dm.host.mdevctl import MdevctlIndex
    from vgpu_dm.host.owner import DraOwnership
    from vgpu_dm.host.vfio import VendorVfioBackend

__all__ = ["DEFAULT_SRIOV_MANAGE", "HostTools", "Inventory"]


class Inventory:
    """Reads the PCI tree once; backends read their devices once, on first use.

    The framework is decided per GPU: mdev parents present → mdev; VFs with ``nvidia/`` control files →
    vendor VFIO; anything else has no vGPU backend (or, an SR-IOV GPU without VFs, needs them enabled).
    """

    def __init__(self, host: HostRoot, tools: HostTools | None = None, writable: bool = False):
        """``writable``: this run may update our own state files (learned type tables); only apply is."""
        self.host = host
        self.tools = tools or HostTools()
        self.programs = Programs(host, self.tools)
        self.writable = writable
        self.gpus: list[GPU] = discover_gpus(host)

    @cached_property
    def mdev(self) -> MdevBackend:
        return MdevBackend(self.host, self.gpus, self.programs)

    @cached_property
    def vfio(self) -> VendorVfioBackend:
        from vgpu_dm.host.vfio import VendorVfioBackend  # not needed on a host whose GPUs are all mdev

        return VendorVfioBackend(self.host, self.gpus, self.programs, writable=self.writable)

    @cached_property
    def holders(self) -> HolderIndex:
        from vgpu_dm.host.holders import HolderIndex  # assert never asks who holds a vGPU

        return HolderIndex(self.host)

    @cached_property
    def domains(self) -> DomainIndex:
        """libvirt's VMs (persistent and running), read on first use: nothing on hosts without libvirt."""
        from vgpu_dm.host.libvirt import DomainIndex

        return DomainIndex(self.host)

    @cached_property
    def mdevctl(self) -> MdevctlIndex:
        from vgpu_dm.host.mdevctl import MdevctlIndex

        return MdevctlIndex(self.host)

    def assigned(self, device: VGPUDevice) -> list[Domain]:
        """The libvirt VMs whose definitions name ``device``: its mdev UUID, or its VF's address."""
        if device.uuid:
            return self.domains.for_mdev(device.uuid)
        return self.domains.for_pci(device.parent)

    def claim_warnings(self) -> list[str]:
        """What the readers of VM definitions and mdevctl files could not vouch for (only those read)."""
        found = []
        if "domains" in self.__dict__:
            found += self.domains.warnings
        if "mdevctl" in self.__dict__:
            found += self.mdevctl.warnings
        return found

    @cached_property
    def dra_owned(self) -> DraOwnership | None:
        """The GPUs the DRA driver owns (None: none). One existence check unless the record exists."""
        from vgpu_dm.state_files import DRA_OWNED_FILE

        if not self.host.exists(DRA_OWNED_FILE):
            return None
        from vgpu_dm.host.owner import read_dra_owned

        try:
            return read_dra_owned(self.host)
        except ValueError as exc:
            from vgpu_dm.errors import HostError

            raise HostError(str(exc)) from None

    def backend_for(self, gpu: GPU) -> Backend | None:
        """The backend that drives this GPU's vGPUs, or None when the GPU is not in vGPU mode."""
        if self.mdev.handles(gpu):
            return self.mdev
        if self.vfio.handles(gpu):  # only now made: mdev hosts never need it
            return self.vfio
        return None

    def devices(self, gpu: GPU) -> list[VGPUDevice]:
        backend = self.backend_for(gpu)
        return backend.devices(gpu) if backend else []

    def framework(self, gpu: GPU) -> str:
        backend = self.backend_for(gpu)
        if backend:
            return backend.framework
        if self.vfio.needs_vfs(gpu):
            return "sriov-vfs-off"
        return "none"
