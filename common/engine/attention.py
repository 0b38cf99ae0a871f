"""Recompute a few attention rows of a decoder layer without asking the model.

Methods such as FastV, PDrop and HoliTom's inner merge score visual tokens by
the attention a chosen query (usually the last prompt token) pays them.
Requesting attention weights from the model (``output_attentions=True``)
forces eager attention and stores ``L x L`` matrices for every layer. Instead
:func:`attention_rows` recomputes only the rows that are needed from the
layer's own modules:

    input norm -> q_proj / k_proj (-> q_norm / k_norm) -> rotary -> q k^T * scale
    -> causal (+ padding) mask -> softmax -> mean over heads

GQA is handled by grouping query heads over their shared key head (no
repeated keys are materialised). Cost: ``O(L d d_kv + Nq L d)`` instead of a
full attention pass, and SDPA / FlashAttention keep working for the model's
own forward.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.checks import check_tensor

__all__ = [
    "apply_llama_rotary",
    "attention_rows",
    "normalize_query_index",
    "rotate_half",
]

logger = logging.getLogger(__name__)


def rotate_half(x: Tensor) -> Tensor:
    """``[..., hd]`` -> ``(-x2, x1)`` of its two halves (Llama-style rotary helper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_llama_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-style rotary on ``x [B, H, n, hd]`` with ``cos, sin [B, n, hd]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _mrope_section(attn: nn.Module) -> list[int] | None:
    cfg = getattr(attn, "config", None)
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, name, None)
        if isinstance(params, dict) and params.get("mrope_section") is not None:
            return list(params["mrope_section"])
    return getattr(attn, "mrope_section", None)


def _merge_mrope(cos: Tensor, section: list[int]) -> Tensor:
    """Older Qwen2-VL layout ``[3, B, L, hd]`` -> ``[B, L, hd]`` (t/h/w sections)."""
    chunks = cos.split(list(section) * 2, dim=-1)
    return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)


def _apply_rotary(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, n, hd]`` with the attention module's own rotary function.

    Uses ``apply_rotary_pos_emb`` from the module that defines the attention
    class (so partial-rotary or interleaved variants are honoured); falls back
    to the Llama formula.
    """
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        try:
            return fn(x, x, cos, sin)[0]
        except TypeError:  # unusual signature: use the standard formula
            logger.debug("apply_rotary_pos_emb of %s has an unusual signature", type(attn))
    return apply_llama_rotary(x, cos, sin)


def normalize_query_index(
    query_idx: int | Sequence[int] | Tensor, batch: int, length: int
) -> Tensor:
    """Query positions as a ``[B, Nq]`` long tensor in ``[0, length)``.

    Negative positions count from the end.
    """
    if isinstance(query_idx, Tensor):
        q = query_idx.to(torch.long)
    elif isinstance(query_idx, int) and not isinstance(query_idx, bool):
        q = torch.tensor([query_idx], dtype=torch.long)
    else:
        q = torch.as_tensor(list(query_idx), dtype=torch.long)
    if q.ndim == 0:
        q = q[None]
    q = torch.where(q < 0, q + length, q)
    if q.numel() == 0 or bool(((q < 0) | (q >= length)).any()):
        raise ValueError(
            f"query_idx must index positions in [-{length}, {length}), got {query_idx}"
        )
    if q.ndim == 1:
        q = q[None].expand(batch, -1)
    if q.ndim != 2 or q.shape[0] != batch:
        raise ValueError(f"query_idx must be an int, [Nq] or [B, Nq]; got shape {tuple(q.shape)}")
    return q


def _gather_seq(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, L, *]`` gathered at ``idx [B, n]`` along dim 1."""
    shape = (*idx.shape, *x.shape[2:])
    return x.gather(1, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(shape))


