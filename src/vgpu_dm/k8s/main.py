"""``nvidia-k8s-vgpu-dm``: flags and environment (upstream names and spellings, k8s/flags.py), start-up
checks, signal handling.

Exit codes: 0 after SIGTERM/SIGINT (operands restored), 1 when it cannot start (kubeconfig, a metrics
address given explicitly that cannot be bound; the default one is only logged), 2 for a usage error
(a missing required flag, a bad value, the ``k8s`` extra not installed).

Idle, the process sleeps: the main thread blocks in ``select`` on a pipe that a signal (through
``signal.set_wakeup_fd``, whichever thread the kernel hands it to) or the worker's end writes to.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys

import click

from vgpu_dm import __version__, log
from vgpu_dm.k8s import settings as S

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_log = log.get("k8s")


class Failure(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _env(name: str) -> str:
    return f"  [env: {name}]"


@click.command(
    "nvidia-k8s-vgpu-dm",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--kubeconfig",
    envvar="KUBECONFIG",
    metavar="FILE",
    help="Kubeconfig file; without it the in-cluster service account is used." + _env("KUBECONFIG"),
)
@click.option(
    "-n",
    "--node-name",
    envvar="NODE_NAME",
    required=True,
    metavar="NAME",
    help="The Node this agent manages (from the downward API)." + _env("NODE_NAME"),
)
@click.option(
    "-ns",
    "--ns",
    "--namespace",
    "namespace",
    envvar="NAMESPACE",
    required=True,
    metavar="NS",
    help="Namespace of the operand pods; Events are created there too." + _env("NAMESPACE"),
)
@click.option(
    "-f",
    "--config-file",
    envvar="CONFIG_FILE",
    required=True,
    metavar="FILE",
    help="The vGPU config file (re-read on every reconcile)." + _env("CONFIG_FILE"),
)
@click.option(
    "-d",
    "--default-vgpu-config",
    envvar="DEFAULT_VGPU_CONFIG",
    required=True,
    metavar="NAME",
    help="Config applied when the node has no nvidia.com/vgpu.config label." + _env("DEFAULT_VGPU_CONFIG"),
)
@click.option(
    "-m",
    "--host-root-mount",
    envvar="HOST_ROOT_MOUNT",
    default=S.DEFAULT_HOST_ROOT,
    show_default=True,
    metavar="DIR",
    help="Where the host's / is mounted: sysfs, proc, the lock, the journal, host programs."
    + _env("HOST_ROOT_MOUNT"),
)
@click.option(
    "--sim",
    envvar="VGPU_DM_SIM",
    metavar="DIR",
    help="Work on a simulated host (made by 'nvidia-vgpu-dm sim create') instead." + _env("VGPU_DM_SIM"),
)
@click.option(
    "-a",
    "--driver-root-ctr-path",
    envvar="DRIVER_ROOT_CTR_PATH",
    default=S.DEFAULT_DRIVER_ROOT,
    show_default=True,
    metavar="DIR",
    help="Where the driver root is mounted. nvidia-smi, sriov-manage and libnvidia-ml.so.1 are each "
    "looked for here first, then in the host root, then in the host's /run/nvidia/driver (under the GPU "
    "Operator this directory exists but is empty when the vGPU manager is installed on the host)."
    + _env("DRIVER_ROOT_CTR_PATH"),
)
@click.option(
    "--driver-install-dir",
    envvar="DRIVER_INSTALL_DIR",
    metavar="DIR",
    help="The driver root's path on the host (default: the GPU Operator's /run/nvidia/driver, checked to "
    "be the same files). sriov-manage from the driver root runs there, in the host root, because the "
    "driver container's root has no /sys. Set it when ClusterPolicy hostPaths.driverInstallDir is changed."
    + _env("DRIVER_INSTALL_DIR"),
)
@click.option(
    "-o",
    "--host-mig-manager-state-file",
    envvar="HOST_MIG_MANAGER_STATE_FILE",
    default=S.DEFAULT_MIG_MANAGER_STATE_FILE,
    show_default=True,
    metavar="FILE",
    help="MIG: systemd override file of the host's nvidia-mig-manager." + _env("HOST_MIG_MANAGER_STATE_FILE"),
)
@click.option(
    "-k",
    "--host-kubelet-systemd-service",
    envvar="HOST_KUBELET_SYSTEMD_SERVICE",
    default=S.DEFAULT_KUBELET_SERVICE,
    show_default=True,
    metavar="UNIT",
    help="MIG: the kubelet's systemd unit; with -w it is stopped (after the GPU clients) around a MIG "
    "mode change and started again (before them); one the host does not have (k3s) is skipped, said in "
    "the log." + _env("HOST_KUBELET_SYSTEMD_SERVICE"),
)
@click.option(
    "-g",
    "--gpu-clients-file",
    envvar="GPU_CLIENTS_FILE",
    metavar="FILE",
    help="MIG: YAML listing host systemd services that use the GPUs (version, systemd-services)."
    + _env("GPU_CLIENTS_FILE"),
)
@click.option(
    "-r",
    "--with-reboot/--no-with-reboot",
    envvar="WITH_REBOOT",
    default=False,
    help="MIG: reboot the node when a MIG mode change needs it (also --with-reboot=true|false)."
    + _env("WITH_REBOOT"),
)
@click.option(
    "-w",
    "--with-shutdown-host-gpu-clients/--no-with-shutdown-host-gpu-clients",
    envvar="WITH_SHUTDOWN_HOST_GPU_CLIENTS",
    default=False,
    help="MIG: stop the active units of --gpu-clients-file (and the kubelet, -k, when the MIG mode "
    "changes) around a MIG change and always start them again, as well as those of them that had failed "
    "or were enabled but inactive (as upstream)." + _env("WITH_SHUTDOWN_HOST_GPU_CLIENTS"),
)
@click.option(
    "--gpu-clients-settle",
    envvar="VGPU_DM_GPU_CLIENTS_SETTLE",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="MIG: wait this long after stopping host units before a MIG mode change (upstream's 30 s)."
    + _env("VGPU_DM_GPU_CLIENTS_SETTLE"),
)
@click.option(
    "--metrics-address",
    envvar="VGPU_DM_METRICS_ADDRESS",
    default=S.DEFAULT_METRICS_ADDRESS,
    show_default=True,
    metavar="HOST:PORT",
    help="Serve /metrics, /healthz and /readyz here; empty disables it. If the default's port is taken, "
    "the agent logs it and runs without them; an address given here that cannot be bound stops it (exit 1)."
    + _env("VGPU_DM_METRICS_ADDRESS"),
)
@click.option(
    "--operand-timeout",
    envvar="VGPU_DM_OPERAND_TIMEOUT",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the paused operands' pods to leave the node."
    + _env("VGPU_DM_OPERAND_TIMEOUT"),
)
@click.option(
    "--retry-backoff",
    envvar="VGPU_DM_RETRY_BACKOFF",
    type=click.FloatRange(min=0.01),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="First retry delay after an apply failed for a passing cause (host I/O, lock, VM using a "
    "vGPU); doubles each time." + _env("VGPU_DM_RETRY_BACKOFF"),
)
@click.option(
    "--retry-backoff-max",
    envvar="VGPU_DM_RETRY_BACKOFF_MAX",
    type=click.FloatRange(min=0.01),
    default=600.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest retry delay." + _env("VGPU_DM_RETRY_BACKOFF_MAX"),
)
@click.option(
    "--lock-timeout",
    envvar="VGPU_DM_LOCK_TIMEOUT",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long an apply waits for another one on this host." + _env("VGPU_DM_LOCK_TIMEOUT"),
)
@click.option(
    "--jobs",
    envvar="VGPU_DM_JOBS",
    type=click.IntRange(min=0),
    default=0,
    show_default="0: one per GPU being changed, up to 8",
    metavar="N",
    help="How many GPUs an apply changes at once; 1 changes them one after another." + _env("VGPU_DM_JOBS"),
)
@click.option(
    "--hooks-file",
    envvar="VGPU_DM_HOOKS_FILE",
    metavar="FILE",
    help="Programs to run at apply's stages (apply-start, pre-change, post-change, apply-exit), inside the "
    "host root; read again at every apply, like the config file." + _env("VGPU_DM_HOOKS_FILE"),
)
@click.option(
    "--log-format",
    envvar="VGPU_DM_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or JSON." + _env("VGPU_DM_LOG_FORMAT"),
)
@click.option("--debug", envvar="VGPU_DM_DEBUG", is_flag=True, help="Debug logging." + _env("VGPU_DM_DEBUG"))
@click.version_option(__version__, "-v", "--version", prog_name="nvidia-k8s-vgpu-dm")
def command(**opts) -> None:
    """Make this Kubernetes node's NVIDIA vGPU devices follow its nvidia.com/vgpu.config label.

    Reports progress in nvidia.com/vgpu.config.state (pending, success, failed, and rebooting while a
    MIG mode change reboots the node with --with-reboot) and in Events on the Node where RBAC allows
    them; pauses the GPU Operator's sandbox device plugin and validator while it changes vGPUs.

    Flags may be spelled as upstream's: one dash or two (-node-name, --ns), -flag=value, and
    booleans as --with-reboot=true|false.
    """
    _require_k8s_extra()
    log.setup(debug=opts["debug"], fmt=opts["log_format"])
    source = click.get_current_context().get_parameter_source("metrics_address")
    opts["metrics_required"] = source in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    )
    settings = _settings(opts)
    run(settings)


K8S_EXTRA_MODULES = ("lightkube", "prometheus_client")


def _require_k8s_extra() -> None:
    """The agent's libraries come with the ``k8s`` extra; without them say so in one line, exit 2."""
    for module in K8S_EXTRA_MODULES:
        try:
            __import__(module)
        except ImportError:
            # A ClickException, not a UsageError: one line, without the usage text.
            raise click.ClickException(
                f"the Kubernetes agent needs the 'k8s' extra (module {module} is missing): "
                f"pip install 'vgpu-device-manager[k8s]'"
            ) from None


