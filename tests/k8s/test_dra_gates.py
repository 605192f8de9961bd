"""nvidia-vgpu-dra against a real kube-apiserver with partitionable devices switched off
(--feature-gates=DRAPartitionableDevices=false, as on a 1.34/1.35 cluster by default): the server drops
counter sets and counter consumption, the driver notices, withdraws the mixed-size GPU instead of
publishing devices that could overfill it, reports why, and keeps offering the other GPUs."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from tests.k8s import drakit as K
from tests.k8s.conftest import require_assets
from tests.k8s.envtest import APIServer, EnvtestError
from tests.k8s.test_dra_apiserver import published


class GateOffAPIServer(APIServer):
    def _apiserver_flags(self) -> list[str]:
        return [*super()._apiserver_flags(), "--feature-gates=DRAPartitionableDevices=false"]


@pytest.fixture(scope="module")
def gate_off_apiserver():
    server = GateOffAPIServer(require_assets(os.environ))
    try:
        server.setup()
    except EnvtestError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.teardown()


def test_dropped_counters_withdraw_the_mixed_size_gpu_and_are_reported(gate_off_apiserver, workdir):
    api = gate_off_apiserver
    name = f"dra-{uuid.uuid4().hex[:10]}"
    K.ready_node(api, name)
    K.set_label(api, name, "two-kinds")
    node = K.DraNode(name, workdir / name, api.admin_kubeconfig, gpus=("T4", "L40S"))
    try:
        node.start()
        devices = published(api, node, 4)
        assert sorted(devices) == [f"gpu0-t4-4q-{n}" for n in range(4)]
        assert all("consumesCounters" not in d for d in devices.values())
        assert not any(s["spec"].get("sharedCounters") for s in K.slices(api, name))
        log = node.log.read_text()
        assert "GPU 1 (0000:5e:00.0) not offered" in log and "DRAPartitionableDevices" in log
        assert "would drop spec.sharedCounters" in log or "would drop spec.devices" in log
        # Found out by dry runs: the only generation ever written is the one without the L40S, so its
        # devices were never published without their counters, not even for a moment.
        generation = K.slices(api, name)[0]["spec"]["pool"]["generation"]
        assert generation == 1
        # Found out once: later publishes (every resync, here each second) do not try the counters again.
        time.sleep(2.5)
        assert [s["spec"]["pool"]["generation"] for s in K.slices(api, name)] == [generation]
        assert log.count("not offered") == node.log.read_text().count("not offered") == 1
        # Only the GPU it offers is the driver's: the L40S stays free for static layouts.
        assert '"0000:5e:00.0"' not in (node.sim / "var/lib/nvidia-vgpu-dm/dra-owned.json").read_text()
    finally:
        node.stop()
