"""Running ``nvidia-mig-parted`` on the host: through the host-root object (so a simulated host answers
for a real one), never through a shell, with the config on standard input (``-f -``), so no temp file
has to exist inside whatever root the program runs in.
"""

from __future__ import annotations

import subprocess
from typing import Any

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig.translate import dump

DEFAULT_MIG_PARTED = "nvidia-mig-parted"
_log = log.get("mig")


class MigPartedMissing(HostError):
    """nvidia-mig-parted is not installed where we were told to find it."""


def output(proc: subprocess.CompletedProcess[str]) -> str:
    """What a run printed, stdout then stderr, without blank lines."""
    text = "\n".join(part.strip() for part in (proc.stdout or "", proc.stderr or "") if part.strip())
    return text or f"(no output, exit {proc.returncode})"


class MigParted:
    """One mig-parted binary, used with configs selected by name."""

    def __init__(self, host: HostRoot, path: str = DEFAULT_MIG_PARTED):
        self.host = host
        self.path = path

    def run(
        self, verb: str, config: dict[str, Any] | None = None, *flags: str
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.path, verb]
        text = None
        if config is not None:
            (name,) = config["mig-configs"]
            argv += ["-f", "-", "-c", name]
            text = dump(config)
        argv += list(flags)
        try:
            proc = self.host.run(argv, input=text)
        except FileNotFoundError:
            raise MigPartedMissing(f"{self.path} not found") from None
        if proc.returncode == 127:
            # chroot (or the shell of a wrapper) could not find the program.
            raise MigPartedMissing(f"{self.path} not found: {output(proc)}")
        _log.debug(f"nvidia-mig-parted {verb} {' '.join(flags)} -> exit {proc.returncode}: {output(proc)}")
        return proc

    def holds(self, config: dict[str, Any], *flags: str) -> bool:
        """``assert`` passes for ``config``."""
        return self.run("assert", config, *flags).returncode == 0

    def export(self) -> dict[str, Any] | None:
        """The GPUs' current MIG config as mig-parted exports it, or None if that fails."""
        import yaml

        proc = self.run("export")
        if proc.returncode != 0:
            return None
        try:
            data = yaml.safe_load(proc.stdout)
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None
