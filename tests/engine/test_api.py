"""Engine API: validation, spans, apply twice, custom plans with a fold rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from common.engine import (
    FastV,
    PDrop,
    TokenPlan,
    apply_plan,
    find_decoder_layers,
    span_mask,
    spans_from_token_id,
)
from tests.engine._tiny import (
    CACHE_KW,
    IMAGE_ID,
    TF,
    build,
    cache_len,
    cache_of,
    fresh_cache,
    hook_snapshot,
)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: FastV(layer=0), "layer"),
        (lambda: FastV(layer=-1), "layer"),
        (lambda: FastV(keep_ratio=0.0), "keep_ratio"),
        (lambda: FastV(keep_ratio=1.5), "keep_ratio"),
        (lambda: FastV(keep_ratio=float("nan")), "keep_ratio"),
        (lambda: FastV(attention_from="next"), "attention_from"),
        (lambda: PDrop(layers=(2, 2), ratios=(0.5, 0.5)), "layers"),
        (lambda: PDrop(layers=(0,), ratios=(0.5,)), "layers"),
        (lambda: PDrop(layers=(1, 2), ratios=(0.5,)), "ratios"),
        (lambda: PDrop(layers=(1, 2), ratios=(0.5, 0.0)), "ratios"),
        (lambda: PDrop(layers=(), ratios=()), "layers"),
        (lambda: PDrop(layers=8, ratios=(0.5,)), "layers must be a sequence"),
        (lambda: PDrop(layers=(8,), ratios=0.5), "ratios must be a sequence"),
    ],
)
def test_bad_hyperparameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_layer_beyond_depth_names_the_field():
    model, _, spans = build("qwen2", "sdpa")
    with pytest.raises(ValueError, match="layer must be in"):
        FastV(layer=4).apply(model, spans=spans)
    with pytest.raises(ValueError, match="layers must be in"):
        PDrop().apply(model, spans=spans)  # (8, 16, 24) on a 4-layer model
    assert hook_snapshot(model) == hook_snapshot(build("qwen2", "sdpa")[0])


def test_bad_spans_raise_naming_spans():
    model, inputs, spans = build("llama", "sdpa")
    length = inputs["input_ids"].shape[1]
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=[(length - 2, length + 3)]):
        with pytest.raises(ValueError, match="spans"):
            model(**inputs)
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=[[(2, 6)], [(2, 6)], [(2, 6)]]):
        with pytest.raises(ValueError, match="spans"):  # three lists for a batch of 2
            model(**inputs)
    with pytest.raises(ValueError, match="spans"):
        span_mask([(5, 3)], 1, 10)


def test_span_helpers():
    ids = torch.tensor([[5, 7, 7, 7, 5, 7, 5], [7, 7, 5, 5, 5, 5, 7]])
    assert spans_from_token_id(ids, 7) == [[(1, 4), (5, 6)], [(0, 2), (6, 7)]]
    assert spans_from_token_id(ids, [5, 7]) == [[(0, 7)], [(0, 7)]]
    m = span_mask(spans_from_token_id(ids, 7), 2, 7)
    assert torch.equal(m, ids == 7)
    assert torch.equal(span_mask([(1, 3)], 2, 4), torch.tensor([[0, 1, 1, 0]] * 2).bool())
    assert torch.equal(span_mask(ids == 7, 2, 7), ids == 7)


def test_token_id_detection_and_set_spans():
    model, inputs, spans = build("qwen2", "sdpa")
    ids = inputs["input_ids"]
    with FastV(layer=1, keep_ratio=0.5).apply(model, span_token_id=IMAGE_ID) as h:
        with torch.no_grad():
            a = model(**inputs).logits
        keep_detected = h.last_plan["keep_idx"][1]
        h.set_spans(spans)
        with torch.no_grad():
            b = model(**inputs).logits
        assert torch.equal(keep_detected, h.last_plan["keep_idx"][1])
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        # inputs_embeds path: no input_ids to detect from, explicit spans work
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)
            c = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(c, a, atol=1e-6, rtol=0)
        # a later prefill that prunes nothing does not leave the old plan behind
        h.set_spans([])  # an empty declaration: nothing to prune
        with torch.no_grad():
            model(**inputs)
        assert h.last_plan is None and h.num_pruned_prefills == 3
    # no span at all -> a warning at apply() time, and nothing pruned
    with pytest.warns(UserWarning, match="nothing will be pruned"):
        h = FastV(layer=1, keep_ratio=0.5).apply(model)
    with h, torch.no_grad():
        out = model(**inputs).logits
    assert out.shape[1] == ids.shape[1] and h.num_pruned_prefills == 0 and h.last_plan is None


def test_apply_twice_replaces_and_removes_cleanly():
    model, inputs, spans = build("qwen2", "eager")
    hooks0 = hook_snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    method = FastV(layer=2, keep_ratio=0.5)
    h1 = method.apply(model, spans=spans)
    with torch.no_grad():
        once = model(**inputs).logits
    h2 = method.apply(model, spans=spans)
    assert not h1.active and h2.active
    counts = [len(layer._forward_pre_hooks) for layer in model.model.layers]
    assert max(counts) == 1
    with torch.no_grad():
        twice = model(**inputs).logits
    assert torch.equal(once, twice)
    h1.remove()  # stale handle: no effect on the active one
    assert h2.active
    h2.remove()
    assert hook_snapshot(model) == hooks0
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@dataclass
class _FoldPlan(TokenPlan):
    """Keep the first half of the span; fold every dropped token into the last kept one."""

    fold_weight: float = 0.0
    layers = (2,)

    def __post_init__(self) -> None:
        self.seen: dict = {}

    def budget(self, stage, span_len):
        return span_len // 2

    def score(self, ctx):
        s = ctx.span_pos.shape[1]
        return -torch.arange(s, dtype=torch.float32).expand(ctx.span_pos.shape[0], -1)

    def match(self, keep, ctx):
        last = keep.long().cumsum(1).argmax(1, keepdim=True)  # slot of the last kept token
        slots = torch.arange(keep.shape[1]).expand_as(keep)
        return torch.where(keep, slots, last.expand_as(keep))

    def fold(self, hidden_states, merge, ctx):
        self.seen = {"keep": merge.keep_idx.clone(), "dst_of": merge.dst_of.clone()}
        kept = hidden_states.gather(
            1, merge.keep_idx[:, :, None].expand(-1, -1, hidden_states.shape[-1])
        )
        # mean of each slot's members (the kept token included), weighted toward the kept one
        mean = merge.merge(hidden_states, mode="mean")
        return kept + self.fold_weight * (mean - kept)


def test_custom_plan_with_fold():
    model, inputs, spans = build("llama", "sdpa")
    plan0, plan1 = _FoldPlan(0.0), _FoldPlan(1.0)
    with apply_plan(model, plan0, spans=spans) as h, torch.no_grad():
        a = model(**inputs).logits
        keep = h.last_plan["keep_idx"][2]
    with apply_plan(model, plan1, spans=spans), torch.no_grad():
        b = model(**inputs).logits
    ((start, end),) = spans[0]
    n = end - start
    first_half = list(range(start, start + n // 2))
    assert [p for p in keep[0].tolist() if start <= p < end] == first_half
    length = inputs["input_ids"].shape[1]
    assert plan1.seen["keep"].shape == (2, length - n + n // 2)
    # every dropped span token went into the slot of the last kept span token
    for s, ((st, en),) in enumerate(spans):
        dst = plan1.seen["dst_of"][s]
        last_slot = plan1.seen["keep"][s].tolist().index(st + n // 2 - 1)
        assert set(dst[st + n // 2 : en].tolist()) == {last_slot}
    assert not torch.allclose(a, b)  # the fold changed the kept token


def test_find_decoder_layers_on_vlms():
    for kind in ("llava_ov", "qwen2_vl"):
        model, _, _ = build(kind, "sdpa")
        dec, layers = find_decoder_layers(model)
        assert dec is model.get_decoder() and len(layers) == 4
    with pytest.raises(TypeError):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_beam_search_and_no_cache_generation_run():
    model, inputs, spans = build("qwen2", "eager")
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=spans), torch.no_grad():
        beams = model.generate(
            **inputs, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0
        )
        nocache = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0
        )
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert beams.shape == nocache.shape == cached.shape
    # without a cache every step re-prunes the whole prompt (spans are absolute positions);
    # the first generated token comes from the same pruned prefill either way
    assert torch.equal(
        nocache[:, : inputs["input_ids"].shape[1] + 1],
        cached[:, : inputs["input_ids"].shape[1] + 1],
    )


def test_static_cache_is_refused():
    if TF < (4, 38, 0):
        pytest.skip("StaticCache arrived in transformers 4.38")
    from transformers import StaticCache

    model, inputs, spans = build("qwen2", "sdpa")
    try:
        cache = StaticCache(config=model.config, max_cache_len=64)
    except TypeError:  # 4.4x: the batch size is part of the signature
        cache = StaticCache(config=model.config, max_batch_size=2, max_cache_len=64)
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=spans):
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            model(**inputs, **{CACHE_KW: cache})


def test_handles_do_not_keep_models_alive():
    import gc
    import weakref

    model, inputs, spans = build("qwen2", "sdpa")
    handle = FastV(layer=1, keep_ratio=0.5).apply(model, spans=spans)
    with torch.no_grad():
        model(**inputs)
    ref = weakref.ref(model)
    del model, handle
    gc.collect()
    assert ref() is None


def test_several_spans_per_sample():
    model, inputs, _ = build("qwen2", "sdpa")
    length = inputs["input_ids"].shape[1]
    spans = [(4, 8), (10, 16)]  # 10 span tokens, both samples (sample 1's pads are text)
    with FastV(layer=1, keep_ratio=0.4).apply(model, spans=spans) as h, torch.no_grad():
        out = model(**inputs, use_cache=True, **fresh_cache())
    keep = h.last_plan["keep_idx"][1]
    assert keep.shape == (2, length - 10 + 4)
    span_set = set(range(4, 8)) | set(range(10, 16))
    for row in keep.tolist():
        assert set(range(length)) - span_set <= set(row)
    cache = cache_of(out)
    assert cache_len(cache, 0) == length and cache_len(cache, 3) == length - 6


def test_manual_decode_loop_matches_generate():
    """A hand-written decode loop (no position_ids) continues from the full length too."""
    model, inputs, spans = build("llama", "eager")
    ids, span = inputs["input_ids"][:1], spans[:1]  # sample 0 has no padding
    assert bool(inputs["attention_mask"][0].all())
    with FastV(layer=2, keep_ratio=0.3).apply(model, spans=span), torch.no_grad():
        ref = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        out = model(input_ids=ids, use_cache=True)
        cache = cache_of(out)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            out = model(input_ids=tokens[-1], **{CACHE_KW: cache}, use_cache=True)
            cache = cache_of(out)  # 4.37 hands back a new (legacy) cache each step
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, 1), ref[:, ids.shape[1] :])


def test_sliding_window_layers_after_the_prune_point_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention"] * 2,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="sliding"):
        FastV(layer=1).apply(model, spans=[(2, 8)])
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_slicing_helpers_for_layouts_not_used_by_the_tiny_models():
    """2-D (FlashAttention) masks, [3, B, L] positions and [3, B, L, hd] rotary tables."""
    from common.engine.slicing import slice_mask_decode as _slice_mask_decode
    from common.engine.slicing import slice_mask_prefill as _slice_mask_prefill
    from common.engine.slicing import slice_position_ids as _slice_position_ids
    from common.engine.slicing import slice_rotary as _slice_rotary

    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    mask2d = torch.arange(12).view(2, 6)
    assert _slice_mask_prefill(mask2d, idx).tolist() == [[0, 2, 5], [7, 9, 10]]
    mask2d_dec = torch.arange(16).view(2, 8)  # 6 prefill keys + 2 decoded
    assert _slice_mask_decode(mask2d_dec, idx, 6).tolist() == [[0, 2, 5, 6, 7], [9, 11, 12, 14, 15]]
    mask4d = torch.arange(2 * 36).view(2, 1, 6, 6)
    out = _slice_mask_prefill(mask4d, idx)
    assert out.shape == (2, 1, 3, 3) and out[1, 0, 2, 0].item() == 36 + 4 * 6 + 1
    pos3 = torch.arange(6).view(1, 1, 6).expand(3, 2, 6) * torch.tensor([1, 10, 100]).view(3, 1, 1)
    got = _slice_position_ids(pos3, idx)
    assert got.shape == (3, 2, 3) and got[2, 1].tolist() == [100, 300, 400]
    cos = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 4)  # batch 1, broadcast
    c, s = _slice_rotary((cos, cos), idx)
    assert c.shape == (2, 3, 4) and c[1, :, 0].tolist() == [1.0, 3.0, 4.0]
    old = torch.arange(6.0).view(1, 1, 6, 1).expand(3, 2, 6, 4)  # older M-RoPE layout
    assert _slice_rotary(old, idx).shape == (3, 2, 3, 4)
    with pytest.raises(RuntimeError, match="pruned prefill"):
        _slice_mask_decode(mask2d_dec, idx, 9)


def test_apply_plan_refuses_a_non_plan():
    model, _, _ = build("qwen2", "sdpa")
    with pytest.raises(TypeError, match="plan"):
        apply_plan(model, object())
    assert hook_snapshot(model) == hook_snapshot(build("qwen2", "sdpa")[0])


def test_span_over_the_last_position_warns(caplog):
    model, inputs, _ = build("llama", "sdpa")
    length = inputs["input_ids"].shape[1]
    with FastV(layer=1, keep_ratio=0.5).apply(model, spans=[(length - 4, length)]) as h:
        with caplog.at_level("WARNING", logger="common.engine.runner"), torch.no_grad():
            model(**inputs)
    assert "last prompt position" in caplog.text
    assert h.num_pruned_prefills == 1


def test_unsupported_transformers_versions_are_refused(monkeypatch):
    import transformers

    from common.engine import versions

    model, _, spans = build("qwen2", "sdpa")
    hooks0 = hook_snapshot(model)
    monkeypatch.setattr(versions, "transformers_version", lambda: (4, 36, 2))
    with pytest.raises(RuntimeError, match=r">=4\.37\.2,<6; installed: ") as err:
        FastV(layer=1).apply(model, spans=spans)
    assert transformers.__version__ in str(err.value)
    monkeypatch.setattr(versions, "transformers_version", lambda: (6, 0, 0))
    with pytest.raises(RuntimeError, match="installed"):
        FastV(layer=1).apply(model, spans=spans)
    assert hook_snapshot(model) == hooks0
    if TF >= (4, 45, 0):  # a model class newer than the version: named with its own floor
        vlm, _, vlm_spans = build("qwen2_vl", "sdpa")
        monkeypatch.setattr(versions, "transformers_version", lambda: (4, 44, 0))
        with pytest.raises(RuntimeError, match=r"qwen2_vl with transformers >=4\.45\.0"):
            FastV(layer=1).apply(vlm, spans=vlm_spans)


@dataclass
class _HalvingMerge(TokenPlan):
    """The module docstring's example: HoliTom-style inner merge in a few lines."""

    layer: int = 2
    keep_ratio: float = 0.5

    @property
    def layers(self):
        return (self.layer,)

    def budget(self, stage, span_len):
        return round(span_len * self.keep_ratio)

    def score(self, ctx):
        return ctx.span_attention(-1)

    def fold(self, hidden_states, merge, ctx):
        self.seen = (hidden_states.clone(), ctx.span_pos.clone(), merge)
        out = merge.merge(hidden_states, mode="halving")
        self.out = out.clone()
        return out


