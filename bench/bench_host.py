"""Benchmark: CLI latency and host I/O of ``assert``, no-op ``apply`` and ``list`` on 1, 8 and 16 GPUs of
both frameworks, the start-up budget, and the writes of a changing apply.

For each framework (mdev: T4 with 16 x T4-1Q per GPU; vendor-specific VFIO: L40S with 24 x L40S-2Q per
GPU) and host size it prints

* wall time of the installed entry point for ``assert``, no-op ``apply`` and ``list`` next to
  ``python -c pass`` (the interpreter floor): median and quartiles of interleaved runs;
* host reads, directory listings and writes per command, counted on the host-root object of the real
  command run in-process (so they are the CLI's own figures);

then the start-up budget (no-op ``assert`` on 8 GPUs / ``python -c pass``, target <= 6 x) with the
slowest imports of that command (``python -X importtime``), and for a changing apply
(16 x T4-1Q -> 8 x T4-2Q on every GPU) that writes = removed + created.

Run: ``.venv/bin/python bench/bench_host.py [--runs N]`` (about 1-2 minutes). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ENTRY_POINT, compile_package, interleaved, result, spread
from vgpu_dm.apply import ApplyOptions, apply_config
from vgpu_dm.cli.main import main as cli_main
from vgpu_dm.host import root as host_root
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import create_host
from vgpu_dm.spec import load_spec

SIZES = (1, 8, 16)
COUNT_SIZES = (1, 8, 16, 32)  # host I/O only (the simulator goes up to 32 GPUs)
STARTUP_TARGET = 6.0
# The start-up round is cheap (three ~0.1 s processes a round): more rounds make its median steadier
# on a shared machine, where a busy moment slows the longer-running command more than python -c pass.
STARTUP_RUNS = 41
# framework label -> (catalog GPU, vGPU type filling a GPU, how many)
FRAMEWORKS = {"mdev": ("T4", "T4-1Q", 16), "vendor-vfio": ("L40S", "L40S-2Q", 24)}
CONFIG = """\
version: v1
vgpu-configs:
  full-T4:
    - devices: all
      vgpu-devices: {"T4-1Q": 16}
  full-L40S:
    - devices: all
      vgpu-devices: {"L40S-2Q": 24}
  change:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
