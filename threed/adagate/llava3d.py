"""Find LLaVA-3D's spatial span by wrapping ``prepare_inputs_labels_for_multimodal``.

LLaVA-3D (ZCMax/LLaVA-3D, ``llava/model/llava_arch.py``) builds the decoder
input in ``prepare_inputs_labels_for_multimodal``: per sample it drops the
padding, replaces the single ``<image>`` placeholder (id ``-200``) with the
scene's spatial tokens (1.2k-2.6k, a different count per scene) and each
``<boxes>`` click placeholder (id ``-300``) with one click token, then pads
the batch again (right by default, left when
``config.tokenizer_padding_side == "left"``) and returns ``inputs_embeds``;
``generate`` then calls the language model with ``inputs_embeds``.

:class:`SpanRecorder` wraps that method on one *instance* (an instance
attribute shadows the class method; other instances and the class are
untouched) and, after each call that built embeddings, reports where every
sample's spatial span ended up in the padded sequence. Clicks are never part
of a span.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "LOC_TOKEN_INDEX",
    "SpanRecorder",
    "has_llava3d_inputs",
    "llava3d_spans",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # LLaVA's <image> placeholder
LOC_TOKEN_INDEX = -300  # LLaVA-3D's <boxes> / click placeholder

_METHOD = "prepare_inputs_labels_for_multimodal"

Spans = list[list[tuple[int, int]]]


def has_llava3d_inputs(model: nn.Module) -> bool:
    """Whether ``model`` builds its inputs with LLaVA's ``prepare_inputs_labels_for_multimodal``."""
    return callable(getattr(model, _METHOD, None))


def llava3d_spans(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    out_attention_mask: Tensor | None,
    out_length: int,
    *,
    image_token_index: int = IMAGE_TOKEN_INDEX,
) -> Spans:
    """Per-sample spatial span ``[(start, end)]`` in the sequence LLaVA-3D built.

    Args:
        input_ids: ``[B, L_in]`` ids given to ``prepare_inputs_labels_for_multimodal``
            (with the ``<image>`` / click placeholders).
        attention_mask: ``[B, L_in]`` its input mask (``None``: no padding).
        out_attention_mask: ``[B, L]`` the mask it returned (``None`` when it
            was given none: then no sample is padded).
        out_length: ``L``, the length of the returned ``inputs_embeds``.
        image_token_index: the placeholder id (LLaVA: -200).

    Returns:
        one list per sample: ``[]`` without an ``<image>``, else one half-open span.
    """
    b = input_ids.shape[0]
    out: Spans = []
    for i in range(b):
        ids = input_ids[i]
        if attention_mask is not None:
            ids = ids[attention_mask[i].bool()]
        where = (ids == image_token_index).nonzero().flatten().tolist()
        if not where:
            out.append([])
            continue
        if len(where) > 1:
            raise ValueError(
                f"sample {i} has {len(where)} <image> placeholders; the LLaVA-3D span finder "
                "handles one scene per sample: pass spatial_spans=... explicitly"
            )
        if out_attention_mask is not None:
            real = out_attention_mask[i].bool().nonzero().flatten()
            cur_len = int(real.numel())
            offset = int(real[0]) if cur_len else 0
        else:
            cur_len, offset = out_length, 0
        # every other placeholder (clicks) became exactly one token, text tokens stay
        n_spatial = cur_len - (int(ids.numel()) - 1)
        if n_spatial <= 0:
            raise ValueError(
                f"sample {i}: the built sequence ({cur_len} tokens) leaves no room for a spatial "
                "span (truncated by tokenizer_model_max_length?); pass spatial_spans=... explicitly"
            )
        start = offset + where[0]
        out.append([(start, start + n_spatial)])
    return out


