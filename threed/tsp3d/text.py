"""Frozen text encoder for TSP3D: any Hugging Face RoBERTa-like model, or an offline default.

Official TSP3D uses a frozen ``roberta-base`` (hidden 768).  ``TextEncoder(path)`` loads
any such model and its tokenizer with ``AutoModel`` / ``AutoTokenizer`` from a local
path.  With no path it builds a tiny *random* ``RobertaModel`` (deterministic, seed
argument) and a :class:`WordHashTokenizer`, so the embedded default runs offline; its
accuracy is meaningless until a real encoder and trained weights are supplied.
"""

from __future__ import annotations

import logging
import re
import zlib

import torch
from torch import Tensor, nn

__all__ = ["WordHashTokenizer", "TextEncoder", "tiny_roberta"]

logger = logging.getLogger(__name__)


class WordHashTokenizer:
    """Deterministic offline tokenizer: lower-cased words -> ``3 + crc32(word) % (V - 3)``.

    Ids 0/1/2 are RoBERTa's ``<s>``, ``<pad>``, ``</s>``; every sentence is wrapped as
    ``<s> words </s>`` and padded to the longest with ``<pad>``.  Returns the same dict
    as a Hugging Face tokenizer called with ``padding="longest", return_tensors="pt"``.
    """

    pad_token_id = 1

    def __init__(self, vocab_size: int = 1000, max_length: int = 64):
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_length - 2]
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]
        return [0, *ids, 2]

    def __call__(self, texts: list[str], **_: object) -> dict[str, Tensor]:
        seqs = [self.encode(t) for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_roberta(
    hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 1000, seed: int = 0
) -> nn.Module:
    """A small random ``RobertaModel`` built in-process (no download), seeded."""
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaModel(cfg, add_pooling_layer=False)
    return model


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _has_tokenizer_files(path: str) -> bool:
    from pathlib import Path

    p = Path(path)
    if not p.is_dir():
        return True  # a hub-style name: let transformers resolve it
    return any((p / f).exists() for f in _TOKENIZER_FILES)


def _load_local_model(auto_model, path: str) -> nn.Module:
    """``AutoModel.from_pretrained`` without network: a local folder, or a name already in
    the Hugging Face cache. Anything else is "folder not found" (the project never
    downloads weights), not transformers' hub repo-id error."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(
            f"text encoder path {path} is a file; expected the folder of a Hugging Face "
            "RoBERTa-like model (config.json + weights)"
        )
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {path} has no config.json (expected a Hugging Face "
            "RoBERTa-like model saved with save_pretrained)"
        )
    try:
        return auto_model.from_pretrained(str(p) if p.is_dir() else path, local_files_only=True)
    except OSError:
        if p.is_dir():
            raise
        raise FileNotFoundError(
            f"text encoder folder not found: {path} (nor a model of that name in the "
            "Hugging Face cache; weights are never downloaded)"
        ) from None


class TextEncoder(nn.Module):
    """Frozen text encoder: ``texts -> (hidden [B, L, H], pad_mask [B, L])`` (True = padding).

    ``path``: local directory of a Hugging Face RoBERTa-like model (``AutoModel`` /
    ``AutoTokenizer``); ``None`` builds :func:`tiny_roberta` + :class:`WordHashTokenizer`.
    ``model`` / ``tokenizer`` may be passed directly instead (tests).  The encoder stays
    in eval mode and has no trainable parameters.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer=None,
        seed: int = 0,
    ):
        super().__init__()
        if model is None and path is not None:
            from transformers import AutoModel, AutoTokenizer

            path = str(path)
            model = _load_local_model(AutoModel, path)
            if tokenizer is None and _has_tokenizer_files(path):
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            elif tokenizer is None:
                # transformers 5 would build an empty (5-token) tokenizer from the config
                logger.warning("no tokenizer files in %s; using the word-hash tokenizer", path)
        elif model is None:
            model = tiny_roberta(seed=seed)
        if tokenizer is None:
            tokenizer = WordHashTokenizer(vocab_size=int(model.config.vocab_size))
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.seed = seed
        self.hidden_size = int(model.config.hidden_size)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):  # the encoder is frozen: always eval
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of strings")
        tok = self.tokenizer(list(texts), padding="longest", return_tensors="pt")
        device = next(self.model.parameters()).device
        ids = tok["input_ids"].to(device)
        mask = tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask == 0
