"""Outer-stage baselines for video LLMs, interchangeable with HoliTom's outer merge.

Each takes one video's pooled, projected features ``[F, N, D]`` (and, where it
uses it, the vision attention ``[F, N]``) and a ``retain_ratio``, and returns
the same :class:`video.holitom.OuterMergeResult` as
:func:`video.holitom.outer_merge` (tokens ``[M, D]`` in LLM order with the
newline(s), per token its frame, position and size), so methods compare at
equal token budgets (about ``retain_ratio * F * N`` tokens; the newline
tokens come on top, as for HoliTom):

- :func:`visionzip_reduce`: VisionZip per frame, as the official video
  adaptation (``HoliTom/visionzip/llava_arch.py``): dominant tokens by
  attention, the rest merged into contextual tokens by key similarity;
- :func:`divprune_reduce`: DivPrune's greedy max-min diversity over the
  whole video (or per frame);
- :func:`uniform_frames_reduce`: uniform frame sampling (whole frames).

:data:`REDUCERS` maps names to them (and ``"holitom"`` to ``outer_merge``).
"""

from __future__ import annotations

import math

import torch

from common.checks import budget, check_finite, check_range, check_ratio, check_tensor
from common.selection import divprune_select
from video.holitom.outer import (
    LAYOUTS,
    OuterMergeResult,
    _check_newline,
    arrange_tokens,
    outer_merge,
)

__all__ = [
    "REDUCERS",
    "visionzip_reduce",
    "divprune_reduce",
    "uniform_frames_reduce",
]

CONTEXTUAL_MERGES = ("faithful", "mean")


def _check_common(features, attention, retain_ratio, layout, newline, need_attention):
    x = check_tensor("features", features, 3, floating=True)
    check_finite("features", x)
    f, n, d = x.shape
    if attention is None:
        if need_attention:
            raise ValueError("attention [F, N] is required by this method")
    else:
        attention = check_tensor("attention", attention, 2)
        if tuple(attention.shape) != (f, n):
            raise ValueError(f"attention must be [F, N] = {(f, n)}, got {tuple(attention.shape)}")
        check_finite("attention", attention)
    check_ratio("retain_ratio", retain_ratio)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "grid" and math.isqrt(n) ** 2 != n:
        raise ValueError(f"layout='grid' needs a square grid, got N={n} tokens")
    return x, attention, _check_newline(newline, d, x.device)


def _result(x, tokens, frame, pos, size, key, layout, newline, every_row, retain_ratio):
    f, n, _ = x.shape
    static = torch.zeros(frame.shape[0], dtype=torch.bool, device=x.device)
    tokens, frame, pos, size, static = arrange_tokens(
        tokens.to(x.dtype),
        frame,
        pos,
        size,
        static,
        key,
        layout=layout,
        newline=newline,
        num_frames=f,
        tokens_per_frame=n,
        every_row=every_row,
    )
    return OuterMergeResult(
        tokens=tokens,
        frame=frame,
        position=pos,
        size=size,
        segments=[(t, t) for t in range(f)],
        total_reduced=0,
        retain_ratio=float(retain_ratio),
        static=static,
    )


