"""Fake processes in the simulated host's ``proc``: a "VM" is a pid directory whose ``fd`` links point
at a vGPU's VFIO device node, which is exactly what the real in-use detection reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vgpu_dm.host.root import SIM_MARKER

HOLDERS_FILE = "holders.json"  # pids made by add_holder; only these may be released


def _made(base: Path) -> list[int]:
    path = base / SIM_MARKER / HOLDERS_FILE
    try:
        return [int(p) for p in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []


def release_holder(base: Path, pid: int) -> None:
    """End a fake VM made by add_holder; any other pid (the init process, …) raises LookupError."""
    made = _made(base)
    if pid not in made or not (base / "proc" / str(pid)).is_dir():
        known = ", ".join(map(str, made)) or "none"
        raise LookupError(f"pid {pid} is not a fake VM made by 'sim hold' (those are: {known})")
    shutil.rmtree(base / "proc" / str(pid))
    made.remove(pid)
    (base / SIM_MARKER / HOLDERS_FILE).write_text(json.dumps(made))


def add_holder(base: Path, node: str | list[str], name: str = "qemu-system-x86_64") -> int:
    """Make a fake process that holds ``node`` (e.g. ``/dev/vfio/104``; a list for a VM with several
    vGPUs) open; returns its pid."""
    proc = base / "proc"
    pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    pid = max([4000, *pids]) + 1
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "comm").write_text(name + "\n")
    for fd, target in enumerate([node] if isinstance(node, str) else node, start=42):
        os.symlink(target, proc / str(pid) / "fd" / str(fd))
    (base / SIM_MARKER / HOLDERS_FILE).write_text(json.dumps([*_made(base), pid]))
    return pid


def holders_of_group(base: Path, group: str) -> list[int]:
    """Pids whose fds point at ``/dev/vfio/<group>``."""
    return holders_of(base, [f"/dev/vfio/{group}"])


def holders_of(base: Path, nodes: list[str]) -> list[int]:
    """Pids whose fds point at any of ``nodes``."""
    wanted = set(nodes)
    found = []
    proc = base / "proc"
    for pid in os.listdir(proc) if proc.is_dir() else ():
        fd_dir = proc / pid / "fd"
        if not pid.isdigit() or not fd_dir.is_dir():
            continue
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(fd_dir / fd) in wanted:
                    found.append(int(pid))
            except OSError:
                continue
    return found


def device_node(root: str | os.PathLike[str], device: str, cdev: bool | None = None) -> str:
    """The VFIO node a VM opens for an mdev UUID or a vendor-VFIO VF address.

    ``cdev`` picks the iommufd cdev ``/dev/vfio/devices/vfioN`` (QEMU with iommufd) over the group node
    ``/dev/vfio/<group>``; by default mdevs are held through their group, VFs through their cdev.
    """
    base = Path(root)
    for dev_dir, default in (
        (base / "sys/bus/mdev/devices" / device, False),
        (base / "sys/bus/pci/devices" / device, True),
    ):
        if not ((dev_dir / "mdev_type").exists() or (dev_dir / "vfio-dev").is_dir()):
            continue
        use_cdev = default if cdev is None else cdev
        if use_cdev and (dev_dir / "vfio-dev").is_dir():
            return f"/dev/vfio/devices/{sorted(os.listdir(dev_dir / 'vfio-dev'))[0]}"
        if use_cdev:
            raise LookupError(f"{device} has no vfio-dev cdev on the simulated host")
        return f"/dev/vfio/{os.path.basename(os.readlink(dev_dir / 'iommu_group'))}"
    from vgpu_dm.sim.layout import SimState

    if any(device.lower() in gpu.removing for gpu in SimState.load(base).gpus):
        # vfio_unregister_group_dev() unregisters the device from its group and deletes its cdev
        # before it waits for the VM, so nothing can open it any more.
        raise LookupError(
            f"mdev {device} is being removed (the remove waits for the VM holding it); the kernel "
            f"refuses new opens of it"
        )
    raise LookupError(f"no mdev or vendor-VFIO VF called {device!r} on the simulated host")
