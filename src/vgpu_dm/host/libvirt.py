"""Which vGPUs libvirt's VMs are defined to use: the persistent and the running domain files.

libvirt (system mode) keeps a VM's definition in ``etc/libvirt/qemu/NAME.xml`` (root ``<domain>``)
and, while it runs, its live state in ``run/libvirt/qemu/NAME.xml`` (root ``<domstatus state=…>``
whose ``<domain>`` child is the VM; ``<domstatus>`` has its own ``<devices>`` of aliases that are not
the VM's devices). A transient VM exists only in the second directory, and live XML differs from the
persistent one after hotplug, so both are read and united per domain UUID. Only top-level ``*.xml``
files are domains: ``autostart/`` holds links to the same files and ``networks/`` holds networks.
(reference/kvm-host.md §A–C, Traps 1–4.)

A VM names its vGPU by mdev UUID (``<hostdev type='mdev'>``) or, for a vendor-VFIO vGPU, by the VF's
PCI address (``<hostdev type='pci'>``, ``<interface type='hostdev'>``, or in live XML an
``<interface>``'s ``<actual type='hostdev'>``); ``<qemu:commandline>`` arguments that name a vfio
device are read as a fallback. Address attributes are numbers in C's base-0 notation (``0x41``, ``65``,
``0101``; a missing one is 0).

Reading never fails the whole answer: a file that cannot be read or parsed becomes a warning naming
it, and its domain is one this check cannot vouch for. The files are root-owned and written by
libvirt; the standard library's parser (expat ≥ 2.4 bounds entity expansion, external entities are
never fetched) is enough for them. Nothing is imported or parsed on a host without these directories.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from vgpu_dm.host.model import UUID_PATTERN as _UUID
from vgpu_dm.host.root import HostRoot

PERSISTENT_DIR = "etc/libvirt/qemu"
LIVE_DIR = "run/libvirt/qemu"
NETWORKS_DIR = "etc/libvirt/qemu/networks"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
SHUT_OFF = "shut off"
# <domstatus state=…> holds libvirt's state name; virsh prints these words for them.
_STATE_WORDS = {
    "nostate": "no state",
    "running": "running",
    "blocked": "idle",
    "paused": "paused",
    "shutdown": "in shutdown",
    "shutoff": SHUT_OFF,
    "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}
# QEMU arguments naming a vfio device by its sysfs path or host address (kvm-host.md §B escape hatch).
_MDEV_ARG = r"sysfsdev=/sys/bus/mdev/devices/(" + _UUID + ")"
_PCI_ARG = (
    r"(?:sysfsdev=/sys/bus/pci/devices/|host=)"
    r"((?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}\.[0-7])"
)
# Largest values libvirt accepts for each part of a PCI address (device_conf.c).
_PCI_LIMITS = (("domain", 0xFFFFFFFF), ("bus", 0xFF), ("slot", 0x1F), ("function", 0x7))


class Domain(NamedTuple):
    """One libvirt VM, united over its persistent and live files."""

    name: str
    uuid: str | None
    state: str  # virsh's words: "running", "paused", "shut off", …
    persistent: bool  # has a file in etc/libvirt/qemu (transient VMs have none)
    mdevs: frozenset[str]  # mdev UUIDs it names (lowercase)
    pci: frozenset[str]  # host PCI addresses it names (sysfs form, 0000:41:00.4)
    files: tuple[str, ...]  # host-root-relative files it was read from

    @property
    def running(self) -> bool:
        """It has a live status file: QEMU runs (or is paused, or shutting down)."""
        return self.state != SHUT_OFF

    def describe(self) -> str:
        return f"VM {self.name!r} ({self.state})"


class ParsedDomain(NamedTuple):
    """What one file says about its domain."""

    name: str | None
    uuid: str | None
    state: str | None  # None for a persistent definition (no live state in it)
    mdevs: frozenset[str]
    pci: frozenset[str]
    problems: tuple[str, ...]  # devices whose reference could not be read (the domain is not vouched for)
    networks: frozenset[str] = frozenset()  # libvirt networks its interfaces use (hostdev pools, maybe)


class DomainFileError(ValueError):
    """A domain file that is not a libvirt domain (malformed XML, or another root element)."""


def parse_pci_number(text: str) -> int:
    """A PCI address attribute as libvirt reads it: C ``strtoul`` with base 0, the whole text.

    ``0x41`` is hex, ``065`` octal, ``65`` decimal; a sign, trailing characters, ``08`` or an empty
    value are errors (ValueError).
    """
    body = text.lstrip(" \t\n\r\f\v")
    if body[:2].lower() == "0x":
        digits, base = body[2:], 16
        valid = "0123456789abcdefABCDEF"
    elif body.startswith("0") and len(body) > 1:
        digits, base = body[1:], 8
        valid = "01234567"
    else:
        digits, base = body, 10
        valid = "0123456789"
    if not digits or any(c not in valid for c in digits):
        raise ValueError(f"{text!r} is not a number (libvirt reads 0x.. as hex, 0.. as octal, else decimal)")
    return int(digits, base)


def pci_address(element) -> str:
    """The sysfs name of the PCI address in ``element``'s attributes (missing parts are 0)."""
    parts = []
    for attribute, limit in _PCI_LIMITS:
        raw = element.get(attribute)
        value = 0 if raw is None else parse_pci_number(raw)
        if value > limit:
            raise ValueError(f"{attribute}={raw!r} is larger than {limit:#x}")
        parts.append(value)
    domain, bus, slot, function = parts
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


