"""vGPUs that a VM holds: never removed unless forced, and named precisely when they block an apply.

A fake VM (``sim hold``) is a process in the simulated ``proc`` whose fd points at the device's VFIO
node, which is exactly what the tool's in-use detection reads. An apply that would remove a held mdev
(T4) or a held VF (L40S, vendor VFIO) fails before its first write, naming the device, its GPU and the
holding pid and process name; ``--force`` goes ahead and warns — for an mdev the removal then waits
until the VM lets go (the kernel blocks it; a watchdog logs what it waits for), for a VF the plan refuses
even with ``--force`` (the driver would refuse with EPERM); reducing a count keeps the held device and
removes an idle one; and recovery after a crash leaves a device alone that a VM grabbed meanwhile.
"""

from __future__ import annotations

import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from vgpu_dm.sim.layout import create_host

T4, L40S = "0000:3b:00.0", "0000:5e:00.0"  # the simulator's addresses for a T4 + L40S host
CONFIG = """\
version: v1
vgpu-configs:
  start:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 4}
  switch:
    - devices: [0]
      vgpu-devices: {"T4-8Q": 2}
    - devices: [1]
      vgpu-devices: {"L40S-16Q": 3}
  switch-t4:
    - devices: [0]
      vgpu-devices: {"T4-8Q": 2}
  switch-l40s:
    - devices: [1]
      vgpu-devices: {"L40S-16Q": 3}
  fewer:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 2}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 2}
"""


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def host(cli, workdir):
    """A T4 (mdev) + L40S (vendor VFIO) host carrying config "start"; returns (root, config path)."""
    root = workdir / "host"
    create_host(root, ["T4", "L40S"])
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    apply(cli, root, config, "start")
    assert layouts(root) == [{"T4-4Q": 4}, {"L40S-12Q": 4}]
    return root, config


def apply(cli, root: Path, config: Path, name: str, *extra: str, code: int = 0):
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", name, *extra)
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    return result


def hold(cli, root: Path, device: str, name: str = "qemu-system-x86_64") -> int:
    """Start a fake VM holding ``device``; returns its pid."""
    result = cli("sim", "hold", str(root), device, "--name", name)
    assert result.code == 0, result.err
    found = re.search(r"pid (\d+)", result.out)
    assert found, result.out
    return int(found[1])


def mdevs(root: Path, gpu: str = T4) -> list[str]:
    """UUIDs of the mdevs on ``gpu``, sorted (the order in which the tool lists them)."""
    return sorted(d[2] for d in snapshot(root) if d[0] == gpu)


def vfs(root: Path, gpu: str = L40S) -> list[str]:
    return sorted(d[3] for d in snapshot(root) if d[0] == gpu)


# -- refusal ---------------------------------------------------------------------------------------
def test_held_mdev_blocks_the_apply_before_any_write(cli, host):
    root, config = host
    victim = mdevs(root)[2]
    pid = hold(cli, root, victim)
    before, logged = snapshot(root), len(writes(root))
    result = apply(cli, root, config, "switch", code=1)
    blocker = [x for x in result.err.splitlines() if victim in x]
    assert blocker, result.err
    assert f"GPU 0 ({T4})" in blocker[0] and "T4-4Q" in blocker[0]
    assert f"pid {pid} (qemu-system-x86_64)" in blocker[0]
    assert "--force" in blocker[0]
    assert "nothing was changed" in result.err
    assert len(writes(root)) == logged
    assert snapshot(root) == before


def test_held_vf_blocks_the_apply_before_any_write(cli, host):
    root, config = host
    vf = vfs(root)[1]
    pid = hold(cli, root, vf, name="vm-db01")
    before, logged = snapshot(root), len(writes(root))
    result = apply(cli, root, config, "switch-l40s", code=1)
    blocker = [x for x in result.err.splitlines() if vf in x]
    assert blocker, result.err
    assert f"GPU 1 ({L40S})" in blocker[0] and "L40S-12Q" in blocker[0]
    assert f"pid {pid} (vm-db01)" in blocker[0]
    assert len(writes(root)) == logged
    assert snapshot(root) == before


