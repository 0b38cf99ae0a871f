"""AdaGate calibration ("attention pattern mining") and the flow measurement it rests on.

1. :func:`measure_spatial_flow` runs the unpruned model on a few samples and,
   layer by layer inside the forward (a pre-hook per decoder layer), recomputes
   that layer's head-averaged attention from its own norm, ``q_proj``,
   ``k_proj`` and rotary in blocks of query rows, so at most one
   ``[B, chunk, L]`` block exists at a time (never all layers' ``L x L``
   maps, and SDPA / FlashAttention keep running the model's own forward).
   Per layer it accumulates the attention mass spatial queries put on
   spatial keys (intra-spatial flow), the mass text queries put on spatial
   keys (text <- spatial flow), and per spatial token the attention it
   receives from the text queries (for :func:`threed.analysis.spatial_contribution`).
2. :func:`fit_keep_curve` fits ``f(l) = A e^{-B(l-C)} + D`` (percent of the
   span kept at 1-based layer ``l``) to the min-max normalised combined flow
   with ``f(1) = 100`` and ``f(L) = floor`` (the paper's constraints; ``A``
   and ``C`` are not separately identifiable, so ``C = 1``), minimising the
   squared error of values plus that of slopes, as the author code does.
3. :func:`choose_schedule` picks gating layers and keep ratios meeting a
   prefill FLOPs target: for each candidate set of gating layers the floor
   is bisected to the largest value whose schedule meets the target, and the
   set that keeps the most flow-weighted spatial tokens wins (when even a zero floor
   is not enough, the decay is steepened instead).

Differences from the author code (``llava/eval/ATE_inference.py``), on purpose:
it reads ``output_attentions`` of every layer (eager, all ``L x L`` maps at
once) for one hard-coded prompt layout, pools them 10 x 10 and sums only
blocks above the diagonal, which under a causal mask hold no attention; the
runtime schedule is then set by hand. Here the flows are the causal ones
(queries after keys) and calibration produces the schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from threed.adagate.llava3d import has_llava3d_inputs, prepare_llava3d, spans_to_mask

__all__ = [
    "SpatialFlow",
    "measure_spatial_flow",
    "fit_keep_curve",
    "choose_schedule",
    "prepare_sample",
]

logger = logging.getLogger(__name__)


@dataclass
class SpatialFlow:
    """What :func:`measure_spatial_flow` measured (averaged over samples).

    Attributes:
        intra: ``[L]`` mean attention mass a spatial query puts on spatial keys.
        text: ``[L]`` mean attention mass a text query (after the span) puts on spatial keys.
        received: per sample, ``[L, S]`` attention each spatial token receives,
            averaged over that sample's text queries (head-averaged).
        num_text: mean number of non-spatial tokens per sample.
        num_spatial: mean number of spatial tokens per sample.
        num_samples: sequences measured.
    """

    intra: Tensor
    text: Tensor
    received: list[Tensor] = field(default_factory=list)
    num_text: float = 0.0
    num_spatial: float = 0.0
    num_samples: int = 0

    def combined(self, intra_weight: float = 0.5) -> Tensor:
        """``[L]`` min-max normalised ``w * intra + (1 - w) * text``."""
        c = intra_weight * self.intra + (1.0 - intra_weight) * self.text
        lo, hi = c.min(), c.max()
        if float(hi - lo) <= 0:
            return torch.zeros_like(c)
        return (c - lo) / (hi - lo)


def prepare_sample(model: nn.Module, sample: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Forward kwargs and the ``[B, L]`` spatial mask of one calibration sample.

    A sample is a dict of forward inputs (``input_ids`` or ``inputs_embeds``,
    optional ``attention_mask`` / ``position_ids``) with ``spatial_spans``
    (``[(start, end), ...]`` for every row, or one list per row), or, for a
    LLaVA-3D model, the raw ``generate`` inputs (``input_ids`` with the
    ``<image>`` placeholder, ``images``, ``depths``, ``poses``, ``intrinsics``,
    ``clicks``), whose spans are found by running its input builder.
    """
    if not isinstance(sample, dict):
        raise TypeError(f"a calibration sample must be a dict, got {type(sample).__name__}")
    sample = dict(sample)
    spans = sample.pop("spatial_spans", None)
    if spans is None:
        if has_llava3d_inputs(model) and "images" in sample:
            kwargs, per_sample = prepare_llava3d(model, sample)
        else:
            raise ValueError(
                "calibration samples need spatial_spans=[(start, end), ...] (or LLaVA-3D inputs "
                "with images for a model that has prepare_inputs_labels_for_multimodal)"
            )
    else:
        kwargs = {k: v for k, v in sample.items() if k in _FORWARD_KEYS}
        per_sample = spans
    x = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
    if not isinstance(x, Tensor):
        raise ValueError("a calibration sample needs input_ids or inputs_embeds")
    b, length = x.shape[:2]
    if per_sample and all(_is_pair(p) for p in per_sample):
        per_sample = [list(per_sample)] * b
    if len(per_sample) != b:
        raise ValueError(f"spatial_spans: {len(per_sample)} lists for a batch of {b}")
    for i, row in enumerate(per_sample):
        for s, e in row:
            if not 0 <= s < e <= length:
                raise ValueError(f"spatial_spans: ({s}, {e}) of row {i} is outside [0, {length})")
    return kwargs, spans_to_mask(per_sample, b, length, x.device)


