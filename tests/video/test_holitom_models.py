"""HoliTom on real tiny LLaVA-OneVision / Qwen2-VL models (random weights, real video inputs)."""

from __future__ import annotations

import pytest
import torch

from tests.engine._tiny import generate
from tests.video._models import BUILDERS, VIDEO_ID, sample
from video.holitom.inner import InnerMerge, bidirectional_mask, fold_into_most_similar
from video.holitom.method import HoliTom

KINDS = tuple(BUILDERS)
IMPLS = ("sdpa", "eager")
NEW = 4


def _generate(model, inputs):
    """Greedy: ``.sequences`` and per-step ``.logits``."""
    return generate(model, NEW, **inputs)


def _hook_counts(model):
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_pre_hooks_with_kwargs))
        for m in model.modules()
    ]


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_identity_and_remove_restores(kind, impl):
    model, inputs = BUILDERS[kind](impl)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _generate(model, inputs)
    hooks0 = _hook_counts(model)  # after a first call (transformers adds its own lazily)
    with HoliTom(retain_ratio=1.0, inner_ratio=0.0).apply(model) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        gen = _generate(model, inputs)
        assert handle.last["short_length"] == handle.last["full_length"]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # removed: nothing left on the instance
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert _hook_counts(model) == hooks0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)


def test_applying_twice_replaces_and_repr():
    model, inputs = BUILDERS["llava_ov"]("sdpa")
    first = HoliTom(retain_ratio=0.5, inner_ratio=0.0).apply(model)
    second = HoliTom(retain_ratio=0.25, tau=0.65, inner_layer=2).apply(model)
    assert not first.active and second.active
    assert "HoliTom" in repr(second) and "active" in repr(second)
    with torch.no_grad():
        model(**inputs)
    assert second.last is not None and first.last is None
    second.remove()
    assert "forward" not in vars(model)


# ----------------------------------------------------------------------------- shorter prefill


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_is_shorter_and_generate_returns_the_original_prompt(kind):
    model, inputs = BUILDERS[kind]("sdpa")
    full = inputs["input_ids"]
    seen: list[int] = []
    decoder = model.model.language_model
    h = decoder.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with HoliTom(retain_ratio=0.25, tau=0.65, inner_ratio=0.0).apply(model) as handle:
            with torch.no_grad():
                logits = model(**inputs).logits
            gen = _generate(model, inputs)
    finally:
        h.remove()
    short = handle.last["input_ids"]
    assert logits.shape[1] == short.shape[1] < full.shape[1]
    assert seen[0] == short.shape[1]  # the decoder really ran on the shorter sequence
    for b in range(2):
        n_video = int((short[b] == VIDEO_ID).sum())
        reduced = handle.last["reduced"][b]
        assert n_video == reduced.tokens.shape[0] < int((full[b] == VIDEO_ID).sum())
        # text tokens are kept, in order
        assert torch.equal(
            short[b][(short[b] != VIDEO_ID) & handle.last["attention_mask"][b].bool()],
            full[b][(full[b] != VIDEO_ID) & inputs["attention_mask"][b].bool()],
        )
    # generate: original prompt + new tokens, as the unpatched model returns it
    assert gen.sequences.shape == (2, full.shape[1] + NEW)
    assert torch.equal(gen.sequences[:, : full.shape[1]], full)


# ----------------------------------------------------------------------------- generate consistent


