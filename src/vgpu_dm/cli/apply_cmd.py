"""The ``apply`` command: make the host match the selected config (or, with --dry-run, show the plan).

Its own module so that ``assert``, which the node agent runs on every label change, does not define
apply's options at start-up.
"""

from __future__ import annotations

import click

from vgpu_dm import log
from vgpu_dm.cli import options
from vgpu_dm.cli.main import EPILOG, Failure, load_selected

_log = log.get()


@click.command("apply", epilog=EPILOG)
@options.config_file
@options.selected_config
@options.apply_valid_config
@options.host_root
@options.sim
@options.driver_root
@options.sriov_manage
@options.nvidia_smi
@options.force
@options.watchdog_interval
@options.keep_going
@options.uuid_mode
@options.lock_timeout
@options.jobs
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only show what would be done, per GPU (as the plan command does); write nothing, take no lock.",
)
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: same as -o json.")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["json", "yaml", "wide"]),
    help="With --dry-run: the plan as JSON or YAML, or as text that lists every vGPU removed (wide).",
)
@options.mig_parted
@options.skip_mig
@options.allow_assigned
@options.persist
@options.hooks_file
def apply_cmd(
    config_file: str,
    selected_config: str | None,
    valid_config: bool,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    sriov_manage: str,
    nvidia_smi: str,
    force: bool,
    watchdog_interval: float,
    keep_going: bool,
    uuid_mode: str,
    lock_timeout: float,
    jobs: int,
    dry_run: bool,
    as_json: bool,
    output: str | None,
    mig_parted: str,
    skip_mig: bool,
    allow_assigned: tuple[str, ...],
    persist: str | None,
    hooks_file: str | None,
) -> None:
    """Make the host's vGPU devices match the selected config.

    Everything is checked before the first write (types offered by each GPU, counts that fit); GPUs
    that already match are not touched and devices that can stay are kept. If a write fails, the
    GPUs changed so far are put back exactly as they were.

    MIG-backed types: nvidia-mig-parted first sets MIG mode and the GPU instances the config needs (a
    time-sliced config switches MIG off); GPUs whose MIG layout changes lose their vGPUs first (docs/mig.md).

    vGPUs that a libvirt VM is defined to use (running or not) are kept unless --allow-assigned or
    --force; a vGPU removed and created again keeps its UUID (mdev) or VF (vendor VFIO).
    """
    if (as_json or output) and not dry_run:
        given = "--json" if as_json else f"-o {output}"
        raise click.UsageError(f"{given} goes with --dry-run (apply itself logs to stderr)")
    from vgpu_dm.cli.output import output_format

    fmt = output_format(output, as_json)
    spec, name, entries = load_selected(config_file, selected_config)
    hooks = checked_hooks(hooks_file)  # checked before the host is looked at, as the config is
    if valid_config:
        _log.info("Selected vGPU device configuration is valid")
        return
    from vgpu_dm.host.inventory import HostTools

    tools = HostTools(
        sriov_manage, nvidia_smi, mig_parted, driver_root=driver_root, origins=options.tool_origins()
    )
    if dry_run:
        from vgpu_dm.cli.plan_cmd import run_plan

        code = run_plan(
            (spec, name, entries),
            host_root,
            sim,
            tools,
            force,
            fmt,
            allow_assigned,
            persist,
            skip_mig=skip_mig,
        )
        if code:
            raise Failure(code)
        return
    from vgpu_dm.apply import ApplyOptions, apply_config
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.main import may_change
    from vgpu_dm.cli.signals import StopOnSignal
    from vgpu_dm.errors import ApplyInterrupted

    host = open_cli_host(host_root, sim)
    may_change()
    from vgpu_dm.cli.progress import TerminalBar

    bar = TerminalBar() if TerminalBar.wanted() else None
    with StopOnSignal() as stopper:
        opts = ApplyOptions(
            force=force,
            keep_going=keep_going,
            uuid_mode=uuid_mode,
            lock_timeout=lock_timeout,
            stop=stopper.event,
            skip_mig=skip_mig,
            progress=bar,
            jobs=jobs,
            watchdog_interval=watchdog_interval,
            allow_assigned=allow_assigned,
            hooks=hooks,
            persist=persist,
        )
        try:
            plan = apply_config(entries, host, tools, spec.source, opts, name)
        except ApplyInterrupted as exc:
            for line in str(exc).splitlines():
                if line not in exc.logged:  # --keep-going logged a failed GPU's lines in their place
                    _log.error(line)
            raise Failure(stopper.exit_code) from None
        finally:
            if bar is not None:
                bar.close()
    _log.debug(f"host reads: {host.counters.reads}, writes: {host.counters.writes}")
    if plan.is_noop:
        _log.info("Selected vGPU device configuration is already applied")
    else:
        _log.info("Selected vGPU device configuration successfully applied")


def checked_hooks(hooks_file: str | None):
    """The hooks file read and checked (None without one); apply and its preview both check it."""
    if not hooks_file:
        return None
    from vgpu_dm.cli.main import _from_env
    from vgpu_dm.errors import ConfigError
    from vgpu_dm.hooks import read_hooks_file

    try:
        return read_hooks_file(hooks_file)
    except ConfigError as exc:
        if exc.problems:  # the file was read: its problems carry file:line
            raise
        ctx = click.get_current_context(silent=True)
        raise _from_env(exc, ctx, "hooks_file", "VGPU_DM_HOOKS_FILE") from None
