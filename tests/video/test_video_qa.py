"""Video QA: manifests, answer parsing, settings, per-batch measurements with known values."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from common.flops import decoder_prefill_flops
from video.qa import (
    ManifestError,
    QASample,
    answer_batch,
    expand_settings,
    format_prompt,
    parse_option,
    read_manifest,
    split_method_args,
)
from video.tiny import build_tiny

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) a red square", "C"),
        ("  D: left", "D"),
        ("The answer is A.", "A"),
        ("I think option b", None),  # lower-case letters are words, not options
        ("answer: (B)", "B"),
        ("It moves to the left.", "A"),  # option text
        ("E", None),  # not an option of four
        ("", None),
        ("\ufffd\ufffd", None),
        ("red or blue", None),  # two options named: ambiguous
        ("A blue square", "D"),  # the article "A", then the option's text
        ("A red one", "C"),
        ("A", "A"),
        ("B Blue", "B"),
    ],
)
def test_parse_option(text, expected):
    assert parse_option(text, ["left", "right", "red", "blue"]) == expected


def test_format_prompt_lists_lettered_options():
    s = QASample("x", "v.mp4", "Which way?", ("left", "right", "up"), "B")
    prompt = format_prompt(s)
    assert "Which way?\nA. left\nB. right\nC. up\n" in prompt
    assert "(A, B, or C)" in prompt and prompt.endswith("The best answer is:")


# ----------------------------------------------------------------------------- manifests


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generic_jsonl_and_csv(tmp_path):
    rows = [
        {"id": "a", "video": "v/a.mp4", "question": "Q1", "options": ["x", "y"], "answer": "B"},
        {"id": "b", "video": "/abs/b.mp4", "question": "Q2", "options": "A. x|B. y", "answer": 0},
        {"id": "c", "video": "c.mp4", "question": "Q3", "options": ["x", "y"], "answer": "y",
         "start": 1.5, "end": 3, "task": "t"},
    ]  # fmt: skip
    samples = read_manifest(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert [s.answer for s in samples] == ["B", "A", "B"]
    assert samples[0].video == str(tmp_path / "v" / "a.mp4")
    assert samples[1].video == "/abs/b.mp4" and samples[1].options == ("x", "y")
    assert (samples[2].start, samples[2].end, samples[2].meta) == (1.5, 3.0, {"task": "t"})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "video", "question", "options", "answer"])
        w.writeheader()
        w.writerow({"id": "a", "video": "a.mp4", "question": "Q", "options": '["p", "q", "r"]',
                    "answer": "C"})  # fmt: skip
        w.writerow({"id": "b", "video": "b.mp4", "question": "Q", "options": "p|q", "answer": ""})
    samples = read_manifest(tmp_path / "m.csv", video_root="/data")
    assert samples[0].options == ("p", "q", "r") and samples[0].answer == "C"
    assert samples[1].answer is None and samples[1].video == "/data/b.mp4"
    assert len(read_manifest(tmp_path / "m.jsonl", limit=2)) == 2


def test_benchmark_layouts(tmp_path):
    mvbench = [{"video": "x.mp4", "question": "Q", "candidates": ["a", "b", "c"], "answer": "c"}]
    (tmp_path / "mvb.json").write_text(json.dumps(mvbench))
    s = read_manifest(tmp_path / "mvb.json")[0]
    assert (s.id, s.answer, s.options) == ("0", "C", ("a", "b", "c"))
    ego = [{"q_uid": "u1", "question": "Q"} | {f"option {i}": f"o{i}" for i in range(5)}]
    (tmp_path / "ego.json").write_text(json.dumps(ego))
    (tmp_path / "ans.json").write_text(json.dumps({"u1": 3}))
    s = read_manifest(tmp_path / "ego.json", answers=tmp_path / "ans.json")[0]
    assert (s.id, s.answer, s.video, len(s.options)) == ("u1", "D", str(tmp_path / "u1.mp4"), 5)
    assert read_manifest(tmp_path / "ego.json")[0].answer is None  # test split: no answers
    vmme = [{"videoID": "abc", "question_id": "001-1", "question": "Q", "duration": "short",
             "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "C"}]  # fmt: skip
    (tmp_path / "vmme.json").write_text(json.dumps(vmme))
    s = read_manifest(tmp_path / "vmme.json")[0]
    assert (s.id, s.answer, s.options[0], s.video) == (
        "001-1",
        "C",
        "one",
        str(tmp_path / "abc.mp4"),
    )
    assert s.meta == {"duration": "short"}
    lvb = [{"id": "l1", "video_path": "l1.mp4", "question": "Q", "candidates": ["a", "b"],
            "correct_choice": 1}]  # fmt: skip
    (tmp_path / "lvb.json").write_text(json.dumps(lvb))
    s = read_manifest(tmp_path / "lvb.json")[0]
    assert (s.id, s.answer) == ("l1", "B")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"id": "a", "video": "v", "question": "Q", "answer": "A"}], "missing column 'options'"),
        ([{"id": "a", "video": "v", "question": "Q", "options": ["x"]}], "at least two options"),
        ([{"id": "a", "video": "v", "question": "Q", "options": ["x", "y"], "answer": "z"}],
         "none of the options"),
        ([{"id": "a", "video": "v", "question": "Q", "options": ["x", "y"], "answer": 5}],
         "outside 2 options"),
        ([{"id": "a", "video": "v", "question": "Q", "options": ["x", "y"]}] * 2, "repeated ids"),
        ([], "no samples"),
    ],
)  # fmt: skip
def test_bad_manifests_name_the_file_and_row(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "m.jsonl").write_text("{not json\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:1: not JSON"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ManifestError, match="expected .jsonl"):
        read_manifest(tmp_path / "m.txt")
    try:
        import pandas  # noqa: F401
    except ImportError:  # without pandas a parquet manifest is a one-line error, not a crash
        (tmp_path / "m.parquet").write_bytes(b"PAR1")
        with pytest.raises(ManifestError, match="needs pandas"):
            read_manifest(tmp_path / "m.parquet")


# ----------------------------------------------------------------------------- settings


def test_split_method_args_and_sweeps():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--method")
    argv = ["--frames", "8", "--method", "fastv", "--keep-ratio", "0.25,0.5", "--layer=2",
            "--verbose", "--method=pdrop", "--layers", "[1,2,3]", "--frames", "4"]  # fmt: skip
    rest, specs = split_method_args(argv, parser)
    assert rest == ["--frames", "8", "--verbose", "--frames", "4"]
    assert specs == [("fastv", {"keep_ratio": "0.25,0.5", "layer": "2"}),
                     ("pdrop", {"layers": "[1,2,3]"})]  # fmt: skip
    settings = expand_settings(specs)
    assert [s.label for s in settings] == [
        "full",
        "fastv@keep_ratio=0.25",
        "fastv@keep_ratio=0.5",
        "pdrop@layers=(1, 2, 3)",
    ]
    assert settings[1].params == {"keep_ratio": 0.25, "layer": 2}
    assert settings[1].series == settings[2].series == "fastv layer=2"
    assert settings[3].params == {"layers": (1, 2, 3)}
    with pytest.raises(ValueError, match="--method needs a method name"):
        split_method_args(["--method"], parser)


def test_bad_settings_raise_naming_the_field():
    with pytest.raises(ValueError, match="keep_ratio"):
        expand_settings([("fastv", {"keep_ratio": "1.5"})])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_settings([("nope", {})])
    with pytest.raises(ValueError, match="unknown parameter"):
        expand_settings([("fastv", {"retain": "0.5"})])


# ----------------------------------------------------------------------------- measurements


@pytest.fixture(scope="module")
def llava():
    return build_tiny("tiny-random-llava-onevision", seed=0)


def _video(frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)


SAMPLES = [
    QASample("a", "a.mp4", "What colour?", ("red", "green", "blue", "white"), "A"),
    QASample("b", "b.mp4", "Which way does it move, please?", ("left", "right", "up", "down"), "C"),
]


def test_full_setting_counts_and_flops(llava):
    model, processor = llava
    row = answer_batch(model, processor, SAMPLES[:1], [_video(4, 0)], max_new_tokens=3)[0]
    cfg = model.config.text_config
    assert row["visual_tokens_before"] == 4 * 16 + 1  # 4x4 pooled tokens per frame + newline
    assert row["visual_tokens_after"] == row["visual_tokens_final"] == 65
    n = row["prefill_tokens"]
    expected = decoder_prefill_flops([n] * 4, cfg.hidden_size, cfg.intermediate_size)
    assert row["prefill_tflops"] == pytest.approx(expected / 1e12)
    assert row["ttft_ms"] <= row["latency_ms"] and row["new_tokens"] <= 3
    assert row["correct"] in (True, False) and row["accuracy"] in (0.0, 1.0)


def test_fastv_counts_follow_the_plan(llava):
    from common.engine import FastV, find_decoder_layers

    model, processor = llava
    full = answer_batch(model, processor, SAMPLES[:1], [_video(4, 0)], max_new_tokens=2)[0]
    row = answer_batch(
        model,
        processor,
        SAMPLES[:1],
        [_video(4, 0)],
        method=FastV(layer=2, keep_ratio=0.25),
        max_new_tokens=2,
    )[0]
    kept = round(65 * 0.25)
    assert row["visual_tokens_after"] == 65 and row["visual_tokens_final"] == kept
    n = row["prefill_tokens"]
    cfg = model.config.text_config
    lengths = [n, n, n - 65 + kept, n - 65 + kept]
    expected = decoder_prefill_flops(lengths, cfg.hidden_size, cfg.intermediate_size)
    assert row["prefill_tflops"] == pytest.approx(expected / 1e12)
    assert row["prefill_tflops"] < full["prefill_tflops"]
    decoder, layers = find_decoder_layers(model)  # the meter's hooks are gone
    assert not decoder._forward_pre_hooks and not any(layer._forward_hooks for layer in layers)


def test_batch_of_two_equals_each_alone(llava):
    """Left padding and per-sample counts: a batch answers as each sample alone."""
    model, processor = llava
    videos = [_video(4, 1), _video(4, 2)]
    together = answer_batch(model, processor, SAMPLES, videos, max_new_tokens=4)
    for s, v, row in zip(SAMPLES, videos, together):
        alone = answer_batch(model, processor, [s], [v], max_new_tokens=4)[0]
        assert row["prediction"] == alone["prediction"]
        for key in ("visual_tokens_before", "visual_tokens_after", "prefill_tokens"):
            assert row[key] == alone[key]
        assert row["prefill_tflops"] == pytest.approx(alone["prefill_tflops"])
        assert row["batch_size"] == 2


def test_holitom_shortens_the_video_span():
    from common.methods import build_method

    model, processor = build_tiny("tiny-random-qwen2-vl", seed=0)
    frames = np.repeat(_video(1, 3), 4, axis=0)  # a static clip: the background merges
    method = build_method("holitom", retain_ratio=0.25, inner_layer=2)
    row = answer_batch(model, processor, SAMPLES[:1], [frames], method=method, max_new_tokens=2)[0]
    assert row["visual_tokens_before"] == 2 * 16  # two temporal steps of 4x4 merged patches
    assert row["visual_tokens_after"] < row["visual_tokens_before"]
    assert row["visual_tokens_final"] < row["visual_tokens_after"]  # the inner merge at layer 2
    with torch.no_grad():
        assert not any(m._forward_pre_hooks_with_kwargs for m in model.modules())


def test_holitom_batch_counts_equal_each_alone():
    """Different videos merge to different lengths (and inner-merge budgets): each sample's
    counts and FLOPs in a batch are what it gets alone (read from the engine's record)."""
    from common.methods import build_method
    from video.qa import _engine_plan

    model, processor = build_tiny("tiny-random-llava-onevision", seed=0)
    static = np.repeat(_video(1, 5), 4, axis=0)
    videos = [static, _video(4, 6)]
    method = build_method("holitom", retain_ratio=0.5, inner_layer=2)
    together = answer_batch(model, processor, SAMPLES, videos, method=method, max_new_tokens=2)
    assert together[0]["visual_tokens_after"] != together[1]["visual_tokens_after"]
    for s, v, row in zip(SAMPLES, videos, together):
        alone = answer_batch(model, processor, [s], [v], method=method, max_new_tokens=2)[0]
        for key in ("visual_tokens_after", "visual_tokens_final", "prefill_tokens"):
            assert row[key] == alone[key], key
        assert row["prefill_tflops"] == pytest.approx(alone["prefill_tflops"])
    handle = method.apply(model)
    try:
        assert _engine_plan(handle) is None  # nothing recorded before a prefill
    finally:
        handle.remove()


def test_rows_left_counts_merged_and_shard_rows(tmp_path):
    from video.qa import rows_left

    def row(sid, setting, status="ok"):
        track = "video_qa"
        return json.dumps({"sample_id": sid, "track": track, "setting": setting, "status": status})

    assert rows_left(tmp_path, ["a", "b"], ["full", "x"]) == 4  # nothing yet
    (tmp_path / "rows.jsonl").write_text(row("a", "full") + "\n" + row("a", "*", "failed") + "\n")
    (tmp_path / "rows.rank1.jsonl").write_text(row("b", "x") + "\n")
    assert rows_left(tmp_path, ["a", "b"], ["full", "x"]) == 2  # (a, x) and (b, full)
