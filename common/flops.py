"""Analytic prefill FLOPs of a decoder, and a measured count to check it.

The analytic formula is the one FastV / HoliTom report, per layer with ``n``
tokens, hidden size ``d``, MLP size ``m``::

    4 n d^2 + 2 n^2 d + 2 n d m

- ``4 n d^2``: the q, k, v and o projections (with grouped-query attention
  and key/value width ``kv_dim``: ``2 n d^2 + 2 n d kv_dim``);
- ``2 n^2 d``: ``Q K^T`` and ``A V`` over the full (non-causal) square;
- ``2 n d m``: a two-matrix MLP (``mlp="standard"``); the SwiGLU MLP of
  Qwen2 / LLaMA has three matrices, ``3 n d m`` (``mlp="swiglu"``).

Each term counts one multiply-add as ONE operation (MACs). The paper numbers
(HoliTom: LLaVA-OV-7B, n=6272 visual tokens, 40.8T) use this convention
with the standard MLP term. Not counted: norms, rotary, softmax, residual
adds, biases, the embedding and the LM head.

``torch.utils.flop_counter.FlopCounterMode`` counts a multiply-add as TWO
FLOPs (``2 * M * N * K`` per matmul) and only counts matmul-like ops, so for
a real ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` decoder stack with eager
attention its count equals ``decoder_prefill_flops(..., mlp="swiglu",
kv_dim=..., multiply_add=2)`` exactly (checked in ``tests/common/test_flops.py``).
With SDPA on CPU, FlopCounterMode (torch 2.13) has no formula for
``_scaled_dot_product_flash_attention_for_cpu`` and misses the ``2 n^2 d``
term; count with ``attn_implementation="eager"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from common.checks import check_count

__all__ = ["decoder_layer_flops", "decoder_prefill_flops", "count_flops"]


def decoder_layer_flops(
    n: int,
    hidden_size: int,
    intermediate_size: int,
    *,
    mlp: str = "standard",
    kv_dim: int | None = None,
    multiply_add: int = 1,
) -> int:
    """FLOPs of one decoder layer on ``n`` tokens (see the module docstring)."""
    check_count("n", n)
    d = check_count("hidden_size", hidden_size, low=1)
    m = check_count("intermediate_size", intermediate_size, low=1)
    kv = d if kv_dim is None else check_count("kv_dim", kv_dim, low=1)
    if mlp not in ("standard", "swiglu"):
        raise ValueError(f"mlp must be 'standard' or 'swiglu', got {mlp!r}")
    if multiply_add not in (1, 2):
        raise ValueError(f"multiply_add must be 1 or 2, got {multiply_add!r}")
    proj = 2 * n * d * d + 2 * n * d * kv
    attn = 2 * n * n * d
    ffn = (2 if mlp == "standard" else 3) * n * d * m
    return multiply_add * (proj + attn + ffn)


def decoder_prefill_flops(
    tokens: int | Sequence[int],
    hidden_size: int,
    intermediate_size: int,
    num_layers: int | None = None,
    *,
    mlp: str = "standard",
    kv_dim: int | None = None,
    multiply_add: int = 1,
) -> int:
    """Prefill FLOPs of a decoder stack.

    Args:
        tokens: tokens every layer sees (int, with ``num_layers``), or one
            count per layer (a pruned model: e.g. ``[n] * K + [n_kept] * (L - K)``).
        hidden_size: ``d``; intermediate_size: ``m``.
        num_layers: ``L`` (required with an int ``tokens``; must match a list).
        mlp: ``"standard"`` (``2ndm``, the paper formula) or ``"swiglu"`` (``3ndm``).
        kv_dim: key/value width ``num_key_value_heads * head_dim`` (GQA);
            default ``d``.
        multiply_add: 1 (MACs, the paper convention) or 2 (FlopCounterMode).

    Returns:
        Total as a Python int.
    """
    if isinstance(tokens, (bool, str, bytes)):
        raise TypeError(f"tokens must be an int or a sequence of ints, got {tokens!r}")
    if isinstance(tokens, int):
        if num_layers is None:
            raise ValueError("num_layers is required when tokens is an int")
        check_count("num_layers", num_layers, low=1)
        per_layer = [tokens] * num_layers
    elif isinstance(tokens, Sequence) or isinstance(tokens, torch.Tensor):
        per_layer = [int(t) for t in tokens]
        if num_layers is not None and num_layers != len(per_layer):
            raise ValueError(
                f"num_layers ({num_layers}) does not match len(tokens) ({len(per_layer)})"
            )
    else:
        raise TypeError(f"tokens must be an int or a sequence of ints, got {type(tokens).__name__}")
    return sum(
        decoder_layer_flops(
            n,
            hidden_size,
            intermediate_size,
            mlp=mlp,
            kv_dim=kv_dim,
            multiply_add=multiply_add,
        )
        for n in per_layer
    )


def count_flops(fn: Callable[..., object], *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` counted by ``FlopCounterMode`` (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
