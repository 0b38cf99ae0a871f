"""Side-by-side timing and peak-memory helpers for benchmarks and eval tracks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["time_fn", "summarize", "compare", "peak_memory_mb"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and spread (min, max, interquartile range) of a list of timings."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": q[2] - q[0],
        "n": len(times),
    }


def compare(
    baseline: Callable[[], object],
    method: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, object]:
    """Time two callables interleaved (A, B, A, B, ...) so drift hits both.

    Returns ``{"baseline": summary, "method": summary, "speedup": median ratio}``.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            baseline()
            method()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a += time_fn(baseline, repeats=1, warmup=0, device=device)
        b += time_fn(method, repeats=1, warmup=0, device=device)
    sa, sb = summarize(a), summarize(b)
    return {"baseline": sa, "method": sb, "speedup": sa["median_s"] / sb["median_s"]}


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak memory (MB) above the baseline while ``fn()`` runs.

    CUDA: the allocator's peak. CPU (Linux): the process's resident-set
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
    the resident set before the call -- a process-level figure, so it also sees
    allocator caching; ``None`` where /proc is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        fn()
        return None
    base = _proc_status_kb("VmRSS")
    fn()
    peak = _proc_status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024
