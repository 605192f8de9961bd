"""Behaviour of real hosts that the simulator once shared our assumptions about (issue 8).

Each test names the item of issue 8 it covers; each failed on the code before that item was fixed.
The simulator's side of every item rests on a source named in its module (kernel ABI docs, real
captures, NVIDIA's driver source), not on what the tool expects.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import writes
from tests.simstate import layouts, snapshot
from vgpu_dm.host.pci import address_key, is_pci_address
from vgpu_dm.sim.layout import SimState, create_host


def config(tmp_path: Path, name: str, layout: dict[str, int], devices: str = "all") -> Path:
    body = ", ".join(f'"{t}": {n}' for t, n in layout.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"version: v1\nvgpu-configs:\n  {name}:\n    - devices: {devices}\n      vgpu-devices: {{{body}}}\n"
    )
    return path


def apply(cli, root: Path, tmp_path: Path, name: str, layout: dict[str, int], *extra: str):
    return cli("apply", "--sim", str(root), "-f", str(config(tmp_path, name, layout)), *extra)


# -- 8.10 PCI domains of 4 to 8 hex digits ---------------------------------------------------------
def test_pci_addresses_with_long_domains_are_valid_and_sorted_numerically():
    assert is_pci_address("10000:01:00.0") and is_pci_address("0000:3b:00.0")
    assert is_pci_address("ffffffff:00:1f.7")
    assert not is_pci_address("123:01:00.0") and not is_pci_address("123456789:01:00.0")
    addresses = ["10000:01:00.0", "0000:3b:00.0", "ffff:00:00.0", "0001:00:00.0"]
    assert sorted(addresses, key=address_key) == [
        "0000:3b:00.0",
        "0001:00:00.0",
        "ffff:00:00.0",
        "10000:01:00.0",
    ]


def test_gpus_in_a_vmd_domain_get_their_vfs_enabled_and_vgpus(cli, tmp_path):
    """Before: 'refusing to pass '10000:3b:00.0' to sriov-manage: not a PCI address'."""
    root = tmp_path / "host"
    create_host(root, ["L40S"], pci_domain=0x10000)
    result = apply(cli, root, tmp_path, "two", {"L40S-12Q": 2})
    assert result.code == 0, result.err
    assert layouts(root) == [{"L40S-12Q": 2}]
    assert {d[0] for d in snapshot(root)} == {"10000:3b:00.0"}
    listing = cli("list", "--sim", str(root), "--json")
    assert json.loads(listing.out)["gpus"][0]["address"] == "10000:3b:00.0"


# -- 8.6 mdev type directories are <parent driver>-<id> --------------------------------------------
def test_mdev_types_on_vfs_bound_to_vfio_pci_are_found_by_name(cli, tmp_path):
    """Before: 'vGPU type A40-24Q is not supported on this GPU (it offers: none)'."""
    root = tmp_path / "host"
    create_host(root, ["A40"], vf_driver="vfio-pci")
    gpu = SimState.load(root).gpus[0]
    assert (root / "sys/bus/pci/devices" / gpu.vfs[0] / "mdev_supported_types").is_dir()
    first_type = sorted((root / "sys/bus/pci/devices" / gpu.vfs[0] / "mdev_supported_types").iterdir())[0]
    assert first_type.name.startswith("vfio-pci-")
    result = apply(cli, root, tmp_path, "two", {"A40-24Q": 2})
    assert result.code == 0, result.err
    assert layouts(root) == [{"A40-24Q": 2}]
    check = cli("assert", "--sim", str(root), "-f", str(tmp_path / "two.yaml"))
    assert check.code == 0, check.err
    listing = json.loads(cli("list", "--sim", str(root), "--json").out)["gpus"]
    assert [v["type"] for v in listing[0]["vgpus"]] == ["A40-24Q", "A40-24Q"]


# -- 8.7 catalog look-ups by the GPU's own model ---------------------------------------------------
def test_capacity_comes_from_the_gpus_model_not_another_with_the_same_type_name(cli, tmp_path):
    """Before: DC-16Q was allowed 6 times (the RTX PRO 6000's figure) on an RTX PRO 4500 (2): the plan
    passed and the third write failed and was rolled back; now the plan refuses with zero writes."""
    root = tmp_path / "host"
    create_host(root, ["RTX PRO 4500"])
    assert apply(cli, root, tmp_path, "one", {"DC-16Q": 1}).code == 0
    before = writes(root)
    result = apply(cli, root, tmp_path, "three", {"DC-16Q": 3})
    assert result.code == 1
    assert "3 x DC-16Q requested, but the GPU holds at most 2 x DC-16Q" in result.err, result.err
    assert writes(root) == before, "refused before any write"


# -- 8.4 iommufd cdevs: mdevs are held through /dev/vfio/devices/vfioN too ------------------------
def test_an_mdev_held_through_its_iommufd_cdev_is_in_use(cli, tmp_path):
    """Before: only /dev/vfio/<group> was checked for mdevs, so a VM using iommufd lost its vGPU."""
    root = tmp_path / "host"
    create_host(root, ["T4"])
    assert apply(cli, root, tmp_path, "four", {"T4-4Q": 4}).code == 0
    uuid = snapshot(root)[0][2]
    assert list((root / "sys/bus/mdev/devices" / uuid / "vfio-dev").iterdir()), "mdevs have a cdev"
    held = cli("sim", "hold", str(root), uuid, "--cdev")
    assert held.code == 0 and "/dev/vfio/devices/vfio" in held.out, held.out
    before = writes(root)
    result = apply(cli, root, tmp_path, "two", {"T4-8Q": 2})
    assert result.code == 1
    assert f"T4-4Q {uuid} is in use by pid" in result.err and "qemu-system-x86_64" in result.err
    assert writes(root) == before
    # A count going down removes the idle ones and keeps the held one.
    assert apply(cli, root, tmp_path, "three", {"T4-4Q": 3}).code == 0
    assert uuid in {d[2] for d in snapshot(root)}


# -- 8.2 driver root -------------------------------------------------------------------------------
def test_driver_programs_run_in_the_driver_root(cli, tmp_path):
    """A driver root nvidia-smi and sriov-manage live in only (a GPU Operator with a custom
    hostPaths.driverInstallDir: not run/nvidia/driver, which is looked in by default). Before: no
    --driver-root, so sriov-manage was looked for on the host root and apply gave up."""
    root = tmp_path / "host"
    create_host(root, ["L40S"], driver_root="opt/nvidia/driver")
    assert not (root / "usr/lib/nvidia/sriov-manage").exists()
    cfg = config(tmp_path, "two", {"L40S-12Q": 2})
    missing = cli("apply", "--sim", str(root), "-f", str(cfg))
    assert (
        missing.code == 1 and "sriov-manage was not found" in missing.err and "--driver-root" in missing.err
    )
    assert writes(root) == []
    driver = str(root / "opt/nvidia/driver")
    result = cli("apply", "--sim", str(root), "-f", str(cfg), "--driver-root", driver)
    assert result.code == 0, result.err
    assert layouts(root) == [{"L40S-12Q": 2}]
    env = cli("assert", "--sim", str(root), "-f", str(cfg), env={"VGPU_DM_DRIVER_ROOT": driver})
    assert env.code == 0, env.err


def test_every_host_command_takes_the_driver_root(cli, tmp_path):
    """Naming a full GPU's vGPUs needs nvidia-smi, which lives only in the driver root here: the read
    commands and the preview must find it there too, not only apply and assert."""
    root = tmp_path / "host"
    create_host(root, ["L40S"], driver_root="opt/nvidia/driver")
    driver = str(root / "opt/nvidia/driver")
    cfg = config(tmp_path, "full", {"L40S-48Q": 1})
    assert cli("apply", "--sim", str(root), "-f", str(cfg), "--driver-root", driver).code == 0
    for table in (root / "var/lib/nvidia-vgpu-dm/types").iterdir():
        table.unlink()
    before = writes(root)
    without = cli("plan", "--sim", str(root), "-f", str(cfg))
    assert without.code == 1 and "cannot name the vGPU type of" in without.out + without.err
    for args in (("plan", "-f", str(cfg)), ("apply", "--dry-run", "-f", str(cfg))):
        result = cli(*args, "--sim", str(root), "--driver-root", driver)
        assert result.code == 0 and "apply would change nothing" in result.out, result.err
    for command in ("list", "export", "types"):
        result = cli(command, "--sim", str(root), "--driver-root", driver)
        assert result.code == 0 and "L40S-48Q" in result.out, (command, result.err)
    via_env = cli("export", "--sim", str(root), env={"VGPU_DM_DRIVER_ROOT": driver})
    assert '"L40S-48Q": 1' in via_env.out, via_env.err
    assert writes(root) == before


def test_an_unnamed_vgpu_is_never_taken_for_a_foreign_one(cli, tmp_path):
    """A full GPU, no learned table and no working nvidia-smi: its vGPUs cannot be named. Before: they
    read type-<id>, so apply removed and recreated them; now plan and assert refuse with zero writes."""
    root = tmp_path / "host"
    create_host(root, ["L40S"])
    cfg = config(tmp_path, "full", {"L40S-48Q": 1})
    assert cli("apply", "--sim", str(root), "-f", str(cfg)).code == 0
    for table in (root / "var/lib/nvidia-vgpu-dm/types").iterdir():
        table.unlink()
    (root / "usr/bin/nvidia-smi").unlink()  # no nvidia-smi on the host root (it lives elsewhere)
    before = writes(root)
    results = [cli(c, "--sim", str(root), "-f", str(cfg)) for c in ("apply", "assert")]
    for result in results:
        assert result.code == 1, result.err
        assert "cannot name the vGPU type of" in result.err and "nvidia-smi not found" in result.err
    first = [x for x in results[0].err.splitlines() if "cannot name" in x]
    assert first and first == [x for x in results[1].err.splitlines() if "cannot name" in x]
    assert writes(root) == before
    assert layouts(root) == [{"L40S-48Q": 1}]


# -- 8.5 mixed sizes: the per-GPU field, before any write; mdev hosts too ---------------------------
def test_simulated_nvidia_smi_follows_the_real_layout(tmp_path):
    from vgpu_dm.host.smi import parse_mixed_size
    from vgpu_dm.sim.host import SimHostRoot

    root = tmp_path / "host"
    create_host(root, ["L40S", "T4"], mixed_size=False)
    out = SimHostRoot(root).run(["nvidia-smi", "-q"]).stdout
    driver_wide = out.index("Heterogenous Multi-vGPU")
    assert driver_wide < out.index("Attached GPUs") < out.index("GPU 00000000:3B:00.0")
    assert out.count("Heterogeneous Time-Slice Sizes") == 2
    assert parse_mixed_size(out, "0000:3b:00.0") == (False, False)
    assert parse_mixed_size(out, "0000:5e:00.0") == (False, False)


def test_mixed_sizes_unsupported_by_the_gpu_are_refused_before_sriov_manage(cli, tmp_path):
    """The driver-wide line says Supported, the GPU's own line Not Supported (as on real H100 NVL and
    P40 captures). Before: the driver-wide line was read, VFs were enabled and the switch then failed."""
    root = tmp_path / "host"
    create_host(root, ["L40S"], mixed_size=False)
    result = apply(cli, root, tmp_path, "mixed", {"L40S-12Q": 2, "L40S-4Q": 4})
    assert result.code == 1
    assert "Heterogeneous Time-Slice Sizes is not 'Supported'" in result.err, result.err
    assert SimState.load(root).gpus[0].vfs == [], "sriov-manage must not have run"
    assert writes(root) == []


def test_mixed_sizes_on_an_mdev_gpu(cli, tmp_path):
    """Mixed sizes exist on mdev hosts (a V100 on driver 580 ran 1Q + 2Q). Before: refused outright."""
    root = tmp_path / "host"
    create_host(root, ["V100D"])
    assert apply(cli, root, tmp_path, "equal", {"V100D-4Q": 2}).code == 0
    result = apply(cli, root, tmp_path, "mixed", {"V100D-1Q": 2, "V100D-2Q": 1, "V100D-8Q": 1})
    assert result.code == 0, result.err
    assert layouts(root) == [{"V100D-1Q": 2, "V100D-2Q": 1, "V100D-8Q": 1}]
    assert SimState.load(root).gpus[0].mixed_enabled
    check = cli("assert", "--sim", str(root), "-f", str(tmp_path / "mixed.yaml"))
    assert check.code == 0, check.err


# -- 8.14 mixed-size mode follows the layout, also through recovery --------------------------------
def test_returning_to_one_size_turns_mixed_size_mode_off(cli, tmp_path):
    """Before: the mode stayed on for good once a mixed layout had been applied."""
    root = tmp_path / "host"
    create_host(root, ["L40S"])
    assert apply(cli, root, tmp_path, "mixed", {"L40S-12Q": 2, "L40S-4Q": 4}).code == 0
    assert SimState.load(root).gpus[0].mixed_enabled
    result = apply(cli, root, tmp_path, "equal", {"L40S-12Q": 3})
    assert result.code == 0, result.err
    assert layouts(root) == [{"L40S-12Q": 3}]
    assert not SimState.load(root).gpus[0].mixed_enabled


def test_recovery_puts_mixed_size_mode_back(cli, run_cli, tmp_path):
    """An apply that switched the mode on is killed; the next apply's recovery switches it back off
    with the old devices (before: the devices came back, the mode stayed on)."""
    root = tmp_path / "host"
    create_host(root, ["L40S"])
    assert apply(cli, root, tmp_path, "equal", {"L40S-12Q": 2}).code == 0
    before = snapshot(root)
    n = len(writes(root))
    # Writes of the mixed apply: 2 removals, then (mode switched on) creations; die at the 1st creation.
    assert cli("sim", "fault", str(root), "--kill-at-write", "3").code == 0
    mixed = config(tmp_path, "mixed", {"L40S-12Q": 1, "L40S-4Q": 4})
    killed = run_cli("apply", "--sim", str(root), "-f", str(mixed))
    assert killed.code < 0, killed.err
    assert len(writes(root)) == n + 2 and SimState.load(root).gpus[0].mixed_enabled
    assert cli("sim", "fault", str(root)).code == 0
    back = cli("apply", "--sim", str(root), "-f", str(tmp_path / "equal.yaml"))
    assert back.code == 0, back.err
    assert "found an interrupted apply" in back.err
    assert snapshot(root) == before
    assert not SimState.load(root).gpus[0].mixed_enabled


def test_a_failed_first_apply_says_it_enabled_the_vfs(cli, tmp_path):
    """Before: a GPU whose VFs this run enabled was reported 'unchanged'."""
    root = tmp_path / "host"
    create_host(root, ["L40S"])
    assert cli("sim", "fault", str(root), "--fail-write", "2").code == 0
    result = apply(cli, root, tmp_path, "two", {"L40S-12Q": 2})
    assert result.code == 1
    assert "SR-IOV VFs, which this run enabled with sriov-manage, stay enabled" in result.err, result.err
    assert "unchanged" not in result.err
    assert SimState.load(root).gpus[0].vfs and snapshot(root) == []


# -- 8.11 a config that selects none of the host's GPUs --------------------------------------------
def test_a_host_without_nvidia_gpus_is_a_vacuous_success_with_a_warning(cli, tmp_path):
    root = tmp_path / "host"
    create_host(root, [])
    cfg = config(tmp_path, "any", {"T4-1Q": 1})
    for command in ("apply", "assert"):
        result = cli(command, "--sim", str(root), "-f", str(cfg))
        assert result.code == 0, result.err
        assert "level=warning" in result.err and "no NVIDIA GPUs" in result.err


# -- 8.13 read-only commands never write ------------------------------------------------------------
def test_list_and_assert_never_write(cli, tmp_path):
    """Before: list/assert created var/lib/nvidia-vgpu-dm/types and renamed an unreadable journal
    (so a user who can only read sysfs got 'Permission denied')."""
    root = tmp_path / "host"
    create_host(root, ["L40S", "T4"])
    cfg = config(tmp_path, "some", {"T4-4Q": 2}, devices="[1]")
    assert cli("apply", "--sim", str(root), "-f", str(cfg)).code == 0
    vfs_cfg = config(tmp_path, "vf", {"L40S-12Q": 2}, devices="[0]")
    assert cli("apply", "--sim", str(root), "-f", str(vfs_cfg)).code == 0
    state = root / "var/lib/nvidia-vgpu-dm"
    import shutil

    shutil.rmtree(state)
    journal = root / "run/nvidia-vgpu-dm/journal.json"
    journal.write_text("{not json")
    files_before = sorted(p for p in root.rglob("*") if ".vgpu-dm-sim" not in p.parts)
    for args in (("list",), ("list", "--json"), ("assert", "-f", str(cfg)), ("assert", "-f", str(vfs_cfg))):
        result = cli(*args, "--sim", str(root))
        assert "Traceback" not in result.err
    assert not state.exists(), "read-only commands created the learned-table directory"
    assert journal.read_text() == "{not json", "read-only commands touched the journal"
    assert sorted(p for p in root.rglob("*") if ".vgpu-dm-sim" not in p.parts) == files_before


# -- 8.9 subprocesses: timeouts and sriov-manage robustness ------------------------------------------
def test_a_hanging_nvidia_smi_is_a_clean_error_with_rollback(cli, tmp_path):
    """Before: subprocess.TimeoutExpired escaped as a traceback, with the GPU half-changed."""
    from vgpu_dm.apply import apply_config
    from vgpu_dm.errors import ApplyError, PlanError
    from vgpu_dm.host.programs import HostTools
    from vgpu_dm.sim.host import SimHostRoot
    from vgpu_dm.spec import load_spec, read_config_source

    root = tmp_path / "host"
    create_host(root, ["L40S"])
    assert apply(cli, root, tmp_path, "equal", {"L40S-12Q": 2}).code == 0
    before = snapshot(root)
    assert cli("sim", "fault", str(root), "--hang", "nvidia-smi").code == 0
    result = apply(cli, root, tmp_path, "mixed", {"L40S-12Q": 1, "L40S-4Q": 4})
    assert result.code == 1 and "Traceback" not in result.err
    assert "nvidia-smi did not finish within 120 s and was killed" in result.err, result.err
    assert snapshot(root) == before
    # The same through the API with a short timeout, as the agent would call it.
    data, source = read_config_source(str(tmp_path / "mixed.yaml"))
    entries = load_spec(data, source).select(None)[1]
    try:
        apply_config(entries, SimHostRoot(root), HostTools(timeout=0.5), source)
        raise AssertionError("apply should fail")
    except (ApplyError, PlanError) as exc:
        assert "did not finish within 0.5 s" in str(exc)
    assert snapshot(root) == before


def test_sriov_manage_unbind_lock_is_retried(cli, tmp_path):
    from vgpu_dm.apply import apply_config
    from vgpu_dm.host.programs import HostTools
    from vgpu_dm.sim.host import SimHostRoot
    from vgpu_dm.spec import load_spec, read_config_source

    root = tmp_path / "host"
    create_host(root, ["L40S"])
    cfg = config(tmp_path, "two", {"L40S-12Q": 2})
    data, source = read_config_source(str(cfg))
    entries = load_spec(data, source).select(None)[1]
    assert cli("sim", "fault", str(root), "--unbind-lock-failures", "2").code == 0
    apply_config(entries, SimHostRoot(root), HostTools(unbind_pause=0.01), source)
    assert layouts(root) == [{"L40S-12Q": 2}]
    # Failing every time: the error keeps sriov-manage's own output and says what to do.
    root2 = tmp_path / "host2"
    create_host(root2, ["L40S"])
    assert cli("sim", "fault", str(root2), "--unbind-lock-failures", "9").code == 0
    result = cli("apply", "--sim", str(root2), "-f", str(cfg))
    assert result.code == 1
    assert "Cannot obtain unbindLock for 0000:3b:00.0" in result.err
    assert "stop the NVML clients" in result.err and writes(root2) == []


def test_sriov_manage_that_makes_no_vfs_is_reported(tmp_path):
    """Before: 'virtual functions did not appear' without sriov-manage's output or a cause."""
    import pytest

    from vgpu_dm.apply import apply_config
    from vgpu_dm.errors import HostError
    from vgpu_dm.host.programs import HostTools
    from vgpu_dm.sim.faults import Faults
    from vgpu_dm.sim.host import SimHostRoot
    from vgpu_dm.spec import load_spec, read_config_source

    root = tmp_path / "host"
    create_host(root, ["L40S"])
    Faults(sriov_no_vfs=True).save(root)
    data, source = read_config_source(str(config(tmp_path, "two", {"L40S-12Q": 2})))
    entries = load_spec(data, source).select(None)[1]
    with pytest.raises(HostError) as caught:
        apply_config(entries, SimHostRoot(root), HostTools(vf_wait=0.3), source)
    text = str(caught.value)
    assert "sriov-manage -e exited 0 but created no virtual functions" in text
    assert "Enabling VFs on 0000:3b:00.0" in text and "BIOS" in text


