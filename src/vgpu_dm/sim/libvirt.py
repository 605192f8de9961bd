"""Simulated libvirt VMs on a simulated host, written in libvirt's own formats.

- A defined VM is ``etc/libvirt/qemu/NAME.xml`` with root ``<domain>`` (libvirt writes it at
  ``virsh define``, starting with its "auto-generated file" comment; the exact comment text is
  unconfirmed and irrelevant to a real parser). A running VM also has ``run/libvirt/qemu/NAME.xml``
  with root ``<domstatus state='running' reason='booted' pid=…>``, whose own ``<devices>`` lists
  device aliases and whose ``<domain>`` child is the VM with ``<alias>`` elements added
  (reference/kvm-host.md §A, libvirt tests/qemustatusxml2xmldata/modern-in.xml).
- An mdev is named by ``<hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'>`` with
  ``<source><address uuid=…/></source>`` (§B); a vendor-VFIO VF by ``<hostdev mode='subsystem'
  type='pci' managed='no'>`` with the VF's address printed as libvirt prints it,
  ``domain='0x%04x' bus='0x%02x' slot='0x%02x' function='0x%d'`` (§C; ``managed='no'`` because the VF
  must stay on the nvidia driver).
- Starting a VM needs its vGPUs to exist, as in libvirt (an absent mdev fails with "mediated device
  … not found", §B; a VF without a vGPU type fails with ENODEV, host-interfaces.md §3.3); the
  running VM is a fake QEMU process holding every vGPU's VFIO node open, so the real in-use
  detection sees it. Shutting it down removes the status file and the process; the vGPUs stay
  (libvirt does not remove mdevs at stop — §B, inferred).
- mdevctl is simulated in sim/mdevctl.py.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from pathlib import Path

from vgpu_dm.host.libvirt import LIVE_DIR, PERSISTENT_DIR, DomainFileError
from vgpu_dm.host.model import UUID_PATTERN as _UUID

_PCI = r"([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])"
_HEADER = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
or other application using the libvirt API.
-->

"""


class SimVMError(ValueError):
    """What libvirt (or virsh) would refuse."""


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or re.search(r"[\x00-\x1f\x7f]", name):
        raise SimVMError(f"invalid VM name {name!r}: it names a file in {PERSISTENT_DIR}")


def _hostdev(device: str, alias: int | None, indent: str) -> str:
    alias_line = f"{indent}  <alias name='hostdev{alias}'/>\n" if alias is not None else ""
    if re.fullmatch(_UUID, device):
        return (
            f"{indent}<hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>\n"
            f"{indent}  <source>\n{indent}    <address uuid='{device.lower()}'/>\n{indent}  </source>\n"
            f"{alias_line}{indent}</hostdev>\n"
        )
    found = re.fullmatch(_PCI, device)
    if not found:
        raise SimVMError(f"{device!r} is neither an mdev UUID nor a PCI address (0000:41:00.4)")
    domain, bus, slot, function = (int(x, 16) for x in found.groups())
    return (
        f"{indent}<hostdev mode='subsystem' type='pci' managed='no'>\n"
        f"{indent}  <driver name='vfio'/>\n{indent}  <source>\n"
        f"{indent}    <address domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' "
        f"function='0x{function:x}'/>\n{indent}  </source>\n{alias_line}{indent}</hostdev>\n"
    )


def _domain(name: str, uuid: str, devices: list[str], live: bool, indent: str = "") -> str:
    from xml.sax.saxutils import escape

    hostdevs = "".join(_hostdev(d, n if live else None, indent + "    ") for n, d in enumerate(devices))
    opening = f"{indent}<domain type='kvm' id='1'>\n" if live else f"{indent}<domain type='kvm'>\n"
    return (
        opening + f"{indent}  <name>{escape(name)}</name>\n{indent}  <uuid>{uuid}</uuid>\n"
        f"{indent}  <memory unit='KiB'>8388608</memory>\n"
        f"{indent}  <currentMemory unit='KiB'>8388608</currentMemory>\n"
        f"{indent}  <vcpu placement='static'>4</vcpu>\n"
        f"{indent}  <os>\n{indent}    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>\n{indent}  </os>\n"
        f"{indent}  <devices>\n{indent}    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{hostdevs}{indent}  </devices>\n{indent}</domain>\n"
    )


