"""Slicing what a decoder layer receives to the kept tokens, and masking padding slots.

Every function takes what the model loop hands a layer (masks, rotary
tables, position ids) for the full sequence and returns it for the kept
tokens, given per-sample keep indices ``idx [B, n]`` (original positions,
ascending). Per-sample budgets keep sequences rectangular by padding each
sample's kept set with *padding slots* (``valid [B, n]`` False): they are
masked out as keys for every query but their own (so no attention row is
ever empty and no NaN can reach a real token through a zero weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "gather_dim",
    "mask_padding_slots_decode",
    "mask_padding_slots_prefill",
    "slice_mask_decode",
    "slice_mask_prefill",
    "slice_position_ids",
    "slice_rotary",
]


def gather_dim(x: Tensor, dim: int, idx: Tensor, batch_dim: int) -> Tensor:
    """Gather ``x`` along ``dim`` with per-sample ``idx [B, n]`` (batch along ``batch_dim``)."""
    idx = idx.to(x.device)  # layers may live on different devices (device_map="auto")
    b, n = idx.shape
    shape = list(x.shape)
    shape[batch_dim] = b
    x = x.expand(shape)
    view = [1] * x.ndim
    view[batch_dim] = b
    view[dim] = n
    out_shape = list(shape)
    out_shape[dim] = n
    return x.gather(dim, idx.view(view).expand(out_shape))


def _check_mask_type(mask: Any) -> None:
    if mask is not None and not isinstance(mask, Tensor):
        raise NotImplementedError(
            f"attention mask of type {type(mask).__name__} is not supported by the engine "
            "(use attn_implementation='sdpa' or 'eager')"
        )


def slice_mask_prefill(mask: Any, idx: Tensor) -> Any:
    """A prefill mask (``None``, 2D ``[B, L]`` or 4D ``[B, 1, L, L]``) for the kept ``idx``."""
    _check_mask_type(mask)
    if mask is None:
        return None
    if mask.ndim == 4:
        m = gather_dim(mask, 2, idx, 0)
        return gather_dim(m, 3, idx, 0)
    if mask.ndim == 2:
        return gather_dim(mask, 1, idx, 0)
    raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported")


def _decode_cols(idx: Tensor, full_len: int, kv_len: int) -> Tensor:
    if kv_len < full_len:
        raise RuntimeError(
            f"decode mask covers {kv_len} keys but the pruned prefill had {full_len} tokens; "
            "the cache does not belong to the last pruned prefill"
        )
    tail = torch.arange(full_len, kv_len, device=idx.device).expand(idx.shape[0], -1)
    return torch.cat([idx, tail], dim=1)


def slice_mask_decode(mask: Any, idx: Tensor, full_len: int) -> Any:
    """Key side of a decode mask (``[B, 1, q, full_len + t]`` / ``[B, full_len + t]``).

    Keeps the columns of the kept prefill tokens ``idx [B, n]`` and every
    decoded key; the query side is untouched.
    """
    _check_mask_type(mask)
    if mask is None:
        return None
    cols = _decode_cols(idx.to(mask.device), full_len, mask.shape[-1])
    if mask.ndim == 4:
        return gather_dim(mask, 3, cols, 0)
    if mask.ndim == 2:
        return gather_dim(mask, 1, cols, 0)
    raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported")


def slice_rotary(pe: Any, idx: Tensor) -> Any:
    """``(cos, sin)`` ``[B or 1, L, hd]`` (or older M-RoPE ``[3, B, L, hd]``) at ``idx``."""
    if pe is None:
        return None
    if isinstance(pe, Tensor):
        if pe.ndim == 4:  # [3, B, L, hd] (older M-RoPE)
            return gather_dim(pe, 2, idx, 1)
        return gather_dim(pe, 1, idx, 0)  # [B, L, hd]
    if isinstance(pe, (tuple, list)):
        return type(pe)(slice_rotary(p, idx) for p in pe)
    if isinstance(pe, dict):
        return {k: slice_rotary(v, idx) for k, v in pe.items()}
    raise NotImplementedError(f"position_embeddings of type {type(pe).__name__} not supported")


def slice_position_ids(pos: Any, idx: Tensor) -> Any:
    """Position ids ``[B or 1, L]`` or M-RoPE ``[3 or 4, B, L]`` at ``idx``."""
    if pos is None or not isinstance(pos, Tensor):
        return pos
    if pos.ndim == 2:
        return gather_dim(pos, 1, idx, 0)
    if pos.ndim == 3:  # [3 or 4, B, L]
        return gather_dim(pos, 2, idx, 1)
    return pos


def _apply_allowed(mask: Tensor, allowed: Tensor) -> Tensor:
    """``mask`` (4D bool or additive float, or 2D key mask) restricted to ``allowed``."""
    if mask.dtype == torch.bool:
        return mask & allowed
    if mask.is_floating_point():
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    return mask * allowed.to(mask.dtype)  # 2D int key mask


def mask_padding_slots_prefill(
    mask: Any, valid: Tensor, *, dtype: torch.dtype, flash: bool = False
) -> Tensor:
    """A prefill mask over the kept tokens with the padding slots masked out as keys.

    Args:
        mask: the sliced mask (``None``: causal only, 2D ``[B, n]`` key mask or
            4D ``[B, 1, n, n]``).
        valid: ``[B, n]`` bool, False at padding slots.
        dtype: dtype of a mask built here (the hidden states' dtype).
        flash: the layers use FlashAttention (2D masks): build a 2D one.

    Returns:
        The same kind of mask (``None`` becomes a 4D additive float mask, or a
        2D ``[B, n]`` long key mask when ``flash``).
    """
    _check_mask_type(mask)
    b, n = valid.shape
    device = valid.device if mask is None else mask.device
    valid = valid.to(device)
    if mask is None and flash:
        return valid.long()
    if mask is not None and mask.ndim == 2:
        return _apply_allowed(mask, valid)
    eye = torch.eye(n, dtype=torch.bool, device=device)
    allowed = (valid[:, None, :] | eye)[:, None]  # [B, 1, n, n]: a slot still sees itself
    if mask is None:
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        full = torch.zeros(b, 1, n, n, dtype=dtype, device=device)
        return full.masked_fill(~(allowed & causal), torch.finfo(dtype).min)
    return _apply_allowed(mask.expand(b, -1, -1, -1), allowed)


def mask_padding_slots_decode(
    mask: Any, valid: Tensor, q_len: int, kv_len: int, *, dtype: torch.dtype, flash: bool = False
) -> Tensor:
    """A decode mask whose key columns ``[kept prefill n | decoded]`` hide the padding slots.

    Args:
        mask: the already sliced decode mask: ``None`` (causal only; one is
            built here), 2D ``[B, kv]`` or 4D ``[B, 1, q, kv]``.
        valid: ``[B, n]`` bool, False at the padding slots of the kept prefill.
        q_len: new query tokens (the last ``q_len`` keys).
        kv_len: keys in this layer's cache after the update (``n + decoded``).
        dtype: dtype of a mask built here; flash: build a 2D key mask.
    """
    _check_mask_type(mask)
    b, n = valid.shape
    device = valid.device if mask is None else mask.device
    cols = torch.cat(
        [valid.to(device), torch.ones(b, kv_len - n, dtype=torch.bool, device=device)], dim=1
    )
    if mask is None:
        if flash:
            return cols.long()
        key = torch.arange(kv_len, device=device)
        row = torch.arange(q_len, device=device) + (kv_len - q_len)
        allowed = cols[:, None, None, :] & (key[None, :] <= row[:, None])[None, None]
        full = torch.zeros(b, 1, q_len, kv_len, dtype=dtype, device=device)
        return full.masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.ndim == 2:
        return _apply_allowed(mask, cols)
    return _apply_allowed(mask.expand(b, -1, -1, -1), cols[:, None, None, :])
