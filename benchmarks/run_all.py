"""Run every benchmark, one after the other: `benchmarks/bench_*.py`, in name order.

    python benchmarks/run_all.py [-k SUBSTRING] [-- ARGS...]

Each benchmark runs in its own process with its default settings (ARGS after `--` are passed to
every one of them); its output is shown as it comes. The exit code is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py in turn.")
    parser.add_argument("-k", dest="only", default="", help="only benchmarks whose name has this")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- ARGS passed to each benchmark")
    opts = parser.parse_args(argv)
    extra = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    benches = [p for p in sorted(HERE.glob("bench_*.py")) if opts.only in p.stem]
    if not benches:
        print(f"no benchmark matches {opts.only!r}", file=sys.stderr)
        return 2
    results: list[tuple[str, int, float]] = []
    for bench in benches:
        print(f"\n=== {bench.name} ===", flush=True)
        started = time.monotonic()
        code = subprocess.run([sys.executable, str(bench), *extra], check=False).returncode
        results.append((bench.name, code, time.monotonic() - started))
    print("\n=== summary ===")
    for name, code, secs in results:
        print(f"{name:32s} {'ok' if code == 0 else f'FAILED (exit {code})':18s} {secs:6.1f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
