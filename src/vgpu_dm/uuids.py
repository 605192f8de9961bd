"""UUIDs for new mdev vGPUs: random (upstream's behaviour) or stable across reboots.

A stable UUID is derived from the host's machine id, the GPU's PCI address, the vGPU type and an
ordinal, so re-applying a config after a reboot gives each VM back the same mdev UUID.
"""

from __future__ import annotations

import uuid

from vgpu_dm.errors import HostError
from vgpu_dm.host.root import HostRoot

RANDOM, STABLE = "random", "stable"
# Fixed namespace of this project for uuid5; changing it would change every stable UUID.
_NAMESPACE = uuid.UUID("6f1f6a52-3c4e-5b8a-9d0e-7a2b4c6d8e10")


def machine_id(host: HostRoot) -> str:
    text = host.read_optional("etc/machine-id")
    if not text or not text.strip():
        where = host.path("etc/machine-id")
        raise HostError(f"--uuid-mode stable needs the host's machine id, and {where} is empty or missing")
    return text.strip()


def stable_uuid(machine: str, gpu_address: str, type_name: str, ordinal: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{machine}/{gpu_address}/{type_name}/{ordinal}"))


class UUIDSource:
    """Hands out UUIDs for the devices one apply creates, never one that already exists."""

    def __init__(self, mode: str, host: HostRoot, existing: set[str]):
        self.mode = mode
        self.existing = set(existing)
        self.host = host
        self._machine: str | None = None

    def next(self, gpu_address: str, type_name: str) -> str:
        if self.mode != STABLE:
            new = str(uuid.uuid4())
        else:
            if self._machine is None:
                self._machine = machine_id(self.host)
            ordinal = 0
            while (new := stable_uuid(self._machine, gpu_address, type_name, ordinal)) in self.existing:
                ordinal += 1
        self.existing.add(new)
        return new
