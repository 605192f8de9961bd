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
from vgpu_dm.sim.mdevctl import install_mdevctl

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
  l40s:
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
    run(cli, "apply", root, config, "l40s")  # its VFs are on now
    written = len(writes(root))
    result = run(cli, "apply", root, config, "both", "--persist", "mdevctl", code=1)
    assert f"GPU 1 ({L40S}) uses the vendor-specific VFIO framework" in result.err
    assert "deploy/systemd" in result.err and "nothing was changed" in result.err
    assert writes(root)[written:] == [] and definitions(root) == {}
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


@pytest.mark.parametrize("on_vfs", ["start", "later", "ignore"])
def test_mdev_on_vf_definitions_at_boot_follow_the_vf_events_option(cli, workdir, on_vfs):
    """On an mdev-on-VF GPU (A10) the parents are VFs, which appear only when sriov-manage enables
    them; whether mdevctl then starts their definitions, and when (before sriov-manage returns or
    after), is unconfirmed, so each is simulated. Apply waits for udev (udevadm settle) when mdevctl
    has definitions on the new VFs, so it plans on what mdevctl made in every case."""
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
    if on_vfs in ("start", "later"):
        # mdevctl recreated them as the VFs appeared; apply found the layout in place.
        assert after == before
        assert "enabling SR-IOV virtual functions" in result.err
        assert "create" not in result.err and "is already applied" in result.err
        assert ("waiting for udev" in result.err) == (on_vfs == "later")
    else:
        # Apply made the layout again with new UUIDs, and persisted those.
        assert "mdevctl did not start 3 start=auto definition(s) on the new virtual functions" in result.err
        assert len(after) == 3 and not set(after) & set(before)
        assert sorted((u, p) for u, (p, _) in definitions(root).items()) == after


def test_a_late_udev_event_lands_at_the_next_driver_write_when_nobody_waits(workdir):
    """``later``: the simulator holds mdevctl's starts until udev is waited for or the driver is next
    written — what a tool that plans on the new VFs without settling would race against."""
    from vgpu_dm.host.mdevctl import Definition, write_definition
    from vgpu_dm.host.root import HostRoot
    from vgpu_dm.sim.host import SimHostRoot

    root = workdir / "a10"
    create_host(root, ["A10"], options={"mdevctl_on_vfs": "later"})
    install_mdevctl(root)
    host = SimHostRoot(root)
    assert host.run(["/usr/lib/nvidia/sriov-manage", "-e", "ALL"]).returncode == 0
    vf = sorted(p.name for p in (root / "sys/class/mdev_bus").iterdir())[0]
    type_dir = sorted(p.name for p in (root / "sys/bus/pci/devices" / vf / "mdev_supported_types").iterdir())[
        0
    ]
    write_definition(HostRoot(root), Definition(vf, UNUSED, type_dir, "auto"))
    host.run(["/usr/lib/nvidia/sriov-manage", "-d", "ALL"])
    host.run(["/usr/lib/nvidia/sriov-manage", "-e", "ALL"])
    assert snapshot(root) == []  # sriov-manage returned; udev has not run mdevctl yet
    other = sorted(p.name for p in (root / "sys/class/mdev_bus").iterdir())[1]
    create = root / "sys/bus/pci/devices" / other / "mdev_supported_types" / type_dir / "create"
    host.write_text(str(create.relative_to(root)), "11111111-2222-3333-4444-555555555555")
    assert sorted(d[2] for d in snapshot(root)) == ["11111111-2222-3333-4444-555555555555", UNUSED]


# -- Definitions other programs own (libvirt's node devices, an operator's manual ones) ---------------
UNUSED = "c2177883-f1bb-47f0-914d-32a22e3a8804"  # an mdev UUID no device on the host has


def define_by_hand(root: Path, parent: str, uuid: str, start: str, mdev_type: str = "nvidia-222") -> Path:
    path = root / "etc/mdevctl.d" / parent / uuid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(definition_text(mdev_type, start))
    return path


def test_persist_leaves_manual_definitions_alone_even_on_a_noop(cli, host):
    """A start=manual definition does not come back at boot, so it does not fight the layout: it is
    someone's on-demand device (``virsh nodedev-define`` without autostart, here named by a VM)."""
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    manual = define_by_hand(root, T4, UNUSED, "manual")
    cli("sim", "define", str(root), "vm1", "--vgpu", UNUSED)
    before = manual.read_text()
    assert "apply would change nothing" in run(cli, "plan", root, config, "four").out
    result = run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    assert manual.read_text() == before
    assert f"{UNUSED}" in result.err and "start=manual" in result.err
    # A layout change on that GPU leaves it too.
    run(cli, "apply", root, config, "two", "--persist", "mdevctl")
    assert manual.read_text() == before


