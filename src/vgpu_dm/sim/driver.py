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
from typing import NamedTuple

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
            if UUID_RE.fullmatch(entry) and os.path.islink(pdir / entry / "mdev_type"):
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
    devices = [(p, t) for p, _, t in mdev_devices(base, gpu)] + removing_types(gpu)
    placed = [t for _, t in devices]
    busy_parents = {p for p, _ in devices}
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
# What /proc/<pid>/fd/<n> reads for a device node that was unlinked while the file is open
# (fs/d_path.c appends it to the path of an unlinked dentry).
DELETED = " (deleted)"


class PendingRemove(NamedTuple):
    """An mdev remove that waits for a VM: what begin_mdev_remove did not finish yet."""

    uuid: str
    gpu: str  # the GPU's address
    nodes: list[str]  # the /proc fd targets that keep the wait going
    host_wide: bool  # the simulated driver waits holding its host-wide lock (held_remove_blocks=host)
    held: bool  # a VM held the device when the remove began (else it completes at once)
    group: str  # its IOMMU group


def wait_released(base: Path, nodes: list[str]) -> None:
    """Block while a process holds any of ``nodes`` (vfio_unregister_group_dev()'s wait for the
    device's completion; uninterruptible after the first signal in the kernel)."""
    from vgpu_dm.sim.processes import holders_of

    while holders_of(base, nodes):
        time.sleep(RELEASE_POLL)


def mdev_remove(
    base: Path, state: SimState, parent: str, uuid: str, data: str, path: str
) -> PendingRemove | None:
    """Write ``1`` to an mdev's ``remove``: the device is removed at once when no VM holds it;
    otherwise it is taken out of sight as the kernel does before waiting, and the caller waits for the
    returned PendingRemove (wait_released) and then calls finish_mdev_remove."""
    pending = begin_mdev_remove(base, state, parent, uuid, data, path)
    if pending is None or pending.held:
        return pending
    gpu = state.gpu_of(parent)
    _complete(base, state, gpu, uuid, parent, pending.group)
    return None


def begin_mdev_remove(
    base: Path, state: SimState, parent: str, uuid: str, data: str, path: str
) -> PendingRemove | None:
    """What the kernel does before it waits for a VM, in its order (Linux 6.6+):

    1. remove_store() (drivers/vfio/mdev/mdev_sysfs.c) removes the ``remove`` attribute itself
       (device_remove_file_self): a second remove cannot open it any more (ENOENT; one that had it
       open gets ENODEV from kernfs), so a second remove never blocks.
    2. mdev_device_remove() (drivers/vfio/mdev/mdev_core.c) marks the device inactive, then
       mdev_device_remove_common() drops the ``mdev_type`` link and the type's ``devices/<uuid>``
       link (mdev_remove_sysfs_files) and calls device_del(), whose bus_remove_device()
       (drivers/base/bus.c) removes ``/sys/bus/mdev/devices/<uuid>`` and then releases the driver.
    3. The vendor driver's remove calls vfio_unregister_group_dev() (drivers/vfio/vfio_main.c), which
       first unregisters the device from its group (no new VFIO_GROUP_GET_DEVICE_FD) and deletes its
       cdev (``vfio-dev/vfioN`` and ``/dev/vfio/devices/vfioN``; no new open there either), and only
       then waits until every user has closed it. Kernels before the vfio cdev series did these two
       after the wait, so a VM could still open the device while the remove waited.
    4. After the wait: vfio_device_remove_group() (the IOMMU group and its node) and the end of
       device_del() (the device's directory). The device's capacity is the vendor driver's to free
       when its remove returns; the simulator frees it then (finish_mdev_remove).

    The wait itself holds only the parent's unreg_sem for reading (mdev_device_remove), so removes
    and creates of other devices and GPUs proceed. Returns None when ``remove`` was written 0.
    """
    try:
        value = int(data.strip(), 0)  # kstrtoul(buf, 0, ...) in remove_store
    except ValueError:
        raise _fail(errno.EINVAL, path, "write 1 to remove") from None
    if value == 0:
        return None  # accepted, and nothing happens
    gpu = state.gpu_of(parent)
    ddir = base / PCI_DIR / parent / uuid
    group = os.path.basename(os.readlink(ddir / "iommu_group"))
    nodes = vfio_nodes(ddir)
    type_dir = os.path.basename(os.readlink(ddir / "mdev_type"))
    (ddir / "remove").unlink()
    (ddir / "mdev_type").unlink()
    for link in (
        base / PCI_DIR / parent / "mdev_supported_types" / type_dir / "devices" / uuid,
        base / "sys/bus/mdev/devices" / uuid,
    ):
        if os.path.lexists(link):
            link.unlink()
    cdevs = nodes[1:]
    if (ddir / "vfio-dev").is_dir():
        shutil.rmtree(ddir / "vfio-dev")
    for node in cdevs:
        (base / node.lstrip("/")).unlink(missing_ok=True)
    from vgpu_dm.sim.processes import holders_of

    held = bool(holders_of(base, nodes))
    wait_for = [nodes[0], *(n + DELETED for n in cdevs)]
    if held:
        _mark_deleted(base, cdevs)
        if gpu is not None:
            info = {"parent": parent, "type_id": type_id_of_dir(type_dir), "group": group, "nodes": wait_for}
            gpu.removing[uuid] = info
            state.save(base)
    host_wide = state.options.get("held_remove_blocks") == "host"
    return PendingRemove(uuid, gpu.address if gpu else "", wait_for, host_wide, held, group)


