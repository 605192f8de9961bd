"""MIG-backed vGPUs with nvidia-mig-parted's real semantics (issue 17), each sequence run against the real
binary (shared/mig-parted-mock; skipped without it, failed under CI=true) and against the simulated one:

- a config for GPU 0 alone on a 2-GPU host, applied twice: the second run writes nothing (mig-parted's
  own assert would fail on the other GPU; the state comes from export);
- a mig-parted whose NVML cannot load: nothing written, its own message shown;
- a VM on GPU 1 refuses a mode change on GPU 0 (the reset covers every GPU), zero writes; --force tries
  and rolls back when a reset is needed, succeeds when the mode changes at once;
- the other GPUs' vGPUs and instances taken down and put back around a reset that is really needed;
- GPU identity by PCI bus id when NVML does not see a GPU bound to vfio-pci;
- a no-op apply with no nvidia-mig-parted, nvidia-smi or sriov-manage installed;
- the preview takes apply's --skip-mig and predicts it; mig-config refuses what apply refuses;
- list shows MIG mode and instances; log lines in order with one [i/n] numbering per run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.simstate import arm, layouts, snapshot
from vgpu_dm.sim.host import SimHostRoot, write_log
from vgpu_dm.sim.layout import SimState, create_host

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "config-mig.yaml"
PER_GPU = """\
version: v1
vgpu-configs:
  gpu0-mig:
    - device-filter: "{filter}"
      devices: [0]
      vgpu-devices: {{"{mig}": {count}}}
  gpu0-mig-gpu1-sliced:
    - device-filter: "{filter}"
      devices: [0]
      vgpu-devices: {{"{mig}": {count}}}
    - device-filter: "{filter}"
      devices: [1]
      vgpu-devices: {{"{sliced}": 1}}
  sliced:
    - device-filter: "{filter}"
      devices: all
      vgpu-devices: {{"{sliced}": 1}}
