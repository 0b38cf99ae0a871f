"""scripts/video_qa.py end to end: default settings, resume, bad videos, batches, torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("video_qa", ROOT / "scripts" / "video_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from video.synthetic import ensure_synthetic_video_qa

    return ensure_synthetic_video_qa(tmp_path_factory.mktemp("syn"), num_videos=1)


@pytest.mark.slow
def test_default_settings_run_resume_and_outputs(synthetic, tmp_path, capsys):
    """The embedded default's settings (HoliTom at two ratios + two baselines) on one
    synthetic video, 4 frames; a rerun appends nothing."""
    script = _script()
    out = tmp_path / "out"
    argv = ["--synthetic-root", str(synthetic.root.parent), "--synthetic-videos", "1",
            "--frames", "4", "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    settings = sorted({r["setting"] for r in rows})
    assert settings[0] == "fastv@keep_ratio=0.25" and "full" in settings
    assert {"holitom@retain_ratio=0.1", "holitom@retain_ratio=0.25"} <= set(settings)
    assert len(settings) == 5 and len(rows) == 3 * 5  # three questions per video
    assert {r["sample_id"] for r in rows} == {s["id"] for s in synthetic.samples}
    for r in rows:
        assert r["status"] == "ok" and r["accuracy_valid"] is False
        assert r["visual_tokens_before"] == 4 * 16 + 1
        assert r["prefill_tflops"] > 0 and r["latency_ms"] >= r["ttft_ms"] > 0
        assert r["parsed"] in (None, "A", "B", "C", "D") and r["answer"] in "ABCD"
    by = {(r["sample_id"], r["setting"]): r for r in rows}
    for sid in {r["sample_id"] for r in rows}:
        full = by[(sid, "full")]
        holitom = by[(sid, "holitom@retain_ratio=0.1")]
        assert holitom["visual_tokens_after"] < full["visual_tokens_after"]
        assert holitom["prefill_tflops"] < full["prefill_tflops"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_samples"] == [] and len(summary["groups"]) == 5
    md = (out / "summary.md").read_text()
    assert "random weights: accuracy is meaningless" in md and md.strip() in printed
    for name in ("video_qa_accuracy.png", "video_qa_prefill_tflops.png"):
        assert (out / "plots" / name).stat().st_size > 0
    before = (out / "rows.jsonl").read_text()
    assert script.main(argv) == 0
    assert (out / "rows.jsonl").read_text() == before


def test_bad_video_is_a_failed_sample_and_batches_run(synthetic, tmp_path):
    """A missing and a corrupt video fail their own samples; the others run in batches of 2."""
    manifest = tmp_path / "m.jsonl"
    rows = [dict(s, video=str(synthetic.root / s["video"])) for s in synthetic.samples]
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 100)
    rows.insert(1, dict(rows[0], id="missing", video=str(tmp_path / "nope.mp4")))
    rows.append(dict(rows[0], id="corrupt", video=str(tmp_path / "corrupt.mp4")))
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--model", "tiny-random-qwen2-vl", "--frames", "4",
            "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out),
            "--method", "fastv", "--keep-ratio", "0.5", "--layer", "1"]  # fmt: skip
    assert _script().main(argv) == 0
    got = _rows(out)
    failed = {r["sample_id"]: r for r in got if r["status"] == "failed"}
    assert set(failed) == {"missing", "corrupt"}
    assert "nope.mp4" in failed["missing"]["error"] and "not found" in failed["missing"]["error"]
    assert "corrupt.mp4" in failed["corrupt"]["error"]
    ok = [r for r in got if r["status"] == "ok"]
    assert (
        len(ok) == 3 * 2
        and {r["batch_size"] for r in ok} <= {1, 2}
        and 2 in {r["batch_size"] for r in ok}
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_samples"] == ["corrupt", "missing"]


def test_bad_arguments_exit_2(tmp_path, capsys):
    script = _script()
    out = str(tmp_path / "o")
    assert script.main(["--out", out, "--method", "fastv", "--keep-ratio", "2"]) == 2
    assert "keep_ratio" in capsys.readouterr().err
    assert script.main(["--out", out, "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert script.main(["--out", out, "--manifest", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert script.main(["--out", out, "--batch-size", "0", "--method", "fastv"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert script.main(["--out", out, "--threads", "-1"]) == 2
    assert "threads must be an int >= 0" in capsys.readouterr().err
    # HoliTom's paper layer 18 does not exist in the 4-layer tiny decoder: refused up front
    assert script.main(["--out", out, "--method", "holitom", "--retain-ratio", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "setting holitom@retain_ratio=0.1" in err and "got 18" in err
    assert not (tmp_path / "o" / "rows.jsonl").exists()
    assert script.main(["--out", out, "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert script.main(["--out", out, "--model", str(tmp_path)]) == 2
    assert "model_type 'bert' is not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_shard_and_merge(synthetic, tmp_path):
    """Two real gloo processes: samples split by rank, rank 0 merges and summarises."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "scripts" / "video_qa.py"),
        "--synthetic-root", str(synthetic.root.parent), "--synthetic-videos", "1",
        "--frames", "4", "--max-new-tokens", "2", "--out", str(out),
        "--method", "fastv", "--keep-ratio", "0.5", "--layer", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = [
        sorted({json.loads(ln)["sample_id"] for ln in p.read_text().splitlines()})
        for p in sorted(out.glob("rows.rank*.jsonl"))
    ]
    ids = [s["id"] for s in synthetic.samples]
    assert per_rank == [sorted(ids[0::2]), sorted(ids[1::2])]
    merged = _rows(out)
    keys = [(r["sample_id"], r["setting"]) for r in merged]
    assert len(keys) == len(set(keys)) == 3 * 2
    assert json.loads((out / "summary.json").read_text())["failed_samples"] == []
    assert "| full |" in done.stdout
