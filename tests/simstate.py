"""Reading a simulated host's vGPUs straight from the simulator's tree (not through the code under
test), and writing per-GPU config files, for the reliability suites.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vgpu_dm.sim.driver import PCI_DIR, mdev_devices, type_by_id
from vgpu_dm.sim.layout import SimState

Device = tuple[str, str, str, str]  # (GPU address, type, uuid or "", parent)


def snapshot(root: Path) -> list[Device]:
    """Every vGPU on the simulated host as (GPU, type, uuid, parent)."""
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
