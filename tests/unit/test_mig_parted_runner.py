"""The mig-parted runner and the MIG step's reading of ``mig-parted export``."""

from __future__ import annotations

import pytest

from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig.parted import MigParted, MigPartedMissing
from vgpu_dm.mig.step import _previous


def test_missing_program_is_reported_not_raised_as_oserror() -> None:
    parted = MigParted(HostRoot("/"), "/nonexistent/nvidia-mig-parted")
    with pytest.raises(MigPartedMissing, match="/nonexistent/nvidia-mig-parted not found"):
        parted.run("export")


def test_config_goes_on_stdin_without_a_shell(tmp_path) -> None:
    # A stand-in program that echoes its argv and stdin: the config arrives on stdin, -f - -c NAME.
    script = tmp_path / "fake-parted"
    script.write_text("#!/usr/bin/env python3\nimport sys\nprint(sys.argv[1:])\nprint(sys.stdin.read())\n")
    script.chmod(0o755)
    parted = MigParted(HostRoot("/"), str(script))
    config = {"version": "v1", "mig-configs": {"a; rm -rf /": [{"devices": "all", "mig-enabled": False}]}}
    proc = parted.run("assert", config, "--mode-only")
    assert proc.returncode == 0
    assert "['assert', '-f', '-', '-c', 'a; rm -rf /', '--mode-only']" in proc.stdout
    assert "mig-enabled: false" in proc.stdout


@pytest.mark.parametrize(
    ("exported", "index", "expected"),
    [
        (None, 0, None),
        (
            {"mig-configs": {"current": [{"devices": "all", "mig-enabled": False}]}},
            3,
            {"devices": [3], "mig-enabled": False},
        ),
        (
            {
                "mig-configs": {
                    "current": [{"devices": [0, 1], "mig-enabled": True, "mig-devices": {"1g.5gb": 7}}]
                }
            },
            1,
            {"devices": [1], "mig-enabled": True, "mig-devices": {"1g.5gb": 7}},
        ),
        ({"mig-configs": {"current": [{"devices": [0], "mig-enabled": False}]}}, 2, None),
    ],
)
def test_previous_layout_from_export(exported, index, expected) -> None:
    assert _previous(exported, index) == expected
