"""Apply with several GPUs at once (``--jobs`` > 1) keeps every guarantee of the serial apply.

The simulated driver is made slow (``sim latency``) so that the GPUs' writes really overlap. Which
write is "the Nth" then depends on thread timing, so these suites check what must hold whichever GPU
the fault hits: a failed write is named with its errno and the host ends exactly as before (or, with
``--keep-going``, only the failed GPU is put back); a SIGKILL at any write is recovered by the next
apply; SIGTERM and the agent's stop event roll back every GPU. After a failure the other GPUs start
no new write: each may finish only the write it had under way.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.e2e.test_crash_recovery import Bench as CrashBench
from tests.e2e.test_crash_recovery import converges, reports_interruption
from tests.e2e.test_fault_injection import SCENARIOS
from tests.simstate import Bench, Scenario, arm, layouts, snapshot
from vgpu_dm.apply import ApplyOptions, apply_config, workers_for
from vgpu_dm.errors import ApplyInterrupted
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.latency import WriteLatency
from vgpu_dm.sim.layout import SimState
from vgpu_dm.spec import load_spec

JOURNAL = "run/nvidia-vgpu-dm/journal.json"
JOBS = 3
ADDRESS = re.compile(r"\((0000:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\)")
# Four GPUs with several writes each: enough overlap to interleave, few enough to run every position.
WIDE = Scenario(
    "wide",
    ("T4", "T4", "A10", "L40S"),
    start=[{"T4-4Q": 4}, {"T4-8Q": 2}, {"A10-6Q": 2}, {"L40S-12Q": 2}],
    target=[{"T4-8Q": 2}, {"T4-4Q": 4}, {"A10-4Q": 3}, {"L40S-12Q": 1, "L40S-6Q": 2}],
)


def slow(root: Path, create_ms: float = 4, remove_ms: float = 2) -> None:
    WriteLatency(create_ms=create_ms, remove_ms=remove_ms).save(root)


class ConcurrentBench(Bench):
    jobs = JOBS

    def fresh(self) -> Path:
        root = super().fresh()
        slow(root)
        return root


def failed_gpu(err: str) -> str:
    """The PCI address of the GPU named in the one "step failed" line."""
    lines = [x for x in err.splitlines() if "step failed: " in x]
    assert len(lines) == 1, err
    found = ADDRESS.search(lines[0])
    assert found, lines[0]
    return found[1]


def forward_writes(root: Path) -> int:
    """Writes made by the run before its rollback: each one is undone by exactly one write."""
    log = writes(root)
    assert len(log) % 2 == 0, log
    return len(log) // 2


# -- the pool ------------------------------------------------------------------------------------------
def test_workers_for_bounds_the_pool():
    assert workers_for(0, 3) == 3  # automatic: one per GPU being changed
    assert workers_for(0, 20) == 8  # ... at most 8
    assert workers_for(1, 5) == 1  # one after another
    assert workers_for(4, 2) == 2  # never more threads than GPUs
    assert workers_for(0, 0) == 1


def test_jobs_option_is_validated(cli, workdir):
    bench = ConcurrentBench(cli, workdir, WIDE)
    result = cli(*bench.args(bench.fresh(), "target")[:-2], "--jobs", "-1")
    assert result.code == 2 and "--jobs" in result.err


def test_writes_of_different_gpus_interleave_and_lines_carry_their_gpu(cli, workdir):
    bench = ConcurrentBench(cli, workdir, WIDE)
    root = bench.fresh()
    result = cli("--debug", *bench.args(root, "target"))
    assert result.code == 0, result.err
    assert layouts(root) == WIDE.target
    state = SimState.load(root)
    order = [state.gpu_of(line.split("\t")[0].split("/")[4]) for line in writes(root)]
    gpus = [g.address if g else "mdev" for g in order]
    switches = sum(1 for a, b in itertools.pairwise(gpus) if a != b)
    assert switches > len(WIDE.gpus), f"writes were not interleaved across GPUs: {gpus}"
    written = [line for line in result.err.splitlines() if "(simulated)" in line and "write " in line]
    assert written
    for line in written:
        assert re.search(r'msg="GPU \d \(0000:[0-9a-f:.]+\): write ', line), line


# -- failed writes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", [*SCENARIOS, WIDE], ids=lambda s: s.name)
def test_every_failed_write_rolls_every_gpu_back(cli, workdir, scenario):
    bench = ConcurrentBench(cli, workdir, scenario)
    total = len(bench.baseline())
    addresses = [g.address for g in SimState.load(bench.template).gpus]
    for k in range(1, total + 1):
        code = (errno.EIO, errno.EBUSY, errno.ENOSPC)[k % 3]
        root = bench.fresh()
        arm(cli, root, "--fail-write", str(k), "--errno", errno.errorcode[code])
        result = bench.apply(root, "target", code=1)
        assert failed_gpu(result.err) in addresses
        assert os.strerror(code) in result.err and f"(errno {code})" in result.err, result.err
        assert "NOT fully restored" not in result.err, result.err
        assert snapshot(root) == bench.before, f"fault at write {k} changed the host"
        assert not (root / JOURNAL).exists()
        # After the failure each other GPU finishes the write it had under way and starts no other
        # (the margin of one more each covers the moment before the failing thread says so).
        assert forward_writes(root) <= (k - 1) + 2 * (JOBS - 1), (k, writes(root))
        # The report has one line per GPU, in the serial order: rolled back / unchanged newest first,
        # then the GPUs that never started, by index.
        states = [
            ADDRESS.search(x)[1] for x in result.err.splitlines() if re.search(r"\): (rolled|unch|not st)", x)
        ]
        assert sorted(states) == sorted(addresses), result.err
        started = [a for a in states if f"({a}): not started" not in result.err]
        assert started == sorted(started, key=addresses.index, reverse=True), result.err
        shutil.rmtree(root)


@pytest.mark.parametrize("scenario", [SCENARIOS[1], WIDE], ids=lambda s: s.name)
def test_keep_going_puts_back_only_the_failed_gpu(cli, workdir, scenario):
    bench = ConcurrentBench(cli, workdir, scenario)
    total = len(bench.baseline())
    addresses = [g.address for g in SimState.load(bench.template).gpus]
    for k in range(1, total + 1):
        root = bench.fresh()
        arm(cli, root, "--fail-write", str(k), "--errno", "EIO")
        result = bench.apply(root, "target", "--keep-going", code=1)
        failed = failed_gpu(result.err)
        assert "--keep-going: the other GPUs kept their new devices" in result.err, result.err
        now = snapshot(root)
        for index, address in enumerate(addresses):
            if address == failed:
                assert [d for d in now if d[0] == address] == [d for d in bench.before if d[0] == address]
            else:
                assert layouts(root)[index] == scenario.target[index], (k, address, result.err)
        assert not (root / JOURNAL).exists()
        shutil.rmtree(root)


# -- SIGKILL -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", [SCENARIOS[1], WIDE], ids=lambda s: s.name)
def test_kill_at_every_write_then_apply_converges(cli, run_cli, workdir, scenario):
    bench = CrashBench(cli, workdir, scenario)
    bench.jobs = JOBS
    total = bench.baseline()
    for k in range(1, total + 1):
        root = bench.fresh()
        slow(root)
        arm(cli, root, "--kill-at-write", str(k))
        result = run_cli(*bench.args(root, "target"))
        assert result.code == -signal.SIGKILL, (result.code, result.err)
        assert (root / JOURNAL).is_file()
        assert len(writes(root)) <= k - 1 + 2 * (JOBS - 1)
        reports_interruption(cli, bench, root)
        converges(cli, bench, root)  # the recovering apply runs with --jobs 3 too
        shutil.rmtree(root)


# -- stop requests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_rolls_back_every_gpu(run_cli, cli, workdir, signame):
    bench = ConcurrentBench(cli, workdir, WIDE)
    total = len(bench.baseline())
    for k in sorted({1, total // 2, total - 2}):
        root = bench.fresh()
        arm(cli, root, "--signal-at-write", str(k), "--signal", signame)
        result = run_cli(*bench.args(root, "target"))
        assert result.code == 128 + getattr(signal, signame), result.err
        assert "apply interrupted before step:" in result.err, result.err
        assert snapshot(root) == bench.before
        assert not (root / JOURNAL).exists()
        # Every worker honours the stop: the writes under way finish (margin as above), no others.
        assert forward_writes(root) <= k + 2 * (JOBS - 1), (k, writes(root))
        for address in {d[0] for d in bench.before}:
            assert address in result.err


def test_the_stop_event_stops_every_worker(cli, workdir):
    bench = ConcurrentBench(cli, workdir, WIDE)
    root = bench.fresh()
    slow(root, create_ms=40, remove_ms=40)
    entries = load_spec(bench.config.read_text(), "c.yaml").select("target")[1]
    stop = threading.Event()
    host = SimHostRoot(root)
    timer = threading.Timer(0.15, stop.set)
    timer.start()
    try:
        with pytest.raises(ApplyInterrupted) as caught:
            apply_config(entries, host, source="c.yaml", options=ApplyOptions(stop=stop, jobs=4))
    finally:
        timer.cancel()
    assert "apply interrupted before step:" in str(caught.value)
    assert snapshot(root) == bench.before
    assert not (root / JOURNAL).exists()
    made = forward_writes(root)
    assert 0 < made < len(bench.baseline()), made


def test_jobs_1_keeps_the_serial_order(cli, workdir):
    bench = ConcurrentBench(cli, workdir, WIDE)
    bench.jobs = 1
    root = bench.fresh()
    bench.apply(root, "target")
    state = SimState.load(root)
    order = [state.gpu_of(line.split("\t")[0].split("/")[4]) for line in writes(root)]
    indices = [state.gpus.index(g) for g in order if g]
    assert indices == sorted(indices)


def test_gpu_workers_leave_stop_signals_to_the_main_thread():
    # A process-directed SIGTERM must reach the main thread (whose wait it interrupts at once), not a
    # worker, where it would only be noticed at the main thread's next wake-up while writes go on.
    from vgpu_dm.apply import _map

    def mask(_item) -> set[int]:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    for blocked in _map(mask, [1, 2, 3], workers=3):
        assert {signal.SIGINT, signal.SIGTERM} <= blocked
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
