"""Tests for common.flops: formula vs FlopCounterMode on real tiny decoders."""

from __future__ import annotations

import pytest
import torch

from common.flops import count_flops, decoder_layer_flops, decoder_prefill_flops


def test_paper_numbers():
    # HoliTom / FastV formula, LLaVA-OV-7B (Qwen2-7B): d=3584, m=18944, 28 layers
    full = decoder_prefill_flops(32 * 196, 3584, 18944, 28)
    assert full / 1e12 == pytest.approx(40.8, abs=0.05)
    # 10% retained (627 tokens) then inner merge at layer 18 (r=0.5 -> 314)
    pruned = decoder_prefill_flops([627] * 18 + [314] * 10, 3584, 18944)
    assert pruned / 1e12 == pytest.approx(2.8, abs=0.05)


def test_formula_terms():
    n, d, m = 10, 8, 12
    assert decoder_layer_flops(n, d, m) == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert decoder_layer_flops(n, d, m, mlp="swiglu", kv_dim=4, multiply_add=2) == 2 * (
        2 * n * d * d + 2 * n * d * 4 + 2 * n * n * d + 3 * n * d * m
    )
    assert decoder_prefill_flops(n, d, m, 3) == 3 * decoder_layer_flops(n, d, m)
    assert decoder_prefill_flops([1, 2], d, m) == decoder_layer_flops(
        1, d, m
    ) + decoder_layer_flops(2, d, m)


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    cfg = cfg_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_cls(cfg).eval(), cfg


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("n", [1, 9, 23])
def test_matches_flop_counter(kind, n):
    model, cfg = _tiny(kind)
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    measured = count_flops(model.model, input_ids=ids, use_cache=False)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    want = decoder_prefill_flops(
        n,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        mlp="swiglu",
        kv_dim=cfg.num_key_value_heads * head_dim,
        multiply_add=2,
    )
    assert measured == want


def test_bad_input():
    with pytest.raises(ValueError, match="num_layers"):
        decoder_prefill_flops(10, 8, 8)
    with pytest.raises(ValueError, match="num_layers"):
        decoder_prefill_flops([1, 2], 8, 8, num_layers=3)
    with pytest.raises(ValueError, match="mlp"):
        decoder_layer_flops(1, 8, 8, mlp="geglu")
    with pytest.raises(ValueError, match="hidden_size"):
        decoder_layer_flops(1, 0, 8)
    with pytest.raises(TypeError, match="tokens"):
        decoder_prefill_flops("10", 8, 8, 1)
    with pytest.raises(ValueError, match="multiply_add"):
        decoder_layer_flops(1, 8, 8, multiply_add=3)