"""
GPUS = {
    "A100": {"filter": "0x20F110DE", "mig": "A100-1-5C", "count": 7, "sliced": "A100-40C"},
    "H100XM": {"filter": "0x233010DE", "mig": "H100XM-1-10C", "count": 7, "sliced": "H100XM-80C"},
}


def per_gpu(workdir: Path, gpu: str = "A100") -> Path:
    path = workdir / f"{gpu}.yaml"
    path.write_text(PER_GPU.format(**GPUS[gpu]))
    return path


def instances(root: Path) -> list[dict[str, int]]:
    return [dict(Counter(gi["profile"] for gi in g.gpu_instances)) for g in SimState.load(root).gpus]


def modes(root: Path) -> list[tuple[bool, bool | None]]:
    return [(g.mig_mode, g.mig_pending) for g in SimState.load(root).gpus]


def apply(cli, root: Path, config: Path, name: str, *more: str):
    return cli("apply", "--sim", str(root), "-f", str(config), "-c", name, *more)


def host(workdir: Path, gpus=("A100", "A100"), **options) -> Path:
    root = workdir / "host"
    create_host(root, list(gpus), options=options or None)
    return root


def test_config_for_gpu_0_only_applied_twice_writes_nothing_the_second_time(cli, workdir, mig_parted) -> None:
    root = host(workdir)
    config = per_gpu(workdir)
    first = apply(cli, root, config, "gpu0-mig")
    assert first.code == 0, first.err
    assert layouts(root) == [{"A100-1-5C": 7}, {}]
    assert instances(root) == [{"1g.5gb": 7}, {}] and modes(root) == [(True, None), (False, None)]
    # mig-parted's own assert of the translated config fails: it covers GPU 0 only, and assert wants every
    # GPU of the host to match (upstream's AssertMigConfig).
    translated = cli("mig-config", "-f", str(config), "-c", "gpu0-mig").out
    assert SimHostRoot(root).run(["nvidia-mig-parted", "assert", "-f", "-"], input=translated).returncode == 1
    before, logged = snapshot(root), len(write_log(root))
    second = apply(cli, root, config, "gpu0-mig")
    assert second.code == 0, second.err
    assert "already applied" in second.err and "nvidia-mig-parted" not in second.err
    assert (snapshot(root), len(write_log(root))) == (before, logged)  # same UUIDs, zero writes
    assert cli("assert", "--sim", str(root), "-f", str(config), "-c", "gpu0-mig").code == 0
    # A change on GPU 1 alone leaves GPU 0's vGPUs and instances as they are.
    third = apply(cli, root, config, "gpu0-mig-gpu1-sliced")
    assert third.code == 0, third.err
    assert [d for d in snapshot(root) if d[0] == before[0][0]] == before
    assert layouts(root) == [{"A100-1-5C": 7}, {"A100-40C": 1}] and instances(root)[0] == {"1g.5gb": 7}


def test_mig_parted_failing_with_an_nvml_error_writes_nothing(cli, workdir, mig_parted) -> None:
    root = host(workdir)
    config = per_gpu(workdir)
    assert apply(cli, root, config, "sliced").code == 0
    before, logged = snapshot(root), len(write_log(root))
    arm(cli, root, "--mig-parted", "nvml")
    result = apply(cli, root, config, "gpu0-mig")
    assert result.code == 1
    assert "nvidia-mig-parted export failed" in result.err and "Error initializing NVML" in result.err
    assert "Traceback" not in result.err
    assert (snapshot(root), len(write_log(root)), modes(root)) == (before, logged, [(False, None)] * 2)
    # The preview says the same, and exits 1 as apply does.
    preview = cli("plan", "--sim", str(root), "-f", str(config), "-c", "gpu0-mig")
    assert preview.code == 1 and "Error initializing NVML" in preview.out


def _hold_gpu1(cli, root: Path) -> tuple[str, int]:
    uuid = json.loads(cli("list", "-o", "json", "--sim", str(root)).out)["gpus"][1]["vgpus"][0]
    key = uuid["uuid"] or uuid["parent"]
    held = cli("sim", "hold", str(root), key)
    assert held.code == 0, held.err
    return key, int(re.search(r"pid (\d+)", held.out)[1])


def test_a_vm_on_gpu_1_blocks_a_mode_change_on_gpu_0(cli, workdir, mig_parted) -> None:
    root = host(workdir)
    config = per_gpu(workdir)
    assert apply(cli, root, config, "sliced").code == 0
    key, pid = _hold_gpu1(cli, root)
    before, logged = snapshot(root), len(write_log(root))
    result = apply(cli, root, config, "gpu0-mig-gpu1-sliced")
    assert result.code == 1
    assert f"GPU 1 (0000:5e:00.0): A100-40C {key} is in use by pid {pid}" in result.err
    assert (
        "nvidia-mig-parted resets every GPU of the host" in result.err and "stop the VM first" in result.err
    )
    assert (snapshot(root), len(write_log(root)), modes(root)) == (before, logged, [(False, None)] * 2)
    # --force tries: the A100's mode change needs a reset, which fails while the VM runs; all is put back,
    # the pending mode too.
    forced = apply(cli, root, config, "gpu0-mig-gpu1-sliced", "--force")
    assert forced.code == 1
    assert "the MIG mode change needs a GPU reset, which could not be done" in forced.err
    assert "were put back as they were" in forced.err and "Traceback" not in forced.err
    assert snapshot(root) == before and modes(root) == [(False, None)] * 2


def test_with_force_a_mode_change_that_needs_no_reset_goes_ahead(cli, workdir, mig_parted) -> None:
    """Hopper (immediate mode change, as reported; the simulator's "auto"): no reset, so the VM on GPU 1
    is not in the way once --force says to try."""
    root = host(workdir, ("H100XM", "H100XM"))
    config = per_gpu(workdir, "H100XM")
    assert apply(cli, root, config, "sliced").code == 0
    key, _ = _hold_gpu1(cli, root)
    gpu1 = [d for d in snapshot(root) if d[3] == key]
    assert apply(cli, root, config, "gpu0-mig-gpu1-sliced").code == 1
    forced = apply(cli, root, config, "gpu0-mig-gpu1-sliced", "--force")
    assert forced.code == 0, forced.err
    assert layouts(root) == [{"H100XM-1-10C": 7}, {"H100XM-80C": 1}]
    assert [d for d in snapshot(root) if d[3] == key] == gpu1


@pytest.mark.parametrize("reset_with_vgpus", ["refuse", "destroy"])
def test_a_reset_takes_other_gpus_vgpus_and_instances_down_and_puts_them_back(
    cli, workdir, mig_parted, reset_with_vgpus
) -> None:
    """GPU 2 keeps its MIG layout and vGPUs, GPU 1 its time-sliced vGPU, while GPU 0 changes mode: the
    reset clears every GPU's instances (and, on one kind of host, fails while a GPU has vGPUs, on the other
    destroys them), so apply takes those vGPUs down first and puts instances and vGPUs back — same UUIDs."""
    root = host(workdir, ("A100", "A100", "A100"), reset_with_vgpus=reset_with_vgpus)
    config = workdir / "three.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n"
        '  start:\n    - devices: [0, 1]\n      vgpu-devices: {"A100-40C": 1}\n'
        '    - devices: [2]\n      vgpu-devices: {"A100-2-10C": 3}\n'
        '  change:\n    - devices: [0]\n      vgpu-devices: {"A100-1-5C": 7}\n'
        '    - devices: [1]\n      vgpu-devices: {"A100-40C": 1}\n'
        '    - devices: [2]\n      vgpu-devices: {"A100-2-10C": 3}\n'
    )
    assert apply(cli, root, config, "start").code == 0
    others = [d for d in snapshot(root) if d[0] != "0000:3b:00.0"]
    result = apply(cli, root, config, "change")
    assert result.code == 0, result.err
    assert "waits for a GPU reset" in result.err and "are taken down first" in result.err
    assert layouts(root) == [{"A100-1-5C": 7}, {"A100-40C": 1}, {"A100-2-10C": 3}]
    assert instances(root) == [{"1g.5gb": 7}, {}, {"2g.10gb": 3}]
    assert [d for d in snapshot(root) if d[0] != "0000:3b:00.0"] == others


def test_gpu_identity_is_the_pci_bus_id_not_our_index(cli, workdir, mig_parted) -> None:
    """GPU 0 is bound to vfio-pci (passed through to a VM): NVML does not see it, so our GPU 1 is
    mig-parted's GPU 0. The entries given to mig-parted use its indices and keep the device-filter."""
    root = workdir / "host"
    create_host(root, ["A100", "A100", "A100"], passthrough=(0,))
    config = workdir / "c.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  c:\n    - device-filter: "0x20F110DE"\n      devices: [2]\n'
        '      vgpu-devices: {"A100-1-5C": 7}\n'
    )
    result = cli("-d", "apply", "--sim", str(root), "-f", str(config))
    assert result.code == 0, result.err
    assert layouts(root) == [{}, {}, {"A100-1-5C": 7}]
    assert instances(root) == [{}, {}, {"1g.5gb": 7}]
    # The plan says which NVML index our GPU 2 is.
    plan = cli("plan", "--sim", str(root), "-f", str(config), "--json")
    assert json.loads(plan.out)["gpus"][2]["status"] == "unchanged"


