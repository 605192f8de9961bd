"""`make dra-demo`: nvidia-vgpu-dra end to end on a simulated 2 x T4 host, against a real kube-apiserver
and kube-scheduler (from KUBEBUILDER_ASSETS, unpacked by make from ../shared/envtest).

The steps a cluster goes through, each shown as it happens: the driver publishes the devices the node's
config allows; a ResourceClaim with a CEL selector is allocated by the scheduler; the kubelet (played
here by the tests' fake kubelet, over the driver's real Unix sockets) prepares it, which creates the
vGPU in the simulated sysfs and writes the CDI spec and the device metadata KubeVirt reads; the pod
goes away, the claim is unprepared and the vGPU removed.

KEEP=1 keeps the demo's directory (simulated host, driver log, CDI specs) and says where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.k8s import drakit as K  # noqa: E402
from tests.k8s.envtest import APIServer, EnvtestError, Scheduler  # noqa: E402


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cmd: str, out: str) -> None:
    print(f"$ {cmd}\n{out.rstrip()}", flush=True)


def main() -> int:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        print(
            "KUBEBUILDER_ASSETS is unset: run `make dra-demo` (it unpacks ../shared/envtest), or point "
            "KUBEBUILDER_ASSETS at a directory with kube-apiserver, etcd and kube-scheduler",
            file=sys.stderr,
        )
        return 1
    keep = bool(os.environ.get("KEEP"))
    work = Path(tempfile.mkdtemp(prefix="vgpu-dra-demo-"))
    server = APIServer(assets)
    scheduler = None
    node = None
    try:
        step("a real etcd + kube-apiserver + kube-scheduler (v1.36)")
        server.setup()
        try:
            scheduler = Scheduler(server)
        except EnvtestError as exc:
            print(
                f"{exc}: the DRA demo needs a kube-scheduler beside kube-apiserver and etcd "
                f"(setup-envtest's assets have none: add the kube-scheduler binary of the same Kubernetes "
                f"version, from its server release, to that directory)",
                file=sys.stderr,
            )
            return 1
        scheduler.start()
        print(f"API server at {server.url}")
        name = "gpu-node-1"
        K.ready_node(server, name)
        K.set_label(server, name, "T4-2Q")
        K.ensure_device_class(server)
        step(
            "nvidia-vgpu-dra on a simulated host with two Tesla T4s, node label nvidia.com/vgpu.config=T4-2Q"
        )
        node = K.DraNode(name, work / name, server.admin_kubeconfig, gpus=("T4", "T4"))
        print(f"config file {node.config}:\n{K.CONFIG}")
        node.start()
        for _ in range(100):
            if K.pool_devices(server, name):
                break
            time.sleep(0.1)
        show(
            "kubectl get resourceslices",
            server.kubectl("get", "resourceslices", "-o", "wide").stdout,
        )
        devices = K.pool_devices(server, name)
        print(f"{len(devices)} devices; one of them:")
        print(json.dumps(devices["gpu0-t4-2q-0"], indent=2))
        step("a VM's claim for one T4-2Q, and its pod; the scheduler allocates")
        server.kubectl("create", "namespace", "vms")
        K.create_claim(server, "vms", "vm-vgpu", cel='device.attributes["vgpu.nvidia.com"].type == "T4-2Q"')
        K.create_pod(server, "vms", "virt-launcher-vm", "vm-vgpu", name)
        claim = K.allocated(server, "vms", "vm-vgpu")
        print(json.dumps(claim["status"]["allocation"]["devices"]["results"], indent=2))
        show(
            "ls <sim>/sys/bus/mdev/devices   # no vGPU exists yet",
            "\n".join(os.listdir(node.sim / "sys/bus/mdev/devices")) or "(empty)",
        )
        step("the kubelet registers the plugin and prepares the claim")
        kubelet = node.kubelet()
        print(f"GetInfo: endpoint {kubelet.endpoint}, versions {kubelet.versions}")
        began = time.perf_counter()
        response = kubelet.prepare(K.identity(claim))
        entry = response.claims[claim["metadata"]["uid"]]
        print(f"NodePrepareResources answered in {(time.perf_counter() - began) * 1000:.0f} ms: {entry}")
        show("ls <sim>/sys/bus/mdev/devices", "\n".join(os.listdir(node.sim / "sys/bus/mdev/devices")))
        for spec in sorted(node.cdi.glob("*.json")):
            show(f"cat {spec}", json.dumps(json.loads(spec.read_text()), indent=2))
        metadata = node.plugin_dir / "dra-device-metadata/vms_vm-vgpu/vgpu/metadata.json"
        show(f"cat {metadata}", metadata.read_text())
        found = K.kubevirt_read_metadata(node, "vm-vgpu", "vgpu")
        print(f"KubeVirt's reading of the metadata file: mdevUUID {found['mdev']}")
        step("the VM stops: the pod goes, the kubelet unprepares, the claim is released")
        response = kubelet.unprepare(K.identity(claim))
        print(f"NodeUnprepareResources: error={response.claims[claim['metadata']['uid']].error!r}")
        K.release(server, "vms", "vm-vgpu", "virt-launcher-vm")
        show(
            "ls <sim>/sys/bus/mdev/devices   # the vGPU is gone again",
            "\n".join(os.listdir(node.sim / "sys/bus/mdev/devices")) or "(empty)",
        )
        print(f"CDI specs left: {sorted(p.name for p in node.cdi.glob('*.json')) or 'none'}")
        print("\nthe driver's last log lines:\n" + node.tail(8))
        if keep:
            print(f"\nkept (KEEP=1): the simulated host {node.sim}, the driver log {node.log}")
        else:
            print("\n(KEEP=1 make dra-demo keeps the simulated host and the driver's whole log)")
        return 0
    finally:
        if node is not None:
            node.stop()
        if scheduler is not None:
            scheduler.stop()
        server.teardown()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
