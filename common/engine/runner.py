"""The prefill / decode state machine that applies a :class:`TokenPlan` to a decoder.

* **Prefill** (the forward whose layer-0 cache is empty, or no cache): at each
  stage layer ``K`` the plan scores the alive tokens of the declared span(s),
  selects the survivors (per sample) and optionally folds the dropped tokens
  into kept ones; the engine slices the hidden states. From then on every
  layer ``>= K`` receives the per-layer inputs the model loop passes (4D / 2D
  / ``None`` attention mask, ``position_embeddings``, ``position_ids``
  including M-RoPE's ``[3, B, L]``, ``cache_position``) sliced with the same
  keep indices. Original positions are kept (gaps allowed) unless the plan
  sets ``reindex_positions``. Tokens outside the spans are never dropped.
* **Per-sample counts**: each sample's kept set is padded to the batch
  maximum with padding slots, masked out (as keys) of every later layer and
  of the decode cache, so each sample computes what it computes alone. When
  every sample keeps the same count nothing is padded and the layers get
  exactly the sliced masks (the equal-count path).
* **Decoding**: each layer ``>= K`` holds a shorter KV cache; the engine
  slices the key side of the mask (kept prefill keys + every decoded key) and
  hides padding slots. The query side is untouched, so the next token
  continues from the full length (or, with ``reindex_positions``, from the
  kept length: positions shift down by the number of tokens dropped).

Mechanism: forward pre-hooks with kwargs on the decoder layers, one pre-hook
on the model the plan is applied to (to see ``input_ids`` and the 2D padding
mask), and on transformers < 4.45 a pre-hook on each pruned layer's own
rotary module (:mod:`common.engine.versions`). Why hooks and not a patched
forward: the model loop, mask construction, ``generate`` bookkeeping and cache
classes stay the library's own, nothing is patched at class level (other
instances are unaffected), and ``remove()`` restores the model exactly. Masks
and the next decode position are derived by transformers from layer 0's
cache length, which is therefore never pruned (stage layers are ``>= 1``).

Scope and limits:

* Only the forward that starts from an empty cache (or runs without one) is
  pruned; later chunks / turns on the same cache run unpruned against the
  pruned cache (their masks are sliced the same way).
* Left padding only (a right-padded batch is refused). ``DynamicCache`` only
  (a static cache has one length for all layers: refused). Sliding-window
  layers at or after the first stage are refused.
* FlashAttention-2 receives the sliced 2D padding mask; padding slots are
  zeros in it. Not exercised here (no GPU in CI); SDPA and eager are tested.
* Flex attention (``BlockMask``) is not supported.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from common.engine import versions
from common.engine.plan import PlanContext, StageRecord, TokenPlan
from common.engine.slicing import (
    mask_padding_slots_decode,
    mask_padding_slots_prefill,
    slice_mask_decode,
    slice_mask_prefill,
    slice_position_ids,
    slice_rotary,
)
from common.engine.spans import SpanSpec, span_mask, spans_from_token_id
from common.methods import MethodHandle

__all__ = ["EngineHandle", "apply_plan", "find_decoder_layers"]

logger = logging.getLogger(__name__)

_CONFIG_SPAN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


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
    for _, mod in model.named_modules():  # older VLMs: the language model's inner decoder
        layers = getattr(mod, "layers", None)
        if _looks_like_decoder_layers(layers) and hasattr(mod, "embed_tokens"):
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


# ----------------------------------------------------------------------------- state


@dataclass
class _Stage:
    layer_idx: int
    keep_idx: Tensor  # [B, n] original (prefill) indices of the slots alive after it, ascending
    valid: Tensor  # [B, n] bool, False at padding slots
    padded: bool
    position_ids: Tensor | None = None  # [B, n] re-indexed positions (reindex_positions)
    shift: Tensor | None = None  # [B] decode position shift (reindex_positions)


@dataclass
class _Prefill:
    full_len: int
    batch: int
    positions: Tensor  # [B, L_cur] original indices of the current tokens
    valid: Tensor  # [B, L_cur] bool
    span: Tensor  # [B, L_full] bool
    span_counts: Tensor  # [B]
    call_id: int
    orig_position_ids: Tensor | None = None  # [B, L_full] (reindex_positions)
    stages: list[_Stage] = field(default_factory=list)
    history: list[StageRecord] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)


def _right_padded(mask2d: Tensor) -> bool:
    """Whether a ``[B, L]`` padding mask has a padding token after a real one in some row."""
    m = mask2d.bool()
    seen = m.long().cumsum(1) > 0
    return bool((seen & ~m).any())


def _row(x: Any, i: int, b: int) -> Any:
    """Sample ``i`` of a batched tensor (batch on dim 0, or dim 1 for M-RoPE ``[3, B, ...]``)."""
    if isinstance(x, Tensor):
        if x.ndim >= 1 and x.shape[0] == b:
            return x[i : i + 1]
        if x.ndim >= 3 and x.shape[1] == b and x.shape[0] in (3, 4):
            return x[:, i : i + 1]
        return x  # broadcast over the batch
    if isinstance(x, (tuple, list)):
        return type(x)(_row(v, i, b) for v in x)
    return x


def _ctx_row(ctx: PlanContext, i: int) -> PlanContext:
    """The context of sample ``i`` alone (``history`` and ``state`` stay shared)."""
    b = ctx.batch
    return dataclasses.replace(
        ctx,
        **{
            f.name: _row(getattr(ctx, f.name), i, b)
            for f in dataclasses.fields(ctx)
            if f.name not in ("stage", "layer_idx", "layer", "prev_layer", "state", "history")
        },
    )


class EngineHandle(MethodHandle):
    """A plan applied to a model. ``remove()`` (or leaving the ``with`` block) undoes it.

    Attributes:
        plan: the :class:`TokenPlan` (also ``method``).
        num_layers: decoder depth.
        last_plan: after a pruned prefill, a dict with ``prefill_length`` (int)
            and, each a dict keyed by the stage layer that pruned:
            ``kept_length`` (the padded length after it), ``keep_idx``
            (``[B, n]`` original indices of the slots alive after it),
            ``valid`` (``[B, n]`` bool, False at padding slots),
            ``kept_counts`` (``[B]`` real tokens per sample) and ``span_kept``
            (``[B]`` span tokens per sample that survived it); ``None`` when
            the latest prefill pruned nothing.
        num_pruned_prefills: how many prefills were pruned so far.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: TokenPlan,
        spans: SpanSpec | None = None,
        span_token_id: int | Iterable[int] | None = None,
    ) -> None:
        if not isinstance(plan, TokenPlan):
            raise TypeError(
                f"plan must be a common.engine.TokenPlan subclass, got {type(plan).__name__}"
            )
        self.model = model
        self.method = self.plan = plan
        self.decoder, self.layers = find_decoder_layers(model)
        versions.check_supported(model, self.decoder)
        self.num_layers = len(self.layers)
        name = str(getattr(plan, "layers_field", "layers"))
        layers = tuple(int(x) for x in plan.layers)
        if not layers:
            raise ValueError(f"{name} must name at least one layer, got ()")
        for i, layer_idx in enumerate(layers):
            if not 1 <= layer_idx < self.num_layers:
                raise ValueError(
                    f"{name} must be in [1, {self.num_layers - 1}] for this "
                    f"{self.num_layers}-layer decoder (layer 0 is never pruned), got {layer_idx}"
                )
            if i and layer_idx <= layers[i - 1]:
                raise ValueError(f"{name} must be strictly increasing, got {layers}")
        self._stage_of = {layer_idx: i for i, layer_idx in enumerate(layers)}
        self._first = layers[0]
        for idx in range(self._first, self.num_layers):
            if versions.sliding_window_layer(self.decoder, self.layers[idx], idx):
                # a sliding-window KV cache keeps the last W-1 *kept* tokens while the decode
                # mask transformers builds assumes the last W-1 original ones
                raise NotImplementedError(
                    f"layer {idx} uses sliding-window attention; the engine does not prune "
                    "before sliding-window layers (prune after the last one, or disable "
                    "use_sliding_window)"
                )
        self._reindex = bool(plan.reindex_positions)
        if self._reindex and versions.uses_mrope(self.decoder, model):
            raise NotImplementedError(
                "reindex_positions is not defined for multimodal rotary positions (M-RoPE)"
            )
        self._flash = "flash" in versions.attn_implementation(self.decoder)
        self._spans = spans
        self._span_token_id = self._resolve_token_id(span_token_id)
        if spans is None and self._span_token_id is None:
            warnings.warn(
                f"{type(plan).__name__} applied to {type(model).__name__} with no spans and no "
                "image / video token id in its config: nothing will be pruned (pass spans=... "
                "or span_token_id=..., or call handle.set_spans)",
                UserWarning,
                stacklevel=3,
            )
        self._input_ids: Tensor | None = None
        self._mask2d: Tensor | None = None
        self._state: _Prefill | None = None
        self._memo: dict[tuple, dict[str, Any]] = {}
        self._call = 0
        self._hooks: list[Any] = []
        self._rotary_need = 0
        self.last_plan: dict[str, Any] | None = None
        self.num_pruned_prefills = 0
        self._warned_no_span = False
        self._needs_prev = bool(plan.needs_previous_layer)
        self._prev_of = {k - 1 for k in layers} if self._needs_prev else set()
        self._prev_input: tuple[nn.Module, Tensor] | None = None

        self._claim(self.decoder)  # removes a plan already applied to this decoder
        self._hooks.append(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        for idx, layer in enumerate(self.layers):
            if idx == 0 or idx >= self._first or idx in self._prev_of:
                hook = self._make_layer_hook(idx)
                self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            rotary = versions.inner_rotary(layer)
            if rotary is not None and idx >= self._first:
                self._hooks.append(
                    rotary.register_forward_pre_hook(self._rotary_hook, with_kwargs=True)
                )

    # ----------------------------------------------------------------- public
    def set_spans(self, spans: SpanSpec | None) -> None:
        """Declare the prunable spans for the next prefill(s) (``None``: detect from token id)."""
        self._spans = spans

    def _undo(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._state = None
        self._memo.clear()
        self._input_ids = None
        self._mask2d = None
        self._prev_input = None

    # ----------------------------------------------------------------- hooks
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
        mask = kwargs.get("attention_mask")
        self._mask2d = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None

    def _rotary_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        # transformers < 4.45 builds the rotary table from the kept length; kept tokens keep
        # their original (larger) positions, so ask for a table that covers them
        if self._rotary_need <= 0:
            return None
        if "seq_len" in kwargs:
            if (kwargs["seq_len"] or 0) >= self._rotary_need:
                return None
            return args, dict(kwargs, seq_len=self._rotary_need)
        if len(args) >= 2 and args[1] is not None and int(args[1]) < self._rotary_need:
            return (args[0], self._rotary_need, *args[2:]), kwargs
        return None

    def _make_layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            return self._layer_hook(idx, module, args, kwargs)

        return hook

    def _layer_hook(self, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = versions.layer_cache(kwargs)
        if idx == 0:
            self._call += 1
            self._memo.clear()
            self._prev_input = None
            self._rotary_need = 0
            if versions.cache_length(cache, 0) == 0:
                self._start_prefill(hidden, kwargs)
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
            new_kwargs.update(self._prefill_kwargs(kwargs, module, hidden))
        else:  # decoding with the pruned cache
            if not state.stages or idx < state.stages[0].layer_idx:
                return None
            new_kwargs = dict(kwargs)
            new_kwargs.update(self._decode_kwargs(idx, module, hidden, kwargs, cache))
        self._note_rotary_need(new_kwargs)
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _note_rotary_need(self, kwargs: dict) -> None:
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor) and pos.numel():
            key = ("need", id(pos))
            if key not in self._memo:
                self._memo[key] = {"need": int(pos.max()) + 1}
            self._rotary_need = self._memo[key]["need"]

    # ----------------------------------------------------------------- prefill
    def _start_prefill(self, hidden: Tensor, kwargs: dict) -> None:
        self._state = None
        self.last_plan = None  # describes this prefill once a stage prunes, else stays None
        cache = versions.layer_cache(kwargs)
        if versions.is_static_cache(cache):
            raise NotImplementedError(
                "the engine needs a dynamic KV cache (DynamicCache); static / compilable caches "
                "cannot hold a different length per layer"
            )
        b, length = hidden.shape[:2]
        mask2d = self._mask2d
        self._mask2d = None
        if mask2d is not None and tuple(mask2d.shape) == (b, length) and _right_padded(mask2d):
            raise ValueError(
                "attention_mask: the batch is right-padded (a padding token follows a real one); "
                "the engine supports left padding only (tokenizer.padding_side = 'left')"
            )
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
        if int(counts.max()) == 0:
            logger.debug("empty span: nothing is pruned")
            return
        if bool(mask[:, -1].any()):
            # the last position is the usual scoring query and the token whose logits
            # generate() reads; dropping it silently changes the next token
            logger.warning(
                "spans include the last prompt position: it may be pruned, and then the "
                "returned last-position logits belong to another token"
            )
        orig_pos = None
        if self._reindex:
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor) and pos.ndim == 2:
                orig_pos = pos.to(hidden.device).expand(b, -1)
            else:
                orig_pos = torch.arange(length, device=hidden.device).expand(b, -1)
        self._state = _Prefill(
            full_len=length,
            batch=b,
            positions=torch.arange(length, device=hidden.device).expand(b, -1),
            valid=torch.ones(b, length, dtype=torch.bool, device=hidden.device),
            span=mask,
            span_counts=counts,
            call_id=self._call,
            orig_position_ids=orig_pos,
        )

    def _prefill_kwargs(self, kwargs: dict, layer: nn.Module, hidden: Tensor) -> dict[str, Any]:
        """Per-layer inputs for the current kept tokens (memoised per forward and stage)."""
        state = self._state
        assert state is not None and state.stages
        stage_no = len(state.stages) - 1
        key = (
            self._call,
            stage_no,
            id(kwargs.get("attention_mask")),
            id(kwargs.get("position_embeddings")),
        )
        if key in self._memo:
            return self._memo[key]
        st = state.stages[-1]
        idx = st.keep_idx
        out: dict[str, Any] = {}
        if "attention_mask" in kwargs or st.padded:
            mask = slice_mask_prefill(kwargs.get("attention_mask"), idx)
            if st.padded:
                mask = mask_padding_slots_prefill(
                    mask, st.valid, dtype=hidden.dtype, flash=self._flash
                )
            out["attention_mask"] = mask
        if self._reindex:
            assert st.position_ids is not None
            pos = st.position_ids
            out["position_ids"] = pos
            if kwargs.get("position_embeddings") is not None:
                out["position_embeddings"] = versions.rotary_embeddings(
                    self.decoder, layer, hidden, pos
                )
        else:
            if "position_embeddings" in kwargs:
                out["position_embeddings"] = slice_rotary(kwargs["position_embeddings"], idx)
            if "position_ids" in kwargs:
                out["position_ids"] = slice_position_ids(kwargs["position_ids"], idx)
        cp = kwargs.get("cache_position")
        if isinstance(cp, Tensor) and cp.ndim == 1:
            # only static caches index with it (refused); keep its length consistent
            out["cache_position"] = cp[idx[0].to(cp.device)]
        self._memo[key] = out
        return out

    @torch.no_grad()
    def _run_stage(self, idx: int, module: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        state = self._state
        assert state is not None
        stage = self._stage_of[idx]
        dev = hidden.device
        positions = state.positions.to(dev)  # [B, Lc]
        valid = state.valid.to(dev)
        b, lc = positions.shape
        alive_span = state.span.to(dev).gather(1, positions) & valid  # [B, Lc]
        counts = alive_span.sum(1)
        s = int(counts.max())
        if s == 0:
            return hidden
        # alive span positions first (ascending), then the rest; keep the first s columns
        order = torch.sort((~alive_span).to(torch.uint8), dim=1, stable=True).indices
        span_pos = order[:, :s]
        span_valid = torch.arange(s, device=dev)[None] < counts[:, None]
        if type(self.plan).select is TokenPlan.select:
            budgets = [self.plan.budget(stage, int(c)) for c in counts.tolist()]
            if all(k >= int(c) for k, c in zip(budgets, counts.tolist())):
                self._prev_input = None
                return hidden  # keep-all stage under the default top-k: nothing to score
        cur_kwargs = self._prefill_kwargs(kwargs, module, hidden) if state.stages else kwargs
        pos_ids = cur_kwargs.get("position_ids")
        pe = cur_kwargs.get("position_embeddings")
        if pe is None and versions.inner_rotary(module) is not None:
            if not isinstance(pos_ids, Tensor):
                pos_ids = positions
            pe = versions.rotary_embeddings(self.decoder, module, hidden, pos_ids.expand(b, -1))
        ctx = PlanContext(
            stage=stage,
            layer_idx=idx,
            layer=module,
            hidden_states=hidden,
            positions=positions,
            valid=valid,
            span_pos=span_pos,
            span_valid=span_valid,
            span_counts=counts,
            original_span_counts=state.span_counts.to(dev),
            attention_mask=cur_kwargs.get("attention_mask"),
            position_embeddings=pe,
            position_ids=pos_ids if isinstance(pos_ids, Tensor) else None,
            state=state.scratch,
            history=state.history,
        )
        if self._prev_input is not None and idx - 1 in self._prev_of:
            ctx.prev_layer, ctx.prev_hidden_states = self._prev_input
        scores = self.plan.score(ctx)
        self._prev_input = None
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (b, s):
            raise ValueError(
                f"{type(self.plan).__name__}.score must return a [B, S] = ({b}, {s}) tensor, got "
                f"{getattr(scores, 'shape', type(scores))}"
            )
        keep = self.plan.select(scores, ctx)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != (b, s):
            raise ValueError(
                f"{type(self.plan).__name__}.select must return a [B, S] = ({b}, {s}) bool tensor"
            )
        keep = keep.to(dev) & span_valid
        state.history.append(
            StageRecord(
                layer_idx=idx,
                span_idx=positions.gather(1, span_pos),
                span_valid=span_valid,
                scores=scores.detach().float(),
                keep=keep,
            )
        )
        kept_counts = keep.sum(1)
        if bool((kept_counts == counts).all()):
            return hidden  # keep-all stage: exact identity

        kept_here = torch.zeros(b, lc, dtype=torch.bool, device=dev)
        kept_here.scatter_(1, span_pos, keep)  # non-span columns of span_pos get False
        real = (valid & ~alive_span) | kept_here  # [B, Lc] real tokens that survive
        n_real = real.sum(1)
        n_max = int(n_real.max())
        # pad each sample to n_max with its lowest-index non-surviving positions
        free_rank = (~real).long().cumsum(1)
        pad = ~real & (free_rank <= (n_max - n_real)[:, None])
        slots = real | pad
        keep_cur = slots.nonzero()[:, 1].view(b, n_max)  # ascending current positions
        new_valid = real.gather(1, keep_cur)
        kept_hidden = hidden.gather(1, keep_cur[:, :, None].expand(-1, -1, hidden.shape[-1]))
        if self.plan.folds:
            hidden = self._fold(
                hidden,
                ctx,
                keep,
                span_pos,
                span_valid,
                real,
                valid,
                keep_cur,
                new_valid,
                kept_hidden,
            )
        else:
            hidden = kept_hidden
        new_positions = positions.gather(1, keep_cur)
        padded = not bool(new_valid.all())
        st = _Stage(layer_idx=idx, keep_idx=new_positions, valid=new_valid, padded=padded)
        if self._reindex:
            assert state.orig_position_ids is not None
            # tokens before each slot that did not survive (dropped or padding) shift it down
            kept_before = new_valid.long().cumsum(1) - new_valid.long()
            missing_before = new_positions - kept_before
            orig = state.orig_position_ids.to(dev).gather(1, new_positions)
            st.position_ids = orig - missing_before
            st.shift = state.full_len - new_valid.sum(1)
        state.positions = new_positions
        state.valid = new_valid
        state.stages.append(st)
        if len(state.stages) == 1:
            self.num_pruned_prefills += 1
            self.last_plan = {
                "prefill_length": state.full_len,
                "kept_length": {},
                "keep_idx": {},
                "valid": {},
                "kept_counts": {},
                "span_kept": {},
            }
        assert self.last_plan is not None
        self.last_plan["kept_length"][idx] = n_max
        self.last_plan["keep_idx"][idx] = new_positions
        self.last_plan["valid"][idx] = new_valid
        self.last_plan["kept_counts"][idx] = n_real
        self.last_plan["span_kept"][idx] = kept_counts
        logger.debug(
            "layer %d: kept %s of %s span tokens (%d -> %d)",
            idx,
            kept_counts.tolist(),
            counts.tolist(),
            lc,
            n_max,
        )
        return hidden

    def _fold(
        self,
        hidden: Tensor,
        ctx: PlanContext,
        keep: Tensor,
        span_pos: Tensor,
        span_valid: Tensor,
        real: Tensor,
        valid: Tensor,
        keep_cur: Tensor,
        new_valid: Tensor,
        kept_hidden: Tensor,
    ) -> Tensor:
        """The plan's fold, as a :class:`common.Merge` over the current sequence.

        Without padding: one batched call (slots = ``keep_cur``). With padding
        (samples keep different counts, now or at an earlier stage): one call
        per sample with a batch-1 merge whose slots are that sample's
        surviving tokens (plus earlier padding slots, which keep themselves),
        so every real token folds exactly the members it folds alone.
        """
        from common.matching import Merge

        b, lc = real.shape
        dev = real.device
        dropped = span_valid & ~keep
        if bool((dropped.any(1) & ~keep.any(1)).any()):
            raise ValueError(
                f"{type(self.plan).__name__}: a sample keeps no span token but folds dropped "
                "ones; fold needs at least one kept span token per sample"
            )
        target = self.plan.match(keep, ctx)
        if not isinstance(target, Tensor) or target.shape != keep.shape:
            raise ValueError(f"{type(self.plan).__name__}.match must return a [B, S] long tensor")
        target = target.to(dev).long().clamp(0, keep.shape[1] - 1)
        if bool((dropped & ~keep.gather(1, target)).any()):
            raise ValueError(
                f"{type(self.plan).__name__}.match must map every dropped token to a kept one"
            )
        # destination (current position) of every token: itself, or its target's position
        dst_pos = torch.arange(lc, device=dev).expand(b, -1).clone()
        rows = torch.arange(b, device=dev)[:, None].expand_as(span_pos)[dropped]
        dst_pos[rows, span_pos[dropped]] = span_pos.gather(1, target)[dropped]
        name = type(self.plan).__name__
        d = hidden.shape[-1]
        if bool(valid.all()) and bool(new_valid.all()):
            slots = real
            merge = Merge(keep_idx=keep_cur, dst_of=(slots.long().cumsum(1) - 1).gather(1, dst_pos))
            out = self.plan.fold(hidden, merge, ctx)
            n = keep_cur.shape[1]
            if not isinstance(out, Tensor) or tuple(out.shape) != (b, n, d):
                raise ValueError(f"{name}.fold must return [B, K, D] = ({b}, {n}, {d})")
            return out
        result = kept_hidden.clone()
        for i in range(b):
            slots = real[i] | ~valid[i]  # earlier padding slots keep themselves
            keep_i = slots.nonzero()[:, 0][None]
            dst_i = (slots.long().cumsum(0) - 1).gather(0, dst_pos[i])[None]
            out = self.plan.fold(
                hidden[i : i + 1], Merge(keep_idx=keep_i, dst_of=dst_i), _ctx_row(ctx, i)
            )
            n = keep_i.shape[1]
            if not isinstance(out, Tensor) or tuple(out.shape) != (1, n, d):
                raise ValueError(f"{name}.fold must return [B, K, D] = (1, {n}, {d})")
            result[i, new_valid[i]] = out[0, real[i][keep_i[0]]].to(result.dtype)
        return result

    # ----------------------------------------------------------------- decoding
    def _active_stage(self, idx: int) -> tuple[int, _Stage]:
        assert self._state is not None
        stages = self._state.stages
        no = 0
        for i, st in enumerate(stages):
            if st.layer_idx <= idx:
                no = i
        return no, stages[no]

    def _decode_kwargs(
        self, idx: int, layer: nn.Module, hidden: Tensor, kwargs: dict, cache: Any
    ) -> dict[str, Any]:
        state = self._state
        assert state is not None
        no, stage = self._active_stage(idx)
        q = hidden.shape[1]
        past = versions.cache_length(cache, idx)
        mask = kwargs.get("attention_mask")
        full_now = versions.cache_length(cache, 0)  # layer 0 already holds this step's keys
        if isinstance(mask, Tensor) and full_now and mask.shape[-1] > full_now:
            # transformers 4.4x builds one key column more when no 2D mask is given
            mask = mask[..., :full_now]
        # keyed by the mask object too: hybrid models pass a different mask to some layers
        key = (self._call, -1 - no, id(mask))
        if key not in self._memo:
            out: dict[str, Any] = {}
            sliced = slice_mask_decode(mask, stage.keep_idx, state.full_len)
            if stage.padded:
                sliced = mask_padding_slots_decode(
                    sliced, stage.valid, q, past + q, dtype=hidden.dtype, flash=self._flash
                )
            if "attention_mask" in kwargs or stage.padded:
                out["attention_mask"] = sliced
            elif sliced is not None:
                out["attention_mask"] = sliced
            if self._reindex:
                assert stage.shift is not None
                pos = kwargs.get("position_ids")
                if not isinstance(pos, Tensor) or pos.ndim != 2:
                    raise RuntimeError(
                        "reindex_positions needs the model to pass 2D position_ids to its layers"
                    )
                new_pos = pos.expand(stage.shift.shape[0], -1) - stage.shift.to(pos.device)[:, None]
                out["position_ids"] = new_pos
                if kwargs.get("position_embeddings") is not None:
                    out["position_embeddings"] = versions.rotary_embeddings(
                        self.decoder, layer, hidden, new_pos
                    )
            self._memo[key] = out
        out = self._memo[key]
        sliced = out.get("attention_mask", mask)
        if isinstance(sliced, Tensor) and sliced.shape[-1] != past + q:
            raise RuntimeError(
                f"layer {idx}: cache holds {past} tokens but the sliced mask expects "
                f"{sliced.shape[-1] - q}; was the cache produced by another prefill?"
            )
        return out


def apply_plan(
    model: nn.Module,
    plan: TokenPlan,
    *,
    spans: SpanSpec | None = None,
    span_token_id: int | Iterable[int] | None = None,
) -> EngineHandle:
    """Apply ``plan`` to ``model``; returns a handle (also a context manager).

    Args:
        model: a Hugging Face decoder-only LM (``*ForCausalLM``, bare decoder)
            or a VLM whose ``get_decoder()`` is its language model.
        plan: a :class:`TokenPlan`.
        spans: prunable spans for the coming prefills (see
            :func:`common.engine.span_mask`); may be changed later with
            ``handle.set_spans``.
        span_token_id: token id(s) whose runs in ``input_ids`` form the spans
            when ``spans`` is not given. Default: the model config's
            ``image_token_id`` / ``video_token_id`` (or ``*_index``) if any.

    Applying a plan to a model that already has one replaces the old one.
    Raises ``RuntimeError`` on a transformers version outside the supported
    range (:mod:`common.engine.versions`).
    """
    return EngineHandle(model, plan, spans=spans, span_token_id=span_token_id)
