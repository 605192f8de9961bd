"""A small fake Kubernetes API server for what a real one cannot be made to do on demand: 410 Gone on a
watch, streams that drop, 409 on a patch, 500s, slow answers. It serves one Node (list, get, watch,
merge-patch of labels), pods (always none), and Event creation, and records every request so tests can
count them. Plain HTTP on loopback; the agent reaches it through an ordinary kubeconfig.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

GONE = {
    "type": "ERROR",
    "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"},
}


def _list(kind: str, rv: str, items: list) -> dict:
    return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up (its timeout, a cut stream) is what the tests provoke: no traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class Request:
    at: float  # time.monotonic()
    method: str
    path: str
    query: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")

    def kind(self) -> str:
        """node-list, node-watch, node-get, node-patch, event-create, pod-list, pod-watch, other."""
        if self.path.startswith("/api/v1/nodes"):
            if self.method == "PATCH":
                return "node-patch"
            if self.path == "/api/v1/nodes":
                return "node-watch" if self.is_watch else "node-list"
            return "node-get"
        if self.path.endswith("/events") and self.method == "POST":
            return "event-create"
        if self.path.endswith("/pods"):
            return "pod-watch" if self.is_watch else "pod-list"
        return "other"


class FakeAPI:
    def __init__(self, node: str = "fake-node", labels: dict[str, str] | None = None):
        self.node_name = node
        self.cond = threading.Condition()
        self.rv = 1000
        self.node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "uid": str(uuid.uuid4()),
                "resourceVersion": "1000",
                "labels": labels or {},
            },
        }
        self.history: list[tuple[int, str, dict]] = []  # (rv, type, node) for watches
        self.requests: list[Request] = []
        self.events: list[dict] = []  # created core/v1 Events
        # Faults (each counts down as it is used):
        self.gone_watches = 0  # next N node watches answer with an ERROR 410 event
        self.drop_watches = 0  # next N node watches end right after the headers (clean EOF)
        self.reset_watches = 0  # next N node watches are cut (TCP RST) right after the headers
        self.patch_conflicts = 0  # next N patches answer 409
        self.fail_until = 0.0  # every request answers 500 until this monotonic time
        self.slow_requests = 0  # next N non-watch requests wait ``slow_seconds`` before answering
        self.slow_seconds = 0.0
        self._expire_open = False  # open watches get an ERROR 410 now
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- control from the test -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, directory: Path) -> str:
        path = directory / "fake.kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "agent", "user": {"token": "fake-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
                    "current-context": "fake",
                }
            )
        )
        return str(path)

    def labels(self) -> dict[str, str]:
        with self.cond:
            return dict(self.node["metadata"]["labels"])

    def set_labels(self, labels: dict[str, str | None]) -> None:
        with self.cond:
            self._merge(labels)

    def expire_watches(self, labels: dict[str, str | None] | None = None) -> None:
        """Open watches end with 410 Gone and older resourceVersions are forgotten (a compaction);
        ``labels`` change at the same moment, so only a relist can see them."""
        with self.cond:
            if labels:
                self._merge(labels, record=False)
            self.history.clear()
            self._expire_open = True
            self.cond.notify_all()

    def count(self, kind: str, since: float = 0.0) -> int:
        with self.cond:
            return sum(1 for r in self.requests if r.kind() == kind and r.at >= since)

    def requests_since(self, since: float) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.at >= since]

    # -- state ---------------------------------------------------------------------------------------

    _closing = False

    def _merge(self, labels: dict[str, str | None], record: bool = True) -> dict:
        current = self.node["metadata"]["labels"]
        for key, value in labels.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        self.rv += 1
        self.node["metadata"]["resourceVersion"] = str(self.rv)
        snapshot = json.loads(json.dumps(self.node))
        if record:
            self.history.append((self.rv, "MODIFIED", snapshot))
        self.cond.notify_all()
        return snapshot

    # -- HTTP ------------------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # quiet
                pass

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._json(
                    code,
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                     "reason": reason, "code": code},
                )  # fmt: skip

            def _begin(self, method: str) -> Request | None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                req = Request(time.monotonic(), method, parts.path, query)
                with fake.cond:
                    fake.requests.append(req)
                    failing = time.monotonic() < fake.fail_until
                    slow = 0.0
                    if fake.slow_requests and not req.is_watch:
                        fake.slow_requests -= 1
                        slow = fake.slow_seconds
                if slow:
                    time.sleep(slow)
                if failing:
                    self._status(500, "InternalError", "injected: the server is failing")
                    return None
                return req

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def do_GET(self) -> None:
                req = self._begin("GET")
                if req is None:
                    return
                node_path = f"/api/v1/nodes/{fake.node_name}"
                if req.path == "/api/v1/nodes" and req.is_watch:
                    self._watch(req)
                elif req.path == "/api/v1/nodes":
                    with fake.cond:
                        items = [json.loads(json.dumps(fake.node))]
                        rv = str(fake.rv)
                    wanted = req.query.get("fieldSelector", "")
                    if wanted and wanted != f"metadata.name={fake.node_name}":
                        items = []
                    self._json(200, _list("NodeList", rv, items))
                elif req.path == node_path:
                    with fake.cond:
                        self._json(200, fake.node)
                elif req.path.endswith("/pods"):
                    with fake.cond:
                        rv = str(fake.rv)
                    self._json(200, _list("PodList", rv, []))
                else:
                    self._status(404, "NotFound", f"{req.path} not found")

            def do_PATCH(self) -> None:
                req = self._begin("PATCH")
                if req is None:
                    return
                body = self._body()
                if req.path != f"/api/v1/nodes/{fake.node_name}":
                    self._status(404, "NotFound", f"{req.path} not found")
                    return
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    self._status(415, "UnsupportedMediaType", "this fake takes merge patches only")
                    return
                if set(body) != {"metadata"} or not {"labels"} <= set(body["metadata"]) <= {
                    "labels",
                    "resourceVersion",
                }:
                    self._status(422, "Invalid", f"this fake takes label patches only, got {body}")
                    return
                precondition = body["metadata"].get("resourceVersion")
                with fake.cond:
                    if fake.patch_conflicts:
                        fake.patch_conflicts -= 1
                        conflict = True
                    elif precondition is not None and precondition != str(fake.rv):
                        conflict = True  # as the real server: a resourceVersion in a patch is a precondition
                    else:
                        conflict = False
                        node = fake._merge(body["metadata"]["labels"])
                if conflict:
                    self._status(409, "Conflict", "injected: the object has been modified")
                else:
                    self._json(200, node)

            def do_POST(self) -> None:
                req = self._begin("POST")
                if req is None:
                    return
                body = self._body()
                if not req.path.endswith("/events"):
                    self._status(404, "NotFound", f"{req.path} not found")
                    return
                body.setdefault("metadata", {})["name"] = (
                    body["metadata"].get("generateName", "ev.") + uuid.uuid4().hex[:5]
                )
                with fake.cond:
                    fake.events.append(body)
                self._json(201, body)

            def _watch(self, req: Request) -> None:
                with fake.cond:
                    gone = fake.gone_watches > 0
                    fake.gone_watches -= 1 if gone else 0
                    drop = fake.drop_watches > 0
                    fake.drop_watches -= 1 if drop else 0
                    reset = fake.reset_watches > 0 and not drop
                    fake.reset_watches -= 1 if reset else 0
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if reset:
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                if drop:
                    return
                if gone:
                    self._line(GONE)
                    return
                since = int(req.query.get("resourceVersion") or 0)
                deadline = time.monotonic() + float(req.query.get("timeoutSeconds") or 1800)
                with fake.cond:
                    fake._expire_open = False
                    oldest = fake.history[0][0] if fake.history else fake.rv + 1
                    if since and since < oldest - 1 and since < fake.rv:
                        self._line(GONE)
                        return
                sent = since
                while True:
                    with fake.cond:
                        pending = [(rv, t, o) for rv, t, o in fake.history if rv > sent]
                        if not pending and not fake._expire_open and not fake._closing:
                            fake.cond.wait(max(0.0, min(0.2, deadline - time.monotonic())))
                            pending = [(rv, t, o) for rv, t, o in fake.history if rv > sent]
                        expired = fake._expire_open
                        closing = fake._closing
                    for rv, kind, obj in pending:
                        self._line({"type": kind, "object": obj})
                        sent = rv
                    if expired:
                        self._line(GONE)
                        return
                    if closing or time.monotonic() >= deadline:
                        return

            def _line(self, event: dict) -> None:
                try:
                    self.wfile.write(json.dumps(event).encode() + b"\n")
                    self.wfile.flush()
                except OSError:
                    pass

        return Handler