_FORWARD_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


def _is_pair(x: object) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) for v in x)


@torch.no_grad()
def measure_spatial_flow(
    model: nn.Module,
    samples: Iterable[dict[str, Any]],
    *,
    query_chunk: int = 512,
    keep_received: bool = True,
    spatial_query_stride: int = 1,
) -> SpatialFlow:
    """Per-layer attention flow through spatial tokens of the unpruned ``model``.

    Args:
        model: a Hugging Face decoder LM (or LLaVA-3D); run as it is (SDPA,
            eager or FlashAttention): attention is recomputed from q/k.
        samples: calibration samples (see :func:`prepare_sample`).
        query_chunk: query rows per block; memory is ``O(B * chunk * L)``.
        keep_received: keep the per-token ``[L, S]`` received attention.
        spatial_query_stride: estimate the intra-spatial flow from every
            ``k``-th spatial query of each span (1: every query, exact); the
            recomputed rows, the main cost next to the forward, shrink about ``k``-fold.
    """
    if isinstance(spatial_query_stride, bool) or not isinstance(spatial_query_stride, int):
        raise ValueError(f"spatial_query_stride must be an int >= 1, got {spatial_query_stride!r}")
    if spatial_query_stride < 1:
        raise ValueError(f"spatial_query_stride must be an int >= 1, got {spatial_query_stride}")
    from common.engine import find_decoder_layers, versions
    from common.engine.attention import attention_rows

    decoder, layers = find_decoder_layers(model)
    num_layers = len(layers)
    intra_sum = torch.zeros(num_layers, dtype=torch.float64)
    text_sum = torch.zeros(num_layers, dtype=torch.float64)
    received: list[Tensor] = []
    n_rows = 0
    tot_text = tot_spatial = 0.0
    state: dict[str, Any] = {}

    def make_hook(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            spatial: Tensor = state["spatial"].to(hidden.device)
            real: Tensor = state["real"].to(hidden.device)
            b, length = spatial.shape
            if hidden.shape[:2] != (b, length):
                return  # not the calibration forward (should not happen)
            pe = kwargs.get("position_embeddings")
            if pe is None:  # transformers < 4.45: rotary inside the attention
                pos = kwargs.get("position_ids")
                if pos is None:
                    pos = torch.arange(length, device=hidden.device)[None]
                pe = versions.rotary_embeddings(decoder, module, hidden, pos)
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, Tensor) else None
            if mask is None and not bool(real.all()):
                mask = real.long()  # 2D padding mask for attention_rows
            queries = state["queries"].to(hidden.device)  # positions whose rows are needed
            for q0 in range(0, queries.numel(), query_chunk):
                q_idx = queries[q0 : q0 + query_chunk]
                rows = attention_rows(module, hidden, pe, q_idx, mask)  # [B, n, L]
                on_spatial = (rows * spatial[:, None, :]).sum(-1).double().cpu()  # [B, n]
                q_cpu = q_idx.cpu()
                intra_sum[idx] += (on_spatial * state["spatial_w"][:, q_cpu]).sum()
                text_sum[idx] += (on_spatial * state["text_w"][:, q_cpu]).sum()
                if keep_received:
                    w = state["text_w"][:, q_cpu].to(rows.device, rows.dtype)[:, :, None]
                    state["recv"][idx] += (rows * w).sum(1).double().cpu()  # [B, L]

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        for sample in samples:
            kwargs, spatial = prepare_sample(model, sample)
            b, length = spatial.shape
            am = kwargs.get("attention_mask")
            real = (
                am.bool() if isinstance(am, Tensor) and am.ndim == 2 else torch.ones_like(spatial)
            )
            first = torch.where(spatial.any(1), spatial.float().argmax(1), length)
            after = torch.arange(length, device=spatial.device)[None] > first[:, None]
            text_q = (after & ~spatial & real).cpu().double()
            sp = spatial.cpu()
            if spatial_query_stride > 1:  # every k-th token of each row's spatial span(s)
                rank = sp.long().cumsum(1) - 1
                sp = sp & (rank % spatial_query_stride == 0)
            queries = ((sp | text_q.bool()).any(0)).nonzero().flatten()
            sp = sp.double()
            # per-row means: over that row's spatial queries, over its text queries
            state.update(
                spatial=spatial,
                real=real,
                spatial_w=sp / sp.sum(1, keepdim=True).clamp(min=1),
                text_w=text_q / text_q.sum(1, keepdim=True).clamp(min=1),
                recv=torch.zeros(num_layers, b, length, dtype=torch.float64),
                queries=queries,
            )
            _run_forward(model, kwargs)
            n_rows += b
            tot_spatial += float(spatial.sum())
            tot_text += float((real & ~spatial).sum())
            if keep_received:
                for i in range(b):
                    cols = spatial[i].cpu()
                    received.append(state["recv"][:, i, cols].float())
    finally:
        for h in handles:
            h.remove()
    if n_rows == 0:
        raise ValueError("samples is empty: calibration needs at least one sample")
    return SpatialFlow(
        intra=(intra_sum / n_rows).float(),
        text=(text_sum / n_rows).float(),
        received=received,
        num_text=tot_text / n_rows,
        num_spatial=tot_spatial / n_rows,
        num_samples=n_rows,
    )


