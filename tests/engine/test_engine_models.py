"""The engine on real transformers classes (tiny random configs), SDPA and eager."""

from __future__ import annotations

import pytest
import torch

from common.engine import FastV, PDrop
from tests.engine._tiny import (
    IMPLS,
    KINDS,
    attr_snapshot,
    build,
    cache_len,
    cache_of,
    fresh_cache,
    generate,
    hook_snapshot,
)

CASES = [(k, i) for k in KINDS for i in IMPLS]
NEW = 4


_cache_of = cache_of


def _greedy(model, inputs, **kw):
    return generate(model, NEW, **inputs, **kw)


@pytest.mark.parametrize("kind,impl", CASES)
def test_keep_all_is_identity_and_remove_restores(kind, impl):
    model, inputs, spans = build(kind, impl)
    hooks0, attrs0 = hook_snapshot(model), attr_snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _greedy(model, inputs)

    for method in (FastV(layer=2, keep_ratio=1.0), PDrop(layers=(1, 3), ratios=(1.0, 1.0))):
        with method.apply(model, spans=spans) as handle:
            with torch.no_grad():
                out = model(**inputs).logits
            gen = _greedy(model, inputs)
            assert handle.num_pruned_prefills == 0
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert torch.equal(gen.sequences, ref_gen.sequences)
        for a, b in zip(gen.logits, ref_gen.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    # a pruning plan, applied then removed, leaves no trace
    handle = FastV(layer=1, keep_ratio=0.25).apply(model, spans=spans)
    with torch.no_grad():
        pruned = model(**inputs).logits
    assert pruned.shape[1] < ref.shape[1]
    handle.remove()
    handle.remove()  # idempotent
    assert hook_snapshot(model) == hooks0
    assert attr_snapshot(model) == attrs0
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, ref)
    assert torch.equal(_greedy(model, inputs).sequences, ref_gen.sequences)


@pytest.mark.parametrize("kind,impl", CASES)
def test_pruning_shortens_cache_keeps_text_and_generates(kind, impl):
    model, inputs, spans = build(kind, impl)
    ids = inputs["input_ids"]
    b, length = ids.shape
    span_len = spans[0][0][1] - spans[0][0][0]
    k = round(span_len * 0.25)
    # spans detected from the image token id when the config has one
    kwargs = {} if kind in ("llava_ov", "qwen2_vl") else {"spans": spans}
    with FastV(layer=2, keep_ratio=0.25).apply(model, **kwargs) as handle:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, **fresh_cache())
        cache = _cache_of(out)
        for layer in range(4):
            want = length if layer < 2 else length - span_len + k
            assert cache_len(cache, layer) == want
        assert out.logits.shape[1] == length - span_len + k
        keep = handle.last_plan["keep_idx"][2]
        assert keep.shape == (b, length - span_len + k)
        for s in range(b):
            ((start, end),) = spans[s]
            text = [p for p in range(length) if not start <= p < end]
            assert set(text) <= set(keep[s].tolist())  # text / special / pad never dropped
            assert torch.all(keep[s].diff() > 0)

        greedy = _greedy(model, inputs)
        assert greedy.sequences.shape == (b, length + NEW)
        assert handle.num_pruned_prefills == 2
        sampled = []
        for _ in range(2):
            torch.manual_seed(123)
            with torch.no_grad():
                sampled.append(
                    model.generate(
                        **inputs, max_new_tokens=NEW, do_sample=True, top_k=20, pad_token_id=0
                    )
                )
        assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("kind,impl", [("qwen2", "sdpa"), ("qwen2_vl", "eager")])
def test_pdrop_stages(kind, impl):
    model, inputs, spans = build(kind, impl)
    length = inputs["input_ids"].shape[1]
    span_len = spans[0][0][1] - spans[0][0][0]
    with PDrop(layers=(1, 3), ratios=(0.5, 0.5)).apply(model, spans=spans) as handle:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, **fresh_cache())
        k1 = round(span_len * 0.5)
        k2 = round(k1 * 0.5)
        cache = _cache_of(out)
        lens = [cache_len(cache, i) for i in range(4)]
        assert lens == [
            length,
            length - span_len + k1,
            length - span_len + k1,
            length - span_len + k2,
        ]
        keep1, keep3 = handle.last_plan["keep_idx"][1], handle.last_plan["keep_idx"][3]
        for s in range(keep1.shape[0]):
            assert set(keep3[s].tolist()) <= set(keep1[s].tolist())
        gen = _greedy(model, inputs)
        assert gen.sequences.shape[1] == length + NEW
