"""Peak memory of one stage: resident set size sampled from /proc while the stage runs, minus the baseline."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure_stage(fn: Callable[[], Any], interval: float = 0.005) -> tuple[Any, float, int]:
    """Run fn; return (its result, seconds, peak RSS increase in bytes over the RSS before it started)."""
    baseline = rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    return result, seconds, peak[0] - baseline


def alternate(fns: dict[str, Callable[[], Any]], runs: int = 10, warmup: int = 2) -> dict[str, dict]:
    """Time several callables A B A B ... after warm-up; median, min and max seconds of each."""
    import statistics

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times.items()}
