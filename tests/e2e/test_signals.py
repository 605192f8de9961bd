"""SIGTERM/SIGINT during apply (how systemd, Kubernetes and Ctrl-C stop it) never leave a half-changed GPU.

The simulator sends the real signal to the tool right before a chosen write (``sim fault
--signal-at-write``), so the signal lands while that write is under way. The tool must finish that one
write, issue no further write of the plan, roll back exactly (one undo write per write made, so the
write log holds 2k lines), clear its journal, report every GPU and exit 128 + the signal number.
A second signal during the rollback is ignored with a message. The same stop is reachable without
signals through ``ApplyOptions.stop`` (the Kubernetes agent's hook).

On the code before this change the entry point died from the signal (exit -15) or printed ``Aborted!``
without rolling back.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import Bench, Scenario, arm, layouts, snapshot
from vgpu_dm.apply import ApplyOptions, apply_config
from vgpu_dm.errors import ApplyInterrupted
from vgpu_dm.host.lock import HostLock
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.spec import load_spec, read_config_source

JOURNAL = "run/nvidia-vgpu-dm/journal.json"
SCENARIO = Scenario(
    "three-frameworks",
    ("T4", "A10", "L40S"),
    start=[{"T4-16Q": 1}, {"A10-6Q": 2}, {"L40S-12Q": 2}],
    target=[{"T4-8Q": 2}, {"A10-4Q": 3}, {"L40S-12Q": 1, "L40S-6Q": 2}],
)


@pytest.fixture
def bench(cli, workdir) -> Bench:
    return Bench(cli, workdir, SCENARIO)


def _paths(log: list[str]) -> list[str]:
    return [line.split("\t")[0] for line in log]  # new mdevs get random UUIDs


def _stopped(result, code: int, bench: Bench, root: Path, k: int, baseline: list[str]) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err and "Aborted!" not in result.err, result.err
    assert "apply interrupted before step:" in result.err, result.err
    log = writes(root)
    assert _paths(log[:k]) == _paths(baseline[:k]), "the write under way when the signal came was made"
    assert len(log) == 2 * k, f"each of the {k} writes undone by one write, nothing else: {log}"
    assert snapshot(root) == bench.before
    assert not (root / JOURNAL).exists()
    for gpu in ("0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0"):
        assert gpu in result.err, f"the report names every GPU: {result.err}"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_apply_rolls_back_and_exits_128_plus_signal(run_cli, bench, signame):
    baseline = bench.baseline()
    code = 128 + getattr(signal, signame)
    for k in sorted({1, len(baseline) // 2, len(baseline) - 1}):
        root = bench.fresh()
        arm(bench.cli, root, "--signal-at-write", str(k), "--signal", signame)
        result = run_cli(*bench.args(root, "target"))
        _stopped(result, code, bench, root, k, baseline)
        assert f"received {signame}" in result.err


def test_a_signal_during_the_last_write_leaves_the_finished_config(run_cli, bench):
    """Nothing is left to stop: the host is in the target state and apply says so."""
    baseline = bench.baseline()
    root = bench.fresh()
    arm(bench.cli, root, "--signal-at-write", str(len(baseline)))
    result = run_cli(*bench.args(root, "target"))
    assert result.code == 0, result.err
    assert "during the last write: the plan is complete" in result.err
    assert layouts(root) == SCENARIO.target
    assert not (root / JOURNAL).exists()


def test_a_second_signal_during_rollback_is_ignored(run_cli, bench):
    baseline = bench.baseline()
    k = len(baseline) // 2
    root = bench.fresh()
    # Write k+1 is the first write of the rollback.
    arm(bench.cli, root, "--signal-at-write", str(k), "--signal-at-write", str(k + 1))
    result = run_cli(*bench.args(root, "target"))
    _stopped(result, 143, bench, root, k, baseline)
    assert "received SIGTERM again: ignored" in result.err, result.err


def test_signal_with_keep_going_rolls_back_every_gpu_of_the_run(run_cli, bench):
    baseline = bench.baseline()
    k = len(baseline) - 1  # the first GPUs are done by then; they are rolled back too
    root = bench.fresh()
    arm(bench.cli, root, "--signal-at-write", str(k))
    result = run_cli(*bench.args(root, "target", "--keep-going"))
    _stopped(result, 143, bench, root, k, baseline)


def test_keep_going_failures_are_not_reported_twice_when_a_signal_follows(run_cli, bench):
    """--keep-going logs a failed GPU's lines in their place; a later stop request must not print
    them a second time in the interruption report (ApplyInterrupted did not say they were logged)."""
    root = bench.fresh()
    # GPU 0's first write fails; write 3 is the second of GPU 1 (GPUs one after another).
    arm(bench.cli, root, "--fail-write", "1", "--signal-at-write", "3")
    result = run_cli(*bench.args(root, "target", "--keep-going"))
    assert result.code == 143, result.err
    failed = [x for x in result.err.splitlines() if "step failed:" in x]
    assert len(failed) == 1, result.err
    assert "apply interrupted before step:" in result.err
    assert snapshot(root) == bench.before


def _entries(bench: Bench, name: str):
    data, source = read_config_source(str(bench.config))
    spec = load_spec(data, source)
    return spec.select(name)[1], spec.source


def test_stop_event_set_by_a_handler_mid_apply(bench):
    """The agent's path: its own handler sets ApplyOptions.stop; apply raises ApplyInterrupted."""
    baseline = bench.baseline()
    root = bench.fresh()
    arm(bench.cli, root, "--signal-at-write", "3", "--signal", "SIGUSR1")
    stop = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    try:
        entries, source = _entries(bench, "target")
        with pytest.raises(ApplyInterrupted) as caught:
            apply_config(entries, SimHostRoot(root), source=source, options=ApplyOptions(stop=stop))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    text = str(caught.value)
    assert text.startswith("apply interrupted before step:"), text
    assert "rolled back to its previous devices" in text and "not started, unchanged" in text, text
    assert _paths(writes(root)[:3]) == _paths(baseline[:3]) and len(writes(root)) == 6
    assert snapshot(root) == bench.before
    assert not (root / JOURNAL).exists()


def test_stop_already_set_changes_nothing(bench):
    root = bench.fresh()
    stop = threading.Event()
    stop.set()
    entries, source = _entries(bench, "target")
    with pytest.raises(ApplyInterrupted, match="before it changed anything"):
        apply_config(entries, SimHostRoot(root), source=source, options=ApplyOptions(stop=stop))
    assert writes(root) == []
    assert not (root / JOURNAL).exists()


def test_stop_ends_the_wait_for_the_host_lock(bench):
    root = bench.fresh()
    host = SimHostRoot(root)
    stop = threading.Event()
    entries, source = _entries(bench, "target")
    with HostLock(host):
        timer = threading.Timer(0.3, stop.set)
        timer.start()
        with pytest.raises(ApplyInterrupted, match="waiting for the host lock"):
            apply_config(entries, host, source=source, options=ApplyOptions(stop=stop, lock_timeout=30))
        timer.join()
    assert writes(root) == []
