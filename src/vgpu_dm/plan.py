"""Plan: from the selected config and what the host has, decide per GPU what to keep, remove and
create — and check every requested type and count before anything is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm.errors import ASSIGNED, IN_USE, HeldProblem, HostError, PlanError
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.host.model import UNRESOLVED, VENDOR_VFIO, TypeInfo, VGPUDevice, framebuffer_of, unnamed
from vgpu_dm.host.pci import GPU
from vgpu_dm.plan_mig import MigChange, MigPlan
from vgpu_dm.spec.model import ConfigEntry
from vgpu_dm.text import did_you_mean
from vgpu_dm.vgpu_type import VGPUType

if TYPE_CHECKING:
    from vgpu_dm.mig.state import MigState


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class GPUPlan(NamedTuple):
    """What happens to one GPU that the config selects."""

    gpu: GPU
    framework: str
    entry: ConfigEntry
    wanted: dict[str, int]  # driver type name → count
    keep: tuple[VGPUDevice, ...] = ()
    remove: tuple[VGPUDevice, ...] = ()
    create: tuple[TypeInfo, ...] = ()
    enable_vfs: bool = False  # run sriov-manage first, then plan this GPU again
    enable_mixed_size: bool = False  # switch on heterogeneous mode between removals and creations
    disable_mixed_size: bool = False  # back to equal-size mode there (the GPU returns to one size)
    # Per entry of ``create``: the (UUID, parent) of a removed vGPU of the same type that it recreates,
    # so a VM definition naming that mdev UUID or VF stays valid; (None, None) for a new vGPU.
    pins: tuple[tuple[str | None, str | None], ...] = ()
    # Vendor VFIO: VFs whose vGPU this plan removes while a defined VM names them; no other vGPU goes
    # there (the VM would start with another type). With --force they are used last instead.
    skip_vfs: frozenset[str] = frozenset()
    last_vfs: frozenset[str] = frozenset()

    def pin(self, ordinal: int) -> tuple[str | None, str | None]:
        return self.pins[ordinal] if ordinal < len(self.pins) else (None, None)

    @property
    def recreated(self) -> frozenset[str]:
        """Keys (UUID or VF) of removed vGPUs that this plan creates again, same type, same key."""
        return frozenset(uuid or parent for uuid, parent in self.pins if uuid or parent)

    # Its MIG mode or GPU instances change first (all its vGPUs go; ``create`` is then re-planned on
    # what the new instances offer).
    mig: MigChange | None = None

    @property
    def changes(self) -> bool:
        return bool(self.remove or self.create or self.enable_vfs or self.mig)


class Plan(NamedTuple):
    gpus: tuple[GPUPlan, ...]
    unselected: tuple[GPU, ...] = ()
    notes: tuple[str, ...] = ()
    vfs_enabled: frozenset[str] = frozenset()  # GPUs whose VFs this run enabled (for true reports)
    # Only with build_plan(strict=False), for previews: what would stop an apply, per GPU index
    # (None: problems of the config as a whole, such as an index the host does not have).
    problems: Mapping[int | None, tuple[str, ...]] = MappingProxyType({})  # shared, so read-only
    # Only with strict=False: the plans of GPUs left out because a VM holds or is defined to use a vGPU
    # they would remove (what apply would do with --force), for previews to show.
    blocked: tuple[GPUPlan, ...] = ()
    # The MIG stage's whole-host part (None: MIG state not read: not involved, or --skip-mig).
    mig: MigPlan | None = None

    @property
    def all_problems(self) -> list[str]:
        return [p for found in self.problems.values() for p in found]

    @property
    def changed(self) -> tuple[GPUPlan, ...]:
        return tuple(p for p in self.gpus if p.changes)

    @property
    def is_noop(self) -> bool:
        return not self.changed and not (self.mig and self.mig.cancel_pending)

    @property
    def mig_changes(self) -> tuple[GPUPlan, ...]:
        return tuple(p for p in self.gpus if p.mig is not None)

    @property
    def writes(self) -> int:
        return sum(len(p.remove) + len(p.create) for p in self.gpus)


def governing_entries(entries: tuple[ConfigEntry, ...], gpus: list[GPU]) -> dict[int, ConfigEntry]:
    """GPU index → the entry that decides its layout (a later entry wins over an earlier one)."""
    chosen: dict[int, ConfigEntry] = {}
    for entry in entries:
        for gpu in gpus:
            if entry.selects(gpu.index, gpu.device_id):
                chosen[gpu.index] = entry
    return chosen


def dra_owned_problems(entries: tuple[ConfigEntry, ...], inventory: Inventory) -> dict[int, str]:
    """GPU index → why a static layout must not touch it: the config selects a GPU the DRA driver owns
    (its vGPUs come and go with ResourceClaims). Asked by build_plan, and by apply and the agent before
    anything else — the MIG step, operand pauses — so that no path writes to such a GPU."""
    chosen = governing_entries(entries, inventory.gpus)
    owned = inventory.dra_owned if chosen else None
    if owned is None:
        return {}
    return {
        gpu.index: (
            f"{gpu.describe()} [{chosen[gpu.index].path}]: {owned.describe(inventory.host, gpu.address)}; "
            f"select a config that leaves this GPU out, or hand it back first (docs/dra.md, 'Giving a GPU "
            f"back')"
        )
        for gpu in inventory.gpus
        if gpu.index in chosen and gpu.address in owned.gpus
    }


def refuse_dra_owned(entries: tuple[ConfigEntry, ...], inventory: Inventory) -> None:
    """Raise PlanError (nothing written) if the config selects a GPU the DRA driver owns."""
    problems = dra_owned_problems(entries, inventory)
    if problems:
        raise PlanError(list(problems.values()))


def _matches_as_is(
    wanted: dict[VGPUType, int], current: list[VGPUDevice], offers: Callable[[str], bool]
) -> bool:
    """True when the devices already are the wanted ones.

    A device of the bare type stands for a wanted ``…GFX``/``…ME`` type only when the driver does not
    offer the suffixed name itself (the same fallback apply uses when creating).
    """
    have = Counter(d.type_name for d in current)
    used: set[str] = set()
    for vtype, count in wanted.items():
        bare = vtype.without_attribute()
        if vtype.name in have:
            name = vtype.name
        elif bare and bare.name in have and not offers(vtype.name):
            name = bare.name
        else:
            name = None
        if name is None or have[name] != count or name in used:
            return False
        used.add(name)
    return used == set(have)


def _resolve(vtype: VGPUType, offered: dict[str, TypeInfo]) -> TypeInfo | None:
    if vtype.name in offered:
        return offered[vtype.name]
    bare = vtype.without_attribute()
    return offered.get(bare.name) if bare else None


def build_plan(
    entries: tuple[ConfigEntry, ...],
    inventory: Inventory,
    source: str = "",
    force: bool = False,
    strict: bool = True,
    read_modes: bool = True,
    allow_assigned: tuple[str, ...] = (),
    mig: MigState | None = None,
) -> Plan:
    """The plan for the selected config's entries; raises PlanError listing every problem found.

    With ``strict=False`` (a preview) problems do not raise: they are returned in ``Plan.problems``,
    and the GPUs that have them are left out of ``Plan.gpus``. ``read_modes=False`` (assert) skips
    asking nvidia-smi whether a changing equal-size GPU is still in mixed-size mode: it changes anyway.
    ``allow_assigned``: libvirt domains (names or UUIDs, or ``all``) that are not running and whose
    vGPUs may be removed all the same (``force`` allows every domain's).
    ``mig``: the host's MIG state; with it, GPUs whose MIG layout must change are planned as such
    (plan_mig.py), else MIG mode and instances are taken as they are.
    """
    gpus = inventory.gpus
    problems: list[str] = []
    where = f"{source}:" if source else ""
    for entry in entries:
        for index in entry.devices or ():
            if index >= len(gpus):
                span = f"GPUs 0-{len(gpus) - 1}" if gpus else "no NVIDIA GPUs"
                problems.append(
                    f"{where}{entry.line}: {entry.path}.devices: GPU index {index} does not exist "
                    f"(this host has {span})"
                )
    chosen = governing_entries(entries, gpus)
    plans: list[GPUPlan] = []
    notes: list[str] = []
    if gpus and not chosen and not problems:
        problems.append(_selects_nothing(entries, gpus, where))
    elif not gpus:
        notes.append("this host has no NVIDIA GPUs: there is nothing to configure")
    if allow_assigned:
        problems += _unknown_allowed(inventory, allow_assigned)
    by_gpu: dict[int | None, tuple[str, ...]] = {None: tuple(problems)} if problems else {}
    blocked: list[GPUPlan] = []
    owned = dra_owned_problems(entries, inventory)
    for gpu in gpus:
        entry = chosen.get(gpu.index)
        if entry is None:
            continue
        before = len(problems)
        if gpu.index in owned:
            problems.append(owned[gpu.index])
            by_gpu[gpu.index] = tuple(problems[before:])
            continue
        plan = _plan_mig_gpu(gpu, entry, inventory, mig, problems) if mig is not None else None
        if plan is None and len(problems) == before:
            plan = _plan_gpu(gpu, entry, inventory, problems, notes, force, read_modes, allow_assigned)
        if plan is not None:
            _check_in_use(plan, inventory, force, problems, notes, allow_assigned, strict)
        if len(problems) > before:
            by_gpu[gpu.index] = tuple(problems[before:])
            if plan is not None:
                blocked.append(plan)
        elif plan is not None:
            plans.append(plan)
    notes.extend(inventory.claim_warnings())
    mig_plan = None
    if mig is not None:
        mig_plan = _whole_host_mig(plans, chosen, inventory, mig, force, problems, notes, by_gpu)
    if problems and strict:
        raise PlanError(problems)
    unselected = tuple(g for g in gpus if g.index not in chosen)
    return Plan(
        gpus=tuple(plans),
        unselected=unselected,
        notes=tuple(notes),
        problems=by_gpu,
        blocked=tuple(blocked),
        mig=mig_plan,
    )


def _plan_mig_gpu(
    gpu: GPU, entry: ConfigEntry, inventory: Inventory, mig: MigState, problems: list[str]
) -> GPUPlan | None:
    """The plan of a GPU whose MIG layout changes (all its vGPUs go, the config's come after), or None
    when it does not change (a problem is appended when the change cannot work)."""
    from vgpu_dm import catalog
    from vgpu_dm.mig.translate import type_problems
    from vgpu_dm.plan_mig import change_for

    backend = inventory.backend_for(gpu)
    current = backend.devices(gpu) if backend else []
    wanted = entry.wanted()
    label = f"{gpu.describe()} [{entry.path}]"
    match = bool(backend) and _matches_as_is(wanted, current, lambda name: name in backend.types(gpu))
    change, problem = change_for(gpu, entry, mig, match)
    if problem:
        problems.append(f"{label}: {problem}")
        return None
    seen = mig.of(gpu.address)
    if change is None and entry.is_mig_backed and seen and not backend and inventory.vfio.needs_vfs(gpu):
        # The instances are right but the VFs are off: enabling them destroys the instances (3.2), so
        # the MIG stage enables the VFs and makes the instances again.
        change = MigChange(seen.index, seen.layout, seen.layout, None, seen.pending)
    if change is None:
        return None
    nameless = [d for d in current if d.framework == VENDOR_VFIO and unnamed(d)]
    if nameless:
        problems.append(_unnamed_problem(gpu, nameless, inventory, label))
        return None
    model = catalog.for_device(gpu.device_id)
    found = type_problems(entry, model) if model else []
    if found:
        problems.extend(f"{label}: {p}" for p in found)
        return None
    create = [TypeInfo(t.name, UNRESOLVED, t.name, 0) for t, n in wanted.items() for _ in range(n)]
    framework = backend.framework if backend else inventory.framework(gpu)
    return GPUPlan(
        gpu,
        framework,
        entry,
        {t.name: c for t, c in wanted.items()},
        remove=tuple(current),
        create=tuple(create),
        mig=change,
    )


def _whole_host_mig(plans, chosen, inventory, mig, force, problems, notes, by_gpu) -> MigPlan:
    """Bystanders of a mode change (and the VMs on them), and pending modes to set back."""
    from vgpu_dm.plan_mig import bystanders, reset_problems

    changing = [gp for gp in plans if gp.mig is not None]
    cancel = []
    for gpu in inventory.gpus:
        seen = mig.of(gpu.address)
        if gpu.index not in chosen or seen is None or seen.pending is None:
            continue
        gp = next((p for p in changing if p.gpu.address == gpu.address), None)
        if gp is None or not gp.mig.mode_change:
            cancel.append((gpu, seen.index, seen.layout.enabled))
    people: tuple = ()
    if any(gp.mig.mode_change for gp in changing):
        people = bystanders({gp.gpu.address for gp in changing}, mig, inventory)
        found, said = reset_problems(
            people, [gp.gpu for gp in changing if gp.mig.mode_change], inventory, force
        )
        notes.extend(said)
        if found:
            problems.extend(found)
            by_gpu[None] = (*by_gpu.get(None, ()), *found)
    return MigPlan(bystanders=people, cancel_pending=tuple(cancel))


def _selects_nothing(entries: tuple[ConfigEntry, ...], gpus: list[GPU], where: str) -> str:
    """A config meant for other GPUs (a wrong filter or subsystem id, another node type) is an error."""
    has = []
    for entry in entries:
        what = []
        if entry.device_filter:
            what.append("device-filter " + ", ".join(str(f) for f in entry.device_filter))
        what.append("devices " + ("all" if entry.devices is None else str(list(entry.devices))))
        has.append(f"{where}{entry.line}: {entry.path}: {' and '.join(what)}")
    host = ", ".join(f"GPU {g.index} ({g.address}) {g.device_id}" for g in gpus)
    return (
        f"the selected config selects none of this host's {len(gpus)} NVIDIA GPU(s) — "
        f"its entries: {'; '.join(has)} — the host's GPUs: {host}"
    )


def _unnamed_problem(gpu: GPU, devices: list[VGPUDevice], inventory: Inventory, label: str) -> str:
    """Why the plan cannot go on: a vGPU whose type nothing names would be taken for a foreign one."""
    what = ", ".join(f"{d.parent} (type id {d.type_id})" for d in devices)
    why = inventory.vfio.smi_errors.get(gpu.address, "nvidia-smi vgpu -s -v does not list that id")
    return (
        f"{label}: cannot name the vGPU type of {what}: the VFs' creatable lists no longer show it, no "
        f"learned type table has it, and {why}; apply leaves this GPU alone until it can — make nvidia-smi "
        f"work (--driver-root, --nvidia-smi) so the existing vGPUs can be named"
    )


def _plan_gpu(
    gpu: GPU,
    entry: ConfigEntry,
    inventory: Inventory,
    problems: list[str],
    notes: list[str],
    force: bool,
    read_modes: bool = True,
    allow_assigned: tuple[str, ...] = (),
) -> GPUPlan | None:
    wanted = entry.wanted()
    backend = inventory.backend_for(gpu)
    current = backend.devices(gpu) if backend else []
    framework = backend.framework if backend else inventory.framework(gpu)
    nameless = [d for d in current if d.framework == VENDOR_VFIO and unnamed(d)]
    if nameless:
        # Never guess: a vGPU called type-<id> would not match the config and would be removed.
        problems.append(_unnamed_problem(gpu, nameless, inventory, f"{gpu.describe()} [{entry.path}]"))
        return None
    if _matches_as_is(wanted, current, lambda name: bool(backend) and name in backend.types(gpu)):
        return GPUPlan(
            gpu, framework, entry, dict(Counter(d.type_name for d in current)), keep=tuple(current)
        )
    label = f"{gpu.describe()} [{entry.path}]"
    if not wanted:
        return GPUPlan(gpu, framework, entry, {}, remove=tuple(current))
    if backend is None:
        if inventory.vfio.needs_vfs(gpu):
            return _plan_enable_vfs(gpu, entry, wanted, label, problems, inventory)
        problems.append(
            f"{label}: no vGPU parent devices found: the NVIDIA vGPU host driver exposes no vGPU types for "
            f"this GPU (driver: {gpu.driver or 'none'}); is the vGPU manager (-vgpu-kvm driver) loaded?"
        )
        return None
    offered = backend.types(gpu)
    resolved: dict[str, tuple[TypeInfo, int]] = {}
    ok = True
    for vtype, count in wanted.items():
        info = _resolve(vtype, offered) or _known_but_full(gpu, vtype, backend, current)
        if info is None:
            choices = ", ".join(sorted(offered, key=_type_sort_key)) or "none"
            hint = (
                "; MIG-backed types are offered only in MIG mode with free GPU instances of their "
                "profile (apply prepares them with nvidia-mig-parted unless --skip-mig)"
                if vtype.is_mig_backed
                else ""
            )
            problems.append(
                f"{label}: vGPU type {vtype.name} is not supported on this GPU"
                f"{did_you_mean(vtype.name, offered)} (it offers: {choices}){hint}"
            )
            ok = False
        elif info.name in resolved:
            problems.append(
                f"{label}: {vtype.name} and another type of the entry both mean driver type {info.name}"
            )
            ok = False
        else:
            resolved[info.name] = (info, count)
    if not ok:
        return None
    if entry.is_mig_backed and all(d.type_name in resolved or not _mig_backed(d.type_name) for d in current):
        # No other MIG-backed vGPU leaves an instance (time-sliced ones mean MIG mode is off), so a type
        # the driver offers nowhere cannot be created.
        have = Counter(d.type_name for d in current)
        stuck = [n for n, (info, count) in resolved.items() if count > have[n] and info.available == 0]
        if stuck:
            problems.append(
                f"{label}: {', '.join(stuck)} cannot be created now: MIG-backed types need MIG mode and a "
                f"GPU instance of their profile with room (apply prepares them with nvidia-mig-parted "
                f"unless --skip-mig)"
            )
            return None
    # MIG-backed vGPUs of different sizes sit in different GPU instances: not a mixed-size mode matter.
    sizes = {framebuffer_of(name) for name in resolved}
    mixed = len(sizes) > 1 and not entry.is_mig_backed
    enable_mixed = disable_mixed = False
    if mixed:
        verdict = _mixed_size_verdict(gpu, backend, resolved)
        if isinstance(verdict, str):
            problems.append(f"{label}: {verdict}")
            return None
        enable_mixed = not verdict
    else:
        # The GPU changes to one size: if mixed-size mode is on, turn it off (it lowers some types' max
        # counts), which like turning it on needs a GPU without vGPUs.
        disable_mixed = read_modes and _mixed_size_on(gpu, backend)
    if not _fits(gpu, backend, resolved, current, mixed, label, problems, notes, entry.is_mig_backed):
        return None
    keep: list[VGPUDevice] = []
    remove: list[VGPUDevice] = []
    create: list[TypeInfo] = []
    by_type: dict[str, list[VGPUDevice]] = {}
    for device in current:
        by_type.setdefault(device.type_name, []).append(device)
    if any(len(devs) > resolved.get(n, (None, 0))[1] for n, devs in by_type.items() if n in resolved):
        # Fewer of a type: keep the ones VMs use, then the ones defined VMs name, remove idle ones.
        # (Only the order: when who holds them cannot be told, the in-use check below says so.)
        for devices in by_type.values():
            devices.sort(
                key=lambda d: (
                    not inventory.holders.holders(d, required=False),
                    not inventory.assigned(d),
                )
            )
    for name, devices in by_type.items():
        # The mode cannot change while any vGPU exists: switching it rebuilds the GPU.
        n = resolved[name][1] if name in resolved and not (enable_mixed or disable_mixed) else 0
        keep.extend(devices[:n])
        remove.extend(devices[n:])
    kept = Counter(d.type_name for d in keep)
    # A removed vGPU whose type is created again on this GPU is recreated under its own UUID (mdev)
    # or on its own VF (vendor VFIO), those defined VMs name first: their definitions stay valid.
    again: dict[str, list[VGPUDevice]] = {}
    for device in sorted(remove, key=lambda d: not inventory.assigned(d)):
        again.setdefault(device.type_name, []).append(device)
    pinned: list[tuple[TypeInfo, VGPUDevice]] = []
    for name, (info, count) in resolved.items():
        for n in range(count - kept[name]):
            if n < len(again.get(name, ())):
                pinned.append((info, again[name][n]))
            else:
                create.append(info)
    pins = tuple((d.uuid, d.parent) for _, d in pinned) + ((None, None),) * len(create)
    create = [info for info, _ in pinned] + create
    skip_vfs, last_vfs = _reserved_vfs(remove, {d.key for _, d in pinned}, inventory, force, allow_assigned)
    if skip_vfs and backend.framework == VENDOR_VFIO:
        # Only the VFs that are free now or freed by this plan (and not kept for a VM) take new vGPUs.
        held = {d.parent for d in current} - {d.parent for d in remove}
        usable = [v for v in gpu.vfs if v not in held and v not in skip_vfs]
        new = len(create) - len(pinned)
        if new > len(usable) - len(pinned):
            names = ", ".join(
                f"{vf} ({_domains_text(inventory.domains.for_pci(vf))})" for vf in sorted(skip_vfs)
            )
            problems.append(
                f"{label}: {new} new vGPU(s) need free virtual functions, and the ones this config frees "
                f"are named by defined VMs, which would then start with another vGPU type: {names}; "
                f"change or undefine those VMs first, or pass --force to use those VFs anyway"
            )
            return None
    return GPUPlan(
        gpu,
        framework,
        entry,
        {name: count for name, (_, count) in resolved.items()},
        keep=tuple(keep),
        remove=tuple(remove),
        create=tuple(create),
        enable_mixed_size=enable_mixed,
        disable_mixed_size=disable_mixed,
        pins=pins,
        skip_vfs=frozenset(skip_vfs) if backend.framework == VENDOR_VFIO else frozenset(),
        last_vfs=frozenset(last_vfs) if backend.framework == VENDOR_VFIO else frozenset(),
    )


def _domains_text(domains) -> str:
    return ", ".join(d.describe() for d in domains)


def allowed_assigned(domain, allow_assigned: tuple[str, ...]) -> bool:
    """--allow-assigned covers a domain that is not running, named by name or UUID (or ``all``); names
    are case-sensitive as in libvirt, UUIDs are not."""
    if domain.running:
        return False
    if "all" in allow_assigned or domain.name in allow_assigned:
        return True
    return bool(domain.uuid) and domain.uuid in {a.lower() for a in allow_assigned}


def _unknown_allowed(inventory: Inventory, allow_assigned: tuple[str, ...]) -> list[str]:
    """--allow-assigned values that name no libvirt VM: a typo must not pass silently."""
    domains = inventory.domains.domains
    known = {d.name for d in domains} | {d.uuid for d in domains if d.uuid}
    have = ", ".join(sorted(d.name for d in domains)) or "none"
    return [
        f"--allow-assigned {value}: no libvirt VM has that name or UUID (this host's VMs: {have})"
        for value in dict.fromkeys(allow_assigned)
        if value != "all" and value not in known and value.lower() not in known
    ]


def _reserved_vfs(remove, recreated, inventory: Inventory, force: bool, allow_assigned) -> tuple[set, set]:
    """VFs of removed vGPUs that defined VMs name and that no recreation takes back: (skip, last)."""
    skip: set[str] = set()
    last: set[str] = set()
    for device in remove:
        if device.framework != VENDOR_VFIO or device.key in recreated or not inventory.assigned(device):
            continue
        (last if force else skip).add(device.parent)
    return skip, last


def _check_in_use(
    plan: GPUPlan,
    inventory: Inventory,
    force: bool,
    problems: list[str],
    notes: list[str],
    allow_assigned: tuple[str, ...] = (),
    strict: bool = True,
) -> None:
    """A vGPU that a VM holds is never removed unless the operator forces it; one that a defined VM
    names is not removed (unless recreated as it was) without --force or --allow-assigned.

    When who holds them cannot be told (no readable /proc), apply stops (HostError); a preview
    (``strict=False``) records it as this GPU's problem and still shows the GPU's plan.
    """
    recreated = plan.recreated
    why = (
        f"; the GPU's MIG layout changes ({plan.mig.current.describe()} -> {plan.mig.target.describe()}), "
        f"which removes all its vGPUs"
        if plan.mig
        else ""
    )
    for device in plan.remove:
        try:
            holders = inventory.holders.holders(device, required=not force)
        except HostError as exc:
            if strict:
                raise
            problems.append(f"{plan.gpu.describe()}: {exc}")
            return
        if not holders:
            _check_assigned(plan, device, inventory, force, problems, notes, allow_assigned, recreated)
            continue
        who = ", ".join(str(h) for h in holders)
        domains = inventory.assigned(device)
        if domains:
            who += f", libvirt {_domains_text(domains)}"
        what = f"{plan.gpu.describe()}: {device.type_name} {device.key} is in use by {who}{why}"
        if force and device.framework == VENDOR_VFIO:
            # NVIDIA's driver refuses to destroy a vGPU whose VF a VM has open (EPERM), force or not:
            # the write would only fail halfway through the plan.
            problems.append(
                HeldProblem(
                    f"{what}; the config would remove it, and the driver refuses to destroy a vendor-VFIO "
                    f"vGPU that a VM has open, even with --force",
                    "stop the VM first",
                    IN_USE,
                )
            )
        elif force:
            notes.append(
                f"--force: removing {what}; the kernel blocks the removal until the VM releases the device"
            )
        elif device.framework == VENDOR_VFIO:
            advice = (
                "stop the VM first (the driver refuses to destroy a vendor-VFIO vGPU that a VM has open, "
                "even with --force)"
            )
            problems.append(HeldProblem(f"{what}; the config would remove it", advice, IN_USE))
        else:
            advice = "stop the VM first, or pass --force"
            problems.append(HeldProblem(f"{what}; the config would remove it", advice, IN_USE))


ASSIGNED_MARK = " is assigned to "  # in every problem about a vGPU a defined VM names


def _check_assigned(plan, device, inventory, force, problems, notes, allow_assigned, recreated) -> None:
    domains = inventory.assigned(device)
    if not domains:
        return
    what = f"{plan.gpu.describe()}: {device.type_name} {device.key}{ASSIGNED_MARK}{_domains_text(domains)}"
    if device.key in recreated:
        how = "same UUID" if device.uuid else "same VF"
        notes.append(
            f"{what}: it is removed and created again ({how}, same type), so the VM's definition stays valid"
        )
        return
    blocking = [d for d in domains if not (force or allowed_assigned(d, allow_assigned))]
    if not blocking:
        flag = "--force" if force else "--allow-assigned"
        notes.append(f"{flag}: removing {what}; that VM will not start until its definition is changed")
        return
    files = ", ".join(sorted({inventory.host.path(f) for d in blocking for f in d.files}))
    running = [d for d in blocking if d.running]
    if running:
        hint = "stop the VM and change its definition first, or pass --force"
    else:
        names = " ".join(f"--allow-assigned {d.name}" for d in blocking)
        hint = f"change or undefine the VM first, or pass {names} (or --force)"
    why = "; the GPU's MIG layout changes, which removes all its vGPUs" if plan.mig else ""
    problems.append(
        HeldProblem(
            f"{what} (defined in {files}){why}; the config would remove it and the VM could not start "
            f"without it",
            hint,
            ASSIGNED,
        )
    )


def _known_but_full(gpu: GPU, vtype: VGPUType, backend, current: list[VGPUDevice]) -> TypeInfo | None:
    """A vendor-VFIO GPU lists nothing creatable while full; accept a catalog type to resolve later."""
    if backend.framework != VENDOR_VFIO or not current:
        return None
    from vgpu_dm import catalog

    entry = catalog.for_device(gpu.device_id)
    if entry is None or vtype.name not in entry.vgpu_types:
        return None
    return TypeInfo(vtype.name, UNRESOLVED, vtype.name, 0)


def _mixed_size_on(gpu: GPU, backend) -> bool:
    """Whether the GPU is in mixed-size mode now; unknown (nvidia-smi unusable) counts as no."""
    try:
        supported, enabled = backend.mixed_size(gpu)
    except HostError:
        return False
    return supported and enabled


def _mixed_size_verdict(gpu: GPU, backend, resolved: dict[str, tuple[TypeInfo, int]]) -> str | bool:
    """Why mixed sizes cannot be had (a message), or whether the mode is already on (bool).

    Support is the GPU's own ``Heterogeneous Time-Slice Sizes`` line of ``nvidia-smi -q -i``; the
    driver-wide ``Heterogenous Multi-vGPU`` line reads Supported on GPUs that do not support it.
    """
    names = ", ".join(resolved)
    try:
        supported, enabled = backend.mixed_size(gpu)
    except HostError as exc:
        return (
            f"{names} have different framebuffer sizes, which needs mixed-size (heterogeneous) vGPU mode, "
            f"and whether this GPU supports it could not be read: {exc}"
        )
    if not supported:
        return (
            f"{names} have different framebuffer sizes, which needs mixed-size (heterogeneous) vGPU mode, "
            f"and this GPU does not support it (nvidia-smi -q -i {gpu.address}: Heterogeneous Time-Slice "
            f"Sizes is not 'Supported'); use one framebuffer size per GPU (equal-size mode)"
        )
    return enabled


def _fits(gpu, backend, resolved, current, mixed, label, problems, notes, per_type=False) -> bool:
    total = sum(count for _, count in resolved.values())
    for info, count in resolved.values():
        cap = backend.capacity(gpu, info, current)
        # Equal-size mode shares one budget; mixed sizes and MIG-backed types have one per type.
        need = count if mixed or per_type else total
        if cap is None:
            notes.append(f"{label}: the maximum number of {info.name} is unknown; the driver will decide")
        elif need > cap:
            what = " + ".join(f"{c} x {n}" for n, (_, c) in resolved.items())
            problems.append(f"{label}: {what} requested, but the GPU holds at most {cap} x {info.name}")
            return False
    if mixed:
        fb = backend.framebuffer_gb(gpu)
        used = sum((framebuffer_of(n) or 0.5) * c for n, (_, c) in resolved.items())
        if fb is not None and used > fb:
            what = " + ".join(f"{c} x {n}" for n, (_, c) in resolved.items())
            problems.append(f"{label}: {what} need {used:g} GB of framebuffer, but the GPU has {fb} GB")
            return False
    slots = backend.slots(gpu)
    if slots is not None and total > slots:
        problems.append(f"{label}: {total} vGPUs requested, but the GPU has only {slots} virtual functions")
        return False
    return True


def _plan_enable_vfs(
    gpu: GPU,
    entry: ConfigEntry,
    wanted: dict[VGPUType, int],
    label: str,
    problems: list[str],
    inventory: Inventory,
) -> GPUPlan | None:
    """Plan for an SR-IOV GPU whose VFs are off: check what the catalog knows, then enable them."""
    if entry.is_mig_backed:
        # Enabling VFs rebinds the GPU and destroys its GPU instances (reference 3.2): MIG-backed types
        # need the VFs first, then the instances, which the MIG step of apply does in that order.
        problems.append(
            f"{label}: MIG-backed types need the GPU's SR-IOV virtual functions enabled before its GPU "
            f"instances are made, and they are not enabled (apply does both, in that order, unless "
            f"--skip-mig)"
        )
        return None
    from vgpu_dm import catalog

    model = catalog.for_device(gpu.device_id)
    if model is not None:
        bad = [
            t.name
            for t in wanted
            if t.name not in model.vgpu_types
            and (t.without_attribute() is None or t.without_attribute().name not in model.vgpu_types)
        ]
        if bad:
            hint = did_you_mean(bad[0], model.vgpu_types) if len(bad) == 1 else ""
            problems.append(
                f"{label}: vGPU type {', '.join(bad)} is not a type of the {model.name}{hint} "
                f"(its types start with {model.prefix}-)"
            )
            return None
        for vtype, count in wanted.items():
            cap = model.vgpu_types.get(vtype.name)
            if cap is not None and count > cap:
                problems.append(f"{label}: {count} x {vtype.name} requested, but the GPU holds at most {cap}")
                return None
    total = sum(wanted.values())
    if gpu.sriov_totalvfs is not None and total > gpu.sriov_totalvfs:
        problems.append(
            f"{label}: {total} vGPUs requested, but the GPU has only {gpu.sriov_totalvfs} virtual functions"
        )
        return None
    caps = [model.vgpu_types[t.name] for t in wanted if model and t.name in model.vgpu_types]
    if len({t.framebuffer_gb for t in wanted}) == 1 and caps and total > min(caps):
        what = " + ".join(f"{c} x {t.name}" for t, c in wanted.items())
        problems.append(
            f"{label}: {what} requested, but the GPU holds at most {min(caps)} vGPUs of that size"
        )
        return None
    if len({t.framebuffer_gb for t in wanted}) > 1:
        # Enabling VFs rebinds the GPU (MIG instances are lost): refuse a doomed mixed-size config first.
        info = {t.name: (TypeInfo(t.name, UNRESOLVED, t.name, 0), c) for t, c in wanted.items()}
        verdict = _mixed_size_verdict(gpu, inventory.vfio, info)
        if isinstance(verdict, str):
            problems.append(f"{label}: {verdict}")
            return None
        fb = model.framebuffer_gb if model else None
        used = sum((t.framebuffer_gb or 0.5) * c for t, c in wanted.items())
        if fb is not None and used > fb:
            what = " + ".join(f"{c} x {t.name}" for t, c in wanted.items())
            problems.append(f"{label}: {what} need {used:g} GB of framebuffer, but the GPU has {fb} GB")
            return None
    # Enabling the VFs rebinds the GPU, which resets mixed-size mode: mixed sizes then switch it on.
    mixed = len({t.framebuffer_gb for t in wanted}) > 1
    return GPUPlan(
        gpu,
        "sriov-vfs-off",
        entry,
        {t.name: c for t, c in wanted.items()},
        enable_vfs=True,
        enable_mixed_size=mixed,
    )


def _mig_backed(name: str) -> bool:
    try:
        return VGPUType.parse(name).is_mig_backed
    except ValueError:
        return False


def _type_sort_key(name: str) -> tuple:
    try:
        t = VGPUType.parse(name)
        return (t.gpu_instance_slices, t.framebuffer_gb, t.series, t.attribute)
    except ValueError:
        return (99, 0, name, "")


# -- One vGPU at a time (the DRA driver's prepare and unprepare) -------------------------------------
# The same checks as a whole-config plan, for a change of exactly one vGPU: the type must be offered
# and have room, mixed sizes need the GPU's mixed-size mode, and a vGPU a VM holds is never removed.


def _gpu_at(inventory: Inventory, address: str) -> GPU:
    for gpu in inventory.gpus:
        if gpu.address == address:
            return gpu
    raise PlanError(
        [
            f"GPU {address} is not on this host (its NVIDIA GPUs: "
            f"{', '.join(g.address for g in inventory.gpus) or 'none'})"
        ]
    )


def plan_create_one(inventory: Inventory, gpu_address: str, type_name: str, mixed_size: bool = False) -> Plan:
    """The plan that adds one vGPU of ``type_name`` to one GPU and keeps every vGPU the GPU has.

    ``mixed_size``: the GPU is meant to host several framebuffer sizes, so its mixed-size mode is
    switched on before the first vGPU (the mode cannot change while vGPUs exist). Raises PlanError.
    """
    gpu = _gpu_at(inventory, gpu_address)
    try:
        vtype = VGPUType.parse(type_name)
    except ValueError as exc:
        raise PlanError([f"{gpu.describe()}: {exc}"]) from None
    entry = ConfigEntry((gpu.index,), (), ((vtype, 1),), path=f"one {vtype.name}")
    if vtype.is_mig_backed:
        raise PlanError(
            [
                f"{gpu.describe()}: {vtype.name} is MIG-backed; one-at-a-time creation supports "
                f"time-sliced types only (MIG instances are laid out by apply's MIG step)"
            ]
        )
    backend = inventory.backend_for(gpu)
    if backend is None:
        if inventory.vfio.needs_vfs(gpu):
            return Plan((GPUPlan(gpu, "sriov-vfs-off", entry, {vtype.name: 1}, enable_vfs=True),))
        raise PlanError(
            [
                f"{gpu.describe()}: no vGPU parent devices found: the NVIDIA vGPU host driver "
                f"exposes no vGPU types for this GPU (driver: {gpu.driver or 'none'})"
            ]
        )
    current = backend.devices(gpu)
    nameless = [d for d in current if d.framework == VENDOR_VFIO and unnamed(d)]
    if nameless:
        raise PlanError([_unnamed_problem(gpu, nameless, inventory, gpu.describe())])
    offered = backend.types(gpu)
    info = _resolve(vtype, offered)
    if info is None:
        choices = ", ".join(sorted(offered, key=_type_sort_key)) or "none"
        raise PlanError(
            [f"{gpu.describe()}: vGPU type {vtype.name} is not supported on this GPU (it offers: {choices})"]
        )
    have = ", ".join(f"{c} x {n}" for n, c in Counter(d.type_name for d in current).items()) or "no vGPUs"
    sizes = {framebuffer_of(d.type_name) for d in current} | {vtype.framebuffer_gb}
    enable_mixed = False
    if len(sizes) > 1 or mixed_size:
        verdict = _mixed_size_verdict(gpu, backend, {info.name: (info, 1)})
        if isinstance(verdict, str):
            raise PlanError([f"{gpu.describe()} (has {have}): {verdict}"])
        if not verdict and current:
            raise PlanError(
                [
                    f"{gpu.describe()} has {have} in equal-size mode; {vtype.name} needs mixed-size "
                    f"mode, which can only be switched on while the GPU has no vGPUs"
                ]
            )
        enable_mixed = not verdict
    if info.available <= 0 and not enable_mixed:
        raise PlanError([f"{gpu.describe()} has {have}: the driver has no room for another {info.name}"])
    wanted = Counter(d.type_name for d in current)
    wanted[info.name] += 1
    gp = GPUPlan(
        gpu,
        backend.framework,
        entry,
        dict(wanted),
        keep=tuple(current),
        create=(info,),
        enable_mixed_size=enable_mixed,
    )
    return Plan((gp,))


def plan_remove_one(inventory: Inventory, gpu_address: str, key: str, force: bool = False) -> Plan:
    """The plan that removes the vGPU ``key`` (mdev UUID or VF address) from one GPU and keeps the rest;
    an empty plan when it is gone already. Raises PlanError when a VM holds it (unless ``force``)."""
    gpu = _gpu_at(inventory, gpu_address)
    backend = inventory.backend_for(gpu)
    current = backend.devices(gpu) if backend else []
    device = next((d for d in current if d.key == key), None)
    if device is None:
        return Plan(())
    keep = tuple(d for d in current if d.key != key)
    entry = ConfigEntry((gpu.index,), (), (), path=f"remove {key}")
    gp = GPUPlan(
        gpu, backend.framework, entry, dict(Counter(d.type_name for d in keep)), keep=keep, remove=(device,)
    )
    problems: list[str] = []
    notes: list[str] = []
    _check_in_use(gp, inventory, force, problems, notes)
    if problems:
        raise PlanError(problems)
    return Plan((gp,), notes=tuple(notes))


class OfferedType(NamedTuple):
    """One vGPU type a GPU may offer one at a time: how many at most and its framebuffer in GB."""

    name: str  # the driver's type name
    count: int
    framebuffer_gb: float  # 0.5 for the 512 MB types


class GPUOffer(NamedTuple):
    """What a config lets one GPU offer one vGPU at a time (the DRA driver publishes it)."""

    gpu: GPU
    framework: str  # mdev, vendor-vfio or sriov-vfs-off
    types: tuple[OfferedType, ...]
    mixed: bool  # several framebuffer sizes: each type up to its count, all within framebuffer_gb
    framebuffer_gb: float | None


def check_offer(gpu: GPU, entry: ConfigEntry, inventory: Inventory) -> GPUOffer:
    """The vGPUs ``entry`` lets ``gpu`` offer, checked as apply checks a layout; raises PlanError.

    One framebuffer size: exactly the entry's devices, whose total must fit as for apply (so every
    subset of them can be created). Several sizes (the GPU's mixed-size mode): each type up to its count,
    which must not exceed the type's maximum; their sum may exceed the framebuffer, which the consumer
    (a DRA counter set) then shares out.
    """
    label = f"{gpu.describe()} [{entry.path}]"
    wanted = entry.wanted()
    if entry.is_mig_backed:
        raise PlanError(
            [
                f"{label}: MIG-backed types ({', '.join(t.name for t in wanted if t.is_mig_backed)})"
                f" cannot be offered one at a time: their GPU instances are laid out up front"
            ]
        )
    backend = inventory.backend_for(gpu)
    from vgpu_dm import catalog

    model = catalog.for_device(gpu.device_id)
    if backend is None:
        if not inventory.vfio.needs_vfs(gpu):
            raise PlanError(
                [
                    f"{label}: no vGPU parent devices found: the NVIDIA vGPU host driver exposes no "
                    f"vGPU types for this GPU (driver: {gpu.driver or 'none'})"
                ]
            )
        framework, offered = "sriov-vfs-off", {}
        for t in wanted:
            if model is None or t.name not in model.vgpu_types:
                raise PlanError(
                    [
                        f"{label}: vGPU type {t.name} is not a known type of this GPU (its VFs "
                        f"are not enabled, so only the GPU catalog can tell)"
                    ]
                )
            offered[t.name] = TypeInfo(t.name, UNRESOLVED, t.name, 0, model.vgpu_types[t.name])
        fb = model.framebuffer_gb if model else None
    else:
        framework, offered = backend.framework, backend.types(gpu)
        fb = backend.framebuffer_gb(gpu)
    resolved: dict[str, tuple[TypeInfo, int]] = {}
    problems: list[str] = []
    for vtype, count in wanted.items():
        info = _resolve(vtype, offered) or (
            _known_but_full(gpu, vtype, backend, backend.devices(gpu)) if backend else None
        )
        if info is None:
            choices = ", ".join(sorted(offered, key=_type_sort_key)) or "none"
            problems.append(
                f"{label}: vGPU type {vtype.name} is not supported on this GPU (it offers: {choices})"
            )
        else:
            resolved[info.name] = (info, count)
    if problems:
        raise PlanError(problems)
    sizes = {framebuffer_of(name) for name in resolved}
    mixed = len(sizes) > 1
    if mixed:
        verdict = _mixed_size_verdict(gpu, backend or inventory.vfio, resolved)
        if isinstance(verdict, str):
            raise PlanError([f"{label}: {verdict}"])
    total = sum(c for _, c in resolved.values())
    for name, (info, count) in resolved.items():
        cap = info.max_instances or catalog.max_instances(name, gpu.device_id)
        need = count if mixed else total
        if cap is not None and need > cap:
            what = " + ".join(f"{c} x {n}" for n, (_, c) in resolved.items())
            problems.append(f"{label}: {what} offered, but the GPU holds at most {cap} x {name}")
    slots = backend.slots(gpu) if backend else gpu.sriov_totalvfs
    if slots is not None and total > slots and not mixed:
        problems.append(f"{label}: {total} vGPUs offered, but the GPU has only {slots} virtual functions")
    if problems:
        raise PlanError(problems)
    types = tuple(OfferedType(n, c, float(framebuffer_of(n) or 0.5)) for n, (_, c) in resolved.items())
    return GPUOffer(gpu, framework, types, mixed, float(fb) if fb is not None else None)
