"""The simulated driver on vendor-VFIO GPUs: per-VF creatable lists, ``current_vgpu_type`` writes,
mixed-size mode, and the host programs ``sriov-manage`` and ``nvidia-smi`` that the tool runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from vgpu_dm.sim import mig, placements
from vgpu_dm.sim.driver import PCI_DIR, _fail, type_by_id
from vgpu_dm.sim.layout import SimGPU, SimState, SimType, enable_vfs


def _vf_type(base: Path, vf: str) -> int:
    return int((base / PCI_DIR / vf / "nvidia/current_vgpu_type").read_text().strip() or 0)


def placed_vfs(base: Path, gpu: SimGPU) -> list[str]:
    """The GPU's VFs that carry a vGPU."""
    return [vf for vf in gpu.vfs if _vf_type(base, vf)]


def placed_types(base: Path, gpu: SimGPU) -> list[SimType]:
    placed = []
    for vf in gpu.vfs:
        type_id = _vf_type(base, vf)
        vtype = type_by_id(gpu, type_id) if type_id else None
        if vtype:
            placed.append(vtype)
    return placed


def creatable(gpu: SimGPU, placed: list[SimType]) -> list[SimType]:
    """Types a free VF offers next to ``placed``."""
    from vgpu_dm.sim.driver import gpu_room

    if not gpu.mixed_enabled or gpu.mig_mode or gpu.mixed_rule == "placements":
        return [t for t in gpu.types if gpu_room(gpu, t, placed) > 0]
    used = sum(t.framebuffer_gb or 0.5 for t in placed)
    return [
        t
        for t in gpu.types
        if not t.mig_backed
        and sum(1 for p in placed if p.type_id == t.type_id) < t.max_instances
        and used + (t.framebuffer_gb or 0.5) <= gpu.framebuffer_gb
    ]


def refresh_vfio(base: Path, gpu: SimGPU) -> None:
    placed = placed_types(base, gpu)
    offer = creatable(gpu, placed)
    listing = "ID    : vGPU Name\n" + "".join(f"{t.type_id:<5} : {gpu.name_prefix}{t.name}\n" for t in offer)
    for vf in gpu.vfs:
        path = base / PCI_DIR / vf / "nvidia/creatable_vgpu_types"
        text = "ID    : vGPU Name\n" if _vf_type(base, vf) else listing
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def _vf_holders(base: Path, vf: str) -> list[int]:
    from vgpu_dm.sim.driver import vfio_nodes
    from vgpu_dm.sim.processes import holders_of

    return holders_of(base, vfio_nodes(base / PCI_DIR / vf))


def set_vgpu_type(base: Path, state: SimState, vf: str, data: str, path: str) -> None:
    gpu = state.gpu_of(vf)
    if gpu is None:
        raise _fail(errno.ENODEV, path, "not a VF of a simulated GPU")
    try:
        type_id = int(data.strip(), 10)
    except ValueError:
        raise _fail(errno.EINVAL, path, f"not a number: {data.strip()!r}") from None
    current = _vf_type(base, vf)
    if type_id == 0:
        if current == 0:
            raise _fail(errno.EPERM, path, "no vGPU to destroy on this VF")
        if _vf_holders(base, vf):
            # NVIDIA's vgpu-vfio interface refuses to destroy a vGPU whose usage count is not zero
            # (nv_vgpu_vfio_destroy: -EPERM); its open-source RFC driver answers -EBUSY. It never waits.
            raise _fail(errno.EPERM, path, f"the vGPU on {vf} is in use by a VM")
    else:
        if current != 0:
            raise _fail(errno.EPERM, path, "a vGPU already exists on this VF; write 0 first")
        offered = {t.type_id for t in creatable(gpu, placed_types(base, gpu))}
        vtype = type_by_id(gpu, type_id)
        if type_id not in offered and vtype is not None and vtype.mig_backed:
            # Observed: a MIG-backed type without a suitable GPU instance fails with EIO
            # (dmesg "NVRM: Failed to add vgpu create request: 0x38"), reference 3.3.
            raise _fail(errno.EIO, path, f"no GPU instance can host {vtype.name}")
        if type_id not in offered:
            raise _fail(errno.EINVAL, path, f"type {type_id} is not creatable on {vf} now")
        if vtype.mig_backed:
            mig.place(gpu, vtype, vf)
        elif gpu.mixed_enabled and gpu.mixed_rule == "placements":
            placements.place(gpu, vtype, vf)
    if type_id == 0:
        mig.release(gpu, vf)
        placements.release(gpu, vf)
    (base / PCI_DIR / vf / "nvidia/current_vgpu_type").write_text(f"{type_id}\n")
    state.save(base)
    refresh_vfio(base, gpu)


