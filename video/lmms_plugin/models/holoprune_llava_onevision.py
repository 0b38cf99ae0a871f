"""``--model holoprune_llava_onevision``: LLaVA-OneVision / LLaVA-Video with a holoprune method."""

from video.lmms_plugin.model import HoloPruneVideoLMM, register


@register("holoprune_llava_onevision")
class HoloPruneLlavaOnevision(HoloPruneVideoLMM):
    family = "llava_onevision"
