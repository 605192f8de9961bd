"""The agent's MIG step against a real kube-apiserver, with a simulated A100 host whose nvidia-mig-parted
is the real binary (when `make test` unpacked it; else the simulated one), and simulated systemctl and
reboot: a MIG change in order (pending → operands paused → MIG applied → vGPUs → success), the host GPU
clients stopped and started again, the mig-manager state file, ``rebooting`` with --with-reboot (the agent
restarted after the simulated reboot converges, or reports ``failed`` without a second reboot), never a
reboot while a VM runs on the host, an applied MIG config that pauses nothing, and the failures: no
nvidia-mig-parted, no --with-reboot."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.k8s.agentkit import (
    ON_BOTH,
    PAUSED_BOTH,
    NodeStage,
    SimSetup,
    node_events,
    node_labels,
    running_agent,
    set_labels,
    settings_for,
    state_is,
    wait_for,
)
from tests.simstate import arm, layouts
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.sim import services
from vgpu_dm.sim.host import write_log
from vgpu_dm.sim.layout import SimState, create_host

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "config-mig.yaml"
STATE_FILE = "/etc/systemd/system/nvidia-mig-manager.service.d/override.conf"


@pytest.fixture(autouse=True)
def fresh_logging():
    log.setup(debug=True)


@pytest.fixture
def stage(admin_client, k8s_node, k8s_namespace):
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    yield stage
    stage.stop()


@pytest.fixture
def driver_root(workdir) -> Path:
    """A driver root as the GPU Operator mounts it: NVML behind its soname link."""
    lib = workdir / "driver-root" / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libnvidia-ml.so.580.159.04").write_text("")
    os.symlink("libnvidia-ml.so.580.159.04", lib / "libnvidia-ml.so.1")
    return workdir / "driver-root"


def a100_host(workdir: Path, gpus=("A100", "A100"), mig_parted: bool = True, **options) -> SimSetup:
    """Two A100s with A100-40C applied (MIG mode off), a mig-manager override and two host GPU clients."""
    root = workdir / "host"
    passthrough = tuple(i for i, g in enumerate(gpus) if g == "T4")  # a T4 passed through whole to a VM
    create_host(root, list(gpus), options=options or None, passthrough=passthrough, mig_parted=mig_parted)
    state_file = root / STATE_FILE.lstrip("/")
    state_file.parent.mkdir(parents=True)
    state_file.write_text("[Service]\n")
    services.set_units(root, {"nvidia-dcgm.service": True, "nvsm.service": False})
    return SimSetup(root, CONFIG)


def mig_modes(root: Path) -> list[bool]:
    return [g.mig_mode for g in SimState.load(root).gpus]


def reboots(root: Path) -> int:
    return services.calls(root).count(["reboot"])


def agent_settings(node, namespace, sim, driver_root, **more):
    more.setdefault("default_config", "A100-40C")
    return settings_for(node, namespace, sim, driver_root=str(driver_root), **more)


def test_mig_change_in_order_with_gpu_clients(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root
):
    sim = a100_host(workdir)
    clients = workdir / "gpu-clients.yaml"
    clients.write_text("version: v1\nsystemd-services:\n  - nvidia-dcgm.service\n  - nvsm.service\n")
    seen = []

    def at_apply(change):  # the pre-apply slot: the node and the host services as the MIG step finds them
        seen.append((node_labels(admin_client, k8s_node), mig_modes(sim.root)))
        stage.note("apply")

    settings = agent_settings(
        k8s_node,
        k8s_namespace,
        sim,
        driver_root,
        with_shutdown_host_gpu_clients=True,
        gpu_clients_file=str(clients),
    )
    with running_agent(apiserver.admin_kubeconfig, settings, pre_apply=[at_apply]) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
        assert layouts(sim.root) == [{"A100-40C": 1}, {"A100-40C": 1}]
        began = time.monotonic()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
        wait_for(
            state_is(admin_client, k8s_node, L.SUCCESS, "A100-1-5C"), what="A100-1-5C applied", timeout=60
        )
        wait_for(lambda: agent.reconciled and agent.reconciled[-1][0] == "A100-1-5C", what="reconciled")
    assert layouts(sim.root) == [{"A100-1-5C": 7}, {"A100-1-5C": 7}]
    assert mig_modes(sim.root) == [True, True]
    pending = stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.PENDING, after=began)
    paused = stage.first("labels", lambda x: all(x.get(k) == L.PAUSED for k in PAUSED_BOTH), after=began)
    apply = stage.first("apply", after=began)
    success = wait_for(
        lambda: stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.SUCCESS, after=apply.at),
        what="the watch sees success",
    )
    assert None not in (pending, paused, apply), stage.history
    assert pending.at <= paused.at <= apply.at <= success.at
    labels, modes = seen[-1]
    assert labels[L.STATE_LABEL] == L.PENDING and modes == [False, False]  # MIG comes after the pause
    # The MIG step: the mig-manager selects the config; only the running client was stopped, and started.
    override = (sim.root / STATE_FILE.lstrip("/")).read_text()
    assert override == '[Service]\nEnvironment="MIG_PARTED_SELECTED_CONFIG=A100-1-5C"\n'
    calls = services.calls(sim.root)
    assert calls.index(["systemctl", "daemon-reload"]) < calls.index(
        ["systemctl", "stop", "--", "nvidia-dcgm.service"]
    )
    assert calls.index(["systemctl", "stop", "--", "nvidia-dcgm.service"]) < calls.index(
        ["systemctl", "start", "--", "nvidia-dcgm.service"]
    )
    assert ["systemctl", "stop", "--", "nvsm.service"] not in calls
    assert services.load(sim.root)["units"] == {"nvidia-dcgm.service": "active", "nvsm.service": "inactive"}
    events = node_events(admin_client, k8s_namespace, k8s_node)
    assert [e.reason for e in events] == ["VGPUConfigApplied", "VGPUConfigApplied"]
    assert "create 7 x A100-1-5C" in events[-1].message
    assert "nvidia-dcgm.service" in events[-1].message
    assert reboots(sim.root) == 0


def _pending_change(cli, apiserver, admin_client, node, settings, sim):
    """Apply A100-40C, arm the reset fault, ask for A100-1-5C; returns the agent's last outcome."""
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, node, L.SUCCESS), what="A100-40C applied")
        arm(cli, sim.root, "--mig-parted", "reset")
        set_labels(admin_client, node, {L.CONFIG_LABEL: "A100-1-5C"})
        wait_for(
            lambda: agent.reconciled and agent.reconciled[-1][0] == "A100-1-5C", what="reconciled", timeout=60
        )
        return agent.reconciled[-1][1]


