"""Host-side pieces of the agent's MIG step, on simulated hosts and real directories."""

from __future__ import annotations

import io
import os

import pytest

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.mig import node
from vgpu_dm.sim import services
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState

STATE_FILE = "/etc/systemd/system/nvidia-mig-manager.service.d/override.conf"


def test_find_nvml_follows_symlinks_inside_the_driver_root(tmp_path) -> None:
    root = tmp_path / "driver"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    assert node.find_nvml(str(root)) is None
    (lib / "libnvidia-ml.so.580.159.04").write_text("")
    # An absolute link is resolved inside the driver root, not in the container's /.
    os.symlink("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.159.04", lib / "libnvidia-ml.so.1")
    assert node.find_nvml(str(root)) == str(lib / "libnvidia-ml.so.580.159.04")
    # The first directory of upstream's list wins.
    (root / "libnvidia-ml.so.1").write_text("")
    assert node.find_nvml(str(root)) == str(root / "libnvidia-ml.so.1")
    # A dangling link does not count.
    os.unlink(root / "libnvidia-ml.so.1")
    os.symlink("nowhere.so", root / "libnvidia-ml.so.1")
    assert node.find_nvml(str(root)) == str(lib / "libnvidia-ml.so.580.159.04")


def test_selected_config_is_persisted_only_when_the_override_exists(sim_host) -> None:
    root = sim_host("A100")
    host = SimHostRoot(root)
    assert node.persist_selected_config(host, STATE_FILE, "A100-1-5C") is False
    assert services.calls(root) == []
    path = root / STATE_FILE.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\n")
    assert node.persist_selected_config(host, STATE_FILE, "A100-1-5C") is True
    assert path.read_text() == '[Service]\nEnvironment="MIG_PARTED_SELECTED_CONFIG=A100-1-5C"\n'
    assert services.calls(root) == [["systemctl", "daemon-reload"]]
    with pytest.raises(HostError, match="cannot be written"):
        node.persist_selected_config(host, STATE_FILE, 'x"\nExecStart=/bin/evil')


def test_gpu_clients_are_stopped_if_running_and_started_again(sim_host) -> None:
    root = sim_host("A100")
    host = SimHostRoot(root)
    services.set_units(
        root, {"nvidia-dcgm.service": True, "nvsm.service": False, "dcgm-exporter.service": True}
    )
    stopped = node.stop_clients(host, ["nvidia-dcgm.service", "nvsm.service", "dcgm-exporter.service"])
    assert stopped == ["nvidia-dcgm.service", "dcgm-exporter.service"]
    assert services.load(root)["units"]["nvidia-dcgm.service"] == "inactive"
    assert node.start_clients(host, stopped) == []
    assert services.load(root)["units"] == {
        "nvidia-dcgm.service": "active",
        "nvsm.service": "inactive",
        "dcgm-exporter.service": "active",
    }
    assert ["systemctl", "start", "--", "dcgm-exporter.service"] in services.calls(root)
    assert node.start_clients(host, ["gone.service"]) == [
        "could not start gone.service: Failed to start gone.service: Unit gone.service not found."
    ]


def test_units_to_start_again_are_chosen_as_upstream(sim_host) -> None:
    """reconfigure_mig.go processSystemdService: active → stopped and started again; failed, and enabled
    but inactive (not oneshot) → started afterwards; disabled, oneshot, or not on the host → left, each
    said in the log (a -k kubelet.service on k3s is not found)."""
    root = sim_host("A100")
    host = SimHostRoot(root)
    services.set_unit(root, "dcgm.service", "active")
    services.set_unit(root, "crashed.service", "failed")
    services.set_unit(root, "idle.service", "inactive")
    services.set_unit(root, "once.service", "inactive", kind="oneshot")
    services.set_unit(root, "off.service", "inactive", "disabled")
    services.set_unit(root, "hidden.service", "inactive", "masked")
    order = [
        "dcgm.service", "crashed.service", "idle.service", "once.service", "off.service", "hidden.service",
        "kubelet.service",
    ]  # fmt: skip
    lines = io.StringIO()
    log.setup(stream=lines)
    try:
        later = node.stop_clients(host, order)
    finally:
        log.setup()
    assert later == ["dcgm.service", "crashed.service", "idle.service"]
    assert [c for c in services.calls(root) if c[1] in ("stop", "start")] == [
        ["systemctl", "stop", "--", "dcgm.service"]
    ]
    said = lines.getvalue()
    assert "host unit kubelet.service: not found on the host; skipped" in said
    assert "host unit off.service: neither active nor enabled; left alone" in said
    assert "host unit hidden.service: neither active nor enabled; left alone" in said
    assert "host unit once.service: inactive oneshot; left alone" in said
    assert "host unit crashed.service: failed; started after the MIG change" in said
    assert node.start_clients(host, later) == []
    starts = [c[3] for c in services.calls(root) if c[1] == "start"]
    assert starts == ["idle.service", "crashed.service", "dcgm.service"]  # the reverse order
    assert services.load(root)["units"]["crashed.service"] == "active"


