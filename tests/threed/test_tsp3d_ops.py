"""Known-answer tests of the spconv ops and the TGP / CBA modules of threed.tsp3d."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

pytest.importorskip("spconv")

from threed.tsp3d import CompletionAddition, TextGuidedPruning, keep_targets  # noqa: E402
from threed.tsp3d.sparse import (  # noqa: E402
    MEStridedConv,
    MEStrideShortcut,
    features_at,
    generative_upsample,
    interpolate_coarse,
    lookup,
    make_tensor,
    me_downsample_coords,
    spconv_modules,
    voxelize,
    voxels_to_points,
)


def _set(indices):
    return {tuple(r) for r in indices.tolist()}


def _tensor(coords, feats=None, shape=(16, 16, 16), batch=None):
    idx = torch.tensor(coords, dtype=torch.int32)
    if idx.shape[1] == 3:
        b = torch.zeros(idx.shape[0], 1, dtype=torch.int32) if batch is None else batch
        idx = torch.cat([b, idx], 1)
    f = torch.ones(idx.shape[0], 1) if feats is None else feats
    return make_tensor(f, idx, list(shape), int(idx[:, 0].max()) + 1)


def _upconv(cin=1, cout=1):
    spconv, native = spconv_modules()
    return spconv.SparseConvTranspose3d(cin, cout, 3, 2, padding=1, bias=False, algo=native)


def test_generative_upsample_makes_27_children_and_resets_shape():
    x = _tensor([[4, 5, 6]])
    y = generative_upsample(x, _upconv())
    want = {(0, 8 + a, 10 + b, 12 + c) for a, b, c in itertools.product((-1, 0, 1), repeat=3)}
    assert _set(y.indices) == want
    assert list(y.spatial_shape) == [32, 32, 32]


def test_generative_upsample_union_of_neighbours_without_duplicates():
    x = _tensor([[4, 4, 4], [5, 4, 4]])
    y = generative_upsample(x, _upconv())
    want = {
        (0, 2 * i + a, 8 + b, 8 + c)
        for i in (4, 5)
        for a, b, c in itertools.product((-1, 0, 1), repeat=3)
    }
    assert _set(y.indices) == want and y.indices.shape[0] == len(want) == 45


def test_generative_upsample_sums_overlapping_parents():
    spconv, native = spconv_modules()
    conv = _upconv()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = _tensor([[4, 4, 4], [5, 4, 4]], feats=torch.tensor([[1.0], [10.0]]))
    y = generative_upsample(x, conv)
    f = features_at(y, torch.tensor([[0, 9, 8, 8], [0, 7, 8, 8], [0, 11, 8, 8]]))
    assert f.squeeze(1).tolist() == [11.0, 1.0, 10.0]  # shared child gets both parents


def test_stride2_conv_reproduces_me_coordinate_set():
    coords = [[3, 4, 4], [4, 4, 4], [7, 2, 9], [8, 8, 8], [9, 9, 9]]
    x = _tensor(coords)
    spconv, native = spconv_modules()
    raw = spconv.SparseConv3d(1, 1, 3, 2, padding=1, bias=False, algo=native)(x)
    me = MEStridedConv(1, 1)(x)
    floor = {(0, a // 2, b // 2, c // 2) for a, b, c in coords}
    assert _set(me.indices) == floor
    assert _set(raw.indices) > floor  # spconv's own set is a strict superset
    assert _set(me_downsample_coords(x.indices)) == floor
    pool = spconv.SparseMaxPool3d(2, 2, algo=native)(x)
    assert _set(pool.indices) == floor


def test_strided_conv_kernel_footprint_matches_me():
    # ME: output o reads inputs 2o + {-1, 0, 1}; input 3 reaches output 1 and (spconv) 2
    conv = MEStridedConv(1, 1)
    with torch.no_grad():
        conv.conv.weight.fill_(1.0)
    x = _tensor([[2, 2, 2], [3, 2, 2], [5, 2, 2]], feats=torch.tensor([[1.0], [2.0], [4.0]]))
    y = conv(x)
    f = features_at(y, torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1]]))
    assert f.squeeze(1).tolist() == [3.0, 6.0]  # o=1: inputs 2,3 ; o=2: inputs 3,5


def test_stride2_shortcut_reads_even_child_only():
    sc = MEStrideShortcut(1, 1)
    with torch.no_grad():
        sc.linear.weight.fill_(1.0)
    x = _tensor([[4, 4, 4], [5, 4, 4], [7, 7, 7]], feats=torch.tensor([[1.0], [2.0], [3.0]]))
    out_idx = me_downsample_coords(x.indices)
    f = sc(x, out_idx)
    got = {tuple(i): v for i, v in zip(out_idx.tolist(), f.squeeze(1).tolist())}
    assert got == {(0, 2, 2, 2): 1.0, (0, 3, 3, 3): 0.0}  # odd-only voxel -> zero


def test_features_at_hash_join_zero_where_absent_and_batch_aware():
    idx = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 3], [0, 5, 5, 5]], dtype=torch.int32)
    x = make_tensor(torch.tensor([[1.0, 1], [2, 2], [3, 3]]), idx, [8, 8, 8], 2)
    q = torch.tensor([[1, 1, 2, 3], [0, 5, 5, 5], [0, 1, 2, 4], [1, 5, 5, 5]])
    assert features_at(x, q).tolist() == [[2, 2], [3, 3], [0, 0], [0, 0]]
    assert lookup(idx, q, [8, 8, 8]).tolist() == [1, 2, -1, -1]


def test_interpolate_coarse_on_grid_and_halfway():
    coarse = torch.tensor([[0, 2, 2, 2], [0, 3, 2, 2]], dtype=torch.int32)
    f = torch.tensor([[4.0], [8.0]])
    fine = torch.tensor([[0, 4, 4, 4], [0, 5, 4, 4], [0, 7, 4, 4], [0, 4, 5, 4]])
    got = interpolate_coarse(f, coarse, [8, 8, 8], fine).squeeze(1).tolist()
    # on grid: 4; between 2 and 3: 6; between 3 and absent 4: 4; y halfway, neighbour absent: 2
    assert got == [4.0, 6.0, 4.0, 2.0]
    # ME weights prod(1 - |q - n| / s): x and y halfway -> 0.25 per corner, absent skipped
    two_axes = torch.tensor([[0, 5, 5, 4]])
    assert interpolate_coarse(f, coarse, [8, 8, 8], two_axes).item() == 0.25 * 4 + 0.25 * 8


def test_voxelize_round_trip_and_errors():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(500, 3, generator=g) * 2
    v = voxelize(pts, None, 0.1)
    back = voxels_to_points(v, v.features)  # mean xyz of each point's voxel
    assert torch.all((back - pts).abs() < 0.1 + 1e-6)
    cell = (v.origin + v.indices[:, 1:].float() * 0.1)[v.point_to_voxel]
    assert torch.all(pts >= cell - 1e-5) and torch.all(pts < cell + 0.1 + 1e-5)
    assert all(s % 64 == 0 for s in v.spatial_shape)
    assert int(v.indices[:, 1:].min()) >= 64  # one empty coarsest cell below the scene
    with pytest.raises(ValueError):
        voxelize(torch.zeros(0, 3), None, 0.1)
    with pytest.raises(ValueError):
        voxelize(torch.zeros(5, 3), None, 0.1)  # single voxel


def test_keep_targets_cube_strict():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [1.05, 0, 0], [0, 0, 0]])
    b = torch.tensor([0, 0, 0, 1])
    got = keep_targets(pos, b, [torch.tensor([[0.0, 0, 0]]), torch.zeros(0, 3)], 1.04)
    assert got.tolist() == [True, True, False, False]


# ---------------------------------------------------------------- TGP / CBA
D = 8


def _grid(n=10, stride_m=0.64):
    ijk = torch.stack(
        torch.meshgrid(*[torch.arange(1, n + 1)] * 2, torch.arange(1, 3), indexing="ij"), -1
    ).reshape(-1, 3)
    idx = torch.cat([torch.zeros(ijk.shape[0], 1, dtype=torch.long), ijk], 1).to(torch.int32)
    pos = ijk.float() * stride_m
    return idx, pos


def _forced_tgp(**kw):
    """num_layers=0: BiEncoder is the identity; the keep head reads channel 0 so the
    logit field is what the test writes into the features."""
    tgp = TextGuidedPruning(
        d_model=D, n_heads=2, dim_feedforward=D, dropout=0.0, num_layers=0, **kw
    ).eval()
    with torch.no_grad():
        tgp.keep_head.weight.zero_()
        tgp.keep_head.weight[0, 0] = 1.0
        tgp.keep_head.bias.zero_()
    return tgp


def _text():
    return torch.zeros(1, 3, D), torch.zeros(1, 3, dtype=torch.bool)


def test_tgp_threshold_keeps_target_and_drops_far_voxels():
    idx, pos = _grid()
    target = torch.tensor([3.2, 3.2, 0.64])
    dist = (pos - target).norm(dim=1)
    feats = torch.zeros(idx.shape[0], D)
    feats[:, 0] = (dist - 1.0) * 8.0  # logit = P(prune): negative near the target
    x = make_tensor(feats, idx, [16, 16, 16], 1)
    tgp = _forced_tgp(threshold=0.7)
    x_enc, logits, _ = tgp.score(x, pos, *_text())
    kept, mask = tgp.prune_coarse(x_enc, logits)
    near, far = dist < 0.9, dist > 1.1
    assert mask[near].all() and not mask[far].any()
    assert kept.features.shape[0] == int(mask.sum())
    # thresholds are tunable at run time: a looser one keeps more
    _, mask2 = tgp.prune_coarse(x_enc, logits, threshold=0.01)
    assert int(mask2.sum()) > int(mask.sum())


def test_tgp_training_topk_after_upsampling_keeps_target_children():
    idx, pos = _grid()
    target = torch.tensor([3.2, 3.2, 0.64])
    dist = (pos - target).norm(dim=1)
    logits = (dist - 1.0) * 8.0
    coarse = make_tensor(torch.zeros(idx.shape[0], D), idx, [16, 16, 16], 1)
    children = generative_upsample(coarse, _upconv(D, D))
    tgp = _forced_tgp(train_topk=200)
    kept, mask = tgp.prune_children(children, coarse, logits, 200)
    assert kept.features.shape[0] == 200
    target_child = torch.tensor([[0, 10, 10, 2]])  # child at 2 * (5, 5, 1): the target voxel
    assert lookup(kept.indices, target_child, kept.spatial_shape).item() >= 0
    far_child = torch.tensor([[0, 20, 20, 2]])
    assert lookup(kept.indices, far_child, kept.spatial_shape).item() == -1
    g = torch.Generator().manual_seed(0)
    ks = {
        TextGuidedPruning(train_topk=(1200, 4000), d_model=D, n_heads=2, num_layers=0).draw_topk(g)
        for _ in range(20)
    }
    assert all(1200 <= k < 4000 for k in ks) and len(ks) > 1


def test_tgp_fallback_when_nothing_survives(caplog):
    idx, pos = _grid(4)
    feats = torch.zeros(idx.shape[0], D)
    feats[:, 0] = 5.0 + torch.arange(idx.shape[0]).float() * 0.01  # everything "prune"
    x = make_tensor(feats, idx, [16, 16, 16], 1)
    tgp = _forced_tgp(threshold=0.7, fallback_topk=3)
    x_enc, logits, _ = tgp.score(x, pos, *_text())
    with caplog.at_level(logging.WARNING):
        kept, mask = tgp.prune_coarse(x_enc, logits)
    assert int(mask.sum()) == 3 and mask[:3].all()  # the three lowest P(prune)
    assert "keeping the top 3" in caplog.text


def test_tgp_score_polarity_and_subsample_determinism():
    idx, pos = _grid()
    x = make_tensor(torch.randn(idx.shape[0], D), idx, [16, 16, 16], 1)
    tgp = _forced_tgp(max_train_voxels=50).train()
    a, la, _ = tgp.score(x, pos, *_text(), generator=torch.Generator().manual_seed(3))
    b, lb, _ = tgp.score(x, pos, *_text(), generator=torch.Generator().manual_seed(3))
    c, _, _ = tgp.score(x, pos, *_text(), generator=torch.Generator().manual_seed(4))
    assert a.features.shape[0] == 50
    assert torch.equal(a.indices, b.indices) and torch.equal(la, lb)
    assert not torch.equal(a.indices, c.indices)


def _forced_cba(**kw):
    cba = CompletionAddition(
        d_model=D, n_heads=2, dim_feedforward=D, dropout=0.0, num_layers=0, **kw
    ).eval()
    with torch.no_grad():
        cba.head.weight.zero_()
        cba.head.weight[0, 0] = 1.0
        cba.head.bias.zero_()
    return cba


def test_cba_restores_removed_target_voxels_without_duplicates():
    idx, pos = _grid()
    target = torch.tensor([3.2, 3.2, 0.64])
    dist = (pos - target).norm(dim=1)
    feats = torch.zeros(idx.shape[0], D)
    feats[:, 0] = torch.where(dist < 0.7, 10.0, -10.0)  # completion logit: target voxels
    backbone = make_tensor(feats, idx, [16, 16, 16], 1)
    # pruning removed the target (and kept some far voxels + one target voxel)
    tv = torch.nonzero(dist < 0.7).squeeze(1)
    keep_rows = torch.cat([torch.nonzero(dist > 3).squeeze(1), tv[:1]])
    pruned = make_tensor(torch.ones(keep_rows.numel(), D) * 7, idx[keep_rows], [16, 16, 16], 1)
    cba = _forced_cba(threshold=0.15, num_candidates=10_000)
    union, info, _ = cba(pruned, backbone, pos, *_text(), generator=torch.Generator())
    assert lookup(union.indices, idx[tv], union.spatial_shape).ge(0).all()
    assert union.indices.shape[0] == torch.unique(union.indices, dim=0).shape[0]
    assert union.indices.shape[0] == keep_rows.numel() + tv.numel() - 1
    added = info["added"]
    assert int(added.sum()) == tv.numel() - 1
    # added voxels carry their (text-enhanced) candidate features
    f = features_at(union, idx[tv[1:]])
    assert torch.allclose(f, feats[tv[1:]])
    assert torch.equal(features_at(union, idx[tv[:1]]), torch.ones(1, D) * 7)


def test_cba_sampling_is_seeded():
    idx, pos = _grid(20)
    backbone = make_tensor(torch.randn(idx.shape[0], D), idx, [32, 32, 32], 1)
    pruned = make_tensor(torch.zeros(1, D), idx[:1], [32, 32, 32], 1)
    cba = _forced_cba(num_candidates=100)
    r1 = cba(pruned, backbone, pos, *_text(), generator=torch.Generator().manual_seed(7))[1]
    r2 = cba(pruned, backbone, pos, *_text(), generator=torch.Generator().manual_seed(7))[1]
    r3 = cba(pruned, backbone, pos, *_text(), generator=torch.Generator().manual_seed(8))[1]
    assert r1["sampled"].numel() == 100
    assert torch.equal(r1["sampled"], r2["sampled"]) and torch.equal(r1["logits"], r2["logits"])
    assert not torch.equal(r1["sampled"], r3["sampled"])


def test_module_argument_validation():
    with pytest.raises(ValueError, match="threshold"):
        TextGuidedPruning(d_model=D, n_heads=2, threshold=1.5)
    with pytest.raises(ValueError, match="train_topk"):
        TextGuidedPruning(d_model=D, n_heads=2, train_topk=(4000, 1200))
    with pytest.raises(ValueError, match="num_candidates"):
        CompletionAddition(d_model=D, n_heads=2, num_candidates=0)


def test_unique_coords_matches_torch_unique():
    from threed.tsp3d.sparse import unique_coords

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (300, 4), generator=g).to(torch.int32)
    assert torch.equal(unique_coords(idx), torch.unique(idx, dim=0))


def test_transposed_conv_at_matches_generative_upsample_rows():
    from threed.tsp3d.sparse import transposed_conv_at

    g = torch.Generator().manual_seed(0)
    idx = torch.unique(torch.randint(1, 7, (40, 3), generator=g), dim=0)
    x = _tensor(idx.tolist(), feats=torch.randn(idx.shape[0], 4, generator=g))
    conv = _upconv(4, 5)
    y = generative_upsample(x, conv)
    rows = torch.randperm(y.indices.shape[0], generator=g)[:50]
    got = transposed_conv_at(x, conv, y.indices[rows])
    assert torch.allclose(got, y.features[rows], atol=1e-5)


def test_bi_encoder_vision_cross_attention_reads_text_before_its_update():
    """Official ``CrossAttentionLayer``: voxels attend to the text as it was before the
    text -> voxel update, so the text branch's cross-attention / FFN cannot reach them."""
    from threed.tsp3d.pruning import BiEncoderLayer

    torch.manual_seed(0)
    layer = BiEncoderLayer(d_model=8, n_heads=2, dim_feedforward=8, dropout=0.0).eval()
    vis, pos, txt = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    vis_pad = torch.zeros(2, 5, dtype=torch.bool)
    txt_pad = torch.tensor([[False, False, True], [False, False, False]])
    v1, t1 = layer(vis, pos, vis_pad, txt, txt_pad)
    with torch.no_grad():
        for p in [*layer.cross_lv.parameters(), *layer.ffn_lv.parameters()]:
            p.add_(torch.randn_like(p))
    v2, t2 = layer(vis, pos, vis_pad, txt, txt_pad)
    assert not torch.allclose(t1, t2)  # the text branch did change
    assert torch.allclose(v1, v2, atol=1e-6)


def test_lookup_into_empty_source_stays_on_query_device():
    q = torch.tensor([[0, 1, 1, 1]], dtype=torch.int32)
    got = lookup(torch.zeros(0, 4, dtype=torch.int32), q, [4, 4, 4])
    assert got.tolist() == [-1] and got.device == q.device and got.dtype == torch.long
