"""A real etcd + kube-apiserver pair for tests, started from the envtest assets in KUBEBUILDER_ASSETS.

No controllers run: a test plays the kubelet and the DaemonSet controller itself (see
../shared/envtest/README.md). etcd stays up for the whole session; the API server can be stopped and
started again on the same port with the same certificate and data, for "API server restarted" tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

KUBECTL = "/usr/bin/kubectl"
ADMIN_USER = "envtest-admin"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 90.0  # seconds; 5-7 s on an idle machine, the shared CI box can be much slower

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGTERM when the starting thread dies, so a killed pytest leaves no servers behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EnvtestError(RuntimeError):
    """The envtest assets are missing or a server did not come up."""


class APIServer:
    """etcd + kube-apiserver on loopback, with token auth (an admin in system:masters) and RBAC."""

    def __init__(self, assets: str | os.PathLike[str]):
        self.assets = Path(assets)
        self.apiserver_bin = self.assets / "kube-apiserver"
        self.etcd_bin = self.assets / "etcd"
        for binary in (self.apiserver_bin, self.etcd_bin):
            if not os.access(binary, os.X_OK):
                raise EnvtestError(f"KUBEBUILDER_ASSETS={self.assets}: no executable {binary.name} there")
        self.workdir = Path(tempfile.mkdtemp(prefix="vgpu-envtest-"))
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file = str(self.workdir / "certs" / "apiserver.crt")
        self.insecure = False
        self.admin_token = os.urandom(16).hex()
        self.admin_kubeconfig = str(self.workdir / "admin.kubeconfig")
        self.etcd_url = ""
        self.startup_seconds: list[float] = []  # one figure per start(), for reports
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._kubeconfigs = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Start etcd and the API server; write the admin kubeconfig. Cleans up after itself on failure."""
        try:
            self._write_credentials()
            self._start_etcd()
            for attempt in range(3):
                try:
                    self.start()
                    break
                except EnvtestError:
                    # Another process may have taken the probed port in between: retry on a new one.
                    in_use = "address already in use" in _tail(self.workdir / "kube-apiserver.log", 5)
                    if not in_use or attempt == 2:
                        raise
                    self.port = _free_port()
                    self.url = f"https://127.0.0.1:{self.port}"
            self._write_kubeconfig(self.admin_kubeconfig, self.admin_token)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Stop both processes and remove every temporary file."""
        self.stop()
        if self._etcd is not None:
            self._terminate(self._etcd)
            self._etcd = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> None:
        """Start kube-apiserver (etcd must be running) and wait until /readyz says ok."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            raise EnvtestError("kube-apiserver is already running")
        began = time.monotonic()
        log = self.workdir / "kube-apiserver.log"
        self._apiserver = self._spawn([str(self.apiserver_bin), *self._apiserver_flags()], log)
        self._wait_ready(began, log)
        self.startup_seconds.append(time.monotonic() - began)

    def stop(self) -> None:
        """Stop kube-apiserver only; etcd and its data stay."""
        if self._apiserver is not None:
            self._terminate(self._apiserver)
            self._apiserver = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Start the API server again if a test stopped it and did not (e.g. failed half-way)."""
        if not self.running:
            self.stop()
            self.start()

    @property
    def running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    # -- clients ---------------------------------------------------------------------------------------

    def kubeconfig_for_token(self, token: str) -> str:
        """Write a kubeconfig that authenticates with ``token``; return its path."""
        self._kubeconfigs += 1
        path = str(self.workdir / f"token-{self._kubeconfigs}.kubeconfig")
        self._write_kubeconfig(path, token)
        return path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, kubeconfig: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (admin unless ``kubeconfig`` is given); stdout/stderr captured as text.

        `create -f`/`apply` need ``--validate=false`` here: kubectl 1.32's client-side validation fetches
        the protobuf OpenAPI v2 document, which this 1.36 server fails to produce (503, "failed to
        download openapi"). To check fields strictly, send the request with ``fieldValidation=Strict``
        (see tests/k8s/test_deploy.py).
        """
        cmd = [KUBECTL, f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args]
        # kubectl 1.32 against a 1.36 server prints a version-skew warning on stderr; harmless.
        return subprocess.run(cmd, input=input, capture_output=True, text=True, check=check, timeout=120)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """One raw HTTPS request (status, body bytes); for probes and tests that need the bare API."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    # -- internals -------------------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        (self.workdir / "certs").mkdir()
        (self.workdir / "etcd").mkdir(mode=0o700)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{self.admin_token},{ADMIN_USER},{ADMIN_USER}-uid,system:masters\n")
        key = self.workdir / "sa.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True, timeout=60
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(self.workdir / "sa.pub")],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def _start_etcd(self) -> None:
        log = self.workdir / "etcd.log"
        for _attempt in range(3):  # a free port can be taken between probing and binding it
            client, peer = _free_port(), _free_port()
            self.etcd_url = f"http://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            began = time.monotonic()
            self._etcd = self._spawn(
                [
                    str(self.etcd_bin),
                    "--name=envtest",
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls={self.etcd_url}",
                    f"--advertise-client-urls={self.etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=envtest={peer_url}",
                    "--unsafe-no-fsync",
                ],
                log,
            )
            while time.monotonic() - began < START_TIMEOUT:
                if self._etcd.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    pass
                time.sleep(0.1)
            self._terminate(self._etcd)
            self._etcd = None
        raise EnvtestError(f"etcd did not become healthy; last log lines:\n{_tail(log)}")

    def _apiserver_flags(self) -> list[str]:
        w = self.workdir
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={w / 'certs'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            # No controller ever creates the "default" ServiceAccount, so this plugin would refuse pods.
            "--disable-admission-plugins=ServiceAccount",
            # The deployment's DaemonSet runs a privileged container.
            "--allow-privileged=true",
        ]

    def _wait_ready(self, began: float, log: Path) -> None:
        assert self._apiserver is not None
        last = ""
        while time.monotonic() - began < START_TIMEOUT:
            if self._apiserver.poll() is not None:
                raise EnvtestError(
                    f"kube-apiserver exited with {self._apiserver.returncode}; last log lines:\n{_tail(log)}"
                )
            if os.path.exists(self.ca_file):
                try:
                    status, body = self.request("GET", "/readyz")
                    if status == 200 and body.strip() == b"ok":
                        return
                    last = f"/readyz: {status} {body[:200]!r}"
                except OSError as err:
                    last = f"/readyz: {err}"
            time.sleep(0.2)
        self.stop()
        raise EnvtestError(
            f"kube-apiserver not ready after {START_TIMEOUT:.0f} s ({last}); log:\n{_tail(log)}"
        )

    def _write_kubeconfig(self, path: str, token: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "envtest", "cluster": {"server": self.url, "certificate-authority": self.ca_file}}
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "user"}}],
            "current-context": "envtest",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(config, out)

    @staticmethod
    def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
        preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        with open(log, "ab") as out:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
            )

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def client_from_kubeconfig(path: str, field_manager: str = "envtest"):
    """A lightkube Client for the kubeconfig at ``path`` (imported lazily: only tests/k8s need lightkube)."""
    from lightkube import Client, KubeConfig

    return Client(config=KubeConfig.from_file(path), field_manager=field_manager)


class Scheduler:
    """A real kube-scheduler (KUBEBUILDER_ASSETS/kube-scheduler) against an APIServer: it does the DRA
    allocation in tests. Nothing deallocates (no kube-controller-manager): see release_claim helpers."""

    def __init__(self, apiserver: APIServer):
        self.binary = apiserver.assets / "kube-scheduler"
        if not os.access(self.binary, os.X_OK):
            raise EnvtestError(f"KUBEBUILDER_ASSETS={apiserver.assets}: no executable kube-scheduler there")
        self.apiserver = apiserver
        self.log = apiserver.workdir / "kube-scheduler.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        kc = self.apiserver.admin_kubeconfig
        self._proc = APIServer._spawn(
            [
                str(self.binary),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            self.log,
        )
        time.sleep(0.3)
        if self._proc.poll() is not None:
            raise EnvtestError(f"kube-scheduler exited with {self._proc.returncode}:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self._proc is not None:
            APIServer._terminate(self._proc)
            self._proc = None

    def tail(self) -> str:
        return _tail(self.log)
