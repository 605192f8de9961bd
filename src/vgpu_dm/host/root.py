"""The host-root seam: every read and write of the machine goes through one small object.

On a real host the root is ``/``; tests and the simulator root it at a directory that has the same
shape. Counting reads and writes here lets benchmarks and tests check how much a command touched.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vgpu_dm import log
from vgpu_dm.errors import HostError

if TYPE_CHECKING:
    import subprocess

SIM_MARKER = ".vgpu-dm-sim"
_log = log.get("host")
# Changes this process made to the host (control-file writes, programs run to change it), so that an
# error can say truthfully whether anything was changed.
_changes = 0


def note_change() -> None:
    global _changes
    _changes += 1


def changes_made() -> int:
    return _changes


def reset_changes() -> None:
    """Start counting afresh (each CLI run; tests run many in one process)."""
    global _changes
    _changes = 0


class IOCounters:
    """What a command did to the host, counted (a plain class: no dataclass to make at import)."""

    __slots__ = ("listings", "reads", "state_writes", "writes")

    def __init__(self) -> None:
        self.reads = 0  # files and links read, existence checks
        self.listings = 0  # directories listed
        self.writes = 0  # writes to driver control files
        self.state_writes = 0  # our own files (learned tables, journal)

    def __repr__(self) -> str:
        return (
            f"IOCounters(reads={self.reads}, listings={self.listings}, writes={self.writes}, "
            f"state_writes={self.state_writes})"
        )


class HostRoot:
    """Filesystem access below ``root``; paths are given relative to it (``sys/bus/pci/devices``)."""

    simulated = False

    def __init__(self, root: str | os.PathLike[str] = "/"):
        self.root = os.path.abspath(os.fspath(root))
        self._prefix = self.root.rstrip("/") + "/"  # path() is called for every read
        self.counters = IOCounters()
        # Why this process is in a container while its host root is "/" (set by open_host): then the
        # /proc it sees is the container's, and removals cannot be checked against VMs.
        self.container: str | None = None
        # apply changes GPUs from several threads; counts (and the simulator's "Nth write") stay exact.
        self._count_lock = threading.Lock()

    def _count(self, kind: str) -> int:
        """Add one to ``counters.<kind>``; returns the new value."""
        with self._count_lock:
            value = getattr(self.counters, kind) + 1
            setattr(self.counters, kind, value)
            return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def check_before_changes(self) -> None:
        """Called by apply under the host lock before it reads or plans anything (the simulator checks
        its driver state there); nothing to check on a real host."""

    def path(self, rel: str) -> str:
        return self._prefix + rel.lstrip("/")

    def read_text(self, rel: str) -> str:
        self._count("reads")
        with open(self.path(rel), encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def read_optional(self, rel: str) -> str | None:
        """File text, or None when the file does not exist (sysfs omits optional attributes)."""
        try:
            return self.read_text(rel)
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, data: str) -> None:
        """Write to an existing control file; never creates a file (a typo must not go unnoticed)."""
        self._count("writes")
        note_change()
        _log.debug(f"write {self.path(rel)} <- {data.strip()!r}")
        fd = os.open(self.path(rel), os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def save_state(self, rel: str, data: str) -> None:
        """Atomically replace one of our own state files below the root (write, fsync, rename)."""
        self._count("state_writes")
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def remove_state(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Sorted entries of a directory; empty when it does not exist."""
        self._count("listings")
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def readlink(self, rel: str) -> str | None:
        self._count("reads")
        try:
            return os.readlink(self.path(rel))
        except (FileNotFoundError, OSError):
            return None

    def exists(self, rel: str) -> bool:
        self._count("reads")
        return os.path.lexists(self.path(rel))

    def run(
        self,
        argv: Sequence[str],
        chroot: str | None = None,
        timeout: float = 300,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a host program without a shell, inside ``chroot`` (default: the host root); no chroot
        when that is ``/``. Killed after ``timeout`` seconds (subprocess.TimeoutExpired); while it runs,
        a line every few seconds says what the tool waits for. ``env``: its whole environment (default:
        this process's)."""
        import subprocess  # only apply on some GPUs runs programs; keep it off the start-up path
        import time

        from vgpu_dm.waiting import PROGRESS_EVERY

        cmd = list(argv)
        chroot = os.path.abspath(chroot) if chroot else self.root
        if chroot != "/":
            cmd = ["chroot", chroot, *cmd]
        _log.debug(f"run {cmd}")
        stdin = subprocess.PIPE if input is not None else None
        pipe = subprocess.PIPE
        start = time.monotonic()
        with subprocess.Popen(cmd, stdin=stdin, stdout=pipe, stderr=pipe, text=True, env=env) as proc:
            feed = input
            try:
                while True:
                    left = start + timeout - time.monotonic()
                    try:
                        out, err = proc.communicate(feed, timeout=max(0.0, min(PROGRESS_EVERY, left)))
                        break
                    except subprocess.TimeoutExpired as exc:
                        feed = None  # already handed over; a retry must not send it again
                        waited = time.monotonic() - start
                        if waited >= timeout:
                            raise subprocess.TimeoutExpired(cmd, timeout, exc.output, exc.stderr) from None
                        _log.info(
                            f"still waiting for {os.path.basename(argv[0])} after {waited:.0f} s "
                            f"(it is killed after {timeout:g} s)"
                        )
            except BaseException:
                proc.kill()  # as subprocess.run does: no program outlives a timeout or an interrupt
                proc.communicate()
                raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def own_program(self, name: str) -> str | None:
        """``name`` found on this process's own PATH (the container image's) when this process does not
        run in the host root itself; None on the host (its programs are the host's)."""
        if self.root == "/":
            return None
        import shutil

        return shutil.which(name)

    def spawn(
        self, argv: Sequence[str], env: dict[str, str], workdir: str | None = None
    ) -> subprocess.Popen[str]:
        """Start a program of the host (a hook) in its own session, inside the host root, with exactly
        ``env`` and in ``workdir`` (a directory of the host); stdout and stderr merged into one pipe.
        A ``workdir`` that is not a directory raises WorkdirError before anything starts."""
        import subprocess

        if workdir and not os.path.isdir(self.workdir_path(workdir)):
            import errno

            raise WorkdirError(errno.ENOENT, os.strerror(errno.ENOENT), workdir)
        cmd, cwd = self._spawn_command(list(argv), workdir)
        _log.debug(f"spawn {cmd} (cwd {cwd or '-'})")
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

    def workdir_path(self, workdir: str) -> str:
        """Where a hook's ``workdir`` (a directory of the host) is, as this process sees it."""
        return self.path(workdir)

    def _spawn_command(self, argv: list[str], workdir: str | None) -> tuple[list[str], str | None]:
        """The command line that runs ``argv`` inside the host root, and the directory to start it in."""
        if self.root == "/":
            return argv, workdir
        import shutil

        # Our own PATH finds chroot (the hook's env may not); inside, sh changes to the workdir and
        # execs the program with its arguments as they are (nothing is parsed by the shell).
        chroot = shutil.which("chroot") or "chroot"
        if workdir:
            return [
                chroot,
                self.root,
                "/bin/sh",
                "-c",
                'cd "$1" && shift && exec "$@"',
                "sh",
                workdir,
                *argv,
            ], None
        return [chroot, self.root, *argv], None


class WorkdirError(OSError):
    """A hook's working directory does not exist (or is no directory) where the hook runs."""


class NotAHostRoot(HostError):
    """The directory given as the host root cannot be one (no sysfs, or a simulated host); a usage
    error for the front ends, which know which option or variable named it."""


def open_host(root: str = "/") -> HostRoot:
    """The real host rooted at ``root``, after checking that it looks like one.

    A simulated host is chosen by the front ends (cli, k8s), which import the simulator: this layer
    never does.
    """
    host = HostRoot(root or "/")
    if not os.path.isdir(host.path("sys/bus/pci/devices")):
        where = host.path("sys/bus/pci/devices")
        raise NotAHostRoot(
            f"{where} does not exist: {host.root} is not the root of a Linux host "
            f"(in a container, mount the host's / there, or at least its /sys, /proc and /run)"
        )
    if os.path.exists(os.path.join(host.root, SIM_MARKER)):
        raise NotAHostRoot(
            f"{host.root} is a simulated host (made by 'nvidia-vgpu-dm sim create'); "
            f"select it with --sim {host.root} or VGPU_DM_SIM={host.root}"
        )
    if host.root == "/":
        from vgpu_dm.host.container import container_reason

        host.container = container_reason()
        if host.container:
            _log.warning(
                f"running in a container ({host.container}) with host root /: the container's /proc shows "
                f"no VMs, and the lock, journal and learned type tables would live in the container; "
                f"mount the host's / (e.g. at /host) and pass --host-root /host"
            )
    return host
