"""Fault injection for the simulated host: fail the Nth control-file write with an errno, make reads
of matching paths fail with EIO, SIGKILL the tool right before its Nth write, send it a catchable
signal (SIGTERM, as systemd and Kubernetes do to stop it) right before chosen writes, make
nvidia-mig-parted fail, or make a host program hang.

Faults live in ``.vgpu-dm-sim/faults.json`` and count the writes of each tool process separately, so a
test can arm a fault and then run the CLI as a separate process.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import asdict, dataclass, field

from vgpu_dm.errors import HostError
from vgpu_dm.host.root import SIM_MARKER
from vgpu_dm.sim.files import FAULTS_FILE


@dataclass
class Faults:
    fail_write: int = 0  # 1-based position of the write that fails; 0 = none
    fail_errno: int = errno.EIO
    kill_at_write: int = 0  # SIGKILL the process right before this write; 0 = none
    # SIGKILL the process right after this write took effect (the driver made the device, the tool never
    # learnt it): the crash window between a change and the tool's own record of it; 0 = none.
    kill_after_write: int = 0
    eio_reads: list[str] = field(default_factory=list)  # substrings of paths whose reads fail
    signal_at_writes: list[int] = field(default_factory=list)  # send signal_number before these writes
    signal_number: int = signal.SIGTERM
    # nvidia-mig-parted (simulated or real): "nvml" = NVML cannot be initialised (every call fails),
    # "reset" = its GPU reset fails (a mode change stays pending), "apply" = apply fails after its mode
    # step, before the instances; "" = works.
    mig_parted: str = ""
    hang: list[str] = field(default_factory=list)  # programs that never return (killed by the timeout)
    unbind_lock_failures: int = 0  # sriov-manage -e fails this many times with "Cannot obtain unbindLock"
    sriov_no_vfs: bool = False  # sriov-manage -e exits 0 but makes no VFs (SR-IOV off in the BIOS)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Faults:
        try:
            with open(os.path.join(root, SIM_MARKER, FAULTS_FILE)) as fh:
                text = fh.read()
        except FileNotFoundError:
            return cls()
        import json

        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            path = os.path.join(root, SIM_MARKER, FAULTS_FILE)
            raise HostError(
                f"the simulator's fault file {path} is corrupt ({exc}); clear it with 'sim fault'"
            ) from None

    def save(self, root: str | os.PathLike[str]) -> None:
        import json

        with open(os.path.join(root, SIM_MARKER, FAULTS_FILE), "w") as fh:
            fh.write(json.dumps(asdict(self)))

    def before_write(self, position: int, path: str) -> None:
        """Called before the tool's ``position``-th write (1-based) is carried out."""
        if self.kill_at_write and position == self.kill_at_write:
            os.kill(os.getpid(), signal.SIGKILL)
        if position in self.signal_at_writes:
            # The handler runs at the next bytecode boundary, i.e. while this write is under way: the
            # tool must still carry it out and only then stop.
            os.kill(os.getpid(), self.signal_number)
        if self.fail_write and position == self.fail_write:
            raise OSError(self.fail_errno, f"{os.strerror(self.fail_errno)} (injected fault)", path)

    def after_write(self, position: int) -> None:
        """Called once the ``position``-th write (1-based) was carried out."""
        if self.kill_after_write and position == self.kill_after_write:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_read(self, path: str) -> None:
        if any(pattern in path for pattern in self.eio_reads):
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected fault)", path)
