"""ScanNet readers on the synthetic data: round trips, alignment, depth, language files."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from threed.scannet import (
    STRUCTURE_LABELS,
    ScanNetDataError,
    Scene,
    ensure_synthetic,
    iter_scenes,
    load_scanqa,
    load_scanrefer,
    load_scene,
    load_sqa3d,
    read_mesh,
    unproject_depth,
)

pytest.importorskip("open3d")
pytest.importorskip("PIL")

TINY = dict(num_frames=6, image_size=(160, 120), vertex_spacing=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), num_scenes=2, seed=3, **TINY)


@pytest.fixture(scope="module")
def scenes(data) -> dict[str, Scene]:
    return {s: load_scene(s, data.scannet_root, data.posed_images_root) for s in data.scene_ids}


def _meta(data, scene_id):
    return next(m for m in data.meta()["scenes"] if m["scene_id"] == scene_id)


def test_import_needs_no_open3d_or_pillow():
    code = (
        "import sys, threed.scannet; "
        "assert 'open3d' not in sys.modules and 'PIL' not in sys.modules, 'eager import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layout_matches_scannet(data):
    sid = data.scene_ids[0]
    raw = data.scannet_root / sid
    for name in (
        f"{sid}_vh_clean_2.ply",
        f"{sid}_vh_clean_2.0.010000.segs.json",
        f"{sid}.aggregation.json",
        f"{sid}.txt",
    ):
        assert (raw / name).is_file(), name
    posed = data.posed_images_root / sid
    assert (posed / "intrinsic.txt").is_file() and (posed / "depth_intrinsic.txt").is_file()
    for stem in ("00000", "00010", "00050"):
        for ext in ("jpg", "png", "txt"):
            assert (posed / f"{stem}.{ext}").is_file()
    assert "axisAlignment = " in (raw / f"{sid}.txt").read_text()
    for p in (data.scanrefer_path, data.scanqa_path, data.sqa3d_questions_path):
        assert p.is_file()


def test_boxes_round_trip(data, scenes):
    for sid, scene in scenes.items():
        meta = _meta(data, sid)
        assert scene.num_points == meta["num_vertices"]
        assert len(scene.instances) == len(meta["objects"])
        for inst, obj in zip(scene.instances, meta["objects"]):
            assert inst.object_id == obj["object_id"]
            assert inst.label == obj["label"]
            assert len(inst.point_idx) == obj["num_points"]
            np.testing.assert_allclose(inst.box, obj["box"], atol=1e-4)
            assert (scene.instance_ids[inst.point_idx] == inst.object_id).all()
        labels = [i.label for i in scene.objects()]
        assert labels.count("chair") == 2 and 6 <= len(labels) <= 8
        assert not set(labels) & STRUCTURE_LABELS
        assert scene.label_counts()["wall"] == 4


def test_axis_alignment_is_applied(data, scenes):
    for sid, scene in scenes.items():
        meta = _meta(data, sid)
        align = np.asarray(meta["axis_alignment"])
        assert not np.allclose(align, np.eye(4)), "the generator must rotate the raw scan"
        np.testing.assert_allclose(scene.axis_alignment, align)
        raw_xyz, _, _ = read_mesh(scene.scene_dir / f"{sid}_vh_clean_2.ply")
        assert not np.allclose(raw_xyz, scene.points, atol=0.1)
        # aligned: the room spans [0, W] x [0, D] x [0, H], floor at z = 0
        W, D, H = meta["room_size"]
        np.testing.assert_allclose(scene.points.min(0), [0, 0, 0], atol=1e-4)
        np.testing.assert_allclose(scene.points.max(0), [W, D, H], atol=1e-4)
        floor = scene.instance(next(i.object_id for i in scene.instances if i.label == "floor"))
        np.testing.assert_allclose(scene.points[floor.point_idx, 2], 0.0, atol=1e-5)


def test_mesh_colours_and_segments(scenes):
    scene = next(iter(scenes.values()))
    assert scene.colors.dtype == np.float32 and scene.colors.shape == scene.points.shape
    assert 0.0 <= scene.colors.min() and scene.colors.max() <= 1.0
    assert scene.faces is not None and scene.faces.max() < scene.num_points
    # every object has a distinct mean colour
    means = [scene.colors[i.point_idx].mean(0) for i in scene.objects()]
    d = np.linalg.norm(np.array(means)[:, None] - np.array(means)[None], axis=-1)
    assert (d + np.eye(len(means)) * 10).min() > 0.1
    # segments: several per object, none shared between objects
    owner: dict[int, int] = {}
    for inst in scene.instances:
        assert len(inst.segments) >= 1
        for s in inst.segments:
            assert owner.setdefault(s, inst.object_id) == inst.object_id


def _mesh_distance(scene: Scene, pts: np.ndarray) -> np.ndarray:
    import open3d as o3d

    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(
        o3d.core.Tensor(scene.points.astype(np.float32)),
        o3d.core.Tensor(scene.faces.astype(np.uint32)),
    )
    return rc.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()


def test_depth_unprojects_onto_mesh(data, scenes):
    for sid, scene in scenes.items():
        frames = scene.frames()
        assert [f.frame_id for f in frames] == [10 * i for i in range(TINY["num_frames"])]
        for frame in frames:
            assert frame.rgb.shape == (120, 160, 3) and frame.rgb.dtype == np.uint8
            assert frame.depth.shape == (120, 160) and frame.depth.dtype == np.float32
            pts = scene.unproject(frame)
            assert len(pts) > 0.5 * 120 * 160
            dist = _mesh_distance(scene, pts)
            assert dist.max() < 0.02, (sid, frame.frame_id, dist.max())
            assert dist.mean() < 0.003


def test_poses_are_in_the_aligned_world(data, scenes):
    for sid, scene in scenes.items():
        meta = _meta(data, sid)
        for frame, cam in zip(scene.frames(), meta["frames"]):
            assert frame.frame_id == cam["frame_id"]
            np.testing.assert_allclose(frame.pose, cam["pose_aligned"], atol=1e-5)
            assert frame.pose.dtype == np.float64
            np.testing.assert_allclose(
                frame.pose[:3, :3] @ frame.pose[:3, :3].T, np.eye(3), atol=1e-5
            )
        # cameras are inside the room, above the furniture
        W, D, _ = meta["room_size"]
        eyes = np.array([f.pose[:3, 3] for f in scene.frames()])
        assert (eyes[:, 0] > 0).all() and (eyes[:, 0] < W).all() and (eyes[:, 2] > 1.2).all()


def test_rgb_matches_the_mesh_colour(scenes):
    scene = next(iter(scenes.values()))
    frame = scene.frames()[2]
    pts, pix = unproject_depth(frame.depth, frame.intrinsic_depth, frame.pose, return_pixels=True)
    # colour of the nearest mesh vertex vs pixel colour (shading scales by 0.6 .. 1.0)
    import open3d as o3d

    tree = o3d.core.nns.NearestNeighborSearch(o3d.core.Tensor(scene.points))
    tree.knn_index()
    idx, _ = tree.knn_search(o3d.core.Tensor(pts), 1)
    want = scene.colors[idx.numpy()[:, 0]]
    got = frame.rgb[pix[:, 0], pix[:, 1]].astype(np.float32) / 255.0
    ratio = (got.sum(1) + 0.05) / (want.sum(1) + 0.05)
    assert np.median(ratio) > 0.55 and np.median(ratio) < 1.1
    chroma_got = got / (got.sum(1, keepdims=True) + 1e-3)
    chroma_want = want / (want.sum(1, keepdims=True) + 1e-3)
    assert np.median(np.abs(chroma_got - chroma_want).sum(1)) < 0.1


def test_frame_subsampling(scenes):
    scene = next(iter(scenes.values()))
    all_ids = [f.frame_id for f in scene.frames()]
    assert [f.frame_id for f in scene.frames(stride=2)] == all_ids[::2]
    picked = [f.frame_id for f in scene.frames(max_frames=3)]
    assert len(picked) == 3 and picked[0] == all_ids[0] and picked[-1] == all_ids[-1]
    assert [f.frame_id for f in scene.frames(stride=4, max_frames=10)] == all_ids[::4]
    with pytest.raises(ValueError, match="stride"):
        scene.frames(stride=0)
    with pytest.raises(ValueError, match="max_frames"):
        scene.frames(max_frames=0)


def test_images_load_lazily(scenes):
    scene = next(iter(scenes.values()))
    frame = scene.frames()[0]
    assert "rgb" not in frame.__dict__ and "depth" not in frame.__dict__
    _ = frame.depth
    assert "depth" in frame.__dict__ and "rgb" not in frame.__dict__
    frame.release()
    assert "depth" not in frame.__dict__


def test_scanrefer(data, scenes):
    recs = load_scanrefer(data.scanrefer_path)
    assert {r.scene_id for r in recs} == set(data.scene_ids)
    computed = load_scanrefer(data.scanrefer_path, data.scannet_root)
    assert [r.unique for r in recs] == [r.unique for r in computed]
    # without an explicit field nor scenes: decided from the file itself
    raw = json.loads(data.scanrefer_path.read_text())
    for r in raw:
        del r["unique"]
    stripped = data.scanrefer_path.with_name("stripped.json")
    stripped.write_text(json.dumps(raw))
    assert [r.unique for r in load_scanrefer(stripped)] == [r.unique for r in recs]
    assert [r.unique for r in load_scanrefer(stripped, data.scannet_root)] == [
        r.unique for r in recs
    ]
    for r in recs:
        scene = scenes[r.scene_id]
        inst = scene.instance(r.object_id)
        assert inst.label.replace(" ", "_") == r.object_name
        assert r.unique == scene.is_unique(r.object_id) == (inst.label != "chair")
        assert r.token and r.description.startswith(("this is", "the"))
    assert {r.eval_type for r in recs} == {"unique", "multiple"}
    only = load_scanrefer(data.scanrefer_path, scene_ids={data.scene_ids[1]})
    assert only and {r.scene_id for r in only} == {data.scene_ids[1]}


def test_scanqa_answers_follow_from_the_scene(data, scenes):
    qa = load_scanqa(data.scanqa_path)
    meta = {m["scene_id"]: m for m in data.meta()["scenes"]}
    assert len({q.question_id for q in qa}) == len(qa)
    for q in qa:
        objs = {o["object_id"]: o for o in meta[q.scene_id]["objects"]}
        if q.question.startswith("What color"):
            assert q.answers == [objs[q.object_ids[0]]["colour"]]
            assert q.answers[0] not in q.question
        if q.question.startswith("How many chairs"):
            assert q.answers[0] == "2" and len(q.object_ids) == 2
        for oid, name in zip(q.object_ids, q.object_names):
            assert scenes[q.scene_id].instance(oid).label == name


def test_sqa3d(data):
    with_answers = load_sqa3d(data.sqa3d_questions_path, data.sqa3d_annotations_path)
    assert with_answers and all(r.answers and r.situation for r in with_answers)
    assert all(r.position is not None for r in with_answers)
    plain = load_sqa3d(data.sqa3d_questions_path)
    assert [r.question_id for r in plain] == [r.question_id for r in with_answers]
    assert all(r.answers == [] for r in plain)


def test_iter_scenes_records_a_bad_scene_and_goes_on(data):
    ids = [data.scene_ids[0], "scene0999_00", data.scene_ids[1]]
    got = list(iter_scenes(ids, data.scannet_root, data.posed_images_root))
    assert [sid for sid, _ in got] == ids
    assert isinstance(got[0][1], Scene) and isinstance(got[2][1], Scene)
    assert isinstance(got[1][1], ScanNetDataError) and "scene0999_00" in str(got[1][1])


def test_numpy_ply_reader_matches_open3d(data):
    from threed.scannet.scene import _read_ply_numpy

    sid = data.scene_ids[0]
    path = data.scannet_root / sid / f"{sid}_vh_clean_2.ply"
    xyz, rgb, faces = read_mesh(path)
    xyz2, rgb2, faces2 = _read_ply_numpy(path)
    np.testing.assert_allclose(xyz, xyz2, atol=1e-6)
    np.testing.assert_allclose(rgb, rgb2, atol=1e-6)
    np.testing.assert_array_equal(faces, faces2)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_generation_is_deterministic_and_cached(tmp_path):
    a = ensure_synthetic(tmp_path / "a", num_scenes=1, seed=5, **TINY)
    b = ensure_synthetic(tmp_path / "b", num_scenes=1, seed=5, **TINY)
    c = ensure_synthetic(tmp_path / "c", num_scenes=1, seed=6, **TINY)
    assert a.root.name == b.root.name != c.root.name
    files = _files(a.root)
    assert files == _files(b.root) and len(files) > 20
    match, mismatch, errors = filecmp.cmpfiles(a.root, b.root, files, shallow=False)
    assert not mismatch and not errors
    sid = a.scene_ids[0]
    for rel in (
        f"scans/{sid}/{sid}_vh_clean_2.ply",
        f"posed_images/{sid}/00000.png",
        f"posed_images/{sid}/00000.jpg",
    ):
        assert (a.root / rel).read_bytes() != (c.root / rel).read_bytes()
    # a second call reuses the folder without writing
    stamp = (a.root / f"scans/{sid}/{sid}_vh_clean_2.ply").stat().st_mtime_ns
    again = ensure_synthetic(tmp_path / "a", num_scenes=1, seed=5, **TINY)
    assert again == a
    assert (a.root / f"scans/{sid}/{sid}_vh_clean_2.ply").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp")]


def test_ensure_synthetic_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_scenes"):
        ensure_synthetic(tmp_path, num_scenes=0)
    with pytest.raises(ValueError, match="seed"):
        ensure_synthetic(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        ensure_synthetic(tmp_path, image_size=(8, 8))


def test_scanrefer_label_map(data, tmp_path):
    from threed.scannet import read_label_map

    tsv = tmp_path / "scannetv2-labels.combined.tsv"
    tsv.write_text(
        "id\traw_category\tcategory\tnyu40class\n1\ttable\ttable\tfurniture\n"
        "2\tcabinet\tcabinet\tfurniture\n3\tbox\tbox\tfurniture\n4\tbed\tbed\tfurniture\n"
    )
    label_map = read_label_map(tsv)
    assert label_map["table"] == "furniture"
    recs = load_scanrefer(data.scanrefer_path, data.scannet_root)
    raw = json.loads(data.scanrefer_path.read_text())
    for r in raw:
        del r["unique"]
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(raw))
    mapped = load_scanrefer(stripped, data.scannet_root, label_map=label_map)
    for r, m in zip(recs, mapped):
        if r.object_name in label_map:  # several "furniture" per scene -> multiple
            assert not m.unique
        else:
            assert m.unique == r.unique
    with pytest.raises(ScanNetDataError, match="nope"):
        read_label_map(tsv, target="nope")


def test_sensreader_layout(data, scenes, tmp_path):
    """color/ depth/ pose/ intrinsic/ folders read the same as the flat export."""
    import shutil

    sid = data.scene_ids[0]
    src = data.posed_images_root / sid
    dst = tmp_path / sid
    for sub in ("color", "depth", "pose", "intrinsic"):
        (dst / sub).mkdir(parents=True)
    for p in src.iterdir():
        if p.name == "intrinsic.txt":
            shutil.copy(p, dst / "intrinsic" / "intrinsic_color.txt")
        elif p.name == "depth_intrinsic.txt":
            shutil.copy(p, dst / "intrinsic" / "intrinsic_depth.txt")
        else:
            sub = {".jpg": "color", ".png": "depth", ".txt": "pose"}[p.suffix]
            shutil.copy(p, dst / sub / f"{int(p.stem)}{p.suffix}")  # SensReader: no padding
    scene = load_scene(sid, data.scannet_root, tmp_path)
    want = scenes[sid].frames()
    got = scene.frames()
    assert [f.frame_id for f in got] == [f.frame_id for f in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.pose, b.pose)
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_array_equal(a.intrinsic_depth, b.intrinsic_depth)


def test_ascii_and_truncated_ply(tmp_path):
    import open3d as o3d

    from threed.scannet.scene import _read_ply_numpy

    mesh = o3d.geometry.TriangleMesh.create_box(1.0, 2.0, 3.0)
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.linspace(0, 1, 24).reshape(8, 3))
    path = tmp_path / "box.ply"
    o3d.io.write_triangle_mesh(str(path), mesh, write_ascii=True, write_vertex_normals=False)
    xyz, rgb, faces = read_mesh(path)
    xyz2, rgb2, faces2 = _read_ply_numpy(path)
    np.testing.assert_allclose(xyz, np.asarray(mesh.vertices), atol=1e-6)
    np.testing.assert_allclose(xyz2, xyz, atol=1e-6)
    np.testing.assert_allclose(rgb2, rgb, atol=1e-6)
    np.testing.assert_array_equal(faces2, faces)
    o3d.io.write_triangle_mesh(str(path), mesh, write_ascii=False)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    for reader in (read_mesh, _read_ply_numpy):
        with pytest.raises(ScanNetDataError, match="truncated") as info:
            reader(path)
        assert str(path) in str(info.value)


def test_load_scene_without_open3d(data, scenes, monkeypatch):
    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d -> ImportError
    sid = data.scene_ids[0]
    scene = load_scene(sid, data.scannet_root)
    np.testing.assert_array_equal(scene.points, scenes[sid].points)
    np.testing.assert_array_equal(scene.colors, scenes[sid].colors)
    np.testing.assert_array_equal(scene.faces, scenes[sid].faces)


def test_in_memory_posed_frame(scenes):
    from threed.scannet import PosedFrame

    src = next(iter(scenes.values())).frames()[1]
    frame = PosedFrame(7, src.rgb, src.depth, src.pose, src.intrinsic_color, src.intrinsic_depth)
    assert frame.frame_id == 7 and frame.rgb is not None
    frame.release()  # nothing to re-read: the arrays stay
    np.testing.assert_array_equal(frame.depth, src.depth)
    np.testing.assert_array_equal(
        next(iter(scenes.values())).unproject(frame),
        unproject_depth(src.depth, src.intrinsic_depth, src.pose),
    )
    with pytest.raises(ValueError, match="depth"):
        PosedFrame(0, rgb=src.rgb, pose=src.pose, intrinsic_depth=src.intrinsic_depth)
