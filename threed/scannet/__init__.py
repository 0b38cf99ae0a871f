"""ScanNet data: readers for real scenes and language files, plus a synthetic default.

``import threed.scannet`` needs numpy only; open3d (meshes, ray casting) and Pillow (images)
are imported inside the functions that use them.
"""

from .errors import ScanNetDataError
from .language import (
    QARecord,
    ReferRecord,
    SQARecord,
    load_scanqa,
    load_scanrefer,
    load_sqa3d,
    read_label_map,
    scene_label_counts,
)
from .scene import (
    DEPTH_SCALE,
    STRUCTURE_LABELS,
    Instance,
    PosedFrame,
    Scene,
    iter_scenes,
    load_scene,
    read_axis_alignment,
    read_mesh,
    unproject_depth,
)
from .synthetic import GENERATOR_VERSION, SyntheticData, ensure_synthetic

__all__ = [
    "DEPTH_SCALE",
    "GENERATOR_VERSION",
    "STRUCTURE_LABELS",
    "Instance",
    "PosedFrame",
    "QARecord",
    "ReferRecord",
    "SQARecord",
    "Scene",
    "ScanNetDataError",
    "SyntheticData",
    "ensure_synthetic",
    "iter_scenes",
    "load_scanqa",
    "load_scanrefer",
    "load_scene",
    "load_sqa3d",
    "read_axis_alignment",
    "read_label_map",
    "read_mesh",
    "scene_label_counts",
    "unproject_depth",
]
