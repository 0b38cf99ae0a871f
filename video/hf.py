"""Shorten the video span of a Hugging Face video LLM before its decoder runs.

One mechanism for every token reducer that works on the vision features
(HoliTom's outer stage, VisionZip, DivPrune, uniform frames): the reducer
sees one video's features ``[F, N, D]`` (and the vision attention ``[F, N]``
when it asks for it) and returns the tokens the LLM should see; this module
builds the shorter sequence (``input_ids`` with as many video placeholders as
tokens, ``inputs_embeds``, attention mask, positions) and runs the model on
it, in ``forward`` and in ``generate``.

Mechanism: forward hooks on the instance (never the class, never a replaced
``forward``): a pre-hook on the model rewrites the prefill's keyword
arguments (``input_ids`` + video -> ``inputs_embeds`` of the shortened
sequence, its mask and positions) and, on later calls that reuse that
prefill's cache, maps the caller's full-length mask and positions onto the
shortened prefix (so ``generate``'s own bookkeeping, and hand-written decode
loops, stay consistent); hooks on the vision tower record its attention and
Qwen2-VL's ``grid_thw`` whether the video is encoded inside ``forward`` or
beforehand by ``generate`` (``mm_encoder_outputs``, transformers 5.x).

Supported models:

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
is shortened; later calls on the same cache get the shortened prefix's mask
and positions. Beam search / several return sequences repeat each sample's
prefix (``repeat_interleave``, as ``generate`` expands the batch).

``forward(**inputs)`` returns logits for the shortened sequence (its length is
``handle.last["input_ids"].shape[1]``); ``generate(**inputs)`` returns the
original prompt followed by the new tokens, as the unpatched model does.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.methods import MethodHandle
from video.holitom.outer import NEWLINE  # the reducers' position marker of a newline token

__all__ = [
    "ReducedVideo",
    "ShortInputs",
    "VideoReduceHandle",
    "apply_video_reducer",
    "video_model_kind",
]

logger = logging.getLogger(__name__)


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
            (text and newline 1, padding 0).
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


def _base(model: nn.Module) -> nn.Module:
    """The module holding the vision tower and video helpers: ``model.model`` on
    transformers 5.x, the top-level model on 4.x (Qwen2-VL there keeps ``model.model``
    for the text decoder)."""
    inner = getattr(model, "model", None)
    if inner is not None and (hasattr(inner, "visual") or hasattr(inner, "vision_tower")):
        return inner
    return model


def video_model_kind(model: nn.Module) -> str:
    """``"llava_onevision"`` or ``"qwen2_vl"`` (also Qwen2.5-VL); ``TypeError`` otherwise."""
    inner = _base(model)
    if hasattr(inner, "apply_pooling") and hasattr(inner, "image_newline"):
        return "llava_onevision"
    if hasattr(inner, "get_rope_index") and hasattr(inner, "visual"):
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


class _VisionTap:
    """Hooks on the vision tower while a handle is active.

    ``generate`` (transformers 5.x) encodes the video before the first forward
    and hands the model ``mm_encoder_outputs``; ``forward`` with pixel values
    encodes it inside. Either way the tower runs, so the attention recorder
    (:mod:`video.vision_attention`, on the layer the features come from) and a
    pre-hook that keeps Qwen2-VL's ``grid_thw`` sit on the tower itself.
    """

    def __init__(self, model: nn.Module, kind: str, need_attention: bool) -> None:
        inner = _base(model)
        self.kind = kind
        self.grid: Tensor | None = None
        self.recorder = None
        self._hooks: list[Any] = []
        tower = inner.vision_tower if kind == "llava_onevision" else inner.visual
        if kind == "qwen2_vl":
            self._hooks.append(tower.register_forward_pre_hook(self._keep_grid, with_kwargs=True))
        if need_attention:
            from video.vision_attention import layer_for_feature_layer, record_vision_attention

            layer = -1
            if kind == "llava_onevision":
                fl = model.config.vision_feature_layer
                layer = layer_for_feature_layer(fl if isinstance(fl, int) else fl[-1])
            self.recorder = record_vision_attention(tower, layer)

    def _keep_grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if isinstance(grid, Tensor):
            self.grid = grid

    def attention(self) -> Tensor | None:
        """The last tower call's record (older ones are dropped)."""
        if self.recorder is None or not self.recorder.records:
            return None
        last = self.recorder.records[-1]
        self.recorder.records = []
        return last

    def clear(self) -> None:
        if self.recorder is not None:
            self.recorder.records = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.recorder is not None:
            self.recorder.remove()


