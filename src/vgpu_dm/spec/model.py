"""Validated config data: a Spec of named configs, each a list of entries."""

from __future__ import annotations

from typing import NamedTuple

from vgpu_dm.device_id import DeviceID
from vgpu_dm.errors import ConfigError
from vgpu_dm.vgpu_type import VGPUType


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class ConfigEntry(NamedTuple):
    """One entry of a config: which GPUs it selects and the vGPU devices they should carry."""

    devices: tuple[int, ...] | None  # None means "all"
    device_filter: tuple[DeviceID, ...]  # empty means "every GPU"
    vgpu_devices: tuple[tuple[VGPUType, int], ...]
    path: str = ""  # e.g. vgpu-configs.T4-small[1], for messages
    line: int = 0

    def selects(self, index: int, gpu_id: DeviceID) -> bool:
        if self.devices is not None and index not in self.devices:
            return False
        return not self.device_filter or any(f.matches(gpu_id) for f in self.device_filter)

    @property
    def is_mig_backed(self) -> bool:
        return any(t.is_mig_backed for t, _ in self.vgpu_devices)

    def wanted(self) -> dict[VGPUType, int]:
        return dict(self.vgpu_devices)


class Spec(NamedTuple):
    """A whole config file: config name → entries."""

    source: str
    configs: dict[str, tuple[ConfigEntry, ...]]

    def select(self, name: str | None) -> tuple[str, tuple[ConfigEntry, ...]]:
        """The config called ``name``; without a name, the only config in the file."""
        if name is None or name == "":
            if len(self.configs) == 1:
                only = next(iter(self.configs))
                return only, self.configs[only]
            if not self.configs:
                raise ConfigError(f"{self.source}: the file defines no vgpu-configs")
            raise ConfigError(
                f"{self.source}: missing required flag 'selected-config' (-c): the file defines "
                f"{len(self.configs)} configs: {', '.join(self.configs)}"
            )
        if name not in self.configs:
            from vgpu_dm.text import did_you_mean

            known = ", ".join(self.configs) or "none"
            hint = did_you_mean(name, self.configs)
            raise ConfigError(
                f"{self.source}: selected vgpu-config not present: {name!r}{hint} "
                f"(configs in the file: {known})"
            )
        return name, self.configs[name]
