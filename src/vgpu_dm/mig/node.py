"""Host-side parts of the Kubernetes agent's MIG step (upstream nvidia-k8s-vgpu-dm, reference 8.4):
find ``libnvidia-ml.so.1`` under a root, persist the selected MIG config for the host's
nvidia-mig-manager, stop and start the host's GPU clients, reboot the node. Host programs run through
the host-root object (``chroot`` into the host), never through a shell; unit names are checked first
(systemd's own rules) and passed after ``--`` (``-.mount`` is a valid name); every program has a
timeout, and a program that exceeds it (or fails) is a HostError, never a traceback.

Which host units are stopped and started again follows upstream's agent (vgpu-device-manager v0.5.0,
cmd/nvidia-k8s-vgpu-dm/reconfigure_mig.go, processSystemdService), per unit: active → stopped, and
started again afterwards; else not enabled → left alone (not found on the host: said so, e.g. a
``kubelet.service`` on k3s); failed → started afterwards; a oneshot → left alone; else (enabled,
inactive) → started afterwards. The same systemctl verbs as upstream decide it.
"""

from __future__ import annotations

import re
import subprocess

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.locate import NVML, NVML_DIRS, find_nvml  # noqa: F401 - where NVML is looked for
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig.parted import output

# systemd's unit name rules (systemd.unit(5); src/basic/unit-name.c unit_name_is_valid): a prefix of
# ASCII letters, digits and ":-_.\\" (plus "@" before an instance), a dot, one of the unit types; shorter
# than UNIT_NAME_MAX (256). No space, slash, quote or shell character can be in one.
_UNIT_TYPES = frozenset(
    ("service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer", "slice", "scope")
)
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\@-]+")
UNIT_NAME_MAX = 256
# A config name that can stand inside Environment="…" of a unit file unchanged.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,252}")

_log = log.get("mig")
SYSTEMCTL_TIMEOUT = 120.0  # systemctl stop waits for the unit to stop
REBOOT_TIMEOUT = 60.0  # reboot returns once systemd has the job


def valid_unit(name: str) -> bool:
    """Whether systemd takes ``name`` as a unit that can be started or stopped: a plain name
    (``kubelet.service``, ``-.mount``, ``dev-nvidia0.device``, ``foo\\x2dbar.service``) or a template's
    instance (``getty@tty1.service``); not a template itself (``getty@.service``)."""
    if not name or len(name) >= UNIT_NAME_MAX:
        return False
    prefix, dot, kind = name.rpartition(".")
    if not dot or not prefix or kind not in _UNIT_TYPES or not _UNIT_CHARS.fullmatch(prefix):
        return False
    head, at, instance = prefix.partition("@")
    return not at or bool(head and instance)


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


def _is(host: HostRoot, state: str, unit: str) -> bool:
    """``systemctl is-<state> --quiet -- unit`` (active, enabled, failed) said yes."""
    return _systemctl(host, f"is-{state}", "--quiet", "--", unit).returncode == 0


def _property(host: HostRoot, name: str, unit: str) -> str:
    proc = _systemctl(host, "show", f"--property={name}", "--", unit)
    if proc.returncode != 0:
        raise HostError(f"'systemctl show --property={name} {unit}' failed: {output(proc)}")
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == name:
            return value.strip()
    return ""


def stop_clients(host: HostRoot, units: list[str]) -> list[str]:
    """Stop the host units that are active, in order, and find those to start after the MIG change as
    upstream does (see the module doc); returns the units to start again afterwards, in this order.
    If one cannot be stopped, those stopped so far are started again and HostError says which."""
    bad = [u for u in units if not valid_unit(u)]
    if bad:
        raise HostError(f"not systemd unit names: {', '.join(map(repr, bad))}")
    later: list[str] = []
    for unit in units:
        try:
            if _is(host, "active", unit):
                _log.info(f"stopping host unit {unit} (active; started again after the MIG change)")
                proc = _systemctl(host, "stop", "--", unit)
                if proc.returncode != 0:
                    raise HostError(f"could not stop {unit}: {output(proc)}")
            elif not _is(host, "enabled", unit):
                if _property(host, "LoadState", unit) == "not-found":
                    _log.info(f"host unit {unit}: not found on the host; skipped")
                else:
                    _log.info(f"host unit {unit}: neither active nor enabled; left alone")
                continue
            elif _is(host, "failed", unit):
                _log.info(f"host unit {unit}: failed; started after the MIG change")
            elif _property(host, "Type", unit) == "oneshot":
                _log.info(f"host unit {unit}: inactive oneshot; left alone")
                continue
            else:
                _log.info(f"host unit {unit}: enabled but inactive; started after the MIG change")
        except HostError:
            for problem in start_clients(host, later):
                _log.error(problem)
            raise
        later.append(unit)
    return later


def start_clients(host: HostRoot, units: list[str]) -> list[str]:
    """Start the units stop_clients returned, in reverse order; returns the problems (it goes on past
    them)."""
    problems = []
    for unit in reversed(units):
        _log.info(f"starting host unit {unit}")
        try:
            proc = _systemctl(host, "start", "--", unit)
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
