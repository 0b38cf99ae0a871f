"""Tests for common.matching (Merge, ToMe bipartite matching, FastVGGT partition)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.matching import (
    Merge,
    bipartite_soft_matching,
    grid_random_partition,
    match_src_to_dst,
    merge_from_targets,
)

SETTINGS = settings(max_examples=40, deadline=None)


def _check_merge_invariants(m: Merge, n: int) -> None:
    b, k = m.keep_idx.shape
    assert m.dst_of.shape == (b, n)
    assert bool((m.keep_idx[:, 1:] > m.keep_idx[:, :-1]).all())
    assert torch.equal(m.dst_of.gather(1, m.keep_idx), torch.arange(k).expand(b, k))
    assert int(m.dst_of.min()) >= 0 and int(m.dst_of.max()) < k


# ---------------------------------------------------------------- Merge
def test_merge_known_answer():
    # tokens 0..4; 1 -> 0, 3 -> 4; kept 0, 2, 4
    m = merge_from_targets(torch.tensor([[0, 0, 2, 4, 4]]))
    assert m.keep_idx.tolist() == [[0, 2, 4]]
    assert m.dst_of.tolist() == [[0, 0, 1, 2, 2]]
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0]])[..., None]
    assert m.merge(x).flatten().tolist() == [2.0, 5.0, 8.0]
    assert m.merge(x, "sum").flatten().tolist() == [4.0, 5.0, 16.0]
    assert m.merge(x, "amax").flatten().tolist() == [3.0, 5.0, 9.0]
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0]])
    assert m.merge(x, "wavg", size=size).flatten().tolist() == [2.5, 5.0, 8.0]
    assert m.merge_size(size).tolist() == [[4.0, 1.0, 2.0]]
    assert m.merge_size().tolist() == [[2.0, 1.0, 2.0]]
    y, ys = m.merge_wavg(x, size)
    assert y.flatten().tolist() == [2.5, 5.0, 8.0] and ys.tolist() == [[4.0, 1.0, 2.0]]
    assert m.unmerge(torch.tensor([[[10.0], [20.0], [30.0]]])).flatten().tolist() == [
        10.0,
        10.0,
        20.0,
        30.0,
        30.0,
    ]
    src = m.merge_source()
    assert src.dtype == torch.bool
    assert src.int().tolist() == [[[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]]
    # chaining: merge again 2 -> 0
    m2 = merge_from_targets(torch.tensor([[0, 0, 2]]))
    assert m2.merge_source(src).int().tolist() == [[[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]]]


def test_merge_identity_keep_all():
    x = torch.randn(2, 7, 3)
    m = Merge.identity(2, 7)
    assert torch.equal(m.merge(x), x)
    assert torch.equal(m.merge(x, "wavg"), x)
    assert torch.equal(m.unmerge(x), x)
    assert torch.equal(m.merge_size(), torch.ones(2, 7))


def test_merge_bad_input():
    with pytest.raises(ValueError, match="dst_of"):
        Merge(keep_idx=torch.tensor([[0, 1]]), dst_of=torch.tensor([[0, 2, 1]]))
    with pytest.raises(TypeError, match="keep_idx"):
        Merge(keep_idx=torch.tensor([[0.0, 1.0]]), dst_of=torch.tensor([[0, 1]]))
    m = Merge.identity(1, 4)
    with pytest.raises(ValueError, match="mode"):
        m.merge(torch.randn(1, 4, 2), "median")
    with pytest.raises(ValueError, match="x"):
        m.merge(torch.randn(1, 5, 2))
    with pytest.raises(TypeError, match="target"):
        merge_from_targets(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="target"):
        merge_from_targets(torch.tensor([[1, 2, 2]]))  # chain 0 -> 1 -> 2


# ---------------------------------------------------------------- ToMe
def test_bipartite_known_answer():
    # A = {0, 2, 4}, B = {1, 3, 5}; token 2 duplicates token 5 exactly
    metric = torch.tensor(
        [[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [-1.0, 0, 0], [0, 0, 1.0]]]
    )
    m = bipartite_soft_matching(metric, r=1)
    assert m.keep_idx.tolist() == [[0, 1, 3, 4, 5]]
    assert m.dst_of[0, 2].item() == 4  # slot of token 5
    m2 = bipartite_soft_matching(metric, r=2)
    # next best edge: token 0 -> token 3 (cos 0.707)
    assert m2.keep_idx.tolist() == [[1, 3, 4, 5]]
    assert m2.dst_of[0, 0].item() == 1


def test_bipartite_protect_first():
    torch.manual_seed(0)
    metric = torch.randn(2, 11, 4)
    m = bipartite_soft_matching(metric, r=100, protect_first=3)
    _check_merge_invariants(m, 11)
    for b in range(2):
        # protected tokens keep their own slot and nobody merges into them
        for i in range(3):
            assert m.keep_idx[b, i].item() == i
            assert int((m.dst_of[b] == i).sum()) == 1
    # r is clipped to |A| = even indices >= 3: 4, 6, 8, 10
    assert m.num_kept == 11 - 4


def test_bipartite_r_zero_and_half():
    x = torch.randn(1, 6, 4).half()
    assert bipartite_soft_matching(x, 0).num_kept == 6
    m = bipartite_soft_matching(x, 3)
    assert m.num_kept == 3
    assert m.merge(x).dtype == torch.float16
    m = bipartite_soft_matching(x.bfloat16(), 2)
    assert m.merge(x.bfloat16(), "wavg").dtype == torch.bfloat16


def test_bipartite_caps_r_at_half_like_tome():
    # ToMe: r = min(r, (t - protected) // 2). With N=5, A = {0, 2, 4} has 3 tokens but
    # only 2 may merge (the 50 % cap), so 3 tokens survive, not 2.
    metric = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    assert bipartite_soft_matching(metric, r=3).num_kept == 3
    assert bipartite_soft_matching(metric, r=3, protect_first=1).num_kept == 3
    assert bipartite_soft_matching(metric, r=3, protect_first=2).num_kept == 4
    assert bipartite_soft_matching(metric[:, :2], r=1, protect_first=1).num_kept == 2


def test_bipartite_bad_input():
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching(torch.randn(4, 3), 1)
    with pytest.raises(TypeError, match="metric"):
        bipartite_soft_matching(torch.ones(1, 4, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="r"):
        bipartite_soft_matching(torch.randn(1, 4, 3), -1)
    with pytest.raises(ValueError, match="protect_first"):
        bipartite_soft_matching(torch.randn(1, 4, 3), 1, protect_first=5)
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching(torch.full((1, 4, 3), float("nan")), 1)


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 24),
    r=st.integers(0, 30),
    p=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_bipartite_properties(b, n, r, p, seed):
    p = min(p, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, 5, generator=g)
    x = torch.randn(b, n, 3, generator=g)
    size = torch.rand(b, n, generator=g) + 0.5
    m = bipartite_soft_matching(metric, r, protect_first=p)
    _check_merge_invariants(m, n)
    n_a = len(range(p + p % 2, n, 2))
    assert m.num_kept == n - min(r, (n - p) // 2)  # ToMe's cap: at most half
    assert min(r, (n - p) // 2) <= n_a
    # merging preserves the size-weighted sum
    y = m.merge(x, "wavg", size=size)
    ms = m.merge_size(size)
    torch.testing.assert_close((y * ms[..., None]).sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(ms.sum(1), size.sum(1))
    # unmerge(merge(x)) has the original shape and equals x where nothing merged
    back = m.unmerge(m.merge(x))
    assert back.shape == x.shape
    alone = m.merge_size()[torch.arange(b)[:, None], m.dst_of] == 1
    torch.testing.assert_close(back[alone], x[alone])
    # source map partitions the originals
    assert torch.equal(m.merge_source().sum(1), torch.ones(b, n, dtype=torch.long))


# ---------------------------------------------------------------- FastVGGT
def test_grid_partition_known_layout():
    h, w, s = 5, 3, 2
    dst, src = grid_random_partition(3, s + h * w, s, (h, w), generator=33, batch=2)
    p = s + h * w
    assert dst.shape[0] == src.shape[0] == 2
    for b in range(2):
        d = set(dst[b].tolist())
        assert set(range(p)) <= d  # frame 0 all dst
        for f in (1, 2):
            base = f * p
            assert {base, base + 1} <= d  # special tokens
            patches = sorted(i - base - s for i in d if base + s <= i < base + p)
            # one per 2x2 cell, 3 x 2 cells (partial cells at the bottom / right)
            cells = sorted((q // w // 2, q % w // 2) for q in patches)
            assert cells == [(cy, cx) for cy in range(3) for cx in range(2)]
        allidx = torch.cat([dst[b], src[b]]).sort().values
        assert torch.equal(allidx, torch.arange(3 * p))


def test_grid_partition_seed_and_options():
    kw = dict(num_frames=4, tokens_per_frame=5 + 28 * 37, num_special=5, grid_hw=(28, 37))
    a = grid_random_partition(**kw, generator=33)
    b = grid_random_partition(**kw, generator=torch.Generator().manual_seed(33))
    c = grid_random_partition(**kw, generator=34)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # 14 x 19 cells per frame
    assert a[0].shape[1] == (5 + 28 * 37) + 3 * (5 + 14 * 19)
    d, _ = grid_random_partition(**kw, randomize=False, first_frame_all_dst=False)
    assert d.shape[1] == 4 * (5 + 14 * 19)
    assert (5 + 0) in d[0].tolist() and (5 + 2) in d[0].tolist()  # top-left of cells


def test_grid_partition_bad_input():
    with pytest.raises(ValueError, match="tokens_per_frame"):
        grid_random_partition(2, 10, 1, (3, 4))
    with pytest.raises(ValueError, match="num_frames"):
        grid_random_partition(0, 13, 1, (3, 4))
    with pytest.raises(TypeError, match="generator"):
        grid_random_partition(2, 13, 1, (3, 4), generator="x")
    with pytest.raises(ValueError, match="cell"):
        grid_random_partition(2, 13, 1, (3, 4), cell=(0, 2))


def test_match_src_to_dst_known_answer():
    metric = torch.tensor([[[1.0, 0], [0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]]])
    dst = torch.tensor([0, 1])
    src = torch.tensor([2, 3, 4])
    m = match_src_to_dst(metric, dst, src)
    assert m.keep_idx.tolist() == [[0, 1]]
    assert m.dst_of.tolist() == [[0, 1, 0, 1, 0]]
    prot = torch.tensor([[False, False, False, True, False]])
    m = match_src_to_dst(metric, dst, src, protected=prot)
    assert m.keep_idx.tolist() == [[0, 1, 3]]
    assert m.dst_of.tolist() == [[0, 1, 0, 2, 0]]
    x = torch.arange(5.0)[None, :, None]
    assert m.merge(x).flatten().tolist() == [2.0, 1.0, 3.0]  # (0 + 2 + 4) / 3


def test_match_src_to_dst_chunked_equals_full():
    g = torch.Generator().manual_seed(0)
    dst, src = grid_random_partition(5, 2 + 6 * 7, 2, (6, 7), generator=g, batch=2)
    metric = torch.randn(2, 5 * 44, 16, generator=g)
    full = match_src_to_dst(metric, dst, src)
    for cs in (1, 7, 1000):
        part = match_src_to_dst(metric, dst, src, chunk_size=cs)
        assert torch.equal(full.dst_of, part.dst_of)
    _check_merge_invariants(full, 220)
    assert full.num_kept == dst.shape[1]
    low = match_src_to_dst(metric.half(), dst, src, compute_dtype=torch.bfloat16, chunk_size=50)
    agree = (low.dst_of == full.dst_of).float().mean()
    assert agree > 0.9
    assert low.merge(metric.half()).dtype == torch.float16


def test_match_src_to_dst_bad_input():
    with pytest.raises(ValueError, match="protected"):
        match_src_to_dst(
            torch.randn(2, 4, 2),
            torch.tensor([[0, 1], [0, 2]]),
            torch.tensor([[2, 3], [1, 3]]),
            protected=torch.tensor([False, True, False, False]),
        )
    metric = torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match="disjoint"):
        match_src_to_dst(metric, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="src_idx"):
        match_src_to_dst(metric, torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(TypeError, match="protected"):
        match_src_to_dst(metric, torch.tensor([0]), torch.tensor([1]), protected=torch.ones(5))
    with pytest.raises(ValueError, match="chunk_size"):
        match_src_to_dst(metric, torch.tensor([0]), torch.tensor([1]), chunk_size=0)
    with pytest.raises(TypeError, match="compute_dtype"):
        match_src_to_dst(metric, torch.tensor([0]), torch.tensor([1]), compute_dtype=torch.int8)
    bad = metric.clone()
    bad[0, 3, 0] = float("nan")  # a NaN would silently send token 3 to dst slot 0
    with pytest.raises(ValueError, match="metric"):
        match_src_to_dst(bad, torch.tensor([0, 1]), torch.tensor([2, 3, 4]))


@SETTINGS
@given(
    f=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    s=st.integers(0, 3),
    b=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_match_properties(f, h, w, s, b, seed):
    p = s + h * w
    g = torch.Generator().manual_seed(seed)
    dst, src = grid_random_partition(f, p, s, (h, w), generator=g, batch=1)
    dst, src = dst.expand(b, -1), src.expand(b, -1)  # protected needs one partition
    metric = torch.randn(b, f * p, 4, generator=g)
    x = torch.randn(b, f * p, 3, generator=g)
    prot = torch.zeros(f * p, dtype=torch.bool)
    prot[::3] = True
    m = match_src_to_dst(metric, dst, src, protected=prot, chunk_size=5)
    _check_merge_invariants(m, f * p)
    # dst and protected tokens are kept
    kept = torch.zeros(b, f * p, dtype=torch.bool)
    kept.scatter_(1, m.keep_idx, True)
    assert bool(kept.gather(1, dst).all()) and bool(kept[:, prot].all())
    # every non-kept token merges into a dst token with maximal similarity
    mn = torch.nn.functional.normalize(metric, dim=-1)
    for bb in range(b):
        for i in (~kept[bb]).nonzero().flatten().tolist():
            holder = m.keep_idx[bb, m.dst_of[bb, i]]
            sims = mn[bb, dst[bb]] @ mn[bb, i]
            assert (mn[bb, holder] @ mn[bb, i]) >= sims.max() - 1e-5
    torch.testing.assert_close(m.merge(x, "sum").sum(1), x.sum(1))


def test_match_src_to_dst_top_r_cut_breaks_ties_toward_lower_src():
    # src 2, 3, 5 are exact copies of dst 0 (similarity 1, a three-way tie); src 4 is
    # close to dst 1; r = 2 merges the two lowest src positions of the tie
    metric = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.1, 1.0], [1.0, 0.0]]]
    )
    dst, src = torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5])
    m = match_src_to_dst(metric, dst, src, r=2)
    target = m.keep_idx[0][m.dst_of[0]]
    assert target.tolist() == [0, 1, 0, 0, 4, 5]
    # the same cut as ToMe's matcher: one rule for both
    assert match_src_to_dst(metric, dst, src, r=4).num_kept == 2
    assert match_src_to_dst(metric, dst, src, r=0).num_kept == 6
    prot = torch.tensor([False, False, True, False, False, False])
    m = match_src_to_dst(metric, dst, src, protected=prot, r=2)
    assert (m.keep_idx[0][m.dst_of[0]]).tolist() == [0, 1, 2, 0, 4, 0]
    with pytest.raises(ValueError, match="r must"):
        match_src_to_dst(metric, dst, src, r=-1)


@pytest.mark.parametrize("seed", range(4))
def test_match_src_to_dst_subset_matching_equals_full(seed):
    """Matching only the unprotected src (shared src_idx) gives the plan of matching all
    src and masking the protected ones (per-row protection, 2-D src_idx)."""
    g = torch.Generator().manual_seed(seed)
    b, n = 2, 40
    metric = torch.randn(b, n, 8, generator=g).round()  # coarse values: many ties
    dst, src = torch.arange(0, n, 3), torch.tensor([i for i in range(n) if i % 3])
    prot = torch.rand(n, generator=g) < 0.3
    for r in (None, 5, 20):
        fast = match_src_to_dst(metric, dst, src, protected=prot, r=r, chunk_size=7)
        full = match_src_to_dst(
            metric, dst.expand(b, -1), src.expand(b, -1), protected=prot.expand(b, n), r=r
        )
        assert torch.equal(fast.keep_idx, full.keep_idx) and torch.equal(fast.dst_of, full.dst_of)
