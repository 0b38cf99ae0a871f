"""The command lines end to end on the generated data (small settings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_scannet_runs_resumes_and_writes_outputs(tmp_path, capsys):
    eval_scannet = _load("eval_scannet")
    out = tmp_path / "out"
    argv = [
        "--tracks", "vggt",
        "--synthetic-root", str(tmp_path / "data"),
        "--num-synthetic-scenes", "1",
        "--ratios", "1.0,0.5",
        "--frames", "4",
        "--out", str(out),
    ]  # fmt: skip
    assert eval_scannet.main(argv) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["setting"] for r in rows) == ["fastvggt@0.5", "fastvggt@0.9", "full"]
    assert all(r["status"] == "ok" and r["accuracy_valid"] is False for r in rows)
    assert "| full |" in capsys.readouterr().out
    assert (out / "plots" / "vggt_aggregator_time_s.png").exists()
    assert list((out / "visuals").glob("vggt_*.png"))
    # a rerun finds every row done and appends nothing
    assert eval_scannet.main(argv) == 0
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_eval_scannet_bad_arguments(tmp_path, capsys):
    eval_scannet = _load("eval_scannet")
    with pytest.raises(SystemExit) as e:
        eval_scannet.main(["--ratios", "1.5"])
    assert e.value.code == 2 and "--ratios" in capsys.readouterr().err
    assert eval_scannet.main(["--scannet-root", str(tmp_path / "missing")]) == 2
    assert "--scannet-root" in capsys.readouterr().err
    argv = ["--synthetic-root", str(tmp_path / "syn"), "--num-synthetic-scenes", "0"]
    assert eval_scannet.main(argv) == 2
    assert "num_scenes" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_eval_scannet_refuses_bad_out_device_and_empty_data(tmp_path, capsys):
    """Checked before any work: one line on stderr, exit 2 (1 when every scene failed)."""
    eval_scannet = _load("eval_scannet")
    empty = tmp_path / "scans"
    empty.mkdir()
    base = ["--scannet-root", str(empty), "--tracks", "vggt"]
    a_file = tmp_path / "out.txt"
    a_file.write_text("")
    assert eval_scannet.main([*base, "--out", str(a_file)]) == 2
    assert "is a file" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        assert eval_scannet.main([*base, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        assert "no CUDA" in _one_line_error(capsys)
    assert eval_scannet.main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "no scenes found" in _one_line_error(capsys)
    missing_list = str(tmp_path / "scenes.txt")  # was taken as a scene id, then 'all failed'
    assert eval_scannet.main([*base, "--scenes", missing_list, "--out", str(tmp_path / "o")]) == 2
    assert "--scenes: file not found" in _one_line_error(capsys)
    (empty / "scene0000_00").mkdir()  # a scene folder without any file: fails to load
    (empty / "scene0001_00").mkdir()
    assert eval_scannet.main([*base, "--out", str(tmp_path / "o"), "--no-visuals"]) == 1
    assert "all 2 scenes failed" in capsys.readouterr().err


def test_eval_scannet_missing_model_files_are_one_line(tmp_path, capsys):
    """A missing --text-encoder folder or --grounding-weights file is found when the
    track is built, before any scene loads: one line naming the track, exit 2."""
    eval_scannet = _load("eval_scannet")
    scans = tmp_path / "scans"
    (scans / "scene0000_00").mkdir(parents=True)
    base = ["--scannet-root", str(scans), "--tracks", "grounding", "--out", str(tmp_path / "o")]
    assert eval_scannet.main([*base, "--text-encoder", str(tmp_path / "no_encoder")]) == 2
    assert "track grounding: text encoder folder not found" in _one_line_error(capsys)
    assert eval_scannet.main([*base, "--grounding-weights", str(tmp_path / "no.pt")]) == 2
    assert "track grounding: TSP3D checkpoint not found" in _one_line_error(capsys)
    assert not (tmp_path / "o" / "rows.jsonl").exists()


def test_train_grounding_bad_inputs_are_one_line(tmp_path, capsys):
    train_grounding = _load("train_grounding")
    scans = tmp_path / "scans"
    scans.mkdir()
    base = ["--scannet-root", str(scans), "--out", str(tmp_path / "run")]
    assert train_grounding.main([*base, "--scanrefer", str(tmp_path / "no.json")]) == 2
    assert "no.json" in _one_line_error(capsys)
    assert train_grounding.main([*base, "--threads", "-1"]) == 2
    assert "--threads" in _one_line_error(capsys)


def test_bench_driver_quick(tmp_path, monkeypatch):
    bench = _load("bench")
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["bench.py"])
    assert bench.main(["--only", "primitives", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["torch"]
    rows = result["areas"]["primitives"]["rows"]
    assert rows and all("speedup" in r for r in rows if "baseline_median_s" in r)


def test_wheel_leaves_benchmarks_out_and_bench_finds_it_in_the_checkout():
    """`benchmarks` is a generic top-level name: it must not go into site-packages."""
    import subprocess

    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    find = find["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    tops = {p.split(".")[0] for p in packages}
    assert tops == {"common", "threed", "video"}, tops
    # scripts/bench.py imports benchmarks/ from its checkout, with no installed mapping
    probe = (
        "import sys, runpy\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
        f"runpy.run_path({str(ROOT / 'scripts' / 'bench.py')!r})\n"
        "import benchmarks.primitives\n"
        "print(benchmarks.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    assert done.stdout.strip() == str(ROOT / "benchmarks" / "__init__.py")


@pytest.mark.slow
def test_eval_scannet_under_torchrun_shards_and_merges(tmp_path):
    """Two real processes with a gloo barrier: each runs one scene, rank 0 merges."""
    import subprocess

    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "scripts" / "eval_scannet.py"),
        "--tracks", "vggt", "--ratios", "1.0", "--frames", "2", "--no-visuals",
        "--synthetic-root", str(tmp_path / "data"), "--num-synthetic-scenes", "2",
        "--out", str(out),
    ]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    per_rank = [
        [json.loads(ln) for ln in p.read_text().splitlines()]
        for p in sorted(out.glob("rows.rank*.jsonl"))
    ]
    assert [sorted({r["scene_id"] for r in rows}) for rows in per_rank] == [
        ["scene9000_00"],
        ["scene9001_00"],
    ]  # one scene per rank
    shards = per_rank[0] + per_rank[1]
    merged = [json.loads(ln) for ln in (out / "rows.jsonl").read_text().splitlines()]
    assert len(merged) == len(shards) == 4  # 2 scenes x (full, fastvggt@0.9)
    assert json.loads((out / "summary.json").read_text())["failed_scenes"] == []
