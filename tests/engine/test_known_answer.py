"""Known-answer tests: the engine equals an explicit run of the layers on the kept tokens.

The reference runs the decoder layers by hand: layers < K on every token,
layers >= K on the kept prompt tokens plus every generated token, with the
original position ids and an explicit causal + padding mask. One full pass
over prompt + generated tokens gives every decoding step's logits (causal
attention), so it checks the engine's prefill *and* its cached decoding.
"""

from __future__ import annotations

import pytest
import torch

from common.engine import FastV, PDrop
from tests.engine._tiny import build, generate, lm_logits, plan_stages, run_layer, staged_reference

NEW = 5


def _run(kind, impl, method, batch):
    model, inputs, spans = build(kind, impl, seed=3)
    ids, attn = inputs["input_ids"][:batch], inputs["attention_mask"][:batch]
    spans = spans[:batch]
    lp = ids.shape[1]
    with method.apply(model, spans=spans) as handle, torch.no_grad():
        gen = generate(model, NEW, input_ids=ids, attention_mask=attn)
        plan = dict(handle.last_plan["keep_idx"])
    seq = gen.sequences
    full_attn, stages = plan_stages(plan, attn, NEW)
    with torch.no_grad():
        ref = staged_reference(model, model.model.embed_tokens(seq), full_attn, stages)
    n_kept_prompt = list(plan.values())[-1].shape[1]
    got = torch.stack(gen.logits, 1)  # [B, NEW, V]
    want = ref[:, n_kept_prompt - 1 : n_kept_prompt - 1 + NEW]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(seq[:, lp:], got.argmax(-1))
    return model, ids, attn, spans, plan


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_prefill_and_decode_match_explicit_reference(kind, impl, batch):
    method = FastV(layer=2, keep_ratio=0.3, attention_from="current")
    model, ids, attn, spans, plan = _run(kind, impl, method, batch)
    if impl == "eager":
        # "current": the kept span tokens are the top-k of layer 2's eager attention row
        with torch.no_grad():
            att = model(input_ids=ids, attention_mask=attn, output_attentions=True).attentions[2]
        row = att.mean(1)[:, -1]  # [B, L]
        for s, ((start, end),) in enumerate(spans):
            k = round((end - start) * 0.3)
            top = row[s, start:end].topk(k).indices.sort().values + start
            kept_span = [p for p in plan[2][s].tolist() if start <= p < end]
            assert kept_span == top.tolist()


@pytest.mark.parametrize("kind,layer", [("qwen2", 1), ("llama", 2)])
def test_fastv_attention_from_previous_uses_layer_k_minus_1_map(kind, layer):
    """The official FastV ranking (the default): layer K-1's own (eager) attention map."""
    method = FastV(layer=layer, keep_ratio=0.3)
    assert method.attention_from == "previous"
    model, ids, attn, spans, plan = _run(kind, "eager", method, 2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_attentions=True)
    row = out.attentions[layer - 1].mean(1)[:, -1]
    for s, ((start, end),) in enumerate(spans):
        k = round((end - start) * 0.3)
        top = row[s, start:end].topk(k).indices.sort().values + start
        assert [p for p in plan[layer][s].tolist() if start <= p < end] == top.tolist()


@pytest.mark.parametrize("kind,impl", [("qwen2", "eager"), ("llama", "sdpa")])
def test_pdrop_matches_explicit_reference(kind, impl):
    _run(kind, impl, PDrop(layers=(1, 3), ratios=(0.5, 0.5)), batch=2)


def _gather_pos(pos, cur):
    if pos.ndim == 2:
        return pos.expand(cur.shape[0], -1).gather(1, cur)
    pos = pos.expand(-1, cur.shape[0], -1)
    return pos.gather(2, cur[None].expand(pos.shape[0], -1, -1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llava_ov", "qwen2_vl"])
def test_vlm_pruned_prefill_matches_explicit_reference(kind, impl):
    """On the VLMs' language model (incl. Qwen2-VL's M-RoPE [3, B, L] positions)."""
    model, inputs, spans = build(kind, impl, seed=4)
    dec = model.get_decoder()
    seen, seen0 = {}, {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)

    def grab0(mod, args, kwargs):
        seen0.update(kwargs)

    hooks = [
        dec.register_forward_pre_hook(grab, with_kwargs=True),
        dec.layers[0].register_forward_pre_hook(grab0, with_kwargs=True),
    ]
    try:
        with PDrop(layers=(1, 2), ratios=(0.5, 0.4)).apply(model) as handle, torch.no_grad():
            got = model(**inputs).logits
            plan = dict(handle.last_plan["keep_idx"])
    finally:
        for hook in hooks:
            hook.remove()
    h, attn2d = seen["inputs_embeds"], seen["attention_mask"]
    pos = seen.get("position_ids")
    if pos is None and getattr(seen0.get("position_ids"), "ndim", 0) == 3:
        pos = seen0["position_ids"]  # 4.45: M-RoPE positions built inside the decoder
    b, t = h.shape[:2]
    if pos is None:
        pos = (attn2d.cumsum(-1) - 1).clamp(min=0)
    elif pos.ndim == 3 and pos.shape[0] == 4:  # text positions prepended (newer Qwen2-VL)
        pos = pos[1:]
    cur = torch.arange(t).expand(b, -1)
    valid = attn2d.bool()
    with torch.no_grad():
        for layer_idx, layer in enumerate(dec.layers):
            if layer_idx in plan:
                local = torch.searchsorted(cur, plan[layer_idx])
                h = h.gather(1, local[:, :, None].expand(-1, -1, h.shape[-1]))
                cur = plan[layer_idx]
            allowed = (cur[:, None, :] <= cur[:, :, None]) & valid.gather(1, cur)[:, None, :]
            mask = torch.where(allowed, 0.0, torch.finfo(h.dtype).min)[:, None]
            h = run_layer(dec, layer, h, mask, _gather_pos(pos, cur))
        want = lm_logits(model, dec, h)
    assert got.shape == want.shape
    real = valid.gather(1, cur)  # compare the real (non-pad) query positions
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
