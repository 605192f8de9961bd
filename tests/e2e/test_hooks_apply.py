"""``apply --hooks-file``: when each hook runs, what it is told, what a failing one does, and a bad file.

Hooks on a simulated host run on this machine (the simulated tree is no root to chroot into); every
hook here appends a line to a trace file, so the order is what the programs saw.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import layouts
from vgpu_dm.sim.layout import create_host

CONFIG = """\
version: v1
vgpu-configs:
  four:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  two:
    - devices: all
      vgpu-devices: {"T4-8Q": 2}
  too-many:
    - devices: all
      vgpu-devices: {"T4-8Q": 3}
"""
STAGES = ("apply-start", "pre-change", "post-change", "apply-exit")


@pytest.fixture
def host(cli, workdir):
    root = workdir / "host"
    create_host(root, ["T4", "T4"])
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    return root, config, workdir / "trace"


def hooks_file(workdir: Path, trace: Path, **override: str) -> Path:
    """Every stage appends 'stage result gpus' to ``trace``; ``override`` replaces a stage's script."""
    lines = ["version: v1", "hooks:"]
    for stage in STAGES:
        script = override.get(
            stage.replace("-", "_"), f"echo {stage} $VGPU_DM_RESULT $VGPU_DM_GPU_INDICES >> {trace}"
        )
        lines += [
            f"  {stage}:",
            "    - command: /bin/sh",
            f"      args: ['-c', '{script}']",
            "      timeout: 20",
        ]
    path = workdir / "hooks.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def apply(cli, root, config, name, *extra, code=0, env=None):
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", name, *extra, env=env)
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    return result


def trace_of(trace: Path) -> list[str]:
    return [line.strip() for line in trace.read_text().splitlines()] if trace.exists() else []


def test_a_change_runs_all_four_in_order_and_a_noop_only_start_and_exit(cli, host, workdir):
    root, config, trace = host
    hooks = hooks_file(workdir, trace)
    result = apply(cli, root, config, "four", "--hooks-file", str(hooks))
    assert trace_of(trace) == [
        "apply-start",
        "pre-change 0 1",
        "post-change success 0 1",
        "apply-exit success 0 1",
    ]
    # Hook lines sit where they ran: pre-change before the first GPU line, post-change after the last.
    err = result.err
    assert err.index("hook pre-change") < err.index("[1/2] GPU 0") < err.index("hook post-change")
    trace.unlink()
    apply(cli, root, config, "four", env={"VGPU_DM_HOOKS_FILE": str(hooks)})
    assert trace_of(trace) == ["apply-start", "apply-exit unchanged"]


def test_a_failing_pre_change_hook_stops_apply_with_zero_writes(cli, host, workdir):
    root, config, trace = host
    apply(cli, root, config, "four")
    logged = len(writes(root))
    hooks = hooks_file(
        workdir, trace, pre_change=f"echo pre-change >> {trace}; echo dcgm will not stop; exit 4"
    )
    result = apply(cli, root, config, "two", "--hooks-file", str(hooks), code=1)
    assert len(writes(root)) == logged and layouts(root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]
    assert "exited with status 4; its last output: dcgm will not stop" in result.err
    assert "nothing was changed: a pre-change hook failed before the first write" in result.err
    # post-change still runs (to start again what pre-change stopped), then apply-exit, both told "failed".
    assert trace_of(trace) == ["apply-start", "pre-change", "post-change failed 0 1", "apply-exit failed 0 1"]


def test_a_failing_apply_start_hook_stops_before_anything_and_apply_exit_still_runs(cli, host, workdir):
    root, config, trace = host
    hooks = hooks_file(workdir, trace, apply_start="exit 1")
    apply(cli, root, config, "four", "--hooks-file", str(hooks), code=1)
    assert writes(root) == []
    assert trace_of(trace) == ["apply-exit failed"]


def test_a_plan_problem_skips_pre_change_and_tells_apply_exit(cli, host, workdir):
    root, config, trace = host
    hooks = hooks_file(workdir, trace, apply_exit=f'echo "$VGPU_DM_RESULT: $VGPU_DM_ERROR" >> {trace}')
    apply(cli, root, config, "too-many", "--hooks-file", str(hooks), code=1)
    text = trace.read_text()  # VGPU_DM_ERROR holds every problem, one per line
    assert text.startswith("apply-start\nfailed: ")
    assert "3 x T4-8Q requested, but the GPU holds at most 2" in text


def test_a_failed_write_is_rolled_back_and_the_hooks_are_told(cli, host, workdir):
    root, config, trace = host
    apply(cli, root, config, "four")
    assert cli("sim", "fault", str(root), "--fail-write", "3").code == 0
    hooks = hooks_file(workdir, trace)
    apply(cli, root, config, "two", "--hooks-file", str(hooks), "--jobs", "1", code=1)
    assert trace_of(trace) == [
        "apply-start",
        "pre-change 0 1",
        "post-change failed 0 1",
        "apply-exit failed 0 1",
    ]
    assert layouts(root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]


