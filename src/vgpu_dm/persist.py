"""``apply --persist=mdevctl``: mdevctl's definitions follow the layout apply made, so the vGPUs come
back at boot (mdevctl's udev rule creates every ``start: auto`` definition when its parent appears);
and, without it, a warning when mdevctl would bring back at boot what apply just changed.

For every GPU the config selects (mdev GPUs only: mdevctl knows nothing of vendor-VFIO VFs):

- each of its mdevs gets one ``start: auto`` definition (its UUID, parent and type directory); an
  existing definition of the same device and type keeps its attributes. A definition that differs is
  replaced in place by one atomic rename, so it is never missing, not even for a moment;
- every other ``start: auto`` definition on the GPU's mdev parents, and of its mdevs' UUIDs under other
  parents, is removed — except one whose UUID a libvirt VM names while that mdev will not exist: that
  removal needs ``--allow-assigned VM`` (the VM not running) or ``--force``, else apply refuses before
  its first write (the VM gets its mdev from that definition: ``virsh nodedev-start``, or at boot);
- ``start: manual`` definitions of other mdevs are left alone: mdevctl never starts them by itself, so
  they do not fight the layout, and they are someone's on-demand devices (``virsh nodedev-define``
  without autostart, an operator's ``mdevctl define``).

GPUs the config does not select keep their definitions. What persist will do is planned with the
vGPUs (``plan --persist``, ``apply --dry-run --persist``) and checked before the first write; the
files are written after the vGPUs. (reference/kvm-host.md §D, §E.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm import log
from vgpu_dm.errors import HostError, PlanError
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
from vgpu_dm.host.model import MDEV, VENDOR_VFIO, VGPUDevice
from vgpu_dm.host.pci import GPU, link_name
from vgpu_dm.plan import Plan, allowed_assigned, governing_entries

if TYPE_CHECKING:
    from vgpu_dm.host.root import HostRoot
    from vgpu_dm.spec.model import ConfigEntry

MDEVCTL = "mdevctl"
VFS_OFF = "sriov-vfs-off"
MANUAL_KEPT = "start=manual: mdevctl does not start it by itself, so it does not fight the layout"
_log = log.get("persist")


class Wanted(NamedTuple):
    """An mdev the GPU has (or will have) and its definition's parent and type directory."""

    uuid: str
    parent: str
    type_dir: str


class GPUPersist(NamedTuple):
    """What persist does to the definitions of one GPU."""

    gpu: GPU
    write: tuple[Definition, ...] = ()  # created or replaced (atomically)
    remove: tuple[Definition, ...] = ()
    kept: tuple[tuple[Definition, str], ...] = ()  # other definitions left as they are, and why
    new: int = 0  # vGPUs this run creates: their definitions are written once their UUIDs exist
    unchanged: int = 0
    later: str = ""  # why its definitions can only be decided during the run
    warnings: tuple[str, ...] = ()  # removals --allow-assigned or --force let through

    @property
    def changes(self) -> bool:
        return bool(self.write or self.remove or self.new)


class PersistPlan(NamedTuple):
    gpus: tuple[GPUPersist, ...]
    problems: tuple[str, ...] = ()


def persist_problems(persist: str, entries: tuple[ConfigEntry, ...], inventory: Inventory) -> list[str]:
    """What stops --persist before anything is written or planned: mdevctl missing, its directory
    unusable, a selected GPU known to use the vendor-specific VFIO framework."""
    if persist != MDEVCTL:  # pragma: no cover - the CLI offers only mdevctl
        return [f"--persist={persist}: unknown; the only choice is mdevctl"]
    problems = []
    if not inventory.mdevctl.installed:
        problems.append(
            f"--persist=mdevctl: {inventory.host.path(CONFIG_DIR)} does not exist: is mdevctl installed? "
            f"(its package creates that directory, and mdevctl refuses to run without it)"
        )
    else:
        problems += directory_problems(inventory.host, [])
    chosen = governing_entries(entries, inventory.gpus)
    for gpu in inventory.gpus:
        if gpu.index in chosen and known_vendor_vfio(inventory, gpu):
            problems.append(_vfio_problem(gpu))
    return problems


