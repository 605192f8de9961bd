"""vGPUs that a VM holds: never removed unless forced, and named precisely when they block an apply.

A fake VM (``sim hold``) is a process in the simulated ``proc`` whose fd points at the device's VFIO
node, which is exactly what the tool's in-use detection reads. An apply that would remove a held mdev
(T4) or a held VF (L40S, vendor VFIO) fails before its first write, naming the device, its GPU and the
holding pid and process name; ``--force`` goes ahead and warns; reducing a count keeps the held device
and removes an idle one; and recovery after a crash leaves a device alone that a VM grabbed meanwhile.
"""

from __future__ import annotations

import re
import signal
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
@pytest.mark.parametrize("which", ["mdev", "vf"])
def test_force_goes_ahead_and_warns_loudly(cli, host, which):
    root, config = host
    device = mdevs(root)[1] if which == "mdev" else vfs(root)[2]
    pid = hold(cli, root, device)
    before, logged = snapshot(root), len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--force")
    warning = [x for x in result.err.splitlines() if "level=warning" in x and "--force: removing" in x]
    assert len(warning) == 1, result.err
    assert device in warning[0] and f"pid {pid} (qemu-system-x86_64)" in warning[0]
    # It really went ahead: the held device's own remove was written.
    attempted = writes(root)[logged:]
    assert any(device in line and (line.endswith("\t1") or line.endswith("\t0")) for line in attempted)
    # The simulated driver refuses to pull a vGPU from under a running VM (EBUSY), so the apply fails
    # at that step and everything it changed so far is put back.
    assert result.code == 1, result.err
    assert re.search(rf"step failed: remove \S+ {re.escape(device)} .*Device or resource busy", result.err)
    assert snapshot(root) == before


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


def test_forced_recovery_does_try_to_remove_a_grabbed_device(cli, run_cli, host):
    """With --force, recovery goes for the grabbed device; the simulated driver refuses (EBUSY)."""
    root, config = host
    device, _ = crash_then_grab(cli, run_cli, root, config, 6, T4)
    logged = len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--force")
    assert "Traceback" not in result.err
    assert result.code == 1, result.err
    assert f"sys/bus/mdev/devices/{device}/remove\t1" in writes(root)[logged:]
    assert "Device or resource busy" in result.err, result.err
    assert device in mdevs(root)


def test_forced_recovery_warns_loudly_naming_the_vm(cli, run_cli, host):
    root, config = host
    device, pid = crash_then_grab(cli, run_cli, root, config, 6, T4)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "switch", "--force")
    warning = [x for x in result.err.splitlines() if "level=warning" in x and "--force" in x]
    assert warning, result.err
    assert device in warning[0] and f"pid {pid} (qemu-system-x86_64)" in warning[0]
