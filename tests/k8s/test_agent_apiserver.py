"""The agent against a real kube-apiserver, with a simulated host. The test plays kubelet and DaemonSet
controller (tests/k8s/agentkit.NodeStage) and records the node's labels from a watch."""

from __future__ import annotations

import signal
import time

import pytest

from tests.k8s.agentkit import (
    ON_BOTH,
    PAUSED_BOTH,
    NodeStage,
    agent_process,
    done,
    make_sim,
    node_events,
    node_labels,
    running_agent,
    set_labels,
    settings_for,
    state_is,
    wait_for,
)
from tests.simstate import layouts, snapshot
from vgpu_dm import log
from vgpu_dm.k8s import labels as L


@pytest.fixture(autouse=True)
def fresh_logging():
    """Log to this test's stderr (an earlier in-process CLI run bound the handler to its own)."""
    log.setup(debug=True)


@pytest.fixture
def sim(workdir):
    return make_sim(workdir)


@pytest.fixture
def stage(admin_client, k8s_node, k8s_namespace):
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    yield stage
    stage.stop()


def test_default_applied_without_label(apiserver, admin_client, k8s_node, k8s_namespace, stage, sim):
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="state success")
        assert agent.ready.wait(5)
    assert layouts(sim.root) == [{"T4-8Q": 2}, {"T4-8Q": 2}]
    labels = node_labels(admin_client, k8s_node)
    assert L.CONFIG_LABEL not in labels  # the agent reads the label, never sets it
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    events = node_events(admin_client, k8s_namespace, k8s_node)
    assert [e.reason for e in events] == ["VGPUConfigApplied"]
    assert events[0].type == "Normal" and "'default' applied" in events[0].message
    assert "create 2 x T4-8Q" in events[0].message


def test_label_change_order(apiserver, admin_client, k8s_node, k8s_namespace, stage, sim):
    seen_at_apply = []

    def at_apply(change):  # the pre-apply slot (where the MIG step goes): see the node as apply sees it
        from lightkube.resources.core_v1 import Pod

        pods = list(admin_client.list(Pod, namespace=k8s_namespace, fields={"spec.nodeName": k8s_node}))
        seen_at_apply.append((node_labels(admin_client, k8s_node), [p.metadata.name for p in pods]))
        stage.note("apply")

    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings, pre_apply=[at_apply]) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        stage.note("label-set")
        began = time.monotonic()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-4Q"})
        wait_for(done(agent, "T4-4Q"), what="T4-4Q reconciled")
    assert layouts(sim.root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]

    # Order, from the watch: pending → paused → pods gone → apply → restored → success.
    pending = stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.PENDING, after=began)
    paused = stage.first("labels", lambda x: all(x.get(k) == L.PAUSED for k in PAUSED_BOTH), after=began)
    gone = stage.first("pods-gone", after=began)
    apply = stage.first("apply", after=began)
    success = wait_for(  # the test's watch may lag behind the agent
        lambda: stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.SUCCESS, after=apply.at),
        what="the watch sees state success",
    )
    # Seen before success (a watch delivers in order), so it is recorded by now.
    restored = stage.first("labels", lambda x: all(x.get(k) == "true" for k in ON_BOTH), after=apply.at)
    assert None not in (pending, paused, gone, apply, restored, success), stage.history
    assert pending.at <= paused.at <= gone.at <= apply.at <= restored.at <= success.at
    assert paused.labels[L.STATE_LABEL] == L.PENDING  # pending was set before the pause
    assert success.labels[L.DEVICE_PLUGIN_LABEL] == "true"  # restored before success
    # At the moment of the apply: pending, both operands paused, no operand pod on the node.
    labels, pods = seen_at_apply[-1]
    assert labels[L.STATE_LABEL] == L.PENDING
    assert {k: labels[k] for k in PAUSED_BOTH} == PAUSED_BOTH
    assert pods == []
    reasons = [e.reason for e in node_events(admin_client, k8s_namespace, k8s_node)]
    assert reasons == ["VGPUConfigApplied", "VGPUConfigApplied"]
    print(
        f"\nlabel set → apply began: {apply.at - began:.3f} s; → success seen: {success.at - began:.3f} s "
        f"(operand pods deleted by the test in between)"
    )


def test_unknown_config_fails_without_touching_operands(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim
):
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        before = snapshot(sim.root)
        began = time.monotonic()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "no-such-config"})
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
        assert agent.metrics.apply_retries._value.get() == 0  # a config error is never retried
    assert snapshot(sim.root) == before
    seen = [r.labels for r in stage.history if r.what == "labels" and r.at >= began]
    assert all(x.get(k) == "true" for x in seen for k in ON_BOTH), seen  # operands never paused
    assert all(x.get(L.STATE_LABEL) != L.PENDING for x in seen)
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert (event.reason, event.type) == ("InvalidVGPUConfig", "Warning")
    assert "'no-such-config'" in event.message and "configs in the file" in event.message