def test_every_blocking_device_is_named_at_once(cli, host):
    root, config = host
    uuid, vf = mdevs(root)[0], vfs(root)[3]
    pid_a, pid_b = hold(cli, root, uuid, name="vm-a"), hold(cli, root, vf, name="vm-b")
    logged = len(writes(root))
    result = apply(cli, root, config, "switch", code=1)
    assert re.search(rf"{uuid} is in use by pid {pid_a} \(vm-a\)", result.err), result.err
    assert re.search(rf"{re.escape(vf)} is in use by pid {pid_b} \(vm-b\)", result.err), result.err
    assert len(writes(root)) == logged


def test_releasing_the_vm_lets_the_apply_through(cli, host):
    root, config = host
    pid = hold(cli, root, mdevs(root)[0])
    apply(cli, root, config, "switch", code=1)
    released = cli("sim", "release", str(root), str(pid))
    assert released.code == 0, released.err
    apply(cli, root, config, "switch")
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]


def test_a_vm_on_a_gpu_the_config_does_not_select_does_not_block(cli, host):
    root, config = host
    held_vf = vfs(root)[0]
    hold(cli, root, held_vf)
    result = apply(cli, root, config, "switch-t4")  # selects only the T4
    assert held_vf not in result.err
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-12Q": 4}]


# -- --force ---------------------------------------------------------------------------------------
def release_later(root: Path, pid: int, after: float = 0.6) -> threading.Timer:
    """The fake VM exits after ``after`` seconds (a blocked removal then completes)."""
    timer = threading.Timer(after, lambda: shutil.rmtree(root / "proc" / str(pid)))
    timer.start()
    return timer


def test_forced_removal_of_a_held_mdev_waits_for_the_vm_and_says_so(cli, host):
    """The kernel blocks an mdev remove while a VM holds it (vfio_unregister_group_dev); apply waits
    with a watchdog naming the device and the process, then finishes. (Before: the simulator returned
    EBUSY, an error the kernel never gives here, and nothing watched the wait.)"""
    root, config = host
    device = mdevs(root)[1]
    pid = hold(cli, root, device)
    timer = release_later(root, pid)
    result = cli(
        "apply",
        "--sim",
        str(root),
        "-f",
        str(config),
        "-c",
        "switch-t4",
        "--force",
        "--watchdog-interval",
        "0.1",
    )
    timer.join()
    assert result.code == 0, result.err
    warning = [x for x in result.err.splitlines() if "level=warning" in x and "--force: removing" in x]
    assert len(warning) == 1, result.err
    assert device in warning[0] and f"pid {pid} (qemu-system-x86_64)" in warning[0]
    assert "blocks the removal until the VM releases" in warning[0]
    waiting = [x for x in result.err.splitlines() if "still waiting after" in x]
    assert waiting, result.err
    assert f"pid {pid} (qemu-system-x86_64)" in waiting[0] and device in waiting[0]
    assert layouts(root)[0] == {"T4-8Q": 2}


def test_force_cannot_remove_a_held_vf_and_says_so_before_any_write(cli, host):
    """NVIDIA's driver refuses (EPERM) to destroy a vGPU whose VF a VM has open; with --force the plan
    says so up front instead of failing halfway."""
    root, config = host
    device = vfs(root)[2]
    pid = hold(cli, root, device)
    before, logged = snapshot(root), len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--force")
    assert result.code == 1, result.err
    assert f"{device} is in use by pid {pid}" in result.err
    assert "refuses to destroy a vendor-VFIO vGPU that a VM has open, even with --force" in result.err
    assert len(writes(root)) == logged and snapshot(root) == before


def test_the_simulated_driver_refuses_to_destroy_a_held_vf(host):
    """Straight at the simulator: writing 0 to a held VF's current_vgpu_type fails with EPERM."""
    import errno

    from vgpu_dm.sim.host import SimHostRoot

    root, _ = host
    device = vfs(root)[0]
    from vgpu_dm.sim.processes import add_holder, device_node

    add_holder(root, device_node(root, device))
    with pytest.raises(OSError) as caught:
        SimHostRoot(root).write_text(f"sys/bus/pci/devices/{device}/nvidia/current_vgpu_type", "0")
    assert caught.value.errno == errno.EPERM