def _positions(kind, handle, new_ids):
    """Positions of the shortened prompt + ``new_ids`` as generate assigns them."""
    mask = handle.last["attention_mask"]
    if kind.startswith("qwen"):
        pos = handle.last["position_ids"]  # [3, B, L']
        last = pos[..., -1:]
        steps = torch.arange(1, new_ids.shape[1] + 1)[None, None]
        return torch.cat([pos, last + steps], dim=-1)
    full_mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
    return (full_mask.cumsum(1) - 1).masked_fill(full_mask == 0, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches_no_cache_recomputation_on_the_shortened_prompt(kind, impl):
    model, inputs = BUILDERS[kind](impl)
    with HoliTom(retain_ratio=0.25, tau=0.65, inner_ratio=0.0).apply(model) as handle:
        gen = _generate(model, inputs)
        short_ids = handle.last["input_ids"]
        mask = handle.last["attention_mask"]
        new = gen.sequences[:, inputs["input_ids"].shape[1] :]
        # rebuild the shortened prompt's embeddings from the reducer outputs
        with torch.no_grad():
            embeds = model.get_input_embeddings()(short_ids)
            for b in range(2):
                where = short_ids[b] == VIDEO_ID
                embeds[b, where] = handle.last["reduced"][b].tokens.to(embeds)
            for t in range(NEW):
                ids_t = torch.cat([short_ids, new[:, :t]], dim=1)
                emb_t = torch.cat([embeds, model.get_input_embeddings()(new[:, :t])], dim=1)
                mask_t = torch.cat([mask, torch.ones_like(new[:, :t])], dim=1)
                pos_t = _positions(kind, handle, new[:, :t])
                out = model(
                    inputs_embeds=emb_t,
                    attention_mask=mask_t,
                    position_ids=pos_t,
                    use_cache=False,
                ).logits[:, -1]
                torch.testing.assert_close(out, gen.logits[t], atol=1e-4, rtol=0)
                assert torch.equal(out.argmax(-1), new[:, t])
                assert ids_t.shape[1] == short_ids.shape[1] + t


# ----------------------------------------------------------------------------- batch


@pytest.mark.parametrize("inner", [0.0, 0.5])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_two_videos_matches_each_alone(kind, impl, inner):
    model, inputs = BUILDERS[kind](impl)
    method = HoliTom(retain_ratio=0.3, tau=0.9, inner_layer=2, inner_ratio=inner)
    with method.apply(model) as handle:
        batch = _generate(model, inputs)
        lengths = handle.last["short_length"]
        alone = [_generate(model, sample(inputs, b, kind)) for b in range(2)]
    assert lengths[0] != lengths[1]  # different merged lengths in one batch
    for b in range(2):
        n = alone[b].sequences.shape[1]
        assert torch.equal(batch.sequences[b, -NEW:], alone[b].sequences[0, n - NEW :])
        for t in range(NEW):
            torch.testing.assert_close(batch.logits[t][b], alone[b].logits[t][0], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- M-RoPE


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_keeps_original_mrope_ids_and_rope_deltas(kind):
    model, inputs = BUILDERS[kind]("sdpa")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full_pos, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=mask,
    )
    _, h, w = inputs["video_grid_thw"][0].tolist()
    n = (h // 2) * (w // 2)  # LLM tokens per temporal step
    with HoliTom(retain_ratio=0.25, tau=0.65, inner_ratio=0.0).apply(model) as handle:
        with torch.no_grad():
            model(**inputs)
        pos = handle.last["position_ids"]
        short = handle.last["input_ids"]
        for b in range(2):
            res = handle.last["reduced"][b]
            start = int((ids[b] == VIDEO_ID).nonzero()[0])
            src = start + res.frame * n + res.position
            got = pos[:, b, short[b] == VIDEO_ID]
            # gathered, never recomputed: exactly the full prompt's ids at the sources
            assert torch.equal(got, full_pos[:, b, src])
            # the text after the video keeps its original ids (a gap where tokens went)
            valid = mask[b].bool()
            tail = pos[:, b, -3:]
            assert torch.equal(tail, full_pos[:, b, valid][:, -3:])
            # decoding continues from the full prompt's next id
            full_next = int(full_pos[:, b, valid].max()) + 1
            short_len = int(handle.last["attention_mask"][b].sum())
            assert int(model.model.rope_deltas[b]) + short_len == full_next


def test_qwen2_5_vl_attention_follows_the_llm_token_order():
    """Qwen2.5-VL runs its vision blocks in window order: each LLM token must get the
    attention of its own merged unit (matched here by the merged feature itself)."""
    from video.hf import _qwen_videos, _VisionTap
    from video.vision_attention import record_vision_attention

    model, inputs = BUILDERS["qwen2_5_vl"]("sdpa")
    visual = model.model.visual
    out: dict = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, o: out.update(h=o))
    tap = _VisionTap(model, "qwen2_vl", True)
    raw = record_vision_attention(visual, -1)  # per patch, window order
    try:
        with torch.no_grad():
            videos = _qwen_videos(model, inputs, tap)
    finally:
        hook.remove()
        tap.remove()
        raw.remove()
    with torch.no_grad():
        merged_window_order = visual.merger(out["h"])  # [S/4, D] in window order
    per_unit = raw.pop().view(-1, 4).mean(-1)  # window order
    feats = torch.cat([v.reshape(-1, v.shape[-1]) for v in videos.features])
    att = torch.cat([a.reshape(-1) for a in videos.attention])
    dist = torch.cdist(feats, merged_window_order)
    j = dist.argmin(1)
    assert float(dist.min(1).values.max()) < 1e-3  # every token is one merged unit
    # the static clip repeats units across frames: check the tokens matched unambiguously
    unique = dist.kthvalue(2, 1).values > 1e-2
    assert int(unique.sum()) >= len(j) // 2
    assert not torch.equal(j[unique], torch.arange(len(j))[unique])  # windows reorder
    torch.testing.assert_close(att[unique], per_unit[j[unique]])


# ----------------------------------------------------------------------------- inner fold


def test_inner_fold_known_answer():
    # one sample, 6 tokens, D = 2; kept positions 1 and 4; dropped 0, 2, 3, 5
    h = torch.tensor([[[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.0, 2.0], [0.1, 1.0]]])
    keep = torch.tensor([[1, 4]])
    drop = torch.tensor([[0, 2, 3, 5]])
    # targets by cosine: 0 -> 1, 2 -> 4, 3 -> 1, 5 -> 4
    # faithful: h1 = ((h1 + h0)/2 + h3)/2 ; h4 = ((h4 + h2)/2 + h5)/2
    out = fold_into_most_similar(h, keep, drop, mode="faithful")
    h1 = ((h[0, 1] + h[0, 0]) / 2 + h[0, 3]) / 2
    h4 = ((h[0, 4] + h[0, 2]) / 2 + h[0, 5]) / 2
    torch.testing.assert_close(out[0, 1], h1)
    torch.testing.assert_close(out[0, 4], h4)
    torch.testing.assert_close(out[0, 1], torch.tensor([1.5, 0.075]))
    assert torch.equal(out[0, [0, 2, 3, 5]], h[0, [0, 2, 3, 5]])  # dropped rows untouched
    # size-weighted mean: sizes 1, 2, 1, 3, 1, 1
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0]])
    out = fold_into_most_similar(h, keep, drop, mode="mean", sizes=sizes)
    torch.testing.assert_close(out[0, 1], (2 * h[0, 1] + h[0, 0] + 3 * h[0, 3]) / 6)
    torch.testing.assert_close(out[0, 4], (h[0, 4] + h[0, 2] + h[0, 5]) / 3)


