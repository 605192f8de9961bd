"""apply with MIG-backed types on simulated hosts: nvidia-mig-parted prepares MIG mode and GPU instances
first; failures leave the vGPUs as they were. nvidia-mig-parted is the real binary where the simulator
can delegate to it (VGPU_DM_SIM_MIG_PARTED, A100/A30/H100 SXM5 models), else the simulated one (H200)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.simstate import arm, layouts, snapshot
from vgpu_dm.sim.host import SimHostRoot, write_log
from vgpu_dm.sim.layout import SimState, create_host

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "config-mig.yaml"


def instances(root: Path) -> list[dict[str, int]]:
    return [dict(Counter(gi["profile"] for gi in g.gpu_instances)) for g in SimState.load(root).gpus]


def mig_modes(root: Path) -> list[bool]:
    return [g.mig_mode for g in SimState.load(root).gpus]


def step(cli, root: Path, name: str, whole_host: bool = True) -> None:
    """apply, then assert with nvidia-vgpu-dm and with nvidia-mig-parted (whose assert holds only when
    the config covers every GPU of the host: ``whole_host``)."""
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", name)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    held = cli("assert", "--sim", str(root), "-f", str(CONFIG), "-c", name)
    assert held.code == 0, held.err
    translated = cli("mig-config", "-f", str(CONFIG), "-c", name)
    assert translated.code == 0
    proc = SimHostRoot(root).run(["nvidia-mig-parted", "assert", "-f", "-"], input=translated.out)
    assert proc.returncode == (0 if whole_host else 1), proc.stderr
    # Nothing left to do: a second apply writes nothing and runs no MIG change.
    logged = len(write_log(root))
    again = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", name)
    assert again.code == 0 and len(write_log(root)) == logged
    assert "nvidia-mig-parted" not in again.err


SEQUENCES = {
    "A100": [
        ("A100-1-5C", {"A100-1-5C": 7}, {"1g.5gb": 7}),
        ("A100-2-10C", {"A100-2-10C": 3}, {"2g.10gb": 3}),
        ("A100-40C", {"A100-40C": 1}, None),
    ],
    "H200": [
        ("H200-1-18C", {"H200-1-18C": 7}, {"1g.18gb": 7}),
        ("H200-2-35C", {"H200-2-35C": 3}, {"2g.35gb": 3}),
        ("H200-70C", {"H200-70C": 2}, None),
        ("H200-1-18C", {"H200-1-18C": 7}, {"1g.18gb": 7}),
    ],
    "H100XM": [
        ("H100XM-1-10C", {"H100XM-1-10C": 7}, {"1g.10gb": 7}),
        ("H100XM-40C", {"H100XM-40C": 2}, None),
        ("H100XM-2-20C", {"H100XM-2-20C": 3}, {"2g.20gb": 3}),
    ],
}
# The host behaviours that are not known for sure, both ways: "auto" = a mode change waits for a reset
# on Ampere only, MIG mode cannot change while VFs are on; "flipped" = the other way round everywhere.
FLIPPED = {"mig_off_with_vfs": "allow", "mig_on_with_vfs": "allow", "reset_with_vgpus": "destroy"}


@pytest.mark.parametrize("gpu", ["A100", "H100XM", "H200"])
@pytest.mark.parametrize("vendor_vfio", [False, True], ids=["mdev", "vendor-vfio"])
@pytest.mark.parametrize("flipped", [False, True], ids=["auto", "flipped"])
def test_mig_sequence_on_two_gpus(cli, workdir, gpu, vendor_vfio, flipped) -> None:
    root = workdir / "host"
    options = {}
    if flipped:
        options = {**FLIPPED, "mig_reset": "immediate" if gpu == "A100" else "required"}
    create_host(root, [gpu, gpu], vendor_vfio=vendor_vfio, options=options)
    for name, vgpus, profiles in SEQUENCES[gpu]:
        step(cli, root, name)
        assert layouts(root) == [vgpus, vgpus], name
        assert mig_modes(root) == [profiles is not None] * 2, name
        assert instances(root) == [profiles or {}] * 2, name


@pytest.mark.parametrize("named", [True, False], ids=["driver-root", "found-in-run-nvidia-driver"])
def test_mig_step_runs_sriov_manage_from_the_driver_root(cli, workdir, named) -> None:
    # GPU Operator layout: sriov-manage exists only under the containerised driver's root, which is
    # looked in when named, and third (after the host root) as the host's /run/nvidia/driver when not.
    root = workdir / "host"
    create_host(root, ["H200"], vendor_vfio=True, driver_root="run/nvidia/driver")
    driver = str(root / "run/nvidia/driver")
    args = ("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "H200-1-18C")
    result = cli(*args, *(["--driver-root", driver] if named else []))
    assert result.code == 0, result.err
    assert layouts(root) == [{"H200-1-18C": 7}] and instances(root) == [{"1g.18gb": 7}]


def test_mig_step_without_the_drivers_programs_writes_nothing(cli, workdir) -> None:
    # A driver root nowhere looked in (a custom driverInstallDir, not named): the driver's programs are
    # needed before the first write (nvidia-smi reads the MIG state).
    root = workdir / "host"
    create_host(root, ["H200"], vendor_vfio=True, driver_root="opt/nvidia/driver")
    missing = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "H200-1-18C")
    assert missing.code == 1 and "nvidia-smi not found" in missing.err and "--driver-root" in missing.err
    assert write_log(root) == []


def test_mixed_entries_across_gpus(cli, workdir) -> None:
    root = workdir / "host"
    create_host(root, ["A100", "A100"])
    step(cli, root, "A100-mixed")
    assert layouts(root) == [{"A100-3-20C": 1, "A100-2-10C": 1, "A100-1-5CME": 1}, {"A100-20C": 2}]
    assert mig_modes(root) == [True, False]
    assert instances(root) == [{"3g.20gb": 1, "2g.10gb": 1, "1g.5gb+me": 1}, {}]


def _start(cli, workdir: Path, gpu: str, name: str) -> Path:
    root = workdir / "host"
    create_host(root, [gpu, gpu])
    step(cli, root, name)
    return root


@pytest.mark.parametrize(
    ("gpu", "start", "target"),
    [
        ("A100", "A100-1-5C", "A100-2-10C"),
        ("A100", "A100-40C", "A100-1-5C"),
        ("H100XM", "H100XM-40C", "H100XM-1-10C"),
        ("H200", "H200-70C", "H200-1-18C"),
        ("H200", "H200-1-18C", "H200-2-35C"),
    ],
)
def test_failing_mig_parted_leaves_the_vgpus_as_they_were(cli, workdir, gpu, start, target) -> None:
    """mig-parted apply fails after its mode step (a failing pre-apply-config hook, the real binary's
    own error path): the step puts MIG mode, VFs, instances and the vGPUs back."""
    root = _start(cli, workdir, gpu, start)
    before, gis, modes = snapshot(root), instances(root), mig_modes(root)
    arm(cli, root, "--mig-parted", "apply")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", target)
    assert result.code == 1
    assert "nvidia-mig-parted apply failed" in result.err and "pre-apply-config hook" in result.err
    assert "were put back as they were" in result.err and "Traceback" not in result.err
    # The same vGPUs (same UUIDs on mdev, same VFs on vendor VFIO), the same MIG state.
    assert snapshot(root) == before
    assert (instances(root), mig_modes(root)) == (gis, modes)
    assert cli("assert", "--sim", str(root), "-f", str(CONFIG), "-c", start).code == 0
    arm(cli, root)
    step(cli, root, target)


@pytest.mark.parametrize(
    ("gpu", "start", "target"),
    [
        ("A100", "A100-2-10C", "A100-40C"),
        ("A100", "A100-40C", "A100-1-5C"),
        ("H200", "H200-70C", "H200-2-35C"),
    ],
)
def test_mode_change_waiting_for_a_reset_is_reported(cli, workdir, gpu, start, target) -> None:
    root = workdir / "host"
    create_host(root, [gpu, gpu], options={"mig_reset": "required"})
    step(cli, root, start)
    before, modes = snapshot(root), mig_modes(root)
    arm(cli, root, "--mig-parted", "reset")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", target)
    assert result.code == 1
    assert "the MIG mode change needs a GPU reset, which could not be done" in result.err
    assert "error resetting all GPUs" in result.err  # mig-parted's own output is shown
    assert snapshot(root) == before and mig_modes(root) == modes
    # The pending mode the failed change left was set back: a later reset or reboot changes nothing.
    assert [g.mig_pending for g in SimState.load(root).gpus] == [None, None]
    assert "Traceback" not in result.err
    arm(cli, root)
    step(cli, root, target)


def test_in_use_vgpu_blocks_a_mig_change_before_any_write(cli, workdir) -> None:
    root = _start(cli, workdir, "A100", "A100-1-5C")
    uuid = snapshot(root)[0][2]
    held = cli("sim", "hold", str(root), uuid)
    assert held.code == 0
    logged, gis = len(write_log(root)), instances(root)
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C")
    assert result.code == 1
    assert f"{uuid} is in use by" in result.err and "MIG layout changes" in result.err
    assert len(write_log(root)) == logged and instances(root) == gis
    # --force goes ahead; the kernel makes the removal of a held mdev wait until the VM lets go
    # (vfio_unregister_group_dev, issue 8.3), so the apply finishes once the fake VM exits.
    import re
    import shutil
    import threading

    pid = int(re.search(r"pid (\d+)", held.out)[1])
    timer = threading.Timer(0.5, lambda: shutil.rmtree(root / "proc" / str(pid)))
    timer.start()
    forced = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C", "--force")
    timer.join()
    assert forced.code == 0, forced.err
    assert uuid not in {d[2] for d in snapshot(root)}


def test_skip_mig_and_missing_mig_parted(cli, workdir) -> None:
    root = workdir / "host"
    create_host(root, ["A100"])
    skipped = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C", "--skip-mig")
    assert skipped.code == 1
    assert "A100-1-5C cannot be created now" in skipped.err and "MIG mode" in skipped.err
    assert write_log(root) == [] and mig_modes(root) == [False]
    missing = cli(
        "apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C", "--mig-parted", "/opt/none/mig"
    )
    assert (
        missing.code == 1
        and "whose GPU instances nvidia-mig-parted makes" in missing.err
        and "/opt/none/mig (from '--mig-parted') in the host root" in missing.err
        and "not found" in missing.err
    )
    assert write_log(root) == []
    # A time-sliced config does not need it: MIG mode is left alone.
    plain = cli(
        "apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C", "--mig-parted", "/opt/none/mig"
    )
    assert plain.code == 0, plain.err
    assert layouts(root) == [{"A100-40C": 1}]


def test_t4_host_never_runs_mig_parted(cli, workdir) -> None:
    root = workdir / "host"
    create_host(root, ["T4"])
    result = cli(
        "apply",
        "--sim",
        str(root),
        "-f",
        str(REPO / "examples/config-t4.yaml"),
        "-c",
        "T4-small",
        "--mig-parted",
        "/opt/none/mig",
    )
    assert result.code == 0, result.err


def test_mig_parted_that_cannot_load_nvml_changes_nothing(cli, workdir) -> None:
    """mig-parted's NVML cannot be initialised (a driver not ready): export fails, so apply stops
    before its first write with mig-parted's own message — never reads it as "the MIG layout differs"."""
    root = _start(cli, workdir, "A100", "A100-2-10C")
    before, gis, logged = snapshot(root), instances(root), len(write_log(root))
    arm(cli, root, "--mig-parted", "nvml")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C")
    assert result.code == 1
    assert "nvidia-mig-parted export failed" in result.err
    assert "Error initializing NVML" in result.err
    assert (snapshot(root), instances(root), len(write_log(root))) == (before, gis, logged)
    # Nor does a config that already holds need it.
    assert cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C").code == 0
    arm(cli, root)
    step(cli, root, "A100-40C")