def _run_forward(model: nn.Module, kwargs: dict[str, Any]) -> None:
    model(**kwargs, use_cache=False)


# ----------------------------------------------------------------------------- curve


def _curve(b: float, num_layers: int, floor: float) -> tuple[float, float, float, float]:
    """``(A, B, C, D)`` with ``C = 1``, ``f(1) = 100``, ``f(L) = floor``."""
    span = num_layers - 1
    denom = 1.0 - math.exp(-b * span) if b > 0 else 0.0
    if denom <= 1e-12:  # b -> 0: the straight line from 100 to floor
        return 0.0, 0.0, 1.0, 100.0
    a = (100.0 - floor) / denom
    return a, b, 1.0, 100.0 - a


def _eval_curve(params: Sequence[float], layers: Tensor) -> Tensor:
    a, b, c, d = params
    if a == 0.0 and b == 0.0:
        return torch.full_like(layers, d)
    return a * torch.exp(-b * (layers - c)) + d


def fit_keep_curve(
    flow: Tensor | Sequence[float], floor: float = 10.0
) -> tuple[tuple[float, float, float, float], Tensor]:
    """Fit ``f(l) = A e^{-B(l-C)} + D`` to ``100 * flow`` over layers ``1..L``.

    Args:
        flow: ``[L]`` normalised flow in [0, 1] (layer ``l`` at index ``l-1``).
        floor: ``f(L)``, percent kept at the last layer, in [0, 100).

    Returns:
        ``((A, B, C, D), curve [L])``; ``f(1) = 100`` and ``f(L) = floor``
        exactly. ``B`` minimises the squared error of values plus slopes
        (log-spaced grid then golden-section refinement).
    """
    y = 100.0 * torch.as_tensor(flow, dtype=torch.float64).flatten()
    num_layers = int(y.numel())
    if num_layers < 2:
        raise ValueError(f"flow must cover at least 2 layers, got {num_layers}")
    if not 0.0 <= floor < 100.0:
        raise ValueError(f"floor must be in [0, 100), got {floor}")
    x = torch.arange(1, num_layers + 1, dtype=torch.float64)
    dy = torch.gradient(y)[0]

    def loss(b: float) -> float:
        f = _eval_curve(_curve(b, num_layers, floor), x)
        return float(((f - y) ** 2).sum() + ((torch.gradient(f)[0] - dy) ** 2).sum())

    grid = [10 ** (e / 8) for e in range(-32, 9)]  # 1e-4 .. 10
    best = min(grid, key=loss)
    lo, hi = best / 10 ** (1 / 8), best * 10 ** (1 / 8)
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if loss(m1) < loss(m2):
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2 if loss((lo + hi) / 2) <= loss(best) else best
    params = _curve(b, num_layers, floor)
    return params, _eval_curve(params, x).float()


