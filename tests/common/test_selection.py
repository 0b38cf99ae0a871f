"""Tests for common.selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.checks import budget
from common.selection import divprune_select, k_center_greedy, topk_keep

SETTINGS = settings(max_examples=40, deadline=None)


def test_topk_known_answer_and_ties():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.5]])
    assert topk_keep(s, 2).tolist() == [[1, 3]]
    assert topk_keep(s, 3).tolist() == [[1, 2, 3]]  # tie 2 vs 4 -> lower index
    assert topk_keep(s, 0.4).tolist() == [[1, 3]]
    assert topk_keep(s[0], 5).tolist() == [0, 1, 2, 3, 4]  # keep all = identity
    assert topk_keep(s, 0).shape == (1, 0)
    assert topk_keep(s, 0.0).shape == (1, 0)  # one rule: zero selects nothing either way
    assert topk_keep(torch.zeros(6), 3).tolist() == [0, 1, 2]
    assert topk_keep(s.half(), 2).tolist() == [[1, 3]]
    assert topk_keep(s.bfloat16(), 2).tolist() == [[1, 3]]


def test_topk_bad_input():
    with pytest.raises(ValueError, match="keep"):
        topk_keep(torch.rand(1, 4), 5)
    with pytest.raises(ValueError, match="keep"):
        topk_keep(torch.rand(1, 4), 1.5)
    with pytest.raises(TypeError, match="keep"):
        topk_keep(torch.rand(1, 4), True)
    with pytest.raises(ValueError, match="scores"):
        topk_keep(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="scores"):
        topk_keep(torch.rand(1, 2, 3), 1)
    with pytest.raises(TypeError, match="scores"):
        topk_keep(torch.ones(4, dtype=torch.bool), 1)


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
    levels=st.integers(1, 5),
)
def test_topk_properties(b, n, frac, seed, levels):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (b, n), generator=g).float()  # many ties
    idx = topk_keep(s, frac)
    k = budget(n, frac)
    assert idx.shape == (b, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    for r in range(b):
        kept = set(idx[r].tolist())
        worst_kept = min(s[r, i].item() for i in kept)
        for j in range(n):
            if j not in kept:
                # nothing dropped beats a kept token; equal ones lose only to lower indices
                assert s[r, j] <= worst_kept
                if s[r, j] == worst_kept:
                    assert all(i < j for i in kept if s[r, i] == worst_kept)


def test_k_center_known_answer():
    # two tight clusters + one outlier: k=3 picks one of each
    x = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [10, 0], [10.1, 0], [0, 50]])
    idx = k_center_greedy(x, 3, start=0, return_order=True)
    assert idx.tolist() == [0, 5, 4]  # 10.1 is farther than 10
    assert k_center_greedy(x, 3, start=0).tolist() == [0, 4, 5]
    assert k_center_greedy(x, 6).tolist() == list(range(6))
    assert k_center_greedy(x[None], 2).shape == (1, 2)
    with pytest.raises(ValueError, match="distance"):
        k_center_greedy(x, 2, distance="l1")
    with pytest.raises(ValueError, match="start"):
        k_center_greedy(x, 2, start=9)
    # per-row starts: a [B] tensor; a wrong length or a float start is refused by name
    xb = torch.stack([x, x.flip(0)])
    assert k_center_greedy(xb, 1, start=torch.tensor([1, 2])).tolist() == [[1], [2]]
    with pytest.raises(ValueError, match="start"):
        k_center_greedy(xb, 2, start=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="start"):
        k_center_greedy(x, 2, start=torch.tensor(1.7))
    with pytest.raises(TypeError, match="start"):
        k_center_greedy(x, 2, start=1.0)
    with pytest.raises(TypeError, match="x"):
        k_center_greedy(torch.ones(3, 2, dtype=torch.long), 2)


def _divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Official-style DivPrune on one sequence: full distance matrix, loop."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    dist = (dist + dist.t()) / 2  # exact symmetry: mutual nearest pairs tie exactly
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist[picks].min(dim=0).values
            scores[picks] = -1.0
        picks.append(int(scores.argmax()))
    return picks


@SETTINGS
@given(n=st.integers(2, 30), k=st.integers(1, 30), seed=st.integers(0, 1000))
def test_divprune_matches_reference(n, k, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    order = divprune_select(x, k, return_order=True, chunk_size=7)
    assert order.tolist() == _divprune_reference(x, k)
    srt = divprune_select(x, k)
    assert srt.tolist() == sorted(set(order.tolist()))


def test_divprune_duplicates_and_dtypes():
    x = torch.ones(5, 4)  # all identical: still 5 unique picks
    assert divprune_select(x, 5).tolist() == [0, 1, 2, 3, 4]
    xb = torch.randn(2, 20, 8)
    for dt in (torch.float16, torch.bfloat16):
        out = divprune_select(xb.to(dt), 0.25)
        assert out.shape == (2, 5)
        assert k_center_greedy(xb.to(dt), 5, distance="cosine").shape == (2, 5)
    with pytest.raises(ValueError, match="keep"):
        divprune_select(xb, 21)


def test_large_finite_half_scores_are_accepted():
    # the sum overflows float16 but every value is finite
    s = torch.full((2, 8), 60000.0, dtype=torch.float16)
    s[:, 3] = 65000.0
    assert topk_keep(s, 1).tolist() == [[3], [3]]
    s[0, 0] = float("inf")
    with pytest.raises(ValueError, match="scores"):
        topk_keep(s, 1)


def test_package_exports():
    import common

    for name in common.__all__:
        assert hasattr(common, name), name
