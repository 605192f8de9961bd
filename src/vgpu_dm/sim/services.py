"""The host's systemd and ``reboot`` on a simulated host, for the agent's MIG step. Every call is recorded
so tests can see what the tool ran, and when: with each call, the GPUs' MIG modes and the number of
vGPUs at that moment (``modes_at``, ``vgpus_at``), e.g. to see that units were stopped around a MIG mode
change and started again before the vGPUs were made.

A unit has an active state (``active``, ``inactive``, ``failed``), a unit file state (``enabled``,
``disabled``, ``static``, ``masked`` …) and a service type; a unit not declared does not exist. The
verbs follow systemctl(1): ``is-active``/``is-failed`` exit 0 only for ``active``/``failed`` (else 3 and
1); ``is-enabled`` exits 0 for the states its table marks 0 (enabled, enabled-runtime, static, indirect,
alias, generated, transient), non-zero otherwise, ``not-found`` included; ``show --property=P`` prints
``P=value`` (``LoadState=not-found`` for a unit that does not exist; exit 0 either way); ``start`` of a
unit that does not exist fails ("Unit … not found.", exit 5), of a masked one too (exit 1); ``stop`` and
``start`` change the active state. ``--`` ends the options. Commands listed with ``fail`` exit 1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vgpu_dm.host.root import SIM_MARKER

SERVICES_FILE = "systemd.json"


def _path(root: str | Path) -> Path:
    return Path(root, SIM_MARKER, SERVICES_FILE)


def load(root: str | Path) -> dict:
    path = _path(root)
    return json.loads(path.read_text()) if path.exists() else {"units": {}, "calls": []}


def save(root: str | Path, data: dict) -> None:
    # Replaced whole, so that a test reading the calls while the agent runs never sees half a file.
    path = _path(root)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def set_units(root: str | Path, units: dict[str, bool]) -> None:
    """Declare host units: True runs (active, enabled), False does not (inactive, disabled)."""
    for unit, on in units.items():
        set_unit(root, unit, "active" if on else "inactive", "enabled" if on else "disabled")


def set_unit(
    root: str | Path, unit: str, active: str = "active", unit_file: str = "enabled", kind: str = "simple"
) -> None:
    """Declare one host unit with its active state, unit file state and service type."""
    data = load(root)
    data["units"][unit] = active
    data.setdefault("unit_files", {})[unit] = unit_file
    data.setdefault("types", {})[unit] = kind
    save(root, data)


def fail(root: str | Path, commands: list[str]) -> None:
    """Make these systemctl commands (``daemon-reload``, ``stop kubelet.service`` …) exit 1."""
    data = load(root)
    data["fail"] = list(commands)
    save(root, data)


def calls(root: str | Path) -> list[list[str]]:
    return load(root)["calls"]


def modes_at(root: str | Path) -> list[list[bool]]:
    """The GPUs' MIG modes (PCI order) at each recorded call, aligned with ``calls``."""
    return load(root).get("mig_modes", [])


def vgpus_at(root: str | Path) -> list[int]:
    """How many vGPUs the host had at each recorded call, aligned with ``calls``."""
    return load(root).get("vgpus", [])


# systemctl(1), is-enabled: the unit file states it answers 0 for.
_ENABLED = frozenset(("enabled", "enabled-runtime", "static", "indirect", "alias", "generated", "transient"))


def _vgpus(base: Path) -> int:
    from vgpu_dm.sim.layout import SimState

    count = 0
    for gpu in SimState.load(base).gpus:
        if gpu.framework == "vendor-vfio":
            for vf in gpu.vfs:
                current = base / "sys/bus/pci/devices" / vf / "nvidia/current_vgpu_type"
                if current.exists() and current.read_text().strip() not in ("", "0"):
                    count += 1
    devices = base / "sys/bus/mdev/devices"
    if devices.is_dir():
        count += len(list(devices.iterdir()))
    return count


def run(base: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    from vgpu_dm.sim.layout import SimState

    data = load(base)
    data["calls"].append(list(argv))
    gpus = sorted(SimState.load(base).gpus, key=lambda g: g.address)
    data.setdefault("mig_modes", []).append([bool(g.mig_mode) for g in gpus])
    data.setdefault("vgpus", []).append(_vgpus(base))
    program, args = Path(argv[0]).name, argv[1:]
    if program == "reboot":
        from vgpu_dm.sim.reboot import reboot

        save(base, data)
        reboot(base)
        return subprocess.CompletedProcess(argv, 0, "", "")
    code, out, err = _systemctl(data, args)
    save(base, data)
    return subprocess.CompletedProcess(argv, code, out, err)


def _systemctl(data: dict, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``systemctl args`` on the declared units (changed in place)."""
    units, files, types = data["units"], data.setdefault("unit_files", {}), data.setdefault("types", {})
    words = [a for a in args if a != "--"]
    if " ".join(words) in data.get("fail", []):
        return 1, "", f"Failed to {' '.join(words)}: Transport endpoint is not connected (simulated)\n"
    options = [w for w in words if w.startswith("-")]
    verb, *names = [w for w in words if not w.startswith("-")] or [""]
    quiet = "--quiet" in options or "-q" in options
    if verb == "daemon-reload" and not names:
        return 0, "", ""
    if len(names) != 1:
        return 1, "", f"simulated systemctl does not know: {' '.join(args)}\n"
    unit = names[0]
    exists = unit in units
    state = units.get(unit, "inactive")
    file_state = files.get(unit, "enabled") if exists else "not-found"
    if verb in ("is-active", "is-failed"):
        yes = state == ("active" if verb == "is-active" else "failed")
        return (0 if yes else (3 if verb == "is-active" else 1)), "" if quiet else f"{state}\n", ""
    if verb == "is-enabled":
        return (0 if file_state in _ENABLED else 1), "" if quiet else f"{file_state}\n", ""
    if verb == "show" and len(options) == 1 and options[0].startswith("--property="):
        values = {
            "LoadState": ("masked" if file_state == "masked" else "loaded") if exists else "not-found",
            "ActiveState": state,
            "UnitFileState": "" if not exists else file_state,
            "Type": types.get(unit, "simple"),
        }
        wanted = options[0].split("=", 1)[1].split(",")
        return 0, "".join(f"{p}={values.get(p, '')}\n" for p in wanted), ""
    if verb in ("start", "stop"):
        if not exists:
            return 5, "", f"Failed to {verb} {unit}: Unit {unit} not found.\n"
        if verb == "start" and file_state == "masked":
            return 1, "", f"Failed to start {unit}: Unit {unit} is masked.\n"
        units[unit] = "active" if verb == "start" else "inactive"
        return 0, "", ""
    return 1, "", f"simulated systemctl does not know: {' '.join(args)}\n"
