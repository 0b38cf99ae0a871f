"""FastVGGT token merging on the project's VGGT (and upstream vggt when installed)."""

from __future__ import annotations

import pytest
import torch

from threed.vggt import VGGT, TokenMerging, VGGTConfig, build_plan, dst_mask
from threed.vggt.layers import Attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VGGT(VGGTConfig.small()).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 3, 70, 84, generator=g)  # 5 x 6 patch grid, odd height


def _run(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"start_block": -1}, "start_block"),
        ({"protect": "top"}, "protect"),
        ({"protect_share": 1.0}, "protect_share"),
        ({"chunk": 0}, "chunk"),
        ({"sim_dtype": "int8"}, "sim_dtype"),
        ({"faithful_grid": 1}, "faithful_grid"),
    ],
)
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenMerging(**kwargs)


def test_ratio_zero_is_identical(model, images):
    ref = _run(model, images)
    with TokenMerging(ratio=0.0).apply(model) as h:
        out = _run(model, images)
        assert h.kept_ratio == 1.0
    for key in ("depth", "depth_conf", "world_points", "pose_enc"):
        assert torch.equal(ref[key], out[key]), key


def test_merging_runs_with_autograd_on(model, images):
    """The README's bare ``model(images)`` (no no_grad): same outputs, and a backward."""
    with TokenMerging(ratio=0.9).apply(model):
        ref = _run(model, images)
        out = model(images)
    assert out["depth"].requires_grad
    for key in ("depth", "world_points", "pose_enc"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0, msg=key)
    out["depth"].sum().backward()
    assert any(p.grad is not None for p in model.aggregator.global_blocks.parameters())
    model.zero_grad(set_to_none=True)


def test_merging_changes_then_remove_restores(model, images):
    ref = _run(model, images)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cls_forward = Attention.forward
    handle = TokenMerging(ratio=0.9).apply(model)
    out = _run(model, images)
    assert not torch.equal(ref["depth"], out["depth"])
    assert 0.0 < handle.kept_ratio < 1.0
    assert len(handle.stats) == model.config.depth
    assert Attention.forward is cls_forward  # instances only, never the class
    handle.remove()
    handle.remove()  # idempotent
    for blk in model.aggregator.global_blocks:
        assert "forward" not in blk.attn.__dict__
        assert not any(k.startswith("_hp_") for k in blk.attn.__dict__)
    assert not model.aggregator._forward_pre_hooks
    after = _run(model, images)
    assert torch.equal(ref["depth"], after["depth"])
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_apply_twice_and_other_instances_untouched(model, images):
    other = VGGT(VGGTConfig.small()).eval()
    ref_other = _run(other, images)
    h1 = TokenMerging(ratio=0.9).apply(model)
    h2 = TokenMerging(ratio=0.2, protect=None).apply(model)
    assert not h1.active and h2.active
    assert len(model.aggregator._forward_pre_hooks) == 1
    assert torch.equal(_run(other, images)["depth"], ref_other["depth"])
    _run(model, images)
    assert all(s["merged"] == int(s["tokens"] * 0.2) for s in h2.stats)
    h2.remove()
    assert "forward" not in model.aggregator.global_blocks[0].attn.__dict__


def test_same_seed_same_output_and_start_block(model, images):
    with TokenMerging(ratio=0.9, start_block=1).apply(model) as h:
        a = _run(model, images)
        assert [s["merged"] > 0 for s in h.stats] == [True]  # only block 1 of 2 is patched
        b = _run(model, images)
    assert torch.equal(a["depth"], b["depth"])


def _twin_model():
    torch.manual_seed(0)
    m = VGGT(VGGTConfig.small()).eval()
    with torch.no_grad():  # frame 0's own camera/register tokens = the others'
        m.aggregator.camera_token[:, 1] = m.aggregator.camera_token[:, 0]
        m.aggregator.register_token[:, 1] = m.aggregator.register_token[:, 0]
    return m


