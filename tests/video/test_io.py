"""Video loading (decord / PyAV), sampling, bad files, and the synthetic video QA set."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from video.io import VideoLoadError, available_backends, load_video, loader_options, sample_indices
from video.io import reader as reader_mod
from video.synthetic import COLOURS, DIRECTIONS, ensure_synthetic_video_qa

pytest.importorskip("av")
BACKENDS = [b for b in ("decord", "pyav") if b in available_backends()]


def _write(path, frames: np.ndarray, fps: int = 8, faststart: bool = False) -> None:
    import av

    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "4", "threads": "1"}  # near-lossless (decord rejects crf 0)
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory):
    """40 frames at 8 fps; frame i has grey level 5 * i (decodes back to within a few levels)."""
    frames = np.stack([np.full((32, 64, 3), 5 * i, dtype=np.uint8) for i in range(40)])
    path = tmp_path_factory.mktemp("v") / "count.mp4"
    _write(path, frames, faststart=True)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_video_qa(tmp_path_factory.mktemp("syn"), num_videos=4, seed=3)


# ----------------------------------------------------------------------------- sampling


def test_sample_indices_uniform_fps_window_and_multiple():
    assert sample_indices(40, 8.0, num_frames=8).tolist() == [0, 5, 11, 16, 22, 27, 33, 39]
    # start/end in seconds: frames 8..23
    idx = sample_indices(40, 8.0, num_frames=4, start=1.0, end=3.0)
    assert idx[0] == 8 and idx[-1] == 23
    # 2 fps over 5 s -> every 4th frame
    assert sample_indices(40, 8.0, fps=2.0).tolist() == list(range(0, 40, 4))
    assert len(sample_indices(400, 8.0, fps=2.0, max_frames=16)) == 16
    # rounded up to a multiple by repeating the last index
    assert sample_indices(40, 8.0, num_frames=5, multiple_of=2).tolist()[-2:] == [39, 39]
    # more frames than the file: indices repeat
    assert sample_indices(3, 8.0, num_frames=6).tolist() == [0, 0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(fps=0.0), "fps"),
        (dict(num_frames=4, fps=1.0), "exactly one"),
        (dict(num_frames=4, multiple_of=0), "multiple_of"),
        (dict(num_frames=4, start=2.0, end=1.0), "end"),
        (dict(num_frames=4, start=-1.0), "start"),
        (dict(fps=1.0, max_frames=0), "max_frames"),
    ],
)
def test_bad_sampling_arguments_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample_indices(40, 8.0, **kwargs)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_and_timestamps(counting_video, backend):
    clip = load_video(counting_video, num_frames=8, backend=backend)
    assert clip.backend == backend and clip.total_frames == 40 and clip.native_fps == 8.0
    assert clip.frames.shape == (8, 32, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == [0, 5, 11, 16, 22, 27, 33, 39]
    np.testing.assert_allclose(clip.timestamps, clip.indices / 8.0)
    grey = clip.frames.reshape(8, -1).mean(1)
    np.testing.assert_allclose(grey, 5 * clip.indices, atol=3)


def test_backends_agree_and_fps_window(counting_video):
    if len(BACKENDS) < 2:
        pytest.skip("needs decord and PyAV")
    a = load_video(counting_video, fps=2.0, start=1.0, end=4.0, backend="decord")
    b = load_video(counting_video, fps=2.0, start=1.0, end=4.0, backend="pyav")
    assert a.indices.tolist() == b.indices.tolist() == [8, 12, 16, 20, 24, 28]
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_allclose(a.timestamps, b.timestamps)


def test_resize_and_processor_expectations(counting_video):
    from video.tiny import build_tiny

    _, qwen = build_tiny("tiny-random-qwen2-vl")
    _, llava = build_tiny("tiny-random-llava-onevision")
    assert loader_options(qwen) == {"multiple_of": 2}
    assert loader_options(llava) == {"size": (112, 112)}
    clip = load_video(counting_video, num_frames=5, **loader_options(qwen))
    assert clip.num_frames == 6
    clip = load_video(counting_video, num_frames=3, **loader_options(llava))
    assert clip.frames.shape == (3, 112, 112, 3)


def test_decord_failure_falls_back_to_pyav(counting_video, monkeypatch, caplog):
    if "pyav" not in BACKENDS:
        pytest.skip("needs PyAV")

    def broken(path, sampling):
        raise RuntimeError("decord cannot read this")

    monkeypatch.setitem(reader_mod._DECODERS, "decord", broken)
    monkeypatch.setattr(reader_mod, "available_backends", lambda: ["decord", "pyav"])
    with caplog.at_level(logging.INFO, logger="video.io.reader"):
        clip = load_video(counting_video, num_frames=4)
    assert clip.backend == "pyav" and clip.num_frames == 4
    np.testing.assert_array_equal(
        clip.frames, load_video(counting_video, num_frames=4, backend="pyav").frames
    )
    assert "decord cannot read this" in caplog.text  # the fallback says why


def test_file_decord_misreads_still_loads(tmp_path):
    """decord 0.6 fails on some frame widths (48 px here: a row-stride mismatch); the
    default path then decodes with PyAV."""
    frames = np.stack([np.full((32, 48, 3), 9 * i, dtype=np.uint8) for i in range(10)])
    path = tmp_path / "w48.mp4"
    _write(path, frames)
    clip = load_video(path, num_frames=5)
    assert clip.frames.shape == (5, 32, 48, 3)
    np.testing.assert_allclose(clip.frames.reshape(5, -1).mean(1), 9 * clip.indices, atol=3)


def test_decord_missing_uses_pyav(counting_video, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    assert "decord" not in available_backends()
    assert load_video(counting_video, num_frames=4).backend == "pyav"


def _bad_files(tmp_path, counting_video):
    import av

    files = {}
    files["missing"] = tmp_path / "missing.mp4"
    files["empty"] = tmp_path / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["garbage"] = tmp_path / "garbage.mp4"
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(300))
    data = counting_video.read_bytes()
    files["truncated"] = tmp_path / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["audio_only"] = tmp_path / "audio_only.mp4"
    with av.open(str(files["audio_only"]), "w") as out:
        s = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for p in list(s.encode(frame)) + list(s.encode()):
            out.mux(p)
    files["folder"] = tmp_path
    return files


@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_bad_files_raise_naming_the_file(tmp_path, counting_video, backend):
    reasons = {
        "missing": "not found",
        "empty": "empty file",
        "garbage": "unreadable",
        "truncated": "truncated|unreadable",
        "audio_only": "video stream|unreadable",
        "folder": "not a file",
    }
    for kind, path in _bad_files(tmp_path, counting_video).items():
        with pytest.raises(VideoLoadError, match=reasons[kind]) as err:
            load_video(path, num_frames=4, backend=backend)
        assert str(path) in str(err.value) and err.value.path == str(path)


def test_pyav_reports_truncation_after_some_frames(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    _write(tmp_path / "full.mp4", noise, faststart=True)  # header first, frames cut off
    data = (tmp_path / "full.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoLoadError, match="truncated"):
        load_video(path, num_frames=4, backend="pyav")


def test_bad_loader_arguments(counting_video):
    with pytest.raises(ValueError, match="backend"):
        load_video(counting_video, backend="opencv")
    with pytest.raises(ValueError, match="size"):
        load_video(counting_video, size=(0, 4))
    with pytest.raises(ValueError, match="num_frames"):
        load_video(counting_video, num_frames=0)


# ----------------------------------------------------------------------------- synthetic set


def _centroid(frame: np.ndarray, rgb) -> np.ndarray:
    mask = np.abs(frame.astype(int) - np.array(rgb)).sum(-1) < 60
    ys, xs = np.nonzero(mask)
    assert len(ys) > 10, "shape not visible"
    return np.array([ys.mean(), xs.mean()])


def test_synthetic_answers_are_what_the_video_shows(synthetic):
    assert len(synthetic.samples) == 12
    by_video: dict[str, list[dict]] = {}
    for s in synthetic.samples:
        by_video.setdefault(s["video"], []).append(s)
        assert s["answer"] in "ABCD" and len(s["options"]) == 4
    for rel, rows in by_video.items():
        clip = load_video(synthetic.root / rel, num_frames=16)
        assert clip.num_frames == 16
        truth = {r["task"]: r["options"]["ABCD".index(r["answer"])] for r in rows}
        shapes = rows[0]["shapes"]
        assert truth["count"] == str(len(shapes))
        motion = next(r for r in rows if r["task"] == "motion")
        colour = next(c for c in COLOURS if f" {c} " in motion["question"])
        start = _centroid(clip.frames[0], COLOURS[colour])
        end = _centroid(clip.frames[-1], COLOURS[colour])
        dy, dx = DIRECTIONS[truth["motion"]]
        move = end - start
        assert np.dot(move, [dy, dx]) > 20, (rel, truth["motion"], move)
        ask = next(r for r in rows if r["task"] == "colour")
        direction = next(d for d in DIRECTIONS if f"moves {d}" in ask["question"])
        assert {"colour": truth["colour"], "direction": direction}.items() <= next(
            s for s in shapes if s["direction"] == direction
        ).items()
        # the background is static: pixels away from every shape path do not change
        diff = np.abs(clip.frames[0].astype(int) - clip.frames[1].astype(int)).sum(-1)
        assert (diff < 30).mean() > 0.8


def test_synthetic_is_deterministic_cached_and_atomic(synthetic, tmp_path):
    again = ensure_synthetic_video_qa(synthetic.root.parent, num_videos=4, seed=3)
    assert again.root == synthetic.root and again.samples == synthetic.samples
    other = ensure_synthetic_video_qa(tmp_path, num_videos=4, seed=3)
    for rel in {s["video"] for s in synthetic.samples}:
        assert (other.root / rel).read_bytes() == (synthetic.root / rel).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [other.root.name]  # no temporary left
    manifest = [json.loads(line) for line in other.manifest.read_text().splitlines()]
    assert manifest == other.samples
    different = ensure_synthetic_video_qa(tmp_path, num_videos=4, seed=4)
    assert different.samples != other.samples


def test_synthetic_incomplete_folder_is_regenerated(tmp_path):
    data = ensure_synthetic_video_qa(tmp_path, num_videos=1)
    (data.root / "COMPLETE.json").unlink()
    (data.root / "manifest.jsonl").write_text("")
    again = ensure_synthetic_video_qa(tmp_path, num_videos=1)
    assert len(again.samples) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_videos=0), "num_videos"),
        (dict(seed=-1), "seed"),
        (dict(num_frames=2), "num_frames"),
        (dict(size=(33, 64)), "size"),
        (dict(fps=0), "fps"),
    ],
)
def test_synthetic_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        ensure_synthetic_video_qa(tmp_path, **kwargs)


def test_hf_metadata_gives_the_real_sampling_rate(counting_video):
    """Qwen2.5-VL's processor turns ``VideoMetadata.sampled_fps`` into seconds per temporal
    token: 4 frames over the 2 s window [1, 3] are 2 frames per second."""
    from transformers.video_utils import VideoMetadata

    clip = load_video(counting_video, num_frames=4, start=1.0, end=3.0)
    meta = clip.hf_metadata()
    assert meta["total_num_frames"] == 16 and meta["frames_indices"] == [0, 5, 10, 15]
    assert VideoMetadata(**meta).sampled_fps == pytest.approx(2.0)
    whole = load_video(counting_video, num_frames=10).hf_metadata()
    assert VideoMetadata(**whole).sampled_fps == pytest.approx(2.0)  # 10 frames over 5 s


def test_qwen2_5_vl_processor_reads_metadata_from_the_frame_processor(counting_video):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from video.io.processors import Qwen2VLFrameProcessor, lenient_processor
    from video.tiny import build_tokenizer

    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    proc = lenient_processor(Qwen2_5_VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(size=size),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLFrameProcessor(size=size),
    )
    clip = load_video(counting_video, num_frames=4, start=1.0, end=3.0, multiple_of=2)
    text = "<|vision_start|><|video_pad|><|vision_end|>Q?"
    out = proc(text=[text], videos=[clip.frames], video_metadata=[clip.hf_metadata()])
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]  # 32x64 frames -> 56x84 (min pixels)
    assert out["second_per_grid_ts"] == [pytest.approx(2 / 2.0)]  # temporal patch 2 at 2 fps