@pytest.mark.parametrize("after_reboot", ["keep", "lose"])
@pytest.mark.parametrize("gpu", ["A100", "H100XM", "H200"])
def test_apply_after_a_reboot_rebuilds_mig_and_vgpus(cli, workdir, gpu, after_reboot) -> None:
    """VFs, vGPUs and GPU instances do not survive a reboot (MIG mode may); apply at boot rebuilds them."""
    root = workdir / "host"
    create_host(root, [gpu], options={"mig_after_reboot": after_reboot})
    name = {"H200": "H200-1-18C", "H100XM": "H100XM-1-10C"}.get(gpu, "A100-1-5C")
    step(cli, root, name)
    wanted = layouts(root)
    rebooted = cli("sim", "reboot", str(root))
    assert rebooted.code == 0 and "GPU instance(s)" in rebooted.out
    assert layouts(root) == [{}] and instances(root) == [{}]
    assert mig_modes(root) == [after_reboot == "keep"]
    assert SimState.load(root).gpus[0].vfs == []
    assert cli("assert", "--sim", str(root), "-f", str(CONFIG), "-c", name).code == 1
    step(cli, root, name)
    assert layouts(root) == wanted


def test_reboot_completes_a_pending_mode_change(cli, workdir) -> None:
    """A mode change left pending (by nvidia-smi -mig here, as an earlier tool would) takes effect at a
    reboot; apply afterwards builds the instances and vGPUs."""
    root = workdir / "host"
    create_host(root, ["A100", "A100"], options={"mig_on_with_vfs": "allow"})
    step(cli, root, "A100-40C")
    assert cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C").code == 0
    host = SimHostRoot(root)
    for gpu in SimState.load(root).gpus:
        assert host.run(["nvidia-smi", "-i", gpu.address, "-mig", "1"]).returncode == 0
    assert mig_modes(root) == [False, False]
    assert [g.mig_pending for g in SimState.load(root).gpus] == [True, True]
    assert cli("sim", "reboot", str(root)).code == 0
    assert mig_modes(root) == [True, True]
    step(cli, root, "A100-1-5C")


