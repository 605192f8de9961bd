"""Host-side parts of the Kubernetes agent's MIG step (upstream nvidia-k8s-vgpu-dm, reference 8.4):
find ``libnvidia-ml.so.1`` under a root, persist the selected MIG config for the host's
nvidia-mig-manager, stop and start the host's GPU clients, reboot the node. Host programs run through
the host-root object (``chroot`` into the host), never through a shell; unit names are checked first;
every program has a timeout, and a program that exceeds it (or fails) is a HostError, never a traceback.
"""

from __future__ import annotations

import re
import subprocess

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.locate import NVML, NVML_DIRS, find_nvml  # noqa: F401 - where NVML is looked for
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig.parted import output

# A systemd unit name and nothing else: no option (leading '-'), no path, no shell or glob characters.
_UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,200}\.(?:service|socket|timer|target|path)")
# A config name that can stand inside Environment="…" of a unit file unchanged.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,252}")

_log = log.get("mig")
SYSTEMCTL_TIMEOUT = 120.0  # systemctl stop waits for the unit to stop
REBOOT_TIMEOUT = 60.0  # reboot returns once systemd has the job


def valid_unit(name: str) -> bool:
    return bool(_UNIT.fullmatch(name))


def persist_selected_config(host: HostRoot, state_file: str, config_name: str) -> bool:
    """Point the host's nvidia-mig-manager at the config (so it re-applies it at boot), when its
    override file exists; then ``systemctl daemon-reload``. Returns whether it did."""
    rel = state_file.lstrip("/")
    if not host.exists(rel):
        return False
    if not _SAFE_NAME.fullmatch(config_name):
        raise HostError(f"config name {config_name!r} cannot be written into {state_file}")
    host.save_state(rel, f'[Service]\nEnvironment="MIG_PARTED_SELECTED_CONFIG={config_name}"\n')
    proc = _systemctl(host, "daemon-reload")
    if proc.returncode != 0:
        raise HostError(f"systemctl daemon-reload failed after writing {state_file}: {output(proc)}")
    return True


def _systemctl(host: HostRoot, *args: str, timeout: float = SYSTEMCTL_TIMEOUT):
    try:
        proc = host.run(["systemctl", *args], timeout=timeout)
    except FileNotFoundError:
        raise HostError("systemctl not found on the host") from None
    except subprocess.TimeoutExpired:
        raise HostError(
            f"'systemctl {' '.join(args)}' did not finish within {timeout:g} s and was killed"
        ) from None
    return proc


def stop_clients(host: HostRoot, units: list[str]) -> list[str]:
    """Stop the GPU clients that are running; returns those stopped, to start them again later."""
    bad = [u for u in units if not valid_unit(u)]
    if bad:
        raise HostError(f"not systemd unit names: {', '.join(map(repr, bad))}")
    stopped: list[str] = []
    for unit in units:
        try:
            if _systemctl(host, "is-active", "--quiet", unit).returncode != 0:
                continue
            _log.info(f"stopping host GPU client {unit}")
            proc = _systemctl(host, "stop", unit)
            if proc.returncode != 0:
                raise HostError(f"could not stop {unit}: {output(proc)}")
        except HostError:
            for problem in start_clients(host, stopped):
                _log.error(problem)
            raise
        stopped.append(unit)
    return stopped


def start_clients(host: HostRoot, units: list[str]) -> list[str]:
    """Start units stopped earlier, in reverse order; returns the problems (it goes on past them)."""
    problems = []
    for unit in reversed(units):
        _log.info(f"starting host GPU client {unit}")
        try:
            proc = _systemctl(host, "start", unit)
        except HostError as exc:
            problems.append(f"could not start {unit}: {exc}")
            continue
        if proc.returncode != 0:
            problems.append(f"could not start {unit}: {output(proc)}")
    return problems


def reboot(host: HostRoot) -> None:
    """Reboot the node (``chroot <host> reboot``)."""
    try:
        proc = host.run(["reboot"], timeout=REBOOT_TIMEOUT)
    except FileNotFoundError:
        raise HostError("reboot not found on the host") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"reboot did not return within {REBOOT_TIMEOUT:g} s and was killed") from None
    if proc.returncode != 0:
        raise HostError(f"reboot failed: {output(proc)}")
