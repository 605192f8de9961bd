"""``nvidia-vgpu-dm list``: the host's GPUs and their vGPU devices, as a table or JSON."""

from __future__ import annotations

import json
import re

import click

from vgpu_dm.cli import options

_NOTE = re.compile(r"\s*\([^)]*\)\s*$")


def model_name(catalog_name: str) -> str:
    """The product name without the catalog's trailing note ("NVIDIA A16 (one of 4 GPUs per board)")."""
    return _NOTE.sub("", catalog_name) or catalog_name


def _mixed_size(inventory, gpu, framework: str) -> str:
    """on / off / unsupported for vendor-VFIO GPUs; "-" where this tool does not manage the mode."""
    from vgpu_dm.errors import HostError

    if framework != "vendor-vfio":
        return "-"
    try:
        supported, enabled = inventory.vfio.mixed_size(gpu)
    except HostError:
        return "unknown"
    if not supported:
        return "unsupported"
    return "on" if enabled else "off"


def _mdevctl(device, inventory) -> dict | None:
    """How mdevctl defines an mdev: start auto/manual, and the parent it is defined under."""
    if not device.uuid:
        return None
    defined = inventory.mdevctl.for_uuid(device.uuid)
    if not defined:
        return None
    best = next((d for d in defined if d.parent == device.parent), defined[0])
    return {
        "start": best.start,
        "parent": best.parent,
        "type": best.mdev_type,
        "file": host_path(inventory, best),
    }


def host_path(inventory, definition) -> str:
    return inventory.host.path(definition.path)


def inventory_report(host, tools=None, warnings: list[str] | None = None) -> list[dict]:
    """Per GPU: identity, framework, mixed-size mode and vGPUs with the processes that hold them, the
    libvirt VMs defined to use them and their mdevctl definitions. ``warnings`` collects what the
    readers of VM definitions and mdevctl files could not vouch for."""
    from vgpu_dm import catalog
    from vgpu_dm.host.inventory import Inventory

    inventory = Inventory(host, tools)
    report = []
    for gpu in inventory.gpus:
        entry = catalog.for_device(gpu.device_id)
        framework = inventory.framework(gpu)
        report.append(
            {
                "index": gpu.index,
                "address": gpu.address,
                "device_id": str(gpu.device_id),
                "model": model_name(entry.name) if entry else "unknown NVIDIA GPU",
                "driver": gpu.driver,
                "numa_node": gpu.numa_node,
                "framework": framework,
                "mixed_size": _mixed_size(inventory, gpu, framework),
                "vgpus": [
                    {
                        "type": d.type_name,
                        "type_id": d.type_id,
                        "uuid": d.uuid,
                        "parent": d.parent,
                        "iommu_group": d.iommu_group,
                        # Listing never refuses: an unreadable /proc just shows no holders.
                        "holders": [
                            {"pid": h.pid, "name": h.name}
                            for h in inventory.holders.holders(d, required=False)
                        ],
                        "assigned": [
                            {"domain": a.name, "uuid": a.uuid, "state": a.state}
                            for a in inventory.assigned(d)
                        ],
                        "mdevctl": _mdevctl(d, inventory),
                    }
                    for d in inventory.devices(gpu)
                ],
            }
        )
        if framework == "mdev":
            # Definitions of mdevs that do not exist now: mdevctl creates the auto ones at boot.
            existing = {v["uuid"] for v in report[-1]["vgpus"]}
            report[-1]["mdevctl_not_created"] = [
                {"uuid": d.uuid, "parent": d.parent, "type": d.mdev_type, "start": d.start}
                for d in inventory.mdevctl.on_parents(inventory.mdev.parents(gpu))
                if d.uuid not in existing
            ]
    if warnings is not None:
        warnings.extend(inventory.claim_warnings())
    return report


