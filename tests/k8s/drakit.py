"""The DRA driver in tests: the installed ``nvidia-vgpu-dra`` as a process on a simulated host, a fake
kubelet that speaks the kubelet's gRPC over the real Unix sockets, KubeVirt's rules for reading the
device metadata file, and the Kubernetes objects a claim needs (Node ready for scheduling, DeviceClass,
ResourceClaim by name, Pod), with the release a kube-controller-manager would do.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.k8s.agentkit import wait_for
from vgpu_dm.dra.proto import dra_v1_pb2, dra_v1beta1_pb2, registration_v1_pb2
from vgpu_dm.sim.layout import create_host

DRA = Path(sys.executable).parent / "nvidia-vgpu-dra"
DRIVER = "vgpu.nvidia.com"
CONFIG = """\
version: v1
vgpu-configs:
  default:
    - devices: all
      vgpu-devices: {"T4-8Q": 2}
  T4-2Q:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
  T4-4Q:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  gpu0-T4-4Q:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
  L40S-mixed:
    - devices: all
      vgpu-devices: {"L40S-24Q": 2, "L40S-12Q": 4, "L40S-8Q": 4}
  L40S-8Q:
    - devices: all
      vgpu-devices: {"L40S-8Q": 6}
  L40S-8Q-6-mixed:
    - devices: all
      vgpu-devices: {"L40S-24Q": 1, "L40S-8Q": 6}
  L4-small:
    - devices: all
      vgpu-devices: {"L4-1Q": 16, "L4-2Q": 8}
  two-kinds:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-4Q": 4}
    - device-filter: "0x26B910DE"
      devices: all
      vgpu-devices: {"L40S-24Q": 2, "L40S-12Q": 4}
"""
_PACKAGES = {
    "v1": ("k8s.io.kubelet.pkg.apis.dra.v1", dra_v1_pb2),
    "v1beta1": ("k8s.io.kubelet.pkg.apis.dra.v1beta1", dra_v1beta1_pb2),
}


class FakeKubelet:
    """The kubelet's side of the plugin contract, over the driver's real Unix sockets."""

    def __init__(self, registration_socket: str):
        self.registration_socket = registration_socket
        self.endpoint = ""
        self.versions: list[str] = []

    def register(self) -> registration_v1_pb2.PluginInfo:
        pb = registration_v1_pb2
        with grpc.insecure_channel(f"unix://{self.registration_socket}") as channel:
            info = channel.unary_unary(
                "/pluginregistration.Registration/GetInfo",
                request_serializer=pb.InfoRequest.SerializeToString,
                response_deserializer=pb.PluginInfo.FromString,
            )(pb.InfoRequest(), timeout=10)
            channel.unary_unary(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                request_serializer=pb.RegistrationStatus.SerializeToString,
                response_deserializer=pb.RegistrationStatusResponse.FromString,
            )(pb.RegistrationStatus(plugin_registered=True), timeout=10)
        self.endpoint = info.endpoint
        self.versions = list(info.supported_versions)
        return info

    def _call(self, method: str, claims: list[dict], version: str, timeout: float = 45):
        package, pb = _PACKAGES[version]
        request_type = getattr(pb, f"{method}Request")
        response_type = getattr(pb, f"{method}Response")
        request = request_type(
            claims=[pb.Claim(namespace=c["namespace"], uid=c["uid"], name=c["name"]) for c in claims]
        )
        with grpc.insecure_channel(f"unix://{self.endpoint}") as channel:
            # The kubelet's default per-call timeout.
            return channel.unary_unary(
                f"/{package}.DRAPlugin/{method}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, timeout=timeout)

    def prepare(self, *claims: dict, version: str = "v1", timeout: float = 45):
        return self._call("NodePrepareResources", list(claims), version, timeout)

    def unprepare(self, *claims: dict, version: str = "v1"):
        return self._call("NodeUnprepareResources", list(claims), version)


def _accepts(path: str) -> bool:
    """A Unix socket someone listens on (a killed driver leaves its socket file behind)."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def identity(claim: dict) -> dict:
    meta = claim["metadata"]
    return {"namespace": meta["namespace"], "uid": meta["uid"], "name": meta["name"]}