@pytest.mark.parametrize("protect", [None, "stride"])
def test_duplicated_frame_merges_into_its_twin(protect):
    model = _twin_model()
    g = torch.Generator().manual_seed(5)
    frame = torch.rand(3, 70, 84, generator=g)
    images = torch.stack([frame, frame])[None]  # frame 1 is an exact copy of frame 0
    ref = _run(model, images)
    tm = TokenMerging(ratio=0.9, protect=protect, sim_dtype="float32")
    with tm.apply(model) as h:
        out = _run(model, images)
        plan = h.last_plan
    tpf = 5 + 5 * 6
    m = plan.merge
    kept_orig = m.keep_idx[0]
    target = kept_orig[m.dst_of[0]]  # original index each token was merged into
    merged = (target != torch.arange(2 * tpf)).nonzero()[:, 0]
    assert merged.numel() > 0
    assert bool((merged >= tpf + 5).all())  # only frame-1 patches merge
    assert torch.equal(target[merged], merged - tpf)  # ... each into its twin in frame 0
    if protect is None:  # every frame-1 patch that is not dst merged
        is_dst = dst_mask(2, (5, 6), 5, 33, False)
        assert merged.numel() == int((~is_dst).sum())
    for key in ("depth", "world_points", "pose_enc"):
        torch.testing.assert_close(out[key][0, 1], out[key][0, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref[key][0, 1], ref[key][0, 0], rtol=1e-4, atol=1e-5)


def test_default_grid_one_dst_per_cell_any_size():
    h, w, s = 5, 7, 3
    mask = dst_mask(s, (h, w), 5, 33, False).reshape(s, 5 + h * w)
    assert bool(mask[0].all()) and bool(mask[:, :5].all())
    for f in range(1, s):
        grid = mask[f, 5:].reshape(h, w)
        for cy in range(0, h, 2):
            for cx in range(0, w, 2):
                assert int(grid[cy : cy + 2, cx : cx + 2].sum()) == 1
    again = dst_mask(s, (h, w), 5, 33, False)
    assert torch.equal(mask.reshape(-1), again)


def test_faithful_grid_reproduces_official_drift():
    """Official 37 x 28 grid: cells laid out as 28 x 36 contiguously, so the
    last 28 patches of every frame are always src and rows drift by a column."""
    h, w, s = 28, 37, 4
    tpf = 5 + h * w
    for seed in (33, 7):
        mask = dst_mask(s, (h, w), 5, seed, True).reshape(s, tpf)
        for f in range(1, s):
            patches = mask[f, 5:]
            assert int(patches.sum()) == 14 * 18
            assert not bool(patches[-28:].any())
            flat = patches[: 28 * 36].reshape(28, 36)  # the official layout
            cells = flat.reshape(14, 2, 18, 2).sum(dim=(1, 3))
            assert bool((cells == 1).all())
    # in the true 37-wide layout some 2x2 cells get 0 or 2 dst
    true_grid = mask[1, 5:].reshape(h, w)[:, :36].reshape(14, 2, 18, 2).sum(dim=(1, 3))
    assert bool((true_grid != 1).any())
    # even widths have no drift: faithful == corrected layout property
    even = dst_mask(3, (4, 6), 5, 33, True).reshape(3, 29)[1, 5:].reshape(2, 2, 3, 2)
    assert bool((even.sum(dim=(1, 3)) == 1).all())


def test_stride_protection_and_duplicates():
    torch.manual_seed(0)
    s, h, w = 3, 4, 4
    n = s * (5 + h * w)
    metric = torch.randn(1, n, 16)
    keys = torch.randn(1, 2, n, 8)
    plan = build_plan(TokenMerging(), metric, keys, (h, w), 5)
    step = n // int(n * 0.1)
    pidx = torch.arange(0, n, step)[: int(n * 0.1)]
    m = plan.merge
    target = m.keep_idx[0][m.dst_of[0]]
    assert torch.equal(target[pidx], pidx)  # protected tokens never merge
    is_dst = dst_mask(s, (h, w), 5, 33, False)
    assert torch.equal(plan.extra_idx, pidx[is_dst[pidx]])  # official duplicates
    unprotected_src = (~is_dst).clone()
    unprotected_src[pidx] = False
    assert plan.num_merged == int(unprotected_src.sum())
    assert plan.num_attended == n - plan.num_merged + plan.extra_idx.numel()
    plain = build_plan(TokenMerging(faithful_protect=False), metric, keys, (h, w), 5)
    assert plain.extra_idx.numel() == 0
    normed = build_plan(TokenMerging(protect="norm"), metric, keys, (h, w), 5)
    t2 = normed.merge.keep_idx[0][normed.merge.dst_of[0]]
    src = (~is_dst).nonzero()[:, 0]
    top = src[keys.norm(dim=-1).mean(1)[0, src].topk(int(n * 0.1)).indices]
    assert torch.equal(t2[top], top)
    small = build_plan(TokenMerging(ratio=0.2), metric, keys, (h, w), 5)
    assert small.num_merged == int(n * 0.2)


def test_upstream_vggt_aggregator_if_installed():
    agg_mod = pytest.importorskip("vggt.models.aggregator")
    torch.manual_seed(0)
    agg = agg_mod.Aggregator(
        img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, patch_embed="conv"
    ).eval()
    images = torch.rand(1, 3, 3, 56, 56)
    with torch.no_grad():
        ref = agg(images)[0][-1]
        with TokenMerging(ratio=0.0).apply(agg):
            same = agg(images)[0][-1]
        with TokenMerging(ratio=0.9).apply(agg) as h:
            merged = agg(images)[0][-1]
            assert h.kept_ratio < 1.0
        after = agg(images)[0][-1]
    assert torch.equal(ref, same) and torch.equal(ref, after)
    assert not torch.equal(ref, merged)


# Produced by running the official FastVGGT ``token_merge_bipartite2d`` (merging/merge.py,
# mystorm16/FastVGGT) on CPU with w=5, h=4, 3 frames, r=int(0.9N), protection on,
# generator seeded 33, on ``torch.manual_seed(0); torch.randn(1, 75, 16)``, with its bf16
# similarity swapped for float32 (bf16 ties resolve by an unstable argsort order that
# cannot be reproduced). Entry i: mean original index of the group token i ends up in
# after unmerge(merge(ids)) (a protected token reads its own raw copy).
_OFFICIAL_GROUP_MEANS = [
    0.0, 1.0, 30.0, 3.0, 45.2, 5.0, 6.0, 28.0, 24.5, 9.0, 10.0, 11.0, 12.0, 39.5, 14.0,
    15.0, 30.333333, 36.0, 39.0, 43.0, 20.0, 26.0, 39.5, 23.0, 24.0, 45.0, 51.5, 27.0, 28.0,
    34.0, 30.0, 26.0, 30.0, 30.333333, 39.0, 45.2, 44.0, 37.0, 38.0, 34.0, 40.0, 24.5,
    30.333333, 39.0, 44.0, 51.5, 52.0, 45.2, 34.0, 28.0, 50.0, 62.5, 44.0, 53.0, 58.5, 36.0,
    30.0, 39.5, 52.0, 59.0, 60.0, 39.0, 51.5, 58.5, 66.0, 45.0, 39.5, 43.0, 66.0, 45.2, 70.0,
    45.2, 61.0, 51.5, 62.5,
]  # fmt: skip


def test_faithful_plan_equals_official_run():
    torch.manual_seed(0)
    metric = torch.randn(1, 75, 16)
    cfg = TokenMerging(faithful_grid=True, sim_dtype="float32")
    plan = build_plan(cfg, metric, torch.zeros(1, 1, 75, 4), (4, 5), 5)
    ids = torch.arange(75, dtype=torch.float64)[None, :, None]
    means = plan.merge.unmerge(plan.merge.merge(ids, mode="mean"))[0, :, 0].clone()
    means[plan.extra_idx] = ids[0, plan.extra_idx, 0]
    expected = torch.tensor(_OFFICIAL_GROUP_MEANS, dtype=torch.float64)
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=0)
    assert plan.num_attended == 50  # the official merged length
