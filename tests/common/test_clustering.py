"""Tests for common.clustering (HoliTom's DPC-kNN)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.clustering import assign_to_centres, dpc_knn, dpc_knn_merge


def _dpc_reference(dist: torch.Tensor, num_centres: int, k: int, noise: torch.Tensor):
    """Token-by-token DPC-kNN on one sequence (independent slow reference).

    Takes the distance matrix (``cdist / sqrt(D)``) so both sides use the same
    float32 distances; densities are computed per token in float32.
    """
    n = dist.shape[0]
    density = []
    for i in range(n):
        near = dist[i].sort().values[:k]
        density.append(float((-(near**2).mean()).exp() + noise[i]))
    dist = dist.tolist()
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        cands = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(cands) if cands else dmax)
    score = [delta[i] * density[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: -score[i])[:num_centres]
    centres = sorted(order)
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(centres.index(i))
        else:
            ds = [dist[i][c] for c in centres]
            assign.append(ds.index(min(ds)))
    return centres, assign


def test_known_answer_blobs():
    g = torch.Generator().manual_seed(0)
    centres_true = torch.tensor([[0.0, 0, 0], [20, 0, 0], [0, 20, 0]])
    x = torch.cat([c + 0.1 * torch.randn(10, 3, generator=g) for c in centres_true])
    merged, centre_idx, assign = dpc_knn_merge(x[None], 3, beta=0.6, generator=1)
    # one centre per blob, every token assigned to its blob
    assert sorted(int(c) // 10 for c in centre_idx[0]) == [0, 1, 2]
    blob_of_slot = centre_idx[0] // 10
    assert torch.equal(blob_of_slot[assign[0]], torch.arange(30) // 10)
    # merged = 0.6 * centre + 0.4 * mean(other members of the blob)
    for s in range(3):
        members = [i for i in range(30) if assign[0, i] == s and i != centre_idx[0, s]]
        want = 0.6 * x[centre_idx[0, s]] + 0.4 * x[members].mean(0)
        torch.testing.assert_close(merged[0, s], want)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 16),
    kc=st.integers(1, 16),
    k=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_matches_reference(n, kc, k, seed):
    kc = min(kc, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64).float()
    centre_idx, dist = dpc_knn(x, kc, k, generator=seed)
    noise = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1e-6
    ref_dist = torch.cdist(x[None], x[None])[0] / 2.0
    torch.testing.assert_close(dist, ref_dist)
    ref_c, ref_a = _dpc_reference(dist, kc, min(k, n), noise)
    assert centre_idx.tolist() == ref_c
    assert assign_to_centres(dist[None], centre_idx[None])[0].tolist() == ref_a


def test_seed_and_dtypes():
    x = torch.randn(2, 40, 8)
    a = dpc_knn(x, 5, generator=3)[0]
    b = dpc_knn(x, 5, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
    dup = torch.zeros(1, 10, 4)  # all equal: only the noise decides, still K unique centres
    c = dpc_knn(dup, 4, generator=0)[0]
    assert c.unique().numel() == 4
    for dt in (torch.float16, torch.bfloat16):
        m, ci, asg = dpc_knn_merge(x.to(dt), 5)
        assert m.dtype == dt and m.shape == (2, 5, 8)
    # keep-all: every token its own centre -> identity
    m, ci, asg = dpc_knn_merge(x, 40)
    assert torch.equal(ci, torch.arange(40).expand(2, 40))
    torch.testing.assert_close(m, x)


def test_bad_input():
    with pytest.raises(ValueError, match="num_centres"):
        dpc_knn(torch.randn(5, 3), 6)
    with pytest.raises(ValueError, match="k"):
        dpc_knn(torch.randn(5, 3), 2, k=0)
    with pytest.raises(TypeError, match="generator"):
        dpc_knn(torch.randn(5, 3), 2, generator="seed")
    with pytest.raises(TypeError, match="x"):
        dpc_knn(torch.ones(5, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="x"):
        dpc_knn(torch.tensor([[float("inf"), 0.0]]), 1)
    with pytest.raises(ValueError, match="centre_idx"):
        assign_to_centres(torch.rand(1, 4, 4), torch.tensor([[5]]))
    with pytest.raises(ValueError, match="centre_idx"):  # slot 0 would get no member
        assign_to_centres(torch.rand(1, 4, 4), torch.tensor([[0, 0]]))
