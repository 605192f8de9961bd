"""``nvidia-vgpu-dm types``: per GPU, the vGPU types it offers, with how many fit and how many can be
created now (what ``mdevctl types`` shows, for both kernel interfaces).
"""

from __future__ import annotations

from collections import Counter

import click

from vgpu_dm.cli import options
from vgpu_dm.cli.output import output_options

SERIES = {"A": "virtual applications", "B": "virtual PC", "C": "compute", "Q": "virtual workstation"}


def _type_row(info, max_instances: int | None) -> dict:
    from vgpu_dm.vgpu_type import InvalidVGPUType, VGPUType

    try:
        vtype = VGPUType.parse(info.name)
    except InvalidVGPUType:
        vtype = None
    return {
        "name": info.name,
        "type_id": info.type_id if info.type_id > 0 else None,
        "driver_name": info.driver_name,
        "max_instances": max_instances,
        "available": info.available,
        # 0 in a type name means 512 MB.
        "framebuffer_gb": (vtype.framebuffer_gb or 0.5) if vtype else None,
        "series": vtype.series if vtype else None,
        "mig_backed": vtype.is_mig_backed if vtype else None,
    }


def _sort_key(row: dict) -> tuple:
    return (bool(row["mig_backed"]), row["framebuffer_gb"] or 0, row["series"] or "", row["name"])


def types_report(inventory) -> list[dict]:
    """Per GPU: identity, framework, where the list comes from, and its types."""
    from vgpu_dm import catalog
    from vgpu_dm.cli.list_cmd import model_name
    from vgpu_dm.host.model import VENDOR_VFIO, TypeInfo

    report = []
    for gpu in inventory.gpus:
        entry = catalog.for_device(gpu.device_id)
        framework = inventory.framework(gpu)
        backend = inventory.backend_for(gpu)
        rows = []
        source = "driver"
        if backend is not None:
            placed = Counter(d.type_name for d in backend.devices(gpu))
            for info in backend.types(gpu).values():
                known = info.max_instances or catalog.max_instances(info.name)
                if known is None and backend.framework == VENDOR_VFIO:
                    known = backend.capacity(gpu, info, [])
                row = _type_row(info, known)
                if known is not None:
                    # On VF parents (vendor VFIO, and mdev on VFs) the driver's count is one per free VF
                    # offering the type; no more than the type's limit fit on the GPU.
                    row["available"] = max(0, min(info.available, known - placed[info.name]))
                rows.append(row)
        elif framework == "sriov-vfs-off" and entry is not None:
            # The driver lists types only once the VFs exist; apply enables them. Until then: catalog.
            source = "catalog (virtual functions not enabled yet)"
            rows = [_type_row(TypeInfo(n, -1, n, 0), m) for n, m in entry.vgpu_types.items()]
            for row in rows:
                row["available"] = None
        else:
            source = "none (not in vGPU mode)"
        report.append(
            {
                "index": gpu.index,
                "address": gpu.address,
                "device_id": str(gpu.device_id),
                "model": model_name(entry.name) if entry else "unknown NVIDIA GPU",
                "framework": framework,
                "source": source,
                "types": sorted(rows, key=_sort_key),
            }
        )
    return report


def render_types(report: list[dict], wide: bool = False, headers: bool = True) -> str:
    from vgpu_dm.cli.output import cell, table

    header = ("GPU", "ADDRESS", "MODEL", "FRAMEWORK", "VGPU TYPE", "ID", "MAX", "AVAILABLE", "FB", "SERIES")
    if wide:
        header = (*header, "DRIVER NAME")
    rows = []
    for gpu in report:
        first = (str(gpu["index"]), gpu["address"], gpu["model"], gpu["framework"])
        blank = ("",) * len(first)
        if not gpu["types"]:
            rows.append((*first, *("-" for _ in header[len(first) :])))
        for n, t in enumerate(gpu["types"]):
            fb = t["framebuffer_gb"]
            series = f"{t['series']} ({SERIES[t['series']]})" if t["series"] in SERIES else "-"
            row = (
                *(blank if n else first),
                t["name"],
                cell(t["type_id"]),
                cell(t["max_instances"]),
                cell(t["available"]),
                "-" if fb is None else f"{fb:g} GB",
                series,
            )
            rows.append((*row, cell(t["driver_name"])) if wide else row)
    lines = [table(header, rows, headers)]
    catalog_gpus = [str(g["index"]) for g in report if g["source"].startswith("catalog")]
    if catalog_gpus and headers:
        lines.append(
            f"GPU {', '.join(catalog_gpus)}: virtual functions not enabled yet, so the types come from the "
            f"GPU catalog (AVAILABLE unknown); apply enables them"
        )
    return "\n".join(lines)


@click.command("types")
@output_options()
@options.host_root
@options.sim
@options.driver_root
@options.sriov_manage
@options.nvidia_smi
def types_cmd(
    output: str | None,
    as_json: bool,
    no_headers: bool,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    sriov_manage: str,
    nvidia_smi: str,
) -> None:
    """Show, per GPU, the vGPU types it offers: how many fit (MAX), how many can be created now
    (AVAILABLE), framebuffer and series.

    On vendor-VFIO GPUs AVAILABLE counts the free virtual functions that offer the type now; MAX is
    the driver's or the GPU catalog's limit for a GPU holding only that type. -o wide adds the
    driver's full type name; -o json / -o yaml give everything (null where a value is unknown).

    \b
    Example:
      nvidia-vgpu-dm types --sim /tmp/host
      nvidia-vgpu-dm types -o json | jq '.gpus[0].types[] | select(.series=="Q") | .name'
    """
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.output import dump, emit, output_format
    from vgpu_dm.explain import log_discovery
    from vgpu_dm.host.inventory import HostTools, Inventory

    fmt = output_format(output, as_json, no_headers)
    host = open_cli_host(host_root, sim)
    inventory = Inventory(
        host, HostTools(sriov_manage, nvidia_smi, driver_root=driver_root, origins=options.tool_origins())
    )
    log_discovery(inventory)
    report = types_report(inventory)
    if fmt in ("json", "yaml"):
        emit(dump({"gpus": report}, fmt))
    elif report:
        emit(render_types(report, wide=fmt == "wide", headers=not no_headers))
    else:
        # Not data: on stderr, as kubectl's "No resources found", so that stdout stays empty.
        click.echo("no NVIDIA GPUs found", err=True)
