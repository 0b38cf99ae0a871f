"""AdaGate at run time: modes, counts, the faithful mode against the author code,
LLaVA-3D's calling pattern (stand-in), batches with different spatial counts."""

from __future__ import annotations

import pytest
import torch

from common.engine import PDrop
from threed.adagate import AdaGate, llava3d_spans
from threed.adagate.scores import adaptive_counts, smooth_scores

from . import adagate_reference as ref
from .llava3d_standin import IMAGE_TOKEN_INDEX, LOC_TOKEN_INDEX, build, llava3d_batch

IMPLS = ("sdpa", "eager")


def _llama(impl: str, layers: int = 4, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).eval()


def _padded_batch(span_len: int = 40, seed: int = 0):
    """Left-padded batch of 2: 5 / 2 prefix tokens, a ``span_len`` span, 8 / 6 question tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 128, (5 + span_len + 8,), generator=gen)]
    rows.append(torch.randint(3, 128, (2 + span_len + 6,), generator=gen))
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    spans = []
    for b, (r, pre) in enumerate(zip(rows, (5, 2))):
        off = length - len(r)
        ids[b, off:] = r
        mask[b, off:] = 1
        spans.append([(off + pre, off + pre + span_len)])
    return ids, mask, spans


def _greedy(model, **kw):
    return model.generate(**kw, max_new_tokens=4, do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------------------- fields


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layers": ()}, "layers"),
        ({"layers": (0,), "keep": (0.5,)}, "layers"),
        ({"layers": (4, 2), "keep": (0.5, 0.2)}, "layers"),
        ({"keep": (0.5, 0.25)}, "keep"),
        ({"keep": (0.5, 0.0, 0.1)}, "keep"),
        ({"keep": (0.25, 0.5, 0.1)}, "keep"),
        ({"mode": "always"}, "mode"),
        ({"mass": 0.0}, "mass"),
        ({"min_keep": 1.5}, "min_keep"),
        ({"min_keep": 0.5, "max_keep": 0.2}, "min_keep"),
        ({"faithful": True, "mode": "adaptive"}, "faithful"),
        ({"smooth": 1}, "smooth"),
    ],
)
def test_bad_fields_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaGate(**kwargs)


def test_layers_beyond_the_decoder_are_refused():
    with pytest.raises(ValueError, match=r"layers must be in \[1, 3\]"):
        AdaGate().apply(_llama("sdpa"), spatial_spans=[(2, 10)])


# ---------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("impl", IMPLS)
def test_keep_all_is_the_identity(impl):
    model = _llama(impl)
    ids, mask, spans = _padded_batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = _greedy(model, input_ids=ids, attention_mask=mask)
        with AdaGate(layers=(1, 2, 3), keep=(1.0, 1.0, 1.0)).apply(model, spatial_spans=spans):
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = _greedy(model, input_ids=ids, attention_mask=mask)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(gen, ref_gen)


def test_keep_is_a_fraction_of_the_original_span():
    model = _llama("sdpa")
    ids, mask, spans = _padded_batch(span_len=40)
    with AdaGate(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125)).apply(model, spatial_spans=spans) as h:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert h.last_counts == {1: [20, 20], 2: [10, 10], 3: [5, 5]}
        plan = h.last_plan
        assert plan["span_kept"][3].tolist() == [5, 5]
        # kept tokens of the last gate survived every earlier gate, text never dropped
        for b in range(2):
            (s, e) = spans[b][0]
            kept = set(plan["keep_idx"][3][b].tolist())
            assert kept <= set(plan["keep_idx"][1][b].tolist())
            real = set(mask[b].nonzero().flatten().tolist())
            assert (real - set(range(s, e))) <= kept


@pytest.mark.parametrize("impl", IMPLS)
def test_default_mode_equals_pdrop_with_the_equivalent_ratios(impl):
    """keep=(0.5, 0.25) of the original = PDrop's (0.5, 0.5) of what remains (same score)."""
    model = _llama(impl)
    ids, mask, spans = _padded_batch(span_len=40)
    with torch.no_grad():
        with PDrop(layers=(1, 3), ratios=(0.5, 0.5)).apply(model, spans=spans) as h:
            want = model(input_ids=ids, attention_mask=mask).logits
            want_idx = h.last_plan["keep_idx"][3]
        with AdaGate(layers=(1, 3), keep=(0.5, 0.25)).apply(model, spatial_spans=spans) as h:
            got = model(input_ids=ids, attention_mask=mask).logits
            got_idx = h.last_plan["keep_idx"][3]
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_smooth_averages_with_the_previous_gate():
    cur = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    prev = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(
        smooth_scores(cur, prev), torch.tensor([[0.375, 0.375, 0.125, 0.125]])
    )
    model = _llama("sdpa")
    ids, mask, spans = _padded_batch()
    with AdaGate(layers=(1, 2), keep=(0.5, 0.25), smooth=True).apply(
        model, spatial_spans=spans
    ) as h:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        smoothed = h.last_plan["keep_idx"][2]
    with AdaGate(layers=(1, 2), keep=(0.5, 0.25)).apply(model, spatial_spans=spans) as h:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        plain = h.last_plan["keep_idx"][2]
    assert smoothed.shape == plain.shape
    assert not torch.equal(smoothed, plain)  # the previous gate's scores changed the ranking


