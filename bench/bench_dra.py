"""nvidia-vgpu-dra against the real etcd + kube-apiserver + kube-scheduler of the tests, on simulated
hosts: how long a claim takes from creation to prepared (scheduler allocation, then the kubelet's
NodePrepareResources over the driver's socket, which creates the vGPU), and how long publishing the
slices of an 8-GPU node takes (at start and after a relabel), for equal-size and mixed-size GPUs.

Skips with a reason when KUBEBUILDER_ASSETS is unset (``make bench`` sets it like ``make test``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

CONFIG = """\
version: v1
vgpu-configs:
  default:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
  T4-1Q:
    - devices: all
      vgpu-devices: {"T4-1Q": 16}
  T4-4Q:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  L40S-mixed:
    - devices: all
      vgpu-devices: {"L40S-24Q": 2, "L40S-12Q": 4, "L40S-8Q": 4, "L40S-4Q": 8}
  L40S-8Q:
    - devices: all
      vgpu-devices: {"L40S-8Q": 6}
"""


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"median {statistics.median(values) * 1000:.0f} ms (quartiles {q[0] * 1000:.0f}-{q[2] * 1000:.0f})"


def in_pool(K, server, node: str) -> int:
    """Devices of the node's pool once its newest generation is complete (0 while it is not)."""
    try:
        return len(K.pool_devices(server, node))
    except AssertionError:
        return 0


def wait(predicate, timeout: float = 60.0, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise SystemExit("timed out")


def claims_to_prepared(server, K, work: Path, count: int) -> None:
    name = "bench-claims"
    K.ready_node(server, name)
    K.set_label(server, name, "default")
    node = K.DraNode(name, work / name, server.admin_kubeconfig, gpus=("T4", "T4"))
    node.config.write_text(CONFIG)
    node.start()
    try:
        wait(lambda: in_pool(K, server, name) == 16)
        kubelet = node.kubelet()
        server.kubectl("create", "namespace", "bench")
        allocate, prepare, total, unprepare = [], [], [], []
        for i in range(count):
            claim_name = f"c{i}"
            began = time.perf_counter()
            K.create_claim(
                server, "bench", claim_name, cel='device.attributes["vgpu.nvidia.com"].type == "T4-2Q"'
            )
            K.create_pod(server, "bench", f"vm{i}", claim_name, name)
            claim = K.allocated(server, "bench", claim_name)
            allocated = time.perf_counter()
            entry = kubelet.prepare(K.identity(claim)).claims[claim["metadata"]["uid"]]
            done = time.perf_counter()
            assert entry.error == "", entry.error
            allocate.append(allocated - began)
            prepare.append(done - allocated)
            total.append(done - began)
            t = time.perf_counter()
            assert kubelet.unprepare(K.identity(claim)).claims[claim["metadata"]["uid"]].error == ""
            unprepare.append(time.perf_counter() - t)
            K.release(server, "bench", claim_name, f"vm{i}")
        print(f"{count} claims, one after another, on a 2 x T4 host (T4-2Q):")
        print(f"  claim created -> allocated by the scheduler: {ms(allocate)}")
        print(f"  NodePrepareResources (claim read, vGPU created, checkpoint, CDI + metadata): {ms(prepare)}")
        print(f"  NodeUnprepareResources: {ms(unprepare)}")
        benchlib.result("DRA claim created -> prepared (allocation + NodePrepareResources)", ms(total))
        benchlib.result(
            "DRA NodePrepareResources alone", ms(prepare), "< 45 s (kubelet timeout)", max(prepare) < 45
        )
    finally:
        node.stop()


def publication(
    server, K, work: Path, gpus: str, first: str, second: str, devices: tuple[int, int], rounds: int
):
    name = f"bench-{gpus.lower()}"
    K.ready_node(server, name)
    K.set_label(server, name, first)
    node = K.DraNode(name, work / name, server.admin_kubeconfig, gpus=(gpus,) * 8)
    node.config.write_text(CONFIG)
    began = time.perf_counter()
    node.start(wait=False)
    try:
        wait(lambda: in_pool(K, server, name) == devices[0])
        start = time.perf_counter() - began
        relabel = []
        for i in range(rounds):
            label, n = (second, devices[1]) if i % 2 == 0 else (first, devices[0])
            t = time.perf_counter()
            K.set_label(server, name, label)
            wait(lambda n=n: in_pool(K, server, name) == n)
            relabel.append(time.perf_counter() - t)
        slices = len(K.slices(server, name))
        print(
            f"8 x {gpus}, {first} ({devices[0]} devices, {slices} slices) <-> {second} "
            f"({devices[1]} devices):"
        )
        print(f"  driver start -> all slices published: {start * 1000:.0f} ms")
        print(f"  relabel -> new generation complete, {rounds} times: {ms(relabel)}")
        benchlib.result(
            f"DRA slices of 8 x {gpus}: start -> published ({devices[0]} devices)", f"{start * 1000:.0f} ms"
        )
        benchlib.result(f"DRA slices of 8 x {gpus}: relabel -> republished", ms(relabel))
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=20, help="claims prepared one after another (20)")
    parser.add_argument("--relabels", type=int, default=10, help="relabels per 8-GPU host (10)")
    args = parser.parse_args()
    assets = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not assets:
        print("skipped: KUBEBUILDER_ASSETS is unset (`make bench` sets it when ../shared/envtest exists)")
        return 0
    from tests.k8s import drakit as K
    from tests.k8s.envtest import APIServer, EnvtestError, Scheduler

    if not K.DRA.exists():
        print(f"{K.DRA} is missing: install the package with its dra extra (make bench does)")
        return 1
    benchlib.compile_package()
    work = Path(tempfile.mkdtemp(prefix="vgpu-bench-dra-"))
    server = APIServer(assets)
    scheduler = None
    try:
        server.setup()
        try:
            scheduler = Scheduler(server)
        except EnvtestError as exc:
            print(f"skipped: {exc}")
            return 0
        scheduler.start()
        K.ensure_device_class(server)
        claims_to_prepared(server, K, work, args.claims)
        publication(server, K, work, "T4", "T4-1Q", "T4-4Q", (128, 32), args.relabels)
        publication(server, K, work, "L40S", "L40S-mixed", "L40S-8Q", (144, 48), args.relabels)
        return 0
    finally:
        if scheduler is not None:
            scheduler.stop()
        server.teardown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
