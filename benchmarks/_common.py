"""Shared helpers for benchmarks: describe the machine, time and measure memory, write result files.

Each `benchmarks/bench_<name>.py` runs as a script, prints a markdown table headed by the machine description,
and calls :func:`write_result`, which stores `benchmarks/results/<name>.md` and `.json`. `run_all.py` (the
`make bench` target) runs every script and stitches the markdown into `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR.parent))


def machine_description() -> str:
    """One line naming the machine: CPU model, cores, memory, GPU if any, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores, {memory_gib:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; {cpu_flags_description()}"
    )


# The flags that decide CPU matmul speed per dtype (vector width, native bfloat16 / int8 units).
_SPEED_FLAG_PREFIXES = ("avx", "amx", "fma", "sve", "asimd", "bf16", "i8mm")


def cpu_flags_description() -> str:
    """The CPU flags that CPU timings depend on, and whether bfloat16 is native: every result records them, since a
    bf16 run on a CPU without `avx512_bf16` / `amx_bf16` ran about 15x slower than float32 (and faster with them)."""
    from hf_interop.utils import cpu_flags, cpu_has_native_bf16

    flags = [flag for flag in cpu_flags() if flag.startswith(_SPEED_FLAG_PREFIXES)]
    native = {True: "yes", False: "no", None: "unknown"}[cpu_has_native_bf16()]
    return (
        f"CPU flags: {' '.join(flags) or 'unknown'} (native bf16: {native}; CPU bfloat16 timings and bf16-vs-fp32 "
        "ratios depend on it)"
    )


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms), in bytes above start."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def write_result(name: str, markdown: str, data: dict[str, Any]) -> Path:
    """Store `results/<name>.md` (headed by the machine description) and `results/<name>.json`; print the table."""
    RESULTS_DIR.mkdir(exist_ok=True)
    machine = machine_description()
    text = f"## {name}\n\nMachine: {machine}\n\n{markdown.strip()}\n"
    md_path = RESULTS_DIR / f"{name}.md"
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    json_path = RESULTS_DIR / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine, **data}, indent=2, default=str) + "\n")
    os.replace(tmp, json_path)
    print(text)
    return md_path
