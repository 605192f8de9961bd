"""The host's MIG state, read without changing anything: the GPUs NVML sees with their NVML indices and
pending modes (``nvidia-smi --query-gpu``), and their MIG mode and GPU instances (``nvidia-mig-parted
export``). GPUs are matched by PCI bus id, never by our own index: NVML does not see GPUs bound to
vfio-pci, so its indices can differ from ours (gpu-operator.md section 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm.errors import HostError
from vgpu_dm.mig.layout import ExportError, MigLayout, parse_export

if TYPE_CHECKING:
    from vgpu_dm.host.inventory import Inventory
    from vgpu_dm.mig.parted import MigParted


class GPUMig(NamedTuple):
    """One GPU as NVML sees it."""

    index: int  # NVML's index: what nvidia-mig-parted's ``devices`` mean
    layout: MigLayout  # current mode and instances (MIG off on a GPU without MIG)
    capable: bool  # nvidia-smi shows a MIG mode for it
    pending: bool | None = None  # a pending mode that differs from the current one


class MigState(NamedTuple):
    """PCI address → its NVML view; GPUs NVML does not see are absent."""

    gpus: Mapping[str, GPUMig]

    def of(self, address: str) -> GPUMig | None:
        return self.gpus.get(address)


def read(inventory: Inventory, parted: MigParted) -> MigState:
    """Ask nvidia-smi and ``nvidia-mig-parted export``; HostError (with what they said) when either
    fails or they disagree."""
    nvml = inventory.programs.smi.nvml_gpus()
    if [g.index for g in nvml] != list(range(len(nvml))):
        raise HostError(f"nvidia-smi listed GPU indices {[g.index for g in nvml]}, not 0 to {len(nvml) - 1}")
    ours = {g.address: g for g in inventory.gpus}
    unknown = [g.address for g in nvml if g.address not in ours]
    if unknown:
        raise HostError(
            f"nvidia-smi lists GPU(s) {', '.join(unknown)} that are not NVIDIA GPUs under "
            f"{inventory.host.path('sys/bus/pci/devices')}: is --driver-root the driver of this host?"
        )
    exported = parse_export_or_fail(parted, [ours[g.address].device_id for g in nvml])
    gpus = {}
    for g in nvml:
        described = ours[g.address].describe()
        if g.mig_current is None:
            gpus[g.address] = GPUMig(g.index, MigLayout(False), False)
            continue
        layout = exported.get(g.index)
        if layout is None:
            raise HostError(f"nvidia-mig-parted export does not describe {described} (NVML GPU {g.index})")
        if layout.enabled != g.mig_current:
            raise HostError(
                f"{described}: nvidia-smi says MIG mode is {'on' if g.mig_current else 'off'} on NVML GPU "
                f"{g.index}, nvidia-mig-parted export says {'on' if layout.enabled else 'off'}: do they see "
                f"the same GPUs?"
            )
        pending = g.mig_pending if g.mig_pending is not None and g.mig_pending != g.mig_current else None
        gpus[g.address] = GPUMig(g.index, layout, True, pending)
    return MigState(gpus)


def parse_export_or_fail(parted: MigParted, devices: list) -> dict[int, MigLayout]:
    data = parted.export()
    try:
        return parse_export(data, devices)
    except ExportError as exc:
        raise HostError(f"cannot read nvidia-mig-parted export: {exc}") from None
