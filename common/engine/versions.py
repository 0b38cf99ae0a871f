"""What each transformers version hands a decoder layer: the one place that knows.

The engine works through forward pre-hooks on the decoder layers, so it sees
exactly the arguments the model loop passes. Those differ by version:

=============  ==================  =========================  ==================  ===============
transformers   cache argument      rotary                     mask to the layer   cache_position
=============  ==================  =========================  ==================  ===============
4.37 - 4.44    ``past_key_value``  inside the attention:      4D additive float   no (4.37),
                                   ``rotary_emb(v, seq_len=   (eager; SDPA:       yes (4.38+)
                                   kv_len)`` then indexed by  ``None`` without
                                   ``position_ids``           padding); 2D (FA2)
4.45 - 4.55    ``past_key_value``  outside: the model passes  same                yes
                                   ``position_embeddings``
                                   ``(cos, sin)``; M-RoPE as
                                   ``[3, B, L, hd]``
4.56 - 4.57    ``past_key_values`` outside                    4D bool (SDPA) /    yes
                                                              float (eager), or
                                                              ``None``
5.x            ``cache``           outside, M-RoPE merged     same                no
                                   to ``[B, L, hd]``
=============  ==================  =========================  ==================  ===============

Checked on 4.37.2, 4.45.2, 4.49.0, 4.57.6 and 5.24; the release of the
``past_key_value`` -> ``past_key_values`` rename inside 4.5x was not pinned
down, which does not matter: :func:`layer_cache` looks up all three names.
Everywhere: ``hidden_states`` is positional, masks and the decode position are
derived from layer 0's cache length (so layer 0 is never pruned), and a
``DynamicCache`` holds one length per layer.

Only 4.37's in-attention rotary needs more than slicing: it builds a table of
``kv_len`` rows (the *kept* length) and indexes it with the position ids, so
kept tokens that keep their original (larger) positions would index past its
end. :func:`inner_rotary` finds that module; the engine then asks it, through
a pre-hook on the rotary module, for a table long enough for the largest
position of the call (a hook, not a patched forward).

Supported: transformers ``>=4.37.2,<6`` (checked: 4.37.2, 4.49.0 and 5.x by
``make test-compat`` / ``make test``); per model family from the version
that has the class the engine was tested with (:data:`MODEL_MIN_VERSION`).
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CACHE_ARGUMENTS",
    "MAX_VERSION",
    "MIN_VERSION",
    "MODEL_MIN_VERSION",
    "SUPPORTED_RANGE",
    "attn_implementation",
    "check_supported",
    "inner_rotary",
    "is_static_cache",
    "layer_cache",
    "rotary_embeddings",
    "sliding_window_layer",
    "transformers_version",
    "uses_mrope",
]

logger = logging.getLogger(__name__)

MIN_VERSION = (4, 37, 2)
MAX_VERSION = (6, 0, 0)  # exclusive
SUPPORTED_RANGE = ">=4.37.2,<6"
# model_type -> first transformers version whose class the engine supports
MODEL_MIN_VERSION: dict[str, tuple[int, int, int]] = {
    "llama": (4, 37, 2),
    "qwen2": (4, 37, 2),
    "qwen2_vl": (4, 45, 0),
    "qwen2_5_vl": (4, 49, 0),
    "llava_onevision": (4, 45, 0),
}
# how the cache reaches a layer, newest name first
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _parse(version: str) -> tuple[int, int, int]:
    nums = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple((nums + [0, 0, 0])[:3])  # type: ignore[return-value]


def transformers_version() -> tuple[int, int, int] | None:
    """The installed transformers version as ``(major, minor, patch)``, ``None`` if absent."""
    try:
        import transformers
    except ImportError:
        return None
    return _parse(transformers.__version__)


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(str(x) for x in v)


def check_supported(model: nn.Module, decoder: nn.Module | None = None) -> None:
    """Raise ``RuntimeError`` when the installed transformers cannot run the engine on ``model``.

    The message names the installed version and the supported range.
    """
    version = transformers_version()
    if version is None:
        return  # a hand-built decoder without transformers: nothing version-specific to check
    import transformers

    installed = transformers.__version__
    if not MIN_VERSION <= version < MAX_VERSION:
        raise RuntimeError(
            f"the decoder engine supports transformers {SUPPORTED_RANGE}; installed: {installed}"
        )
    for mod in (model, decoder):
        model_type = getattr(getattr(mod, "config", None), "model_type", None)
        need = MODEL_MIN_VERSION.get(str(model_type))
        if need is not None and version < need:
            raise RuntimeError(
                f"the decoder engine supports {model_type} with transformers >={_fmt(need)},<6; "
                f"installed: {installed}"
            )


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder layer received (``None`` without one), whatever its name."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_length(cache: Any, layer_idx: int) -> int:
    """Tokens held by ``cache`` for ``layer_idx`` (0 without a cache or before the first update)."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer_idx))
    except (TypeError, AttributeError, IndexError):
        return 0


