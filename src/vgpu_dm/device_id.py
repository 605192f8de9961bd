"""PCI device ids as used by ``device-filter``: parse, format and match against a GPU."""

from __future__ import annotations

from typing import NamedTuple


class InvalidDeviceID(ValueError):
    """A string that is not a device id."""


def _parse_u32(part: str, whole: str) -> int:
    try:
        # Like Go's strconv.ParseUint(s, 0, 32): ASCII only, no surrounding blanks (int() allows both).
        if not part.isascii() or part != part.strip():
            raise ValueError(part)
        # Base 0 mirrors the upstream parser: 0x → hex, leading 0 → octal, else decimal.
        octal = len(part) > 1 and part[0] == "0" and part[1] not in "xXoObB"
        value = int(part, 8) if octal else int(part, 0)
    except ValueError:
        raise InvalidDeviceID(
            f"invalid device id {whole!r}: expected 0xDDDDVVVV (device then vendor, e.g. 0x1EB810DE) "
            f"with an optional :0xSSSSVVVV subsystem part"
        ) from None
    if not 0 <= value <= 0xFFFFFFFF or part.startswith(("+", "-")):
        raise InvalidDeviceID(f"invalid device id {whole!r}: {part!r} does not fit in 32 bits")
    return value


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class DeviceID(NamedTuple):
    """Device and vendor id, with an optional subsystem device and vendor id."""

    device: int
    vendor: int
    subsystem_device: int | None = None
    subsystem_vendor: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceID:
        if not isinstance(text, str):
            raise InvalidDeviceID(f"device id must be a string, got {type(text).__name__}")
        parts = text.split(":")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise InvalidDeviceID(f"invalid device id {text!r}: expected 0xDDDDVVVV or 0xDDDDVVVV:0xSSSSVVVV")
        main = _parse_u32(parts[0], text)
        if len(parts) == 1:
            return cls(main >> 16, main & 0xFFFF)
        sub = _parse_u32(parts[1], text)
        return cls(main >> 16, main & 0xFFFF, sub >> 16, sub & 0xFFFF)

    @property
    def has_subsystem(self) -> bool:
        return self.subsystem_device is not None

    def __str__(self) -> str:
        text = f"0x{self.device:04X}{self.vendor:04X}"
        if self.has_subsystem:
            text += f":0x{self.subsystem_device:04X}{self.subsystem_vendor:04X}"
        return text

    def matches(self, gpu: DeviceID) -> bool:
        """True if this filter selects ``gpu`` (a filter without subsystem ignores the GPU's)."""
        if (self.device, self.vendor) != (gpu.device, gpu.vendor):
            return False
        if not self.has_subsystem:
            return True
        return (self.subsystem_device, self.subsystem_vendor) == (gpu.subsystem_device, gpu.subsystem_vendor)
