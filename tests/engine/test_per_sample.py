"""Per-sample budgets, position re-indexing, cross-stage state and padding checks.

Known answer for per-sample budgets: a batch of 3 whose samples keep three
different counts gives, per sample, the logits and generated tokens of that
sample run alone (batch 1, no padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from common.engine import FastV, PlanContext, TokenPlan, topk_per_sample
from tests.engine._tiny import (
    _left_pad,
    _prompt,
    build,
    generate,
    plan_stages,
    staged_reference,
)

NEW = 4


@dataclass
class _MassPlan(TokenPlan):
    """Keep the fewest span tokens holding ``mass`` of the last token's span attention.

    Instance-adaptive (as AdaToken-3D's gating): the count depends on the sample.
    """

    stage_layers: tuple[int, ...] = (2,)
    mass: float = 0.6
    halving: bool = False

    @property
    def layers(self):
        return self.stage_layers

    def score(self, ctx: PlanContext):
        return ctx.span_attention(-1)

    def select(self, scores, ctx):
        s = scores.masked_fill(~ctx.span_valid, -math.inf)
        order = s.sort(dim=1, descending=True, stable=True)
        vals = order.values.clamp_min(0)
        before = vals.cumsum(1) - vals
        total = vals.sum(1, keepdim=True)
        counts = (before < self.mass * total).sum(1)
        return topk_per_sample(scores, counts, ctx.span_valid)


@dataclass
class _MassFold(_MassPlan):
    """The same selection, dropped tokens folded by HoliTom's sequential halving."""

    def fold(self, hidden_states, merge, ctx):
        return merge.merge(hidden_states, mode="halving")


def _batch3(seed: int = 7):
    """Three prompts, different lengths and span lengths, left padded."""
    gen = torch.Generator().manual_seed(seed)
    rows = [_prompt(gen, 12, 3, 5), _prompt(gen, 6, 1, 4), _prompt(gen, 18, 2, 3)]
    ids, mask = _left_pad(rows)
    spans = []
    for r in ids:
        where = (r == 100).nonzero().flatten()
        spans.append([(int(where[0]), int(where[-1]) + 1)])
    return rows, ids, mask, spans


def _gen(model, **kw):
    return generate(model, NEW, **kw)


@pytest.mark.parametrize(
    "kind,impl,plan",
    [
        ("llama", "sdpa", _MassPlan()),
        ("qwen2", "eager", _MassPlan()),
        ("llama", "eager", _MassPlan(stage_layers=(1, 3), mass=0.7)),
        ("qwen2", "sdpa", _MassFold()),
    ],
    ids=["llama-sdpa", "qwen2-eager", "llama-eager-2stages", "qwen2-sdpa-fold"],
)
def test_batch_with_different_counts_equals_each_sample_alone(kind, impl, plan):
    model, _, _ = build(kind, impl, seed=11)
    rows, ids, mask, spans = _batch3()
    with plan.apply(model, spans=spans) as handle:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        last = max(handle.last_plan["keep_idx"])
        keep, valid = handle.last_plan["keep_idx"][last], handle.last_plan["valid"][last]
        counts = handle.last_plan["span_kept"][last].tolist()
        batch_gen = _gen(model, input_ids=ids, attention_mask=mask)
    assert len(set(counts)) == 3, f"the known answer needs three different counts, got {counts}"
    assert not bool(valid.all())  # padding slots were used

    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        ((s, e),) = spans[b]
        with plan.apply(model, spans=[(s - pad, e - pad)]) as alone_handle:
            with torch.no_grad():
                alone = model(input_ids=row[None])
            alone_keep = alone_handle.last_plan["keep_idx"][last][0]
            alone_gen = _gen(model, input_ids=row[None])
        # same kept tokens (original indices shifted by the left padding)
        real = valid[b] & (keep[b] >= pad)
        assert torch.equal(keep[b][real] - pad, alone_keep)
        torch.testing.assert_close(out.logits[b][real], alone.logits[0], atol=2e-5, rtol=1e-4)
        assert torch.equal(
            batch_gen.sequences[b, ids.shape[1] :], alone_gen.sequences[0, len(row) :]
        )
        for step_b, step_a in zip(batch_gen.logits, alone_gen.logits):
            torch.testing.assert_close(step_b[b], step_a[0], atol=2e-5, rtol=1e-4)


def test_equal_counts_take_the_unpadded_path():
    model, inputs, spans = build("qwen2", "sdpa")
    with FastV(layer=2, keep_ratio=0.5).apply(model, spans=spans) as h, torch.no_grad():
        model(**inputs)
        assert bool(h.last_plan["valid"][2].all())
        assert h._state.stages[0].padded is False


@dataclass
class _Reindexed(TokenPlan):
    stage_layers: tuple[int, ...] = (1, 3)
    reindex_positions: bool = True

    @property
    def layers(self):
        return self.stage_layers

    def budget(self, stage, span_len):
        return max(1, span_len // 2)

    def score(self, ctx):
        return ctx.span_attention(-1)


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("qwen2", "eager")])
def test_reindex_positions_matches_contiguous_reference(kind, impl):
    model, inputs, spans = build(kind, impl, seed=5)
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    with _Reindexed().apply(model, spans=spans) as handle:
        gen = _gen(model, input_ids=ids, attention_mask=attn)
        plan = dict(handle.last_plan["keep_idx"])
    seq = gen.sequences
    full_attn, stages = plan_stages(plan, attn, NEW)
    with torch.no_grad():
        h = model.model.embed_tokens(seq)
        ref = staged_reference(model, h, full_attn, stages, reindex_positions=True)
    n = list(plan.values())[-1].shape[1]
    got = torch.stack(gen.logits, 1)
    torch.testing.assert_close(got, ref[:, n - 1 : n - 1 + NEW], atol=1e-4, rtol=1e-4)
    # and it differs from keeping the original positions
    with _Reindexed(reindex_positions=False).apply(model, spans=spans):
        other = _gen(model, input_ids=ids, attention_mask=attn)
    assert not torch.allclose(torch.stack(other.logits, 1), got)


