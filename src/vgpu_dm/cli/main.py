"""Entry point: the click group, error-to-exit-code mapping and the assert command (the rest load lazily)."""

from __future__ import annotations

import sys

import click

from vgpu_dm import __version__, log
from vgpu_dm.cli import options
from vgpu_dm.errors import ApplyError, ConfigError, HostError, PlanError, VgpuDmError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """\b
Exit codes:
  0  success: config applied (or nothing to do), assertion holds, config valid
  1  assertion false, or apply failed (the host is left as it was)
  2  usage error or invalid config file
  130, 143  apply stopped by SIGINT / SIGTERM (128 + signal number); this run's
            changes were rolled back first
"""

_log = log.get()


class Failure(Exception):
    """Ends a command with a message already logged and an exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# Commands defined in their own modules: name -> (module, attribute).
LAZY_COMMANDS = {
    "apply": ("vgpu_dm.cli.apply_cmd", "apply_cmd"),
    "export": ("vgpu_dm.cli.export_cmd", "export_cmd"),
    "generate-config": ("vgpu_dm.cli.generate_cmd", "generate_config_cmd"),
    "list": ("vgpu_dm.cli.list_cmd", "list_cmd"),
    "mig-config": ("vgpu_dm.cli.mig_cmd", "mig_config_cmd"),
    "plan": ("vgpu_dm.cli.plan_cmd", "plan_cmd"),
    "sim": ("vgpu_dm.cli.sim_cmd", "sim_group"),
    "types": ("vgpu_dm.cli.types_cmd", "types_cmd"),
}


class _LazyGroup(click.Group):
    """The command group; commands other than assert are imported only when used or listed.

    Start-up time is dominated by imports, and the node agent runs ``assert`` on every label change.
    """

    lazy_commands = LAZY_COMMANDS

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.lazy_commands:
            import importlib

            module, attribute = self.lazy_commands[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        if command is not None:
            options.add_global_options(command)
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        unknown = name and not name.startswith("-") and not ctx.resilient_parsing
        if unknown and self.get_command(ctx, name) is None:
            # click would suggest only among the commands loaded so far (assert): offer every one.
            from vgpu_dm.text import did_you_mean

            hint = did_you_mean(name, self.list_commands(ctx)).lstrip("; ")
            ctx.fail(f"No such command {name!r}." + (f" {hint[0].upper()}{hint[1:]}" if hint else ""))
        return super().resolve_command(ctx, args)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@options.option(
    "-d",
    "--debug",
    envvar="VGPU_DM_DEBUG",
    is_flag=True,
    help="Debug output: what is read and written.  [env: VGPU_DM_DEBUG]",
)
@options.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="VGPU_DM_LOG_FORMAT",
    default="text",
    show_default=True,
    help="Log lines as upstream-style text or as JSON.  [env: VGPU_DM_LOG_FORMAT]",
)
@click.version_option(__version__, "-v", "--version", prog_name="nvidia-vgpu-dm")
def cli(debug: bool, log_format: str) -> None:
    """Make this host's NVIDIA vGPU devices match a named layout from a config file.

    \b
    Example:
      nvidia-vgpu-dm apply -f examples/config-t4.yaml -c T4-small
      nvidia-vgpu-dm assert -f examples/config-t4.yaml -c T4-small
    """
    log.setup(debug=debug, fmt=log_format)


def load_selected(config_file: str, selected: str | None):
    from vgpu_dm.spec import load_spec, read_config_source

    ctx = click.get_current_context(silent=True)
    try:
        data, source = read_config_source(config_file)
    except ConfigError as exc:
        raise _from_env(exc, ctx, "config_file", "VGPU_DM_CONFIG_FILE") from None
    spec = load_spec(data, source)
    try:
        name, entries = spec.select(selected)
    except ConfigError as exc:
        raise _from_env(exc, ctx, "selected_config", "VGPU_DM_SELECTED_CONFIG") from None
    return spec, name, entries


def _from_env(exc: ConfigError, ctx: click.Context | None, name: str, envvar: str) -> ConfigError:
    """The error, saying where the value came from when that was the environment, not the command line."""
    if not options.from_environment(ctx, name):
        return exc
    return ConfigError(f"{exc} (the value came from the environment variable {envvar})")


@cli.command("assert", epilog=EPILOG)
@options.config_file
@options.selected_config
@options.valid_config
@options.host_root
@options.sim
@options.driver_root
@options.sriov_manage
@options.nvidia_smi
def assert_cmd(
    config_file: str,
    selected_config: str | None,
    valid_config: bool,
    host_root: str,
    sim: str | None,
    driver_root: str | None,
    sriov_manage: str,
    nvidia_smi: str,
) -> None:
    """Exit 0 if the host's vGPU devices already match the selected config, 1 if not.

    GPUs that no entry of the config selects are ignored (apply would not touch them either).
    """
    spec, name, entries = load_selected(config_file, selected_config)
    if valid_config:
        _log.info("Selected vGPU device configuration is valid")
        return
    from vgpu_dm.cli.host_select import open_cli_host
    from vgpu_dm.cli.journal_note import journal_note
    from vgpu_dm.host.inventory import HostTools, Inventory
    from vgpu_dm.plan import build_plan

    host = open_cli_host(host_root, sim)
    pending = journal_note(host)
    if pending:
        _log.error(pending)
        _log.error("assertion failure: selected configuration not currently applied")
        raise Failure(EXIT_FAILED)
    inventory = Inventory(
        host, HostTools(sriov_manage, nvidia_smi, driver_root=driver_root, origins=options.tool_origins())
    )
    from vgpu_dm.explain import log_discovery, log_plan

    log_discovery(inventory)
    try:
        # assert changes nothing, so who holds a vGPU does not matter here (force skips that check).
        plan = build_plan(entries, inventory, spec.source, force=True, read_modes=False)
    except PlanError as exc:
        log_problems(exc.problems)
        _log.error("assertion failure: selected configuration cannot be applied on this host")
        raise Failure(EXIT_FAILED) from None
    log_plan(plan)
    _log.debug(f"host reads: {host.counters.reads}")
    if not inventory.gpus:
        _log.warning("this host has no NVIDIA GPUs: the assertion holds vacuously")
    if plan.is_noop:
        _log.info("Selected vGPU device configuration is currently applied")
        return
    for gp in plan.changed:
        have = _count_names([d.type_name for d in (*gp.keep, *gp.remove)])
        want = ", ".join(f"{c} x {n}" for n, c in gp.wanted.items()) or "no vGPUs"
        _log.info(f"{gp.gpu.describe()}: has {have}, config {name!r} wants {want}")
    _log.error("assertion failure: selected configuration not currently applied")
    raise Failure(EXIT_FAILED)


def _count_names(names: list[str]) -> str:
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return ", ".join(f"{c} x {n}" for n, c in seen.items()) or "no vGPUs"


class RunState:
    """What one run of the command line tells its error reporting, handed to click as the context's
    ``obj`` (one per run: no module state survives between in-process runs)."""

    def __init__(self) -> None:
        # Set by a command that is about to change the host (apply): only then does an error say
        # whether anything was changed. A read-only command never changes anything, so never says so.
        self.changing = False


def may_change() -> None:
    """Called by a command right before it may change the host."""
    state = click.get_current_context().find_object(RunState)
    if state is not None:
        state.changing = True


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of raising SystemExit (for in-process tests)."""
    state = RunState()
    root = sys.modules.get("vgpu_dm.host.root")  # not imported yet: nothing counted, keep imports light
    if root is not None:
        root.reset_changes()
    try:
        cli.main(args=argv, prog_name="nvidia-vgpu-dm", standalone_mode=False, obj=state)
    except Failure as exc:
        return exc.code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except ConfigError as exc:
        log.setup_if_needed()
        log_problems([str(p) for p in exc.problems] or str(exc).splitlines())
        return EXIT_USAGE
    except PlanError as exc:
        from vgpu_dm.host.root import changes_made

        log.setup_if_needed()
        log_problems(exc.problems)
        if state.changing and changes_made():
            # A plan made after a preparatory step (recovery, MIG, enabling VFs) can still refuse.
            _log.error("no vGPU was changed for this config; what this run did change is said above")
        elif state.changing:
            _log.error("nothing was changed")
        return EXIT_FAILED
    except OSError as exc:
        # Host I/O that failed outside a planned write (EIO on a sysfs read, an unreadable /proc …),
        # or standard output that cannot be written (a full disk, a closed pipe).
        from vgpu_dm.cli.output import StdoutError
        from vgpu_dm.host.root import changes_made

        log.setup_if_needed()
        if isinstance(exc, StdoutError):
            _log.error(f"cannot write the result to standard output: {exc.strerror or exc}")
        else:
            where = f": {exc.filename}" if exc.filename else ""
            _log.error(f"host I/O error: {exc.strerror or exc}{where}")
        if changes_made():
            _log.error("the command stopped here; once the cause is fixed, run apply again to finish or undo")
        elif state.changing:
            _log.error("nothing was changed")
        return EXIT_FAILED
    except (ApplyError, HostError, VgpuDmError) as exc:
        log.setup_if_needed()
        logged = set(getattr(exc, "logged", ()))
        log_problems([line for line in str(exc).splitlines() if line not in logged])
        return EXIT_FAILED
    return EXIT_OK


MAX_PROBLEM_LINES = 50


def log_problems(lines: list[str]) -> None:
    """Log each problem on its own line; after the first MAX_PROBLEM_LINES, only how many more."""
    for line in lines[:MAX_PROBLEM_LINES]:
        _log.error(line)
    if len(lines) > MAX_PROBLEM_LINES:
        _log.error(f"... and {len(lines) - MAX_PROBLEM_LINES} more problems (fix these first)")