def _video_output(model: nn.Module, kwargs: dict, tap: _VisionTap) -> Any:
    """The video encoder output: generate's precomputed one, or encoded here."""
    pre = kwargs.get("mm_encoder_outputs")
    if isinstance(pre, dict) and pre.get("video") is not None:
        return pre["video"]
    tap.clear()
    inner = _base(model)
    if tap.kind == "qwen2_vl" and not hasattr(inner, "get_video_features"):  # 4.x
        pv = kwargs["pixel_values_videos"].type(inner.visual.dtype)
        return inner.visual(pv, grid_thw=kwargs["video_grid_thw"])
    if tap.kind == "llava_onevision":
        return inner.get_video_features(
            kwargs["pixel_values_videos"],
            vision_feature_layer=kwargs.get("vision_feature_layer")
            or model.config.vision_feature_layer,
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy")
            or model.config.vision_feature_select_strategy,
        )
    return inner.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"])


def _llava_videos(model: nn.Module, kwargs: dict, tap: _VisionTap) -> _Videos:
    inner = _base(model)
    cfg = model.config
    out = _video_output(model, kwargs, tap)
    feats = getattr(out, "pooler_output", out)  # [B, F * N + 1, D] (trailing newline)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n = math.ceil(side / 2) ** 2
    b = feats.shape[0]
    pv = kwargs.get("pixel_values_videos")
    f = pv.shape[1] if isinstance(pv, Tensor) else (feats.shape[1] - 1) // n
    if feats.shape[1] == f * n + 1:  # 5.x appends the newline; 4.x adds it in forward
        feats = feats[:, :-1]
    elif feats.shape[1] != f * n:
        raise ValueError(f"video features of {feats.shape[1]} tokens for {f} frames of {n}")
    feats = feats.reshape(b, f, n, feats.shape[-1])
    attention: list[Tensor | None] = [None] * b
    recv = tap.attention()  # [B*F, P] (+1 for a CLS column under "default")
    if recv is not None:
        if recv.shape[1] == side * side + 1:
            recv = recv[:, 1:]
        grid = recv.reshape(b * f, 1, side, side)
        # pooled exactly as the features (apply_pooling: bilinear to ceil(side / 2))
        pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        attention = list(pooled.reshape(b, f, -1))
    return _Videos(list(feats), attention, inner.image_newline.detach())


