"""GPU discovery from ``sys/bus/pci/devices``: NVIDIA GPUs, their ids, SR-IOV role and VFs.

GPU indices follow upstream: NVIDIA display/3D controllers that are not VFs, in PCI address order.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from vgpu_dm.device_id import DeviceID
from vgpu_dm.host.root import HostRoot

PCI_DEVICES = "sys/bus/pci/devices"
NVIDIA_VENDOR = 0x10DE
GPU_CLASSES = (0x030000, 0x030200)  # VGA controller, 3D controller
_VIRTFN = r"virtfn(\d+)"
# Domains have 4 hex digits usually, up to 8 behind Intel VMD (domains >= 0x10000), as Linux prints them.
_ADDRESS = r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"


def is_pci_address(text: str) -> bool:
    """True for a canonical PCI address such as ``0000:3b:00.0`` or ``10000:01:00.0``."""
    return bool(re.fullmatch(_ADDRESS, text))


def address_key(address: str) -> tuple[int, int, int, int]:
    """Sort key of a PCI address: (domain, bus, device, function) as numbers, whatever the domain width."""
    domain, bus, rest = address.split(":")
    device, function = rest.split(".")
    return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)


def _hex(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 16)
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class GPU(NamedTuple):
    """A physical NVIDIA GPU (an SR-IOV PF or a GPU without SR-IOV)."""

    index: int
    address: str
    device_id: DeviceID  # always with its subsystem pair
    numa_node: int | None  # None: no NUMA affinity (sysfs says -1) or not known (no numa_node file)
    driver: str | None
    sriov_totalvfs: int | None  # None: not SR-IOV capable
    vfs: tuple[str, ...]  # VF addresses in virtfnN order

    @property
    def sriov_capable(self) -> bool:
        return self.sriov_totalvfs is not None

    def describe(self) -> str:
        return f"GPU {self.index} ({self.address})"


def link_name(host: HostRoot, rel: str) -> str | None:
    """The last path component a sysfs symlink points at (driver name, PF address, group number)."""
    target = host.readlink(rel)
    return os.path.basename(target.rstrip("/")) if target else None


def _virtfns(host: HostRoot, dev: str, entries: list[str]) -> tuple[str, ...]:
    found: list[tuple[int, str]] = []
    for entry in entries:
        m = re.fullmatch(_VIRTFN, entry)
        if m:
            target = link_name(host, f"{dev}/{entry}")
            if target:
                found.append((int(m[1]), target))
    return tuple(addr for _, addr in sorted(found))


def discover_gpus(host: HostRoot) -> list[GPU]:
    """Every NVIDIA GPU on the host, indexed as upstream does."""
    gpus: list[tuple[str, DeviceID, int, str | None, int | None, tuple[str, ...]]] = []
    for address in host.listdir(PCI_DEVICES):
        dev = f"{PCI_DEVICES}/{address}"
        if _hex(host.read_optional(f"{dev}/vendor")) != NVIDIA_VENDOR:
            continue
        if _hex(host.read_optional(f"{dev}/class")) not in GPU_CLASSES:
            continue
        entries = host.listdir(dev)
        if "physfn" in entries:
            continue  # a VF is never a GPU of its own
        device = _hex(host.read_optional(f"{dev}/device")) or 0
        sub_vendor = (
            _hex(host.read_optional(f"{dev}/subsystem_vendor")) if "subsystem_vendor" in entries else None
        )
        sub_device = (
            _hex(host.read_optional(f"{dev}/subsystem_device")) if "subsystem_device" in entries else None
        )
        numa = _int(host.read_optional(f"{dev}/numa_node")) if "numa_node" in entries else None
        driver = link_name(host, f"{dev}/driver") if "driver" in entries else None
        total = _int(host.read_optional(f"{dev}/sriov_totalvfs")) if "sriov_totalvfs" in entries else None
        gpu_id = DeviceID(device, NVIDIA_VENDOR, sub_device or 0, sub_vendor or 0)
        # The kernel writes -1 (NUMA_NO_NODE) for a device without NUMA affinity: no node to name.
        gpus.append(
            (
                address,
                gpu_id,
                None if numa is None or numa < 0 else numa,
                driver,
                total,
                _virtfns(host, dev, entries),
            )
        )

    def order(item: tuple) -> tuple[int, ...]:
        try:
            return address_key(item[0])
        except ValueError:  # not a PCI address: after every GPU
            return (1 << 32, 0, 0, 0)

    return [
        GPU(index=i, address=a, device_id=d, numa_node=n, driver=drv, sriov_totalvfs=t, vfs=v)
        for i, (a, d, n, drv, t, v) in enumerate(sorted(gpus, key=order))
    ]
