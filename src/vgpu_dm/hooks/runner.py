"""Running hooks: one session per apply, called by apply at its stage boundaries.

- ``apply-start``: first, under the host lock, whether or not anything will change. Failing, it ends
  the apply before anything is read or written.
- ``pre-change``: once, right before the first change to the host (a journal recovery, the MIG step,
  enabling VFs, the vGPU writes) — never on a run that changes nothing. Failing, it ends the apply
  with zero writes.
- ``post-change``: after the change, whenever ``pre-change`` ran (also when it or the change failed),
  so what ``pre-change`` stopped is started again.
- ``apply-exit``: last, always (also after a failure, and unlike mig-parted also after a failed
  ``apply-start``).

Each hook runs as a program through the host-root object (in the host root, via chroot when that is
not ``/``), without a shell and without our environment: it gets ``PATH`` (unless its ``env`` sets
one), its own ``env``, and the ``VGPU_DM_*`` variables below, which it cannot override. Its standard
output and error go to our log line by line. A hook that outlives its timeout is killed (its whole
process group). A hook list stops at its first failing entry.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable

from vgpu_dm import log
from vgpu_dm.errors import ApplyError, ApplyInterrupted
from vgpu_dm.hooks.spec import APPLY_EXIT, APPLY_START, POST_CHANGE, PRE_CHANGE, Hook, HooksFile
from vgpu_dm.host.pci import GPU
from vgpu_dm.host.root import HostRoot, WorkdirError
from vgpu_dm.waiting import Progress

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUCCESS, UNCHANGED, FAILED, INTERRUPTED = "success", "unchanged", "failed", "interrupted"
MAX_LOGGED_LINES = 1000  # per hook run; more are counted, not logged
MAX_ERROR_ENV = 4096  # characters of the error message passed in VGPU_DM_ERROR
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a hook's process group
POLL = 0.1

_log = log.get("hooks")


class HookFailed(ApplyError):
    """A hook exited non-zero, could not be started, or ran out of time."""


class HookSession:
    """The hooks of one apply run and what they have been told so far."""

    def __init__(
        self,
        hooks: HooksFile,
        host: HostRoot,
        config_file: str = "",
        config_name: str = "",
        stop: threading.Event | None = None,
    ):
        self.hooks = hooks
        self.host = host
        self.config_file = _config_for_hooks(host, config_file)
        self.config_name = config_name
        self.stop = stop
        self.pre_change_ran = False
        self.gpus: dict[str, GPU] = {}  # address → GPU, every GPU this run changes (or tried to)

    # -- stages ----------------------------------------------------------------------------------
    def apply_start(self) -> None:
        self._run_all(APPLY_START, {}, stoppable=True)

    def before_change(self, gpus: Iterable[GPU]) -> None:
        """Call right before changing the host; runs ``pre-change`` the first time only."""
        for gpu in gpus:
            self.gpus.setdefault(gpu.address, gpu)
        if self.pre_change_ran:
            return
        self.pre_change_ran = True
        try:
            self._run_all(PRE_CHANGE, {}, stoppable=True)
        except HookFailed as exc:
            raise HookFailed(
                f"{exc}\nnothing was changed: a pre-change hook failed before the first write"
            ) from None

    def finish(self, result: str, error: BaseException | None = None) -> list[str]:
        """``post-change`` (if ``pre-change`` ran), then ``apply-exit``. Raises HookFailed when one fails
        and the run itself had not failed; after a failed run the hooks' failures are returned, to be
        reported after the run's own error."""
        extra = {"VGPU_DM_RESULT": result}
        if error is not None:
            extra["VGPU_DM_ERROR"] = str(error)[:MAX_ERROR_ENV]
        failures: list[str] = []
        stages = ([POST_CHANGE] if self.pre_change_ran else []) + [APPLY_EXIT]
        for stage in stages:
            try:
                # Clean-up stages run to the end (bounded by their timeouts) even when stopping.
                self._run_all(stage, extra, stoppable=False)
            except HookFailed as exc:
                failures.append(str(exc))
        if failures and error is None:
            changed = result == SUCCESS
            tail = "the vGPU changes were made; only the hook failed" if changed else "nothing was changed"
            raise HookFailed("\n".join([*failures, tail]))
        return failures

    # -- running -----------------------------------------------------------------------------------
    def environment(self, stage: str, hook: Hook, extra: dict[str, str]) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH}
        env.update(hook.env)
        gpus = sorted(self.gpus.values(), key=lambda g: g.index)
        env.update(
            {
                "VGPU_DM_HOOK": stage,
                "VGPU_DM_CONFIG_FILE": self.config_file,
                "VGPU_DM_SELECTED_CONFIG": self.config_name,
                "VGPU_DM_GPUS": " ".join(g.address for g in gpus),
                "VGPU_DM_GPU_INDICES": " ".join(str(g.index) for g in gpus),
            }
        )
        env.update(extra)
        return env

    def _run_all(self, stage: str, extra: dict[str, str], stoppable: bool) -> None:
        hooks = self.hooks.get(stage)
        for number, hook in enumerate(hooks):
            label = f"hook {stage}[{number}]" if len(hooks) > 1 else f"hook {stage}"
            self._run_one(label, hook, self.environment(stage, hook, extra), stoppable)

    def _run_one(self, label: str, hook: Hook, env: dict[str, str], stoppable: bool) -> None:
        import subprocess

        _log.info(f"{label} ({hook.where}): running {hook.describe()}")
        started = time.monotonic()
        try:
            proc = self.host.spawn([hook.command, *hook.args], env, hook.workdir)
        except OSError as exc:
            if isinstance(exc, WorkdirError) or (hook.workdir and exc.filename == hook.workdir):
                chrooted = self.host.root != "/" and not self.host.simulated
                where = f" (in the host root {self.host.root})" if chrooted else ""
                raise HookFailed(
                    f"{label} ({hook.where}): cannot change to its workdir {hook.workdir}{where}: "
                    f"{exc.strerror or exc}"
                ) from None
            raise HookFailed(
                f"{label} ({hook.where}): cannot run {hook.command}: {exc.strerror or exc}"
            ) from None
        tail: list[str] = []
        reader = threading.Thread(
            target=_relay, args=(proc, label, tail), name=f"hook-output-{os.getpid()}", daemon=True
        )
        reader.start()
        deadline = started + hook.timeout
        stopped = timed_out = False
        # A hook may run for minutes without a word (its timeout defaults to 300 s): say how the
        # wait is going, as every other long wait does (waiting.PROGRESS_EVERY).
        progress = Progress(
            lambda waited: _log.info(
                f"still waiting for {label} ({hook.where}) after {waited:.0f} s "
                f"(it is killed after {hook.timeout:g} s)"
            )
        )
        while proc.poll() is None:
            if stoppable and self.stop is not None and self.stop.is_set():
                stopped = True
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(POLL)
            progress.tick()
        if stopped or timed_out:
            _kill_group(proc)
        reader.join(2.0)
        if reader.is_alive():
            _log.warning(f"{label}: processes it left running keep its output open; not waiting for them")
        took = time.monotonic() - started
        said = f"; its last output: {' | '.join(tail)}" if tail else ""
        if stopped:
            raise ApplyInterrupted(f"apply interrupted while {label} ran (killed it); nothing was changed")
        if timed_out:
            raise HookFailed(
                f"{label} ({hook.where}): {hook.describe()} did not finish within {hook.timeout:g} s "
                f"(timeout); killed{said}"
            )
        code = proc.returncode
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise HookFailed(f"{label} ({hook.where}): {hook.describe()} {how}{said}")
        _log.info(f"{label}: done (exit 0, {took:.1f} s)")


