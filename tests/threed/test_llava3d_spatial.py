"""LLaVA-3D spatial tokens (threed.llava3d.spatial) on inputs with known answers."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threed.llava3d import (
    SceneViews,
    SpatialTokenConfig,
    build_spatial_tokens,
    clean_answer,
    exact_match,
    patch_xyz,
    prepare_views,
    preprocess_colour,
    preprocess_depth,
    resample_colour_to_depth,
    scale_intrinsic,
    score_answers,
    select_views,
    voxelize,
)
from threed.scannet import PosedFrame

# ScanNet-like depth camera, 640 x 480
K_DEPTH = np.array([[500.0, 0, 319.5, 0], [0, 500.0, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
CUBE_CENTRE = np.array([2.0, 2.0, 1.0])
HALF = 0.5


def test_view_choice_is_llava3d_uniform_step():
    assert select_views(45, 20) == [2 * i for i in range(20)]  # step 45 // 20 = 2
    assert select_views(20, 20) == list(range(20))
    assert select_views(7, 3) == [0, 2, 4]
    assert select_views(5, 8) == [0] * 8  # step 0: every view is the first frame, as upstream
    with pytest.raises(ValueError, match="num_views"):
        select_views(5, 0)


def test_depth_resize_crop_and_intrinsic():
    # each pixel's value names its source pixel: row * 1000 + column
    rows, cols = np.mgrid[0:480, 0:640]
    depth = (rows * 1000 + cols).astype(np.float32)
    out, new_wh = preprocess_depth(depth)
    assert new_wh == (448, 336) and out.shape == (336, 336)
    src_r, src_c = (out.numpy() // 1000).astype(int), (out.numpy() % 1000).astype(int)
    # NEAREST from 640x480 to 448x336, then the centre 336 columns (56 cut on each side):
    # output (r, c) reads about ((r + 0.5) / 0.7, (c + 56 + 0.5) / 0.7)
    c = np.arange(336)
    assert np.abs(src_c[0] - (c + 56 + 0.5) / 0.7).max() <= 1.0 + 1e-9
    assert np.abs(src_r[:, 0] - (c + 0.5) / 0.7).max() <= 1.0 + 1e-9
    assert src_c[0, 0] == 80 and src_c[0, -1] == 559  # 56 / 0.7 and (56 + 335.5) / 0.7
    assert (src_r == src_r[:, :1]).all() and (src_c == src_c[:1]).all()
    k = scale_intrinsic(K_DEPTH, (640, 480), new_wh)
    assert k.dtype == torch.float32 and k.shape == (4, 4)
    assert torch.allclose(k[0, 0], torch.tensor(350.0)) and torch.allclose(
        k[1, 1], torch.tensor(350.0)
    )
    assert torch.allclose(k[0, 2], torch.tensor(319.5 * 0.7 - 56)) and torch.allclose(
        k[1, 2], torch.tensor(239.5 * 0.7)
    )
    zero = preprocess_depth(np.zeros((480, 640), np.float32))[0]
    assert not zero.any()


def test_colour_follows_clip_processor_sizes():
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[:, :, 0] = 255
    x = preprocess_colour(rgb)
    assert x.shape == (3, 336, 336)
    # pure red after CLIP normalisation
    assert torch.allclose(x[0], torch.full((336, 336), (1 - 0.48145466) / 0.26862954), atol=1e-5)
    assert torch.allclose(x[1], torch.full((336, 336), -0.4578275 / 0.26130258), atol=1e-5)


def test_colour_resampled_to_depth_intrinsics():
    # colour camera: bigger, other focal length and centre; R = column, G = row (linear, so
    # bilinear resampling is exact up to the uint8 rounding)
    kc = np.array([[300.0, 0, 120.0], [0, 290.0, 95.0], [0, 0, 1]])
    hc, wc = 200, 250
    vv, uu = np.mgrid[0:hc, 0:wc]
    rgb = np.stack([uu, vv, np.full_like(uu, 7)], -1).astype(np.uint8)
    kd = np.array([[200.0, 0, 60.0], [0, 200.0, 45.0], [0, 0, 1]])
    out = resample_colour_to_depth(rgb, kc, kd, (90, 120))
    assert out.shape == (90, 120, 3) and out.dtype == np.uint8
    v, u = np.mgrid[0:90, 0:120]
    uc = np.clip(300.0 * (u - 60.0) / 200.0 + 120.0, 0, wc - 1)
    vc = np.clip(290.0 * (v - 45.0) / 200.0 + 95.0, 0, hc - 1)
    assert np.abs(out[..., 0] - uc).max() <= 0.5 + 1e-6
    assert np.abs(out[..., 1] - vc).max() <= 0.5 + 1e-6
    assert (out[..., 2] == 7).all()
    same = resample_colour_to_depth(rgb, kc, kc, (hc, wc))  # same camera: the identity
    assert (same == rgb).all()


def _views(depths, k, poses) -> SceneViews:
    v = depths.shape[0]
    return SceneViews(torch.zeros(v, 3, 336, 336), depths, poses, k, list(range(v)))


def test_corner_patch_pixel_is_nearest_interpolation_of_full_unprojection():
    gen = torch.Generator().manual_seed(0)
    depths = torch.rand(2, 336, 336, generator=gen) * 3
    depths[0, :14, :14] = 0
    k = torch.tensor([[300.0, 0, 170, 0], [0, 310, 160, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).repeat(
        2, 1, 1
    )
    poses = torch.eye(4).repeat(2, 1, 1)
    poses[1, :3, 3] = torch.tensor([1.0, -2.0, 0.5])
    poses[1, :3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    # every pixel unprojected (LLaVA-3D's unproject), then nearest 336 -> 24
    v, u = torch.meshgrid(torch.arange(336.0), torch.arange(336.0), indexing="ij")
    cam = torch.stack([(u - 170) * depths / 300, (v - 160) * depths / 310, depths], -1)
    world = cam @ poses[:, None, :3, :3].transpose(-1, -2) + poses[:, None, None, :3, 3]
    ref = F.interpolate(world.permute(0, 3, 1, 2), size=(24, 24), mode="nearest").permute(
        0, 2, 3, 1
    )
    xyz, valid = patch_xyz(depths, k, poses, 24, "corner")
    assert torch.allclose(xyz, ref, atol=1e-5)
    assert not valid[0, 0, 0] and valid.sum() == 2 * 576 - 1
    assert torch.allclose(xyz[0, 0, 0], torch.zeros(3))  # no depth: the camera centre
    centre, _ = patch_xyz(depths, k, poses, 24, "centre")
    assert torch.allclose(centre, world[:, 7::14, 7::14], atol=1e-5)


def test_plane_known_answer():
    """A wall 1 m in front of two cameras: patch (i, j) sits at x = (j - 12) * 2/15,
    y = (i - 12) * 2/15, so voxels of 0.2 m hold 1 or 2 patches per axis."""
    depths = torch.ones(2, 336, 336)
    k = torch.tensor([[105.0, 0, 168, 0], [0, 105, 168, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    poses = torch.eye(4).repeat(2, 1, 1)
    poses[1, 0, 3] = 10.0  # the second camera 10 m to the right: its own voxels
    feats = torch.arange(2 * 576, dtype=torch.float32).reshape(2, 576, 1)
    tok = build_spatial_tokens(feats, _views(depths, k.repeat(2, 1, 1), poses))
    # per axis: j - 12 in [-12, 11] -> round((j - 12) * 2/3) takes 17 values (-8..7)
    per_axis = sorted({round((j - 12) * 2 / 3) for j in range(24)})
    assert per_axis == list(range(-8, 8))
    assert tok.num_tokens == 2 * 16 * 16 and tok.num_voxels == 2 * 16 * 16
    members = defaultdict(list)
    for j in range(24):
        members[round((j - 12) * 2 / 3)].append(j)
    # first token: view 0, lowest x and y voxel (-8, -8): patches i, j in members[-8]
    first = [i * 24 + j for i in members[-8] for j in members[-8]]
    assert tok.counts[0] == len(first) and torch.allclose(tok.features[0], feats[0, first].mean(0))
    xs = torch.tensor([(j - 12) * 2 / 15 for j in members[-8]]).mean()
    assert torch.allclose(tok.positions[0], torch.stack([xs, xs, torch.tensor(1.0)]), atol=1e-5)
    assert (tok.voxel_coords[0] == 0).all()
    assert tok.counts.sum() == 2 * 576
    # ascending (x, y, z): view 0 first (x 10 m smaller), then view 1
    c = tok.voxel_coords
    keys = (c[:, 0] * 10_000 + c[:, 1]) * 100 + c[:, 2]
    assert (keys[1:] > keys[:-1]).all()
    assert (tok.assignment[0] < 256).all() and (tok.assignment[1] >= 256).all()


def _look_at(eye, target):
    f = (target - eye) / np.linalg.norm(target - eye)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r /= np.linalg.norm(r)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = r, np.cross(f, r), f, eye
    return pose


def _render_cube(pose, h=480, w=640):
    """Depth (metres along the optical axis) of the cube, 0 where a ray misses."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    d_cam = np.stack([(u - K_DEPTH[0, 2]) / K_DEPTH[0, 0], (v - K_DEPTH[1, 2]) / K_DEPTH[1, 1]], -1)
    d_cam = np.concatenate([d_cam, np.ones((h, w, 1))], -1)
    d = d_cam @ pose[:3, :3].T
    o = pose[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (CUBE_CENTRE - HALF - o) / d
        t2 = (CUBE_CENTRE + HALF - o) / d
    t_near = np.nanmax(np.minimum(t1, t2), -1)
    t_far = np.nanmin(np.maximum(t1, t2), -1)
    hit = (t_near <= t_far) & (t_far > 0)
    return np.where(hit, t_near, 0.0).astype(np.float32)  # t along a z=1 ray = depth


@pytest.fixture(scope="module")
def cube_frames():
    """Four cameras 3 m from the cube's centre, each facing one side face head-on."""
    frames = []
    for i, direction in enumerate(([0, -1, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0])):
        eye = CUBE_CENTRE + 3.0 * np.asarray(direction, float)
        pose = _look_at(eye, CUBE_CENTRE)
        rgb = np.full((480, 640, 3), 40 * i, np.uint8)
        frames.append(PosedFrame(i, rgb, _render_cube(pose), pose, K_DEPTH, K_DEPTH))
    return frames


def _reference_tokens(xyz, feats, voxel):
    """Hand grouping: dict of integer voxel -> members (independent of voxelize)."""
    c = np.round(xyz / voxel).astype(np.int64)
    c -= c.min(0)
    groups = defaultdict(list)
    for n, key in enumerate(map(tuple, c)):
        groups[key].append(n)
    keys = sorted(groups)
    return (
        np.array(keys),
        np.array([len(groups[k]) for k in keys]),
        np.stack([xyz[groups[k]].mean(0) for k in keys]),
        np.stack([feats[groups[k]].mean(0) for k in keys]),
    )


def test_cube_seen_from_four_sides(cube_frames):
    cfg = SpatialTokenConfig(num_views=4)
    views = prepare_views(cube_frames, cfg)
    assert views.frame_ids == [0, 1, 2, 3]
    assert views.images.shape == (4, 3, 336, 336) and views.depths.shape == (4, 336, 336)
    # each camera sees only the face it faces, head-on: depth 2.5 m or nothing
    assert set(np.unique(views.depths.numpy()).tolist()) == {0.0, 2.5}
    feats = torch.randn(4, 576, 5, generator=torch.Generator().manual_seed(1))
    tok = build_spatial_tokens(feats, views, cfg)
    xyz = tok.patch_xyz.reshape(-1, 3).numpy().astype(np.float64)
    valid = tok.patch_valid.reshape(-1).numpy()
    view_of = np.repeat(np.arange(4), 576)
    normals = np.array([[0, -1, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0]], float)
    for v in range(4):
        on = valid & (view_of == v)
        assert 80 <= on.sum() <= 121  # the face covers ~10 x 10 of the 24 x 24 patches
        rel = xyz[on] - CUBE_CENTRE
        assert np.allclose(rel @ normals[v], HALF, atol=1e-5)  # on the face plane
        assert np.abs(rel).max() <= HALF + 0.01  # within the face (one source pixel)
        off = ~valid & (view_of == v)
        assert np.allclose(xyz[off], cube_frames[v].pose[:3, 3], atol=1e-5)  # camera centre
    keys, counts, pos, mean = _reference_tokens(xyz, feats.reshape(-1, 5).numpy(), 0.2)
    assert tok.num_tokens == len(keys) == tok.num_voxels
    assert (tok.voxel_coords.numpy() == keys).all()
    assert (tok.counts.numpy() == counts).all()
    assert np.allclose(tok.positions.numpy(), pos, atol=1e-5)
    assert np.allclose(tok.features.numpy(), mean, atol=1e-5)
    # the assignment points every patch at the token holding it
    a = tok.assignment.reshape(-1)
    assert (a >= 0).all()
    for t in range(tok.num_tokens):
        assert (a == t).sum() == tok.counts[t]
    # 4 camera centres hold every patch without depth: 4 tokens of the faithful mode
    far = np.linalg.norm(pos - CUBE_CENTRE, axis=1) > 2.0
    assert far.sum() == 4 and counts[far].sum() == (~valid).sum()

    drop = build_spatial_tokens(feats, views, SpatialTokenConfig(num_views=4, invalid_depth="drop"))
    assert drop.num_tokens == tok.num_tokens - 4
    assert (drop.assignment.reshape(-1)[~torch.from_numpy(valid)] == -1).all()
    assert drop.counts.sum() == valid.sum()
    assert (drop.positions - torch.from_numpy(CUBE_CENTRE).float()).abs().max() <= HALF + 0.01


def test_position_embedding_is_added_before_pooling(cube_frames):
    cfg = SpatialTokenConfig(num_views=4, invalid_depth="drop")
    views = prepare_views(cube_frames, cfg)
    feats = torch.randn(4, 576, 3, generator=torch.Generator().manual_seed(2))
    weight = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [0.5, 0.0, 1.0]])
    plain = build_spatial_tokens(feats, views, cfg)
    with_pe = build_spatial_tokens(feats, views, cfg, position_embedding=lambda p: p @ weight)
    # a linear embedding commutes with the mean: pooled + pe(mean xyz)
    assert torch.allclose(with_pe.features, plain.features + plain.positions @ weight, atol=1e-4)