@dataclass
class DraNode:
    """One node's DRA driver on a simulated host, with its directories."""

    name: str
    base: Path
    kubeconfig: str
    gpus: tuple[str, ...] = ("T4", "T4")
    default_config: str = "default"
    sim_options: dict[str, str] = field(default_factory=dict)  # simulator options (sim/layout.py)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.sim = self.base / "host"
        self.config = self.base / "config.yaml"
        self.registry = self.base / "plugins_registry"
        self.plugins = self.base / "plugins"
        self.cdi = self.base / "cdi"
        self.log = self.base / "dra.log"
        if not self.sim.exists():
            create_host(self.sim, list(self.gpus), options=self.sim_options or None)
        if not self.config.exists():
            self.config.write_text(CONFIG)

    @property
    def plugin_dir(self) -> Path:
        return self.plugins / DRIVER

    @property
    def registration_socket(self) -> str:
        return str(self.registry / f"{DRIVER}-reg.sock")

    @property
    def checkpoint(self) -> dict:
        return json.loads((self.plugin_dir / "checkpoint.json").read_text())

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> None:
        args = [
            str(DRA), "--kubeconfig", self.kubeconfig, "--node-name", self.name,
            "--config-file", str(self.config),
            "--default-vgpu-config", self.default_config, "--sim", str(self.sim),
            "--kubelet-registry-dir", str(self.registry), "--kubelet-plugins-dir", str(self.plugins),
            "--cdi-dir", str(self.cdi), "--resync-interval", "1", "--debug", *self.extra_args,
        ]  # fmt: skip
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env={**base_env, **(env or {})}
            )
        if wait:
            wait_for(
                lambda: _accepts(self.registration_socket) or self.proc.poll() is not None,
                timeout=60,
                what="the registration socket",
            )
            assert self.proc.poll() is None, f"nvidia-vgpu-dra exited {self.proc.returncode}:\n{self.tail()}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kubelet(self) -> FakeKubelet:
        kubelet = FakeKubelet(self.registration_socket)
        kubelet.register()
        return kubelet

    def container_file(self, container_path: str) -> Path | None:
        """Where a path inside the container comes from on the host, per the CDI specs' mounts."""
        for spec in self.cdi.glob("*.json"):
            for device in json.loads(spec.read_text()).get("devices", []):
                for mount in device.get("containerEdits", {}).get("mounts", []):
                    if mount["containerPath"] == container_path:
                        return Path(mount["hostPath"])
        return None


def kubevirt_read_metadata(node: DraNode, claim_name: str, request: str, template: str | None = None) -> dict:
    """What KubeVirt's virt-launcher does with the KEP-5304 metadata (VEP-10, kubevirt pkg/dra): glob
    ``*-metadata.json`` in the request's directory inside the container and require exactly one file;
    take the first object of the stream whose apiVersion it knows; require exactly one device in the
    request; use ``mdevUUID`` first, then ``resource.kubernetes.io/pciBusID``.

    The container directory is made of the CDI mounts the driver's specs declare (as the runtime would)."""
    sub = f"resourceclaimtemplates/{template}" if template else f"resourceclaims/{claim_name}"
    directory = f"/var/run/kubernetes.io/dra-device-attributes/{sub}/{request}"
    mounted = {}
    for spec in node.cdi.glob("*.json"):
        for device in json.loads(spec.read_text()).get("devices", []):
            for mount in device.get("containerEdits", {}).get("mounts", []):
                if os.path.dirname(mount["containerPath"]) == directory:
                    mounted[os.path.basename(mount["containerPath"])] = mount["hostPath"]
    files = sorted(n for n in mounted if glob.fnmatch.fnmatch(n, "*-metadata.json"))
    assert len(files) == 1, f"KubeVirt needs exactly one metadata file in {directory}, found {files}"
    decoder = json.JSONDecoder()
    text = Path(mounted[files[0]]).read_text()
    position, chosen = 0, None
    while position < len(text.rstrip()):
        obj, position = decoder.raw_decode(text, position)
        while position < len(text) and text[position].isspace():
            position += 1
        if obj.get("apiVersion") == "metadata.resource.k8s.io/v1alpha1" and chosen is None:
            chosen = obj
    assert chosen is not None, "no metadata object of a version KubeVirt understands"
    requests = [r for r in chosen["requests"] if r["name"] == request]
    assert len(requests) == 1 and len(requests[0]["devices"]) == 1, f"KubeVirt needs one device: {requests}"
    attrs = requests[0]["devices"][0]["attributes"]
    if "mdevUUID" in attrs:
        return {"mdev": attrs["mdevUUID"]["string"], "device": requests[0]["devices"][0]}
    return {"pci": attrs["resource.kubernetes.io/pciBusID"]["string"], "device": requests[0]["devices"][0]}


# -- Kubernetes objects ------------------------------------------------------------------------------