class SpanRecorder:
    """Wraps ``model.prepare_inputs_labels_for_multimodal`` on this instance only.

    After each call that returned ``inputs_embeds`` the per-sample spans are
    stored in :attr:`spans` and passed to ``on_spans``. ``remove()`` puts the
    instance back exactly (the class method shows through again, or the
    instance attribute that was there before is restored).
    """

    def __init__(
        self,
        model: nn.Module,
        on_spans: Callable[[Spans], None] | None = None,
        *,
        image_token_index: int = IMAGE_TOKEN_INDEX,
    ) -> None:
        if not has_llava3d_inputs(model):
            raise TypeError(f"{type(model).__name__} has no {_METHOD}")
        self.model = model
        self.on_spans = on_spans
        self.image_token_index = image_token_index
        self.spans: Spans | None = None
        self._had_instance_attr = _METHOD in model.__dict__
        self._previous = model.__dict__.get(_METHOD)
        original = getattr(model, _METHOD)

        def wrapped(input_ids, position_ids, attention_mask, *args, **kwargs):
            result = original(input_ids, position_ids, attention_mask, *args, **kwargs)
            self._record(input_ids, attention_mask, result)
            return result

        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
        object.__setattr__(model, _METHOD, wrapped)  # nn.Module: a plain instance attribute
        self._wrapped = wrapped
        self.active = True

    def _record(self, input_ids: Any, attention_mask: Any, result: Any) -> None:
        try:
            embeds = result[4]
            out_mask = result[2]
        except (TypeError, IndexError):
            return
        if not isinstance(embeds, Tensor) or not isinstance(input_ids, Tensor):
            return  # nothing built (decoding step, no images): keep the prefill's spans
        spans = llava3d_spans(
            input_ids,
            attention_mask if isinstance(attention_mask, Tensor) else None,
            out_mask if isinstance(out_mask, Tensor) else None,
            int(embeds.shape[1]),
            image_token_index=self.image_token_index,
        )
        self.spans = spans
        logger.debug("LLaVA-3D spatial spans: %s", spans)
        if self.on_spans is not None:
            self.on_spans(spans)

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.model.__dict__.get(_METHOD) is self._wrapped:
            if self._had_instance_attr:
                object.__setattr__(self.model, _METHOD, self._previous)
            else:
                del self.model.__dict__[_METHOD]


def prepare_llava3d(model: nn.Module, sample: dict[str, Any]) -> tuple[dict[str, Any], Spans]:
    """Run LLaVA-3D's input builder on a raw sample: ``(forward kwargs, spans)``.

    ``sample`` holds what ``generate`` takes (``input_ids`` with placeholders,
    optional ``attention_mask``, ``images``, ``depths``, ``poses``,
    ``intrinsics``, ``lengths``, ``clicks``, ``image_sizes``).
    """
    input_ids = sample["input_ids"]
    attention_mask = sample.get("attention_mask")
    rec = SpanRecorder(model)
    try:
        result = getattr(model, _METHOD)(
            input_ids,
            sample.get("position_ids"),
            attention_mask,
            None,
            None,
            sample.get("images"),
            sample.get("depths"),
            sample.get("poses"),
            sample.get("intrinsics"),
            sample.get("lengths"),
            sample.get("clicks"),
            image_sizes=sample.get("image_sizes"),
        )
    finally:
        rec.remove()
    if rec.spans is None:
        raise ValueError("the sample built no inputs_embeds (no images?): nothing to calibrate on")
    kwargs: dict[str, Any] = {"inputs_embeds": result[4]}
    if isinstance(result[2], Tensor):
        kwargs["attention_mask"] = result[2]
    if isinstance(result[1], Tensor):
        kwargs["position_ids"] = result[1]
    return kwargs, rec.spans


def spans_to_mask(spans: Spans, batch: int, length: int, device: Any = None) -> Tensor:
    """``[B, L]`` bool mask from per-sample spans (no engine import needed)."""
    m = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for i, sample in enumerate(spans):
        for s, e in sample:
            m[i, s:e] = True
    return m
