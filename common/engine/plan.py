"""The plan API: what an in-LLM pruning / merging method supplies to the engine.

A method is a :class:`TokenPlan` subclass (a validated ``@dataclass``). At each
of its stage layers, during prefill, the engine builds a :class:`PlanContext`
and calls, in order:

1. ``score(ctx) -> [B, S]``: importance of the ``S`` alive span tokens
   (higher = keep); entries at ``~ctx.span_valid`` are ignored.
2. ``select(scores, ctx) -> [B, S] bool``: which of them survive. The default
   keeps, per sample, the top ``budget(stage, n_b)`` of its ``n_b`` alive span
   tokens (ties toward the lower index). Override it for adaptive or
   diversity-based selection: samples may keep different counts.
3. ``fold(hidden_states, merge, ctx) -> [B, K, D]`` (optional): fold the
   dropped tokens into kept ones. ``merge`` is a :class:`common.Merge` over the
   current sequence (text and kept tokens map to themselves, each dropped span
   token to the kept span token chosen by ``match``: by default its most
   cosine-similar one), so the common merge modes apply directly
   (``merge.merge(h, mode="halving")`` is HoliTom's official sequential
   halving, ``"wavg"`` a size-weighted mean). Without an override the dropped
   tokens are simply discarded.

How to write a plan (keep the span tokens the last prompt token attends to
most at layer 8, and fold the others into their most similar kept token)::

    from dataclasses import dataclass
    from common.engine import TokenPlan

    @dataclass
    class MyMerge(TokenPlan):
        layer: int = 8
        keep_ratio: float = 0.5

        @property
        def layers(self):
            return (self.layer,)

        def budget(self, stage, span_len):
            return round(span_len * self.keep_ratio)

        def score(self, ctx):
            return ctx.span_attention(-1)          # [B, S], this layer's q/k

        def fold(self, hidden_states, merge, ctx):
            return merge.merge(hidden_states, mode="halving")

    with MyMerge().apply(model, spans=[(35, 611)]):
        model.generate(...)

Options a plan may set (class attributes, or dataclass fields of the same name):

* ``reindex_positions`` (default ``False``): after each stage the kept
  tokens' positions become contiguous (``0 .. L'-1`` per sample) and decoded
  tokens continue at ``L'`` (as AdaToken-3D / PDrop's author code); the
  default keeps the original positions with gaps (FastV, HoliTom).
* ``needs_previous_layer`` (default ``False``): keep layer K-1's input so
  ``ctx.attention_row(previous=True)`` can score with layer K-1's own
  attention map (official FastV / HoliTom); ``ctx.hidden_states`` is layer
  K-1's output (the residual stream entering K).
* ``layers_field`` (default ``"layers"``): how error messages name the
  stage layers.

State across stages: ``ctx.state`` is a dict shared by all stages of one
prefill, and ``ctx.previous_scores()`` gives the previous stage's scores at
the tokens still alive (e.g. to average this stage's score with the last).

Per-sample budgets: when samples keep different counts, each sample's kept
set is padded to the batch maximum with *padding slots* (``ctx.valid``
False at later stages) that are masked out of every later layer's attention
and of the decode cache, so each sample computes what it computes alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from common.engine.attention import attention_rows
from common.similarity import cosine_similarity_matrix

if TYPE_CHECKING:  # pragma: no cover
    from common.engine.runner import EngineHandle
    from common.engine.spans import SpanSpec
    from common.matching import Merge

__all__ = ["PlanContext", "StageRecord", "TokenPlan", "topk_per_sample"]


@dataclass
class StageRecord:
    """What an earlier stage of the same prefill decided.

    Attributes:
        layer_idx: its layer.
        span_idx: ``[B, S]`` original (prefill) indices of the span tokens it scored.
        span_valid: ``[B, S]`` bool, real entries of ``span_idx``.
        scores: ``[B, S]`` float32 scores it computed.
        keep: ``[B, S]`` bool, which survived.
    """

    layer_idx: int
    span_idx: Tensor
    span_valid: Tensor
    scores: Tensor
    keep: Tensor


@dataclass
class PlanContext:
    """Everything a plan sees at a stage (current, possibly already pruned, sequence).

    Attributes:
        stage: index of the stage in ``plan.layers``.
        layer_idx: decoder layer index of the stage.
        layer: the decoder layer module.
        hidden_states: ``[B, L, D]`` input of the layer (= output of layer K-1).
        positions: ``[B, L]`` original (prefill) index of every current token.
        valid: ``[B, L]`` bool, False at padding slots of earlier stages.
        span_pos: ``[B, S]`` positions (in the current sequence) of the alive
            span tokens, ascending; rows with fewer tokens are padded at the
            end (see ``span_valid``).
        span_valid: ``[B, S]`` bool, real entries of ``span_pos``.
        span_counts: ``[B]`` alive span tokens per sample.
        original_span_counts: ``[B]`` span tokens per sample at the start of the prefill.
        attention_mask: the layer's mask for the current sequence (``None``, 2D or 4D).
        position_embeddings: ``(cos, sin)`` for the current sequence.
        position_ids: the layer's position ids for the current sequence (or ``None``).
        prev_layer / prev_hidden_states: layer ``K-1`` and its input (same
            sequence) when the plan sets ``needs_previous_layer``; else ``None``.
        state: dict shared by every stage of this prefill (plan scratch space).
        history: :class:`StageRecord` of the earlier stages of this prefill.
    """

    stage: int
    layer_idx: int
    layer: nn.Module
    hidden_states: Tensor
    positions: Tensor
    valid: Tensor
    span_pos: Tensor
    span_valid: Tensor
    span_counts: Tensor
    original_span_counts: Tensor
    attention_mask: Tensor | None
    position_embeddings: Any
    position_ids: Tensor | None
    prev_layer: nn.Module | None = None
    prev_hidden_states: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    history: list[StageRecord] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def query_pos(self) -> int:
        """Position of the last prompt token (the usual scoring query)."""
        return self.hidden_states.shape[1] - 1

    @property
    def span_idx(self) -> Tensor:
        """``[B, S]`` original (prefill) indices of the alive span tokens."""
        return self.positions.gather(1, self.span_pos)

    def attention_row(
        self, query_idx: int | Sequence[int] | Tensor = -1, *, previous: bool = False
    ) -> Tensor:
        """``[B, Nq, L]`` head-averaged attention recomputed with this layer's q/k.

        ``previous=True``: with layer K-1's q/k on its own input instead
        (needs ``needs_previous_layer`` on the plan).
        """
        layer, hidden = self.layer, self.hidden_states
        if previous:
            if self.prev_layer is None or self.prev_hidden_states is None:
                raise ValueError("previous=True needs the plan option needs_previous_layer = True")
            layer, hidden = self.prev_layer, self.prev_hidden_states
        return attention_rows(
            layer,
            hidden,
            self.position_embeddings,
            query_idx,
            self.attention_mask if isinstance(self.attention_mask, Tensor) else None,
        )

    def span_attention(self, query_idx: int = -1, *, previous: bool = False) -> Tensor:
        """``[B, S]`` attention of one query (default: last token) over the alive span tokens."""
        row = self.attention_row(query_idx, previous=previous)[:, 0]
        return row.gather(1, self.span_pos).masked_fill(~self.span_valid, 0.0)

    def span_hidden(self, hidden_states: Tensor | None = None) -> Tensor:
        """``[B, S, D]`` hidden states of the alive span tokens (default: the layer input)."""
        h = self.hidden_states if hidden_states is None else hidden_states
        return h.gather(1, self.span_pos[:, :, None].expand(-1, -1, h.shape[-1]))

    def previous_scores(self, fill: float = math.nan) -> Tensor:
        """``[B, S]`` the last scored stage's scores at the alive span tokens (``fill`` if none).

        A keep-all stage under the default selection is not scored and leaves no record.
        """
        out = torch.full(
            self.span_pos.shape, fill, dtype=torch.float32, device=self.span_pos.device
        )
        if not self.history:
            return out
        rec = self.history[-1]
        # scatter the previous scores into original-index space, then read them back
        full_len = int(max(int(rec.span_idx.max()), int(self.span_idx.max()))) + 1
        table = torch.full((self.batch, full_len), fill, dtype=torch.float32, device=out.device)
        src = rec.scores.float().to(out.device).masked_fill(~rec.span_valid.to(out.device), fill)
        table.scatter_(1, rec.span_idx.to(out.device), src)
        got = table.gather(1, self.span_idx)
        return got.masked_fill(~self.span_valid, fill)


def topk_per_sample(scores: Tensor, counts: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B, S]`` bool: the ``counts[b]`` highest scores of each row (ties toward lower index).

    ``valid [B, S]`` excludes entries (never selected). ``counts`` is clipped to
    the number of valid entries of each row.
    """
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, -math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    keep = rank < counts.to(s.device)[:, None]
    return keep if valid is None else keep & valid


