"""nvidia-k8s-vgpu-dm's command line: flags and env vars as upstream, usage errors exit 2 with a clear
message, nothing starts without what it needs; and the nvidia-vgpu-dm CLI never loads the agent's
Kubernetes and Prometheus libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.k8s.agentkit import agent_process, make_sim
from vgpu_dm.k8s.main import main

REQUIRED = {"-n": "node-a", "-ns": "gpu-operator", "-d": "default"}


@pytest.fixture
def sim(workdir):
    return make_sim(workdir)


def args(sim, drop: str = "", **extra: str) -> list[str]:
    out = []
    for flag, value in {**REQUIRED, "-f": str(sim.config)}.items():
        if flag != drop:
            out += [flag, value]
    out += ["--sim", str(sim.root)]
    for flag, value in extra.items():
        out += [f"--{flag.replace('_', '-')}", value]
    return out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("KUBECONFIG", "NODE_NAME", "NAMESPACE", "CONFIG_FILE", "DEFAULT_VGPU_CONFIG", "VGPU_DM_SIM"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    "drop,name",
    [("-n", "--node-name"), ("-ns", "--namespace"), ("-f", "--config-file"), ("-d", "--default-vgpu-config")],
)
def test_missing_required_flag_exits_2_naming_it(sim, capsys, drop, name):
    assert main(args(sim, drop=drop)) == 2
    err = capsys.readouterr().err
    assert "Missing option" in err and name in err


def test_required_values_come_from_the_environment_too(sim, monkeypatch, workdir, capsys):
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.setenv("NAMESPACE", "gpu-operator")
    monkeypatch.setenv("CONFIG_FILE", str(sim.config))
    monkeypatch.setenv("DEFAULT_VGPU_CONFIG", "default")
    monkeypatch.setenv("VGPU_DM_SIM", str(sim.root))
    monkeypatch.setenv("KUBECONFIG", str(workdir / "no-such-kubeconfig"))
    # Every flag was accepted; it stops only at the credentials (exit 1, not a usage error).
    assert main([]) == 1
    assert "cannot load Kubernetes credentials" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"metrics_address": "8080"}, "is not HOST:PORT"),
        ({"operand_timeout": "-1"}, "--operand-timeout"),
        ({"retry_backoff": "60", "retry_backoff_max": "30"}, "must not be smaller"),
        ({"jobs": "-1"}, "--jobs"),
    ],
)
def test_bad_values_exit_2(sim, capsys, extra, message):
    assert main(args(sim, **extra)) == 2
    assert message in capsys.readouterr().err


def test_a_missing_gpu_clients_file_is_a_usage_error_with_w(sim, capsys):
    assert main([*args(sim, gpu_clients_file="/no/such/file"), "-w"]) == 2
    assert "/no/such/file: No such file" in capsys.readouterr().err


def test_config_file_must_exist(sim, capsys, workdir):
    argv = args(sim)
    argv[argv.index("-f") + 1] = str(workdir / "missing.yaml")
    assert main(argv) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_host_root_without_sysfs_is_a_usage_error(sim, capsys, workdir):
    argv = [a for a in args(sim) if a not in ("--sim", str(sim.root))]
    assert main([*argv, "--host-root-mount", str(workdir)]) == 2
    assert "sys does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: v1\nsystemd-services: nvidia-persistenced\n", "must be a list of unit names"),
        ("version: v2\nsystemd-services: []\n", "expected 'v1'"),
        ("version: v1\nservices: [a.service]\n", "unknown key(s) services"),
        ("version: v1\nsystemd-services: [dcgm.service, '--now']\n", "not systemd unit names: '--now'"),
        ("version: v1\nsystemd-services: [kubelet]\n", "not systemd unit names: 'kubelet'"),
        ("version: v1\nsystemd-services: ['x.service; reboot']\n", "not systemd unit names"),
        ("version: v1\nsystemd-services: [../../bin/sh.service]\n", "not systemd unit names"),
        ("systemd-services: [a.service]\n", "expected a mapping with 'version'"),
        ("version: [\n", "not valid YAML"),
    ],
)
def test_gpu_clients_file_is_checked(sim, capsys, workdir, text, message):
    """With -w the file is used: a bad one is a usage error at start. Without -w it is never used: a
    warning, and the agent starts (as far as the credentials here)."""
    bad = workdir / "clients.yaml"
    bad.write_text(text)
    none = ["--kubeconfig", str(workdir / "none")]
    assert main([*args(sim, gpu_clients_file=str(bad)), "-w"]) == 2
    err = capsys.readouterr().err
    assert message in err and "--gpu-clients-file" in err
    assert main([*args(sim, gpu_clients_file=str(bad)), *none]) == 1
    err = capsys.readouterr().err
    assert "level=warning" in err and message in err and "not used without --with-shutdown" in err
    assert "cannot load Kubernetes credentials" in err
    good = workdir / "clients-ok.yaml"
    good.write_text(
        "version: v1\nsystemd-services: [nvidia-persistenced.service, dcgm@gpu0.service, -.mount,"
        " nvidia\\x2dfabricmanager.service]\n"
    )
    # Accepted (the MIG step uses it later), unusual but valid systemd names included.
    assert main([*args(sim, gpu_clients_file=str(good)), *none, "-r", "-w"]) == 1
    assert "--gpu-clients-file" not in capsys.readouterr().err


def test_help_lists_upstream_flags_and_env_vars(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in (
        "--node-name", "NODE_NAME", "-ns, --namespace", "--config-file", "CONFIG_FILE",
        "--default-vgpu-config",
        "--host-root-mount", "HOST_ROOT_MOUNT", "--driver-root-ctr-path", "--with-reboot",
        "--with-shutdown-host-gpu-clients", "--gpu-clients-file", "--host-mig-manager-state-file",
        "--metrics-address", "--operand-timeout", "--log-format", "--sim", "--jobs", "VGPU_DM_JOBS",
    ):  # fmt: skip
        assert text in out, text


def test_entry_point_usage_error_exits_2(sim):
    proc = agent_process(args(sim, drop="-n"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "Missing option '-n' / '--node-name'" in err


def test_cli_assert_never_imports_the_agent_libraries(sim):
    code = (
        "import sys\n"
        "from vgpu_dm.cli.main import main\n"
        f"rc = main(['assert', '--sim', {str(sim.root)!r}, '-f', {str(sim.config)!r}, '-c', 'default'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightkube', 'prometheus_client', 'httpx2', 'vgpu_dm.k8s') or m.startswith('vgpu_dm.k8s'))\n"
        "print(rc, bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1 []", out.stdout + out.stderr


# -- upstream's spellings (urfave/cli on Go's flag package) ------------------------------------------


def parsed(argv: list[str]) -> dict:
    """The option values click ends up with for ``argv`` after the upstream spellings are rewritten."""
    from vgpu_dm.k8s.flags import upstream_argv
    from vgpu_dm.k8s.main import command

    ctx = command.make_context("nvidia-k8s-vgpu-dm", upstream_argv(argv, command))
    return ctx.params


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-node-name", "a", "-namespace", "b"], {"node_name": "a", "namespace": "b"}),
        (["--n", "a", "--ns", "b"], {"node_name": "a", "namespace": "b"}),
        (["-n=a", "-ns=b", "-f=/x.yaml", "--default-vgpu-config=d"], {"node_name": "a", "namespace": "b"}),
        (["-with-reboot", "-w"], {"with_reboot": True, "with_shutdown_host_gpu_clients": True}),
        (["--with-reboot=true", "-w=1"], {"with_reboot": True, "with_shutdown_host_gpu_clients": True}),
        (["-r=false", "--with-shutdown-host-gpu-clients=False"], {"with_reboot": False}),
        (["-k", "kubelet.service", "-host-kubelet-systemd-service=k3s.service"], {}),
        (["-d", "-x-", "-f", "-"], {"default_vgpu_config": "-x-", "config_file": "-"}),  # values stay
    ],
)
def test_upstream_flag_spellings_are_accepted(monkeypatch, argv, expected):
    got = parsed(["-n", "n", "-ns", "ns", "-f", "f", "-d", "d", *argv])
    for key, value in expected.items():
        assert got[key] == value, (argv, key, got[key])
    if "-host-kubelet-systemd-service=k3s.service" in argv:
        assert got["host_kubelet_systemd_service"] == "k3s.service"


def test_upstream_boolean_false_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("WITH_REBOOT", "true")
    assert parsed(["-n", "n", "-ns", "ns", "-f", "f", "-d", "d"])["with_reboot"] is True
    assert (
        parsed(["-n", "n", "-ns", "ns", "-f", "f", "-d", "d", "--with-reboot=false"])["with_reboot"] is False
    )


def test_bad_boolean_and_unknown_flags_are_usage_errors(sim, capsys):
    assert main([*args(sim), "--with-reboot=maybe"]) == 2
    assert "invalid boolean value 'maybe' for --with-reboot" in capsys.readouterr().err
    assert main([*args(sim), "-no-such-flag"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_entry_point_takes_upstream_spellings(sim, workdir):
    """The console script itself, with a manifest's single-dash long flags: it parses them all and stops
    only at the (missing) credentials."""
    proc = agent_process(
        [
            "-node-name", "node-a", "-namespace", "gpu-operator", "-config-file", str(sim.config),
            "-default-vgpu-config=default", "-with-reboot=false", "-sim", str(sim.root),
            "-kubeconfig", str(workdir / "none"),
        ]
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "cannot load Kubernetes credentials" in err


def test_kubelet_unit_must_be_a_unit_name_when_used(sim, capsys, workdir):
    assert main([*args(sim), "-w", "-k", "kubelet; reboot"]) == 2
    assert "is not a systemd unit name" in capsys.readouterr().err
    # Without -w the kubelet is never stopped: a warning, and the agent starts.
    assert main([*args(sim), "-k", "kubelet", "--kubeconfig", str(workdir / "none")]) == 1
    err = capsys.readouterr().err
    assert "'kubelet' is not a systemd unit name" in err and "level=warning" in err
    # Every name systemd accepts is accepted (before: no .mount/.slice/.scope, no \\ escapes).
    for unit in ("snap.microk8s.daemon-kubelite.service", "kubepods.slice", "k3s\\x2dagent.service"):
        assert main([*args(sim), "-w", "-k", unit, "--kubeconfig", str(workdir / "none")]) == 1, unit
        assert "systemd unit name" not in capsys.readouterr().err


def test_help_names_the_rebooting_state(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "rebooting" in out and "--driver-install-dir" in out and "DRIVER_INSTALL_DIR" in out


def test_without_the_k8s_extra_it_says_what_to_install(sim):
    """`pip install .` without [k8s]: the agent's libraries are missing. Simulated by hiding them from
    the import system of the real entry point's process."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightkube', 'prometheus_client'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from vgpu_dm.k8s.main import entry_point\n"
        f"sys.argv = ['nvidia-k8s-vgpu-dm', *{args(sim)!r}]\n"
        "entry_point()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: the Kubernetes agent needs the 'k8s' extra (module lightkube is missing): "
        "pip install 'vgpu-device-manager[k8s]'"
    ]


