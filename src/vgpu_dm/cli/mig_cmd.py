"""``nvidia-vgpu-dm mig-config``: print the nvidia-mig-parted config a vGPU config needs."""

from __future__ import annotations

import click

from vgpu_dm.cli import options


@click.command("mig-config")
@options.config_file
@options.selected_config
def mig_config_cmd(config_file: str, selected_config: str | None) -> None:
    """Print the nvidia-mig-parted config (YAML) that prepares the GPUs for the selected vGPU config.

    Entries with MIG-backed types get MIG mode on and the GPU instances their vGPUs need; entries with
    only time-sliced types (or none) get MIG mode off. The mig-config has the vGPU config's name.

    \b
    Example:
      nvidia-vgpu-dm mig-config -f examples/config-mig.yaml -c A100-1-5C > mig.yaml
      nvidia-mig-parted apply -f mig.yaml -c A100-1-5C
    """
    from vgpu_dm.cli.main import load_selected
    from vgpu_dm.mig.translate import dump, mig_parted_config

    spec, name, entries = load_selected(config_file, selected_config)
    click.echo(dump(mig_parted_config(name, entries, spec.source)), nl=False)
