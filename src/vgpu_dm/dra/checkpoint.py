"""The driver's checkpoint: which claims it prepared and with which vGPUs, written atomically (temp
file, fsync, rename) before the kubelet gets an answer, so that unprepare — which receives only the
claim's identity — and a restarted driver know what belongs to whom.

A claim is recorded as ``preparing`` before its first vGPU is created and ``prepared`` once every vGPU
exists: a driver killed in between finds a ``preparing`` entry, and the vGPU it may have left is an
orphan on a GPU it owns, removed at the next start.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, NamedTuple

PREPARING, PREPARED = "preparing", "prepared"
VERSION = 1


class PreparedDevice(NamedTuple):
    """One vGPU made for one allocation result of a claim."""

    request: str  # the claim's request name (subrequest stripped)
    device: str  # the DRA device name in the pool
    gpu: str  # PCI address of the GPU
    type_name: str
    framework: str = ""
    key: str = ""  # mdev UUID or VF address once created
    iommu_group: int | None = None
    share_id: str | None = None


class ClaimRecord(NamedTuple):
    uid: str
    namespace: str
    name: str
    state: str
    devices: tuple[PreparedDevice, ...]
    pod_claim_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "devices": [d._asdict() for d in self.devices]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClaimRecord:
        return cls(**{**raw, "devices": tuple(PreparedDevice(**d) for d in raw["devices"])})


class Checkpoint:
    """The claims this driver prepared, kept in one JSON file in its plugin data directory."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.claims: dict[str, ClaimRecord] = self._load()

    def _load(self) -> dict[str, ClaimRecord]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(f"unreadable DRA checkpoint {self.path}: {exc}") from None
        if raw.get("version") != VERSION:
            raise ValueError(
                f"DRA checkpoint {self.path} has version {raw.get('version')!r}, expected {VERSION}"
            )
        try:
            return {uid: ClaimRecord.from_json(c) for uid, c in raw["claims"].items()}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"unreadable DRA checkpoint {self.path}: {exc}") from None

    def _save(self) -> None:
        data = {"version": VERSION, "claims": {uid: c.to_json() for uid, c in sorted(self.claims.items())}}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # The rename itself must reach the disk before the kubelet is answered.
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, uid: str) -> ClaimRecord | None:
        return self.claims.get(uid)

    def put(self, record: ClaimRecord) -> None:
        with self._lock:
            self.claims[record.uid] = record
            self._save()

    def drop(self, uid: str) -> None:
        with self._lock:
            if self.claims.pop(uid, None) is not None:
                self._save()

    def devices(self) -> list[PreparedDevice]:
        return [d for c in self.claims.values() for d in c.devices]
