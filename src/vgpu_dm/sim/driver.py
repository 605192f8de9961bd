"""What the NVIDIA vGPU driver does in the simulator: which types are creatable, and the reaction to
writes of the control files (mdev ``create``/``remove``). Refusals raise OSError with the driver's errno.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from vgpu_dm.host.model import UUID_PATTERN
from vgpu_dm.sim.layout import SimGPU, SimState, SimType, add_vfio_nodes

UUID_RE = re.compile(UUID_PATTERN)
PCI_DIR = "sys/devices/pci0000:00"
# The errno the simulated driver returns when a type has no room (the kernel's generic mdev counter
# uses EUSERS; the NVIDIA driver's exact value is unconfirmed, see host-interfaces.md §10).
NO_ROOM = errno.EUSERS


def _fail(code: int, path: str, why: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({why})", path)


def parents_of(gpu: SimGPU) -> list[str]:
    if gpu.framework == "mdev-pf":
        return [gpu.address]
    return list(gpu.vfs)


def type_by_id(gpu: SimGPU, type_id: int) -> SimType | None:
    return next((t for t in gpu.types if t.type_id == type_id), None)


def mdev_devices(base: Path, gpu: SimGPU) -> list[tuple[str, str, SimType]]:
    """(parent, uuid, type) of every mdev on the GPU, read from the tree."""
    found = []
    for parent in parents_of(gpu):
        pdir = base / PCI_DIR / parent
        if not pdir.is_dir():
            continue
        for entry in sorted(os.listdir(pdir)):
            if UUID_RE.fullmatch(entry):
                type_dir = os.path.basename(os.readlink(pdir / entry / "mdev_type"))
                vtype = type_by_id(gpu, type_id_of_dir(type_dir))
                if vtype:
                    found.append((parent, entry, vtype))
    return found


def type_id_of_dir(type_dir: str) -> int:
    """``nvidia-575`` / ``vfio-pci-575`` → 575: the kernel names type dirs ``<parent driver>-<id>``."""
    return int(type_dir.rsplit("-", 1)[1])


def gpu_room(gpu: SimGPU, vtype: SimType, placed: list[SimType]) -> int:
    """How many more ``vtype`` fit on the GPU next to ``placed``."""
    if gpu.mig_mode:
        # In MIG mode only MIG-backed types, and only into GPU instances with room (reference 2.4).
        from vgpu_dm.sim import mig

        return mig.room(gpu, vtype) if vtype.mig_backed else 0
    if vtype.mig_backed:
        return 0  # no GPU instances without MIG mode
    if gpu.mixed_enabled and gpu.mixed_rule == "placements":
        from vgpu_dm.sim import placements

        return placements.room(gpu, vtype)
    if gpu.mixed_enabled:
        # Mixed sizes: each type up to its own max, all of them within the framebuffer.
        same = sum(1 for t in placed if t.type_id == vtype.type_id)
        free = gpu.framebuffer_gb - sum(t.framebuffer_gb or 0.5 for t in placed)
        return max(min(vtype.max_instances - same, int(free // (vtype.framebuffer_gb or 0.5))), 0)
    if any(t.mig_backed or t.framebuffer_gb != vtype.framebuffer_gb for t in placed):
        return 0
    return max(vtype.max_instances - len(placed), 0)


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    path.write_text(text)


def refresh_gpu(base: Path, gpu: SimGPU) -> None:
    """Rewrite the files that show what is creatable on the GPU's parents."""
    if gpu.framework == "vendor-vfio":
        from vgpu_dm.sim.vfio_driver import refresh_vfio

        refresh_vfio(base, gpu)
        return
    devices = mdev_devices(base, gpu)
    placed = [t for _, _, t in devices]
    busy_parents = {p for p, _, _ in devices}
    for parent in parents_of(gpu):
        types_dir = base / PCI_DIR / parent / "mdev_supported_types"
        for vtype in gpu.types:
            tdir = types_dir / f"{gpu.type_dir_prefix}-{vtype.type_id}"
            if not tdir.exists():
                (tdir / "devices").mkdir(parents=True)
                (tdir / "name").write_text(f"{gpu.name_prefix}{vtype.name}\n")
                fb = f"{vtype.framebuffer_gb * 1024}M" if vtype.framebuffer_gb else "512M"
                (tdir / "description").write_text(
                    f"num_heads=4, frl_config=60, framebuffer={fb}, max_resolution=5120x2880, "
                    f"max_instance={vtype.max_instances}\n"
                )
                (tdir / "device_api").write_text("vfio-pci\n")
                (tdir / "create").write_text("")
            room = gpu_room(gpu, vtype, placed)
            if gpu.framework == "mdev-vf":
                room = 0 if parent in busy_parents else min(room, 1)
            _write_if_changed(tdir / "available_instances", f"{room}\n")


def refresh_all(base: Path, state: SimState) -> None:
    for gpu in state.gpus:
        refresh_gpu(base, gpu)


