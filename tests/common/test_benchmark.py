"""peak_memory_mb: the peak above the start of the call, per call (not cumulative)."""

import pathlib

import pytest
import torch

from common.benchmark import peak_memory_mb

pytestmark = pytest.mark.skipif(
    not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)


def test_peak_memory_sees_a_temporary_allocation_and_resets_between_calls():
    def big():
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, touched
        return float(x[-1])

    first = peak_memory_mb(big, torch.device("cpu"))
    second = peak_memory_mb(lambda: None, torch.device("cpu"))
    assert first is not None and first > 200
    assert second is not None and second < 50  # the earlier peak is not carried over
