"""The simulator's mdevctl and our definition files against the real mdevctl, where it is installed.

mdevctl before 1.3.0 (Debian 12 ships 1.2.0) has no ``MDEVCTL_ENV_ROOT``: its paths are the host's
``/etc/mdevctl.d`` and ``/sys``. The test runs it in a private mount namespace (``unshare -m``, as
root) with a copy of the simulated host's ``sys`` bound on ``/sys`` and its ``etc/mdevctl.d`` on
``/etc/mdevctl.d``; nothing outside the namespace sees them. The copy's ``create`` files are plain
files, so what mdevctl "creates" is read back from them: the UUID it wrote, or nothing. Skipped where
mdevctl or the namespace is not available, except under ``CI=true``, where ``.ci/run`` installs
mdevctl from Debian and a missing one fails the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vgpu_dm.host.mdevctl import AUTO, Definition, definition_text, write_definition
from vgpu_dm.host.root import HostRoot
from vgpu_dm.sim.layout import SimState, create_host
from vgpu_dm.sim.mdevctl import install_mdevctl, udev_parents_appeared

GOOD = ("11111111-0000-4000-8000-000000000001", "22222222-0000-4000-8000-000000000002")
BAD = "33333333-0000-4000-8000-000000000003"


def _usable() -> str | None:
    if shutil.which("mdevctl") is None:
        return "mdevctl is not installed (apt-get install mdevctl)"
    if not Path("/etc/mdevctl.d").is_dir():
        return "/etc/mdevctl.d does not exist"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"cannot make a mount namespace here ({probe.stderr.decode().strip()})"
    return None


@pytest.fixture(autouse=True)
def _real_mdevctl():
    """Skip where mdevctl cannot run; under CI=true fail instead (.ci/run installs it)."""
    why = _usable()
    if why is None:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def mdevctl(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real mdevctl with ``tree``'s sys and etc/mdevctl.d in place of the host's."""
    script = (
        'mount --bind "$1/sys" /sys && mount --bind "$1/etc/mdevctl.d" /etc/mdevctl.d && shift && exec "$@"'
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(tree), "mdevctl", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def two_t4(workdir):
    """Two T4s (mdev parents = the PFs) with mdevctl; each parent gets one auto definition."""
    root = workdir / "host"
    create_host(root, ["T4", "T4"])
    install_mdevctl(root)
    parents = sorted(g.address for g in SimState.load(root).gpus)
    type_dir = sorted(
        p.name for p in (root / "sys/bus/pci/devices" / parents[0] / "mdev_supported_types").iterdir()
    )[0]
    for parent, uuid in zip(parents, GOOD, strict=True):
        write_definition(HostRoot(root), Definition(parent, uuid, type_dir, AUTO))
    return root, parents, type_dir


def copy_for_mdevctl(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, symlinks=True)
    for legacy in ("callouts", "notifiers"):  # mdevctl < 1.3 checks these instead of /usr/lib/mdevctl
        (dest / "etc/mdevctl.d/scripts.d" / legacy).mkdir(parents=True, exist_ok=True)
    return dest


def created(tree: Path, parent: str, type_dir: str) -> str:
    return (tree / "sys/bus/pci/devices" / parent / "mdev_supported_types" / type_dir / "create").read_text()


def test_a_bad_file_fails_start_parent_mdevs_for_its_parent_only_in_mdevctl_and_in_the_simulator(
    two_t4, workdir
):
    root, parents, type_dir = two_t4
    (root / "etc/mdevctl.d" / parents[0] / BAD).write_text('{"mdev_type": "nvidia-222"}')  # no "start"
    tree = copy_for_mdevctl(root, workdir / "for-mdevctl")
    bad = mdevctl(tree, "start-parent-mdevs", parents[0])
    good = mdevctl(tree, "start-parent-mdevs", parents[1])
    assert (bad.returncode, bad.stderr.strip().splitlines()[-1]) == (1, "Error: invalid json")
    assert created(tree, parents[0], type_dir) == ""
    assert good.returncode == 0, good.stderr
    assert created(tree, parents[1], type_dir) == GOOD[1]
    # The simulator's udev rule does the same on the original tree.
    lines = udev_parents_appeared(root, parents)
    failed = f"mdevctl start-parent-mdevs {parents[0]}: Error: invalid json (exit 1)"
    assert lines[0] == f"{failed}; nothing on {parents[0]} started"
    assert lines[1:] == [f"mdevctl: started {GOOD[1]} ({type_dir}) on {parents[1]}"]
    assert sorted(p.name for p in (root / "sys/bus/mdev/devices").iterdir()) == [GOOD[1]]


def test_our_definition_files_are_byte_for_byte_what_mdevctl_define_writes(two_t4, workdir):
    root, parents, type_dir = two_t4
    tree = copy_for_mdevctl(root, workdir / "for-mdevctl")
    uuid = "44444444-0000-4000-8000-000000000004"
    for start, flags in ((AUTO, ["--auto"]), ("manual", [])):
        result = mdevctl(tree, "define", "-u", uuid, "-p", parents[1], "-t", type_dir, *flags)
        assert result.returncode == 0, result.stderr
        path = tree / "etc/mdevctl.d" / parents[1] / uuid
        assert path.read_text() == definition_text(type_dir, start)
        path.unlink()
    # And mdevctl reads ours: list --defined shows both files written by write_definition.
    listed = mdevctl(tree, "list", "--defined")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip()) == sorted(GOOD)