def _config_for_hooks(host: HostRoot, config_file: str) -> str:
    """The config file's path as a hook sees it: absolute (the hook has its own working directory);
    under a host root other than / (the hook runs chrooted there) the host's path of the file, or, for
    a file only this container has, the path of a copy written into the host root's run directory."""
    if not config_file or config_file == "<stdin>":
        return config_file
    path = os.path.abspath(config_file)
    if host.root == "/" or host.simulated:
        return path
    inside = os.path.relpath(path, host.root)
    if not inside.startswith(".."):
        return "/" + inside
    from vgpu_dm.state_files import HOOKS_CONFIG_FILE

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            host.save_state(HOOKS_CONFIG_FILE, fh.read())
    except OSError as exc:
        _log.warning(f"hooks get no VGPU_DM_CONFIG_FILE: cannot copy {path} into the host root: {exc}")
        return ""
    return "/" + HOOKS_CONFIG_FILE


def _relay(proc, label: str, tail: list[str]) -> None:
    """Log the hook's output lines as they come; keep its last few for an error message."""
    logged = 0
    dropped = 0
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        tail.append(line)
        del tail[:-5]
        if logged < MAX_LOGGED_LINES:
            _log.info(f"{label}: {line}")
            logged += 1
        else:
            dropped += 1
    if dropped:
        _log.info(f"{label}: … {dropped} more lines not logged")


def _kill_group(proc) -> None:
    """SIGTERM the hook's process group (it runs in its own session), then SIGKILL after a grace."""
    import signal

    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL)
        if proc.poll() is not None:
            # The leader is gone; make sure nothing of its group lingers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
