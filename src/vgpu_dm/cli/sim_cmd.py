"""``nvidia-vgpu-dm sim``: create and inspect a simulated host, so every command can run without a GPU."""

from __future__ import annotations

import click


@click.group("sim")
def sim_group() -> None:
    """Simulated hosts: a directory shaped like a GPU host's /sys, with the driver emulated.

    \b
    Example:
      nvidia-vgpu-dm sim create /tmp/host --gpu T4 --gpu T4 --gpu A10
      nvidia-vgpu-dm apply --sim /tmp/host -f examples/config-t4.yaml -c T4-small
    """


@sim_group.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--gpu",
    "gpus",
    multiple=True,
    required=True,
    metavar="NAME",
    help="A GPU from the catalog by vGPU type prefix (T4, A10, A16, A100, A100D, L40S, H100 …); repeat it.",
)
@click.option(
    "--framework",
    type=click.Choice(["auto", "mdev", "vendor-vfio"]),
    default="auto",
    show_default=True,
    help="Kernel interface of the SR-IOV GPUs: auto = vendor-specific VFIO for Ada, Hopper and Blackwell, "
    "mdev on VFs for Ampere. T4/V100 always use mdev on the GPU itself.",
)
@click.option(
    "--mixed-size/--no-mixed-size",
    default=True,
    show_default=True,
    help="Whether vendor-VFIO GPUs support mixed-size (heterogeneous) vGPU mode.",
)
def create_cmd(directory: str, gpus: tuple[str, ...], framework: str, mixed_size: bool) -> None:
    """Create a simulated host in DIRECTORY (new or empty) with the given GPUs.

    Vendor-VFIO GPUs start with their SR-IOV VFs disabled, as after a reboot: apply enables them.
    """
    from vgpu_dm.sim.layout import create_host

    vendor_vfio = None if framework == "auto" else framework == "vendor-vfio"
    try:
        state = create_host(directory, list(gpus), vendor_vfio=vendor_vfio, mixed_size=mixed_size)
    except (KeyError, ValueError, FileExistsError) as exc:
        raise click.UsageError(str(exc.args[0]) if exc.args else str(exc)) from None
    for i, gpu in enumerate(state.gpus):
        vfs = (
            f", {len(gpu.vfs)} VFs"
            if gpu.vfs
            else (f", {gpu.total_vfs} VFs not enabled" if gpu.total_vfs else "")
        )
        click.echo(f"GPU {i}: {gpu.address} {gpu.model} ({gpu.framework}{vfs})")
    click.echo(f"simulated host ready: use --sim {directory} or VGPU_DM_SIM={directory}")


@sim_group.command("gpus")
def gpus_cmd() -> None:
    """List the GPU names 'sim create --gpu' accepts."""
    from vgpu_dm import catalog

    for entry in catalog.load():
        click.echo(f"{entry.prefix:10} {entry.name}")


@sim_group.command("writes")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def writes_cmd(directory: str) -> None:
    """Print every write made to the simulated host's control files, oldest first."""
    from vgpu_dm.sim.host import write_log

    for line in write_log(directory):
        click.echo(line)
