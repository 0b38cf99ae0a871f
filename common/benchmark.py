"""Side-by-side timing helpers for ``make bench`` (never used in tests)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["time_fn", "summarize", "compare"]


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
