"""Metrics with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threed.vggt import (
    extri_intri_to_pose_encoding,
    pose_encoding_to_extri_intri,
    preprocess_images,
    target_hw,
)
from threed.vggt.metrics import (
    align_bbox_scale,
    chamfer_distance,
    fastvggt_chamfer,
    pose_auc,
    trajectory_metrics,
    umeyama,
)


def _rot_z(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _sparse_cloud(n=50, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3), -1).reshape(-1, 3) * 3.0
    return rng.permutation(grid)[:n]  # points 3 m apart: one per voxel


def test_chamfer_known_answers():
    pytest.importorskip("open3d")
    pts = _sparse_cloud()
    assert chamfer_distance(pts, pts) == pytest.approx(0.0, abs=1e-9)
    shifted = pts + np.array([0.1, 0, 0])
    assert chamfer_distance(pts, shifted) == pytest.approx(0.2, abs=1e-6)
    assert chamfer_distance(pts, shifted, reduction="mean") == pytest.approx(0.1, abs=1e-6)
    far = pts + np.array([0.8, 0, 0])  # clipped at 0.5 m each way
    assert chamfer_distance(pts, far) == pytest.approx(1.0, abs=1e-6)


def test_bbox_alignment_and_umeyama():
    pts = np.random.default_rng(1).normal(size=(200, 3))
    moved = pts * 2.5 + np.array([1.0, -2.0, 3.0])
    aligned, scale = align_bbox_scale(moved, pts)
    assert scale == pytest.approx(0.4)
    np.testing.assert_allclose(aligned, pts, atol=1e-9)
    rot = _rot([1, 2, 3], 40)
    s, r, t = umeyama(pts, 1.7 * pts @ rot.T + np.array([0.5, 0, -1]))
    assert s == pytest.approx(1.7)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, [0.5, 0, -1], atol=1e-9)


def test_fastvggt_chamfer_pipeline_recovers_scene():
    pytest.importorskip("open3d")
    h, w = 24, 32
    k = np.array([[30.0, 0, w / 2], [0, 30.0, h / 2], [0, 0, 1]])
    yy, xx = np.mgrid[0:h, 0:w]
    depth = 2.0 + 0.5 * np.sin(xx / 5.0) + 0.02 * yy
    c2w = np.eye(4)
    c2w[:3, :3] = _rot([0, 1, 0], 30)
    c2w[:3, 3] = [1.0, 2.0, 0.5]
    cam = np.stack([(xx - w / 2) * depth / 30, (yy - h / 2) * depth / 30, depth], -1).reshape(-1, 3)
    gt = cam @ c2w[:3, :3].T + c2w[:3, 3]
    extr = np.eye(4)[None, :3]
    conf = np.full((1, h, w), 5.0)
    cd = fastvggt_chamfer(depth[None], conf, extr, k[None], c2w, gt)
    assert cd == pytest.approx(0.0, abs=1e-6)
    # predicted scene at twice the scale: bbox-diagonal alignment removes it
    cd2 = fastvggt_chamfer(2 * depth[None], conf, extr, k[None], c2w, gt)
    assert cd2 == pytest.approx(0.0, abs=1e-6)
    conf_low = conf.copy()
    conf_low[:, :, : w // 2] = 1.0  # half the pixels fail the confidence filter
    assert fastvggt_chamfer(depth[None], conf_low, extr, k[None], c2w, gt) > 0.05


def _trajectory(n=6):
    poses = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        poses[i, :3, :3] = _rot([0.2, 1, 0.1], 12 * i)
        poses[i, :3, 3] = [np.cos(i / 2), 0.3 * i, np.sin(i / 2)]
    return poses


def test_trajectory_metrics_known_answers():
    gt = _trajectory()
    zero = trajectory_metrics(gt, gt)
    assert all(abs(v) < 1e-9 for k, v in zero.items() if k != "sim3_scale")
    sim = gt.copy()  # a Sim(3) copy is aligned away
    rot = _rot([1, 0, 0], 25)
    sim[:, :3, :3] = rot.T @ gt[:, :3, :3]
    sim[:, :3, 3] = (gt[:, :3, 3] - [1, 2, 3]) @ rot / 3.0
    m = trajectory_metrics(sim, gt)
    assert m["ate"] < 1e-9 and m["are"] < 1e-9 and m["rpe_rot"] < 1e-9
    assert m["sim3_scale"] == pytest.approx(3.0)
    spun = gt.copy()  # orientations off by 10 degrees, positions exact
    spun[:, :3, :3] = gt[:, :3, :3] @ _rot_z(10)
    m = trajectory_metrics(spun, gt, align_origin=False)
    assert m["ate"] < 1e-9
    assert m["are"] == pytest.approx(10.0, abs=1e-6)


def test_trajectory_origin_alignment_like_evo():
    """Official default (evo ``align_origin=True``): after the Sim(3) fit the first
    estimated pose is moved rigidly onto the first GT pose."""
    gt = _trajectory()
    spun = gt.copy()  # positions exact (Sim(3) fit = identity), orientations off by 10 deg
    spun[:, :3, :3] = gt[:, :3, :3] @ _rot_z(10)
    # by hand: T = gt0 @ inv(spun0) is a rotation of the positions about gt0's position
    t_rot = gt[0, :3, :3] @ spun[0, :3, :3].T
    moved = (gt[:, :3, 3] - gt[0, :3, 3]) @ t_rot.T + gt[0, :3, 3]
    ate = np.sqrt(np.mean(np.sum((moved - gt[:, :3, 3]) ** 2, axis=1)))
    m = trajectory_metrics(spun, gt)
    assert ate > 0.05 and m["ate"] == pytest.approx(ate, rel=1e-9)
    pure = trajectory_metrics(spun, gt, align_origin=False)
    # RPE does not depend on a rigid transform of the whole estimate
    assert m["rpe_trans"] == pytest.approx(pure["rpe_trans"], abs=1e-9)
    assert m["rpe_rot"] == pytest.approx(pure["rpe_rot"], abs=1e-9)


def test_pose_auc_known_answers():
    gt = np.tile(np.eye(4), (2, 1, 1))
    gt[1, :3, 3] = [1.0, 0, 0]
    assert pose_auc(gt, gt) == pytest.approx(1.0)
    pred = gt.copy()
    pred[1, :3, :3] = _rot_z(15.5)  # rotation and translation direction both off by 15.5 deg
    assert pose_auc(pred, gt) == pytest.approx(0.5)
    pred[1, :3, :3] = _rot_z(45)
    assert pose_auc(pred, gt) == pytest.approx(0.0)


def test_pose_encoding_roundtrip():
    rot = torch.tensor(np.stack([_rot([1, 2, 3], a) for a in (0, 30, 170)]), dtype=torch.float32)
    extr = torch.cat([rot, torch.randn(3, 3, 1)], -1)[None]
    intr = torch.tensor([[300.0, 0, 259], [0, 310.0, 196], [0, 0, 1]]).expand(1, 3, 3, 3)
    enc = extri_intri_to_pose_encoding(extr, intr, (392, 518))
    assert enc.shape == (1, 3, 9)
    e2, i2 = pose_encoding_to_extri_intri(enc, (392, 518))
    torch.testing.assert_close(e2, extr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(i2, intr, atol=1e-3, rtol=1e-5)


def test_preprocess_like_official_loader(tmp_path):
    assert target_hw(480, 640) == (392, 518)
    rgb = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    out = preprocess_images([rgb, rgb])
    assert out.shape == (2, 3, 392, 518) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    tall = preprocess_images([np.zeros((900, 300, 3), np.uint8)])
    assert tall.shape == (1, 3, 518, 518)  # centre-cropped
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "f.png")
    from_path = preprocess_images([tmp_path / "f.png"])
    assert torch.equal(from_path, out[:1])
