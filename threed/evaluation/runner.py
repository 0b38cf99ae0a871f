"""Run 3D tracks over ScanNet scenes: resumable, shardable under torchrun.

A *track* (see ``threed.vggt.track.VGGTTrack``) turns one scene into result
rows, one per setting.  The runner owns everything around it: which scenes,
which rows are already done, failures, progress, shards, and the summary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .results import ResultsStore, read_done, row_key
from .summary import markdown_table, summarize_rows, unresolved_failures, write_plots

log = logging.getLogger(__name__)

__all__ = ["TRACKS", "EvalConfig", "DataPaths", "available_tracks", "run_eval", "resolve_scenes"]

# Track name -> "module:Class".  A track whose module cannot be imported (its
# optional dependency is missing) is reported as unavailable, not an error.
TRACKS: dict[str, str] = {
    "vggt": "threed.vggt.track:VGGTTrack",
    "grounding": "threed.tsp3d.track:GroundingTrack",
}


@dataclass
class DataPaths:
    """Where the data of a run lives (real ScanNet or the generated default)."""

    scannet_root: Path
    posed_images_root: Path | None
    scanrefer_path: Path | None = None
    scanqa_path: Path | None = None
    scene_ids: list[str] = field(default_factory=list)
    synthetic: bool = False


@dataclass
class EvalConfig:
    """What the runner itself needs; track options stay in the argparse namespace."""

    out: Path
    tracks: list[str]
    scenes: list[str] | None = None
    seed: int = 0
    visualize: bool = True


def _load_track(name: str):
    module_name, cls_name = TRACKS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)


def available_tracks() -> dict[str, object]:
    """Track classes that import in this environment, by name."""
    found = {}
    for name in TRACKS:
        try:
            found[name] = _load_track(name)
        except ImportError as e:  # an optional dependency is missing
            log.info("track %s unavailable: %s", name, e)
    return found


def resolve_scenes(spec: str | None, data: DataPaths) -> list[str]:
    """``--scenes``: comma-separated ids, or a file with one id a line; default all."""
    if not spec:
        if data.scene_ids:
            return list(data.scene_ids)
        root = Path(data.scannet_root)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("scene"))
    path = Path(spec)
    if path.is_file():
        ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids:
        raise ValueError(f"--scenes: no scene ids in {spec!r}")
    return ids


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun announces them (1 process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _barrier(world: int) -> None:
    """Wait for every rank (a no-op for one process).

    Ranks finish their shards at different times; with the default 30-minute
    process-group timeout a rank that waits longer than that for a slow rank
    would fail and the merge would never happen, so the group is created with
    a long timeout (torchrun still stops all ranks when one of them dies).
    """
    if world <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()
    if created:
        dist.destroy_process_group()


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("rows.rank*.jsonl"))


def run_eval(args: argparse.Namespace, data: DataPaths, config: EvalConfig) -> list[dict] | None:
    """Run every requested track on every scene of this shard; rank 0 returns the summary."""
    from tqdm import tqdm

    from threed.scannet import load_scene

    rank, world, local_rank = _dist_info()
    if world > 1 and str(getattr(args, "device", "cpu")).startswith("cuda"):
        args.device = f"cuda:{local_rank}"
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out, rank=rank if world > 1 else None)
    # rows finished by any earlier run: merged rows and every shard file (a run
    # with another number of ranks, or one that died before rank 0 merged)
    done = set().union(
        ResultsStore(out).done(), *(read_done(p) for p in _shard_files(out) if p != store.path)
    )
    done |= store.done()

    classes = available_tracks()
    missing = [t for t in config.tracks if t not in classes]
    if missing:
        raise ValueError(
            f"--tracks: {missing} not available here (available: {sorted(classes)}); "
            "a track is unavailable when its optional dependency is not installed"
        )
    tracks = [classes[t](args, data) for t in config.tracks]

    scene_ids = config.scenes if config.scenes is not None else resolve_scenes(None, data)
    mine = scene_ids[rank::world]
    bar = tqdm(total=len(mine) * len(tracks), desc=f"eval[{rank}]", disable=rank != 0)
    visualized: set[str] = set()
    for scene_id in mine:
        todos = {
            track.name: [s for s in track.settings() if (scene_id, track.name, s) not in done]
            for track in tracks
        }
        wants_visual = config.visualize and any(
            t.name not in visualized and hasattr(t, "visualize") for t in tracks
        )
        if not any(todos.values()) and not wants_visual:
            bar.update(len(tracks))  # every row done: no need to load the scene
            continue
        try:
            scene = load_scene(scene_id, data.scannet_root, data.posed_images_root)
        except Exception as e:  # one bad scene is recorded and the run goes on
            log.error("scene %s failed to load: %s", scene_id, e)
            for track in tracks:
                if todos[track.name]:
                    store.append(_failed_row(scene_id, track.name, e, todos[track.name]))
            bar.update(len(tracks))
            continue
        for track in tracks:
            todo = todos[track.name]
            if todo:
                finished: set[str] = set()
                try:
                    for row in track.run_scene(scene, todo):
                        row = {**row, "scene_id": scene_id, "track": track.name, "status": "ok"}
                        store.append(row)
                        done.add(row_key(row))
                        finished.add(str(row["setting"]))
                except Exception as e:
                    log.error(
                        "track %s failed on %s:\n%s", track.name, scene_id, traceback.format_exc()
                    )
                    left = [s for s in todo if s not in finished]
                    store.append(_failed_row(scene_id, track.name, e, left))
            if config.visualize and track.name not in visualized and hasattr(track, "visualize"):
                try:
                    track.visualize(scene, out / "visuals")
                    visualized.add(track.name)
                except Exception as e:
                    log.warning("visualisation of %s failed: %s", track.name, e)
            bar.update(1)
    bar.close()

    _barrier(world)
    if rank != 0:
        return None
    shards = _shard_files(out)
    if shards:  # this run's shards, or those of an earlier run that never merged
        ResultsStore.merge(out, shards)
    columns = {t.name: t.table_columns for t in tracks if getattr(t, "table_columns", None)}
    return write_summary(out, columns=columns)


def _failed_row(scene_id: str, track: str, error: Exception, settings: list[str]) -> dict:
    """A failure of ``track`` on a scene; ``settings``: those left without a row."""
    return {
        "scene_id": scene_id,
        "track": track,
        "setting": "*",
        "settings": list(settings),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "time": time.time(),
    }


def write_summary(out: Path, columns: dict[str, list[str]] | None = None) -> list[dict]:
    """summary.json, summary.md and plots/ from rows.jsonl; returns the summary.

    ``columns`` picks the Markdown table's columns per track (default: all).
    """
    rows = ResultsStore(out).rows()
    summary = summarize_rows(rows)
    # per (scene, track): a scene that failed in one track and succeeded in another is failed
    failed = sorted(set().union(*unresolved_failures(rows).values()))
    (out / "summary.json").write_text(
        json.dumps({"groups": summary, "failed_scenes": failed}, indent=2, sort_keys=True)
    )
    md = markdown_table(summary, columns=columns)
    if failed:
        md += f"\nFailed scenes: {', '.join(failed)} (see rows.jsonl for the errors)\n"
    (out / "summary.md").write_text(md)
    if summary:
        write_plots(summary, out / "plots", metrics=columns)
    return summary
