"""The MIG part of the plan: which GPUs need another MIG mode or other GPU instances, decided from the
config, the catalog and the MIG state read from the host (mig/state.py) — with everything else, before
the first write. Pure: the caller reads the state.

A GPU changes MIG only when its vGPUs do not already match the config and its MIG layout differs from
what the config needs. Such a GPU loses all its vGPUs first (its instances are rebuilt), so the plan
removes them all and creates the config's afterwards. A mode change may need a GPU reset, and
nvidia-mig-parted then resets every GPU NVML sees (gpu-operator.md section 3): the plan names those
other GPUs that have vGPUs or GPU instances to lose ("bystanders"), and a VM on any of them refuses the
change unless forced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm.errors import IN_USE, HeldProblem
from vgpu_dm.host.model import VGPUDevice
from vgpu_dm.host.pci import GPU
from vgpu_dm.mig.layout import MigLayout

if TYPE_CHECKING:
    from vgpu_dm.host.inventory import Inventory
    from vgpu_dm.mig.state import MigState
    from vgpu_dm.spec.model import ConfigEntry


class MigChange(NamedTuple):
    """One GPU's MIG change: from ``current`` to ``target``, addressed to mig-parted by NVML index."""

    index: int
    current: MigLayout
    target: MigLayout
    device_filter: str | list[str] | None = None
    pending: bool | None = None  # a pending mode the GPU already had

    @property
    def mode_change(self) -> bool:
        return self.current.enabled != self.target.enabled

    def entry(self, layout: MigLayout | None = None) -> dict:
        """The one-GPU mig-parted entry for ``layout`` (default: the target); the entry's device-filter
        is kept so that mig-parted skips a GPU that is not the one meant."""
        return (layout or self.target).entry(self.index, self.device_filter)


class Bystander(NamedTuple):
    """A GPU the MIG change does not touch, but a GPU reset would: its vGPUs and instances."""

    gpu: GPU
    index: int
    layout: MigLayout
    devices: tuple[VGPUDevice, ...]


class MigPlan(NamedTuple):
    """What the MIG stage of apply does besides the per-GPU changes (GPUPlan.mig)."""

    bystanders: tuple[Bystander, ...] = ()
    # GPUs whose pending MIG mode (a change left waiting for a reset) is set back to their current one.
    cancel_pending: tuple[tuple[GPU, int, bool], ...] = ()


def catalog_mig(gpu: GPU) -> bool:
    """Whether the catalog says the GPU has MIG (its profiles known or not)."""
    from vgpu_dm import catalog
    from vgpu_dm.vgpu_type import VGPUType

    model = catalog.for_device(gpu.device_id)
    if model is None:
        return False
    if model.mig_gi_profiles:
        return True
    return any(_is_mig(name, VGPUType) for name in model.vgpu_types)


def _is_mig(name: str, vgpu_type) -> bool:
    try:
        return vgpu_type.parse(name).is_mig_backed
    except ValueError:
        return False


def involved(entries: tuple[ConfigEntry, ...], gpus: dict[int, ConfigEntry], inventory: Inventory) -> bool:
    """Whether apply needs the MIG state: the config has MIG-backed types, or selects a MIG GPU."""
    if any(e.is_mig_backed for e in entries):
        return True
    return any(catalog_mig(g) for g in inventory.gpus if g.index in gpus)


def filter_value(entry: ConfigEntry) -> str | list[str] | None:
    if not entry.device_filter:
        return None
    texts = [str(f) for f in entry.device_filter]
    return texts[0] if len(texts) == 1 else texts


def change_for(
    gpu: GPU, entry: ConfigEntry, state: MigState, vgpus_match: bool
) -> tuple[MigChange | None, str | None]:
    """(the GPU's MIG change or None, a problem or None)."""
    from vgpu_dm import catalog
    from vgpu_dm.mig.translate import TranslationError, layout_for

    seen = state.of(gpu.address)
    if seen is None:
        # NVML does not see it (bound to vfio-pci, passed through whole): no MIG to change, and no vGPUs.
        return None, None
    if not seen.capable:
        if entry.is_mig_backed:
            return None, "MIG-backed vGPU types, but the GPU has no MIG (nvidia-smi shows no MIG mode for it)"
        return None, None
    try:
        target = layout_for(entry, catalog.for_device(gpu.device_id))
    except TranslationError as exc:
        return None, str(exc)
    if vgpus_match:
        return None, None
    if seen.layout == target:
        return None, None
    return MigChange(seen.index, seen.layout, target, filter_value(entry), seen.pending), None


def bystanders(changing: set[str], state: MigState, inventory: Inventory) -> tuple[Bystander, ...]:
    """The GPUs NVML sees, other than ``changing``, with vGPUs or GPU instances a reset would take."""
    found = []
    for gpu in inventory.gpus:
        seen = state.of(gpu.address)
        if seen is None or gpu.address in changing:
            continue
        devices = tuple(inventory.devices(gpu))
        if devices or seen.layout.devices:
            found.append(Bystander(gpu, seen.index, seen.layout, devices))
    return tuple(found)


def reset_problems(
    people: tuple[Bystander, ...], changing: list[GPU], inventory: Inventory, force: bool
) -> tuple[list[str], list[str]]:
    """(problems, notes): a VM holding a vGPU on a bystander makes the GPU reset of a mode change fail."""
    which = ", ".join(g.describe() for g in changing)
    problems, notes = [], []
    for by in people:
        for device in by.devices:
            holders = inventory.holders.holders(device, required=not force)
            if not holders:
                continue
            who = ", ".join(str(h) for h in holders)
            text = (
                f"{by.gpu.describe()}: {device.type_name} {device.key} is in use by {who}; the MIG mode "
                f"change "
                f"of {which} may need a GPU reset, and nvidia-mig-parted resets every GPU of the host, which "
                f"fails while a VM holds any of them"
            )
            if force:
                notes.append(f"--force: {text}; if a reset is needed the change fails and is rolled back")
            else:
                advice = "stop the VM first (or pass --force to try anyway)"
                problems.append(HeldProblem(text, advice, IN_USE))
    return problems, notes