def test_a_pending_mode_left_behind_is_set_back(cli, workdir) -> None:
    """A GPU whose MIG mode waits to flip at the next reset (left by another tool) would lose its
    vGPUs then: a run that changes anything sets the pending mode back to the current one."""
    root = workdir / "host"
    create_host(root, ["A100", "A100"], options={"mig_on_with_vfs": "allow"})
    step(cli, root, "A100-40C")
    smi = SimHostRoot(root).run(["nvidia-smi", "-i", SimState.load(root).gpus[0].address, "-mig", "1"])
    assert smi.returncode == 0 and "pending enable" in smi.stdout
    assert [g.mig_pending for g in SimState.load(root).gpus] == [True, None]
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C")
    assert result.code == 0, result.err
    assert layouts(root) == [{"A100-2-10C": 3}] * 2
    assert [g.mig_pending for g in SimState.load(root).gpus] == [None, None]


def test_plan_shows_the_mig_step_and_writes_nothing(cli, workdir) -> None:
    import json

    root = workdir / "host"
    create_host(root, ["A100", "T4"])
    shown = cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C")
    assert shown.code == 0, shown.err
    assert (
        "mig      MIG mode on, GPU instances 7 x 1g.5gb" in shown.out
        and "create   7 x A100-1-5C" in shown.out
    )
    assert write_log(root) == [] and mig_modes(root) == [False, False]
    step(cli, root, "A100-1-5C", whole_host=False)
    report = json.loads(cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C", "--json").out)
    gpu0 = report["gpus"][0]
    assert gpu0["status"] == "change"
    assert gpu0["mig"] == {
        "enabled": False,
        "instances": {},
        "current": {"enabled": True, "instances": {"1g.5gb": 7}},
        "mode_change": True,
    }
    assert [d["type"] for d in gpu0["remove"]] == ["A100-1-5C"] * 7
    assert gpu0["create"] == [{"type": "A100-40C", "count": 1}]
    dry = cli("apply", "--dry-run", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C")
    assert dry.code == 0 and "GPU instances 3 x 2g.10gb" in dry.out and "now MIG on, 7 x 1g.5gb" in dry.out
    assert layouts(root) == [{"A100-1-5C": 7}, {}]
    # Applied: the plan has nothing to do, and no MIG line.
    again = cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C")
    assert again.code == 0 and "mig " not in again.out and "is applied" in again.out


BAD_MIXES = """\
version: v1
vgpu-configs:
  mig-on-a-t4:
    - devices: all
      vgpu-devices: {"A100-1-5C": 7}
  bad-other-gpu:
    - devices: [0]
      vgpu-devices: {"A100-1-5C": 7}
    - devices: [1]
      vgpu-devices: {"T4-1Q": 17}
  too-many:
    - devices: [0]
      vgpu-devices: {"A100-1-5C": 8}
"""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mig-on-a-t4", "the GPU has no MIG"),
        ("bad-other-gpu", "17 x T4-1Q requested"),
        ("too-many", "8 x A100-1-5C requested, but the GPU holds at most 7"),
    ],
)
def test_mig_step_checks_everything_before_its_first_write(cli, workdir, name, message) -> None:
    root = workdir / "host"
    create_host(root, ["A100", "T4"])
    step(cli, root, "A100-40C")
    before, gis, logged = snapshot(root), instances(root), len(write_log(root))
    config = workdir / "bad.yaml"
    config.write_text(BAD_MIXES)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", name)
    assert result.code == 1 and message in result.err, result.err
    assert snapshot(root) == before and instances(root) == gis and mig_modes(root) == [False, False]
    assert len(write_log(root)) == logged


