"""A simulated reboot: what a real host loses when it restarts (host-interfaces.md 3.2).

SR-IOV VFs, vGPUs (mdevs and vendor-VFIO types), MIG GPU instances and mixed-size mode are gone; a
pending MIG mode change takes effect (a reboot resets the GPU), and MIG mode itself stays or is lost
by the host option ``mig_after_reboot``; ``/run`` (a tmpfs: lock, journal) is empty and the fake VM
processes have ended (libvirt's running-VM status files in /run with them). When the simulated
host has mdevctl, its udev rule then starts the auto definitions of the parents that appear at boot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vgpu_dm.host.root import SIM_MARKER
from vgpu_dm.sim.driver import PCI_DIR, finish_released, mdev_devices, refresh_all
from vgpu_dm.sim.files import UDEV_QUEUE_FILE
from vgpu_dm.sim.layout import SimState
from vgpu_dm.sim.vfio_driver import disable_vfs


def _drop_mdev(base: Path, parent: str, uuid: str) -> None:
    ddir = base / PCI_DIR / parent / uuid
    type_dir = os.path.basename(os.readlink(ddir / "mdev_type"))
    group = os.path.basename(os.readlink(ddir / "iommu_group"))
    cdevs = ddir / "vfio-dev"
    nodes = [base / "dev/vfio/devices" / n for n in (os.listdir(cdevs) if cdevs.is_dir() else [])]
    for link in (
        base / "sys/bus/mdev/devices" / uuid,
        base / PCI_DIR / parent / "mdev_supported_types" / type_dir / "devices" / uuid,
        base / "dev/vfio" / group,
        *nodes,
    ):
        if os.path.lexists(link):
            link.unlink()
    shutil.rmtree(ddir)


def drop_vgpus(base: Path, gpu) -> int:
    """Every vGPU of ``gpu`` is gone (a GPU reset or a reboot); returns how many there were. The caller
    saves the state and refreshes the GPU's files."""
    count = 0
    if gpu.framework == "vendor-vfio":
        for vf in gpu.vfs:
            path = base / PCI_DIR / vf / "nvidia/current_vgpu_type"
            if path.exists() and path.read_text().strip() not in ("", "0"):
                path.write_text("0\n")
                count += 1
    else:
        devices = mdev_devices(base, gpu)
        for parent, uuid, _ in devices:
            _drop_mdev(base, parent, uuid)
        count = len(devices)
    gpu.mig_hosts, gpu.mig_types = {}, {}
    return count


def reboot(root: str | os.PathLike[str]) -> list[str]:
    """Reboot the simulated host at ``root``; returns one line per GPU saying what it lost."""
    base = Path(root)
    proc = base / "proc"
    for pid in os.listdir(proc):
        if pid.isdigit() and pid != "1":
            shutil.rmtree(proc / pid)
    run = base / "run"
    for entry in os.listdir(run):
        path = run / entry
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    state = SimState.load(base)
    finish_released(base, state)  # the VMs are gone: removes that waited for them complete
    lines = []
    for gpu in state.gpus:
        lost = []
        instances = len(gpu.gpu_instances)
        if gpu.framework == "mdev-pf":
            dropped = drop_vgpus(base, gpu)
            if dropped:
                lost.append(f"{dropped} vGPU(s)")
        elif gpu.vfs:
            lost.append(f"{len(gpu.vfs)} VFs and their vGPUs")
            disable_vfs(base, gpu)
        if instances:
            lost.append(f"{instances} GPU instance(s)")
        gpu.gpu_instances, gpu.mig_hosts, gpu.mig_types = [], {}, {}
        gpu.mixed_enabled = False
        gpu.placements = {}
        if gpu.mig_pending is not None:
            gpu.mig_mode, gpu.mig_pending = gpu.mig_pending, None
        if gpu.mig_mode and state.options["mig_after_reboot"] == "lose":
            gpu.mig_mode = False
            lost.append("MIG mode")
        mode = ", MIG mode on" if gpu.mig_mode else ""
        lines.append(f"{gpu.address}: lost {', '.join(lost) or 'nothing'}{mode}")
    state.save(base)
    refresh_all(base, state)
    from vgpu_dm.sim.driver import parents_of
    from vgpu_dm.sim.mdevctl import udev_parents_appeared

    # The GPUs' own mdev parents register when the driver loads, long before any tool runs: mdevctl's
    # udev rule starts their auto definitions (a queue of a run before the reboot is gone).
    (base / SIM_MARKER / UDEV_QUEUE_FILE).unlink(missing_ok=True)
    lines += udev_parents_appeared(
        base, [p for gpu in state.gpus if gpu.framework == "mdev-pf" for p in parents_of(gpu)]
    )
    return lines
