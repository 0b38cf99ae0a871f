"""Outer-stage baselines (video.reduce): budgets, known answers, shared output."""

from __future__ import annotations

import pytest
import torch

from common.selection import divprune_select
from video.holitom import NEWLINE, OuterMergeResult
from video.reduce import REDUCERS, divprune_reduce, uniform_frames_reduce, visionzip_reduce

F_, N_, D_ = 8, 64, 16


def clip(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(F_, N_, D_, generator=g), torch.rand(F_, N_, generator=g)


@pytest.mark.parametrize("name", sorted(REDUCERS))
@pytest.mark.parametrize("layout", ["one_token", "grid"])
def test_every_reducer_is_interchangeable_at_the_same_budget(name, layout):
    x, att = clip()
    nl = torch.full((D_,), 9.0)
    out = REDUCERS[name](x, att, retain_ratio=0.25, layout=layout, newline=nl)
    assert isinstance(out, OuterMergeResult)
    toks = ~out.is_newline
    assert out.tokens.shape[1] == D_ and out.tokens.dtype == x.dtype
    # about retain_ratio * F * N tokens besides the newlines (HoliTom rebalances its ratio)
    assert abs(int(toks.sum()) - 0.25 * F_ * N_) <= 0.05 * F_ * N_
    assert torch.equal(out.tokens[~toks], nl.expand(int((~toks).sum()), -1))
    assert bool((out.position[toks] >= 0).all()) and bool((out.size[toks] >= 1).all())
    if layout == "one_token":
        assert int((~toks).sum()) == 1 and bool(out.is_newline[-1])


def test_visionzip_dominant_tokens_are_the_top_attention_tokens():
    x, att = clip(1)
    out = visionzip_reduce(x, att, retain_ratio=0.25)
    b = round(N_ * 0.25)
    dom = int(b * 54 / 64)
    for t in range(F_):
        sel = out.frame == t
        assert int(sel.sum()) == b
        dominant = out.position[sel][:dom]  # per frame: dominant first, position order
        expect = att[t].topk(dom).indices.sort().values
        assert torch.equal(dominant, expect)
        assert torch.equal(out.tokens[sel][:dom], x[t, expect])
        # contextual tokens stand for every other token of the frame
        assert int(out.size[sel].sum()) == N_


def test_visionzip_contextual_merge_known_answer():
    # every non-dominant token is a copy of one of two targets: the faithful merge is
    # target + mean(members) = 2 * target, the corrected mean is the target itself
    f, n, d = 1, 16, 4
    att = torch.zeros(f, n)
    att[0, :12] = torch.arange(12, 0, -1).float()  # 12 dominant tokens at positions 0..11
    x = torch.randn(f, n, d)
    x[0, 13] = x[0, 12]
    x[0, 15] = x[0, 14]
    kw = dict(retain_ratio=14 / 16, dominant_ratio=12 / 14)
    out = visionzip_reduce(x, att, **kw)
    ctx = out.position[12:]
    assert ctx.tolist() == [12, 14]  # targets every step = 4 // 2 = 2 of the rest
    torch.testing.assert_close(out.tokens[12:], 2 * x[0, [12, 14]])
    assert out.size[12:].tolist() == [2, 2]
    mean = visionzip_reduce(x, att, contextual="mean", **kw)
    torch.testing.assert_close(mean.tokens[12:], x[0, [12, 14]])


def test_visionzip_grid_quirk_and_fix():
    x, att = clip(2)
    nl = torch.zeros(D_)
    faithful = visionzip_reduce(x, att, retain_ratio=0.25, layout="grid", newline=nl)
    fixed = visionzip_reduce(
        x, att, retain_ratio=0.25, layout="grid", newline=nl, fix_grid_positions=True
    )
    # official grid: a newline after every row of every frame, empty rows included
    assert int(faithful.is_newline.sum()) == F_ * 8 == int(fixed.is_newline.sum())
    toks = ~fixed.is_newline
    assert torch.equal(
        fixed.tokens[toks & (fixed.size == 1)],
        x[fixed.frame[toks & (fixed.size == 1)], fixed.position[toks & (fixed.size == 1)]],
    )
    # the faithful order pairs tokens with top-k-ordered positions: not where they belong
    t = ~faithful.is_newline & (faithful.size == 1)
    assert not torch.equal(faithful.tokens[t], x[faithful.frame[t], faithful.position[t]])


def test_divprune_whole_video_and_per_frame():
    x, _ = clip(3)
    out = divprune_reduce(x, retain_ratio=0.1)
    flat = divprune_select(x.reshape(F_ * N_, D_), 0.1)
    assert torch.equal(out.frame * N_ + out.position, flat)
    assert torch.equal(out.tokens, x.reshape(-1, D_)[flat])
    per = divprune_reduce(x, retain_ratio=0.1, per_frame=True)
    assert torch.bincount(per.frame, minlength=F_).tolist() == [round(N_ * 0.1)] * F_


def test_uniform_frames_keep_whole_evenly_spread_frames():
    x = torch.randn(10, N_, D_)
    out = uniform_frames_reduce(x, retain_ratio=0.3)
    assert sorted(set(out.frame.tolist())) == [0, 4, 9]  # linspace(0, 9, 3) rounded
    assert torch.equal(out.tokens, x[[0, 4, 9]].reshape(-1, D_))
    one = uniform_frames_reduce(x, retain_ratio=0.01)
    assert set(one.frame.tolist()) == {0}


def test_bad_arguments_raise():
    x, att = clip()
    with pytest.raises(ValueError, match="retain_ratio"):
        visionzip_reduce(x, att, retain_ratio=0.0)
    with pytest.raises(ValueError, match="dominant_ratio"):
        visionzip_reduce(x, att, dominant_ratio=1.5)
    with pytest.raises(ValueError, match="contextual"):
        visionzip_reduce(x, att, contextual="sum")
    with pytest.raises(ValueError, match="attention"):
        visionzip_reduce(x, None)
    with pytest.raises(ValueError, match="layout"):
        divprune_reduce(x, layout="frame")
    with pytest.raises(ValueError, match="newline"):
        uniform_frames_reduce(x, newline=torch.zeros(3))
    assert NEWLINE == -1


def test_visionzip_sizes_count_every_input_token_in_bf16():
    """One contextual token per frame takes 602 members: a bf16 count would say 600."""
    torch.manual_seed(0)
    x = torch.randn(2, 603, 8, dtype=torch.bfloat16)
    out = visionzip_reduce(x, torch.rand(2, 603), retain_ratio=1 / 603, dominant_ratio=0.0)
    assert out.size.tolist() == [603, 603]
    out = visionzip_reduce(x, torch.rand(2, 603), retain_ratio=0.05)
    assert int(out.size.sum()) == 2 * 603
