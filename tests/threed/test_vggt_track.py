"""The eval_scannet "vggt" track on a generated scene (small random model)."""

from __future__ import annotations

import argparse
import json

import pytest

from common.runs import TrackContext
from threed.vggt.track import VGGTOptions, VGGTTrack, default_merge_ratios


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    scannet = pytest.importorskip("threed.scannet")
    pytest.importorskip("open3d")
    data = scannet.ensure_synthetic(root=tmp_path_factory.mktemp("synth"), num_scenes=1, seed=0)
    return scannet.load_scene(data.scene_ids[0], data.scannet_root, data.posed_images_root)


CONTEXT = TrackContext(device="cpu", seed=0, ratios=(1.0, 0.5, 0.25, 0.1))


def _track(*argv) -> VGGTTrack:
    p = argparse.ArgumentParser()
    VGGTTrack.add_arguments(p)
    return VGGTTrack(VGGTTrack.options_from_args(p.parse_args(list(argv))), CONTEXT)


def test_default_sweep_and_settings():
    assert default_merge_ratios([1.0, 0.5, 0.25, 0.1]) == [0.5, 0.75, 0.9]
    assert default_merge_ratios(None) == [0.9]
    track = _track("--merge-ratio", "0.9,0.3")
    settings = track.settings()
    assert [s.label for s in settings] == ["full", "fastvggt@0.9", "fastvggt@0.3"]
    assert [s.method for s in settings] == ["full", "fastvggt", "fastvggt"]
    assert settings[1].params == {"ratio": 0.9} and settings[1].series == "fastvggt"
    assert track.accuracy_valid is False and track.num_frames == 32
    with pytest.raises(SystemExit):
        _track("--merge-ratio", "1.5")
    with pytest.raises(ValueError, match="frames"):
        VGGTOptions(frames=0)


def test_rows_and_visual(scene, tmp_path):
    track = _track("--frames", "3", "--merge-ratio", "0.9")
    steps = []
    rows = list(track.run_unit(scene, track.settings(), steps.append))
    assert steps[-1] == "fastvggt@0.9: 3 frames"  # progress inside the scene
    assert [r["setting"] for r in rows] == ["full", "fastvggt@0.9"]
    full, merged = rows
    json.dumps(rows)  # serialisable
    for r in rows:
        for key in (
            "method",
            "kept_ratio",
            "time_s",
            "aggregator_time_s",
            "tokens_kept",
            "depth_absrel_vs_full",
            "pose_rot_diff_deg_vs_full",
            "ate",
            "auc30",
        ):
            assert key in r, key
        assert r["accuracy_valid"] is False and r["num_frames"] == 3
    assert full["kept_ratio"] == 1.0 and full["depth_absrel_vs_full"] == 0.0
    assert full["pose_rot_diff_deg_vs_full"] == 0.0
    assert 0.0 < merged["kept_ratio"] < 1.0
    assert merged["tokens_kept"] < merged["tokens_total"]
    paths = track.visualize(scene, tmp_path)
    assert paths and paths[0].exists() and paths[0].stat().st_size > 0


def test_timings_come_from_a_warm_forward(monkeypatch):
    """The first forward of a setting (cold on CUDA) gives the outputs; the reported
    times are those of the second, warm one, for ``full`` and merged alike."""
    track = _track("--merge-ratio", "0.9")
    calls = []

    def fake_timed(images):
        calls.append(len(calls))
        return {"call": len(calls) - 1}, 10.0 * len(calls), 100.0 * len(calls)

    monkeypatch.setattr(track, "_timed_forward", fake_timed)
    # on a CPU, two more aggregator-only runs; the fastest run is reported
    more = iter([25.0, 15.0])
    monkeypatch.setattr(track, "_aggregator_seconds", lambda images: next(more))
    out, agg_s, total_s, _ = track._measured_forward(None)
    assert calls == [0, 1] and out == {"call": 0}
    assert (agg_s, total_s) == (15.0, 200.0)