# ----------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    floor: float
    flops_ratio: float
    retained: float
    params: tuple[float, float, float, float]


def _layer_cost(hidden: int, inter: int, kv_dim: int, mlp: str) -> tuple[float, float]:
    """``(c1, c2)`` with a layer on ``n`` tokens costing ``c1 n + c2 n^2``."""
    from common.flops import decoder_layer_flops

    f1 = decoder_layer_flops(1, hidden, inter, mlp=mlp, kv_dim=kv_dim)
    f2 = decoder_layer_flops(2, hidden, inter, mlp=mlp, kv_dim=kv_dim)
    c2 = (f2 - 2 * f1) / 2
    return f1 - c2, c2


def schedule_tokens(
    layers: Sequence[int],
    keep: Sequence[float],
    num_layers: int,
    num_text: float,
    num_spatial: float,
) -> list[float]:
    """Tokens each layer sees under a schedule (spatial kept from each gate on)."""
    per = []
    frac = 1.0
    stages = dict(zip(layers, keep))
    for i in range(num_layers):
        frac = stages.get(i, frac)
        per.append(num_text + num_spatial * frac)
    return per


def choose_schedule(
    flow: Tensor,
    *,
    target_flops: float,
    num_text: float,
    num_spatial: float,
    hidden_size: int,
    intermediate_size: int,
    kv_dim: int | None = None,
    mlp: str = "swiglu",
    stages: int = 3,
    min_keep: float | None = None,
) -> Schedule:
    """Gating layers and keep ratios meeting ``target_flops`` (pruned / unpruned prefill).

    Keep ratios follow the exponential-decay curve fitted to ``flow``; for
    each candidate set of ``stages`` gating layers (every layer for short
    decoders, a regular grid for deep ones) the curve's floor is bisected to
    the largest value meeting the target (past a zero floor the fitted decay
    rate ``B`` is raised instead), and the set retaining the most
    flow-weighted spatial tokens (``sum_l keep_l * (flow_l + eps)``) wins.
    ``min_keep`` (in (0, 1]; default one token of ``num_spatial``) is the
    smallest keep ratio any gate gets. Raises ``ValueError`` when no candidate
    reaches the target.
    """
    flow = torch.as_tensor(flow, dtype=torch.float64).flatten()
    num_layers = int(flow.numel())
    if not 0 < target_flops < 1:
        raise ValueError(f"target_flops must be in (0, 1), got {target_flops}")
    if not 1 <= stages < num_layers:
        raise ValueError(f"stages must be in [1, {num_layers - 1}], got {stages}")
    min_keep = 1.0 / max(num_spatial, 1.0) if min_keep is None else float(min_keep)
    if not 0 < min_keep <= 1:
        raise ValueError(f"min_keep must be in (0, 1], got {min_keep}")
    c1, c2 = _layer_cost(hidden_size, intermediate_size, kv_dim or hidden_size, mlp)
    n_full = num_text + num_spatial
    full = num_layers * (c1 * n_full + c2 * n_full**2)
    step = max(1, num_layers // 16)
    candidates = list(combinations(range(1, num_layers, step), stages))
    x = torch.arange(1, num_layers + 1, dtype=torch.float64)
    weight = flow + 1e-3  # every layer counts a little, so ties go to keeping more

    # fit the shape once (B), then only the floor moves
    _, b_fit, _, _ = fit_keep_curve(flow, floor=10.0)[0]

    def params_at(t: float) -> tuple[float, float, float, float]:
        """One knob, monotone in cost: t in [0, 1] lowers the floor from 100 to 0 on the
        fitted shape; t in (1, 2] then steepens the decay (B up to 50, log-spaced) at floor 0."""
        if t <= 1.0:
            return _curve(b_fit, num_layers, 100.0 * (1.0 - t) * 0.99999)
        b0 = min(max(b_fit, 1e-3), 50.0)
        return _curve(b0 * (50.0 / b0) ** (t - 1.0), num_layers, 0.0)

    def keeps_for(layer_set: tuple[int, ...], t: float) -> list[float]:
        f = _eval_curve(params_at(t), x) / 100.0
        out, prev = [], 1.0
        for layer in layer_set:
            k = float(min(prev, max(min_keep, f[layer].item())))  # layer is 0-based: f(layer+1)
            out.append(k)
            prev = k
        return out

    def ratio(layer_set: tuple[int, ...], keeps: list[float]) -> float:
        per = torch.as_tensor(
            schedule_tokens(layer_set, keeps, num_layers, num_text, num_spatial),
            dtype=torch.float64,
        )
        return float((c1 * per + c2 * per**2).sum() / full)

    best: Schedule | None = None
    for layer_set in candidates:
        if ratio(layer_set, keeps_for(layer_set, 2.0)) > target_flops:
            continue
        lo, hi = 0.0, 2.0  # bisect the knob to the mildest schedule meeting the target
        for _ in range(40):
            mid = (lo + hi) / 2
            if ratio(layer_set, keeps_for(layer_set, mid)) <= target_flops:
                hi = mid
            else:
                lo = mid
        keeps = keeps_for(layer_set, hi)
        frac = schedule_tokens(layer_set, keeps, num_layers, 0.0, 1.0)
        retained = float((torch.as_tensor(frac, dtype=torch.float64) * weight).sum())
        if best is None or retained > best.retained + 1e-12:
            params = params_at(hi)
            best = Schedule(
                layers=tuple(layer_set),
                keep=tuple(keeps),
                floor=float(_eval_curve(params, x[-1:])[0]),
                flops_ratio=ratio(layer_set, keeps),
                retained=retained,
                params=params,
            )
    if best is None:
        floor_ratio = num_layers * (c1 * num_text + c2 * num_text**2) / full
        raise ValueError(
            f"target_flops={target_flops} cannot be reached with {stages} gating layers "
            f"(the text tokens alone cost {floor_ratio:.3f} of the unpruned prefill, gating "
            f"cannot start before layer 1 and no gate keeps under min_keep={min_keep:.4g} of "
            "the span); raise target_flops or stages, or lower the minimum keep (min_keep_tokens "
            "of AdaGate.calibrate)"
        )
    return best
