"""What a long apply tells the operator: per-GPU progress, a bar on a terminal, lock waits, mixed-size
mode switches, -d discovery and plan lines, JSON fields, global options after the subcommand, completion.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from tests.conftest import ENTRY_POINT, EXAMPLES
from tests.simstate import config_text
from vgpu_dm.host.lock import HostLock
from vgpu_dm.sim.host import SimHostRoot

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}


def run_on_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.run(
        [str(ENTRY_POINT), *args], stderr=slave, stdout=subprocess.DEVNULL, env=_env(), timeout=120
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.returncode, out.decode()


def test_a_terminal_gets_a_progress_bar_and_per_gpu_progress(sim_host):
    root = sim_host("T4", "T4")
    code, screen = run_on_terminal("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert code == 0
    assert "\r\x1b[K[" in screen and "32/32 vGPU writes" in screen
    assert "INFO[" in screen and "[1/2] GPU 0 (0000:3b:00.0): create 16 x T4-1Q" in screen
    assert "[2/2] GPU 1 (0000:5e:00.0): done" in screen
    assert screen.rstrip().endswith("Selected vGPU device configuration successfully applied")


def test_a_pipe_gets_progress_lines_but_no_bar(run_cli, sim_host):
    root = sim_host("T4")
    result = run_cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert result.code == 0
    assert "vGPU writes" not in result.err and "\x1b" not in result.err
    assert 'level=info msg="[1/1] GPU 0 (0000:3b:00.0): done"' in result.err


def test_waiting_for_the_host_lock_is_said(cli, sim_host):
    root = sim_host("T4")
    with HostLock(SimHostRoot(root)):
        result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small", "--lock-timeout", "0.3")
    assert result.code == 1
    assert f"waiting for the host lock: another nvidia-vgpu-dm (pid {os.getpid()}) is applying" in result.err
    assert result.err.index("waiting for the host lock") < result.err.index("gave up after waiting")


def test_mixed_size_mode_switches_are_logged_at_info(cli, sim_host, tmp_path):
    root = sim_host("L40S")
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(config_text({"mixed": [{"L40S-12Q": 2, "L40S-4Q": 4}]}))
    cli("sim", "fault", str(root), "--fail-write", "3")
    failed = cli("apply", "--sim", str(root), "-f", str(cfg))
    assert failed.code == 1
    lines = failed.err.splitlines()
    on = next(i for i, x in enumerate(lines) if "enabling mixed-size (heterogeneous) vGPU mode" in x)
    off = next(i for i, x in enumerate(lines) if "disabling mixed-size (heterogeneous) vGPU mode" in x)
    assert on < off and "level=info" in lines[on] and "level=info" in lines[off]
    cli("sim", "fault", str(root))
    applied = cli("apply", "--sim", str(root), "-f", str(cfg))
    assert applied.code == 0 and "enabling mixed-size" in applied.err


def test_debug_shows_discovery_and_the_plan(cli, sim_host):
    root = sim_host("T4", "L40S")
    for command in ("apply", "assert"):
        result = cli("-d", command, "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
        assert "discovered GPU 0 (0000:3b:00.0): id 0x1EB810DE" in result.err
        assert "framework sriov-vfs-off" in result.err
        assert "plan GPU 1 (0000:5e:00.0): no entry selects it; left alone" in result.err
    assert "plan GPU 0 (0000:3b:00.0) [vgpu-configs.T4-small[0]]: keep 16 x T4-1Q" in result.err


def test_json_logs_carry_fields_and_global_options_work_after_the_subcommand(cli, sim_host):
    root = sim_host("T4")
    result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small", "-d", "--log-format", "json")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.err.splitlines()]
    change = next(x for x in lines if x.get("action") == "change")
    assert (change["gpu"], change["address"], change["level"]) == (0, "0000:3b:00.0", "info")
    created = [x for x in lines if x.get("action") == "create"]
    assert len(created) == 16 and all(x["type"] == "T4-1Q" and len(x["uuid"]) == 36 for x in created)
    assert {x["level"] for x in lines} == {"debug", "info"}
    # And on commands without a host: the option after the subcommand still counts.
    valid = cli("assert", "--valid-config", "-f", T4_CONFIG, "-c", "T4-small", "--log-format", "json")
    assert json.loads(valid.err)["msg"] == "Selected vGPU device configuration is valid"
    assert cli("list", "--sim", str(root), "-d").code == 0
    assert cli("sim", "gpus", "-d").code == 0


def test_shell_completion_is_provided(run_cli):
    script = run_cli(env={"_NVIDIA_VGPU_DM_COMPLETE": "bash_source"})
    assert script.code == 0 and "_nvidia_vgpu_dm_completion()" in script.out
    words = run_cli(
        env={
            "_NVIDIA_VGPU_DM_COMPLETE": "bash_complete",
            "COMP_WORDS": "nvidia-vgpu-dm gen",
            "COMP_CWORD": "1",
        }
    )
    assert "generate-config" in words.out


def test_the_readme_documents_completion():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "_NVIDIA_VGPU_DM_COMPLETE=bash_source" in readme
