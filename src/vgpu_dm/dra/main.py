"""``nvidia-vgpu-dra``: flags and environment, start-up, the publish loop, signal handling.

Exit codes: 0 after SIGTERM/SIGINT, 1 when it cannot start (credentials, host, sockets), 2 for usage.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from vgpu_dm import __version__, log

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DRIVER = "vgpu.nvidia.com"
_log = log.get("dra")


class Failure(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _env(name: str) -> str:
    return f"  [env: {name}]"


@click.command(
    "nvidia-vgpu-dra", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
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
    help="This node (from the downward API); also the name of its device pool." + _env("NODE_NAME"),
)
@click.option(
    "-f",
    "--config-file",
    envvar="CONFIG_FILE",
    required=True,
    metavar="FILE",
    help="The vGPU config file (re-read on every publish)." + _env("CONFIG_FILE"),
)
@click.option(
    "-d",
    "--default-vgpu-config",
    envvar="DEFAULT_VGPU_CONFIG",
    required=True,
    metavar="NAME",
    help="Config offered when the node has no nvidia.com/vgpu.config label." + _env("DEFAULT_VGPU_CONFIG"),
)
@click.option(
    "--driver-name",
    envvar="DRA_DRIVER_NAME",
    default=DEFAULT_DRIVER,
    show_default=True,
    metavar="NAME",
    help="The DRA driver name (DeviceClass selectors and ResourceSlices use it)." + _env("DRA_DRIVER_NAME"),
)
@click.option(
    "-m",
    "--host-root-mount",
    envvar="HOST_ROOT_MOUNT",
    default="/host",
    show_default=True,
    metavar="DIR",
    help="Where the host's / is mounted: sysfs, proc, the lock, the journal." + _env("HOST_ROOT_MOUNT"),
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
    default="/driver-root",
    show_default=True,
    metavar="DIR",
    help="Where a containerised driver's root (nvidia-smi, sriov-manage) is mounted; when it does not "
    "exist, the programs are looked for in the host root." + _env("DRIVER_ROOT_CTR_PATH"),
)
@click.option(
    "--kubelet-registry-dir",
    envvar="KUBELET_REGISTRY_DIR",
    default="/var/lib/kubelet/plugins_registry",
    show_default=True,
    metavar="DIR",
    help="The kubelet's plugin registration directory." + _env("KUBELET_REGISTRY_DIR"),
)
@click.option(
    "--kubelet-plugins-dir",
    envvar="KUBELET_PLUGINS_DIR",
    default="/var/lib/kubelet/plugins",
    show_default=True,
    metavar="DIR",
    help="The kubelet's plugin data directory; the driver uses <DIR>/<driver name>/ (DRA socket, "
    "checkpoint, device metadata)." + _env("KUBELET_PLUGINS_DIR"),
)
@click.option(
    "--cdi-dir",
    envvar="CDI_DIR",
    default="/var/run/cdi",
    show_default=True,
    metavar="DIR",
    help="Where the container runtime looks for CDI specs." + _env("CDI_DIR"),
)
@click.option(
    "--resync-interval",
    envvar="RESYNC_INTERVAL",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Republish at least this often (claims released elsewhere, GPUs held back)."
    + _env("RESYNC_INTERVAL"),
)
@click.option(
    "--lock-timeout",
    envvar="VGPU_DM_LOCK_TIMEOUT",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long a prepare waits for another apply's host lock (the kubelet waits 45 s)."
    + _env("VGPU_DM_LOCK_TIMEOUT"),
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
@click.version_option(__version__, "-v", "--version", prog_name="nvidia-vgpu-dra")
def command(**opts) -> None:  # fmt: skip
    """Offer the vGPUs this node's selected config allows as DRA devices, and create each vGPU only
    when the kubelet prepares a ResourceClaim that was allocated one (docs/dra.md)."""
    log.setup(debug=opts["debug"], fmt=opts["log_format"])
    for name, flag in (("node_name", "--node-name"), ("default_vgpu_config", "--default-vgpu-config")):
        if not opts[name].strip():
            raise click.BadParameter("must not be empty", param_hint=flag)
    if not os.path.isfile(opts["config_file"]):
        raise click.BadParameter(f"{opts['config_file']}: no such file", param_hint="--config-file")
    run(opts)


def run(opts: dict) -> None:
    from vgpu_dm.dra.driver import Driver, Settings
    from vgpu_dm.dra.kube import DraApi, describe
    from vgpu_dm.dra.kubelet import KubeletPlugin
    from vgpu_dm.errors import VgpuDmError
    from vgpu_dm.host.inventory import HostTools
    from vgpu_dm.host_choice import open_host_or_sim

    stop = threading.Event()
    wake = threading.Event()
    driver_name = opts["driver_name"]
    plugin_dir = os.path.join(opts["kubelet_plugins_dir"], driver_name)
    try:
        host = open_host_or_sim(opts["host_root_mount"], opts["sim"])
        api = DraApi(opts["kubeconfig"] or None, opts["node_name"], stop, deadline=10.0)
    except VgpuDmError as exc:
        _log.error(str(exc))
        raise Failure(EXIT_FAILED) from None
    except Exception as exc:
        where = opts["kubeconfig"] or "the in-cluster service account"
        _log.error(f"cannot load Kubernetes credentials from {where}: {exc}")
        raise Failure(EXIT_FAILED) from None
    root = opts["driver_root_ctr_path"]
    # Each driver file is looked for in the driver root first, then in the host root (host/locate.py).
    tools = HostTools(driver_root=root or None)
    settings = Settings(
        driver=driver_name,
        node=opts["node_name"],
        config_file=opts["config_file"],
        default_config=opts["default_vgpu_config"],
        plugin_dir=plugin_dir,
        cdi_dir=opts["cdi_dir"],
        lock_timeout=opts["lock_timeout"],
    )

    def on_signal(signum: int, _frame) -> None:
        _log.info(f"received {signal.Signals(signum).name}: stopping")
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from vgpu_dm.dra.allocations import Allocations

    allocations = Allocations(driver_name, opts["node_name"])
    allocations.on_change = wake.set  # an allocation released may let a held-back GPU switch layout
    # Which devices are allocated: one list + watch of ResourceClaims, started before the first publish
    # (which withdraws nothing from a GPU whose layout changes until the watch has listed them).
    threading.Thread(target=api.claim_watch(allocations).run, name="claim-watch", daemon=True).start()
    try:
        driver = Driver(settings, api, host, tools, allocations)
        driver.on_republish = wake.set
        driver.stop = stop
        driver.start()
    except (VgpuDmError, ValueError, OSError) as exc:
        _log.error(f"cannot start: {exc}")
        raise Failure(EXIT_FAILED) from None
    except Exception as exc:
        _log.error(f"cannot start: {describe(exc)}")
        raise Failure(EXIT_FAILED) from None
    plugin = KubeletPlugin(
        driver,
        driver_name,
        os.path.join(plugin_dir, "dra.sock"),
        os.path.join(opts["kubelet_registry_dir"], f"{driver_name}-reg.sock"),
    )
    try:
        plugin.start()
    except (OSError, RuntimeError) as exc:
        _log.error(f"cannot serve the kubelet's sockets: {exc}")
        raise Failure(EXIT_FAILED) from None
    seen: dict[str, str | None] = {}

    def on_labels(labels: dict[str, str]) -> None:
        from vgpu_dm.nodeconfig import CONFIG_LABEL

        if seen.get("value", "") != labels.get(CONFIG_LABEL):
            seen["value"] = labels.get(CONFIG_LABEL)
            wake.set()

    threading.Thread(target=api.node_watch(on_labels).run, name="node-watch", daemon=True).start()
    _log.info(
        f"nvidia-vgpu-dra {__version__}: driver {driver_name} on node {settings.node} "
        f"(config {driver.config_name!r}, {len(driver.offered)} devices offered)"
    )
    try:
        while not stop.is_set():
            wake.wait(opts["resync_interval"])
            wake.clear()
            if stop.is_set():
                break
            try:
                driver.republish()
            except VgpuDmError as exc:
                _log.error(f"publishing: {exc}")
            except Exception as exc:  # the API is down for a while: try again at the next wake-up
                _log.error(f"publishing: {describe(exc)}")
    finally:
        plugin.stop()
        api.close()
    _log.info("stopped; prepared claims stay prepared (the checkpoint keeps them)")


def main(argv: list[str] | None = None) -> int:
    try:
        command.main(args=argv, prog_name="nvidia-vgpu-dra", standalone_mode=False)
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
