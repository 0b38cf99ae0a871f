"""VGGT re-implemented (no track head) with FastVGGT token merging.

```python
from threed.vggt import VGGT, VGGTConfig, TokenMerging, preprocess_images
model = VGGT.from_checkpoint("model.pt")            # facebook/VGGT-1B weights
with TokenMerging(ratio=0.9).apply(model) as h:
    out = model(preprocess_images(rgb_frames))
    print(h.kept_ratio)
```
"""

from .geometry import (
    closed_form_inverse_se3,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    unproject_depth,
)
from .merging import MergeHandle, MergePlan, TokenMerging, attention_share, build_plan, dst_mask
from .model import VGGT, Aggregator, VGGTConfig, scaled_layers
from .preprocess import preprocess_images, target_hw

__all__ = [
    "VGGT",
    "VGGTConfig",
    "Aggregator",
    "scaled_layers",
    "TokenMerging",
    "MergeHandle",
    "MergePlan",
    "build_plan",
    "dst_mask",
    "attention_share",
    "preprocess_images",
    "target_hw",
    "pose_encoding_to_extri_intri",
    "extri_intri_to_pose_encoding",
    "quat_to_mat",
    "mat_to_quat",
    "closed_form_inverse_se3",
    "unproject_depth",
]