@torch.no_grad()
def attention_rows(
    layer: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    query_idx: int | Sequence[int] | Tensor = -1,
    attention_mask: Tensor | None = None,
    *,
    normed: bool = False,
) -> Tensor:
    """Head-averaged causal attention of chosen queries against all keys.

    Args:
        layer: a Hugging Face decoder layer with ``input_layernorm`` and
            ``self_attn`` (``q_proj``, ``k_proj``, optional ``q_norm`` /
            ``k_norm``, ``head_dim``, ``scaling``).
        hidden_states: ``[B, L, D]`` input of ``layer`` (before its norm).
        position_embeddings: ``(cos, sin)``, each ``[B or 1, L, hd]`` (or the
            older M-RoPE layout ``[3, B, L, hd]``), exactly what the model
            passes to the layer; ``None`` for models without rotary.
        query_idx: query positions: an int, ``[Nq]`` or ``[B, Nq]``;
            negatives count from the end (default ``-1``: the last token).
        attention_mask: what the model passes to the layer: ``None`` (plain
            causal), a 4D ``[B, 1, L, L]`` bool (True = attend) or additive
            float mask, or a 2D ``[B, L]`` key padding mask (1 = real token).
        normed: ``hidden_states`` already went through ``input_layernorm``.

    Returns:
        ``[B, Nq, L]`` float32 attention probabilities averaged over heads;
        each row sums to 1 over the keys the query may attend to.
    """
    check_tensor("hidden_states", hidden_states, 3, floating=True)
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
        raise TypeError("layer must have self_attn.q_proj and self_attn.k_proj")
    b, length, _ = hidden_states.shape
    q_pos = normalize_query_index(query_idx, b, length).to(hidden_states.device)
    nq = q_pos.shape[1]

    x = hidden_states if normed else layer.input_layernorm(hidden_states)
    head_dim = int(getattr(attn, "head_dim", 0) or 0)
    if head_dim <= 0:
        raise TypeError("layer.self_attn must define head_dim")
    q = attn.q_proj(_gather_seq(x, q_pos)).view(b, nq, -1, head_dim)
    k = attn.k_proj(x).view(b, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, Nq, hd], [B, Hkv, L, hd]

    if position_embeddings is not None:
        cos, sin = position_embeddings
        if cos.ndim == 4:  # older M-RoPE layout [3, B, L, hd]
            section = _mrope_section(attn)
            if section is None:
                raise ValueError("4-D position_embeddings need an mrope_section in the config")
            cos, sin = _merge_mrope(cos, section), _merge_mrope(sin, section)
        cos = cos.expand(b, -1, -1)
        sin = sin.expand(b, -1, -1)
        q = _apply_rotary(attn, q, _gather_seq(cos, q_pos), _gather_seq(sin, q_pos))
        k = _apply_rotary(attn, k, cos, sin)

    num_heads, num_kv = q.shape[1], k.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"query heads ({num_heads}) not a multiple of key heads ({num_kv})")
    scale = float(getattr(attn, "scaling", head_dim**-0.5))
    qf = q.float().view(b, num_kv, num_heads // num_kv, nq, head_dim)
    logits = torch.einsum("bkgqd,bkld->bkgql", qf, k.float()) * scale
    logits = logits.reshape(b, num_heads, nq, length)

    keys = torch.arange(length, device=logits.device)
    allowed = keys[None, None, :] <= q_pos[:, :, None]  # [B, Nq, L] causal
    if attention_mask is not None:
        # transformers 4.4x may build one key column more than the sequence (no 2D mask given)
        attention_mask = attention_mask[..., :length]
        if attention_mask.ndim == 4:
            rows = attention_mask.expand(b, -1, length, -1)[:, 0]  # [B, L, L]
            rows = _gather_seq(rows, q_pos)  # [B, Nq, L]
            if rows.dtype == torch.bool:
                allowed = allowed & rows
            else:
                logits = logits + rows.float()[:, None]
                allowed = allowed & (rows > torch.finfo(rows.dtype).min / 2)
        elif attention_mask.ndim == 2:
            allowed = allowed & attention_mask.bool()[:, None, :]
        else:
            raise ValueError(
                f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}"
            )
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=1)
