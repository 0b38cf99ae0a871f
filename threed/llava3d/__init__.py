"""LLaVA-3D on the suite's data: spatial tokens from posed RGB-D, and the ``llava3d``
track of ``scripts/eval_scannet.py`` (:mod:`threed.llava3d.track`).

Needs torch, numpy and Pillow; transformers only for the track's models.
"""

from threed.llava3d.answers import clean_answer, exact_match, score_answers
from threed.llava3d.spatial import (
    CLIP_MEAN,
    CLIP_STD,
    SceneViews,
    SpatialTokenConfig,
    SpatialTokens,
    build_spatial_tokens,
    patch_xyz,
    prepare_views,
    preprocess_colour,
    preprocess_depth,
    resample_colour_to_depth,
    resized_shape,
    scale_intrinsic,
    select_views,
    voxelize,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SceneViews",
    "SpatialTokenConfig",
    "SpatialTokens",
    "build_spatial_tokens",
    "clean_answer",
    "exact_match",
    "patch_xyz",
    "prepare_views",
    "preprocess_colour",
    "preprocess_depth",
    "resample_colour_to_depth",
    "resized_shape",
    "scale_intrinsic",
    "score_answers",
    "select_views",
    "voxelize",
]
