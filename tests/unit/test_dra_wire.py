"""The kubelet's gRPC messages on the wire, described independently of our .proto files: the field
numbers below are those of Kubernetes' own api.proto files (kubelet/pkg/apis/dra/v1 and v1beta1,
pluginregistration/v1; share_id = 5 since 1.34), and the bytes are built and read by a small protobuf
wire codec written here. A wrong number or type in our .proto fails these tests, which a table read
back from our own generated descriptors could not catch."""

from __future__ import annotations

import pytest

from vgpu_dm.dra.proto import dra_v1_pb2, dra_v1beta1_pb2, registration_v1_pb2

VARINT, LEN = 0, 2


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        return varint(number << 3 | VARINT) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | LEN) + varint(len(data)) + data


def parse(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) in wire order; length-delimited values as bytes."""
    out, i = [], 0

    def read_varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = read_varint()
        number, kind = key >> 3, key & 7
        if kind == VARINT:
            out.append((number, read_varint()))
        elif kind == LEN:
            size = read_varint()
            out.append((number, data[i : i + size]))
            i += size
        else:  # pragma: no cover - none of these messages has other wire types
            raise AssertionError(f"unexpected wire type {kind} for field {number}")
    return out


def strings(fields, number: int) -> list[str]:
    return [v.decode() for n, v in fields if n == number]


def claim(namespace: str, uid: str, name: str) -> bytes:
    return field(1, namespace) + field(2, uid) + field(3, name)  # Claim


@pytest.mark.parametrize("pb", [dra_v1_pb2, dra_v1beta1_pb2], ids=["v1", "v1beta1"])
def test_requests_built_by_hand_are_read_by_our_messages(pb):
    raw = field(1, claim("vms", "uid-1", "c1")) + field(1, claim("vms", "uid-2", "c2"))
    for message in (pb.NodePrepareResourcesRequest, pb.NodeUnprepareResourcesRequest):
        got = message.FromString(raw)
        assert [(c.namespace, c.uid, c.name) for c in got.claims] == [
            ("vms", "uid-1", "c1"),
            ("vms", "uid-2", "c2"),
        ]


@pytest.mark.parametrize("pb", [dra_v1_pb2, dra_v1beta1_pb2], ids=["v1", "v1beta1"])
def test_our_responses_are_read_by_hand(pb):
    response = pb.NodePrepareResourcesResponse()
    entry = response.claims["uid-1"]
    device = entry.devices.add(
        request_names=["vgpu"],
        pool_name="node-1",
        device_name="gpu0-t4-2q-0",
        cdi_device_ids=["a/b=c", "a/m=d"],
    )
    device.share_id = "share-7"
    response.claims["uid-2"].error = "no room"
    entries = {}
    for number, value in parse(response.SerializeToString()):
        assert number == 1  # map<string, NodePrepareResourceResponse> claims = 1
        pair = parse(value)  # a map entry: key = 1, value = 2
        entries[strings(pair, 1)[0]] = parse(next(v for n, v in pair if n == 2))
    assert strings(entries["uid-2"], 2) == ["no room"] and not [v for n, v in entries["uid-2"] if n == 1]
    (raw_device,) = [v for n, v in entries["uid-1"] if n == 1]  # repeated Device devices = 1
    fields = parse(raw_device)
    assert strings(fields, 1) == ["vgpu"]  # request_names
    assert strings(fields, 2) == ["node-1"]  # pool_name
    assert strings(fields, 3) == ["gpu0-t4-2q-0"]  # device_name
    assert strings(fields, 4) == ["a/b=c", "a/m=d"]  # cdi_device_ids
    assert strings(fields, 5) == ["share-7"]  # share_id
    unprepare = pb.NodeUnprepareResourcesResponse()
    unprepare.claims["uid-3"].error = "busy"
    ((number, value),) = parse(unprepare.SerializeToString())
    pair = parse(value)
    assert number == 1 and strings(pair, 1) == ["uid-3"]
    assert strings(parse(next(v for n, v in pair if n == 2)), 1) == ["busy"]  # error = 1


def test_registration_messages_on_the_wire():
    info = registration_v1_pb2.PluginInfo(
        type="DRAPlugin",
        name="vgpu.nvidia.com",
        endpoint="/p/dra.sock",
        supported_versions=["v1.DRAPlugin", "v1beta1.DRAPlugin"],
    )
    fields = parse(info.SerializeToString())
    assert strings(fields, 1) == ["DRAPlugin"] and strings(fields, 2) == ["vgpu.nvidia.com"]
    assert strings(fields, 3) == ["/p/dra.sock"]
    assert strings(fields, 4) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    # RegistrationStatus{bool plugin_registered = 1; string error = 2}
    status = registration_v1_pb2.RegistrationStatus.FromString(field(1, 1) + field(2, "bad version"))
    assert status.plugin_registered is True and status.error == "bad version"
