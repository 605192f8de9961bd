"""The kubelet's side of the driver: the registration socket (plugin watcher) and the DRA service
socket, both plain gRPC over Unix sockets. Both DRA API versions are served — v1 and v1beta1 carry the
same messages — and ``GetInfo`` lists ``v1.DRAPlugin`` first, so a kubelet that speaks v1 uses it.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent import futures

import grpc

from vgpu_dm import log
from vgpu_dm.dra.driver import KUBELET_TIMEOUT, Prepared
from vgpu_dm.dra.proto import dra_v1_pb2, dra_v1beta1_pb2, registration_v1_pb2

_log = log.get("dra")
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")  # preferred first
PLUGIN_TYPE = "DRAPlugin"
_PACKAGES = {
    dra_v1_pb2: "k8s.io.kubelet.pkg.apis.dra.v1",
    dra_v1beta1_pb2: "k8s.io.kubelet.pkg.apis.dra.v1beta1",
}


def _deadline(context) -> float:
    """The call's deadline (monotonic): the kubelet's own, else its default of 45 s."""
    remaining = context.time_remaining()
    return time.monotonic() + (remaining if remaining is not None else KUBELET_TIMEOUT)


def _dra_handler(pb, driver) -> grpc.GenericRpcHandler:
    def prepare(request, context):
        response = pb.NodePrepareResourcesResponse()
        deadline = _deadline(context)
        for claim in request.claims:
            try:
                result = driver.prepare(claim.namespace, claim.uid, claim.name, deadline)
            except Exception as exc:  # never a gRPC error: it would fail every claim of the call
                result = Prepared([], f"{type(exc).__name__}: {exc}")
            entry = response.claims[claim.uid]
            if result.error:
                _log.error(f"prepare {claim.namespace}/{claim.name} ({claim.uid}): {result.error}")
                entry.error = result.error
                continue
            for device in result.devices:
                out = entry.devices.add(
                    request_names=device["request_names"],
                    pool_name=device["pool_name"],
                    device_name=device["device_name"],
                    cdi_device_ids=device["cdi_device_ids"],
                )
                if device.get("share_id"):
                    out.share_id = device["share_id"]
        return response

    def unprepare(request, context):
        response = pb.NodeUnprepareResourcesResponse()
        deadline = _deadline(context)
        for claim in request.claims:
            try:
                error = driver.unprepare(claim.namespace, claim.uid, claim.name, deadline)
            except Exception as exc:
                error = f"ResourceClaim {claim.namespace}/{claim.name}: {type(exc).__name__}: {exc}"
            response.claims[claim.uid].error = error
            if error:
                _log.error(f"unprepare {claim.namespace}/{claim.name} ({claim.uid}): {error}")
        return response

    return grpc.method_handlers_generic_handler(
        f"{_PACKAGES[pb]}.DRAPlugin",
        {
            "NodePrepareResources": grpc.unary_unary_rpc_method_handler(
                prepare,
                request_deserializer=pb.NodePrepareResourcesRequest.FromString,
                response_serializer=pb.NodePrepareResourcesResponse.SerializeToString,
            ),
            "NodeUnprepareResources": grpc.unary_unary_rpc_method_handler(
                unprepare,
                request_deserializer=pb.NodeUnprepareResourcesRequest.FromString,
                response_serializer=pb.NodeUnprepareResourcesResponse.SerializeToString,
            ),
        },
    )


def _registration_handler(driver_name: str, endpoint: str, on_status) -> grpc.GenericRpcHandler:
    pb = registration_v1_pb2

    def get_info(request, context):
        return pb.PluginInfo(
            type=PLUGIN_TYPE, name=driver_name, endpoint=endpoint, supported_versions=list(DRA_SERVICES)
        )

    def notify(request, context):
        on_status(request.plugin_registered, request.error)
        return pb.RegistrationStatusResponse()

    return grpc.method_handlers_generic_handler(
        "pluginregistration.Registration",
        {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                get_info,
                request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.PluginInfo.SerializeToString,
            ),
            "NotifyRegistrationStatus": grpc.unary_unary_rpc_method_handler(
                notify,
                request_deserializer=pb.RegistrationStatus.FromString,
                response_serializer=pb.RegistrationStatusResponse.SerializeToString,
            ),
        },
    )


def _bind(server: grpc.Server, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a killed driver would make the bind fail
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise OSError(f"cannot listen on {path}")


class KubeletPlugin:
    """Both gRPC servers. The DRA socket is served before the registration socket appears, so the
    kubelet never finds a plugin it cannot call yet; at stop the registration socket goes first."""

    def __init__(self, driver, driver_name: str, dra_socket: str, registration_socket: str):
        self.driver = driver
        self.driver_name = driver_name
        self.dra_socket = dra_socket
        self.registration_socket = registration_socket
        self.registered: bool | None = None
        self._dra: grpc.Server | None = None
        self._reg: grpc.Server | None = None

    def _on_status(self, registered: bool, error: str) -> None:
        self.registered = registered
        if registered:
            _log.info(f"the kubelet registered DRA driver {self.driver_name}")
        else:
            _log.error(f"the kubelet did not register DRA driver {self.driver_name}: {error}")

    def start(self) -> None:
        # Prepare and unprepare take turns anyway (the driver's lock); a few threads keep the socket
        # answering (e.g. a second kubelet connection) while one call works.
        self._dra = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dra-grpc"))
        self._dra.add_generic_rpc_handlers(
            [_dra_handler(dra_v1_pb2, self.driver), _dra_handler(dra_v1beta1_pb2, self.driver)]
        )
        _bind(self._dra, self.dra_socket)
        self._dra.start()
        self._reg = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="dra-reg"))
        self._reg.add_generic_rpc_handlers(
            [_registration_handler(self.driver_name, self.dra_socket, self._on_status)]
        )
        _bind(self._reg, self.registration_socket)
        self._reg.start()
        _log.info(f"serving DRA on {self.dra_socket}, registration on {self.registration_socket}")

    def stop(self, grace: float = 5.0) -> None:
        for server, path in ((self._reg, self.registration_socket), (self._dra, self.dra_socket)):
            if server is not None:
                server.stop(grace).wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
