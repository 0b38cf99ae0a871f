"""Reconstruction and pose metrics with the FastVGGT / VGGT evaluation protocols.

- :func:`fastvggt_chamfer`: predicted depth filtered at confidence >= 3,
  unprojected with the *predicted* cameras (frame 0 = world), mapped into the
  GT world by the first GT camera-to-world pose, scale-aligned to the GT
  cloud by bounding-box diagonal (and box centre), then :func:`chamfer_distance`:
  100k random points per cloud (numpy seed 33), 5 cm voxel downsample,
  nearest-neighbour distances clipped at 0.5 m. Official quirk: the official
  code returns ``mean(pred->gt) + mean(gt->pred)`` (the sum of the two
  directional means); ``reduction="mean"`` halves it.
- :func:`trajectory_metrics`: ATE (translation RMSE), ARE (rotation-angle
  RMSE, degrees) and RPE (consecutive pairs, translation and rotation RMSE)
  after a Sim(3) Umeyama alignment of the positions, as evo's
  ``ape``/``rpe`` with ``align=True, correct_scale=True``. The official
  script passes world-to-camera matrices (so "positions" are w2c
  translations); pass whichever convention you mean, both the same.
  Official quirk: it also passes ``align_origin=True``, so after the Sim(3)
  fit the estimate is moved rigidly onto the first GT pose (this changes
  ATE and ARE, not RPE); ``align_origin=False`` gives the pure Sim(3) figures.
- :func:`pose_auc`: VGGT's AUC@30: over all frame pairs, relative poses
  ``E_i @ inv(E_j)`` (w2c), error = max(rotation angle, translation
  direction angle (sign-agnostic)), histogram with 1-degree bins to 30,
  mean of the cumulative sum.

open3d is imported lazily (only :func:`chamfer_distance` needs it).
"""

from __future__ import annotations

import numpy as np

from .geometry import closed_form_inverse_se3, unproject_depth

__all__ = [
    "umeyama",
    "align_bbox_scale",
    "chamfer_distance",
    "predicted_points",
    "fastvggt_chamfer",
    "trajectory_metrics",
    "relative_pose_errors",
    "pose_auc",
    "rotation_angle_deg",
]


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True):
    """Least-squares ``dst ~ s R src + t`` for ``[N, 3]`` point sets -> ``(s, R, t)``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"src and dst must both be [N, 3], got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    rot = u @ sign @ vt
    var = (sc**2).sum() / len(src)
    s = float(np.trace(np.diag(d) @ sign) / var) if (with_scale and var > 1e-12) else 1.0
    t = mu_d - s * rot @ mu_s
    return s, rot, t


def align_bbox_scale(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale ``source`` about its box centre by the ratio of box diagonals and move
    its box centre onto ``target``'s (FastVGGT's ``align_point_clouds_scale``)."""
    smin, smax = source.min(0), source.max(0)
    tmin, tmax = target.min(0), target.max(0)
    sdiag = float(np.linalg.norm(smax - smin))
    scale = float(np.linalg.norm(tmax - tmin)) / sdiag if sdiag > 1e-8 else 1.0
    out = (source - (smax + smin) / 2) * scale + (tmax + tmin) / 2
    return out, scale


