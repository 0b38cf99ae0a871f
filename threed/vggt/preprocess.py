"""Image preprocessing like VGGT's ``load_and_preprocess_images(mode="crop")``:
width resized to 518 (bicubic), height scaled by the same factor and rounded to
a multiple of 14, centre-cropped to 518 when taller. Inputs are RGB uint8
numpy arrays ``[H, W, 3]`` or image paths; output ``[S, 3, H, W]`` float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["preprocess_images", "target_hw"]


def target_hw(height: int, width: int, target: int = 518, patch: int = 14) -> tuple[int, int]:
    """Output (H, W) for an input of the given size (after the centre crop)."""
    new_h = round(height * (target / width) / patch) * patch
    return min(new_h, target), target


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


def preprocess_images(images: Sequence, target: int = 518, patch: int = 14) -> torch.Tensor:
    """RGB arrays / paths -> ``[S, 3, H, W]`` float32 in [0, 1] (all frames the same size).

    ``target`` (default 518) and ``patch`` (14) can be reduced for small models.
    """
    from PIL import Image  # lazy

    if len(images) == 0:
        raise ValueError("images must contain at least one image")
    out = []
    for item in images:
        img = _to_pil(item)
        w, h = img.size
        new_h = round(h * (target / w) / patch) * patch
        img = img.resize((target, new_h), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if new_h > target:
            start = (new_h - target) // 2
            t = t[:, start : start + target]
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) != 1:
        raise ValueError(f"all images must give the same size after resizing, got {shapes}")
    return torch.stack(out)
