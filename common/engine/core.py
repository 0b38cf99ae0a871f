"""The decoder engine: apply a token plan inside a Hugging Face decoder-only LM.

One mechanism for every in-LLM pruning / merging method (FastV, PDrop,
HoliTom's inner merge, AdaGate). A method supplies only a :class:`TokenPlan`
(its scoring rule, keep budget and optional fold rule); the engine does the
rest:

* **Prefill** (the forward whose layer-0 cache is empty, or no cache): at each
  stage layer ``K`` the plan scores the tokens of the declared span(s) that
  are still alive, the engine keeps the top-k (same ``k`` for every sample of
  the batch), optionally folds the dropped tokens into kept ones (the plan's
  ``fold``), and slices the hidden states. From then on every layer ``>= K``
  receives the per-layer inputs the model loop passes (4D / 2D / ``None``
  attention mask, ``position_embeddings`` (cos, sin), ``position_ids``
  including M-RoPE's ``[3, B, L]``, ``cache_position`` on older versions)
  sliced with the same keep indices. Original positions are kept (gaps
  allowed), as FastV and HoliTom do. Tokens outside the spans (text,
  special tokens) are never dropped.
* **Decoding**: each layer ``>= K`` holds a shorter KV cache; the engine
  slices only the key side of the mask (kept prefill keys + every decoded
  key). The query side (new tokens, their positions) is untouched, so the
  next token continues from the full length.

Mechanism (checked on transformers 5.24, Llama / Qwen2 / Qwen2-VL /
LLaVA-OneVision, SDPA and eager): forward pre-hooks with kwargs on the
decoder layers plus one pre-hook on the model the plan is applied to (to see
``input_ids`` for span detection). Why hooks and not a patched forward: the
model loop, mask construction, ``generate`` bookkeeping and cache classes
stay the library's own, nothing is patched at class level (other instances
are unaffected), and ``remove()`` restores the model exactly. What the
layers receive on 5.24: ``hidden_states`` positional; ``attention_mask``
``None`` for SDPA without padding (causal via ``is_causal``; still correct
after pruning because keep indices are sorted, so causality over kept
tokens is the lower triangle), else a 4D mask; ``position_embeddings``
``(cos, sin)`` of shape ``[B or 1, L, hd]`` (M-RoPE sections are already
merged by the rotary module); ``position_ids`` ``[B or 1, L]`` (Qwen2-VL
passes the text positions or ``None``); ``cache`` (``past_key_values`` before
5.x); no ``cache_position``. Masks and the next decode position are derived
by transformers from the cache length of layer 0, which is therefore never
pruned (stage layers must be ``>= 1``): the model keeps building
full-length masks and the engine slices them per layer.

Batches: every sample keeps the same number of span tokens at every stage
(the span lengths must therefore be equal across the batch, as they are for
same-size images / videos with left padding); kept sequences stay
rectangular without extra padding.

Scope and limits:

* Only the forward that starts from an empty cache (or runs without one) is
  pruned; later chunks / conversation turns on the same cache run unpruned
  against the pruned cache (their masks are sliced the same way).
* ``DynamicCache`` only (a static / compilable cache has one length for all
  layers: refused). Sliding-window layers at or after the first stage are
  refused (their cache keeps the last W-1 *kept* tokens while transformers
  sizes the decode mask for the last W-1 original ones).
* FlashAttention-2 receives the sliced 2D padding mask; with batch 1 and no
  padding it sees gapped ``position_ids`` and takes its varlen path, which
  still treats them as one sequence (positions never restart at the
  minimum). Not exercised here (no GPU in CI); SDPA and eager are tested.
* Flex attention (``BlockMask``) is not supported.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from common.engine.attention import attention_rows
from common.selection import topk_keep

__all__ = [
    "TokenPlan",
    "PlanContext",
    "EngineHandle",
    "apply_plan",
    "find_decoder_layers",
    "spans_from_token_id",
    "span_mask",
]

logger = logging.getLogger(__name__)

SpanSpec = Sequence[tuple[int, int]] | Sequence[Sequence[tuple[int, int]]] | Tensor

# decoder module -> weak reference to its active handle (weak both ways: nothing is
# stored on the model, and the registry keeps neither the model nor the handle alive)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

_CONFIG_SPAN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


# ----------------------------------------------------------------------------- plan protocol


@runtime_checkable
class TokenPlan(Protocol):
    """What a method supplies to the engine.

    ``layers``: stage layers (strictly increasing, each in ``[1, num_layers)``).
    ``keep(stage, span_len) -> int``: span tokens to keep at that stage (of the
    ``span_len`` still alive); ``>= span_len`` means keep all (exact identity).
    ``score(layer_idx, hidden_states, layer_module, ctx) -> [B, span_len]``:
    higher = more important; ``ctx`` is a :class:`PlanContext`.
    Optional ``fold(hidden_states, ctx, keep_pos, drop_pos) -> hidden_states``:
    ``hidden_states [B, L, D]``, ``keep_pos [B, k]`` / ``drop_pos [B, S-k]``
    current-sequence positions of kept / dropped span tokens; returns the
    full ``[B, L, D]`` tensor with dropped tokens folded into kept ones (the
    engine then slices it).
    Optional ``needs_previous_layer = True``: the engine keeps layer K-1's
    input during prefill so ``ctx.attention_row(previous=True)`` can score
    with layer K-1's own attention map.
    """

    layers: tuple[int, ...]

    def keep(self, stage: int, span_len: int) -> int: ...

    def score(
        self, layer_idx: int, hidden_states: Tensor, layer_module: nn.Module, ctx: PlanContext
    ) -> Tensor: ...


@dataclass
class PlanContext:
    """Everything a plan may need at a stage (current, possibly already pruned, sequence).

    Attributes:
        stage: index of the stage in ``plan.layers``.
        layer_idx: decoder layer index of the stage.
        span_pos: ``[B, S]`` positions (in the current sequence) of the
            span tokens still alive, ascending.
        positions: ``[B, L]`` original (prefill) index of every current token.
        num_keep: how many span tokens survive this stage.
        attention_mask: the layer's mask for the current sequence (``None``,
            2D or 4D).
        position_embeddings: ``(cos, sin)`` for the current sequence.
        position_ids: the layer's position ids for the current sequence (or ``None``).
        layer: the decoder layer module.
        hidden_states: ``[B, L, D]`` input of the layer.
        prev_layer / prev_hidden_states: layer ``K-1`` and its input (same
            sequence), only when the plan sets ``needs_previous_layer = True``
            (for rules defined on layer K-1's own attention map, e.g. the
            official HoliTom inner merge); else ``None``.
    """

    stage: int
    layer_idx: int
    span_pos: Tensor
    positions: Tensor
    num_keep: int
    attention_mask: Tensor | None
    position_embeddings: Any
    position_ids: Tensor | None
    layer: nn.Module
    hidden_states: Tensor
    prev_layer: nn.Module | None = None
    prev_hidden_states: Tensor | None = None

    @property
    def query_pos(self) -> int:
        """Position of the last prompt token (the usual scoring query)."""
        return self.hidden_states.shape[1] - 1

    def attention_row(
        self, query_idx: int | Sequence[int] | Tensor = -1, *, previous: bool = False
    ) -> Tensor:
        """``[B, Nq, L]`` head-averaged attention recomputed with this layer's q/k.

        ``previous=True``: with layer K-1's q/k on its own input instead
        (needs ``needs_previous_layer = True`` on the plan).
        """
        layer, hidden = self.layer, self.hidden_states
        if previous:
            if self.prev_layer is None or self.prev_hidden_states is None:
                raise ValueError(
                    "previous=True needs the plan attribute needs_previous_layer = True"
                )
            layer, hidden = self.prev_layer, self.prev_hidden_states
        return attention_rows(
            layer,
            hidden,
            self.position_embeddings,
            query_idx,
            self.attention_mask if isinstance(self.attention_mask, Tensor) else None,
        )

    def span_attention(self, query_idx: int = -1, *, previous: bool = False) -> Tensor:
        """``[B, S]`` attention of one query (default: last token) over the alive span tokens."""
        row = self.attention_row(query_idx, previous=previous)[:, 0]
        return row.gather(1, self.span_pos)


# ----------------------------------------------------------------------------- spans


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


# ----------------------------------------------------------------------------- model lookup


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The text decoder (module holding ``layers``) and its decoder layers.

    Works for ``*ForCausalLM``, the bare decoder, and VLMs whose
    ``get_decoder()`` returns the language model (LLaVA-OneVision, Qwen2-VL).
    """
    candidates: list[nn.Module] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
            if isinstance(dec, nn.Module):
                candidates.append(dec)
        except Exception:  # noqa: BLE001 - best effort lookup, fall back to a search
            logger.debug("get_decoder() failed on %s", type(model).__name__)
    candidates.append(model)
    for cand in candidates:
        layers = getattr(cand, "layers", None)
        if _looks_like_decoder_layers(layers):
            return cand, layers
    for _, mod in model.named_modules():  # fallback: a module with rotary_emb and layers
        layers = getattr(mod, "layers", None)
        if hasattr(mod, "rotary_emb") and _looks_like_decoder_layers(layers):
            return mod, layers
    raise TypeError(
        f"could not find decoder layers with self_attn.q_proj/k_proj in {type(model).__name__}"
    )


