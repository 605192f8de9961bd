"""``nvidia-vgpu-dm plan`` (and ``apply --dry-run``): what apply would keep, remove and create on each
GPU, which config entry decides it, which VMs hold vGPUs that would go, and every problem — without
writing anything or taking the host lock.
"""

from __future__ import annotations

from collections import Counter

import click

from vgpu_dm.cli import options
from vgpu_dm.cli.output import output_options


def _counted(names: list[str]) -> list[dict]:
    return [{"type": n, "count": c} for n, c in Counter(names).items()]


def _device(device, inventory, recreated: frozenset[str] = frozenset()) -> dict:
    holders = inventory.holders.holders(device, required=False)
    return {
        "type": device.type_name,
        "uuid": device.uuid,
        "parent": device.parent,
        "holders": [{"pid": h.pid, "name": h.name} for h in holders],
        "assigned": _assigned(device, inventory),
        "recreated": device.key in recreated,
    }


def _assigned(device, inventory) -> list[dict]:
    """The libvirt VMs defined to use ``device``."""
    return [{"domain": d.name, "uuid": d.uuid, "state": d.state} for d in inventory.assigned(device)]


def _by_domain(plan, inventory, force: bool, allow_assigned: tuple[str, ...]) -> list[dict]:
    """Per libvirt VM: its vGPUs this plan removes or recreates (also on GPUs held back by a problem)."""
    from vgpu_dm.host.model import VENDOR_VFIO
    from vgpu_dm.plan import allowed_assigned

    found: dict[str, dict] = {}
    for gp in (*plan.gpus, *plan.blocked):
        for device in gp.remove:
            # A vGPU a process holds is not removed, recreated or not, without --force (and a
            # vendor-VFIO one not even then: the driver refuses while the VM has it open).
            held = bool(inventory.holders.holders(device, required=False))
            for domain in inventory.assigned(device):
                entry = found.setdefault(
                    domain.uuid or domain.name,
                    {"domain": domain.name, "uuid": domain.uuid, "state": domain.state, "vgpus": []},
                )
                recreated = device.key in gp.recreated
                if held:
                    allowed = force and device.framework != VENDOR_VFIO
                else:
                    allowed = recreated or force or allowed_assigned(domain, allow_assigned)
                entry["vgpus"].append(
                    {
                        "gpu": gp.gpu.index,
                        "address": gp.gpu.address,
                        "type": device.type_name,
                        "uuid": device.uuid,
                        "parent": device.parent,
                        "action": "recreate" if recreated else "remove",
                        "held": held,
                        "allowed": allowed,  # apply refuses what is not
                    }
                )
    return sorted(found.values(), key=lambda e: (e["domain"], e["uuid"] or ""))


def _layout(layout) -> dict:
    return {"enabled": layout.enabled, "instances": layout.as_dict}


