"""PDrop (pyramid drop): staged pruning of the visual span.

At each stage layer the tokens of the span that are still alive are ranked by
the attention the last instruction token pays them, recomputed from that
layer's own ``q_proj`` / ``k_proj`` + rotary on its input, and the top
``ratio`` of them survive (each ratio applies to what remains).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from common.checks import budget, check_count, check_ratio
from common.engine.core import EngineHandle, PlanContext, SpanSpec, apply_plan

__all__ = ["PDrop"]


@dataclass
class PDrop:
    """PDrop token pruning inside a decoder.

    Attributes:
        layers: stage layers, strictly increasing, each >= 1 (paper: 8, 16, 24).
        ratios: keep ratio of each stage in (0, 1], applied to the span
            tokens that remain (paper: 0.5 each); all 1.0 is the identity.
    """

    layers: tuple[int, ...] = (8, 16, 24)
    ratios: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
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

    # TokenPlan protocol -------------------------------------------------
    def keep(self, stage: int, span_len: int) -> int:
        return budget(span_len, float(self.ratios[stage]), name=f"ratios[{stage}]")

    def score(
        self, layer_idx: int, hidden_states: Tensor, layer_module: nn.Module, ctx: PlanContext
    ) -> Tensor:
        """``[B, S]`` head-averaged attention of the last instruction token over the alive span."""
        return ctx.span_attention(-1)

    # ------------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        *,
        spans: SpanSpec | None = None,
        span_token_id: int | Iterable[int] | None = None,
    ) -> EngineHandle:
        """Patch ``model`` (see :func:`common.engine.apply_plan`); returns the handle."""
        return apply_plan(model, self, spans=spans, span_token_id=span_token_id)
