"""``nvidia-vgpu-dm list``: the host's GPUs and their vGPU devices, as a table, JSON or YAML."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import click

from vgpu_dm.cli import options
from vgpu_dm.cli.output import output_options

_NOTE = re.compile(r"\s*\([^)]*\)\s*$")


def model_name(catalog_name: str) -> str:
    """The product name without the catalog's trailing note ("NVIDIA A16 (one of 4 GPUs per board)")."""
    return _NOTE.sub("", catalog_name) or catalog_name


def mixed_size_modes(
    inventory, frameworks: dict[str, str], warnings: list[str] | None = None
) -> dict[str, str | None]:
    """GPU address → "on" / "off" / "unsupported" / "unknown" (nvidia-smi failed), or None where the
    mode does not apply (no vGPU framework).

    Only GPUs in vGPU mode are asked about: NVIDIA supports the mode from Volta on, on mdev and
    vendor-VFIO GPUs alike (host-interfaces.md §2.5; every GPU the catalog knows is Volta or later, and
    apply switches the mode on both frameworks). The answer is in each GPU's own block of
    ``nvidia-smi -q`` (``Heterogeneous Time-Slice Sizes``, ``vGPU Heterogeneous Mode``; the captures
    of §2.5 and §11); no narrower ``-d`` section is known to print those lines, so none is guessed.
    One GPU to ask: ``-q -i <address>``, that GPU's block only (what apply asks too). Several: one
    ``-q`` for all, since every nvidia-smi run pays its own start-up and NVML initialisation.
    """
    from vgpu_dm.errors import HostError

    vgpu = [a for a, f in frameworks.items() if f in ("mdev", "vendor-vfio")]
    modes: dict[str, str | None] = dict.fromkeys(frameworks)
    if not vgpu:
        return modes
    from vgpu_dm.host.smi import parse_mixed_size

    argv = [inventory.tools.nvidia_smi, "-q", *(["-i", vgpu[0]] if len(vgpu) == 1 else [])]
    why = ""
    try:
        proc = inventory.programs.run(argv, "nvidia-smi")
        text = proc.stdout if proc.returncode == 0 else ""
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout or "").strip()
            why = f"'nvidia-smi {' '.join(argv[1:])}' failed (exit {proc.returncode}): {out}"
    except HostError as exc:
        text, why = "", str(exc)
    if why and warnings is not None:
        warnings.append(f"MIXED is unknown: {why}")
    for address in vgpu:
        try:
            supported, enabled = parse_mixed_size(text, address)
        except ValueError:
            modes[address] = "unknown"
            continue
        modes[address] = ("on" if enabled else "off") if supported else "unsupported"
    return modes


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


def _mig_states(inventory) -> tuple[object | None, str | None]:
    """The host's MIG state when it has a MIG GPU (nvidia-smi and nvidia-mig-parted export, both read
    only), else None; (None, why) when it cannot be read."""
    from vgpu_dm.errors import HostError
    from vgpu_dm.plan_mig import catalog_mig

    if not any(catalog_mig(g) for g in inventory.gpus):
        return None, None
    from vgpu_dm.mig import state
    from vgpu_dm.mig.parted import MigParted

    try:
        return state.read(inventory, MigParted(inventory.host, inventory.tools)), None
    except HostError as exc:
        return None, str(exc)


def _mig(gpu, states, why: str | None) -> dict | None:
    """MIG mode and GPU instances of one GPU (None: no MIG)."""
    from vgpu_dm.plan_mig import catalog_mig

    if states is None:
        if why and catalog_mig(gpu):
            return {"mode": "unknown", "pending": None, "instances": {}, "error": why}
        return None
    seen = states.of(gpu.address)
    if seen is None or not seen.capable:
        return None
    pending = None if seen.pending is None else ("on" if seen.pending else "off")
    return {
        "mode": "on" if seen.layout.enabled else "off",
        "pending": pending,
        "instances": seen.layout.as_dict,
    }


def mig_text(mig: dict | None) -> str | None:
    """The MIG cell: ``on 7x1g.5gb``, ``off``, ``off (pending on)``; None (shown as "-") without MIG."""
    if mig is None:
        return None
    text = mig["mode"]
    if mig["instances"]:
        text += " " + ",".join(f"{n}x{p}" for p, n in mig["instances"].items())
    if mig["pending"]:
        text += f" (pending {mig['pending']})"
    return text


