"""Benchmark: cost of ``assert`` and of a no-op ``apply`` on simulated T4 hosts of 1, 8 and 16 GPUs.

For each host size (every GPU fully populated with 16 x T4-1Q first) it prints

* wall time of the installed ``nvidia-vgpu-dm assert`` and no-op ``apply`` next to ``python -c pass``
  (the interpreter start-up floor), as the median of interleaved runs;
* host reads and writes per command, counted in-process on the host-root seam with the functions the
  CLI calls (Inventory, build_plan, execute);
* for a changing apply (16 x T4-1Q -> 8 x T4-2Q on every GPU) the writes made, checked to equal
  removed + created devices.

Run: ``.venv/bin/python bench/bench_host.py`` (about 30 s). Exits 1 if a check fails.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgpu_dm.apply import apply_config, execute
from vgpu_dm.host.inventory import Inventory
from vgpu_dm.plan import build_plan
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import create_host
from vgpu_dm.spec import load_spec

ENTRY_POINT = Path(sys.executable).parent / "nvidia-vgpu-dm"
SIZES = (1, 8, 16)
RUNS = 5
CONFIG = """\
version: v1
vgpu-configs:
  full:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-1Q": 16}
  change:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-2Q": 8}
"""


def entries(name: str):
    return load_spec(CONFIG, "bench.yaml").select(name)[1]


def run(argv: list[str]) -> float:
    """Wall time of one process; it must exit 0."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return elapsed


def wall_times(root: Path, cfg: Path) -> dict[str, float]:
    """Median wall time per command, runs interleaved so drift hits every command alike."""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "assert": [str(ENTRY_POINT), "assert", "--sim", str(root), "-f", str(cfg), "-c", "full"],
        "apply (no-op)": [str(ENTRY_POINT), "apply", "--sim", str(root), "-f", str(cfg), "-c", "full"],
    }
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(RUNS):
        for label, argv in commands.items():
            samples[label].append(run(argv))
    return {label: statistics.median(times) for label, times in samples.items()}


def counted_assert(root: Path) -> tuple[int, int, bool]:
    """(reads, writes, holds) of what ``assert`` does: inventory and plan."""
    host = SimHostRoot(root)
    plan = build_plan(entries("full"), Inventory(host), "bench.yaml")
    return host.counters.reads, host.counters.writes, plan.is_noop


def counted_apply(root: Path, name: str) -> tuple[int, int, int, int]:
    """(reads, writes, removed, created) of what ``apply`` does: inventory, plan, execute."""
    host = SimHostRoot(root)
    inventory = Inventory(host)
    plan = build_plan(entries(name), inventory, "bench.yaml")
    if not plan.is_noop:
        execute(plan, inventory)
    removed = sum(len(gp.remove) for gp in plan.gpus)
    created = sum(len(gp.create) for gp in plan.gpus)
    return host.counters.reads, host.counters.writes, removed, created


def main() -> int:
    if not ENTRY_POINT.exists():
        print(f"installed entry point not found: {ENTRY_POINT}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    try:
        cfg = work / "bench.yaml"
        cfg.write_text(CONFIG)
        print("nvidia-vgpu-dm on simulated T4 hosts, every GPU populated with 16 x T4-1Q")
        print(
            f"wall time: median of {RUNS} interleaved runs of the installed entry point ({ENTRY_POINT.name})"
        )
        print()
        head = (
            f"{'GPUs':>4} {'vGPUs':>5}  {'python -c pass':>14} {'assert':>8} {'apply no-op':>11}"
            f"  {'assert reads/writes':>19} {'apply no-op reads/writes':>24}"
        )
        print(head)
        print("-" * len(head))
        changes = []
        for size in SIZES:
            root = work / f"t4x{size}"
            create_host(root, ["T4"] * size)
            apply_config(entries("full"), SimHostRoot(root), source="bench.yaml")
            times = wall_times(root, cfg)
            a_reads, a_writes, holds = counted_assert(root)
            p_reads, p_writes, p_removed, p_created = counted_apply(root, "full")
            if not holds:
                failures.append(f"{size} GPUs: assert does not hold on the populated host")
            if a_writes or p_writes or p_removed or p_created:
                failures.append(f"{size} GPUs: a no-op made writes (assert {a_writes}, apply {p_writes})")
            print(
                f"{size:>4} {16 * size:>5}  {times['python -c pass'] * 1000:>12.0f}ms"
                f" {times['assert'] * 1000:>6.0f}ms {times['apply (no-op)'] * 1000:>9.0f}ms"
                f"  {f'{a_reads}/{a_writes}':>19} {f'{p_reads}/{p_writes}':>24}"
            )
            change_start = time.perf_counter()
            c_reads, c_writes, c_removed, c_created = counted_apply(root, "change")
            change_time = time.perf_counter() - change_start
            ok = c_writes == c_removed + c_created == 24 * size
            if not ok:
                failures.append(
                    f"{size} GPUs: change made {c_writes} writes for {c_removed} removed"
                    f" + {c_created} created"
                )
            changes.append((size, c_reads, c_writes, c_removed, c_created, change_time, ok))
            shutil.rmtree(root)
        print()
        print("changing apply, in-process (16 x T4-1Q -> 8 x T4-2Q on every GPU):")
        for size, reads, writes, removed, created, elapsed, ok in changes:
            verdict = "ok" if ok else "MISMATCH"
            print(
                f"{size:>4} GPUs: {writes} writes = {removed} removed + {created} created ({verdict}); "
                f"{reads} reads; {elapsed:.2f} s on the simulator"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"total {time.perf_counter() - started:.1f} s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