def _devices_of(text: str) -> list[str]:
    from vgpu_dm.host.libvirt import parse_domain_xml

    parsed = parse_domain_xml(text)
    return sorted(parsed.mdevs) + sorted(parsed.pci)


def define(root: str | os.PathLike[str], name: str, devices: list[str]) -> str:
    """``virsh define``: write the persistent definition; returns the domain's UUID."""
    _check_name(name)
    base = Path(root)
    for device in devices:
        _hostdev(device, None, "")  # refuses what is neither a UUID nor a PCI address
    path = base / PERSISTENT_DIR / f"{name}.xml"
    if path.exists():
        raise SimVMError(f"VM {name!r} is already defined ({path}); undefine it first")
    uuid = str(uuidlib.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_HEADER.format(name=name) + _domain(name, uuid, devices, live=False))
    return uuid


def start(root: str | os.PathLike[str], name: str) -> int:
    """``virsh start``: its vGPUs must exist; writes the status file and a fake QEMU holding them."""
    from vgpu_dm.sim.processes import add_holder, device_node

    base = Path(root)
    path = base / PERSISTENT_DIR / f"{name}.xml"
    if not path.is_file():
        raise SimVMError(f"no VM {name!r} is defined (no {path})")
    live = base / LIVE_DIR / f"{name}.xml"
    if live.exists():
        raise SimVMError(f"VM {name!r} is already running")
    text = path.read_text()
    try:
        devices = _devices_of(text)
    except DomainFileError as exc:
        # libvirt skipped the file when it loaded its definitions: it knows no such domain.
        raise SimVMError(f"error: failed to get domain '{name}' ({path}: {exc})") from None
    nodes = []
    for device in devices:
        if re.fullmatch(_UUID, device) and not (base / "sys/bus/mdev/devices" / device).exists():
            raise SimVMError(f"error: Failed to start domain '{name}': mediated device '{device}' not found")
        vgpu_type = base / "sys/bus/pci/devices" / device / "nvidia/current_vgpu_type"
        if vgpu_type.exists() and vgpu_type.read_text().strip() in ("", "0"):
            raise SimVMError(
                f"error: Failed to start domain '{name}': VF {device} has no vGPU type (No such device)"
            )
        try:
            nodes.append(device_node(base, device))
        except LookupError as exc:
            raise SimVMError(f"error: Failed to start domain '{name}': {exc}") from None
    pid = add_holder(base, nodes)
    from xml.sax.saxutils import quoteattr

    from vgpu_dm.host.libvirt import parse_domain_xml

    uuid = parse_domain_xml(text).uuid or str(uuidlib.uuid4())
    monitor = quoteattr(f"/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock")
    aliases = "".join(f"    <device alias='hostdev{n}'/>\n" for n in range(len(devices)))
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_text(
        f"<domstatus state='running' reason='booted' pid='{pid}'>\n"
        "  <taint flag='high-privileges'/>\n"
        f"  <monitor path={monitor} json='1' type='unix'/>\n"
        f"  <devices>\n{aliases}  </devices>\n"
        + _domain(name, uuid, devices, live=True, indent="  ")
        + "</domstatus>\n"
    )
    return pid


def shutdown(root: str | os.PathLike[str], name: str) -> None:
    """``virsh shutdown``: the status file and the QEMU process go; the vGPUs stay."""
    from vgpu_dm.sim.processes import release_holder

    base = Path(root)
    live = base / LIVE_DIR / f"{name}.xml"
    if not live.is_file():
        raise SimVMError(f"VM {name!r} is not running")
    pid = re.search(r"pid='(\d+)'", live.read_text().split("\n", 1)[0])
    live.unlink()
    if pid and (base / "proc" / pid[1]).is_dir():
        release_holder(base, int(pid[1]))


def undefine(root: str | os.PathLike[str], name: str) -> None:
    """``virsh undefine`` of a VM that is not running."""
    base = Path(root)
    if (base / LIVE_DIR / f"{name}.xml").exists():
        raise SimVMError(f"VM {name!r} is running; shut it down first (sim shutdown)")
    path = base / PERSISTENT_DIR / f"{name}.xml"
    if not path.is_file():
        raise SimVMError(f"no VM {name!r} is defined (no {path})")
    path.unlink()
