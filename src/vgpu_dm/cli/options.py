"""Options shared by several commands, with the upstream names and environment variables."""

from __future__ import annotations

import math

import click
from click.core import ParameterSource


def from_environment(ctx: click.Context | None, name: str) -> bool:
    """Whether the value of parameter ``name`` came from its environment variable."""
    return ctx is not None and ctx.get_parameter_source(name) is ParameterSource.ENVIRONMENT


def given_as(ctx: click.Context | None, name: str, flag: str, envvar: str) -> str:
    """How the operator gave a value, for an error message: the option, or the environment variable
    when that is where the value came from (a bad value in an env file is not on the command line)."""
    if from_environment(ctx, name):
        return f"environment variable {envvar} (for '{flag}')"
    return f"'{flag}'"


# The options naming the driver's programs and their root: (parameter, option, environment variable).
_TOOL_OPTIONS = (
    ("nvidia_smi", "--nvidia-smi", "VGPU_DM_NVIDIA_SMI"),
    ("sriov_manage", "--sriov-manage", "VGPU_DM_SRIOV_MANAGE"),
    ("mig_parted", "--mig-parted", "VGPU_DM_MIG_PARTED"),
    ("driver_root", "--driver-root", "VGPU_DM_DRIVER_ROOT"),
)


def tool_origins() -> tuple[tuple[str, str], ...]:
    """(value, how it was given) of each program path or driver root the operator set, for HostTools:
    a program that is not found is then named by the option or variable its path came from."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return ()
    found = []
    for name, flag, envvar in _TOOL_OPTIONS:
        if ctx.get_parameter_source(name) in (ParameterSource.ENVIRONMENT, ParameterSource.COMMANDLINE):
            value = ctx.params.get(name)
            if value:
                found.append((str(value), given_as(ctx, name, flag, envvar)))
    return tuple(found)


class EnvOption(click.Option):
    """An option whose errors name its environment variable when the bad value came from there."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        if self.name and isinstance(self.envvar, str) and from_environment(ctx, self.name):
            return given_as(ctx, self.name, self.opts[-1], self.envvar)
        return super().get_error_hint(ctx)


def option(*decls: str, **attrs):
    """click.option with EnvOption: every option of ours that has an environment variable uses it."""
    return click.option(*decls, cls=EnvOption, **attrs)


config_file = option(
    "-f",
    "--config-file",
    envvar="VGPU_DM_CONFIG_FILE",
    required=True,
    metavar="FILE",
    help="vGPU config file (YAML or JSON); '-' reads standard input.  [env: VGPU_DM_CONFIG_FILE]",
)
selected_config = option(
    "-c",
    "--selected-config",
    envvar="VGPU_DM_SELECTED_CONFIG",
    metavar="NAME",
    help="Name of the config in the file to use; may be left out when the file has exactly one.  "
    "[env: VGPU_DM_SELECTED_CONFIG]",
)
valid_config = option(
    "-a",
    "--valid-config",
    envvar="VGPU_DM_VALID_CONFIG",
    is_flag=True,
    help="Only check that the file is valid and the selected config exists; do not look at the host.  "
    "[env: VGPU_DM_VALID_CONFIG]",
)
host_root = option(
    "--host-root",
    envvar="VGPU_DM_HOST_ROOT",
    metavar="DIR",
    default="/",
    show_default=True,
    help="Directory where the host's /sys, /proc and /dev are found (e.g. /host in a container).  "
    "[env: VGPU_DM_HOST_ROOT]",
)
driver_root = option(
    "--driver-root",
    envvar="VGPU_DM_DRIVER_ROOT",
    metavar="DIR",
    # A directory that is not there is a usage error, not a driver root in which nothing is found.
    type=click.Path(exists=True, file_okay=False),
    help="Where the NVIDIA driver's programs (nvidia-smi, sriov-manage, libnvidia-ml) live; they run "
    "through 'chroot DIR'. Default: the host root. With the GPU Operator's containerised driver: the "
    "host's /run/nvidia/driver (e.g. /host/run/nvidia/driver in a container).  [env: VGPU_DM_DRIVER_ROOT]",
)
apply_valid_config = click.option(
    "-a",
    "--valid-config",
    is_flag=True,
    help="Only check that the file is valid and the selected config exists; change nothing. "
    "(VGPU_DM_VALID_CONFIG does not set it here: the environment must not turn apply into a no-op.)",
)
sriov_manage = option(
    "--sriov-manage",
    envvar="VGPU_DM_SRIOV_MANAGE",
    metavar="PATH",
    default="/usr/lib/nvidia/sriov-manage",
    show_default=True,
    help="The driver's sriov-manage script, as a path inside the driver root; run to enable a GPU's VFs "
    "(vendor-specific VFIO hosts).  [env: VGPU_DM_SRIOV_MANAGE]",
)
nvidia_smi = option(
    "--nvidia-smi",
    envvar="VGPU_DM_NVIDIA_SMI",
    metavar="PATH",
    default="nvidia-smi",
    show_default=True,
    help="nvidia-smi, inside the driver root: queries and switches mixed-size vGPU mode and names "
    "vendor-VFIO vGPU types.  [env: VGPU_DM_NVIDIA_SMI]",
)
sim = option(
    "--sim",
    envvar="VGPU_DM_SIM",
    metavar="DIR",
    help="Work on the simulated host in DIR (made by 'nvidia-vgpu-dm sim create') instead of this "
    "machine.  [env: VGPU_DM_SIM]",
)
force = option(
    "--force",
    envvar="VGPU_DM_FORCE",
    is_flag=True,
    help="Also remove mdev vGPUs that a running VM holds open (the VM loses its GPU). The kernel makes "
    "such a removal wait until the VM releases the device, so apply waits too, logging what it waits for "
    "every --watchdog-interval seconds. Vendor-VFIO vGPUs in use cannot be removed even so (the driver "
    "refuses).  [env: VGPU_DM_FORCE]",
)
watchdog_interval = option(
    "--watchdog-interval",
    envvar="VGPU_DM_WATCHDOG_INTERVAL",
    type=click.FloatRange(min=0.01),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="While a forced removal waits for a VM to release its vGPU, log the device and the process "
    "every SECONDS.  [env: VGPU_DM_WATCHDOG_INTERVAL]",
)
keep_going = option(
    "--keep-going",
    envvar="VGPU_DM_KEEP_GOING",
    is_flag=True,
    help="If one GPU fails, roll back only that GPU and carry on with the others (default: roll back "
    "every GPU changed in this run).  [env: VGPU_DM_KEEP_GOING]",
)
uuid_mode = option(
    "--uuid-mode",
    envvar="VGPU_DM_UUID_MODE",
    type=click.Choice(["random", "stable"]),
    default="random",
    show_default=True,
    help="UUIDs of new mdev vGPUs: random as upstream, or stable = derived from /etc/machine-id, the GPU's "
    "PCI address, the type and an ordinal, so VMs get the same UUIDs after a reboot.  "
    "[env: VGPU_DM_UUID_MODE]",
)


