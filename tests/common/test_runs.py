"""The eval runner: rows, resume after a crash, failed scenes, summary files.

The track here is a counting stand-in, since what is under test is the
runner around tracks, not a model.
"""

from __future__ import annotations

import argparse
import json

import pytest

import threed.scannet
from threed.evaluation import runner
from threed.evaluation.results import ResultsStore, read_rows
from threed.evaluation.runner import DataPaths, EvalConfig, run_eval
from threed.evaluation.summary import markdown_table, summarize_rows


class CountingTrack:
    """Yields one row per setting; can be told to crash after some rows."""

    name = "counting"
    calls: list[tuple[str, str]] = []
    crash_after: int | None = None

    def __init__(self, args, data):
        self.args = args

    def settings(self):
        return ["full", "half", "tenth"]

    def run_scene(self, scene, settings):
        for s in settings:
            if CountingTrack.crash_after is not None and len(CountingTrack.calls) >= (
                CountingTrack.crash_after
            ):
                raise RuntimeError("simulated crash")
            CountingTrack.calls.append((scene, s))
            ratio = {"full": 1.0, "half": 0.5, "tenth": 0.1}[s]
            yield {"setting": s, "method": "count", "kept_ratio": ratio, "tokens": 100 * ratio}


@pytest.fixture()
def patched(monkeypatch):
    monkeypatch.setitem(runner.TRACKS, "counting", f"{__name__}:CountingTrack")

    def fake_load(scene_id, root, posed=None):
        if scene_id == "scene_bad":
            raise ValueError("bad ply")
        return scene_id

    monkeypatch.setattr(threed.scannet, "load_scene", fake_load)
    CountingTrack.calls = []
    CountingTrack.crash_after = None


def _run(tmp_path, scenes):
    data = DataPaths(tmp_path, None, scene_ids=scenes)
    cfg = EvalConfig(out=tmp_path / "out", tracks=["counting"], scenes=scenes, visualize=False)
    return run_eval(argparse.Namespace(device="cpu"), data, cfg)


def test_rows_summary_and_resume_after_crash(tmp_path, patched):
    scenes = ["scene_a", "scene_b"]
    CountingTrack.crash_after = 4  # dies on the 2nd setting of scene_b
    first = _run(tmp_path, scenes)
    rows = read_rows(tmp_path / "out" / "rows.jsonl")
    assert sum(r["status"] == "ok" for r in rows) == 4
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert "simulated crash" in failed["error"] and failed["settings"] == ["half", "tenth"]
    # scene_b has one ok row, but two settings failed: it still counts as failed
    assert all(e["num_failed"] == 1 for e in first)
    failed_scenes = json.loads((tmp_path / "out" / "summary.json").read_text())["failed_scenes"]
    assert failed_scenes == ["scene_b"]

    CountingTrack.crash_after = None
    CountingTrack.calls = []
    summary = _run(tmp_path, scenes)
    # only the two missing settings of scene_b were run again
    assert CountingTrack.calls == [("scene_b", "half"), ("scene_b", "tenth")]
    ok = [r for r in read_rows(tmp_path / "out" / "rows.jsonl") if r["status"] == "ok"]
    assert len(ok) == 6 and len({(r["scene_id"], r["setting"]) for r in ok}) == 6
    by_setting = {e["setting"]: e for e in summary}
    assert by_setting["half"]["tokens"] == pytest.approx(50.0)
    assert by_setting["half"]["num_scenes"] == 2 and by_setting["half"]["num_failed"] == 0
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text())["failed_scenes"] == []
    assert "| setting" in (out / "summary.md").read_text()
    assert (out / "plots" / "counting_tokens.png").stat().st_size > 0


