"""Helpers the benchmark scripts share: timing processes, spreads, and the result rows run_all collects.

Not a benchmark itself (run_all.py runs only ``bench_*.py``).
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
ENTRY_POINT = BIN_DIR / "nvidia-vgpu-dm"
RESULT = "RESULT"  # prefix of the lines run_all.py gathers into its final table


def compile_package() -> None:
    """Write the package's .pyc files, as installing a wheel does.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` (as in this repository's environment)
    would otherwise recompile every module of ours at every start and time the compiler, not us.
    """
    import vgpu_dm

    compileall.compile_dir(os.path.dirname(vgpu_dm.__file__), quiet=1)


def run(argv: list[str], code: int = 0, env: dict[str, str] | None = None) -> float:
    """Wall time of one process, which must exit with ``code``."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != code:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode} (expected {code}):\n{proc.stderr}")
    return elapsed


def interleaved(commands: dict[str, list[str]], runs: int, codes: dict[str, int] | None = None):
    """Wall times of each command over ``runs`` rounds, after one warm-up round; the rounds interleave
    the commands so that load from other processes hits them alike."""
    codes = codes or {}
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for label, argv in commands.items():
        run(argv, codes.get(label, 0))
    for _ in range(runs):
        for label, argv in commands.items():
            samples[label].append(run(argv, codes.get(label, 0)))
    return samples


def spread(samples: list[float]) -> str:
    """``median (p25–p75)`` in milliseconds."""
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return f"{statistics.median(samples) * 1000:.0f} ({q[0] * 1000:.0f}-{q[2] * 1000:.0f})"


def result(figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
    """One row of the final table: what was measured, the figure, the target and whether it was met."""
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    print(f"{RESULT}\t{figure}\t{value}\t{target}\t{verdict}", flush=True)
