"""Image preprocessing like VGGT's ``load_and_preprocess_images`` (vggt/utils/load_fn.py).

* ``mode="crop"`` (official default): width resized to 518 (bicubic), height scaled by
  the same factor and rounded to a multiple of 14, centre-cropped to 518 when taller.
* ``mode="pad"``: the longer side resized to 518, the other scaled and rounded to a
  multiple of 14, then padded with white (1.0) to a 518 x 518 square, centred.

Frames of different sizes after this (crop mode with mixed aspect ratios) are padded
with white to the largest height and width, centred, as the official loader does
(``mixed_sizes="pad"``, default; it logs a warning where the official code prints
one), or refused (``mixed_sizes="raise"``). RGBA files are composited onto white.
Inputs are RGB uint8 numpy arrays ``[H, W, 3]`` (float arrays in [0, 1] are also
accepted) or image paths; the output is ``[S, 3, H, W]`` float32 in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["preprocess_images", "target_hw"]

log = logging.getLogger(__name__)

_MODES = ("crop", "pad")
_MIXED = ("pad", "raise")


def _resized_hw(height: int, width: int, mode: str, target: int, patch: int) -> tuple[int, int]:
    """(H, W) after the resize, before any crop or pad."""
    if mode == "pad" and height > width:
        return target, round(width * (target / height) / patch) * patch
    return round(height * (target / width) / patch) * patch, target


def target_hw(
    height: int, width: int, target: int = 518, patch: int = 14, mode: str = "crop"
) -> tuple[int, int]:
    """Output (H, W) of one input of the given size (after the crop, or the square pad)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "pad":
        return target, target
    new_h, new_w = _resized_hw(height, width, mode, target, patch)
    return min(new_h, target), new_w


def _to_pil(item):
    from PIL import Image  # lazy

    if isinstance(item, (str, Path)):
        img = Image.open(item)
        if img.mode == "RGBA":
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        return img.convert("RGB")
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image arrays must be [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _pad_white(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, h, w]`` -> ``[3, height, width]``, centred (extra pixel bottom / right)."""
    dh, dw = height - t.shape[1], width - t.shape[2]
    if dh <= 0 and dw <= 0:
        return t
    top, left = dh // 2, dw // 2
    return F.pad(t, (left, dw - left, top, dh - top), mode="constant", value=1.0)


def preprocess_images(
    images: Sequence,
    target: int = 518,
    patch: int = 14,
    mode: str = "crop",
    mixed_sizes: str = "pad",
) -> torch.Tensor:
    """RGB arrays / paths -> ``[S, 3, H, W]`` float32 in [0, 1].

    ``mode``: ``"crop"`` (official default) or ``"pad"`` (white square), see the module
    docstring. ``mixed_sizes``: frames that still differ in size are padded with white
    to the largest (``"pad"``, official) or refused (``"raise"``). ``target`` (518) and
    ``patch`` (14) can be reduced for small models.
    """
    from PIL import Image  # lazy

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mixed_sizes not in _MIXED:
        raise ValueError(f"mixed_sizes must be one of {_MIXED}, got {mixed_sizes!r}")
    if len(images) == 0:
        raise ValueError("images must contain at least one image")
    out = []
    for item in images:
        img = _to_pil(item)
        w, h = img.size
        new_h, new_w = _resized_hw(h, w, mode, target, patch)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if mode == "crop" and new_h > target:
            start = (new_h - target) // 2
            t = t[:, start : start + target]
        if mode == "pad":
            t = _pad_white(t, target, target)
        out.append(t)
    shapes = {tuple(t.shape[1:]) for t in out}
    if len(shapes) > 1:
        if mixed_sizes == "raise":
            raise ValueError(
                f"all images must give the same size after resizing, got {sorted(shapes)} "
                "(mixed_sizes='pad' pads them with white as the official loader)"
            )
        height = max(s[0] for s in shapes)
        width = max(s[1] for s in shapes)
        log.warning(
            "images of different sizes %s: padded with white to %dx%d",
            sorted(shapes),
            height,
            width,
        )
        out = [_pad_white(t, height, width) for t in out]
    return torch.stack(out)
