"""``nvidia-vgpu-dm sim``: create and inspect a simulated host, so every command can run without a GPU."""

from __future__ import annotations

import os

import click

from vgpu_dm.cli.output import output_options

# Where 'sim create --driver container' puts the driver: the GPU Operator's driver root on the host.
DRIVER_CONTAINER_ROOT = "run/nvidia/driver"


@click.group("sim")
def sim_group() -> None:
    """Simulated hosts: a directory shaped like a GPU host's /sys, with the driver emulated.

    \b
    Example:
      nvidia-vgpu-dm sim create /tmp/host --gpu T4 --gpu T4 --gpu A10
      nvidia-vgpu-dm apply --sim /tmp/host -f examples/config-t4.yaml -c T4-small
    """


def _latency_options(func):
    """The write-latency options shared by 'sim create' and 'sim latency'."""
    options = [
        click.option(
            "--write-latency-ms",
            type=click.FloatRange(min=0),
            default=None,
            metavar="MS",
            help="Every vGPU create and remove write takes MS milliseconds (default 0).",
        ),
        click.option(
            "--create-latency-ms",
            type=click.FloatRange(min=0),
            default=None,
            metavar="MS",
            help="Creates take MS milliseconds (overrides --write-latency-ms).",
        ),
        click.option(
            "--remove-latency-ms",
            type=click.FloatRange(min=0),
            default=None,
            metavar="MS",
            help="Removes take MS milliseconds (overrides --write-latency-ms).",
        ),
        click.option(
            "--serial-writes/--parallel-writes",
            default=None,
            help="Whether a slow write's latency blocks writes to other GPUs (default: parallel, they "
            "overlap). A remove that waits for a VM is --held-remove-blocks of 'sim create'.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _latency(base, write_ms, create_ms, remove_ms, serial):
    """``base`` (a WriteLatency) with the given options applied."""
    from dataclasses import replace

    changes = {}
    if write_ms is not None:
        changes.update(create_ms=write_ms, remove_ms=write_ms)
    if create_ms is not None:
        changes["create_ms"] = create_ms
    if remove_ms is not None:
        changes["remove_ms"] = remove_ms
    if serial is not None:
        changes["serial"] = serial
    return replace(base, **changes)


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
    help="Whether the GPUs support mixed-size (heterogeneous) vGPU mode (nvidia-smi -q: Heterogeneous "
    "Time-Slice Sizes).",
)
@click.option(
    "--mig-reset",
    type=click.Choice(["auto", "required", "immediate"]),
    default="auto",
    show_default=True,
    help="Whether a MIG mode change waits for a GPU reset (nvidia-mig-parted then resets every GPU) or "
    "takes effect at once; auto = waits on Ampere, at once on Hopper and Blackwell (reported, unconfirmed).",
)
@click.option(
    "--mig-off-with-vfs",
    type=click.Choice(["refuse", "allow"]),
    default="refuse",
    show_default=True,
    help="Whether MIG mode can be switched off while SR-IOV VFs are enabled (refused on vendor-VFIO hosts; "
    "unknown on mdev hosts).",
)
@click.option(
    "--mig-on-with-vfs",
    type=click.Choice(["refuse", "allow"]),
    default="refuse",
    show_default=True,
    help="Whether MIG mode can be switched on while SR-IOV VFs are enabled (not known).",
)
@click.option(
    "--reset-with-vgpus",
    type=click.Choice(["refuse", "destroy"]),
    default="refuse",
    show_default=True,
    help="What a GPU reset does to a GPU with vGPUs no VM holds: fail as if in use, or destroy them "
    "(not known; a vGPU a VM holds always makes the reset fail).",
)
@click.option(
    "--passthrough",
    "passthrough",
    multiple=True,
    type=click.IntRange(min=0),
    metavar="N",
    help="Bind the Nth --gpu (0-based) to vfio-pci, as for PCI pass-through: NVML (nvidia-smi, "
    "nvidia-mig-parted) does not see it; repeatable.",
)
@click.option(
    "--no-mig-parted",
    is_flag=True,
    help="The host has no nvidia-mig-parted (by default the simulator answers for one in /usr/bin).",
)
@click.option(
    "--mig-after-reboot",
    type=click.Choice(["keep", "lose"]),
    default="keep",
    show_default=True,
    help="Whether MIG mode survives 'sim reboot' (GPU instances never do).",
)
@click.option(
    "--mdevctl/--no-mdevctl",
    default=False,
    show_default=True,
    help="Install mdevctl on the simulated host (its directories; 'sim reboot' then starts its auto "
    "definitions, as its udev rule does at boot).",
)
@click.option(
    "--mdevctl-on-vfs",
    type=click.Choice(["start", "later", "ignore"]),
    default="later",
    show_default=True,
    help="When mdevctl's udev rule starts the auto definitions of mdev-capable VFs that sriov-manage "
    "enables: start = before sriov-manage returns; later = after it (when something runs 'udevadm settle', "
    "or at the latest at the next write to the driver); ignore = never (unconfirmed for NVIDIA VFs).",
)
@click.option(
    "--driver",
    type=click.Choice(["host", "container"]),
    default="host",
    show_default=True,
    help="Where the vGPU manager's files (nvidia-smi, sriov-manage, libnvidia-ml.so.1) are: installed on "
    "the host, or only in the GPU Operator's driver container root, run/nvidia/driver (without /sys).",
)
@click.option(
    "--sriov-manage-without-sysfs",
    type=click.Choice(["fail", "noop"]),
    default="fail",
    show_default=True,
    help="What sriov-manage does when run chrooted into a root without sysfs (a driver container's): "
    "exit with an error, or exit 0 having made no VFs (which one a real script does is unknown).",
)
@click.option(
    "--mixed-size-rule",
    type=click.Choice(["framebuffer", "placements"]),
    default="framebuffer",
    show_default=True,
    help="Which vGPUs fit side by side in mixed-size mode: each type up to its maximum within the "
    "framebuffer, or at fixed placements as NVIDIA's resource manager source places them (fewer, and "
    "they can fragment). Which one a driver release follows is unconfirmed.",
)
@click.option(
    "--held-remove-blocks",
    type=click.Choice(["device", "host"]),
    default="device",
    show_default=True,
    help="While a remove of an mdev waits for the VM holding it (--force): device = only that remove "
    "waits, as the kernel's own code does; host = the driver keeps a host-wide lock across the wait, so "
    "every other create and remove waits too (whether NVIDIA's driver does is unknown).",
)
@_latency_options
def create_cmd(
    directory: str,
    gpus: tuple[str, ...],
    framework: str,
    mixed_size: bool,
    mig_reset: str,
    mig_off_with_vfs: str,
    mig_on_with_vfs: str,
    reset_with_vgpus: str,
    passthrough: tuple[int, ...],
    no_mig_parted: bool,
    mig_after_reboot: str,
    mdevctl: bool,
    mdevctl_on_vfs: str,
    driver: str,
    sriov_manage_without_sysfs: str,
    mixed_size_rule: str,
    held_remove_blocks: str,
    write_latency_ms: float | None,
    create_latency_ms: float | None,
    remove_latency_ms: float | None,
    serial_writes: bool | None,
) -> None:
    """Create a simulated host in DIRECTORY (new or empty) with the given GPUs.

    Vendor-VFIO GPUs start with their SR-IOV VFs disabled, as after a reboot: apply enables them.
    The latency options make the simulated driver slow, as a real one is (see 'sim latency'). The MIG
    options choose behaviours that are not known for sure (docs/mig.md). With VGPU_DM_SIM_MIG_PARTED
    naming the nvidia-mig-parted binary of shared/mig-parted-mock, the real program answers for it.
    """
    from vgpu_dm.sim.latency import WriteLatency
    from vgpu_dm.sim.layout import create_host

    vendor_vfio = None if framework == "auto" else framework == "vendor-vfio"
    try:
        state = create_host(
            directory,
            list(gpus),
            vendor_vfio=vendor_vfio,
            mixed_size=mixed_size,
            options={
                "mig_reset": mig_reset,
                "mig_off_with_vfs": mig_off_with_vfs,
                "mig_on_with_vfs": mig_on_with_vfs,
                "reset_with_vgpus": reset_with_vgpus,
                "mig_after_reboot": mig_after_reboot,
                "mdevctl_on_vfs": mdevctl_on_vfs,
                "sriov_manage_without_sysfs": sriov_manage_without_sysfs,
                "mixed_size_rule": mixed_size_rule,
                "held_remove_blocks": held_remove_blocks,
            },
            driver_root=DRIVER_CONTAINER_ROOT if driver == "container" else "",
            passthrough=passthrough,
            mig_parted=not no_mig_parted,
        )
    except (KeyError, ValueError, FileExistsError) as exc:
        raise click.UsageError(str(exc.args[0]) if exc.args else str(exc)) from None
    if mdevctl:
        from vgpu_dm.sim.mdevctl import install_mdevctl

        install_mdevctl(directory)
    from vgpu_dm.cli.list_cmd import model_name

    # Indices are what configs use: position in PCI address order, not in the order of the --gpu options.
    by_address = sorted(state.gpus, key=lambda g: g.address)
    for i, gpu in enumerate(by_address):
        vfs = (
            f", {len(gpu.vfs)} VFs"
            if gpu.vfs
            else (f", {gpu.total_vfs} VFs not enabled" if gpu.total_vfs else "")
        )
        mig = ", MIG-capable" if gpu.mig_profiles else ""
        mig += ", bound to vfio-pci (pass-through)" if gpu.pf_driver != "nvidia" else ""
        click.echo(f"GPU {i}: {gpu.address} {model_name(gpu.model)} ({gpu.framework}{vfs}{mig})")
    if driver == "container":
        click.echo(
            f"driver: in the GPU Operator's driver container root {directory}/{DRIVER_CONTAINER_ROOT} "
            f"(nothing on the host root; pass --driver-root {directory}/{DRIVER_CONTAINER_ROOT})"
        )
    latency = _latency(WriteLatency(), write_latency_ms, create_latency_ms, remove_latency_ms, serial_writes)
    if latency != WriteLatency():
        latency.save(directory)
        click.echo(f"write latency: {latency.describe()}")
    click.echo(f"simulated host ready: use --sim {directory} or VGPU_DM_SIM={directory}")


@sim_group.command("gpus")
@output_options(formats=("json", "yaml"), headers=False)
def gpus_cmd(output: str | None, as_json: bool) -> None:
    """List the GPU names 'sim create --gpu' accepts (-o json|yaml: with the catalog's device ids,
    architecture, framework and framebuffer)."""
    from vgpu_dm import catalog
    from vgpu_dm.cli.output import dump, emit, output_format

    fmt = output_format(output, as_json)
    entries = catalog.load()
    if fmt in ("json", "yaml"):
        gpus = [
            {
                "name": e.sim_name,
                "model": e.name,
                "device_ids": [str(d) for d in e.device_ids],
                "architecture": e.arch,
                "frameworks": e.framework.split("|"),  # mdev-pf, or mdev-vf / vendor-vfio by host stack
                "framebuffer_gb": e.framebuffer_gb,
                "mig_capable": bool(e.mig_gi_profiles),
            }
            for e in entries
        ]
        emit(dump({"gpus": gpus}, fmt))
        return
    width = max(len(e.sim_name) for e in entries)
    for entry in entries:
        click.echo(f"{entry.sim_name:{width}}  {entry.name}")


@sim_group.command("writes")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def writes_cmd(directory: str) -> None:
    """Print every write made to the simulated host's control files, oldest first."""
    _require_sim(directory)
    from vgpu_dm.sim.host import write_log

    for line in write_log(directory):
        click.echo(line)


@sim_group.command("fault")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--fail-write",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Make each tool run's Nth control-file write fail (0 = never).",
)
@click.option(
    "--errno",
    "errno_name",
    default="EIO",
    show_default=True,
    metavar="NAME",
    help="errno of the failing write (EIO, EBUSY, ENOSPC, ...).",
)
@click.option(
    "--kill-at-write",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="SIGKILL the tool right before its Nth write (0 = never).",
)
@click.option(
    "--signal-at-write",
    "signal_at_writes",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Send the tool --signal right before its Nth write (as systemd/Kubernetes stop it); repeatable.",
)
@click.option(
    "--signal",
    "signal_name",
    default="SIGTERM",
    show_default=True,
    metavar="NAME",
    help="Signal sent by --signal-at-write (SIGTERM, SIGINT, ...).",
)
@click.option(
    "--hang",
    "hang",
    multiple=True,
    type=click.Choice(
        ["nvidia-smi", "sriov-manage", "nvidia-mig-parted", "nvidia-mig-parted apply", "systemctl", "reboot"]
    ),
    help="This program (or only its 'apply') never returns (the tool's timeout kills it); repeatable.",
)
@click.option(
    "--unbind-lock-failures",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="sriov-manage -e fails N times with 'Cannot obtain unbindLock' before it works.",
)
@click.option(
    "--sriov-no-vfs",
    is_flag=True,
    help="sriov-manage -e exits 0 but makes no VFs (SR-IOV disabled in the BIOS).",
)
@click.option(
    "--eio-read",
    "eio_reads",
    multiple=True,
    metavar="TEXT",
    help="Reads of paths containing TEXT fail with EIO; repeatable.",
)
@click.option(
    "--mig-parted",
    "mig_parted",
    type=click.Choice(["nvml", "reset", "apply"]),
    help="Make nvidia-mig-parted fail (the real binary too): nvml = NVML cannot be initialised, so every "
    "call fails; reset = its GPU reset fails, so a MIG mode change stays pending; apply = apply fails "
    "after its mode step, before it makes GPU instances.",
)
def fault_cmd(
    directory: str,
    fail_write: int,
    errno_name: str,
    kill_at_write: int,
    signal_at_writes: tuple[int, ...],
    signal_name: str,
    hang: tuple[str, ...],
    unbind_lock_failures: int,
    sriov_no_vfs: bool,
    eio_reads: tuple[str, ...],
    mig_parted: str | None,
) -> None:
    """Arm faults on the simulated host (run without options to clear them).

    \b
    Example:
      nvidia-vgpu-dm sim fault /tmp/host --fail-write 3 --errno EBUSY
    """
    _require_sim(directory)
    import errno

    from vgpu_dm.sim.faults import Faults

    code = getattr(errno, errno_name.upper(), None)
    if not isinstance(code, int):
        raise click.BadParameter(f"unknown errno name {errno_name!r}", param_hint="--errno")
    import signal

    signame = signal_name.upper()
    signame = signame if signame.startswith("SIG") else f"SIG{signame}"
    signum = getattr(signal, signame, None)
    if not isinstance(signum, int):
        raise click.BadParameter(f"unknown signal name {signal_name!r}", param_hint="--signal")
    Faults(
        fail_write=fail_write,
        fail_errno=code,
        kill_at_write=kill_at_write,
        eio_reads=list(eio_reads),
        signal_at_writes=list(signal_at_writes),
        signal_number=int(signum),
        mig_parted=mig_parted or "",
        hang=list(hang),
        unbind_lock_failures=unbind_lock_failures,
        sriov_no_vfs=sriov_no_vfs,
    ).save(directory)
    armed = [f"fail write #{fail_write} with {errno_name.upper()}"] if fail_write else []
    armed += [f"kill before write #{kill_at_write}"] if kill_at_write else []
    armed += [f"{signame} before write #{n}" for n in signal_at_writes]
    armed += [f"{p} hangs" for p in hang]
    armed += (
        [f"sriov-manage -e fails {unbind_lock_failures} x with unbindLock"] if unbind_lock_failures else []
    )
    armed += ["sriov-manage -e makes no VFs"] if sriov_no_vfs else []
    armed += [f"EIO on reads of *{p}*" for p in eio_reads]
    armed += [f"nvidia-mig-parted fails ({mig_parted})"] if mig_parted else []
    click.echo("faults: " + ("; ".join(armed) if armed else "none"))