def mdev_create(base: Path, state: SimState, parent: str, type_id: int, data: str, path: str) -> None:
    gpu = state.gpu_of(parent)
    vtype = type_by_id(gpu, type_id) if gpu else None
    if gpu is None or vtype is None:
        raise _fail(errno.ENODEV, path, "no such vGPU type on this parent")
    uuid = data.strip()
    if not UUID_RE.fullmatch(uuid):
        raise _fail(errno.EINVAL, path, f"not a UUID: {uuid!r}")
    uuid = uuid.lower()
    if (base / "sys/bus/mdev/devices" / uuid).exists():
        raise _fail(errno.EEXIST, path, f"mdev {uuid} already exists")
    type_dir = f"{gpu.type_dir_prefix}-{type_id}"
    avail = int(
        (base / PCI_DIR / parent / "mdev_supported_types" / type_dir / "available_instances").read_text()
    )
    if avail <= 0:
        raise _fail(NO_ROOM, path, f"no room for another {vtype.name} on {parent}")
    if vtype.mig_backed:
        from vgpu_dm.sim import mig

        try:
            mig.place(gpu, vtype, uuid)
        except mig.MigError as exc:
            raise _fail(NO_ROOM, path, str(exc)) from None
    elif gpu.mixed_enabled and gpu.mixed_rule == "placements":
        from vgpu_dm.sim import placements

        try:
            placements.place(gpu, vtype, uuid)
        except ValueError as exc:
            raise _fail(NO_ROOM, path, str(exc)) from None
    pdir = base / PCI_DIR / parent
    ddir = pdir / uuid
    ddir.mkdir()
    os.symlink(f"../mdev_supported_types/{type_dir}", ddir / "mdev_type")
    (ddir / "remove").write_text("")
    group = state.next_group
    state.next_group += 1
    (base / "sys/kernel/iommu_groups" / str(group)).mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(base / "sys/kernel/iommu_groups" / str(group), ddir), ddir / "iommu_group")
    # An mdev is a VFIO device: group node plus iommufd cdev (kernel >= 6.2, CONFIG_VFIO_DEVICE_CDEV).
    add_vfio_nodes(base, ddir, group)
    os.symlink(os.path.relpath(ddir, base / "sys/bus/mdev/devices"), base / "sys/bus/mdev/devices" / uuid)
    tdevs = pdir / "mdev_supported_types" / type_dir / "devices"
    os.symlink(os.path.relpath(ddir, tdevs), tdevs / uuid)
    state.save(base)
    refresh_gpu(base, gpu)


def vfio_nodes(dev_dir: Path) -> list[str]:
    """The /dev nodes through which a VM opens a VFIO device: its group and its iommufd cdev(s)."""
    nodes = [f"/dev/vfio/{os.path.basename(os.readlink(dev_dir / 'iommu_group'))}"]
    if (dev_dir / "vfio-dev").is_dir():
        nodes += [f"/dev/vfio/devices/{n}" for n in sorted(os.listdir(dev_dir / "vfio-dev"))]
    return nodes


# How often a blocked remove looks whether the VM has let go (the kernel sleeps on a completion).
RELEASE_POLL = 0.02


class StillHeld(Exception):
    """An mdev remove found its device held: the caller waits (outside its lock) and tries again."""

    def __init__(self, uuid: str, nodes: list[str]):
        super().__init__(uuid)
        self.nodes = nodes


def wait_released(base: Path, nodes: list[str]) -> None:
    """Block while a process holds any of ``nodes``.

    The kernel does not refuse to remove a held mdev: vfio_unregister_group_dev()
    (drivers/vfio/vfio_main.c) waits until every user has closed the device ("Device is currently in
    use, task ... blocked until device is released"), uninterruptibly after the first signal. The wait
    is the device's own: mdev_device_remove() (drivers/vfio/mdev/mdev_core.c) holds only the parent's
    unreg_sem, and only for reading, so removes and creates of other devices and other GPUs go on.
    """
    from vgpu_dm.sim.processes import holders_of

    while holders_of(base, nodes):
        time.sleep(RELEASE_POLL)


def mdev_remove(
    base: Path, state: SimState, parent: str, uuid: str, data: str, path: str, wait: bool = True
) -> None:
    """Remove an mdev; a held one blocks until released, or (``wait=False``: the caller waits outside
    the simulator's lock) raises StillHeld."""
    from vgpu_dm.sim.processes import holders_of

    if data.strip() != "1":
        raise _fail(errno.EINVAL, path, "write 1 to remove")
    ddir = base / PCI_DIR / parent / uuid
    group = os.path.basename(os.readlink(ddir / "iommu_group"))
    nodes = vfio_nodes(ddir)
    if wait:
        wait_released(base, nodes)
    elif holders_of(base, nodes):
        raise StillHeld(uuid, nodes)
    type_dir = os.path.basename(os.readlink(ddir / "mdev_type"))
    (ddir / "mdev_type").unlink()
    shutil.rmtree(ddir)
    for link in (
        base / "sys/bus/mdev/devices" / uuid,
        base / PCI_DIR / parent / "mdev_supported_types" / type_dir / "devices" / uuid,
        base / "dev/vfio" / group,
        *(base / node.lstrip("/") for node in nodes[1:]),
    ):
        if os.path.lexists(link):
            link.unlink()
    gpu = state.gpu_of(parent)
    if gpu:
        if uuid in gpu.mig_hosts:
            from vgpu_dm.sim import mig

            mig.release(gpu, uuid)
            state.save(base)
        if uuid in gpu.placements:
            del gpu.placements[uuid]
            state.save(base)
        refresh_gpu(base, gpu)
