"""Shared tensor primitives: scoring, selection, matching, merging, clustering,
temporal segmentation and FLOPs. Pure tensor functions (only torch is needed);
the decoder engine lives in :mod:`common.engine`.
"""

from common.clustering import assign_to_centres, dpc_knn, dpc_knn_merge
from common.flops import count_flops, decoder_layer_flops, decoder_prefill_flops
from common.matching import (
    Merge,
    bipartite_soft_matching,
    grid_random_partition,
    match_src_to_dst,
    merge_from_targets,
)
from common.merging import (
    centre_weighted_merge,
    mean_merge,
    scatter_merge,
    sequential_halving_merge,
    unmerge,
    weighted_average_merge,
)
from common.scores import (
    attention_received,
    attention_received_from_qk,
    cls_attention,
    l2_norm_score,
)
from common.segmentation import (
    rebalance_retain_ratio,
    segment_static_masks,
    static_counts,
    temporal_segmentation,
)
from common.selection import divprune_select, k_center_greedy, topk_keep
from common.similarity import (
    adjacent_frame_similarity,
    best_match,
    cosine_similarity_matrix,
    normalize,
)

__all__ = [
    "Merge",
    "adjacent_frame_similarity",
    "assign_to_centres",
    "attention_received",
    "attention_received_from_qk",
    "best_match",
    "bipartite_soft_matching",
    "centre_weighted_merge",
    "cls_attention",
    "cosine_similarity_matrix",
    "count_flops",
    "decoder_layer_flops",
    "decoder_prefill_flops",
    "divprune_select",
    "dpc_knn",
    "dpc_knn_merge",
    "grid_random_partition",
    "k_center_greedy",
    "l2_norm_score",
    "match_src_to_dst",
    "mean_merge",
    "merge_from_targets",
    "normalize",
    "rebalance_retain_ratio",
    "scatter_merge",
    "segment_static_masks",
    "sequential_halving_merge",
    "static_counts",
    "temporal_segmentation",
    "topk_keep",
    "unmerge",
    "weighted_average_merge",
]