"""


def entries(name: str):
    return load_spec(CONFIG, "bench.yaml").select(name)[1]


def populated(work: Path, gpu: str, size: int) -> Path:
    root = work / f"{gpu}x{size}"
    create_host(root, [gpu] * size)
    apply_config(entries(f"full-{gpu}"), SimHostRoot(root), source="bench.yaml", options=ApplyOptions())
    return root


def commands(root: Path, cfg: Path, gpu: str) -> dict[str, list[str]]:
    base = [str(ENTRY_POINT)]
    sel = ["--sim", str(root), "-f", str(cfg), "-c", f"full-{gpu}"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "assert": [*base, "assert", *sel],
        "apply no-op": [*base, "apply", *sel],
        "list": [*base, "list", "--sim", str(root)],
    }


def counted(argv: list[str]) -> tuple[int, int, int]:
    """(reads, listings, writes) of one CLI command run in-process, from its host-root objects."""
    made: list[host_root.HostRoot] = []
    original = host_root.HostRoot.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    host_root.HostRoot.__init__ = record  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli_main(argv)
    finally:
        host_root.HostRoot.__init__ = original  # type: ignore[method-assign]
    if code != 0:
        raise SystemExit(f"{argv} exited {code}")
    c = [h.counters for h in made]
    return sum(x.reads for x in c), sum(getattr(x, "listings", 0) for x in c), sum(x.writes for x in c)


def import_profile(argv: list[str], n: int = 8) -> tuple[list[tuple[int, str]], int, int]:
    """The ``n`` slowest imports (self time, us) of running ``argv`` through the CLI in a fresh process
    (cyclic GC off, as in the console script), the self time of all imports and of the project's own."""
    code = f"import gc; gc.disable(); import sys; from vgpu_dm.cli.main import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[0].strip().isdigit():
            rows.append((int(fields[0]), fields[2].strip()))
    ours = sum(us for us, name in rows if name.startswith("vgpu_dm"))
    return sorted(rows, reverse=True)[:n], sum(us for us, _ in rows), ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="interleaved runs per command (default 15)")
    args = parser.parse_args()
    if not ENTRY_POINT.exists():
        print(f"installed entry point not found: {ENTRY_POINT}", file=sys.stderr)
        return 1
    compile_package()
    started = time.perf_counter()
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    try:
        cfg = work / "bench.yaml"
        cfg.write_text(CONFIG)
        print(f"wall time in ms: median (quartiles) of {args.runs} interleaved runs of {ENTRY_POINT.name}")
        print("host I/O: reads / directory listings / writes of the command, counted in-process")
        head = (
            f"{'framework':<12} {'GPUs':>4} {'vGPUs':>5}  {'python -c pass':>14} {'assert':>13}"
            f" {'apply no-op':>13} {'list':>13}  {'assert I/O':>12} {'apply I/O':>12} {'list I/O':>12}"
        )
        print(head)
        print("-" * len(head))
        for label, (gpu, _, count) in FRAMEWORKS.items():
            for size in SIZES:
                root = populated(work, gpu, size)
                cmds = commands(root, cfg, gpu)
                samples = interleaved(cmds, args.runs)
                io_counts = {
                    name: counted(argv[1:]) for name, argv in cmds.items() if name != "python -c pass"
                }
                for name, (_, _, writes) in io_counts.items():
                    if writes:
                        failures.append(f"{label} x {size}: {name} made {writes} writes")
                cells = " ".join(f"{spread(samples[n]):>13}" for n in ("assert", "apply no-op", "list"))
                ios = " ".join(
                    f"{'/'.join(map(str, io_counts[n])):>12}" for n in ("assert", "apply no-op", "list")
                )
                print(
                    f"{label:<12} {size:>4} {count * size:>5}  {spread(samples['python -c pass']):>14}"
                    f" {cells}  {ios}"
                )
                shutil.rmtree(root)
        # Its own interleaved round, with the floor our dependencies set: the console script imports
        # click and PyYAML whatever it does (with the cyclic GC off, as the script runs; this one exits
        # normally, tearing the interpreter down, which the console script skips when it can).
        root = populated(work, "T4", 8)
        argv = commands(root, cfg, "T4")["assert"][1:]
        floor = interleaved(
            {
                "python -c pass": [sys.executable, "-c", "pass"],
                "click + yaml": [sys.executable, "-c", "import gc; gc.disable(); import click, yaml"],
                "assert": [str(ENTRY_POINT), *argv],
            },
            STARTUP_RUNS,
        )
        a, d, p = (statistics.median(floor[k]) for k in ("assert", "click + yaml", "python -c pass"))
        ratio = a / p
        best = min(floor["assert"]) / min(floor["python -c pass"])
        print()
        print(
            f"start-up, medians of {STARTUP_RUNS} interleaved runs: no-op assert on 8 GPUs "
            f"{a * 1000:.1f} ms / python -c pass {p * 1000:.1f} ms = {ratio:.2f}x "
            f"(target <= {STARTUP_TARGET:g}x; fastest runs: {best:.2f}x); importing click and yaml "
            f"alone: {d * 1000:.1f} ms = {d / p:.2f}x"
        )
        result(
            "no-op assert, 8 GPUs / python -c pass",
            f"{ratio:.2f}x ({a * 1000:.1f} / {p * 1000:.1f} ms)",
            f"<= {STARTUP_TARGET:g}x",
            ratio <= STARTUP_TARGET,
        )
        result("of which: import click + yaml / python -c pass", f"{d / p:.2f}x ({d * 1000:.1f} ms)")
        slowest, total, ours = import_profile(argv)
        print(
            f"imports of that command (python -X importtime, which inflates them): {total / 1000:.1f} ms, "
            f"of which the project's own modules {ours / 1000:.1f} ms; the slowest (self time):"
        )
        for us, name in slowest:
            print(f"  {us / 1000:6.1f} ms  {name}")
        shutil.rmtree(root)

        print()
        print("host I/O of the real commands (reads / listings / writes), growing with GPUs and vGPUs:")
        print(f"{'framework':<12} {'GPUs':>4} {'vGPUs':>5}  {'assert':>14} {'apply no-op':>14} {'list':>14}")
        for label, (gpu, _, count) in FRAMEWORKS.items():
            for size in COUNT_SIZES:
                root = populated(work, gpu, size)
                cmds = commands(root, cfg, gpu)
                io_counts = [counted(cmds[n][1:]) for n in ("assert", "apply no-op", "list")]
                cells = " ".join(f"{'/'.join(map(str, c)):>14}" for c in io_counts)
                print(f"{label:<12} {size:>4} {count * size:>5}  {cells}")
                if size == COUNT_SIZES[-1] and label == "mdev":
                    per = io_counts[0][0] / (size * (1 + count))
                    result(
                        f"assert reads, {size} GPUs x {count} vGPUs (mdev)",
                        f"{io_counts[0][0]} ({per:.1f} per GPU+vGPU)",
                    )
                shutil.rmtree(root)

        print()
        print("changing apply, in-process (16 x T4-1Q -> 8 x T4-2Q on every GPU):")
        for size in COUNT_SIZES:
            root = populated(work, "T4", size)
            host = SimHostRoot(root)
            start = time.perf_counter()
            plan = apply_config(entries("change"), host, source="bench.yaml")
            elapsed = time.perf_counter() - start
            removed = sum(len(gp.remove) for gp in plan.gpus)
            created = sum(len(gp.create) for gp in plan.gpus)
            ok = host.counters.writes == removed + created == 24 * size
            if not ok:
                failures.append(f"{size} GPUs: {host.counters.writes} writes for {removed} + {created}")
            print(
                f"{size:>4} GPUs: {host.counters.writes} writes = {removed} removed + {created} created "
                f"({'ok' if ok else 'MISMATCH'}); {host.counters.reads} reads; {elapsed:.2f} s"
            )
            shutil.rmtree(root)
        result("changing apply writes = removed + created", "yes" if not failures else "NO", "", not failures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.1f} s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
