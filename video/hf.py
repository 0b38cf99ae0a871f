"""Shorten the video span of a Hugging Face video LLM before its decoder runs.

One mechanism for every token reducer that works on the vision features
(HoliTom's outer stage, VisionZip, DivPrune, uniform frames): the reducer
sees one video's features ``[F, N, D]`` (and the vision attention ``[F, N]``
when it asks for it) and returns the tokens the LLM should see; this module
builds the shorter sequence (``input_ids`` with as many video placeholders as
tokens, ``inputs_embeds``, attention mask, positions) and runs the model on
it, in ``forward`` and in ``generate``.

Supported models (the instance is wrapped, never the class):

- ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision and LLaVA-Video
  checkpoints in HF format): features = projected, pooled video features
  (``get_video_features`` without its trailing newline), ``[F, N, D]`` per
  video; the newline embedding is handed to the reducer (``image_newline``),
  which places it (the official HoliTom: one at the end of the video). The
  new sequence gets consecutive positions, as the official LLaVA code builds
  it.
- ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``:
  one temporal grid step is one frame (``F = t``, ``N = h * w / merge^2``, no
  newline); every kept token keeps the 3D M-RoPE id its source position had
  in the full sequence (gathered from ``get_rope_index``, never recomputed),
  text after the video keeps its original ids, and ``rope_deltas`` is set so
  that decoding continues from the full sequence's next position.

Scope: one video per sample (each sample of a batch its own video, of equal
frame count and size as ``pixel_values_videos`` requires; merged lengths may
differ: the batch is re-padded on the side it was padded on). Images in the
same prompt are passed through unchanged only when there are none (prompts
with both are refused). The first ``forward`` of a conversation (empty cache)
is shortened; later calls on the same cache pass through.

``forward(**inputs)`` returns logits for the shortened sequence (its length is
``handle.last["input_ids"].shape[1]``); ``generate(**inputs)`` returns the
original prompt followed by the new tokens, as the unpatched model does.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.methods import MethodHandle

__all__ = [
    "ReducedVideo",
    "ShortInputs",
    "VideoReduceHandle",
    "apply_video_reducer",
    "video_model_kind",
]

logger = logging.getLogger(__name__)

NEWLINE = -1


@dataclass(frozen=True)
class ReducedVideo:
    """What a reducer returns for one video (the shape of ``OuterMergeResult``).

    Attributes:
        tokens: ``[M, D]`` in LLM order.
        frame: ``[M]`` long, frame of each token.
        position: ``[M]`` long, spatial position in ``[0, N)`` or -1 (newline).
        size: ``[M]``, input tokens each output token stands for.
    """

    tokens: Tensor
    frame: Tensor
    position: Tensor
    size: Tensor


Reducer = Callable[[Tensor, Tensor | None, Tensor | None], Any]
"""``reducer(features [F, N, D], attention [F, N] | None, newline [D] | None)``.

