"""vGPUs that libvirt VMs are defined to use, on simulated hosts with libvirt files under the host root.

The VMs are made with ``sim define``/``sim start``/``sim shutdown``, which write libvirt's persistent
(``etc/libvirt/qemu/NAME.xml``) and live (``run/libvirt/qemu/NAME.xml``, ``<domstatus>``) files as
libvirt does; a few tests write files by hand (malformed XML, a status file only). The host is a T4
(mdev) and an L40S (vendor VFIO) carrying config ``start``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from tests.table import LIST_COLUMNS, parse_table
from vgpu_dm.sim.layout import create_host

T4, L40S = "0000:3b:00.0", "0000:5e:00.0"
CONFIG = """\
version: v1
vgpu-configs:
  start:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 4}
  switch:
    - devices: [0]
      vgpu-devices: {"T4-8Q": 2}
    - devices: [1]
      vgpu-devices: {"L40S-16Q": 3}
  fewer:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 2}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 2}
  mixed:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 2, "T4-2Q": 4}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 2, "L40S-4Q": 4}
  l40s-24q:
    - devices: [1]
      vgpu-devices: {"L40S-24Q": 2}
"""


@pytest.fixture
def host(cli, workdir):
    root = workdir / "host"
    create_host(root, ["T4", "L40S"])
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    run(cli, "apply", root, config, "start")
    return root, config


def run(cli, command: str, root: Path, config: Path, name: str, *extra: str, code: int = 0, env=None):
    result = cli(command, "--sim", str(root), "-f", str(config), "-c", name, *extra, env=env)
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    return result


def sim(cli, *args: str, code: int = 0):
    result = cli("sim", *args)
    assert result.code == code, result.err + result.out
    return result


def mdevs(root: Path) -> list[str]:
    return sorted(d[2] for d in snapshot(root) if d[0] == T4)


def vfs(root: Path) -> dict[str, str]:
    return {d[3]: d[1] for d in snapshot(root) if d[0] == L40S}


# -- refused without --force ----------------------------------------------------------------------------
def test_a_stopped_vms_mdev_is_kept_and_the_apply_refused_with_zero_writes(cli, host):
    root, config = host
    victim = mdevs(root)[1]
    sim(cli, "define", str(root), "win10", "--vgpu", victim)
    before, logged = snapshot(root), len(writes(root))
    result = run(cli, "apply", root, config, "switch", code=1)
    (line,) = [x for x in result.err.splitlines() if victim in x]
    assert f"GPU 0 ({T4}): T4-4Q {victim} is assigned to VM 'win10' (shut off)" in line
    assert str(root / "etc/libvirt/qemu/win10.xml") in line
    assert "--allow-assigned win10" in line and "--force" in line
    assert "nothing was changed" in result.err
    assert snapshot(root) == before and len(writes(root)) == logged
    # The plan says the same, by VM, and exits 1.
    plan = json.loads(run(cli, "plan", root, config, "switch", "--json", code=1).out)
    (vm,) = plan["assigned"]
    assert (vm["domain"], vm["state"]) == ("win10", "shut off")
    assert vm["vgpus"] == [
        {
            "gpu": 0,
            "address": T4,
            "type": "T4-4Q",
            "uuid": victim,
            "parent": T4,
            "action": "remove",
            "held": False,
            "allowed": False,
        }
    ]


def test_allow_assigned_names_the_vm_and_force_takes_everything(cli, host):
    root, config = host
    sim(cli, "define", str(root), "win10", "--vgpu", mdevs(root)[0])
    sim(cli, "define", str(root), "db01", "--vgpu", sorted(vfs(root))[1])
    refused = run(cli, "apply", root, config, "switch", "--allow-assigned", "win10", code=1)
    assert "VM 'db01'" in refused.err and "VM 'win10'" not in refused.err.replace("--allow-assigned: ", "")
    assert layouts(root) == [{"T4-4Q": 4}, {"L40S-12Q": 4}]
    done = run(cli, "apply", root, config, "switch", env={"VGPU_DM_ALLOW_ASSIGNED": "win10 db01"})
    assert "--allow-assigned: removing GPU 0" in done.err and "VM 'win10' (shut off)" in done.err
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]


def test_allow_assigned_does_not_cover_a_running_vm(cli, host):
    root, config = host
    victim = mdevs(root)[0]
    sim(cli, "define", str(root), "win10", "--vgpu", victim, "--start")
    result = run(cli, "apply", root, config, "switch", "--allow-assigned", "all", code=1)
    (line,) = [x for x in result.err.splitlines() if victim in x]
    assert "is in use by pid" in line and "libvirt VM 'win10' (running)" in line
    assert mdevs(root)[0] == victim
    sim(cli, "shutdown", str(root), "win10")
    run(cli, "apply", root, config, "switch", "--allow-assigned", "all")


def test_a_running_vm_seen_only_in_its_status_file_needs_force(cli, host):
    """A transient VM (only run/libvirt/qemu) whose process this tool cannot see still counts as running."""
    root, config = host
    victim = mdevs(root)[2]
    status = root / "run/libvirt/qemu/scratch.xml"
    status.parent.mkdir(parents=True)
    status.write_text(
        "<domstatus state='paused' reason='user' pid='99999'>\n"
        "  <devices><device alias='hostdev0'/></devices>\n"
        "  <domain type='kvm' id='7'>\n    <name>scratch</name>\n"
        "    <uuid>0f6c9a52-3c4e-4b8a-9d0e-7a2b4c6d8e10</uuid>\n    <devices>\n"
        "      <hostdev mode='subsystem' type='mdev' model='vfio-pci'>\n"
        f"        <source><address uuid='{victim.upper()}'/></source>\n"
        "      </hostdev>\n    </devices>\n  </domain>\n</domstatus>\n"
    )
    result = run(cli, "apply", root, config, "fewer", "--allow-assigned", "scratch", "--force")
    assert victim in mdevs(root)  # fewer keeps the assigned one, even with --force
    result = run(cli, "apply", root, config, "switch", "--allow-assigned", "scratch", code=1)
    assert "VM 'scratch' (paused)" in result.err and "stop the VM" in result.err
    result = run(cli, "apply", root, config, "switch", "--force")
    assert "--force: removing GPU 0" in result.err and victim not in mdevs(root)


# -- kept where it can be -------------------------------------------------------------------------------
def test_fewer_of_a_type_keeps_the_ones_vms_are_defined_to_use(cli, host):
    root, config = host
    chosen_mdevs = mdevs(root)[2:]
    chosen_vfs = sorted(vfs(root))[2:]
    for n, device in enumerate([*chosen_mdevs, *chosen_vfs]):
        sim(cli, "define", str(root), f"vm{n}", "--vgpu", device)
    run(cli, "apply", root, config, "fewer")
    assert mdevs(root) == chosen_mdevs
    assert sorted(vfs(root)) == chosen_vfs


def test_a_recreated_vgpu_keeps_its_uuid_and_its_vf(cli, host):
    """Switching to mixed sizes rebuilds each GPU (the mode changes only on an empty GPU): the vGPUs of
    a type that stays come back under the same UUIDs / on the same VFs, VMs' first."""
    root, config = host
    kept_mdev = mdevs(root)[3]
    kept_vf = sorted(vfs(root))[3]
    sim(cli, "define", str(root), "win10", "--vgpu", kept_mdev)
    sim(cli, "define", str(root), "db01", "--vgpu", kept_vf)
    plan = run(cli, "plan", root, config, "mixed")
    assert (
        f"VM 'win10' (shut off): GPU 0 T4-4Q {kept_mdev} recreated with the same UUID: stays valid"
        in plan.out
    )
    assert (
        f"VM 'db01' (shut off): GPU 1 L40S-12Q {kept_vf} recreated with the same VF: stays valid" in plan.out
    )
    before = mdevs(root)
    result = run(cli, "apply", root, config, "mixed")
    assert "removed and created again (same UUID, same type)" in result.err
    assert layouts(root) == [{"T4-4Q": 2, "T4-2Q": 4}, {"L40S-12Q": 2, "L40S-4Q": 4}]
    four_q = sorted(d[2] for d in snapshot(root) if d[1] == "T4-4Q")
    assert kept_mdev in four_q and set(four_q) <= set(before)  # both 4Q came back under old UUIDs
    assert vfs(root)[kept_vf] == "L40S-12Q"
    # Both VMs start: their vGPUs exist as defined.
    sim(cli, "start", str(root), "win10")
    sim(cli, "start", str(root), "db01")


