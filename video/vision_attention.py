"""Vision attention for HoliTom / VisionZip: the mean attention each token receives
at one layer of the vision tower, without ``output_attentions``.

The official code runs the whole SigLIP tower with ``output_attentions=True``
(eager attention in every layer, every layer's ``[B, H, N, N]`` map stored)
and reads ``attentions[-1].mean(1).mean(1)``. Here forward hooks on that one
layer catch its own queries and keys as the model computes them (nothing is
recomputed, the tower keeps SDPA / FlashAttention) and
:func:`common.scores.attention_received_from_qk` turns them into the same
numbers, a block of queries at a time.

Supported layer kinds (found by structure, not by class name):

- SigLIP / CLIP-style encoder layers (``self_attn.q_proj`` / ``k_proj``):
  records ``[B, N]`` per call (SigLIP has no CLS token; a CLIP CLS column is
  included as is);
- Qwen2-VL / Qwen2.5-VL vision blocks (``attn.qkv``, 2D rotary, attention
  within each ``cu_seqlens`` chunk, i.e. per frame group): records ``[L]``
  per call, one value per patch before the 2x2 merger, averaged over the
  queries of its own chunk.

Usage::

    with record_vision_attention(model.vision_tower) as rec:
        out = model.vision_tower(pixel_values, output_hidden_states=True)
    attention = rec.pop()  # [B, N] float32
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from common.checks import check_count
from common.engine.attention import rotate_half
from common.scores import attention_received_from_qk

__all__ = ["VisionAttentionRecorder", "record_vision_attention", "layer_for_feature_layer"]

logger = logging.getLogger(__name__)


def layer_for_feature_layer(vision_feature_layer: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``.

    ``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the
    output of layer ``i - 1``; negative indices are the same layer index
    (``hidden_states[-1]`` = ``layers[-1]``).
    """
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise TypeError(f"vision_feature_layer must be an int, got {vision_feature_layer!r}")
    if vision_feature_layer == 0:
        raise ValueError("vision_feature_layer 0 is the embedding output: no attention layer")
    return vision_feature_layer - 1 if vision_feature_layer > 0 else vision_feature_layer


def _find_layers(tower: nn.Module) -> tuple[nn.ModuleList, str]:
    for _, mod in tower.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        first = mod[0]
        sa = getattr(first, "self_attn", None)
        if sa is not None and hasattr(sa, "q_proj") and hasattr(sa, "k_proj"):
            return mod, "qk"
        at = getattr(first, "attn", None)
        if at is not None and hasattr(at, "qkv"):
            return mod, "qkv"
    raise TypeError(
        f"{type(tower).__name__} has no list of attention layers with self_attn.q_proj/k_proj "
        "(SigLIP / CLIP) or attn.qkv (Qwen2-VL)"
    )


