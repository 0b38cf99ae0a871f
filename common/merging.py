"""Merging tokens given an assignment (ToMe style, pure tensor functions).

Every function here takes an assignment ``dst_of [B, N]`` (long, values in
``[0, K)``: the output slot each original token goes to) and reduces a
tensor ``x [B, N, *]`` that rides along into ``[B, K, *]``. The matchers in
:mod:`common.matching` compute ``dst_of`` once; these functions are the one
mechanism that applies it (``Merge.merge`` calls them).

Half precision: float16 / bfloat16 inputs are accumulated in float32 and the
result is cast back to the input dtype, so sums of many members neither
overflow nor lose the small members.
"""

from __future__ import annotations

import torch

from common.checks import accumulation_dtype, check_count, check_range, check_tensor

__all__ = [
    "MERGE_MODES",
    "check_assignment",
    "scatter_merge",
    "mean_merge",
    "weighted_average_merge",
    "centre_weighted_merge",
    "sequential_halving_merge",
    "unmerge",
]

MERGE_MODES = ("mean", "sum", "amax", "wavg", "halving")


def check_assignment(name: str, dst_of: object, num_kept: int) -> torch.Tensor:
    """Check ``dst_of`` is a ``[B, N]`` long tensor with values in ``[0, num_kept)``."""
    dst_of = check_tensor(name, dst_of, 2)
    if dst_of.dtype != torch.long:
        raise TypeError(f"{name} must be a long (int64) tensor, got {dst_of.dtype}")
    check_count("num_kept", num_kept, low=1)
    lo, hi = int(dst_of.min()), int(dst_of.max())
    if lo < 0 or hi >= num_kept:
        raise ValueError(f"{name} values must be in [0, {num_kept}), got range [{lo}, {hi}]")
    return dst_of


def _check_rides(name: str, x: object, dst_of: torch.Tensor) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.ndim < 2 or tuple(x.shape[:2]) != tuple(dst_of.shape):
        raise ValueError(
            f"{name} must have shape [B, N, *] = [{dst_of.shape[0]}, {dst_of.shape[1]}, *], "
            f"got {tuple(x.shape)}"
        )
    if x.device != dst_of.device:
        raise ValueError(f"{name} is on {x.device} but the assignment is on {dst_of.device}")
    return x


def _scatter_sum(x3: torch.Tensor, dst_of: torch.Tensor, num_kept: int) -> torch.Tensor:
    """[B, N, E] -> [B, K, E] sums (in x3's dtype)."""
    b, n, e = x3.shape
    # index_add_ over flattened rows: vectorised over E (several times faster on CPU
    # than scatter_add_ with an expanded index); same sums
    offset = torch.arange(b, device=x3.device)[:, None] * num_kept
    out = x3.new_zeros(b * num_kept, e)
    out.index_add_(0, (dst_of + offset).reshape(-1), x3.reshape(b * n, e))
    return out.view(b, num_kept, e)