@sim_group.command("latency")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_latency_options
def latency_cmd(
    directory: str,
    write_latency_ms: float | None,
    create_latency_ms: float | None,
    remove_latency_ms: float | None,
    serial_writes: bool | None,
) -> None:
    """Show or change how long the simulated driver takes per vGPU create and remove.

    Options given change the setting, others keep theirs; 'sim fault' does not touch it.

    \b
    Example (a slow driver, removes faster than creates):
      nvidia-vgpu-dm sim latency /tmp/host --create-latency-ms 30 --remove-latency-ms 10
      nvidia-vgpu-dm sim latency /tmp/host --write-latency-ms 0     # back to instant
    """
    from vgpu_dm.sim.latency import WriteLatency

    _require_sim(directory)
    current = WriteLatency.load(directory)
    latency = _latency(current, write_latency_ms, create_latency_ms, remove_latency_ms, serial_writes)
    if latency != current:
        latency.save(directory)
    click.echo(f"write latency: {latency.describe()}")


def _require_sim(directory: str) -> None:
    """Every command that reads or changes a simulated host's own files refuses any other directory
    (``sim reboot /`` must never empty the real /run)."""
    from vgpu_dm.host.root import SIM_MARKER
    from vgpu_dm.sim.files import STATE_FILE

    if not os.path.isfile(os.path.join(directory, SIM_MARKER, STATE_FILE)):
        raise click.UsageError(
            f"{directory} is not a simulated host (make one with 'nvidia-vgpu-dm sim create {directory} "
            f"--gpu T4')"
        )


