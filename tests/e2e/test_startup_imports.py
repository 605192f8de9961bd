"""The no-op ``assert`` path stays light: what a fresh interpreter has imported after running it.

Start-up is most of a no-op command's time (bench/bench_host.py measures it); these are the modules it
must not pull in. ``uuid`` and ``platform`` are absent from the list because click imports them
anyway.
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
    "vgpu_dm.sim.layout",  # the simulator's driver state: checked by apply, under the host lock
    "pathlib",  # (with it)
    "vgpu_dm.sim.faults",  # only with armed faults or at a write
    "vgpu_dm.sim.latency",
    "fcntl",
    "logging",  # vgpu_dm.log writes its own lines (logging + traceback cost a third of python's start)
    "json",  # only for --log-format json, journals and unusual config names
    "dataclasses",  # records on this path are NamedTuples (a dataclass compiles its methods at import)
    "vgpu_dm.host.smi",  # only for mixed-size mode and type names from nvidia-smi
    "vgpu_dm.cli.apply_cmd",
    "vgpu_dm.journal",  # only when there is a journal to read
    "vgpu_dm.host.vfio",  # every GPU of this host is an mdev one
    "vgpu_dm.cli.list_cmd",  # other commands load when they are run
    "vgpu_dm.cli.sim_cmd",
    "vgpu_dm.host.lock",  # only when a journal was found
    "vgpu_dm.hooks",  # only apply with --hooks-file
    "vgpu_dm.persist",  # only apply
    "xml.etree.ElementTree",  # only where libvirt domain files exist (none on this simulated host)
    "kubernetes",
    "lightkube",
    "prometheus_client",
    "pynvml",
    "grpc",  # the DRA driver's dependencies: never on the CLI's path
    "google.protobuf",
    "vgpu_dm.dra",
    "vgpu_dm.host.owner",  # only when the DRA driver owns GPUs here
)
# A failing assert plans removals, and which vGPUs VMs use decides which ones it would keep.
NOT_ON_NOOP_ASSERT_PATH = ("vgpu_dm.host.holders",)

PROBE = """
import io, sys
from vgpu_dm.cli.main import main
sys.stderr = io.StringIO()
code = main(sys.argv[1:])
modules = sorted(sys.modules)
import json  # after the list is taken
print(json.dumps([code, modules]))
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
    noop = config == "T4-small"
    assert code == (0 if noop else 1)
    assert "vgpu_dm.plan" in modules  # the probe really ran the host path
    unwanted = NOT_ON_ASSERT_PATH + (NOT_ON_NOOP_ASSERT_PATH if noop else ())
    assert sorted(m for m in unwanted if m in modules) == []


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