def test_a_unit_that_cannot_be_stopped_starts_the_others_again(sim_host) -> None:
    root = sim_host("A100")
    host = SimHostRoot(root)
    services.set_units(root, {"nvidia-dcgm.service": True, "kubelet.service": True})
    services.fail(root, ["stop kubelet.service"])
    with pytest.raises(HostError, match=r"could not stop kubelet\.service: Failed to stop kubelet\.service"):
        node.stop_clients(host, ["nvidia-dcgm.service", "kubelet.service"])
    assert services.load(root)["units"] == {"nvidia-dcgm.service": "active", "kubelet.service": "active"}


@pytest.mark.parametrize(
    "name",
    [
        "kubelet.service", "k3s-agent.service", "-.mount", "var-lib-kubelet.mount", "dev-nvidia0.device",
        "kubepods.slice", "session-1.scope", "getty@tty1.service", "a@b@c.service",
        "nvidia\\x2dpersistenced.service", "x" * 247 + ".service",
    ],
)  # fmt: skip
def test_every_valid_systemd_unit_name_is_accepted(name) -> None:
    """systemd.unit(5): letters, digits, ':-_.\\', an instance after '@', eleven unit types, < 256."""
    assert node.valid_unit(name)


@pytest.mark.parametrize(
    "name",
    [
        "a b.service", "../etc.service", "kubelet", "x;reboot.service", "", "getty@.service",
        "@tty1.service", "kubelet.unit", ".service", "x" * 248 + ".service", "a/b.service",
        "$(reboot).service",
    ],
)  # fmt: skip
def test_unit_names_are_checked_before_anything_runs(sim_host, name) -> None:
    root = sim_host("A100")
    with pytest.raises(HostError, match="not systemd unit names"):
        node.stop_clients(SimHostRoot(root), ["nvidia-dcgm.service", name])
    assert services.calls(root) == []


def test_reboot_runs_a_simulated_reboot(sim_host) -> None:
    root = sim_host("H200")
    host = SimHostRoot(root)
    assert host.run(["sriov-manage", "-e", SimState.load(root).gpus[0].address]).returncode == 0
    node.reboot(host)
    assert services.calls(root) == [["reboot"]]
    assert SimState.load(root).gpus[0].vfs == []


def test_daemon_reload_failing_is_an_error(sim_host) -> None:
    root = sim_host("A100")
    path = root / STATE_FILE.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\n")
    services.fail(root, ["daemon-reload"])
    with pytest.raises(HostError, match="systemctl daemon-reload failed after writing"):
        node.persist_selected_config(SimHostRoot(root), STATE_FILE, "A100-1-5C")


@pytest.mark.parametrize("program", ["systemctl", "reboot"])
def test_a_host_program_that_hangs_is_a_host_error_not_a_traceback(sim_host, program) -> None:
    """systemctl and reboot run with a timeout; when it expires the caller gets a HostError (the agent
    then starts the clients it stopped and reports failed)."""
    from vgpu_dm.sim.faults import Faults

    root = sim_host("A100")
    host = SimHostRoot(root)
    services.set_units(root, {"nvidia-dcgm.service": True, "nvsm.service": True})
    Faults(hang=[program]).save(root)
    host = SimHostRoot(root)
    if program == "reboot":
        with pytest.raises(HostError, match="reboot did not return within"):
            node.reboot(host)
        assert SimState.load(root).gpus[0].vfs  # nothing of a reboot happened
        return
    with pytest.raises(
        HostError, match=r"'systemctl is-active --quiet -- nvidia-dcgm\.service' did not finish"
    ):
        node.stop_clients(host, ["nvidia-dcgm.service", "nvsm.service"])
    assert node.start_clients(host, ["nvsm.service"]) == [
        "could not start nvsm.service: 'systemctl start -- nvsm.service' did not finish within 120 s and was "
        "killed"
    ]