def _looks_like_decoder_layers(layers: object) -> bool:
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and all(hasattr(getattr(m, "self_attn", None), "q_proj") for m in layers)
    )


# ----------------------------------------------------------------------------- slicing helpers


def _gather_dim(x: Tensor, dim: int, idx: Tensor, batch_dim: int) -> Tensor:
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


def _slice_mask_prefill(mask: Any, idx: Tensor) -> Any:
    if mask is None or not isinstance(mask, Tensor):
        if mask is not None:
            raise NotImplementedError(
                f"attention mask of type {type(mask).__name__} is not supported by the engine "
                "(use attn_implementation='sdpa' or 'eager')"
            )
        return None
    if mask.ndim == 4:
        m = _gather_dim(mask, 2, idx, 0)
        return _gather_dim(m, 3, idx, 0)
    if mask.ndim == 2:
        return _gather_dim(mask, 1, idx, 0)
    raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported")


def _slice_mask_decode(mask: Any, idx: Tensor, full_len: int) -> Any:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise NotImplementedError(f"attention mask of type {type(mask).__name__} is not supported")
    kv_len = mask.shape[-1]
    if kv_len < full_len:
        raise RuntimeError(
            f"decode mask covers {kv_len} keys but the pruned prefill had {full_len} tokens; "
            "the cache does not belong to the last pruned prefill"
        )
    idx = idx.to(mask.device)
    tail = torch.arange(full_len, kv_len, device=idx.device).expand(idx.shape[0], -1)
    cols = torch.cat([idx, tail], dim=1)
    if mask.ndim == 4:
        return _gather_dim(mask, 3, cols, 0)
    if mask.ndim == 2:
        return _gather_dim(mask, 1, cols, 0)
    raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported")


