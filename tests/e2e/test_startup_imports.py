"""The no-op ``assert`` path stays light: what a fresh interpreter has imported after running it.

Start-up is most of a no-op command's time (bench/bench_startup.py measures it); these are the
modules it must not pull in. ``uuid``, ``json`` and ``platform`` are absent from the list because
click and the log format import them anyway; ``pathlib`` is absent because the simulated host checks
its own state file when it is opened (a real host never imports it on this path).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES

NOT_ON_ASSERT_PATH = (
    "importlib.resources",  # the catalog is read with open() when it is needed at all
    "subprocess",  # only apply runs host programs
    "tempfile",
    "shutil",
    "vgpu_dm.catalog",  # not needed for mdev GPUs that show their own types and counts
    "vgpu_dm.sim.driver",  # the driver emulation loads on the first write
    "vgpu_dm.cli.list_cmd",  # other commands load when they are run
    "vgpu_dm.cli.sim_cmd",
    "vgpu_dm.host.lock",  # only when a journal was found
    "kubernetes",
    "lightkube",
    "prometheus_client",
    "pynvml",
)

PROBE = """
import io, json, sys
from vgpu_dm.cli.main import main
sys.stderr = io.StringIO()
code = main(sys.argv[1:])
print(json.dumps([code, sorted(sys.modules)]))
"""


def run_fresh(*args: str) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    code, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    return code, set(modules)


@pytest.mark.parametrize("config", ["T4-small", "T4-large"])
def test_assert_on_a_simulated_mdev_host_imports_nothing_it_does_not_need(cli, sim_host, config):
    root = sim_host("T4", "T4")
    assert (
        cli("apply", "--sim", str(root), "-f", str(EXAMPLES / "config-t4.yaml"), "-c", "T4-small").code == 0
    )
    code, modules = run_fresh(
        "assert", "--sim", str(root), "-f", str(EXAMPLES / "config-t4.yaml"), "-c", config
    )
    assert code == (0 if config == "T4-small" else 1)
    assert "vgpu_dm.plan" in modules  # the probe really ran the host path
    assert sorted(m for m in NOT_ON_ASSERT_PATH if m in modules) == []


def test_valid_config_check_does_not_touch_the_host_modules():
    code, modules = run_fresh(
        "assert", "--valid-config", "-f", str(EXAMPLES / "config-t4.yaml"), "-c", "T4-small"
    )
    assert code == 0
    assert not {m for m in modules if m.startswith(("vgpu_dm.host", "vgpu_dm.sim", "vgpu_dm.plan"))}
    assert sorted(m for m in NOT_ON_ASSERT_PATH if m in modules) == []


def test_lazily_registered_commands_still_run_and_show_in_help(cli, workdir):
    helptext = cli("--help").out
    assert "list" in helptext and "sim" in helptext
    assert cli("sim", "create", str(workdir / "h"), "--gpu", "T4").code == 0
    assert cli("list", "--sim", str(workdir / "h")).code == 0
