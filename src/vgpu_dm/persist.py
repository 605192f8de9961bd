"""``apply --persist=mdevctl``: mdevctl's definitions follow the layout apply made, so the vGPUs come
back at boot (mdevctl's udev rule creates every ``start: auto`` definition when its parent appears);
and, without it, a warning when mdevctl would bring back at boot what apply just changed.

For every GPU the config selects (mdev GPUs only: mdevctl knows nothing of vendor-VFIO VFs), the
definitions on the GPU's mdev parents become exactly its vGPUs: one ``start: auto`` definition per
mdev (its UUID, parent and type directory; attributes of an existing definition of the same device
are kept), and every other definition on those parents — or of those UUIDs under other parents — is
removed. GPUs the config does not select keep their definitions. (reference/kvm-host.md §E.)
"""

from __future__ import annotations

from vgpu_dm import log
from vgpu_dm.errors import PlanError
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.host.mdev import MDEV_DEVICES
from vgpu_dm.host.mdevctl import (
    AUTO,
    CONFIG_DIR,
    Definition,
    definition_text,
    remove_definition,
    write_definition,
)
from vgpu_dm.host.model import MDEV
from vgpu_dm.host.pci import link_name
from vgpu_dm.plan import Plan, governing_entries
from vgpu_dm.spec.model import ConfigEntry

MDEVCTL = "mdevctl"
_log = log.get("persist")


def check_persist(persist: str, entries: tuple[ConfigEntry, ...], inventory: Inventory) -> None:
    """Before anything is written: mdevctl is installed and no selected GPU is a vendor-VFIO one."""
    if persist != MDEVCTL:  # pragma: no cover - the CLI offers only mdevctl
        raise PlanError([f"--persist={persist}: unknown; the only choice is mdevctl"])
    problems = []
    if not inventory.mdevctl.installed:
        problems.append(
            f"--persist=mdevctl: {inventory.host.path(CONFIG_DIR)} does not exist: is mdevctl installed? "
            f"(its package creates that directory, and mdevctl refuses to run without it)"
        )
    chosen = governing_entries(entries, inventory.gpus)
    for gpu in inventory.gpus:
        if gpu.index in chosen and inventory.framework(gpu) == "vendor-vfio":
            problems.append(_vfio_problem(gpu))
    if problems:
        raise PlanError(problems)


def check_plan(persist: str, plan: Plan) -> None:
    """After planning (and enabling VFs): every GPU the config selects is an mdev GPU."""
    problems = [_vfio_problem(gp.gpu) for gp in plan.gpus if gp.framework not in (MDEV, "sriov-vfs-off")]
    if problems:
        raise PlanError(problems)


def _vfio_problem(gpu) -> str:
    return (
        f"--persist=mdevctl: {gpu.describe()} uses the vendor-specific VFIO framework, whose vGPUs are not "
        f"mdevs and cannot be persisted by mdevctl; use the systemd unit (deploy/systemd) to apply the "
        f"config at boot instead"
    )


def mdevctl_conflicts(plan: Plan, inventory: Inventory) -> list[str]:
    """Warnings for changing mdev GPUs whose parents carry ``start: auto`` definitions the new layout
    does not have: at the next boot mdevctl creates those mdevs again, against this layout."""
    notes: list[str] = []
    changing = [gp for gp in plan.changed if gp.framework == MDEV]
    for gp in changing:
        parents = inventory.mdev.parents(gp.gpu)
        stays = {d.uuid for d in gp.keep} | {u for u, _ in gp.pins if u}
        stale = sorted(
            d.uuid for d in inventory.mdevctl.on_parents(parents) if d.auto and d.uuid not in stays
        )
        if stale:
            shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
            notes.append(
                f"{gp.gpu.describe()}: mdevctl defines {len(stale)} mdev(s) with start=auto on this GPU "
                f"that the new layout does not have ({shown}); mdevctl creates them again when the GPU "
                f"appears at boot, against this layout: pass --persist=mdevctl to make its definitions "
                f"follow the layout, or remove them (mdevctl undefine --uuid UUID)"
            )
    if changing:
        notes.extend(inventory.mdevctl.warnings)
    return notes


def sync_mdevctl(plan: Plan, inventory: Inventory) -> list[str]:
    """Make the definitions of the planned mdev GPUs match their devices now; returns what was done."""
    host = inventory.host
    done: list[str] = []
    index = inventory.mdevctl
    for gp in plan.gpus:
        gpu = gp.gpu
        if inventory.framework(gpu) != MDEV:
            continue
        devices = inventory.devices(gpu)
        wanted = {
            d.uuid: (d.parent, link_name(host, f"{MDEV_DEVICES}/{d.uuid}/mdev_type") or f"nvidia-{d.type_id}")
            for d in devices
            if d.uuid
        }
        existing = index.on_parents(inventory.mdev.parents(gpu))
        existing += [d for u in wanted for d in index.for_uuid(u) if d not in existing]
        written = removed = unchanged = 0
        for definition in existing:
            if wanted.get(definition.uuid) != (definition.parent, definition.mdev_type):
                remove_definition(host, definition)
                removed += 1
                _log.debug(f"mdevctl: removed {host.path(definition.path)}")
        for uuid, (parent, type_dir) in sorted(wanted.items()):
            old = next(
                (d for d in existing if d.uuid == uuid and d.parent == parent and d.mdev_type == type_dir),
                None,
            )
            new = Definition(parent, uuid, type_dir, AUTO, old.attrs if old else ())
            if old is not None and definition_text(*new[2:]) == definition_text(*old[2:]):
                unchanged += 1
                continue
            write_definition(host, new)
            written += 1
            _log.debug(f"mdevctl: wrote {host.path(new.path)}")
        if written or removed:
            line = (
                f"{gpu.describe()}: mdevctl definitions now match its {len(wanted)} vGPU(s) "
                f"({written} written, {removed} removed, {unchanged} already right)"
            )
            _log.info(line)
            done.append(line)
    return done