class VisionAttentionRecorder:
    """Hooks on one attention layer of a vision tower; see the module docstring.

    Attributes:
        layer_index: the hooked layer (non-negative).
        kind: ``"qk"`` (SigLIP / CLIP) or ``"qkv"`` (Qwen2-VL).
        records: one float32 tensor per forward call since the last :meth:`pop`.
    """

    def __init__(self, tower: nn.Module, layer: int = -1, *, query_chunk: int = 256) -> None:
        if not isinstance(tower, nn.Module):
            raise TypeError(f"tower must be an nn.Module, got {type(tower).__name__}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        check_count("query_chunk", query_chunk, low=1)
        layers, self.kind = _find_layers(tower)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer must be in [{-len(layers)}, {len(layers)}), got {layer}")
        self.layer_index = layer % len(layers)
        self.query_chunk = query_chunk
        self.records: list[torch.Tensor] = []
        self._q: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._qkv: torch.Tensor | None = None
        self._kwargs: dict = {}
        block = layers[self.layer_index]
        self._handles = []
        if self.kind == "qk":
            self._attn = block.self_attn
            self._handles.append(self._attn.q_proj.register_forward_hook(self._catch_q))
            self._handles.append(self._attn.k_proj.register_forward_hook(self._catch_k))
        else:
            self._attn = block.attn
            self._handles.append(self._attn.qkv.register_forward_hook(self._catch_qkv))
            self._handles.append(
                self._attn.register_forward_pre_hook(self._catch_kwargs, with_kwargs=True)
            )
        self._handles.append(self._attn.register_forward_hook(self._compute))

    # ------------------------------------------------------------------ hooks
    def _catch_q(self, _m, _args, out):
        self._q = out.detach()

    def _catch_k(self, _m, _args, out):
        self._k = out.detach()

    def _catch_qkv(self, _m, _args, out):
        self._qkv = out.detach()

    def _catch_kwargs(self, _m, args, kwargs):
        self._kwargs = dict(kwargs)
        if len(args) > 1:
            self._kwargs.setdefault("cu_seqlens", args[1])

    def _compute(self, *_):
        try:
            if self.kind == "qk":
                self.records.append(self._from_qk())
            else:
                self.records.append(self._from_qkv())
        finally:
            self._q = self._k = self._qkv = None
            self._kwargs = {}

    def _heads(self) -> tuple[int, int]:
        a = self._attn
        num_heads = int(getattr(a, "num_heads", None) or a.config.num_attention_heads)
        head_dim = getattr(a, "head_dim", None)
        if head_dim is None:
            # transformers 4.4x's SDPA / FlashAttention vision classes keep no head_dim:
            # derive it from the query projection's width
            width = a.q_proj.out_features if self.kind == "qk" else a.qkv.out_features // 3
            head_dim = width // num_heads
        return num_heads, int(head_dim)

    def _scale(self, head_dim: int) -> float:
        for name in ("scale", "scaling"):
            v = getattr(self._attn, name, None)
            if isinstance(v, (int, float)):
                return float(v)
        return head_dim**-0.5

    def _from_qk(self) -> torch.Tensor:
        if self._q is None or self._k is None:
            raise RuntimeError("the hooked layer ran without its q_proj / k_proj")
        h, hd = self._heads()
        b, n = self._q.shape[:2]
        q = self._q.view(b, n, h, hd).transpose(1, 2)
        k = self._k.view(b, self._k.shape[1], -1, hd).transpose(1, 2)
        return attention_received_from_qk(q, k, self._scale(hd), query_chunk=self.query_chunk)

    def _from_qkv(self) -> torch.Tensor:
        if self._qkv is None:
            raise RuntimeError("the hooked layer ran without its qkv projection")
        h, hd = self._heads()
        length = self._qkv.shape[0]
        q, k, _ = self._qkv.reshape(length, 3, h, hd).unbind(1)  # [L, H, hd]
        cos_sin = self._kwargs.get("position_embeddings")
        if cos_sin is None:  # older transformers pass the rotary angles
            freqs = self._kwargs.get("rotary_pos_emb")
            if freqs is None:
                raise RuntimeError("no position_embeddings / rotary_pos_emb reached the layer")
            emb = torch.cat((freqs, freqs), dim=-1)
            cos_sin = (emb.cos(), emb.sin())
        cos, sin = (t.float()[:, None, :] for t in cos_sin)
        # rotary in float32 and back, as the model's own vision rotary
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
        cu = self._kwargs.get("cu_seqlens")
        if cu is None:
            raise RuntimeError("no cu_seqlens reached the layer")
        lengths = (cu[1:] - cu[:-1]).tolist()
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, L, hd]
        scale = self._scale(hd)
        if len(set(lengths)) == 1:  # a video: every frame group alike, one batched call
            c = len(lengths)
            qb = q.reshape(h, c, lengths[0], hd).transpose(0, 1)
            kb = k.reshape(h, c, lengths[0], hd).transpose(0, 1)
            return attention_received_from_qk(qb, kb, scale, query_chunk=self.query_chunk).reshape(
                -1
            )
        out = []
        for qi, ki in zip(q.split(lengths, dim=1), k.split(lengths, dim=1)):
            out.append(
                attention_received_from_qk(qi[None], ki[None], scale, query_chunk=self.query_chunk)[
                    0
                ]
            )
        return torch.cat(out)

    # ------------------------------------------------------------------ public
    def pop(self) -> torch.Tensor:
        """All records since the last call, concatenated along dim 0; then clears them."""
        if not self.records:
            raise RuntimeError("nothing recorded: run the vision tower inside the recorder")
        out = torch.cat(self.records, dim=0)
        self.records = []
        return out

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> VisionAttentionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def record_vision_attention(
    tower: nn.Module, layer: int = -1, *, query_chunk: int = 256
) -> VisionAttentionRecorder:
    """Hook layer ``layer`` (index into the tower's layer list, negative from the
    end; :func:`layer_for_feature_layer` maps a ``vision_feature_layer``) of
    ``tower`` (a SigLIP / CLIP vision model or transformer, or a Qwen2-VL
    vision tower); returns the recorder (a context manager that removes its hooks).
    """
    return VisionAttentionRecorder(tower, layer, query_chunk=query_chunk)
