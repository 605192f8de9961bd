"""mdevctl on simulated hosts: definitions listed, conflicts warned about, ``--persist=mdevctl`` writing
and removing them in mdevctl's format, and what mdevctl does with them at boot (``sim reboot``).

``sim create --mdevctl`` installs mdevctl's directories (etc/mdevctl.d and the callout/notifier
directories its self-check needs); definitions are ``etc/mdevctl.d/<parent>/<uuid>`` (kvm-host.md §E).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from tests.table import LIST_COLUMNS, parse_table
from vgpu_dm.host.mdevctl import definition_text
from vgpu_dm.sim.layout import create_host
from vgpu_dm.sim.libvirt import install_mdevctl

T4, L40S = "0000:3b:00.0", "0000:5e:00.0"
CONFIG = """\
version: v1
vgpu-configs:
  four:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
  two:
    - devices: [0]
      vgpu-devices: {"T4-8Q": 2}
  both:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 2}
"""


@pytest.fixture
def host(workdir):
    root = workdir / "host"
    create_host(root, ["T4", "L40S"])
    install_mdevctl(root)
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    return root, config


def run(cli, command, root, config, name, *extra, code=0):
    result = cli(command, "--sim", str(root), "-f", str(config), "-c", name, *extra)
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    return result


def definitions(root: Path) -> dict[str, tuple[str, str]]:
    """uuid → (parent, file text) of every definition file."""
    found = {}
    for path in sorted((root / "etc/mdevctl.d").glob("*/*")):
        if path.is_file():
            found[path.name] = (path.parent.name, path.read_text())
    return found


def t4_mdevs(root: Path) -> list[str]:
    return sorted(d[2] for d in snapshot(root) if d[0] == T4)


def test_persist_writes_exactly_the_layout_and_follows_a_change(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    uuids = t4_mdevs(root)
    assert sorted(definitions(root)) == uuids
    type_dir = (root / "sys/bus/mdev/devices" / uuids[0] / "mdev_type").readlink().name
    for parent, text in definitions(root).values():
        assert parent == T4
        assert text == definition_text(type_dir, "auto")  # '{\n  "mdev_type": …,\n  "start": "auto",…'
    listed = parse_table(cli("list", "--sim", str(root)).out, LIST_COLUMNS, fill=LIST_COLUMNS[:5])
    assert {r["MDEVCTL"] for r in listed if r["GPU"] == "0"} == {"auto"}
    result = run(cli, "apply", root, config, "two", "--persist", "mdevctl")
    assert "mdevctl definitions now match its 2 vGPU(s) (2 written, 4 removed, 0 already right)" in result.err
    assert sorted(definitions(root)) == t4_mdevs(root)
    again = run(cli, "apply", root, config, "two", "--persist", "mdevctl")
    assert "mdevctl definitions" not in again.err  # nothing to write on a no-op


def test_persist_keeps_attributes_and_leaves_other_gpus_alone(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    uuid = t4_mdevs(root)[0]
    type_dir = (root / "sys/bus/mdev/devices" / uuid / "mdev_type").readlink().name
    path = root / "etc/mdevctl.d" / T4 / uuid
    path.write_text(definition_text(type_dir, "manual", (("nvidia/vgpu_params", "frame_rate_limiter=0"),)))
    other = root / "etc/mdevctl.d/0000:86:00.0/c2177883-f1bb-47f0-914d-32a22e3a8804"
    other.parent.mkdir()
    other.write_text(definition_text("nvidia-999", "auto"))
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    assert path.read_text() == definition_text(
        type_dir, "auto", (("nvidia/vgpu_params", "frame_rate_limiter=0"),)
    )
    assert other.read_text() == definition_text("nvidia-999", "auto")


def test_without_persist_apply_warns_that_mdevctl_brings_back_the_old_layout_at_boot(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    old = t4_mdevs(root)
    result = run(cli, "apply", root, config, "two")
    warning = next(x for x in result.err.splitlines() if "mdevctl defines" in x)
    assert "4 mdev(s) with start=auto" in warning and old[0] in warning and "--persist=mdevctl" in warning
    plan = json.loads(run(cli, "plan", root, config, "four", "--json").out)
    assert any("mdevctl defines 4 mdev(s)" in n for n in plan["notes"])
    note = cli("list", "--sim", str(root)).err
    assert "mdevctl defines 4 more mdev(s) with start=auto that do not exist now" in note
    # At boot mdevctl's udev rule starts its definitions: the old layout is back, not "two".
    lines = cli("sim", "reboot", str(root)).out
    assert f"mdevctl: started {old[0]}" in lines
    assert t4_mdevs(root) == old and layouts(root)[0] == {"T4-4Q": 4}


def test_with_persist_the_layout_survives_a_reboot_with_its_uuids(cli, host):
    root, config = host
    run(cli, "apply", root, config, "two", "--persist", "mdevctl")
    before = t4_mdevs(root)
    cli("sim", "reboot", str(root))
    assert t4_mdevs(root) == before
    assert run(cli, "assert", root, config, "two").code == 0


def test_persist_refuses_vendor_vfio_gpus_and_a_host_without_mdevctl_with_zero_writes(cli, host, workdir):
    root, config = host
    result = run(cli, "apply", root, config, "both", "--persist", "mdevctl", code=1)
    assert f"GPU 1 ({L40S}) uses the vendor-specific VFIO framework" in result.err
    assert "deploy/systemd" in result.err and "nothing was changed" in result.err
    assert writes(root) == [] and definitions(root) == {}
    bare = workdir / "bare"
    create_host(bare, ["T4"])
    result = run(cli, "apply", bare, config, "four", "--persist", "mdevctl", code=1)
    assert f"{bare / 'etc/mdevctl.d'} does not exist: is mdevctl installed?" in result.err
    assert writes(bare) == []


def test_a_bad_definition_file_is_a_warning_and_is_replaced_by_persist(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four")
    uuid = t4_mdevs(root)[0]
    bad = root / "etc/mdevctl.d" / T4 / uuid
    bad.parent.mkdir()
    bad.write_text('{"mdev_type": "nvidia-222"}')
    listed = cli("list", "--sim", str(root))
    assert f"warning: {bad}: not a valid mdevctl definition: no 'start'" in listed.err
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    assert json.loads(bad.read_text())["start"] == "auto"


@pytest.mark.parametrize("on_vfs", ["start", "ignore"])
def test_mdev_on_vf_definitions_at_boot_follow_the_vf_events_option(cli, workdir, on_vfs):
    """On an mdev-on-VF GPU (A10) the parents are VFs, which appear only when sriov-manage enables
    them; whether mdevctl then starts their definitions is unconfirmed, so both are simulated."""
    root = workdir / "host"
    create_host(root, ["A10"], options={"mdevctl_on_vfs": on_vfs})
    install_mdevctl(root)
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {'A10-4Q': 3}\n"
    )
    run(cli, "apply", root, config, "a", "--persist", "mdevctl")
    before = sorted((d[2], d[3]) for d in snapshot(root))
    assert sorted((u, p) for u, (p, _) in definitions(root).items()) == before
    cli("sim", "reboot", str(root))
    result = run(cli, "apply", root, config, "a", "--persist", "mdevctl")
    after = sorted((d[2], d[3]) for d in snapshot(root))
    if on_vfs == "start":
        # mdevctl recreated them as the VFs appeared; apply found the layout in place.
        assert after == before
        assert "enabling SR-IOV virtual functions" in result.err
        assert "create" not in result.err and "is already applied" in result.err
    else:
        # Apply made the layout again with new UUIDs, and persisted those.
        assert len(after) == 3 and not set(after) & set(before)
        assert sorted((u, p) for u, (p, _) in definitions(root).items()) == after