def _drop_mdevs(base: Path, vf: str) -> None:
    """Disabling VFs takes the mdevs on them along (their bus links and VFIO group nodes too)."""
    from vgpu_dm.sim.driver import UUID_RE

    vf_dir = base / PCI_DIR / vf
    for entry in os.listdir(vf_dir):
        if UUID_RE.fullmatch(entry):
            group = os.path.basename(os.readlink(vf_dir / entry / "iommu_group"))
            cdevs = vf_dir / entry / "vfio-dev"
            nodes = [base / "dev/vfio/devices" / n for n in (os.listdir(cdevs) if cdevs.is_dir() else [])]
            for link in (base / "sys/bus/mdev/devices" / entry, base / "dev/vfio" / group, *nodes):
                if os.path.lexists(link):
                    link.unlink()


def disable_vfs(base: Path, gpu: SimGPU) -> None:
    """Remove the GPU's VFs with whatever they carry; the rebind also resets heterogeneous mode and
    destroys MIG GPU instances (host-interfaces.md 3.2)."""
    pf_dir = base / PCI_DIR / gpu.address
    for n, vf in enumerate(gpu.vfs):
        _drop_mdevs(base, vf)
        (pf_dir / f"virtfn{n}").unlink()
        (base / "sys/bus/pci/devices" / vf).unlink()
        if os.path.lexists(base / "sys/class/mdev_bus" / vf):
            (base / "sys/class/mdev_bus" / vf).unlink()
        shutil.rmtree(base / PCI_DIR / vf)
    gpu.vfs = []
    (pf_dir / "sriov_numvfs").write_text("0\n")
    gpu.mixed_enabled = False
    gpu.gpu_instances, gpu.mig_hosts, gpu.mig_types = [], {}, {}
    gpu.placements = {}


