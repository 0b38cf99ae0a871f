"""Oracle score fields for TSP3D: what pruning does when the scores are "trained-like".

:func:`oracle_scores` temporarily replaces the logits of the two TGP levels and of CBA
with fields computed from voxel positions, shaped like the official supervision:

* 64 cm: ``P(prune)`` low inside a cube of ``keep_half_widths[0]`` (1.04 m) around any
  scene object centre;
* 32 cm: the same with ``keep_half_widths[1]`` (0.52 m) around the target centre;
* CBA: ``P(add)`` high within ``cba_radius`` of the target centre.

``logit = sharpness * (signed distance)``, so the run-time thresholds act as they would
on a model trained to convergence.  Used by the benchmark and the known-answer tests;
also a quick upper bound on what TGP can save on a user's scene.  Fields can be moved
(``cba_center``) to remove the target on purpose and watch CBA restore it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["oracle_scores"]


def _cube_distance(pos: Tensor, centers: Tensor, half_width: float) -> Tensor:
    if centers.numel() == 0:
        return pos.new_full((pos.shape[0],), 1e3)
    d = (pos[:, None, :] - centers[None].to(pos)).abs().amax(-1).amin(1)
    return d - half_width


@contextlib.contextmanager
def oracle_scores(
    model,
    scene_centers: Tensor,
    target_center: Tensor,
    *,
    target_level_center: Tensor | None = None,
    cba_center: Tensor | None = None,
    cba_radius: float = 0.3,
    sharpness: float = 8.0,
):
    """Context manager: inside it ``model`` (a TSP3DGrounder, batch size 1) scores voxels
    by the oracle fields.  scene_centers [M, 3]; target_center [3];
    ``target_level_center`` / ``cba_center`` move the 32 cm / CBA fields (default: the
    target centre)."""
    hw64, hw32 = model.config.keep_half_widths
    centers = torch.as_tensor(scene_centers, dtype=torch.float32).reshape(-1, 3)
    tc = torch.as_tensor(target_center, dtype=torch.float32).reshape(3)
    t32 = tc if target_level_center is None else torch.as_tensor(target_level_center).float()
    tcba = tc if cba_center is None else torch.as_tensor(cba_center).float()
    orig_scene, orig_target = model.tgp_scene.score, model.tgp_target.score
    captured: dict[str, Tensor] = {}

    def scene_score(x, positions, *a, **k):
        x_enc, logits, txt = orig_scene(x, positions, *a, **k)
        if logits.numel() != positions.shape[0]:
            raise RuntimeError("oracle_scores needs every voxel scored (eval mode)")
        return x_enc, sharpness * _cube_distance(positions, centers, hw64), txt

    def target_score(x, positions, *a, **k):
        x_enc, logits, txt = orig_target(x, positions, *a, **k)
        if logits.numel() != positions.shape[0]:
            raise RuntimeError("oracle_scores needs every voxel scored (eval mode)")
        return x_enc, sharpness * _cube_distance(positions, t32[None], hw32), txt

    def remember_positions(module, args, output):
        # CBA embeds its candidates' positions right before its head runs, so the last
        # input of its position embedding is what the head scores (no global patching)
        captured["cba"] = args[0]

    def cba_head(vis):  # a plain P(add) logit
        d = (captured["cba"] - tcba.to(captured["cba"])).norm(dim=1)
        return (sharpness * (cba_radius - d))[:, None]

    model.tgp_scene.score, model.tgp_target.score = scene_score, target_score
    model.cba.head.forward = cba_head
    hook = model.cba.pos_embed.register_forward_hook(remember_positions)
    try:
        yield model
    finally:
        del model.tgp_scene.score, model.tgp_target.score, model.cba.head.forward
        hook.remove()