def test_persist_refuses_to_remove_an_auto_definition_a_vm_names_unless_allowed(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    auto = define_by_hand(root, T4, UNUSED, "auto")
    cli("sim", "define", str(root), "vm1", "--vgpu", UNUSED)
    files_before, written = definitions(root), len(writes(root))
    result = run(cli, "apply", root, config, "two", "--persist", "mdevctl", code=1)
    assert f"mdevctl definition {UNUSED}" in result.err and "VM 'vm1' (shut off)" in result.err
    assert "--allow-assigned vm1" in result.err and "nothing was changed" in result.err
    assert writes(root)[written:] == []
    assert definitions(root) == files_before and layouts(root)[0] == {"T4-4Q": 4}
    # The preview says the same, with what persist would do.
    plan = run(cli, "plan", root, config, "two", "--persist", "mdevctl", code=1).out
    assert f"mdevctl definition {UNUSED}" in plan and "VM 'vm1' (shut off)" in plan
    allowed = run(cli, "apply", root, config, "two", "--persist", "mdevctl", "--allow-assigned", "vm1")
    assert not auto.exists() and sorted(definitions(root)) == t4_mdevs(root)
    assert f"--allow-assigned: removing mdevctl definition {UNUSED}" in allowed.err


def test_plan_and_dry_run_show_what_persist_would_write_and_remove(cli, host):
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    old = t4_mdevs(root)
    manual = define_by_hand(root, T4, UNUSED, "manual")
    written = len(writes(root))
    for command, extra in (("plan", ()), ("apply", ("--dry-run",))):
        out = run(cli, command, root, config, "two", "--persist", "mdevctl", *extra).out
        assert "mdevctl" in out
        assert "remove 4 definition(s)" in out and old[0] in out
        assert "write 2 definition(s) for the vGPUs this run creates" in out
        assert f"keep {UNUSED} (start=manual" in out
        shown = run(cli, command, root, config, "two", "--persist", "mdevctl", *extra, "--json")
        report = json.loads(shown.out)
        gpu = report["persist"]["gpus"][0]
        assert sorted(d["uuid"] for d in gpu["remove"]) == old and gpu["new"] == 2
        assert [d["uuid"] for d in gpu["kept"]] == [UNUSED]
    assert writes(root)[written:] == [] and manual.exists()
    assert sorted(definitions(root)) == sorted([*old, UNUSED])


def test_a_type_change_replaces_the_definition_in_place(cli, host, monkeypatch):
    """The definition of a device whose type changed is replaced by one atomic rename: at no moment is
    the file missing (a crash there would lose the device at the next boot)."""
    root, config = host
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    uuid = t4_mdevs(root)[0]
    path = root / "etc/mdevctl.d" / T4 / uuid
    path.write_text(definition_text("nvidia-999", "auto"))  # as if the type had been another
    import vgpu_dm.host.root as hostroot

    removed: list[str] = []
    real = hostroot.HostRoot.remove_state
    monkeypatch.setattr(
        hostroot.HostRoot, "remove_state", lambda self, rel: (removed.append(rel), real(self, rel))[1]
    )
    run(cli, "apply", root, config, "four", "--persist", "mdevctl")
    assert removed == []
    type_dir = (root / "sys/bus/mdev/devices" / uuid / "mdev_type").readlink().name
    assert path.read_text() == definition_text(type_dir, "auto")


def test_an_unusable_definition_directory_is_refused_before_any_write(cli, workdir):
    root = workdir / "two-t4"
    create_host(root, ["T4", "T4"])
    install_mdevctl(root)
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {'T4-4Q': 4}\n"
    )
    second = gpu_addresses(root)[1]
    (root / "etc/mdevctl.d" / second).write_text("not a directory\n")
    result = run(cli, "apply", root, config, "a", "--persist", "mdevctl", code=1)
    assert f"{root / 'etc/mdevctl.d' / second} is not a directory" in result.err
    assert "nothing was changed" in result.err
    assert writes(root) == [] and definitions(root) == {}
    assert run(cli, "plan", root, config, "a", "--persist", "mdevctl", code=1).code == 1


