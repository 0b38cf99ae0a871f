"""Tests for common.merging (the one merge mechanism)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.merging import (
    centre_weighted_merge,
    mean_merge,
    scatter_merge,
    sequential_halving_merge,
    unmerge,
    weighted_average_merge,
)

SETTINGS = settings(max_examples=40, deadline=None)


def test_scatter_merge_known_answer():
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]]])
    dst = torch.tensor([[0, 1, 0, 1]])
    assert scatter_merge(x, dst, 2, "sum").tolist() == [[[6.0, 60.0], [10.0, 100.0]]]
    assert mean_merge(x, dst, 2).tolist() == [[[3.0, 30.0], [5.0, 50.0]]]
    assert scatter_merge(x, dst, 2, "amax").tolist() == [[[5.0, 50.0], [7.0, 70.0]]]
    # an empty slot is zero
    assert scatter_merge(x, dst, 3, "mean")[0, 2].tolist() == [0.0, 0.0]
    # bool / int amax (source maps, positions)
    b = torch.tensor([[True, False, False, False]])[..., None]
    assert scatter_merge(b, dst, 2, "amax").flatten().tolist() == [True, False]
    # extra trailing dims ride along
    x4 = torch.arange(16.0).reshape(1, 4, 2, 2)
    assert scatter_merge(x4, dst, 2, "sum").shape == (1, 2, 2, 2)


def test_weighted_average_known_answer():
    x = torch.tensor([[[2.0], [4.0], [10.0]]])
    size = torch.tensor([[3.0, 1.0, 2.0]])
    y, s = weighted_average_merge(x, torch.tensor([[0, 0, 1]]), 2, size)
    assert y.flatten().tolist() == [2.5, 10.0]
    assert s.tolist() == [[4.0, 2.0]]
    y1, s1 = weighted_average_merge(x, torch.tensor([[0, 0, 1]]), 2)
    assert y1.flatten().tolist() == [3.0, 10.0] and s1.tolist() == [[2.0, 1.0]]


def test_centre_weighted_known_answer():
    x = torch.tensor([[[0.0], [10.0], [20.0], [100.0], [7.0]]])
    centre_idx = torch.tensor([[0, 3, 4]])
    assign = torch.tensor([[0, 0, 0, 1, 2]])
    out = centre_weighted_merge(x, centre_idx, assign, beta=0.6)
    # centre 0: 0.6*0 + 0.4*mean(10, 20) = 6; centres 3, 4 have no member -> unchanged
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 100.0, 7.0]))
    out1 = centre_weighted_merge(x, centre_idx, assign, beta=1.0)
    torch.testing.assert_close(out1.flatten(), torch.tensor([0.0, 100.0, 7.0]))


def test_unmerge_known_answer():
    y = torch.tensor([[[1.0], [2.0]]])
    assert unmerge(y, torch.tensor([[1, 0, 1]])).flatten().tolist() == [2.0, 1.0, 2.0]


def test_half_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 8, generator=g)
    dst = torch.randint(0, 10, (2, 50), generator=g)
    ref = mean_merge(x, dst, 10)
    for dt in (torch.float16, torch.bfloat16):
        y = mean_merge(x.to(dt), dst, 10)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
        w, s = weighted_average_merge(x.to(dt), dst, 10, torch.ones(2, 50, dtype=dt))
        assert w.dtype == dt and s.dtype == dt
        c = centre_weighted_merge(
            x.to(dt), torch.arange(10).expand(2, 10), torch.arange(50).remainder(10).expand(2, 50)
        )
        assert c.dtype == dt


def test_bad_input():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="dst_of"):
        scatter_merge(x, torch.tensor([[0, 1, 2, 3]]), 3)
    with pytest.raises(TypeError, match="dst_of"):
        scatter_merge(x, torch.tensor([[0.0, 1, 1, 1]]), 3)
    with pytest.raises(ValueError, match="x"):
        scatter_merge(torch.randn(1, 5, 2), torch.tensor([[0, 1, 1, 1]]), 3)
    with pytest.raises(ValueError, match="mode"):
        scatter_merge(x, torch.tensor([[0, 1, 1, 1]]), 3, "wavg")
    with pytest.raises(TypeError, match="x"):
        mean_merge(torch.ones(1, 4, 2, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]), 3)
    with pytest.raises(ValueError, match="beta"):
        centre_weighted_merge(x, torch.tensor([[0]]), torch.zeros(1, 4, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="assign"):
        centre_weighted_merge(x, torch.tensor([[0, 1]]), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="size"):
        weighted_average_merge(x, torch.tensor([[0, 1, 1, 1]]), 3, torch.ones(1, 3))
    with pytest.raises(ValueError, match="size"):
        weighted_average_merge(x, torch.tensor([[0, 1, 1, 1]]), 3, torch.tensor([[1.0, -1, 1, 1]]))
    with pytest.raises(ValueError, match="y"):
        unmerge(torch.randn(3), torch.tensor([[0]]))


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 30),
    k=st.integers(1, 10),
    seed=st.integers(0, 10_000),
)
def test_merge_properties(b, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    size = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1
    dst = torch.randint(0, k, (b, n), generator=g)
    y, s = weighted_average_merge(x, dst, k, size)
    # the size-weighted sum is preserved, per slot and overall
    torch.testing.assert_close((y * s[..., None]).sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(s.sum(1), size.sum(1))
    # unmerge restores the shape; singletons are exact
    back = unmerge(mean_merge(x, dst, k), dst)
    assert back.shape == x.shape
    counts = torch.zeros(b, k, dtype=torch.long).scatter_add_(1, dst, torch.ones_like(dst))
    alone = counts.gather(1, dst) == 1
    torch.testing.assert_close(back[alone], x[alone])
    # keep-all identity
    ident = torch.arange(n).expand(b, n)
    torch.testing.assert_close(mean_merge(x, ident, n), x)
    torch.testing.assert_close(unmerge(x, ident), x)
    # centre-weighted merge: output is a convex combination within member range
    centres = torch.randperm(n, generator=g)[: min(k, n)].sort().values.expand(b, -1)
    kk = centres.shape[1]
    assign = torch.randint(0, kk, (b, n), generator=g)
    assign.scatter_(1, centres, torch.arange(kk).expand(b, kk))
    out = centre_weighted_merge(x, centres, assign, beta=0.6)
    lo = scatter_merge(-x, assign, kk, "amax").neg()
    hi = scatter_merge(x, assign, kk, "amax")
    assert bool((out >= lo - 1e-9).all() and (out <= hi + 1e-9).all())


def test_sequential_halving_known_answer():
    # token 1 kept; 0, 2, 3 merge into it in index order: ((((h1+h0)/2+h2)/2)+h3)/2
    x = torch.tensor([[[8.0], [16.0], [4.0], [2.0], [5.0]]])
    dst = torch.tensor([[0, 0, 0, 0, 1]])
    out = sequential_halving_merge(x, dst, torch.tensor([[1, 4]]))
    want = (((16.0 + 8.0) / 2 + 4.0) / 2 + 2.0) / 2
    assert out.flatten().tolist() == [want, 5.0]
    assert sequential_halving_merge(x.half(), dst, torch.tensor([[1, 4]])).dtype == torch.float16
    with pytest.raises(ValueError, match="keep_idx"):
        sequential_halving_merge(x, dst, torch.tensor([[4, 1]]))


@SETTINGS
@given(n=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_sequential_halving_matches_loop(n, seed):
    from common.matching import merge_from_targets

    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    kept = torch.randperm(n, generator=g)[:k].sort().values
    target = []
    for _ in range(2):
        t = torch.arange(n)
        drop = torch.ones(n, dtype=torch.bool)
        drop[kept] = False
        t[drop] = kept[torch.randint(0, k, (int(drop.sum()),), generator=g)]
        target.append(t)
    m = merge_from_targets(torch.stack(target))
    x = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    ref = x.clone()
    for b in range(2):
        for i in range(n):  # the official loop, in ascending index order
            t = int(target[b][i])
            if t != i:
                ref[b, t] = (ref[b, t] + ref[b, i]) / 2
    want = ref.gather(1, m.keep_idx[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(m.merge(x, "halving"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_scatter_merge_along_another_dim_is_bitwise_the_same(dtype, mode):
    """Token axis at dim 2 (per-head q / k / v) == the [B, N, H*D] layout, bit for bit."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d, k = 2, 3, 11, 4, 5
    x = (torch.randn(b, h, n, d, generator=g) * 3).to(dtype)
    dst_of = torch.randint(0, k, (b, n), generator=g)
    flat = scatter_merge(x.transpose(1, 2).reshape(b, n, h * d), dst_of, k, mode)
    ref = flat.reshape(b, k, h, d).transpose(1, 2)
    out = scatter_merge(x, dst_of, k, mode, dim=2)
    assert out.dtype == dtype and torch.equal(out, ref)
    buf = torch.full((b, h, k + 2, d), 7.0, dtype=dtype)  # write into a slice of a buffer
    res = scatter_merge(x, dst_of, k, mode, dim=2, out=buf[:, :, :k])
    assert torch.equal(res, ref) and torch.equal(buf[:, :, :k], ref)
    assert bool((buf[:, :, k:] == 7).all())


def test_scatter_merge_dim_bad_input():
    x = torch.randn(1, 2, 4, 3)
    dst_of = torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="dim"):
        scatter_merge(x, dst_of, 2, dim=0)
    with pytest.raises(ValueError, match="dim 3"):
        scatter_merge(x, dst_of, 2, dim=3)
    with pytest.raises(ValueError, match="amax"):
        scatter_merge(x, dst_of, 2, "amax", dim=2)
    with pytest.raises(ValueError, match="out"):
        scatter_merge(x, dst_of, 2, dim=2, out=torch.empty(1, 2, 3, 3))
    with pytest.raises(ValueError, match="out"):
        scatter_merge(x[:, 0], dst_of, 2, out=torch.empty(1, 2, 3))
