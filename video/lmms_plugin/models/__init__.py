"""lmms-eval reads ``AVAILABLE_MODELS`` here: model name -> class in the same-named module."""

AVAILABLE_MODELS = {
    "holoprune_llava_onevision": "HoloPruneLlavaOnevision",
    "holoprune_qwen2_vl": "HoloPruneQwen2VL",
}
