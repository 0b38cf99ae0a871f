"""Tiny LLaVA-OneVision / Qwen2-VL video models (real transformers classes) and video batches.

Each builder returns ``(model, inputs)`` with a batch of two *different*
videos, prompts of different lengths and left padding: ``inputs`` goes to
``model(**inputs)`` and ``model.generate(**inputs)``. No downloads.
"""

from __future__ import annotations

import torch

# the same left padding, text model and vision tower as the engine tests
from tests.engine._tiny import _TEXT as _ENGINE_TEXT
from tests.engine._tiny import _left_pad, qwen2_vl_vision

VOCAB = 128
VIDEO_ID = 101
FRAMES = 6  # LLaVA-OV frames; Qwen2-VL: FRAMES // 2 temporal grid steps

_TEXT = dict(_ENGINE_TEXT, vocab_size=VOCAB)  # the engine tests' text model, 8 more ids


def _text(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(3, 90, (n,), generator=gen)


def _video(gen: torch.Generator, frames: int, size: int, static: bool) -> torch.Tensor:
    """``[frames, 3, size, size]``: a static background with a moving bright square
    (``static``) or independent random frames."""
    if not static:
        return torch.rand(frames, 3, size, size, generator=gen)
    bg = torch.rand(3, size, size, generator=gen).expand(frames, -1, -1, -1).clone()
    side = size // 4
    for t in range(frames):
        x = (t * side // 2) % (size - side)
        bg[t, :, :side, x : x + side] = 1.0
    return bg


def build_llava_ov(impl: str = "sdpa", seed: int = 0, layers: int = 4):
    """LLaVA-OV: 56x56 frames, 7-px patches -> 8x8, pooled to 4x4 = 16 tokens per frame."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=7,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=dict(_TEXT, num_hidden_layers=layers, model_type="qwen2"),
        image_token_index=100,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[56, 56]],
        attn_implementation=impl,
    )
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    videos = torch.stack([_video(gen, FRAMES, 56, True), _video(gen, FRAMES, 56, False)])
    n = FRAMES * 16 + 1
    rows = [
        torch.cat([_text(gen, 3), torch.full((n,), VIDEO_ID), _text(gen, 5)]),
        torch.cat([_text(gen, 1), torch.full((n,), VIDEO_ID), _text(gen, 3)]),
    ]
    ids, mask = _left_pad(rows)
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": videos}


def build_qwen2_vl(impl: str = "sdpa", seed: int = 0, layers: int = 4, version: str = "2"):
    """Qwen2-VL: 112x112 frames, 14-px patches -> 8x8, merged 2x2 -> 16 tokens per 2 frames.

    ``version="2.5"``: Qwen2.5-VL with 224x224 frames (16x16 patches, 8x8 tokens per
    step) so its 112-px attention windows split each frame into 2x2 windows.
    """
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    common = dict(
        text_config=dict(_TEXT, num_hidden_layers=layers, rope_parameters=rope),
        image_token_id=100,
        video_token_id=VIDEO_ID,
        vision_start_token_id=102,
        vision_end_token_id=103,
        attn_implementation=impl,
    )
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = qwen2_vl_vision(depth=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, **common))
        size = 112
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TEXT["hidden_size"],
            fullatt_block_indexes=[1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg = Qwen2_5_VLConfig(vision_config=vision, **common)
        cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 1, 2
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        size = 224
    model = model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    t, h, w = FRAMES // 2, size // 14, size // 14
    pixel_rows = []
    for static in (True, False):
        frames = _video(gen, FRAMES, size, static)  # [T, 3, size, size]
        # Qwen2-VL patch order: (t, h/2, w/2, 2, 2) groups of (C, tp, p, p)
        x = frames.view(t, 2, 3, h // 2, 2, 14, w // 2, 2, 14)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * 2 * 14 * 14)
        pixel_rows.append(x)
    n = t * (h // 2) * (w // 2)
    rows = []
    for pre, post in ((3, 5), (1, 3)):
        rows.append(
            torch.cat(
                [
                    _text(gen, pre),
                    torch.tensor([102]),
                    torch.full((n,), VIDEO_ID),
                    torch.tensor([103]),
                    _text(gen, post),
                ]
            )
        )
    ids, mask = _left_pad(rows)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values_videos": torch.cat(pixel_rows),
        "video_grid_thw": torch.tensor([[t, h, w], [t, h, w]]),
        "mm_token_type_ids": (ids == VIDEO_ID).to(torch.int32) * 2,
    }
    return model, inputs


def build_qwen2_5_vl(impl: str = "sdpa", seed: int = 0, layers: int = 4):
    """Qwen2.5-VL (windowed vision attention); see :func:`build_qwen2_vl`."""
    return build_qwen2_vl(impl, seed, layers, version="2.5")


BUILDERS = {
    "llava_ov": build_llava_ov,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


def sample(inputs: dict, i: int, kind: str) -> dict:
    """Sample ``i`` of a batch alone (padding removed)."""
    keep = inputs["attention_mask"][i].bool()
    out = {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
    }
    if kind == "llava_ov":
        out["pixel_values_videos"] = inputs["pixel_values_videos"][i : i + 1]
        return out
    per = inputs["pixel_values_videos"].shape[0] // 2
    out["pixel_values_videos"] = inputs["pixel_values_videos"][i * per : (i + 1) * per]
    out["video_grid_thw"] = inputs["video_grid_thw"][i : i + 1]
    out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i : i + 1, keep]
    return out