def test_pending_mode_change_without_reboot_fails_clearly(
    cli, apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root
):
    sim = a100_host(workdir)
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root)
    outcome = _pending_change(cli, apiserver, admin_client, k8s_node, settings, sim)
    assert outcome.state == L.FAILED and not outcome.transient
    labels = node_labels(admin_client, k8s_node)
    assert labels[L.STATE_LABEL] == L.FAILED
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert event.reason == "MIGModeChangePending" and event.type == "Warning"
    assert "needs a GPU reset" in event.message and "--with-reboot" in event.message
    assert reboots(sim.root) == 0
    assert layouts(sim.root) == [{"A100-40C": 1}, {"A100-40C": 1}]  # the vGPUs were put back
    # ... and the pending MIG mode too: a later reset or reboot does not switch it behind our back.
    assert [g.mig_pending for g in SimState.load(sim.root).gpus] == [None, None]


@pytest.mark.parametrize("after_reboot", ["keep", "lose"])
def test_with_reboot_reboots_once_then_converges_or_fails(
    cli, apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root, after_reboot
):
    """keep: the reboot switches MIG mode, the restarted agent finishes the change (the reset fault is
    still armed, but no more mode change is needed). lose: the mode is lost again at boot, so the change
    did not take: the restarted agent reports failed and does not reboot a second time."""
    sim = a100_host(workdir, mig_after_reboot=after_reboot)
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root, with_reboot=True)
    outcome = _pending_change(cli, apiserver, admin_client, k8s_node, settings, sim)
    assert outcome.state == L.REBOOTING
    assert node_labels(admin_client, k8s_node)[L.STATE_LABEL] == L.REBOOTING
    assert reboots(sim.root) == 1
    rebooting = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert rebooting.reason == "MIGRebooting" and "rebooting the node" in rebooting.message
    assert layouts(sim.root) == [{}, {}]  # a reboot loses the vGPUs
    assert mig_modes(sim.root) == [after_reboot == "keep"] * 2

    # The agent starts again after the reboot (its pod is recreated), with the reset fault still armed.
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(lambda: agent.reconciled, what="first reconcile after the reboot", timeout=60)
        value, outcome = agent.reconciled[0]
    assert value == "A100-1-5C"
    assert reboots(sim.root) == 1  # never a second reboot
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    if after_reboot == "keep":
        assert outcome.state == L.SUCCESS, outcome
        assert labels[L.STATE_LABEL] == L.SUCCESS
        assert layouts(sim.root) == [{"A100-1-5C": 7}, {"A100-1-5C": 7}]
        assert event.reason == "VGPUConfigApplied"
    else:
        assert outcome.state == L.FAILED and not outcome.transient
        assert labels[L.STATE_LABEL] == L.FAILED
        assert event.reason == "MIGModeChangeFailed" and event.type == "Warning"
        assert "MIG mode change failed after reboot" in event.message
        assert "not rebooting again" in event.message