def _qwen_videos(model: nn.Module, kwargs: dict, tap: _VisionTap) -> _Videos:
    inner = _base(model)
    out = _video_output(model, kwargs, tap)
    grid = kwargs.get("video_grid_thw")
    grid = tap.grid if grid is None else grid
    if grid is None:
        raise ValueError("video_grid_thw is needed to lay out Qwen2-VL video tokens")
    feats = getattr(out, "pooler_output", out)
    merge = int(inner.visual.spatial_merge_size)
    if isinstance(feats, Tensor):
        feats = feats.split((grid.prod(-1) // merge**2).tolist())
    recv = tap.attention()
    if recv is not None:  # per patch -> per LLM token (the merger's merge^2 consecutive patches)
        per_token = recv.view(-1, merge * merge).mean(-1)
        window_index = _window_index(inner.visual, grid)
        if window_index is not None:  # Qwen2.5-VL: blocks run in window order; undo it
            per_token = per_token[torch.argsort(window_index.to(per_token.device))]
        recv = per_token.split([int(x.shape[0]) for x in feats])
    videos, attention, hw = [], [], []
    for i, (x, (t, h, w)) in enumerate(zip(feats, grid.tolist())):
        n = (h // merge) * (w // merge)
        videos.append(x.reshape(t, n, -1))
        attention.append(recv[i].reshape(t, n) if recv is not None else None)
        hw.append((h // merge, w // merge))
    return _Videos(videos, attention, None, hw)


def _window_index(visual: nn.Module, grid: Tensor) -> Tensor | None:
    """Qwen2.5-VL's window order of the merged units (``None`` for Qwen2-VL: no windows)."""
    window_size = getattr(visual, "window_size", None)
    if window_size is None:
        return None
    get = getattr(visual, "get_window_index", None)  # transformers 4.x
    if callable(get):
        return get(grid)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(
        grid,
        spatial_merge_size=int(visual.spatial_merge_size),
        window_size=int(window_size),
        patch_size=int(visual.patch_size),
    )[0]


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
            ``full_length`` / ``short_length`` per sample, ``spans`` (the video
            span of each sample in the shortened prefill), ``sizes`` (``[B, L']``
            input tokens each position stands for) and ``reduced`` (the
            reducer's outputs); ``None`` before.
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
        self._live: _Live | None = None
        self._tap = _VisionTap(model, self.kind, needs_attention)
        self._params = [n for n in inspect.signature(type(model).forward).parameters if n != "self"]
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook),
        ]
        self.inner = None
        if inner is not None:
            try:
                with self._composing():  # the inner handle must not remove this one
                    self.inner = inner(model)
            except Exception:
                self.remove()  # nothing half-applied stays on the model
                raise

    def _undo(self) -> None:
        if self.inner is not None:
            self.inner.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._tap.remove()
        self._live = None

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
            videos = _llava_videos(model, kwargs, self._tap)
        else:
            videos = _qwen_videos(model, kwargs, self._tap)
        if len(videos.features) != b:
            raise NotImplementedError(
                f"one video per sample is supported: {len(videos.features)} videos for batch {b}"
            )
        orig_pos = None
        if self.kind == "qwen2_vl":
            grid = kwargs.get("video_grid_thw")
            grid = self._tap.grid if grid is None else grid
            orig_pos = _rope_index(
                model, input_ids, attention_mask, {**kwargs, "video_grid_thw": grid}
            )
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
            if size is not None:  # a newline (size 0 in the reducer's count) weighs as a token
                sz[len(before) : len(before) + m] = size.to(sz).clamp(min=1)
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
            "sizes": short.sizes,
            "reduced": short.reduced,
        }

    def _set_inner(self, spans: list | None, sizes: Tensor | None) -> None:
        """Hand the inner stage this prefill's video spans and token sizes (``None``: release)."""
        if self.inner is None:
            return
        self.inner.set_spans(spans)
        set_sizes = getattr(self.inner, "set_sizes", None)
        if callable(set_sizes):
            set_sizes(sizes)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:  # name positional arguments (input_ids, ...) so they can be replaced
            kwargs = {**dict(zip(self._params, args)), **kwargs}
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_len(cache) if cache is not None else 0
        ids = kwargs.get("input_ids")
        pre = kwargs.get("mm_encoder_outputs")
        has_video = kwargs.get("pixel_values_videos") is not None or (
            isinstance(pre, dict) and pre.get("video") is not None
        )
        if has_video and ids is not None and past == 0:
            return (), self._prefill_kwargs(kwargs, cache)
        live = self._live
        if live is not None and past > 0 and cache is not None and live.cache() is cache:
            return (), self._decode_kwargs(kwargs, live, past)
        return None

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        live = self._live
        if live is not None and live.cache() is None:  # the model made the prefill's cache
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            if cache is not None:
                live.cache = weakref.ref(cache)
        self._set_inner(None, None)

    def _prefill_kwargs(self, kwargs: dict, cache: Any) -> dict:
        video_keys = (
            "pixel_values_videos",
            "video_grid_thw",
            "image_sizes_videos",
            "second_per_grid_ts",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "mm_token_type_ids",
            "mm_encoder_outputs",
        )
        video = {k: kwargs[k] for k in video_keys if k in kwargs}
        new = {k: v for k, v in kwargs.items() if k not in video_keys and k != "input_ids"}
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        short = self.shorten(ids, mask, **video)
        self._record(short, mask, ids)
        new["inputs_embeds"] = short.inputs_embeds
        new["attention_mask"] = short.attention_mask
        pos = kwargs.get("position_ids")
        text_pos = (short.attention_mask.cumsum(1) - 1).masked_fill(short.attention_mask == 0, 1)
        if short.position_ids is not None:  # M-RoPE: the gathered original ids
            mrope = short.position_ids
            if isinstance(pos, Tensor) and pos.ndim == 3 and pos.shape[0] == 4:
                mrope = torch.cat([text_pos[None].to(mrope), mrope])  # [text; t; h; w]
            new["position_ids"] = mrope
            _base(self.model).rope_deltas = short.rope_deltas
        elif pos is not None:  # the caller (generate) numbers by the mask: do the same
            new["position_ids"] = text_pos.to(pos.dtype) if isinstance(pos, Tensor) else None
        cp = kwargs.get("cache_position")
        if isinstance(cp, Tensor):
            new["cache_position"] = torch.arange(short.input_ids.shape[1], device=cp.device)
        full_len = ids.shape[1]
        shift = None
        if short.position_ids is None:  # consecutive positions: later ones move down
            shift = (
                (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), full_len))
                - short.attention_mask.sum(1)
            ).to(ids.device)
        next_pos = None
        if short.rope_deltas is not None:  # next M-RoPE id of each sample (full prompt's)
            next_pos = (short.rope_deltas[:, 0] + short.attention_mask.sum(1)).to(ids.device)
        self._live = _Live(
            cache=weakref.ref(cache) if cache is not None else (lambda: None),
            full_len=full_len,
            short_mask=short.attention_mask,
            shift=shift,
            next_pos=next_pos,
        )
        self._set_inner(short.spans, short.sizes)
        return new

    def _decode_kwargs(self, kwargs: dict, live: _Live, past: int) -> dict:
        """A later call on the shortened prefill's cache: mask / positions of the short prefix."""
        new = dict(kwargs)
        b = next(
            (
                t.shape[0]
                for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                if isinstance(t, Tensor)
            ),
            live.short_mask.shape[0],
        )
        reps = b // live.short_mask.shape[0]  # generate's beam / return-sequence expansion
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] >= live.full_len:
            short = live.short_mask.repeat_interleave(reps, 0).to(mask)
            new["attention_mask"] = torch.cat([short, mask[:, live.full_len :]], dim=1)
        pos = kwargs.get("position_ids")
        if live.shift is not None and isinstance(pos, Tensor):
            new["position_ids"] = pos - live.shift.repeat_interleave(reps, 0).to(pos)[:, None]
        if live.next_pos is not None:
            # M-RoPE ids of new tokens, whatever the caller derived them from (transformers
            # 4.x adds rope_deltas to the full-length cache_position, 5.x to the mask count):
            # the full prompt's next id + tokens decoded since the prefill
            q = next(
                t.shape[1]
                for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                if isinstance(t, Tensor)
            )
            done = past - live.short_mask.shape[1]
            step = torch.arange(q, device=live.next_pos.device)
            mrope = (live.next_pos.repeat_interleave(reps, 0)[:, None] + done + step)[None]
            mrope = mrope.expand(3, -1, -1)
            if isinstance(pos, Tensor) and pos.ndim == 3 and pos.shape[0] == 4:
                count = live.short_mask.sum(1).repeat_interleave(reps, 0)
                text = (count.to(step)[:, None] + done + step)[None]
                mrope = torch.cat([text, mrope])
            new["position_ids"] = mrope.to(pos.device if isinstance(pos, Tensor) else mrope.device)
        cp = kwargs.get("cache_position")
        if isinstance(cp, Tensor):
            new["cache_position"] = torch.arange(past, past + cp.shape[0], device=cp.device)
        return new


@dataclass
class _Live:
    """What later calls on the cache of the last shortened prefill need."""

    cache: Callable[[], Any]  # weak reference to that prefill's cache
    full_len: int  # columns of the caller's prompt mask
    short_mask: Tensor  # [B, L'] the shortened prompt's mask
    shift: Tensor | None  # [B] positions removed before the text (consecutive positions)
    next_pos: Tensor | None = None  # [B] M-RoPE id of the first decoded token (Qwen2-VL)


def _video_token_id(cfg: Any, *, required: bool = True) -> int | None:
    """The config's video placeholder id; without one ``ValueError`` (``None`` if not required)."""
    for key in ("video_token_id", "video_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    if not required:
        return None
    raise ValueError("the model config has no video_token_id / video_token_index")


def _rope_index(model: nn.Module, ids: Tensor, mask: Tensor, kwargs: dict) -> Tensor:
    """The full prompt's ``[3, B, L]`` M-RoPE ids, from the model's own rule."""
    mm = kwargs.get("mm_token_type_ids")
    if mm is None:
        mm = (ids == _video_token_id(model.config)).to(torch.int32) * 2
    pos, _deltas = _call_filtered(
        _base(model).get_rope_index,
        input_ids=ids,
        mm_token_type_ids=mm,
        video_grid_thw=kwargs.get("video_grid_thw"),
        second_per_grid_ts=kwargs.get("second_per_grid_ts"),
        attention_mask=mask,
    )
    return pos


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
    """Hook ``model`` (the instance) so its video span is reduced before the decoder runs.

    ``forward`` and ``generate`` are not replaced: pre-hooks rewrite their keyword
    arguments (see the module docstring).

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