def test_a_failing_post_change_hook_fails_the_run_but_says_the_change_was_made(cli, host, workdir):
    root, config, trace = host
    hooks = hooks_file(workdir, trace, post_change="exit 2")
    result = apply(cli, root, config, "four", "--hooks-file", str(hooks), code=1)
    assert layouts(root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]
    assert "the vGPU changes were made; only the hook failed" in result.err
    assert trace_of(trace) == ["apply-start", "pre-change 0 1", "apply-exit success 0 1"]


def test_a_hook_past_its_timeout_is_killed_and_stops_the_apply(cli, host, workdir):
    root, config, _trace = host
    hooks = workdir / "slow.yaml"
    hooks.write_text(
        "version: v1\nhooks:\n  pre-change:\n    - command: /bin/sleep\n"
        "      args: ['30']\n      timeout: 0.3\n"
    )
    result = apply(cli, root, config, "four", "--hooks-file", str(hooks), code=1)
    assert "did not finish within 0.3 s (timeout); killed" in result.err
    assert writes(root) == []


def test_a_bad_hooks_file_is_a_located_usage_error_before_the_host_is_read(cli, host, workdir):
    root, config, _ = host
    bad = workdir / "bad.yaml"
    bad.write_text("version: v1\nhooks:\n  pre-change:\n    - command: /bin/true\n      args: [on]\n")
    result = apply(cli, root, config, "four", "--hooks-file", str(bad), code=2)
    assert f"{bad}:5:14: hooks.pre-change[0].args[0]: expected a string, got a boolean ('on')" in result.err
    missing = apply(cli, root, config, "four", "--hooks-file", str(workdir / "nope.yaml"), code=2)
    assert "cannot read hooks file" in missing.err
    assert writes(root) == []
    # apply --dry-run checks the file too, and runs no hook.
    dry = cli(
        "apply", "--sim", str(root), "-f", str(config), "-c", "four", "--dry-run", "--hooks-file", str(bad)
    )
    assert dry.code == 2


def test_pre_change_is_told_every_gpu_the_run_changes_also_when_vfs_come_first(cli, workdir):
    """After a reboot a vendor-VFIO GPU needs its VFs enabled before its vGPUs, and that is the run's
    first change; pre-change must already name the other GPU this run changes too."""
    root = workdir / "mixed"
    create_host(root, ["T4", "L40S"])
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  both:\n    - devices: [0]\n      vgpu-devices: {'T4-4Q': 4}\n"
        "    - devices: [1]\n      vgpu-devices: {'L40S-12Q': 2}\n"
    )
    trace = workdir / "trace"
    apply(cli, root, config, "both", "--hooks-file", str(hooks_file(workdir, trace)))
    assert trace_of(trace) == [
        "apply-start",
        "pre-change 0 1",
        "post-change success 0 1",
        "apply-exit success 0 1",
    ]


def test_pre_change_before_a_journal_recovery_names_the_gpus_of_the_whole_run(cli, run_cli, host, workdir):
    """An interrupted apply left GPU 0 half-changed: recovering it is the first change, and this run
    then changes GPU 1 too; pre-change runs once, naming both."""
    root, config, trace = host
    apply(cli, root, config, "four")
    two = workdir / "gpu0-two.yaml"
    two.write_text("version: v1\nvgpu-configs:\n  a:\n    - devices: [0]\n      vgpu-devices: {'T4-8Q': 2}\n")
    assert cli("sim", "fault", str(root), "--kill-at-write", "2").code == 0
    killed = run_cli("apply", "--sim", str(root), "-f", str(two), "-c", "a")
    assert killed.code == -signal.SIGKILL and (root / "run/nvidia-vgpu-dm/journal.json").is_file()
    assert cli("sim", "fault", str(root)).code == 0
    apply(cli, root, config, "two", "--hooks-file", str(hooks_file(workdir, trace)))
    assert trace_of(trace) == [
        "apply-start",
        "pre-change 0 1",
        "post-change success 0 1",
        "apply-exit success 0 1",
    ]


def test_after_a_failed_run_a_failing_hook_is_reported_after_the_failure_itself(cli, host, workdir):
    root, config, trace = host
    apply(cli, root, config, "four")
    assert cli("sim", "fault", str(root), "--fail-write", "3").code == 0
    hooks = hooks_file(workdir, trace, post_change="echo dcgm did not start; exit 3")
    result = apply(cli, root, config, "two", "--hooks-file", str(hooks), "--jobs", "1", code=1)
    errors = [line for line in result.err.splitlines() if "level=error" in line]
    cause = next(i for i, line in enumerate(errors) if "step failed" in line)
    hook = next(i for i, line in enumerate(errors) if "hook post-change" in line)
    assert cause < hook, errors
