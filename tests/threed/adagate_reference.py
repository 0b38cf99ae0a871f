"""Shared set-up of the AdaToken-3D author-code reference (``data/adagate_author_reference.json``).

The JSON holds what the author code (junkerman2004/Adatoken-3D,
``llava/model/modeling_llama_pdrop.py``: ``LlamaModel.pdrop_forward`` with
``layer_list=[2, 4, 6]``, ``image_token_ratio_list=[1, 0.5, 0.25, 0.125]``,
eager attention, batch 1) produced under transformers 4.37.2 on a tiny LLaMA
whose weights and input embeddings come from :func:`seeded_weights` /
:func:`seeded_embeds` below (so any transformers version rebuilds the same
model): the spatial tokens kept at each gate (original indices), the greedy
tokens of a 5-step decode with its KV cache, and their logits. It was
written by running that file in a scratch environment outside the project;
none of its code is here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "adagate_author_reference.json"
CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
PREFIX, SPATIAL, QUESTION = 35, 203, 20
LAYERS = (2, 4, 6)
KEEP = (0.5, 0.25, 0.125)
STEPS = 5


@torch.no_grad()
def seeded_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter from one generator, in sorted-name order."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.08 * noise)


def seeded_embeds(seed: int = 1) -> torch.Tensor:
    """``[1, L, 64]`` input embeddings of the LLaVA-3D-like layout."""
    gen = torch.Generator().manual_seed(seed)
    length = PREFIX + SPATIAL + QUESTION
    return 0.5 * torch.randn(1, length, CONFIG["hidden_size"], generator=gen)


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text())
