"""Mixed-size GPUs through DRA, against the real API server and scheduler, on simulated hosts with both
of the simulator's mixed-size rules (sim/placements.py: "placements", as NVIDIA's resource manager
places vGPUs per its open kernel module source, and "framebuffer", the simpler guess):

- a type's count is cut to the placements it has in mixed-size mode, and said so;
- each vGPU of a vendor-VFIO GPU takes a VF: the ``vfs`` counter keeps allocations within them;
- counters cannot model which placement the driver picks: under "placements" an allocation the
  counters allow can fail to prepare (fragmentation), cleanly and retried until a vGPU is released;
  under "framebuffer" it does not (docs/dra.md says which can happen).
"""

from __future__ import annotations

import os
import uuid

import pytest

from tests.k8s import drakit as K
from tests.k8s.agentkit import wait_for
from tests.k8s.test_dra_apiserver import published

SEL = 'device.attributes["' + K.DRIVER + '"].type == "{}"'


@pytest.fixture
def make(apiserver, kube_scheduler, workdir):
    made: list[K.DraNode] = []
    K.ensure_device_class(apiserver)

    def start(gpus: tuple[str, ...], label: str, rule: str = "framebuffer", start=True) -> K.DraNode:
        name = f"dra-{uuid.uuid4().hex[:10]}"
        K.ready_node(apiserver, name)
        K.set_label(apiserver, name, label)
        node = K.DraNode(
            name, workdir / name, apiserver.admin_kubeconfig, gpus=gpus, sim_options={"mixed_size_rule": rule}
        )
        made.append(node)
        if start:
            node.start()
        return node

    yield start
    for node in made:
        node.stop()
        apiserver.request("DELETE", f"/api/v1/nodes/{node.name}")
        for s in K.slices(apiserver, node.name):
            apiserver.request("DELETE", f"/apis/resource.k8s.io/v1/resourceslices/{s['metadata']['name']}")


def claim_for(apiserver, node, namespace: str, name: str, vgpu: str, count: int = 1) -> None:
    K.create_claim(apiserver, namespace, name, cel=SEL.format(vgpu), count=count)
    K.create_pod(apiserver, namespace, f"vm-{name}", name, node.name)


def vgpus(node) -> int:
    base = node.sim / "sys/bus/pci/devices"
    return sum(
        1
        for vf in os.listdir(base)
        if (base / vf / "nvidia/current_vgpu_type").exists()
        and (base / vf / "nvidia/current_vgpu_type").read_text().strip() != "0"
    )


def test_a_types_count_is_cut_to_its_placements_in_mixed_size_mode(apiserver, make):
    node = make(("L40S",), "L40S-8Q-6-mixed")
    devices = published(apiserver, node, 5)
    assert sorted(devices) == ["gpu0-l40s-24q-0", *[f"gpu0-l40s-8q-{n}" for n in range(4)]]
    assert "offers 4 x L40S-8Q, not 6: in mixed-size mode" in node.tail(200)


def test_the_vfs_counter_keeps_allocations_within_the_gpus_vfs(apiserver, make, k8s_namespace):
    """An L4 (24 GB) whose PF offers 8 VFs (sriov_totalvfs: a BIOS or firmware setting can lower it):
    8 x 1Q take every VF with 16 GB of framebuffer left, so a 2Q more stays pending — without the vfs
    counter the scheduler would allocate it and no VF would be free to prepare it."""
    from vgpu_dm.sim.layout import SimState

    node = make(("L4",), "L4-small", start=False)
    state = SimState.load(node.sim)
    state.gpus[0].total_vfs = 8
    state.save(node.sim)
    (node.sim / "sys/bus/pci/devices/0000:3b:00.0/sriov_totalvfs").write_text("8\n")
    node.start()
    published(apiserver, node, 24)
    (counters,) = [s for s in K.slices(apiserver, node.name) if s["spec"].get("sharedCounters")]
    assert counters["spec"]["sharedCounters"][0]["counters"]["vfs"] == {"value": "8"}
    claim_for(apiserver, node, k8s_namespace, "ones", "L4-1Q", count=8)
    ones = K.allocated(apiserver, k8s_namespace, "ones")
    claim_for(apiserver, node, k8s_namespace, "two", "L4-2Q")
    wait_for(
        lambda: "FailedScheduling" in K.pod_event_reasons(apiserver, k8s_namespace, "vm-two"),
        what="the scheduler to report vm-two unschedulable",
    )
    answer = node.kubelet().prepare(K.identity(ones)).claims[ones["metadata"]["uid"]]
    assert answer.error == "" and len(answer.devices) == 8 and vgpus(node) == 8


