"""SimHostRoot: the host-root seam over a simulated tree; writes to driver control files are emulated."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vgpu_dm import log
from vgpu_dm.host.root import SIM_MARKER, HostRoot, NotAHostRoot, note_change
from vgpu_dm.sim.files import DRIVER_LOCK, FAULTS_FILE, LATENCY_FILE, STATE_FILE, UDEV_QUEUE_FILE, WRITE_LOG

if TYPE_CHECKING:
    from pathlib import Path
    from subprocess import CompletedProcess

    from vgpu_dm.sim.faults import Faults
    from vgpu_dm.sim.latency import WriteLatency

# The driver emulation (and pathlib, json, the catalog), the fault and the latency settings are
# imported only when a write, a program run or an armed fault needs them: a read-only command such as
# assert on a simulated host costs no more start-up than on a real one.

_log = log.get("sim")


class SimHostRoot(HostRoot):
    simulated = True

    def __init__(self, root: str | os.PathLike[str]):
        super().__init__(root)
        marker = os.path.join(self.root, SIM_MARKER)
        if not os.path.isfile(os.path.join(marker, STATE_FILE)):
            raise NotAHostRoot(
                f"{self.root} is not a simulated host; create one with "
                f"'nvidia-vgpu-dm sim create {self.root} --gpu T4'"
            )
        self._dying = threading.Event()  # set when an injected SIGKILL is about to end the process
        # Armed faults and latency are read now, as before any command reads the host (a 'sim fault'
        # given while a command runs does not change it); without their files the defaults are made
        # on first use.
        self._faults: Faults | None = None
        self._latency: WriteLatency | None = None
        if os.path.exists(os.path.join(marker, FAULTS_FILE)):
            from vgpu_dm.sim.faults import Faults

            self._faults = Faults.load(self.root)
        if os.path.exists(os.path.join(marker, LATENCY_FILE)):
            from vgpu_dm.sim.latency import WriteLatency

            self._latency = WriteLatency.load(self.root)
        self._unbind_failures = 0
        self._held_while_dying = None  # the driver lock, taken for good by an injected SIGKILL

    def own_program(self, name: str) -> str | None:
        """The simulated tool runs on the host itself: its programs are the host's."""
        return None

    @property
    def faults(self) -> Faults:
        if self._faults is None:
            from vgpu_dm.sim.faults import Faults

            self._faults = Faults()
        return self._faults

    @property
    def latency(self) -> WriteLatency:
        if self._latency is None:
            from vgpu_dm.sim.latency import WriteLatency

            self._latency = WriteLatency()
        return self._latency

    def check_before_changes(self) -> None:
        """A corrupt driver state would first show at a write, after the journal is written: check it
        before anything is planned. Reads never need it."""
        from vgpu_dm.sim.layout import SimState

        SimState.load(self.root)

    @property
    def base(self) -> Path:
        from pathlib import Path

        return Path(self.root)

    def read_text(self, rel: str) -> str:
        if self._faults is not None:
            self._faults.before_read(rel)
        return super().read_text(rel)

    def _locked(self, shared: bool = False):
        """The simulated driver's lock (one change of its state at a time, across processes; ``shared``
        for a query, which many may run at once).

        Opened read-write where it can be: on NFS, flock is done as a POSIX byte-range lock, and an
        exclusive one on a file opened read-only fails with EBADF. Read-only only where the host is (a
        read-only mount or no write permission), so that it can still be read: a real host's
        nvidia-smi queries need no write access to anything either.
        """
        import fcntl

        path = os.path.join(self.root, SIM_MARKER, DRIVER_LOCK)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            # A host made before the lock file was: make it (this is a write, so the host is writable).
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd = os.open(path, os.O_RDONLY)
        fh = os.fdopen(fd, "rb")
        fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        return fh

    def write_text(self, rel: str, data: str) -> None:
        position = self._count("writes")
        note_change()
        _log.debug(f"write {self.path(rel)} <- {data.strip()!r} (simulated)")
        if self._dying.is_set():
            threading.Event().wait()  # the process is being killed: this thread never writes again
        if self.faults.kill_at_write == position:
            # The process dies at this write. Other threads start no new write, and a write one of
            # them has inside the driver completes first, as a system call would: take the driver
            # lock so that no emulated write is cut in half.
            self._dying.set()
            # Kept until the process dies: a dropped handle would close the file, releasing the lock
            # before the SIGKILL, and another thread's emulated write could then be cut in half.
            self._held_while_dying = self._locked()
        self.faults.before_write(position, self.path(rel))
        with open(os.path.join(self.root, SIM_MARKER, WRITE_LOG), "a") as log:
            log.write(f"{rel}\t{data.strip()}\n")
        from vgpu_dm.sim import driver

        latency = self._latency
        serial = bool(latency and latency.serial)
        delay = latency.seconds_for(rel, data) if latency else 0.0
        if delay and not serial:
            time.sleep(delay)  # the driver's work, outside the simulator's lock: other GPUs proceed
        lock = self._locked()
        try:
            if delay and serial:
                time.sleep(delay)
            self._udev_catches_up()
            pending = self._emulate(rel, data)
            if pending is not None and pending.host_wide:
                # held_remove_blocks=host: a driver that keeps its host-wide lock across the wait, so
                # every other write waits as well.
                driver.wait_released(self.base, pending.nodes)
                self._finish_remove(pending)
        finally:
            lock.close()
        if pending is not None and not pending.host_wide:
            # The kernel's wait blocks this device only (mdev_device_remove holds its parent's
            # unreg_sem for reading): wait outside the simulator's lock, then finish under it. No new
            # open can start meanwhile (vfio_unregister_group_dev), so the holders only go away.
            driver.wait_released(self.base, pending.nodes)
            lock = self._locked()
            try:
                self._finish_remove(pending)
            finally:
                lock.close()
        if self._faults is not None:
            self._faults.after_write(position)

    def _udev_catches_up(self) -> None:
        """Queued udev events (sim/mdevctl.py, ``later``) are handled by now: mdevctl's creates land
        right before this write, as they may on a host where nobody waited for udev."""
        if os.path.exists(os.path.join(self.root, SIM_MARKER, UDEV_QUEUE_FILE)):
            from vgpu_dm.sim.mdevctl import handle_udev_queue

            for line in handle_udev_queue(self.base):
                _log.debug(f"udev (simulated): {line}")

    def _finish_remove(self, pending) -> None:
        from vgpu_dm.sim import driver
        from vgpu_dm.sim.layout import SimState

        driver.finish_mdev_remove(self.base, SimState.load(self.base), pending.uuid)

    def finish_released_removes(self) -> None:
        """Finish held removes whose VMs are gone but whose remover died waiting (a simulated process
        can be killed there; a real one sleeps in the kernel until the VM lets go)."""
        from vgpu_dm.sim import driver
        from vgpu_dm.sim.layout import SimState

        lock = self._locked()
        try:
            state = SimState.load(self.base)
            if any(g.removing for g in state.gpus):
                driver.finish_released(self.base, state)
        finally:
            lock.close()

    def _emulate(self, rel: str, data: str):
        """Carry out one control-file write; returns the PendingRemove of an mdev remove that must
        wait for a VM, else None."""
        from pathlib import Path

        from vgpu_dm.sim import driver
        from vgpu_dm.sim.layout import SimState

        full = self.path(rel)
        if not os.path.lexists(full):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), full)
        real = Path(os.path.realpath(full))
        parts = real.relative_to(self.base).parts
        state = SimState.load(self.base)
        if any(g.removing for g in state.gpus):
            driver.finish_released(self.base, state)
        if len(parts) >= 4 and parts[-1] == "create" and parts[-3] == "mdev_supported_types":
            type_id = driver.type_id_of_dir(parts[-2])
            driver.mdev_create(self.base, state, parts[-4], type_id, data, full)
        elif len(parts) >= 3 and parts[-1] == "remove" and driver.UUID_RE.fullmatch(parts[-2]):
            return driver.mdev_remove(self.base, state, parts[-3], parts[-2], data, full)
        elif len(parts) >= 3 and parts[-1] == "current_vgpu_type" and parts[-2] == "nvidia":
            from vgpu_dm.sim.vfio_driver import set_vgpu_type

            set_vgpu_type(self.base, state, parts[-3], data, full)
        else:
            raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)} (read-only attribute)", full)

    def run(
        self,
        argv: Sequence[str],
        chroot: str | None = None,
        timeout: float = 300,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> CompletedProcess[str]:
        """Stand in for the host programs the tool runs: sriov-manage, nvidia-smi, nvidia-mig-parted,
        systemctl, reboot and udevadm settle.

        As ``chroot DIR prog`` would, it finds the program inside ``chroot`` (default: the host root) —
        the stand-in files ``sim create`` put in the driver root and on the host — and exits 127 when it
        is not there. nvidia-mig-parted is the real binary when ``VGPU_DM_SIM_MIG_PARTED`` names it and
        the host's MIG GPUs are models it knows (sim/mig_mock.py), else the simulated one.
        """
        import subprocess
        from pathlib import Path

        from vgpu_dm.sim import vfio_driver
        from vgpu_dm.sim.layout import SimState

        CompletedProcess = subprocess.CompletedProcess
        program = os.path.basename(argv[0])
        _log.debug(f"run {list(argv)} (simulated)")
        inside = Path(os.path.abspath(chroot)) if chroot else self.base
        if argv[0].startswith("/"):
            candidates = [inside / argv[0].lstrip("/")]
        else:
            candidates = [
                inside / d / argv[0]
                for d in ("usr/local/bin", "usr/bin", "bin", "usr/sbin", "sbin", "usr/lib/nvidia")
            ]
        if program in ("nvidia-smi", "sriov-manage", "nvidia-mig-parted") and not any(
            c.is_file() for c in candidates
        ):
            err = f"chroot: failed to run command '{argv[0]}': No such file or directory\n"
            return CompletedProcess(list(argv), 127, "", err)
        if program in self.faults.hang or (len(argv) > 1 and f"{program} {argv[1]}" in self.faults.hang):
            raise subprocess.TimeoutExpired(list(argv), timeout)  # killed by the caller's timeout
        # nvidia-smi's queries (-q, vgpu -s -v) change nothing: they share the lock, as readers.
        query = program == "nvidia-smi" and (argv[1:2] == ["-q"] or argv[1:4] == ["vgpu", "-s", "-v"])
        lock = self._locked(shared=query)
        try:
            state = SimState.load(self.base)
            if program == "sriov-manage" and not (inside / "sys/bus/pci/devices").is_dir():
                # The GPU Operator's driver container publishes its root without /sys (design.md,
                # "Three roots"): chrooted there, sriov-manage cannot see or change any device.
                return self._sriov_without_sysfs(argv, inside, state)
            if program in ("systemctl", "reboot"):
                from vgpu_dm.sim import services

                return services.run(self.base, list(argv))
            if program == "udevadm" and argv[1:2] == ["settle"]:
                from vgpu_dm.sim.mdevctl import handle_udev_queue

                # Returns once udev has handled every queued event, mdevctl's RUN programs included.
                for line in handle_udev_queue(self.base):
                    _log.debug(f"udev (simulated): {line}")
                return CompletedProcess(list(argv), 0, "", "")
            if program == "nvidia-mig-parted":
                from vgpu_dm.sim import mig_mock, mig_parted

                if mig_mock.binary() and mig_mock.usable(state):
                    return mig_mock.run(self.base, state, list(argv), input, timeout)
                return mig_parted.run(self.base, list(argv), input, env={})
            if program == "sriov-manage":
                if argv[1:2] == ["-e"] and self._unbind_failures < self.faults.unbind_lock_failures:
                    # The rebind needs the driver's unbind lock, which an NVML client may hold for a while.
                    self._unbind_failures += 1
                    return CompletedProcess(list(argv), 1, "", f"Cannot obtain unbindLock for {argv[-1]}\n")
                return vfio_driver.sriov_manage(self.base, state, list(argv), no_vfs=self.faults.sriov_no_vfs)
            if program == "nvidia-smi":
                return vfio_driver.nvidia_smi(self.base, state, list(argv))
        finally:
            lock.close()
        raise FileNotFoundError(errno.ENOENT, f"{program}: not available on the simulated host", argv[0])

    # Hooks on a simulated host run on this machine as they are: the simulated tree is no root
    # filesystem to chroot into (the real host root runs them through chroot, see HostRoot.spawn).
    def workdir_path(self, workdir: str) -> str:
        return workdir

    def _spawn_command(self, argv: list[str], workdir: str | None) -> tuple[list[str], str | None]:
        _log.debug("simulated host: the hook runs on this machine, not chrooted")
        return argv, workdir

    def _sriov_without_sysfs(self, argv: Sequence[str], inside: Path, state) -> CompletedProcess[str]:
        """sriov-manage in a root without sysfs: nothing changes; it fails, or (an unknown the
        simulator keeps configurable: option ``sriov_manage_without_sysfs``) exits 0 all the same."""
        import subprocess

        _log.debug(f"run {list(argv)} in {inside}: that root has no sysfs (simulated)")
        if state.options.get("sriov_manage_without_sysfs") == "noop":
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        err = f"{inside}/sys/bus/pci/devices: No such file or directory (simulated: this root has no sysfs)\n"
        return subprocess.CompletedProcess(list(argv), 1, "", err)


def write_log(root: str | os.PathLike[str]) -> list[str]:
    """Every write the tool made to the simulated host, oldest first (``path<TAB>data``)."""
    try:
        with open(os.path.join(root, SIM_MARKER, WRITE_LOG)) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []
