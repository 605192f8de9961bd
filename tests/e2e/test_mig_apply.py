"""apply with MIG-backed types on simulated hosts: nvidia-mig-parted (simulated) prepares MIG mode and
GPU instances first; failures leave the vGPUs as they were."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.simstate import arm, layouts, snapshot
from vgpu_dm.sim import mig_parted
from vgpu_dm.sim.host import write_log
from vgpu_dm.sim.layout import SimState, create_host

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "config-mig.yaml"


def instances(root: Path) -> list[dict[str, int]]:
    return [dict(Counter(gi["profile"] for gi in g.gpu_instances)) for g in SimState.load(root).gpus]


def mig_modes(root: Path) -> list[bool]:
    return [g.mig_mode for g in SimState.load(root).gpus]


def step(cli, root: Path, name: str) -> None:
    """apply, then assert with nvidia-vgpu-dm and with (simulated) nvidia-mig-parted."""
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", name)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    held = cli("assert", "--sim", str(root), "-f", str(CONFIG), "-c", name)
    assert held.code == 0, held.err
    translated = cli("mig-config", "-f", str(CONFIG), "-c", name)
    assert translated.code == 0
    proc = mig_parted.run(root, ["nvidia-mig-parted", "assert", "-f", "-"], translated.out, env={})
    assert proc.returncode == 0, proc.stderr
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
}


@pytest.mark.parametrize("gpu", ["A100", "H200"])
@pytest.mark.parametrize("vendor_vfio", [False, True], ids=["mdev", "vendor-vfio"])
@pytest.mark.parametrize(
    "options",
    [{}, {"mig_reset": "immediate", "mig_off_with_vfs": "allow"}],
    ids=["reset-required", "immediate-and-off-with-vfs"],
)
def test_mig_sequence_on_two_gpus(cli, workdir, gpu, vendor_vfio, options) -> None:
    root = workdir / "host"
    create_host(root, [gpu, gpu], vendor_vfio=vendor_vfio, options=options)
    for name, vgpus, profiles in SEQUENCES[gpu]:
        step(cli, root, name)
        assert layouts(root) == [vgpus, vgpus], name
        assert mig_modes(root) == [profiles is not None] * 2, name
        assert instances(root) == [profiles or {}] * 2, name


def test_mig_step_runs_sriov_manage_from_the_driver_root(cli, workdir) -> None:
    # GPU Operator layout: sriov-manage exists only under the containerised driver's root.
    root = workdir / "host"
    create_host(root, ["H200"], vendor_vfio=True, driver_root="run/nvidia/driver")
    driver = str(root / "run/nvidia/driver")
    args = ("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "H200-1-18C")
    missing = cli(*args)
    assert missing.code == 1 and "sriov-manage" in missing.err and "--driver-root" in missing.err
    result = cli(*args, "--driver-root", driver)
    assert result.code == 0, result.err
    assert layouts(root) == [{"H200-1-18C": 7}] and instances(root) == [{"1g.18gb": 7}]


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
        ("H200", "H200-70C", "H200-1-18C"),
        ("H200", "H200-1-18C", "H200-2-35C"),
    ],
)
def test_failing_mig_parted_leaves_the_vgpus_as_they_were(cli, workdir, gpu, start, target) -> None:
    root = _start(cli, workdir, gpu, start)
    before, gis, modes = snapshot(root), instances(root), mig_modes(root)
    arm(cli, root, "--mig-parted", "fail")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", target)
    assert result.code == 1
    assert "nvidia-mig-parted apply" in result.err and "injected fault" in result.err
    assert "were put back as they were" in result.err
    # The same vGPUs (same UUIDs on mdev, same VFs on vendor VFIO), the same MIG state.
    assert snapshot(root) == before
    assert (instances(root), mig_modes(root)) == (gis, modes)
    assert cli("assert", "--sim", str(root), "-f", str(CONFIG), "-c", start).code == 0
    arm(cli, root)
    step(cli, root, target)


@pytest.mark.parametrize(
    ("gpu", "start", "target"), [("A100", "A100-2-10C", "A100-40C"), ("H200", "H200-70C", "H200-2-35C")]
)
def test_mode_change_waiting_for_a_reset_is_reported(cli, workdir, gpu, start, target) -> None:
    root = _start(cli, workdir, gpu, start)
    before = snapshot(root)
    arm(cli, root, "--mig-parted", "reset")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", target)
    assert result.code == 1
    assert "the MIG mode change needs a GPU reset or a reboot" in result.err
    assert "error resetting all GPUs" in result.err  # mig-parted's own output is shown
    assert snapshot(root) == before
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
        and "need nvidia-mig-parted" in missing.err
        and "/opt/none/mig not found" in missing.err
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


def test_broken_mig_parted_after_vfs_were_disabled_is_reported(cli, workdir) -> None:
    """Leaving MIG mode needs the VFs off first, and disabling them destroys the GPU instances; when
    mig-parted then fails outright it cannot rebuild them either, so the MIG-backed vGPUs cannot come
    back. The run says so, exits 1, and the next apply converges."""
    root = _start(cli, workdir, "A100", "A100-2-10C")
    arm(cli, root, "--mig-parted", "fail")
    result = cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C")
    assert result.code == 1
    assert "injected fault" in result.err
    assert "the previous MIG layout could not be restored" in result.err
    assert "NOT all vGPUs restored" in result.err and "run apply again" in result.err
    arm(cli, root)
    step(cli, root, "A100-40C")
    step(cli, root, "A100-2-10C")


@pytest.mark.parametrize("after_reboot", ["keep", "lose"])
@pytest.mark.parametrize("gpu", ["A100", "H200"])
def test_apply_after_a_reboot_rebuilds_mig_and_vgpus(cli, workdir, gpu, after_reboot) -> None:
    """VFs, vGPUs and GPU instances do not survive a reboot (MIG mode may); apply at boot rebuilds them."""
    root = workdir / "host"
    create_host(root, [gpu], options={"mig_after_reboot": after_reboot})
    name = f"{gpu}-1-18C" if gpu == "H200" else "A100-1-5C"
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
    root = _start(cli, workdir, "A100", "A100-40C")
    arm(cli, root, "--mig-parted", "reset")
    assert cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C").code == 1
    arm(cli, root)
    assert mig_modes(root) == [False, False]
    assert cli("sim", "reboot", str(root)).code == 0
    assert mig_modes(root) == [True, True]
    step(cli, root, "A100-1-5C")


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
    step(cli, root, "A100-1-5C")
    report = json.loads(cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-40C", "--json").out)
    gpu0 = report["gpus"][0]
    assert gpu0["status"] == "change" and gpu0["mig"] == {"enabled": False, "instances": {}}
    assert [d["type"] for d in gpu0["remove"]] == ["A100-1-5C"] * 7
    assert gpu0["create"] == [{"type": "A100-40C", "count": 1}]
    dry = cli("apply", "--dry-run", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-2-10C")
    assert dry.code == 0 and "GPU instances 3 x 2g.10gb" in dry.out
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
        ("mig-on-a-t4", "has no MIG"),
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
"""


@pytest.mark.parametrize("start", [None, "sliced", "mixed"])
def test_instances_that_do_not_fit_put_everything_back(cli, workdir, start) -> None:
    """Each count is within the catalog's maximum, but together they do not fit the GPU: mig-parted
    fails after MIG mode and the VFs were changed, and the step undoes both."""
    root = workdir / "host"
    create_host(root, ["H100"])
    config = workdir / "h100.yaml"
    config.write_text(IMPOSSIBLE)
    if start:
        result = cli("apply", "--sim", str(root), "-f", str(config), "-c", start)
        assert result.code == 0, result.err
    before, gis, modes = snapshot(root), instances(root), mig_modes(root)
    vfs = SimState.load(root).gpus[0].vfs
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "does-not-fit")
    assert result.code == 1 and "Insufficient Resources" in result.err, result.err
    assert "could not be restored" not in result.err and "NOT all" not in result.err
    assert snapshot(root) == before
    assert (instances(root), mig_modes(root), SimState.load(root).gpus[0].vfs) == (gis, modes, vfs)
