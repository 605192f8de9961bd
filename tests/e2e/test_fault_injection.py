"""Fault injection: a failed control-file write never loses a vGPU.

For multi-GPU plans over both frameworks (mdev on the PF, mdev on VFs, vendor-specific VFIO), the plan
is first run once without faults to count its writes W. Then, for every position k in 1..W, the host
is reset to the starting state, ``sim fault --fail-write k`` is armed (EIO, EBUSY and ENOSPC in turn)
and apply runs through the CLI in-process: it must exit 1, name the failed step and its errno, and
leave the host exactly as it was (same GPUs, types, UUIDs and parents). With ``--keep-going`` only the
failed GPU is rolled back and the others keep their new devices. EIO on reads ends with a clear
message, no traceback and zero writes.

The host state is read with the simulator's own view of its tree (not the tool's inventory), so the
oracle is independent of the code under test.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import Bench, Device, Scenario, arm, config_text, layouts, snapshot
from vgpu_dm.sim.layout import SimState, create_host

# -- helpers ---------------------------------------------------------------------------------------


def gpu_of_write(line: str, root: Path, before: list[Device]) -> str:
    """The PF address a logged control-file write (``path<TAB>data``) was aimed at."""
    path, _ = line.split("\t")
    parts = path.split("/")
    if path.startswith("sys/bus/mdev/devices/"):
        return next(d[0] for d in before if d[2] == parts[4])
    gpu = SimState.load(root).gpu_of(parts[4])
    assert gpu is not None, line
    return gpu.address


def step_words(line: str) -> tuple[str, str]:
    """("remove"|"create", the device named in the step for removals or "") for a logged write."""
    path, data = line.split("\t")
    if path.endswith("/remove"):
        return "remove", path.split("/")[4]
    if path.endswith("nvidia/current_vgpu_type"):
        return ("remove", path.split("/")[4]) if data == "0" else ("create", "")
    assert path.endswith("/create"), line
    return "create", ""


SCENARIOS = [
    # Every GPU removes all its devices and creates others: mdev (PF) x 2 and vendor VFIO.
    Scenario(
        "swap",
        ("T4", "T4", "L40S"),
        start=[{"T4-4Q": 4}, {"T4-8Q": 2}, {"L40S-12Q": 4}],
        target=[{"T4-8Q": 2}, {"T4-4Q": 4}, {"L40S-16Q": 3}],
    ),
    # mdev on the PF, mdev on VFs (A10) and vendor VFIO switching to mixed-size mode midway.
    Scenario(
        "three-frameworks",
        ("T4", "A10", "L40S"),
        start=[{"T4-16Q": 1}, {"A10-6Q": 2}, {"L40S-12Q": 2}],
        target=[{"T4-8Q": 2}, {"A10-4Q": 3}, {"L40S-12Q": 1, "L40S-6Q": 2}],
    ),
]
ERRNOS = (errno.EIO, errno.EBUSY, errno.ENOSPC)


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_failed_write_rolls_the_host_back_exactly(cli, workdir, scenario):
    bench = Bench(cli, workdir, scenario)
    log = bench.baseline()
    survived = 0
    for k, line in enumerate(log, start=1):
        code = ERRNOS[k % len(ERRNOS)]
        root = bench.fresh()
        arm(cli, root, "--fail-write", str(k), "--errno", errno.errorcode[code])
        result = bench.apply(root, "target", code=1)

        verb, device = step_words(line)
        failed = [x for x in result.err.splitlines() if "step failed: " in x]
        assert len(failed) == 1, result.err
        assert f"step failed: {verb} " in failed[0], (k, line, result.err)
        assert device in failed[0], (k, line, result.err)
        assert f"{os.strerror(code)}" in failed[0] and f"errno {code}" in failed[0], result.err
        # The failed GPU is "rolled back" if it had changed already, else "unchanged".
        gpu = gpu_of_write(line, root, bench.before)
        touched = any(gpu_of_write(x, root, bench.before) == gpu for x in log[: k - 1])
        state = "rolled back to its previous devices" if touched else "unchanged"
        assert f"({gpu}): {state}" in result.err, (k, line, result.err)
        assert "NOT fully restored" not in result.err, result.err

        assert snapshot(root) == bench.before, f"write {k} ({line}) changed the host"
        assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
        # The k-1 writes before the fault, then exactly one undoing write for each of them.
        assert len(writes(root)) == 2 * (k - 1), writes(root)
        check = cli("assert", "--sim", str(root), "-f", str(bench.config), "-c", "start")
        assert check.code == 0, check.err
        survived += 1
    print(f"\n[fault-injection] {scenario.name}: survived {survived}/{len(log)} injected write faults")
    assert survived == len(log)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_keep_going_rolls_back_only_the_failed_gpu(cli, workdir, scenario):
    bench = Bench(cli, workdir, scenario)
    log = bench.baseline()
    addresses = [g.address for g in SimState.load(bench.template).gpus]
    survived = 0
    for k, line in enumerate(log, start=1):
        code = ERRNOS[(k + 1) % len(ERRNOS)]
        root = bench.fresh()
        failed_gpu = gpu_of_write(line, root, bench.before)
        arm(cli, root, "--fail-write", str(k), "--errno", errno.errorcode[code])
        result = bench.apply(root, "target", "--keep-going", code=1)

        assert f"step failed: {step_words(line)[0]} " in result.err, result.err
        assert os.strerror(code) in result.err, result.err
        assert "--keep-going: the other GPUs kept their new devices" in result.err, result.err
        now = snapshot(root)
        now_layout = layouts(root)
        for index, address in enumerate(addresses):
            mine = [d for d in now if d[0] == address]
            if address == failed_gpu:
                assert mine == [d for d in bench.before if d[0] == address], (k, line)
            else:
                assert now_layout[index] == scenario.target[index], (k, line, address)
        assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
        # The other GPUs make all their writes; the failed one undoes each write it had made.
        on_failed = [gpu_of_write(x, root, bench.before) == failed_gpu for x in log]
        expected = on_failed.count(False) + 2 * sum(on_failed[: k - 1])
        assert len(writes(root)) == expected, (k, line)
        survived += 1
    print(f"\n[fault-injection] {scenario.name} --keep-going: survived {survived}/{len(log)} write faults")
    assert survived == len(log)


@pytest.mark.parametrize(
    "pattern",
    [
        "available_instances",  # mdev capacity, read while planning
        "mdev_supported_types",  # mdev type names and descriptions
        "current_vgpu_type",  # vendor-VFIO: the type set on each VF
        "creatable_vgpu_types",  # vendor-VFIO: what a free VF offers
        "subsystem_device",  # PCI discovery
        "journal.json",  # our own intent journal
    ],
)
def test_eio_on_reads_fails_cleanly_without_writes(cli, workdir, pattern):
    scenario = SCENARIOS[0]
    bench = Bench(cli, workdir, scenario)
    root = bench.fresh()
    arm(cli, root, "--eio-read", pattern)
    result = bench.apply(root, "target", code=1)
    assert "Traceback" not in result.err + result.out
    assert "Input/output error" in result.err, result.err
    assert pattern in result.err, result.err  # names the file that could not be read
    assert writes(root) == []
    assert snapshot(root) == bench.before
    # Once the disk behaves again, the same apply works.
    arm(cli, root)
    bench.apply(root, "target")
    assert layouts(root) == scenario.target


def test_eio_on_a_read_needed_only_mid_apply_still_rolls_back(cli, workdir):
    root = workdir / "full-l40s"
    create_host(root, ["L40S"])
    config = workdir / "full.yaml"
    config.write_text(config_text({"full": [{"L40S-1Q": 32}], "other": [{"L40S-2Q": 24}]}))
    assert cli("apply", "--sim", str(root), "-f", str(config), "-c", "full").code == 0
    before = snapshot(root)
    assert len(before) == 32  # every VF carries a vGPU, so no creatable list is read while planning
    arm(cli, root, "--eio-read", "creatable_vgpu_types")
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", "other")
    assert result.code == 1, result.err
    assert "Input/output error" in result.err and "Traceback" not in result.err
    assert "NOT fully restored" not in result.err, result.err
    assert snapshot(root) == before
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
