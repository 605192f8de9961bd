"""deploy/systemd: the unit's ExecStart= with its environment file, run against a simulated host, and
the unit checked by systemd-analyze verify where it is installed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ENTRY_POINT, EXAMPLES, REPO, writes
from tests.simstate import layouts, snapshot

UNIT = REPO / "deploy/systemd/nvidia-vgpu-dm.service"
ENV_FILE = REPO / "deploy/systemd/nvidia-vgpu-dm.env"
INSTALLED = "/usr/local/bin/nvidia-vgpu-dm"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values of a unit file (keys may repeat, so not configparser)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def run_exec_start(root: Path, overrides: dict[str, str]) -> subprocess.CompletedProcess:
    """ExecStart= as systemd would run it: its argv, the environment file, nothing of our shell's."""
    (command,) = unit_settings(UNIT)["ExecStart"]
    argv = shlex.split(command)
    assert argv[0] == INSTALLED
    env = {"PATH": "/usr/bin:/bin", **env_file(ENV_FILE), **overrides, "VGPU_DM_SIM": str(root)}
    return subprocess.run([str(ENTRY_POINT), *argv[1:]], env=env, capture_output=True, text=True, timeout=300)


def test_the_unit_is_ordered_after_the_vgpu_manager_and_before_libvirt():
    unit = unit_settings(UNIT)
    after = " ".join(unit["After"]).split()
    assert "nvidia-vgpu-mgr.service" in after and "nvidia-vgpud.service" in after
    assert "libvirtd.service" in unit["Before"][0].split()
    assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert unit["EnvironmentFile"] == ["/etc/nvidia-vgpu-dm/nvidia-vgpu-dm.env"]
    assert unit["WantedBy"] == ["multi-user.target"]


def test_exec_start_applies_the_configured_layout_at_every_boot(sim_host):
    overrides = {"VGPU_DM_CONFIG_FILE": str(EXAMPLES / "config-example.yaml")}
    root = sim_host("T4", "L40S")
    first = run_exec_start(root, overrides)
    assert first.returncode == 0, first.stderr
    assert "successfully applied" in first.stderr
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-24Q": 2}]  # the env file selects 'default'
    again = run_exec_start(root, overrides)
    assert again.returncode == 0 and "already applied" in again.stderr
    # A reboot: the same GPUs without vGPUs. Stable UUIDs (the env file's choice) come back the same.
    rebooted = sim_host("T4", "L40S")
    assert run_exec_start(rebooted, overrides).returncode == 0
    assert snapshot(rebooted) == snapshot(root)


def test_exec_start_fails_with_exit_2_on_a_bad_config_and_changes_nothing(sim_host, tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("version: v1\nvgpu-configs:\n  default: oops\n")
    root = sim_host("T4")
    result = run_exec_start(root, {"VGPU_DM_CONFIG_FILE": str(bad)})
    assert result.returncode == 2
    assert f"{bad}:3:12" in result.stderr
    assert writes(root) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart= is executable: point it at the installed entry point.
    unit = tmp_path / "nvidia-vgpu-dm.service"
    env = tmp_path / "nvidia-vgpu-dm.env"
    shutil.copy(ENV_FILE, env)
    text = UNIT.read_text().replace(INSTALLED, str(ENTRY_POINT))
    unit.write_text(text.replace("/etc/nvidia-vgpu-dm/nvidia-vgpu-dm.env", str(env)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr  # no warning about our own file