def _slice_rotary(pe: Any, idx: Tensor) -> Any:
    if pe is None:
        return None
    if isinstance(pe, Tensor):
        if pe.ndim == 4:  # [3, B, L, hd] (older M-RoPE)
            return _gather_dim(pe, 2, idx, 1)
        return _gather_dim(pe, 1, idx, 0)  # [B, L, hd]
    if isinstance(pe, (tuple, list)):
        return type(pe)(_slice_rotary(p, idx) for p in pe)
    if isinstance(pe, dict):
        return {k: _slice_rotary(v, idx) for k, v in pe.items()}
    raise NotImplementedError(f"position_embeddings of type {type(pe).__name__} not supported")


def _slice_position_ids(pos: Any, idx: Tensor) -> Any:
    if pos is None or not isinstance(pos, Tensor):
        return pos
    if pos.ndim == 2:
        return _gather_dim(pos, 1, idx, 0)
    if pos.ndim == 3:  # [3 or 4, B, L]
        return _gather_dim(pos, 2, idx, 1)
    return pos


def _cache_len(cache: Any, layer_idx: int) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer_idx))
    except (TypeError, AttributeError, IndexError):
        return 0


# ----------------------------------------------------------------------------- state and handle


@dataclass
class _Stage:
    layer_idx: int
    keep_idx: Tensor  # [B, L_stage] original (prefill) indices of the tokens alive after it


@dataclass
class _Prefill:
    full_len: int
    batch: int
    stages: list[_Stage] = field(default_factory=list)
    positions: Tensor | None = None  # [B, L_cur] original indices of current tokens
    span: Tensor | None = None  # [B, L_full] bool
    call_id: int = 0


