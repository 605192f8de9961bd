"""Shared fixtures: run the CLI in-process or as the installed entry point, and make simulated hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from vgpu_dm.cli.main import main
from vgpu_dm.sim.host import write_log
from vgpu_dm.sim.layout import create_host

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
ENTRY_POINT = Path(sys.executable).parent / "nvidia-vgpu-dm"
# Names the real nvidia-mig-parted (shared/mig-parted-mock) that simulated hosts delegate to; `make test`
# sets it. It is the test machine's, not a setting of the command under test, so the CLI fixtures keep it.
MIG_PARTED_ENV = "VGPU_DM_SIM_MIG_PARTED"


def _ours(key: str) -> bool:
    """An environment variable of the command under test (cleared before each run)."""
    return key.startswith("VGPU_DM_") and key != MIG_PARTED_ENV


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_mig_parted() -> str:
    """The real nvidia-mig-parted binary, or skip (fail under CI=true) saying how to get it."""
    path = os.environ.get(MIG_PARTED_ENV, "")
    if path and os.access(path, os.X_OK):
        return path
    reason = (
        f"{MIG_PARTED_ENV} does not name an executable nvidia-mig-parted ({path or 'unset'}): `make test` "
        f"unpacks ../shared/mig-parted-mock/nvidia-mig-parted.xz into .mig-parted/ and sets it"
    )
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def real_mig_parted(monkeypatch) -> str:
    """Simulated hosts answer nvidia-mig-parted calls with the real binary (skip/fail without it)."""
    path = require_mig_parted()
    monkeypatch.setenv(MIG_PARTED_ENV, path)
    return path


@pytest.fixture(params=["real", "simulated"])
def mig_parted(request, monkeypatch) -> str:
    """Run the test against the real nvidia-mig-parted and against the simulated one."""
    if request.param == "real":
        monkeypatch.setenv(MIG_PARTED_ENV, require_mig_parted())
    else:
        monkeypatch.delenv(MIG_PARTED_ENV, raising=False)
    return request.param


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``nvidia-vgpu-dm ARGS`` in this process; optional ``stdin`` text."""

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
        for key in [k for k in os.environ if _ours(k)]:
            monkeypatch.delenv(key)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if stdin is not None:
            import io

            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def run_cli():
    """Run the installed ``nvidia-vgpu-dm`` entry point as a separate process."""

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
        base = {k: v for k, v in os.environ.items() if not _ours(k)}
        base.update(env or {})
        proc = subprocess.run(
            [str(ENTRY_POINT), *args], input=stdin, capture_output=True, text=True, env=base, timeout=120
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def workdir(tmp_path: Path):
    """A scratch directory on tmpfs when there is one (simulated hosts are thousands of small files)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="vgpu-dm-test-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture
def sim_host(tmp_path):
    """Factory: ``sim_host("T4", "T4")`` creates a simulated host and returns its directory."""
    counter = iter(range(1000))

    def make(*gpus: str, vendor_vfio: bool | None = None, mixed_size: bool = True) -> Path:
        root = tmp_path / f"host{next(counter)}"
        create_host(root, list(gpus), vendor_vfio=vendor_vfio, mixed_size=mixed_size)
        return root

    return make


def writes(root: Path) -> list[str]:
    """The writes made to a simulated host's control files so far."""
    return write_log(root)
