"""DPC-kNN density-peak clustering, as HoliTom (and FastVID / PruneVid) use it.

Faithful to HoliTom's ``cluster_dpc_knn`` (``holitom/llava_arch.py``):

- ``dist = cdist(x, x) / sqrt(D)`` in float32, ``[B, N, N]``;
- local density ``rho = exp(-mean(d_kNN^2))`` over the ``k`` nearest
  (the token itself, at distance 0, included), plus ``U[0, 1) * 1e-6``
  tie-breaking noise (official: the global RNG; here an explicit generator);
- ``delta`` = distance to the nearest token with a strictly higher density;
  the densest token gets the largest distance of the whole matrix;
- centres = top ``num_centres`` of ``delta * rho``, sorted by index (equal
  scores go to the lower index; the official ``topk`` leaves that open);
- every other token joins its nearest centre (``argmin`` of ``dist``).

HoliTom calls it with ``k = min(7, num_centres)`` (the kNN size shrinks with
the number of clusters); pass that ``k`` to reproduce it exactly.

Quirk: for densities near 1 the ``1e-6`` noise is only a few float32 ulps
(``eps(1.0) = 1.2e-7``), so exact duplicates can keep equal densities.
"""

from __future__ import annotations

import torch

from common.checks import check_count, check_finite, check_range, check_tensor, make_generator
from common.merging import centre_weighted_merge

__all__ = ["dpc_knn", "assign_to_centres", "dpc_knn_merge"]


def dpc_knn(
    x: torch.Tensor,
    num_centres: int,
    k: int = 7,
    *,
    generator: torch.Generator | int | None = None,
    noise: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak cluster centres.

    Args:
        x: ``[B, N, D]`` (or ``[N, D]``) floating point tokens.
        num_centres: ``K`` in [1, N].
        k: neighbours for the density (clamped to N).
        generator: source of the tie-breaking noise (Generator or int seed;
            ``None`` = seed 0).
        noise: noise scale (official 1e-6; 0 disables it).

    Returns:
        ``(centre_idx [B, K] long sorted ascending, dist [B, N, N] float32)``
        (unbatched shapes for 2-D input).
    """
    x = check_tensor("x", x, (2, 3), floating=True)
    squeeze = x.ndim == 2
    xb = x[None] if squeeze else x
    check_finite("x", xb)
    b, n, d = xb.shape
    check_count("num_centres", num_centres, low=1, high=n)
    check_count("k", k, low=1)
    check_range("noise", noise, 0.0, 1.0)
    k = min(k, n)
    gen = make_generator(generator, xb.device)
    with torch.no_grad():
        xf = xb.float()
        # one cdist per batch row: bit-identical to the official call (batch 1)
        # and, on CPU, several times faster than one batched cdist
        dist = torch.stack([torch.cdist(xi, xi) for xi in xf]) / (d**0.5)
        knn = torch.topk(dist, k, dim=-1, largest=False).values
        density = (-(knn**2).mean(dim=-1)).exp()
        if noise > 0:
            u = torch.rand(density.shape, generator=gen, device=gen.device, dtype=torch.float32)
            density = density + u.to(xb.device) * noise
        denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: rho_j > rho_i
        dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
        delta = torch.where(denser, dist, dist_max).min(dim=-1).values
        score = delta * density
        # stable sort instead of topk: equal scores go to the lower index
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        centre_idx = order[:, :num_centres].sort(dim=-1).values
    if squeeze:
        return centre_idx[0], dist[0]
    return centre_idx, dist


def assign_to_centres(dist: torch.Tensor, centre_idx: torch.Tensor) -> torch.Tensor:
    """Nearest centre of every token.

    Args:
        dist: ``[B, N, N]`` pairwise distances (from :func:`dpc_knn`).
        centre_idx: ``[B, K]`` long.

    Returns:
        ``assign [B, N]`` long in ``[0, K)``; a centre maps to its own
        cluster; ties go to the lower centre slot.
    """
    dist = check_tensor("dist", dist, 3, floating=True)
    centre_idx = check_tensor("centre_idx", centre_idx, 2)
    if centre_idx.dtype != torch.long:
        raise TypeError(f"centre_idx must be a long tensor, got {centre_idx.dtype}")
    b, n, _ = dist.shape
    if centre_idx.shape[0] != b or int(centre_idx.min()) < 0 or int(centre_idx.max()) >= n:
        raise ValueError(f"centre_idx must be [B={b}, K] with values in [0, {n})")
    if bool((centre_idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        # a repeated centre would leave one of its slots without any member
        raise ValueError("centre_idx must not repeat a token within a row")
    k = centre_idx.shape[1]
    to_centres = dist.gather(2, centre_idx[:, None, :].expand(b, n, k))
    assign = to_centres.argmin(dim=-1)
    assign.scatter_(1, centre_idx, torch.arange(k, device=dist.device).expand(b, k))
    return assign


def dpc_knn_merge(
    x: torch.Tensor,
    num_centres: int,
    *,
    beta: float = 0.6,
    k: int = 7,
    generator: torch.Generator | int | None = None,
    noise: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's static-token merge: DPC-kNN centres, nearest-centre
    assignment, ``beta * centre + (1 - beta) * mean(members)``.

    Args:
        x: ``[B, N, D]`` floating point.
        num_centres, k, generator, noise: see :func:`dpc_knn`.
        beta: centre weight in [0, 1] (HoliTom 0.6).

    Returns:
        ``(merged [B, K, D] in x's dtype, centre_idx [B, K], assign [B, N])``;
        the merged token takes the centre's position ``centre_idx``.
    """
    x = check_tensor("x", x, 3, floating=True)
    centre_idx, dist = dpc_knn(x, num_centres, k, generator=generator, noise=noise)
    assign = assign_to_centres(dist, centre_idx)
    return centre_weighted_merge(x, centre_idx, assign, beta), centre_idx, assign