# ---------------------------------------------------------------------------- faithful


def _reference_model(impl: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**ref.CONFIG, attn_implementation=impl)).eval()
    ref.seeded_weights(model)
    return model.to(dtype)


@pytest.mark.parametrize(
    "impl, dtype", [("eager", torch.float32), ("sdpa", torch.float32), ("eager", torch.bfloat16)]
)
def test_faithful_mode_reproduces_the_author_code(impl, dtype):
    """Kept indices, greedy tokens and logits of the author's pdrop_forward (run once under
    transformers 4.37.2 on the same seeded model; see tests/threed/adagate_reference.py)."""
    want = ref.load_reference()["float32" if dtype == torch.float32 else "bfloat16"]
    model = _reference_model(impl, dtype)
    embeds = ref.seeded_embeds().to(dtype)
    span = (ref.PREFIX, ref.PREFIX + ref.SPATIAL)
    gate = AdaGate(layers=ref.LAYERS, keep=ref.KEEP, faithful=True)
    with gate.apply(model, spatial_spans=[span]) as h:
        out = model.generate(
            inputs_embeds=embeds,
            max_new_tokens=ref.STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        kept = []
        for layer in ref.LAYERS:
            k = h.last_plan["keep_idx"][layer][0]
            kept.append(k[(k >= span[0]) & (k < span[1])].tolist())
    assert kept == want["kept"]
    assert out.sequences[0, -ref.STEPS :].tolist() == want["tokens"]
    logits = torch.stack([lg[0].float() for lg in out.scores])
    # bf16: the unpruned model itself rounds differently across transformers versions
    atol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits, torch.tensor(want["logits"]), rtol=0, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_faithful_mode_runs_batched_with_left_padding(impl):
    """Where the author code fails (padding, batch 2, SDPA decoding): each sample of a
    left-padded batch generates what it generates alone."""
    model = _llama(impl, layers=6)
    ids, mask, spans = _padded_batch(span_len=40)
    gate = AdaGate(layers=(2, 4), keep=(0.5, 0.25), faithful=True)
    with gate.apply(model, spatial_spans=spans) as h:
        both = _greedy(model, input_ids=ids, attention_mask=mask)
        counts = h.last_counts
        for b in range(2):
            real = mask[b].bool()
            off = int((~real).sum())
            (s, e) = spans[b][0]
            h.set_spans([(s - off, e - off)])
            alone = _greedy(model, input_ids=ids[b : b + 1, real])
            assert torch.equal(alone[0], both[b, off:]), b
    assert counts == {2: [20, 20], 4: [10, 10]}


# ---------------------------------------------------------------------------- adaptive


def test_adaptive_counts_known_answers():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    low, high = torch.tensor([1, 1]), torch.tensor([4, 4])
    assert adaptive_counts(scores, 0.8, low, high).tolist() == [2, 4]
    assert adaptive_counts(scores, 0.5, low, high).tolist() == [1, 2]
    assert adaptive_counts(scores, 0.5, torch.tensor([3, 1]), high).tolist() == [3, 2]
    assert adaptive_counts(scores, 1.0, low, torch.tensor([2, 3])).tolist() == [2, 3]
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    assert adaptive_counts(scores, 0.9, low, high, valid).tolist() == [3, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_mode_keeps_per_sample_counts_in_one_batch(impl):
    model = build(seed=0, layers=4, impl=impl)
    ids, mask, images, clicks = llava3d_batch(seed=3, scene_tokens=(40, 64))
    gate = AdaGate(layers=(1, 2), keep=(1.0, 1.0), mode="adaptive", mass=0.6, min_keep=0.1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with gate.apply(model) as h:
        both = model.generate(ids, attention_mask=mask, images=images, clicks=clicks, **kw)
        counts = h.last_counts
        singles = []
        for b in range(2):
            real = mask[b].bool()
            click = clicks[:1] if b == 0 else None
            singles.append(
                model.generate(ids[b : b + 1, real], images=images[b : b + 1], clicks=click, **kw)
            )
            assert h.last_counts == {k: [v[b]] for k, v in counts.items()}
    for b in range(2):
        assert torch.equal(singles[b][0], both[b]), b
    n0 = (40, 64)
    for per_sample in counts.values():
        for b, c in enumerate(per_sample):
            assert round(0.1 * n0[b]) <= c <= n0[b]
    assert counts[1][0] != counts[1][1]  # different scenes keep different counts


def test_adaptive_bounds_given_as_int_one_are_ratios():
    """min_keep=1 / max_keep=1 (ints) are the whole span, not a count of one token."""
    model = build(seed=0, layers=4)
    ids, mask, images, clicks = llava3d_batch(seed=3, scene_tokens=(40, 64))
    gate = AdaGate(layers=(1,), keep=(1.0,), mode="adaptive", mass=0.5, min_keep=1, max_keep=1)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    kw.update(attention_mask=mask, images=images, clicks=clicks)
    plain = model.generate(ids, **kw)
    with gate.apply(model) as h:
        gated = model.generate(ids, **kw)
        assert h.last_counts == {}  # every token kept: the exact identity, no pruned prefill
    assert torch.equal(gated, plain)


# ---------------------------------------------------------------------------- LLaVA-3D


def test_llava3d_spans_are_found_and_skip_the_click():
    model = build(seed=0, layers=4)
    ids, mask, images, clicks = llava3d_batch(seed=1, scene_tokens=(40, 56))
    out = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, None, images, None, None, None, None, clicks
    )
    embeds, out_mask = out[4], out[2]
    spans = llava3d_spans(ids, mask, out_mask, embeds.shape[1])
    with torch.no_grad():
        for b, n in enumerate((40, 56)):
            (s, e) = spans[b][0]
            assert e - s == n
            torch.testing.assert_close(embeds[b, s:e], model.scene_proj(images[b]))
    # sample 0's click token sits right after "<image> \n", outside its span
    (s0, e0) = spans[0][0]
    with torch.no_grad():
        click = model.click_proj(torch.tensor(clicks[0]))
    torch.testing.assert_close(embeds[0, e0 + 1], click)
    assert (ids == LOC_TOKEN_INDEX).sum() == 1 and (ids == IMAGE_TOKEN_INDEX).sum() == 2
    # right padding (LLaVA-3D's default) puts every span at the same offset
    model.config.tokenizer_padding_side = "right"
    out = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, None, images, None, None, None, None, clicks
    )
    assert llava3d_spans(ids, mask, out[2], out[4].shape[1]) == [[(35, 75)], [(35, 91)]]


@pytest.mark.parametrize("impl", IMPLS)
def test_llava3d_generate_with_inputs_embeds(impl):
    model = build(seed=0, layers=4, impl=impl)
    other = build(seed=0, layers=4, impl=impl)
    ids, mask, images, clicks = llava3d_batch(seed=2, scene_tokens=(40, 56))
    kw = dict(attention_mask=mask, images=images, clicks=clicks, max_new_tokens=4)
    kw.update(do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)
    with AdaGate(layers=(1, 2), keep=(1.0, 1.0)).apply(model):
        assert torch.equal(model.generate(ids, **kw), plain)
    with AdaGate(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125)).apply(model) as h:
        assert "prepare_inputs_labels_for_multimodal" in model.__dict__
        assert "prepare_inputs_labels_for_multimodal" not in other.__dict__
        pruned = model.generate(ids, **kw)
        assert h.recorder.spans == [[(47, 87)], [(35, 91)]]  # sample 0 is left-padded
        assert h.last_counts == {1: [20, 28], 2: [10, 14], 3: [5, 7]}
        assert h.last_plan["span_kept"][3].tolist() == [5, 7]
        # a text-only prompt afterwards (no input builder call) is not gated with stale spans
        text = ids[:1, -12:]
        gated_text = model.generate(text, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert h.last_plan is None
    assert pruned.shape == plain.shape
    text_plain = model.generate(text, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gated_text, text_plain)
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__
    assert torch.equal(model.generate(ids, **kw), plain)  # removed: the model is as before


def test_llava3d_generate_is_cache_consistent():
    """generate(inputs_embeds=...) under the gate = a hand-run greedy loop on the cache."""
    from transformers import DynamicCache

    model = build(seed=0, layers=4)
    ids, mask, images, clicks = llava3d_batch(seed=4, scene_tokens=(48, 48))
    with AdaGate(layers=(1, 3), keep=(0.5, 0.25)).apply(model):
        gen = model.generate(
            ids,
            attention_mask=mask,
            images=images,
            clicks=clicks,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        built = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, images, None, None, None, None, clicks
        )
        embeds, am = built[4], built[2]
        cache = DynamicCache()
        tokens = []
        with torch.no_grad():
            pos = (am.cumsum(1) - 1).clamp(min=0)
            out = model(
                inputs_embeds=embeds,
                attention_mask=am,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            for _ in range(4):
                tok = out.logits[:, -1].argmax(-1)
                tokens.append(tok)
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                pos = pos[:, -1:] + 1
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=am,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                )
    assert torch.equal(torch.stack(tokens, 1), gen[:, -4:])  # 4.37 prepends a start token


@pytest.mark.slow
@pytest.mark.parametrize("faithful", (False, True))
def test_llava3d_layout_at_full_length(faithful):
    """The LLaVA-3D layout at tiny width: 35 prefix tokens, ~1600 spatial tokens, one click,
    ~40 question tokens; batch 2 (left-padded, different scene sizes) and each sample alone."""
    model = build(seed=0, layers=4, hidden=32, heads=2, kv_heads=2)
    ids, mask, images, clicks = llava3d_batch(
        seed=6, scene_tokens=(1600, 1450), question=(40, 38), click=(True, False)
    )
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    gate = AdaGate(layers=(1, 2, 3), keep=(0.5, 0.25, 0.125), faithful=faithful)
    with gate.apply(model) as h:
        both = model.generate(ids, attention_mask=mask, images=images, clicks=clicks, **kw)
        assert h.last_counts == {1: [800, 725], 2: [400, 362], 3: [200, 181]}
        for b in range(2):
            real = mask[b].bool()
            alone = model.generate(
                ids[b : b + 1, real],
                images=images[b : b + 1],
                clicks=clicks if b == 0 else None,
                **kw,
            )
            assert torch.equal(alone[0, -3:], both[b, -3:]), b