def plan_report(
    entries,
    inventory,
    source: str,
    name: str,
    force: bool = False,
    allow_assigned: tuple[str, ...] = (),
    persist: str | None = None,
    skip_mig: bool = False,
) -> dict:
    """The preview as data (what ``plan -o json`` prints): the plan apply would carry out, MIG
    included (apply_mig.plan_with_mig with strict=False), which reads but never writes. With
    ``persist``, also what apply --persist would do to mdevctl's definitions (``persist``)."""
    from vgpu_dm import catalog
    from vgpu_dm.apply_mig import plan_with_mig
    from vgpu_dm.cli.journal_note import journal_note
    from vgpu_dm.cli.list_cmd import model_name
    from vgpu_dm.errors import HostError
    from vgpu_dm.persist import mdevctl_conflicts
    from vgpu_dm.plan import build_plan, governing_entries

    general: list[str] = []
    try:
        plan = plan_with_mig(
            entries,
            inventory,
            source,
            force=force,
            skip_mig=skip_mig,
            strict=False,
            allow_assigned=allow_assigned,
        )
    except HostError as exc:
        # What would stop apply before its first write (nvidia-mig-parted missing or failing …), shown
        # with the vGPU plan of the GPUs as they are.
        plan = build_plan(
            entries, inventory, source, force=force, strict=False, allow_assigned=allow_assigned
        )
        general.append(str(exc))
    planned = {gp.gpu.index: gp for gp in plan.gpus}
    blocked = {gp.gpu.index: gp for gp in plan.blocked}
    chosen = governing_entries(entries, inventory.gpus)
    gpus = []
    for gpu in inventory.gpus:
        entry = catalog.for_device(gpu.device_id)
        item: dict = {
            "index": gpu.index,
            "address": gpu.address,
            "device_id": str(gpu.device_id),
            "model": model_name(entry.name) if entry else "unknown NVIDIA GPU",
            "framework": inventory.framework(gpu),
            "entry": None,
        }
        governing = chosen.get(gpu.index)
        if governing is not None:
            item["entry"] = {"path": governing.path, "line": governing.line}
        gp = planned.get(gpu.index)
        if gpu.index in plan.problems:
            item["status"] = "problem"
            item["problems"] = list(plan.problems[gpu.index])
            gp = blocked.get(gpu.index)  # the plan a VM (or an unreadable /proc) stops, shown with it
        elif governing is None:
            item["status"] = "unselected"
        elif gp is not None:
            item["status"] = "change" if gp.changes else "unchanged"
        if gp is not None:
            item["keep"] = _counted([d.type_name for d in gp.keep])
            item["remove"] = [_device(d, inventory, gp.recreated) for d in gp.remove]
            item["create"] = _counted([t.name for t in gp.create])
            if gp.enable_vfs:
                # The VFs come first; the vGPUs are then created as the config says.
                item["enable_vfs"] = True
                item["create"] = [{"type": t, "count": c} for t, c in gp.wanted.items()]
            if gp.enable_mixed_size or gp.disable_mixed_size:
                item["mixed_size_switch"] = "on" if gp.enable_mixed_size else "off"
            if gp.mig is not None:
                item["mig"] = {
                    **_layout(gp.mig.target),
                    "current": _layout(gp.mig.current),
                    "mode_change": gp.mig.mode_change,
                }
        gpus.append(_every_field(item))
    # With --persist the definitions follow the layout: what it does is shown instead of the warning.
    notes = [*plan.notes, *([] if persist else mdevctl_conflicts(plan, inventory))]
    if plan.mig:
        for gpu, _, enabled in plan.mig.cancel_pending:
            notes.append(
                f"{gpu.describe()}: a MIG mode change left waiting for a GPU reset is set back (MIG stays "
                f"{'on' if enabled else 'off'})"
            )
        held = [b for b in plan.mig.bystanders if b.devices]
        if held:
            which = ", ".join(f"{b.gpu.describe()} ({len(b.devices)} vGPU(s))" for b in held)
            notes.append(
                f"the MIG mode change may need a GPU reset, which covers every GPU of the host: if it does, "
                f"apply takes down the vGPUs of {which} first and puts them back as they were"
            )
    removals = sum(len(g["remove"]) for g in gpus if g["status"] == "change")
    creations = sum(c["count"] for g in gpus for c in g["create"] if g["status"] == "change")
    report = {
        "config": name,
        "file": source,
        "gpus": gpus,
        "changes": sum(1 for g in gpus if g["status"] == "change"),
        "removals": removals,
        "creations": creations,
        "problems": [*general, *plan.problems.get(None, ()), *[p for g in gpus for p in g["problems"]]],
        "notes": notes,
        "journal": journal_note(inventory.host),
        "assigned": _by_domain(plan, inventory, force, allow_assigned),
    }
    if persist:
        from vgpu_dm.persist import persist_report

        report["persist"] = persist_report(persist, plan, entries, inventory, force, allow_assigned)
        report["problems"] += report["persist"]["problems"]
    return report