def _counts(dst_of: torch.Tensor, num_kept: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] -> [B, K] number of members per slot."""
    ones = torch.ones(dst_of.shape, dtype=dtype, device=dst_of.device)
    return ones.new_zeros(dst_of.shape[0], num_kept).scatter_add_(1, dst_of, ones)


def scatter_merge(
    x: torch.Tensor,
    dst_of: torch.Tensor,
    num_kept: int,
    mode: str = "mean",
    *,
    dim: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the members of each output slot.

    Args:
        x: ``[B, N, *]`` tensor riding along (features, positions, sizes ...);
            with ``dim`` the token axis may sit elsewhere, e.g. ``[B, H, N, D]``
            with ``dim=2`` (per-head q / k / v, no transposed copy needed).
        dst_of: ``[B, N]`` long, output slot of every token, values in ``[0, K)``.
        num_kept: ``K``, number of output slots.
        mode: ``"sum"``, ``"mean"`` (mean of all members, the kept token
            included, as ToMe / FastVGGT ``include_self=True``) or ``"amax"``.
            (``"wavg"`` needs sizes: use :func:`weighted_average_merge`.)
        dim: the token axis of ``x`` (``"sum"`` / ``"mean"`` for ``dim > 1``).
        out: optional tensor of ``x``'s dtype and the result's shape to write
            into (for instance a slice of a larger buffer); ``dim > 1`` only.

    Returns:
        ``x`` with its ``dim`` axis reduced to ``K``, in ``x``'s dtype. A slot
        with no member is zero. ``amax`` also accepts bool / integer ``x``.
        Sums run in index order from zero (float32 for half inputs), so every
        ``dim`` gives bitwise the same values.
    """
    dst_of = check_assignment("dst_of", dst_of, num_kept)
    if mode not in ("sum", "mean", "amax"):
        raise ValueError(f"mode must be 'sum', 'mean' or 'amax' here, got {mode!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1 (the batch is dim 0), got {dim!r}")
    if dim != 1:
        return _merge_along(x, dst_of, num_kept, mode, dim, out)
    if out is not None:
        raise ValueError("out is only supported with dim > 1")
    x = _check_rides("x", x, dst_of)
    b, n = dst_of.shape
    trailing = x.shape[2:]
    x3 = x.reshape(b, n, -1)
    if mode == "amax":
        src = x3.to(torch.uint8) if x3.dtype == torch.bool else x3
        res = src.new_zeros(b, num_kept, src.shape[-1])
        res = res.scatter_reduce_(
            1, dst_of[..., None].expand_as(src), src, reduce="amax", include_self=False
        )
        return res.to(x.dtype).reshape(b, num_kept, *trailing)
    if not x.is_floating_point() and mode == "mean":
        raise TypeError(f"x must be floating point for mode='mean', got {x.dtype}")
    acc = accumulation_dtype(x.dtype)
    res = _scatter_sum(x3.to(acc), dst_of, num_kept)
    if mode == "mean":
        res = res / _counts(dst_of, num_kept, acc).clamp_min(1)[..., None]
    return res.to(x.dtype).reshape(b, num_kept, *trailing)


def _merge_along(
    x: object, dst_of: torch.Tensor, num_kept: int, mode: str, dim: int, out: torch.Tensor | None
) -> torch.Tensor:
    """:func:`scatter_merge` with the token axis at ``dim > 1`` (sum / mean)."""
    x = check_tensor("x", x)
    b, n = dst_of.shape
    if x.ndim <= dim or x.shape[0] != b or x.shape[dim] != n:
        raise ValueError(
            f"x must have batch {b} and {n} tokens along dim {dim}, got {tuple(x.shape)}"
        )
    if x.device != dst_of.device:
        raise ValueError(f"x is on {x.device} but the assignment is on {dst_of.device}")
    if mode == "amax":
        raise ValueError("mode='amax' supports dim=1 only")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point for dim > 1, got {x.dtype}")
    shape = (*x.shape[:dim], num_kept, *x.shape[dim + 1 :])
    if out is None:
        out = x.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {x.dtype} on {x.device} with shape {shape}, got "
            f"{out.dtype} on {out.device} with shape {tuple(out.shape)}"
        )
    acc = accumulation_dtype(x.dtype)
    # sum straight into ``out`` when no wider accumulator is needed
    sums = out if acc == x.dtype else x.new_empty(shape, dtype=acc)
    sums.zero_()
    src = x.to(acc)
    for i in range(b):  # along the token axis of each item: no transposed copy of x
        sums[i].index_add_(dim - 1, dst_of[i], src[i])
    if mode == "mean":
        view = [b] + [1] * (x.ndim - 1)
        view[dim] = num_kept
        sums.div_(_counts(dst_of, num_kept, acc).clamp_min(1).view(view))
    if sums is not out:
        out.copy_(sums)
    return out