Returns an object with ``tokens``, ``frame``, ``position`` and ``size``
(:class:`ReducedVideo`, ``video.holitom.OuterMergeResult``, ...).
"""


@dataclass
class ShortInputs:
    """The shortened prefill (what the decoder really sees).

    Attributes:
        input_ids: ``[B, L']`` with ``M_b`` video placeholders per sample.
        inputs_embeds: ``[B, L', D]``.
        attention_mask: ``[B, L']`` long.
        position_ids: ``[3, B, L']`` gathered M-RoPE ids (Qwen2-VL) or ``None``.
        rope_deltas: ``[B, 1]`` (Qwen2-VL) or ``None``.
        spans: per sample ``[(start, end)]`` of the video tokens in ``L'``.
        sizes: ``[B, L']`` float, input tokens each position stands for
            (text 1, padding 0).
        source: ``[B, L']`` long, index in the original sequence of each
            position's token (a merged token: its representative), -1 on padding.
        reduced: the reducer's output per sample.
    """

    input_ids: Tensor
    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None
    rope_deltas: Tensor | None
    spans: list[list[tuple[int, int]]]
    sizes: Tensor
    source: Tensor
    reduced: list[Any]


def video_model_kind(model: nn.Module) -> str:
    """``"llava_onevision"`` or ``"qwen2_vl"`` (also Qwen2.5-VL); ``TypeError`` otherwise."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "apply_pooling") and hasattr(inner, "image_newline"):
        return "llava_onevision"
    if inner is not None and hasattr(inner, "get_rope_index") and hasattr(inner, "visual"):
        return "qwen2_vl"
    raise TypeError(
        "video reducers support LlavaOnevisionForConditionalGeneration and "
        f"Qwen2VL / Qwen2_5_VL ForConditionalGeneration, got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------- vision side


def _call_filtered(fn: Callable, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its signature accepts (version differences)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**{k: v for k, v in kwargs.items() if v is not None})
    return fn(**{k: v for k, v in kwargs.items() if k in params and v is not None})


# ----------------------------------------------------------------------------- features


@dataclass
class _Videos:
    features: list[Tensor]  # per video [F, N, D]
    attention: list[Tensor | None]  # per video [F, N]
    newline: Tensor | None  # [D]
    grid: list[tuple[int, int]] | None = None  # Qwen: (h, w) in LLM tokens per frame


def _llava_videos(model: nn.Module, kwargs: dict, need_attention: bool) -> _Videos:
    inner = model.model
    cfg = model.config
    pv = kwargs["pixel_values_videos"]
    layer = kwargs.get("vision_feature_layer") or cfg.vision_feature_layer
    strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
    hook = None
    if need_attention:
        from video.vision_attention import layer_for_feature_layer, record_vision_attention

        last = layer if isinstance(layer, int) else layer[-1]
        hook = record_vision_attention(inner.vision_tower, layer_for_feature_layer(last))
    try:
        out = inner.get_video_features(
            pv, vision_feature_layer=layer, vision_feature_select_strategy=strategy
        )
    finally:
        if hook is not None:
            hook.remove()
    feats = getattr(out, "pooler_output", out)
    b, f = pv.shape[:2]
    feats = feats[:, :-1].reshape(b, f, -1, feats.shape[-1])  # drop the trailing newline
    attention: list[Tensor | None] = [None] * b
    if hook is not None:
        recv = hook.pop()  # [B*F, P] (+1 for a CLS-style token under "default")
        if strategy == "default":
            recv = recv[:, 1:]
        side = int(math.isqrt(recv.shape[1]))
        grid = recv.view(b * f, 1, side, side)
        # pooled exactly as the features (apply_pooling: bilinear to ceil(side / 2))
        pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        attention = list(pooled.reshape(b, f, -1))
    return _Videos(list(feats), attention, inner.image_newline.detach())


def _qwen_videos(model: nn.Module, kwargs: dict, need_attention: bool) -> _Videos:
    inner = model.model
    grid = kwargs["video_grid_thw"]
    hook = None
    if need_attention:
        from video.vision_attention import record_vision_attention

        hook = record_vision_attention(inner.visual, -1)
    try:
        out = inner.get_video_features(kwargs["pixel_values_videos"], grid)
    finally:
        if hook is not None:
            hook.remove()
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, Tensor):
        sizes = (grid.prod(-1) // inner.visual.spatial_merge_size**2).tolist()
        feats = feats.split(sizes)
    merge = int(inner.visual.spatial_merge_size)
    recv = None
    if hook is not None:  # per patch -> per LLM token (the merger's merge^2 consecutive patches)
        per_token = hook.pop().view(-1, merge * merge).mean(-1)
        recv = per_token.split([int(x.shape[0]) for x in feats])
    videos, attention, hw = [], [], []
    for i, (x, (t, h, w)) in enumerate(zip(feats, grid.tolist())):
        n = (h // merge) * (w // merge)
        videos.append(x.reshape(t, n, -1))
        attention.append(recv[i].reshape(t, n) if recv is not None else None)
        hw.append((h // merge, w // merge))
    return _Videos(videos, attention, None, hw)


# ----------------------------------------------------------------------------- the handle


def _field(result: Any, *names: str) -> Any:
    for name in names:
        value = getattr(result, name, None)
        if value is not None:
            return value
    return None


class VideoReduceHandle(MethodHandle):
    """A token reducer applied to a video LLM instance (see the module docstring).

    Attributes:
        model: the wrapped model.
        method: the method object that applied it (for ``repr``).
        last: after a shortened prefill, a dict with ``input_ids``,
            ``attention_mask``, ``position_ids`` (the shortened prefill),
            ``full_length`` / ``short_length`` per sample and ``reduced``
            (the reducer's outputs); ``None`` before.
        inner: an inner-LLM handle (engine plan) applied with it, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Any,
        reducer: Reducer,
        *,
        needs_attention: bool = True,
        inner: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        self.kind = video_model_kind(model)
        self.model = model
        self.method = method
        self.reducer = reducer
        self.needs_attention = needs_attention
        self.last: dict[str, Any] | None = None
        self._claim(model)  # removes a handle already active on this model
        self.inner = None
        self._orig_forward = model.__dict__.get("forward")
        self._orig_generate = model.__dict__.get("generate")
        forward, generate = model.forward, model.generate
        self._forward = forward

        @functools.wraps(forward)
        def patched_forward(*args: Any, **kwargs: Any) -> Any:
            return self._patched_forward(forward, *args, **kwargs)

        @functools.wraps(generate)
        def patched_generate(*args: Any, **kwargs: Any) -> Any:
            return self._patched_generate(generate, *args, **kwargs)

        model.forward = patched_forward
        model.generate = patched_generate
        if inner is not None:
            self.inner = inner(model)

    # ------------------------------------------------------------------ undo
    def _undo(self) -> None:
        if self.inner is not None:
            self.inner.remove()
        for name, orig in (("forward", self._orig_forward), ("generate", self._orig_generate)):
            if orig is None:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, orig)

    # ------------------------------------------------------------------ shortening
    @torch.no_grad()
    def shorten(
        self, input_ids: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> ShortInputs:
        """The shortened prefill for ``input_ids [B, L]`` and the video inputs in ``kwargs``."""
        model, cfg = self.model, self.model.config
        video_id = _video_token_id(cfg)
        image_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
        if image_id is not None and bool((input_ids == image_id).any()):
            raise NotImplementedError("prompts with images and a video are not supported yet")
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        if self.kind == "llava_onevision":
            videos = _llava_videos(model, kwargs, self.needs_attention)
        else:
            videos = _qwen_videos(model, kwargs, self.needs_attention)
        if len(videos.features) != b:
            raise NotImplementedError(
                f"one video per sample is supported: {len(videos.features)} videos for batch {b}"
            )
        orig_pos = deltas = None
        if self.kind == "qwen2_vl":
            orig_pos, deltas = _rope_index(model, input_ids, attention_mask, kwargs)
        embed = model.get_input_embeddings()
        dtype = embed.weight.dtype
        rows, reduced = [], []
        for i in range(b):
            ids_i = input_ids[i]
            where = ((ids_i == video_id) & valid[i]).nonzero().flatten()
            feats = videos.features[i]
            f, n = feats.shape[:2]
            expected = f * n + (1 if videos.newline is not None else 0)
            if where.numel() != expected or int(where[-1] - where[0]) + 1 != expected:
                raise ValueError(
                    f"sample {i}: expected one run of {expected} video tokens, "
                    f"found {where.numel()}"
                )
            start, end = int(where[0]), int(where[-1]) + 1
            res = self.reducer(feats, videos.attention[i], videos.newline)
            reduced.append(res)
            tokens = _field(res, "tokens", "features")
            frame = _field(res, "frame", "frames")
            position = _field(res, "position", "positions")
            size = _field(res, "size", "sizes")
            m = int(tokens.shape[0])
            if frame is None or position is None:
                raise ValueError("the reducer must return frame and position for every token")
            frame, position = frame.to(ids_i.device).long(), position.to(ids_i.device).long()
            # the original index each output token stands at (a newline: the video's last slot)
            src_video = torch.where(
                position == NEWLINE,
                torch.full_like(position, end - 1),
                start + frame * n + position,
            )
            keep_text = valid[i].clone()
            keep_text[start:end] = False
            before = keep_text.nonzero().flatten()
            before, after = before[before < start], before[before >= end]
            src = torch.cat([before, src_video, after])
            emb_text = embed(ids_i[None])[0]
            emb = torch.cat([emb_text[before], tokens.to(emb_text), emb_text[after]])
            ids = torch.cat(
                [ids_i[before], torch.full((m,), video_id, device=ids_i.device), ids_i[after]]
            )
            sz = torch.ones(len(src), dtype=torch.float32, device=ids_i.device)
            if size is not None:
                sz[len(before) : len(before) + m] = size.to(sz)
            rows.append((ids, emb, src, sz, (len(before), len(before) + m)))
        left = bool((~valid[:, 0]).any()) or not bool((~valid[:, -1]).any())
        new_len = max(len(r[0]) for r in rows)
        pad_id = getattr(cfg, "pad_token_id", None)
        pad_id = (
            getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
            if pad_id is None
            else pad_id
        )
        out_ids = torch.full(
            (b, new_len), int(pad_id or 0), dtype=input_ids.dtype, device=input_ids.device
        )
        out_emb = torch.zeros(
            b, new_len, rows[0][1].shape[-1], dtype=dtype, device=input_ids.device
        )
        out_mask = torch.zeros(b, new_len, dtype=attention_mask.dtype, device=input_ids.device)
        out_src = torch.full((b, new_len), -1, dtype=torch.long, device=input_ids.device)
        out_size = torch.zeros(b, new_len, dtype=torch.float32, device=input_ids.device)
        spans = []
        for i, (ids, emb, src, sz, (s0, s1)) in enumerate(rows):
            off = new_len - len(ids) if left else 0
            sl = slice(off, off + len(ids))
            out_ids[i, sl], out_emb[i, sl], out_mask[i, sl] = ids, emb.to(dtype), 1
            out_src[i, sl], out_size[i, sl] = src, sz
            spans.append([(off + s0, off + s1)])
        position_ids = new_deltas = None
        if orig_pos is not None:
            gather = out_src.clamp(min=0)[None].expand(orig_pos.shape[0], -1, -1)
            position_ids = orig_pos.gather(2, gather).masked_fill(out_src[None] < 0, 1)
            # decoding continues from the full sequence: next id = original max + 1
            full_next = (orig_pos.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1)[:, None]
            new_deltas = full_next - out_mask.sum(1, keepdim=True)
            del deltas
        return ShortInputs(
            out_ids, out_emb, out_mask, position_ids, new_deltas, spans, out_size, out_src, reduced
        )

    def _record(self, short: ShortInputs, attention_mask: Tensor | None, full: Tensor) -> None:
        full_len = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((full.shape[0],), full.shape[1])
        )
        self.last = {
            "input_ids": short.input_ids,
            "attention_mask": short.attention_mask,
            "position_ids": short.position_ids,
            "full_length": full_len.tolist(),
            "short_length": short.attention_mask.sum(1).tolist(),
            "spans": short.spans,
            "reduced": short.reduced,
        }

    def _prepare_inner(self, short: ShortInputs) -> None:
        if self.inner is None:
            return
        self.inner.set_spans(short.spans)
        set_sizes = getattr(self.inner, "set_sizes", None)
        if callable(set_sizes):
            set_sizes(short.sizes)

    def _release_inner(self) -> None:
        if self.inner is None:
            return
        self.inner.set_spans(None)
        set_sizes = getattr(self.inner, "set_sizes", None)
        if callable(set_sizes):
            set_sizes(None)

    # ------------------------------------------------------------------ wrappers
    def _split_video_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        video_keys = (
            "pixel_values_videos",
            "video_grid_thw",
            "image_sizes_videos",
            "second_per_grid_ts",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "mm_token_type_ids",
        )
        video = {k: kwargs[k] for k in video_keys if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in video_keys}
        return video, rest

    def _patched_forward(self, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional input_ids (and beyond): name them
            names = list(inspect.signature(forward).parameters)
            kwargs.update(zip(names, args))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids")
        empty = cache is None or _cache_len(cache) == 0
        if kwargs.get("pixel_values_videos") is None or ids is None or not empty:
            return forward(**kwargs)
        video, rest = self._split_video_kwargs(kwargs)
        short = self.shorten(ids, rest.pop("attention_mask", None), **video)
        self._record(short, kwargs.get("attention_mask"), ids)
        rest.pop("input_ids", None)
        rest.pop("position_ids", None)
        if short.position_ids is not None:
            rest["position_ids"] = short.position_ids
            self.model.model.rope_deltas = short.rope_deltas
        self._prepare_inner(short)
        try:
            return forward(
                inputs_embeds=short.inputs_embeds, attention_mask=short.attention_mask, **rest
            )
        finally:
            self._release_inner()

    def _patched_generate(self, generate: Callable, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("pixel_values_videos") is None or ids is None:
            return generate(*args, **kwargs)
        kwargs.pop("input_ids", None)
        args = args[1:]
        video, rest = self._split_video_kwargs(kwargs)
        mask = rest.pop("attention_mask", None)
        short = self.shorten(ids, mask, **video)
        self._record(short, mask, ids)
        if short.position_ids is not None:
            rest["position_ids"] = short.position_ids
            self.model.model.rope_deltas = short.rope_deltas
        self._prepare_inner(short)
        try:
            out = generate(
                *args,
                input_ids=short.input_ids,
                inputs_embeds=short.inputs_embeds,
                attention_mask=short.attention_mask,
                **rest,
            )
        finally:
            self._release_inner()
        return _restore_prompt(out, short.input_ids, ids)


def _restore_prompt(out: Any, short_ids: Tensor, full_ids: Tensor) -> Any:
    """Replace the shortened prompt at the head of ``generate``'s output by the original one."""
    seqs = out if isinstance(out, Tensor) else getattr(out, "sequences", None)
    if not isinstance(seqs, Tensor):
        return out
    n = short_ids.shape[1]
    reps = seqs.shape[0] // full_ids.shape[0]
    head = full_ids.repeat_interleave(reps, dim=0) if reps > 1 else full_ids
    restored = torch.cat([head.to(seqs), seqs[:, n:]], dim=1)
    if isinstance(out, Tensor):
        return restored
    out.sequences = restored
    return out


def _video_token_id(cfg: Any) -> int:
    for key in ("video_token_id", "video_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise ValueError("the model config has no video_token_id / video_token_index")


def _rope_index(model: nn.Module, ids: Tensor, mask: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The full prompt's ``[3, B, L]`` M-RoPE ids and deltas, from the model's own rule."""
    mm = kwargs.get("mm_token_type_ids")
    if mm is None:
        mm = (ids == _video_token_id(model.config)).to(torch.int32) * 2
    pos, deltas = _call_filtered(
        model.model.get_rope_index,
        input_ids=ids,
        mm_token_type_ids=mm,
        video_grid_thw=kwargs.get("video_grid_thw"),
        second_per_grid_ts=kwargs.get("second_per_grid_ts"),
        attention_mask=mask,
    )
    return pos, deltas


def _cache_len(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except (TypeError, AttributeError, IndexError):
        return 0


def apply_video_reducer(
    model: nn.Module,
    reducer: Reducer,
    *,
    method: Any = None,
    needs_attention: bool = True,
    inner: Callable[[nn.Module], Any] | None = None,
) -> VideoReduceHandle:
    """Wrap ``model``'s ``forward`` / ``generate`` so its video span is reduced first.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` or Qwen2(.5)-VL model.
        reducer: see :data:`Reducer`.
        method: the method object (shown by ``repr(handle)``).
        needs_attention: compute the vision attention ``[F, N]`` for the reducer.
        inner: ``inner(model) -> handle`` applying an in-LLM plan (with
            ``set_spans`` / ``remove``); its spans are set to the shortened
            video span of every prefill.
    """
    return VideoReduceHandle(model, method, reducer, needs_attention=needs_attention, inner=inner)
