"""HoliTom's temporal segmentation (exact dynamic programming over frames).

Given adjacent-frame per-position similarity ``sim [F-1, N]``
(:func:`common.similarity.adjacent_frame_similarity`) and a threshold
``tau``, a position ``p`` is *static* over frames ``[s, e]`` when
``sim[t, p] > tau`` for every ``t`` in ``[s, e-1]``. Merging the static
positions of a segment into one token saves ``count[s, e] * (e - s)`` tokens.
The DP picks the partition of the frames into segments maximising the total
saving (``holitom/llava_arch.py``, ``select_static_windows``):

``dp[i] = max(dp[i-1], max_{w=2..min(i+1, W)} dp[i-w] + score[i-w+1, i])``,
scanning ``w`` upward with a strict ``>`` (so on ties the shorter option
wins, as in the official loop), ``dp[-1] = 0``.

All counting is ``O(F * N + F^2)`` tensor work: the run length of "static"
ending at each frame, a histogram of run lengths per frame and a reverse
cumulative sum give every ``count[s, e]`` at once. Only the DP itself loops
over frames (each step is a vector op over window lengths).
"""

from __future__ import annotations

import torch

from common.checks import check_count, check_finite, check_ratio, check_tensor

__all__ = [
    "static_run_lengths",
    "static_counts",
    "temporal_segmentation",
    "segment_static_masks",
    "rebalance_retain_ratio",
]


def _check_sim(sim: object) -> torch.Tensor:
    sim = check_tensor("sim", sim, 2, floating=True)
    check_finite("sim", sim)
    return sim


def static_run_lengths(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """``L [F-1, N]`` long: how many consecutive ``sim[., p] > tau`` end at row ``t``.

    Position ``p`` is static over frames ``[s, e]`` iff ``L[e-1, p] >= e - s``.
    """
    sim = _check_sim(sim)
    tau = _check_tau(tau)
    rows = torch.arange(sim.shape[0], device=sim.device)[:, None]
    above = sim > tau
    last_below = torch.where(above, torch.full_like(rows, -1), rows).cummax(dim=0).values
    return rows - last_below


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a number, got {type(tau).__name__}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [-1, 1], got {tau}")
    return float(tau)


def static_counts(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """``count [F, F]`` long: number of positions static over frames ``[s, e]``.

    ``count[s, e]`` for ``e > s``; zero on and below the diagonal.
    """
    run = static_run_lengths(sim, tau)  # [F-1, N], values in [0, F-1]
    f1 = run.shape[0]
    f = f1 + 1
    hist = torch.zeros(f1, f, dtype=torch.long, device=run.device)
    hist.scatter_add_(1, run, torch.ones_like(run))
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[t, l] = #p with run >= l
    s = torch.arange(f, device=run.device)[:, None]
    e = torch.arange(f, device=run.device)[None, :]
    valid = e > s
    count = at_least[(e - 1).clamp(min=0), (e - s).clamp(min=0)]
    return torch.where(valid, count, torch.zeros_like(count))


def temporal_segmentation(
    sim: torch.Tensor, tau: float = 0.8, max_window_size: int = 1024
) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's exact DP segmentation of ``F`` frames.

    Args:
        sim: ``[F-1, N]`` adjacent-frame similarity (``F >= 1``; for one frame
            pass a ``[0, N]`` tensor).
        tau: static threshold (strict ``>``).
        max_window_size: longest segment considered (official default 1024).

    Returns:
        ``(segments, total_reduced)``: segments as ``(start, end)`` inclusive,
        in order, covering every frame (singletons allowed); ``total_reduced``
        the number of tokens the static merge removes (``dp[F-1]``; an int,
        exact, where the official float32 DP is exact up to 2**24).
    """
    sim = check_tensor("sim", sim, 2, floating=True, nonempty=False)
    check_finite("sim", sim)
    check_count("max_window_size", max_window_size, low=1)
    _check_tau(tau)
    f = sim.shape[0] + 1
    if f == 1:
        return [(0, 0)], 0
    count = static_counts(sim, tau)
    idx = torch.arange(f, device=sim.device)
    score = (count * (idx[None, :] - idx[:, None]).clamp(min=0)).cpu()  # [s, e]
    dpx = torch.zeros(f + 1, dtype=torch.long)  # dpx[m] = dp[m - 1], dpx[0] = 0
    prev = list(range(f))
    for i in range(f):
        best = int(dpx[i])
        top_w = min(i + 1, max_window_size)
        if top_w >= 2:
            starts = i - torch.arange(2, top_w + 1) + 1  # segment [start, i]
            vals = dpx[starts] + score[starts, i]
            j = int(vals.argmax())  # first max = shortest window among ties
            if int(vals[j]) > best:
                best = int(vals[j])
                prev[i] = int(starts[j])
        dpx[i + 1] = best
    segments = []
    i = f - 1
    while i >= 0:
        segments.append((prev[i], i))
        i = prev[i] - 1
    return segments[::-1], int(dpx[f])


def segment_static_masks(
    sim: torch.Tensor, segments: list[tuple[int, int]], tau: float = 0.8
) -> torch.Tensor:
    """Static positions of each segment: ``[S, N]`` bool (all False for a singleton).

    ``mask[k, p]`` is True iff ``sim[t, p] > tau`` for all ``t`` in
    ``[start_k, end_k - 1]``.
    """
    run = static_run_lengths(sim, tau)
    f = run.shape[0] + 1
    if not isinstance(segments, (list, tuple)) or not segments:
        raise TypeError("segments must be a non-empty list of (start, end) pairs")
    try:
        se = torch.tensor([[int(a), int(b)] for a, b in segments], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise TypeError("segments must be a list of (start, end) int pairs") from exc
    if bool((se[:, 0] > se[:, 1]).any()) or int(se.min()) < 0 or int(se.max()) >= f:
        raise ValueError(f"segments must satisfy 0 <= start <= end < {f}, got {segments}")
    se = se.to(run.device)
    length = se[:, 1] - se[:, 0]
    rows = run[(se[:, 1] - 1).clamp(min=0)]  # [S, N]
    return (rows >= length[:, None]) & (length[:, None] > 0)


def rebalance_retain_ratio(
    retain_ratio: float, num_frames: int, tokens_per_frame: int, total_reduced: int
) -> float:
    """HoliTom step 3: ``r' = min(r / ((F*N - R) / (F*N)), 1)``.

    The ratio applied to what is left after the static merge so the overall
    budget stays ``r * F * N``.
    """
    check_ratio("retain_ratio", retain_ratio)
    check_count("num_frames", num_frames, low=1)
    check_count("tokens_per_frame", tokens_per_frame, low=1)
    total = num_frames * tokens_per_frame
    if isinstance(total_reduced, float) and total_reduced.is_integer():
        total_reduced = int(total_reduced)
    check_count("total_reduced", total_reduced, high=total)
    if total_reduced == total:
        return 1.0
    return min(retain_ratio / ((total - total_reduced) / total), 1.0)