def mean_merge(x: torch.Tensor, dst_of: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Plain mean of each slot's members: ``[B, N, *] -> [B, K, *]``."""
    return scatter_merge(x, dst_of, num_kept, "mean")


def weighted_average_merge(
    x: torch.Tensor,
    dst_of: torch.Tensor,
    num_kept: int,
    size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average (ToMe ``merge_wavg``).

    ``out[k] = sum_{i -> k} size[i] * x[i] / sum_{i -> k} size[i]``.

    Args:
        x: ``[B, N, *]`` floating point.
        dst_of: ``[B, N]`` long in ``[0, K)``.
        num_kept: ``K``.
        size: ``[B, N]`` (or ``[B, N, 1]``) non-negative sizes; default ones.
            A slot whose members all have size 0 comes out as zeros.

    Returns:
        ``(merged [B, K, *], merged_size [B, K])``; ``merged_size`` is in
        ``size``'s dtype (float32 when ``size`` is None). The size-weighted
        sum ``merged * merged_size`` equals ``x * size`` summed per slot.
    """
    dst_of = check_assignment("dst_of", dst_of, num_kept)
    x = _check_rides("x", x, dst_of)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    b, n = dst_of.shape
    if size is None:
        size = torch.ones(b, n, dtype=torch.float32, device=x.device)
    else:
        size = _check_rides("size", size, dst_of)
        if size.ndim == 3 and size.shape[-1] == 1:
            size = size[..., 0]
        if size.ndim != 2:
            raise ValueError(f"size must be [B, N] or [B, N, 1], got {tuple(size.shape)}")
        if not size.is_floating_point():
            size = size.to(torch.float32)
        if bool((size < 0).any()):
            raise ValueError("size must be non-negative")
    acc = accumulation_dtype(x.dtype)
    sacc = size.to(acc)
    x3 = x.reshape(b, n, -1).to(acc)
    total = _scatter_sum(x3 * sacc[..., None], dst_of, num_kept)
    msize = _scatter_sum(sacc[..., None], dst_of, num_kept)
    out = total / msize.where(msize != 0, torch.ones_like(msize))
    return out.to(x.dtype).reshape(b, num_kept, *x.shape[2:]), msize[..., 0].to(size.dtype)


def centre_weighted_merge(
    x: torch.Tensor,
    centre_idx: torch.Tensor,
    assign: torch.Tensor,
    beta: float = 0.6,
) -> torch.Tensor:
    """HoliTom's cluster merge: ``beta * centre + (1 - beta) * mean(members)``.

    Args:
        x: ``[B, N, D]`` floating point tokens.
        centre_idx: ``[B, K]`` long, original index of each cluster centre.
        assign: ``[B, N]`` long in ``[0, K)``, cluster of every token; a
            centre's own entry must point to its own cluster.
        beta: weight of the centre, in ``[0, 1]``.

    Returns:
        ``[B, K, D]``. Members exclude the centre itself; a centre with no
        member is returned unchanged (not scaled by ``beta``).
    """
    x = check_tensor("x", x, 3, floating=True)
    centre_idx = check_tensor("centre_idx", centre_idx, 2)
    if centre_idx.dtype != torch.long:
        raise TypeError(f"centre_idx must be a long tensor, got {centre_idx.dtype}")
    b, n, d = x.shape
    k = centre_idx.shape[1]
    if centre_idx.shape[0] != b:
        raise ValueError(f"centre_idx must be [B={b}, K], got {tuple(centre_idx.shape)}")
    if int(centre_idx.min()) < 0 or int(centre_idx.max()) >= n:
        raise ValueError(f"centre_idx values must be in [0, {n})")
    assign = check_assignment("assign", assign, k)
    if tuple(assign.shape) != (b, n):
        raise ValueError(f"assign must be [B={b}, N={n}], got {tuple(assign.shape)}")
    beta = check_range("beta", beta, 0.0, 1.0)
    own = assign.gather(1, centre_idx)
    if not bool((own == torch.arange(k, device=x.device)).all()):
        raise ValueError("assign must map each centre (centre_idx[:, k]) to its own cluster k")
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    # centres go to a spare slot k (dropped), so only members are summed, without
    # a masked copy of x
    slot = assign.scatter(1, centre_idx, k)
    msum = _scatter_sum(xa, slot, k + 1)[:, :k]
    mcount = _counts(slot, k + 1, acc)[:, :k, None]
    centre = xa.gather(1, centre_idx[..., None].expand(b, k, d))
    mixed = beta * centre + (1.0 - beta) * msum / mcount.clamp_min(1)
    return torch.where(mcount > 0, mixed, centre).to(x.dtype)


def sequential_halving_merge(
    x: torch.Tensor, dst_of: torch.Tensor, keep_idx: torch.Tensor
) -> torch.Tensor:
    """HoliTom's inner-LLM merge, in closed form.

    The official loop (``holitom/modeling_qwen2.py``) visits the dropped
    tokens in ascending original index and does ``h[t] = (h[t] + h[i]) / 2``
    for each one's target ``t``: with members ``i_1 < ... < i_m`` the result
    is ``h_t / 2^m + sum_j h_{i_j} / 2^(m - j + 1)`` (the last member gets
    weight 1/2; not a mean). Computed here without a loop.

    Args:
        x: ``[B, N, *]`` floating point.
        dst_of: ``[B, N]`` long in ``[0, K)``.
        keep_idx: ``[B, K]`` long, original index of each slot's kept token
            (``dst_of.gather(1, keep_idx) == arange(K)``).

    Returns:
        ``[B, K, *]`` in ``x``'s dtype (weights applied in float32 or wider).
    """
    keep_idx = check_tensor("keep_idx", keep_idx, 2)
    if keep_idx.dtype != torch.long:
        raise TypeError(f"keep_idx must be a long tensor, got {keep_idx.dtype}")
    k = keep_idx.shape[1]
    dst_of = check_assignment("dst_of", dst_of, k)
    x = _check_rides("x", x, dst_of)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    b, n = dst_of.shape
    if keep_idx.shape[0] != b or int(keep_idx.min()) < 0 or int(keep_idx.max()) >= n:
        raise ValueError(f"keep_idx must be [B={b}, K] with values in [0, {n})")
    if not bool((dst_of.gather(1, keep_idx) == torch.arange(k, device=x.device)).all()):
        raise ValueError("keep_idx must hold the kept token of each slot of dst_of")
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    is_kept.scatter_(1, keep_idx, True)
    member = ~is_kept
    ar_n = torch.arange(n, device=x.device)
    slot = dst_of.masked_fill(is_kept, k)  # kept tokens go to a spare slot k
    m = _counts(slot, k + 1, torch.long)  # [B, K+1] members per slot
    # rank of each member within its slot in index order: sort by (slot, index)
    order = (slot * n + ar_n).argsort(dim=1)
    sorted_slot = slot.gather(1, order)
    first = torch.searchsorted(
        sorted_slot, torch.arange(k + 1, device=x.device).expand(b, -1).contiguous()
    )
    rank = torch.empty_like(order).scatter_(1, order, ar_n - first.gather(1, sorted_slot))
    m_i = m.gather(1, dst_of)  # members of each token's slot
    later = m_i - 1 - rank  # members of the same slot merged after this one
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.where(member, torch.exp2(-(later + 1).to(acc)), torch.exp2(-m_i.to(acc)))
    x3 = x.reshape(b, n, -1).to(acc)
    out = _scatter_sum(x3 * w[..., None], dst_of, k)
    return out.to(x.dtype).reshape(b, k, *x.shape[2:])


def unmerge(y: torch.Tensor, dst_of: torch.Tensor) -> torch.Tensor:
    """Back to the full length: every original token copies its slot.

    Args:
        y: ``[B, K, *]`` merged tokens.
        dst_of: ``[B, N]`` long in ``[0, K)``.

    Returns:
        ``[B, N, *]`` with ``out[b, i] = y[b, dst_of[b, i]]``.
    """
    y = check_tensor("y", y)
    if y.ndim < 2:
        raise ValueError(f"y must be [B, K, *], got shape {tuple(y.shape)}")
    dst_of = check_assignment("dst_of", dst_of, y.shape[1])
    if dst_of.shape[0] != y.shape[0]:
        raise ValueError(f"y batch {y.shape[0]} does not match dst_of batch {dst_of.shape[0]}")
    b, n = dst_of.shape
    y3 = y.reshape(b, y.shape[1], -1)
    out = y3.gather(1, dst_of[..., None].expand(b, n, y3.shape[-1]))
    return out.reshape(b, n, *y.shape[2:])