# Every GPU of the report has every field (null or empty where it does not apply), so that scripts
# need not test for keys.
_DEFAULTS = {
    "status": "unselected",
    "keep": [],
    "remove": [],
    "create": [],
    "enable_vfs": False,
    "mixed_size_switch": None,
    "mig": None,
    "problems": [],
}


def _every_field(item: dict) -> dict:
    for key, value in _DEFAULTS.items():
        if key not in item:
            item[key] = list(value) if isinstance(value, list) else value
    return item


def _mig_text(mig: dict) -> str:
    what = ", ".join(f"{n} x {p}" for p, n in mig["instances"].items())
    now = mig["current"]
    before = "MIG on, " + (", ".join(f"{n} x {p}" for p, n in now["instances"].items()) or "no GPU instances")
    before = before if now["enabled"] else "MIG off"
    if not mig["enabled"]:
        target = "MIG mode off"
    elif mig["mode_change"]:
        target = f"MIG mode on, GPU instances {what}"
    else:
        target = f"GPU instances {what or 'none'}"
    return f"{target} (nvidia-mig-parted, first; now {before})"


def _count_text(items: list[dict]) -> str:
    return ", ".join(f"{c['count']} x {c['type']}" for c in items)


def render_plan(report: dict, wide: bool = False) -> str:
    """The preview as text for an operator; ``wide`` also lists every vGPU that would be removed."""
    from vgpu_dm.log import printable

    lines = []
    for gpu in report["gpus"]:
        head = f"GPU {gpu['index']}  {gpu['address']}  {gpu['model']}  {gpu['framework']}"
        if wide:
            head += f"  {gpu['device_id']}"
        if gpu["entry"]:
            head += f"  [{gpu['entry']['path']}, line {gpu['entry']['line']}]"
        lines.append(head)
        status = gpu["status"]
        if status == "unselected":
            lines.append("  no entry selects it: left alone")
            continue
        lines.extend(_actions(gpu, wide))
        if status == "problem":
            lines.extend(f"  problem: {p}" for p in gpu["problems"])
        if status == "unchanged":
            lines.append("  already as the config wants: not touched")
    if report.get("assigned"):
        lines.append("libvirt VMs defined to use vGPUs this removes or recreates:")
        for vm in report["assigned"]:
            for v in vm["vgpus"]:
                key = v["uuid"] or v["parent"]
                same = "recreated with the same " + ("UUID" if v["uuid"] else "VF")
                if v["action"] == "recreate" and v["allowed"]:
                    what = f"{same}: stays valid"
                elif v.get("held") and not v["uuid"]:
                    verb = same if v["action"] == "recreate" else "removed"
                    what = f"{verb}: apply refuses this while the VM has it open (stop the VM first)"
                elif v["action"] == "recreate" or v.get("held"):
                    verb = same if v["action"] == "recreate" else "removed"
                    what = f"{verb}: apply refuses this while the VM has it open, without --force"
                elif v["allowed"]:
                    what = "removed (allowed): the VM will not start until its definition is changed"
                elif vm["state"] != "shut off":
                    what = "removed: apply refuses this while the VM runs, without --force"
                else:
                    what = f"removed: apply refuses this without --allow-assigned {vm['domain']} or --force"
                lines.append(
                    f"  VM {vm['domain']!r} ({vm['state']}): GPU {v['gpu']} {v['type']} {key} {what}"
                )
    if report.get("persist"):
        lines.extend(_persist_lines(report["persist"]))
    problems = report["problems"]
    general = [p for p in problems if not any(p in g["problems"] for g in report["gpus"])]
    lines.extend(f"problem: {p}" for p in general)
    from vgpu_dm.plan import ASSIGNED_MARK

    for note in report["notes"]:
        if ASSIGNED_MARK not in note or not report.get("assigned"):  # else said per VM above
            lines.append(f"note: {note}")
    if report["journal"]:
        lines.append(f"note: {report['journal']}")
    if problems:
        lines.append(
            f"config {report['config']!r}: {len(problems)} problem(s); apply would stop before its first "
            f"write (nothing was written)"
        )
    elif report["changes"]:
        switches = sum(1 for g in report["gpus"] if g["status"] == "change" and g["mixed_size_switch"])
        switched = f", {switches} mixed-size mode switch(es)" if switches else ""
        lines.append(
            f"config {report['config']!r}: {report['changes']} GPU(s) would change ({report['removals']} "
            f"removal(s), {report['creations']} creation(s){switched}); nothing was written"
        )
    elif _persist_changes(report.get("persist")):
        lines.append(
            f"config {report['config']!r} is applied: apply would change no vGPU, only mdevctl's "
            f"definitions (above); nothing was written"
        )
    else:
        lines.append(f"config {report['config']!r} is applied: apply would change nothing")
    return "\n".join(printable(line) for line in lines)


