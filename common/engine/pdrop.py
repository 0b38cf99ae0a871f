"""PDrop (pyramid drop): staged pruning of the visual span.

At each stage layer the tokens of the span that are still alive are ranked by
the attention the last instruction token pays them, recomputed from that
layer's own ``q_proj`` / ``k_proj`` + rotary on its input, and the top
``ratio`` of them survive (each ratio applies to what remains).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from common.checks import budget, check_count, check_ratio
from common.engine.plan import PlanContext, TokenPlan
from common.methods import register_method

__all__ = ["PDrop"]


@register_method(
    "pdrop",
    kind="llm",
    keep_all={"layers": (1,), "ratios": (1.0,)},
    example={"layers": (1, 2), "ratios": (0.5, 0.5)},
    invalid=(("layers", (2, 2)), ("layers", (0,)), ("ratios", (0.5, 0.0)), ("layers", ())),
    summary="PDrop: staged top-k of the span by the last instruction token's attention",
)
@dataclass
class PDrop(TokenPlan):
    """PDrop token pruning inside a decoder.

    Attributes:
        layers: stage layers, strictly increasing, each >= 1 (paper: 8, 16, 24).
        ratios: keep ratio of each stage in (0, 1], applied to the span
            tokens that remain (paper: 0.5 each); all 1.0 is the identity.
    """

    layers: tuple[int, ...] = (8, 16, 24)
    ratios: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("layers", "ratios"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a sequence (one entry per stage), got {value!r}")
        self.layers = tuple(self.layers)
        self.ratios = tuple(self.ratios)
        if not self.layers:
            raise ValueError("layers must name at least one layer, got ()")
        for i, layer in enumerate(self.layers):
            check_count(f"layers[{i}]", layer, low=1)
            if i and layer <= self.layers[i - 1]:
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if len(self.ratios) != len(self.layers):
            raise ValueError(
                f"ratios must have one entry per layer ({len(self.layers)}), got {len(self.ratios)}"
            )
        for i, r in enumerate(self.ratios):
            check_ratio(f"ratios[{i}]", r)

    def budget(self, stage: int, span_len: int) -> int:
        return budget(span_len, float(self.ratios[stage]), name=f"ratios[{stage}]")

    def score(self, ctx: PlanContext) -> Tensor:
        """``[B, S]`` head-averaged attention of the last instruction token over the alive span."""
        return ctx.span_attention(-1)
