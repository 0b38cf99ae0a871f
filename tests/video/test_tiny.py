"""The tiny random video LLMs and their offline processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from video.io.processors import LlavaOnevisionFrameProcessor, Qwen2VLFrameProcessor, smart_resize
from video.tiny import TINY_MODELS, build_tiny, build_tokenizer

PROMPT = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Colour?"}]}]


def _video(frames: int = 8, seed: int = 0, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


def test_tokenizer_round_trips_text_and_specials():
    tok = build_tokenizer()
    text = "Which way does the red ◆ move? A. left\nB. right"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode())  # one token per byte: no merges
    vid = tok.convert_tokens_to_ids("<video>")
    assert tok("a<video>b")["input_ids"] == tok("a")["input_ids"] + [vid] + tok("b")["input_ids"]
    assert tok.padding_side == "left"


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_video_tokens_and_generate(name):
    model, proc = build_tiny(name, seed=0)
    prompt = proc.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    frames = 8
    inputs = proc(
        text=[prompt, prompt + " longer"],
        videos=[_video(frames, 0), _video(frames, 1)],
        return_tensors="pt",
        padding=True,
    )
    ids = inputs["input_ids"]
    if "llava" in name:
        video_id = model.config.video_token_index
        expected = frames * 4 * 4 + 1  # 8x8 patches pooled to 4x4, one newline
    else:
        video_id = model.config.video_token_id
        expected = frames // 2 * 4 * 4  # temporal groups of 2, 8x8 patches merged 2x2
        assert inputs["video_grid_thw"].tolist() == [[4, 8, 8], [4, 8, 8]]
    assert ((ids == video_id).sum(1) == expected).all()
    assert (inputs["attention_mask"][0, 0] == 0).item()  # left padding on the shorter prompt
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)
    # same seed, same weights; another seed, other weights
    again, _ = build_tiny(name, seed=0)
    other, _ = build_tiny(name, seed=1)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
        assert not torch.allclose(other(**inputs).logits, logits)


def test_qwen2_vl_frame_processor_matches_hf_image_processor_patch_order():
    """A static video equals one image repeated over the temporal patch: the HF image
    processor's output on that image is the reference for the patch layout."""
    from transformers import Qwen2VLImageProcessorPil

    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    image = _video(1, 3, 112)[0]
    ref = Qwen2VLImageProcessorPil(size=size)(images=[image], return_tensors="pt")
    ours = Qwen2VLFrameProcessor(size=size)(videos=[np.stack([image, image])])
    assert ours["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values"])


def test_qwen2_vl_frame_processor_pads_odd_frame_counts_with_last_frame():
    video = _video(3, 4, 112)
    out = Qwen2VLFrameProcessor(size={"shortest_edge": 3136, "longest_edge": 12544})([video])
    padded = Qwen2VLFrameProcessor(size={"shortest_edge": 3136, "longest_edge": 12544})(
        [np.concatenate([video, video[-1:]])]
    )
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]]
    torch.testing.assert_close(out["pixel_values_videos"], padded["pixel_values_videos"])


def test_smart_resize_bounds():
    assert smart_resize(112, 112, 28, 3136, 12544) == (112, 112)
    h, w = smart_resize(480, 640, 28, 3136, 12544)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 12544
    h, w = smart_resize(20, 30, 28, 3136, 12544)
    assert h * w >= 3136


def test_llava_frame_processor_resizes_and_normalises():
    proc = LlavaOnevisionFrameProcessor(
        size={"height": 28, "width": 28}, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    white = np.full((2, 50, 40, 3), 255, dtype=np.uint8)
    out = proc([white, white])["pixel_values_videos"]
    assert out.shape == (2, 2, 3, 28, 28)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_unknown_tiny_name():
    with pytest.raises(ValueError, match="tiny-random-qwen2-vl"):
        build_tiny("tiny-random-nothing")
