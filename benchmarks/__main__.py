"""`python -m benchmarks [--quick] [NAME ...]`: run every `benchmarks/bench_*.py` (or the named
ones) in turn and collect their printed ratios into benchmarks/results/latest.txt."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not a measurement)")
    parser.add_argument("names", nargs="*", help="benchmark names, e.g. manifest (default: all)")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.names]
    (HERE / "results").mkdir(exist_ok=True)
    lines, failures = [], 0
    for script in scripts:
        started = time.time()
        command = [sys.executable, "-m", f"benchmarks.{script.stem}"] + (["--quick"] if args.quick else [])
        print(f"== {script.stem}", flush=True)
        result = subprocess.run(command, cwd=HERE.parent, text=True, capture_output=True)
        print(result.stdout, end="")
        if result.returncode:
            failures += 1
            print(result.stderr, file=sys.stderr)
        lines.append(f"== {script.stem} ({time.time() - started:.0f} s, rc {result.returncode})\n{result.stdout}")
    (HERE / "results" / "latest.txt").write_text("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