def ready_node(apiserver, name: str) -> None:
    """A Node the scheduler will use: no not-ready taint, some allocatable cpu/memory/pods."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }
    status, text = apiserver.request("POST", "/api/v1/nodes", body=json.dumps(body).encode())
    assert status in (201, 409), text
    patch = {"spec": {"taints": None}}
    apiserver.request(
        "PATCH",
        f"/api/v1/nodes/{name}",
        body=json.dumps(patch).encode(),
        content_type="application/merge-patch+json",
    )
    status_patch = {
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
        }
    }
    status, text = apiserver.request(
        "PATCH",
        f"/api/v1/nodes/{name}/status",
        body=json.dumps(status_patch).encode(),
        content_type="application/merge-patch+json",
    )
    assert status == 200, text


def ensure_device_class(apiserver) -> None:
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": DRIVER},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
    }
    status, text = apiserver.request(
        "POST", "/apis/resource.k8s.io/v1/deviceclasses", body=json.dumps(body).encode()
    )
    assert status in (201, 409), text


def create_claim(apiserver, namespace: str, name: str, cel: str | None = None, count: int = 1) -> dict:
    exactly: dict[str, Any] = {"deviceClassName": DRIVER, "allocationMode": "ExactCount", "count": count}
    if cel:
        exactly["selectors"] = [{"cel": {"expression": cel}}]
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"devices": {"requests": [{"name": "vgpu", "exactly": exactly}]}},
    }
    status, text = apiserver.request(
        "POST",
        f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims",
        body=json.dumps(body).encode(),
    )
    assert status == 201, text
    return json.loads(text)


def create_pod(apiserver, namespace: str, name: str, claim: str, node: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "resourceClaims": [{"name": "vgpu", "resourceClaimName": claim}],
            "containers": [
                {"name": "vm", "image": "registry.example/vm:1", "resources": {"claims": [{"name": "vgpu"}]}}
            ],
        },
    }
    status, text = apiserver.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods", body=json.dumps(body).encode()
    )
    assert status == 201, text


def get_claim(apiserver, namespace: str, name: str) -> dict | None:
    status, text = apiserver.request(
        "GET", f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}"
    )
    return json.loads(text) if status == 200 else None


def allocated(apiserver, namespace: str, name: str, timeout: float = 30.0) -> dict:
    """Wait until the scheduler allocated the claim; returns the claim."""

    def check():
        claim = get_claim(apiserver, namespace, name)
        return claim if claim and (claim.get("status") or {}).get("allocation") else None

    return wait_for(check, timeout=timeout, what=f"allocation of claim {namespace}/{name}")


def pod_event_reasons(apiserver, namespace: str, pod: str) -> str:
    status, text = apiserver.request(
        "GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name={pod}"
    )
    return (
        " | ".join(f"{e.get('reason')}: {e.get('message')}" for e in json.loads(text).get("items", []))
        if status == 200
        else ""
    )


def release(apiserver, namespace: str, claim: str, pod: str) -> None:
    """What kube-controller-manager does once the pod is gone: delete the pod, deallocate the claim,
    drop its finalizer, delete it."""
    apiserver.request(
        "DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}", body=b'{"gracePeriodSeconds": 0}'
    )
    apiserver.request(
        "DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}", body=b'{"gracePeriodSeconds": 0}'
    )
    patch = {"status": {"reservedFor": None, "allocation": None}}
    apiserver.request(
        "PATCH",
        f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{claim}/status",
        body=json.dumps(patch).encode(),
        content_type="application/merge-patch+json",
    )
    apiserver.request(
        "PATCH",
        f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{claim}",
        body=json.dumps({"metadata": {"finalizers": None}}).encode(),
        content_type="application/merge-patch+json",
    )
    apiserver.request("DELETE", f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{claim}")


def slices(apiserver, node: str) -> list[dict]:
    status, text = apiserver.request(
        "GET", f"/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName={node}"
    )
    assert status == 200, text
    return json.loads(text)["items"]


def pool_devices(apiserver, node: str) -> dict[str, dict]:
    """The devices of the newest complete generation of the node's pool."""
    items = slices(apiserver, node)
    if not items:
        return {}
    newest = max(s["spec"]["pool"]["generation"] for s in items)
    current = [s for s in items if s["spec"]["pool"]["generation"] == newest]
    assert len(current) == current[0]["spec"]["pool"]["resourceSliceCount"], "pool incomplete"
    return {d["name"]: d for s in current for d in s["spec"].get("devices") or []}


def set_label(apiserver, node: str, value: str | None) -> None:
    patch = {"metadata": {"labels": {"nvidia.com/vgpu.config": value}}}
    status, text = apiserver.request(
        "PATCH",
        f"/api/v1/nodes/{node}",
        body=json.dumps(patch).encode(),
        content_type="application/merge-patch+json",
    )
    assert status == 200, text


def wait_quiet(seconds: float = 0.0) -> None:
    time.sleep(seconds)