def test_a_failed_write_after_a_recreate_rolls_back_to_the_same_uuids(cli, host):
    root, config = host
    victim = mdevs(root)[0]
    sim(cli, "define", str(root), "win10", "--vgpu", victim)
    before = snapshot(root)
    # 4 removals, 2 pinned creates on the T4, then the first T4-2Q fails.
    sim(cli, "fault", str(root), "--fail-write", "7", "--errno", "EIO")
    result = run(cli, "apply", root, config, "mixed", "--jobs", "1", code=1)
    assert "rolled back" in result.err
    sim(cli, "fault", str(root))
    assert snapshot(root) == before


def test_a_vf_freed_from_a_stopped_vm_takes_no_other_vgpu(cli, host):
    root, config = host
    assigned = sorted(vfs(root))[:2]  # .4 and .5
    sim(cli, "define", str(root), "db01", "--vgpu", assigned[0])
    sim(cli, "define", str(root), "web", "--vgpu", assigned[1])
    run(cli, "apply", root, config, "l40s-24q", code=1)
    run(cli, "apply", root, config, "l40s-24q", "--allow-assigned", "all")
    placed = vfs(root)
    assert sorted(placed.values()) == ["L40S-24Q", "L40S-24Q"]
    assert not set(assigned) & set(placed), placed  # the 24Q went elsewhere (.6, .7)
    # The VMs cannot start on empty VFs, as with libvirt (ENODEV).
    failed = sim(cli, "start", str(root), "db01", code=2)
    assert "has no vGPU type" in failed.err