def test_cap_is_a_seeded_random_subset(cube_frames):
    views = prepare_views(cube_frames, SpatialTokenConfig(num_views=4))
    feats = torch.randn(4, 576, 4, generator=torch.Generator().manual_seed(3))
    full = build_spatial_tokens(feats, views, SpatialTokenConfig(num_views=4))
    cap = SpatialTokenConfig(num_views=4, max_tokens=10, seed=5)
    a = build_spatial_tokens(feats, views, cap)
    b = build_spatial_tokens(feats, views, cap)
    other = build_spatial_tokens(feats, views, SpatialTokenConfig(num_views=4, max_tokens=10))
    assert a.num_tokens == 10 and a.num_voxels == full.num_tokens
    assert torch.equal(a.features, b.features) and torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.voxel_coords, other.voxel_coords)  # another seed, another subset
    perm = torch.randperm(full.num_tokens, generator=torch.Generator().manual_seed(5))[:10]
    assert torch.equal(a.voxel_coords, full.voxel_coords[perm])  # randperm order, as upstream
    assert torch.allclose(a.features, full.features[perm])
    kept = a.assignment.reshape(-1)
    assert (kept >= -1).all() and (kept >= 0).sum() == a.counts.sum()


def test_voxelize_orders_by_coordinates():
    xyz = torch.tensor([[0.41, 0.0, 0.0], [0.0, 0.39, 0.0], [0.0, 0.0, 0.0], [0.05, 0.0, 0.09]])
    inverse, coords = voxelize(xyz, 0.2)
    assert coords.tolist() == [[0, 0, 0], [0, 2, 0], [2, 0, 0]]
    assert inverse.tolist() == [2, 1, 0, 0]


