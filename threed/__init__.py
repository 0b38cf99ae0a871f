"""3D: AdaGate (AdaToken-3D) spatial gating, VGGT + FastVGGT token merging, TSP3D, ScanNet data.

``import threed`` needs torch only: names below are imported on first use, and
optional dependencies (spconv, open3d, matplotlib) only inside the functions
that need them.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "AdaGate": "threed.adagate",
    "AdaGateProfile": "threed.adagate",
    "spatial_contribution": "threed.analysis",
    "VGGT": "threed.vggt",
    "VGGTConfig": "threed.vggt",
    "TokenMerging": "threed.vggt",
    "preprocess_images": "threed.vggt",
    "TextGuidedPruning": "threed.tsp3d",
    "CompletionAddition": "threed.tsp3d",
    "TSP3DGrounder": "threed.tsp3d",
    "TSP3DConfig": "threed.tsp3d",
    "Scene": "threed.scannet",
    "ScanNetDataError": "threed.scannet",
    "load_scene": "threed.scannet",
    "load_scanrefer": "threed.scannet",
    "load_scanqa": "threed.scannet",
    "load_sqa3d": "threed.scannet",
    "iter_scenes": "threed.scannet",
    "ensure_synthetic": "threed.scannet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'threed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