def test_vfs_freed_from_vms_and_no_other_free_is_a_problem_before_any_write(cli, workdir):
    """Every VF carries a vGPU a VM names; a new layout of another type has no VF to go to without
    --force (VFs that are free now would be used: after a reboot all are free, and the same config
    puts the same types on the same VFs in virtfn order)."""
    root = workdir / "host"
    create_host(root, ["L40S"])
    config = workdir / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {'L40S-1Q': 32}\n"
        "  b:\n    - devices: all\n      vgpu-devices: {'L40S-48Q': 1}\n"
    )
    run(cli, "apply", root, config, "a")
    every = sorted(d[3] for d in snapshot(root))
    assert len(every) == 32
    sim(cli, "define", str(root), "farm", *[x for vf in every for x in ("--vgpu", vf)])
    logged = len(writes(root))
    result = run(cli, "apply", root, config, "b", "--allow-assigned", "farm", code=1)
    assert "1 new vGPU(s) need free virtual functions" in result.err
    assert "VM 'farm' (shut off)" in result.err and "--force" in result.err
    assert len(writes(root)) == logged
    run(cli, "apply", root, config, "b", "--force")
    assert layouts(root) == [{"L40S-48Q": 1}]


# -- list, and files the check cannot vouch for ---------------------------------------------------------
def test_list_shows_the_vm_and_its_state_beside_the_holder(cli, host):
    root, _config = host
    uuid = mdevs(root)[0]
    vf = sorted(vfs(root))[1]
    sim(cli, "define", str(root), "win10", "--vgpu", uuid)
    pid = re.search(r"pid (\d+)", sim(cli, "define", str(root), "db01", "--vgpu", vf, "--start").out)[1]
    table = cli("list", "--sim", str(root))
    rows = parse_table(table.out, LIST_COLUMNS, fill=LIST_COLUMNS[:5])
    by_key = {r["UUID"] if r["UUID"] != "-" else r["PARENT"]: r for r in rows}
    assert by_key[uuid]["VM"] == "win10 (shut off)" and by_key[uuid]["HOLDER"] == "-"
    assert by_key[vf]["VM"] == "db01 (running)" and by_key[vf]["HOLDER"] == f"{pid} qemu-system-x86_64"
    report = json.loads(cli("list", "--sim", str(root), "--json").out)["gpus"]
    vgpu = next(v for v in report[0]["vgpus"] if v["uuid"] == uuid)
    assert vgpu["assigned"] == [{"domain": "win10", "uuid": vgpu["assigned"][0]["uuid"], "state": "shut off"}]
    assert next(v for v in report[1]["vgpus"] if v["parent"] == vf)["assigned"][0]["state"] == "running"