def visionzip_reduce(
    features: torch.Tensor,
    attention: torch.Tensor,
    *,
    retain_ratio: float = 0.1,
    dominant_ratio: float = 54 / 64,
    metric: torch.Tensor | None = None,
    contextual: str = "faithful",
    fix_grid_positions: bool = False,
    layout: str = "one_token",
    newline: torch.Tensor | None = None,
) -> OuterMergeResult:
    """VisionZip on every frame (the official video adaptation).

    Per frame, ``b = max(1, round(N * retain_ratio))`` tokens: ``int(b *
    dominant_ratio)`` dominant tokens, the top of ``attention``, in position
    order; then ``b - dominant`` contextual tokens: of the remaining tokens
    (position order) every ``step = max(1, rest // contextual)``-th is a
    target, every other joins its most cosine-similar target by ``metric``,
    and the contextual token is ``target + mean(members)`` (faithful: the
    official sum, not an average; ``contextual="mean"`` averages the target
    with its members). The grid layout puts a newline after every row of
    every frame, empty rows included, as the official code.

    Args:
        features: ``[F, N, D]``; attention: ``[F, N]``.
        metric: ``[F, N, C]`` similarity features (official: the last layer's
            keys averaged over heads, pooled like the features); default the
            features themselves.
        fix_grid_positions: the official grid layout pairs the dominant
            tokens (in position order) with their positions in top-k order,
            which scrambles them (faithful default, ``False``); ``True`` keeps
            each token at its own position. The one-token layout is unaffected.

    Returns:
        :class:`OuterMergeResult` (``size``: 1 for a dominant token, 1 +
        members for a contextual one).
    """
    x, attention, newline = _check_common(
        features, attention, retain_ratio, layout, newline, need_attention=True
    )
    check_range("dominant_ratio", dominant_ratio, 0.0, 1.0)
    if not isinstance(fix_grid_positions, bool):
        raise TypeError(f"fix_grid_positions must be a bool, got {fix_grid_positions!r}")
    if contextual not in CONTEXTUAL_MERGES:
        raise ValueError(f"contextual must be one of {CONTEXTUAL_MERGES}, got {contextual!r}")
    f, n, d = x.shape
    if metric is None:
        metric = x
    metric = check_tensor("metric", metric, 3, floating=True)
    if tuple(metric.shape[:2]) != (f, n):
        raise ValueError(f"metric must be [F, N, C] with F, N = {(f, n)}, got {metric.shape}")
    device = x.device
    b = budget(n, float(retain_ratio), name="retain_ratio")
    dom = budget(
        b, float(dominant_ratio), name="dominant_ratio", rounding="trunc", at_least_one=False
    )
    ctx = b - dom
    ar = torch.arange(n, device=device)
    frames = torch.arange(f, device=device)
    keep = torch.zeros(f, n, dtype=torch.bool, device=device)
    if dom:
        keep.scatter_(1, attention.topk(dom, dim=1).indices, True)
    dom_f, dom_p = keep.nonzero(as_tuple=True)  # frame-major, position order
    tokens = [x[dom_f, dom_p]]
    frame, pos = [dom_f], [dom_p]
    if dom and layout == "grid" and not fix_grid_positions:
        # official quirk: the dominant tokens (position order) are paired with their
        # positions in top-k order before the grid sort, so most land in wrong places
        pos = [attention.topk(dom, dim=1).indices.reshape(-1)]
    size = [torch.ones_like(dom_f)]
    group = [torch.zeros_like(dom_f)]
    rest_n = n - dom
    if ctx > 0 and rest_n > 0:
        ctx = min(ctx, rest_n)
        rest = ar.expand(f, n)[~keep].view(f, rest_n)  # [F, rest] positions, ascending
        step = max(1, rest_n // ctx)
        targets = torch.arange(0, rest_n, step, device=device)[:ctx]  # [ctx]
        is_target = torch.zeros(rest_n, dtype=torch.bool, device=device)
        is_target[targets] = True
        others = (~is_target).nonzero(as_tuple=True)[0]
        # similarity and merge in the inputs' dtypes, as the official code (bf16 ties)
        m = metric[frames[:, None], rest]  # [F, rest, C]
        m = m / m.norm(dim=-1, keepdim=True)
        sim = torch.bmm(m[:, others], m[:, targets].transpose(1, 2))  # [F, others, ctx]
        assign = sim.argmax(dim=2)
        h = x[frames[:, None], rest]  # [F, rest, D]
        one_hot = torch.zeros(f, others.shape[0], ctx, dtype=x.dtype, device=device)
        one_hot.scatter_(2, assign[..., None], 1)
        counts = one_hot.sum(dim=1)  # [F, ctx]
        sums = torch.bmm(one_hot.transpose(1, 2), h[:, others])  # [F, ctx, D]
        if contextual == "faithful":
            merged = h[:, targets] + sums / counts.clamp(min=1)[..., None]
        else:
            merged = (h[:, targets] + sums) / (counts + 1)[..., None]
        tokens.append(merged.reshape(f * ctx, d))
        frame.append(frames.repeat_interleave(ctx))
        pos.append(rest[:, targets].reshape(-1))
        # members counted in integers: a bf16 count rounds above 256 (603 members -> 600)
        members = torch.zeros(f, ctx, dtype=torch.long, device=device)
        members.scatter_add_(1, assign, torch.ones_like(assign))
        size.append((members + 1).reshape(-1))
        group.append(torch.ones(f * ctx, dtype=torch.long, device=device))
    frame_t, pos_t, group_t = torch.cat(frame), torch.cat(pos), torch.cat(group)
    key = (frame_t * 2 + group_t) * n + pos_t  # per frame: dominant, then contextual
    return _result(
        x,
        torch.cat([t.to(x.dtype) for t in tokens]),
        frame_t,
        pos_t,
        torch.cat(size),
        key,
        layout,
        newline,
        True,
        retain_ratio,
    )


def divprune_reduce(
    features: torch.Tensor,
    attention: torch.Tensor | None = None,
    *,
    retain_ratio: float = 0.1,
    per_frame: bool = False,
    layout: str = "one_token",
    newline: torch.Tensor | None = None,
) -> OuterMergeResult:
    """DivPrune: greedy max-min cosine diversity (:func:`common.divprune_select`).

    Over all ``F * N`` tokens of the video (``round(F * N * retain_ratio)``
    kept), or per frame (``round(N * retain_ratio)`` each) with
    ``per_frame=True``. Kept tokens in (frame, position) order; ``attention``
    is accepted for interchangeability and not used.
    """
    x, _, newline = _check_common(
        features, attention, retain_ratio, layout, newline, need_attention=False
    )
    if not isinstance(per_frame, bool):
        raise TypeError(f"per_frame must be a bool, got {per_frame!r}")
    f, n, d = x.shape
    if per_frame:
        idx = divprune_select(x, retain_ratio)  # [F, K] sorted
        frame = torch.arange(f, device=x.device).repeat_interleave(idx.shape[1])
        pos = idx.reshape(-1)
    else:
        flat = divprune_select(x.reshape(f * n, d), retain_ratio)  # [K] sorted
        frame, pos = torch.div(flat, n, rounding_mode="floor"), flat % n
    size = torch.ones_like(pos)
    return _result(x, x[frame, pos], frame, pos, size, None, layout, newline, False, retain_ratio)


def uniform_frames_reduce(
    features: torch.Tensor,
    attention: torch.Tensor | None = None,
    *,
    retain_ratio: float = 0.1,
    layout: str = "one_token",
    newline: torch.Tensor | None = None,
) -> OuterMergeResult:
    """Uniform frame sampling: ``max(1, round(F * retain_ratio))`` whole frames,
    evenly spread from the first to the last (``linspace``, rounded)."""
    x, _, newline = _check_common(
        features, attention, retain_ratio, layout, newline, need_attention=False
    )
    f, n, _ = x.shape
    k = budget(f, float(retain_ratio), name="retain_ratio")
    if k == 1:
        kept = torch.zeros(1, dtype=torch.long, device=x.device)
    else:
        kept = torch.linspace(0, f - 1, k, device=x.device).round().long()
    frame = kept.repeat_interleave(n)
    pos = torch.arange(n, device=x.device).repeat(k)
    size = torch.ones_like(pos)
    return _result(
        x, x[kept].reshape(k * n, -1), frame, pos, size, None, layout, newline, False, retain_ratio
    )


REDUCERS = {
    "holitom": outer_merge,
    "visionzip": visionzip_reduce,
    "divprune": divprune_reduce,
    "uniform": uniform_frames_reduce,
}
"""Outer-stage reducers by name: ``fn(features, attention, *, retain_ratio, layout,
newline, ...) -> OuterMergeResult``."""
