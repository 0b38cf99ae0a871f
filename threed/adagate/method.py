"""AdaGate: AdaToken-3D spatial gating inside a Hugging Face decoder (LLaVA-3D and others).

At each gating layer K, during prefill, every spatial token still alive is
scored by the attention the last instruction token pays it, recomputed from
layer K's own norm, ``q_proj`` / ``k_proj`` and rotary on layer K-1's output
(head-averaged), and only the best survive into layers >= K; ``generate``
with a KV cache stays consistent (the decoder engine, :mod:`common.engine`).

Modes:

* ``"schedule"``: gate ``i`` keeps ``keep[i]`` of the *original* span (not of
  what survived the previous gate): ``keep=(0.5, 0.25, 0.125)`` keeps 50%,
  25%, 12.5%.
* ``"adaptive"``: per sample, the fewest tokens whose share of the span's
  attention mass reaches ``mass``, bounded by ``min_keep`` / ``max_keep`` of
  the original span; samples of one batch keep different counts.

``faithful=True`` reproduces the author code (see :class:`AdaGate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.checks import budget
from common.engine import EngineHandle, find_decoder_layers
from common.engine.plan import PlanContext, TokenPlan, topk_per_sample
from common.methods import register_method
from threed.adagate.llava3d import IMAGE_TOKEN_INDEX, SpanRecorder, has_llava3d_inputs
from threed.adagate.profile import AdaGateProfile
from threed.adagate.scores import adaptive_counts, faithful_last_row_scores, smooth_scores

__all__ = ["AdaGate", "AdaGateHandle"]

logger = logging.getLogger(__name__)

_MODES = ("schedule", "adaptive")


@register_method(
    "adagate",
    kind="llm",
    keep_all={"layers": (1,), "keep": (1.0,)},
    example={"layers": (1, 2), "keep": (0.5, 0.25)},
    invalid=(
        ("keep", (0.0,)),
        ("mode", "sometimes"),
        ("mass", 1.5),
        ("layers", (0,)),
        ("min_keep", 0.0),
    ),
    summary="AdaToken-3D spatial gating (last-instruction-token attention, schedule or adaptive)",
)
@dataclass
class AdaGate:
    """AdaToken-3D spatial gating.

    Attributes:
        layers: gating layers (decoder indices, strictly increasing, >= 1).
        keep: schedule mode: fraction of the *original* spatial span kept
            from each gating layer on, in (0, 1], non-increasing; all 1.0 is
            the exact identity.
        mode: ``"schedule"`` or ``"adaptive"``.
        mass: adaptive mode: share of the span's attention mass the kept
            tokens must hold, in (0, 1].
        min_keep / max_keep: adaptive mode: bounds on the kept count as
            fractions of the original span, ``0 < min_keep <= max_keep <= 1``.
        smooth: average each gate's scores with the previous gate's (both
            normalised to sum 1) before ranking.
        faithful: reproduce ``junkerman2004/Adatoken-3D``
            (``llava/model/modeling_llama_pdrop.py``): scores from layer K's
            own norm / q / k / rotary on layer K-1's output with the
            softmax in float32 and the head mean in the model dtype, the last
            instruction token's row only; count ``int(N_original * keep)``
            (truncation); kept indices ascending; positions re-indexed to a
            contiguous range after each gate (decode positions shifted down
            by the number dropped). Schedule mode only. Unlike the author
            code it also runs with SDPA, left padding and batches.
            The default keeps original positions and rounds counts.
    """

    layers: tuple[int, ...] = (8, 16, 24)
    keep: tuple[float, ...] = (0.5, 0.25, 0.125)
    mode: str = "schedule"
    mass: float = 0.9
    min_keep: float = 0.05
    max_keep: float = 1.0
    smooth: bool = False
    faithful: bool = False

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.keep = tuple(self.keep)
        if not self.layers:
            raise ValueError("layers must name at least one gating layer, got ()")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
                raise ValueError(f"layers[{i}] must be an int >= 1, got {layer!r}")
            if i and layer <= self.layers[i - 1]:
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if len(self.keep) != len(self.layers):
            raise ValueError(
                f"keep must have one entry per gating layer ({len(self.layers)}), "
                f"got {len(self.keep)}"
            )
        for i, k in enumerate(self.keep):
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
                raise ValueError(f"keep[{i}] must be in (0, 1], got {k!r}")
            if i and k > self.keep[i - 1]:
                raise ValueError(
                    f"keep must be non-increasing (fractions of the original span), got {self.keep}"
                )
        self.keep = tuple(float(k) for k in self.keep)
        for name in ("mass", "min_keep", "max_keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        if self.min_keep > self.max_keep:
            raise ValueError(
                f"min_keep must be <= max_keep, got min_keep={self.min_keep}, "
                f"max_keep={self.max_keep}"
            )
        for name in ("smooth", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.faithful and self.mode != "schedule":
            raise ValueError(
                "faithful=True reproduces the author's schedule mode: use mode='schedule'"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_profile(cls, profile: str | Path | AdaGateProfile, **overrides: Any) -> AdaGate:
        """The schedule of a calibrated profile (a JSON path or an :class:`AdaGateProfile`).

        The profile's layer count is checked against the model at ``apply``.
        """
        prof = profile if isinstance(profile, AdaGateProfile) else AdaGateProfile.load(profile)
        gate = cls(layers=prof.layers, keep=prof.keep, **overrides)
        gate._profile = prof  # checked against the model's depth at apply()
        return gate

    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        samples: Sequence[dict[str, Any]],
        *,
        target_flops: float = 0.37,
        out: str | Path | None = None,
        **kwargs: Any,
    ) -> AdaGateProfile:
        """Calibrate a profile on ``samples`` (see :func:`threed.adagate.calibrate_profile`)."""
        from threed.adagate.profiles import calibrate_profile

        return calibrate_profile(model, samples, target_flops=target_flops, out=out, **kwargs)

    # ------------------------------------------------------------------ apply
    def apply(
        self,
        model: nn.Module,
        *,
        spatial_spans: Any = None,
        spans: Any = None,
        image_token_index: int = IMAGE_TOKEN_INDEX,
    ) -> AdaGateHandle:
        """Gate ``model``'s spatial tokens; returns the handle (also a context manager).

        Args:
            model: LLaVA-3D's ``LlavaLlamaForCausalLM`` (spans found by wrapping
                this instance's ``prepare_inputs_labels_for_multimodal``) or any
                Hugging Face decoder LM / VLM.
            spatial_spans: the spatial spans for the coming prefills: ``[(start,
                end), ...]`` for every sample or one such list per sample (a
                ``[B, L]`` bool tensor also works). ``spans`` is an alias.
                Change later with ``handle.set_spans``.
            image_token_index: LLaVA's ``<image>`` placeholder id (-200).
        """
        if spatial_spans is not None and spans is not None:
            raise ValueError("give spatial_spans or spans, not both")
        return AdaGateHandle(
            self, model, spatial_spans if spatial_spans is not None else spans, image_token_index
        )


class _AdaGatePlan(TokenPlan):
    """The engine plan of one applied AdaGate: score, then per-sample counts and top-k."""

    def __init__(self, gate: AdaGate) -> None:
        self.gate = gate
        # per stage layer: [B] kept counts of the latest pruned prefill
        self.last_counts: dict[int, list[int]] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return self.gate.layers

    @property
    def reindex_positions(self) -> bool:
        # the author code re-indexes positions contiguously after each gate
        return self.gate.faithful

    # ------------------------------------------------------------------ counts
    def budget(self, stage: int, span_len: int) -> int:
        """Schedule count for a span of ``span_len`` original tokens (one sample)."""
        keep = self.gate.keep[stage]
        if self.gate.faithful:  # the author code truncates, and may keep none
            return budget(span_len, keep, rounding="trunc", at_least_one=False)
        return budget(span_len, keep)

    def counts(self, scores: Tensor, ctx: PlanContext) -> Tensor:
        """``[B]`` tokens each sample keeps at this stage."""
        n0 = ctx.original_span_counts.cpu()
        alive = ctx.span_counts.cpu()
        if self.gate.mode == "schedule":
            want = torch.tensor([self.budget(ctx.stage, int(n)) for n in n0.tolist()])
            return torch.minimum(want, alive)
        sizes = [int(n) for n in n0.tolist()]
        low = torch.tensor([budget(n, float(self.gate.min_keep), rounding="ceil") for n in sizes])
        high = torch.tensor([budget(n, float(self.gate.max_keep), rounding="floor") for n in sizes])
        high = torch.minimum(torch.maximum(high, low), alive)
        low = torch.minimum(low, high)
        return adaptive_counts(scores.cpu(), self.gate.mass, low, high, ctx.span_valid.cpu())

    # ------------------------------------------------------------------ plan API
    def score(self, ctx: PlanContext) -> Tensor:
        if self.gate.faithful:
            raw = faithful_last_row_scores(
                ctx.layer,
                ctx.hidden_states,
                ctx.position_embeddings,
                ctx.span_pos,
                _key_padding(ctx.attention_mask, ctx.hidden_states, ctx.valid),
            )
            ctx.state["faithful_scores"] = raw  # model dtype: top-k on these, as the author
            scores = raw.float()
        else:
            scores = ctx.span_attention(-1)
        scores = scores.masked_fill(~ctx.span_valid, 0.0)
        if self.gate.smooth:
            table = ctx.state.get("raw_by_position")
            prev = None
            if table is not None:
                prev = table.gather(1, ctx.span_idx).masked_fill(~ctx.span_valid, 0.0)
            full_len = int(ctx.positions.max()) + 1
            if table is None or table.shape[1] < full_len:
                table = torch.zeros(ctx.batch, full_len, device=scores.device)
            table = table.scatter(1, ctx.span_idx, scores)  # raw scores of this gate
            ctx.state["raw_by_position"] = table
            scores = smooth_scores(scores, prev).masked_fill(~ctx.span_valid, 0.0)
        return scores

    def select(self, scores: Tensor, ctx: PlanContext) -> Tensor:
        counts = self.counts(scores, ctx)
        if ctx.stage == 0:
            self.last_counts = {}
        self.last_counts[ctx.layer_idx] = [int(c) for c in counts]
        if self.gate.faithful:
            # torch.topk per sample on the model-dtype scores, as the author code
            raw = ctx.state.pop("faithful_scores", scores)
            keep = torch.zeros_like(ctx.span_valid)
            for b, (n, k) in enumerate(zip(ctx.span_counts.tolist(), counts.tolist())):
                if k > 0:
                    keep[b, raw[b, :n].topk(int(k)).indices] = True
            return keep
        return topk_per_sample(scores, counts, ctx.span_valid)


def _key_padding(mask: Any, hidden: Tensor, valid: Tensor | None) -> Tensor | None:
    """``[B, L]`` True for the keys the last query may attend (padding, padding slots)."""
    out = valid.bool() if isinstance(valid, Tensor) else None
    row = None
    if isinstance(mask, Tensor):
        if mask.ndim == 2:
            row = mask.bool()
        elif mask.ndim == 4:
            r = mask[:, 0, -1, :]
            row = r if r.dtype == torch.bool else r > torch.finfo(r.dtype).min / 2
    if row is not None:
        row = row.expand(hidden.shape[0], -1)
        out = row if out is None else out & row
    return out


class AdaGateHandle(EngineHandle):
    """An AdaGate applied to a model; ``remove()`` restores it exactly.

    The decoder-engine handle of the gating plan, plus (LLaVA-3D) the
    wrapper of this instance's ``prepare_inputs_labels_for_multimodal``
    that declares the spatial spans before each prefill.

    Attributes:
        gate: the :class:`AdaGate`.
        spans: the spatial spans declared for the coming prefill(s) (LLaVA-3D:
            recorded by the input builder and dropped once a prefill used them;
            ``recorder.spans`` keeps the last recorded ones).
        last_plan: see :class:`common.engine.EngineHandle` (``keep_idx``,
            ``span_kept`` per sample, ...).
        last_counts: ``{layer: [kept span tokens per sample]}`` of the
            latest pruned prefill.
    """

    def __init__(self, gate: AdaGate, model: nn.Module, spans: Any, image_token_index: int) -> None:
        _, layers = find_decoder_layers(model)
        profile = getattr(gate, "_profile", None)
        if profile is not None:
            profile.check_model(len(layers))
        self.gate = gate
        self.recorder: SpanRecorder | None = None
        llava3d = spans is None and has_llava3d_inputs(model)
        # LLaVA-3D: nothing is declared until its input builder runs
        self.spans = [] if llava3d else spans
        super().__init__(model, _AdaGatePlan(gate), spans=self.spans)
        self.method = gate
        self._recorded_pending = False
        if llava3d:
            self.recorder = SpanRecorder(
                model, self._on_recorded, image_token_index=image_token_index
            )
            # after the engine's own layer-0 hook (registered first) has read the recorded
            # spans for this prefill, forget them: a later prefill that did not go through
            # the input builder (LLaVA-3D's text-only generate) must not reuse them
            self._hooks.append(self.layers[0].register_forward_pre_hook(self._consume_recorded))

    def _on_recorded(self, spans: list[list[tuple[int, int]]]) -> None:
        self.set_spans(spans)
        self._recorded_pending = True

    def _consume_recorded(self, module: nn.Module, args: tuple) -> None:
        if self._recorded_pending:
            self._recorded_pending = False
        elif self.recorder is not None and self.spans:
            self.set_spans([])

    def set_spans(self, spans: Any) -> None:
        """Declare the spatial spans for the next prefill(s)."""
        self.spans = spans
        super().set_spans(spans)

    @property
    def last_counts(self) -> dict[int, list[int]]:
        return dict(self.plan.last_counts) if self.last_plan is not None else {}

    def _undo(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        super()._undo()