# -- 8.1 running in a container ----------------------------------------------------------------------
def _self_root(tmp_path: Path, **files: str) -> Path:
    root = tmp_path / "self"
    for rel, text in files.items():
        path = root / rel.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    return root


def test_container_detection(tmp_path):
    from vgpu_dm.host.container import container_reason

    host_like = {"proc__1__cgroup": "0::/init.scope\n", "proc__1__sched": "systemd (1, #threads: 1)\n"}
    assert container_reason(str(_self_root(tmp_path / "a", **host_like))) is None
    assert container_reason(str(_self_root(tmp_path / "b", **{".dockerenv": ""}))) == "/.dockerenv exists"
    assert "containerenv" in container_reason(str(_self_root(tmp_path / "c", **{"run__.containerenv": ""})))
    k8s = {"proc__1__cgroup": "0::/kubepods.slice/kubepods-besteffort.slice/cri-containerd-0a1b.scope\n"}
    assert "kubepods" in container_reason(str(_self_root(tmp_path / "d", **k8s)))
    old_kernel = {"proc__1__cgroup": "0::/\n", "proc__1__sched": "python3 (48213, #threads: 1)\n"}
    assert "PID 48213 on the host" in container_reason(str(_self_root(tmp_path / "e", **old_kernel)))


def test_in_a_container_with_host_root_slash_removals_are_refused(cli, tmp_path):
    """Before: the container's /proc (only itself) was scanned, no VM was ever found, and a held vGPU
    would have been removed. Now plans that remove vGPUs are refused, naming --host-root /host."""
    import pytest

    from vgpu_dm.errors import HostError
    from vgpu_dm.host.inventory import Inventory
    from vgpu_dm.plan import build_plan
    from vgpu_dm.sim.host import SimHostRoot
    from vgpu_dm.spec import load_spec, read_config_source

    root = tmp_path / "host"
    create_host(root, ["T4"])
    assert apply(cli, root, tmp_path, "four", {"T4-4Q": 4}).code == 0

    def plan(name: str, layout: dict[str, int], force: bool = False):
        data, source = read_config_source(str(config(tmp_path, name, layout)))
        host = SimHostRoot(root)
        host.container = "/.dockerenv exists"  # what open_host finds for host root / in a container
        return build_plan(load_spec(data, source).select(None)[1], Inventory(host), source, force=force)

    with pytest.raises(HostError) as caught:
        plan("two", {"T4-8Q": 2})
    assert "runs in a container (/.dockerenv exists)" in str(caught.value)
    assert "--host-root /host" in str(caught.value) and "CAP_SYS_PTRACE" in str(caught.value)
    assert plan("more", {"T4-4Q": 4}).is_noop  # nothing to remove: nothing to check
    assert len(plan("forced", {"T4-8Q": 2}, force=True).changed) == 1


def test_open_host_slash_notices_this_container(tmp_path):
    import os

    import pytest

    from vgpu_dm.host.container import container_reason
    from vgpu_dm.host.root import open_host

    if not os.path.isdir("/sys/bus/pci/devices"):
        pytest.skip("no /sys here")
    host = open_host("/")
    assert host.container == container_reason("/")