def test_bad_scene_is_recorded_and_run_goes_on(tmp_path, patched):
    _run(tmp_path, ["scene_bad", "scene_a"])
    rows = read_rows(tmp_path / "out" / "rows.jsonl")
    assert [r["scene_id"] for r in rows if r["status"] == "failed"] == ["scene_bad"]
    assert sum(r["status"] == "ok" for r in rows) == 3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed_scenes"] == ["scene_bad"]


def test_unknown_track_is_a_clear_error(tmp_path, patched):
    data = DataPaths(tmp_path, None, scene_ids=["scene_a"])
    cfg = EvalConfig(out=tmp_path / "o", tracks=["nope"], scenes=["scene_a"])
    with pytest.raises(ValueError, match="--tracks"):
        run_eval(argparse.Namespace(device="cpu"), data, cfg)


def test_truncated_last_line_is_ignored_and_shards_merge(tmp_path):
    out = tmp_path
    a, b = ResultsStore(out, rank=0), ResultsStore(out, rank=1)
    a.append({"scene_id": "s0", "track": "t", "setting": "x", "v": 1.0})
    b.append({"scene_id": "s1", "track": "t", "setting": "x", "v": 3.0})
    with b.path.open("a") as f:
        f.write('{"scene_id": "s2", "tra')  # killed mid-write
    ResultsStore.merge(out, [a.path, b.path])
    rows = ResultsStore(out).rows()
    assert sorted(r["scene_id"] for r in rows) == ["s0", "s1"]
    (entry,) = summarize_rows(rows)
    assert entry["v"] == pytest.approx(2.0)
    assert "random weights" in markdown_table([entry])


def test_shards_split_scenes_and_rank0_merges(tmp_path, patched, monkeypatch):
    """Two torchrun ranks, run one after the other (the barrier is a no-op here)."""
    monkeypatch.setattr(runner, "_barrier", lambda world: None)
    scenes = ["scene_a", "scene_b", "scene_c"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _run(tmp_path, scenes) is None  # only rank 0 summarises
    assert {s for s, _ in CountingTrack.calls} == {"scene_b"}
    monkeypatch.setenv("RANK", "0")
    summary = _run(tmp_path, scenes)
    assert {s for s, _ in CountingTrack.calls} == set(scenes)
    assert all(e["num_scenes"] == 3 for e in summary)
    assert len(read_rows(tmp_path / "out" / "rows.jsonl")) == 9


class FlakyTrack(CountingTrack):
    """A second track that always fails on scene_a."""

    name = "flaky"

    def run_scene(self, scene, settings):
        if scene == "scene_a":
            raise RuntimeError("flaky")
        yield from super().run_scene(scene, settings)


def test_failure_in_one_track_is_not_hidden_by_another(tmp_path, patched, monkeypatch):
    monkeypatch.setitem(runner.TRACKS, "flaky", f"{__name__}:FlakyTrack")
    data = DataPaths(tmp_path, None, scene_ids=["scene_a"])
    cfg = EvalConfig(
        out=tmp_path / "out", tracks=["counting", "flaky"], scenes=["scene_a"], visualize=False
    )
    summary = run_eval(argparse.Namespace(device="cpu"), data, cfg)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed_scenes"] == [
        "scene_a"
    ]
    assert {e["track"]: e["num_failed"] for e in summary} == {"counting": 0}


def test_single_process_rerun_picks_up_unmerged_shards(tmp_path, patched, monkeypatch):
    """A sharded run that died before rank 0 merged: a plain rerun reuses its rows."""
    monkeypatch.setattr(runner, "_barrier", lambda world: None)
    scenes = ["scene_a", "scene_b"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _run(tmp_path, scenes) is None  # rank 1 did scene_b; rank 0 never ran
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    CountingTrack.calls = []
    summary = _run(tmp_path, scenes)
    assert {s for s, _ in CountingTrack.calls} == {"scene_a"}  # scene_b not run again
    assert all(e["num_scenes"] == 2 for e in summary)
    assert len(read_rows(tmp_path / "out" / "rows.jsonl")) == 6
