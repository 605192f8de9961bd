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
        ({"gpu_clients_file": "/no/such/file"}, "No such file"),
        ({"retry_backoff": "60", "retry_backoff_max": "30"}, "must not be smaller"),
        ({"jobs": "-1"}, "--jobs"),
    ],
)
def test_bad_values_exit_2(sim, capsys, extra, message):
    assert main(args(sim, **extra)) == 2
    assert message in capsys.readouterr().err


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
        ("version: v1\nsystemd-services: ['x.service; reboot']\n", "not systemd unit names"),
        ("version: v1\nsystemd-services: [../../bin/sh.service]\n", "not systemd unit names"),
        ("systemd-services: [a.service]\n", "expected a mapping with 'version'"),
        ("version: [\n", "not valid YAML"),
    ],
)
def test_gpu_clients_file_is_checked(sim, capsys, workdir, text, message):
    bad = workdir / "clients.yaml"
    bad.write_text(text)
    assert main(args(sim, gpu_clients_file=str(bad))) == 2
    err = capsys.readouterr().err
    assert message in err and "--gpu-clients-file" in err
    good = workdir / "clients-ok.yaml"
    good.write_text("version: v1\nsystemd-services: [nvidia-persistenced.service]\n")
    # Accepted (the MIG step uses it later); it gets as far as the credentials.
    assert (
        main([*args(sim, gpu_clients_file=str(good)), "--kubeconfig", str(workdir / "none"), "-r", "-w"]) == 1
    )


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
