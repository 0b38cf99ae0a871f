"""Video LLMs: HoliTom on LLaVA-OneVision / LLaVA-Video / Qwen2(.5)-VL.

``from video import HoliTom`` (imported lazily: ``import video`` stays light).
Its building blocks are in :mod:`common`: ``temporal_segmentation``,
``dpc_knn_merge``, ``Merge.merge(mode="halving")`` and the decoder engine.
"""

from typing import Any

__all__ = ["HoliTom"]


def __getattr__(name: str) -> Any:
    if name == "HoliTom":
        from video.holitom.method import HoliTom

        return HoliTom
    raise AttributeError(f"module 'video' has no attribute {name!r}")
