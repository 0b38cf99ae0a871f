"""Token importance scores (pure tensor functions; higher = more important).

All scores come back as float32 (half-precision inputs are upcast before
reducing, so a mean over thousands of queries does not lose precision).
Attention rows recomputed from a decoder layer's q/k live in the engine, not
here: these functions take an attention map that already exists.
"""

from __future__ import annotations

import torch

from common.checks import check_count, check_tensor

__all__ = ["attention_received", "attention_received_from_qk", "cls_attention", "l2_norm_score"]


def _heads_mean(attn: torch.Tensor, name: str = "attn") -> torch.Tensor:
    """``[B, H, Nq, Nk]`` or ``[B, Nq, Nk]`` -> ``[B, Nq, Nk]`` float32 (mean over heads)."""
    attn = check_tensor(name, attn, (3, 4), floating=True)
    a = attn.float()
    return a.mean(dim=1) if a.ndim == 4 else a


def attention_received(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention each key token receives (HoliTom / VisionZip "attention").

    Averaged over heads, then over queries.

    Args:
        attn: ``[B, H, Nq, Nk]`` or ``[B, Nq, Nk]`` attention probabilities.
        query_mask: optional ``[B, Nq]`` bool; only these queries are averaged
            (e.g. skip padding). A row with no query gives zeros.

    Returns:
        ``[B, Nk]`` float32.
    """
    a = _heads_mean(attn)
    if query_mask is None:
        return a.mean(dim=1)
    query_mask = check_tensor("query_mask", query_mask, 2)
    if query_mask.dtype != torch.bool:
        raise TypeError(f"query_mask must be a bool tensor, got {query_mask.dtype}")
    if tuple(query_mask.shape) != tuple(a.shape[:2]):
        raise ValueError(
            f"query_mask must be [B, Nq] = {tuple(a.shape[:2])}, got {tuple(query_mask.shape)}"
        )
    w = query_mask.float()
    return (a * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def attention_received_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    *,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Mean attention each key receives, from the queries and keys of a
    bidirectional attention layer, never holding the ``[B, H, Nq, Nk]`` map whole.

    Computed as an eager layer in ``q``'s dtype computes ``output_attentions``
    (logits ``q k^T * scale`` in that dtype, softmax in float32, probabilities
    cast back), then averaged over heads and over queries with each mean
    rounded to ``q``'s dtype, as ``attn.mean(1).mean(1)`` on those weights
    (HoliTom / VisionZip read SigLIP's attention so). Exact in float32; in
    bf16 the same rounding steps, so ties and top-k agree.

    Args:
        q: ``[B, H, Nq, hd]`` queries (rotary already applied).
        k: ``[B, Hkv, Nk, hd]`` keys, ``H`` a multiple of ``Hkv`` (grouped heads).
        scale: logit scale (default ``hd ** -0.5``).
        query_chunk: queries per block (memory ``[B, H, query_chunk, Nk]``).

    Returns:
        ``[B, Nk]`` float32 (values representable in ``q``'s dtype).
    """
    q = check_tensor("q", q, 4, floating=True)
    k = check_tensor("k", k, 4, floating=True)
    b, h, nq, hd = q.shape
    if k.shape[0] != b or k.shape[-1] != hd or h % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B and hd, "
            "with H a multiple of Hkv"
        )
    check_count("query_chunk", query_chunk, low=1)
    scale = hd**-0.5 if scale is None else float(scale)
    hkv, nk = k.shape[1], k.shape[2]
    kk = k.to(q.dtype)[:, :, None]  # [B, Hkv, 1, Nk, hd]: query heads grouped per key head
    total = torch.zeros(b, nk, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for i in range(0, nq, query_chunk):
            qi = q[:, :, i : i + query_chunk].reshape(b, hkv, h // hkv, -1, hd)
            logits = torch.matmul(qi, kk.transpose(-1, -2)) * scale  # in q's dtype, as eager
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
            heads = probs.reshape(b, h, -1, nk).float().mean(dim=1).to(q.dtype)
            total += heads.float().sum(dim=1)
    return (total / nq).to(q.dtype).float()


def cls_attention(attn: torch.Tensor, cls_index: int = 0) -> torch.Tensor:
    """Attention row of one query (the CLS token), averaged over heads.

    Args:
        attn: ``[B, H, Nq, Nk]`` or ``[B, Nq, Nk]``.
        cls_index: which query row (negative counts from the end, e.g. -1
            for "last prompt token").

    Returns:
        ``[B, Nk]`` float32 (the CLS column itself included; slice it off
        if only patch tokens are scored).
    """
    a = _heads_mean(attn)
    nq = a.shape[1]
    if isinstance(cls_index, bool) or not isinstance(cls_index, int):
        raise TypeError(f"cls_index must be an int, got {type(cls_index).__name__}")
    if not -nq <= cls_index < nq:
        raise ValueError(f"cls_index must be in [{-nq}, {nq}), got {cls_index}")
    return a[:, cls_index]


def l2_norm_score(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2 norm of each token: ``x [B, N, D] -> [B, N]`` float32."""
    x = check_tensor("x", x, floating=True)
    check_count("x.ndim", x.ndim, low=1)
    return torch.linalg.vector_norm(x.float(), dim=dim)
