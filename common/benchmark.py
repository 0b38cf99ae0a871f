"""Side-by-side timing and peak-memory helpers for benchmarks and eval tracks.

One timing mechanism: :func:`clock` (a device-synchronised ``perf_counter``)
and :func:`time_interleaved`, which calls several callables in turn so drift
hits all of them; :func:`time_fn` and :func:`compare` are its one- and
two-callable forms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

from common.checks import check_count

__all__ = [
    "clock",
    "sync",
    "time_fn",
    "time_interleaved",
    "summarize",
    "compare",
    "peak_memory_mb",
]


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU / ``None``)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after :func:`sync`: a timestamp that includes queued work."""
    sync(device)
    return time.perf_counter()


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    on_output: Callable[[str, object], None] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each callable, called in turn (A, B, C, A, B, C, ...).

    ``warmup`` untimed rounds first (one-off costs such as kernel creation for a
    new shape stay out), then ``repeats`` timed rounds under
    ``torch.inference_mode``. ``on_output(name, output)`` sees every timed
    call's result (e.g. a model's own stage timings). Returns ``{name: [s, ...]}``.
    """
    check_count("repeats", repeats, low=1)
    check_count("warmup", warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                out = fn()
                times[name].append(clock(device) - t0)
                if on_output is not None:
                    on_output(name, out)
    return times


def time_fn(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


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
    t = time_interleaved(
        {"baseline": baseline, "method": method}, repeats=repeats, warmup=warmup, device=device
    )
    sa, sb = summarize(t["baseline"]), summarize(t["method"])
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