def test_config_that_does_not_fit_fails_before_operands(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim
):
    set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "too-many"})
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings):
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
    assert snapshot(sim.root) == []
    assert all(x.get(k) == "true" for x in stage.label_states() for k in ON_BOTH)
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert event.reason == "VGPUConfigNotApplicable" and "T4-16Q" in event.message


def test_apply_failure_restores_operands_and_retries(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, cli
):
    from tests.simstate import arm

    settings = settings_for(k8s_node, k8s_namespace, sim, retry_initial=1.0, retry_max=1.0)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        before = snapshot(sim.root)
        arm(cli, sim.root, "--fail-write", "3", "--errno", "EIO")
        began = time.monotonic()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-2Q"})
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
        assert snapshot(sim.root) == before  # rolled back: same devices, same UUIDs
        labels = node_labels(admin_client, k8s_node)
        assert {k: labels[k] for k in ON_BOTH} == ON_BOTH  # operands restored after the failure
        failed = wait_for(
            lambda: stage.first("labels", lambda x: x.get(L.STATE_LABEL) == L.FAILED, after=began),
            what="the watch sees state failed",
        )
        assert failed.labels[L.DEVICE_PLUGIN_LABEL] == "true"
        wait_for(lambda: agent.metrics.apply_retries._value.get() >= 1, what="a retry scheduled")
        arm(cli, sim.root)  # the cause goes away: the retry succeeds without any label change
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), timeout=30, what="retry succeeded")
    assert layouts(sim.root) == [{"T4-2Q": 8}, {"T4-2Q": 8}]
    reasons = [e.reason for e in node_events(admin_client, k8s_namespace, k8s_node)]
    assert "VGPUConfigFailed" in reasons and "VGPUConfigRetry" in reasons
    assert reasons[-1] == "VGPUConfigApplied"
    failed_event = next(
        e for e in node_events(admin_client, k8s_namespace, k8s_node) if e.reason == "VGPUConfigFailed"
    )
    assert "injected fault" in failed_event.message and failed_event.type == "Warning"


def test_vm_holding_a_vgpu_is_retried_until_released(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, cli
):
    settings = settings_for(k8s_node, k8s_namespace, sim, retry_initial=0.5, retry_max=0.5)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        uuid = snapshot(sim.root)[0][2]
        held = cli("sim", "hold", str(sim.root), uuid)
        assert held.code == 0, held.err
        pid = held.out.split()[1]
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-16Q"})
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
        in_use = wait_for(  # the Event follows the state label
            lambda: [
                e for e in node_events(admin_client, k8s_namespace, k8s_node) if e.reason == "VGPUDeviceInUse"
            ],
            what="a VGPUDeviceInUse Event",
        )[0]
        # What the operator can do; not the CLI's "or pass --force", which the agent does not have.
        assert f"is in use by pid {pid}" in in_use.message
        assert "stop the VM or migrate it" in in_use.message and "retries by itself" in in_use.message
        assert "'nvidia-vgpu-dm apply --force' on the host" in in_use.message
        assert "or pass --force" not in in_use.message
        wait_for(lambda: agent.metrics.apply_retries._value.get() >= 2, what="two retries")
        assert uuid in [d[2] for d in snapshot(sim.root)]  # never destroyed while held
        assert cli("sim", "release", str(sim.root), pid).code == 0
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="applied after the VM let go")
    assert layouts(sim.root) == [{"T4-16Q": 1}, {"T4-16Q": 1}]


def test_operand_labels_left_paused_by_a_crash_are_restored(
    apiserver, admin_client, k8s_node, k8s_namespace, sim, cli
):
    # A previous agent applied the default and died with the operands paused.
    assert cli("apply", "--sim", str(sim.root), "-f", str(sim.config), "-c", "default").code == 0
    set_labels(admin_client, k8s_node, {**PAUSED_BOTH, L.STATE_LABEL: L.PENDING})
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        assert agent.ready.wait(20)
        wait_for(
            lambda: all(node_labels(admin_client, k8s_node).get(k) == "true" for k in ON_BOTH), what="restore"
        )
    assert node_labels(admin_client, k8s_node)[L.STATE_LABEL] == L.SUCCESS


def test_operand_switched_off_stays_off(apiserver, admin_client, k8s_node, k8s_namespace, sim):
    set_labels(admin_client, k8s_node, {L.DEVICE_PLUGIN_LABEL: "false"})  # validator label absent
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    try:
        settings = settings_for(k8s_node, k8s_namespace, sim)
        with running_agent(apiserver.admin_kubeconfig, settings):
            wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
    finally:
        stage.stop()
    assert all(x.get(L.DEVICE_PLUGIN_LABEL) == "false" for x in stage.label_states())
    assert all(L.VALIDATOR_LABEL not in x for x in stage.label_states())


