"""nvidia-vgpu-dra when things go wrong: killed between creating a vGPU and recording it, killed after,
prepare and unprepare repeated, a replaced or unallocated claim, a GPU that carries someone else's vGPUs,
and apply meeting a GPU the DRA driver owns. Real API server and scheduler, simulated host.
"""

from __future__ import annotations

import json
import os
import uuid

import grpc
import pytest

from tests.conftest import writes
from tests.k8s import drakit as K
from tests.k8s.test_dra_apiserver import published
from vgpu_dm.cli.main import main as cli_main
from vgpu_dm.sim.faults import Faults
from vgpu_dm.sim.host import SimHostRoot


@pytest.fixture
def node(apiserver, kube_scheduler, workdir):
    K.ensure_device_class(apiserver)
    name = f"dra-{uuid.uuid4().hex[:10]}"
    K.ready_node(apiserver, name)
    K.set_label(apiserver, name, "T4-2Q")
    made = K.DraNode(name, workdir / name, apiserver.admin_kubeconfig, gpus=("T4", "T4"))
    yield made
    made.stop()
    apiserver.request("DELETE", f"/api/v1/nodes/{name}")


def allocate(apiserver, node, namespace: str, name: str = "c1") -> dict:
    K.create_claim(apiserver, namespace, name)
    K.create_pod(apiserver, namespace, f"vm-{name}", name, node.name)
    return K.allocated(apiserver, namespace, name)


def mdevs(node) -> list[str]:
    return sorted(os.listdir(node.sim / "sys/bus/mdev/devices"))


def test_killed_between_creating_the_vgpu_and_the_checkpoint_the_orphan_goes_at_restart(
    apiserver, node, k8s_namespace
):
    Faults(kill_after_write=1).save(node.sim)  # the driver's first write is the prepare's mdev create
    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    kubelet = node.kubelet()
    with pytest.raises(grpc.RpcError):
        kubelet.prepare(K.identity(claim))
    node.proc.wait(timeout=10)
    assert len(mdevs(node)) == 1  # made, and never recorded as prepared
    assert node.checkpoint["claims"][claim["metadata"]["uid"]]["state"] == "preparing"
    Faults().save(node.sim)
    node.proc = None
    node.start()
    assert mdevs(node) == []
    assert node.checkpoint["claims"] == {}
    assert "removing" in node.tail(80) or "interrupted apply" in node.tail(80)
    # The kubelet retries: now it works, with one vGPU.
    entry = node.kubelet().prepare(K.identity(claim)).claims[claim["metadata"]["uid"]]
    assert entry.error == "" and len(mdevs(node)) == 1


def test_killed_after_the_checkpoint_the_claim_stays_prepared(apiserver, node, k8s_namespace):
    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    uid = claim["metadata"]["uid"]
    first = node.kubelet().prepare(K.identity(claim)).claims[uid]
    assert first.error == ""
    before = mdevs(node)
    node.kill()
    node.start()
    assert mdevs(node) == before  # not taken for an orphan
    again = node.kubelet().prepare(K.identity(claim)).claims[uid]
    assert again.error == "" and again.devices[0].device_name == first.devices[0].device_name
    assert list(again.devices[0].cdi_device_ids) == list(first.devices[0].cdi_device_ids)
    assert mdevs(node) == before


def test_an_orphan_without_a_journal_is_removed_at_start(apiserver, node, k8s_namespace):
    """The window after apply's journal is gone and before the checkpoint says prepared."""
    node.start()
    published(apiserver, node, 16)
    node.stop()
    host = SimHostRoot(node.sim)
    host.write_text(
        "sys/bus/pci/devices/0000:3b:00.0/mdev_supported_types/nvidia-201/create", str(uuid.uuid4())
    )
    assert len(mdevs(node)) == 1
    node.start()
    assert mdevs(node) == []


def test_prepare_twice_and_unprepare_twice(apiserver, node, k8s_namespace):
    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    uid = claim["metadata"]["uid"]
    kubelet = node.kubelet()
    one = kubelet.prepare(K.identity(claim)).claims[uid]
    two = kubelet.prepare(K.identity(claim), version="v1beta1").claims[uid]  # the same over v1beta1
    assert one.error == two.error == ""
    assert one.devices[0].device_name == two.devices[0].device_name
    assert list(one.devices[0].cdi_device_ids) == list(two.devices[0].cdi_device_ids)
    assert len(mdevs(node)) == 1
    creates = [w for w in writes(node.sim) if w.split("\t")[0].endswith("/create")]
    assert len(creates) == 1
    assert kubelet.unprepare(K.identity(claim)).claims[uid].error == ""
    assert kubelet.unprepare(K.identity(claim), version="v1beta1").claims[uid].error == ""
    assert mdevs(node) == []
    # A claim this driver never prepared: nothing to do, success.
    stranger = {"namespace": k8s_namespace, "uid": str(uuid.uuid4()), "name": "never"}
    assert kubelet.unprepare(stranger).claims[stranger["uid"]].error == ""


