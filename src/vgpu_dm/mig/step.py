"""The MIG step of apply: bring MIG mode and GPU instances to what the selected config needs, with
nvidia-mig-parted, before the vGPUs are planned.

Order (host-interfaces.md 3.2, 3.6): vGPUs live in GPU instances, and instances in use cannot be
destroyed, so a GPU whose MIG layout changes loses its vGPUs first (checked for use before any write,
journaled like any removal). MIG mode cannot be switched off while SR-IOV VFs are enabled, so those VFs
are disabled first; enabling VFs destroys GPU instances, so VFs a MIG GPU needs are enabled after the
mode change and before the instances are made. Only GPUs whose MIG state differs are given to
mig-parted (one entry per GPU), because its mode step clears the instances of every GPU it walks.

If mig-parted fails, the GPUs are put back: the previous MIG layout (from ``mig-parted export``), the
VFs, then the same vGPUs (same UUIDs or VFs). A mode change that waits for a GPU reset is reported as
such: it stays pending until the next reset or reboot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vgpu_dm import catalog, log
from vgpu_dm.errors import ApplyError, HostError, PlanError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.model import VGPUDevice
from vgpu_dm.host.pci import GPU, is_pci_address
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig.parted import MigParted, MigPartedMissing, output
from vgpu_dm.mig.translate import entry_config, mig_parted_config
from vgpu_dm.spec.model import ConfigEntry

if TYPE_CHECKING:
    from vgpu_dm.apply import ApplyOptions

_log = log.get("mig")


class MigStepError(ApplyError):
    """nvidia-mig-parted could not bring the GPUs into the MIG state the config needs."""


class MigModePending(MigStepError):
    """A MIG mode change waits for a GPU reset or a reboot (the agent may reboot the node for it)."""


@dataclass
class _Work:
    """What the step changed so far, to undo it."""

    removed: dict[str, list[VGPUDevice]] = field(default_factory=dict)  # GPU address → devices
    vfs_before: dict[str, bool] = field(default_factory=dict)  # GPU address → VFs were enabled


def mig_capable(gpu: GPU) -> bool:
    model = catalog.for_device(gpu.device_id)
    return bool(model and model.mig_gi_profiles)


def _one(name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": "v1", "mig-configs": {name: items}}


def prepare_mig(
    entries: tuple[ConfigEntry, ...],
    name: str,
    host: HostRoot,
    tools: HostTools | None,
    source: str = "",
    force: bool = False,
    options: ApplyOptions | None = None,
) -> bool:
    """Run the MIG step; returns True if it changed anything. Raises before any write when it cannot."""

    tools = tools or HostTools()
    inventory = Inventory(host, tools)
    by_index = {g.index: g for g in inventory.gpus}
    found = changing_gpus(entries, name, inventory, source)
    if found is None:
        return False
    parted, per_gpu, changing = found
    _precheck(entries, inventory, source, force, changing)
    mode_change = [i for i in changing if not parted.holds(_one(name, [per_gpu[i]]), "--mode-only")]
    _check_removals(changing, by_index, inventory, force, options.allow_assigned if options else ())
    before = parted.export()
    for i in changing:
        gpu, item = by_index[i], per_gpu[i]
        if item["mig-enabled"]:
            what = ", ".join(f"{n} x {p}" for p, n in item["mig-devices"].items())
            verb = "MIG mode on, GPU instances" if i in mode_change else "GPU instances"
            _log.info(f"{gpu.describe()}: {verb} {what} (nvidia-mig-parted)")
        else:
            _log.info(f"{gpu.describe()}: MIG mode off (nvidia-mig-parted)")
    stop = options.stop if options else None
    if stop is not None and stop.is_set():
        from vgpu_dm.errors import ApplyInterrupted

        raise ApplyInterrupted("apply interrupted before it changed anything; every GPU is unchanged")
    before_change = options.before_change if options else None
    if before_change is not None:
        before_change([by_index[i] for i in changing])  # the pre-change hooks, before the first write
    work = _Work(vfs_before={by_index[i].address: bool(by_index[i].vfs) for i in changing})
    _remove_vgpus(changing, by_index, inventory, force, options, name, work)
    try:
        _change(parted, name, per_gpu, changing, mode_change, by_index, host, tools, work)
    except MigStepError as exc:
        report = _put_back(parted, name, before, changing, host, tools, work)
        raise type(exc)("\n".join([str(exc), *report])) from None
    return True


def changing_gpus(
    entries: tuple[ConfigEntry, ...], name: str, inventory: Inventory, source: str = ""
) -> tuple[MigParted, dict[int, dict[str, Any]], list[int]] | None:
    """Read-only: the GPUs (indices) whose MIG state differs from what the config needs, with the
    one-GPU mig-parted entry of every selected GPU; None when nothing needs to change (or MIG is not
    involved, or mig-parted is missing and only time-sliced types are wanted)."""
    from vgpu_dm.plan import governing_entries

    wants_mig = any(e.is_mig_backed for e in entries)
    chosen = governing_entries(entries, inventory.gpus)
    by_index = {g.index: g for g in inventory.gpus}
    # MIG GPUs are SR-IOV GPUs: others never need the catalog looked at.
    if not wants_mig and not any(by_index[i].sriov_capable and mig_capable(by_index[i]) for i in chosen):
        return None
    config = mig_parted_config(name, entries, source)
    parted = MigParted(inventory.host, getattr(inventory.tools, "mig_parted", "nvidia-mig-parted"))
    try:
        if parted.holds(config):
            _log.debug("MIG mode and GPU instances already match the config (nvidia-mig-parted assert)")
            return None
    except MigPartedMissing as exc:
        if wants_mig:
            raise HostError(
                f"the config has MIG-backed vGPU types, which need nvidia-mig-parted to prepare the GPUs, "
                f"but {exc}; install it, point --mig-parted at it, or pass --skip-mig if the GPU "
                f"instances are already there"
            ) from None
        _log.debug(f"{exc}; MIG mode of the MIG-capable GPUs is left as it is")
        return None
    per_gpu = {i: entry_config(chosen[i], devices=[i]) for i in sorted(chosen)}
    changing = [i for i in sorted(chosen) if not parted.holds(_one(name, [per_gpu[i]]))]
    if not changing:
        proc = parted.run("assert", config)
        raise HostError(
            "nvidia-mig-parted says the config's MIG state is not applied, yet holds it for every GPU on its "
            f"own (do its GPU indices differ from ours?): {output(proc)}"
        )
    return parted, per_gpu, changing


def _precheck(entries, inventory: Inventory, source: str, force: bool, changing: list[int]) -> None:
    """Everything the vGPU plan can tell before the MIG step writes anything: the GPUs it leaves alone
    must plan cleanly; the GPUs it changes must be MIG GPUs whose catalog knows the wanted types and
    counts (their driver offers MIG-backed types only once the instances exist)."""
    from vgpu_dm.plan import build_plan, governing_entries

    plan = build_plan(entries, inventory, source, force=force, strict=False)
    problems = [p for index, found in plan.problems.items() if index not in changing for p in found]
    chosen = governing_entries(entries, inventory.gpus)
    for gpu in inventory.gpus:
        if gpu.index not in changing:
            continue
        entry = chosen[gpu.index]
        model = catalog.for_device(gpu.device_id)
        label = f"{gpu.describe()} [{entry.path}]"
        if entry.is_mig_backed and not (model and model.mig_gi_profiles):
            what = model.name if model else "this GPU"
            problems.append(
                f"{label}: MIG-backed vGPU types, but {what} has no MIG (or its profiles are unknown)"
            )
            continue
        if model is None:
            continue
        for vtype, count in entry.wanted().items():
            bare = vtype.without_attribute()
            known = model.vgpu_types.get(vtype.name) or (model.vgpu_types.get(bare.name) if bare else None)
            if known is None:
                problems.append(f"{label}: vGPU type {vtype.name} is not a type of the {model.name}")
            elif count > known:
                problems.append(
                    f"{label}: {count} x {vtype.name} requested, but the GPU holds at most {known}"
                )
    if problems:
        raise PlanError(problems)


def _check_removals(
    changing: list[int],
    by_index: dict[int, GPU],
    inventory: Inventory,
    force: bool,
    allow_assigned: tuple[str, ...] = (),
) -> None:
    from vgpu_dm.plan import ASSIGNED_MARK, allowed_assigned

    problems = []
    for i in changing:
        gpu = by_index[i]
        for device in inventory.devices(gpu):
            holders = inventory.holders.holders(device, required=not force)
            if holders and not force:
                who = ", ".join(str(h) for h in holders)
                problems.append(
                    f"{gpu.describe()}: {device.type_name} {device.key} is in use by {who}; the GPU's MIG "
                    f"layout changes, which removes all its vGPUs: stop the VM first, or pass --force"
                )
                continue
            # The vGPUs made after the MIG change are new ones: a VM defined with this one loses it.
            blocking = [
                d for d in inventory.assigned(device) if not (force or allowed_assigned(d, allow_assigned))
            ]
            if blocking:
                vms = ", ".join(d.describe() for d in blocking)
                problems.append(
                    f"{gpu.describe()}: {device.type_name} {device.key}{ASSIGNED_MARK}{vms}; the GPU's MIG "
                    f"layout changes, which removes all its vGPUs: change the VM first, or pass "
                    f"--allow-assigned or --force"
                )
    if problems:
        raise PlanError(problems)


def _remove_vgpus(changing, by_index, inventory: Inventory, force, options, name, work: _Work) -> None:
    from vgpu_dm.apply import ApplyOptions, execute
    from vgpu_dm.plan import GPUPlan, Plan

    plans = []
    for i in changing:
        gpu = by_index[i]
        devices = inventory.devices(gpu)
        if devices:
            backend = inventory.backend_for(gpu)
            plans.append(GPUPlan(gpu, backend.framework, None, {}, remove=tuple(devices)))  # type: ignore[arg-type]
            work.removed[gpu.address] = devices
    if plans:
        # The same journal and exact rollback as any removal.
        execute(Plan(gpus=tuple(plans)), inventory, options or ApplyOptions(force=force), name)


def _sriov(host: HostRoot, tools: HostTools, flag: str, gpu: GPU) -> None:
    if not is_pci_address(gpu.address):
        raise MigStepError(f"refusing to pass {gpu.address!r} to sriov-manage: not a PCI address")
    from vgpu_dm.host.programs import Programs

    try:
        # sriov-manage belongs to the driver: with a containerised driver it is only in the driver root.
        proc = Programs(host, tools).run([tools.sriov_manage, flag, gpu.address], "sriov-manage")
    except HostError as exc:
        raise MigStepError(str(exc)) from None
    if proc.returncode != 0:
        raise MigStepError(f"{gpu.describe()}: 'sriov-manage {flag} {gpu.address}' failed: {output(proc)}")


def _change(parted, name, per_gpu, changing, mode_change, by_index, host, tools, work: _Work) -> None:
    for i in mode_change:
        gpu = by_index[i]
        if not per_gpu[i]["mig-enabled"] and gpu.vfs:
            # MIG mode cannot be switched off while VFs are enabled (host-interfaces.md 3.6).
            _log.info(f"{gpu.describe()}: disabling SR-IOV virtual functions to leave MIG mode")
            _sriov(host, tools, "-d", gpu)
    if mode_change:
        items = [per_gpu[i] for i in mode_change]
        proc = parted.run("apply", _one(name, items), "--mode-only")
        pending = [i for i in mode_change if not parted.holds(_one(name, [per_gpu[i]]), "--mode-only")]
        # mig-parted resets the GPUs itself after a mode change; "error resetting all GPUs" is its word
        # for a reset that could not run (NVIDIA/mig-parted cmd/nvidia-mig-parted/apply/mode.go).
        if pending and (proc.returncode == 0 or "resetting" in output(proc).lower()):
            gpus = ", ".join(by_index[i].describe() for i in pending)
            raise MigModePending(
                f"{gpus}: the MIG mode change needs a GPU reset or a reboot, which nvidia-mig-parted "
                f"could not do, so it is pending (a reset or reboot will switch the mode); stop the programs "
                f"that hold the GPU (nvidia-smi, DCGM, nv-hostengine) and run apply again, or reboot and run "
                f"apply again. nvidia-mig-parted said:\n  {_indent(output(proc))}"
            )
        if proc.returncode != 0:
            raise MigStepError(f"nvidia-mig-parted apply --mode-only failed:\n  {_indent(output(proc))}")
    # VFs a MIG GPU needs are enabled now: doing it later would destroy the instances (3.2, 3.6).
    fresh = {g.index: g for g in Inventory(host, tools).gpus}
    for i in changing:
        gpu = fresh[i]
        if per_gpu[i]["mig-enabled"] and gpu.sriov_capable and not gpu.vfs and gpu.driver == "nvidia":
            _log.info(f"{gpu.describe()}: enabling SR-IOV virtual functions (sriov-manage -e {gpu.address})")
            _sriov(host, tools, "-e", gpu)
    proc = parted.run("apply", _one(name, [per_gpu[i] for i in changing]))
    if proc.returncode != 0:
        raise MigStepError(f"nvidia-mig-parted apply failed:\n  {_indent(output(proc))}")


def _put_back_mig(parted, name, prev: dict[str, Any], index: int, host, tools, work: _Work) -> None:
    """One GPU back to its MIG mode, VF state and instances from before the step (in that order:
    leaving MIG mode needs the VFs off, and enabling VFs destroys instances)."""
    gpu = next(g for g in Inventory(host, tools).gpus if g.index == index)
    one = _one(name, [prev])
    if not parted.holds(one, "--mode-only"):
        if gpu.vfs:
            _sriov(host, tools, "-d", gpu)
        proc = parted.run("apply", one, "--mode-only")
        if proc.returncode != 0:
            raise MigStepError(
                f"{gpu.describe()}: its previous MIG mode could not be restored: {_indent(output(proc))}"
            )
        gpu = next(g for g in Inventory(host, tools).gpus if g.index == index)
    wanted_vfs = work.vfs_before.get(gpu.address, False)
    if gpu.vfs and not wanted_vfs:
        _sriov(host, tools, "-d", gpu)
    elif not gpu.vfs and wanted_vfs:
        _sriov(host, tools, "-e", gpu)
    if not parted.holds(one):
        proc = parted.run("apply", one)
        if proc.returncode != 0:
            raise MigStepError(
                f"{gpu.describe()}: the previous MIG layout could not be restored: {_indent(output(proc))}"
            )


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def _previous(before: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
    """The exported entry that covers GPU ``index``, as a one-GPU entry."""
    if not before:
        return None
    for items in (before.get("mig-configs") or {}).values():
        for item in items or []:
            devices = item.get("devices")
            if devices == "all" or (isinstance(devices, list) and index in devices):
                out = {"devices": [index], "mig-enabled": bool(item.get("mig-enabled"))}
                if out["mig-enabled"]:
                    out["mig-devices"] = dict(item.get("mig-devices") or {})
                return out
    return None


def _put_back(parted, name, before, changing, host, tools, work: _Work) -> list[str]:
    """Undo the step: MIG layout, VFs, vGPUs. Returns one line per GPU."""
    from vgpu_dm.apply import _restore

    lines = []
    for i in changing:
        prev = _previous(before, i)
        if prev is None:
            lines.append(f"GPU {i}: its previous MIG layout is unknown (nvidia-mig-parted export failed)")
            continue
        try:
            _put_back_mig(parted, name, prev, i, host, tools, work)
        except MigStepError as exc:
            lines.append(str(exc))
    inventory = Inventory(host, tools)
    by_address = {g.address: g for g in inventory.gpus}
    for address, devices in work.removed.items():
        gpu = by_address.get(address)
        backend = inventory.backend_for(gpu) if gpu else None
        problems = []
        for device in devices:
            try:
                if backend is None:
                    raise HostError("the GPU has no vGPU parents now")
                _restore(gpu, backend, device)
            except (OSError, HostError) as exc:
                problems.append(f"{device.type_name} {device.key}: {exc}")
        label = gpu.describe() if gpu else address
        if problems:
            lines.append(f"{label}: NOT all vGPUs restored ({'; '.join(problems)}); run apply again")
        else:
            lines.append(f"{label}: its {len(devices)} vGPU(s) were put back as they were")
    return lines