def test_reindex_with_different_counts_equals_each_sample_alone():
    @dataclass
    class _MassReindexed(_MassPlan):
        reindex_positions: bool = True

    model, _, _ = build("llama", "eager", seed=11)
    rows, ids, mask, spans = _batch3()
    plan = _MassReindexed()
    with plan.apply(model, spans=spans) as handle:
        batch_gen = _gen(model, input_ids=ids, attention_mask=mask)
        counts = handle.last_plan["span_kept"][2].tolist()
    assert len(set(counts)) == 3
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        ((s, e),) = spans[b]
        with plan.apply(model, spans=[(s - pad, e - pad)]):
            alone_gen = _gen(model, input_ids=row[None])
        assert torch.equal(
            batch_gen.sequences[b, ids.shape[1] :], alone_gen.sequences[0, len(row) :]
        )
        for step_b, step_a in zip(batch_gen.logits, alone_gen.logits):
            torch.testing.assert_close(step_b[b], step_a[0], atol=2e-5, rtol=1e-4)


def test_reindex_refused_for_mrope():
    model, _, spans = build("qwen2_vl", "sdpa")
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        _Reindexed(stage_layers=(1,)).apply(model, spans=spans)


def test_state_and_previous_scores_across_stages():
    @dataclass
    class _Avg(TokenPlan):
        layers = (1, 3)

        def __post_init__(self):
            self.seen = []

        def budget(self, stage, span_len):
            return span_len - 3

        def score(self, ctx):
            now = ctx.span_attention(-1)
            prev = ctx.previous_scores()
            ctx.state.setdefault("stages", []).append(ctx.layer_idx)
            self.seen.append((ctx.span_idx.clone(), now.clone(), prev.clone(), ctx.state))
            return now if ctx.stage == 0 else (now + prev) / 2

    model, inputs, spans = build("qwen2", "sdpa")
    plan = _Avg()
    with plan.apply(model, spans=spans), torch.no_grad():
        model(**inputs)
    (idx0, s0, p0, st0), (idx1, s1, p1, st1) = plan.seen
    assert torch.isnan(p0).all() and st0 is st1 and st1["stages"] == [1, 3]
    for b in range(idx1.shape[0]):
        where = {int(i): j for j, i in enumerate(idx0[b].tolist())}
        want = torch.stack([s0[b, where[int(i)]] for i in idx1[b].tolist()])
        torch.testing.assert_close(p1[b], want)
    with plan.apply(model, spans=spans), torch.no_grad():
        model(**inputs)
    assert plan.seen[2][3] is not st0  # a new prefill starts a new state


def test_right_padding_is_refused():
    model, inputs, spans = build("llama", "sdpa")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # sample 1 is left padded: move its padding to the right
    pad = int((mask[1] == 0).sum())
    ids_r, mask_r = ids.clone(), mask.clone()
    ids_r[1] = torch.cat([ids[1, pad:], ids[1, :pad]])
    mask_r[1] = torch.cat([mask[1, pad:], mask[1, :pad]])
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=[spans[0], [(0, 4)]]):
        with pytest.raises(ValueError, match="right-padded"):
            model(input_ids=ids_r, attention_mask=mask_r)
        with torch.no_grad():  # left padding is fine
            model(input_ids=ids, attention_mask=mask)


def test_no_span_and_no_token_id_warns_at_apply():
    model, _, _ = build("llama", "sdpa")
    with pytest.warns(UserWarning, match="nothing will be pruned"):
        h = FastV(layer=1).apply(model)
    h.remove()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastV(layer=1).apply(model, spans=[(2, 6)]).remove()
        FastV(layer=1).apply(model, span_token_id=100).remove()
