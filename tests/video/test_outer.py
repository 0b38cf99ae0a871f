"""HoliTom's outer stage (video.holitom.outer_merge): known answers, layouts, options."""

from __future__ import annotations

import math

import pytest
import torch

from video.holitom import NEWLINE, outer_merge, outer_merge_batch

GRID = 8
N = GRID * GRID


def scene_cut_clip(d: int = 32, seed: int = 0):
    """Two shots of 10 and 6 frames, each a static background (tiny noise) with one
    2x2 object oscillating over columns 2..4 of rows 3..4 (fresh features every frame).

    Returns ``(x [16, 64, d], attention [16, 64], object_positions list per frame,
    touched set of positions)``; attention is highest on the object.
    """
    g = torch.Generator().manual_seed(seed)
    frames, objects = [], []
    for length in (10, 6):
        background = torch.randn(N, d, generator=g)
        for t in range(length):
            fr = background + 0.01 * torch.randn(N, d, generator=g)
            col = 2 + (t % 4 if t % 4 < 3 else 1)  # 2, 3, 4, 3, 2, 3, 4, ...
            pos = [r * GRID + c for r in (3, 4) for c in (col, col + 1)]
            fr[pos] = 3 * torch.randn(len(pos), d, generator=g)
            frames.append(fr)
            objects.append(pos)
    x = torch.stack(frames)
    att = 0.01 * torch.rand(x.shape[:2], generator=g)
    for t, pos in enumerate(objects):
        att[t, pos] = 1.0
    touched = {r * GRID + c for r in (3, 4) for c in range(2, 6)}
    return x, att, objects, touched


def _assert_static_are_segment_means(out, x):
    """Each static token is the mean of its position over its segment's frames."""
    for first, last in out.segments:
        sel = out.static & (out.frame == first)
        expect = x[first : last + 1, out.position[sel]].mean(0)
        torch.testing.assert_close(out.tokens[sel], expect, rtol=1e-5, atol=1e-5)


def test_known_answer_static_background_and_moving_object():
    x, att, objects, touched = scene_cut_clip()
    out = outer_merge(x, att, retain_ratio=0.1)
    # the segmentation finds the two static shots
    assert out.segments == [(0, 9), (10, 15)]
    assert out.total_reduced == (N - len(touched)) * (9 + 5)
    # the background collapses to static tokens of each shot's first frame
    static = out.static
    assert set(out.frame[static].tolist()) == {0, 10}
    assert set(out.position[static].tolist()) <= set(range(N)) - touched
    for first, w in ((0, 10), (10, 6)):
        sel = static & (out.frame == first)
        k = round((N - len(touched)) * out.retain_ratio)
        assert int(sel.sum()) == k
        # every background position of the shot is accounted for in the static sizes
        assert int(out.size[sel].sum()) == w * (N - len(touched))
    # the moving object's positions are kept in every frame
    for t, pos in enumerate(objects):
        kept = set(out.position[~static & (out.frame == t)].tolist())
        assert set(pos) <= kept
        assert kept <= touched
    # kept dynamic tokens are the input tokens themselves
    dyn = ~static
    assert torch.equal(out.tokens[dyn], x[out.frame[dyn], out.position[dyn]])


def test_retain_all_keeps_every_dynamic_token_and_every_static_mean():
    x, att, _, touched = scene_cut_clip(seed=1)
    out = outer_merge(x, att, retain_ratio=1.0)
    assert out.retain_ratio == 1.0
    assert out.num_tokens == x.shape[0] * N - out.total_reduced
    assert int(out.size.sum()) == x.shape[0] * N
    _assert_static_are_segment_means(out, x)


def test_one_token_order_and_final_newline():
    x, att, _, _ = scene_cut_clip(seed=2)
    nl = torch.full((x.shape[-1],), 7.0)
    out = outer_merge(x, att, retain_ratio=0.2, newline=nl)
    plain = outer_merge(x, att, retain_ratio=0.2)
    assert out.num_tokens == plain.num_tokens + 1
    assert int(out.position[-1]) == NEWLINE and int(out.size[-1]) == 0
    assert torch.equal(out.tokens[-1], nl)
    assert torch.equal(out.tokens[:-1], plain.tokens)
    # per segment: static tokens first, then frames in order, positions ascending
    seg_of = torch.tensor([k for k, (s, e) in enumerate(out.segments) for _ in range(s, e + 1)])
    f, p, st = plain.frame, plain.position, plain.static
    key = ((seg_of[f] * 2 + (~st).long()) * x.shape[0] + f) * N + p
    assert bool((key.diff() > 0).all())


