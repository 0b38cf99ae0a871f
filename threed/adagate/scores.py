"""AdaGate's scoring and counting rules, as plain tensor functions.

Kept apart from the engine glue so both the faithful and the default paths
are testable on their own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.engine.attention import apply_llama_rotary

__all__ = ["faithful_last_row_scores", "adaptive_counts", "smooth_scores"]


@torch.no_grad()
def faithful_last_row_scores(
    layer: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    span_pos: Tensor,
    key_padding: Tensor | None = None,
) -> Tensor:
    """``[B, S]`` span scores exactly as the AdaToken-3D author code computes them.

    ``modeling_llama_pdrop.py`` (``pdrop_rank_drop``): layer K's
    ``input_layernorm`` -> ``q_proj`` / ``k_proj`` in the model dtype ->
    rotary -> ``q k^T / sqrt(head_dim) + 1`` in the model dtype (the ``+ 1`` is the
    author code's causal mask added as a bool tensor) -> softmax in
    float32, cast back to the model dtype -> mean over heads (model dtype)
    for the last instruction token's row only, restricted to the span.

    Args:
        layer: decoder layer K (input norm, ``self_attn.q_proj`` / ``k_proj``).
        hidden_states: ``[B, L, D]`` output of layer K-1 (current sequence).
        position_embeddings: ``(cos, sin)`` ``[B or 1, L, hd]`` for the current
            sequence (faithful mode: the re-indexed contiguous positions).
        span_pos: ``[B, S]`` current positions of the alive span tokens.
        key_padding: ``[B, L]`` bool, True for real tokens (left padding;
            the author code has no padding).

    The author code broadcasts ``q k^T`` without repeating key heads, so it
    only runs on models without grouped-query attention; here key heads are
    repeated (identical to the author code where it runs).
    """
    attn = layer.self_attn
    b, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    head_dim = int(attn.head_dim)
    x = layer.input_layernorm(hidden_states)
    # q over the whole sequence, then the last row: a one-row product rounds differently
    # in half precision, and the author code projects every row
    q = attn.q_proj(x)[:, -1:].view(b, 1, -1, head_dim).transpose(1, 2)  # [B, H, 1, hd]
    k = attn.k_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        q = _rope(q, cos[:, -1:], sin[:, -1:])
        k = _rope(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
    logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # [B, H, 1, L] model dtype
    # The author code adds its causal mask after turning it into a bool tensor (True = may
    # attend), i.e. +1 on every visible key: a shift in float32, but in bf16 / fp16 it rounds
    # the logits to the coarser grid around 1 (bf16: steps of 2^-7), which changes rankings.
    logits = logits + torch.ones((), dtype=dtype, device=logits.device)
    if key_padding is not None and not bool(key_padding.all()):
        # padding does not exist in the author code: hide padded keys properly
        logits = logits.masked_fill(~key_padding[:, None, None, :], torch.finfo(dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)
    row = probs.mean(dim=1)[:, 0]  # [B, L], mean in the model dtype as the author code
    return row.gather(1, span_pos)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # rotary in x's dtype, as the author code casts cos / sin before applying it
    return apply_llama_rotary(x, cos.to(x.dtype), sin.to(x.dtype))


def smooth_scores(current: Tensor, previous: Tensor | None) -> Tensor:
    """Average of this gate's and the previous gate's scores, each normalised to sum 1.

    ``current`` / ``previous``: ``[B, S]`` scores of the same alive tokens.
    """
    cur = current.float()
    cur = cur / cur.sum(1, keepdim=True).clamp(min=1e-12)
    if previous is None:
        return cur
    prev = previous.float()
    prev = prev / prev.sum(1, keepdim=True).clamp(min=1e-12)
    return 0.5 * (cur + prev)


def adaptive_counts(
    scores: Tensor,
    mass: float,
    low: Tensor,
    high: Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """``[B]`` per-sample count: the fewest top tokens holding ``mass`` of the span's score mass.

    Args:
        scores: ``[B, S]`` non-negative scores (attention received).
        mass: target share in (0, 1].
        low / high: ``[B]`` bounds on the count (min / max keep of the
            original span, and at most the alive tokens).
        valid: ``[B, S]`` bool, False for padding slots (per-sample spans of
            different lengths); they carry no mass and are never counted.
    """
    s = scores.float().clamp(min=0)
    if valid is not None:
        s = s.masked_fill(~valid, 0.0)
    total = s.sum(1, keepdim=True)
    share = torch.where(total > 0, s / total.clamp(min=1e-30), torch.zeros_like(s))
    ordered = share.sort(dim=1, descending=True).values
    csum = ordered.cumsum(1)
    # fewest tokens whose cumulative share reaches the target (float slack for mass = 1)
    need = (csum < mass - 1e-6).sum(1) + 1
    n_valid = valid.sum(1) if valid is not None else torch.full_like(need, s.shape[1])
    need = torch.minimum(need, n_valid)
    return torch.maximum(torch.minimum(need, high.to(need)), low.to(need))