@sim_group.command("hold")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("device")
@click.option("--name", default="qemu-system-x86_64", show_default=True, help="Process name of the fake VM.")
@click.option(
    "--cdev/--group",
    "cdev",
    default=None,
    help="Hold it through its iommufd cdev /dev/vfio/devices/vfioN (QEMU with iommufd) or its VFIO group "
    "/dev/vfio/<group>. Default: group for mdevs, cdev for VFs.",
)
def hold_cmd(directory: str, device: str, name: str, cdev: bool | None) -> None:
    """Start a fake VM process that holds DEVICE (an mdev UUID or a vendor-VFIO VF address) open.

    The real in-use detection finds it through proc/<pid>/fd, so apply refuses to remove the device.
    """
    _require_sim(directory)
    from pathlib import Path

    from vgpu_dm.sim.processes import add_holder, device_node

    try:
        node = device_node(directory, device, cdev)
    except LookupError as exc:
        raise click.UsageError(str(exc)) from None
    pid = add_holder(Path(directory), node, name)
    click.echo(f"pid {pid} ({name}) now holds {device} ({node})")


@sim_group.command("release")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("pid", type=int)
def release_cmd(directory: str, pid: int) -> None:
    """End the fake VM process PID made by 'sim hold' (no other process of the simulated host)."""
    _require_sim(directory)
    from pathlib import Path

    from vgpu_dm.sim.processes import release_holder

    try:
        release_holder(Path(directory), pid)
    except LookupError as exc:
        raise click.UsageError(str(exc)) from None
    from vgpu_dm.sim.host import SimHostRoot

    SimHostRoot(directory).finish_released_removes()  # a remove that waited for it can complete
    click.echo(f"pid {pid} released")