def test_grid_layout_newline_after_each_nonempty_row():
    x, att, _, _ = scene_cut_clip(seed=3)
    nl = torch.full((x.shape[-1],), -5.0)
    out = outer_merge(x, att, retain_ratio=0.2, layout="grid", newline=nl)
    ref = outer_merge(x, att, retain_ratio=0.2)  # the same tokens, one-token order
    assert out.num_tokens > ref.num_tokens
    is_nl = out.is_newline
    assert torch.equal(out.tokens[is_nl], nl.expand(int(is_nl.sum()), -1))
    toks = ~is_nl
    # the same set of (frame, position) tokens as the one-token layout
    pairs = sorted(zip(out.frame[toks].tolist(), out.position[toks].tolist()))
    assert pairs == sorted(zip(ref.frame[:].tolist(), ref.position[:].tolist()))
    # walk the sequence: rows ascend within a frame, a newline closes every row
    rows = (out.frame * GRID + torch.div(out.position, GRID, rounding_mode="floor")).tolist()
    current = None
    for i in range(out.num_tokens):
        if is_nl[i]:
            assert current is not None and int(out.frame[i]) * GRID <= current
            current = None
        else:
            assert current is None or rows[i] == current
            if current is None and i > 0:
                assert is_nl[i - 1]
            current = rows[i]
    assert current is None  # the sequence ends with a newline
    expected_newlines = len(set(rows[i] for i in range(out.num_tokens) if not is_nl[i]))
    assert int(is_nl.sum()) == expected_newlines


def test_budgets_round_and_ceil():
    x, att, _, touched = scene_cut_clip(seed=4)
    out = outer_merge(x, att, retain_ratio=0.15)
    r = out.retain_ratio
    n_dyn = len(touched)
    for first, last in out.segments:
        for t in range(first, last + 1):
            assert int((~out.static & (out.frame == t)).sum()) == math.ceil(n_dyn * r)
        assert int((out.static & (out.frame == first)).sum()) == round((N - n_dyn) * r)


def test_static_merge_mean_and_beta_differ_only_on_static_tokens():
    x, att, _, _ = scene_cut_clip(seed=5)
    a = outer_merge(x, att, retain_ratio=0.1, static_merge="beta")
    b = outer_merge(x, att, retain_ratio=0.1, static_merge="mean")
    assert torch.equal(a.position, b.position) and torch.equal(a.frame, b.frame)
    assert torch.equal(a.tokens[~a.static], b.tokens[~b.static])
    assert not torch.allclose(a.tokens[a.static], b.tokens[b.static])
    # beta = 1 keeps the centres (the static means) unchanged
    c = outer_merge(x, att, retain_ratio=0.1, beta=1.0)
    _assert_static_are_segment_means(c, x)


def test_dominant_share_splits_each_frame_budget():
    x, att, _, touched = scene_cut_clip(seed=6)
    base = outer_merge(x, att, retain_ratio=0.3)
    out = outer_merge(x, att, retain_ratio=0.3, dominant_share=0.5)
    assert out.segments == base.segments
    assert out.num_tokens == base.num_tokens  # same budget, split differently
    for t in range(x.shape[0]):
        dyn = ~out.static & (out.frame == t)
        budget = int((~base.static & (base.frame == t)).sum())
        dominant = round(budget * 0.5)
        ones = dyn & (out.size == 1)
        assert int(dyn.sum()) == budget
        # contextual tokens stand for the rest of the frame's dynamic tokens
        assert int(out.size[dyn].sum()) == len(touched)
        assert int(ones.sum()) >= dominant
        assert set(out.position[dyn].tolist()) <= touched


def test_bf16_default_and_float32_compute():
    x, att, _, _ = scene_cut_clip(seed=7)
    xb = x.to(torch.bfloat16)
    out = outer_merge(xb, att.to(torch.bfloat16), retain_ratio=0.1)
    assert out.tokens.dtype == torch.bfloat16
    f32 = outer_merge(xb, att.to(torch.bfloat16), retain_ratio=0.1, compute_dtype=torch.float32)
    assert f32.tokens.dtype == torch.bfloat16
    assert f32.segments == out.segments