def _result(argv: list[str], code: int, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(argv, code, out, err)


def sriov_manage(
    base: Path, state: SimState, argv: list[str], no_vfs: bool = False
) -> subprocess.CompletedProcess[str]:
    """``sriov-manage -e|-d <PF|ALL>``; with ``no_vfs`` it prints and exits 0 but makes no VFs (a real
    script does that when SR-IOV is off in the BIOS or the driver does not do VFs for the GPU)."""
    if len(argv) != 3 or argv[1] not in ("-e", "-d"):
        return _result(argv, 1, err="usage: sriov-manage <-e|-d> <ssss:bb:dd.f|ALL>\n")
    targets = state.gpus if argv[2] == "ALL" else [g for g in state.gpus if g.address == argv[2]]
    if not targets:
        return _result(argv, 1, err=f"Cannot find device {argv[2]}\n")
    out = []
    for gpu in targets:
        if gpu.framework == "mdev-pf":
            continue
        if argv[1] == "-e":
            out.append(f"Enabling VFs on {gpu.address}\n")
            if not gpu.vfs and not no_vfs:
                state.next_group = enable_vfs(base, gpu, state.next_group) + 1
                gpu.mixed_enabled = False  # the rebind resets heterogeneous mode
                gpu.gpu_instances = []  # ... and destroys MIG GPU instances (MIG mode survives)
        else:
            out.append(f"Disabling VFs on {gpu.address}\n")
            disable_vfs(base, gpu)
    state.save(base)
    from vgpu_dm.sim.driver import refresh_gpu

    for gpu in targets:
        if gpu.framework != "mdev-pf":
            refresh_gpu(base, gpu)
    on_vfs = state.options.get("mdevctl_on_vfs")
    if argv[1] == "-e" and on_vfs in ("start", "later"):
        from vgpu_dm.sim import mdevctl

        # New mdev parents registered: mdevctl's udev rule starts their auto definitions, before
        # sriov-manage returns or some time after it (sim/mdevctl.py; unconfirmed for NVIDIA's VFs).
        parents = [vf for gpu in targets if gpu.framework == "mdev-vf" for vf in gpu.vfs]
        if on_vfs == "start":
            mdevctl.udev_parents_appeared(base, parents)
        else:
            mdevctl.queue_udev_events(base, parents)
    return _result(argv, 0, out="".join(out))


def smi_address(address: str) -> str:
    """How nvidia-smi prints a PCI address: 8-digit domain, uppercase hex (``00000000:3B:00.0``)."""
    domain, bus, rest = address.split(":")
    return f"{int(domain, 16):08X}:{bus.upper()}:{rest.upper()}"


def _find(state: SimState, text: str) -> SimGPU | None:
    """The GPU nvidia-smi -i means, by PCI address in either spelling."""
    from vgpu_dm.host.pci import address_key

    try:
        key = address_key(text.lower())
    except ValueError:
        return None
    return next((g for g in state.gpus if address_key(g.address) == key), None)


def _all_placed(base: Path, gpu: SimGPU) -> list[SimType]:
    from vgpu_dm.sim.driver import mdev_devices, removing_types

    if gpu.framework == "vendor-vfio":
        return placed_types(base, gpu)
    # An mdev whose remove waits for its VM still exists for the driver.
    return [t for _, _, t in mdev_devices(base, gpu)] + [t for _, t in removing_types(gpu)]


def _gpu_block(gpu: SimGPU) -> str:
    """One GPU's block of ``nvidia-smi -q``, with the vGPU fields where real captures have them."""
    sizes = "Supported" if gpu.mixed_capable else "Not Supported"
    mode = "Enabled" if gpu.mixed_enabled else "Disabled"
    sriov = "Non SR-IOV" if gpu.framework == "mdev-pf" else "SR-IOV"
    return (
        f"GPU {smi_address(gpu.address)}\n"
        f"    Product Name                                           : {gpu.model}\n"
        f"    Product Architecture                                   : N/A\n"
        f"    vGPU Device Capability\n"
        f"        Fractional Multi-vGPU                              : Supported\n"
        f"        Heterogeneous Time-Slice Profiles                  : Supported\n"
        f"        Heterogeneous Time-Slice Sizes                     : {sizes}\n"
        f"    MIG Mode\n"
        f"        Current                                            : N/A\n"
        f"        Pending                                            : N/A\n"
        f"    GPU Virtualization Mode\n"
        f"        Virtualization Mode                                : Host VGPU\n"
        f"        Host VGPU Mode                                     : {sriov}\n"
        f"        vGPU Heterogeneous Mode                            : {mode}\n"
    )


def nvidia_smi(base: Path, state: SimState, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The nvidia-smi commands the tool runs. ``-q`` follows the real layout: the driver-wide
    ``Heterogenous Multi-vGPU`` line (Supported, as on every captured vGPU host) once before
    ``Attached GPUs``, then per GPU its own ``Heterogeneous Time-Slice Sizes`` and current mode."""
    from vgpu_dm.sim.driver import refresh_gpu

    args = argv[1:]
    if args[:1] == ["-q"] and len(args) in (1, 3) and (len(args) == 1 or args[1] == "-i"):
        gpus = state.gpus if len(args) == 1 else [g for g in [_find(state, args[2])] if g]
        if not gpus:
            return _result(argv, 6, out=f"No devices were found matching {args[2]}\n")
        head = (
            "\n==============NVSMI LOG==============\n\n"
            "Timestamp                                                  : Sun Nov 29 20:00:00 2026\n"
            f"Driver Version                                             : {state.driver_version}\n"
            "CUDA Version                                               : Not Found\n"
            "vGPU Driver Capability\n"
            "        Heterogenous Multi-vGPU                            : Supported\n\n"
            f"Attached GPUs                                              : {len(state.gpus)}\n"
        )
        return _result(argv, 0, out=head + "\n".join(_gpu_block(g) for g in gpus))
    if args[:1] == ["vgpu"] and len(args) == 5 and args[1] == "-i" and args[3] == "-shm":
        gpu = _find(state, args[2])
        if gpu is None:
            return _result(argv, 6, out=f"No devices were found matching {args[2]}\n")
        if not gpu.mixed_capable:
            return _result(argv, 3, out="Setting vGPU heterogeneous mode is not supported for this GPU.\n")
        if _all_placed(base, gpu):
            return _result(argv, 19, out="Failed to set vGPU heterogeneous mode: In use by another client\n")
        gpu.mixed_enabled = args[4] == "1"
        state.save(base)
        refresh_gpu(base, gpu)
        return _result(
            argv, 0, out=f"vGPU heterogeneous mode {'enabled' if gpu.mixed_enabled else 'disabled'}\n"
        )
    if args[:3] == ["vgpu", "-s", "-v"] and len(args) == 5 and args[3] == "-i":
        gpu = _find(state, args[4])
        if gpu is None:
            return _result(argv, 6, out=f"No devices were found matching {args[4]}\n")
        lines = [f"GPU {smi_address(gpu.address)}"]
        for t in gpu.types:
            lines += [
                f"    vGPU Type ID                          : {t.type_id:#x}",
                f"        Name                              : {gpu.name_prefix}{t.name}",
                f"        Max Instances                     : {t.max_instances}",
            ]
        return _result(argv, 0, out="\n".join(lines) + "\n")
    if len(args) == 2 and args[0].startswith("--query-gpu=") and args[1] == "--format=csv,noheader":
        return _query_gpus(state, argv, args[0].split("=", 1)[1].split(","))
    if len(args) == 4 and args[0] == "-i" and args[2] == "-mig" and args[3] in ("0", "1"):
        return _set_mig_mode(base, state, argv, args[1], args[3] == "1")
    return _result(argv, 2, err=f"simulated nvidia-smi does not know: {' '.join(args)}\n")


def _mode_text(gpu: SimGPU, pending: bool) -> str:
    if not gpu.mig_profiles:
        return "[N/A]"
    on = (gpu.mig_pending if gpu.mig_pending is not None else gpu.mig_mode) if pending else gpu.mig_mode
    return "Enabled" if on else "Disabled"


def _query_gpus(state: SimState, argv: list[str], fields: list[str]) -> subprocess.CompletedProcess[str]:
    """``nvidia-smi --query-gpu=… --format=csv,noheader``: one line per GPU NVML sees (not the ones
    bound to vfio-pci), in NVML's order, values joined by ``", "``."""
    values = {
        "index": lambda i, g: str(i),
        "pci.bus_id": lambda i, g: smi_address(g.address),
        "pci.device_id": lambda i, g: f"0x{g.device:04X}10DE",
        "name": lambda i, g: f"NVIDIA {g.model}",
        "mig.mode.current": lambda i, g: _mode_text(g, False),
        "mig.mode.pending": lambda i, g: _mode_text(g, True),
    }
    bad = [f for f in fields if f not in values]
    if bad:
        return _result(argv, 2, out=f'Field "{bad[0]}" is not a valid field to query.\n')
    lines = [", ".join(values[f](i, g) for f in fields) for i, g in enumerate(state.nvml_gpus())]
    return _result(argv, 0, out="".join(line + "\n" for line in lines))


def _set_mig_mode(
    base: Path, state: SimState, argv: list[str], ident: str, enabled: bool
) -> subprocess.CompletedProcess[str]:
    """``nvidia-smi -i <gpu> -mig 0|1``: sets the pending MIG mode (NVML's SetMigMode)."""
    from vgpu_dm.sim.driver import refresh_gpu
    from vgpu_dm.sim.mig_parted import Fatal, busy_gpus, set_mode

    gpu = _find(state, ident)
    if gpu is None or gpu.pf_driver != "nvidia":
        return _result(argv, 6, out=f"No devices were found matching {ident}\n")
    verb = "enable" if enabled else "disable"
    address = smi_address(gpu.address)
    if not gpu.mig_profiles:
        return _result(argv, 3, out=f"Unable to {verb} MIG Mode for GPU {address}: Not Supported\n")
    try:
        set_mode(state, gpu, enabled, busy_gpus(base, state))
    except Fatal as exc:
        code, why = (19, "In use by another client") if "IN_USE" in str(exc) else (3, "Not Supported")
        return _result(argv, code, out=f"Unable to {verb} MIG Mode for GPU {address}: {why}\n")
    state.save(base)
    refresh_gpu(base, gpu)
    out = f"{verb.capitalize()}d MIG Mode for GPU {address}\n"
    if gpu.mig_pending is not None:
        out = (
            f"Warning: MIG mode is in pending {verb} state for GPU {address}:In use by another client\n"
            f"Reboot the system or try nvidia-smi --gpu-reset to make MIG mode effective on GPU {address}\n"
        )
    return _result(argv, 0, out=out + "All done.\n")
