"""Where the driver's files are, decided per file (driver root first, then host root), on both kinds of
GPU Operator node: a driver container (everything under the host's run/nvidia/driver, published without
/sys) and a vGPU manager installed on the host (the operator's /driver-root mounted but empty)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.simstate import layouts
from vgpu_dm.errors import HostError
from vgpu_dm.host import locate
from vgpu_dm.host.programs import HostTools, Programs
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host

SRIOV = "/usr/lib/nvidia/sriov-manage"


def container_node(workdir: Path, gpus=("L40S",), **options: str) -> tuple[Path, Path]:
    """A host whose driver runs in the operator's container, and the pod's /driver-root: another path to
    the same directory (on a node it is a bind mount; a symlink gives the same file identities)."""
    root = workdir / "host"
    create_host(root, list(gpus), driver_root="run/nvidia/driver", options=options or None)
    mount = workdir / "driver-root"
    os.symlink(root / "run/nvidia/driver", mount)
    return root, mount


def host_node(workdir: Path, gpus=("L40S",)) -> tuple[Path, Path]:
    """A vGPU manager installed on the host; /driver-root exists (DirectoryOrCreate) and is empty."""
    root = workdir / "host"
    create_host(root, list(gpus))
    mount = workdir / "driver-root"
    mount.mkdir()
    return root, mount


def test_empty_driver_root_falls_back_to_the_host_root_for_each_file(workdir):
    root, mount = host_node(workdir)
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    for name in ("nvidia-smi", SRIOV):
        found = programs.locate(name)
        assert (found.kind, found.root) == (locate.HOST_ROOT, str(root)), found
    assert programs.nvml.kind == locate.HOST_ROOT
    assert programs.nvml.path == str(
        root / f"usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{SimState.load(root).driver_version}"
    )
    assert programs.command([SRIOV, "-e", "0000:3b:00.0"]) == (str(root), [SRIOV, "-e", "0000:3b:00.0"])
    report = "\n".join(f.line for f in programs.report())
    assert f"nvidia-smi: host root {root}" in report and f"libnvidia-ml.so.1: host root {root}" in report


def test_driver_container_serves_its_files_and_sriov_manage_runs_in_the_host_root(workdir):
    root, mount = container_node(workdir)
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    assert programs.locate("nvidia-smi").kind == locate.DRIVER_ROOT
    assert programs.command(["nvidia-smi", "-q"]) == (str(mount), ["/usr/bin/nvidia-smi", "-q"])
    assert programs.nvml.kind == locate.DRIVER_ROOT and programs.nvml.path.startswith(str(mount))
    # The driver root has no /sys: sriov-manage runs in the host root, from the driver root's host path.
    chroot, argv = programs.command([SRIOV, "-e", "0000:3b:00.0"])
    assert (chroot, argv[0]) == (str(root), "/run/nvidia/driver/usr/lib/nvidia/sriov-manage")
    sriov = programs.report()[1]
    assert sriov.ok and sriov.runs_as == (str(root), "/run/nvidia/driver/usr/lib/nvidia/sriov-manage")
    assert "runs as: chroot" in sriov.line


def test_driver_root_below_the_host_root_needs_no_identity_check(workdir):
    root = workdir / "host"
    create_host(root, ["L40S"], driver_root="run/nvidia/driver")
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(root / "run/nvidia/driver")))
    assert programs.command([SRIOV, "-d", "ALL"])[1][0] == "/run/nvidia/driver/usr/lib/nvidia/sriov-manage"


def test_unknown_host_path_of_the_driver_root_is_a_clear_error_until_set(workdir):
    root, _ = container_node(workdir)
    # A driver root with the same content that is not the host's run/nvidia/driver (hostPaths changed).
    moved = root / "opt/nvidia/driver"
    shutil.copytree(root / "run/nvidia/driver", moved, symlinks=True)
    shutil.rmtree(root / "run/nvidia/driver")
    mount = workdir / "moved-mount"
    os.symlink(moved, mount)
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    with pytest.raises(HostError) as err:
        programs.command([SRIOV, "-e", "ALL"])
    text = str(err.value)
    assert (
        "must run in the host root" in text and "DRIVER_INSTALL_DIR" in text and "/run/nvidia/driver" in text
    )
    # At start the agent says so as a problem (a warning), not as a root that serves it.
    sriov = programs.report()[1]
    assert sriov.location.found and not sriov.ok and "cannot run: " in sriov.line
    told = Programs(
        SimHostRoot(root), HostTools(driver_root=str(mount), driver_root_on_host="/opt/nvidia/driver")
    )
    assert told.command([SRIOV, "-e", "ALL"])[1][0] == "/opt/nvidia/driver/usr/lib/nvidia/sriov-manage"
    # A setting that names another directory is refused too: identity, not names, decides.
    wrong = Programs(SimHostRoot(root), HostTools(driver_root=str(mount), driver_root_on_host="/etc"))
    with pytest.raises(HostError, match="/etc"):
        wrong.command([SRIOV, "-e", "ALL"])


def test_missing_program_names_every_place(workdir):
    root, mount = host_node(workdir)
    os.unlink(root / "usr/bin/nvidia-smi")
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    with pytest.raises(HostError) as err:
        programs.run(["nvidia-smi", "-q"])
    places = f"the driver root {mount}, the host root {root} and the driver root {root}/run/nvidia/driver"
    assert places in str(err.value)
    assert "nvidia-vgpu-dm --driver-root" in str(err.value) and "--driver-root-ctr-path" in str(err.value)
    smi = programs.report()[0]
    assert not smi.ok and smi.line == f"nvidia-smi: not found (looked for nvidia-smi in {places})"


@pytest.mark.parametrize("driver_root", [None, "absent"], ids=["none-named", "named-but-absent"])
def test_driver_container_found_without_a_driver_root(workdir, driver_root):
    """The CLI without --driver-root, and our own DaemonSets (which mount no /driver-root), on a node
    whose driver runs in the GPU Operator's container: found in the host's /run/nvidia/driver, third."""
    root, _ = container_node(workdir)
    named = str(workdir / "driver-root-absent") if driver_root else None
    programs = Programs(SimHostRoot(root), HostTools(driver_root=named))
    driver = root / "run/nvidia/driver"
    found = programs.locate("nvidia-smi")
    assert (found.kind, found.root) == (locate.DRIVER_ROOT, str(driver))
    assert [where for _, where in found.looked][-2:] == [str(root), str(driver)]
    assert programs.command(["nvidia-smi", "-q"]) == (str(driver), ["/usr/bin/nvidia-smi", "-q"])
    assert programs.command([SRIOV, "-e", "ALL"]) == (
        str(root),
        ["/run/nvidia/driver/usr/lib/nvidia/sriov-manage", "-e", "ALL"],
    )
    assert programs.nvml.kind == locate.DRIVER_ROOT and programs.nvml.path.startswith(str(driver))


def test_host_install_wins_over_the_hosts_run_nvidia_driver(workdir):
    """Order: a driver installed on the host comes before whatever is under its /run/nvidia/driver."""
    root, mount = host_node(workdir)
    stale = root / "run/nvidia/driver/usr/bin"
    stale.mkdir(parents=True)
    (stale / "nvidia-smi").write_text("")
    found = Programs(SimHostRoot(root), HostTools(driver_root=str(mount))).locate("nvidia-smi")
    assert (found.kind, found.root) == (locate.HOST_ROOT, str(root))


def test_named_driver_root_is_not_looked_in_twice(workdir):
    root, _ = container_node(workdir)
    looked = locate.roots(str(root / "run/nvidia/driver"), str(root))
    assert looked == [(locate.DRIVER_ROOT, str(root / "run/nvidia/driver")), (locate.HOST_ROOT, str(root))]


def test_cli_applies_on_a_driver_container_node_without_driver_root(cli, workdir):
    root, _ = container_node(workdir)
    config = workdir / "config.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  two:\n    - devices: all\n      vgpu-devices: {"L40S-12Q": 2}\n'
    )
    result = cli("apply", "--sim", str(root), "-f", str(config))
    assert result.code == 0, result.err
    assert layouts(root) == [{"L40S-12Q": 2}]


@pytest.mark.parametrize("variant", ["fail", "noop"])
def test_simulated_sriov_manage_chrooted_into_a_root_without_sysfs_makes_no_vfs(workdir, variant):
    """The simulator's side of the fact: a chrooted sriov-manage in the driver container's root sees no
    /sys; whether the real script then fails or exits 0 is unknown, so both are modelled."""
    root, mount = container_node(workdir, sriov_manage_without_sysfs=variant)
    host = SimHostRoot(root)
    address = SimState.load(root).gpus[0].address
    proc = host.run([SRIOV, "-e", address], chroot=str(mount))
    assert proc.returncode == (1 if variant == "fail" else 0)
    assert SimState.load(root).gpus[0].vfs == []
    # The same program run the right way (in the host root, from the driver root's host path) works.
    ok = host.run(["/run/nvidia/driver" + SRIOV, "-e", address], chroot=str(root))
    assert ok.returncode == 0 and SimState.load(root).gpus[0].vfs


@pytest.mark.parametrize("variant", ["fail", "noop"])
def test_apply_enables_vfs_on_a_driver_container_node(cli, workdir, variant):
    """Before: sriov-manage ran chrooted into the driver root, which on a real node has no /sys."""
    root, mount = container_node(workdir, sriov_manage_without_sysfs=variant)
    config = workdir / "config.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  two:\n    - devices: all\n      vgpu-devices: {"L40S-12Q": 2}\n'
    )
    result = cli("apply", "--sim", str(root), "-f", str(config), "--driver-root", str(mount))
    assert result.code == 0, result.err
    assert layouts(root) == [{"L40S-12Q": 2}]


def test_sim_create_makes_both_node_kinds(cli, workdir):
    made = cli("sim", "create", str(workdir / "c"), "--gpu", "L40S", "--driver", "container")
    assert made.code == 0, made.err
    assert "driver container root" in made.out
    c = workdir / "c"
    assert (c / "run/nvidia/driver/usr/bin/nvidia-smi").is_file() and not (c / "usr/bin/nvidia-smi").exists()
    assert (c / "run/nvidia/driver/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1").is_file()
    assert not (c / "run/nvidia/driver/sys").exists()
    assert cli("sim", "create", str(workdir / "h"), "--gpu", "L40S").code == 0
    h = workdir / "h"
    assert (h / "usr/bin/nvidia-smi").is_file() and (
        h / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
    ).is_file()
    assert not (h / "run/nvidia/driver").exists()


def test_sriov_manage_as_an_absolute_symlink_in_the_driver_root(workdir):
    """The driver root's sriov-manage may be a link whose absolute target means the driver root's own /:
    followed from this process it would name a file of the container (or none). The driver root's host
    path is proven on the directories, so the link does not matter; chroot resolves it on the host."""
    root, mount = container_node(workdir)
    driver = root / "run/nvidia/driver"
    (driver / "usr/libexec").mkdir(parents=True, exist_ok=True)
    os.rename(driver / SRIOV.lstrip("/"), driver / "usr/libexec/sriov-manage")
    os.symlink("/usr/libexec/sriov-manage", driver / SRIOV.lstrip("/"))
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    assert programs.command([SRIOV, "-e", "ALL"]) == (
        str(root),
        ["/run/nvidia/driver/usr/lib/nvidia/sriov-manage", "-e", "ALL"],
    )


def test_host_path_of_the_driver_root_is_resolved_inside_the_host_root(workdir):
    """The host's /run/nvidia/driver may itself be an absolute symlink (into the host's /opt): it is
    followed inside the host root, not in this process's /."""
    root = workdir / "host"
    create_host(root, ["L40S"], driver_root="opt/nvidia/driver")
    (root / "run/nvidia").mkdir(parents=True)
    os.symlink("/opt/nvidia/driver", root / "run/nvidia/driver")
    mount = workdir / "driver-root"
    os.symlink(root / "opt/nvidia/driver", mount)
    programs = Programs(SimHostRoot(root), HostTools(driver_root=str(mount)))
    assert programs.command([SRIOV, "-e", "ALL"])[1][0] == "/run/nvidia/driver/usr/lib/nvidia/sriov-manage"


def test_resolve_in_root_keeps_links_inside_the_root(workdir):
    root = workdir / "r"
    (root / "a/b").mkdir(parents=True)
    os.symlink("/a", root / "abs")
    os.symlink("../a/b", root / "a/rel")
    os.symlink("/../../../a", root / "escape")
    assert locate.resolve_in_root(str(root), "/abs/b") == str(root / "a/b")
    assert locate.resolve_in_root(str(root), "a/rel") == str(root / "a/b")
    assert locate.resolve_in_root(str(root), "/escape/b/missing") == str(root / "a/b/missing")
    os.symlink("/loop", root / "loop")
    assert locate.resolve_in_root(str(root), "/loop").startswith(str(root))
