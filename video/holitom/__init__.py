"""HoliTom (temporal segmentation + spatio-temporal merging + inner-LLM merging).

:func:`outer_merge` is the outer-LLM stage as a pure tensor function; the
method object that applies HoliTom to a model lives in ``method.py``.
"""

from video.holitom.outer import NEWLINE, OuterMergeResult, outer_merge, outer_merge_batch

__all__ = ["NEWLINE", "OuterMergeResult", "outer_merge", "outer_merge_batch"]
