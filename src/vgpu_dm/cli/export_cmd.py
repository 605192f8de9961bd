"""``nvidia-vgpu-dm export``: the host's current vGPU layout as a v1 config file, so that a hand-made
(or mdevctl-made) layout can be kept, reviewed and re-applied. ``assert`` on the exported file holds.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import click

from vgpu_dm.cli import options

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _name(text: str) -> str:
    """A config name as a YAML key: plain when that reads back as the same string, else quoted."""
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    # JSON strings are YAML strings: quoting keeps any name (spaces, colons, "#") one valid key.
    return json.dumps(text, ensure_ascii=False)


def _groups(inventory) -> list[tuple[tuple[tuple[str, int], ...], list]]:
    """GPUs grouped by identical layout (type → count, in the driver's order of first appearance)."""
    from vgpu_dm.errors import HostError
    from vgpu_dm.vgpu_type import InvalidVGPUType, VGPUType

    groups: dict[tuple[tuple[str, int], ...], list] = {}
    for gpu in inventory.gpus:
        devices = inventory.devices(gpu)
        for device in devices:
            try:
                VGPUType.parse(device.type_name)
            except InvalidVGPUType:
                raise HostError(
                    f"{gpu.describe()}: vGPU {device.key} has type id {device.type_id}, whose name the "
                    f"driver no longer lists ({device.type_name}); cannot write it into a config"
                ) from None
        # Keep the driver's order of first appearance, so the file reads like the host.
        layout = tuple(Counter(d.type_name for d in devices).items())
        groups.setdefault(layout, []).append(gpu)
    return list(groups.items())


def export_layout(inventory, name: str) -> str:
    """The config text: one config ``name``; GPUs with identical layouts share an entry."""
    from vgpu_dm import catalog
    from vgpu_dm.cli.list_cmd import model_name

    groups = _groups(inventory)
    lines = ["version: v1", "vgpu-configs:", f"  {_name(name)}:"]
    if not groups:
        # No GPUs: a config needs one entry; "all" with no vGPUs is what such a host has.
        lines += ["    - devices: all", "      vgpu-devices: {}"]
    for layout, gpus in groups:
        models = sorted({model_name(e.name) for g in gpus if (e := catalog.for_device(g.device_id))})
        where = ", ".join(str(g.index) for g in gpus)
        lines.append(f"    # GPU {where}: {', '.join(models) or 'unknown model'}")
        devices = "all" if len(groups) == 1 else f"[{where}]"
        lines.append(f"    - devices: {devices}")
        if not layout:
            lines.append("      vgpu-devices: {}")
            continue
        lines.append("      vgpu-devices:")
        lines += [f"        {json.dumps(t)}: {n}" for t, n in layout]
    return "\n".join(lines) + "\n"


def export_data(inventory, name: str) -> dict:
    """The same config as data (for -o json: a JSON file is a valid config file too)."""
    groups = _groups(inventory)
    entries = [
        {
            "devices": "all" if len(groups) == 1 else [g.index for g in gpus],
            "vgpu-devices": dict(layout),
        }
        for layout, gpus in groups
    ] or [{"devices": "all", "vgpu-devices": {}}]
    return {"version": "v1", "vgpu-configs": {name: entries}}


@click.command("export")
@click.option(
    "--name",
    default="current",
    show_default=True,
    metavar="NAME",
    help="Name of the config in the exported file.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="The config file as YAML (with a comment naming the GPUs of each entry) or as JSON; both are "
    "config files that -f reads.",
)
@options.host_root
@options.sim
@options.driver_root
@options.sriov_manage
@options.nvidia_smi
def export_cmd(
    name: str,
    output: str,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    sriov_manage: str,
    nvidia_smi: str,
) -> None:
    """Print the host's current vGPU layout as a config file (one config, called NAME).

    GPUs with the same layout share one entry ('devices: all' when every GPU has it); GPUs without
    vGPUs get 'vgpu-devices: {}'. 'assert' with the exported file holds on this host. Its output is a
    config file, not a report: -o json gives the same config as JSON (no 'gpus' list).

    \b
    Example:
      nvidia-vgpu-dm export --sim /tmp/host --name before-upgrade > layout.yaml
      nvidia-vgpu-dm assert --sim /tmp/host -f layout.yaml
    """
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.journal_note import journal_note
    from vgpu_dm.cli.output import emit
    from vgpu_dm.explain import log_discovery
    from vgpu_dm.host.inventory import HostTools, Inventory

    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise click.BadParameter("must be a non-empty name without control characters", param_hint="--name")
    host = open_cli_host(host_root, sim)
    inventory = Inventory(
        host, HostTools(sriov_manage, nvidia_smi, driver_root=driver_root, origins=options.tool_origins())
    )
    log_discovery(inventory)
    if output == "json":
        text = json.dumps(export_data(inventory, name), indent=2)
    else:
        text = export_layout(inventory, name)
    note = journal_note(host)
    if note:
        # What is exported may be a half-done change; say so where the operator looks.
        click.echo(f"warning: {note}", err=True)
    emit(text.rstrip("\n"))
