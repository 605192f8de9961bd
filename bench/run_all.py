"""Run every bench/bench_*.py script in turn with this interpreter (the venv python); `make bench`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    """Run all benchmarks (or those whose file name contains one of ``argv``); exit 1 if any failed."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(word in s.name for word in argv)]
    if not scripts:
        print("no benchmark matched", file=sys.stderr)
        return 1
    failed: list[str] = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"=== {script.name}: {status} in {time.perf_counter() - start:.1f} s\n", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