@sim_group.command("reboot")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def reboot_cmd(directory: str) -> None:
    """Reboot the simulated host: VFs, vGPUs, MIG GPU instances, mixed-size mode, /run and the fake VMs
    are gone; a pending MIG mode change takes effect (see 'sim create --mig-after-reboot').
    """
    _require_sim(directory)
    from vgpu_dm.sim.reboot import reboot

    for line in reboot(directory):
        click.echo(line)


def _vm_command(action):
    """Run a simulated virsh action; what libvirt would refuse is a usage error (exit 2)."""
    from vgpu_dm.host.libvirt import DomainFileError
    from vgpu_dm.sim.libvirt import SimVMError

    try:
        return action()
    except (SimVMError, DomainFileError) as exc:
        raise click.UsageError(str(exc)) from None


@sim_group.command("define")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option(
    "--vgpu",
    "vgpus",
    multiple=True,
    required=True,
    metavar="DEVICE",
    help="A vGPU the VM uses: an mdev UUID, or a vendor-VFIO VF's PCI address; repeatable.",
)
@click.option("--start", "start_it", is_flag=True, help="Start it too (as 'sim start').")
def define_cmd(directory: str, name: str, vgpus: tuple[str, ...], start_it: bool) -> None:
    """Define a libvirt VM NAME that uses the given vGPUs (as 'virsh define' writes
    etc/libvirt/qemu/NAME.xml). A defined VM's vGPUs are kept by apply even while it is shut off.

    \b
    Example:
      nvidia-vgpu-dm sim define /tmp/host win10 --vgpu 0000:5e:00.4
    """
    from vgpu_dm.sim.libvirt import define, start

    _require_sim(directory)
    uuid = _vm_command(lambda: define(directory, name, list(vgpus)))
    click.echo(f"VM {name} ({uuid}) defined with {', '.join(vgpus)}")
    if start_it:
        pid = _vm_command(lambda: start(directory, name))
        click.echo(f"VM {name} started (pid {pid})")


@sim_group.command("start")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
def start_cmd(directory: str, name: str) -> None:
    """Start the defined VM NAME: its vGPUs must exist; a fake QEMU process then holds them open and
    run/libvirt/qemu/NAME.xml says it runs."""
    from vgpu_dm.sim.libvirt import start

    _require_sim(directory)
    pid = _vm_command(lambda: start(directory, name))
    click.echo(f"VM {name} started (pid {pid})")


@sim_group.command("shutdown")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
def shutdown_cmd(directory: str, name: str) -> None:
    """Shut the VM NAME down: its process and status file go, its definition and vGPUs stay."""
    from vgpu_dm.sim.libvirt import shutdown

    _require_sim(directory)
    _vm_command(lambda: shutdown(directory, name))
    click.echo(f"VM {name} shut off")


@sim_group.command("undefine")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
def undefine_cmd(directory: str, name: str) -> None:
    """Remove the definition of the VM NAME (it must be shut off)."""
    from vgpu_dm.sim.libvirt import undefine

    _require_sim(directory)
    _vm_command(lambda: undefine(directory, name))
    click.echo(f"VM {name} undefined")
