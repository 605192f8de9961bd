"""mdevctl's persistent mdev definitions: read them, and write or remove them in mdevctl's own format.

A definition is the file ``etc/mdevctl.d/<parent>/<uuid>`` (no extension; the parent is the sysfs
name of the mdev parent, e.g. ``0000:41:00.4``) holding a JSON object with ``mdev_type`` (the type
directory's name, ``nvidia-558``), ``start`` (``auto`` or ``manual``) and an optional ``attrs`` list of
one-key objects. The file holds no UUID and no parent: both come from its path. With ``start: auto``,
mdevctl's udev rule creates the device again whenever its parent appears, i.e. at every boot.
mdevctl reads strictly (one bad file makes ``mdevctl list --defined`` fail), so we write atomically
and byte for byte as mdevctl does (serde_json's pretty printer: 2-space indent, keys in this order,
no trailing newline). (reference/kvm-host.md §E, Traps 6–7; mdevctl src/mdev.rs ``to_json``,
``write_config``, src/environment.rs ``get_defined_devices``.)

Reading never fails the whole answer: a file mdevctl itself could not use is a warning naming it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from vgpu_dm.host.model import UUID_PATTERN
from vgpu_dm.host.root import HostRoot

CONFIG_DIR = "etc/mdevctl.d"
# Directories beside the parents: legacy callout/notifier scripts, never definitions.
_NOT_PARENTS = ("scripts.d",)
AUTO, MANUAL = "auto", "manual"


class Definition(NamedTuple):
    """One mdevctl definition."""

    parent: str
    uuid: str  # lowercase
    mdev_type: str
    start: str  # AUTO or MANUAL (mdevctl: anything but "auto" is manual)
    attrs: tuple[tuple[str, str], ...] = ()

    @property
    def auto(self) -> bool:
        return self.start == AUTO

    @property
    def path(self) -> str:
        """Relative to the host root."""
        return definition_path(self.parent, self.uuid)


def definition_path(parent: str, uuid: str) -> str:
    return f"{CONFIG_DIR}/{parent}/{uuid}"


def definition_text(mdev_type: str, start: str, attrs: tuple[tuple[str, str], ...] = ()) -> str:
    """The file body exactly as mdevctl writes it."""
    import json

    body = {"mdev_type": mdev_type, "start": start, "attrs": [{k: v} for k, v in attrs]}
    return json.dumps(body, indent=2, ensure_ascii=False)


def parse_definition(text: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(mdev_type, start, attrs) of a definition file; ValueError says why mdevctl would refuse it."""
    import json

    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    for key in ("mdev_type", "start"):
        if body.get(key) is None:
            raise ValueError(f"no {key!r}")
    if not isinstance(body["mdev_type"], str):
        raise ValueError(f"'mdev_type' is not a string ({body['mdev_type']!r})")
    attrs: list[tuple[str, str]] = []
    raw = body.get("attrs")
    if raw is not None:
        if not isinstance(raw, list):
            raise ValueError("'attrs' is not a list")
        for item in raw:
            if not (isinstance(item, dict) and len(item) == 1):
                raise ValueError(f"'attrs' item {item!r} is not an object with one key")
            ((key, value),) = item.items()
            if not isinstance(value, str):
                raise ValueError(f"'attrs' value of {key!r} is not a string ({value!r})")
            attrs.append((key, value))
    start = AUTO if body["start"] == AUTO else MANUAL
    return body["mdev_type"], start, tuple(attrs)


