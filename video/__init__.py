"""Video LLMs (HoliTom on LLaVA-OneVision / LLaVA-Video / Qwen2-VL): not built yet.

Its building blocks are in :mod:`common`: ``temporal_segmentation``,
``dpc_knn_merge``, ``Merge.merge(mode="halving")`` and the decoder engine.
"""