class EngineHandle:
    """A plan applied to a model. ``remove()`` (or leaving the ``with`` block) undoes it.

    Attributes:
        plan: the :class:`TokenPlan`.
        num_layers: decoder depth.
        last_plan: after a pruned prefill, a dict with ``prefill_length``,
            ``kept_length`` (per stage layer that pruned) and ``keep_idx``
            (per such layer: ``[B, L_l]`` original indices of the surviving
            tokens); ``None`` when the latest prefill pruned nothing. Decoding
            steps and later chunks on the same cache leave it as it is.
        num_pruned_prefills: how many prefills were pruned so far.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: TokenPlan,
        spans: SpanSpec | None = None,
        span_token_id: int | Iterable[int] | None = None,
        layers_name: str = "layers",
    ) -> None:
        if not isinstance(plan, TokenPlan):
            raise TypeError(
                "plan must be a TokenPlan (attribute layers, methods keep() and score()), got "
                f"{type(plan).__name__}"
            )
        self.model = model
        self.plan = plan
        self.decoder, self.layers = find_decoder_layers(model)
        self.num_layers = len(self.layers)
        layers = tuple(plan.layers)
        for i, layer_idx in enumerate(layers):
            if not 1 <= layer_idx < self.num_layers:
                raise ValueError(
                    f"{layers_name} must be in [1, {self.num_layers - 1}] for this "
                    f"{self.num_layers}-layer decoder (layer 0 is never pruned), got {layer_idx}"
                )
            if i and layer_idx <= layers[i - 1]:
                raise ValueError(f"{layers_name} must be strictly increasing, got {layers}")
        self._stage_of = {layer_idx: i for i, layer_idx in enumerate(layers)}
        self._first = layers[0] if layers else self.num_layers
        for idx in range(self._first, self.num_layers):
            if getattr(self.layers[idx].self_attn, "sliding_window", None) is not None:
                # a sliding-window KV cache keeps the last W-1 *kept* tokens while the decode
                # mask transformers builds assumes the last W-1 original ones
                raise NotImplementedError(
                    f"layer {idx} uses sliding-window attention; the engine does not prune "
                    "before sliding-window layers (prune after the last one, or disable "
                    "use_sliding_window)"
                )
        self._spans = spans
        self._span_token_id = self._resolve_token_id(span_token_id)
        self._input_ids: Tensor | None = None
        self._state: _Prefill | None = None
        self._memo: dict[tuple, dict[str, Any]] = {}
        self._call = 0
        self._hooks: list[Any] = []
        self.last_plan: dict[str, Any] | None = None
        self.num_pruned_prefills = 0
        self._warned_no_span = False

        previous_ref = _ACTIVE.get(self.decoder)
        previous = previous_ref() if previous_ref is not None else None
        if previous is not None:
            logger.info("a token plan was already applied to this model; replacing it")
            previous.remove()
        self._hooks.append(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        self._needs_prev = bool(getattr(plan, "needs_previous_layer", False))
        self._prev_of = {k - 1 for k in layers} if self._needs_prev else set()
        self._prev_input: tuple[nn.Module, Tensor] | None = None
        for idx, layer in enumerate(self.layers):
            if idx == 0 or idx >= self._first or idx in self._prev_of:
                hook = self._make_layer_hook(idx)
                self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        _ACTIVE[self.decoder] = weakref.ref(self)

    # ----------------------------------------------------------------- public
    def set_spans(self, spans: SpanSpec | None) -> None:
        """Declare the prunable spans for the next prefill(s) (``None``: detect from token id)."""
        self._spans = spans

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook and forget all state (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._state = None
        self._memo.clear()
        self._input_ids = None
        self._prev_input = None
        current = _ACTIVE.get(self.decoder)
        if current is not None and current() in (self, None):
            del _ACTIVE[self.decoder]

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ----------------------------------------------------------------- internals
    def _resolve_token_id(self, token_id: int | Iterable[int] | None) -> list[int] | None:
        if token_id is not None:
            return [token_id] if isinstance(token_id, int) else [int(t) for t in token_id]
        ids = []
        for cfg in (getattr(self.model, "config", None), getattr(self.decoder, "config", None)):
            for key in _CONFIG_SPAN_KEYS:
                value = getattr(cfg, key, None)
                if isinstance(value, int) and not isinstance(value, bool) and value not in ids:
                    ids.append(value)
        return ids or None

    def _top_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, Tensor) and ids.ndim == 2 else None

    def _make_layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            return self._layer_hook(idx, module, args, kwargs)

        return hook

    def _layer_hook(self, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if idx == 0:
            self._call += 1
            self._memo.clear()
            self._prev_input = None
            if _cache_len(cache, 0) == 0:
                self._start_prefill(hidden, cache)
            if self._state is not None and idx in self._prev_of:
                self._prev_input = (module, hidden)
            return None
        state = self._state
        if state is None:
            return None
        if state.call_id == self._call:  # prefill pass
            if idx in self._stage_of:
                hidden = self._run_stage(idx, module, hidden, kwargs)
            if idx in self._prev_of:  # input of layer K-1 as the layer will see it
                self._prev_input = (module, hidden)
            if not state.stages:
                return None
            new_kwargs = dict(kwargs)
            new_kwargs.update(self._prefill_kwargs(kwargs))
        else:  # decoding with the pruned cache
            if not state.stages or idx < state.stages[0].layer_idx:
                return None
            stage = self._active_stage(idx)
            new_kwargs = dict(kwargs)
            # keyed by the mask object too: hybrid models pass a different (sliding) mask
            # to some layers
            key = (self._call, -1 - state.stages.index(stage), id(kwargs.get("attention_mask")))
            if key not in self._memo:
                self._memo[key] = {
                    "attention_mask": _slice_mask_decode(
                        kwargs.get("attention_mask"), stage.keep_idx, state.full_len
                    )
                }
            new_kwargs.update(self._memo[key])
            past = _cache_len(cache, idx)
            q = hidden.shape[1]
            mask = new_kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.shape[-1] != past + q:
                raise RuntimeError(
                    f"layer {idx}: cache holds {past} tokens but the sliced mask expects "
                    f"{mask.shape[-1] - q}; was the cache produced by another prefill?"
                )
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _start_prefill(self, hidden: Tensor, cache: Any) -> None:
        self._state = None
        self.last_plan = None  # describes this prefill once a stage prunes, else stays None
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                "the engine needs a dynamic KV cache (DynamicCache); static / compilable caches "
                "cannot hold a different length per layer"
            )
        b, length = hidden.shape[:2]
        spans = self._spans
        if spans is None and self._span_token_id is not None and self._input_ids is not None:
            if tuple(self._input_ids.shape) == (b, length):
                spans = spans_from_token_id(self._input_ids, self._span_token_id)
        self._input_ids = None
        if spans is None:
            if not self._warned_no_span:
                logger.warning("no span declared or detected for this prefill: nothing is pruned")
                self._warned_no_span = True
            return
        mask = span_mask(spans, b, length, hidden.device)
        counts = mask.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                "spans: every sample must declare the same number of span tokens (the engine keeps "
                f"the same count per sample), got {counts.tolist()}"
            )
        if int(counts[0]) == 0:
            logger.debug("empty span: nothing is pruned")
            return
        if bool(mask[:, -1].any()):
            # the last position is the usual scoring query and the token whose logits
            # generate() reads; dropping it silently changes the next token
            logger.warning(
                "spans include the last prompt position: it may be pruned, and then the "
                "returned last-position logits belong to another token"
            )
        self._state = _Prefill(
            full_len=length,
            batch=b,
            positions=torch.arange(length, device=hidden.device).expand(b, -1),
            span=mask,
            call_id=self._call,
        )

    def _active_stage(self, idx: int) -> _Stage:
        assert self._state is not None
        active = self._state.stages[0]
        for st in self._state.stages:
            if st.layer_idx <= idx:
                active = st
        return active

    def _prefill_kwargs(self, kwargs: dict) -> dict[str, Any]:
        """Per-layer inputs sliced to the current kept tokens (memoised per forward and stage)."""
        state = self._state
        assert state is not None and state.stages
        stage_no = len(state.stages) - 1
        key = (
            self._call,
            stage_no,
            id(kwargs.get("attention_mask")),
            id(kwargs.get("position_embeddings")),
        )
        if key not in self._memo:
            idx = state.stages[-1].keep_idx
            out: dict[str, Any] = {}
            if "attention_mask" in kwargs:
                out["attention_mask"] = _slice_mask_prefill(kwargs["attention_mask"], idx)
            if "position_embeddings" in kwargs:
                out["position_embeddings"] = _slice_rotary(kwargs["position_embeddings"], idx)
            if "position_ids" in kwargs:
                out["position_ids"] = _slice_position_ids(kwargs["position_ids"], idx)
            cp = kwargs.get("cache_position")
            if isinstance(cp, Tensor) and cp.ndim == 1:
                if state.batch > 1 and not bool((idx == idx[:1]).all()):
                    logger.debug("cache_position sliced with sample 0's keep indices")
                out["cache_position"] = cp[idx[0]]
            self._memo[key] = out
        return self._memo[key]

    @torch.no_grad()
    def _run_stage(self, idx: int, module: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        state = self._state
        assert state is not None and state.positions is not None and state.span is not None
        stage = self._stage_of[idx]
        positions = state.positions.to(hidden.device)  # [B, Lc]
        b, lc = positions.shape
        alive_span = state.span.to(hidden.device).gather(1, positions)  # [B, Lc]
        s = int(alive_span[0].sum())
        k = int(self.plan.keep(stage, s))
        if k < 0:
            raise ValueError(f"plan.keep returned {k} (must be >= 0)")
        if s == 0 or k >= s:
            return hidden  # keep-all stage: exact identity
        span_pos = alive_span.nonzero()[:, 1].view(b, s)
        cur_kwargs = self._prefill_kwargs(kwargs) if state.stages else kwargs
        ctx = PlanContext(
            stage=stage,
            layer_idx=idx,
            span_pos=span_pos,
            positions=positions,
            num_keep=k,
            attention_mask=cur_kwargs.get("attention_mask"),
            position_embeddings=cur_kwargs.get("position_embeddings"),
            position_ids=cur_kwargs.get("position_ids"),
            layer=module,
            hidden_states=hidden,
        )
        if self._prev_input is not None and idx - 1 in self._prev_of:
            ctx.prev_layer, ctx.prev_hidden_states = self._prev_input
        scores = self.plan.score(idx, hidden, module, ctx)
        self._prev_input = None
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (b, s):
            raise ValueError(
                f"plan.score must return a [B, span_len] = ({b}, {s}) tensor, got "
                f"{getattr(scores, 'shape', type(scores))}"
            )
        top = topk_keep(scores.float(), k)  # [B, k] indices into span_pos, ascending
        keep_span_pos = span_pos.gather(1, top)
        keep_mask = ~alive_span
        keep_mask.scatter_(1, keep_span_pos, True)
        fold = getattr(self.plan, "fold", None)
        if callable(fold):
            drop_span = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
            drop_span.scatter_(1, top, False)
            drop_pos = span_pos[drop_span].view(b, s - k)
            hidden = fold(hidden, ctx, keep_span_pos, drop_pos)
            if not isinstance(hidden, Tensor) or tuple(hidden.shape[:2]) != (b, lc):
                raise ValueError("plan.fold must return hidden states of the input shape [B, L, D]")
        new_len = lc - s + k
        keep_cur = keep_mask.nonzero()[:, 1].view(b, new_len)  # ascending
        hidden = hidden.gather(1, keep_cur[:, :, None].expand(-1, -1, hidden.shape[-1]))
        new_positions = positions.gather(1, keep_cur)
        state.positions = new_positions
        state.stages.append(_Stage(layer_idx=idx, keep_idx=new_positions))
        if len(state.stages) == 1:
            self.num_pruned_prefills += 1
            self.last_plan = {"prefill_length": state.full_len, "kept_length": {}, "keep_idx": {}}
        assert self.last_plan is not None
        self.last_plan["kept_length"][idx] = new_len
        self.last_plan["keep_idx"][idx] = new_positions
        logger.debug("layer %d: kept %d of %d span tokens (%d -> %d)", idx, k, s, lc, new_len)
        return hidden


def apply_plan(
    model: nn.Module,
    plan: TokenPlan,
    *,
    spans: SpanSpec | None = None,
    span_token_id: int | Iterable[int] | None = None,
    layers_name: str = "layers",
) -> EngineHandle:
    """Apply ``plan`` to ``model``; returns a handle (also a context manager).

    Args:
        model: a Hugging Face decoder-only LM (``*ForCausalLM``, bare decoder)
            or a VLM whose ``get_decoder()`` is its language model.
        plan: a :class:`TokenPlan`.
        spans: prunable spans for the coming prefills (see :func:`span_mask`);
            may be changed later with ``handle.set_spans``.
        span_token_id: token id(s) whose runs in ``input_ids`` form the spans
            when ``spans`` is not given. Default: the model config's
            ``image_token_id`` / ``video_token_id`` (or ``*_index``) if any.

        layers_name: how error messages name the stage layers (the method's field).

    Applying a plan to a model that already has one replaces the old one.
    """
    return EngineHandle(
        model, plan, spans=spans, span_token_id=span_token_id, layers_name=layers_name
    )