def is_static_cache(cache: Any) -> bool:
    """A cache with one preallocated length for every layer (static, hybrid, sliding-window)."""
    if cache is None:
        return False
    if getattr(cache, "is_compileable", False):
        return True
    name = type(cache).__name__
    return any(k in name for k in ("Static", "Hybrid", "SlidingWindow"))


def sliding_window_layer(decoder: nn.Module, layer: nn.Module, idx: int) -> bool:
    """Whether layer ``idx`` attends through a sliding window.

    5.x marks it on the attention (``sliding_window``) and in
    ``config.layer_types``; before, Qwen2's config switch ``use_sliding_window``
    applies the window in the mask (4.37: to every layer), so it counts for all.
    """
    if getattr(getattr(layer, "self_attn", None), "sliding_window", None) is not None:
        return True
    cfg = getattr(decoder, "config", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and idx < len(types):
        return types[idx] == "sliding_attention"
    return bool(getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None))


def attn_implementation(decoder: nn.Module) -> str:
    """``"eager"``, ``"sdpa"``, ``"flash_attention_2"``... as the decoder's config says."""
    cfg = getattr(decoder, "config", None)
    impl = getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None)
    return str(impl or "eager")


def uses_mrope(decoder: nn.Module, model: nn.Module | None = None) -> bool:
    """Whether the decoder uses multimodal rotary positions (Qwen2-VL's ``[3, B, L]``)."""
    for mod in (decoder, model):
        cfg = getattr(mod, "config", None)
        for c in (cfg, getattr(cfg, "text_config", None)):
            for name in ("rope_parameters", "rope_scaling"):
                params = getattr(c, name, None)
                if isinstance(params, dict) and params.get("mrope_section") is not None:
                    return True
    return False


def inner_rotary(layer: nn.Module) -> nn.Module | None:
    """The attention's own rotary module when it is called as ``rotary_emb(x, seq_len=...)``.

    That is transformers < 4.45 (the table is built inside the attention from
    the kept length); ``None`` when the model passes ``position_embeddings``.
    """
    rotary = getattr(getattr(layer, "self_attn", None), "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        return None
    try:
        params = inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        return None
    return rotary if "seq_len" in params else None


@torch.no_grad()
def rotary_embeddings(
    decoder: nn.Module, layer: nn.Module, hidden_states: Tensor, position_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[B, L, hd]`` (M-RoPE: as the model computes them) for ``position_ids``.

    Uses the decoder's rotary module (transformers >= 4.45) or, on older
    versions, the attention's own table indexed by the position ids.
    """
    outer = getattr(decoder, "rotary_emb", None)
    if isinstance(outer, nn.Module) and inner_rotary(layer) is None:
        return outer(hidden_states, position_ids)
    inner = inner_rotary(layer)
    if inner is None:
        raise TypeError(f"no rotary embedding found for {type(layer).__name__}")
    cos, sin = inner(hidden_states, seq_len=int(position_ids.max()) + 1)
    if cos.ndim == 4:  # [1, 1, L, hd] in some older releases
        cos, sin = cos[0, 0], sin[0, 0]
    return cos[position_ids], sin[position_ids]
