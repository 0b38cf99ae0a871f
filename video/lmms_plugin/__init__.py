"""holoprune as an lmms-eval plugin: a video LLM with a token pruning method as an lmms-eval model.

Two registrations, so no fork is needed: the ``lmms_eval.models`` entry point
(read from the installed package by recent lmms-eval, 0.7.3 checked: :func:`manifests`)
and, for older versions, ``LMMS_EVAL_PLUGINS=video.lmms_plugin`` (lmms-eval
imports ``<plugin>.models``, reads its ``AVAILABLE_MODELS`` and adds
``<plugin>.tasks`` to its task path; 0.7 still honours it with a
deprecation warning)::

    pip install "holoprune[lmms]"  # optional: holoprune works without lmms-eval
    LMMS_EVAL_PLUGINS=video.lmms_plugin lmms-eval \\
        --model holoprune_llava_onevision \\
        --model_args pretrained=/models/llava-ov-7b-hf,method=holitom,retain_ratio=0.1 \\
        --tasks videomme --batch_size 1

Models: ``holoprune_llava_onevision`` (LLaVA-OneVision / LLaVA-Video HF
checkpoints) and ``holoprune_qwen2_vl`` (Qwen2-VL / Qwen2.5-VL). Model
arguments: ``pretrained``, ``method`` (a registry name: ``holitom``,
``fastv``, ``pdrop``, ...; omitted = unpruned), the method's own fields
(``retain_ratio``, ``tau``, ``inner_layer``...), and ``device``, ``dtype``,
``batch_size``, ``max_frames_num`` (uniform frames, default 32), ``fps``,
``attn_implementation``, ``max_new_tokens``, ``seed``. See
:mod:`video.lmms_plugin.model`.
"""

__all__ = ["HoloPruneLlavaOnevision", "HoloPruneQwen2VL", "HoloPruneVideoLMM", "manifests"]


def manifests() -> list:
    """``ModelManifest``s for lmms-eval's ``lmms_eval.models`` entry point (needs lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    from video.lmms_plugin.models import AVAILABLE_MODELS

    return [
        ModelManifest(model_id=name, simple_class_path=f"video.lmms_plugin.models.{name}.{cls}")
        for name, cls in AVAILABLE_MODELS.items()
    ]


def __getattr__(name: str):
    if name == "HoloPruneVideoLMM":
        from video.lmms_plugin.model import HoloPruneVideoLMM

        return HoloPruneVideoLMM
    if name == "HoloPruneLlavaOnevision":
        from video.lmms_plugin.models.holoprune_llava_onevision import HoloPruneLlavaOnevision

        return HoloPruneLlavaOnevision
    if name == "HoloPruneQwen2VL":
        from video.lmms_plugin.models.holoprune_qwen2_vl import HoloPruneQwen2VL

        return HoloPruneQwen2VL
    raise AttributeError(f"module 'video.lmms_plugin' has no attribute {name!r}")
