"""The intent journal: what an apply is about to change, written atomically before its first write.

A process killed mid-apply leaves it behind; the next apply uses it to put every GPU it names back to
exactly its devices from before (same types, UUIDs, VFs) and then converges as usual. ``assert`` and
``list`` report it.
"""

from __future__ import annotations

import os
import re
import time
from typing import NamedTuple

from vgpu_dm.host.model import UUID_PATTERN, VGPUDevice
from vgpu_dm.host.pci import is_pci_address
from vgpu_dm.host.root import HostRoot
from vgpu_dm.state_files import JOURNAL_FILE


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class JournalGPU(NamedTuple):
    gpu: str
    framework: str
    before: list[dict]  # the GPU's devices before the change
    remove: list[str]  # keys (UUID or VF) to remove
    create: list[dict]  # {"type": name, "uuid": uuid or None}
    mixed_before: bool | None = None  # mixed-size mode before the run, when the run switches it


class Journal(NamedTuple):
    pid: int
    started: float
    config: str
    gpus: list[JournalGPU]

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        gpus = ", ".join(g.gpu for g in self.gpus)
        return f"an interrupted apply (pid {self.pid}, config {self.config!r}, started {when}) on GPUs {gpus}"


def device_record(device: VGPUDevice) -> dict:
    return device._asdict()


def record_device(record: dict) -> VGPUDevice:
    return VGPUDevice(**record)


def _check(gpu: str, device: VGPUDevice) -> None:
    """Journal records end up in sysfs paths: only well-formed ones are used."""
    if not (is_pci_address(gpu) and is_pci_address(device.parent) and device.gpu == gpu):
        raise ValueError(f"bad device record for GPU {gpu!r}")
    # Ours are written lowercase: anything else in a journal was not written by this tool.
    uuid = device.uuid
    if uuid is not None and not (re.fullmatch(UUID_PATTERN, uuid) and uuid == uuid.lower()):
        raise ValueError(f"bad UUID {device.uuid!r}")
    if not isinstance(device.type_id, int) or isinstance(device.type_id, bool) or device.type_id <= 0:
        raise ValueError(f"bad type id {device.type_id!r}")


def write(host: HostRoot, journal: Journal) -> None:
    import json  # only when there is a journal to write or read: not on the no-op path

    record = {**journal._asdict(), "gpus": [g._asdict() for g in journal.gpus]}
    host.save_state(JOURNAL_FILE, json.dumps(record, indent=1))


def read(host: HostRoot, quarantine: bool = False) -> Journal | None:
    """The journal left by an interrupted apply, or None. An unreadable one raises ValueError; with
    ``quarantine`` (apply only: list and assert never write) it is first moved aside for a human."""
    text = host.read_optional(JOURNAL_FILE)
    if text is None:
        return None
    import json

    try:
        raw = json.loads(text)
        found = Journal(
            pid=int(raw["pid"]),
            started=float(raw["started"]),
            config=str(raw["config"]),
            gpus=[JournalGPU(**g) for g in raw["gpus"]],
        )
        for jgpu in found.gpus:
            for record in jgpu.before:
                _check(jgpu.gpu, record_device(record))
        return found
    except (ValueError, KeyError, TypeError, AttributeError):
        # A journal is written by rename, so a torn one means tampering; keep it for a human to read.
        if not quarantine:
            raise ValueError(f"unreadable apply journal {host.path(JOURNAL_FILE)}") from None
        broken = host.path(JOURNAL_FILE) + ".unreadable"
        os.replace(host.path(JOURNAL_FILE), broken)
        raise ValueError(f"unreadable apply journal moved to {broken}") from None


def clear(host: HostRoot) -> None:
    host.remove_state(JOURNAL_FILE)
