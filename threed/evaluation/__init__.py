"""The ScanNet side of ``scripts/eval_scannet.py``: data paths, scene ids, scene
loader and the 3D tracks. The run frame itself (rows, resume, shards,
summaries) is generic and lives in :mod:`common.runs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.runs import TrackRegistry

__all__ = ["TRACKS", "DataPaths", "resolve_scenes", "scene_loader"]

# Track name -> "module:Class"; a track whose optional dependency is missing is
# listed as unavailable, not an error.
TRACKS = TrackRegistry(
    {
        "vggt": "threed.vggt.track:VGGTTrack",
        "grounding": "threed.tsp3d.track:GroundingTrack",
        "llava3d": "threed.llava3d.track:Llava3DTrack",
    }
)


@dataclass
class DataPaths:
    """Where the data of a run lives (real ScanNet or the generated default);
    the tracks receive it as ``TrackContext.data``."""

    scannet_root: Path
    posed_images_root: Path | None
    scanrefer_path: Path | None = None
    scanqa_path: Path | None = None
    scene_ids: list[str] = field(default_factory=list)
    synthetic: bool = False


def resolve_scenes(spec: str | None, data: DataPaths) -> list[str]:
    """``--scenes``: comma-separated ids, or a file with one id a line; default all
    (the generated ids, or every ``scene*`` folder of the ScanNet root)."""
    if not spec:
        if data.scene_ids:
            return list(data.scene_ids)
        root = Path(data.scannet_root)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("scene"))
    path = Path(spec)
    if path.is_file():
        ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    elif "/" in spec or os.sep in spec:  # scene ids never hold one: a list file that is not there
        raise ValueError(f"--scenes: file not found: {spec}")
    else:
        ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids:
        raise ValueError(f"--scenes: no scene ids in {spec!r}")
    return ids


def scene_loader(data: DataPaths) -> Callable[[str], object]:
    """``scene_id -> Scene`` for the runner (``threed.scannet.load_scene`` on ``data``)."""

    def load(scene_id: str):
        from threed.scannet import load_scene

        return load_scene(scene_id, data.scannet_root, data.posed_images_root)

    return load
