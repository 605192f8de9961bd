"""Crash recovery: an apply killed for real (SIGKILL) at any write is put right by the next apply.

For multi-GPU plans over both frameworks, the plan's writes W are counted once; then for every k in
1..W a fresh copy of the start state is armed with ``sim fault --kill-at-write k`` and the installed
entry point is run as a separate process, which the simulator SIGKILLs right before its k-th write.
Afterwards ``assert`` reports the interrupted apply (exit 1), ``list`` warns about it, and once the
fault is cleared the next apply converges to the target (exit 0): the journal is gone and every
device the plan meant to keep still has its UUID (mdev) or VF (vendor VFIO). Kills during a rollback
and during the recovery itself are covered too.

Only the killed runs are separate processes; everything else runs the CLI in-process.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests import simstate
from tests.conftest import writes
from tests.simstate import Scenario, arm, layouts, snapshot
from vgpu_dm.sim.layout import SimState

JOURNAL = "run/nvidia-vgpu-dm/journal.json"


# -- helpers ---------------------------------------------------------------------------------------


SCENARIOS = [
    # Grow one T4 (keeps 2 mdevs), rebuild the other, grow the L40S (keeps 2 VFs).
    Scenario(
        "keep-and-change",
        ("T4", "T4", "L40S"),
        start=[{"T4-4Q": 2}, {"T4-8Q": 2}, {"L40S-12Q": 2}],
        target=[{"T4-4Q": 4}, {"T4-4Q": 3}, {"L40S-12Q": 4}],
    ),
    # mdev on the PF, mdev on VFs (A10), vendor VFIO switching to mixed-size mode midway.
    Scenario(
        "three-frameworks",
        ("T4", "A10", "L40S"),
        start=[{"T4-16Q": 1}, {"A10-6Q": 2}, {"L40S-12Q": 2}],
        target=[{"T4-8Q": 2}, {"A10-4Q": 3}, {"L40S-12Q": 1, "L40S-6Q": 2}],
    ),
]


class Bench(simstate.Bench):
    """The shared template host, plus the devices a minimal plan keeps."""

    def __init__(self, cli, workdir: Path, scenario: Scenario):
        super().__init__(cli, workdir, scenario)
        addresses = [g.address for g in SimState.load(self.template).gpus]
        # Devices of a type whose count does not shrink are kept by a minimal plan.
        self.kept = [
            d
            for d in self.before
            if scenario.target[addresses.index(d[0])].get(d[1], 0)
            >= scenario.start[addresses.index(d[0])][d[1]]
        ]

    def baseline(self) -> int:
        """W: the number of control-file writes of start → target, from one run without faults."""
        count = len(super().baseline())
        assert set(self.kept) <= set(snapshot(self.workdir / f"run{self._runs}"))
        shutil.rmtree(self.workdir / f"run{self._runs}")
        return count


def killed(run_cli, bench: Bench, root: Path, name: str = "target") -> None:
    """Run apply as a real process that the armed fault SIGKILLs."""
    result = run_cli(*bench.args(root, name))
    assert result.code == -signal.SIGKILL, (result.code, result.err)
    assert (root / JOURNAL).is_file(), "a killed apply leaves its journal behind"


def reports_interruption(cli, bench: Bench, root: Path) -> None:
    """``assert`` fails because of the journal and ``list`` warns about it."""
    check = cli("assert", "--sim", str(root), "-f", str(bench.config), "-c", "target")
    assert check.code == 1, check.err
    assert "interrupted apply (pid " in check.err and "'target'" in check.err, check.err
    listing = cli("list", "--sim", str(root))
    assert listing.code == 0, listing.err
    assert "warning: found an interrupted apply (pid " in listing.err, listing.err


def converges(cli, bench: Bench, root: Path) -> None:
    """With faults cleared, apply recovers, reaches the target and keeps what the plan keeps."""
    arm(cli, root)
    result = bench.apply(root, "target")
    assert "found an interrupted apply" in result.err, result.err
    assert "successfully applied" in result.err, result.err
    assert not (root / JOURNAL).exists()
    assert layouts(root) == bench.scenario.target
    now = set(snapshot(root))
    lost = [d for d in bench.kept if d not in now]
    assert not lost, f"devices the plan keeps were lost: {lost}"
    check = cli("assert", "--sim", str(root), "-f", str(bench.config), "-c", "target")
    assert check.code == 0, check.err


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_kill_at_every_write_then_apply_converges(cli, run_cli, workdir, scenario):
    bench = Bench(cli, workdir, scenario)
    total = bench.baseline()
    recovered = 0
    for k in range(1, total + 1):
        root = bench.fresh()
        arm(cli, root, "--kill-at-write", str(k))
        killed(run_cli, bench, root)
        assert len(writes(root)) == k - 1, f"killed before write {k}"
        reports_interruption(cli, bench, root)
        converges(cli, bench, root)
        recovered += 1
        shutil.rmtree(root)
    print(f"\n[crash-recovery] {scenario.name}: recovered from {recovered}/{total} SIGKILLs (one per write)")
    assert recovered == total


def test_kill_during_rollback_then_apply_converges(cli, run_cli, workdir):
    """A write fails at k, and the process is killed at the first write of its rollback."""
    bench = Bench(cli, workdir, SCENARIOS[0])
    total = bench.baseline()
    recovered = 0
    for k in range(2, total + 1):  # from write 2 on, a rollback has something to undo
        root = bench.fresh()
        arm(cli, root, "--fail-write", str(k), "--errno", "EIO", "--kill-at-write", str(k + 1))
        killed(run_cli, bench, root)
        assert len(writes(root)) == k - 1
        reports_interruption(cli, bench, root)
        converges(cli, bench, root)
        recovered += 1
        shutil.rmtree(root)
    print(f"\n[crash-recovery] killed mid-rollback: recovered {recovered}/{total - 1}")
    assert recovered == total - 1


def test_kill_during_recovery_then_apply_converges(cli, run_cli, workdir):
    """The apply that recovers from a crash is itself killed at each of its recovery writes."""
    bench = Bench(cli, workdir, SCENARIOS[0])
    total = bench.baseline()
    k = total // 2 + 1  # halfway: some devices removed, some created

    # How many writes recovery makes: recover, then apply "start", which is then a no-op.
    probe = bench.fresh()
    arm(cli, probe, "--kill-at-write", str(k))
    killed(run_cli, bench, probe)
    arm(cli, probe)
    bench.apply(probe, "start")
    assert snapshot(probe) == bench.before, "recovery restores the exact previous devices"
    recovery_writes = len(writes(probe)) - (k - 1)
    assert recovery_writes > 0

    recovered = 0
    for m in range(1, recovery_writes + 1):
        root = bench.fresh()
        arm(cli, root, "--kill-at-write", str(k))
        killed(run_cli, bench, root)
        arm(cli, root, "--kill-at-write", str(m))
        killed(run_cli, bench, root)
        reports_interruption(cli, bench, root)
        converges(cli, bench, root)
        recovered += 1
        shutil.rmtree(root)
    print(f"\n[crash-recovery] killed mid-recovery: recovered {recovered}/{recovery_writes}")
    assert recovered == recovery_writes