def _settings(o: dict) -> S.Settings:
    for name, flag in (
        ("node_name", "--node-name"),
        ("namespace", "--namespace"),
        ("default_vgpu_config", "--default-vgpu-config"),
        ("config_file", "--config-file"),
    ):
        if not o[name].strip():
            raise click.BadParameter("must not be empty", param_hint=flag)
    if not os.path.isfile(o["config_file"]):
        raise click.BadParameter(f"{o['config_file']}: no such file", param_hint="--config-file")
    # The host units are used only with -w: then a bad one is a usage error now, else a warning (as
    # upstream, which checks them when it uses them).
    used = o["with_shutdown_host_gpu_clients"]
    if o["gpu_clients_file"]:
        _check_gpu_clients(o["gpu_clients_file"], used)
    if o["hooks_file"]:
        from vgpu_dm.errors import ConfigError
        from vgpu_dm.hooks import read_hooks_file

        try:
            read_hooks_file(o["hooks_file"])
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--hooks-file") from None
    from vgpu_dm.mig.node import valid_unit

    if not valid_unit(o["host_kubelet_systemd_service"]):
        _unused_or_bad(
            f"{o['host_kubelet_systemd_service']!r} is not a systemd unit name (e.g. kubelet.service)",
            "--host-kubelet-systemd-service",
            used,
        )
    if o["metrics_address"]:
        from vgpu_dm.k8s.metrics import parse_address

        try:
            parse_address(o["metrics_address"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-address") from None
    if o["retry_backoff_max"] < o["retry_backoff"]:
        raise click.BadParameter("must not be smaller than --retry-backoff", param_hint="--retry-backoff-max")
    if o["sim"]:
        sim_root = os.path.join(o["sim"], ".vgpu-dm-sim", "host.json")
        if not os.path.isfile(sim_root):
            raise click.BadParameter(f"{o['sim']} is not a simulated host", param_hint="--sim")
    elif not os.path.isdir(os.path.join(o["host_root_mount"], "sys")):
        raise click.BadParameter(
            f"{o['host_root_mount']}/sys does not exist: mount the host's / there",
            param_hint="--host-root-mount",
        )
    return S.Settings(
        node_name=o["node_name"],
        namespace=o["namespace"],
        config_file=o["config_file"],
        default_config=o["default_vgpu_config"],
        kubeconfig=o["kubeconfig"] or None,
        host_root=o["host_root_mount"],
        sim=o["sim"] or None,
        driver_root=o["driver_root_ctr_path"],
        driver_install_dir=o["driver_install_dir"] or None,
        host_mig_manager_state_file=o["host_mig_manager_state_file"],
        host_kubelet_systemd_service=o["host_kubelet_systemd_service"],
        gpu_clients_file=o["gpu_clients_file"] or None,
        with_reboot=o["with_reboot"],
        with_shutdown_host_gpu_clients=o["with_shutdown_host_gpu_clients"],
        gpu_clients_settle=o["gpu_clients_settle"],
        metrics_address=o["metrics_address"] or None,
        metrics_required=o.get("metrics_required", False),
        operand_timeout=o["operand_timeout"],
        retry_initial=o["retry_backoff"],
        retry_max=o["retry_backoff_max"],
        lock_timeout=o["lock_timeout"],
        jobs=o["jobs"],
        hooks_file=o["hooks_file"] or None,
    )


def _check_gpu_clients(path: str, used: bool) -> None:
    """Upstream's GPU clients file (version, systemd-services), checked at start, unit names included."""
    from vgpu_dm.k8s.mig import GpuClientsError, load_gpu_clients

    try:
        load_gpu_clients(path)
    except GpuClientsError as exc:
        _unused_or_bad(str(exc), "--gpu-clients-file", used)


def _unused_or_bad(problem: str, flag: str, used: bool) -> None:
    """A bad host unit setting: a usage error when -w uses it, else a warning (it is never used)."""
    if used:
        raise click.BadParameter(problem, param_hint=flag)
    _log.warning(f"{flag}: {problem}; not used without --with-shutdown-host-gpu-clients")


def run(settings: S.Settings) -> None:
    """Start the agent and block until SIGTERM/SIGINT; then stop cleanly."""
    from vgpu_dm.k8s.agent import Agent
    from vgpu_dm.k8s.kube import load_config

    try:
        config = load_config(settings.kubeconfig)
    except Exception as exc:
        where = settings.kubeconfig or "the in-cluster service account"
        _log.error(f"cannot load Kubernetes credentials from {where}: {exc}")
        raise Failure(EXIT_FAILED) from None
    agent = Agent(settings, config)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def on_signal(signum: int, _frame) -> None:
        _log.info(f"received {signal.Signals(signum).name}: finishing the current step, then stopping")
        agent.request_stop()

    def wake() -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe has wake-ups enough
            os.write(wake_w, b"\0")

    # Before the threads start: a SIGTERM from the first moment on gets the clean shutdown. The
    # handler runs in this thread; the wakeup fd makes sure this thread wakes for it even when the
    # kernel hands the signal to another thread (then only a flag is set there).
    previous = signal.set_wakeup_fd(wake_w)
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    agent.on_finished = wake
    try:
        try:
            agent.start()
        except OSError as exc:
            # Only an address that was asked for gets here (Agent._serve_metrics).
            _log.error(
                f"cannot serve metrics on {settings.metrics_address} (given by --metrics-address or "
                f"VGPU_DM_METRICS_ADDRESS): {exc.strerror or exc}"
            )
            raise Failure(EXIT_FAILED) from None
        _log.info(
            f"nvidia-k8s-vgpu-dm {__version__} watching node {settings.node_name} "
            f"(default config {settings.default_config!r}, file {settings.config_file})"
        )
        while not agent.finished.is_set():
            select.select([wake_r], [], [])  # no timeout: nothing to do until a signal or the worker's end
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        agent.join()
    finally:
        # Back to the caller's handling (a test, or a program embedding the agent): ours would stop an
        # agent that is gone.
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def main(argv: list[str] | None = None) -> int:
    from vgpu_dm.k8s.flags import upstream_argv

    try:
        args = upstream_argv(sys.argv[1:] if argv is None else list(argv), command)
        command.main(args=args, prog_name="nvidia-k8s-vgpu-dm", standalone_mode=False)
    except Failure as exc:
        return exc.code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        return EXIT_FAILED
    return EXIT_OK


def entry_point() -> None:
    sys.exit(main())
