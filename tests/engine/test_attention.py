"""attention_rows against the model's own eager attention weights."""

from __future__ import annotations

import pytest
import torch

from common.engine import attention_rows
from common.engine.versions import rotary_embeddings
from tests.engine._tiny import TF, build


def _capture_layer_inputs(model, layer_module, inputs):
    seen = {}

    def hook(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kw"] = kwargs

    handle = layer_module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return seen["h"], seen["kw"], out


def _qwen3(impl):
    if TF < (4, 51, 0):
        pytest.skip("Qwen3 arrived in transformers 4.51")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_implementation=impl,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    _, inputs, _ = build("qwen2", impl)
    return model, {k: inputs[k] for k in ("input_ids", "attention_mask")}


def _model(kind):
    if kind == "qwen3":
        return _qwen3("eager")
    model, inputs, _ = build(kind, "eager")
    return model, inputs


def _pe(model, layer, h, kw):
    """What the layer received, or (transformers < 4.45) what its attention computes inside."""
    if kw.get("position_embeddings") is not None:
        return kw["position_embeddings"]
    return rotary_embeddings(
        model.get_decoder(), layer, h, kw["position_ids"].expand(h.shape[0], -1)
    )


def _layers(model):
    return model.get_decoder().layers


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen2_vl", "llava_ov"])
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_rows_match_eager_attention_weights(kind, layer_idx):
    model, inputs = _model(kind)
    layer = _layers(model)[layer_idx]
    h, kw, out = _capture_layer_inputs(model, layer, inputs)
    eager = out.attentions[layer_idx].mean(1)  # [B, L, L]
    length = h.shape[1]
    queries = [length - 1, length - 3, length - 6]  # real (non-pad) tokens in both samples
    rows = attention_rows(layer, h, _pe(model, layer, h, kw), queries, kw["attention_mask"])
    assert rows.shape == (h.shape[0], 3, length)
    torch.testing.assert_close(rows, eager[:, queries].float(), atol=1e-5, rtol=1e-4)
    # per-sample [B, Nq] query positions
    q = torch.tensor([[length - 1], [length - 2]])
    rows = attention_rows(layer, h, _pe(model, layer, h, kw), q, kw["attention_mask"])
    want = torch.stack([eager[0, length - 1], eager[1, length - 2]])[:, None]
    torch.testing.assert_close(rows, want.float(), atol=1e-5, rtol=1e-4)


def test_rows_with_sdpa_none_mask_match_eager():
    """SDPA without padding passes mask=None to layers: the rows still match eager weights."""
    eager_model, inputs, _ = build("qwen2", "eager", seed=5)
    sdpa_model, _, _ = build("qwen2", "sdpa", seed=5)
    inputs = {"input_ids": inputs["input_ids"][:1, -14:]}  # sample 0, no padding
    layer_e, layer_s = eager_model.model.layers[1], sdpa_model.model.layers[1]
    _, _, out = _capture_layer_inputs(eager_model, layer_e, inputs)
    h, kw, _ = _capture_layer_inputs(sdpa_model, layer_s, dict(inputs))
    if TF >= (5, 0, 0):  # older SDPA paths may build a 4D mask anyway; the rows below pass None
        assert kw["attention_mask"] is None
    rows = attention_rows(layer_s, h, _pe(sdpa_model, layer_s, h, kw), -1, None)
    torch.testing.assert_close(rows[:, 0], out.attentions[1].mean(1)[:, -1], atol=1e-5, rtol=1e-4)
    # a 2-D key padding mask of ones changes nothing
    rows2 = attention_rows(
        layer_s, h, _pe(sdpa_model, layer_s, h, kw), -1, torch.ones(1, h.shape[1])
    )
    torch.testing.assert_close(rows2, rows)


def test_rows_bad_arguments():
    model, inputs, _ = build("llama", "eager")
    layer = model.model.layers[0]
    h, kw, _ = _capture_layer_inputs(model, layer, inputs)
    with pytest.raises(ValueError, match="query_idx"):
        attention_rows(layer, h, _pe(model, layer, h, kw), h.shape[1])
    with pytest.raises(ValueError, match="hidden_states"):
        attention_rows(layer, h[0], _pe(model, layer, h, kw), -1)
    with pytest.raises(TypeError, match="self_attn"):
        attention_rows(torch.nn.Linear(2, 2), h, _pe(model, layer, h, kw), -1)