def _actions(gpu: dict, wide: bool) -> list[str]:
    """What apply would do on one GPU, in apply's order: MIG, VFs, removals, mode switch, creations."""
    lines = []
    if gpu["mig"] is not None:
        lines.append(f"  mig      {_mig_text(gpu['mig'])}")
    if gpu["enable_vfs"]:
        lines.append(f"  enable   its SR-IOV virtual functions (sriov-manage -e {gpu['address']})")
    if gpu["keep"]:
        lines.append(f"  keep     {_count_text(gpu['keep'])}")
    if gpu["remove"]:
        lines.append(f"  remove   {_count_text(_counted([d['type'] for d in gpu['remove']]))}")
    for device in gpu["remove"]:
        key = device["uuid"] or device["parent"]
        if device["holders"]:
            held = ", ".join(f"pid {h['pid']} ({h['name']})" for h in device["holders"])
            lines.append(f"           {device['type']} {key} is IN USE by {held}")
        if device["assigned"]:
            vms = ", ".join(f"VM {a['domain']!r} ({a['state']})" for a in device["assigned"])
            again = ": created again, same type and key" if device["recreated"] else ""
            lines.append(f"           {device['type']} {key} is ASSIGNED to {vms}{again}")
        if wide and not device["holders"] and not device["assigned"]:
            lines.append(f"           {device['type']} {key}")
    if gpu["mixed_size_switch"] == "on":
        lines.append("  enable   mixed-size (heterogeneous) vGPU mode")
    elif gpu["mixed_size_switch"] == "off":
        lines.append("  disable  mixed-size (heterogeneous) vGPU mode: back to one vGPU size on the GPU")
    if gpu["create"]:
        lines.append(f"  create   {_count_text(gpu['create'])}")
    return lines


def _persist_changes(persist: dict | None) -> bool:
    return bool(persist) and any(g["write"] or g["remove"] or g["new"] for g in persist["gpus"])


