"""The simulated driver's MIG model and the simulated nvidia-mig-parted, read back from the tree.

The hosts here let MIG mode change while VFs are on (``mig_on_with_vfs: allow``) unless a test says
otherwise: what is tested is the driver model, not the order apply chooses (tests/e2e/test_mig_apply.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vgpu_dm.sim import mig_parted
from vgpu_dm.sim.driver import PCI_DIR
from vgpu_dm.sim.faults import Faults
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState

MIG_ON = (
    "version: v1\nmig-configs:\n  c:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {%s}\n"
)
MIG_OFF = "version: v1\nmig-configs:\n  c:\n    - devices: all\n      mig-enabled: false\n"


@pytest.fixture
def sim_host(tmp_path):
    """Factory: a simulated host whose MIG mode may change with VFs on."""
    counter = iter(range(1000))

    def make(*gpus: str, **options: str) -> Path:
        from vgpu_dm.sim.layout import create_host

        root = tmp_path / f"host{next(counter)}"
        create_host(root, list(gpus), options={"mig_on_with_vfs": "allow", **options})
        return root

    return make


def parted(root: Path, *args: str, config: str | None = None):
    argv = ["nvidia-mig-parted", *args]
    if config is not None:
        argv += ["-f", "-"]
    return mig_parted.run(root, argv, config, env={})


def available(root: Path, vf: str) -> dict[str, int]:
    base = root / PCI_DIR / vf / "mdev_supported_types"
    return {
        (base / d / "name").read_text().split()[-1]: int((base / d / "available_instances").read_text())
        for d in os.listdir(base)
    }


def creatable(root: Path, vf: str) -> list[str]:
    text = (root / PCI_DIR / vf / "nvidia/creatable_vgpu_types").read_text()
    return [line.split()[-1] for line in text.splitlines()[1:]]


def test_mig_types_appear_exactly_with_matching_instances_on_mdev(sim_host) -> None:
    root = sim_host("A100")
    vf = SimState.load(root).gpus[0].vfs[0]
    before = available(root, vf)
    assert before["A100-40C"] == 1 and before["A100-1-5C"] == 0
    assert parted(root, "assert", config=MIG_ON % '"1g.5gb": 7').returncode == 1
    done = parted(root, "apply", config=MIG_ON % '"1g.5gb": 7')
    assert done.returncode == 0, done.stderr
    assert "MIG configuration applied successfully" in done.stdout
    assert parted(root, "assert", config=MIG_ON % '"1g.5gb": 7').returncode == 0
    after = available(root, vf)
    assert after["A100-1-5C"] == 1
    assert after["A100-40C"] == 0 and after["A100-1-10C"] == 0 and after["A100-2-10C"] == 0
    host = SimHostRoot(root)
    gpu = SimState.load(root).gpus[0]
    type_dir = next(
        d for d in os.listdir(root / PCI_DIR / vf / "mdev_supported_types") if available(root, vf)
    )
    assert type_dir
    made = 0
    for vf in gpu.vfs:
        tdir = next(
            d
            for d in os.listdir(root / PCI_DIR / vf / "mdev_supported_types")
            if (root / PCI_DIR / vf / "mdev_supported_types" / d / "name").read_text().split()[-1]
            == "A100-1-5C"
        )
        path = f"sys/bus/pci/devices/{vf}/mdev_supported_types/{tdir}/create"
        try:
            host.write_text(path, f"00000000-0000-4000-8000-{made:012d}")
            made += 1
        except OSError as exc:
            assert made == 7 and exc.errno == errno.EUSERS
            break
    assert made == 7
    # Instances with vGPUs in them cannot be destroyed: mig-parted cannot reconfigure the GPU now.
    busy = parted(root, "apply", config=MIG_ON % '"2g.10gb": 3')
    assert busy.returncode == 1 and "In use" in busy.stderr


def test_placements_follow_the_h200_capture(sim_host) -> None:
    root = sim_host("A100", "H200", "A30")
    ok = MIG_ON.replace("devices: all", "devices: [0]")
    assert parted(root, "apply", config=ok % '"4g.20gb": 1, "3g.20gb": 1').returncode == 0
    assert parted(root, "apply", config=ok % '"4g.20gb": 1, "2g.10gb": 1, "1g.5gb": 1').returncode == 0
    # The order that fits is found: 3g.20gb must sit at slice 4 for 2g.10gb and two 1g.5gb to fit.
    assert parted(root, "apply", config=ok % '"3g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2').returncode == 0
    assert sorted((gi["profile"], gi["start"]) for gi in SimState.load(root).gpus[0].gpu_instances) == [
        ("1g.5gb", 2),
        ("1g.5gb", 3),
        ("2g.10gb", 0),
        ("3g.20gb", 4),
    ]
    # Two 3g.20gb take all eight memory slices: no 1g.5gb beside them.
    assert parted(root, "apply", config=ok % '"3g.20gb": 2, "1g.5gb": 1').returncode == 1
    assert parted(root, "apply", config=ok % '"2g.10gb": 3, "1g.5gb": 1').returncode == 0
    assert parted(root, "apply", config=ok % '"1g.5gb": 6, "1g.5gb+me": 1').returncode == 0
    full = parted(root, "apply", config=ok % '"2g.10gb": 4')
    assert full.returncode == 1 and "all orderings failed" in full.stderr
    # 1g.10gb takes two memory slices: four fit, a fifth does not.
    assert parted(root, "apply", config=ok % '"1g.10gb": 5').returncode == 1
    assert parted(root, "apply", config=ok % '"1g.5gb+me": 2').returncode == 1
    # A failed apply leaves no instances behind.
    assert SimState.load(root).gpus[0].gpu_instances == []
    a30 = ok.replace("[0]", "[2]")
    assert parted(root, "apply", config=a30 % '"2g.12gb": 2').returncode == 0
    assert parted(root, "apply", config=a30 % '"2g.12gb": 1, "1g.6gb": 2').returncode == 0
    assert parted(root, "apply", config=a30 % '"2g.12gb": 1, "1g.6gb": 3').returncode == 1


def test_vendor_vfio_order_rebind_and_eio(sim_host) -> None:
    root = sim_host("H200")
    host = SimHostRoot(root)
    address = SimState.load(root).gpus[0].address
    assert parted(root, "apply", config=MIG_ON % '"1g.18gb": 7').returncode == 0
    assert host.run(["sriov-manage", "-e", address]).returncode == 0
    # Enabling VFs rebinds the GPU: the instances are gone, MIG mode stays.
    gpu = SimState.load(root).gpus[0]
    assert gpu.mig_mode and gpu.gpu_instances == []
    assert parted(root, "assert", config=MIG_ON % '"1g.18gb": 7').returncode == 1
    vf = gpu.vfs[0]
    assert creatable(root, vf) == []
    mig_id = next(t.type_id for t in gpu.types if t.name == "H200-1-18C")
    with pytest.raises(OSError) as caught:
        host.write_text(f"sys/bus/pci/devices/{vf}/nvidia/current_vgpu_type", str(mig_id))
    assert caught.value.errno == errno.EIO
    assert parted(root, "apply", config=MIG_ON % '"1g.18gb": 7').returncode == 0
    assert creatable(root, vf) == ["H200-1-18C"]
    for n in range(7):
        host.write_text(f"sys/bus/pci/devices/{gpu.vfs[n]}/nvidia/current_vgpu_type", str(mig_id))
    assert creatable(root, gpu.vfs[7]) == []
    assert sorted(SimState.load(root).gpus[0].mig_hosts.values()) == list(range(1, 8))
    for n in range(7):
        host.write_text(f"sys/bus/pci/devices/{gpu.vfs[n]}/nvidia/current_vgpu_type", "0")
    assert SimState.load(root).gpus[0].mig_hosts == {}
    # MIG off is refused while VFs are enabled ...
    refused = parted(root, "apply", config=MIG_OFF)
    assert refused.returncode == 1 and "error setting MIG mode: ERROR_NOT_SUPPORTED" in refused.stderr
    assert host.run(["sriov-manage", "-d", address]).returncode == 0
    # ... and works without them.
    assert parted(root, "apply", config=MIG_OFF).returncode == 0
    assert not SimState.load(root).gpus[0].mig_mode


@pytest.mark.parametrize("off_with_vfs", ["refuse", "allow"])
def test_mig_off_with_vfs_is_a_host_option(sim_host, tmp_path, off_with_vfs) -> None:
    from vgpu_dm.sim.layout import create_host

    root = tmp_path / "h"
    create_host(root, ["A100"], options={"mig_off_with_vfs": off_with_vfs, "mig_on_with_vfs": "allow"})
    assert parted(root, "apply", config=MIG_ON % '"7g.40gb": 1').returncode == 0
    result = parted(root, "apply", config=MIG_OFF)
    assert (result.returncode == 0) == (off_with_vfs == "allow"), result.stderr


@pytest.mark.parametrize("reset", ["required", "immediate"])
def test_reset_fault_leaves_the_mode_change_pending(tmp_path, reset) -> None:
    from vgpu_dm.sim.layout import create_host

    root = tmp_path / "h"
    create_host(root, ["H100"], options={"mig_reset": reset})
    Faults(mig_parted="reset").save(root)
    result = parted(root, "apply", config=MIG_ON % '"1g.10gb": 7')
    gpu = SimState.load(root).gpus[0]
    if reset == "immediate":
        assert result.returncode == 0 and gpu.mig_mode
        return
    assert result.returncode == 1 and "error resetting all GPUs" in result.stderr
    assert not gpu.mig_mode and gpu.mig_pending is True
    assert parted(root, "assert", "--mode-only", config=MIG_ON % '"1g.10gb": 7').returncode == 1
    # --skip-reset: the change is left pending without an error.
    Faults().save(root)
    assert parted(root, "apply", "--mode-only", "--skip-reset", config=MIG_ON % "").returncode == 0
    assert SimState.load(root).gpus[0].mig_pending is True
    assert parted(root, "apply", config=MIG_ON % '"1g.10gb": 7').returncode == 0


def test_nvml_fault_changes_nothing(sim_host) -> None:
    root = sim_host("A100")
    Faults(mig_parted="nvml").save(root)
    result = parted(root, "apply", config=MIG_ON % '"1g.5gb": 7')
    assert result.returncode == 1 and "error initializing NVML: ERROR_UNKNOWN" in result.stderr
    assert not SimState.load(root).gpus[0].mig_mode
    # assert says "Assertion failure" for it, as the real one does; export says what it is.
    assert "Assertion failure" in parted(root, "assert", config=MIG_OFF).stderr
    assert "Error initializing NVML" in parted(root, "export").stderr


def test_flags_errors_and_export(sim_host, tmp_path) -> None:
    root = sim_host("A100", "T4")
    assert "valid" in parted(root, "assert", "--valid-config", config=MIG_ON % '"1g.5gb": 7').stdout
    assert parted(root, "apply", "--bogus", config=MIG_OFF).returncode == 1
    assert "config-file" in parted(root, "assert").stderr
    assert "not present: nope" in parted(root, "assert", "-c", "nope", config=MIG_OFF).stderr
    assert parted(root, "assert", config="version: v2\n").returncode == 1
    assert parted(root, "frobnicate").returncode == 1
    # devices: all skips the T4; naming it with MIG on is an error.
    assert parted(root, "apply", config=MIG_ON % '"1g.5gb": 1').returncode == 0
    t4 = MIG_ON.replace("devices: all", "devices: [1]") % ""
    assert parted(root, "apply", config=t4).returncode == 1
    path = tmp_path / "m.yaml"
    path.write_text(MIG_ON % '"1g.5gb": 1')
    # As upstream: apply skips a non-MIG GPU that "devices: all" selects, but assert fails on it.
    assert mig_parted.run(root, ["nvidia-mig-parted", "assert", "-f", str(path)], env={}).returncode == 1
    path.write_text((MIG_ON % '"1g.5gb": 1').replace("devices: all", "devices: [0]"))
    # A config for GPU 0 alone never asserts on a 2-GPU host: every GPU must match (smoke A5) ...
    assert (
        mig_parted.run(root, ["nvidia-mig-parted", "assert", f"--config-file={path}"], env={}).returncode == 1
    )
    # ... while the mode assertion walks only the GPUs it lists (A5b).
    assert (
        mig_parted.run(
            root, ["nvidia-mig-parted", "assert", "-m", f"--config-file={path}"], env={}
        ).returncode
        == 0
    )
    exported = parted(root, "export").stdout
    assert "1g.5gb: 1" in exported and "mig-enabled: false" in exported


def test_entry_point_uses_the_host_from_vgpu_dm_sim(sim_host) -> None:
    root = sim_host("A100")
    script = Path(sys.executable).parent / "nvidia-mig-parted-sim"
    env = {**os.environ, "VGPU_DM_SIM": str(root)}
    proc = subprocess.run(
        [str(script), "apply", "-f", "-"],
        input=MIG_ON % '"3g.20gb": 2',
        text=True,
        capture_output=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert [gi["profile"] for gi in SimState.load(root).gpus[0].gpu_instances] == ["3g.20gb", "3g.20gb"]
    env.pop("VGPU_DM_SIM")
    assert subprocess.run([str(script), "export"], capture_output=True, env=env).returncode == 2