def test_every_counter_is_exported_from_the_start():
    from vgpu_dm.k8s.metrics import Metrics

    text = Metrics().render().decode()
    for series in (
        'vgpu_dm_watch_restarts_total{reason="gone"} 0.0',
        'vgpu_dm_watch_restarts_total{reason="dropped"} 0.0',
        'vgpu_dm_watch_restarts_total{reason="error"} 0.0',
        'vgpu_dm_applies_total{result="success"} 0.0',
        'vgpu_dm_applies_total{result="unchanged"} 0.0',
        'vgpu_dm_applies_total{result="failed"} 0.0',
        'vgpu_dm_applies_total{result="interrupted"} 0.0',
        'vgpu_dm_applies_total{result="rebooting"} 0.0',
        'vgpu_dm_events_not_recorded_total{reason="forbidden"} 0.0',
        'vgpu_dm_events_not_recorded_total{reason="failed"} 0.0',
        "vgpu_dm_apply_retries_total 0.0",
        "vgpu_dm_api_retries_total 0.0",
    ):
        assert series in text, series


def test_metrics_server_answers_and_stops_at_once():
    import time
    import urllib.request

    from vgpu_dm.k8s.metrics import HealthServer, Metrics

    server = HealthServer("127.0.0.1:0", Metrics(), lambda: True, lambda: False)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert not_ready.value.code == 503
    finally:
        began = time.monotonic()
        server.stop()
    assert not server.thread.is_alive() and time.monotonic() - began < 2
