"""Benchmark: a changing apply on 1, 2, 4, 8 and 16 GPUs with a slow simulated driver, serial vs --jobs.

Every GPU is a T4 going from 16 x T4-1Q to 8 x T4-2Q (16 removes and 8 creates); the simulator takes
30 ms per create and 10 ms per remove (``sim latency``), writes to different GPUs overlapping. Each
run is the installed ``nvidia-vgpu-dm apply`` on a fresh copy of the populated host. The ideal is the
slowest GPU's own time: the same change on a host with that one GPU (all GPUs here are alike).

Target (issue 12): 8 GPUs with --jobs 8 within 1.5 x the ideal.

Run: .venv/bin/python bench/bench_apply_scaling.py [--reps N]  (about 1-2 minutes)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import ENTRY_POINT, compile_package, result, run
from vgpu_dm.apply import apply_config
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.latency import WriteLatency
from vgpu_dm.sim.layout import create_host
from vgpu_dm.spec import load_spec

SIZES = (1, 2, 4, 8, 16)
CREATE_MS, REMOVE_MS = 30, 10
TARGET = 1.5
CONFIG = """\
version: v1
vgpu-configs:
  full:
    - devices: all
      vgpu-devices: {"T4-1Q": 16}
  change:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
"""


def template(work: Path, size: int, serial: bool = False) -> Path:
    root = work / f"t4x{size}{'-serial' if serial else ''}"
    create_host(root, ["T4"] * size)
    entries = load_spec(CONFIG, "bench.yaml").select("full")[1]
    apply_config(entries, SimHostRoot(root), source="bench.yaml")
    WriteLatency(create_ms=CREATE_MS, remove_ms=REMOVE_MS, serial=serial).save(root)
    (root / ".vgpu-dm-sim" / "writes.log").unlink()
    return root


def timed_change(work: Path, tmpl: Path, cfg: Path, jobs: str, size: int) -> float:
    root = work / "run"
    shutil.copytree(tmpl, root, symlinks=True)
    try:
        elapsed = run(
            [str(ENTRY_POINT), "apply", "--sim", str(root), "-f", str(cfg), "-c", "change", "--jobs", jobs]
        )
        log = (root / ".vgpu-dm-sim" / "writes.log").read_text().splitlines()
        if len(log) != 24 * size:
            raise SystemExit(f"expected {24 * size} writes, got {len(log)}")
        return elapsed
    finally:
        shutil.rmtree(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (default 3, median)")
    args = parser.parse_args()
    compile_package()
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    ok = True
    try:
        cfg = work / "bench.yaml"
        cfg.write_text(CONFIG)
        print(
            "changing apply, every GPU 16 x T4-1Q -> 8 x T4-2Q; "
            f"driver {CREATE_MS} ms/create, {REMOVE_MS} ms/remove"
        )
        print(f"median wall time of {args.reps} runs of the installed entry point (CLI start-up included)")
        templates = {size: template(work, size) for size in SIZES}
        alone = [timed_change(work, templates[1], cfg, "1", 1) for _ in range(2 * args.reps)]
        ideal = statistics.median(alone)
        print(f"ideal (one GPU alone, median of {len(alone)} runs): {ideal:.2f} s")
        head = f"{'GPUs':>4}  {'--jobs 1':>9} {'x ideal':>8}  {'--jobs N':>9} {'N':>3} {'x ideal':>8}"
        print(head)
        print("-" * len(head))
        for size in SIZES:
            jobs = str(min(size, 8)) if size <= 8 else "16"
            serial = statistics.median(
                timed_change(work, templates[size], cfg, "1", size) for _ in range(args.reps)
            )
            parallel = statistics.median(
                timed_change(work, templates[size], cfg, jobs, size) for _ in range(args.reps)
            )
            print(
                f"{size:>4}  {serial:>8.2f}s {serial / ideal:>7.2f}x  {parallel:>8.2f}s {jobs:>3} "
                f"{parallel / ideal:>7.2f}x"
            )
            if size == 8:
                ok = parallel / ideal <= TARGET
                result(
                    "apply, 8 GPUs --jobs 8 / slowest GPU alone (30 ms writes)",
                    f"{parallel / ideal:.2f}x ({parallel:.2f} / {ideal:.2f} s)",
                    f"<= {TARGET:g}x",
                    ok,
                )
                result("apply, 8 GPUs --jobs 1 / slowest GPU alone", f"{serial / ideal:.2f}x")
            if size == 16:
                result("apply, 16 GPUs --jobs 16 / slowest GPU alone", f"{parallel / ideal:.2f}x")
        # A driver that takes one write at a time host-wide (sim latency --serial-writes): --jobs then
        # gains nothing, and must cost nothing either.
        serial_tmpl = template(work, 8, serial=True)
        one = statistics.median(timed_change(work, serial_tmpl, cfg, "1", 8) for _ in range(args.reps))
        eight = statistics.median(timed_change(work, serial_tmpl, cfg, "8", 8) for _ in range(args.reps))
        print(f"driver serialising all writes, 8 GPUs: --jobs 1 {one:.2f} s, --jobs 8 {eight:.2f} s")
        result("apply, 8 GPUs, serialising driver: --jobs 8 / --jobs 1", f"{eight / one:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
