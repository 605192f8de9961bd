"""Where the NVIDIA driver's files are: ``nvidia-smi``, ``sriov-manage`` and ``libnvidia-ml.so.1``,
decided per file, in the driver root first, then in the host root, then in the host's
``/run/nvidia/driver`` (``roots``).

Two layouts are real (reference/gpu-operator.md §1): the GPU Operator's driver container publishes its
root at the host's ``/run/nvidia/driver`` (mounted into our pod at ``/driver-root``), while a vGPU
manager installed on the host keeps everything under the host's own ``/`` — and the operator still
mounts ``/driver-root`` there, as an empty directory (``DirectoryOrCreate``). So the existence of the
driver root says nothing; each file is looked for where it really is.

Paths here are as this process sees them (``/driver-root/usr/bin/nvidia-smi``,
``/host/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.95.05``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

# The GPU Operator's default host path of the driver container's root (DefaultDriverInstallDir in
# gpu-operator controllers/object_controls.go; ClusterPolicy hostPaths.driverInstallDir changes it).
DRIVER_INSTALL_DIR = "/run/nvidia/driver"
NVML = "libnvidia-ml.so.1"
# Where upstream's agent looks for NVML in a root, in this order (cmd/nvidia-k8s-vgpu-dm/find.go).
NVML_DIRS = (
    "/",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
)
# Where a program given by bare name is looked for inside a root (a root's own PATH).
BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

DRIVER_ROOT, HOST_ROOT = "driver root", "host root"


class Location(NamedTuple):
    """Where one driver file was found (or not)."""

    name: str  # what was looked for: "nvidia-smi", "/usr/lib/nvidia/sriov-manage", "libnvidia-ml.so.1"
    kind: str | None  # DRIVER_ROOT or HOST_ROOT; None when it is in neither
    root: str | None  # that root's directory, as this process sees it
    inner: str | None  # the path inside that root (what runs under ``chroot root``)
    looked: tuple[tuple[str, str], ...]  # (kind, directory) of every root looked in, in order

    @property
    def found(self) -> bool:
        return self.kind is not None

    @property
    def path(self) -> str | None:
        """The file as this process sees it (for LD_PRELOAD, messages and checks)."""
        if self.root is None or self.inner is None:
            return None
        return os.path.join(self.root, self.inner.lstrip("/"))

    def places(self) -> str:
        """``the driver root /driver-root, the host root /host and the driver root
        /host/run/nvidia/driver`` (for messages)."""
        places = [f"the {kind} {where}" for kind, where in self.looked]
        return " and ".join([", ".join(places[:-1]), places[-1]] if len(places) > 1 else places)

    def describe(self) -> str:
        name = os.path.basename(self.name)
        if not self.found:
            return f"{name}: not found (looked for {self.name} in {self.places()})"
        return f"{name}: {self.kind} {self.root} ({self.path})"


def find_nvml(root: str) -> str | None:
    """``libnvidia-ml.so.1`` under ``root``, symlinks resolved inside that root (an absolute link
    target means the root's own ``/``, not this process's); None if absent or dangling."""
    for directory in NVML_DIRS:
        path = os.path.join(root, directory.lstrip("/"), NVML)
        for _ in range(40):
            if not os.path.islink(path):
                break
            target = os.readlink(path)
            path = (
                os.path.join(root, target.lstrip("/"))
                if os.path.isabs(target)
                else os.path.join(os.path.dirname(path), target)
            )
        if os.path.isfile(path):
            return os.path.normpath(path)
    return None


def find_program(root: str, program: str) -> str | None:
    """The path inside ``root`` of ``program`` (an absolute path inside the root, or a bare name looked
    for in the root's bin directories); None when it is not there. The entry itself counts (``lexists``):
    an absolute symlink is resolved by ``chroot`` inside the root, not here."""
    if "/" in program:
        inner = "/" + program.lstrip("/")
        return inner if os.path.lexists(os.path.join(root, inner.lstrip("/"))) else None
    for directory in BIN_DIRS:
        inner = f"{directory}/{program}"
        if os.path.lexists(os.path.join(root, inner.lstrip("/"))):
            return inner
    if os.path.abspath(root) == "/":
        # This machine's own root: its PATH may name other directories (e.g. /opt/...).
        import shutil  # off the assert path: only a program run gets here

        return shutil.which(program)
    return None


def roots(driver_root: str | None, host_root: str) -> list[tuple[str, str]]:
    """(kind, directory) in the order files are looked for:

    1. the driver root, when one is named and it is not the host root itself;
    2. the host root (a vGPU manager installed on the host);
    3. the GPU Operator's driver container root as the host root shows it
       (``<host root>/run/nvidia/driver``), unless that is the driver root named in 1: so a front end
       started without a driver root (our own manifests mount none; the CLI's default) still finds a
       containerised driver.
    """
    host = os.path.abspath(host_root)
    first = os.path.abspath(driver_root) if driver_root else None
    found = [*([(DRIVER_ROOT, first)] if first and first != host else []), (HOST_ROOT, host)]
    container = os.path.join(host, DRIVER_INSTALL_DIR.lstrip("/"))
    if container != first:
        found.append((DRIVER_ROOT, container))
    return found


def locate_program(program: str, driver_root: str | None, host_root: str) -> Location:
    looked = tuple(roots(driver_root, host_root))
    for kind, root in looked:
        if not os.path.isdir(root):
            continue
        inner = find_program(root, program)
        if inner is not None:
            return Location(program, kind, root, inner, looked)
    return Location(program, None, None, None, looked)


def locate_nvml(driver_root: str | None, host_root: str) -> Location:
    looked = tuple(roots(driver_root, host_root))
    for kind, root in looked:
        if not os.path.isdir(root):
            continue
        path = find_nvml(root)
        if path is not None:
            return Location(NVML, kind, root, "/" + os.path.relpath(path, root), looked)
    return Location(NVML, None, None, None, looked)


def resolve_in_root(root: str, inner: str) -> str:
    """``inner`` (a path inside ``root``) as this process sees it, with every symlink on the way resolved
    inside ``root``, as ``chroot root`` would: an absolute link target means the root's own ``/``, not
    this process's. Components that do not exist are kept as they are."""
    parts = [p for p in inner.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        path = os.path.join(root, *done, part)
        if os.path.islink(path) and hops < 40:
            hops += 1
            target = os.readlink(path)
            if os.path.isabs(target):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


class HostPathUnknown(Exception):
    """The driver root's path as the host sees it cannot be established."""


def driver_root_on_host(driver_root: str, host_root: str, setting: str | None = None) -> str:
    """The driver root's directory as the host (``chroot <host root>``) sees it.

    - a driver root below the host root (``/host/run/nvidia/driver``, or any path when the host root is
      ``/``): its path below the host root;
    - else (the operator's separate mount ``/driver-root``): ``setting`` when given, else the operator's
      default ``/run/nvidia/driver``, proven to be the same directory (device and inode) through both
      paths. The directories are compared, not a file in them: a file may be a symlink whose absolute
      target only makes sense inside its own root; the host's side is resolved inside the host root.

    Raises HostPathUnknown saying what was compared.
    """
    root = os.path.abspath(driver_root)
    host = os.path.abspath(host_root)
    if host == "/":
        return root
    rel = os.path.relpath(root, host)
    if rel != "." and not rel.startswith(".."):
        return "/" + rel
    candidate = "/" + (setting or DRIVER_INSTALL_DIR).strip("/")
    theirs = resolve_in_root(host, candidate)
    mine = _identity(root)
    if mine is not None and mine == _identity(theirs):
        return candidate
    shown = os.path.join(host, candidate.lstrip("/"))
    if not os.path.lexists(theirs):
        why = "does not exist"
    elif not os.path.isdir(theirs):
        why = "is not a directory"
    else:
        why = "is another directory"
    raise HostPathUnknown(
        f"the driver root {root} is not {shown} (that {why}), so the host's path of the driver root is "
        f"not {candidate}"
    )