def test_malformed_domain_xml_is_a_warning_naming_the_file_never_a_crash(cli, host):
    root, config = host
    qemu = root / "etc/libvirt/qemu"
    qemu.mkdir(parents=True)
    (qemu / "broken.xml").write_text(
        "<domain>\n  <name>broken</name>\n  <devices>\n    <hostdev type='mdev'>\n</domain>"
    )
    listed = cli("list", "--sim", str(root))
    assert listed.code == 0
    warning = next(x for x in listed.err.splitlines() if "broken.xml" in x)
    assert warning.startswith(f"warning: {qemu / 'broken.xml'}: not well-formed XML (line 5")
    assert "cannot vouch for libvirt domain 'broken'" in warning
    result = run(cli, "apply", root, config, "switch")
    assert "cannot vouch for libvirt domain 'broken'" in result.err
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]


def test_sim_vm_commands_refuse_what_virsh_would(cli, host):
    root, _ = host
    assert (
        "neither an mdev UUID nor a PCI address"
        in sim(cli, "define", str(root), "x", "--vgpu", "nope", code=2).err
    )
    assert "invalid VM name" in sim(cli, "define", str(root), "a/b", "--vgpu", mdevs(root)[0], code=2).err
    sim(cli, "define", str(root), "ghost", "--vgpu", "c2177883-f1bb-47f0-914d-32a22e3a8804")
    assert (
        "mediated device 'c2177883-f1bb-47f0-914d-32a22e3a8804' not found"
        in sim(cli, "start", str(root), "ghost", code=2).err
    )
    assert "already defined" in sim(cli, "define", str(root), "ghost", "--vgpu", mdevs(root)[0], code=2).err
    sim(cli, "define", str(root), "vm", "--vgpu", mdevs(root)[0], "--start")
    assert "is running" in sim(cli, "undefine", str(root), "vm", code=2).err
    assert "not running" in sim(cli, "shutdown", str(root), "ghost", code=2).err
    sim(cli, "shutdown", str(root), "vm")
    sim(cli, "undefine", str(root), "vm")
    assert not (root / "etc/libvirt/qemu/vm.xml").exists()


def test_a_mig_change_refuses_to_take_a_defined_vms_vgpu(cli, workdir):
    """A MIG layout change removes every vGPU of the GPU and makes new ones: a VM defined with one of
    them would lose it, so the MIG step refuses before its first write, as the vGPU plan does."""
    from vgpu_dm.sim.host import write_log

    config = Path(__file__).resolve().parents[2] / "examples" / "config-mig.yaml"
    root = workdir / "host"
    create_host(root, ["A100"])
    run(cli, "apply", root, config, "A100-1-5C")
    uuid = snapshot(root)[0][2]
    sim(cli, "define", str(root), "train01", "--vgpu", uuid)
    logged = len(write_log(root))
    result = run(cli, "apply", root, config, "A100-2-10C", code=1)
    assert f"{uuid} is assigned to VM 'train01' (shut off)" in result.err and "MIG layout" in result.err
    assert len(write_log(root)) == logged
    run(cli, "apply", root, config, "A100-2-10C", "--allow-assigned", "train01")
    assert layouts(root) == [{"A100-2-10C": 3}]


