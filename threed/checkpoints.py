"""Reading checkpoint files safely, with errors a user can act on.

Shared by the VGGT and TSP3D loaders. Files are read with ``torch.load(...,
weights_only=True)`` only: a checkpoint that needs arbitrary unpickling is refused,
and the error never suggests ``weights_only=False`` (which runs code from the file).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "read_checkpoint", "missing_keys_message"]


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (unreadable, or of another model)."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` (or safetensors for ``*.safetensors``)
    with one-line errors.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` for a
    folder, an unreadable file (garbage, truncated, empty) or a pickle that holds Python
    objects other than tensors and plain containers.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; expected a {what} file")
    if p.suffix == ".safetensors":  # e.g. the Hugging Face copy of a state dict
        return _read_safetensors(p, map_location, what)
    try:
        with warnings.catch_warnings():
            # a protocol-4 pickle (plain pickle.dump) is still read; the note is noise here
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            return torch.load(str(p), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises KeyError, EOFError, RuntimeError, UnpicklingError...
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            reason = (
                "it holds Python objects other than tensors and plain containers, and "
                "unpickling those could run code from the file"
            )
        else:
            reason = f"torch.load could not read it ({_first_line(e)})"
        raise CheckpointError(f"{p} is not a {what}: {reason}") from None


def _read_safetensors(p: Path, map_location: Any, what: str) -> dict:
    """A ``.safetensors`` file as a state dict (the format cannot hold code)."""
    try:
        from safetensors.torch import load_file  # lazy: installed with transformers
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError(f"reading {p} needs the safetensors package") from e
    # torch.device("cuda:1") counts too; a callable or dict map_location has no equivalent
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(str(p), device=device)
    except Exception as e:
        raise CheckpointError(f"{p} is not a {what}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """The first line of the error (160 characters at most), or its type's name."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def missing_keys_message(path: str | Path, what: str, missing: list[str], found: list[str]) -> str:
    """``"<path> is not a <what> checkpoint: missing a, b, ... (it holds x, y, ...)"``."""
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    tops = sorted({k.split(".")[0] for k in found})
    held = ", ".join(tops[:8]) + (", ..." if len(tops) > 8 else "") if tops else "no tensors"
    return f"{path} is not a {what} checkpoint: missing {shown} (it holds {held})"
