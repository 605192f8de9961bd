"""Reading a simulated host's vGPUs straight from the simulator's tree (not through the code under
test), and writing per-GPU config files, for the reliability suites.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vgpu_dm.sim.driver import PCI_DIR, mdev_devices, type_by_id
from vgpu_dm.sim.host import write_log
from vgpu_dm.sim.layout import SimState, create_host

Device = tuple[str, str, str, str]  # (GPU address, type, uuid or "", parent)


def snapshot(root: Path) -> list[Device]:
    """Every vGPU on the simulated host as (GPU, type, uuid, parent). Read while an apply runs, a vGPU
    may go between listing its directory and reading its type: then the tree is read again."""
    for _ in range(50):
        try:
            return _snapshot(root)
        except FileNotFoundError:
            continue
    return _snapshot(root)


def _snapshot(root: Path) -> list[Device]:
    state = SimState.load(root)
    found: list[Device] = []
    for gpu in state.gpus:
        if gpu.framework == "vendor-vfio":
            for vf in gpu.vfs:
                type_id = int((root / PCI_DIR / vf / "nvidia/current_vgpu_type").read_text().strip() or 0)
                if type_id:
                    found.append((gpu.address, type_by_id(gpu, type_id).name, "", vf))
        else:
            found.extend((gpu.address, t.name, uuid, parent) for parent, uuid, t in mdev_devices(root, gpu))
    return sorted(found)


def layouts(root: Path) -> list[dict[str, int]]:
    """Per GPU in index order: type → count."""
    devices = snapshot(root)
    return [dict(Counter(d[1] for d in devices if d[0] == gpu.address)) for gpu in SimState.load(root).gpus]


def config_text(configs: dict[str, list[dict[str, int]]]) -> str:
    """A config file with one entry per GPU index for each named config."""
    lines = ["version: v1", "vgpu-configs:"]
    for name, per_gpu in configs.items():
        lines.append(f"  {name}:")
        for index, layout in enumerate(per_gpu):
            body = ", ".join(f'"{t}": {n}' for t, n in layout.items())
            lines += [f"    - devices: [{index}]", f"      vgpu-devices: {{{body}}}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Scenario:
    """A multi-GPU host and two layouts (per GPU index) to go from and to."""

    name: str
    gpus: tuple[str, ...]
    start: list[dict[str, int]]
    target: list[dict[str, int]]


class TemplateHost:
    """A simulated host prepared once in config ``start`` of ``config``, copied afresh for every run."""

    def __init__(self, cli, workdir: Path, gpus: list[str], config: str, start: str = "start"):
        self.cli = cli
        self.workdir = workdir
        self.config = workdir / "config.yaml"
        self.config.write_text(config)
        self.template = workdir / "template"
        create_host(self.template, gpus)
        self.apply(self.template, start)
        (self.template / ".vgpu-dm-sim" / "writes.log").unlink()
        self._runs = 0

    def fresh(self) -> Path:
        self._runs += 1
        root = self.workdir / f"run{self._runs}"
        shutil.copytree(self.template, root, symlinks=True)
        return root

    # GPUs changed at once. The suites that map "the Nth write" to a step need one fixed order of
    # writes, so they run one GPU after another; the concurrency suite sets more.
    jobs = 1

    def args(self, root: Path, name: str, *extra: str) -> list[str]:
        jobs = ("--jobs", str(self.jobs))
        return ["apply", "--sim", str(root), "-f", str(self.config), "-c", name, *jobs, *extra]

    def apply(self, root: Path, name: str, *extra: str, code: int = 0):
        result = self.cli(*self.args(root, name, *extra))
        assert result.code == code, result.err
        assert "Traceback" not in result.err
        return result


class Bench(TemplateHost):
    """A template host in a scenario's start layout, with the plan start → target to replay."""

    def __init__(self, cli, workdir: Path, scenario: Scenario):
        self.scenario = scenario
        text = config_text({"start": scenario.start, "target": scenario.target})
        super().__init__(cli, workdir, list(scenario.gpus), text)
        assert layouts(self.template) == scenario.start
        self.before = snapshot(self.template)

    def baseline(self) -> list[str]:
        """The writes of the plan start → target, from one run without faults."""
        root = self.fresh()
        self.apply(root, "target")
        assert layouts(root) == self.scenario.target
        log = write_log(root)
        assert log, "the plan makes no writes"
        return log


def arm(cli, root: Path, *options: str) -> None:
    """Arm simulator faults through the CLI (no options clears them)."""
    result = cli("sim", "fault", str(root), *options)
    assert result.code == 0, result.err
