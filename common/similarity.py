"""Cosine similarity primitives (pure tensor functions).

Half precision: inputs in float16 / bfloat16 are normalised in float32; the
matmul runs in ``compute_dtype`` (default float32 for half inputs, else the
input dtype) and results come back as float32 for half inputs.
"""

from __future__ import annotations

import torch

from common.checks import accumulation_dtype, check_compute_dtype, check_count, check_tensor

__all__ = [
    "normalize",
    "cosine_similarity_matrix",
    "best_match",
    "adjacent_frame_similarity",
]


def normalize(x: torch.Tensor, dtype: torch.dtype | None = None, eps: float = 1e-12):
    """L2-normalise the last dim (in float32 for half inputs), then cast to ``dtype``.

    ``x [..., D] -> [..., D]``; a zero vector stays zero.
    """
    xf = x.to(accumulation_dtype(x.dtype))
    xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(eps)
    return xf if dtype is None else xf.to(dtype)


def cosine_similarity_matrix(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pairwise cosine similarity.

    Args:
        a: ``[B, N, D]`` (or ``[N, D]``) floating point.
        b: ``[B, M, D]`` (or ``[M, D]``); default ``a``.
        chunk_size: rows of ``a`` per matmul (bounds the temporaries of the
            low-precision path to ``[B, chunk_size, M]``); ``None`` = all.
        compute_dtype: dtype of the matmul (e.g. ``torch.bfloat16``).

    Returns:
        ``[B, N, M]`` (``[N, M]`` for 2-D input), float32 for half inputs.
    """
    a = check_tensor("a", a, (2, 3), floating=True)
    b = a if b is None else check_tensor("b", b, a.ndim, floating=True)
    if a.shape[-1] != b.shape[-1] or (a.ndim == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must agree in B and D")
    if chunk_size is not None:
        check_count("chunk_size", chunk_size, low=1)
    check_compute_dtype(compute_dtype)
    squeeze = a.ndim == 2
    if squeeze:
        a, b = a[None], b[None]
    out_dtype = accumulation_dtype(a.dtype)
    cd = compute_dtype or out_dtype
    an = normalize(a, cd)
    bt = (an if b is a else normalize(b, cd)).transpose(1, 2)
    n = a.shape[1]
    step = n if chunk_size is None else chunk_size
    if step >= n:
        out = (an @ bt).to(out_dtype)
    else:
        out = torch.empty(a.shape[0], n, b.shape[1], dtype=out_dtype, device=a.device)
        for i in range(0, n, step):
            out[:, i : i + step] = an[:, i : i + step] @ bt
    return out[0] if squeeze else out


# Rows of ``a`` per similarity block on CPU: a cache-sized [rows, M] score buffer, reused
# by every block, is faster than large fresh blocks (about 10% at M ~ 4600, one thread)
# with the same values and indices (a row of the product and its max do not depend on
# the other rows). ``chunk_size`` stays the upper bound; other devices use it as is.
_CPU_BLOCK = 1024


def best_match(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a`` its most cosine-similar row of ``b``, without the full matrix.

    Args:
        a: ``[B, N, D]``; b: ``[B, M, D]``.
        chunk_size: rows of ``a`` per block: only ``[chunk_size, M]`` scores
            exist at a time (``None`` = one block; at most 1024 rows on CPU).
        compute_dtype: dtype of the matmul (FastVGGT uses bfloat16).
        exclude_self: ignore the diagonal (``a`` and ``b`` the same tokens).

    Returns:
        ``(values [B, N], index [B, N])``; values float32 for half inputs;
        ties go to the lowest index of ``b``.
    """
    a = check_tensor("a", a, 3, floating=True)
    b = check_tensor("b", b, 3, floating=True)
    if a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must agree in B and D")
    if chunk_size is not None:
        check_count("chunk_size", chunk_size, low=1)
    check_compute_dtype(compute_dtype)
    if exclude_self and a.shape[1] != b.shape[1]:
        raise ValueError("exclude_self needs a and b of the same length")
    if exclude_self and b.shape[1] < 2:
        raise ValueError("exclude_self needs at least 2 tokens in b (else no match exists)")
    bsz, n, _ = a.shape
    out_dtype = accumulation_dtype(a.dtype)
    cd = compute_dtype or out_dtype
    an = normalize(a, cd)
    bt = normalize(b, cd).transpose(1, 2).contiguous()  # [B, D, M]
    step = n if chunk_size is None else chunk_size
    if a.device.type == "cpu":
        step = min(step, _CPU_BLOCK)
    # one score buffer reused by every block, maxima written in place
    buf = torch.empty(min(step, n), b.shape[1], dtype=cd, device=a.device)
    values = torch.empty(bsz, n, dtype=cd, device=a.device)
    index = torch.empty(bsz, n, dtype=torch.long, device=a.device)
    for k in range(bsz):
        for i in range(0, n, step):
            rows = min(step, n - i)
            s = torch.mm(an[k, i : i + rows], bt[k], out=buf[:rows])
            if exclude_self:
                r = torch.arange(rows, device=a.device)
                s[r, r + i] = float("-inf")
            torch.max(s, dim=-1, out=(values[k, i : i + rows], index[k, i : i + rows]))
    return values.to(out_dtype), index


def adjacent_frame_similarity(x: torch.Tensor) -> torch.Tensor:
    """Per-position cosine similarity of consecutive frames (HoliTom step 1).

    ``x [F, N, D] -> s [F-1, N]`` with ``s[t, p] = cos(x[t, p], x[t+1, p])``;
    also batched ``[B, F, N, D] -> [B, F-1, N]``. float32 for half inputs.
    """
    x = check_tensor("x", x, (3, 4), floating=True)
    if x.shape[-3] < 2:
        raise ValueError(f"x must have at least 2 frames, got shape {tuple(x.shape)}")
    xf = x.to(accumulation_dtype(x.dtype))
    dot = torch.linalg.vecdot(xf[..., :-1, :, :], xf[..., 1:, :, :])
    norm = torch.linalg.vector_norm(xf, dim=-1).clamp_min(1e-12)
    return dot / (norm[..., :-1, :] * norm[..., 1:, :])