class Seconds(click.ParamType):
    """A finite number of seconds >= 0 (float() alone accepts nan and inf)."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a finite number of seconds >= 0", param, ctx)
        return seconds


lock_timeout = option(
    "--lock-timeout",
    envvar="VGPU_DM_LOCK_TIMEOUT",
    type=Seconds(),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for another apply on this host to finish.  [env: VGPU_DM_LOCK_TIMEOUT]",
)
mig_parted = option(
    "--mig-parted",
    envvar="VGPU_DM_MIG_PARTED",
    metavar="PATH",
    default="nvidia-mig-parted",
    show_default=True,
    help="The host's nvidia-mig-parted, run inside the host root to read and set MIG mode and GPU instances "
    "(in a container with --host-root, one on this image's PATH is used instead, with the driver's NVML "
    "preloaded; see docs/mig.md).  [env: VGPU_DM_MIG_PARTED]",
)
skip_mig = option(
    "--skip-mig",
    envvar="VGPU_DM_SKIP_MIG",
    is_flag=True,
    help="Do not run nvidia-mig-parted: use the MIG mode and GPU instances the GPUs have.  "
    "[env: VGPU_DM_SKIP_MIG]",
)


def _late_global(ctx: click.Context, param: click.Parameter, value):
    """-d / --log-format given after the subcommand: set up logging again with that one changed."""
    from click.core import ParameterSource

    from vgpu_dm import log

    if ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
        log.setup(**{**log.settings, ("debug" if param.name == "debug" else "fmt"): value})
    return value


def add_global_options(command: click.Command) -> None:
    """Accept the global options after ``command`` (and each subcommand of a group) too:
    ``nvidia-vgpu-dm apply … -d``. Idempotent."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_global_options(sub)
        return
    if any(p.name == "debug" for p in command.params):
        return
    command.params.append(
        click.Option(
            ["-d", "--debug"],
            is_flag=True,
            expose_value=False,
            callback=_late_global,
            help="Same as the global -d (may come after the command).",
        )
    )
    command.params.append(
        click.Option(
            ["--log-format"],
            type=click.Choice(["text", "json"]),
            expose_value=False,
            callback=_late_global,
            help="Same as the global --log-format (may come after the command).",
        )
    )


allow_assigned = option(
    "--allow-assigned",
    "allow_assigned",
    envvar="VGPU_DM_ALLOW_ASSIGNED",
    multiple=True,
    metavar="VM",
    help="Also remove vGPUs that the libvirt VM named VM (a domain name or UUID; 'all' for every VM) is "
    "defined to use, as long as it is not running: it will not start until its definition is changed. "
    "Repeatable; narrower than --force, which also takes vGPUs from running VMs.  "
    "[env: VGPU_DM_ALLOW_ASSIGNED, space-separated]",
)
persist = option(
    "--persist",
    envvar="VGPU_DM_PERSIST",
    type=click.Choice(["mdevctl"]),
    help="After applying, make mdevctl's definitions of the selected GPUs match their vGPUs (start=auto), so "
    "mdevctl recreates them at boot; mdev GPUs only. start=manual definitions are left alone, and one a "
    "libvirt VM names is removed only with --allow-assigned or --force. With plan or --dry-run: show what it "
    "would write and remove. The alternative is the systemd unit in deploy/systemd.  [env: VGPU_DM_PERSIST]",
)
hooks_file = option(
    "--hooks-file",
    envvar="VGPU_DM_HOOKS_FILE",
    metavar="FILE",
    help="YAML file of programs to run at apply's stages: apply-start, pre-change, post-change, "
    "apply-exit (see docs/kvm-host.md).  [env: VGPU_DM_HOOKS_FILE]",
)


jobs = option(
    "--jobs",
    envvar="VGPU_DM_JOBS",
    type=click.IntRange(min=0),
    default=0,
    show_default="0: one per GPU being changed, up to 8",
    metavar="N",
    help="How many GPUs to change at once; 1 changes them one after another. A failure still stops "
    "and rolls back every GPU changed so far.  [env: VGPU_DM_JOBS]",
)