def test_replaced_unallocated_and_missing_claims_are_refused(apiserver, node, k8s_namespace):
    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    kubelet = node.kubelet()
    replaced = {**K.identity(claim), "uid": str(uuid.uuid4())}
    error = kubelet.prepare(replaced).claims[replaced["uid"]].error
    assert "was replaced" in error and claim["metadata"]["uid"] in error
    pending = K.create_claim(apiserver, k8s_namespace, "pending")
    error = kubelet.prepare(K.identity(pending)).claims[pending["metadata"]["uid"]].error
    assert "not allocated" in error
    gone = {"namespace": k8s_namespace, "uid": str(uuid.uuid4()), "name": "gone"}
    assert "not found" in kubelet.prepare(gone).claims[gone["uid"]].error
    # Several claims in one call: one entry each, the good one prepared.
    both = kubelet.prepare(K.identity(claim), replaced)
    assert set(both.claims) == {claim["metadata"]["uid"], replaced["uid"]}
    assert both.claims[claim["metadata"]["uid"]].error == "" and both.claims[replaced["uid"]].error
    assert len(mdevs(node)) == 1


def test_a_gpu_with_vgpus_the_driver_did_not_make_is_not_offered_and_apply_refuses_owned_gpus(
    apiserver, node, capsys
):
    config = node.base / "static.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  one:\n    - devices: [0]\n      vgpu-devices: {"T4-4Q": 4}\n'
    )
    assert cli_main(["apply", "--sim", str(node.sim), "-f", str(config), "-c", "one"]) == 0
    node.start()
    devices = published(apiserver, node, 8)
    assert {d.split("-")[0] for d in devices} == {"gpu1"}
    assert "did not create" in node.tail(80)
    owned = json.loads((node.sim / "var/lib/nvidia-vgpu-dm/dra-owned.json").read_text())
    assert list(owned["gpus"]) == ["0000:5e:00.0"]
    # The static side now refuses GPU 1, before any write.
    config.write_text(
        'version: v1\nvgpu-configs:\n  two:\n    - devices: all\n      vgpu-devices: {"T4-4Q": 4}\n'
    )
    before = len(writes(node.sim))
    capsys.readouterr()
    assert cli_main(["apply", "--sim", str(node.sim), "-f", str(config), "-c", "two"]) == 1
    err = capsys.readouterr().err
    assert "GPU 1 (0000:5e:00.0)" in err and "owned by the DRA driver vgpu.nvidia.com" in err
    assert len(writes(node.sim)) == before


def test_after_a_reboot_prepared_claims_get_their_vgpus_back(apiserver, node, k8s_namespace):
    from vgpu_dm.sim.reboot import reboot

    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    uid = claim["metadata"]["uid"]
    first = node.kubelet().prepare(K.identity(claim)).claims[uid]
    assert first.error == ""
    node.stop()
    reboot(node.sim)  # vGPUs gone; the checkpoint (kubelet plugin dir) and the ownership record stay
    assert mdevs(node) == []
    node.start()
    (again,) = mdevs(node)
    assert node.checkpoint["claims"][uid]["devices"][0]["key"] == again
    spec = json.loads((node.cdi / f"{K.DRIVER}_vgpu_{uid}.json").read_text())
    group = os.path.basename(os.readlink(node.sim / "sys/bus/mdev/devices" / again / "iommu_group"))
    assert {"path": f"/dev/vfio/{group}"} in spec["devices"][0]["containerEdits"]["deviceNodes"]
    assert K.kubevirt_read_metadata(node, "c1", "vgpu")["mdev"] == again
    same = node.kubelet().prepare(K.identity(claim)).claims[uid]
    assert list(same.devices[0].cdi_device_ids) == list(first.devices[0].cdi_device_ids)


