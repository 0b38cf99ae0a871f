"""The LLaVA-style path (LLaVA-1.5 / LLaVA-3D): ``generate(inputs_embeds=..., attention_mask=...)``.

A tiny ``LlamaForCausalLM`` whose prompt embeddings carry a block of
"visual" features at a declared span (no image token id anywhere), a batch of
2 with left padding: keep-all identity, and a known answer against a hand-run
of the layers over prompt + generated tokens. Runs on every supported
transformers (``make test-compat``).
"""

from __future__ import annotations

import pytest
import torch

from common.engine import FastV, PDrop
from tests.engine._tiny import _left_pad, build, generate, plan_stages, staged_reference

NEW = 5


def _llava_batch(model, seed: int = 2):
    """Embeddings ``[2, L, D]`` with visual features at ``spans``, left padded, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    pre, n_vis, post = (4, 2), (14, 14), (6, 5)
    rows = [torch.randint(3, 90, (pre[b] + n_vis[b] + post[b],), generator=gen) for b in range(2)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).clone()
    spans = []
    for b in range(2):
        start = ids.shape[1] - len(rows[b]) + pre[b]
        emb[b, start : start + n_vis[b]] = torch.randn(n_vis[b], emb.shape[-1], generator=gen) * 0.5
        spans.append([(start, start + n_vis[b])])
    return emb, mask, spans


def _reference(model, prompt_emb, new_tokens, attn2d, stages):
    """``[B, T, V]`` logits of a hand-run over prompt embeddings + generated tokens."""
    with torch.no_grad():
        h = torch.cat([prompt_emb, model.get_input_embeddings()(new_tokens)], 1)
        return staged_reference(model, h, attn2d, stages)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_all_is_identity_on_inputs_embeds(impl):
    model, _, _ = build("llama", impl, seed=1)
    emb, mask, spans = _llava_batch(model)
    ref = generate(model, NEW, inputs_embeds=emb, attention_mask=mask)
    for method in (FastV(layer=2, keep_ratio=1.0), PDrop(layers=(1, 3), ratios=(1.0, 1.0))):
        with method.apply(model, spans=spans) as handle:
            got = generate(model, NEW, inputs_embeds=emb, attention_mask=mask)
            assert handle.num_pruned_prefills == 0
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "method",
    [
        FastV(layer=2, keep_ratio=0.3),
        FastV(layer=1, keep_ratio=0.5, attention_from="current"),
        PDrop(layers=(1, 3), ratios=(0.5, 0.5)),
    ],
    ids=["fastv-previous", "fastv-current", "pdrop"],
)
def test_pruned_generate_on_inputs_embeds_matches_hand_run(impl, method):
    model, _, _ = build("llama", impl, seed=1)
    emb, mask, spans = _llava_batch(model)
    with method.apply(model, spans=spans) as handle:
        got = generate(model, NEW, inputs_embeds=emb, attention_mask=mask)
        plan = dict(handle.last_plan["keep_idx"])
        assert handle.num_pruned_prefills == 1
    new_tokens = got.sequences[:, -NEW:]
    lp = emb.shape[1]
    for keep in plan.values():
        for b, ((s, e),) in enumerate(spans):
            outside = [p for p in range(lp) if not s <= p < e]
            assert set(outside) <= set(keep[b].tolist())  # text and padding never dropped
    attn, stages = plan_stages(plan, mask, NEW)
    ref = _reference(model, emb, new_tokens, attn, stages)
    n = list(plan.values())[-1].shape[1]
    torch.testing.assert_close(
        torch.stack(got.logits, 1), ref[:, n - 1 : n - 1 + NEW], atol=1e-4, rtol=1e-4
    )
    assert torch.equal(new_tokens, torch.stack(got.logits, 1).argmax(-1))