def gpu_addresses(root: Path) -> list[str]:
    from vgpu_dm.sim.layout import SimState

    return sorted(g.address for g in SimState.load(root).gpus)


def vfs_enabled(root: Path, pf: str) -> bool:
    """Straight from the simulated tree: sriov-manage -e left VFs (the write log does not show runs)."""
    numvfs = (root / "sys/bus/pci/devices" / pf / "sriov_numvfs").read_text().strip()
    links = [p for p in (root / "sys/bus/pci/devices" / pf).iterdir() if p.name.startswith("virtfn")]
    return numvfs != "0" or bool(links)


def test_persist_refuses_a_known_vendor_vfio_gpu_whose_vfs_are_off_without_enabling_them(cli, host):
    """After a reboot a vendor-VFIO GPU has no VFs; the type table apply learned on its VFs (same
    driver release) says what they are, so nothing runs before the refusal — not even sriov-manage."""
    root, config = host
    run(cli, "apply", root, config, "both")
    cli("sim", "reboot", str(root))
    assert not vfs_enabled(root, L40S)
    written = len(writes(root))
    hooks = root.parent / "hooks.yaml"
    hooks.write_text("version: v1\nhooks:\n  pre-change:\n    - command: /bin/true\n")
    result = run(
        cli, "apply", root, config, "both", "--persist", "mdevctl", "--hooks-file", str(hooks), code=1
    )
    assert f"GPU 1 ({L40S}) uses the vendor-specific VFIO framework" in result.err
    assert "nothing was changed" in result.err and "hook pre-change" not in result.err
    assert not vfs_enabled(root, L40S) and writes(root)[written:] == [] and definitions(root) == {}


def test_persist_on_an_unknown_sriov_gpu_says_truthfully_that_its_vfs_were_enabled(cli, host):
    """A GPU that was never used has nothing that tells mdev-on-VF from vendor VFIO before its VFs
    exist (host-interfaces.md §4): they are enabled (harmless), then persist refuses, and says so."""
    root, config = host
    result = run(cli, "apply", root, config, "l40s", "--persist", "mdevctl", code=1)
    assert f"GPU 1 ({L40S}) uses the vendor-specific VFIO framework" in result.err
    assert vfs_enabled(root, L40S)
    assert "nothing was changed" not in result.err
    assert "SR-IOV virtual functions" in result.err and "no vGPU" in result.err
    assert snapshot(root) == []


def test_at_boot_one_bad_file_stops_mdevctl_on_its_parent_only(cli, workdir):
    """``mdevctl start-parent-mdevs P`` reads every definition of P strictly: one file it cannot use
    fails the whole command (exit 1, "Error: invalid json") and nothing on P starts; other parents
    are separate runs of the udev rule and start (mdevctl src/main.rs, src/environment.rs)."""
    root = workdir / "two-t4"
    create_host(root, ["T4", "T4"])
    install_mdevctl(root)
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {'T4-4Q': 2}\n"
    )
    run(cli, "apply", root, config, "a", "--persist", "mdevctl")
    first, second = gpu_addresses(root)
    define_by_hand(root, first, UNUSED, "auto").write_text('{"mdev_type": "nvidia-222"}')  # no "start"
    lines = cli("sim", "reboot", str(root)).out
    assert f"mdevctl start-parent-mdevs {first}: Error: invalid json (exit 1)" in lines
    mdevs = snapshot(root)
    assert [d for d in mdevs if d[0] == first] == []
    assert len([d for d in mdevs if d[0] == second]) == 2


def test_list_notes_auto_definitions_on_parents_that_do_not_exist_now(cli, workdir):
    """After a reboot an mdev-on-VF GPU (A10) has no VFs, so its definitions' parents are absent: list
    cannot tie them to a GPU, and says they start only when those parents appear."""
    root = workdir / "a10"
    create_host(root, ["A10"])
    install_mdevctl(root)
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {'A10-4Q': 3}\n"
    )
    run(cli, "apply", root, config, "a", "--persist", "mdevctl")
    defined = sorted(definitions(root))
    cli("sim", "reboot", str(root))
    listed = cli("list", "--sim", str(root))
    note = next(line for line in listed.err.splitlines() if "parents that do not exist now" in line)
    assert note.startswith("note: mdevctl defines 3 mdev(s) with start=auto on parents that do not exist now")
    assert all(uuid in note for uuid in defined) and "sriov-manage" in note
