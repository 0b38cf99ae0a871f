"""Tiny random models (real transformers classes) and inputs for the engine tests.

Every builder returns ``(model, inputs, spans)``: ``inputs`` is a dict for
``model(**inputs)`` / ``model.generate(**inputs)`` with a batch of 2 and left
padding on sample 1; ``spans`` is the per-sample list of the prunable
(image) span. No downloads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.engine.versions import MODEL_MIN_VERSION, transformers_version

KINDS = ("qwen2", "llama", "llava_ov", "qwen2_vl", "qwen2_5_vl")
IMPLS = ("sdpa", "eager")
TF = transformers_version() or (0, 0, 0)
# what a model forward calls its cache argument
CACHE_KW = "cache" if TF >= (5, 0, 0) else "past_key_values"
_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "llava_ov": "llava_onevision",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
}
IMAGE_ID = 100
VOCAB = 120
PAD = 0

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)


def qwen2_vl_vision(depth: int) -> dict:
    """The tiny Qwen2-VL vision tower config (32 wide, 14-px patches, 2x2 merge) of all tests."""
    return dict(
        depth=depth,
        embed_dim=32,
        hidden_size=32,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    return ids, mask


def _prompt(gen: torch.Generator, n_image: int, pre: int, post: int, wrap=()) -> torch.Tensor:
    parts = [torch.randint(3, 90, (pre,), generator=gen)]
    if wrap:
        parts.append(torch.tensor([wrap[0]]))
    parts.append(torch.full((n_image,), IMAGE_ID))
    if wrap:
        parts.append(torch.tensor([wrap[1]]))
    parts.append(torch.randint(3, 90, (post,), generator=gen))
    return torch.cat(parts)


def _spans(ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    out = []
    for row in ids:
        where = (row == IMAGE_ID).nonzero().flatten()
        out.append([(int(where[0]), int(where[-1]) + 1)])
    return out


def _text_batch(seed: int, n_image: int = 12):
    gen = torch.Generator().manual_seed(seed)
    rows = [_prompt(gen, n_image, 3, 5), _prompt(gen, n_image, 1, 4)]
    ids, mask = _left_pad(rows)
    return ids, mask


def require(kind: str) -> None:
    """Skip when the installed transformers has no (supported) class for ``kind``."""
    need = MODEL_MIN_VERSION[_MODEL_TYPE[kind]]
    if TF < need:
        pytest.skip(f"{kind} needs transformers >= {'.'.join(map(str, need))}")


def cache_of(out):
    """The cache a forward returned (``cache`` on 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def plan_stages(
    plan: dict[int, torch.Tensor], attn: torch.Tensor, new: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A pruned generate's plan as positions over prompt + generated tokens.

    ``plan``: layer -> kept prompt positions ``[B, K]``; ``attn``: the prompt's
    mask ``[B, L]``. Returns the mask ``[B, L + new]`` and layer -> ``[B, K + new]``
    (the generated tokens are never pruned), for the hand-run references.
    """
    b, lp = attn.shape
    full_attn = torch.cat([attn, torch.ones(b, new, dtype=attn.dtype)], 1)
    tail = torch.arange(lp, lp + new).expand(b, -1)
    return full_attn, {layer: torch.cat([keep, tail], 1) for layer, keep in plan.items()}


def generate(model, new: int, **kwargs):
    """Greedy ``generate`` returning ``.sequences`` and per-step ``.logits``.

    transformers 4.37 has no ``output_logits``; with greedy decoding and no
    logits processor its ``scores`` are the raw logits.
    """
    logits_flag = "output_logits" if TF >= (4, 38, 0) else "output_scores"
    with torch.no_grad():
        out = model.generate(
            **kwargs,
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
            **{logits_flag: True},
        )
    logits = out.logits if logits_flag == "output_logits" else out.scores
    return SimpleNamespace(sequences=out.sequences, logits=logits)


def _set_impl(model, impl: str):
    """Older composite configs do not pass ``attn_implementation`` to their parts."""
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", impl) != impl:
            raise RuntimeError(f"{type(mod).__name__} runs {cfg._attn_implementation}, not {impl}")
    return model


def build(kind: str, impl: str, seed: int = 0, layers: int = 4):
    """A tiny model of ``kind`` with ``attn_implementation=impl`` and a padded batch of 2."""
    require(kind)
    torch.manual_seed(seed)
    text = dict(_TEXT, num_hidden_layers=layers)
    if kind in ("qwen2", "llama"):
        if kind == "qwen2":
            from transformers import Qwen2Config as Cfg
            from transformers import Qwen2ForCausalLM as Model
        else:
            from transformers import LlamaConfig as Cfg
            from transformers import LlamaForCausalLM as Model
        model = Model(Cfg(**text, attn_implementation=impl)).eval()
        ids, mask = _text_batch(seed)
        return model, {"input_ids": ids, "attention_mask": mask}, _spans(ids)
    if kind == "llava_ov":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=dict(text, model_type="qwen2"),
            image_token_index=IMAGE_ID,
            video_token_index=IMAGE_ID + 1,
            image_grid_pinpoints=[[28, 28]],
            attn_implementation=impl,
        )
        if TF < (5, 0, 0):
            cfg.text_config._attn_implementation_internal = impl
            cfg.vision_config._attn_implementation_internal = impl
        model = _set_impl(LlavaOnevisionForConditionalGeneration(cfg).eval(), impl)
        gen = torch.Generator().manual_seed(seed)
        pixel_values = torch.rand(2, 2, 3, 28, 28, generator=gen)  # base view + 1 tile each
        image_sizes = torch.tensor([[28, 28], [28, 28]])
        with torch.no_grad():
            if hasattr(getattr(model, "model", None), "get_image_features"):
                feats = model.model.get_image_features(
                    pixel_values=pixel_values[:1], image_sizes=image_sizes[:1]
                )
                feats = getattr(feats, "pooler_output", feats)
                n_image = int(feats[0].shape[0])
            else:  # 4.45 - 4.51: features, then packing with newlines
                if hasattr(model, "get_image_features"):
                    feats = model.get_image_features(
                        pixel_values[:1],
                        image_sizes[:1],
                        vision_feature_layer=cfg.vision_feature_layer,
                        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    )
                else:  # 4.45 - 4.47: what its forward does inline
                    hidden = model.vision_tower(pixel_values[0], output_hidden_states=True)
                    sel = hidden.hidden_states[cfg.vision_feature_layer]
                    if cfg.vision_feature_select_strategy == "default":
                        sel = sel[:, 1:]
                    feats = (model.multi_modal_projector(sel),)
                feats, _ = model.pack_image_features(
                    feats,
                    image_sizes[:1],
                    image_newline=model.image_newline,
                    vision_aspect_ratio=cfg.vision_aspect_ratio,
                )
                n_image = int(feats.shape[0])
        ids, mask = _left_pad([_prompt(gen, n_image, 3, 5), _prompt(gen, n_image, 1, 4)])
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }
        return model, inputs, _spans(ids)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        if kind == "qwen2_vl":
            from transformers import Qwen2VLConfig as Cfg
            from transformers import Qwen2VLForConditionalGeneration as Model

            vision = qwen2_vl_vision(depth=1)
        else:
            from transformers import Qwen2_5_VLConfig as Cfg
            from transformers import Qwen2_5_VLForConditionalGeneration as Model

            vision = dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
                window_size=56,
                fullatt_block_indexes=[0],
            )
        ids_cfg = dict(
            image_token_id=IMAGE_ID,
            video_token_id=IMAGE_ID + 1,
            vision_start_token_id=IMAGE_ID + 2,
            vision_end_token_id=IMAGE_ID + 3,
        )
        if TF >= (5, 0, 0):
            rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
            cfg = Cfg(
                vision_config=vision,
                text_config=dict(text, rope_parameters=rope),
                attn_implementation=impl,
                **ids_cfg,
            )
        else:  # 4.45 - 4.5x: text fields at the top level, M-RoPE in rope_scaling
            cfg = Cfg(
                **text,
                vision_config=vision,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                rope_theta=10000.0,
                attn_implementation=impl,
                **ids_cfg,
            )
        model = _set_impl(Model(cfg).eval(), impl)
        gen = torch.Generator().manual_seed(seed)
        grid = torch.tensor([[1, 6, 8], [1, 6, 8]])  # 48 patches -> 12 tokens per image
        n_image = 12
        pixel_values = torch.rand(2 * 48, 3 * 2 * 14 * 14, generator=gen)
        wrap = (IMAGE_ID + 2, IMAGE_ID + 3)
        rows = [_prompt(gen, n_image, 3, 5, wrap), _prompt(gen, n_image, 1, 4, wrap)]
        ids, mask = _left_pad(rows)
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }
        if TF >= (5, 0, 0):
            inputs["mm_token_type_ids"] = (ids == IMAGE_ID).to(torch.int32)
        return model, inputs, _spans(ids)
    raise ValueError(kind)


def hook_snapshot(model: torch.nn.Module) -> list[tuple[str, int, int, int, int]]:
    """Counts of every hook dict of every submodule (to check remove() leaves nothing)."""
    out = []
    for name, mod in model.named_modules():
        out.append(
            (
                name,
                len(mod._forward_pre_hooks),
                len(mod._forward_hooks),
                len(mod._forward_pre_hooks_with_kwargs),
                len(mod._forward_hooks_with_kwargs),
            )
        )
    return out


def attr_snapshot(model: torch.nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    return [(name, tuple(sorted(vars(mod)))) for name, mod in model.named_modules()]


def run_layer(decoder, layer, h, mask, pos):
    """One decoder layer by hand on ``h [B, n, D]`` with positions ``pos [B, n]`` (or M-RoPE).

    Rotary as the installed transformers does it: from the decoder's rotary
    module (>= 4.45), or inside the attention (4.37), whose table is then made
    long enough for the largest position (it is built from the sequence length).
    """
    from common.engine.versions import inner_rotary

    inner = inner_rotary(layer)
    if inner is None:
        pe = decoder.rotary_emb(h, pos)
        out = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    else:
        need = int(pos.max()) + 1

        def longer(mod, args, kwargs):
            return args, dict(kwargs, seq_len=max(kwargs.get("seq_len") or 0, need))

        hook = inner.register_forward_pre_hook(longer, with_kwargs=True)
        try:
            out = layer(h, attention_mask=mask, position_ids=pos)
        finally:
            hook.remove()
    return out[0] if isinstance(out, tuple) else out


def lm_logits(model, decoder, h):
    """Final norm and LM head."""
    return model.get_output_embeddings()(decoder.norm(h))


def cache_len(cache, layer: int) -> int:
    """Tokens cached for ``layer`` (a Cache object, or 4.37's legacy tuple of (k, v))."""
    if isinstance(cache, (tuple, list)):
        return int(cache[layer][0].shape[-2])
    return int(cache.get_seq_length(layer))


def fresh_cache() -> dict:
    """Forward kwargs with an empty DynamicCache (some 4.4x VLMs keep none unless given one)."""
    if TF >= (5, 0, 0):
        return {}
    from transformers import DynamicCache

    return {CACHE_KW: DynamicCache()}


def staged_reference(
    model,
    h: torch.Tensor,
    attn2d: torch.Tensor,
    stages: dict[int, torch.Tensor],
    reindex_positions: bool = False,
) -> torch.Tensor:
    """Logits ``[B, n_last_stage, V]`` of a causal decoder run layer by layer by hand.

    ``h``: input embeddings ``[B, T, D]``; ``attn2d``: ``[B, T]`` (0 = padding);
    ``stages``: layer -> kept original positions ``[B, n]``, applied before that
    layer. Positions are the original ones, or with ``reindex_positions`` the
    kept real tokens' ``0..n-1`` after each stage.
    """
    dec = model.model
    b, t = attn2d.shape
    pos = (attn2d.cumsum(-1) - 1).clamp(min=0)
    cur = torch.arange(t).expand(b, -1)
    valid = attn2d.bool()
    for layer_idx, layer in enumerate(dec.layers):
        if layer_idx in stages:
            keep = stages[layer_idx]
            local = torch.searchsorted(cur, keep)  # positions of the kept tokens in `cur`
            h = h.gather(1, local[:, :, None].expand(-1, -1, h.shape[-1]))
            cur = keep
        real = valid.gather(1, cur)
        p = (real.long().cumsum(-1) - 1).clamp(min=0) if reindex_positions else pos.gather(1, cur)
        allowed = (cur[:, None, :] <= cur[:, :, None]) & real[:, None, :]
        mask = torch.where(allowed, 0.0, torch.finfo(h.dtype).min)[:, None]
        h = run_layer(dec, layer, h, mask, p)
    return lm_logits(model, dec, h)