def test_rapid_flapping_ends_at_the_last_value(apiserver, admin_client, k8s_node, k8s_namespace, stage, sim):
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        values = ["T4-4Q", "T4-2Q", "T4-16Q", "T4-1Q", "T4-4Q", "T4-2Q", "T4-16Q"]
        for value in values:
            set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: value})
            time.sleep(0.02)
        wait_for(done(agent, values[-1]), what="the last value reconciled")
        time.sleep(0.5)  # nothing more should happen
        reconciles = [v for v, _ in agent.reconciled]
    assert layouts(sim.root) == [{"T4-16Q": 1}, {"T4-16Q": 1}]
    assert node_labels(admin_client, k8s_node)[L.STATE_LABEL] == L.SUCCESS
    assert reconciles[-1] == "T4-16Q"
    assert len(reconciles) < 1 + len(values), f"values were not coalesced: {reconciles}"
    print(f"\n{len(values)} label values → reconciles: {reconciles}")


def test_api_server_restart_converges(apiserver, admin_client, k8s_node, k8s_namespace, stage, sim):
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(state_is(admin_client, k8s_node, L.SUCCESS), what="default applied")
        apiserver.restart()
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-4Q"})
        wait_for(done(agent, "T4-4Q"), timeout=40, what="T4-4Q reconciled after the restart")
        assert state_is(admin_client, k8s_node, L.SUCCESS)()
        restarts = sum(
            s.value for s in agent.metrics.watch_restarts.collect()[0].samples if s.name.endswith("_total")
        )
    assert restarts >= 1


def test_sigterm_while_waiting_for_operands_restores_them(
    apiserver, admin_client, k8s_node, k8s_namespace, sim
):
    set_labels(admin_client, k8s_node, ON_BOTH)
    stage = NodeStage(admin_client, k8s_node, k8s_namespace, delete_pods=False).start()  # pods never leave
    try:
        proc = agent_process(
            [
                "--kubeconfig", apiserver.admin_kubeconfig, "-n", k8s_node, "-ns", k8s_namespace,
                "-f", str(sim.config), "-d", "default", "--sim", str(sim.root), "--metrics-address", "",
            ]
        )  # fmt: skip
        try:
            wait_for(
                lambda: all(node_labels(admin_client, k8s_node).get(k) == L.PAUSED for k in PAUSED_BOTH),
                what="operands paused",
            )
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        stage.stop()
    assert proc.returncode == 0, err
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    assert labels[L.STATE_LABEL] == L.PENDING  # not applied, not failed: the next agent carries on
    assert snapshot(sim.root) == []
    assert "received SIGTERM" in err
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert event.reason == "VGPUConfigInterrupted"


def test_sigterm_mid_apply_rolls_back_restores_operands_and_exits_0(
    apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, cli
):
    assert cli("sim", "latency", str(sim.root), "--create-latency-ms", "150").code == 0
    set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-1Q"})  # 32 creates: about 5 s of writes
    proc = agent_process(
        [
            "--kubeconfig", apiserver.admin_kubeconfig, "-n", k8s_node, "-ns", k8s_namespace,
            "-f", str(sim.config), "-d", "default", "--sim", str(sim.root), "--metrics-address", "",
        ]
    )  # fmt: skip
    try:
        wait_for(lambda: len(snapshot(sim.root)) >= 2, what="the apply under way")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert snapshot(sim.root) == []  # this run's devices were rolled back
    labels = node_labels(admin_client, k8s_node)
    assert {k: labels[k] for k in ON_BOTH} == ON_BOTH
    assert labels[L.STATE_LABEL] == L.PENDING
    assert "apply interrupted" in err
    event = node_events(admin_client, k8s_namespace, k8s_node)[-1]
    assert (event.reason, event.type) == ("VGPUConfigInterrupted", "Warning")
    print(f"\nSIGTERM mid-apply → exit 0 after {took:.2f} s (rolled back, operands restored)")


def test_no_event_when_nothing_changed(apiserver, admin_client, k8s_node, k8s_namespace, stage, sim, workdir):
    """An Event is an API write and etcd storage: recorded for a change or a failure, not for a
    reconcile that found the host as it should be (an agent restart, a config with the same layout)."""
    same = (
        sim.config.read_text() + '  same-as-default:\n    - devices: all\n      vgpu-devices: {"T4-8Q": 2}\n'
    )
    sim.config.write_text(same)
    settings = settings_for(k8s_node, k8s_namespace, sim)
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:
        wait_for(done(agent, "default"), what="default applied")
    with running_agent(apiserver.admin_kubeconfig, settings) as agent:  # restarted: nothing to do
        wait_for(done(agent, "default"), what="default found applied")
        set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "same-as-default"})
        wait_for(done(agent, "same-as-default"), what="same layout found applied")
        results = [o.result for _, o in agent.reconciled]
        unchanged = agent.metrics.applies.labels("unchanged")._value.get()
    assert results == ["unchanged", "unchanged"] and unchanged == 2
    assert [e.reason for e in node_events(admin_client, k8s_namespace, k8s_node)] == ["VGPUConfigApplied"]