def _text(element, path: str) -> str | None:
    found = element.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


def parse_domain_xml(text: str) -> ParsedDomain:
    """Parse a persistent (``<domain>``) or live (``<domstatus>``) file; DomainFileError if neither."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        reason = str(exc).split(":")[0]
        raise DomainFileError(f"not well-formed XML (line {line}, column {column + 1}: {reason})") from None
    state = None
    if root.tag == "domstatus":
        # Trap 1: the VM is the <domain> child; <domstatus> has <devices> of its own (aliases only).
        state = _STATE_WORDS.get(root.get("state") or "", root.get("state") or "running")
        domain = root.find("domain")
        if domain is None:
            raise DomainFileError("a <domstatus> file without its <domain>")
    elif root.tag == "domain":
        domain = root
    else:
        raise DomainFileError(f"root element is <{root.tag}>, not <domain> or <domstatus>")
    mdevs: set[str] = set()
    pci: set[str] = set()
    networks: set[str] = set()
    problems: list[str] = []

    def add_pci(address, what: str) -> None:
        if address is None:
            problems.append(f"{what} without a <source><address>")
            return
        try:
            pci.add(pci_address(address))
        except ValueError as exc:
            problems.append(f"{what}: {exc}")

    devices = domain.find("devices")
    for device in devices if devices is not None else ():
        kind = device.get("type")
        if device.tag == "hostdev" and device.get("mode", "subsystem") == "subsystem":
            if kind == "mdev":
                address = device.find("source/address")
                uuid = address.get("uuid") if address is not None else None
                if uuid and re.fullmatch(_UUID, uuid.strip()):
                    mdevs.add(uuid.strip().lower())
                else:
                    problems.append(
                        f"<hostdev type='mdev'> without a valid <source><address uuid=…> ({uuid!r})"
                    )
            elif kind == "pci":
                add_pci(device.find("source/address"), "<hostdev type='pci'>")
        elif device.tag == "interface":
            if kind == "hostdev":
                add_pci(device.find("source/address"), "<interface type='hostdev'>")
            if kind == "network" and device.find("source") is not None:
                networks.add(device.find("source").get("network") or "")
            actual = device.find("actual")
            if actual is not None and actual.get("type") == "hostdev":
                # A VF picked from a hostdev network pool: known only in live XML (Trap 4).
                add_pci(actual.find("source/address"), "<interface>'s <actual type='hostdev'>")
    for arg in domain.iterfind(f"{QEMU_NS}commandline/{QEMU_NS}arg"):
        value = arg.get("value") or ""
        mdevs.update(m.lower() for m in re.findall(_MDEV_ARG, value))
        for found in re.findall(_PCI_ARG, value):
            pci.add(_canonical_bdf(found))
    return ParsedDomain(
        name=_text(domain, "name"),
        uuid=(_text(domain, "uuid") or "").lower() or None,
        state=state,
        mdevs=frozenset(mdevs),
        pci=frozenset(pci),
        problems=tuple(problems),
        networks=frozenset(networks - {""}),
    )


def parse_hostdev_pool(text: str) -> tuple[str | None, frozenset[str] | None]:
    """(name, VFs) of a libvirt network file; VFs None unless it is a ``<forward mode='hostdev'>`` pool
    listing its VFs by ``<address type='pci'>`` (libvirt tests/networkxml2xmlin/hostdev.xml). A pool
    given as ``<pf dev='…'/>`` is a network card's VFs: a GPU has no network device, so none of its
    VFs can be in one. DomainFileError for what is not a network."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        raise DomainFileError(f"not well-formed XML (line {line}, column {column + 1})") from None
    if root.tag != "network":
        raise DomainFileError(f"root element is <{root.tag}>, not <network>")
    forward = root.find("forward")
    if forward is None or forward.get("mode") != "hostdev":
        return _text(root, "name"), None
    vfs = set()
    for address in forward.iterfind("address"):
        if address.get("type", "pci") == "pci":
            try:
                vfs.add(pci_address(address))
            except ValueError as exc:
                raise DomainFileError(f"pool address: {exc}") from None
    return _text(root, "name"), frozenset(vfs)


def _canonical_bdf(text: str) -> str:
    """``41:00.4`` or ``0000:41:00.4`` (QEMU's host=) → ``0000:41:00.4``."""
    head, function = text.rsplit(".", 1)
    parts = head.split(":")
    domain = int(parts[0], 16) if len(parts) == 3 else 0
    bus, slot = int(parts[-2], 16), int(parts[-1], 16)
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{int(function, 16):x}"


