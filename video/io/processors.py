"""Frame processors for when Hugging Face's video processors cannot run.

transformers 5's video processors (``LlavaOnevisionVideoProcessor``,
``Qwen2VLVideoProcessor``) need torchvision. Where it is missing (a CPU-only
torch without a matching torchvision, as on this project's CI machine) these
classes do the same steps on the decoded frames, with PIL's bicubic resize
(the HF processors use torchvision's antialiased bicubic: pixel values differ
slightly, shapes and token counts are identical):

* LLaVA-OneVision / LLaVA-Video: resize every frame to ``size`` (square),
  rescale, normalise -> ``pixel_values_videos [B, T, 3, H, W]``;
* Qwen2-VL / Qwen2.5-VL: ``smart_resize`` to multiples of
  ``patch_size * merge_size`` within the pixel bounds, rescale, normalise,
  pad the frame count to a multiple of ``temporal_patch_size`` with the last
  frame, and flatten into ``pixel_values_videos [sum(t*h*w), C*tp*p*p]`` in
  the model's patch order, with ``video_grid_thw [B, 3]``.

A processor built by :mod:`video.tiny` or :func:`video.qa.load_model`
uses these only when torchvision is missing; with it, the real HF video
processors run.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "FrameVideoProcessor",
    "LlavaOnevisionFrameProcessor",
    "Qwen2VLFrameProcessor",
    "hf_video_processors_available",
    "lenient_processor",
    "smart_resize",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_video_processors_available() -> bool:
    """Whether transformers' video processors can be built here (they need torchvision)."""
    try:
        from transformers.utils import is_torchvision_available

        if not is_torchvision_available():
            return False
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:  # a torchvision built for another torch fails at import
        return False
    return True


@functools.cache
def lenient_processor(base: type) -> type:
    """``base`` (a Hugging Face processor class) that also accepts a
    :class:`FrameVideoProcessor` as its ``video_processor``."""

    def check(self, name, arg):
        if name == "video_processor" and isinstance(arg, FrameVideoProcessor):
            return type(arg)
        return base.check_argument_for_proper_class(self, name, arg)

    return type(base.__name__, (base,), {"check_argument_for_proper_class": check})


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, area within the bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be under 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _as_videos(videos: Any) -> list[np.ndarray]:
    """One video ``[T, H, W, 3]`` or a list of them (arrays, tensors or lists of frames)."""
    if isinstance(videos, (np.ndarray, torch.Tensor)) and np.ndim(videos) == 4:
        videos = [videos]
    out = []
    for v in videos:
        if isinstance(v, (list, tuple)):
            v = np.stack([np.asarray(f) for f in v])
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.ndim != 4:
            raise ValueError(f"a video must be [T, H, W, 3] frames, got shape {v.shape}")
        if v.shape[-1] != 3 and v.shape[1] == 3:  # [T, 3, H, W]
            v = v.transpose(0, 2, 3, 1)
        out.append(v)
    return out


def _resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
    if video.shape[1:3] == (height, width):
        return video
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in video]
    )


def _metadata(metadata: Any, videos: list[np.ndarray]) -> list:
    """``VideoMetadata`` per video: the given ones (dicts or objects), else frame counts only."""
    from transformers.video_utils import VideoMetadata

    if metadata is None:
        metadata = [None] * len(videos)
    elif not isinstance(metadata, (list, tuple)):
        metadata = [metadata]
    out = []
    for m, v in zip(metadata, videos):
        if m is None:
            m = {"total_num_frames": int(v.shape[0]), "height": v.shape[1], "width": v.shape[2]}
        out.append(m if isinstance(m, VideoMetadata) else VideoMetadata(**dict(m)))
    return out


class FrameVideoProcessor:
    """Common part: the HF video processor attributes a processor reads, and the pixel steps."""

    model_input_names = ["pixel_values_videos"]
    returns_metadata = False  # Qwen2-VL family: the processor reads ``video_metadata``

    def __init__(
        self,
        *,
        size: dict | None = None,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        rescale_factor: float = 1 / 255,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        **_: Any,
    ):
        self.size = dict(size) if size is not None else {}
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.rescale_factor = float(rescale_factor)
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)

    @classmethod
    def from_dict(cls, config: dict) -> FrameVideoProcessor:
        """From a ``video_preprocessor_config.json`` / ``preprocessor_config.json`` dict."""
        return cls(**config)

    def _pixels(self, video: np.ndarray) -> torch.Tensor:
        """``[T, H, W, 3]`` uint8 -> ``[T, 3, H, W]`` float32, rescaled and normalised."""
        x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float()
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def __call__(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any):
        out = self.preprocess(videos, return_tensors=return_tensors, **kwargs)
        metadata = kwargs.get("video_metadata")
        if metadata is not None or self.returns_metadata:
            # what HF video processors hand back (Qwen2.5-VL's processor reads sampled_fps)
            out["video_metadata"] = _metadata(metadata, _as_videos(videos))
        return out

    def preprocess(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class LlavaOnevisionFrameProcessor(FrameVideoProcessor):
    """LLaVA-OneVision's video processing: square resize, rescale, normalise.

    Returns ``pixel_values_videos [B, T, 3, H, W]`` (videos of one batch must
    have the same frame count, as with the HF processor's tensor output).
    """

    def __init__(self, *, size: dict | None = None, **kwargs: Any):
        super().__init__(size=size or {"height": 384, "width": 384}, **kwargs)

    def preprocess(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any):
        from transformers import BatchFeature

        h, w = int(self.size["height"]), int(self.size["width"])
        out = []
        for v in _as_videos(videos):
            out.append(self._pixels(_resize(v, h, w) if self.do_resize else v))
        counts = {int(v.shape[0]) for v in out}
        data = torch.stack(out) if len(counts) == 1 else out
        return BatchFeature({"pixel_values_videos": data}, tensor_type=None)


class Qwen2VLFrameProcessor(FrameVideoProcessor):
    """Qwen2-VL's video processing (see the module docstring)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    returns_metadata = True

    def __init__(
        self,
        *,
        size: dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        **kwargs: Any,
    ):
        size = dict(size or {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768})
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        super().__init__(size=size, **kwargs)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, *_: Any) -> int:
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(
            height, width, factor, self.size["shortest_edge"], self.size["longest_edge"]
        )
        grid_t = -(-num_frames // self.temporal_patch_size)
        return grid_t * (h // self.patch_size) * (w // self.patch_size)

    def preprocess(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any):
        from transformers import BatchFeature

        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        flat, grids = [], []
        for v in _as_videos(videos):
            if self.do_resize:
                h, w = smart_resize(
                    v.shape[1],
                    v.shape[2],
                    p * m,
                    self.size["shortest_edge"],
                    self.size["longest_edge"],
                )
                v = _resize(v, h, w)
            x = self._pixels(v)  # [T, C, H, W]
            pad = -x.shape[0] % tp
            if pad:  # repeat the last frame, as the HF processor does
                x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            t, c, h, w = x.shape
            gt, gh, gw = t // tp, h // p, w // p
            patches = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
            # -> [gt, gh/m, gw/m, m, m, C, tp, p, p]: merge groups contiguous, as the model expects
            patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            flat.append(patches.reshape(gt * gh * gw, c * tp * p * p))
            grids.append([gt, gh, gw])
        data = {"pixel_values_videos": torch.cat(flat), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature(data, tensor_type=None)
