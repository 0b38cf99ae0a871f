"""common.benchmark: interleaved timing (call order, warm-up, outputs) and peak_memory_mb (the
peak above the start of the call, per call, not cumulative). No timed assertions."""

import pathlib

import pytest
import torch

from common.benchmark import compare, peak_memory_mb, time_fn, time_interleaved

needs_proc = pytest.mark.skipif(
    not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)


def test_time_interleaved_calls_in_turn_after_warmup():
    calls, seen = [], []

    def make(name):
        def fn():
            calls.append(name)
            return name.upper()

        return fn

    times = time_interleaved(
        {"a": make("a"), "b": make("b")},
        repeats=3,
        warmup=2,
        on_output=lambda name, out: seen.append((name, out)),
    )
    assert calls == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed rounds, interleaved
    assert seen == [("a", "A"), ("b", "B")] * 3  # only the timed calls
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    assert len(time_fn(lambda: None, repeats=4, warmup=0)) == 4
    res = compare(lambda: None, lambda: None, repeats=2, warmup=0)
    assert res["baseline"]["n"] == 2 and res["method"]["n"] == 2 and res["speedup"] > 0
    with pytest.raises(ValueError, match=r"repeats must be in \[1, inf\], got 0"):
        compare(lambda: None, lambda: None, repeats=0)  # was an IndexError in summarize
    with pytest.raises(ValueError, match="warmup must be in"):
        time_fn(lambda: None, warmup=-1)


@needs_proc
def test_peak_memory_sees_a_temporary_allocation_and_resets_between_calls():
    def big():
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, touched
        return float(x[-1])

    first = peak_memory_mb(big, torch.device("cpu"))
    second = peak_memory_mb(lambda: None, torch.device("cpu"))
    assert first is not None and first > 200
    assert second is not None and second < 50  # the earlier peak is not carried over
