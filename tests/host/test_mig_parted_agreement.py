"""The simulated nvidia-mig-parted against the real one (shared/mig-parted-mock): the same sequence of
calls on two identical simulated hosts, one answered by the real binary, one by the simulated program;
exit codes, fatal messages, exports and the resulting MIG state must agree step by step."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import MIG_PARTED_ENV, require_mig_parted
from vgpu_dm.sim.faults import Faults
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import SimState, create_host
from vgpu_dm.sim.processes import add_holder, device_node

ALL_1G = """version: v1
mig-configs:
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  gpu0-1g:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  mixed:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
    - devices: [1]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
  balanced:
    - device-filter: "0x20F110DE"
      devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
  too-much:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"2g.10gb": 3, "1g.5gb": 2}
  h200-profile:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.18gb": 7}
  all-off:
    - devices: all
      mig-enabled: false
  gpu1-off:
    - devices: [1]
      mig-enabled: false
"""
# (step name, argv after the program, use the config on stdin)
SEQUENCE = [
    ("assert before", ["assert", "-c", "all-1g"], True),
    ("export before", ["export"], False),
    ("apply all", ["apply", "-c", "all-1g"], True),
    ("assert all", ["assert", "-c", "all-1g"], True),
    ("assert gpu0 only (whole host)", ["assert", "-c", "gpu0-1g"], True),
    ("assert gpu0 mode only", ["assert", "-m", "-c", "gpu0-1g"], True),
    ("apply gpu0 only", ["apply", "-c", "gpu0-1g"], True),
    ("apply mixed", ["apply", "-c", "mixed"], True),
    ("export mixed", ["export"], False),
    ("export json", ["export", "-o", "json"], False),
    ("apply balanced", ["apply", "-c", "balanced"], True),
    ("apply too much", ["apply", "-c", "too-much"], True),
    ("apply a profile the GPU lacks", ["apply", "-c", "h200-profile"], True),
    ("assert it", ["assert", "-c", "h200-profile"], True),
    ("apply gpu1 off (reset)", ["apply", "-c", "gpu1-off"], True),
    ("unknown config", ["assert", "-c", "nope"], True),
    ("skip-reset", ["apply", "--skip-reset", "-c", "all-1g"], True),
    ("apply all off", ["apply", "-c", "all-off"], True),
    ("export off", ["export"], False),
]


def _normal(text: str) -> str:
    """Output without time stamps, the mock's own diagnostics and debug lines."""
    lines = []
    for line in text.splitlines():
        if line.startswith("nvidia-mig-parted (mock)") or "level=debug" in line:
            continue
        lines.append(re.sub(r'^time="[^"]*" ', "", line))
    return "\n".join(lines)


def _state(root: Path) -> list:
    return [
        (g.address, g.mig_mode, g.mig_pending, dict(Counter(gi["profile"] for gi in g.gpu_instances)))
        for g in SimState.load(root).gpus
    ]


def _run(root: Path, argv: list[str], stdin: str | None):
    args = list(argv)
    if stdin is not None:
        args[1:1] = ["-f", "-"]
    return SimHostRoot(root).run(["nvidia-mig-parted", *args], input=stdin)


def _compare(real: Path, simulated: Path, monkeypatch, binary: str, step: str, argv, stdin) -> None:
    monkeypatch.setenv(MIG_PARTED_ENV, binary)
    a = _run(real, argv, stdin)
    monkeypatch.delenv(MIG_PARTED_ENV)
    b = _run(simulated, argv, stdin)
    assert a.returncode == b.returncode, (step, a.stderr, b.stderr)
    if argv[0] == "export" and a.returncode == 0:
        assert yaml.safe_load(a.stdout) == yaml.safe_load(b.stdout), step
    else:
        assert _normal(a.stdout) == _normal(b.stdout), step
    fatal = [line for line in _normal(a.stderr).splitlines() if "level=fatal" in line]
    assert fatal == [line for line in _normal(b.stderr).splitlines() if "level=fatal" in line], step
    assert _state(real) == _state(simulated), step


@pytest.mark.parametrize("mig_reset", ["required", "immediate"])
def test_the_same_sequence_gives_the_same_answers(tmp_path, monkeypatch, mig_reset) -> None:
    binary = require_mig_parted()
    hosts = []
    for name in ("real", "simulated"):
        root = tmp_path / name
        create_host(
            root,
            ["A100", "A100"],
            options={"mig_reset": mig_reset, "mig_on_with_vfs": "allow", "mig_off_with_vfs": "allow"},
        )
        hosts.append(root)
    for step, argv, stdin in SEQUENCE:
        _compare(*hosts, monkeypatch, binary, step, argv, ALL_1G if stdin else None)


def test_busy_gpus_and_faults_agree(tmp_path, monkeypatch, cli) -> None:
    """A VM on GPU 1 makes the reset of every GPU fail, also for a change on GPU 0 alone; NVML that
    cannot be loaded; the reset and apply faults."""
    binary = require_mig_parted()
    hosts = []
    for name in ("real", "simulated"):
        root = tmp_path / name
        create_host(root, ["A100", "A100"], options={"mig_on_with_vfs": "allow", "mig_off_with_vfs": "allow"})
        config = tmp_path / "c.yaml"
        config.write_text(
            'version: v1\nvgpu-configs:\n  c:\n    - devices: [1]\n      vgpu-devices: {"A100-40C": 1}\n'
        )
        assert cli("apply", "--sim", str(root), "-f", str(config)).code == 0
        uuid = cli("list", "--json", "--sim", str(root)).out.split('"uuid": "')[1].split('"')[0]
        add_holder(root, device_node(root, uuid))
        hosts.append(root)
    _compare(*hosts, monkeypatch, binary, "gpu0 while GPU 1 is busy", ["apply", "-c", "gpu0-1g"], ALL_1G)
    assert [g.mig_pending for g in SimState.load(hosts[0]).gpus] == [True, None]
    for fault, argv in (
        ("nvml", ["export"]),
        ("nvml", ["assert", "-c", "all-off"]),
        ("nvml", ["apply", "-c", "gpu1-off"]),
        ("reset", ["apply", "-c", "gpu0-1g"]),
        ("apply", ["apply", "-c", "gpu0-1g"]),
    ):
        for root in hosts:
            Faults(mig_parted=fault).save(root)
        _compare(
            *hosts,
            monkeypatch,
            binary,
            f"fault {fault}: {argv}",
            argv,
            None if argv == ["export"] else ALL_1G,
        )
