"""The run frame (common.runs): rows, resume after a crash, failure records, torn rows,
shards, summary files, clear errors.

The track here is a counting track and the units are strings, since what is under
test is the runner around tracks, not a model; the loader and the registry are
passed in, as every script does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
import torch

from common.runs import (
    FULL,
    ResultsStore,
    RunConfig,
    RunError,
    Setting,
    Track,
    TrackContext,
    TrackRegistry,
    add_options,
    markdown_table,
    option,
    options_from_args,
    read_rows,
    repair_tail,
    run,
    summarize_rows,
)
from common.runs.summary import axis_label, plot_lines


@dataclass(frozen=True)
class CountingOptions:
    crash_after: int | None = None  # crash once this many rows exist in the whole run
    fail_units: tuple[str, ...] = ()  # units whose every setting crashes
    scale: float = field(default=100.0, metadata=option("--scale", type=float, help="tokens"))


class CountingTrack(Track):
    """One row per setting; tokens = scale x kept ratio; can be told to crash."""

    name = "counting"
    Options = CountingOptions
    labels = {"tokens": "tokens kept (count)"}

    def __init__(self, options, context):
        super().__init__(options, context)
        self.calls: list[tuple[str, str]] = []
        self.details: list[str] = []

    def settings(self):
        return [
            FULL,
            Setting("half", "count", {"r": 0.5}, series="count"),
            Setting("tenth", "count", {"r": 0.1}, series="count"),
        ]

    def run_unit(self, unit, settings, progress):
        for s in settings:
            progress(f"{s.label} on {unit}")
            self.details.append(s.label)
            if unit in self.options.fail_units:
                raise RuntimeError(f"simulated failure on {unit}")
            if self.options.crash_after is not None and len(LOG) >= self.options.crash_after:
                raise RuntimeError("simulated crash")
            LOG.append((unit, s.label))
            ratio = s.params.get("r", 1.0)
            yield {"setting": s.label, "kept_ratio": ratio, "tokens": self.options.scale * ratio}


class FlakyTrack(CountingTrack):
    """A second track that always fails on scene_a."""

    name = "flaky"

    def run_unit(self, unit, settings, progress):
        if unit == "scene_a":
            raise RuntimeError("flaky")
        yield from super().run_unit(unit, settings, progress)


LOG: list[tuple[str, str]] = []  # (unit, setting) of every row computed


def load_unit(unit_id: str) -> str:
    if unit_id == "scene_bad":
        raise ValueError("bad ply")
    return unit_id


REGISTRY = TrackRegistry({"counting": CountingTrack, "flaky": FlakyTrack})


@pytest.fixture(autouse=True)
def _clear_log():
    LOG.clear()


def _run(out, units, *, tracks=("counting",), shard=None, **opts):
    config = RunConfig(out=out, tracks=list(tracks), visualize=False)
    options = {t: CountingOptions(**opts) for t in tracks}
    return run(
        config, units=units, load_unit=load_unit, registry=REGISTRY, options=options, shard=shard
    )


def test_rows_summary_and_resume_after_crash(tmp_path):
    out = tmp_path / "out"
    scenes = ["scene_a", "scene_b"]
    first = _run(out, scenes, crash_after=4)  # dies on the 2nd setting of scene_b
    rows = read_rows(out / "rows.jsonl")
    assert sum(r["status"] == "ok" for r in rows) == 4
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert "simulated crash" in failed["error"] and failed["settings"] == ["half", "tenth"]
    # scene_b has one ok row, but two settings failed: it still counts as failed
    assert all(e["num_failed"] == 1 for e in first.groups)
    assert first.failed_units == ["scene_b"] and not first.all_failed
    assert json.loads((out / "summary.json").read_text())["failed_scenes"] == ["scene_b"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"full", "count"}
    assert {r["series"] for r in ok} == {"full", "count"}

    LOG.clear()
    summary = _run(out, scenes)
    # only the two missing settings of scene_b were run again
    assert LOG == [("scene_b", "half"), ("scene_b", "tenth")]
    rows = read_rows(out / "rows.jsonl")
    assert all(r["status"] == "ok" for r in rows)  # the failure record was replaced
    assert len(rows) == 6 and len({(r["scene_id"], r["setting"]) for r in rows}) == 6
    by_setting = {e["setting"]: e for e in summary.groups}
    assert by_setting["half"]["tokens"] == pytest.approx(50.0)
    assert by_setting["half"]["num_scenes"] == 2 and by_setting["half"]["num_failed"] == 0
    assert summary.failed_units == [] and summary.problem() is None
    assert json.loads((out / "summary.json").read_text())["failed_scenes"] == []
    assert "| setting" in (out / "summary.md").read_text() == summary.markdown
    assert (out / "plots" / "counting_tokens.png").stat().st_size > 0
    assert summary.files == ["rows.jsonl", "summary.json", "summary.md", "plots/"]


def test_torn_last_row_is_cut_before_appending(tmp_path):
    """A kill during a write leaves a partial line; the rerun must not glue its
    recomputed row onto it (that row would be lost and the summary short)."""
    out = tmp_path / "out"
    _run(out, ["scene_a", "scene_b"])
    path = out / "rows.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = lines[-1][: len(lines[-1]) // 2]  # scene_b/tenth, half written, no newline
    path.write_text("".join(lines[:-1]) + torn)
    LOG.clear()
    summary = _run(out, ["scene_a", "scene_b"])
    assert LOG == [("scene_b", "tenth")]
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]  # every line parses
    assert len(rows) == 6
    assert {e["setting"]: e["num_scenes"] for e in summary.groups}["tenth"] == 2


def test_repair_tail(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_tail(path) == len('{"c": ')
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert repair_tail(path) == 0
    path.write_text('{"c": 3')  # a torn first line: nothing survives
    assert repair_tail(path) == 7 and path.read_text() == ""
    assert repair_tail(tmp_path / "missing.jsonl") == 0


def test_rerun_replaces_a_failure_record(tmp_path):
    out = tmp_path / "out"
    for _ in range(3):
        summary = _run(out, ["scene_a", "scene_b"], fail_units=("scene_b",))
    rows = read_rows(out / "rows.jsonl")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["settings"] == ["full", "half", "tenth"]
    assert summary.failed_units == ["scene_b"]


def test_bad_unit_is_recorded_and_run_goes_on(tmp_path):
    out = tmp_path / "out"
    summary = _run(out, ["scene_bad", "scene_a"])
    rows = read_rows(out / "rows.jsonl")
    assert [r["scene_id"] for r in rows if r["status"] == "failed"] == ["scene_bad"]
    assert sum(r["status"] == "ok" for r in rows) == 3
    assert summary.failed_units == ["scene_bad"]
    assert "Failed scenes: scene_bad" in summary.markdown


def test_no_units_and_all_failed(tmp_path):
    with pytest.raises(RunError, match="no scenes found") as e:
        _run(tmp_path / "o1", [])
    assert e.value.exit_code == 2
    summary = _run(tmp_path / "o2", ["scene_bad", "scene_a"], fail_units=("scene_a",))
    assert summary.all_failed
    assert summary.problem().startswith("all 2 scenes failed")


def test_unknown_track_bad_out_and_device_are_clear_errors(tmp_path):
    with pytest.raises(RunError, match="--tracks: nope not available"):
        run(
            RunConfig(out=tmp_path / "o", tracks=["nope"]),
            units=["scene_a"],
            load_unit=load_unit,
            registry=REGISTRY,
        )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunError, match="is a file, not a folder"):
        _run(a_file, ["scene_a"])
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="this torch has no CUDA"):
            run(
                RunConfig(out=tmp_path / "o", tracks=["counting"], device="cuda"),
                units=["scene_a"],
                load_unit=load_unit,
                registry=REGISTRY,
            )
    assert LOG == []  # nothing ran


def test_registry_unavailable_only_for_another_packages_import_error(tmp_path, monkeypatch):
    """A missing optional dependency hides a track; a broken import inside the entry's own
    package is a bug and surfaces (it used to read as 'not available here')."""
    pkg = tmp_path / "hp_fake_tracks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_dep.py").write_text("import hp_no_such_dependency  # noqa\n")
    (pkg / "broken.py").write_text("from hp_fake_tracks import no_such_module  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = TrackRegistry(
        {
            "counting": CountingTrack,
            "dep": "hp_fake_tracks.needs_dep:Track",
        }
    )
    assert list(reg.available()) == ["counting"]
    reg.add("broken", "hp_fake_tracks.broken:Track")
    with pytest.raises(ImportError, match="no_such_module"):
        reg.available()


def test_without_matplotlib_the_run_ends_with_tables_but_no_plots(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    summary = _run(tmp_path / "out", ["scene_a"])
    assert summary.files == ["rows.jsonl", "summary.json", "summary.md"]
    assert "| half |" in summary.markdown


class WeightsTrack(CountingTrack):
    """Reads a weights file when built, as the grounding track does."""

    name = "weights"

    def __init__(self, options, context):
        super().__init__(options, context)
        raise FileNotFoundError("checkpoint not found: model.pt")


def test_a_track_that_cannot_be_built_is_a_one_line_error(tmp_path):
    with pytest.raises(RunError, match="^track weights: checkpoint not found: model.pt$") as e:
        run(
            RunConfig(out=tmp_path / "o", tracks=["counting", "weights"], visualize=False),
            units=["scene_a"],
            load_unit=load_unit,
            registry={"counting": CountingTrack, "weights": WeightsTrack},
        )
    assert e.value.exit_code == 2
    assert LOG == []  # before any unit


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunError, match="not writable"):
            _run(ro, ["scene_a"])
    finally:
        ro.chmod(0o755)
    assert LOG == []


def test_explicit_shards_split_units_and_shard0_merges(tmp_path):
    out = tmp_path / "out"
    scenes = ["scene_a", "scene_b", "scene_c"]
    assert _run(out, scenes, shard=(1, 2)) is None  # only shard 0 summarises
    assert {s for s, _ in LOG} == {"scene_b"}
    summary = _run(out, scenes, shard=(0, 2))
    assert {s for s, _ in LOG} == set(scenes)
    assert all(e["num_scenes"] == 3 for e in summary.groups)
    assert len(read_rows(out / "rows.jsonl")) == 9


def test_single_process_rerun_picks_up_unmerged_shards(tmp_path):
    """A sharded run that died before shard 0 merged: a plain rerun reuses its rows."""
    out = tmp_path / "out"
    scenes = ["scene_a", "scene_b"]
    assert _run(out, scenes, shard=(1, 2)) is None
    LOG.clear()
    summary = _run(out, scenes)
    assert {s for s, _ in LOG} == {"scene_a"}  # scene_b not run again
    assert all(e["num_scenes"] == 2 for e in summary.groups)
    assert len(read_rows(out / "rows.jsonl")) == 6


def test_failure_in_one_track_is_not_hidden_by_another(tmp_path):
    summary = _run(tmp_path / "out", ["scene_a"], tracks=("counting", "flaky"))
    assert summary.failed_units == ["scene_a"]
    assert {e["track"]: e["num_failed"] for e in summary.groups} == {"counting": 0}


def test_progress_reaches_inside_a_unit(tmp_path):
    seen = []
    track = CountingTrack(CountingOptions(), TrackContext())
    rows = list(track.run_unit("scene_a", track.settings(), seen.append))
    assert [r["setting"] for r in rows] == ["full", "half", "tenth"]
    assert seen == ["full on scene_a", "half on scene_a", "tenth on scene_a"]


def test_unit_name_names_fields_and_messages(tmp_path):
    config = RunConfig(out=tmp_path / "o", tracks=["counting"], unit_name="sample")
    summary = run(config, units=["q1", "q2"], load_unit=str.upper, registry=REGISTRY)
    rows = read_rows(tmp_path / "o" / "rows.jsonl")
    assert {r["sample_id"] for r in rows} == {"q1", "q2"}
    assert all(e["num_samples"] == 2 for e in summary.groups)
    assert "failed_samples" in json.loads((tmp_path / "o" / "summary.json").read_text())


def test_seed_seeds_torch_before_tracks_are_built(tmp_path):
    class Draw(CountingTrack):
        name = "draw"

        def __init__(self, options, context):
            super().__init__(options, context)
            self.draw = float(torch.rand(()))

        def run_unit(self, unit, settings, progress):
            for s in settings:
                yield {"setting": s.label, "kept_ratio": 1.0, "draw": self.draw}

    reg = TrackRegistry({"draw": Draw})
    draws = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        torch.manual_seed(1000 + len(draws))  # whatever the caller did before
        cfg = RunConfig(out=tmp_path / name, tracks=["draw"], seed=seed, visualize=False)
        s = run(cfg, units=["u"], load_unit=str, registry=reg)
        draws.append(s.groups[0]["draw"])
    assert draws[0] == draws[1] != draws[2]


def test_options_from_flags_and_bad_config():
    import argparse

    p = argparse.ArgumentParser()
    add_options(p, CountingOptions)
    opts = options_from_args(CountingOptions, p.parse_args(["--scale", "7"]))
    assert opts == CountingOptions(scale=7.0)
    assert CountingTrack.options_from_args(p.parse_args([])) == CountingOptions()
    with pytest.raises(ValueError, match="seed"):
        RunConfig(out="x", tracks=["counting"], seed=-1)
    with pytest.raises(ValueError, match="tracks"):
        RunConfig(out="x", tracks=[])
    with pytest.raises(ValueError, match="label"):
        Setting("", "full")
    with pytest.raises(TypeError, match="options must be CountingOptions"):
        CountingTrack(object(), TrackContext())


def test_shard_files_merge_with_torn_tail(tmp_path):
    a, b = ResultsStore(tmp_path, rank=0), ResultsStore(tmp_path, rank=1)
    a.append({"scene_id": "s0", "track": "t", "setting": "x", "v": 1.0})
    b.append({"scene_id": "s1", "track": "t", "setting": "x", "v": 3.0})
    with b.path.open("a") as f:
        f.write('{"scene_id": "s2", "tra')  # killed mid-write
    ResultsStore.merge(tmp_path, [a.path, b.path])
    rows = ResultsStore(tmp_path).rows()
    assert sorted(r["scene_id"] for r in rows) == ["s0", "s1"]
    (entry,) = summarize_rows(rows)
    assert entry["v"] == pytest.approx(2.0)
    assert "random weights" in markdown_table([entry])


def test_merge_keeps_only_the_latest_unresolved_failure(tmp_path):
    a = ResultsStore(tmp_path, rank=0)
    fail = {"scene_id": "s0", "track": "t", "setting": "*", "status": "failed"}
    a.append({**fail, "settings": ["x"], "error": "old", "time": 1.0})
    a.append({**fail, "settings": ["x"], "error": "new", "time": 2.0})
    a.append({**fail, "scene_id": "s1", "settings": ["x"], "time": 1.0})
    a.append({"scene_id": "s1", "track": "t", "setting": "x", "v": 1.0})  # made up for
    ResultsStore.merge(tmp_path, [a.path])
    failed = [r for r in ResultsStore(tmp_path).rows() if r.get("status") == "failed"]
    assert [(r["scene_id"], r["error"]) for r in failed] == [("s0", "new")]


def test_table_drops_empty_columns_and_says_why():
    rows = [
        {"scene_id": s, "track": "t", "setting": k, "kept_ratio": r, "cost": r, "chamfer": None}
        for s in ("a", "b")
        for k, r in (("full", 1.0), ("half", 0.5))
    ]
    summary = summarize_rows(rows)
    md = markdown_table(
        summary,
        columns={"t": ["setting", "kept_ratio", "cost", "chamfer"]},
        empty_reasons={"t": {"chamfer": "random weights"}},
        notes={"t": ["a note"]},
    )
    header = next(ln for ln in md.splitlines() if ln.startswith("| setting"))
    assert "chamfer" not in header
    assert "Not shown, empty in every row: chamfer (random weights)." in md
    assert "a note" in md


def test_settings_share_a_plot_line_only_within_a_series():
    entries = [
        {"setting": "full", "series": "full", "kept_ratio": 1.0, "m": 1.0},
        {"setting": "thr", "series": "thr", "kept_ratio": 0.4, "m": 0.3},
        {"setting": "k@0.5", "series": "top-k", "kept_ratio": 0.5, "m": 0.5},
        {"setting": "k@0.25", "series": "top-k", "kept_ratio": 0.25, "m": 0.2},
    ]
    lines = plot_lines(entries, "m")
    assert lines == {
        "full": [(1.0, 1.0)],
        "thr": [(0.4, 0.3)],
        "top-k": [(0.25, 0.2), (0.5, 0.5)],
    }
    assert axis_label("peak_mem_mb") == "peak mem (MB)"
    assert axis_label("aggregator_time_s") == "aggregator time (s)"
    assert axis_label("x", {"x": "words (unit)"}) == "words (unit)"


def test_cli_exit_statuses_and_output(tmp_path):
    import io

    from common.runs import RunSummary, cli_exit

    def ended(summary):
        out, err = io.StringIO(), io.StringIO()
        code = cli_exit(lambda: summary, out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    ok = RunSummary([], [], 2, tmp_path, files=["rows.jsonl"], markdown="| t |")
    assert ended(ok) == (0, f"| t |\nresults: {tmp_path}/ (rows.jsonl)\n", "")
    bad = RunSummary([], ["a", "b"], 2, tmp_path, markdown="| t |", unit_name="sample")
    code, out, err = ended(bad)
    assert (code, out) == (1, "| t |\n") and err.startswith("error: all 2 samples failed")
    assert ended(None) == (0, "", "")

    def raising(exc):
        def start():
            raise exc

        err = io.StringIO()
        return cli_exit(start, out=io.StringIO(), err=err), err.getvalue()

    assert raising(RunError("no units", exit_code=1)) == (1, "error: no units\n")
    assert raising(ValueError("x: must be > 0")) == (2, "error: x: must be > 0\n")
    with pytest.raises(KeyError):  # not a usage error: a bug, with its traceback
        raising(KeyError("k"))