def test_noop_apply_needs_no_mig_parted_nvidia_smi_or_sriov_manage(cli, workdir, mig_parted) -> None:
    root = host(workdir)
    assert apply(cli, root, CONFIG, "A100-1-5C").code == 0
    for program in ("usr/bin/nvidia-mig-parted", "usr/bin/nvidia-smi", "usr/lib/nvidia/sriov-manage"):
        (root / program).unlink()
    before, logged = snapshot(root), len(write_log(root))
    result = apply(cli, root, CONFIG, "A100-1-5C")
    assert result.code == 0, result.err
    assert (snapshot(root), len(write_log(root))) == (before, logged)
    assert cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C").code == 0
    # A change does need them, and says so before writing anything.
    changed = apply(cli, root, CONFIG, "A100-2-10C")
    assert changed.code == 1 and "not found" in changed.err and len(write_log(root)) == logged


def test_preview_takes_skip_mig_and_predicts_apply(cli, workdir) -> None:
    root = host(workdir)
    for args in (("plan",), ("apply", "--dry-run")):
        preview = cli(*args, "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C", "--skip-mig")
        assert preview.code == 1, preview.out
        assert "mig " not in preview.out and "cannot be created now" in preview.out
    real = apply(cli, root, CONFIG, "A100-1-5C", "--skip-mig")
    assert real.code == 1 and write_log(root) == []
    preview = cli("plan", "--sim", str(root), "-f", str(CONFIG), "-c", "A100-1-5C")
    assert preview.code == 0 and "mig      MIG mode on, GPU instances 7 x 1g.5gb" in preview.out


def test_plan_takes_every_option_apply_takes() -> None:
    from vgpu_dm.cli.apply_cmd import apply_cmd
    from vgpu_dm.cli.plan_cmd import plan_cmd

    def names(command) -> set[str]:
        return {o for p in command.params for o in p.opts}

    # What only apply has: --dry-run (plan is one) and -a/--valid-config (checks the file, no preview).
    only_apply = {"--dry-run", "-a", "--valid-config"}
    assert names(apply_cmd) - only_apply <= names(plan_cmd)


def test_mig_config_refuses_what_apply_refuses(cli, workdir) -> None:
    config = workdir / "c.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {"A100-1-5C": 8}\n'
    )
    result = cli("mig-config", "-f", str(config))
    assert result.code == 2 and result.out == ""
    assert "8 x A100-1-5C requested, but the GPU holds at most 7" in result.err
    root = host(workdir)
    assert apply(cli, root, config, "c").code == 1 and write_log(root) == []