class DomainIndex:
    """Every domain under the host root, read once on first use; answers "which VMs name this vGPU"."""

    def __init__(self, host: HostRoot):
        self.host = host
        self._domains: list[Domain] | None = None
        self._warnings: list[str] = []
        self._by_mdev: dict[str, list[Domain]] = {}
        self._by_pci: dict[str, list[Domain]] = {}

    @property
    def domains(self) -> list[Domain]:
        if self._domains is None:
            self._domains = self._read()
            for domain in self._domains:
                for uuid in domain.mdevs:
                    self._by_mdev.setdefault(uuid, []).append(domain)
                for address in domain.pci:
                    self._by_pci.setdefault(address, []).append(domain)
        return self._domains

    @property
    def warnings(self) -> list[str]:
        """Files that could not be read or understood; the domains in them are not vouched for."""
        _ = self.domains
        return list(self._warnings)

    def for_mdev(self, uuid: str) -> list[Domain]:
        _ = self.domains
        return list(self._by_mdev.get(uuid.lower(), ()))

    def for_pci(self, address: str) -> list[Domain]:
        _ = self.domains
        return list(self._by_pci.get(address, ()))

    def _files(self, directory: str) -> list[str]:
        try:
            names = self.host.listdir(directory)
        except OSError as exc:  # PermissionError: not root
            self._warnings.append(
                f"cannot read {self.host.path(directory)} ({exc.strerror or exc}): the libvirt VMs defined "
                f"there cannot be checked, so the vGPUs they use are not protected (run as root)"
            )
            return []
        return [f"{directory}/{n}" for n in names if n.endswith(".xml") and not n.startswith(".")]

    def _read(self) -> list[Domain]:
        merged: dict[str, dict] = {}
        for directory, live in ((PERSISTENT_DIR, False), (LIVE_DIR, True)):
            for rel in self._files(directory):
                guess = rel.rsplit("/", 1)[1][: -len(".xml")]  # libvirt names the file after the domain
                try:
                    text = self.host.read_text(rel)
                except IsADirectoryError:
                    continue
                except OSError as exc:
                    self._cannot_vouch(rel, guess, f"cannot be read ({exc.strerror or exc})")
                    continue
                try:
                    parsed = parse_domain_xml(text)
                except DomainFileError as exc:
                    self._cannot_vouch(rel, guess, str(exc))
                    continue
                name = parsed.name or guess
                for problem in parsed.problems:
                    self._cannot_vouch(rel, name, problem, whole=False)
                key = parsed.uuid or f"name:{name}"
                entry = merged.setdefault(
                    key,
                    {
                        "name": name,
                        "uuid": parsed.uuid,
                        "state": SHUT_OFF,
                        "persistent": False,
                        "mdevs": set(),
                        "pci": set(),
                        "files": [],
                    },
                )
                if live:
                    entry["name"] = name  # the running VM's name wins (a rename while it runs)
                    entry["state"] = parsed.state or "running"
                else:
                    entry["persistent"] = True
                entry["mdevs"] |= parsed.mdevs
                entry["pci"] |= parsed.pci
                entry.setdefault("networks", set()).update(parsed.networks)
                entry["files"].append(rel)
        used = {n for e in merged.values() for n in e.get("networks", ())}
        if used:
            # Trap 4: a VM on a hostdev pool gets one of its VFs only when it starts: it claims them all.
            pools = self._hostdev_pools()
            for entry in merged.values():
                for network in entry.get("networks", ()):
                    entry["pci"] |= pools.get(network, frozenset())
        domains = [
            Domain(
                name=e["name"],
                uuid=e["uuid"],
                state=e["state"],
                persistent=e["persistent"],
                mdevs=frozenset(e["mdevs"]),
                pci=frozenset(e["pci"]),
                files=tuple(e["files"]),
            )
            for e in merged.values()
        ]
        return sorted(domains, key=lambda d: (d.name, d.uuid or ""))

    def _hostdev_pools(self) -> dict[str, frozenset[str]]:
        """Network name → VFs of every ``<forward mode='hostdev'>`` pool in the networks directory."""
        pools: dict[str, frozenset[str]] = {}
        for rel in self._files(NETWORKS_DIR):
            try:
                name, vfs = parse_hostdev_pool(self.host.read_text(rel))
            except IsADirectoryError:
                continue
            except (OSError, DomainFileError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                self._warnings.append(
                    f"{self.host.path(rel)}: {why}: if it is a hostdev network, the VFs of the VMs that use "
                    f"it are not protected"
                )
                continue
            if name and vfs is not None:
                pools[name] = vfs
        return pools

    def _cannot_vouch(self, rel: str, name: str, why: str, whole: bool = True) -> None:
        what = "the vGPUs it uses are" if whole else "that device is"
        self._warnings.append(
            f"{self.host.path(rel)}: {why}: cannot vouch for libvirt domain {name!r}: {what} not protected"
        )