def test_batch_equals_single_videos():
    clips = [scene_cut_clip(seed=s) for s in (8, 9)]
    xs = torch.stack([c[0] for c in clips])
    atts = torch.stack([c[1] for c in clips])
    batch = outer_merge_batch(xs, atts, retain_ratio=0.1, newline=torch.zeros(32), generator=3)
    gen = torch.Generator().manual_seed(3)
    for i, res in enumerate(batch):
        one = outer_merge(xs[i], atts[i], retain_ratio=0.1, newline=torch.zeros(32), generator=gen)
        assert res.segments == one.segments
        assert torch.equal(res.tokens, one.tokens)
        assert torch.equal(res.position, one.position) and torch.equal(res.size, one.size)


def test_single_frame_and_attention_ties():
    x = torch.randn(1, 16, 8)
    att = torch.zeros(1, 16)  # all tied
    out = outer_merge(x, att, retain_ratio=0.25, attention_ties="lowest")
    assert out.segments == [(0, 0)]
    assert out.position.tolist() == [0, 1, 2, 3]
    out = outer_merge(x, att, retain_ratio=0.25)
    assert out.num_tokens == 4 and len(set(out.position.tolist())) == 4


@pytest.mark.parametrize(
    "field, value",
    [
        ("retain_ratio", 0.0),
        ("retain_ratio", 1.5),
        ("tau", 2.0),
        ("beta", -0.1),
        ("dominant_share", 1.0),
        ("knn_k", 0),
        ("max_window_size", 0),
        ("layout", "frame"),
        ("static_merge", "median"),
        ("attention_ties", "random"),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    x, att = torch.randn(4, 16, 8), torch.rand(4, 16)
    with pytest.raises(ValueError, match=field):
        outer_merge(x, att, **{field: value})


def test_bad_inputs_raise():
    x, att = torch.randn(4, 16, 8), torch.rand(4, 16)
    with pytest.raises(ValueError, match="attention"):
        outer_merge(x, att[:, :8])
    with pytest.raises(ValueError, match="newline"):
        outer_merge(x, att, newline=torch.zeros(5))
    with pytest.raises(ValueError, match="square"):
        outer_merge(torch.randn(4, 15, 8), torch.rand(4, 15), layout="grid")
    with pytest.raises(ValueError, match="NaN"):
        outer_merge(x.clone().fill_(float("nan")), att)


def test_matches_the_straightforward_reference_of_the_benchmark():
    """The bench's comparison point (official loop structure, written independently)
    gives the same tokens, in the same order."""
    from benchmarks.video import reference_outer_merge, synthetic_clip

    for seed in range(3):
        x, att = synthetic_clip(seed, frames=12, tokens=49, dim=24)
        nl = torch.randn(24)
        for r in (0.1, 0.3):
            got = outer_merge(x, att, retain_ratio=r, newline=nl)
            ref = reference_outer_merge(x, att, retain_ratio=r, newline=nl)
            torch.testing.assert_close(got.tokens, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decisions_equal_the_official_similarity_near_tau(dtype):
    """Pairs built with cosine within a few ulps of tau exercise the exact recompute:
    every `sim > tau` decision equals the official normalise-then-cosine in the dtype."""
    import torch.nn.functional as F

    from video.holitom.outer import _static_above

    g = torch.Generator().manual_seed(0)
    f, n, d, tau = 6, 300, 64, 0.8
    x = torch.randn(f, n, d, generator=g)
    for t in range(1, f):
        # x[t] = cos * x[t-1] + sin * orthogonal noise, cos spread tightly around tau
        prev = F.normalize(x[t - 1], dim=-1)
        noise = torch.randn(n, d, generator=g)
        noise = F.normalize(noise - (noise * prev).sum(-1, keepdim=True) * prev, dim=-1)
        c = tau + torch.linspace(-0.02, 0.02, n)[torch.randperm(n, generator=g)]
        x[t] = (c[:, None] * prev + (1 - c[:, None] ** 2).sqrt() * noise) * 3.0
    x = x.to(dtype)
    xn = F.normalize(x, p=2, dim=-1)
    official = F.cosine_similarity(xn[:-1], xn[1:], dim=-1) > tau
    ours = _static_above(x, tau)
    assert torch.equal(ours, official)
    assert 0 < int(official.sum()) < official.numel()  # both sides of tau present
