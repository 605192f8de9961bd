"""Running ``nvidia-mig-parted`` (v0.15.0 semantics): which one, how, and what it said.

Which one: the program on this process's own PATH when it runs outside the host root — the container
image of the Kubernetes agent carries one, as upstream's image does — with ``LD_PRELOAD`` of the
driver's ``libnvidia-ml.so.1`` found under the driver root (the GPU Operator's driver container), else
under the host root (a driver installed on the host); otherwise the host's own, run in the host root
(``chroot``). ``--mig-parted PATH`` names the host's.

How: through the host-root object (a simulated host answers for a real one), never through a shell,
the config on standard input (``-f -``), in a clean environment (mig-parted reads ``MIG_PARTED_*``
variables such as ``MIG_PARTED_SKIP_RESET`` from it), killed after the tools' timeout.

mig-parted exits 1 for every failure and its ``assert`` says "Assertion failure" even when NVML cannot
load, so nothing here reads a difference from an exit code: the state comes from ``export``.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any, NamedTuple

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.programs import HostTools
from vgpu_dm.host.root import HostRoot

DEFAULT_MIG_PARTED = "nvidia-mig-parted"
# PATH inside the host root: the host's programs, nothing of this process's environment.
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STAMP = re.compile(r'^time="[^"]*" ', re.MULTILINE)
_log = log.get("mig")


class MigPartedMissing(HostError):
    """nvidia-mig-parted (or the NVML library it needs) is not where it was looked for."""


class MigPartedFailed(HostError):
    """nvidia-mig-parted ran and failed; the message carries what it said."""


def output(proc: subprocess.CompletedProcess[str]) -> str:
    """What a run printed, stdout then stderr, without blank lines or log time stamps."""
    parts = (_STAMP.sub("", part).strip() for part in (proc.stdout or "", proc.stderr or ""))
    text = "\n".join(part for part in parts if part)
    return text or f"(no output, exit {proc.returncode})"


def indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


class Command(NamedTuple):
    """How to start mig-parted: the program, the root it runs in (None: the host root), its
    environment, and a description for messages."""

    program: str
    chroot: str | None
    env: dict[str, str]
    where: str


def clean_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` without anything mig-parted (or the dynamic loader) would take as an instruction."""
    return {k: v for k, v in base.items() if not k.startswith("MIG_PARTED_") and k != "LD_PRELOAD"}


def locate(host: HostRoot, tools: HostTools) -> Command:
    """Which mig-parted to run, and how (see the module docstring)."""
    if tools.mig_parted == DEFAULT_MIG_PARTED:
        own = host.own_program(DEFAULT_MIG_PARTED)
        if own:
            from vgpu_dm.host.programs import Programs

            found = Programs(host, tools).nvml  # the driver root first, then the host root
            nvml = found.path
            if nvml is None:
                raise MigPartedMissing(
                    f"this image's {own} needs the driver's {found.name}, which is not under {found.places()}"
                )
            env = clean_env(dict(os.environ))
            env["LD_PRELOAD"] = nvml
            return Command(own, "/", env, f"{own} of this image (LD_PRELOAD={nvml})")
    where = f"{tools.mig_parted}{tools.origin(tools.mig_parted)} in the host root {host.root}"
    return Command(tools.mig_parted, None, {"PATH": HOST_PATH}, where)


class MigParted:
    """One mig-parted program for one host."""

    def __init__(self, host: HostRoot, tools: HostTools | None = None):
        self.host = host
        self.tools = tools or HostTools()
        self._command: Command | None = None

    @property
    def command(self) -> Command:
        if self._command is None:
            self._command = locate(self.host, self.tools)
            _log.debug(f"nvidia-mig-parted: {self._command.where}")
        return self._command

    def run(
        self, verb: str, config: dict[str, Any] | None = None, *flags: str
    ) -> subprocess.CompletedProcess[str]:
        """Run one command; MigPartedMissing when the program is not there, HostError on a timeout."""
        from vgpu_dm.mig.translate import dump

        command = self.command
        argv = [command.program, verb]
        text = None
        if config is not None:
            (name,) = config["mig-configs"]
            argv += ["-f", "-", "-c", name]
            text = dump(config)
        argv += list(flags)
        try:
            proc = self.host.run(
                argv, chroot=command.chroot, timeout=self.tools.timeout, input=text, env=command.env
            )
        except FileNotFoundError:
            raise MigPartedMissing(f"{command.where}: not found") from None
        except subprocess.TimeoutExpired:
            raise HostError(
                f"nvidia-mig-parted {verb} did not finish within {self.tools.timeout:g} s and was killed"
            ) from None
        if proc.returncode == 127:
            # chroot (or the shell of a wrapper) could not find the program.
            raise MigPartedMissing(f"{command.where}: not found ({output(proc)})")
        _log.debug(f"nvidia-mig-parted {verb} {' '.join(flags)} -> exit {proc.returncode}: {output(proc)}")
        return proc

    def export(self) -> dict[str, Any]:
        """The GPUs' MIG state as ``export`` prints it (parsed YAML); MigPartedFailed when it fails."""
        import yaml

        proc = self.run("export")
        if proc.returncode != 0:
            raise MigPartedFailed(
                f"nvidia-mig-parted export failed (exit {proc.returncode}):\n{indent(output(proc))}"
            )
        try:
            data = yaml.safe_load(proc.stdout)
        except yaml.YAMLError as exc:
            raise MigPartedFailed(
                f"nvidia-mig-parted export printed something that is not YAML: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise MigPartedFailed(
                f"nvidia-mig-parted export printed no config: {proc.stdout.strip()[:200]!r}"
            )
        return data

    def apply(self, config: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
        """``apply`` the config; MigPartedFailed with its output when it exits non-zero."""
        proc = self.run("apply", config, *flags)
        if proc.returncode != 0:
            what = " ".join(("nvidia-mig-parted apply", *flags))
            raise MigPartedFailed(f"{what} failed (exit {proc.returncode}):\n{indent(output(proc))}")
        return proc
