"""Video input: decoding and sampling (:mod:`video.io.reader`) and the frame
processors used when Hugging Face's video processors cannot run
(:mod:`video.io.processors`).

Usage::

    from video.io import load_video, loader_options

    clip = load_video("clip.mp4", num_frames=32, **loader_options(processor))
    inputs = processor(text=[prompt], videos=[clip.frames], return_tensors="pt")
"""

from video.io.processors import (
    FrameVideoProcessor,
    LlavaOnevisionFrameProcessor,
    Qwen2VLFrameProcessor,
    hf_video_processors_available,
    lenient_processor,
)
from video.io.reader import (
    VideoClip,
    VideoLoadError,
    available_backends,
    load_video,
    loader_options,
    sample_indices,
)

__all__ = [
    "FrameVideoProcessor",
    "LlavaOnevisionFrameProcessor",
    "Qwen2VLFrameProcessor",
    "VideoClip",
    "VideoLoadError",
    "available_backends",
    "hf_video_processors_available",
    "lenient_processor",
    "load_video",
    "loader_options",
    "sample_indices",
]
