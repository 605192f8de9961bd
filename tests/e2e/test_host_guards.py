"""Guards against a host that is not what it seems: a wrong --host-root, a missing /proc, a damaged
journal, a doomed config on GPUs whose VFs are still off, and a rollback out of mixed-size mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from vgpu_dm.sim.faults import Faults
from vgpu_dm.sim.layout import SimState

JOURNAL = "run/nvidia-vgpu-dm/journal.json"


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\nvgpu-configs:\n" + text)
    return str(path)


def test_a_host_root_without_sysfs_is_a_usage_error_and_left_untouched(cli, tmp_path):
    """A wrong --host-root is the operator's slip, like a missing directory: exit 2 (was 1), naming
    the option, or the environment variable when the value came from there."""
    root = tmp_path / "typo-root"
    root.mkdir()
    cfg = config(tmp_path, '  t4:\n    - devices: all\n      vgpu-devices: {"T4-1Q": 1}\n')
    for command in ("apply", "assert", "plan"):
        result = cli(command, "--host-root", str(root), "-f", cfg)
        assert result.code == 2, result.err
        assert "Invalid value for '--host-root'" in result.err
        assert "is not the root of a Linux host" in result.err
    for command in ("list", "types", "export"):
        result = cli(command, env={"VGPU_DM_HOST_ROOT": str(root)})
        assert result.code == 2, result.err
        assert "environment variable VGPU_DM_HOST_ROOT (for '--host-root')" in result.err
    assert list(root.iterdir()) == []  # no lock file, no journal


def test_removal_without_a_readable_proc_is_refused_unless_forced(cli, sim_host, tmp_path):
    root = sim_host("T4")
    fill = config(
        tmp_path,
        '  a:\n    - devices: all\n      vgpu-devices: {"T4-1Q": 4}\n'
        '  b:\n    - devices: all\n      vgpu-devices: {"T4-1Q": 2}\n',
    )
    assert cli("apply", "--sim", str(root), "-f", fill, "-c", "a").code == 0
    shutil.rmtree(root / "proc")
    (root / "proc").mkdir()
    before, n = snapshot(root), len(writes(root))
    refused = cli("apply", "--sim", str(root), "-f", fill, "-c", "b")
    assert refused.code == 1
    assert "cannot tell which vGPUs VMs are using" in refused.err and "--force" in refused.err
    assert (snapshot(root), len(writes(root))) == (before, n)
    # assert only reads, so it does not need to know who holds what.
    assert cli("assert", "--sim", str(root), "-f", fill, "-c", "a").code == 0
    forced = cli("apply", "--sim", str(root), "-f", fill, "-c", "b", "--force")
    assert forced.code == 0, forced.err
    assert layouts(root) == [{"T4-1Q": 2}]


def test_a_damaged_journal_is_moved_aside_and_never_reaches_sysfs(cli, sim_host, tmp_path):
    root = sim_host("T4")
    cfg = config(tmp_path, '  a:\n    - devices: all\n      vgpu-devices: {"T4-2Q": 2}\n')
    bad = {
        "pid": 1,
        "started": 0,
        "config": "a",
        "gpus": [
            {
                "gpu": "0000:3b:00.0",
                "framework": "mdev",
                "remove": [],
                "create": [],
                "before": [
                    {
                        "gpu": "0000:3b:00.0",
                        "parent": "../../../etc",
                        "type_name": "T4-1Q",
                        "type_id": 1,
                        "framework": "mdev",
                        "uuid": "x",
                    }
                ],
            }
        ],
    }
    (root / JOURNAL).parent.mkdir(parents=True, exist_ok=True)
    (root / JOURNAL).write_text(json.dumps(bad))
    result = cli("apply", "--sim", str(root), "-f", cfg)
    assert result.code == 0, result.err
    assert "unreadable apply journal moved to" in result.err
    assert not (root / JOURNAL).exists() and (root / (JOURNAL + ".unreadable")).exists()
    assert all("etc" not in line for line in writes(root))
    assert layouts(root) == [{"T4-2Q": 2}]


def test_a_doomed_config_does_not_enable_vfs(cli, sim_host, tmp_path):
    root = sim_host("L40S")
    cfg = config(tmp_path, '  a:\n    - devices: all\n      vgpu-devices: {"L40S-12Q": 4, "L40S-12C": 4}\n')
    result = cli("apply", "--sim", str(root), "-f", cfg)
    assert result.code == 1
    assert "holds at most 4 vGPUs of that size" in result.err
    assert SimState.load(root).gpus[0].vfs == []  # sriov-manage never ran


def test_rollback_switches_mixed_size_mode_back_off(cli, sim_host, tmp_path):
    root = sim_host("L40S")
    cfg = config(
        tmp_path,
        '  eq:\n    - devices: all\n      vgpu-devices: {"L40S-12Q": 4}\n'
        '  mixed:\n    - devices: all\n      vgpu-devices: {"L40S-12Q": 2, "L40S-4Q": 4}\n',
    )
    assert cli("apply", "--sim", str(root), "-f", cfg, "-c", "eq").code == 0
    before = snapshot(root)
    Faults(fail_write=6).save(root)  # 4 removals, then the first two creations; the second fails
    result = cli("apply", "--sim", str(root), "-f", cfg, "-c", "mixed")
    assert result.code == 1 and "rolled back to its previous devices" in result.err
    assert snapshot(root) == before
    assert SimState.load(root).gpus[0].mixed_enabled is False
