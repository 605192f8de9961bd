"""Which host a command works on: the real one below --host-root, or a simulated one (--sim).

The choice is the front end's: the host layer never imports the simulator. Every way the selection
can be wrong (a missing or empty directory, both options at once, a directory that is not a host
root, a simulated host given as a real one or the other way round) is a usage error (exit 2) naming
the option or environment variable it came from, found before anything of the host is read.
"""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from vgpu_dm.cli.options import given_as

SIM_ENV = "VGPU_DM_SIM"
HOST_ROOT_ENV = "VGPU_DM_HOST_ROOT"


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _hint(ctx: click.Context, flag: str) -> str:
    env = SIM_ENV if flag == "--sim" else HOST_ROOT_ENV
    return given_as(ctx, flag.lstrip("-").replace("-", "_"), flag, env)


def check_host_options(host_root: str, sim: str | None) -> None:
    """Raise click.UsageError for a host selection that cannot be what the operator meant.

    click treats an empty environment variable as unset, which would quietly select the real host
    when ``VGPU_DM_SIM=""`` came from a template; that is refused here.
    """
    ctx = click.get_current_context()
    for env, flag in ((SIM_ENV, "--sim"), (HOST_ROOT_ENV, "--host-root")):
        if os.environ.get(env) == "" and not _given(ctx, flag.lstrip("-").replace("-", "_")):
            raise click.UsageError(
                f"{env} is set but empty; unset it to work on this machine, or give a directory"
            )
    if sim == "":
        raise click.UsageError("--sim needs a directory made by 'nvidia-vgpu-dm sim create'")
    if host_root == "":
        raise click.UsageError("--host-root needs a directory (use / for this machine)")
    if sim is not None and _given(ctx, "host_root"):
        raise click.UsageError(
            "--sim and --host-root (or VGPU_DM_SIM and VGPU_DM_HOST_ROOT) both given: a simulated host "
            "is its own root; give only one"
        )
    for flag, path in (("--sim", sim), ("--host-root", host_root)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise click.BadParameter(f"{path} does not exist", param_hint=_hint(ctx, flag))
        if not os.path.isdir(path):
            raise click.BadParameter(f"{path} is not a directory", param_hint=_hint(ctx, flag))


def open_cli_host(host_root: str, sim: str | None):
    """The host object for a command, after the usage checks above."""
    from vgpu_dm.host.root import NotAHostRoot

    check_host_options(host_root, sim)
    flag = "--sim" if sim else "--host-root"
    from vgpu_dm.host_choice import open_host_or_sim

    try:
        return open_host_or_sim(host_root, sim)
    except NotAHostRoot as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(click.get_current_context(), flag)) from None
