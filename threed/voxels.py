"""Voxel bookkeeping shared by the 3D models (torch only)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unique_voxels"]


def unique_voxels(cells: Tensor) -> tuple[Tensor, Tensor]:
    """The occupied voxels of integer cells ``[N, 3]`` (all >= 0): ``(inverse [N], coords [M, 3])``.

    ``coords`` holds one row per distinct cell, ascending by (x, y, z); ``inverse[n]`` is
    the row of cell ``n``. Cells are raveled to one key each, so a single 1-D unique
    does the work (cheaper than ``torch.unique(dim=0)``).
    """
    ext = cells.max(0).values + 1
    key = (cells[:, 0] * ext[1] + cells[:, 1]) * ext[2] + cells[:, 2]
    ukey, inverse = torch.unique(key, return_inverse=True)
    coords = torch.stack([ukey // (ext[1] * ext[2]), (ukey // ext[2]) % ext[1], ukey % ext[2]], 1)
    return inverse, coords
