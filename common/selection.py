"""Choosing which tokens to keep (pure tensor functions).

Every selector takes a budget ``keep`` as a ratio in [0, 1] (float) or an
exact count in [0, N] (int), resolved by :func:`common.checks.budget` (one
rule: ``0`` and ``0.0`` both select nothing, a positive ratio at least one
token), and returns ``keep_idx [B, K]``: long, unique, sorted ascending,
exactly ``K`` per row. Greedy selectors (k-center, DivPrune) loop over the K picks (each
pick is sequential by definition) with the work on all N tokens vectorised.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from common.checks import budget, check_finite, check_tensor, top_r
from common.similarity import best_match, normalize

__all__ = ["topk_keep", "k_center_greedy", "divprune_select"]


def _as_batched(name: str, x: object, ndim: int) -> tuple[torch.Tensor, bool]:
    x = check_tensor(name, x, (ndim - 1, ndim))
    squeeze = x.ndim == ndim - 1
    return (x[None] if squeeze else x), squeeze


def _features(name: str, x: object) -> tuple[torch.Tensor, bool]:
    """``[B, N, D]`` (or ``[N, D]``) finite floating-point features, batched."""
    xb, squeeze = _as_batched(name, x, 3)
    if not xb.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {xb.dtype}")
    check_finite(name, xb)
    return xb, squeeze


def topk_keep(scores: torch.Tensor, keep: float | int, *, rounding: str = "round") -> torch.Tensor:
    """Indices of the ``K`` highest scores, sorted ascending.

    Args:
        scores: ``[B, N]`` (or ``[N]``) real scores, higher = keep.
        keep: ratio in [0, 1] or count in [0, N] (see :func:`common.checks.budget`).
        rounding: how a ratio becomes a count (:data:`common.checks.ROUNDING_MODES`).

    Returns:
        ``[B, K]`` (or ``[K]``) long. Ties are broken toward the lower index.
    """
    s, squeeze = _as_batched("scores", scores, 2)
    if s.dtype == torch.bool or s.is_complex():
        raise TypeError(f"scores must be real numbers, got {s.dtype}")
    check_finite("scores", s)
    k = budget(s.shape[1], keep, rounding=rounding)
    out = top_r(s, k).sort(dim=1).values
    return out[0] if squeeze else out


def _greedy(
    min_dist: torch.Tensor,
    first: torch.Tensor,
    k: int,
    dist_to: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Farthest-point loop shared by k-center and DivPrune; returns picks in order."""
    b, n = min_dist.shape
    rows = torch.arange(b, device=min_dist.device)
    picks = torch.empty(b, k, dtype=torch.long, device=min_dist.device)
    if k == 0:
        return picks
    picks[:, 0] = first
    min_dist = torch.minimum(min_dist, dist_to(first))
    min_dist[rows, first] = float("-inf")
    for i in range(1, k):
        nxt = min_dist.argmax(dim=1)
        picks[:, i] = nxt
        min_dist = torch.minimum(min_dist, dist_to(nxt))
        min_dist[rows, nxt] = float("-inf")  # never picked twice, even among duplicates
    return picks


def k_center_greedy(
    x: torch.Tensor,
    keep: float | int,
    *,
    start: int | torch.Tensor | None = None,
    distance: str = "euclidean",
    return_order: bool = False,
) -> torch.Tensor:
    """Greedy k-center (farthest-point) selection, as ToDRE uses for diversity.

    Starting from ``start``, repeatedly add the token farthest from the
    selected set (max over tokens of the min distance to the set).

    Args:
        x: ``[B, N, D]`` (or ``[N, D]``) floating point.
        keep: ratio or count.
        start: first centre, an int or ``[B]`` long; default the token
            farthest from the mean of its row.
        distance: ``"euclidean"`` or ``"cosine"`` (``1 - cos``).
        return_order: return the picks in selection order instead of sorted.

    Returns:
        ``[B, K]`` long (``[K]`` for 2-D input). Ties -> lower index.
    """
    xb, squeeze = _features("x", x)
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    b, n, _ = xb.shape
    k = budget(n, keep)
    feats = normalize(xb) if distance == "cosine" else xb.float()
    rows = torch.arange(b, device=xb.device)

    def dist_to(idx: torch.Tensor) -> torch.Tensor:
        c = feats[rows, idx][:, None]  # [B, 1, D]
        if distance == "cosine":
            return 1.0 - (feats * c).sum(-1)
        return (feats - c).norm(dim=-1)

    if start is None:
        first = (feats - feats.mean(1, keepdim=True)).norm(dim=-1).argmax(dim=1)
    else:
        if isinstance(start, bool) or not isinstance(start, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"start must be an int or a long tensor, got {type(start).__name__}")
        first = torch.as_tensor(start, device=xb.device)
        if first.is_floating_point() or first.is_complex() or first.dtype == torch.bool:
            raise TypeError(f"start must be an int or a long tensor, got {first.dtype}")
        if first.ndim > 1 or (first.ndim == 1 and first.shape[0] not in (1, b)):
            raise ValueError(f"start must be an int or a [B={b}] tensor, got {tuple(first.shape)}")
        first = first.long().expand(b).contiguous()
        if int(first.min()) < 0 or int(first.max()) >= n:
            raise ValueError(f"start must be in [0, {n}), got {start}")
    init = torch.full((b, n), float("inf"), device=xb.device)
    picks = _greedy(init, first, k, dist_to)
    out = picks if return_order else picks.sort(dim=1).values
    return out[0] if squeeze else out


def divprune_select(
    x: torch.Tensor,
    keep: float | int,
    *,
    chunk_size: int | None = 4096,
    return_order: bool = False,
) -> torch.Tensor:
    """DivPrune: greedy max-min diversity over cosine distance ``1 - cos``.

    As the official code: the first pick is the token whose nearest other
    token is farthest; each next pick maximises its minimum distance to the
    picks so far. Deviation (correctness): a picked token is never picked
    again (the official loop can re-pick when tokens are exact duplicates,
    returning repeated indices).

    Args:
        x: ``[B, N, D]`` (or ``[N, D]``) floating point.
        keep: ratio or count.
        chunk_size: rows per block for the first nearest-neighbour pass
            (never materialises the ``N x N`` matrix at once).
        return_order: return picks in selection order instead of sorted.

    Returns:
        ``[B, K]`` long (``[K]`` for 2-D input). Ties -> lower index.
    """
    xb, squeeze = _features("x", x)
    b, n, _ = xb.shape
    k = budget(n, keep)
    feats = normalize(xb)
    rows = torch.arange(b, device=xb.device)
    if n == 1:
        first = torch.zeros(b, dtype=torch.long, device=xb.device)
    else:
        nearest = 1.0 - best_match(feats, feats, chunk_size=chunk_size, exclude_self=True)[0]
        # a mutual nearest pair always ties here in exact arithmetic; rounding must not
        # decide it: take the lowest index within a few ulps of the maximum (as exact
        # arithmetic and the official first-max argmax would)
        top = nearest.max(dim=1, keepdim=True).values
        tol = 8 * torch.finfo(nearest.dtype).eps * top.abs().clamp_min(1.0)
        first = (nearest >= top - tol).long().argmax(dim=1)

    def dist_to(idx: torch.Tensor) -> torch.Tensor:
        return 1.0 - (feats * feats[rows, idx][:, None]).sum(-1)

    init = torch.full((b, n), float("inf"), device=xb.device)
    picks = _greedy(init, first, k, dist_to)
    out = picks if return_order else picks.sort(dim=1).values
    return out[0] if squeeze else out
