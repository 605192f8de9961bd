"""Running the driver's programs (nvidia-smi, sriov-manage): where they live and how long they may take.

With the GPU Operator's containerised vGPU manager they are not on the host's ``/`` but under the
driver root (``/run/nvidia/driver`` on the host), so they run through ``chroot <driver root>``; by
default the driver root is the host root. A program that hangs is killed after a timeout and reported
as a HostError, like a missing one, so callers roll back instead of dying with a traceback.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm.errors import HostError
from vgpu_dm.host.root import HostRoot

if TYPE_CHECKING:
    import subprocess

    from vgpu_dm.host.smi import NvidiaSmi

DEFAULT_SRIOV_MANAGE = "/usr/lib/nvidia/sriov-manage"
DEFAULT_TIMEOUT = 120.0
# coreutils chroot exits 127 when the command cannot be found inside the new root.
_NOT_FOUND = 127


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class HostTools(NamedTuple):
    """Where the driver's programs are, as plain values (the CLI and the Kubernetes agent fill it).

    ``driver_root`` is a directory as this process sees it (``/host/run/nvidia/driver`` in a container
    with the host's ``/`` at ``/host``); None means the host root. The program paths are inside it.
    """

    sriov_manage: str = DEFAULT_SRIOV_MANAGE
    nvidia_smi: str = "nvidia-smi"
    mig_parted: str = "nvidia-mig-parted"
    driver_root: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds any one program may run before it is killed
    unbind_pause: float = 2.0  # between sriov-manage retries after "Cannot obtain unbindLock"
    vf_wait: float = 30.0  # how long the VFs' nvidia/ directories may take to appear after sriov-manage


class Programs:
    """Runs the driver's programs for one host, inside the driver root."""

    def __init__(self, host: HostRoot, tools: HostTools):
        self.host = host
        self.tools = tools
        self._smi: NvidiaSmi | None = None

    @property
    def smi(self) -> NvidiaSmi:
        """nvidia-smi in this driver root (its module is imported on first use: assert never runs it)."""
        if self._smi is None:
            from vgpu_dm.host.smi import NvidiaSmi

            self._smi = NvidiaSmi(self)
        return self._smi

    @property
    def root(self) -> str:
        return os.path.abspath(self.tools.driver_root) if self.tools.driver_root else self.host.root

    def where(self, program: str) -> str:
        """The path of ``program`` as this process sees it (for messages and existence checks)."""
        return os.path.join(self.root, program.lstrip("/"))

    def exists(self, program: str) -> bool:
        return os.path.exists(self.where(program))

    def run(self, argv: list[str], what: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the driver root; HostError when it is missing or exceeds the timeout."""
        import subprocess  # off the start-up path: only some applies run programs

        name = what or os.path.basename(argv[0])
        try:
            proc = self.host.run(argv, chroot=self.root, timeout=self.tools.timeout)
        except FileNotFoundError:
            raise HostError(
                f"{name} not found (looked for {argv[0]} in the driver root {self.root})"
            ) from None
        except subprocess.TimeoutExpired:
            raise HostError(
                f"{name} did not finish within {self.tools.timeout:g} s and was killed: {' '.join(argv)}"
            ) from None
        if proc.returncode == _NOT_FOUND and "chroot" in (proc.stderr or ""):
            raise HostError(
                f"{name} not found in the driver root {self.root} ({(proc.stderr or '').strip()}); "
                f"pass --driver-root (GPU Operator: the host's /run/nvidia/driver) or --{name} PATH"
            )
        return proc