def check_persist(persist: str, entries: tuple[ConfigEntry, ...], inventory: Inventory) -> None:
    """Before anything is written (sriov-manage included): see persist_problems."""
    problems = persist_problems(persist, entries, inventory)
    if problems:
        raise PlanError(problems)


def known_vendor_vfio(inventory: Inventory, gpu: GPU) -> bool:
    """The GPU uses the vendor-specific VFIO framework, or will once its VFs are enabled.

    With its VFs off, an SR-IOV GPU does not say whether they will be mdev parents or vendor-VFIO VFs
    (host-interfaces.md §4); a vGPU type table that apply learned on its VFs under this driver release
    does (the tables are kept only for vendor-VFIO GPUs): the usual case after a reboot.
    """
    framework = inventory.framework(gpu)
    if framework == VENDOR_VFIO:
        return True
    return framework == VFS_OFF and inventory.vfio.learned_vendor_vfio(gpu)


def _vfio_problem(gpu: GPU, vfs_enabled: bool = False) -> str:
    enabled = (
        " (its SR-IOV virtual functions were enabled first, which is what told: harmless, no vGPU was "
        "changed)"
        if vfs_enabled
        else ""
    )
    return (
        f"--persist=mdevctl: {gpu.describe()} uses the vendor-specific VFIO framework, whose vGPUs are not "
        f"mdevs and cannot be persisted by mdevctl{enabled}; use the systemd unit (deploy/systemd) to apply "
        f"the config at boot instead"
    )


def directory_problems(host: HostRoot, parents: list[str], files: list[str] = ()) -> list[str]:
    """mdevctl's directory, the parents' directories in it and the definition files to replace must be
    usable, checked before the first write (a half-written set of definitions is worse than none)."""
    base = host.path(CONFIG_DIR)
    if not os.path.isdir(base):
        return [f"--persist=mdevctl: {base} is not a directory (mdevctl keeps its definitions there)"]
    problems = []
    if not os.access(base, os.W_OK | os.X_OK):
        problems.append(f"--persist=mdevctl: {base} is not writable by this user (run as root)")
    for parent in sorted(set(parents)):
        path = host.path(f"{CONFIG_DIR}/{parent}")
        if os.path.lexists(path) and not os.path.isdir(path):
            problems.append(
                f"--persist=mdevctl: {path} is not a directory: mdevctl keeps the definitions of the mdevs "
                f"on {parent} there (and skips this file); move it away"
            )
        elif os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"--persist=mdevctl: {path} is not writable by this user (run as root)")
    for rel in files:
        path = host.path(rel)
        if os.path.lexists(path) and not os.path.isfile(path):
            problems.append(f"--persist=mdevctl: {path} is not a regular file; move it away")
    return problems


def _type_dir(host: HostRoot, device: VGPUDevice) -> str:
    return link_name(host, f"{MDEV_DEVICES}/{device.uuid}/mdev_type") or f"nvidia-{device.type_id}"


def plan_persist(
    plan: Plan, inventory: Inventory, force: bool = False, allow_assigned: tuple[str, ...] = ()
) -> PersistPlan:
    """What persist will do after ``plan`` is applied, and what stops it (read-only).

    The GPUs' mdevs after the run are the ones kept and the ones recreated under their old UUIDs; the
    new ones get their UUIDs only when created (counted in ``new``). GPUs whose VFs are off are
    decided after they are enabled (``later``).
    """
    host = inventory.host
    gpus: list[GPUPersist] = []
    problems: list[str] = []
    for gp in plan.gpus:
        if gp.framework == VENDOR_VFIO or (gp.framework == VFS_OFF and known_vendor_vfio(inventory, gp.gpu)):
            problems.append(_vfio_problem(gp.gpu, gp.gpu.address in plan.vfs_enabled))
            continue
        if gp.framework == VFS_OFF:
            why = (
                "its SR-IOV virtual functions are enabled first; only they show whether it is an mdev GPU "
                "(its definitions are decided then) or a vendor-VFIO one (refused: mdevctl cannot persist it)"
            )
            gpus.append(GPUPersist(gp.gpu, later=why))
            continue
        if gp.framework != MDEV:
            continue
        removed = {d.uuid: d for d in gp.remove}
        desired = [Wanted(d.uuid, d.parent, _type_dir(host, d)) for d in gp.keep if d.uuid]
        new = 0
        for ordinal in range(len(gp.create)):
            uuid, parent = gp.pin(ordinal)
            if uuid and parent and uuid in removed:
                desired.append(Wanted(uuid, parent, _type_dir(host, removed[uuid])))
            else:
                new += 1
        result, found = _reconcile(gp.gpu, desired, new, inventory, force, allow_assigned)
        gpus.append(result)
        problems += found
    return PersistPlan(tuple(gpus), tuple(problems))


