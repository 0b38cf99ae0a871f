"""Video baselines under HoliTom's API: registered methods of kind ``"video"``.

Each is a validated dataclass whose ``apply(model)`` shortens the video span
of a ``LlavaOnevisionForConditionalGeneration`` / Qwen2(.5)-VL instance with
:mod:`video.hf` (the same mechanism as HoliTom), using the outer-stage
reducers of :mod:`video.reduce` at the same token budget (``retain_ratio`` of
the ``F * N`` video tokens, the newline on top):

- ``VisionZip`` (``"visionzip"``): per frame, dominant tokens by vision
  attention + contextual tokens merged by similarity (official video adaptation);
- ``DivPrune`` (``"divprune"``): greedy max-min cosine diversity over the video;
- ``UniformFrames`` (``"uniform_frames"``): whole frames, evenly spaced.

In-LLM baselines run on the same models unchanged: ``FastV`` and ``PDrop``
(:mod:`common.engine`) find the video span from the config's
``video_token_id``. So a user compares methods by changing one name::

    from common.methods import build_method

    for name, params in [("holitom", {}), ("visionzip", {}), ("fastv", {"keep_ratio": 0.1})]:
        with build_method(name, **params).apply(model):
            model.generate(**inputs)

``retain_ratio=1.0`` keeps every token in place (the exact identity), as for
HoliTom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from common.checks import check_range, check_ratio
from common.methods import register_method
from video.hf import VideoReduceHandle, apply_video_reducer
from video.holitom.method import HoliTom, keep_all_reducer, resolve_layout
from video.holitom.outer import LAYOUTS

__all__ = ["DivPrune", "HoliTom", "UniformFrames", "VisionZip"]

_INVALID_COMMON = (("retain_ratio", 0.0), ("retain_ratio", 1.5), ("layout", "spiral"))


def _check_layout(layout: str) -> None:
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout must be one of {('auto', *LAYOUTS)}, got {layout!r}")


class _OuterBaseline:
    """Shared ``apply``: the reducer of :mod:`video.reduce` through :mod:`video.hf`."""

    retain_ratio: float
    layout: str
    needs_attention = False

    def _reduce(self, features: Tensor, attention: Tensor | None, **kw: Any):
        raise NotImplementedError

    def apply(self, model: nn.Module) -> VideoReduceHandle:
        """Patch the ``model`` instance; returns the handle (``remove()`` restores it)."""
        layout = resolve_layout(self.layout, model)
        if self.retain_ratio == 1.0:
            reducer = keep_all_reducer
        else:

            def reducer(features: Tensor, attention: Tensor | None, newline: Tensor | None):
                if attention is not None:
                    attention = attention.to(features.device)
                return self._reduce(
                    features,
                    attention,
                    retain_ratio=self.retain_ratio,
                    layout=layout,
                    newline=newline,
                )

        return apply_video_reducer(
            model,
            reducer,
            method=self,
            needs_attention=self.needs_attention and self.retain_ratio < 1.0,
        )


@register_method(
    "visionzip",
    kind="video",
    keep_all={"retain_ratio": 1.0},
    example={"retain_ratio": 0.25},
    invalid=(*_INVALID_COMMON, ("dominant_ratio", 1.5), ("contextual", "sum")),
    summary="VisionZip per frame: dominant tokens by attention + contextual merge",
)
@dataclass
class VisionZip(_OuterBaseline):
    """VisionZip on every frame (:func:`video.reduce.visionzip_reduce`).

    Attributes:
        retain_ratio: share of the video tokens kept, in (0, 1].
        dominant_ratio: share of each frame's budget taken by dominant tokens, in [0, 1]
            (official 54/64).
        contextual: ``"faithful"`` (official: target + sum-mean quirk, see
            ``visionzip_reduce``) or ``"mean"``.
        fix_grid_positions: ``False`` (faithful grid-layout position quirk) or ``True``.
        layout: ``"auto"`` (one newline at the end on LLaVA-OV), ``"one_token"``, ``"grid"``.

    The similarity metric is the features themselves (the official code uses
    the vision tower's last-layer keys; not wired here).
    """

    retain_ratio: float = 0.1
    dominant_ratio: float = 54 / 64
    contextual: str = "faithful"
    fix_grid_positions: bool = False
    layout: str = "auto"

    needs_attention = True

    def __post_init__(self) -> None:
        check_ratio("retain_ratio", self.retain_ratio)
        check_range("dominant_ratio", self.dominant_ratio, 0.0, 1.0)
        if self.contextual not in ("faithful", "mean"):
            raise ValueError(f"contextual must be 'faithful' or 'mean', got {self.contextual!r}")
        if not isinstance(self.fix_grid_positions, bool):
            raise ValueError(f"fix_grid_positions must be a bool, got {self.fix_grid_positions!r}")
        _check_layout(self.layout)

    def _reduce(self, features: Tensor, attention: Tensor | None, **kw: Any):
        from video.reduce import visionzip_reduce

        if attention is None:
            raise ValueError("VisionZip needs the vision attention")
        return visionzip_reduce(
            features,
            attention,
            dominant_ratio=self.dominant_ratio,
            contextual=self.contextual,
            fix_grid_positions=self.fix_grid_positions,
            **kw,
        )


@register_method(
    "divprune",
    kind="video",
    keep_all={"retain_ratio": 1.0},
    example={"retain_ratio": 0.25},
    invalid=(*_INVALID_COMMON, ("per_frame", "yes")),
    summary="DivPrune: greedy max-min cosine diversity over the video tokens",
)
@dataclass
class DivPrune(_OuterBaseline):
    """DivPrune (:func:`video.reduce.divprune_reduce`).

    Attributes:
        retain_ratio: share of the video tokens kept, in (0, 1].
        per_frame: ``False`` (whole video) or ``True`` (each frame its own budget).
        layout: ``"auto"``, ``"one_token"`` or ``"grid"``.
    """

    retain_ratio: float = 0.1
    per_frame: bool = False
    layout: str = "auto"

    def __post_init__(self) -> None:
        check_ratio("retain_ratio", self.retain_ratio)
        if not isinstance(self.per_frame, bool):
            raise ValueError(f"per_frame must be a bool, got {self.per_frame!r}")
        _check_layout(self.layout)

    def _reduce(self, features: Tensor, attention: Tensor | None, **kw: Any):
        from video.reduce import divprune_reduce

        return divprune_reduce(features, attention, per_frame=self.per_frame, **kw)


@register_method(
    "uniform_frames",
    kind="video",
    keep_all={"retain_ratio": 1.0},
    example={"retain_ratio": 0.5},
    invalid=_INVALID_COMMON,
    summary="uniform frame sampling at the same token budget",
)
@dataclass
class UniformFrames(_OuterBaseline):
    """Uniform frame sampling (:func:`video.reduce.uniform_frames_reduce`).

    Attributes:
        retain_ratio: share of the frames kept (whole frames), in (0, 1].
        layout: ``"auto"``, ``"one_token"`` or ``"grid"``.
    """

    retain_ratio: float = 0.1
    layout: str = "auto"

    def __post_init__(self) -> None:
        check_ratio("retain_ratio", self.retain_ratio)
        _check_layout(self.layout)

    def _reduce(self, features: Tensor, attention: Tensor | None, **kw: Any):
        from video.reduce import uniform_frames_reduce

        return uniform_frames_reduce(features, attention, **kw)
