"""Benchmark: config parsing at 3,000 and 30,000 lines, in one run — time ratio and peak memory.

The 3,000-line file is the upstream-sized example of bench_valid_config.py (one config per catalog vGPU
type plus a ``default``); the 30,000-line one repeats its configs ten times under new names. Each is
parsed in-process by ``load_spec`` (parse and validation), interleaved, after a warm-up; the figure is
the median CPU time (``time.process_time``: other processes on a shared machine do not inflate it).
Peak memory is traced with tracemalloc in a separate pass.

Target (issue 12): 30,000 lines within 12 x the 3,000-line time (parsing grows linearly).

Run: .venv/bin/python bench/bench_parse.py [--reps N]  (about 15 s)
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import tracemalloc

from bench_valid_config import generate_config
from benchlib import result
from vgpu_dm.spec import load_spec

TARGET = 12.0


def scaled(copies: int) -> str:
    """The generated config with its configs repeated ``copies`` times (names made unique)."""
    text, _ = generate_config()
    head, body = text.split("vgpu-configs:\n", 1)
    parts = [head, "vgpu-configs:\n", body]
    for n in range(1, copies):
        parts.append(re.sub(r"^  ([^ \n][^:\n]*):$", rf"  \1-copy{n}:", body, flags=re.MULTILINE))
    return "".join(parts)


def cpu_time(text: str) -> float:
    start = time.process_time()
    spec = load_spec(text, "bench.yaml")
    elapsed = time.process_time() - start
    assert spec.configs
    return elapsed


def peak_mib(text: str) -> float:
    tracemalloc.start()
    try:
        load_spec(text, "bench.yaml")
        return tracemalloc.get_traced_memory()[1] / (1024 * 1024)
    finally:
        tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="interleaved parses of each file (default 9)")
    args = parser.parse_args()
    files = {"small": scaled(1), "large": scaled(10)}
    lines = {k: v.count("\n") for k, v in files.items()}
    for text in files.values():  # warm-up
        cpu_time(text)
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(args.reps):
        for key, text in files.items():
            times[key].append(cpu_time(text))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["large"] / medians["small"]
    print(f"load_spec, median CPU time of {args.reps} interleaved parses:")
    for key in files:
        per_line = medians[key] / lines[key] * 1e6
        print(
            f"  {lines[key]:>6} lines: {medians[key] * 1000:7.1f} ms ({per_line:.1f} us/line), "
            f"peak {peak_mib(files[key]):5.1f} MiB"
        )
    size_ratio = lines["large"] / lines["small"]
    print(f"ratio: {ratio:.1f}x the time for {size_ratio:.1f}x the lines (target <= {TARGET:g}x)")
    ok = ratio <= TARGET
    result(
        f"parse {lines['large']} vs {lines['small']} lines (CPU time)",
        f"{ratio:.1f}x ({medians['large'] * 1000:.0f} / {medians['small'] * 1000:.0f} ms)",
        f"<= {TARGET:g}x",
        ok,
    )
    result(f"parse peak memory, {lines['large']} lines", f"{peak_mib(files['large']):.1f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