def _first(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more (--json lists all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _persist_lines(persist: dict) -> list[str]:
    """What apply --persist=mdevctl would do to mdevctl's definitions, per GPU."""
    if not persist["gpus"]:
        return []
    lines = [f"mdevctl definitions (--persist={persist['tool']}, written after the vGPUs):"]
    for gpu in persist["gpus"]:
        head = f"  GPU {gpu['index']}  "
        if gpu["later"]:
            lines.append(f"{head}{gpu['later']}")
            continue
        if gpu["write"]:
            shown = _first([f"{d['uuid']} ({d['type']})" for d in gpu["write"]])
            lines.append(f"{head}write {len(gpu['write'])} definition(s) (start=auto): {shown}")
        if gpu["new"]:
            what = "for the vGPUs this run creates (start=auto)"
            lines.append(f"{head}write {gpu['new']} definition(s) {what}")
        if gpu["remove"]:
            shown = _first([f"{d['uuid']} ({d['start']})" for d in gpu["remove"]])
            lines.append(f"{head}remove {len(gpu['remove'])} definition(s): {shown}")
        for d in gpu["kept"]:
            lines.append(f"{head}keep {d['uuid']} ({d['why']})")
        lines.extend(f"{head}{w}" for w in gpu["warnings"])
        if gpu["unchanged"]:
            lines.append(f"{head}{gpu['unchanged']} definition(s) already right")
        if not (gpu["write"] or gpu["new"] or gpu["remove"] or gpu["kept"] or gpu["unchanged"]):
            lines.append(f"{head}no definitions")
    return lines


def run_plan(
    loaded: tuple,
    host_root: str,
    sim: str | None,
    tools,
    force: bool,
    fmt: str = "text",
    allow_assigned: tuple[str, ...] = (),
    persist: str | None = None,
    skip_mig: bool = False,
) -> int:
    """Print the preview in ``fmt`` (text, wide, json, yaml); returns 0 when apply would succeed, 1
    when it would stop on a problem."""
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.output import dump, emit
    from vgpu_dm.explain import log_discovery
    from vgpu_dm.host.inventory import Inventory

    spec, name, entries = loaded
    host = open_cli_host(host_root, sim)
    inventory = Inventory(host, tools)
    log_discovery(inventory)
    report = plan_report(
        entries,
        inventory,
        spec.source,
        name,
        force=force,
        allow_assigned=allow_assigned,
        persist=persist,
        skip_mig=skip_mig,
    )
    emit(dump(report, fmt) if fmt in ("json", "yaml") else render_plan(report, wide=fmt == "wide"))
    return 1 if report["problems"] else 0


@click.command("plan")
@options.config_file
@options.selected_config
@options.host_root
@options.sim
@options.driver_root
@options.sriov_manage
@options.nvidia_smi
@options.mig_parted
@options.skip_mig
@options.force
@options.allow_assigned
@options.persist
@options.watchdog_interval
@options.keep_going
@options.uuid_mode
@options.lock_timeout
@options.jobs
@options.hooks_file
@output_options(headers=False)
def plan_cmd(
    config_file: str,
    selected_config: str | None,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    sriov_manage: str,
    nvidia_smi: str,
    mig_parted: str,
    skip_mig: bool,
    force: bool,
    allow_assigned: tuple[str, ...],
    persist: str | None,
    watchdog_interval: float,
    keep_going: bool,
    uuid_mode: str,
    lock_timeout: float,
    jobs: int,
    hooks_file: str | None,
    output: str | None,
    as_json: bool,
) -> None:
    """Show what apply would do, per GPU, without changing anything (same as apply --dry-run).

    For each GPU: the config entry that decides it, its MIG change (read with nvidia-smi and
    nvidia-mig-parted export), the vGPUs that would be kept, removed (with the process of a VM that
    holds one) and created, and every problem that would stop apply. Takes apply's options, so that it
    predicts that apply. Writes nothing and does not wait for the host lock. Exit 0 if apply would
    succeed, 1 if it would stop.

    -o wide also lists every vGPU that would be removed; -o json / -o yaml give the same as data
    (every GPU with every field: null or empty where it does not apply).

    \b
    Example:
      nvidia-vgpu-dm plan --sim /tmp/host -f examples/config-t4.yaml -c T4-small
      nvidia-vgpu-dm plan -f config.yaml -c T4-small -o json | jq '.gpus[] | select(.status=="change")'
    """
    from vgpu_dm.cli.main import Failure, load_selected
    from vgpu_dm.cli.output import output_format
    from vgpu_dm.host.inventory import HostTools

    fmt = output_format(output, as_json)
    loaded = load_selected(config_file, selected_config)
    from vgpu_dm.cli.apply_cmd import checked_hooks

    checked_hooks(hooks_file)  # checked as apply checks it; a preview runs no hook
    tools = HostTools(
        sriov_manage, nvidia_smi, mig_parted, driver_root=driver_root, origins=options.tool_origins()
    )
    code = run_plan(loaded, host_root, sim, tools, force, fmt, allow_assigned, persist, skip_mig=skip_mig)
    if code:
        raise Failure(code)