def test_the_agent_refuses_a_gpu_the_dra_driver_owns(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir
):
    """The static agent on a node whose GPU 1 the DRA driver owns: state failed, an Event saying why,
    and not one write to the host (GPU 0 is not changed either: the plan is refused as a whole)."""
    import time as _time

    from tests.k8s.agentkit import (
        make_sim,
        node_events,
        running_agent,
        set_labels,
        settings_for,
        state_is,
        wait_for,
    )
    from vgpu_dm.host.owner import DraOwnership, write_dra_owned
    from vgpu_dm.k8s import labels as L

    sim = make_sim(workdir)
    write_dra_owned(SimHostRoot(sim.root), DraOwnership(K.DRIVER, k8s_node, {"0000:5e:00.0": _time.time()}))
    set_labels(admin_client, k8s_node, {L.CONFIG_LABEL: "T4-4Q"})
    with running_agent(apiserver.admin_kubeconfig, settings_for(k8s_node, k8s_namespace, sim)):
        wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
    (event,) = [
        e for e in node_events(admin_client, k8s_namespace, k8s_node) if e.reason != "VGPUConfigApplied"
    ]
    assert (
        event.reason == "VGPUConfigNotApplicable"
        and "owned by the DRA driver vgpu.nvidia.com" in event.message
    )
    assert writes(sim.root) == []


def test_the_agent_refuses_a_mig_config_for_a_dra_owned_gpu_before_pausing_anything(
    apiserver, admin_client, k8s_node, k8s_namespace, workdir
):
    """A MIG change is found before the vGPUs are planned, and its step runs after the operands are
    paused: the ownership check comes before both. Nothing paused, not one write, MIG mode untouched."""
    import time as _time
    from pathlib import Path

    from tests.k8s.agentkit import (
        ON_BOTH,
        NodeStage,
        SimSetup,
        node_events,
        running_agent,
        set_labels,
        settings_for,
        state_is,
        wait_for,
    )
    from vgpu_dm.host.owner import DraOwnership, write_dra_owned
    from vgpu_dm.k8s import labels as L
    from vgpu_dm.sim.layout import SimState, create_host

    root = workdir / "host"
    create_host(root, ["A100", "A100"])
    config = workdir / "config.yaml"
    mig_config = Path(__file__).resolve().parents[2] / "examples" / "config-mig.yaml"
    config.write_text(
        mig_config.read_text() + '  gpu1-4C:\n    - devices: [1]\n      vgpu-devices: {"A100-4C": 1}\n'
    )
    # GPU 1 carries a vGPU as a prepared (unheld) claim leaves it, and the DRA driver owns it.
    assert cli_main(["apply", "--sim", str(root), "-f", str(config), "-c", "gpu1-4C"]) == 0
    write_dra_owned(SimHostRoot(root), DraOwnership(K.DRIVER, k8s_node, {"0000:5e:00.0": _time.time()}))
    lib = workdir / "driver-root" / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libnvidia-ml.so.580.159.04").write_text("")
    os.symlink("libnvidia-ml.so.580.159.04", lib / "libnvidia-ml.so.1")
    logged = len(writes(root))
    set_labels(admin_client, k8s_node, {**ON_BOTH, L.CONFIG_LABEL: "A100-1-5C"})
    stage = NodeStage(admin_client, k8s_node, k8s_namespace).start()
    settings = settings_for(
        k8s_node, k8s_namespace, SimSetup(root, config), driver_root=str(workdir / "driver-root")
    )
    try:
        with running_agent(apiserver.admin_kubeconfig, settings):
            wait_for(state_is(admin_client, k8s_node, L.FAILED), what="state failed")
    finally:
        stage.stop()
    (event,) = [e for e in node_events(admin_client, k8s_namespace, k8s_node)]
    assert event.reason == "VGPUConfigNotApplicable" and "GPU 1 (0000:5e:00.0)" in event.message
    assert "owned by the DRA driver vgpu.nvidia.com" in event.message
    states = stage.label_states()
    assert not any(s.get(L.STATE_LABEL) == L.PENDING for s in states), states
    assert not any(L.PAUSED in (s.get(k) for k in ON_BOTH) for s in states), states
    assert len(writes(root)) == logged
    assert [g.mig_mode for g in SimState.load(root).gpus] == [False, False]


def test_a_prepare_that_fails_after_creating_the_vgpu_undoes_it_and_answers_per_claim(
    apiserver, node, k8s_namespace
):
    """Writing the claim's files fails (the CDI directory is a file: EEXIST): the vGPU made for it is
    removed, the error is a per-claim answer (not a gRPC error failing the whole call: each claim of the
    call gets its entry), and each kubelet retry leaves nothing behind — until the directory is fixed."""
    node.start()
    published(apiserver, node, 16)
    good = allocate(apiserver, node, k8s_namespace, "good")
    node.kubelet().prepare(K.identity(good))  # its files exist before the CDI dir breaks
    node.cdi.rename(node.base / "cdi-ok")
    node.cdi.write_text("not a directory\n")
    bad = allocate(apiserver, node, k8s_namespace, "bad")
    uid = bad["metadata"]["uid"]
    kubelet = node.kubelet()
    for _ in range(3):  # the kubelet retries
        answer = kubelet.prepare(K.identity(bad), K.identity(good))
        assert set(answer.claims) == {uid, good["metadata"]["uid"]}
        error = answer.claims[uid].error
        assert error == f"ResourceClaim {k8s_namespace}/bad: File exists: {node.cdi}"
        assert len(mdevs(node)) == 1  # the good claim's only
        assert uid not in node.checkpoint["claims"]
    node.cdi.unlink()
    (node.base / "cdi-ok").rename(node.cdi)
    answer = kubelet.prepare(K.identity(bad), K.identity(good))
    assert [e.error for e in answer.claims.values()] == ["", ""]
    assert len(mdevs(node)) == 2