# -- fewer devices: keep the held one ----------------------------------------------------------------
def test_reducing_a_count_keeps_the_held_mdev_and_vf(cli, host):
    root, config = host
    # Hold the devices an in-use-blind plan would remove (it keeps the first ones in listing order).
    held_uuid, held_vf = mdevs(root)[-1], vfs(root)[-1]
    hold(cli, root, held_uuid)
    hold(cli, root, held_vf)
    logged = len(writes(root))
    result = apply(cli, root, config, "fewer")
    assert "--force" not in result.err
    assert layouts(root) == [{"T4-4Q": 2}, {"L40S-12Q": 2}]
    assert held_uuid in mdevs(root)
    assert held_vf in vfs(root)
    new = writes(root)[logged:]
    assert len(new) == 4  # two removals per GPU, no creations
    assert not any(held_uuid in line or held_vf in line for line in new)


def test_reducing_below_the_number_of_held_devices_is_refused(cli, host):
    root, config = host
    held = mdevs(root)[:3]
    for uuid in held:
        hold(cli, root, uuid)
    before, logged = snapshot(root), len(writes(root))
    result = apply(cli, root, config, "fewer", code=1)
    assert sum(uuid in result.err for uuid in held) == 1, result.err  # exactly one must go: named
    assert len(writes(root)) == logged
    assert snapshot(root) == before


# -- recovery after a crash --------------------------------------------------------------------------
def crash_then_grab(cli, run_cli, root: Path, config: Path, kill_at: int, gpu: str) -> tuple[str, int]:
    """Kill an apply of "switch" before write ``kill_at``; a VM then grabs a device it had created on
    ``gpu``; returns the device (UUID or VF) and the VM's pid."""
    before = set(snapshot(root))
    armed = cli("sim", "fault", str(root), "--kill-at-write", str(kill_at))
    assert armed.code == 0, armed.err
    # One GPU after another, so that write ``kill_at`` is always the same one.
    result = run_cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--jobs", "1")
    assert result.code == -signal.SIGKILL, result.err
    assert cli("sim", "fault", str(root)).code == 0
    created = [d for d in snapshot(root) if d not in before and d[0] == gpu]
    assert created, "the killed apply had created a device"
    device = created[0][2] or created[0][3]
    return device, hold(cli, root, device)


@pytest.mark.parametrize(("kill_at", "gpu"), [(6, T4), (12, L40S)], ids=["mdev", "vf"])
def test_recovery_leaves_a_device_a_vm_grabbed_meanwhile(cli, run_cli, host, kill_at, gpu):
    root, config = host
    device, pid = crash_then_grab(cli, run_cli, root, config, kill_at, gpu)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch")
    assert "Traceback" not in result.err
    assert "found an interrupted apply" in result.err
    assert device in {d[2] or d[3] for d in snapshot(root)}, "recovery removed a device a VM holds"
    assert (root / "proc" / str(pid)).is_dir()


@pytest.mark.parametrize(("kill_at", "gpu"), [(6, T4), (12, L40S)], ids=["mdev", "vf"])
def test_recovery_with_a_grabbed_device_names_the_vm_and_converges(cli, run_cli, host, kill_at, gpu):
    root, config = host
    device, pid = crash_then_grab(cli, run_cli, root, config, kill_at, gpu)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch")
    assert f"{device} is in use by pid {pid}" in result.err, result.err
    assert result.code == 0, result.err
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]
    assert device in {d[2] or d[3] for d in snapshot(root)}
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()


def test_forced_recovery_removes_a_grabbed_mdev_once_the_vm_lets_go(cli, run_cli, host):
    """With --force, recovery goes for the grabbed mdev; the removal waits for the VM (watchdog)."""
    root, config = host
    device, pid = crash_then_grab(cli, run_cli, root, config, 6, T4)
    logged = len(writes(root))
    timer = release_later(root, pid)
    result = cli(
        "apply",
        "--sim",
        str(root),
        "-f",
        str(config),
        "-c",
        "switch",
        "--force",
        "--watchdog-interval",
        "0.1",
    )
    timer.join()
    assert "Traceback" not in result.err
    assert result.code == 0, result.err
    assert f"sys/bus/mdev/devices/{device}/remove\t1" in writes(root)[logged:]
    assert "still waiting after" in result.err
    assert device not in mdevs(root)
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]


def test_forced_recovery_warns_loudly_naming_the_vm(cli, run_cli, host):
    root, config = host
    device, pid = crash_then_grab(cli, run_cli, root, config, 6, T4)
    timer = release_later(root, pid, after=0.2)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--force")
    timer.join()
    warning = [x for x in result.err.splitlines() if "level=warning" in x and "--force" in x]
    assert warning, result.err
    assert device in warning[0] and f"pid {pid} (qemu-system-x86_64)" in warning[0]
