"""The agent against tests/k8s/fakeapi.py: 410 Gone, dropped and cut watch streams, 409 on patch, 500s
and slow answers, with every request counted to show that the agent neither storms nor polls."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest

from tests.conftest import writes
from tests.k8s.agentkit import FAST_API, FAST_WATCH, make_sim, running_agent, settings_for, wait_for
from tests.k8s.fakeapi import FakeAPI
from tests.simstate import layouts
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.sim.layout import SimState


@pytest.fixture(autouse=True)
def fresh_logging():
    log.setup(debug=True)


@pytest.fixture
def fake():
    server = FakeAPI(labels={"kubernetes.io/hostname": "fake-node"}).start()
    yield server
    server.stop()


@pytest.fixture
def sim(workdir):
    return make_sim(workdir)


def converged(fake: FakeAPI, agent, value: str):
    def check():
        return (
            agent.reconciled
            and agent.reconciled[-1][0] == value
            and fake.labels().get(L.STATE_LABEL) == L.SUCCESS
            and any(e["reason"] == "VGPUConfigApplied" for e in fake.events)
        )

    return check


def metric(agent, name: str, **labels) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


def start(fake, sim, workdir, api=FAST_API, watch=FAST_WATCH, **settings):
    config = fake.kubeconfig(workdir)
    return running_agent(config, settings_for("fake-node", "gpu-operator", sim, **settings), api, watch)


def test_idle_agent_sends_no_request(fake, sim, workdir):
    began = time.monotonic()
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        startup = fake.requests_since(began)
        idle_from = time.monotonic()
        time.sleep(2.0)
        idle = fake.requests_since(idle_from)
        assert agent.healthy()
    assert layouts(sim.root) == [{"T4-8Q": 2}, {"T4-8Q": 2}]
    assert idle == [], f"requests while idle: {idle}"
    kinds = [r.kind() for r in startup]
    assert kinds.count("node-list") == 1 and kinds.count("node-watch") == 1
    # The state label and operand changes are merge patches of labels only (the fake refuses others).
    assert all(r.method in ("GET", "PATCH", "POST") for r in startup)
    print(f"\nstart-up to success: {len(startup)} requests ({', '.join(kinds)}); idle 2 s: {len(idle)}")


def test_watch_resumes_from_its_resource_version_without_relisting(fake, sim, workdir):
    watch = replace(FAST_WATCH, timeout_min=1, timeout_max=1)  # the server ends each watch after 1 s
    with start(fake, sim, workdir, watch=watch) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        since = time.monotonic()
        time.sleep(3.5)
        watches = [r for r in fake.requests_since(since) if r.kind() == "node-watch"]
        assert fake.count("node-list", since) == 0
        assert 2 <= len(watches) <= 5, watches
        # Each watch resumes from the last resourceVersion the agent saw (a watch opened just before the
        # agent's own last label patch still carries the one before it).
        versions = [int(r.query["resourceVersion"]) for r in watches]
        assert versions == sorted(versions) and versions[-1] == fake.rv, versions
        fake.set_labels({L.CONFIG_LABEL: "T4-4Q"})
        wait_for(converged(fake, agent, "T4-4Q"), what="T4-4Q applied")
    assert metric(agent, "vgpu_dm_watch_restarts_total", reason="dropped") == 0


def test_410_gone_relists_and_sees_the_change_it_missed(fake, sim, workdir):
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        lists = fake.count("node-list")
        fake.expire_watches({L.CONFIG_LABEL: "T4-2Q"})  # a change no watch event carries
        wait_for(converged(fake, agent, "T4-2Q"), what="T4-2Q applied after the relist")
        assert fake.count("node-list") == lists + 1
        assert metric(agent, "vgpu_dm_watch_restarts_total", reason="gone") == 1
        # 410 at the start of a watch too (the resourceVersion was compacted while reconnecting).
        fake.gone_watches = 1
        fake.expire_watches()
        wait_for(lambda: fake.count("node-list") == lists + 3, what="two more relists")
    assert layouts(sim.root) == [{"T4-2Q": 8}, {"T4-2Q": 8}]


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_dropped_streams_back_off(fake, sim, workdir, how):
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        if how == "eof":
            fake.drop_watches = 1000
        else:
            fake.reset_watches = 1000
        since = time.monotonic()
        fake.expire_watches()  # end the open watch; every later one drops at once
        time.sleep(3.0)
        lists = [r.at for r in fake.requests_since(since) if r.kind() == "node-list"]
        watches = fake.count("node-watch", since)
        fake.drop_watches = fake.reset_watches = 0
        fake.set_labels({L.CONFIG_LABEL: "T4-16Q"})
        wait_for(converged(fake, agent, "T4-16Q"), what="T4-16Q applied once streams hold again")
    gaps = [b - a for a, b in itertools.pairwise(lists)]
    # Backoff 0.1 s doubling to 1 s (jittered): about 6 relists in 3 s, never a storm.
    assert 3 <= len(lists) <= 12, gaps
    assert watches <= len(lists) + 1
    assert max(gaps) >= 0.5 and gaps[-1] > gaps[0], gaps
    assert metric(agent, "vgpu_dm_watch_restarts_total", reason="dropped") >= len(lists) - 1
    print(
        f"\n{how}: 3 s of dropped watches → {len(lists)} relists, {watches} watches; "
        f"gaps {[round(g, 2) for g in gaps]}"
    )


def test_conflict_on_patch_is_retried(fake, sim, workdir):
    fake.patch_conflicts = 3
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        assert metric(agent, "vgpu_dm_api_retries_total") == 3
    assert fake.patch_conflicts == 0
    assert fake.labels()[L.STATE_LABEL] == L.SUCCESS
    assert layouts(sim.root) == [{"T4-8Q": 2}, {"T4-8Q": 2}]


def test_server_errors_are_retried_with_backoff(fake, sim, workdir):
    fake.fail_until = time.monotonic() + 2.0  # every request fails with 500 for 2 s
    began = time.monotonic()
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied after the outage")
        assert not agent.ready.is_set() or time.monotonic() - began >= 2.0
    during = [r for r in fake.requests_since(began) if r.at < began + 2.0]
    # Backoff 50 ms doubling to 0.5 s: at most ~10 requests in the 2 s outage.
    assert 3 <= len(during) <= 12, [round(r.at - began, 2) for r in during]
    assert metric(agent, "vgpu_dm_api_retries_total") >= len(during) - 1
    print(f"\n2 s of HTTP 500: {len(during)} requests")


def test_server_errors_during_a_change_still_restore_operands(fake, sim, workdir):
    fake.set_labels({L.DEVICE_PLUGIN_LABEL: "true", L.VALIDATOR_LABEL: "true"})
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        fake.patch_conflicts = 2
        fake.set_labels({L.CONFIG_LABEL: "T4-4Q"})
        wait_for(converged(fake, agent, "T4-4Q"), what="T4-4Q applied")
    labels = fake.labels()
    assert labels[L.DEVICE_PLUGIN_LABEL] == labels[L.VALIDATOR_LABEL] == "true"
    assert layouts(sim.root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]


def test_slow_answers_time_out_and_are_retried(fake, sim, workdir):
    fake.slow_requests = 2
    fake.slow_seconds = 1.5
    api = replace(FAST_API, request_timeout=0.5)
    with start(fake, sim, workdir, api=api) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        assert metric(agent, "vgpu_dm_api_retries_total") >= 2
    assert layouts(sim.root) == [{"T4-8Q": 2}, {"T4-8Q": 2}]


def test_metrics_and_probes_over_http(fake, sim, workdir):
    import urllib.request

    with start(fake, sim, workdir) as agent:
        port = agent.server.port
        wait_for(converged(fake, agent, "default"), what="default applied")
        wait_for(agent.ready.is_set, what="ready")
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/healthz").read() == b"ok\n"
        assert urllib.request.urlopen(f"{base}/readyz").read() == b"ok\n"
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert 'vgpu_dm_applies_total{result="success"} 1.0' in text
    assert 'vgpu_dm_config_state{state="success"} 1.0' in text
    assert "vgpu_dm_apply_duration_seconds_count 1.0" in text
    assert "vgpu_dm_watch_restarts_total" in text and "vgpu_dm_apply_retries_total 0.0" in text


def test_readyz_waits_for_the_first_reconcile(fake, sim, workdir):
    import urllib.error
    import urllib.request

    fake.fail_until = time.monotonic() + 60  # the API server is down: no reconcile can finish
    with start(fake, sim, workdir) as agent:
        base = f"http://127.0.0.1:{agent.server.port}"
        assert urllib.request.urlopen(f"{base}/healthz").read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/readyz")
        assert info.value.code == 503
        fake.fail_until = 0
        wait_for(agent.ready.is_set, what="ready")
        assert urllib.request.urlopen(f"{base}/readyz").read() == b"ok\n"


def test_values_arriving_during_an_apply_coalesce_to_the_latest(fake, sim, workdir, cli):
    with start(fake, sim, workdir) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        assert cli("sim", "latency", str(sim.root), "--create-latency-ms", "100").code == 0
        fake.set_labels({L.CONFIG_LABEL: "T4-4Q"})
        wait_for(lambda: fake.labels().get(L.STATE_LABEL) == L.PENDING, what="the T4-4Q change under way")
        for value in ("T4-2Q", "T4-1Q", "too-many", "T4-16Q"):
            fake.set_labels({L.CONFIG_LABEL: value})
        wait_for(converged(fake, agent, "T4-16Q"), timeout=30, what="T4-16Q applied")
        values = [v for v, _ in agent.reconciled]
    assert values == ["default", "T4-4Q", "T4-16Q"]
    assert layouts(sim.root) == [{"T4-16Q": 1}, {"T4-16Q": 1}]


@pytest.mark.parametrize("jobs", [0, 1])
def test_agent_changes_gpus_at_once_by_default_and_one_after_another_with_jobs_1(
    fake, sim, workdir, cli, jobs
):
    with start(fake, sim, workdir, jobs=jobs) as agent:
        wait_for(converged(fake, agent, "default"), what="default applied")
        # Slow writes make the two GPUs' threads overlap when there are two of them.
        assert (
            cli("sim", "latency", str(sim.root), "--create-latency-ms", "4", "--remove-latency-ms", "2").code
            == 0
        )
        before = len(writes(sim.root))
        fake.set_labels({L.CONFIG_LABEL: "T4-2Q"})
        wait_for(converged(fake, agent, "T4-2Q"), timeout=30, what="T4-2Q applied")
    assert layouts(sim.root) == [{"T4-2Q": 8}, {"T4-2Q": 8}]
    state = SimState.load(sim.root)
    order = [state.gpu_of(line.split("\t")[0].split("/")[4]) for line in writes(sim.root)[before:]]
    gpus = [state.gpus.index(g) for g in order if g]
    assert len(gpus) == 2 * 8  # the creates (removes go to the mdev device, named by no GPU)
    switches = sum(1 for a, b in itertools.pairwise(gpus) if a != b)
    if jobs == 1:
        assert gpus == sorted(gpus)
    else:
        assert switches > 1, f"the GPUs' writes did not overlap: {gpus}"