@pytest.mark.parametrize("rule", ["framebuffer", "placements"])
def test_placements_can_fragment_and_a_prepare_then_fails_cleanly(apiserver, make, k8s_namespace, rule):
    """12Q, 8Q, 8Q, 12Q, 8Q: 48 GB of 48, which the counters allow. Under the placement rule the driver
    put them at slots 0-11, 16-23, 24-31 and 36-47, and the last 8Q has no placement left (free: 12-15,
    32-35): its prepare fails, leaves nothing behind, and succeeds once the first 8Q is released."""
    node = make(("L40S",), "L40S-mixed", rule)
    published(apiserver, node, 10)
    order = [("a", "L40S-12Q"), ("b", "L40S-8Q"), ("c", "L40S-8Q"), ("d", "L40S-12Q"), ("e", "L40S-8Q")]
    claims = {}
    for name, vgpu in order:
        claim_for(apiserver, node, k8s_namespace, name, vgpu)
        claims[name] = K.allocated(apiserver, k8s_namespace, name)
    kubelet = node.kubelet()
    answers = {n: kubelet.prepare(K.identity(c)).claims[c["metadata"]["uid"]] for n, c in claims.items()}
    assert [answers[n].error for n in "abcd"] == ["", "", "", ""]
    if rule == "framebuffer":
        assert answers["e"].error == "" and vgpus(node) == 5
        return
    assert "has no room for another L40S-8Q" in answers["e"].error
    assert vgpus(node) == 4 and claims["e"]["metadata"]["uid"] not in node.checkpoint["claims"]
    again = kubelet.prepare(K.identity(claims["e"])).claims[claims["e"]["metadata"]["uid"]]
    assert "has no room" in again.error and vgpus(node) == 4  # the kubelet's retry: still clean
    assert kubelet.unprepare(K.identity(claims["b"])).claims[claims["b"]["metadata"]["uid"]].error == ""
    K.release(apiserver, k8s_namespace, "b", "vm-b")
    retry = kubelet.prepare(K.identity(claims["e"])).claims[claims["e"]["metadata"]["uid"]]
    assert retry.error == "" and vgpus(node) == 4


def test_a_refusal_of_the_counter_layouts_is_not_taken_for_a_gate_that_is_off(apiserver, make):
    """An admission policy refuses this node's slices with counters (HTTP 422, as for any invalid
    slice): the mixed-size GPU is held back with the server's reason — not 'partitionable devices are
    off' — and offered as soon as the policy goes."""
    import json
    import time

    name = f"no-counters-{uuid.uuid4().hex[:8]}"
    node = make(("T4", "L40S"), "two-kinds", start=False)
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["resource.k8s.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["resourceslices"],
                    }
                ]
            },
            "matchConditions": [
                {"name": "this-node", "expression": f'object.spec.nodeName == "{node.name}"'}
            ],
            "validations": [
                {
                    "expression": "!has(object.spec.sharedCounters) && !(has(object.spec.devices) && "
                    "object.spec.devices.exists(d, has(d.consumesCounters)))",
                    "message": "counters are not allowed here",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    base = "/apis/admissionregistration.k8s.io/v1"
    for kind, body in (
        ("validatingadmissionpolicies", policy),
        ("validatingadmissionpolicybindings", binding),
    ):
        status, text = apiserver.request("POST", f"{base}/{kind}", body=json.dumps(body).encode())
        assert status == 201, text
    try:
        time.sleep(2)  # the API server's policy cache
        node.start()
        devices = published(apiserver, node, 4)
        assert sorted(devices) == [f"gpu0-t4-4q-{n}" for n in range(4)]
        wait_for(lambda: "counters are not allowed here" in node.tail(200), what="the refusal reported")
        assert "DRAPartitionableDevices" not in node.log.read_text()
    finally:
        for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
            apiserver.request("DELETE", f"{base}/{kind}/{name}")
    # Tried again at every publish: offered once the server takes the counters.
    devices = published(apiserver, node, 10)
    assert sum(1 for d in devices if d.startswith("gpu1-l40s-")) == 6
