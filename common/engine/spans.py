"""Which sequence positions a plan may prune: spans.

A span is a half-open ``(start, end)`` range of prompt positions (an image,
a video, a 3D scene's spatial tokens). Spans are declared per call
(``apply(model, spans=...)`` / ``handle.set_spans``) or detected from runs of
an image / video token id in ``input_ids``. Tokens outside the spans (text,
special tokens, padding) are never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["SpanSpec", "span_mask", "spans_from_token_id"]

SpanSpec = Sequence[tuple[int, int]] | Sequence[Sequence[tuple[int, int]]] | Tensor


def spans_from_token_id(
    input_ids: Tensor, token_id: int | Iterable[int]
) -> list[list[tuple[int, int]]]:
    """Contiguous runs of ``token_id`` (one id or several) in ``input_ids [B, L]``.

    Returns, per sample, a list of half-open ``(start, end)`` spans.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a [B, L] tensor")
    ids = [token_id] if isinstance(token_id, int) else list(token_id)
    hit = torch.isin(input_ids, torch.as_tensor(ids, device=input_ids.device))
    out: list[list[tuple[int, int]]] = []
    for row in hit.cpu():
        padded = torch.cat(
            [torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)]
        )
        d = padded.diff()
        starts = (d == 1).nonzero().flatten().tolist()
        ends = (d == -1).nonzero().flatten().tolist()
        out.append(list(zip(starts, ends)))
    return out


def span_mask(
    spans: SpanSpec, batch: int, length: int, device: torch.device | None = None
) -> Tensor:
    """``[B, L]`` bool mask of the declared spans.

    ``spans`` is a bool tensor ``[B, L]`` / ``[L]``, a list of half-open
    ``(start, end)`` pairs applied to every sample, or a per-sample list of
    such lists (a batch expanded by ``generate`` for beams / several return
    sequences, i.e. a multiple of the declared batch, repeats each sample's
    spans for its copies). Raises ``ValueError`` (naming ``spans``) for spans outside the
    sequence, empty / reversed spans or a batch-size mismatch.
    """
    if isinstance(spans, Tensor):
        m = spans.to(torch.bool)
        if m.ndim == 1:
            m = m[None].expand(batch, -1)
        if m.ndim == 2 and m.shape[0] and batch % m.shape[0] == 0 and m.shape[0] != batch:
            m = m.repeat_interleave(batch // m.shape[0], dim=0)  # generate's beam expansion
        if tuple(m.shape) != (batch, length):
            raise ValueError(
                f"spans mask must have shape ({batch}, {length}), got {tuple(m.shape)}"
            )
        return m.to(device)
    spans = list(spans)
    if not spans:  # nothing declared: an empty mask
        return torch.zeros(batch, length, dtype=torch.bool, device=device)
    if all(_is_pair(s) for s in spans):
        per_sample = [spans] * batch
    else:
        per_sample = [list(s) for s in spans]
        if batch % len(per_sample) == 0:
            # generate() expands the batch for num_beams / num_return_sequences by
            # repeat_interleave: each sample's spans follow its copies
            per_sample = [s for s in per_sample for _ in range(batch // len(per_sample))]
        if len(per_sample) != batch:
            raise ValueError(
                f"spans must give one list of (start, end) per sample: got {len(per_sample)} lists "
                f"for batch size {batch}"
            )
    m = torch.zeros(batch, length, dtype=torch.bool)
    for b, sample in enumerate(per_sample):
        for pair in sample:
            if not _is_pair(pair):
                raise ValueError(f"spans entries must be (start, end) int pairs, got {pair!r}")
            s, e = int(pair[0]), int(pair[1])
            if not 0 <= s < e <= length:
                raise ValueError(
                    f"spans: ({s}, {e}) of sample {b} is outside the sequence [0, {length}) "
                    "or empty"
                )
            m[b, s:e] = True
    return m.to(device)


def _is_pair(x: object) -> bool:
    return (
        isinstance(x, (tuple, list))
        and len(x) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
    )