IMPOSSIBLE = """\
version: v1
vgpu-configs:
  sliced:
    - devices: all
      vgpu-devices: {"H100-20C": 4}
  mixed:
    - devices: all
      vgpu-devices: {"H100-3-40C": 1, "H100-2-20C": 1, "H100-1-10C": 2}
  does-not-fit:
    - devices: all
      vgpu-devices: {"H100-2-20C": 3, "H100-1-10C": 2}
  media:
    - devices: all
      vgpu-devices: {"H100-1-10CME": 1, "H100-1-10C": 2}
"""


@pytest.mark.parametrize("start", [None, "sliced", "mixed"])
def test_instances_that_cannot_be_made_put_everything_back(cli, workdir, start) -> None:
    """Instances that need more compute slices than the GPU has are refused before any write. A profile
    the catalog lists but this GPU's driver does not offer (+me profiles came with later drivers):
    mig-parted reports success and makes nothing (as the real one does, smoke D8); the check after it
    finds that out, and the step puts MIG mode, VFs, instances and vGPUs back."""
    root = workdir / "host"
    create_host(root, ["H100"])
    config = workdir / "h100.yaml"
    config.write_text(IMPOSSIBLE)
    if start:
        result = cli("apply", "--sim", str(root), "-f", str(config), "-c", start)
        assert result.code == 0, result.err
    before, gis, modes = snapshot(root), instances(root), mig_modes(root)
    vfs, logged = SimState.load(root).gpus[0].vfs, len(write_log(root))
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "does-not-fit")
    assert result.code == 1 and "need 8 compute slices, but the NVIDIA H100 PCIe 80GB has 7" in result.err
    assert len(write_log(root)) == logged
    state = SimState.load(root)
    del state.gpus[0].mig_profiles["1g.10gb+me"]
    state.save(root)
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "media")
    assert result.code == 1, result.err
    assert "nvidia-mig-parted reported success, but GPU 0" in result.err
    assert "has MIG on, no GPU instances, not MIG on, 2 x 1g.10gb, 1 x 1g.10gb+me" in result.err
    assert "could not be put back" not in result.err and "NOT all" not in result.err
    assert snapshot(root) == before
    assert (instances(root), mig_modes(root), SimState.load(root).gpus[0].vfs) == (gis, modes, vfs)
