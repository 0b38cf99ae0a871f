"""FastV: drop the least-attended visual tokens after layer K-1.

FastV (Chen et al., 2024) ranks the tokens of the image / video span by the
attention the last prompt token pays them in layer K-1's attention map and
keeps the top ``keep_ratio`` from layer K on. Here the row is recomputed
from a layer's own norm, ``q_proj`` / ``k_proj`` and rotary on its input by
:func:`common.engine.attention.attention_rows`, so SDPA / FlashAttention
keep working and no ``L x L`` map is stored.

Which attention map ranks the tokens (``attention_from``):

- ``"previous"`` (default, faithful): layer K-1's own attention map (q/k of
  layer K-1 on its input), which is what the official FastV code reads
  (``last_attention`` of layer K-1); reproduces the paper's numbers.
- ``"current"``: layer K's q/k on its input, i.e. the attention the query
  would pay at layer K given layer K-1's output (the rule PDrop uses at
  each stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from common.checks import budget, check_count, check_ratio
from common.engine.plan import PlanContext, TokenPlan
from common.methods import register_method

__all__ = ["FastV"]


@register_method(
    "fastv",
    kind="llm",
    keep_all={"keep_ratio": 1.0},
    example={"layer": 1, "keep_ratio": 0.5},
    invalid=(("layer", 0), ("keep_ratio", 0.0), ("keep_ratio", 1.5), ("attention_from", "x")),
    summary="FastV: keep the span tokens the last prompt token attends to most at layer K-1",
)
@dataclass
class FastV(TokenPlan):
    """FastV token pruning inside a decoder.

    Attributes:
        layer: decoder layer K from which the pruned sequence runs (>= 1;
            paper default 2).
        keep_ratio: fraction of span tokens kept, in (0, 1] (``round``, at
            least 1); 1.0 is the exact identity.
        attention_from: ``"previous"`` (layer K-1's own attention map, as the
            official code) or ``"current"`` (layer K's q/k on layer K-1's
            output); see the module docstring.
    """

    layer: int = 2
    keep_ratio: float = 0.5
    attention_from: str = "previous"

    layers_field = "layer"

    def __post_init__(self) -> None:
        check_count("layer", self.layer, low=1)
        check_ratio("keep_ratio", self.keep_ratio)
        if self.attention_from not in ("current", "previous"):
            raise ValueError(
                f"attention_from must be 'current' or 'previous', got {self.attention_from!r}"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @property
    def needs_previous_layer(self) -> bool:
        return self.attention_from == "previous"

    def budget(self, stage: int, span_len: int) -> int:
        return budget(span_len, float(self.keep_ratio), name="keep_ratio")

    def score(self, ctx: PlanContext) -> Tensor:
        """``[B, S]`` head-averaged attention of the last token over the alive span."""
        return ctx.span_attention(-1, previous=self.attention_from == "previous")
