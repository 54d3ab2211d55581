"""`make bench`: run every `bench_*.py` in this folder and write `RESULTS.md` from their result files.

Usage: `python benchmarks/run_all.py [name ...]` (names without the `bench_` prefix; default: all).
`--stitch-only` rewrites `RESULTS.md` from the existing result files without running anything.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    stitch_only = "--stitch-only" in argv
    argv = [arg for arg in argv if arg != "--stitch-only"]
    scripts = [] if stitch_only else sorted(BENCH_DIR.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    failed = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"=== {script.name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
    sections = [p.read_text() for p in sorted((BENCH_DIR / "results").glob("*.md"))]
    header = (
        "# Benchmark results\n\nWritten by `make bench` (`benchmarks/run_all.py`). Each section was measured in one run, "
        "side by side, on the machine it names; ratios compare numbers from the same run.\n\n"
    )
    (BENCH_DIR / "RESULTS.md").write_text(header + "\n".join(sections))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
