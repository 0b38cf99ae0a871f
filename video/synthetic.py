"""A deterministic synthetic video QA set: the embedded default of ``scripts/video_qa.py``.

Each video has a static background (smooth colour field plus a few static
blobs) and one to three coloured shapes moving in straight lines. Three
multiple-choice questions per video have known answers:

* ``colour``: the colour of the shape moving in a given direction;
* ``count``: how many moving shapes there are;
* ``motion``: the direction a given shape moves in.

The mp4 files are written with PyAV (H.264 with B-frames, yuv420p, one encoder
thread and no lookahead, so the same seed gives the same bytes) and decode with decord. The set is
generated once into a folder named by a hash of its settings (written to a
temporary folder and renamed, so a killed run never leaves a half set) and
reused after that.

Usage::

    from video.synthetic import ensure_synthetic_video_qa

    data = ensure_synthetic_video_qa()  # ./.cache/synthetic_video_qa/...
    data.manifest             # manifest.jsonl: id, video, question, options, answer
    data.samples[0]["answer"]  # "B"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["COLOURS", "DIRECTIONS", "SyntheticVideoQA", "ensure_synthetic_video_qa"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
_MARKER = "COMPLETE.json"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
    "purple": (160, 40, 200),
    "white": (250, 250, 250),
}
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dy, dx) unit steps
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
LETTERS = "ABCD"


@dataclass(frozen=True)
class SyntheticVideoQA:
    """A generated set: ``root`` folder, ``manifest`` path, ``samples`` (manifest rows)."""

    root: Path
    manifest: Path
    samples: list[dict]
    settings: dict


def _settings(num_videos: int, seed: int, num_frames: int, size: tuple[int, int], fps: int):
    return {
        "version": GENERATOR_VERSION,
        "num_videos": int(num_videos),
        "seed": int(seed),
        "num_frames": int(num_frames),
        "size": [int(size[0]), int(size[1])],
        "fps": int(fps),
    }


def ensure_synthetic_video_qa(
    root: str | os.PathLike | None = None,
    *,
    num_videos: int = 6,
    seed: int = 0,
    num_frames: int = 16,
    size: tuple[int, int] = (112, 112),
    fps: int = 8,
    force: bool = False,
) -> SyntheticVideoQA:
    """Generate (once) and return the synthetic video QA set.

    Args:
        root: parent folder (default ``./.cache/synthetic_video_qa``); the set lives
            in a sub-folder named by seed, count and a hash of all settings.
        num_videos: videos, in [1, 1000]; three questions each.
        seed: non-negative integer; same arguments, same bytes.
        num_frames: frames per video, in [4, 1000].
        size: ``(height, width)``, even, in [32, 1024].
        fps: frame rate written into the files, in [1, 60].
        force: regenerate even when a complete set exists.
    """
    if int(num_videos) != num_videos or not 1 <= num_videos <= 1000:
        raise ValueError(f"num_videos must be an integer in [1, 1000], got {num_videos}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if int(num_frames) != num_frames or not 4 <= num_frames <= 1000:
        raise ValueError(f"num_frames must be an integer in [4, 1000], got {num_frames}")
    if len(size) != 2 or not all(32 <= int(v) <= 1024 and int(v) % 2 == 0 for v in size):
        raise ValueError(f"size must be (height, width), even, in [32, 1024], got {size}")
    if int(fps) != fps or not 1 <= fps <= 60:
        raise ValueError(f"fps must be an integer in [1, 60], got {fps}")
    settings = _settings(num_videos, seed, num_frames, size, fps)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    base = Path.cwd() / ".cache" / "synthetic_video_qa" if root is None else Path(root)
    base = base.absolute()
    folder = base / f"seed{int(seed)}_n{int(num_videos)}_{digest}"
    if not force and _complete(folder, digest):
        logger.debug("reusing synthetic video QA set in %s", folder)
        return _load(folder, settings)
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImportError("the synthetic video set is written with PyAV: pip install av") from e
    start = time.perf_counter()
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "videos").mkdir(parents=True)
    try:
        rows = []
        for i in range(int(num_videos)):
            rng = np.random.default_rng([int(seed), i, GENERATOR_VERSION])
            rel = f"videos/video_{i:04d}.mp4"
            frames, shapes = _render(rng, int(num_frames), (int(size[0]), int(size[1])))
            _write_mp4(tmp / rel, frames, int(fps))
            rows += _questions(rng, i, rel, shapes)
        with open(tmp / "manifest.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        with open(tmp / _MARKER, "w") as f:
            json.dump({"digest": digest, "settings": settings}, f)
        if folder.exists():
            if not force and _complete(folder, digest):  # a concurrent writer won
                shutil.rmtree(tmp)
                return _load(folder, settings)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote %d synthetic videos (%d questions) to %s in %.1fs",
        num_videos,
        len(rows),
        folder,
        time.perf_counter() - start,
    )
    return _load(folder, settings)


def _complete(folder: Path, digest: str) -> bool:
    try:
        with open(folder / _MARKER) as f:
            return json.load(f).get("digest") == digest
    except (OSError, ValueError):
        return False


def _load(folder: Path, settings: dict) -> SyntheticVideoQA:
    manifest = folder / "manifest.jsonl"
    with open(manifest) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return SyntheticVideoQA(folder, manifest, samples, settings)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A static, smooth, muted background ``[H, W, 3]`` uint8 (no saturated shape colours)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 140, size=3)
    gy, gx = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + gy * (yy[..., None] - h / 2) + gx * (xx[..., None] - w / 2)
    for _ in range(3):  # static blobs
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.08, 0.2) * min(h, w)
        tone = rng.uniform(-35, 35, size=3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = img + blob[..., None] * tone
    return np.clip(img, 40, 170).astype(np.uint8)


def _render(rng: np.random.Generator, num_frames: int, size: tuple[int, int]):
    """Frames ``[T, H, W, 3]`` uint8 and the shapes' descriptions."""
    h, w = size
    bg = _background(rng, h, w)
    count = int(rng.integers(1, 4))
    colours = rng.choice(list(COLOURS), size=count, replace=False).tolist()
    # distinct directions so "the shape moving left" is unique
    directions = rng.choice(list(DIRECTIONS), size=count, replace=False).tolist()
    half = max(3, min(h, w) // 10)
    travel = 0.5  # fraction of the frame crossed over the clip
    shapes = []
    for k, (colour, direction) in enumerate(zip(colours, directions)):
        dy, dx = DIRECTIONS[direction]
        # start so the whole path stays inside the frame; spread shapes across lanes
        lane = (k + 0.5) / count
        y0 = lane * (h - 2 * half) + half if dy == 0 else (half + 1 if dy > 0 else h - half - 1)
        x0 = lane * (w - 2 * half) + half if dx == 0 else (half + 1 if dx > 0 else w - half - 1)
        kind = "square" if rng.random() < 0.5 else "circle"
        shapes.append(
            {
                "colour": colour,
                "direction": direction,
                "kind": kind,
                "half": half,
                "start": [float(y0), float(x0)],
                "step": [dy * travel * h / (num_frames - 1), dx * travel * w / (num_frames - 1)],
            }
        )
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = bg.copy()
        for s in shapes:
            cy = s["start"][0] + t * s["step"][0]
            cx = s["start"][1] + t * s["step"][1]
            if s["kind"] == "square":
                mask = (np.abs(yy - cy) <= s["half"]) & (np.abs(xx - cx) <= s["half"])
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= s["half"] ** 2
            img[mask] = COLOURS[s["colour"]]
        frames[t] = img
    return frames, shapes


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        # x264's macroblock-tree lookahead is not bit-reproducible (measured: 1 run in 4
        # differed); without it, and with one thread, the same seed gives the same bytes
        stream.options = {
            "crf": "12",
            "preset": "medium",
            "threads": "1",
            "x264-params": "mbtree=0:rc-lookahead=0",
        }
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _options(rng: np.random.Generator, answer: str, pool: list[str]) -> tuple[list[str], str]:
    """Four options containing ``answer`` in a seeded order; returns (options, letter)."""
    others = [p for p in pool if p != answer]
    picked = rng.choice(others, size=3, replace=False).tolist() + [answer]
    order = rng.permutation(4).tolist()
    options = [picked[j] for j in order]
    return options, LETTERS[options.index(answer)]


def _questions(rng: np.random.Generator, i: int, rel: str, shapes: list[dict]) -> list[dict]:
    rows = []
    target = shapes[int(rng.integers(len(shapes)))]
    opts, ans = _options(rng, target["colour"], list(COLOURS))
    rows.append(
        (
            "colour",
            f"What colour is the {target['kind']} that moves {target['direction']}?",
            opts,
            ans,
        )
    )
    opts, ans = _options(rng, str(len(shapes)), ["1", "2", "3", "4"])
    rows.append(("count", "How many moving shapes are in the video?", opts, ans))
    target = shapes[int(rng.integers(len(shapes)))]
    opts, ans = _options(rng, target["direction"], list(DIRECTIONS))
    rows.append(
        (
            "motion",
            f"In which direction does the {target['colour']} {target['kind']} move?",
            opts,
            ans,
        )
    )
    return [
        {
            "id": f"syn{i:04d}_{task}",
            "video": rel,
            "question": question,
            "options": options,
            "answer": answer,
            "task": task,
            "shapes": [{k: s[k] for k in ("colour", "direction", "kind")} for s in shapes],
        }
        for task, question, options, answer in rows
    ]
