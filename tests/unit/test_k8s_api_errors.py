"""How the agent reads the API server's error answers: a Status (JSON) becomes lightkube's ApiError
with its code and reason, anything else (a proxy's HTML page) httpx's HTTPStatusError; and which 403
means 'RBAC does not grant patch'."""

from __future__ import annotations

import json

import httpx2
import pytest
from lightkube import ApiError

from vgpu_dm.k8s.kube import describe, patch_not_allowed, raise_for_api_status, retriable


def answer(code: int, body: object, ctype: str = "application/json") -> httpx2.Response:
    content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = httpx2.Request("PATCH", "https://api.example:6443/api/v1/nodes/n1")
    return httpx2.Response(code, content=content, headers={"content-type": ctype}, request=request)


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


def test_a_status_becomes_an_api_error_with_its_code():
    resp = answer(409, status(409, "Conflict", "the object has been modified"))
    with pytest.raises(ApiError) as err:
        raise_for_api_status(resp)
    assert err.value.status.code == 409 and retriable(err.value)
    assert describe(err.value) == "HTTP 409 (the object has been modified)"


def test_a_proxy_page_is_an_http_error():
    resp = answer(502, b"<html>Bad Gateway</html>", "text/html")
    with pytest.raises(httpx2.HTTPStatusError):
        raise_for_api_status(resp)


def test_success_raises_nothing():
    raise_for_api_status(answer(200, {"kind": "Node"}))


# What kube-apiserver 1.36 answers (seen in tests/k8s/test_label_writes.py): the authorizer, and a
# ValidatingAdmissionPolicy whose validation says reason Forbidden.
RBAC = 'nodes "n1" is forbidden: User "system:serviceaccount:gpu-operator:nvidia-vgpu-device-manager" cannot patch resource "nodes" in API group "" at the cluster scope'  # noqa: E501
POLICY = "nodes \"n1\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'p' denied request: this node is frozen"  # noqa: E501


@pytest.mark.parametrize(
    "code, reason, message, switches",
    [
        (403, "Forbidden", RBAC, True),
        (403, "Forbidden", POLICY, False),
        (403, "Forbidden", RBAC.replace("cannot patch", "cannot update"), False),
        (422, "Invalid", "metadata.labels: Invalid value", False),
        (400, "BadRequest", 'admission webhook "w" denied the request', False),
    ],
)
def test_only_the_authorizer_refusing_patch_switches_to_update(code, reason, message, switches):
    with pytest.raises(ApiError) as err:
        raise_for_api_status(answer(code, status(code, reason, message)))
    assert patch_not_allowed(err.value) is switches
