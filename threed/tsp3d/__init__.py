"""TSP3D: text-guided sparse voxel pruning + completion-based addition (spconv 2.x).

Importing this package needs torch only; spconv / transformers / matplotlib are
imported when a module that needs them is built or called.
"""

from .losses import axis_aligned_diou_loss, axis_aligned_iou, grounding_loss, sigmoid_focal_loss
from .model import GroundingOutput, MinkResNetBackbone, SceneBatch, TSP3DConfig, TSP3DGrounder
from .pruning import BiEncoder, CompletionAddition, TextGuidedPruning, keep_targets
from .sparse import features_at, generative_upsample, voxelize, voxels_to_points
from .text import TextEncoder, WordHashTokenizer, tiny_roberta

__all__ = [
    "TSP3DConfig",
    "TSP3DGrounder",
    "GroundingOutput",
    "SceneBatch",
    "MinkResNetBackbone",
    "BiEncoder",
    "TextGuidedPruning",
    "CompletionAddition",
    "keep_targets",
    "features_at",
    "generative_upsample",
    "voxelize",
    "voxels_to_points",
    "TextEncoder",
    "WordHashTokenizer",
    "tiny_roberta",
    "grounding_loss",
    "sigmoid_focal_loss",
    "axis_aligned_iou",
    "axis_aligned_diou_loss",
]
