"""How long the simulated driver takes per control-file write, by kind (create or remove).

Real drivers take milliseconds to seconds per vGPU create; how long exactly, and whether the NVIDIA
driver lets writes to different GPUs overlap, is not documented (host-interfaces.md has no figure), so
both are settings: ``serial`` makes every write wait for the previous one host-wide, otherwise writes
to different GPUs overlap and only the simulator's own bookkeeping is serialised. It covers the
latency only: whether a remove that waits for a VM holds up other writes is the host option
``held_remove_blocks`` (sim/layout.py).

Settings live in ``.vgpu-dm-sim/latency.json``, separate from the faults, so clearing faults keeps them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from vgpu_dm.host.root import SIM_MARKER
from vgpu_dm.sim.files import LATENCY_FILE


@dataclass
class WriteLatency:
    create_ms: float = 0.0  # mdev create, or a type id written to current_vgpu_type
    remove_ms: float = 0.0  # mdev remove, or 0 written to current_vgpu_type
    serial: bool = False  # True: one write at a time on the whole host, latency included

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> WriteLatency:
        try:
            with open(os.path.join(root, SIM_MARKER, LATENCY_FILE)) as fh:
                text = fh.read()
        except FileNotFoundError:
            return cls()
        import json

        return cls(**json.loads(text))

    def save(self, root: str | os.PathLike[str]) -> None:
        import json

        with open(os.path.join(root, SIM_MARKER, LATENCY_FILE), "w") as fh:
            fh.write(json.dumps(asdict(self)))

    def __bool__(self) -> bool:
        return bool(self.create_ms or self.remove_ms)

    def seconds_for(self, rel: str, data: str) -> float:
        """The delay of one write of ``data`` to the control file ``rel``."""
        if rel.endswith("/remove") or (rel.endswith("/current_vgpu_type") and data.strip() == "0"):
            return self.remove_ms / 1000
        return self.create_ms / 1000

    def describe(self) -> str:
        if not self:
            return "none"
        mode = "one write at a time" if self.serial else "writes to different GPUs overlap"
        return f"create {self.create_ms:g} ms, remove {self.remove_ms:g} ms ({mode})"