def render_table(report: list[dict]) -> str:
    from vgpu_dm.log import printable

    header = (
        "GPU", "ADDRESS", "MODEL", "FRAMEWORK", "MIXED",
        "VGPU TYPE", "UUID", "PARENT", "HOLDER", "VM", "MDEVCTL",
    )  # fmt: skip
    rows = []
    for gpu in report:
        first = (str(gpu["index"]), gpu["address"], gpu["model"], gpu["framework"], gpu["mixed_size"])
        blank = ("",) * len(first)
        if not gpu["vgpus"]:
            rows.append((*first, "-", "-", "-", "-", "-", "-"))
        for n, vgpu in enumerate(gpu["vgpus"]):
            holder = ", ".join(f"{h['pid']} {h['name']}" for h in vgpu["holders"]) or "-"
            vms = ", ".join(f"{a['domain']} ({a['state']})" for a in vgpu.get("assigned", ())) or "-"
            defined = vgpu.get("mdevctl")
            mdevctl = "-"
            if defined:
                mdevctl = defined["start"] + (
                    "" if defined["parent"] == vgpu["parent"] else f" on {defined['parent']}"
                )
            rows.append(
                (
                    *(blank if n else first),
                    vgpu["type"],
                    vgpu["uuid"] or "-",
                    vgpu["parent"],
                    holder,
                    vms,
                    mdevctl,
                )
            )
    if not rows:
        return "no NVIDIA GPUs found"
    rows = [tuple(printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)
    )


def journal_by_gpu(host) -> dict[str, dict]:
    """GPU address → what the apply journal says about it (``*`` = every GPU: an unreadable journal)."""
    from vgpu_dm import journal
    from vgpu_dm.cli.journal_note import journal_note, journal_state

    state = journal_state(host)
    if state is None:
        return {}
    kind, _ = state
    note = journal_note(host)
    if kind == "unreadable":
        return {"*": {"state": kind, "note": note}}
    found = journal.read(host)
    if found is None:  # finished between the two reads
        return {}
    common = {"state": kind, "pid": found.pid, "config": found.config, "started": found.started, "note": note}
    return {
        g.gpu: {**common, "framework": g.framework, "remove": g.remove, "create": g.create}
        for g in found.gpus
    }


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@options.host_root
@options.sim
@options.driver_root
@options.nvidia_smi
def list_cmd(
    as_json: bool, host_root: str, sim: str | None, driver_root: str | None, nvidia_smi: str
) -> None:
    """Show the host's NVIDIA GPUs, the vGPU framework each uses, and their vGPU devices.

    MIXED is the mixed-size (heterogeneous) vGPU mode of vendor-VFIO GPUs; HOLDER is the process (a
    VM) that has the vGPU open; VM the libvirt VMs defined to use it (running or shut off); MDEVCTL
    whether mdevctl defines it (auto: created again at boot). An apply that was interrupted, or is
    running, is reported too.

    \b
    Example:
      nvidia-vgpu-dm list --sim /tmp/host
      nvidia-vgpu-dm list --json | jq '.[].vgpus | length'
    """
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.output import emit
    from vgpu_dm.host.inventory import HostTools

    host = open_cli_host(host_root, sim)
    warnings: list[str] = []
    report = inventory_report(host, HostTools(nvidia_smi=nvidia_smi, driver_root=driver_root), warnings)
    pending = journal_by_gpu(host)
    if as_json:
        for gpu in report:
            gpu["apply_journal"] = pending.get(gpu["address"]) or pending.get("*")
        emit(json.dumps(report, indent=2))
    else:
        emit(render_table(report))
    notes = {p["note"] for p in pending.values()}
    if not notes:  # a journal that names no GPU still tells of an apply
        from vgpu_dm.cli.journal_note import journal_note

        notes = {journal_note(host)} - {None}
    for note in sorted(notes):
        click.echo(f"warning: {note}", err=True)
    for gpu in report:
        waiting = gpu.get("mdevctl_not_created") or []
        auto = [d for d in waiting if d["start"] == "auto"]
        if auto:
            click.echo(
                f"note: GPU {gpu['index']} ({gpu['address']}): mdevctl defines {len(auto)} more mdev(s) with "
                f"start=auto that do not exist now; it creates them when the GPU appears at boot: "
                + ", ".join(f"{d['uuid']} ({d['type']})" for d in auto),
                err=True,
            )
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
