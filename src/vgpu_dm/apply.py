"""Carry out a Plan: removals then creations per GPU; on a failed write, undo every GPU changed so
far back to exactly its previous devices (same types, same UUIDs) and report what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vgpu_dm import log
from vgpu_dm.errors import ApplyError, HostError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.model import TypeInfo, VGPUDevice
from vgpu_dm.host.root import HostRoot
from vgpu_dm.plan import GPUPlan, Plan, build_plan
from vgpu_dm.spec.model import ConfigEntry

_log = log.get("apply")


@dataclass
class _Undo:
    """Writes made so far on one GPU, so they can be reversed exactly."""

    plan: GPUPlan
    removed: list[VGPUDevice] = field(default_factory=list)
    created: list[VGPUDevice] = field(default_factory=list)


def _summary(gp: GPUPlan) -> str:
    def count(names: list[str]) -> str:
        seen: dict[str, int] = {}
        for n in names:
            seen[n] = seen.get(n, 0) + 1
        return ", ".join(f"{c} x {n}" for n, c in seen.items())

    parts = [
        ("keep", count([d.type_name for d in gp.keep])),
        ("remove", count([d.type_name for d in gp.remove])),
        ("create", count([t.name for t in gp.create])),
    ]
    return f"{gp.gpu.describe()}: " + "; ".join(f"{verb} {what}" for verb, what in parts if what)


def apply_config(
    entries: tuple[ConfigEntry, ...], host: HostRoot, tools: HostTools | None = None, source: str = ""
) -> Plan:
    """Plan and carry out the selected config; returns the plan that was executed."""
    inventory = Inventory(host, tools)
    plan = build_plan(entries, inventory, source)
    pending = [gp.gpu for gp in plan.changed if gp.enable_vfs]
    if pending:
        # VFs are a prerequisite, not a vGPU change: enable them, then plan again on what appeared.
        for gpu in pending:
            inventory.vfio.enable_vfs(gpu)
        inventory = Inventory(host, tools)
        plan = build_plan(entries, inventory, source)
        still = [gp.gpu.describe() for gp in plan.changed if gp.enable_vfs]
        if still:
            raise HostError(f"virtual functions did not appear after sriov-manage -e: {', '.join(still)}")
    for note in plan.notes:
        _log.warning(note)
    if plan.is_noop:
        return plan
    execute(plan, inventory)
    return plan


def execute(plan: Plan, inventory: Inventory) -> None:
    """Apply every changing GPU of ``plan``; raises ApplyError after rolling back on failure."""
    done: list[_Undo] = []
    for gp in plan.changed:
        backend = inventory.backend_for(gp.gpu)
        if backend is None:  # pragma: no cover - the plan only changes GPUs with a backend or removals
            raise HostError(f"{gp.gpu.describe()}: no backend")
        _log.info(_summary(gp))
        undo = _Undo(gp)
        done.append(undo)
        step = ""
        try:
            for device in gp.remove:
                step = f"remove {device.type_name} {device.key} from {gp.gpu.describe()}"
                backend.remove(device)
                undo.removed.append(device)
            if gp.enable_mixed_size:
                step = f"enable mixed-size vGPU mode on {gp.gpu.describe()}"
                backend.set_mixed_size(gp.gpu, True)
            for ordinal, vtype in enumerate(gp.create):
                step = f"create {vtype.name} #{ordinal + 1} on {gp.gpu.describe()}"
                undo.created.append(backend.create(gp.gpu, vtype, ordinal=ordinal))
        except (OSError, HostError) as exc:
            reason = (
                f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.errno else str(exc)
            )
            report = _rollback(done, inventory)
            raise ApplyError(f"step failed: {step}: {reason}\n" + "\n".join(report)) from None


def _rollback(done: list[_Undo], inventory: Inventory) -> list[str]:
    """Reverse the recorded writes, newest GPU first; returns one line of state per GPU."""
    lines = []
    for undo in reversed(done):
        gpu = undo.plan.gpu
        backend = inventory.backend_for(gpu)
        problems = []
        for device in reversed(undo.created):
            try:
                backend.remove(device)
            except (OSError, HostError) as exc:
                problems.append(f"could not remove new {device.type_name} {device.key}: {exc}")
        for device in reversed(undo.removed):
            info = TypeInfo(device.type_name, device.type_id, device.type_name, 1)
            try:
                backend.create(gpu, info, uuid=device.uuid, parent=device.parent)
            except (OSError, HostError) as exc:
                problems.append(f"could not restore {device.type_name} {device.key}: {exc}")
        if problems:
            lines.append(f"{gpu.describe()}: NOT restored: " + "; ".join(problems))
        elif undo.removed or undo.created:
            lines.append(f"{gpu.describe()}: rolled back to its previous devices")
        else:
            lines.append(f"{gpu.describe()}: unchanged")
    return lines
