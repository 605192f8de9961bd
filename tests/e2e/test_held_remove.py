"""Removing an mdev that a VM holds, as the kernel does it, and what the tool makes of it.

The kernel (drivers/vfio/mdev/mdev_sysfs.c remove_store, mdev_core.c mdev_device_remove,
drivers/base/bus.c bus_remove_device, drivers/vfio/vfio_main.c vfio_unregister_group_dev) takes the
device out of sight before it waits for the VM: the ``remove`` file, the ``mdev_type`` links and
``/sys/bus/mdev/devices/<uuid>`` go, the device's cdev is deleted and no new open is allowed; only the
device's directory, its IOMMU group and its capacity stay until the VM lets go. So a second remove
fails at once (the file is gone) instead of waiting, ``list`` no longer shows the device, and a VM
that holds the device through its cdev holds a deleted node (``/proc/<pid>/fd`` reads
``… (deleted)``). The simulator follows this (sim/driver.py begin_mdev_remove); these tests hold the
simulator to it and the tool's list, watchdog and rollback to what it then sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.simstate import layouts, snapshot
from vgpu_dm.sim.driver import PCI_DIR, mdev_devices
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host

CONFIG = """\
version: v1
vgpu-configs:
  four:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  two:
    - devices: all
      vgpu-devices: {"T4-8Q": 2}
