"""Tiny random video LLMs with working processors, built offline from configs.

Two factories, one per model family, each returning ``(model, processor)``:

* :func:`tiny_random_llava_onevision` -> ``LlavaOnevisionForConditionalGeneration``
  (SigLIP tower, Qwen2 decoder) with a ``LlavaOnevisionProcessor``;
* :func:`tiny_random_qwen2_vl` -> ``Qwen2VLForConditionalGeneration`` with a
  ``Qwen2VLProcessor``.

Real transformers classes with random weights (seeded): nothing is
downloaded. The tokenizer is a byte-level BPE without merges built with the
``tokenizers`` library (every string round-trips; one token per byte) plus
the chat and vision special tokens, with a Qwen-style chat template. The
image processors are the real HF PIL-backend ones; the video processors are
the real HF ones when torchvision works here, else the equivalent
:mod:`video.io.processors` (same shapes and token counts).

Usage::

    from video.tiny import build_tiny

    model, processor = build_tiny("tiny-random-llava-onevision", seed=0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")  # frames [T, H, W, 3]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)

Sizes (defaults): 112x112 frames; LLaVA-OV: 14-pixel patches -> 8x8 per
frame, bilinear-pooled to 4x4 = 16 video tokens per frame plus one newline
per video; Qwen2-VL: 8x8 patches merged 2x2 -> 16 tokens per two frames.
Decoder: Qwen2, hidden 64, 4 layers, 4 heads (2 KV heads).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "TINY_MODELS",
    "build_tiny",
    "build_tokenizer",
    "tiny_random_llava_onevision",
    "tiny_random_qwen2_vl",
]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template; the vision placeholder differs per family
_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}VIDEO{% elif item['type'] == 'image' %}IMAGE"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chat_template: str | None = None):
    """A byte-level ``PreTrainedTokenizerFast`` (256 byte tokens + :data:`SPECIAL_TOKENS`).

    Left padding (batched generation); ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
        chat_template=chat_template,
    )
    return tok


def _vocab_size(tok) -> int:
    return 64 * -(-len(tok) // 64)  # round up: embedding sizes a multiple of 64


def _text_config(hidden_size: int, num_layers: int, vocab_size: int, tok, **extra) -> dict:
    heads = max(2, hidden_size // 16)
    return dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        **extra,
    )


def _finish(model, tok, dtype: torch.dtype):
    model.eval().to(dtype)
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.do_sample = False
    return model


def tiny_random_llava_onevision(
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    image_size: int = 112,
    patch_size: int = 14,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """``(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor)``, random weights.

    ``image_size // patch_size`` patches per side, pooled to ``ceil(side / 2)``
    per side: ``F * ceil(side/2)^2 + 1`` video tokens for ``F`` frames.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size")
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from video.io.processors import (
        LlavaOnevisionFrameProcessor,
        hf_video_processors_available,
        lenient_processor,
    )

    tok = build_tokenizer(_TEMPLATE.replace("VIDEO", "<video>").replace("IMAGE", "<image>"))
    vocab = _vocab_size(tok)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(hidden_size, num_layers, vocab, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[image_size, image_size]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg), tok, dtype)
    size = {"height": image_size, "width": image_size}
    mean = std = (0.5, 0.5, 0.5)  # SigLIP's normalisation
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size, image_mean=mean, image_std=std, image_grid_pinpoints=[[image_size, image_size]]
    )
    if hf_video_processors_available():
        from transformers import LlavaOnevisionVideoProcessor

        video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=mean, image_std=std)
        cls = LlavaOnevisionProcessor
    else:
        video_processor = LlavaOnevisionFrameProcessor(size=size, image_mean=mean, image_std=std)
        cls = lenient_processor(LlavaOnevisionProcessor)
    processor = cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
    )
    return model, processor


def tiny_random_qwen2_vl(
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    max_pixels: int = 112 * 112,
    min_pixels: int = 56 * 56,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """``(Qwen2VLForConditionalGeneration, Qwen2VLProcessor)``, random weights.

    14-pixel patches, 2x2 spatial merge, temporal patch 2; frames are resized
    by ``smart_resize`` within ``[min_pixels, max_pixels]`` (112x112 stays).
    M-RoPE sections sum to ``head_dim / 2``.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    from video.io.processors import (
        Qwen2VLFrameProcessor,
        hf_video_processors_available,
        lenient_processor,
    )

    placeholder = "<|vision_start|>{}<|vision_end|>"
    tok = build_tokenizer(
        _TEMPLATE.replace("VIDEO", placeholder.format("<|video_pad|>")).replace(
            "IMAGE", placeholder.format("<|image_pad|>")
        )
    )
    vocab = _vocab_size(tok)
    text = _text_config(hidden_size, num_layers, vocab, tok)
    half = hidden_size // text["num_attention_heads"] // 2
    sections = [half - 2 * (half // 4), half // 4, half // 4]  # t, h, w
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": sections,
    }
    vision = dict(
        depth=vision_layers,
        embed_dim=vision_hidden_size,
        hidden_size=hidden_size,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    cfg = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2VLForConditionalGeneration(cfg), tok, dtype)
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    image_processor = Qwen2VLImageProcessorPil(size=size)
    kw: dict[str, Any] = dict(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    if hf_video_processors_available():
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(**kw)
        cls = Qwen2VLProcessor
    else:
        video_processor = Qwen2VLFrameProcessor(**kw)
        cls = lenient_processor(Qwen2VLProcessor)
    processor = cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=tok.chat_template,
    )
    return model, processor


TINY_MODELS = {
    "tiny-random-llava-onevision": tiny_random_llava_onevision,
    "tiny-random-qwen2-vl": tiny_random_qwen2_vl,
}


def build_tiny(name: str, **kwargs: Any):
    """``(model, processor)`` of a tiny model by name (see :data:`TINY_MODELS`)."""
    try:
        factory = TINY_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}") from None
    return factory(**kwargs)
