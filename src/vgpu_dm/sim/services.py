"""The host's systemd and ``reboot`` on a simulated host, for the agent's MIG step: units are active or
inactive, ``systemctl is-active --quiet/stop/start/daemon-reload`` act on them, ``reboot`` runs a
simulated reboot. Every call is recorded so tests can see what the tool ran, and when: with each call,
the GPUs' MIG modes at that moment (``modes_at``), e.g. to see that units were stopped around a MIG mode
change.
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
    """Declare host units and whether they run (True) or not."""
    data = load(root)
    data["units"].update({u: "active" if on else "inactive" for u, on in units.items()})
    save(root, data)


def fail(root: str | Path, commands: list[str]) -> None:
    """Make these systemctl commands (``daemon-reload``, ``start nvidia-dcgm.service`` …) exit 1."""
    data = load(root)
    data["fail"] = list(commands)
    save(root, data)


def calls(root: str | Path) -> list[list[str]]:
    return load(root)["calls"]


def modes_at(root: str | Path) -> list[list[bool]]:
    """The GPUs' MIG modes (PCI order) at each recorded call, aligned with ``calls``."""
    return load(root).get("mig_modes", [])


def run(base: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    from vgpu_dm.sim.layout import SimState

    data = load(base)
    data["calls"].append(list(argv))
    gpus = sorted(SimState.load(base).gpus, key=lambda g: g.address)
    data.setdefault("mig_modes", []).append([bool(g.mig_mode) for g in gpus])
    program, args = Path(argv[0]).name, argv[1:]
    code, out = 0, ""
    if program == "reboot":
        from vgpu_dm.sim.reboot import reboot

        save(base, data)
        reboot(base)
        return subprocess.CompletedProcess(argv, 0, "", "")
    units = data["units"]
    if " ".join(args) in data.get("fail", []):
        code, out = 1, f"Failed to {' '.join(args)}: Transport endpoint is not connected (simulated)\n"
    elif args == ["daemon-reload"]:
        pass
    elif len(args) == 3 and args[:2] == ["is-active", "--quiet"]:
        code = 0 if units.get(args[2]) == "active" else 3
    elif len(args) == 2 and args[0] in ("stop", "start"):
        if args[1] not in units:
            code, out = 5, f"Failed to {args[0]} {args[1]}: Unit {args[1]} not found.\n"
        else:
            units[args[1]] = "active" if args[0] == "start" else "inactive"
    else:
        code, out = 1, f"simulated systemctl does not know: {' '.join(args)}\n"
    save(base, data)
    return subprocess.CompletedProcess(argv, code, "", out)
