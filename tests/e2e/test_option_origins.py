"""A value the operator gave is named the way it was given, past click's own checks too: a hooks file,
a driver root or a program path from a ``VGPU_DM_*`` variable is named by the variable, one from the
command line by its option (issue 18.11's rule, for the checks made after click's)."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES, writes

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")
MIXED = 'version: v1\nvgpu-configs:\n  m:\n    - devices: all\n      vgpu-devices: {"T4-1Q": 2, "T4-2Q": 2}\n'


def test_a_hooks_file_from_the_environment_that_cannot_be_read_names_the_variable(cli, sim_host):
    root = sim_host("T4")
    args = ("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    result = cli(*args, env={"VGPU_DM_HOOKS_FILE": "/nonexistent"})
    assert result.code == 2, result.err
    assert "/nonexistent: cannot read hooks file" in result.err
    assert "environment variable VGPU_DM_HOOKS_FILE" in result.err
    given = cli(*args, "--hooks-file", "/nonexistent")
    assert given.code == 2 and "environment variable" not in given.err
    assert writes(root) == []


@pytest.mark.parametrize("command", ["list", "assert"])
def test_a_driver_root_that_does_not_exist_is_a_usage_error(cli, sim_host, command):
    root = sim_host("T4")
    extra = ["-f", T4_CONFIG, "-c", "T4-small"] if command == "assert" else []
    result = cli(command, "--sim", str(root), *extra, "--driver-root", "/nonexistent")
    assert result.code == 2, result.err
    assert "Invalid value for '--driver-root'" in result.err and "/nonexistent" in result.err


def test_a_missing_nvidia_smi_is_named_by_the_variable_it_came_from(cli, sim_host, tmp_path):
    root = sim_host("T4")
    env = {"VGPU_DM_NVIDIA_SMI": "/usr/bin/nvidia-smx"}
    listed = cli("list", "--sim", str(root), env=env)
    assert listed.code == 0, listed.err
    # list says why MIXED is unknown (it said nothing), naming where the path came from.
    assert "nvidia-smi not found: looked for /usr/bin/nvidia-smx" in listed.err
    assert "environment variable VGPU_DM_NVIDIA_SMI (for '--nvidia-smi')" in listed.err
    config = tmp_path / "mixed.yaml"
    config.write_text(MIXED)
    applied = cli("apply", "--sim", str(root), "-f", str(config), env=env)
    assert applied.code == 1
    assert "environment variable VGPU_DM_NVIDIA_SMI (for '--nvidia-smi')" in applied.err, applied.err
    given = cli("apply", "--sim", str(root), "-f", str(config), "--nvidia-smi", "/usr/bin/nvidia-smx")
    assert "(from '--nvidia-smi')" in given.err and "environment variable" not in given.err
    assert writes(root) == []
