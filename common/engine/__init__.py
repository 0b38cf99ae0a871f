"""Decoder engine: apply a token plan (prune / fold) inside a Hugging Face decoder.

Usage::

    from common.engine import FastV, PDrop

    # spans detected from the config's image/video token id (VLMs) ...
    with FastV(layer=2, keep_ratio=0.25).apply(vlm):
        out = vlm.generate(**inputs, max_new_tokens=32)
    # ... or declared: (start, end) pairs for every sample, or one list per sample
    handle = PDrop(layers=(8, 16, 24), ratios=(0.5, 0.5, 0.5)).apply(llm, spans=[(35, 611)])
    llm.generate(input_ids, attention_mask=mask)
    handle.last_plan["keep_idx"]   # {layer: [B, L_l] original indices kept}
    handle.remove()

A new method is a :class:`TokenPlan` subclass: ``layers``, ``score(ctx)``,
and optionally ``budget`` / ``select`` / ``match`` / ``fold``; its inherited
``apply(model, spans=...)`` installs it. :mod:`common.engine.plan` has a
worked example ("how to write a plan").

Modules: :mod:`~common.engine.plan` (the plan API), :mod:`~common.engine.spans`
(which positions may be pruned), :mod:`~common.engine.versions` (what each
transformers version hands a layer), :mod:`~common.engine.runner` (the
prefill / decode state machine), :mod:`~common.engine.slicing` (masks, rotary
and positions for the kept tokens), :mod:`~common.engine.attention`
(attention rows recomputed from q/k).
"""

from common.engine.attention import attention_rows
from common.engine.fastv import FastV
from common.engine.pdrop import PDrop
from common.engine.plan import PlanContext, StageRecord, TokenPlan, topk_per_sample
from common.engine.runner import EngineHandle, apply_plan, find_decoder_layers
from common.engine.spans import SpanSpec, span_mask, spans_from_token_id
from common.engine.versions import SUPPORTED_RANGE, check_supported

__all__ = [
    "SUPPORTED_RANGE",
    "EngineHandle",
    "FastV",
    "PDrop",
    "PlanContext",
    "SpanSpec",
    "StageRecord",
    "TokenPlan",
    "apply_plan",
    "attention_rows",
    "check_supported",
    "find_decoder_layers",
    "span_mask",
    "spans_from_token_id",
    "topk_per_sample",
]
