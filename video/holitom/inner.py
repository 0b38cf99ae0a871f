"""HoliTom's inner-LLM merge: a token plan for the decoder engine.

At decoder layer ``K`` during prefill (official ``holitom/modeling_qwen2.py``):

1. score the visual span by the last prompt token's attention row of layer
   ``K-1`` (its own attention map, averaged over all query heads);
2. keep the top ``round(L * (1 - r))`` (Python half-to-even rounding);
3. fold every dropped token into its most cosine-similar kept token, the
   similarity taken on layer ``K-1``'s raw outputs (the residual stream
   entering layer ``K``), computed once before any merging, first maximum
   on ties (kept tokens in ascending position order);
4. layers ``>= K`` run on the shorter sequence with the kept tokens'
   original positions (the engine does this and keeps decoding consistent).

Fold modes (``fold``):

- ``"faithful"``: the official sequential halving, dropped tokens visited in
  ascending position, ``h[t] = (h[t] + h[d]) / 2`` with every dropped token
  read at its original value (the last member weighs 1/2; not a mean);
- ``"mean"``: size-weighted mean of the kept token and its members (sizes =
  how many input tokens each visual token already stands for after the
  outer stage; ones when unknown).

Layer ``K-1``'s attention during prefill (``layer_attention``):

- ``"bidirectional"`` (default, faithful): the official code switches on
  ``output_attentions`` for layer ``K-1``; under SDPA transformers 4.51 then
  falls back to eager attention *without any mask*, so layer ``K-1`` attends
  both ways during prefill. Its output (merged, compared and fed to every
  later layer) differs from the causal one; the kept set does not (the last
  row of a causal map is complete). Padding keys stay masked here (the
  official code runs batch 1 without padding only).
- ``"causal"``: the corrected behaviour; layer ``K-1`` stays causal.

The default is the faithful one so published numbers reproduce; ``causal``
is what a model trained causally expects.

Beyond the official scope: any attention implementation the engine supports
(SDPA, eager), batch > 1 with padding, each sample its own kept set (the
official code applies sample 0's to all).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from common.checks import budget, check_count, check_range
from common.engine import PlanContext, TokenPlan, apply_plan, find_decoder_layers
from common.merging import sequential_halving_merge, weighted_average_merge

if TYPE_CHECKING:  # pragma: no cover
    from common.matching import Merge

__all__ = ["InnerMerge", "InnerMergeHandle", "fold_into_most_similar", "most_similar_kept"]

logger = logging.getLogger(__name__)

FOLD_MODES = ("faithful", "mean")
LAYER_ATTENTION = ("bidirectional", "causal")


def most_similar_kept(metric: Tensor, keep_pos: Tensor, drop_pos: Tensor) -> Tensor:
    """Slot (``[0, k)``) of the most cosine-similar kept token for every dropped token.

    Args:
        metric: ``[B, L, D]`` states compared (layer ``K-1``'s outputs).
        keep_pos: ``[B, k]`` positions of kept tokens, ascending.
        drop_pos: ``[B, m]`` positions of dropped tokens.

    Returns:
        ``[B, m]`` long; ties go to the first (lowest-position) kept token.
    """
    d = metric.shape[-1]
    kept = metric.gather(1, keep_pos[..., None].expand(-1, -1, d)).float()
    drop = metric.gather(1, drop_pos[..., None].expand(-1, -1, d)).float()
    # same formula as the official code: dot / (|a| |b|), no epsilon
    sim = drop @ kept.transpose(1, 2)
    sim = sim / (drop.norm(dim=-1, keepdim=True) * kept.norm(dim=-1)[:, None, :])
    return sim.argmax(dim=-1)


def fold_into_most_similar(
    hidden: Tensor,
    keep_pos: Tensor,
    drop_pos: Tensor,
    *,
    mode: str = "faithful",
    sizes: Tensor | None = None,
    metric: Tensor | None = None,
) -> Tensor:
    """Fold each dropped token into its most similar kept token.

    Args:
        hidden: ``[B, L, D]`` hidden states.
        keep_pos: ``[B, k]`` kept positions (ascending).
        drop_pos: ``[B, m]`` dropped positions (ascending).
        mode: ``"faithful"`` (sequential halving) or ``"mean"`` (size-weighted).
        sizes: ``[B, L]`` token sizes for ``"mean"`` (default ones).
        metric: ``[B, L, D]`` states the similarity is computed on (default ``hidden``).

    Returns:
        ``[B, L, D]``: ``hidden`` with the kept tokens replaced by their folded
        values (dropped tokens untouched; the engine slices them away).
    """
    if mode not in FOLD_MODES:
        raise ValueError(f"mode must be one of {FOLD_MODES}, got {mode!r}")
    b, _, d = hidden.shape
    k, m = keep_pos.shape[1], drop_pos.shape[1]
    if m == 0 or k == 0:
        return hidden
    target = most_similar_kept(hidden if metric is None else metric, keep_pos, drop_pos)
    # local layout: [kept..., dropped...]; dst_of gives each its slot
    local_pos = torch.cat([keep_pos, drop_pos], dim=1)
    x = hidden.gather(1, local_pos[..., None].expand(-1, -1, d))
    ar_k = torch.arange(k, device=hidden.device).expand(b, -1)
    dst_of = torch.cat([ar_k, target], dim=1)
    if mode == "faithful":
        # sequential_halving_merge visits members in ascending local index; dropped
        # positions are ascending, so that is the official ascending position order
        merged = sequential_halving_merge(x, dst_of, ar_k.contiguous())
    else:
        size = None
        if sizes is not None:
            size = sizes.to(hidden.device).gather(1, local_pos).float()
        merged, _ = weighted_average_merge(x, dst_of, k, size)
    return hidden.scatter(1, keep_pos[..., None].expand(-1, -1, d), merged.to(hidden.dtype))


@dataclass
class InnerMerge(TokenPlan):
    """HoliTom's inner-LLM merge as an engine plan (see the module docstring).

    Attributes:
        layer: decoder layer ``K`` from which the merged sequence runs (>= 1;
            paper 18 of 28; the official environment default is 3).
        ratio: fraction ``r`` of the visual span merged away, in ``[0, 1)``;
            ``round(L * (1 - r))`` tokens stay; 0 keeps everything (identity).
        fold_mode: ``"faithful"`` (official sequential halving) or ``"mean"``
            (size-weighted mean).
        layer_attention: ``"bidirectional"`` (faithful quirk: layer ``K-1``
            unmasked during prefill) or ``"causal"`` (corrected).
    """

    layer: int = 18
    ratio: float = 0.5
    fold_mode: str = "faithful"
    layer_attention: str = "bidirectional"

    needs_previous_layer = True
    layers_field = "layer"

    def __post_init__(self) -> None:
        check_count("layer", self.layer, low=1)
        check_range("ratio", self.ratio, 0.0, 1.0)
        if self.ratio >= 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.fold_mode not in FOLD_MODES:
            raise ValueError(f"fold_mode must be one of {FOLD_MODES}, got {self.fold_mode!r}")
        if self.layer_attention not in LAYER_ATTENTION:
            raise ValueError(
                f"layer_attention must be one of {LAYER_ATTENTION}, got {self.layer_attention!r}"
            )
        self._sizes: Tensor | None = None  # [B, L_prefill] of the next prefill (handle-set)

    # plan protocol -------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def budget(self, stage: int, span_len: int) -> int:
        return budget(span_len, 1.0 - float(self.ratio), name="ratio", rounding="round")

    def score(self, ctx: PlanContext) -> Tensor:
        """``[B, S]`` layer K-1's head-averaged attention of the last token over the span."""
        return ctx.span_attention(-1, previous=True)

    # match: the engine's default is this rule (cosine on ctx.hidden_states, i.e. layer
    # K-1's raw output, computed once before folding, first maximum on ties)

    def fold(self, hidden_states: Tensor, merge: Merge, ctx: PlanContext) -> Tensor:
        """``[B, L, D] -> [B, K, D]``: halving (faithful) or size-weighted mean."""
        if self.fold_mode == "faithful":
            # members in ascending index = the official ascending dropped order; each
            # dropped token is read at its original value
            return merge.merge(hidden_states, mode="halving")
        size = None
        if self._sizes is not None:
            size = self._sizes.to(hidden_states.device).gather(1, ctx.positions)
        return merge.merge(hidden_states, mode="wavg", size=size)

    def apply(
        self,
        model: nn.Module,
        *,
        spans: Any = None,
        span_token_id: int | Iterable[int] | None = None,
    ) -> InnerMergeHandle:
        """Apply to a decoder / VLM; spans as :func:`common.engine.apply_plan`."""
        return InnerMergeHandle(model, self, spans=spans, span_token_id=span_token_id)


class InnerMergeHandle:
    """The inner merge applied to a model: the engine plan plus the layer K-1 mask hook.

    ``remove()`` restores the model; ``engine`` is the engine handle
    (``engine.last_plan`` describes the last merged prefill).
    """

    def __init__(
        self,
        model: nn.Module,
        method: InnerMerge,
        *,
        spans: Any = None,
        span_token_id: int | Iterable[int] | None = None,
    ) -> None:
        impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
        if method.layer_attention == "bidirectional" and impl.startswith("flash"):
            # FlashAttention takes no dense mask to lift causality with (not testable on CPU)
            raise ValueError(
                "layer_attention='bidirectional' needs SDPA or eager attention; with "
                f"{impl} use layer_attention='causal' (HoliTom: inner_attention='causal')"
            )
        self.model = model
        self.method = method
        # a private copy carries the per-call sizes (the user's object stays stateless)
        self.plan = dataclasses.replace(method)
        self.engine = apply_plan(model, self.plan, spans=spans, span_token_id=span_token_id)
        self._hooks: list[Any] = []
        if method.layer_attention == "bidirectional":
            _, layers = find_decoder_layers(model)
            prev = layers[method.layer - 1]
            self._hooks.append(prev.register_forward_pre_hook(self._unmask, with_kwargs=True))

    @property
    def active(self) -> bool:
        return self.engine.active

    @property
    def last_plan(self) -> dict[str, Any] | None:
        return self.engine.last_plan

    def set_spans(self, spans: Any) -> None:
        self.engine.set_spans(spans)

    def set_sizes(self, sizes: Tensor | None) -> None:
        """``[B, L]`` token sizes of the next prefill (for ``fold_mode="mean"``), or ``None``."""
        self.plan._sizes = sizes

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.engine.remove()
        self.plan._sizes = None

    def __enter__(self) -> InnerMergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"InnerMergeHandle({self.method!r} on {type(self.model).__name__}, {state})"

    def _unmask(self, module: nn.Module, args: tuple, kwargs: dict):
        # only in a prefill the engine is about to merge (its prefill state exists)
        if getattr(self.engine, "_state", None) is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.shape[1] < 2:
            return None
        new_kwargs = dict(kwargs)
        new_kwargs["attention_mask"] = bidirectional_mask(
            kwargs.get("attention_mask"),
            hidden.shape[0],
            hidden.shape[1],
            hidden.dtype,
            hidden.device,
        )
        return args, new_kwargs


def bidirectional_mask(
    mask: Any, batch: int, length: int, dtype: torch.dtype, device: torch.device | None = None
) -> Tensor:
    """A ``[B, 1, L, L]`` mask letting every query see every non-padding key.

    ``mask`` is what the layer would receive: ``None`` (no padding), a 4D
    causal (+ padding) mask (bool or additive float), or a 2D ``[B, L]`` padding mask.
    """
    if mask is None:
        return torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    if not isinstance(mask, Tensor):
        raise NotImplementedError(f"attention mask of type {type(mask).__name__} is not supported")
    if mask.ndim == 4:
        # a key is real when some query may attend to it (bool: True = attend; float:
        # 0 = attend, large negative = masked); works for either padding side
        keys = mask.any(dim=2, keepdim=True) if mask.dtype == torch.bool else mask.amax(2, True)
        return keys.expand(-1, -1, length, -1)
    if mask.ndim == 2:  # FlashAttention's padding mask: no causal part to remove
        raise NotImplementedError(
            "layer_attention='bidirectional' needs SDPA or eager attention; use 'causal'"
        )
    raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported")
