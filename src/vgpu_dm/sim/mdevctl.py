"""mdevctl on a simulated host: its directories, and what its udev rule does when an mdev parent
appears — ``mdevctl start-parent-mdevs PARENT`` — written from mdevctl's source, not from our reader
(host/mdevctl.py), so that the two cannot share a wrong guess.

- Installed means its directories exist: ``etc/mdevctl.d`` and the callout and notifier directories
  its self-check needs (``usr/lib/mdevctl/scripts.d/…`` since 1.3.0; mdevctl Makefile.in,
  src/environment.rs ``self_check``).
- ``start-parent-mdevs P`` (src/main.rs ``start_parent_mdevs_command``) first loads every definition of
  P (src/environment.rs ``get_defined_devices``): entries of ``etc/mdevctl.d/P`` that are regular files
  named by a UUID (others skipped); each is parsed as JSON and must have ``mdev_type`` and ``start``
  (``Error: invalid json``), a string ``mdev_type`` and well-formed ``attrs`` (src/mdev.rs
  ``load_from_json``, ``add_attributes``). Any error there ends the command with exit 1 and **nothing**
  of P starts. Then each ``start: auto`` child is started (src/mdev.rs ``create``, ``start``): an active
  mdev of that UUID, an unregistered parent, an unknown type or no available instance fails that child
  only (logged, the rest go on); attributes are written after the create and a failed write removes the
  device again. The simulated mdevs have no attribute files (which ones NVIDIA's driver has is
  unconfirmed, host-interfaces.md §2.1), so a definition with attributes fails to start here.
- The rule runs only for a parent with a directory ``etc/mdevctl.d/P`` (60-mdevctl.rules ``TEST==``).
- When the rule runs for VFs that ``sriov-manage -e`` made is unconfirmed (kvm-host.md §E: whether
  NVIDIA's VFs raise ``MDEV_STATE=registered`` at all), and udev handles events asynchronously, after
  the kernel queued them. ``sim create --mdevctl-on-vfs`` chooses: ``start`` (handled before
  sriov-manage returns), ``later`` (queued: handled when something waits for udev — ``udevadm settle`` —
  or at the latest right before the next write to the driver, racing it), ``ignore`` (never).
"""

from __future__ import annotations

import errno
import json
import os
import uuid as uuidlib
from pathlib import Path

from vgpu_dm.sim.files import UDEV_QUEUE_FILE

CONFIG_DIR = "etc/mdevctl.d"
MDEVCTL_DIRS = (CONFIG_DIR, "usr/lib/mdevctl/scripts.d/callouts", "usr/lib/mdevctl/scripts.d/notifiers")
PCI_DEVICES = "sys/bus/pci/devices"
ON_VFS = ("start", "later", "ignore")


def install_mdevctl(root: str | os.PathLike[str]) -> None:
    for rel in MDEVCTL_DIRS:
        (Path(root) / rel).mkdir(parents=True, exist_ok=True)


class _Failed(Exception):
    """The whole command fails (mdevctl's ``main`` returns an error: message, exit 1)."""


def _load(path: Path, name: str) -> tuple[str, str, bool, list[tuple[str, str]]]:
    """(uuid, mdev_type, autostart, attrs) of one definition file, as get_defined_devices loads it."""
    try:
        body = json.loads(path.read_text())
    except ValueError as exc:
        raise _Failed(str(exc)) from None
    if not isinstance(body, dict) or body.get("mdev_type") is None or body.get("start") is None:
        raise _Failed("invalid json")
    if not isinstance(body["mdev_type"], str):
        raise _Failed("mdev_type is not a string (mdevctl panics)")
    attrs = body.get("attrs")
    if attrs is not None and not isinstance(attrs, list):
        raise _Failed("attributes field is not an array")
    pairs: list[tuple[str, str]] = []
    for attr in attrs or []:
        if not isinstance(attr, dict):
            raise _Failed("invalid JSON format for attribute: not an object")
        if len(attr) != 1:
            raise _Failed("invalid JSON format for attribute: too many fields")
        ((key, value),) = attr.items()
        if not isinstance(value, str):
            raise _Failed(f"invalid JSON format for attribute {key!r}: value must be of type str")
        pairs.append((key, value))
    return str(uuidlib.UUID(name)), body["mdev_type"], body["start"] == "auto", pairs


def start_parent_mdevs(base: Path, parent: str) -> list[str]:
    """``mdevctl start-parent-mdevs PARENT`` on the simulated host; returns what it logged."""
    from vgpu_dm.sim.driver import mdev_create, mdev_remove, type_id_of_dir
    from vgpu_dm.sim.layout import SimState

    directory = base / CONFIG_DIR / parent
    children = []
    try:
        for entry in sorted(os.listdir(directory)):
            path = directory / entry
            if not path.is_file():
                continue
            try:
                uuidlib.UUID(entry)
            except ValueError:
                continue  # "Can't determine uuid for file" (a warning)
            children.append(_load(path, entry))
    except _Failed as exc:
        return [f"mdevctl start-parent-mdevs {parent}: Error: {exc} (exit 1); nothing on {parent} started"]
    lines = []
    for uuid, mdev_type, autostart, attrs in children:
        if not autostart:
            continue
        types = base / PCI_DEVICES / parent / "mdev_supported_types"
        try:
            if (base / "sys/bus/mdev/devices" / uuid).exists():
                raise OSError("Device already exists")
            if not types.is_dir():
                raise OSError(f"Parent {parent} is not currently registered for mdev support")
            if not (types / mdev_type).is_dir():
                raise OSError(f"Parent {parent} does not support mdev type {mdev_type}")
            if int((types / mdev_type / "available_instances").read_text()) == 0:
                raise OSError(f"No available instances of {mdev_type} on {parent}")
            create = types / mdev_type / "create"
            mdev_create(base, SimState.load(base), parent, type_id_of_dir(mdev_type), uuid, str(create))
            for key, _ in attrs:
                if not (base / "sys/bus/mdev/devices" / uuid / key).is_file():
                    mdev_remove(base, SimState.load(base), parent, uuid, "1", str(create))
                    raise OSError(f"Failed to write attribute {key}: {os.strerror(errno.ENOENT)}")
            lines.append(f"mdevctl: started {uuid} ({mdev_type}) on {parent}")
        except OSError as exc:
            lines.append(f"mdevctl: could not start {uuid} on {parent}: {exc.strerror or exc}")
    return lines


def udev_parents_appeared(base: Path, parents: list[str]) -> list[str]:
    """mdevctl's udev rule for parents that registered: the start for each that has definitions."""
    if not (base / CONFIG_DIR).is_dir():
        return []
    lines = []
    for parent in parents:
        if (base / CONFIG_DIR / parent).is_dir():
            lines += start_parent_mdevs(base, parent)
    return lines


def queue_udev_events(base: Path, parents: list[str]) -> None:
    """``later``: the kernel queued the parents' events; udev handles them after the caller returns."""
    from vgpu_dm.host.root import SIM_MARKER

    queue = base / SIM_MARKER / UDEV_QUEUE_FILE
    pending = json.loads(queue.read_text()) if queue.exists() else []
    queue.write_text(json.dumps([*pending, *parents]))


def handle_udev_queue(base: Path) -> list[str]:
    """udev handles what is queued (``udevadm settle`` waits for it; the next driver write does not)."""
    from vgpu_dm.host.root import SIM_MARKER

    queue = base / SIM_MARKER / UDEV_QUEUE_FILE
    if not queue.exists():
        return []
    parents = json.loads(queue.read_text())
    queue.unlink()
    return udev_parents_appeared(base, parents)