def check_plan(
    plan: Plan, inventory: Inventory, force: bool = False, allow_assigned: tuple[str, ...] = ()
) -> PersistPlan:
    """Before the first vGPU write (and before enabling VFs): raise PlanError for what persist could
    not do after ``plan``; returns what it will do."""
    planned = plan_persist(plan, inventory, force, allow_assigned)
    if planned.problems:
        raise PlanError(list(planned.problems))
    return planned


def _reconcile(
    gpu: GPU,
    desired: list[Wanted],
    new: int,
    inventory: Inventory,
    force: bool,
    allow_assigned: tuple[str, ...],
) -> tuple[GPUPersist, list[str]]:
    """The definitions of one mdev GPU that is to have the mdevs ``desired`` (+ ``new`` unnamed ones)."""
    index = inventory.mdevctl
    parents = inventory.mdev.parents(gpu)
    wanted = {w.uuid: w for w in desired}
    by_path = {(d.parent, d.uuid): d for d in index.definitions}
    write: list[Definition] = []
    unchanged = 0
    for w in sorted(desired):
        old = by_path.get((w.parent, w.uuid))
        attrs = old.attrs if old is not None and old.mdev_type == w.type_dir else ()
        definition = Definition(w.parent, w.uuid, w.type_dir, AUTO, attrs)
        if old is not None and definition_text(*definition[2:]) == definition_text(*old[2:]):
            unchanged += 1
        else:
            write.append(definition)
    others = index.on_parents(parents)
    others += [d for uuid in wanted for d in index.for_uuid(uuid) if d not in others]
    remove: list[Definition] = []
    kept: list[tuple[Definition, str]] = []
    problems: list[str] = []
    warnings: list[str] = []
    for definition in others:
        mine = wanted.get(definition.uuid)
        if mine is not None and mine.parent == definition.parent:
            continue  # written above (replaced in place) or already right
        if not definition.auto and mine is None:
            kept.append((definition, MANUAL_KEPT))
            continue
        if mine is None:
            # Its mdev will not exist after this run: a VM that names it gets it only from this file.
            domains = inventory.domains.for_mdev(definition.uuid)
            blocking = [d for d in domains if not (force or allowed_assigned(d, allow_assigned))]
            if blocking:
                who = ", ".join(d.describe() for d in blocking)
                kept.append((definition, f"named by {who}"))
                problems.append(_assigned_problem(inventory, gpu, definition, blocking))
                continue
            if domains:
                flag = "--force" if force else "--allow-assigned"
                warnings.append(
                    f"{flag}: removing mdevctl definition {definition.uuid} on {definition.parent}, which "
                    f"{', '.join(d.describe() for d in domains)} names; that VM will not get its vGPU until "
                    f"its definition is changed"
                )
        remove.append(definition)
    files = [d.path for d in write]
    used = [w.parent for w in desired] + (parents if new else [])
    problems += directory_problems(inventory.host, used, files)
    result = GPUPersist(gpu, tuple(write), tuple(remove), tuple(kept), new, unchanged, "", tuple(warnings))
    return result, problems


