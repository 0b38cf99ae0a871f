"""Decoder engine: apply a token plan (prune / fold) inside a Hugging Face decoder.

Usage::

    from common.engine import FastV, PDrop, apply_plan, attention_rows

    # spans detected from the config's image/video token id (VLMs) ...
    with FastV(layer=2, keep_ratio=0.25).apply(vlm):
        out = vlm.generate(**inputs, max_new_tokens=32)
    # ... or declared: (start, end) pairs for every sample, or one list per sample
    handle = PDrop(layers=(8, 16, 24), ratios=(0.5, 0.5, 0.5)).apply(llm, spans=[(35, 611)])
    llm.generate(input_ids, attention_mask=mask)
    handle.last_plan["keep_idx"]   # {layer: [B, L_l] original indices kept}
    handle.remove()

A new method is a :class:`TokenPlan`: ``layers``, ``keep(stage, span_len)``,
``score(layer_idx, hidden_states, layer_module, ctx) -> [B, span_len]`` and
optionally ``fold(hidden_states, ctx, keep_pos, drop_pos)``; pass it to
:func:`apply_plan`. See :mod:`common.engine.core` for the mechanism and its
guarantees.
"""

from common.engine.attention import attention_rows
from common.engine.core import (
    EngineHandle,
    PlanContext,
    TokenPlan,
    apply_plan,
    find_decoder_layers,
    span_mask,
    spans_from_token_id,
)
from common.engine.fastv import FastV
from common.engine.pdrop import PDrop

__all__ = [
    "EngineHandle",
    "FastV",
    "PDrop",
    "PlanContext",
    "TokenPlan",
    "apply_plan",
    "attention_rows",
    "find_decoder_layers",
    "span_mask",
    "spans_from_token_id",
]
