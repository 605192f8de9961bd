"""Run every bench/bench_*.py script in turn with this interpreter (the venv python); `make bench`.

Each script prints its own details; the rows it marks as results (benchlib.result) are gathered into
one table at the end, with the date, the machine and the command, ready to quote.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "RESULT"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} CPUs, load {load}; Python {platform.python_version()}"


def main(argv: list[str]) -> int:
    """Run all benchmarks (or those whose file name contains one of ``argv``); exit 1 if any failed."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(word in s.name for word in argv)]
    if not scripts:
        print("no benchmark matched", file=sys.stderr)
        return 1
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = machine()
    failed: list[str] = []
    rows: list[list[str]] = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=HERE.parent, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT + "\t"):
                rows.append(line.rstrip("\n").split("\t")[1:])
            else:
                print(line, end="", flush=True)
        code = proc.wait()
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"=== {script.name}: {status} in {time.perf_counter() - start:.1f} s\n", flush=True)
        if code != 0:
            failed.append(script.name)
    if rows:
        widths = [max(len(r[i]) for r in [["figure", "measured", "target", ""], *rows]) for i in range(4)]
        print(f"Results ({when}; {where})")
        which = " ".join(argv) or "all benchmarks"
        print(f"command: make bench ({which}), {time.perf_counter() - started:.0f} s")
        header = ["figure", "measured", "target", ""]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        print("  ".join("-" * w for w in widths).rstrip())
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
