"""Running nvidia-mig-parted (which one, with what environment), reading its merged export, and reading
nvidia-smi's NVML view."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vgpu_dm.device_id import DeviceID
from vgpu_dm.host.programs import HostTools
from vgpu_dm.host.root import HostRoot
from vgpu_dm.host.smi import NvmlGPU, parse_nvml_gpus
from vgpu_dm.mig.layout import ExportError, MigLayout, parse_export
from vgpu_dm.mig.parted import MigParted, MigPartedFailed, MigPartedMissing, locate

RECORDER = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "stdin": sys.stdin.read()}))
"""


def test_missing_program_is_reported_not_raised_as_oserror() -> None:
    parted = MigParted(HostRoot("/"), HostTools(mig_parted="/nonexistent/nvidia-mig-parted"))
    with pytest.raises(
        MigPartedMissing, match="/nonexistent/nvidia-mig-parted in the host root /: not found"
    ):
        parted.run("export")


def _recorder(directory, name: str = "nvidia-mig-parted") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(RECORDER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_config_goes_on_stdin_without_a_shell_in_a_clean_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MIG_PARTED_SKIP_RESET", "true")  # mig-parted would obey it
    script = _recorder(tmp_path)
    parted = MigParted(HostRoot("/"), HostTools(mig_parted=script))
    config = {"version": "v1", "mig-configs": {"a; rm -rf /": [{"devices": "all", "mig-enabled": False}]}}
    seen = json.loads(parted.run("assert", config, "--mode-only").stdout)
    assert seen["argv"] == ["assert", "-f", "-", "-c", "a; rm -rf /", "--mode-only"]
    assert "mig-enabled: false" in seen["stdin"]
    assert not [k for k in seen["env"] if k.startswith("MIG_PARTED_")]
    assert "LD_PRELOAD" not in seen["env"]


def _nvml(root, where: str = "usr/lib/x86_64-linux-gnu") -> str:
    lib = root / where
    lib.mkdir(parents=True)
    (lib / "libnvidia-ml.so.580.105.06").write_text("")
    os.symlink("libnvidia-ml.so.580.105.06", lib / "libnvidia-ml.so.1")
    return str(lib / "libnvidia-ml.so.580.105.06")


def test_the_images_mig_parted_runs_with_the_driver_roots_nvml(tmp_path, monkeypatch) -> None:
    """In the agent's container (host root /host): the image's own nvidia-mig-parted, not the host's,
    with LD_PRELOAD of libnvidia-ml.so.1 under the driver root, else under the host root, as upstream."""
    host, driver = tmp_path / "host", tmp_path / "driver-root"
    host.mkdir()
    driver.mkdir()
    image = _recorder(tmp_path / "image-bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'image-bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("MIG_PARTED_DEBUG", "true")
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/else.so")
    tools = HostTools(driver_root=str(driver))
    with pytest.raises(
        MigPartedMissing, match=r"needs the driver's libnvidia-ml\.so\.1, which is not under the driver root"
    ):
        locate(HostRoot(host), tools)
    host_lib = _nvml(host, "usr/lib64")
    seen = json.loads(MigParted(HostRoot(host), tools).run("export").stdout)
    assert seen["env"]["LD_PRELOAD"] == host_lib  # a driver installed on the host: its NVML
    driver_lib = _nvml(driver)
    seen = json.loads(MigParted(HostRoot(host), tools).run("export").stdout)
    assert seen["argv"] == ["export"]
    assert seen["env"]["LD_PRELOAD"] == driver_lib  # the driver container's NVML comes first
    assert not [k for k in seen["env"] if k.startswith("MIG_PARTED_")]
    assert locate(HostRoot(host), tools).program == image


def test_without_one_in_the_image_the_hosts_runs_in_the_host_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    command = locate(HostRoot(tmp_path), HostTools())
    assert (command.program, command.chroot) == ("nvidia-mig-parted", None)
    assert command.env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    # --mig-parted names the host's, even when the image has one.
    _recorder(tmp_path / "image-bin")
    monkeypatch.setenv("PATH", str(tmp_path / "image-bin"))
    assert locate(HostRoot(tmp_path), HostTools(mig_parted="/opt/mig/nvidia-mig-parted")).chroot is None
    # On the host itself (root /) its programs are the host's.
    assert locate(HostRoot("/"), HostTools()).chroot is None


def test_failures_carry_mig_parteds_words(tmp_path) -> None:
    script = tmp_path / "failing"
    script.write_text(
        '#!/bin/sh\necho \'time="2026-01-01T00:00:00Z" level=fatal msg="Error initializing NVML: '
        "ERROR_UNKNOWN\"' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    parted = MigParted(HostRoot("/"), HostTools(mig_parted=str(script)))
    with pytest.raises(
        MigPartedFailed, match=r'export failed \(exit 1\):\n  level=fatal msg="Error initializing'
    ):
        parted.export()
    config = {"version": "v1", "mig-configs": {"c": [{"devices": "all", "mig-enabled": False}]}}
    with pytest.raises(MigPartedFailed, match="nvidia-mig-parted apply --mode-only failed"):
        parted.apply(config, "--mode-only")


A100 = DeviceID.parse("0x20F110DE:0x145F10DE")
H100 = DeviceID.parse("0x233010DE:0x16C110DE")
ON7 = MigLayout.of(True, {"1g.5gb": 7})


@pytest.mark.parametrize(
    ("exported", "devices", "expected"),
    [
        # One entry for the whole host.
        ({"mig-configs": {"current": [
            {"devices": "all", "mig-enabled": True, "mig-devices": {"1g.5gb": 7}}]}},
         [A100, A100], {0: ON7, 1: ON7}),
        # Explicit indices.
        ({"mig-configs": {"current": [
            {"devices": [0], "mig-enabled": True, "mig-devices": {"1g.5gb": 7}},
            {"devices": [1], "mig-enabled": False, "mig-devices": {}}]}},
         [A100, A100], {0: ON7, 1: MigLayout(False)}),
        # Per model: device-filter with devices all (subsystem stripped, as export prints it).
        ({"mig-configs": {"current": [
            {"device-filter": "0x20F110DE", "devices": "all", "mig-enabled": True,
             "mig-devices": {"1g.5gb": 7}},
            {"device-filter": ["0x233010DE"], "devices": "all", "mig-enabled": False, "mig-devices": {}}]}},
         [H100, A100, A100], {0: MigLayout(False), 1: ON7, 2: ON7}),
        # A GPU whose id is unknown is covered only by index.
        ({"mig-configs": {"current": [
            {"device-filter": "0x20F110DE", "devices": "all", "mig-enabled": False, "mig-devices": {}}]}},
         [A100, None], {0: MigLayout(False)}),
    ],
)  # fmt: skip
def test_merged_export_is_read_per_gpu(exported, devices, expected) -> None:
    assert parse_export(exported, devices) == expected


@pytest.mark.parametrize(
    "bad",
    [None, {}, {"mig-configs": {"current": "x"}},
     {"mig-configs": {"current": [{"devices": "some", "mig-enabled": True}]}},
     {"mig-configs": {"current": [{"devices": [0], "mig-enabled": "yes"}]}},
     {"mig-configs": {"current": [{"devices": [0], "mig-enabled": True, "mig-devices": {"1g.5gb": 1}},
                                  {"devices": [0], "mig-enabled": False}]}}],
)  # fmt: skip
def test_export_that_is_not_mig_parteds_is_an_error(bad) -> None:
    with pytest.raises(ExportError):
        parse_export(bad, [A100])


def test_layouts_compare_without_zero_counts_and_describe_themselves() -> None:
    assert MigLayout.of(True, {"1g.5gb": 7, "2g.10gb": 0}) == ON7
    assert MigLayout.of(False, {"1g.5gb": 7}) == MigLayout(False)
    assert ON7.describe() == "MIG on, 7 x 1g.5gb"
    assert MigLayout.of(True).describe() == "MIG on, no GPU instances"
    assert ON7.entry(3, "0x20F110DE") == {
        "device-filter": "0x20F110DE",
        "devices": [3],
        "mig-enabled": True,
        "mig-devices": {"1g.5gb": 7},
    }


def test_nvidia_smi_nvml_view() -> None:
    text = "0, 00000000:3B:00.0, Enabled, Disabled\n1, 00000001:5E:00.0, [N/A], [N/A]\n"
    assert parse_nvml_gpus(text) == [
        NvmlGPU(0, "0000:3b:00.0", True, False),
        NvmlGPU(1, "0001:5e:00.0", None, None),
    ]
    for bad in (
        "0, 00000000:3B:00.0, Enabled\n",
        "x, 00000000:3B:00.0, Enabled, Enabled\n",
        "0, 3B, On, On\n",
    ):
        with pytest.raises(ValueError):
            parse_nvml_gpus(bad)