def _assigned_problem(inventory: Inventory, gpu: GPU, definition: Definition, blocking) -> str:
    running = [d for d in blocking if d.running]
    if running:
        hint = "stop the VM and change its definition first, or pass --force"
    else:
        flags = " ".join(f"--allow-assigned {d.name}" for d in blocking)
        hint = f"change or undefine the VM first, or pass {flags}"
    who = ", ".join(d.describe() for d in blocking)
    return (
        f"--persist=mdevctl: {gpu.describe()}: mdevctl definition {definition.uuid} "
        f"({definition.mdev_type}, start={definition.start}) in {inventory.host.path(definition.path)} "
        f"is named by {who}; the layout has no such mdev, so persist would remove the definition and the VM "
        f"could not get its vGPU: {hint} (or run apply without --persist)"
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


def sync_mdevctl(
    plan: Plan, inventory: Inventory, force: bool = False, allow_assigned: tuple[str, ...] = ()
) -> list[str]:
    """After the vGPU changes: make the definitions of the planned mdev GPUs match their mdevs now;
    returns one line per GPU whose definitions changed. Writes come before removals, each atomic."""
    host = inventory.host
    done: list[str] = []
    for gp in plan.gpus:
        gpu = gp.gpu
        if inventory.framework(gpu) != MDEV:
            continue
        devices = [d for d in inventory.devices(gpu) if d.uuid]
        desired = [Wanted(d.uuid, d.parent, _type_dir(host, d)) for d in devices if d.uuid]
        result, problems = _reconcile(gpu, desired, 0, inventory, force, allow_assigned)
        for problem in problems:
            # Checked before the first write; something changed since: keep the file, say so.
            _log.warning(f"{problem}; the definition was left in place")
        for warning in result.warnings:
            _log.warning(warning)
        for definition, why in result.kept:
            _log.info(
                f"{gpu.describe()}: mdevctl definition {definition.uuid} on {definition.parent} left as it "
                f"is ({why})"
            )
        written = removed = 0
        try:
            for definition in result.write:
                write_definition(host, definition)
                written += 1
                _log.debug(f"mdevctl: wrote {host.path(definition.path)}")
            for definition in result.remove:
                remove_definition(host, definition)
                removed += 1
                _log.debug(f"mdevctl: removed {host.path(definition.path)}")
        except OSError as exc:
            where = exc.filename or host.path(CONFIG_DIR)
            raise HostError(
                "\n".join(
                    [
                        f"--persist=mdevctl: {where}: {exc.strerror or exc}",
                        f"the vGPU changes were made; {gpu.describe()}: {written} of {len(result.write)} "
                        f"definition(s) written and {removed} of {len(result.remove)} removed before this; "
                        f"{', '.join(done) or 'no other GPU had definitions to change'}",
                        "run apply --persist=mdevctl again once the cause is fixed",
                    ]
                )
            ) from None
        if written or removed:
            line = (
                f"{gpu.describe()}: mdevctl definitions now match its {len(desired)} vGPU(s) "
                f"({written} written, {removed} removed, {result.unchanged} already right)"
            )
            _log.info(line)
            done.append(line)
    return done


def persist_report(
    persist: str,
    plan: Plan,
    entries: tuple[ConfigEntry, ...],
    inventory: Inventory,
    force: bool = False,
    allow_assigned: tuple[str, ...] = (),
) -> dict:
    """What ``apply --persist`` would do to mdevctl's definitions, as data for the plan preview."""
    problems = persist_problems(persist, entries, inventory)
    planned = plan_persist(plan, inventory, force, allow_assigned)
    problems += [p for p in planned.problems if p not in problems]

    def item(definition: Definition, why: str | None = None) -> dict:
        found = {
            "uuid": definition.uuid,
            "parent": definition.parent,
            "type": definition.mdev_type,
            "start": definition.start,
        }
        if why is not None:
            found["why"] = why
        return found

    return {
        "tool": persist,
        "gpus": [
            {
                "index": g.gpu.index,
                "address": g.gpu.address,
                "write": [item(d) for d in g.write],
                "remove": [item(d) for d in g.remove],
                "kept": [item(d, why) for d, why in g.kept],
                "new": g.new,
                "unchanged": g.unchanged,
                "later": g.later or None,
                "warnings": list(g.warnings),
            }
            for g in planned.gpus
        ],
        "problems": problems,
    }