def test_sim_vm_names_with_xml_characters_are_escaped_and_a_broken_file_is_a_usage_error(cli, host):
    root, _config = host
    uuid = mdevs(root)[0]
    sim(cli, "define", str(root), "R&D <lab>", "--vgpu", uuid, "--start")
    listed = cli("list", "--sim", str(root))
    assert listed.code == 0 and "warning" not in listed.err, listed.err
    row = next(r for r in parse_table(listed.out, LIST_COLUMNS, fill=LIST_COLUMNS[:5]) if r["UUID"] == uuid)
    assert row["VM"] == "R&D <lab> (running)"
    sim(cli, "shutdown", str(root), "R&D <lab>")
    (root / "etc/libvirt/qemu/bad.xml").write_text("<domain><name>bad</name><devices></domain>")
    failed = sim(cli, "start", str(root), "bad", code=2)
    assert "bad.xml" in failed.err and "not well-formed XML" in failed.err and "Traceback" not in failed.err


def test_allow_assigned_refuses_names_no_domain_has_and_takes_uuids_in_any_case(cli, host):
    root, config = host
    victim = mdevs(root)[0]
    sim(cli, "define", str(root), "win10", "--vgpu", victim)
    logged = len(writes(root))
    typo = run(cli, "apply", root, config, "switch", "--allow-assigned", "win1O", "--force", code=1)
    assert "--allow-assigned win1O: no libvirt VM has that name or UUID" in typo.err
    assert "win10" in typo.err and len(writes(root)) == logged
    plan = run(cli, "plan", root, config, "switch", "--allow-assigned", "win1O", code=1)
    assert "--allow-assigned win1O: no libvirt VM has that name or UUID" in plan.out
    domain_uuid = json.loads(cli("list", "--sim", str(root), "--json").out)["gpus"][0]["vgpus"]
    domain_uuid = next(v for v in domain_uuid if v["uuid"] == victim)["assigned"][0]["uuid"]
    sim(cli, "define", str(root), "db01", "--vgpu", sorted(vfs(root))[1])
    run(
        cli,
        "apply",
        root,
        config,
        "switch",
        "--allow-assigned",
        domain_uuid.upper(),
        "--allow-assigned",
        "db01",
    )
    assert layouts(root) == [{"T4-8Q": 2}, {"L40S-16Q": 3}]


def test_the_plan_does_not_call_a_vf_a_running_vm_holds_valid_when_it_is_recreated(cli, host):
    """A recreate keeps a stopped VM's definition valid; a running VM holds its VF open, and the driver
    refuses to destroy it (even with --force): the summary must say so, as the problem line does."""
    root, config = host
    vf = sorted(vfs(root))[1]
    sim(cli, "define", str(root), "db01", "--vgpu", vf, "--start")
    plan = run(cli, "plan", root, config, "mixed", code=1).out
    problem = next(line for line in plan.splitlines() if "problem:" in line and vf in line)
    assert "stop the VM first (the driver refuses to destroy a vendor-VFIO vGPU" in problem
    assert "or pass --force" not in problem
    summary = next(line for line in plan.splitlines() if line.startswith("  VM 'db01'"))
    assert "recreated with the same VF: apply refuses this while the VM has it open" in summary
    assert "stays valid" not in plan
    report = json.loads(run(cli, "plan", root, config, "mixed", "--json", code=1).out)
    (vgpu,) = report["assigned"][0]["vgpus"]
    assert (vgpu["action"], vgpu["held"], vgpu["allowed"]) == ("recreate", True, False)
