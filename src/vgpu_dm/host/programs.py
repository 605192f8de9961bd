"""Running the driver's programs (nvidia-smi, sriov-manage): where each one is, which root it runs in,
and how long it may take.

Each program is looked for in the driver root first, then in the host root, then in the host's
``/run/nvidia/driver`` (``host/locate.py``), and
runs through ``chroot`` into the root it was found in — except ``sriov-manage``: it changes devices
through sysfs, and the GPU Operator's driver container publishes its root *without* ``/sys``
(design.md "Three roots"; reference/host-interfaces.md §3.2: run via ``chroot /host …``). Found in the
driver root, it runs as ``chroot <host root> <driver root as the host sees it>/usr/lib/nvidia/sriov-manage``.

A program that is missing is a HostError naming every place looked in; one that hangs is killed after
a timeout and reported the same way, so callers roll back instead of dying with a traceback.
This module owns ``host/smi.py`` (the nvidia-smi parser), which imports nothing of ours from here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host import locate
from vgpu_dm.host.root import HostRoot

if TYPE_CHECKING:
    import subprocess

    from vgpu_dm.host.smi import NvidiaSmi

DEFAULT_SRIOV_MANAGE = "/usr/lib/nvidia/sriov-manage"
DEFAULT_TIMEOUT = 120.0
# coreutils chroot exits 127 when the command cannot be found inside the new root.
_NOT_FOUND = 127
# Programs that change devices through sysfs: they must see the host's /sys, so they run in the host root.
_NEEDS_HOST_SYSFS = frozenset({"sriov-manage"})
_log = log.get("host")


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class HostTools(NamedTuple):
    """Where the driver's programs are, as plain values (the CLI and the Kubernetes agent fill it).

    ``driver_root`` is a directory as this process sees it (``/driver-root`` in the GPU Operator's pod,
    ``/host/run/nvidia/driver`` with the host's ``/`` at ``/host``); None means none is named. Programs
    are looked for there first, then in the host root, then in the host's ``/run/nvidia/driver``
    (``locate.roots``). ``driver_root_on_host`` is the driver root's
    path as the host sees it, needed only when the driver root is not below the host root and is not
    the GPU Operator's ``/run/nvidia/driver`` (``hostPaths.driverInstallDir`` changed).
    """

    sriov_manage: str = DEFAULT_SRIOV_MANAGE
    nvidia_smi: str = "nvidia-smi"
    mig_parted: str = "nvidia-mig-parted"
    driver_root: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds any one program may run before it is killed
    unbind_pause: float = 2.0  # between sriov-manage retries after "Cannot obtain unbindLock"
    vf_wait: float = 30.0  # how long the VFs' nvidia/ directories may take to appear after sriov-manage
    driver_root_on_host: str | None = None
    # (value, how the operator gave it) for the paths above that came from an option or a variable,
    # so that messages name it ("environment variable VGPU_DM_NVIDIA_SMI (for '--nvidia-smi')").
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, value: str | None) -> str:
        """`` (from …)`` for a value the operator gave, else ""."""
        given = dict(self.origins).get(value or "")
        return f" (from {given})" if given else ""


class DriverFile(NamedTuple):
    """Where one of the driver's files is, for the agent's start-up log."""

    location: locate.Location
    runs_as: tuple[str, str] | None = None  # (root, path) when it runs elsewhere than where it was found
    problem: str | None = None  # found, but it cannot be run (sriov-manage with no known host path)

    @property
    def ok(self) -> bool:
        return self.location.found and self.problem is None

    @property
    def line(self) -> str:
        text = self.location.describe()
        if self.runs_as:
            text += f"; runs as: chroot {self.runs_as[0]} {self.runs_as[1]}"
        return f"{text}; cannot run: {self.problem}" if self.problem else text


class Programs:
    """Runs the driver's programs for one host, each in the root it lives in."""

    def __init__(self, host: HostRoot, tools: HostTools):
        self.host = host
        self.tools = tools
        self._smi: NvidiaSmi | None = None
        self._found: dict[str, locate.Location] = {}

    @property
    def smi(self) -> NvidiaSmi:
        """nvidia-smi where it is (its module is imported on first use: assert never runs it)."""
        if self._smi is None:
            from vgpu_dm.host.smi import NvidiaSmi

            self._smi = NvidiaSmi(self.run, self.tools.nvidia_smi)
        return self._smi

    # -- where things are --------------------------------------------------------------------------

    def locate(self, program: str) -> locate.Location:
        """Where ``program`` (a bare name or a path inside a root) is (``locate.roots`` gives the order)."""
        found = self._found.get(program)
        if found is None:
            found = locate.locate_program(program, self.tools.driver_root, self.host.root)
            _log.debug(found.describe())
            self._found[program] = found
        return found

    @property
    def nvml(self) -> locate.Location:
        """``libnvidia-ml.so.1``, in ``locate.roots``'s order; ``.path`` is the file as this
        process sees it (what ``LD_PRELOAD`` of a program of this container's own needs)."""
        found = self._found.get(locate.NVML)
        if found is None:
            found = locate.locate_nvml(self.tools.driver_root, self.host.root)
            self._found[locate.NVML] = found
        return found

    def report(self) -> list[DriverFile]:
        """nvidia-smi, sriov-manage and NVML: which root serves each (the agent logs them at start)."""
        sriov = DriverFile(self.locate(self.tools.sriov_manage))
        if sriov.location.kind == locate.DRIVER_ROOT:
            try:
                root, cmd = self.command([self.tools.sriov_manage])
                sriov = sriov._replace(runs_as=(root, cmd[0]))
            except HostError as exc:
                sriov = sriov._replace(problem=str(exc))
        return [DriverFile(self.locate(self.tools.nvidia_smi)), sriov, DriverFile(self.nvml)]

    def where(self, program: str) -> str:
        """Where ``program`` is as this process sees it, or the places looked in (for messages)."""
        found = self.locate(program)
        return found.path or f"{program} in {found.places()}"

    def exists(self, program: str) -> bool:
        return self.locate(program).found

    def _root_origin(self) -> str:
        """`` (the driver root from …)`` when the operator named the driver root, else ""."""
        given = dict(self.tools.origins).get(self.tools.driver_root or "")
        return f" (the driver root from {given})" if given else ""

    def command(self, argv: list[str], what: str = "") -> tuple[str, list[str]]:
        """(the root to chroot into, the argv to run there) for ``argv``; HostError when the program is
        in neither root, or must run in the host root and the host's path of the driver root is unknown."""
        name = what or os.path.basename(argv[0])
        found = self.locate(argv[0])
        if not found.found:
            raise HostError(
                f"{name} not found: looked for {argv[0]}{self.tools.origin(argv[0])} in {found.places()}"
                f"{self._root_origin()} (a driver installed elsewhere: name its root with nvidia-vgpu-dm "
                f"--driver-root, or --driver-root-ctr-path of nvidia-k8s-vgpu-dm and nvidia-vgpu-dra)"
            )
        assert found.root is not None and found.inner is not None
        if os.path.basename(argv[0]) in _NEEDS_HOST_SYSFS and found.kind == locate.DRIVER_ROOT:
            try:
                on_host = locate.driver_root_on_host(
                    found.root, self.host.root, self.tools.driver_root_on_host
                )
            except locate.HostPathUnknown as exc:
                raise HostError(
                    f"{name} is only in the driver root {found.root}, and it must run in the host root "
                    f"(it changes devices through sysfs, which a driver container's root does not have), "
                    f"but the host's path of the driver root is unknown: {exc}. Name the driver root by "
                    f"its path below the host root (e.g. <host root>/opt/nvidia/driver: nvidia-vgpu-dm "
                    f"--driver-root, --driver-root-ctr-path of nvidia-k8s-vgpu-dm and nvidia-vgpu-dra), "
                    f"or give nvidia-k8s-vgpu-dm its path on the host (--driver-install-dir / "
                    f"DRIVER_INSTALL_DIR: ClusterPolicy hostPaths.driverInstallDir)"
                ) from None
            return self.host.root, [os.path.join(on_host, found.inner.lstrip("/")), *argv[1:]]
        return found.root, [found.inner, *argv[1:]]

    # -- running -----------------------------------------------------------------------------------

    def run(self, argv: list[str], what: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in its root; HostError when it is missing or exceeds the timeout."""
        import subprocess  # off the start-up path: only some applies run programs

        name = what or os.path.basename(argv[0])
        root, cmd = self.command(argv, what)
        try:
            proc = self.host.run(cmd, chroot=root, timeout=self.tools.timeout)
        except FileNotFoundError:
            raise HostError(f"{name} not found (looked for {cmd[0]} in {root})") from None
        except subprocess.TimeoutExpired:
            raise HostError(
                f"{name} did not finish within {self.tools.timeout:g} s and was killed: {' '.join(cmd)}"
            ) from None
        if proc.returncode == _NOT_FOUND and "chroot" in (proc.stderr or ""):
            raise HostError(f"{name} could not be run in {root}: {(proc.stderr or '').strip()}")
        return proc
