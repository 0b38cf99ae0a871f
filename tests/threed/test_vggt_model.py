"""The project's VGGT: shapes, sizes, kept layers, validation."""

from __future__ import annotations

import pytest
import torch

from threed.vggt import VGGT, VGGTConfig, scaled_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VGGT(VGGTConfig.small()).eval()


def test_output_shapes_any_multiple_of_14(model):
    x = torch.rand(3, 3, 42, 70)  # [S, 3, H, W], 3 x 5 patches, non-square
    with torch.no_grad():
        out = model(x)
    assert out["pose_enc"].shape == (1, 3, 9)
    assert len(out["pose_enc_list"]) == 4
    assert out["depth"].shape == (1, 3, 42, 70, 1)
    assert out["depth_conf"].shape == (1, 3, 42, 70)
    assert out["world_points"].shape == (1, 3, 42, 70, 3)
    assert bool((out["depth"] > 0).all()) and bool((out["depth_conf"] > 1).all())
    assert all(v.dtype == torch.float32 for v in out.values() if isinstance(v, torch.Tensor))


def test_batch_is_independent(model):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 2, 3, 28, 42, generator=g)
    with torch.no_grad():
        both = model(torch.stack([a, b]))
        one = model(a[None])
    torch.testing.assert_close(both["depth"][:1], one["depth"], rtol=1e-4, atol=1e-5)


def test_only_head_layers_are_kept(model):
    assert scaled_layers(24) == (4, 11, 17, 23)
    assert scaled_layers(2) == (0, 0, 1, 1)
    layers, psi = model.aggregator(torch.rand(1, 2, 3, 28, 28), keep_layers=(1,))
    assert psi == 5 and list(layers) == [1]
    assert layers[1].shape == (1, 2, 5 + 4, 2 * 64)
    assert set(model.kept_layers) == set(model.config.intermediate_layers) | {1}


def test_bad_inputs_and_config():
    with pytest.raises(ValueError, match="multiples of 14"):
        VGGT(VGGTConfig.small())(torch.rand(1, 2, 3, 30, 28))
    with pytest.raises(ValueError, match="embed_dim"):
        VGGTConfig.small(embed_dim=60, num_heads=4)
    with pytest.raises(ValueError, match="intermediate_layers"):
        VGGTConfig.small(intermediate_layers=(0, 1, 2, 9))


def test_patch_embed_tokens_stay_float32_under_autocast(model):
    """Like DINOv2 (the float32 class token promotes the concatenation), the half
    patch embeddings under autocast get the class / register tokens and position
    embedding added in float32 (CPU autocast stands in for CUDA's here)."""
    dino = model.aggregator.patch_embed
    seen = []
    hook = dino.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.rand(2, 3, 42, 56)
    try:
        with torch.no_grad():
            ref = dino.patch_embed(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                dino(x)
    finally:
        hook.remove()
    (tokens,) = seen
    assert tokens.dtype == torch.float32
    # the position embedding was added in float32 to the bf16-rounded patch features
    pos = dino._pos_embed(3, 4, torch.float32)[:, 1:]
    expect = ref.to(torch.bfloat16).float() + pos
    torch.testing.assert_close(tokens[:, 1 + dino.num_register_tokens :], expect, atol=0.05, rtol=0)


def test_preprocess_pad_mode_and_mixed_sizes_white_padding(caplog):
    """vggt/utils/load_fn.py: ``mode="pad"`` fits the longer side to 518 and pads with
    white to a square; frames of different sizes are padded with white to the largest."""
    import logging

    import numpy as np

    from threed.vggt import preprocess_images, target_hw

    g = np.random.default_rng(0)
    wide = (g.random((300, 600, 3)) * 255).astype(np.uint8)  # -> 252 x 518 (round(18.5) = 18)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 600 x 300 -> 518 x 252
    scan = (g.random((480, 640, 3)) * 255).astype(np.uint8)  # -> 392 x 518
    crop = preprocess_images([wide])
    assert crop.shape == (1, 3, 252, 518)
    sq = preprocess_images([wide, tall], mode="pad")
    assert sq.shape == (2, 3, 518, 518) and target_hw(300, 600, mode="pad") == (518, 518)
    top = (518 - 252) // 2
    assert torch.equal(sq[0, :, top : top + 252], crop[0])  # same resize, centred
    assert bool((sq[0, :, :top] == 1).all()) and bool((sq[0, :, top + 252 :] == 1).all())
    assert bool((sq[1, :, :, :top] == 1).all()) and bool((sq[1, :, :, top + 252 :] == 1).all())
    assert not bool((sq[1, :, :, top : top + 252] == 1).all())
    with caplog.at_level(logging.WARNING, logger="threed.vggt.preprocess"):
        mixed = preprocess_images([scan, wide])
    assert "different sizes" in caplog.text
    assert mixed.shape == (2, 3, 392, 518)
    assert torch.equal(mixed[0], preprocess_images([scan])[0])
    pad = (392 - 252) // 2
    assert torch.equal(mixed[1, :, pad : pad + 252], crop[0])
    assert bool((mixed[1, :, :pad] == 1).all()) and bool((mixed[1, :, pad + 252 :] == 1).all())
    with pytest.raises(ValueError, match="same size"):
        preprocess_images([scan, wide], mixed_sizes="raise")
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([scan], mode="square")
    with pytest.raises(ValueError, match="mixed_sizes"):
        preprocess_images([scan], mixed_sizes="crop")