def _mark_deleted(base: Path, nodes: list[str]) -> None:
    """Open files of unlinked device nodes now read ``<path> (deleted)`` in /proc/<pid>/fd."""
    if not nodes:
        return
    wanted = set(nodes)
    proc = base / "proc"
    for pid in os.listdir(proc) if proc.is_dir() else ():
        fd_dir = proc / pid / "fd"
        if not pid.isdigit() or not fd_dir.is_dir():
            continue
        for fd in os.listdir(fd_dir):
            link = fd_dir / fd
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target in wanted:
                link.unlink()
                os.symlink(target + DELETED, link)


def finish_mdev_remove(base: Path, state: SimState, uuid: str) -> None:
    """The rest of an mdev remove once no VM holds it (idempotent: a stranded removal may have been
    finished by finish_released already)."""
    gpu = next((g for g in state.gpus if uuid in g.removing), None)
    if gpu is None:
        return
    info = gpu.removing.pop(uuid)
    _complete(base, state, gpu, uuid, info["parent"], info["group"], save=True)


def _complete(
    base: Path, state: SimState, gpu: SimGPU | None, uuid: str, parent: str, group: str, save: bool = False
) -> None:
    """What follows the wait: the IOMMU group, the device's directory, its capacity."""
    ddir = base / PCI_DIR / parent / uuid
    if ddir.is_dir():
        shutil.rmtree(ddir)
    (base / "dev/vfio" / group).unlink(missing_ok=True)
    if gpu is None:
        return
    if uuid in gpu.mig_hosts:
        from vgpu_dm.sim import mig

        mig.release(gpu, uuid)
        save = True
    if gpu.placements.pop(uuid, None) is not None:  # its mixed-size placement is free again
        save = True
    if save:
        state.save(base)
    refresh_gpu(base, gpu)


def finish_released(base: Path, state: SimState) -> None:
    """Finish removals whose VMs are gone but whose remover is not waiting any more (a simulated
    process killed in the wait, which a real one in D state cannot be)."""
    from vgpu_dm.sim.processes import holders_of

    for gpu in state.gpus:
        for uuid, info in list(gpu.removing.items()):
            if not holders_of(base, info["nodes"]):
                finish_mdev_remove(base, state, uuid)


def removing_types(gpu: SimGPU) -> list[tuple[str, SimType]]:
    """(parent, type) of the GPU's mdevs whose remove waits for a VM: they keep their capacity."""
    found = []
    for info in gpu.removing.values():
        vtype = type_by_id(gpu, int(info["type_id"]))
        if vtype:
            found.append((info["parent"], vtype))
    return found
