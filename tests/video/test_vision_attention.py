"""Vision attention from one hooked layer vs the eager attention maps (known answer)."""

from __future__ import annotations

import pytest
import torch

from common.scores import attention_received_from_qk
from video.vision_attention import layer_for_feature_layer, record_vision_attention


def tiny_siglip(impl: str, dtype=torch.float32, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=42,
        patch_size=6,
        attn_implementation=impl,
    )
    return SiglipVisionModel(cfg).eval().to(dtype)


def eager_reference(pixels: torch.Tensor, layer: int, dtype=torch.float32) -> torch.Tensor:
    """What the official code reads: eager ``attentions[layer].mean(1).mean(1)``."""
    model = tiny_siglip("eager", dtype)
    with torch.no_grad():
        out = model(pixel_values=pixels.to(dtype), output_attentions=True)
    return out.attentions[layer].mean(dim=1).mean(dim=1)


@pytest.mark.parametrize("layer", [-1, 1])
def test_siglip_hook_matches_eager_output_attentions(layer):
    pixels = torch.rand(3, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    ref = eager_reference(pixels, layer)  # [3, 49]
    model = tiny_siglip("sdpa")
    with record_vision_attention(model, layer=layer, query_chunk=10) as rec:
        with torch.no_grad():
            model(pixel_values=pixels)
            model(pixel_values=pixels[:1])  # a second call is recorded too
    att = rec.pop()
    assert att.shape == (4, 49) and att.dtype == torch.float32
    torch.testing.assert_close(att[:3], ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(att[3:], ref[:1], rtol=1e-5, atol=1e-7)
    # rows of attention probabilities averaged over queries: they sum to 1
    torch.testing.assert_close(att.sum(-1), torch.ones(4), rtol=1e-5, atol=1e-5)
    # the hooks are gone after the context
    with torch.no_grad():
        model(pixel_values=pixels)
    assert rec.records == []


def test_siglip_bf16_rounds_like_eager():
    pixels = torch.rand(4, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    ref = eager_reference(pixels, -1, torch.bfloat16).float()
    # an eager tower: the same queries and keys, the same rounding steps: bit-identical
    model = tiny_siglip("eager", torch.bfloat16)
    with record_vision_attention(model, query_chunk=7) as rec, torch.no_grad():
        model(pixel_values=pixels.to(torch.bfloat16))
    assert torch.equal(rec.pop(), ref)
    # an SDPA tower: earlier layers round differently in bf16, so a few ulps apart
    model = tiny_siglip("sdpa", torch.bfloat16)
    with record_vision_attention(model) as rec, torch.no_grad():
        model(pixel_values=pixels.to(torch.bfloat16))
    torch.testing.assert_close(rec.pop(), ref, rtol=2e-2, atol=0)


def test_attention_received_from_qk_known_answer():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k = torch.randn(2, 2, 11, 8, generator=g)  # grouped: 2 query heads per key head
    full = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5, dim=-1)
    expect = full.mean(1).mean(1)
    for chunk in (1, 4, 256):
        got = attention_received_from_qk(q, k, query_chunk=chunk)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="query_chunk"):
        attention_received_from_qk(q, k, query_chunk=0)
    with pytest.raises(ValueError, match="multiple"):
        attention_received_from_qk(q[:, :3], k)


def test_qwen2_vl_vision_blocks_match_per_frame_attention():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
        )
    ).vision_config
    tower = m.Qwen2VisionTransformerPretrainedModel._from_config(cfg).eval()
    grid = torch.tensor([[3, 4, 4]])  # 3 frame groups of 4x4 patches
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 4 * 4)
    caught = {}

    def grab(mod, args, kwargs):
        caught["x"] = args[0] if args else kwargs["hidden_states"]
        caught["pe"] = kwargs["position_embeddings"]

    hook = tower.blocks[-1].attn.register_forward_pre_hook(grab, with_kwargs=True)
    with record_vision_attention(tower) as rec, torch.no_grad():
        tower(pixels, grid_thw=grid)
    hook.remove()
    att = rec.pop()
    assert att.shape == (48,)
    # reference: full softmax attention within each frame group, from the block's own
    # qkv and transformers' own vision rotary
    attn = tower.blocks[-1].attn
    with torch.no_grad():
        qkv = attn.qkv(caught["x"]).reshape(48, 3, 4, 8).permute(1, 0, 2, 3)
        cos, sin = caught["pe"]
        q, k = m.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
    expect = []
    for f in range(3):
        qf, kf = q[f * 16 : (f + 1) * 16].transpose(0, 1), k[f * 16 : (f + 1) * 16].transpose(0, 1)
        p = torch.softmax(qf @ kf.transpose(-1, -2) * 8**-0.5, dim=-1)
        expect.append(p.mean(0).mean(0))
    torch.testing.assert_close(att, torch.cat(expect), rtol=1e-5, atol=1e-7)
    # transformers 4.49's SDPA / FlashAttention vision classes have no head_dim attribute
    if hasattr(attn, "head_dim"):
        del attn.head_dim
    with record_vision_attention(tower) as rec, torch.no_grad():
        tower(pixels, grid_thw=grid)
    torch.testing.assert_close(rec.pop(), att, rtol=0, atol=0)


def test_layer_mapping_and_bad_arguments():
    assert layer_for_feature_layer(-1) == -1
    assert layer_for_feature_layer(-2) == -2
    assert layer_for_feature_layer(3) == 2
    with pytest.raises(ValueError):
        layer_for_feature_layer(0)
    model = tiny_siglip("sdpa")
    with pytest.raises(ValueError, match="layer"):
        record_vision_attention(model, layer=3)
    with pytest.raises(TypeError):
        record_vision_attention(torch.nn.Linear(2, 2))
    rec = record_vision_attention(model)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        rec.pop()
    rec.remove()
    rec.remove()  # idempotent