@dataclass
class TokenPlan:
    """Base class of every in-LLM plan (see the module docstring for the protocol).

    Subclasses are ``@dataclass``es of their hyperparameters and define
    ``layers`` (stage layers, strictly increasing, each ``>= 1``; a field or a
    property) and :meth:`score`; the rest has defaults.
    """

    # options, overridable by a class attribute, property or dataclass field of the same name
    layers = ()
    reindex_positions = False
    needs_previous_layer = False
    layers_field = "layers"

    def budget(self, stage: int, span_len: int) -> int:
        """Span tokens to keep at ``stage`` of the ``span_len`` still alive (one sample).

        ``>= span_len`` keeps all (the exact identity). Default: keep all.
        """
        return span_len

    def score(self, ctx: PlanContext) -> Tensor:
        """``[B, S]`` importance of the alive span tokens (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} must define score(ctx)")

    def select(self, scores: Tensor, ctx: PlanContext) -> Tensor:
        """``[B, S]`` bool: the span tokens that survive (default: per-sample top-k by budget)."""
        counts = torch.tensor(
            [self.budget(ctx.stage, int(n)) for n in ctx.span_counts.tolist()],
            dtype=torch.long,
        )
        if bool((counts < 0).any()):
            raise ValueError(f"{type(self).__name__}.budget returned a negative count {counts}")
        return topk_per_sample(scores, counts, ctx.span_valid)

    def match(self, keep: Tensor, ctx: PlanContext) -> Tensor:
        """``[B, S]`` long: the span slot each span token folds into (kept ones: themselves).

        Default: each dropped token into its most cosine-similar kept span
        token of the same sample, on the layer input ``ctx.hidden_states``
        (ties toward the lower index). Only called when :meth:`fold` is overridden.
        """
        sim = cosine_similarity_matrix(ctx.span_hidden().float())  # [B, S, S]
        sim = sim.masked_fill(~keep[:, None, :], -math.inf)
        target = sim.argmax(-1)  # first maximum: lower index on ties
        slots = torch.arange(keep.shape[1], device=keep.device).expand_as(target)
        return torch.where(keep, slots, target)

    def fold(self, hidden_states: Tensor, merge: Merge, ctx: PlanContext) -> Tensor:
        """``[B, L, D] -> [B, K, D]``: the kept tokens' new states (default: plain pruning).

        ``merge`` maps the current sequence onto the ``K`` kept slots (padding
        slots have no members; the engine overwrites their rows).
        """
        return hidden_states.gather(
            1, merge.keep_idx[:, :, None].expand(-1, -1, hidden_states.shape[-1])
        )

    @property
    def folds(self) -> bool:
        """Whether this plan overrides :meth:`fold` (only then is ``match`` computed)."""
        return type(self).fold is not TokenPlan.fold

    def apply(
        self,
        model: nn.Module,
        *,
        spans: SpanSpec | None = None,
        span_token_id: int | Iterable[int] | None = None,
    ) -> EngineHandle:
        """Apply the plan to ``model``; returns the handle (also a context manager).

        See :func:`common.engine.apply_plan` for ``spans`` and ``span_token_id``.
        """
        from common.engine.runner import apply_plan

        return apply_plan(model, self, spans=spans, span_token_id=span_token_id)
