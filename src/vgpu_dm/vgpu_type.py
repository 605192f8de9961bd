"""vGPU type names: the grammar, the parts of a name, and the MIG profile a MIG-backed type maps to."""

from __future__ import annotations

import re
from typing import NamedTuple

SERIES = ("A", "B", "C", "Q")
# Longest first: the regex alternation must prefer MEALL/NOME over ME.
ATTRIBUTES = ("MEALL", "NOME", "ME", "GFX")
_MIG_SUFFIX = {"ME": "+me", "NOME": "-me", "MEALL": "+me.all", "GFX": "+gfx"}
# Order in which a trailing attribute is stripped when the driver only knows the bare name.
STRIP_ORDER = ("MEALL", "NOME", "ME", "GFX")

# Pattern strings, compiled (and cached) by re on first use rather than at import.
_GB = r"(?:0|[1-9][0-9]*)"
_TIME_SLICED = rf"(?P<gpu>[A-Z0-9]+(?:-[A-Za-z]+)*)-(?P<gb>{_GB})(?P<series>[ABCQ])"
_MIG_BACKED = rf"(?P<gpu>[A-Z0-9]+)-(?P<g>[1-9])-(?P<gb>{_GB})(?P<series>[ABCQ])(?P<attr>MEALL|NOME|ME|GFX)?"


class InvalidVGPUType(ValueError):
    """A string that is not a vGPU type name."""


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance);
# ordered field by field, as the dataclass(order=True) it replaced.
class VGPUType(NamedTuple):
    """A parsed vGPU type name such as ``T4-1Q`` or ``A100-1-5CME``."""

    gpu: str
    gpu_instance_slices: int  # 0 for time-sliced types
    framebuffer_gb: int  # 0 means 512 MB
    series: str
    attribute: str = ""

    @classmethod
    def parse(cls, text: str) -> VGPUType:
        if not isinstance(text, str):
            raise InvalidVGPUType(f"vGPU type must be a string, got {type(text).__name__}")
        m = re.fullmatch(_TIME_SLICED, text)
        if m:
            return cls(m["gpu"], 0, int(m["gb"]), m["series"])
        m = re.fullmatch(_MIG_BACKED, text)
        if m:
            return cls(m["gpu"], int(m["g"]), int(m["gb"]), m["series"], m["attr"] or "")
        raise InvalidVGPUType(
            f"invalid vGPU type {text!r}: expected <GPU>-<GB><SERIES> (e.g. T4-1Q, RTX6000-Ada-2Q) or "
            f"<GPU>-<G>-<GB><SERIES>[ME|NOME|MEALL|GFX] (e.g. A100-1-5CME), series one of A, B, C, Q"
        )

    @property
    def is_mig_backed(self) -> bool:
        return self.gpu_instance_slices > 0

    @property
    def name(self) -> str:
        if self.is_mig_backed:
            return f"{self.gpu}-{self.gpu_instance_slices}-{self.framebuffer_gb}{self.series}{self.attribute}"
        return f"{self.gpu}-{self.framebuffer_gb}{self.series}"

    def __str__(self) -> str:
        return self.name

    @property
    def mig_profile(self) -> str:
        """The nvidia-mig-parted profile (``1g.5gb+me``) that hosts this MIG-backed type."""
        if not self.is_mig_backed:
            raise ValueError(f"{self.name} is time-sliced and has no MIG profile")
        suffix = _MIG_SUFFIX.get(self.attribute, "")
        return f"{self.gpu_instance_slices}g.{self.framebuffer_gb}gb{suffix}"

    def without_attribute(self) -> VGPUType | None:
        """The same type with its trailing attribute stripped, or None if it has none."""
        if not self.attribute:
            return None
        return VGPUType(self.gpu, self.gpu_instance_slices, self.framebuffer_gb, self.series)


def short_type_name(driver_name: str) -> str:
    """The vGPU type in a driver name: its last word (``NVIDIA RTX Pro 6000 Blackwell DC-8Q`` → ``DC-8Q``)."""
    parts = driver_name.split()
    return parts[-1] if parts else ""
