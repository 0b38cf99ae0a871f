"""The HoliTom method object: outer-LLM merge + inner-LLM merge on a video LLM.

Usage::

    from video import HoliTom

    with HoliTom(retain_ratio=0.1, inner_layer=18, inner_ratio=0.5).apply(model):
        out = model.generate(**inputs, max_new_tokens=32)

``model`` is a ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision,
LLaVA-Video) or a ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` instance. The outer stage
(:func:`video.holitom.outer_merge`) runs on each video's projected, pooled
features with the vision tower's last-layer attention; the decoder sees the
shorter sequence (:mod:`video.hf`); the inner merge
(:class:`video.holitom.inner.InnerMerge`) then halves the video span again at
``inner_layer``.

Keep-everything setting: ``retain_ratio=1.0`` and ``inner_ratio=0.0`` give
outputs identical to the unpatched model. At ``retain_ratio=1.0`` the outer
stage is skipped (every token kept in its place); the official code would
still average the static runs of each segment, which is not "keep everything".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.checks import check_count, check_range
from common.methods import register_method
from video.hf import ReducedVideo, VideoReduceHandle, apply_video_reducer, video_model_kind
from video.holitom.inner import FOLD_MODES, LAYER_ATTENTION, InnerMerge
from video.holitom.outer import LAYOUTS, OuterOptions, outer_merge

__all__ = ["HoliTom", "keep_all_reducer", "resolve_layout"]

_DTYPES = {"input": None, "float32": torch.float32}


def keep_all_reducer(features: Tensor, attention: Tensor | None, newline: Tensor | None):
    """Every token in its place (and the newline at the end when given): the identity."""
    f, n, d = features.shape
    frame = torch.arange(f, device=features.device).repeat_interleave(n)
    position = torch.arange(n, device=features.device).repeat(f)
    tokens = features.reshape(f * n, d)
    if newline is not None:
        tokens = torch.cat([tokens, newline[None].to(tokens)])
        frame = torch.cat([frame, frame.new_tensor([f - 1])])
        position = torch.cat([position, position.new_tensor([-1])])
    size = torch.ones(tokens.shape[0], device=features.device)
    if newline is not None:
        size[-1] = 0
    return ReducedVideo(tokens, frame, position, size)


def resolve_layout(layout: str, model: nn.Module) -> str:
    """The outer stage's layout on ``model``: ``"auto"`` is ``"one_token"`` (the HF models
    place one newline at the end, Qwen2-VL none); ``"grid"`` only on a LLaVA model."""
    if layout == "grid" and video_model_kind(model) != "llava_onevision":
        raise ValueError("layout='grid' needs a LLaVA model (it places newline tokens)")
    return "one_token" if layout == "auto" else layout


@register_method(
    "holitom",
    kind="video",
    keep_all={"retain_ratio": 1.0, "inner_ratio": 0.0},
    example={"retain_ratio": 0.25, "tau": 0.65, "inner_layer": 2, "inner_ratio": 0.5},
    invalid=(
        ("retain_ratio", 0.0),
        ("tau", 1.5),
        ("beta", -0.1),
        ("inner_ratio", 1.0),
        ("inner_layer", 0),
        ("inner_fold", "sum"),
        ("inner_attention", "sideways"),
        ("layout", "spiral"),
    ),
    summary="HoliTom: temporal segmentation + spatio-temporal merge + inner-LLM merge",
)
@dataclass
class HoliTom:
    """HoliTom on a Hugging Face video LLM.

    Attributes:
        retain_ratio: share of the video tokens the outer stage keeps, in
            (0, 1] (paper 0.10 - 0.25); 1.0 skips the outer stage.
        tau: static threshold on adjacent-frame similarity (official 0.8;
            0.65 for LLaVA-OV at 10%), in [-1, 1].
        beta: centre weight of a static cluster merge, in [0, 1].
        dominant_share: 0 = official pure attention top-k for dynamic tokens;
            in (0, 1) the paper's dominant + contextual split (see ``outer_merge``).
        knn_k: DPC-kNN neighbours (>= 1).
        max_window_size: longest temporal segment (>= 1).
        layout: ``"auto"`` (LLaVA-OV: ``"one_token"``, one newline at the end
            as the HF model places it; Qwen2-VL: no newline), ``"one_token"``
            or ``"grid"`` (LLaVA-Video's newline after every row).
        static_merge: ``"beta"`` (official) or ``"mean"`` (official ``NO_BETA=1``).
        compute_dtype: ``"input"`` (faithful: the features' dtype) or ``"float32"``.
        seed: DPC-kNN tie-noise seed.
        inner_layer: decoder layer K of the inner merge (>= 1; paper 18 of 28).
        inner_ratio: share of the video span the inner merge folds away, in
            [0, 1) (paper 0.5); 0 switches the inner merge off.
        inner_fold: ``"faithful"`` (official sequential halving) or ``"mean"``.
        inner_attention: layer K-1 during prefill: ``"bidirectional"``
            (faithful quirk of the official code) or ``"causal"`` (corrected).
    """

    retain_ratio: float = 0.1
    tau: float = 0.8
    beta: float = 0.6
    dominant_share: float = 0.0
    knn_k: int = 7
    max_window_size: int = 1024
    layout: str = "auto"
    static_merge: str = "beta"
    compute_dtype: str = "input"
    seed: int = 0
    inner_layer: int = 18
    inner_ratio: float = 0.5
    inner_fold: str = "faithful"
    inner_attention: str = "bidirectional"

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be one of {('auto', *LAYOUTS)}, got {self.layout!r}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {tuple(_DTYPES)}, got {self.compute_dtype!r}"
            )
        # the outer stage's options are checked where outer_merge checks them (one rule)
        OuterOptions(
            retain_ratio=self.retain_ratio,
            tau=self.tau,
            beta=self.beta,
            dominant_share=self.dominant_share,
            knn_k=self.knn_k,
            max_window_size=self.max_window_size,
            layout="one_token" if self.layout == "auto" else self.layout,
            static_merge=self.static_merge,
            compute_dtype=_DTYPES[self.compute_dtype],
            attention_ties="topk",
        )
        check_count("seed", self.seed, low=0)
        check_count("inner_layer", self.inner_layer, low=1)
        check_range("inner_ratio", self.inner_ratio, 0.0, 1.0)
        if self.inner_ratio >= 1.0:
            raise ValueError(f"inner_ratio must be in [0, 1), got {self.inner_ratio}")
        if self.inner_fold not in FOLD_MODES:
            raise ValueError(f"inner_fold must be one of {FOLD_MODES}, got {self.inner_fold!r}")
        if self.inner_attention not in LAYER_ATTENTION:
            raise ValueError(
                f"inner_attention must be one of {LAYER_ATTENTION}, got {self.inner_attention!r}"
            )

    # ------------------------------------------------------------------
    def inner(self) -> InnerMerge | None:
        """The inner-LLM plan, or ``None`` when ``inner_ratio == 0``."""
        if self.inner_ratio == 0.0:
            return None
        return InnerMerge(
            layer=self.inner_layer,
            ratio=self.inner_ratio,
            fold_mode=self.inner_fold,
            layer_attention=self.inner_attention,
        )

    def reducer(self, layout: str) -> Any:
        """The reducer :mod:`video.hf` calls: ``(features [F, N, D], attention, newline)``."""
        if self.retain_ratio == 1.0:
            return keep_all_reducer

        def reduce(features: Tensor, attention: Tensor | None, newline: Tensor | None):
            if attention is None:
                raise ValueError("HoliTom's outer stage needs the vision attention")
            return outer_merge(
                features,
                attention.to(features.device),
                retain_ratio=self.retain_ratio,
                tau=self.tau,
                beta=self.beta,
                dominant_share=self.dominant_share,
                knn_k=self.knn_k,
                max_window_size=self.max_window_size,
                layout=layout,
                newline=newline,
                static_merge=self.static_merge,
                compute_dtype=_DTYPES[self.compute_dtype],
                generator=self.seed,
            )

        return reduce

    def apply(self, model: nn.Module) -> VideoReduceHandle:
        """Patch the ``model`` instance; returns the handle (``remove()`` restores it)."""
        layout = resolve_layout(self.layout, model)
        inner = self.inner()
        return apply_video_reducer(
            model,
            self.reducer(layout),
            method=self,
            needs_attention=self.retain_ratio < 1.0,
            inner=(lambda m: inner.apply(m)) if inner is not None else None,
        )
