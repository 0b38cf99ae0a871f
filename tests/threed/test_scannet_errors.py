"""ScanNet readers on hand-made malformed files: a ScanNetDataError naming the file."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from threed.scannet import (
    ScanNetDataError,
    ensure_synthetic,
    iter_scenes,
    load_scanqa,
    load_scanrefer,
    load_scene,
    load_sqa3d,
    read_axis_alignment,
)

pytest.importorskip("open3d")
pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ensure_synthetic(
        tmp_path_factory.mktemp("synth"),
        num_scenes=1,
        seed=1,
        num_frames=3,
        image_size=(64, 48),
        vertex_spacing=0.25,
    )


@pytest.fixture
def copy(source, tmp_path):
    """A private copy of the data set: ``(raw_dir, posed_dir, scannet_root, posed_root, sid)``."""
    shutil.copytree(source.root, tmp_path / "d")
    sid = source.scene_ids[0]
    scans, posed = tmp_path / "d" / "scans", tmp_path / "d" / "posed_images"
    return scans / sid, posed / sid, scans, posed, sid


def _raises(path, fn, *args, match=None, **kwargs):
    with pytest.raises(ScanNetDataError) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value), str(info.value)
    assert info.value.path == path
    if match:
        assert match in str(info.value)
    return info.value


def test_error_is_a_value_error():
    assert issubclass(ScanNetDataError, ValueError)


def test_missing_scene_folder(copy):
    _, _, scans, _, _ = copy
    _raises(scans / "scene0123_00", load_scene, "scene0123_00", scans, match="not found")


def test_missing_ply(copy):
    raw, _, scans, _, sid = copy
    ply = raw / f"{sid}_vh_clean_2.ply"
    ply.unlink()
    _raises(ply, load_scene, sid, scans, match="PLY")


def test_garbage_ply(copy):
    raw, _, scans, _, sid = copy
    ply = raw / f"{sid}_vh_clean_2.ply"
    ply.write_bytes(b"this is not a mesh")
    _raises(ply, load_scene, sid, scans)


def test_bad_segs_json(copy):
    raw, _, scans, _, sid = copy
    segs = raw / f"{sid}_vh_clean_2.0.010000.segs.json"
    segs.write_text('{"segIndices": [1, 2,')
    _raises(segs, load_scene, sid, scans, match="JSON")


def test_segs_of_wrong_length(copy):
    raw, _, scans, _, sid = copy
    segs = raw / f"{sid}_vh_clean_2.0.010000.segs.json"
    data = json.loads(segs.read_text())
    data["segIndices"] = data["segIndices"][:-5]
    segs.write_text(json.dumps(data))
    _raises(segs, load_scene, sid, scans, match="one entry per mesh vertex")


def test_missing_aggregation(copy):
    raw, _, scans, _, sid = copy
    agg = raw / f"{sid}.aggregation.json"
    agg.unlink()
    _raises(agg, load_scene, sid, scans, match="not found")


def test_test_split_scene_without_annotations(copy):
    raw, _, scans, posed_root, sid = copy
    (raw / f"{sid}.aggregation.json").unlink()
    (raw / f"{sid}_vh_clean_2.0.010000.segs.json").unlink()
    scene = load_scene(sid, scans, posed_root, require_annotations=False)
    assert scene.instances == [] and (scene.instance_ids == -1).all()
    assert scene.num_points > 0 and len(scene.frames()) == 3


def test_aggregation_referencing_unknown_segment(copy):
    raw, _, scans, _, sid = copy
    agg = raw / f"{sid}.aggregation.json"
    data = json.loads(agg.read_text())
    data["segGroups"][2]["segments"].append(987654)
    agg.write_text(json.dumps(data))
    err = _raises(agg, load_scene, sid, scans, match="987654")
    assert "segGroups[2]" in str(err)


def test_aggregation_without_seg_groups(copy):
    raw, _, scans, _, sid = copy
    agg = raw / f"{sid}.aggregation.json"
    agg.write_text(json.dumps({"sceneId": sid}))
    _raises(agg, load_scene, sid, scans, match="segGroups")


def test_missing_axis_alignment_is_identity(copy):
    raw, _, scans, _, sid = copy
    aligned = load_scene(sid, scans)
    info = raw / f"{sid}.txt"
    lines = [ln for ln in info.read_text().splitlines() if not ln.startswith("axisAlignment")]
    info.write_text("\n".join(lines))
    unaligned = load_scene(sid, scans)
    np.testing.assert_array_equal(unaligned.axis_alignment, np.eye(4))
    M = aligned.axis_alignment
    pts = unaligned.points.astype(np.float64) @ M[:3, :3].T + M[:3, 3]
    np.testing.assert_allclose(pts, aligned.points, atol=1e-4)
    info.unlink()
    np.testing.assert_array_equal(load_scene(sid, scans).axis_alignment, np.eye(4))


def test_malformed_axis_alignment(copy):
    raw, _, scans, _, sid = copy
    info = raw / f"{sid}.txt"
    info.write_text("axisAlignment = 1 0 0 0 0 1 0 0 0 0 1\n")
    _raises(info, load_scene, sid, scans, match="16")
    info.write_text("axisAlignment = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 x\n")
    _raises(info, read_axis_alignment, info)


def test_pose_with_inf_is_skipped(copy, caplog):
    _, posed, scans, posed_root, sid = copy
    scene = load_scene(sid, scans, posed_root)
    ids = [f.frame_id for f in scene.frames()]
    bad = posed / f"{ids[1]:05d}.txt"
    bad.write_text("\n".join(["-inf -inf -inf -inf"] * 4) + "\n")
    scene = load_scene(sid, scans, posed_root)
    with caplog.at_level(logging.WARNING, logger="threed.scannet"):
        frames = scene.frames()
    assert [f.frame_id for f in frames] == [ids[0]] + ids[2:]
    assert scene.frame_ids == ids
    assert any(
        "inf/nan" in r.getMessage() and str(ids[1]) in r.getMessage() for r in caplog.records
    )


def test_pose_with_nan_is_skipped_and_malformed_pose_raises(copy):
    _, posed, scans, posed_root, sid = copy
    (posed / "00000.txt").write_text("nan " * 16)
    scene = load_scene(sid, scans, posed_root)
    assert 0 not in [f.frame_id for f in scene.frames()]
    (posed / "00010.txt").write_text("1 0 0\n0 1 0\n")
    scene = load_scene(sid, scans, posed_root)  # poses are read once per Scene
    _raises(posed / "00010.txt", scene.frames, match="16 numbers")


def test_missing_intrinsics(copy):
    _, posed, scans, posed_root, sid = copy
    (posed / "depth_intrinsic.txt").unlink()
    _raises(posed / "depth_intrinsic.txt", load_scene, sid, scans, posed_root)


def test_intrinsics_3x3_ok_and_malformed(copy):
    _, posed, scans, posed_root, sid = copy
    k4 = load_scene(sid, scans, posed_root).intrinsic_depth
    k_path = posed / "depth_intrinsic.txt"
    k_path.write_text("\n".join(" ".join(str(v) for v in row[:3]) for row in k4[:3]))
    np.testing.assert_allclose(load_scene(sid, scans, posed_root).intrinsic_depth, k4)
    k_path.write_text("1 2 3 4 5")
    _raises(k_path, load_scene, sid, scans, posed_root, match="16 numbers")
    k_path.write_text(" ".join(["0"] * 16))
    _raises(k_path, load_scene, sid, scans, posed_root, match="focal")


def test_missing_depth_frame(copy):
    _, posed, scans, posed_root, sid = copy
    (posed / "00010.png").unlink()
    _raises(posed / "00010.png", load_scene, sid, scans, posed_root, match="depth")


def test_unreadable_depth_image(copy):
    _, posed, scans, posed_root, sid = copy
    (posed / "00000.png").write_bytes(b"\x89PNG broken")
    frame = load_scene(sid, scans, posed_root).frames()[0]
    assert frame.rgb.shape == (48, 64, 3)
    _raises(posed / "00000.png", getattr, frame, "depth")


def test_frames_without_posed_images(copy):
    _, _, scans, _, sid = copy
    scene = load_scene(sid, scans)
    with pytest.raises(ScanNetDataError, match="posed_images_root"):
        scene.frames()


def test_missing_posed_scene_folder(copy, tmp_path):
    _, _, scans, _, sid = copy
    empty = tmp_path / "nothing"
    empty.mkdir()
    _raises(empty / sid, load_scene, sid, scans, empty, match="posed-images")


def test_iter_scenes_yields_the_error(copy):
    raw, _, scans, posed_root, sid = copy
    (raw / f"{sid}_vh_clean_2.ply").unlink()
    got = list(iter_scenes([sid], scans, posed_root))
    assert len(got) == 1 and got[0][0] == sid and isinstance(got[0][1], ScanNetDataError)


def test_language_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    for fn in (load_scanrefer, load_scanqa, load_sqa3d):
        _raises(bad, fn, bad, match="JSON")
    missing = tmp_path / "missing.json"
    _raises(missing, load_scanrefer, missing, match="not found")

    refer = tmp_path / "refer.json"
    refer.write_text(json.dumps([{"scene_id": "scene0000_00", "object_id": "3"}]))
    _raises(refer, load_scanrefer, refer, match="object_name")
    refer.write_text(json.dumps({"scene_id": "scene0000_00"}))
    _raises(refer, load_scanrefer, refer, match="list")
    rec = {
        "scene_id": "scene0000_00",
        "object_id": "x3",
        "object_name": "chair",
        "ann_id": "0",
        "description": "a chair.",
    }
    refer.write_text(json.dumps([rec]))
    _raises(refer, load_scanrefer, refer, match="object_id")

    qa = tmp_path / "qa.json"
    qa.write_text(
        json.dumps([{"scene_id": "s", "question_id": "q", "question": "?", "answers": 3}])
    )
    _raises(qa, load_scanqa, qa, match="answers")
    qa.write_text(json.dumps([{"scene_id": "s", "question_id": "q", "question": "why?"}]))
    assert load_scanqa(qa)[0].answers == []  # the test split has no answers

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"info": "x"}))
    _raises(questions, load_sqa3d, questions, match="questions")
    questions.write_text(
        json.dumps(
            {"questions": [{"scene_id": "s", "question_id": 1, "question": "?", "situation": "."}]}
        )
    )
    anns = tmp_path / "a.json"
    anns.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": ["yes"]}]}))
    _raises(anns, load_sqa3d, questions, anns, match="answers")
    anns.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "y"}]}]}))
    assert load_sqa3d(questions, anns)[0].answers == ["y"]


def test_scanrefer_object_not_in_scene(copy, tmp_path):
    _, _, scans, _, sid = copy
    refer = tmp_path / "refer.json"
    rec = {"scene_id": sid, "object_id": "999", "object_name": "chair", "ann_id": "0",
           "description": "a chair."}  # fmt: skip
    refer.write_text(json.dumps([rec]))
    _raises(refer, load_scanrefer, refer, scans, match="999")