"""


@pytest.fixture
def host(cli, workdir):
    """Two T4s with 4 x T4-4Q each; returns (root, config path)."""
    root = workdir / "host"
    create_host(root, ["T4", "T4"])
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    assert cli("apply", "--sim", str(root), "-f", str(config), "-c", "four").code == 0
    return root, config


def uuids(root: Path, gpu: int = 0) -> list[str]:
    return [u for _, u, _ in mdev_devices(root, SimState.load(root).gpus[gpu])]


def hold(cli, root: Path, device: str, *extra: str) -> int:
    result = cli("sim", "hold", str(root), device, *extra)
    assert result.code == 0, result.err
    return int(re.search(r"pid (\d+)", result.out)[1])


def parent_dir(root: Path, uuid: str) -> Path:
    return root / PCI_DIR / "0000:3b:00.0" / uuid


def available(root: Path, type_id_name: str = "T4-4Q") -> int:
    types = root / PCI_DIR / "0000:3b:00.0" / "mdev_supported_types"
    for tdir in types.iterdir():
        if (tdir / "name").read_text().split()[-1] == type_id_name:
            return int((tdir / "available_instances").read_text())
    raise LookupError(type_id_name)


def start_remove(root: Path, uuid: str) -> tuple[threading.Thread, list[BaseException]]:
    """Write 1 to the device's remove in a thread (it blocks while the VM holds it); wait until the
    kernel's part before the wait is done."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            SimHostRoot(root).write_text(f"sys/bus/mdev/devices/{uuid}/remove", "1")
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while os.path.lexists(root / "sys/bus/mdev/devices" / uuid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread, errors


@pytest.mark.parametrize("through", ["group", "cdev"])
def test_a_held_remove_takes_the_device_out_of_sight_and_waits(cli, host, through):
    root, _ = host
    uuid = uuids(root)[0]
    group = os.path.basename(os.readlink(parent_dir(root, uuid) / "iommu_group"))
    pid = hold(cli, root, uuid, f"--{through}")
    thread, errors = start_remove(root, uuid)
    try:
        time.sleep(0.2)
        assert thread.is_alive() and not errors, errors  # the write waits for the VM
        # Gone before the wait: remove, the mdev_type links, the bus link, the cdev.
        ddir = parent_dir(root, uuid)
        assert ddir.is_dir() and (ddir / "iommu_group").is_symlink()
        assert not os.path.lexists(ddir / "remove") and not os.path.lexists(ddir / "mdev_type")
        assert not os.path.lexists(root / "sys/bus/mdev/devices" / uuid)
        assert not any((root / PCI_DIR / "0000:3b:00.0").glob(f"mdev_supported_types/*/devices/{uuid}"))
        assert not (ddir / "vfio-dev").exists() and not (root / f"dev/vfio/devices/vfio{group}").exists()
        fd = next((root / "proc" / str(pid) / "fd").iterdir())
        expected = f"/dev/vfio/{group}" if through == "group" else f"/dev/vfio/devices/vfio{group} (deleted)"
        assert os.readlink(fd) == expected
        assert (root / f"dev/vfio/{group}").exists()  # the group goes after the wait
        # Its capacity stays with the driver until the VM lets go.
        assert available(root) == 0
        # A second remove cannot open the file any more: it fails at once, it does not wait.
        started = time.monotonic()
        with pytest.raises(FileNotFoundError):
            SimHostRoot(root).write_text(f"sys/bus/mdev/devices/{uuid}/remove", "1")
        assert time.monotonic() - started < 2
        # No new VM can open it.
        refused = cli("sim", "hold", str(root), uuid)
        assert refused.code == 2 and "being removed" in refused.err, refused.err
        # list shows what sysfs shows: three vGPUs, not the one being removed.
        listed = cli("list", "--sim", str(root), "-o", "json")
        assert listed.code == 0, listed.err
        gpu0 = json.loads(listed.out)["gpus"][0]
        assert [v["uuid"] for v in gpu0["vgpus"]] == uuids(root)[:3] == uuids(root)
        assert uuid not in listed.out
    finally:
        assert cli("sim", "release", str(root), str(pid)).code == 0
        thread.join(10)
    assert not thread.is_alive() and not errors, errors
    assert not parent_dir(root, uuid).exists() and not (root / f"dev/vfio/{group}").exists()
    assert available(root) == 1
    assert SimState.load(root).gpus[0].removing == {}


def test_a_remover_that_died_waiting_is_finished_once_the_vm_is_gone(cli, host):
    """A simulated process can be killed in the wait (a real one cannot: it sleeps in the kernel);
    the removal then completes at the next driver write or 'sim release'."""
    root, _ = host
    uuid = uuids(root)[0]
    pid = hold(cli, root, uuid)
    state = SimState.load(root)
    from vgpu_dm.sim import driver

    pending = driver.begin_mdev_remove(root, state, "0000:3b:00.0", uuid, "1", "remove")
    assert pending is not None and state.gpus[0].removing
    assert cli("sim", "release", str(root), str(pid)).code == 0
    assert SimState.load(root).gpus[0].removing == {}
    assert not parent_dir(root, uuid).exists() and available(root) == 1


def test_writing_0_to_remove_does_nothing(host):
    root, _ = host
    uuid = uuids(root)[0]
    SimHostRoot(root).write_text(f"sys/bus/mdev/devices/{uuid}/remove", "0")
    assert uuid in uuids(root)
    with pytest.raises(OSError, match="write 1 to remove"):
        SimHostRoot(root).write_text(f"sys/bus/mdev/devices/{uuid}/remove", "yes")


def release_later(root: Path, pid: int, after: float) -> threading.Timer:
    timer = threading.Timer(after, lambda: shutil.rmtree(root / "proc" / str(pid)))
    timer.start()
    return timer


def test_the_watchdog_names_a_vm_that_holds_the_device_through_its_cdev(cli, host):
    """Once the remove has begun, the device's cdev is deleted and its sysfs entries are gone: the
    watchdog must still say which process the kernel waits for."""
    root, config = host
    uuid = uuids(root)[0]
    pid = hold(cli, root, uuid, "--cdev")
    timer = release_later(root, pid, 0.8)
    result = cli(
        "apply", "--sim", str(root), "-f", str(config), "-c", "two", "--force", "--watchdog-interval", "0.1"
    )
    timer.join()
    assert result.code == 0, result.err
    waiting = [x for x in result.err.splitlines() if "still waiting after" in x]
    assert waiting, result.err
    # (The last line may come after the VM exited and before the kernel's wait noticed.)
    assert f"pid {pid} (qemu-system-x86_64)" in waiting[0] and uuid in waiting[0], waiting
    assert layouts(root) == [{"T4-8Q": 2}, {"T4-8Q": 2}]


def test_a_rollback_brings_back_a_device_removed_while_held(cli, host):
    """GPU 0's held vGPU is removed (--force: the write waits for the VM), then GPU 1 fails: the
    rollback recreates GPU 0's vGPUs, the held one with its UUID, once the removal has completed."""
    root, config = host
    before = snapshot(root)
    uuid = uuids(root)[0]
    pid = hold(cli, root, uuid)
    # GPU 0: 4 removes + 2 creates (writes 1-6); GPU 1's first remove is write 7.
    assert cli("sim", "fault", str(root), "--fail-write", "7").code == 0
    timer = release_later(root, pid, 0.5)
    result = cli(
        "apply", "--sim", str(root), "-f", str(config), "-c", "two", "--force", "--jobs", "1",
        "--watchdog-interval", "0.1",
    )  # fmt: skip
    timer.join()
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    assert "still waiting after" in result.err
    assert "rolled back" in result.err
    assert snapshot(root) == before
    assert uuid in uuids(root)


@pytest.mark.parametrize("blocks", ["device", "host"])
def test_what_a_held_remove_blocks_is_a_host_option(cli, workdir, blocks):
    """Whether NVIDIA's driver keeps a host-wide lock while the kernel waits for a VM is unknown:
    'sim create --held-remove-blocks device|host' models both; the kernel's own part blocks only the
    device (mdev_device_remove holds its parent's unreg_sem for reading)."""
    root = workdir / "host"
    made = cli("sim", "create", str(root), "--gpu", "T4", "--gpu", "T4", "--held-remove-blocks", blocks)
    assert made.code == 0, made.err
    sim = SimHostRoot(root)
    state = SimState.load(root)
    types = {g.address: g.types for g in state.gpus}
    t4_4q = next(t for t in types["0000:3b:00.0"] if t.name == "T4-4Q")
    create = f"sys/bus/pci/devices/{{}}/mdev_supported_types/nvidia-{t4_4q.type_id}/create"
    first = "5f2f2c4e-0000-4000-8000-000000000001"
    sim.write_text(create.format("0000:3b:00.0"), first)
    pid = hold(cli, root, first)
    thread, errors = start_remove(root, first)
    other = threading.Thread(
        target=sim.write_text, args=(create.format("0000:5e:00.0"), "5f2f2c4e-0000-4000-8000-000000000002")
    )
    other.start()
    other.join(2)
    blocked = other.is_alive()
    assert cli("sim", "release", str(root), str(pid)).code == 0
    thread.join(10)
    other.join(10)
    assert not errors
    assert blocked is (blocks == "host")
    assert len(uuids(root, 1)) == 1 and uuids(root, 0) == []
