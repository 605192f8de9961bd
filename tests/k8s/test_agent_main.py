"""``nvidia-k8s-vgpu-dm``'s ``run`` in this process, as the console script runs it (signal handlers, the
wakeup pipe, the metrics endpoint), against a real kube-apiserver on a simulated host: stopped by a real
SIGTERM once the node reached ``success``."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.k8s.agentkit import make_sim, settings_for, state_is, wait_for
from vgpu_dm import log
from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.main import main, run


@pytest.fixture
def agent_log() -> Iterator[io.StringIO]:
    lines = io.StringIO()
    log.setup(stream=lines)
    yield lines
    log.setup()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on (what a hostNetwork pod meets when the host uses 8080)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run_until_success(settings, admin_client, node: str) -> None:
    """``run(settings)`` in this (the main) thread; a SIGTERM to this process once the node's state is
    ``success`` (or after 60 s, so that a broken agent still returns), never after ``run`` returned."""
    returned = threading.Event()

    def stop_it() -> None:
        with contextlib.suppress(AssertionError):
            wait_for(lambda: returned.is_set() or state_is(admin_client, node, L.SUCCESS)(), timeout=60)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_it, daemon=True)
    killer.start()
    try:
        run(settings)
    finally:
        returned.set()
        killer.join(70)


def test_default_metrics_port_taken_is_logged_and_the_agent_runs_on(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, busy_port, agent_log
):
    """Upstream opens no port; with ClusterPolicy vgpuDeviceManager.hostNetwork=true the default :8080
    may be the host's: the agent says so and does its job without the endpoint."""
    settings = settings_for(
        k8s_node,
        k8s_namespace,
        make_sim(workdir),
        kubeconfig=apiserver.admin_kubeconfig,
        metrics_address=f"127.0.0.1:{busy_port}",
        metrics_required=False,
    )
    run_until_success(settings, admin_client, k8s_node)
    assert state_is(admin_client, k8s_node, L.SUCCESS)()
    text = agent_log.getvalue()
    assert f"cannot serve metrics on 127.0.0.1:{busy_port} (the default)" in text
    assert "running without /metrics, /healthz and /readyz" in text
    assert "agent stopped" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_metrics_address_asked_for_that_cannot_be_bound_stops_the_agent(
    apiserver, k8s_node, k8s_namespace, workdir, busy_port, capsys, monkeypatch, how
):
    """Our own DaemonSet asks for :8080 and probes it: an agent without its endpoint would only be killed
    by its liveness probe later; exit 1 now, saying why."""
    sim = make_sim(workdir)
    argv = ["-n", k8s_node, "-ns", k8s_namespace, "-d", "default", "-f", str(sim.config)]
    argv += ["--sim", str(sim.root), "--kubeconfig", apiserver.admin_kubeconfig]
    if how == "flag":
        argv += ["--metrics-address", f"127.0.0.1:{busy_port}"]
    else:
        monkeypatch.setenv("VGPU_DM_METRICS_ADDRESS", f"127.0.0.1:{busy_port}")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot serve metrics on 127.0.0.1:{busy_port} (given by --metrics-address" in err


def test_run_gives_back_the_signal_handlers_it_replaced(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir, agent_log
):
    """``run`` may be called by a program with handlers of its own (tests do): after it returns, SIGTERM
    and SIGINT are handled as before, and the wakeup fd is the previous one."""
    seen: list[int] = []

    def mine(signum, _frame) -> None:
        seen.append(signum)

    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        settings = settings_for(
            k8s_node, k8s_namespace, make_sim(workdir), kubeconfig=apiserver.admin_kubeconfig
        )
        run_until_success(settings, admin_client, k8s_node)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.set_wakeup_fd(-1) == -1
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: seen, timeout=5, what="our own handler to run")
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert seen == [signal.SIGTERM]