def test_list_shows_mig_mode_and_instances(cli, workdir, mig_parted) -> None:
    root = host(workdir, ("A100", "A100", "T4"))
    config = per_gpu(workdir)
    assert apply(cli, root, config, "gpu0-mig").code == 0
    table = cli("list", "--sim", str(root))
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split()[5] == "MIG"
    assert "on 7x1g.5gb" in lines[1] and " off " in next(line for line in lines if line.startswith("1 "))
    listed = json.loads(cli("list", "-o", "json", "--sim", str(root)).out)["gpus"]
    assert [g["mig"] for g in listed] == [
        {"mode": "on", "pending": None, "instances": {"1g.5gb": 7}},
        {"mode": "off", "pending": None, "instances": {}},
        None,
    ]
    arm(cli, root, "--mig-parted", "nvml")
    broken = cli("list", "-o", "json", "--sim", str(root))
    assert broken.code == 0 and "MIG mode and GPU instances unknown" in broken.err
    assert json.loads(broken.out)["gpus"][0]["mig"]["mode"] == "unknown"


def test_log_says_what_happens_in_order_with_one_numbering(cli, workdir) -> None:
    root = host(workdir)
    assert apply(cli, root, CONFIG, "A100-1-5C").code == 0
    result = apply(cli, root, CONFIG, "A100-40C")
    assert result.code == 0, result.err
    lines = [re.search(r'msg="([^"]*)"', line)[1] for line in result.err.splitlines() if "msg=" in line]
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(text))
        for text in (
            "[1/2] GPU 0 (0000:3b:00.0): MIG on, 7 x 1g.5gb -> MIG off; remove 7 x A100-1-5C",
            "GPU 0 (0000:3b:00.0): MIG mode off (nvidia-mig-parted)",
            "[1/2] GPU 0 (0000:3b:00.0): create 1 x A100-40C",
        )
    ]
    assert order == sorted(order)
    assert not [line for line in lines if line.startswith("[1/1]")]
    # Only instances change: no word of MIG mode.
    changed = apply(cli, root, CONFIG, "A100-1-5C")
    again = apply(cli, root, CONFIG, "A100-2-10C")
    assert changed.code == 0 and again.code == 0
    assert "MIG mode" not in again.err and "GPU instances 3 x 2g.10gb (nvidia-mig-parted)" in again.err


@pytest.mark.parametrize("hang", ["nvidia-mig-parted", "nvidia-mig-parted apply"])
def test_mig_parted_that_hangs_is_killed_and_everything_put_back(cli, workdir, mig_parted, hang) -> None:
    """Killed after the tools' timeout: reading the state (export) hanging stops before any write;
    apply hanging ends in the rollback, not a traceback."""
    root = host(workdir)
    assert apply(cli, root, CONFIG, "A100-40C").code == 0
    before, logged = snapshot(root), len(write_log(root))
    assert cli("sim", "fault", str(root), "--hang", hang).code == 0
    result = apply(cli, root, CONFIG, "A100-1-5C")
    assert result.code == 1 and "Traceback" not in result.err
    assert "did not finish within" in result.err and "was killed" in result.err
    assert snapshot(root) == before and modes(root) == [(False, None)] * 2
    if hang == "nvidia-mig-parted":
        assert len(write_log(root)) == logged
    else:
        assert "were put back as they were" in result.err


def test_a_run_killed_while_other_gpus_vgpus_are_down_gets_them_back(
    cli, run_cli, workdir, mig_parted
) -> None:
    """Killed after GPU 1's vGPU was taken down for the reset and before it came back: the journal still
    has it, and the next apply's recovery puts it back with the same UUID, then finishes the change."""
    root = host(workdir)
    config = per_gpu(workdir)
    assert apply(cli, root, config, "sliced").code == 0
    gpu1 = [d for d in snapshot(root) if d[0] == "0000:5e:00.0"]
    assert cli("sim", "fault", str(root), "--kill-at-write", "3").code == 0
    killed = run_cli("apply", "--sim", str(root), "-f", str(config), "-c", "gpu0-mig-gpu1-sliced")
    assert killed.code == -9, killed.err
    assert [d for d in snapshot(root) if d[0] == "0000:5e:00.0"] == []  # down at the kill
    assert cli("sim", "fault", str(root)).code == 0
    again = apply(cli, root, config, "gpu0-mig-gpu1-sliced")
    assert again.code == 0, again.err
    assert "interrupted apply" in again.err
    assert layouts(root) == [{"A100-1-5C": 7}, {"A100-40C": 1}]
    assert [d for d in snapshot(root) if d[0] == "0000:5e:00.0"] == gpu1