def _qwen2(seed: int, **kw):
    """A 4-layer, 32-wide random Qwen2 decoder with a 64-token vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )
    return Qwen2ForCausalLM(cfg).eval()


def test_inner_merge_on_the_engine_matches_the_hand_rule():
    """The plan inside a real decoder: kept set = top round(L/2) of layer K-1's last row,
    folded states = the hand rule applied to layer K-1's output."""
    model = _qwen2(seed=0, attn_implementation="eager")
    ids = torch.randint(3, 60, (1, 19))
    span = (3, 14)  # 11 tokens -> round(5.5) = 6 kept (half to even)
    captured = {}

    def grab(name):
        def hook(module, args, kwargs):
            captured[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    for layer_attention in ("causal", "bidirectional"):
        plan = InnerMerge(layer=2, ratio=0.5, layer_attention=layer_attention)
        with plan.apply(model, spans=[span]) as handle:
            # registered after the engine's hook: sees the merged, sliced input of layer K
            h = model.model.layers[2].register_forward_pre_hook(grab("k_in"), with_kwargs=True)
            with torch.no_grad():
                model(ids)
            h.remove()
            keep_idx = handle.last_plan["keep_idx"][2][0]
        kept_span = [i for i in keep_idx.tolist() if span[0] <= i < span[1]]
        assert len(kept_span) == 6
        # reference: layer K-1's output from the unpatched model, the same layer mask rule
        ref: dict = {}

        def grab_in(module, args, kwargs, ref=ref):
            ref["k1_in"] = args[0] if args else kwargs["hidden_states"]
            ref["k1_kwargs"] = kwargs

        h = model.model.layers[1].register_forward_pre_hook(grab_in, with_kwargs=True)
        with torch.no_grad():
            model(ids)
        h.remove()
        kw = dict(ref["k1_kwargs"])
        for name in ("cache", "past_key_values", "past_key_value"):
            kw.pop(name, None)
        kw["use_cache"] = False
        if layer_attention == "bidirectional":
            kw["attention_mask"] = bidirectional_mask(
                kw.get("attention_mask"), 1, 19, torch.float32
            )
        with torch.no_grad():
            k1_out = model.model.layers[1](ref["k1_in"], **kw)
        k1_out = k1_out[0] if isinstance(k1_out, tuple) else k1_out
        drop = [i for i in range(*span) if i not in kept_span]
        expected = fold_into_most_similar(
            k1_out, torch.tensor([kept_span]), torch.tensor([drop]), mode="faithful"
        )
        got = captured["k_in"]
        torch.testing.assert_close(got, expected[:, keep_idx], atol=1e-5, rtol=0)
        captured.clear()


def test_bidirectional_changes_states_not_kept_set():
    model = _qwen2(seed=1)
    ids = torch.randint(3, 60, (1, 20))
    outs, kept = {}, {}
    for mode in ("bidirectional", "causal"):
        with InnerMerge(layer=2, ratio=0.5, layer_attention=mode).apply(
            model, spans=[(2, 16)]
        ) as handle:
            with torch.no_grad():
                outs[mode] = model(ids).logits
            kept[mode] = handle.last_plan["keep_idx"][2]
    assert torch.equal(kept["bidirectional"], kept["causal"])
    assert not torch.allclose(outs["bidirectional"], outs["causal"], atol=1e-4)


def test_bad_fields_raise():
    for field, value in (
        ("retain_ratio", 0.0),
        ("inner_ratio", 1.0),
        ("inner_layer", 0),
        ("inner_fold", "sum"),
        ("inner_attention", "sideways"),
        ("layout", "spiral"),
        ("tau", 2.0),
    ):
        with pytest.raises(ValueError, match=field):
            HoliTom(**{field: value})
    with pytest.raises(ValueError, match="fold_mode"):
        InnerMerge(fold_mode="sum")
    model, _ = BUILDERS["llava_ov"]("sdpa")
    before = _hook_counts(model)
    with pytest.raises(ValueError, match="layer"):
        HoliTom(inner_layer=18).apply(model)  # a 4-layer decoder
    assert _hook_counts(model) == before  # nothing half-applied


# ----------------------------------------------------------------------------- known answer


def test_static_background_collapses_and_the_moving_square_is_kept():
    """Sample 0 of the LLaVA-OV batch: a static background with a white square sliding along
    the top row of pooled tokens (columns 0-3 of the 4 x 4 grid, pixel geometry in
    tests/video/_models.py). Through the real model path: one segment over all six
    frames, the twelve other positions merged into one static token each (standing for
    six frames), the square's row kept as dynamic tokens in every frame."""
    model, inputs = BUILDERS["llava_ov"]("sdpa")
    one = sample(inputs, 0, "llava_ov")
    # tau between the background's adjacent-frame similarity (>= 0.999 here) and the
    # square's (<= 0.99); retain 0.5 rebalances to r' = 1, so nothing else is dropped
    with HoliTom(retain_ratio=0.5, tau=0.995, inner_ratio=0.0).apply(model) as handle:
        with torch.no_grad():
            model(**one)
    res = handle.last["reduced"][0]
    assert res.segments == [(0, 5)]
    static = res.static & (res.position >= 0)
    assert sorted(res.position[static].tolist()) == list(range(4, 16))
    assert res.size[static].tolist() == [6] * 12
    for t in range(6):
        dyn = (~res.static) & (res.frame == t) & (res.position >= 0)
        assert sorted(res.position[dyn].tolist()) == [0, 1, 2, 3]
    assert int(res.is_newline.sum()) == 1 and bool(res.is_newline[-1])
    # 96 video tokens + newline -> 12 static + 6 x 4 dynamic + newline
    assert handle.last["short_length"][0] == handle.last["full_length"][0] - 97 + 37


def test_mean_fold_weighs_tokens_by_the_outer_stage_sizes():
    """inner_fold='mean' on LLaVA-OV: the kept tokens entering layer K are the size-weighted
    means, with the sizes the outer stage handed over (static tokens stand for 6 frames)."""
    model, inputs = BUILDERS["llava_ov"]("sdpa")
    one = sample(inputs, 0, "llava_ov")
    method = HoliTom(
        retain_ratio=0.5,
        tau=0.995,
        inner_layer=2,
        inner_ratio=0.5,
        inner_fold="mean",
        inner_attention="causal",
    )
    got: dict = {}
    layers = model.model.language_model.layers
    with method.apply(model) as handle:
        h1 = layers[1].register_forward_hook(lambda m, a, o: got.update(k1=o))
        h2 = layers[2].register_forward_pre_hook(
            lambda m, a, k: got.update(k_in=a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**one)
        h1.remove()
        h2.remove()
        keep_idx = handle.inner.last_plan["keep_idx"][2][0]
    sizes = handle.last["sizes"]
    assert sorted(set(sizes[0].tolist())) == [1.0, 6.0]  # static tokens weigh 6
    k1 = got["k1"][0] if isinstance(got["k1"], tuple) else got["k1"]
    ((start, end),) = handle.last["spans"][0]
    kept = [i for i in keep_idx.tolist() if start <= i < end]
    drop = [i for i in range(start, end) if i not in kept]
    expected = fold_into_most_similar(
        k1, torch.tensor([kept]), torch.tensor([drop]), mode="mean", sizes=sizes
    )
    torch.testing.assert_close(got["k_in"], expected[:, keep_idx], atol=1e-5, rtol=0)
    # and it is not the unweighted mean
    plain = fold_into_most_similar(k1, torch.tensor([kept]), torch.tensor([drop]), mode="mean")
    assert not torch.allclose(plain[:, keep_idx], got["k_in"], atol=1e-4)


def test_holitom_registers_through_its_own_provider():
    """The registry finds 'holitom' without video.baselines (which also imports it)."""
    import subprocess
    import sys

    code = (
        "import common.methods as m\n"
        "m._PROVIDERS = tuple(p for p in m._PROVIDERS if p != 'video.baselines')\n"
        "assert 'holitom' in m.registered_methods('video'), m.registered_methods()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
