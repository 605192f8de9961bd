"""MIG state as data: one GPU's MIG mode and GPU instances, and reading ``nvidia-mig-parted export``.

``export`` merges GPUs with equal layouts (NVIDIA/mig-parted ``cmd/nvidia-mig-parted/export``): an entry
covers the GPUs in its ``devices`` list, or with ``devices: all`` every GPU of its ``device-filter`` (a
string or a list; absent = every GPU). Indices are NVML's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from vgpu_dm.device_id import DeviceID, InvalidDeviceID


class MigLayout(NamedTuple):
    """MIG mode and GPU-instance profile counts of one GPU (counts > 0, sorted by profile)."""

    enabled: bool
    devices: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, enabled: bool, devices: Mapping[str, int] | None = None) -> MigLayout:
        kept = sorted((str(p), int(n)) for p, n in (devices or {}).items() if int(n) > 0)
        return cls(bool(enabled), tuple(kept) if enabled else ())

    @property
    def as_dict(self) -> dict[str, int]:
        return dict(self.devices)

    def describe(self) -> str:
        if not self.enabled:
            return "MIG off"
        if not self.devices:
            return "MIG on, no GPU instances"
        return "MIG on, " + ", ".join(f"{n} x {p}" for p, n in self.devices)

    def entry(self, index: int, device_filter: str | list[str] | None = None) -> dict[str, Any]:
        """The one-GPU mig-parted config entry that asks for this layout on NVML GPU ``index``."""
        out: dict[str, Any] = {}
        if device_filter:
            out["device-filter"] = device_filter
        out["devices"] = [index]
        out["mig-enabled"] = self.enabled
        if self.enabled:
            out["mig-devices"] = self.as_dict
        return out


class ExportError(ValueError):
    """``export`` output that is not what mig-parted prints."""


def _matches(flt: Any, device: DeviceID | None) -> bool:
    if not flt:
        return True
    if device is None:
        return False
    texts = [flt] if isinstance(flt, str) else flt
    if not isinstance(texts, list):
        raise ExportError(f"device-filter {flt!r} is neither a string nor a list")
    try:
        return any(DeviceID.parse(str(t)).matches(device) for t in texts)
    except InvalidDeviceID as exc:
        raise ExportError(str(exc)) from None


def parse_export(data: Any, devices: Sequence[DeviceID | None]) -> dict[int, MigLayout]:
    """NVML index → layout, from parsed ``export`` output; ``devices[i]`` is NVML GPU i's PCI id (None
    when unknown: then only entries naming it by index cover it). A GPU no entry covers is absent."""
    if not isinstance(data, dict) or not isinstance(data.get("mig-configs"), dict) or not data["mig-configs"]:
        raise ExportError("no 'mig-configs' in the output")
    (items,) = list(data["mig-configs"].values())[:1] or [None]
    if not isinstance(items, list):
        raise ExportError("its config is not a list of entries")
    found: dict[int, MigLayout] = {}
    for item in items:
        if not isinstance(item, dict) or "devices" not in item:
            raise ExportError(f"entry without 'devices': {item!r}")
        enabled = item.get("mig-enabled")
        if not isinstance(enabled, bool):
            raise ExportError(f"entry without a boolean 'mig-enabled': {item!r}")
        counts = item.get("mig-devices") or {}
        if not isinstance(counts, dict):
            raise ExportError(f"'mig-devices' is not a mapping: {counts!r}")
        layout = MigLayout.of(enabled, counts)
        listed = item["devices"]
        if listed == "all":
            indices = [i for i, d in enumerate(devices) if _matches(item.get("device-filter"), d)]
        elif isinstance(listed, list) and all(isinstance(i, int) for i in listed):
            indices = listed
        else:
            raise ExportError(f"'devices' is neither 'all' nor a list of indices: {listed!r}")
        for index in indices:
            if index in found and found[index] != layout:
                raise ExportError(f"GPU {index} appears in two entries with different layouts")
            found[index] = layout
    return found
