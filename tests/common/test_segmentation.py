"""Tests for common.segmentation (HoliTom's temporal DP) against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.segmentation import (
    rebalance_retain_ratio,
    segment_static_masks,
    static_counts,
    temporal_segmentation,
)


def _brute(sim: torch.Tensor, tau: float, max_window: int):
    """Plain-Python transcription of the official DP (loops over everything)."""
    f = sim.shape[0] + 1
    n = sim.shape[1]
    above = (sim > tau).tolist()

    def count(s, e):
        return sum(all(above[t][p] for t in range(s, e)) for p in range(n)) if e > s else 0

    dp = [0] * f
    prev = [0] * f
    for i in range(f):
        best = dp[i - 1] if i > 0 else 0
        arg = i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + count(j + 1, i) * (i - j - 1)
            if val > best:
                best, arg = val, j + 1
        dp[i], prev[i] = best, arg
    segs = []
    i = f - 1
    while i >= 0:
        segs.append((prev[i], i))
        i = prev[i] - 1
    counts = [[count(s, e) for e in range(f)] for s in range(f)]
    return segs[::-1], dp[-1], counts


def test_known_answer_two_scenes():
    f, n = 6, 10
    sim = torch.ones(f - 1, n)
    sim[2] = 0.0  # scene cut between frames 2 and 3
    sim[:, 7] = 0.1  # a moving position
    segs, reduced = temporal_segmentation(sim, tau=0.8)
    assert segs == [(0, 2), (3, 5)]
    assert reduced == 2 * (9 * 2)
    masks = segment_static_masks(sim, segs, tau=0.8)
    assert masks.shape == (2, n)
    assert masks[:, 7].tolist() == [False, False] and bool(masks[:, :7].all())
    r = rebalance_retain_ratio(0.1, f, n, reduced)
    assert r == pytest.approx(0.1 / ((60 - 36) / 60))
    assert rebalance_retain_ratio(0.9, f, n, reduced) == 1.0


def test_all_dynamic_and_single_frame():
    sim = torch.zeros(4, 3)
    segs, reduced = temporal_segmentation(sim)
    assert segs == [(i, i) for i in range(5)] and reduced == 0
    assert not segment_static_masks(sim, segs).any()
    assert temporal_segmentation(torch.zeros(0, 3)) == ([(0, 0)], 0)


@settings(max_examples=50, deadline=None)
@given(
    f=st.integers(2, 9),
    n=st.integers(1, 6),
    w=st.integers(1, 10),
    p=st.floats(0.3, 0.95),
    seed=st.integers(0, 10_000),
)
def test_matches_brute_force(f, n, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.where(torch.rand(f - 1, n, generator=g) < p, 0.9, 0.5)
    segs, reduced = temporal_segmentation(sim, tau=0.8, max_window_size=w)
    ref_segs, ref_reduced, ref_counts = _brute(sim, 0.8, w)
    assert segs == ref_segs
    assert reduced == ref_reduced
    assert static_counts(sim, 0.8).tolist() == ref_counts
    masks = segment_static_masks(sim, segs, 0.8)
    for (s, e), m in zip(segs, masks):
        want = [e > s and all(sim[t, q] > 0.8 for t in range(s, e)) for q in range(n)]
        assert m.tolist() == want
    # partition covers all frames in order; total_reduced matches the masks
    assert [a for a, _ in segs][0] == 0 and segs[-1][1] == f - 1
    assert all(segs[i][1] + 1 == segs[i + 1][0] for i in range(len(segs) - 1))
    assert reduced == sum(int(m.sum()) * (e - s) for (s, e), m in zip(segs, masks))


def test_bad_input():
    with pytest.raises(ValueError, match="sim"):
        temporal_segmentation(torch.rand(3))
    with pytest.raises(ValueError, match="tau"):
        temporal_segmentation(torch.rand(3, 2), tau=2.0)
    with pytest.raises(ValueError, match="max_window_size"):
        temporal_segmentation(torch.rand(3, 2), max_window_size=0)
    with pytest.raises(ValueError, match="segments"):
        segment_static_masks(torch.rand(3, 2), [(0, 5)])
    with pytest.raises(ValueError, match="retain_ratio"):
        rebalance_retain_ratio(0.0, 2, 3, 0)
    with pytest.raises(ValueError, match="total_reduced"):
        rebalance_retain_ratio(0.5, 2, 3, 7)


def test_half_precision():
    g = torch.Generator().manual_seed(0)
    sim = torch.where(torch.rand(7, 20, generator=g) < 0.7, 0.9, 0.5)
    ref = temporal_segmentation(sim, 0.8)
    for dt in (torch.float16, torch.bfloat16):
        assert temporal_segmentation(sim.to(dt), 0.8) == ref
        segs = ref[0]
        assert torch.equal(segment_static_masks(sim.to(dt), segs), segment_static_masks(sim, segs))