def test_the_driver_takes_a_gpu_only_under_the_host_lock(apiserver, node, k8s_namespace):
    """apply checks ownership inside the host lock; the driver must decide and record it inside the
    same lock. While another process holds it, a relabel that adds GPU 1 leaves the record and the
    published devices alone; once the lock is free, the driver takes GPU 1."""
    from vgpu_dm.host.lock import HostLock

    K.set_label(apiserver, node.name, "gpu0-T4-4Q")
    node.extra_args = ("--lock-timeout", "1")
    node.start()
    published(apiserver, node, 4)
    record = node.sim / "var/lib/nvidia-vgpu-dm/dra-owned.json"
    assert list(json.loads(record.read_text())["gpus"]) == ["0000:3b:00.0"]
    lock = HostLock(SimHostRoot(node.sim), timeout=5)
    lock.acquire()
    try:
        K.set_label(apiserver, node.name, "T4-4Q")
        import time

        time.sleep(4)  # several resyncs (1 s) and the label watch
        assert list(json.loads(record.read_text())["gpus"]) == ["0000:3b:00.0"]
        assert len(K.pool_devices(apiserver, node.name)) == 4
    finally:
        lock.release()
    published(apiserver, node, 8)
    assert sorted(json.loads(record.read_text())["gpus"]) == ["0000:3b:00.0", "0000:5e:00.0"]


def test_files_left_by_a_prepare_killed_before_its_checkpoint_are_removed_at_start(
    apiserver, node, k8s_namespace
):
    """Killed after writing a claim's CDI specs and metadata but before recording it as prepared: at
    the next start the files of claims the checkpoint does not hold go; a prepared claim's files and
    other drivers' CDI specs stay."""
    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    uid = claim["metadata"]["uid"]
    assert node.kubelet().prepare(K.identity(claim)).claims[uid].error == ""
    node.stop()
    kept = sorted(p.name for p in node.cdi.iterdir())
    ghost = str(uuid.uuid4())
    strays = [
        node.cdi / f"{K.DRIVER}_vgpu_{ghost}.json",
        node.cdi / f"{K.DRIVER}_metadata_{ghost}_vgpu.json",
        node.plugin_dir / "dra-device-metadata" / f"{k8s_namespace}_ghost" / "vgpu" / "metadata.json",
    ]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (node.cdi / "other.example.com_gpu.json").write_text("{}")
    node.start()
    assert not any(p.exists() for p in strays)
    assert not (node.plugin_dir / "dra-device-metadata" / f"{k8s_namespace}_ghost").exists()
    assert sorted(p.name for p in node.cdi.iterdir()) == sorted([*kept, "other.example.com_gpu.json"])
    assert K.kubevirt_read_metadata(node, "c1", "vgpu")["mdev"] == mdevs(node)[0]


def test_the_plugin_answers_a_request_made_of_bytes_built_by_hand(apiserver, node, k8s_namespace):
    """The kubelet's side without our generated messages: the request encoded by hand from Kubernetes'
    field numbers, sent as raw bytes over the DRA socket, the answer decoded by hand."""
    from tests.unit.test_dra_wire import claim as wire_claim
    from tests.unit.test_dra_wire import field, parse, strings

    node.start()
    published(apiserver, node, 16)
    claim = allocate(apiserver, node, k8s_namespace)
    uid = claim["metadata"]["uid"]
    endpoint = node.kubelet().endpoint
    request = field(1, wire_claim(k8s_namespace, uid, "c1"))
    with grpc.insecure_channel(f"unix://{endpoint}") as channel:
        raw = channel.unary_unary("/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources")(
            request, timeout=45
        )
    ((number, entry),) = parse(raw)
    pair = parse(entry)
    assert number == 1 and strings(pair, 1) == [uid]
    response = parse(next(v for n, v in pair if n == 2))
    assert strings(response, 2) in ([], [""])  # no error
    (device,) = [parse(v) for n, v in response if n == 1]
    assert strings(device, 1) == ["vgpu"] and strings(device, 2) == [node.name]
    assert strings(device, 3)[0].startswith("gpu") and len(strings(device, 4)) == 2
    assert len(mdevs(node)) == 1