class MdevctlIndex:
    """mdevctl's definitions under the host root, read once on first use."""

    def __init__(self, host: HostRoot):
        self.host = host
        self._definitions: list[Definition] | None = None
        self._warnings: list[str] = []

    @property
    def installed(self) -> bool:
        """mdevctl's configuration directory exists (its package creates it; mdevctl refuses without)."""
        return self.host.exists(CONFIG_DIR)

    @property
    def definitions(self) -> list[Definition]:
        if self._definitions is None:
            self._definitions = self._read()
        return self._definitions

    @property
    def warnings(self) -> list[str]:
        _ = self.definitions
        return list(self._warnings)

    def for_uuid(self, uuid: str) -> list[Definition]:
        """Every definition of ``uuid`` (one UUID may be defined under several parents)."""
        uuid = uuid.lower()
        return [d for d in self.definitions if d.uuid == uuid]

    def on_parents(self, parents: list[str]) -> list[Definition]:
        wanted = set(parents)
        return [d for d in self.definitions if d.parent in wanted]

    def _read(self) -> list[Definition]:
        found: list[Definition] = []
        try:
            parents = self.host.listdir(CONFIG_DIR)
        except OSError as exc:
            self._warnings.append(f"cannot read {self.host.path(CONFIG_DIR)} ({exc.strerror or exc})")
            return found
        for parent in parents:
            if parent in _NOT_PARENTS:
                continue
            try:
                names = self.host.listdir(f"{CONFIG_DIR}/{parent}")
            except OSError as exc:
                self._warnings.append(
                    f"cannot read {self.host.path(f'{CONFIG_DIR}/{parent}')} ({exc.strerror})"
                )
                continue
            for name in names:
                if not re.fullmatch(UUID_PATTERN, name):
                    continue  # mdevctl skips such files too (with a warning of its own)
                rel = definition_path(parent, name)
                try:
                    text = self.host.read_text(rel)
                except IsADirectoryError:
                    continue
                except OSError as exc:
                    self._warnings.append(f"{self.host.path(rel)}: cannot be read ({exc.strerror or exc})")
                    continue
                try:
                    mdev_type, start, attrs = parse_definition(text)
                except ValueError as exc:
                    self._warnings.append(
                        f"{self.host.path(rel)}: not a valid mdevctl definition: {exc} (while this file is "
                        f"there, mdevctl list --defined and libvirt's node devices fail, and at boot mdevctl "
                        f"starts none of the definitions on {parent})"
                    )
                    continue
                found.append(Definition(parent, name.lower(), mdev_type, start, attrs))
        return found


def write_definition(host: HostRoot, definition: Definition) -> None:
    """Create or replace a definition atomically (temp file, fsync, rename), as mdevctl lays it out."""
    text = definition_text(definition.mdev_type, definition.start, definition.attrs)
    host.save_state(definition.path, text)


def remove_definition(host: HostRoot, definition: Definition) -> None:
    """Delete a definition file; the parent's directory stays (``mdevctl undefine`` keeps it too)."""
    host.remove_state(definition.path)


SETTLE_TIMEOUT = 30.0  # seconds udevadm settle may wait for mdevctl's starts on new VFs


def settle_autostart(host: HostRoot, parents: list[str], timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """After ``sriov-manage -e`` made ``parents`` (mdev-capable VFs): let mdevctl finish starting their
    ``start: auto`` definitions before anything is planned on them; returns warnings.

    mdevctl starts them from its udev rule when a parent registers. udev handles that event on its own
    time, perhaps after sriov-manage returned (and whether NVIDIA's VFs raise it at all is
    unconfirmed, kvm-host.md §E): creating vGPUs meanwhile would race mdevctl's creates for the same
    VFs. ``udevadm settle`` returns once udev has handled every queued event, RUN programs included.
    No definition on those parents, or all of them started already: nothing to wait for. No udevadm:
    no udev, so no rule will run either.
    """
    index = MdevctlIndex(host)
    if not index.installed:
        return []
    pending = [d for d in index.on_parents(parents) if d.auto]
    if not pending or all(host.exists(f"sys/bus/mdev/devices/{d.uuid}") for d in pending):
        return []
    import subprocess

    from vgpu_dm import log

    log.get("mdevctl").info(
        f"mdevctl has {len(pending)} start=auto definition(s) on the new virtual functions: waiting for udev "
        f"to run its rule (udevadm settle)"
    )
    try:
        proc = host.run(["udevadm", "settle", f"--timeout={timeout:g}"], timeout=timeout + 10)
        why = (proc.stderr or proc.stdout or f"exit {proc.returncode}").strip()
        # chroot exits 127 when the host root has no udevadm: no udev there either.
        settled = proc.returncode == 0 or (proc.returncode == 127 and "chroot" in why)
    except FileNotFoundError:
        settled, why = True, ""
    except subprocess.TimeoutExpired:
        settled, why = False, "it did not return"
    missing = [d for d in pending if not host.exists(f"sys/bus/mdev/devices/{d.uuid}")]
    if not missing:
        return []
    shown = ", ".join(f"{d.uuid} on {d.parent}" for d in missing[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    if not settled:
        return [
            f"udevadm settle failed ({why}): mdevctl may still create {len(missing)} mdev(s) it defines "
            f"on the new virtual functions ({shown}{more}) while apply creates vGPUs there"
        ]
    return [
        f"mdevctl did not start {len(missing)} start=auto definition(s) on the new virtual functions "
        f"({shown}{more}): the VFs' udev event did not reach it, or the start failed (see the system log, "
        f"logger tag mdevctl); apply makes the layout without them"
    ]