def test_config_is_validated():
    for field, value in (
        ("num_views", 0),
        ("voxel_size", 0.0),
        ("max_tokens", 0),
        ("patch_pixel", "middle"),
        ("invalid_depth", "inpaint"),
        ("align_colour", "yes"),
        ("precision", "float16"),
    ):
        with pytest.raises(ValueError, match=field):
            SpatialTokenConfig(**{field: value})
    with pytest.raises(ValueError, match="image_size"):
        SpatialTokenConfig(image_size=330)


def test_answer_normalisation_and_em():
    assert clean_answer("  The Brown  Chair. ") == "brown chair"
    assert clean_answer("2 chairs") == "two chairs"
    assert clean_answer("it is on the letf!") == "it is on left"
    assert exact_match("brown chair", ["brown chair", "chair"]) == (1, 1)
    assert exact_match("chair", ["brown chair"]) == (0, 1)
    assert exact_match("table", ["brown chair"]) == (0, 0)
    scores = score_answers(["Two", "a red box", "blue"], [["2"], ["red box"], ["green"]])
    assert scores["em1"] == pytest.approx(2 / 3) and scores["em1_refined"] == pytest.approx(2 / 3)


def test_bfloat16_unprojection_rounds_like_the_eval_scripts():
    gen = torch.Generator().manual_seed(4)
    depths = (torch.rand(1, 336, 336, generator=gen) * 4).to(torch.bfloat16)
    k = torch.tensor([[403.9, 0, 167.65, 0], [0, 403.9, 167.65, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([3.3, 1.7, 1.4])
    pose = pose[None].to(torch.bfloat16)
    kb = k[None].to(torch.bfloat16)
    # LLaVA-3D's unproject on bfloat16 inputs: integer pixel grid minus bf16 centre, etc.
    v, u = torch.meshgrid(torch.arange(336), torch.arange(336), indexing="ij")
    z = depths.flatten(1)
    x = (u.flatten() - kb[:, 0, 2, None]) * z / kb[:, 0, 0, None]
    y = (v.flatten() - kb[:, 1, 2, None]) * z / kb[:, 1, 1, None]
    cam = torch.stack([x, y, z, torch.ones_like(x)], -1)
    world = (pose @ cam.transpose(1, 2)).transpose(1, 2)
    world = (world[..., :3] / world[..., 3:]).reshape(1, 336, 336, 3)
    ref = F.interpolate(world.permute(0, 3, 1, 2), size=(24, 24), mode="nearest")
    ref = ref.permute(0, 2, 3, 1)
    xyz, _ = patch_xyz(depths, kb, pose, 24, "corner", dtype=torch.bfloat16)
    assert xyz.dtype == torch.bfloat16
    assert torch.allclose(xyz.float(), ref.float(), rtol=0, atol=1e-6)
    f32, _ = patch_xyz(depths.float(), k[None], pose.float(), 24, "corner")
    assert (f32 - xyz.float()).abs().max() > 1e-3  # bfloat16 really changes the positions
    views = _views(depths.float(), k[None], pose.float())
    feats = torch.zeros(1, 576, 2)
    tok = build_spatial_tokens(feats, views, SpatialTokenConfig(precision="bfloat16"))
    assert tok.positions.dtype == torch.float32
    inverse, coords = voxelize(xyz.reshape(-1, 3), 0.2)
    assert torch.equal(tok.voxel_coords, coords)


def test_caption_metrics_through_pycocoevalcap(monkeypatch):
    """Where pycocoevalcap is installed its scorers get {id: [cleaned strings]} and their
    scores land in the right keys (scorers faked here: pycocoevalcap is not installed)."""
    import sys
    import types

    seen = {}

    def scorer(name, score):
        class Scorer:
            def __init__(self, *args):
                pass

            def compute_score(self, gts, res):
                seen[name] = (gts, res)
                if name == "meteor":
                    raise FileNotFoundError("java")  # METEOR without a Java runtime
                return score, None

        return Scorer

    for mod, cls, score in (
        ("bleu.bleu", "Bleu", [0.9, 0.8, 0.7, 0.6]),
        ("cider.cider", "Cider", 1.5),
        ("meteor.meteor", "Meteor", 0.3),
        ("rouge.rouge", "Rouge", 0.4),
    ):
        m = types.ModuleType(f"pycocoevalcap.{mod}")
        setattr(m, cls, scorer(mod.split(".")[0], score))
        monkeypatch.setitem(sys.modules, f"pycocoevalcap.{mod}", m)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", types.ModuleType("pycocoevalcap"))
    out = score_answers(["The Chair.", ""], [["chair", "a chair"], ["2"]])
    assert out["bleu4"] == 0.6 and out["cider"] == 1.5 and out["rouge_l"] == 0.4
    assert out["meteor"] is None  # failed scorer: left empty, the others still count
    gts, res = seen["cider"]
    assert res == {0: ["chair"], 1: ["empty"]} and gts == {0: ["chair", "chair"], 1: ["two"]}
