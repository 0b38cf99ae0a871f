"""TSP3D training losses and box utilities.

Official ``TSPHead._loss``: keep loss (sigmoid focal, label 0 = prune, so the logit
is P(prune); normalised by the number of keep voxels, each level divided by 3),
classification focal loss on the final voxels (positives: the 32 voxels nearest to
the target centre, TR3D assigner), completion focal loss on the CBA candidates
(same assigner), DIoU box loss on the positives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pruning import keep_targets

__all__ = [
    "sigmoid_focal_loss",
    "axis_aligned_iou",
    "axis_aligned_diou_loss",
    "assign_nearest",
    "grounding_loss",
]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Element-wise sigmoid focal loss (mmdet defaults); targets 0/1 float, same shape."""
    t = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pt = (1 - p) * t + p * (1 - t)
    w = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    return ce * w


def _corners(b: Tensor) -> tuple[Tensor, Tensor]:
    return b[..., :3] - b[..., 3:6] / 2, b[..., :3] + b[..., 3:6] / 2


def axis_aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of aligned pairs of axis-aligned boxes ``[..., 6]`` (cx, cy, cz, dx, dy, dz)."""
    alo, ahi = _corners(a)
    blo, bhi = _corners(b)
    inter = (torch.minimum(ahi, bhi) - torch.maximum(alo, blo)).clamp(min=0).prod(-1)
    va = (ahi - alo).clamp(min=0).prod(-1)
    vb = (bhi - blo).clamp(min=0).prod(-1)
    return inter / (va + vb - inter).clamp(min=1e-9)


def axis_aligned_diou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - IoU + |c_p - c_t|^2 / diag(enclosing)^2`` per pair ``[N]``."""
    iou = axis_aligned_iou(pred, target)
    plo, phi = _corners(pred)
    tlo, thi = _corners(target)
    r2 = ((pred[..., :3] - target[..., :3]) ** 2).sum(-1)
    c2 = ((torch.maximum(phi, thi) - torch.minimum(plo, tlo)) ** 2).sum(-1).clamp(min=1e-9)
    return 1 - iou + r2 / c2


def assign_nearest(positions: Tensor, batch_idx: Tensor, centers: Tensor, top_k: int) -> Tensor:
    """TR3D assigner with one box: positives are the ``top_k`` voxels nearest to the
    target centre of their scene (strictly closer than the ``top_k + 1``-th).

    positions [N, 3], batch_idx [N], centers [B, 3] -> bool [N].
    """
    pos = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
    for b in range(centers.shape[0]):
        rows = torch.nonzero(batch_idx == b).squeeze(1)
        if rows.numel() == 0:
            continue
        d = ((positions[rows] - centers[b]) ** 2).sum(-1)
        kth = torch.topk(d, min(top_k + 1, rows.numel()), largest=False).values[-1]
        pos[rows[d < kth]] = True
    return pos


def grounding_loss(
    out, target_boxes: Tensor, scene_centers: list[Tensor], target_centers: list[Tensor], config
) -> dict[str, Tensor]:
    """Loss terms of one forward pass (training mode, pruning on).

    out: GroundingOutput; target_boxes [B, 6]; scene_centers: per scene ``[M, 3]``
    centres of all objects (64 cm keep targets); target_centers: per scene ``[K, 3]``
    target (+ anchor) centres (32 cm keep targets).  Returns a dict with
    ``keep_loss``, ``cls_loss``, ``bbox_loss``, ``com_loss`` and their sum ``loss``.
    """
    a, g = config.focal_alpha, config.focal_gamma
    # targets usually come from the CPU data pipeline while the model may run on CUDA
    dev = out.positions.device
    target_boxes = target_boxes.to(device=dev, dtype=out.voxel_boxes.dtype)
    scene_centers = [c.to(dev) for c in scene_centers]
    target_centers = [c.to(dev) for c in target_centers]
    bsz = target_boxes.shape[0]
    # keep loss (64: all objects + target/anchor, 32: target/anchor only)
    keep_loss = target_boxes.new_zeros(())
    for level, hw, centers in (
        (
            64,
            config.keep_half_widths[0],
            [torch.cat([s, t]) for s, t in zip(scene_centers, target_centers)],
        ),
        (32, config.keep_half_widths[1], target_centers),
    ):
        k = out.keep[level]
        gt = keep_targets(k["positions"], k["batch_idx"], centers, hw)
        for b in range(bsz):
            rows = k["batch_idx"] == b
            if not bool(rows.any()):
                continue
            loss = sigmoid_focal_loss(k["logits"][rows], (~gt[rows]).float(), a, g)
            denom = max(int(gt[rows].sum()), 1) if bool(gt[rows].any()) else int(rows.sum())
            keep_loss = keep_loss + loss.sum() / denom / 3
    keep_loss = keep_loss / bsz
    # classification + box
    pos = assign_nearest(out.positions, out.batch_idx, target_boxes[:, :3], config.top_pts)
    cls_loss = sigmoid_focal_loss(out.cls_logits, pos.float(), a, g).sum() / max(int(pos.sum()), 1)
    if bool(pos.any()):
        bbox_loss = axis_aligned_diou_loss(
            out.voxel_boxes[pos], target_boxes[out.batch_idx[pos]]
        ).mean()
    else:
        bbox_loss = out.voxel_boxes.sum() * 0
    # completion
    if out.cba is not None:
        c = out.cba
        cpos = assign_nearest(c["positions"], c["batch_idx"], target_boxes[:, :3], config.top_pts)
        com_loss = sigmoid_focal_loss(c["logits"], cpos.float(), a, g).sum() / max(
            int(cpos.sum()), 1
        )
    else:
        com_loss = keep_loss * 0
    total = keep_loss + cls_loss + bbox_loss + com_loss
    return {
        "loss": total,
        "keep_loss": keep_loss,
        "cls_loss": cls_loss,
        "bbox_loss": bbox_loss,
        "com_loss": com_loss,
    }
