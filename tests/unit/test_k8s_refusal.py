"""The agent's answer to a plan that cannot go ahead: the Event reason, whether it retries by itself, and
advice of its own for vGPUs that VMs hold or are assigned, made from the problems' parts (never by
editing the CLI's text, whose advice names flags the agent does not have)."""

from __future__ import annotations

import pickle

import pytest

from vgpu_dm.errors import ASSIGNED, IN_USE, HeldProblem, PlanError
from vgpu_dm.k8s.reconcile import ASSIGNED_ADVICE, IN_USE_ADVICE, _plan_failed

HELD = HeldProblem(
    "GPU 0 (0000:3b:00.0): T4-8Q 1b2c is in use by pid 42 (qemu); the config would remove it",
    "stop the VM first (or pass --force to try anyway)",  # any CLI wording: none of it reaches the Event
    IN_USE,
)
NAMED = HeldProblem(
    "GPU 1 (0000:5e:00.0): T4-8Q 3d4e is assigned to VM 'win10' (shut off); the config would remove it",
    "change or undefine the VM first, or pass --allow-assigned win10 (or --force)",
    ASSIGNED,
)


def test_the_cli_reads_the_whole_text():
    assert str(HELD) == f"{HELD.what}: {HELD.advice}"
    assert str(PlanError([HELD])) == str(HELD)
    copy = pickle.loads(pickle.dumps(HELD))
    assert (copy, copy.what, copy.kind) == (HELD, HELD.what, IN_USE)


def test_in_use_gets_the_agents_advice():
    outcome = _plan_failed("T4-16Q", PlanError([HELD]))
    assert (outcome.reason, outcome.transient) == ("VGPUDeviceInUse", True)
    assert HELD.what in outcome.message and IN_USE_ADVICE in outcome.message
    assert "--force to try anyway" not in outcome.message


def test_assigned_and_in_use_together():
    outcome = _plan_failed("T4-16Q", PlanError([HELD, NAMED]))
    assert (outcome.reason, outcome.transient) == ("VGPUDeviceAssigned", True)
    assert IN_USE_ADVICE in outcome.message and ASSIGNED_ADVICE in outcome.message
    assert "--allow-assigned win10" not in outcome.message


def test_any_other_problem_keeps_the_whole_text_and_is_not_retried():
    other = "GPU 0 (0000:3b:00.0) [vgpu-configs.x[0]]: 2 x T4-16Q requested, but the GPU holds at most 1"
    outcome = _plan_failed("x", PlanError([HELD, other]))
    assert (outcome.reason, outcome.transient) == ("VGPUConfigNotApplicable", False)
    assert other in outcome.message and str(HELD) in outcome.message


@pytest.mark.parametrize(
    "gpu, before, after",
    [("T4", "T4-8Q", "T4-16Q"), ("L40S", "L40S-24Q", "L40S-48Q")],
    ids=["mdev", "vendor-vfio"],
)
def test_every_held_vgpu_problem_of_the_plan_has_its_parts(cli, tmp_path, gpu, before, after):
    """The plan's refusals to remove a vGPU a running VM holds (mdev and vendor-VFIO) are HeldProblems:
    the agent classifies them by kind, not by their text."""
    from tests.simstate import snapshot
    from vgpu_dm.host.inventory import Inventory
    from vgpu_dm.host.programs import HostTools
    from vgpu_dm.plan import build_plan
    from vgpu_dm.sim.host import SimHostRoot
    from vgpu_dm.sim.layout import create_host
    from vgpu_dm.spec import load_spec

    root = tmp_path / "host"
    create_host(root, [gpu])
    text = (
        f"version: v1\nvgpu-configs:\n  a: [{{devices: all, vgpu-devices: {{{before}: 2}}}}]\n"
        f"  b: [{{devices: all, vgpu-devices: {{{after}: 1}}}}]\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    assert cli("apply", "--sim", str(root), "-f", str(tmp_path / "c.yaml"), "-c", "a").code == 0
    _, _, uuid, parent = snapshot(root)[0]
    held = cli("sim", "hold", str(root), uuid or parent)
    assert held.code == 0, held.err
    spec = load_spec(text, "c.yaml")
    with pytest.raises(PlanError) as refused:
        build_plan(spec.select("b")[1], Inventory(SimHostRoot(root), HostTools()), "c.yaml", force=False)
    problems = refused.value.problems
    assert problems and all(isinstance(p, HeldProblem) and p.kind == IN_USE for p in problems), problems
