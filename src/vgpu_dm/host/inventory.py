"""What is on the host right now: the GPUs, which backend drives each, and their vGPU devices."""

from __future__ import annotations

from functools import cached_property

from vgpu_dm.host.mdev import MdevBackend
from vgpu_dm.host.model import Backend, VGPUDevice
from vgpu_dm.host.pci import GPU, discover_gpus
from vgpu_dm.host.root import HostRoot


class Inventory:
    """Reads the PCI tree once; backends read their devices once, on first use."""

    def __init__(self, host: HostRoot):
        self.host = host
        self.gpus: list[GPU] = discover_gpus(host)

    @cached_property
    def mdev(self) -> MdevBackend:
        return MdevBackend(self.host, self.gpus)

    def backends(self) -> list[Backend]:
        return [self.mdev]

    def backend_for(self, gpu: GPU) -> Backend | None:
        """The backend that drives this GPU's vGPUs, or None when the GPU is not in vGPU mode."""
        for backend in self.backends():
            if backend.handles(gpu):
                return backend
        return None

    def devices(self, gpu: GPU) -> list[VGPUDevice]:
        backend = self.backend_for(gpu)
        return backend.devices(gpu) if backend else []

    def framework(self, gpu: GPU) -> str:
        backend = self.backend_for(gpu)
        return backend.framework if backend else "none"