def test_mig_config_without_mig_parted_fails_before_touching_anything(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root
):
    sim = a100_host(workdir, mig_parted=False)
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        # A time-sliced config needs no nvidia-mig-parted: MIG mode is left as it is.
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="A100-40C applied")
        began = time.monotonic()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "A100-1-5C"})
        wait_for(state_is(admin_client, k8s_node, L.FAILED, "A100-1-5C"), what="failed", timeout=30)
        wait_for(lambda: agent.reconciled[-1][0] == "A100-1-5C", what="reconciled")
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert event.reason == "MIGNotAvailable"
    assert "nvidia-mig-parted in the host root" in event.message and "not found" in event.message
    assert layouts(sim.root) == [{"A100-40C": 1}, {"A100-40C": 1}]
    assert mig_modes(sim.root) == [False, False]
    assert services.calls(sim.root) == []
    # Refused before anything: the operands were never paused.
    assert (
        stage.first("labels", lambda x: any(x.get(k) == L.PAUSED for k in PAUSED_BOTH), after=began) is None
    )


def test_applied_mig_config_pauses_nothing_and_runs_no_program(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root
):
    """A config whose vGPUs already hold is a no-op: no operand pause, no nvidia-mig-parted (it may
    even be gone), state success."""
    sim = a100_host(workdir)
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root, default_config="A100-1-5C")
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(lambda: agent.reconciled, what="reconciled", timeout=60)
        assert agent.reconciled[0][1].state == L.SUCCESS, agent.reconciled
    assert layouts(sim.root) == [{"A100-1-5C": 7}, {"A100-1-5C": 7}]
    for program in ("usr/bin/nvidia-mig-parted", "usr/bin/nvidia-smi", "usr/lib/nvidia/sriov-manage"):
        (sim.root / program).unlink()
    logged = len(write_log(sim.root))
    began = time.monotonic()
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(lambda: agent.reconciled, what="reconciled after a restart")
        value, outcome = agent.reconciled[0]
    assert (value, outcome.result, outcome.state) == ("A100-1-5C", "unchanged", L.SUCCESS)
    assert len(write_log(sim.root)) == logged
    assert (
        stage.first("labels", lambda x: any(x.get(k) == L.PAUSED for k in PAUSED_BOTH), after=began) is None
    )


def test_never_reboots_while_a_vm_runs_on_the_host(
    cli, apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root
):
    """The mode change needs a reboot (the GPU reset fails), but a VM holds a device of the host (a T4
    passed through whole, which NVML does not see, so nothing else stops the change): no reboot,
    state failed, and an Event that says who holds what."""
    from vgpu_dm.sim.processes import add_holder

    sim = a100_host(workdir, gpus=("A100", "A100", "T4"))
    t4 = next(g for g in SimState.load(sim.root).gpus if g.pf_driver == "vfio-pci")
    group = os.path.basename(os.readlink(sim.root / "sys/bus/pci/devices" / t4.address / "iommu_group"))
    pid = add_holder(sim.root, f"/dev/vfio/{group}", "qemu-passthrough")
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root, with_reboot=True)
    outcome = _pending_change(cli, apiserver, admin_client, k8s_node, settings, sim)
    assert outcome.state == L.FAILED
    assert reboots(sim.root) == 0
    labels = node_labels(admin_client, k8s_node)
    assert labels[L.STATE_LABEL] == L.FAILED
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert event.reason == "MIGRebootBlocked" and event.type == "Warning"
    assert f"pid {pid} (qemu-passthrough)" in event.message and "not rebooted" in event.message
    assert layouts(sim.root)[:2] == [{"A100-40C": 1}, {"A100-40C": 1}]


@pytest.mark.parametrize("mig_reset", ["auto", "required"])
def test_after_a_reboot_that_lost_mig_mode_hopper_applies_again(
    cli, apiserver, admin_client, k8s_node, k8s_namespace, stage, workdir, driver_root, mig_reset
):
    """Hopper is reported to switch MIG mode at once and not to keep it across a reboot (both unconfirmed,
    so both simulated): after a reboot the agent applies again rather than reporting failure; when the
    mode change still waits for a reset that cannot be done, it fails without rebooting a second time."""
    root = workdir / "host"
    create_host(root, ["H100XM", "H100XM"], options={"mig_after_reboot": "lose", "mig_reset": mig_reset})
    sim = SimSetup(root, CONFIG)
    assert cli("apply", "--sim", str(root), "-f", str(CONFIG), "-c", "H100XM-1-10C").code == 0
    assert cli("sim", "reboot", str(root)).code == 0
    assert mig_modes(root) == [False, False] and layouts(root) == [{}, {}]
    if mig_reset == "required":
        arm(cli, root, "--mig-parted", "reset")
    set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "H100XM-1-10C", L.STATE_LABEL: L.REBOOTING})
    settings = agent_settings(k8s_node, k8s_namespace, sim, driver_root, with_reboot=True)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(lambda: agent.reconciled, what="first reconcile after the reboot", timeout=60)
        value, outcome = agent.reconciled[0]
    assert value == "H100XM-1-10C" and reboots(root) == 0
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    if mig_reset == "auto":
        assert outcome.state == L.SUCCESS, outcome
        assert layouts(root) == [{"H100XM-1-10C": 7}] * 2 and mig_modes(root) == [True, True]
        assert event.reason == "VGPUConfigApplied"
    else:
        assert outcome.state == L.FAILED and event.reason == "MIGModeChangeFailed"
        assert "not rebooting again" in event.message
        assert layouts(root) == [{}, {}]
