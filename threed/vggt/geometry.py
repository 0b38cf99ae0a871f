"""Camera conventions of VGGT: pose encoding <-> extrinsics/intrinsics, unprojection.

Extrinsics are OpenCV world-to-camera ``[R | t]`` (``[..., 3, 4]``); the 9-d
pose encoding is ``[t (3), quaternion xyzw (4), fov_h, fov_w]``; intrinsics
have the principal point at the image centre.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "quat_to_mat",
    "mat_to_quat",
    "extri_intri_to_pose_encoding",
    "pose_encoding_to_extri_intri",
    "closed_form_inverse_se3",
    "unproject_depth",
]


def quat_to_mat(quat: Tensor) -> Tensor:
    """Quaternions ``[..., 4]`` (x, y, z, w; need not be unit) -> ``[..., 3, 3]``."""
    i, j, k, r = quat.unbind(-1)
    two_s = 2.0 / (quat * quat).sum(-1)
    m = torch.stack(
        [
            1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
            two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
            two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
        ],
        dim=-1,
    )  # fmt: skip
    return m.reshape(quat.shape[:-1] + (3, 3))


def mat_to_quat(mat: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> quaternions xyzw ``[..., 4]`` with w >= 0."""
    m = mat.reshape(mat.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    q_abs = (
        torch.stack(
            [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
        )
        .clamp_min(0)
        .sqrt()
    )
    cand = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
        ],
        dim=-2,
    )  # rows: candidates in (w, x, y, z) order
    cand = cand / (2.0 * q_abs[..., None].clamp_min(0.1))
    best = q_abs.argmax(dim=-1)
    wxyz = cand.gather(-2, best[..., None, None].expand(best.shape + (1, 4)))[..., 0, :]
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def extri_intri_to_pose_encoding(
    extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]
) -> Tensor:
    """``[B, S, 3, 4]`` + ``[B, S, 3, 3]`` -> ``[B, S, 9]`` (float32)."""
    h, w = image_hw
    rot, t = extrinsics[..., :3, :3], extrinsics[..., :3, 3]
    fov_h = 2 * torch.atan((h / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / intrinsics[..., 0, 0])
    return torch.cat([t, mat_to_quat(rot), fov_h[..., None], fov_w[..., None]], -1).float()


def pose_encoding_to_extri_intri(
    pose_enc: Tensor, image_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """``[..., 9]`` -> (extrinsics ``[..., 3, 4]``, intrinsics ``[..., 3, 3]``)."""
    h, w = image_hw
    t, quat, fov_h, fov_w = (
        pose_enc[..., :3],
        pose_enc[..., 3:7],
        pose_enc[..., 7],
        pose_enc[..., 8],
    )
    extr = torch.cat([quat_to_mat(quat), t[..., None]], dim=-1)
    intr = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intr[..., 0, 0] = (w / 2.0) / torch.tan(fov_w / 2.0)
    intr[..., 1, 1] = (h / 2.0) / torch.tan(fov_h / 2.0)
    intr[..., 0, 2] = w / 2
    intr[..., 1, 2] = h / 2
    intr[..., 2, 2] = 1.0
    return extr, intr


def closed_form_inverse_se3(se3):
    """Invert ``[..., 3|4, 4]`` rigid transforms (numpy or torch) -> ``[..., 4, 4]``."""
    xp = torch if isinstance(se3, Tensor) else np
    rot, t = se3[..., :3, :3], se3[..., :3, 3:]
    rot_t = rot.transpose(-1, -2) if xp is torch else np.swapaxes(rot, -1, -2)
    out = xp.zeros(se3.shape[:-2] + (4, 4), dtype=se3.dtype)
    if xp is torch:
        out = out.to(se3.device)
    out[..., :3, :3] = rot_t
    out[..., :3, 3:] = -(rot_t @ t)
    out[..., 3, 3] = 1
    return out


def unproject_depth(
    depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray
) -> np.ndarray:
    """Depth ``[S, H, W]`` (NaN/0 = invalid) + w2c ``[S, 3, 4]`` + K ``[S, 3, 3]`` ->
    world points ``[S, H, W, 3]`` (invalid depth gives NaN)."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim == 4:
        depth = depth[..., 0]
    s, h, w = depth.shape
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    out = np.empty((s, h, w, 3))
    for i in range(s):
        k = intrinsics[i]
        z = depth[i]
        x = (u - k[0, 2]) * z / k[0, 0]
        y = (v - k[1, 2]) * z / k[1, 1]
        cam = np.stack([x, y, z], -1).reshape(-1, 3)
        c2w = closed_form_inverse_se3(np.asarray(extrinsics[i], dtype=np.float64))
        world = cam @ c2w[:3, :3].T + c2w[:3, 3]
        out[i] = world.reshape(h, w, 3)
    return out
