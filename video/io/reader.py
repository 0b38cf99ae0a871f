"""Video loading: decord first, PyAV when decord is missing or fails on a file.

Usage::

    from video.io import load_video, loader_options

    clip = load_video("clip.mp4", num_frames=32)                 # uniform over the clip
    clip = load_video("clip.mp4", fps=1.0, max_frames=64, start=5.0, end=20.0)
    clip.frames      # [T, H, W, 3] uint8 RGB
    clip.timestamps  # [T] seconds from the start of the file

    opts = loader_options(processor)   # what the model's processor expects
    clip = load_video("clip.mp4", num_frames=32, **opts)

Sampling follows the convention of LLaVA-OneVision's and lmms-eval's loaders:
``num_frames`` indices ``linspace(first, last, num_frames)`` truncated to
integers; ``fps`` sampling takes one frame every ``1 / fps`` seconds (the
frame nearest each instant). ``multiple_of`` rounds the frame count up to a
multiple (Qwen2-VL groups ``temporal_patch_size`` frames into one temporal
token step), repeating the last sampled frame when the clip is too short, as
the Qwen2-VL processor pads.

A missing, unreadable, empty or truncated file raises :class:`VideoLoadError`
naming the file (the batch scripts record it as a failed sample).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "VideoClip",
    "VideoLoadError",
    "available_backends",
    "load_video",
    "loader_options",
    "sample_indices",
]

logger = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav")


class VideoLoadError(RuntimeError):
    """A video that cannot be loaded; ``path`` names the file, the message says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load video {self.path}: {reason}")


