"""``--model holoprune_qwen2_vl``: Qwen2-VL / Qwen2.5-VL with a holoprune method."""

from video.lmms_plugin.model import HoloPruneVideoLMM, register


@register("holoprune_qwen2_vl")
class HoloPruneQwen2VL(HoloPruneVideoLMM):
    family = "qwen2_vl"