def test_fold_known_answer_sequential_halving_into_most_similar_kept():
    """Each dropped span token goes into its most cosine-similar kept span token, and the
    kept token's state is the official loop ``h[t] = (h[t] + h[i]) / 2`` over ascending i."""
    model, inputs, spans = build("qwen2", "eager")
    plan = _HalvingMerge()
    with plan.apply(model, spans=spans) as h, torch.no_grad():
        model(**inputs)
        keep = h.last_plan["keep_idx"][2]
    hidden, span_pos, merge = plan.seen
    for b in range(hidden.shape[0]):
        kept_span = [p for p in keep[b].tolist() if p in set(span_pos[b].tolist())]
        dropped = [p for p in span_pos[b].tolist() if p not in kept_span]
        assert len(kept_span) == round(len(span_pos[b]) * 0.5)
        want = hidden[b].clone()
        unit = torch.nn.functional.normalize(hidden[b].float(), dim=-1)
        for i in dropped:  # ascending original index, as the official loop
            t = kept_span[int((unit[kept_span] @ unit[i]).argmax())]
            want[t] = (want[t] + hidden[b, i]) / 2
        slots = keep[b].tolist()
        torch.testing.assert_close(plan.out[b], want[slots], atol=1e-6, rtol=1e-5)


def test_padding_slot_masks_for_every_mask_layout():
    """Padding slots are hidden as keys (but see themselves) in None / bool / float / 2D masks."""
    from common.engine.slicing import mask_padding_slots_decode, mask_padding_slots_prefill

    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    neg = torch.finfo(torch.float32).min
    built = mask_padding_slots_prefill(None, valid, dtype=torch.float32)
    assert built.shape == (2, 1, 4, 4)
    allowed = built[:, 0] == 0
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(allowed[0], causal)
    want1 = causal.clone()
    want1[2:, 1] = False  # slot 1 hidden from later queries, still sees itself
    assert torch.equal(allowed[1], want1)
    bool_mask = causal[None, None].expand(2, 1, 4, 4)
    assert torch.equal(
        mask_padding_slots_prefill(bool_mask, valid, dtype=torch.float32)[:, 0], allowed
    )
    float_mask = torch.where(bool_mask, 0.0, neg)
    out = mask_padding_slots_prefill(float_mask, valid, dtype=torch.float32)
    assert torch.equal(out[:, 0] == 0, allowed)
    # FlashAttention: a 2D key mask with zeros at the padding slots
    flash = mask_padding_slots_prefill(None, valid, dtype=torch.float32, flash=True)
    assert flash.tolist() == [[1, 1, 1, 1], [1, 0, 1, 1]]
    two_d = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # sample 0 left padded
    assert mask_padding_slots_prefill(two_d, valid, dtype=torch.float32).tolist() == [
        [0, 1, 1, 1],
        [1, 0, 1, 1],
    ]
    # decoding: 4 kept prefill keys + 2 decoded, 1 new query
    dec = mask_padding_slots_decode(None, valid, 1, 6, dtype=torch.float32)
    assert dec.shape == (2, 1, 1, 6)
    assert (dec[:, 0, 0] == 0).tolist() == [[True] * 6, [True, False, True, True, True, True]]
    two_q = mask_padding_slots_decode(None, valid, 2, 6, dtype=torch.float32)
    assert (two_q[1, 0] == 0).tolist() == [
        [True, False, True, True, True, False],  # the first new token does not see the second
        [True, False, True, True, True, True],
    ]
    dec2d = mask_padding_slots_decode(torch.ones(2, 6, dtype=torch.long), valid, 1, 6, dtype=None)
    assert dec2d.tolist() == [[1] * 6, [1, 0, 1, 1, 1, 1]]