def _subsample(points: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    if len(points) <= max_points:
        return points
    # same draw as the official np.random.seed(33); np.random.choice(...)
    idx = np.random.RandomState(seed).choice(len(points), max_points, replace=False)
    return points[idx]


def chamfer_distance(
    pred: np.ndarray,
    gt: np.ndarray,
    max_dist: float = 0.5,
    voxel_size: float = 0.05,
    max_points: int = 100_000,
    seed: int = 33,
    reduction: str = "sum",
) -> float:
    """Chamfer distance of two ``[N, 3]`` clouds (FastVGGT protocol; see module doc)."""
    import open3d as o3d  # lazy

    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    pred = _subsample(np.asarray(pred, np.float64), max_points, seed)
    gt = _subsample(np.asarray(gt, np.float64), max_points, seed)
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError("both point clouds must be non-empty")
    clouds = []
    for pts in (pred, gt):
        pc = o3d.geometry.PointCloud()
        pc.points = o3d.utility.Vector3dVector(pts)
        clouds.append(pc.voxel_down_sample(voxel_size) if voxel_size > 0 else pc)
    d1 = np.clip(np.asarray(clouds[0].compute_point_cloud_distance(clouds[1])), 0, max_dist)
    d2 = np.clip(np.asarray(clouds[1].compute_point_cloud_distance(clouds[0])), 0, max_dist)
    total = float(d1.mean() + d2.mean())
    return total if reduction == "sum" else total / 2


def predicted_points(
    depth: np.ndarray,
    depth_conf: np.ndarray,
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    conf_threshold: float = 3.0,
) -> np.ndarray:
    """Depth ``[S, H, W(, 1)]`` with confidence ``[S, H, W]`` and predicted w2c
    ``[S, 3, 4]`` / K ``[S, 3, 3]`` -> ``[M, 3]`` points where conf >= threshold."""
    depth = np.array(depth, dtype=np.float64)
    if depth.ndim == 4:
        depth = depth[..., 0]
    depth[np.asarray(depth_conf) < conf_threshold] = np.nan
    pts = unproject_depth(depth, extrinsics, intrinsics).reshape(-1, 3)
    return pts[np.isfinite(pts).all(1)]


def fastvggt_chamfer(
    depth: np.ndarray,
    depth_conf: np.ndarray,
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    first_gt_pose: np.ndarray,
    gt_points: np.ndarray,
    conf_threshold: float = 3.0,
    max_dist: float = 0.5,
    reduction: str = "sum",
) -> float:
    """The FastVGGT ScanNet Chamfer protocol end to end (see module doc)."""
    pts = predicted_points(depth, depth_conf, extrinsics, intrinsics, conf_threshold)
    if len(pts) == 0:
        return float("nan")
    pose = np.asarray(first_gt_pose, np.float64)
    world = pts @ pose[:3, :3].T + pose[:3, 3]
    aligned, _ = align_bbox_scale(world, np.asarray(gt_points, np.float64))
    return chamfer_distance(aligned, gt_points, max_dist=max_dist, reduction=reduction)


def rotation_angle_deg(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Angle (degrees) of ``r1^T r2`` for ``[..., 3, 3]`` rotations."""
    rel = np.swapaxes(r1, -1, -2) @ r2
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1) / 2
    skew = rel - np.swapaxes(rel, -1, -2)
    sin = np.sqrt(skew[..., 0, 1] ** 2 + skew[..., 0, 2] ** 2 + skew[..., 1, 2] ** 2) / 2
    return np.degrees(np.arctan2(sin, cos))  # stable near 0 (unlike arccos)


def _as44(poses: np.ndarray) -> np.ndarray:
    poses = np.asarray(poses, np.float64)
    if poses.shape[-2:] == (4, 4):
        return poses
    if poses.shape[-2:] != (3, 4):
        raise ValueError(f"poses must be [S, 3|4, 4], got {poses.shape}")
    out = np.tile(np.eye(4), poses.shape[:-2] + (1, 1))
    out[..., :3, :] = poses
    return out


def trajectory_metrics(
    pred: np.ndarray, gt: np.ndarray, align: bool = True, align_origin: bool = True
) -> dict[str, float]:
    """ATE / ARE / RPE of ``[S, 3|4, 4]`` poses (same convention) after Sim(3) alignment.

    ``align_origin`` (official default, evo's ``align_origin=True``): after the
    Sim(3) fit, left-multiply the estimate by ``gt[0] @ inv(est[0])`` so its
    first pose equals the first GT pose. ``False``: the Sim(3) fit alone.
    """
    p, g = _as44(pred), _as44(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if align and len(p) >= 2:
        s, rot, t = umeyama(p[:, :3, 3], g[:, :3, 3], with_scale=True)
    else:
        s, rot, t = 1.0, np.eye(3), np.zeros(3)
    a = p.copy()
    a[:, :3, :3] = rot @ p[:, :3, :3]
    a[:, :3, 3] = s * p[:, :3, 3] @ rot.T + t
    if align_origin and len(a):
        a = (g[0] @ np.linalg.inv(a[0])) @ a
    ate = float(np.sqrt(np.mean(np.sum((a[:, :3, 3] - g[:, :3, 3]) ** 2, axis=1))))
    are = float(np.sqrt(np.mean(rotation_angle_deg(g[:, :3, :3], a[:, :3, :3]) ** 2)))
    if len(p) >= 2:
        rel_g = np.linalg.inv(g[:-1]) @ g[1:]
        rel_a = np.linalg.inv(a[:-1]) @ a[1:]
        err = np.linalg.inv(rel_g) @ rel_a
        rpe_t = float(np.sqrt(np.mean(np.sum(err[:, :3, 3] ** 2, axis=1))))
        rpe_r = float(np.sqrt(np.mean(rotation_angle_deg(np.eye(3), err[:, :3, :3]) ** 2)))
    else:
        rpe_t = rpe_r = 0.0
    return {"ate": ate, "are": are, "rpe_trans": rpe_t, "rpe_rot": rpe_r, "sim3_scale": float(s)}


def relative_pose_errors(pred_w2c: np.ndarray, gt_w2c: np.ndarray):
    """All pairs i < j: (rotation error deg, translation-direction error deg)."""
    p, g = _as44(pred_w2c), _as44(gt_w2c)
    i, j = np.triu_indices(len(p), k=1)
    rel_p = p[i] @ closed_form_inverse_se3(p[j])
    rel_g = g[i] @ closed_form_inverse_se3(g[j])
    r_err = rotation_angle_deg(rel_g[:, :3, :3], rel_p[:, :3, :3])
    tp, tg = rel_p[:, :3, 3], rel_g[:, :3, 3]
    tp = tp / (np.linalg.norm(tp, axis=1, keepdims=True) + 1e-15)
    tg = tg / (np.linalg.norm(tg, axis=1, keepdims=True) + 1e-15)
    t_err = np.degrees(np.arccos(np.clip(np.abs((tp * tg).sum(1)), 0.0, 1.0)))
    return r_err, t_err


def pose_auc(pred_w2c: np.ndarray, gt_w2c: np.ndarray, max_threshold: int = 30) -> float:
    """VGGT's pose AUC@max_threshold (in [0, 1]) over all frame pairs."""
    r_err, t_err = relative_pose_errors(pred_w2c, gt_w2c)
    if len(r_err) == 0:
        return float("nan")
    worst = np.maximum(r_err, t_err)
    hist, _ = np.histogram(worst, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(hist / len(worst))))