def inventory_report(
    host, tools=None, warnings: list[str] | None = None, notes: list[str] | None = None
) -> list[dict]:
    """Per GPU: identity, framework, mixed-size mode, MIG mode and GPU instances, and vGPUs with the
    processes that hold them, the libvirt VMs defined to use them and their mdevctl definitions.
    ``warnings`` collects what the readers of VM definitions and mdevctl files could not vouch for (and
    why the MIG state could not be read); ``notes`` what belongs to no GPU
    now (mdevctl definitions on parents that do not exist)."""
    from vgpu_dm import catalog
    from vgpu_dm.explain import log_discovery
    from vgpu_dm.host.inventory import Inventory

    inventory = Inventory(host, tools)
    log_discovery(inventory)
    frameworks = {gpu.address: inventory.framework(gpu) for gpu in inventory.gpus}
    modes = mixed_size_modes(inventory, frameworks, warnings)
    states, why = _mig_states(inventory)
    if why and warnings is not None:
        warnings.append(f"MIG mode and GPU instances unknown: {why}")
    report = []
    for gpu in inventory.gpus:
        entry = catalog.for_device(gpu.device_id)
        report.append(
            {
                "index": gpu.index,
                "address": gpu.address,
                "device_id": str(gpu.device_id),
                "model": model_name(entry.name) if entry else "unknown NVIDIA GPU",
                "driver": gpu.driver,
                "numa_node": gpu.numa_node,
                "framework": frameworks[gpu.address],
                "mixed_size": modes[gpu.address],
                "mig": _mig(gpu, states, why),
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
        # Definitions of mdevs that do not exist now: mdevctl creates the auto ones at boot (mdev
        # GPUs only; null where that does not apply).
        report[-1]["mdevctl_not_created"] = None
        if frameworks[gpu.address] == "mdev":
            existing = {v["uuid"] for v in report[-1]["vgpus"]}
            report[-1]["mdevctl_not_created"] = [
                {"uuid": d.uuid, "parent": d.parent, "type": d.mdev_type, "start": d.start}
                for d in inventory.mdevctl.on_parents(inventory.mdev.parents(gpu))
                if d.uuid not in existing
            ]
    if notes is not None and inventory.mdevctl.installed:
        notes.extend(_definitions_without_parent(inventory))
    if warnings is not None:
        warnings.extend(inventory.claim_warnings())
    return report


def _definitions_without_parent(inventory) -> list[str]:
    """Auto definitions whose parent is not an mdev parent now: on an SR-IOV GPU whose VFs are off
    (after a reboot) the parents are VFs that do not exist yet, so no GPU can be named for them."""
    present = {p for gpu in inventory.gpus for p in inventory.mdev.parents(gpu)}
    waiting = [d for d in inventory.mdevctl.definitions if d.auto and d.parent not in present]
    if not waiting:
        return []
    return [
        f"mdevctl defines {len(waiting)} mdev(s) with start=auto on parents that do not exist now; it "
        f"creates them when those parents appear (SR-IOV VFs: when sriov-manage enables them, if their udev "
        f"event reaches mdevctl): " + ", ".join(f"{d.uuid} ({d.mdev_type} on {d.parent})" for d in waiting)
    ]


class Column(NamedTuple):
    """One column of the table: its header, how to get the cell, and whether only -o wide shows it."""

    header: str
    value: Callable[[dict], object]
    wide: bool = False


def _holders(vgpu: dict) -> str | None:
    return ", ".join(f"{h['pid']} {h['name']}" for h in vgpu["holders"]) or None


def _vms(vgpu: dict) -> str | None:
    return ", ".join(f"{a['domain']} ({a['state']})" for a in vgpu["assigned"]) or None


def _mdevctl_cell(vgpu: dict) -> str | None:
    defined = vgpu["mdevctl"]
    if not defined:
        return None
    return defined["start"] + ("" if defined["parent"] == vgpu["parent"] else f" on {defined['parent']}")


# Printed once per GPU, on its first line. A new GPU-level field is one more Column here.
GPU_COLUMNS = (
    Column("GPU", lambda g: g["index"]),
    Column("ADDRESS", lambda g: g["address"]),
    Column("DEVICE ID", lambda g: g["device_id"], wide=True),
    Column("MODEL", lambda g: g["model"]),
    Column("DRIVER", lambda g: g["driver"], wide=True),
    Column("NUMA", lambda g: g["numa_node"], wide=True),
    Column("FRAMEWORK", lambda g: g["framework"]),
    Column("MIXED", lambda g: g["mixed_size"]),
    Column("MIG", lambda g: mig_text(g["mig"])),
)
# One line per vGPU.
VGPU_COLUMNS = (
    Column("VGPU TYPE", lambda v: v["type"]),
    Column("TYPE ID", lambda v: v["type_id"], wide=True),
    Column("UUID", lambda v: v["uuid"]),
    Column("PARENT", lambda v: v["parent"]),
    Column("IOMMU GROUP", lambda v: v["iommu_group"], wide=True),
    Column("HOLDER", _holders),
    Column("VM", _vms),
    Column("MDEVCTL", _mdevctl_cell),
)


def render_table(report: list[dict], wide: bool = False, headers: bool = True) -> str:
    from vgpu_dm.cli.output import cell, table

    gpu_columns = [c for c in GPU_COLUMNS if wide or not c.wide]
    vgpu_columns = [c for c in VGPU_COLUMNS if wide or not c.wide]
    rows = []
    for gpu in report:
        first = tuple(cell(c.value(gpu)) for c in gpu_columns)
        blank = ("",) * len(first)
        if not gpu["vgpus"]:
            rows.append((*first, *("-" for _ in vgpu_columns)))
        for n, vgpu in enumerate(gpu["vgpus"]):
            rows.append((*(blank if n else first), *(cell(c.value(vgpu)) for c in vgpu_columns)))
    header = tuple(c.header for c in (*gpu_columns, *vgpu_columns))
    return table(header, rows, headers)


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
@output_options()
@options.host_root
@options.sim
@options.driver_root
@options.nvidia_smi
@options.mig_parted
def list_cmd(
    output: str | None,
    as_json: bool,
    no_headers: bool,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    nvidia_smi: str,
    mig_parted: str,
) -> None:
    """Show the host's NVIDIA GPUs, the vGPU framework each uses, and their vGPU devices.

    MIXED is the mixed-size (heterogeneous) vGPU mode of each GPU (from nvidia-smi -q); MIG the MIG
    mode and GPU instances of MIG GPUs (nvidia-smi and nvidia-mig-parted export; "pending" = a mode
    change that waits for a GPU reset); HOLDER is the process (a VM) that has the vGPU open; VM the
    libvirt VMs defined to use it (running or shut off);
    MDEVCTL whether mdevctl defines it (auto: created again at boot). -o wide adds device id, driver,
    NUMA node, vGPU type id and IOMMU group; -o json / -o yaml give all of it, plus what an
    interrupted or running apply left in its journal. Never changes anything and needs no write
    access.

    \b
    Example:
      nvidia-vgpu-dm list --sim /tmp/host
      nvidia-vgpu-dm list -o json | jq '.gpus[].vgpus | length'
    """
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.output import dump, emit, output_format
    from vgpu_dm.host.inventory import HostTools

    fmt = output_format(output, as_json, no_headers)
    host = open_cli_host(host_root, sim)
    warnings: list[str] = []
    notes_of_host: list[str] = []
    tools = HostTools(
        nvidia_smi=nvidia_smi, mig_parted=mig_parted, driver_root=driver_root, origins=options.tool_origins()
    )
    report = inventory_report(host, tools, warnings, notes_of_host)
    pending = journal_by_gpu(host)
    notes = {p["note"] for p in pending.values()}
    if not notes:  # a journal that names no GPU still tells of an apply
        from vgpu_dm.cli.journal_note import journal_note

        notes = {journal_note(host)} - {None}
    if fmt in ("json", "yaml"):
        for gpu in report:
            gpu["apply_journal"] = pending.get(gpu["address"]) or pending.get("*")
        emit(dump({"gpus": report, "journal": sorted(notes)[0] if notes else None}, fmt))
    elif report:
        emit(render_table(report, wide=fmt == "wide", headers=not no_headers))
    else:
        # Not data: on stderr, as kubectl's "No resources found", so that stdout stays empty.
        click.echo("no NVIDIA GPUs found", err=True)
    for note in sorted(notes):
        click.echo(f"warning: {note}", err=True)
    for gpu in report:
        auto = [d for d in gpu["mdevctl_not_created"] or [] if d["start"] == "auto"]
        if auto:
            click.echo(
                f"note: GPU {gpu['index']} ({gpu['address']}): mdevctl defines {len(auto)} more mdev(s) with "
                f"start=auto that do not exist now; it creates them when the GPU appears at boot: "
                + ", ".join(f"{d['uuid']} ({d['type']})" for d in auto),
                err=True,
            )
    for note in notes_of_host:
        click.echo(f"note: {note}", err=True)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
