"""A test stand-in for LLaVA-3D's ``LlavaLlamaForCausalLM`` (not the real model).

LLaVA-3D (ZCMax/LLaVA-3D) cannot be installed here (CLIP tower, its own
package, transformers 4.37.2 pin, weights). This stand-in reproduces only the
part AdaGate relies on, written from reading ``llava/model/llava_arch.py``
and ``llava/model/language_model/llava_llama.py``:

* ``prepare_inputs_labels_for_multimodal(input_ids, position_ids,
  attention_mask, past_key_values, labels, images, depths, poses,
  intrinsics, lengths, clicks=None, image_sizes=None)``: drops each sample's
  padding, replaces the ``<image>`` placeholder (-200) with that scene's
  spatial tokens (a different count per scene) and each ``<boxes>`` click
  placeholder (-300) with one click token, re-pads (right by default, left
  when ``config.tokenizer_padding_side == "left"``) and returns
  ``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``
  (early return when there are no images or a single-token input);
* ``generate(inputs, images=..., depths=..., poses=..., intrinsics=...,
  clicks=..., **kwargs)``: builds the embeddings with the method above,
  looked up on the instance as LLaVA-3D does, then calls
  ``LlamaForCausalLM.generate(inputs_embeds=..., attention_mask=...,
  position_ids=...)``; ``inputs_embeds`` given directly is refused, as in
  LLaVA-3D;
* ``forward`` builds the embeddings itself when given ``input_ids`` and images.

The "scene encoder" is a linear map of per-point features (``images`` is a
list of ``[N_i, F]`` tensors standing in for the voxelised RGB-D features)
and the click encoder a linear map of xyz: enough to make spatial tokens
that differ from text tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

IMAGE_TOKEN_INDEX = -200
LOC_TOKEN_INDEX = -300
IGNORE_INDEX = -100
SCENE_FEATURES = 6


class Llava3DStandIn(LlamaForCausalLM):
    """LLaVA-3D's input-building and generate calling pattern on a real ``LlamaForCausalLM``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.scene_proj = nn.Linear(SCENE_FEATURES, config.hidden_size)
        self.click_proj = nn.Linear(3, config.hidden_size)
        self.post_init()

    # --------------------------------------------------------------- LLaVA-3D API
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        depths,
        poses,
        intrinsics,
        lengths,
        clicks=None,
        image_sizes=None,
    ):
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        image_features = [self.scene_proj(scene.to(self.dtype)) for scene in images]
        if clicks is None:
            prompt_features = self.click_proj(torch.zeros(0, 3, dtype=self.dtype))
        else:
            prompt_features = self.click_proj(torch.as_tensor(clicks, dtype=self.dtype))

        _labels, _position_ids, _attention_mask = labels, position_ids, attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        input_ids = [ids[m] for ids, m in zip(input_ids, attention_mask)]
        labels = [lab[m] for lab, m in zip(labels, attention_mask)]

        embed = self.get_input_embeddings()
        new_embeds, new_labels = [], []
        cur_image = cur_prompt = 0
        for b, ids in enumerate(input_ids):
            specials = ((ids == IMAGE_TOKEN_INDEX) | (ids == LOC_TOKEN_INDEX)).nonzero().flatten()
            bounds = [-1] + specials.tolist() + [ids.shape[0]]
            pieces, piece_labels = [], []
            for i in range(len(bounds) - 1):
                text = ids[bounds[i] + 1 : bounds[i + 1]]
                pieces.append(embed(text))
                piece_labels.append(labels[b][bounds[i] + 1 : bounds[i + 1]])
                if i < len(specials):
                    if int(ids[specials[i]]) == IMAGE_TOKEN_INDEX:
                        feats = image_features[cur_image]
                        cur_image += 1
                    else:
                        feats = prompt_features[cur_prompt][None]
                        cur_prompt += 1
                    pieces.append(feats)
                    piece_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX))
            new_embeds.append(torch.cat(pieces))
            new_labels.append(torch.cat(piece_labels))

        max_len = max(x.shape[0] for x in new_embeds)
        batch = len(new_embeds)
        hidden = new_embeds[0].shape[1]
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        embeds = torch.zeros(batch, max_len, hidden, dtype=new_embeds[0].dtype)
        labels_out = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, max_len, dtype=attention_mask.dtype)
        position_ids = torch.zeros(batch, max_len, dtype=torch.long)
        for b, (e, lab) in enumerate(zip(new_embeds, new_labels)):
            n = e.shape[0]
            sl = slice(max_len - n, max_len) if left else slice(0, n)
            embeds[b, sl] = e
            labels_out[b, sl] = lab
            attention_mask[b, sl] = True
            position_ids[b, sl] = torch.arange(n)
        return (
            None,
            None if _position_ids is None else position_ids,
            None if _attention_mask is None else attention_mask.to(_attention_mask.dtype),
            past_key_values,
            embeds,
            None if _labels is None else labels_out,
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        images=None,
        clicks=None,
        **kwargs,
    ):
        if inputs_embeds is None and images is not None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    labels,
                    images,
                    None,
                    None,
                    None,
                    None,
                    clicks,
                )
            )
        if past_key_values is not None:  # 5.x also passes it as `cache`
            kwargs["past_key_values"] = past_key_values
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs=None,
        images=None,
        depths=None,
        poses=None,
        intrinsics=None,
        lengths=None,
        clicks=None,
        image_sizes=None,
        **kwargs,
    ):
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        if images is not None:
            (_, position_ids, attention_mask, _, inputs_embeds, _) = (
                self.prepare_inputs_labels_for_multimodal(
                    inputs,
                    position_ids,
                    attention_mask,
                    None,
                    None,
                    images,
                    depths,
                    poses,
                    intrinsics,
                    lengths,
                    clicks,
                    image_sizes=image_sizes,
                )
            )
        else:
            inputs_embeds = self.get_input_embeddings()(inputs)
        return super().generate(
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


def tiny_config(
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 4,
    impl: str = "sdpa",
    padding_side: str = "left",
    vocab: int = 128,
) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # random weights: never stop early (4.37 ignores eos_token_id=None)
    )
    cfg._attn_implementation = impl
    cfg.tokenizer_padding_side = padding_side
    return cfg


def build(seed: int = 0, **cfg_kwargs) -> Llava3DStandIn:
    torch.manual_seed(seed)
    return Llava3DStandIn(tiny_config(**cfg_kwargs)).eval()


def llava3d_batch(
    seed: int = 0,
    *,
    scene_tokens: tuple[int, ...] = (40, 56),
    prefix: int = 35,
    question: tuple[int, ...] = (12, 9),
    click: tuple[bool, ...] = (True, False),
    vocab: int = 128,
):
    """Left-padded LLaVA-3D-style prompts: ``prefix`` text, ``<image>``, ``\\n``, optional
    ``<boxes>`` click, question. Returns ``(input_ids, attention_mask, images, clicks)``.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    clicks = []
    for q, c in zip(question, click):
        parts = [
            torch.randint(3, vocab, (prefix,), generator=gen),
            torch.tensor([IMAGE_TOKEN_INDEX]),
            torch.randint(3, vocab, (1,), generator=gen),
        ]
        if c:
            parts.append(torch.tensor([LOC_TOKEN_INDEX]))
            clicks.append(torch.rand(3, generator=gen).tolist())
        parts.append(torch.randint(3, vocab, (q,), generator=gen))
        rows.append(torch.cat(parts))
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    images = [torch.randn(n, SCENE_FEATURES, generator=gen) for n in scene_tokens[: len(rows)]]
    return ids, mask, images, (clicks or None)
