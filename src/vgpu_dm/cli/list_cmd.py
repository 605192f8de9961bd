"""``nvidia-vgpu-dm list``: the host's GPUs and their vGPU devices, as a table or JSON."""

from __future__ import annotations

import json

import click

from vgpu_dm.cli import options


def inventory_report(host) -> list[dict]:
    from vgpu_dm import catalog
    from vgpu_dm.host.inventory import Inventory

    inventory = Inventory(host)
    report = []
    for gpu in inventory.gpus:
        entry = catalog.for_device(gpu.device_id)
        report.append(
            {
                "index": gpu.index,
                "address": gpu.address,
                "device_id": str(gpu.device_id),
                "model": entry.name if entry else "unknown NVIDIA GPU",
                "driver": gpu.driver,
                "numa_node": gpu.numa_node,
                "framework": inventory.framework(gpu),
                "vgpus": [
                    {
                        "type": d.type_name,
                        "type_id": d.type_id,
                        "uuid": d.uuid,
                        "parent": d.parent,
                        "iommu_group": d.iommu_group,
                    }
                    for d in inventory.devices(gpu)
                ],
            }
        )
    return report


def render_table(report: list[dict]) -> str:
    header = ("GPU", "ADDRESS", "MODEL", "FRAMEWORK", "VGPU TYPE", "UUID", "PARENT")
    rows = []
    for gpu in report:
        first = (str(gpu["index"]), gpu["address"], gpu["model"], gpu["framework"])
        if not gpu["vgpus"]:
            rows.append((*first, "-", "-", "-"))
        for vgpu in gpu["vgpus"]:
            rows.append((*first, vgpu["type"], vgpu["uuid"] or "-", vgpu["parent"]))
    if not rows:
        return "no NVIDIA GPUs found"
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)
    )


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@options.host_root
@options.sim
def list_cmd(as_json: bool, host_root: str, sim: str | None) -> None:
    """Show the host's NVIDIA GPUs, the vGPU framework each uses, and their vGPU devices.

    \b
    Example:
      nvidia-vgpu-dm list --sim /tmp/host
      nvidia-vgpu-dm list --json | jq '.[].vgpus | length'
    """
    from vgpu_dm.cli.main import _journal_note
    from vgpu_dm.host.root import open_host

    host = open_host(host_root, sim)
    report = inventory_report(host)
    click.echo(json.dumps(report, indent=2) if as_json else render_table(report))
    note = _journal_note(host)
    if note:
        click.echo(f"warning: {note}; the next apply will undo it", err=True)