@dataclass
class VideoClip:
    """Frames sampled from one video.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        timestamps: ``[T]`` float seconds of each frame from the start of the file.
        indices: ``[T]`` frame indices in the file (repeats when padded).
        native_fps: average frame rate of the file.
        total_frames: frames in the file.
        path: the file.
        backend: ``"decord"`` or ``"pyav"``.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    native_fps: float
    total_frames: int
    path: str
    backend: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration(self) -> float:
        return self.total_frames / self.native_fps if self.native_fps > 0 else 0.0

    def hf_metadata(self) -> dict[str, Any]:
        """Fields of transformers' ``VideoMetadata`` for the sampled window.

        Frame indices count from the window's first frame and ``total_num_frames``
        is the window's length, so ``VideoMetadata.sampled_fps`` (what Qwen2.5-VL's
        processor turns into seconds per temporal token) is the real sampling rate.
        """
        first, last = self.meta.get("window", (0, self.total_frames - 1))
        return {
            "total_num_frames": int(last - first + 1),
            "fps": float(self.native_fps),
            "width": int(self.frames.shape[2]),
            "height": int(self.frames.shape[1]),
            "duration": (last - first + 1) / self.native_fps if self.native_fps > 0 else None,
            "video_backend": self.backend,
            "frames_indices": [int(i) - int(first) for i in self.indices],
        }


def available_backends() -> list[str]:
    """The installed decoders, in the order they are tried."""
    out = []
    try:
        import decord  # noqa: F401

        out.append("decord")
    except ImportError:
        pass
    try:
        import av  # noqa: F401

        out.append("pyav")
    except ImportError:
        pass
    return out


def sample_indices(
    total_frames: int,
    native_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    multiple_of: int = 1,
) -> np.ndarray:
    """Frame indices to decode.

    Args:
        total_frames: frames in the file (> 0).
        native_fps: the file's frame rate (> 0).
        num_frames: uniform sampling: this many frames over ``[start, end]``.
        fps: or one frame every ``1 / fps`` seconds (capped at ``max_frames``,
            spread uniformly when over the cap).
        start, end: seconds; the window is clipped to the file.
        multiple_of: the count is rounded up to a multiple of this by repeating
            the last index.

    Returns:
        ``[T]`` int64 indices, non-decreasing.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames and fps")
    if num_frames is not None and (int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames}")
    if int(multiple_of) != multiple_of or multiple_of < 1:
        raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of}")
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    first, last = _window(total_frames, native_fps, start, end)
    if num_frames is not None:
        idx = np.linspace(first, last, int(num_frames)).astype(np.int64)
    else:
        step = native_fps / float(fps)
        count = int((last - first) // step) + 1 if step > 0 else 1
        idx = np.round(first + np.arange(count) * step).astype(np.int64)
        idx = np.clip(idx, first, last)
        if max_frames is not None and len(idx) > max_frames:
            idx = np.linspace(first, last, int(max_frames)).astype(np.int64)
    pad = (-len(idx)) % int(multiple_of)
    if pad:
        idx = np.concatenate([idx, np.full(pad, idx[-1], dtype=np.int64)])
    return idx


def _window(
    total_frames: int, native_fps: float, start: float | None, end: float | None
) -> tuple[int, int]:
    """First and last frame index of the ``[start, end]`` seconds window, clipped to the file."""
    first, last = 0, total_frames - 1
    if start is not None:
        first = min(last, max(0, int(math.floor(start * native_fps))))
    if end is not None:
        last = max(first, min(last, int(math.ceil(end * native_fps)) - 1))
    return first, last


def loader_options(processor: Any) -> dict[str, Any]:
    """Loader arguments that meet a Hugging Face processor's expectations.

    Qwen2-VL / Qwen2.5-VL: frame count a multiple of ``temporal_patch_size``.
    LLaVA-OneVision / LLaVA-Video: frames resized to the vision tower's square
    size (the processor resizes anyway; loading at that size saves memory).
    Unknown processors get no options.
    """
    vp = getattr(processor, "video_processor", None) or processor
    out: dict[str, Any] = {}
    tps = getattr(vp, "temporal_patch_size", None)
    if isinstance(tps, int) and tps > 1:
        out["multiple_of"] = tps
    size = getattr(vp, "size", None)
    if tps is None and isinstance(size, dict) and "height" in size and "width" in size:
        out["size"] = (int(size["height"]), int(size["width"]))
    return out


def load_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    multiple_of: int = 1,
    size: tuple[int, int] | None = None,
    backend: str | None = None,
) -> VideoClip:
    """Decode sampled frames of one video (see the module docstring).

    Args:
        path: the video file.
        num_frames / fps / max_frames / start / end / multiple_of: see :func:`sample_indices`
            (``num_frames=8`` when neither ``num_frames`` nor ``fps`` is given).
        size: optional ``(height, width)`` to resize frames to (bicubic).
        backend: ``"decord"`` or ``"pyav"`` to force one; default decord, then PyAV
            when decord is missing or fails on this file.

    Returns:
        a :class:`VideoClip`; frames ``[T, H, W, 3]`` uint8.

    Raises:
        VideoLoadError: missing / unreadable / empty / truncated file, or no backend.
    """
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if size is not None and (len(size) != 2 or min(int(s) for s in size) < 1):
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    if num_frames is None and fps is None:
        num_frames = 8
    # validate the sampling arguments before touching the file
    sample_indices(
        1,
        1.0,
        num_frames=num_frames,
        fps=fps,
        max_frames=max_frames,
        multiple_of=multiple_of,
        start=None if start is None else 0.0,
        end=None if end is None or start is None else max(end - start, 1e-9),
    )
    if not path.exists():
        raise VideoLoadError(path, "file not found")
    if not path.is_file():
        raise VideoLoadError(path, "not a file")
    if path.stat().st_size == 0:
        raise VideoLoadError(path, "empty file (0 bytes)")
    sampling = dict(
        num_frames=num_frames,
        fps=fps,
        max_frames=max_frames,
        start=start,
        end=end,
        multiple_of=multiple_of,
    )
    order = [backend] if backend else available_backends()
    if not order:
        raise VideoLoadError(path, "no video backend installed: pip install decord av")
    errors = []
    for name in order:
        try:
            clip = _DECODERS[name](path, sampling)
        except VideoLoadError as e:
            errors.append(f"{name}: {e.reason}")
            if len(order) > 1:
                logger.debug("%s failed on %s: %s", name, path, e.reason)
            continue
        except ImportError as e:
            errors.append(f"{name}: not installed ({e})")
            continue
        except Exception as e:  # decoders raise many types on corrupt files
            errors.append(f"{name}: {type(e).__name__}: {e}")
            logger.debug("%s failed on %s: %s", name, path, e)
            continue
        if size is not None:
            clip.frames = _resize(clip.frames, (int(size[0]), int(size[1])))
        clip.meta["window"] = _window(clip.total_frames, clip.native_fps, start, end)
        if errors:
            logger.info("decoded %s with %s after: %s", path, name, "; ".join(errors))
        return clip
    raise VideoLoadError(path, "; ".join(errors))


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 -> ``[T, h, w, 3]`` (PIL bicubic, as the slow HF processors)."""
    if frames.shape[1:3] == size:
        return frames
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])


def _check_count(path: Path, total: int) -> None:
    if total <= 0:
        raise VideoLoadError(path, "no decodable video frames")


def _decode_decord(path: Path, sampling: dict) -> VideoClip:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:
        raise VideoLoadError(path, f"unreadable ({type(e).__name__}: {e})") from e
    total = len(reader)
    _check_count(path, total)
    native_fps = float(reader.get_avg_fps()) or 1.0
    idx = sample_indices(total, native_fps, **sampling)
    unique, inverse = np.unique(idx, return_inverse=True)
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
        stamps = reader.get_frame_timestamp(unique.tolist())[:, 0]
    except Exception as e:  # a truncated stream fails on the missing frames
        raise VideoLoadError(
            path, f"truncated or corrupt: decoding frames failed ({type(e).__name__}: {e})"
        ) from e
    if frames.shape[0] != len(unique):
        raise VideoLoadError(
            path, f"truncated: asked for {len(unique)} frames, decoded {frames.shape[0]}"
        )
    return VideoClip(
        frames=np.ascontiguousarray(frames[inverse]),
        timestamps=np.asarray(stamps, dtype=np.float64)[inverse],
        indices=idx,
        native_fps=native_fps,
        total_frames=total,
        path=str(path),
        backend="decord",
    )


def _decode_pyav(path: Path, sampling: dict) -> VideoClip:
    import av

    def open_stream():
        try:
            container = av.open(str(path))
        except Exception as e:
            raise VideoLoadError(path, f"unreadable ({type(e).__name__}: {e})") from e
        if not container.streams.video:
            container.close()
            raise VideoLoadError(path, "no video stream")
        return container, container.streams.video[0]

    container, stream = open_stream()
    rate = stream.average_rate or stream.guessed_rate
    native_fps = float(rate) if rate else 1.0
    declared = int(stream.frames or 0)
    if declared <= 0:  # no frame count in the header: count by decoding once
        with container:
            declared = sum(1 for _ in _frames(container, stream, path))
        _check_count(path, declared)
        container, stream = open_stream()
    idx = sample_indices(declared, native_fps, **sampling)
    wanted = set(idx.tolist())
    kept: dict[int, tuple[np.ndarray, float]] = {}
    first_time = None
    total = 0
    with container:
        for i, frame in enumerate(_frames(container, stream, path)):
            t = float(frame.time) if frame.time is not None else i / native_fps
            first_time = t if first_time is None else first_time
            if i in wanted:
                kept[i] = (frame.to_ndarray(format="rgb24"), t - first_time)
            total = i + 1
    _check_count(path, total)
    if total < declared:
        raise VideoLoadError(
            path, f"truncated: the header declares {declared} frames, {total} decode"
        )
    return VideoClip(
        frames=np.stack([kept[i][0] for i in idx.tolist()]),
        timestamps=np.asarray([kept[i][1] for i in idx.tolist()], dtype=np.float64),
        indices=idx,
        native_fps=native_fps,
        total_frames=total,
        path=str(path),
        backend="pyav",
    )


def _frames(container, stream, path: Path):
    """Decoded frames in order; a decode error after the first frame means truncation."""
    count = 0
    try:
        for frame in container.decode(stream):
            count += 1
            yield frame
    except Exception as e:
        if count == 0:
            raise VideoLoadError(path, f"unreadable ({type(e).__name__}: {e})") from e
        raise VideoLoadError(
            path, f"truncated: decoding stopped after {count} frames ({type(e).__name__}: {e})"
        ) from e


_DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav}
