"""Readers for ScanNet scenes as users have them.

Two folder layouts are read:

* raw scenes: ``<scannet_root>/sceneXXXX_YY/`` with ``sceneXXXX_YY_vh_clean_2.ply``
  (mesh; its vertices are the scene's points), ``sceneXXXX_YY_vh_clean_2.0.010000.segs.json``
  (``segIndices``: one segment id per vertex), ``sceneXXXX_YY.aggregation.json``
  (``segGroups``: objects as lists of segments) and ``sceneXXXX_YY.txt`` (``axisAlignment``,
  16 numbers, row-major 4x4; identity when absent).  ``<scannet_root>/scans/sceneXXXX_YY``
  is found too.
* the posed-images export: ``<posed_images_root>/sceneXXXX_YY/`` with ``NNNNN.jpg`` (colour),
  ``NNNNN.png`` (uint16 depth in millimetres), ``NNNNN.txt`` (4x4 camera-to-world),
  ``intrinsic.txt`` and ``depth_intrinsic.txt`` (4x4 each).  The SensReader layout
  (``color/``, ``depth/``, ``pose/``, ``intrinsic/intrinsic_{color,depth}.txt``) is read too.

Everything is returned in the axis-aligned world: points as ``pts_h @ M.T`` and camera poses as
``M @ pose``.  Missing or malformed files raise :class:`ScanNetDataError` naming the file.
open3d and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ScanNetDataError

__all__ = [
    "Instance",
    "PosedFrame",
    "Scene",
    "STRUCTURE_LABELS",
    "DEPTH_SCALE",
    "load_scene",
    "iter_scenes",
    "unproject_depth",
    "read_axis_alignment",
    "read_matrix",
    "read_mesh",
    "read_json",
    "find_scene_dir",
]

logger = logging.getLogger(__name__)

#: Labels of room structure (not objects); :meth:`Scene.objects` leaves them out by default.
STRUCTURE_LABELS: frozenset[str] = frozenset({"wall", "floor", "ceiling"})
#: ScanNet depth PNGs hold millimetres.
DEPTH_SCALE = 1000.0

_SCENE_ID = re.compile(r"^scene\d{4}_\d{2}$")


# --------------------------------------------------------------------------------------------
# small file readers
# --------------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str = "a JSON file") -> Any:
    """Read a JSON file; a missing or unparsable file raises :class:`ScanNetDataError`."""
    path = Path(path)
    if not path.is_file():
        raise ScanNetDataError(path, f"file not found (expected {what})")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScanNetDataError(path, f"not valid JSON (expected {what}): {e}") from e


def read_matrix(
    path: str | Path, what: str = "a 4x4 matrix", *, finite: bool = True, allow_3x3: bool = False
) -> np.ndarray:
    """Read a whitespace-separated 4x4 matrix (16 numbers) as float64 ``[4, 4]``.

    With ``finite=False``, ``inf`` / ``nan`` entries are allowed (ScanNet has such poses);
    with ``allow_3x3``, 9 numbers (a 3x3 intrinsic matrix) are accepted and padded to 4x4.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanNetDataError(path, f"file not found (expected {what})")
    try:
        values = [float(tok) for tok in path.read_text(encoding="utf-8").split()]
    except (ValueError, UnicodeDecodeError) as e:
        raise ScanNetDataError(path, f"expected {what} as 16 numbers: {e}") from e
    if allow_3x3 and len(values) == 9:
        mat = np.eye(4)
        mat[:3, :3] = np.asarray(values, dtype=np.float64).reshape(3, 3)
    elif len(values) != 16:
        raise ScanNetDataError(path, f"expected {what} as 16 numbers, found {len(values)}")
    else:
        mat = np.asarray(values, dtype=np.float64).reshape(4, 4)
    if finite and not np.isfinite(mat).all():
        raise ScanNetDataError(path, f"expected {what} with finite entries")
    return mat


def read_axis_alignment(path: str | Path) -> np.ndarray:
    """``axisAlignment`` from ``sceneXXXX_YY.txt`` as ``[4, 4]`` float64.

    A missing file or a file without an ``axisAlignment`` line gives the identity (ScanNet's
    test scenes have none); a malformed ``axisAlignment`` line raises.
    """
    path = Path(path)
    if not path.is_file():
        logger.debug("%s not found; using identity axis alignment", path)
        return np.eye(4)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScanNetDataError(path, f"expected a text file of 'key = value' lines: {e}") from e
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "axisAlignment":
            try:
                values = [float(tok) for tok in value.split()]
            except ValueError as e:
                raise ScanNetDataError(path, f"axisAlignment must be 16 numbers: {e}") from e
            if len(values) != 16 or not all(math.isfinite(v) for v in values):
                raise ScanNetDataError(
                    path, f"axisAlignment must be 16 finite numbers, found {len(values)} values"
                )
            return np.asarray(values, dtype=np.float64).reshape(4, 4)
    logger.debug("%s has no axisAlignment; using identity", path)
    return np.eye(4)


_PLY_TYPES = {
    "char": "i1", "uchar": "u1", "int8": "i1", "uint8": "u1", "short": "<i2",
    "ushort": "<u2", "int16": "<i2", "uint16": "<u2", "int": "<i4", "uint": "<u4",
    "int32": "<i4", "uint32": "<u4", "float": "<f4", "double": "<f8", "float32": "<f4",
    "float64": "<f8",
}  # fmt: skip


def _ply_header(path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, ...]]]], int]:
    """Parse a PLY header: ``(format, [(element, count, properties)], offset of the body)``."""
    with path.open("rb") as f:
        if f.read(4).rstrip(b"\r\n") != b"ply":
            raise ScanNetDataError(path, "expected a PLY file (first line 'ply')")
        header: list[str] = []
        while True:
            line = f.readline()
            if not line:
                raise ScanNetDataError(path, "expected a PLY header ending in 'end_header'")
            text = line.decode("ascii", errors="replace").strip()
            if text == "end_header":
                break
            header.append(text)
        offset = f.tell()
    fmt = next((h.split()[1] for h in header if h.startswith("format") and len(h.split()) > 1), "")
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    try:
        for h in header:
            parts = h.split()
            if parts[:1] == ["element"]:
                elements.append((parts[1], int(parts[2]), []))
            elif parts[:1] == ["property"] and elements:
                elements[-1][2].append(tuple(parts[1:]))
    except (IndexError, ValueError) as e:
        raise ScanNetDataError(path, f"expected a well-formed PLY header: {e}") from e
    return fmt, elements, offset


def _check_ply_size(path: Path, fmt: str, elements: list, offset: int) -> None:
    """Catch truncated files (open3d reads them silently as zeros)."""
    if fmt == "ascii":
        need = sum(count for _, count, _ in elements)
        body = path.read_bytes()[offset:]
        have = len([ln for ln in body.split(b"\n") if ln.strip()])
    elif fmt.startswith("binary"):
        need = 0
        for _, count, props in elements:
            for p in props:
                if p[0] == "list":  # at least the count and 3 indices (triangles)
                    need += count * (
                        np.dtype(_PLY_TYPES.get(p[1], "u1")).itemsize
                        + 3 * np.dtype(_PLY_TYPES.get(p[2], "<i4")).itemsize
                    )
                elif p[0] in _PLY_TYPES:
                    need += count * np.dtype(_PLY_TYPES[p[0]]).itemsize
                else:
                    raise ScanNetDataError(path, f"unknown PLY property type {p[0]!r}")
        have = path.stat().st_size - offset
    else:
        raise ScanNetDataError(path, f"unknown PLY format {fmt!r}")
    if have < need:
        raise ScanNetDataError(
            path, f"PLY file is truncated: the header promises at least {need} "
            f"{'lines' if fmt == 'ascii' else 'bytes'} of data, found {have}"
        )  # fmt: skip


def _read_ply_numpy(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Minimal PLY reader (binary little-endian or ASCII) for when open3d is not installed.

    Returns ``(xyz [N, 3] float64, rgb [N, 3] float64 in [0, 1] or None, faces [F, 3] or None)``.
    """
    fmt, elements, offset = _ply_header(path)
    if fmt not in ("binary_little_endian", "ascii"):
        raise ScanNetDataError(path, f"PLY format {fmt!r} is not supported without open3d")
    _check_ply_size(path, fmt, elements, offset)
    body = path.read_bytes()[offset:]
    types = _PLY_TYPES
    xyz = rgb = faces = None
    if fmt == "ascii":
        lines = body.decode("ascii").split("\n")
        pos = 0
        for name, count, props in elements:
            rows = lines[pos : pos + count]
            pos += count
            if name == "vertex":
                arr = np.array([r.split() for r in rows], dtype=np.float64).reshape(count, -1)
                names = [p[-1] for p in props]
                xyz = arr[:, [names.index(c) for c in "xyz"]]
                if all(c in names for c in ("red", "green", "blue")):
                    rgb = arr[:, [names.index(c) for c in ("red", "green", "blue")]] / 255.0
            elif name == "face":
                faces = np.array([r.split()[1:4] for r in rows], dtype=np.int64).reshape(-1, 3)
        return xyz, rgb, faces  # type: ignore[return-value]
    offset = 0
    for name, count, props in elements:
        if any(p[0] == "list" for p in props):
            if name != "face" or len(props) != 1:
                break  # lists we cannot skip without parsing: stop here (vertices came first)
            _, count_t, index_t, _ = props[0]
            dt = np.dtype([("n", types[count_t]), ("idx", types[index_t], (3,))])
            arr = np.frombuffer(body, dtype=dt, count=count, offset=offset)
            if not (arr["n"] == 3).all():
                break  # non-triangle faces: points are all we need
            faces = arr["idx"].astype(np.int64)
            offset += dt.itemsize * count
            continue
        dt = np.dtype([(p[1], types[p[0]]) for p in props])
        arr = np.frombuffer(body, dtype=dt, count=count, offset=offset)
        offset += dt.itemsize * count
        if name == "vertex":
            xyz = np.stack([arr[c].astype(np.float64) for c in "xyz"], axis=1)
            if all(c in arr.dtype.names for c in ("red", "green", "blue")):
                rgb = np.stack([arr[c] for c in ("red", "green", "blue")], 1) / 255.0
    return xyz, rgb, faces  # type: ignore[return-value]


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a ScanNet ``_vh_clean_2.ply``: ``(xyz [N, 3] float64, rgb [N, 3] in [0, 1], faces)``.

    Vertex order is kept exactly (segment ids index it).  Uses open3d; falls back to a small
    numpy reader when open3d is not installed.  A mesh without vertex colours gets grey.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanNetDataError(path, "file not found (expected the scene mesh, a PLY file)")
    fmt, elements, offset = _ply_header(path)
    _check_ply_size(path, fmt, elements, offset)
    try:
        import open3d as o3d
    except ImportError:
        logger.info("open3d not installed; reading %s with the built-in PLY reader", path)
        try:
            xyz, rgb, faces = _read_ply_numpy(path)
        except (ValueError, KeyError, IndexError) as e:
            if isinstance(e, ScanNetDataError):
                raise
            raise ScanNetDataError(path, f"expected a readable PLY mesh: {e}") from e
    else:
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            mesh = o3d.io.read_triangle_mesh(str(path))
        xyz = np.asarray(mesh.vertices, dtype=np.float64)
        rgb = np.asarray(mesh.vertex_colors, dtype=np.float64) if mesh.has_vertex_colors() else None
        faces = np.asarray(mesh.triangles, dtype=np.int64) if mesh.has_triangles() else None
        if len(xyz) == 0:  # maybe a point cloud without faces
            with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
                pcd = o3d.io.read_point_cloud(str(path))
            xyz = np.asarray(pcd.points, dtype=np.float64)
            rgb = np.asarray(pcd.colors, dtype=np.float64) if pcd.has_colors() else None
    if xyz is None or len(xyz) == 0:
        raise ScanNetDataError(path, "expected a PLY mesh with vertices, found none")
    promised = next((count for name, count, _ in elements if name == "vertex"), len(xyz))
    if len(xyz) != promised:
        raise ScanNetDataError(path, f"header promises {promised} vertices, read {len(xyz)}")
    if not np.isfinite(xyz).all():
        raise ScanNetDataError(path, "expected finite vertex coordinates")
    if rgb is None or len(rgb) != len(xyz):
        logger.warning("%s has no vertex colours; using grey", path)
        rgb = np.full_like(xyz, 0.5)
    return xyz, rgb, faces


def find_scene_dir(root: str | Path, scene_id: str, what: str = "scene folder") -> Path:
    """``root/scene_id`` (or ``root/scans/scene_id``, ``root/scans_test/scene_id``)."""
    root = Path(root)
    for cand in (root / scene_id, root / "scans" / scene_id, root / "scans_test" / scene_id):
        if cand.is_dir():
            return cand
    raise ScanNetDataError(root / scene_id, f"{what} not found")


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Instance:
    """One annotated object.

    ``point_idx`` indexes ``Scene.points`` (``[M]`` int64); ``box`` is the axis-aligned box
    ``(cx, cy, cz, dx, dy, dz)`` of those points in the aligned world (float64 ``[6]``).
    """

    object_id: int
    label: str
    point_idx: np.ndarray
    box: np.ndarray
    segments: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        box = ", ".join(f"{v:.3f}" for v in self.box)
        return (
            f"Instance(object_id={self.object_id}, label={self.label!r}, "
            f"num_points={len(self.point_idx)}, box=[{box}])"
        )

    @property
    def center(self) -> np.ndarray:
        return self.box[:3]

    @property
    def size(self) -> np.ndarray:
        return self.box[3:]

    @property
    def box_min_max(self) -> np.ndarray:
        """``[2, 3]``: the box's min and max corners."""
        return np.stack([self.box[:3] - self.box[3:] / 2, self.box[:3] + self.box[3:] / 2])


class PosedFrame:
    """One posed RGB-D view; ``rgb`` and ``depth`` are read from disk on first access.

    * ``rgb``: ``[H, W, 3]`` uint8; ``depth``: ``[h, w]`` float32 metres (0 = invalid)
    * ``pose``: ``[4, 4]`` float64 camera-to-world in the same aligned world as ``Scene.points``
      (camera looks along +z, x right, y down: the ScanNet / OpenCV convention)
    * ``intrinsic_color`` / ``intrinsic_depth``: ``[4, 4]`` float64

    Readers pass ``rgb_path`` / ``depth_path``; in-memory frames (tests, other data sources)
    pass the ``rgb`` / ``depth`` arrays directly.
    """

    def __init__(
        self,
        frame_id: int,
        rgb: np.ndarray | None = None,
        depth: np.ndarray | None = None,
        pose: np.ndarray | None = None,
        intrinsic_color: np.ndarray | None = None,
        intrinsic_depth: np.ndarray | None = None,
        *,
        rgb_path: str | Path | None = None,
        depth_path: str | Path | None = None,
        depth_scale: float = DEPTH_SCALE,
    ) -> None:
        if pose is None or intrinsic_depth is None:
            raise ValueError("PosedFrame needs pose and intrinsic_depth")
        if rgb is None and rgb_path is None:
            raise ValueError("PosedFrame needs rgb or rgb_path")
        if depth is None and depth_path is None:
            raise ValueError("PosedFrame needs depth or depth_path")
        self.frame_id = int(frame_id)
        self.pose = np.asarray(pose, dtype=np.float64)
        self.intrinsic_depth = np.asarray(intrinsic_depth, dtype=np.float64)
        self.intrinsic_color = (
            self.intrinsic_depth.copy()
            if intrinsic_color is None
            else np.asarray(intrinsic_color, dtype=np.float64)
        )
        self.rgb_path = None if rgb_path is None else Path(rgb_path)
        self.depth_path = None if depth_path is None else Path(depth_path)
        self.depth_scale = float(depth_scale)
        if rgb is not None:  # fills the cached_property slot
            self.__dict__["rgb"] = np.asarray(rgb, dtype=np.uint8)
        if depth is not None:
            self.__dict__["depth"] = np.asarray(depth, dtype=np.float32)

    def __repr__(self) -> str:
        where = f", rgb_path={str(self.rgb_path)!r}" if self.rgb_path else ""
        return f"PosedFrame(frame_id={self.frame_id}{where})"

    @cached_property
    def rgb(self) -> np.ndarray:
        from PIL import Image

        assert self.rgb_path is not None
        if not self.rgb_path.is_file():
            raise ScanNetDataError(self.rgb_path, "file not found (expected a colour image)")
        try:
            with Image.open(self.rgb_path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except OSError as e:
            raise ScanNetDataError(self.rgb_path, f"expected a readable colour image: {e}") from e

    @cached_property
    def depth(self) -> np.ndarray:
        from PIL import Image

        assert self.depth_path is not None
        if not self.depth_path.is_file():
            raise ScanNetDataError(self.depth_path, "file not found (expected a depth PNG)")
        try:
            with Image.open(self.depth_path) as im:
                raw = np.asarray(im)
        except OSError as e:
            raise ScanNetDataError(self.depth_path, f"expected a readable depth PNG: {e}") from e
        if raw.ndim != 2:
            raise ScanNetDataError(
                self.depth_path, f"expected a single-channel depth image, got shape {raw.shape}"
            )
        return (raw.astype(np.float32) / np.float32(self.depth_scale)).astype(np.float32)

    def release(self) -> None:
        """Drop the cached images read from disk (they are read again on next access)."""
        if self.rgb_path is not None:
            self.__dict__.pop("rgb", None)
        if self.depth_path is not None:
            self.__dict__.pop("depth", None)


def unproject_depth(
    depth: np.ndarray,
    intrinsic: np.ndarray,
    pose: np.ndarray,
    *,
    stride: int = 1,
    min_depth: float = 1e-3,
    max_depth: float = math.inf,
    return_pixels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Back-project a depth map to world points.

    ``depth [h, w]`` metres (0 = invalid), ``intrinsic [3+, 3+]`` (fx, fy, cx, cy in pixel units
    of the depth image, pixel ``(u, v)`` at integer coordinates), ``pose [4, 4]`` camera-to-world.
    Returns ``[M, 3]`` float32 world points of valid pixels (row-major pixel order), and with
    ``return_pixels`` also ``[M, 2]`` int64 ``(v, u)`` pixel coordinates.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be 2-D [h, w], got shape {depth.shape}")
    fx, fy = float(intrinsic[0][0]), float(intrinsic[1][1])
    cx, cy = float(intrinsic[0][2]), float(intrinsic[1][2])
    vs, us = np.mgrid[0 : depth.shape[0] : stride, 0 : depth.shape[1] : stride]
    d = depth[vs, us].astype(np.float64)
    valid = np.isfinite(d) & (d > min_depth) & (d < max_depth)
    d, us, vs = d[valid], us[valid], vs[valid]
    cam = np.stack([(us - cx) * d / fx, (vs - cy) * d / fy, d], axis=1)
    pose = np.asarray(pose, dtype=np.float64)
    world = cam @ pose[:3, :3].T + pose[:3, 3]
    world = world.astype(np.float32)
    if return_pixels:
        return world, np.stack([vs, us], axis=1).astype(np.int64)
    return world


@dataclass(eq=False)
class Scene:
    """A ScanNet scene in the axis-aligned world (metres).

    * ``points [N, 3]`` float32 mesh vertices, ``colors [N, 3]`` float32 in [0, 1]
    * ``instances``: annotated objects (including structure such as walls and floor, as in
      ScanNet's aggregation; :meth:`objects` leaves those out)
    * ``instance_ids [N]`` int64: the ``object_id`` each point belongs to, -1 for none
    * ``segment_ids [N]`` int64 over-segmentation from ``segs.json``
    * ``faces [F, 3]`` int64 mesh triangles (or ``None``), ``axis_alignment [4, 4]``
    """

    scene_id: str
    points: np.ndarray
    colors: np.ndarray
    instances: list[Instance]
    instance_ids: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    faces: np.ndarray | None = None
    axis_alignment: np.ndarray = field(default_factory=lambda: np.eye(4))
    scene_dir: Path | None = None
    posed_images_dir: Path | None = None

    def __repr__(self) -> str:
        return (
            f"Scene(scene_id={self.scene_id!r}, num_points={self.num_points}, "
            f"num_instances={len(self.instances)}, scene_dir={str(self.scene_dir)!r}, "
            f"posed_images_dir={str(self.posed_images_dir)!r})"
        )

    # -- objects -------------------------------------------------------------------------------

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def instance(self, object_id: int) -> Instance:
        """The instance with this ``object_id`` (``KeyError`` if absent)."""
        for inst in self.instances:
            if inst.object_id == int(object_id):
                return inst
        raise KeyError(f"{self.scene_id} has no object_id {object_id}")

    def objects(self, exclude: Iterable[str] = STRUCTURE_LABELS) -> list[Instance]:
        """Instances whose label is not in ``exclude`` (default: walls, floor, ceiling)."""
        skip = {e.lower() for e in exclude}
        return [inst for inst in self.instances if inst.label.lower() not in skip]

    def label_counts(self) -> dict[str, int]:
        """How many instances carry each label."""
        counts: dict[str, int] = {}
        for inst in self.instances:
            counts[inst.label] = counts.get(inst.label, 0) + 1
        return counts

    def is_unique(self, object_id: int) -> bool:
        """Whether the object's label occurs once among the scene's instances (ScanRefer)."""
        return self.label_counts()[self.instance(object_id).label] == 1

    # -- posed frames --------------------------------------------------------------------------

    @cached_property
    def _frame_table(self) -> tuple[list[tuple[int, Path, Path, Path]], np.ndarray, np.ndarray]:
        if self.posed_images_dir is None:
            raise ScanNetDataError(
                None,
                f"{self.scene_id}: no posed images (pass posed_images_root to load_scene)",
            )
        return _scan_posed_dir(self.posed_images_dir)

    @cached_property
    def _valid_poses(self) -> list[tuple[int, Path, Path, np.ndarray]]:
        """``(frame_id, rgb, depth, aligned pose)`` of frames with a finite pose (read once)."""
        valid, bad = [], []
        for frame_id, rgb_path, depth_path, pose_path in self._frame_table[0]:
            pose = read_matrix(pose_path, "a 4x4 camera-to-world pose", finite=False)
            if np.isfinite(pose).all():
                valid.append((frame_id, rgb_path, depth_path, self.axis_alignment @ pose))
            else:
                bad.append(frame_id)
        if bad:
            logger.warning(
                "%s: skipped %d frame(s) with inf/nan poses (ids %s%s)",
                self.scene_id,
                len(bad),
                bad[:10],
                " ..." if len(bad) > 10 else "",
            )
        return valid

    @property
    def intrinsic_color(self) -> np.ndarray:
        return self._frame_table[1]

    @property
    def intrinsic_depth(self) -> np.ndarray:
        return self._frame_table[2]

    @property
    def frame_ids(self) -> list[int]:
        """Ids of every frame on disk (valid pose or not), ascending."""
        return [row[0] for row in self._frame_table[0]]

    def frames(self, stride: int = 1, max_frames: int | None = None) -> list[PosedFrame]:
        """Posed frames with a finite pose, ascending by id.

        Every ``stride``-th valid frame is taken; if more than ``max_frames`` remain, that many
        are picked evenly spaced over the sequence (first and last included), so a small budget
        still covers the whole scan.  Poses with inf / nan are skipped with a warning.
        Images are read lazily, on attribute access.
        """
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride}")
        if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames}")
        _, k_color, k_depth = self._frame_table
        frames = [
            PosedFrame(
                frame_id,
                pose=pose.copy(),
                intrinsic_color=k_color.copy(),
                intrinsic_depth=k_depth.copy(),
                rgb_path=rgb_path,
                depth_path=depth_path,
            )
            for frame_id, rgb_path, depth_path, pose in self._valid_poses
        ]
        frames = frames[:: int(stride)]
        if max_frames is not None and len(frames) > max_frames:
            pick = np.linspace(0, len(frames) - 1, int(max_frames)).round().astype(int)
            frames = [frames[i] for i in pick]
        return frames

    def unproject(
        self, frame: PosedFrame, *, stride: int = 1, max_depth: float = math.inf
    ) -> np.ndarray:
        """``[M, 3]`` float32 world points (aligned world) of the frame's valid depth pixels."""
        return unproject_depth(
            frame.depth, frame.intrinsic_depth, frame.pose, stride=stride, max_depth=max_depth
        )  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# posed images
# --------------------------------------------------------------------------------------------


def _first_existing(*paths: Path) -> Path | None:
    for p in paths:
        if p.is_file():
            return p
    return None


def _scan_posed_dir(
    scene_dir: Path,
) -> tuple[list[tuple[int, Path, Path, Path]], np.ndarray, np.ndarray]:
    """List ``(frame_id, rgb, depth, pose)`` paths and read both intrinsics."""
    sens = (scene_dir / "pose").is_dir()
    if sens:  # SensReader layout: color/ depth/ pose/ intrinsic/
        k_color_path = _first_existing(
            scene_dir / "intrinsic" / "intrinsic_color.txt", scene_dir / "intrinsic.txt"
        )
        k_depth_path = _first_existing(
            scene_dir / "intrinsic" / "intrinsic_depth.txt", scene_dir / "depth_intrinsic.txt"
        )
        pose_dir, color_dir, depth_dir = (
            scene_dir / "pose",
            scene_dir / "color",
            scene_dir / "depth",
        )
    else:
        k_color_path = _first_existing(
            scene_dir / "intrinsic.txt", scene_dir / "intrinsic_color.txt"
        )
        k_depth_path = _first_existing(
            scene_dir / "depth_intrinsic.txt", scene_dir / "intrinsic_depth.txt"
        )
        pose_dir = color_dir = depth_dir = scene_dir
    if k_color_path is None:
        raise ScanNetDataError(scene_dir / "intrinsic.txt", "file not found (colour intrinsics)")
    if k_depth_path is None:
        raise ScanNetDataError(
            scene_dir / "depth_intrinsic.txt", "file not found (depth intrinsics)"
        )
    k_color = read_matrix(k_color_path, "4x4 colour intrinsics", allow_3x3=True)
    k_depth = read_matrix(k_depth_path, "4x4 depth intrinsics", allow_3x3=True)
    for path, k in ((k_color_path, k_color), (k_depth_path, k_depth)):
        if not (k[0, 0] > 0 and k[1, 1] > 0):
            raise ScanNetDataError(path, "expected intrinsics with positive focal lengths")
    table: list[tuple[int, Path, Path, Path]] = []
    for pose_path in pose_dir.glob("*.txt"):
        stem = pose_path.stem
        if not stem.isdigit():
            continue  # intrinsic.txt and friends
        rgb = _first_existing(color_dir / f"{stem}.jpg", color_dir / f"{stem}.png")
        depth = depth_dir / f"{stem}.png"
        if rgb is None:
            raise ScanNetDataError(color_dir / f"{stem}.jpg", "file not found (colour frame)")
        if not depth.is_file() or depth == rgb:
            raise ScanNetDataError(depth, "file not found (depth frame, uint16 PNG in mm)")
        table.append((int(stem), rgb, depth, pose_path))
    if not table:
        raise ScanNetDataError(pose_dir, "expected NNNNN.txt pose files, found none")
    table.sort(key=lambda row: row[0])
    return table, k_color, k_depth


# --------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------


def _read_segments(path: Path, num_vertices: int) -> np.ndarray:
    data = read_json(path, "a segs.json with 'segIndices'")
    seg = data.get("segIndices") if isinstance(data, dict) else None
    if not isinstance(seg, list):
        raise ScanNetDataError(path, "expected an object with a 'segIndices' list")
    try:
        seg_arr = np.asarray(seg, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ScanNetDataError(path, f"'segIndices' must be integers: {e}") from e
    if seg_arr.ndim != 1 or len(seg_arr) != num_vertices:
        raise ScanNetDataError(
            path,
            f"'segIndices' must have one entry per mesh vertex ({num_vertices}), "
            f"found {seg_arr.shape[0] if seg_arr.ndim else 0}",
        )
    return seg_arr


def _read_instances(
    path: Path, seg_ids: np.ndarray, points: np.ndarray
) -> tuple[list[Instance], np.ndarray]:
    data = read_json(path, "an aggregation.json with 'segGroups'")
    groups = data.get("segGroups") if isinstance(data, dict) else None
    if not isinstance(groups, list):
        raise ScanNetDataError(path, "expected an object with a 'segGroups' list")
    # vertices of each segment, by sorting once
    order = np.argsort(seg_ids, kind="stable")
    uniq, starts, counts = np.unique(seg_ids[order], return_index=True, return_counts=True)
    seg_slices = {int(s): (int(a), int(c)) for s, a, c in zip(uniq, starts, counts)}
    instances: list[Instance] = []
    instance_ids = np.full(len(points), -1, dtype=np.int64)
    seen: set[int] = set()
    for gi, group in enumerate(groups):
        if not isinstance(group, dict):
            raise ScanNetDataError(path, f"segGroups[{gi}] must be an object")
        oid = group.get("objectId", group.get("id"))
        label = group.get("label")
        segments = group.get("segments")
        if not isinstance(oid, int) or isinstance(oid, bool):
            raise ScanNetDataError(path, f"segGroups[{gi}] needs an integer 'objectId'")
        if not isinstance(label, str):
            raise ScanNetDataError(path, f"segGroups[{gi}] needs a string 'label'")
        if not isinstance(segments, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in segments
        ):
            raise ScanNetDataError(path, f"segGroups[{gi}] needs a 'segments' list of integers")
        if oid in seen:
            raise ScanNetDataError(path, f"segGroups[{gi}]: objectId {oid} occurs twice")
        seen.add(oid)
        unknown = [s for s in segments if s not in seg_slices]
        if unknown:
            raise ScanNetDataError(
                path,
                f"segGroups[{gi}] (objectId {oid}, {label!r}) references segment(s) "
                f"{unknown[:5]} not present in the segs.json",
            )
        if not segments:
            logger.warning("%s: objectId %d (%r) has no segments; skipped", path, oid, label)
            continue
        idx = np.concatenate(
            [order[seg_slices[s][0] : seg_slices[s][0] + seg_slices[s][1]] for s in segments]
        )
        idx = np.unique(idx)
        pts = points[idx].astype(np.float64)
        lo, hi = pts.min(0), pts.max(0)
        box = np.concatenate([(lo + hi) / 2, hi - lo])
        instance_ids[idx] = oid
        instances.append(Instance(oid, label.strip(), idx, box, [int(s) for s in segments]))
    return instances, instance_ids


def load_scene(
    scene_id: str,
    scannet_root: str | Path,
    posed_images_root: str | Path | None = None,
    *,
    with_faces: bool = True,
    require_annotations: bool = True,
) -> Scene:
    """Read one ScanNet scene (mesh, segments, objects, alignment, optional posed images).

    ``scannet_root`` holds ``scene_id/`` (or ``scans/scene_id/``); ``posed_images_root`` holds
    ``scene_id/`` of the posed-images export.  Raises :class:`ScanNetDataError` naming the file
    when something is missing or malformed.  ``require_annotations=False`` reads scenes without
    ``segs.json`` / ``aggregation.json`` (ScanNet's test split) with no instances.
    """
    if not isinstance(scene_id, str) or not scene_id:
        raise ValueError(f"scene_id must be a non-empty string, got {scene_id!r}")
    if not _SCENE_ID.match(scene_id):
        logger.debug("scene_id %r does not look like sceneXXXX_YY", scene_id)
    scene_dir = find_scene_dir(scannet_root, scene_id, "raw scene folder")
    xyz, rgb, faces = read_mesh(scene_dir / f"{scene_id}_vh_clean_2.ply")
    align = read_axis_alignment(scene_dir / f"{scene_id}.txt")
    pts_h = np.concatenate([xyz, np.ones((len(xyz), 1))], axis=1)
    points = (pts_h @ align.T)[:, :3].astype(np.float32)
    segs_path = scene_dir / f"{scene_id}_vh_clean_2.0.010000.segs.json"
    agg_path = scene_dir / f"{scene_id}.aggregation.json"
    if not require_annotations and not agg_path.is_file():
        logger.info("%s: no %s; reading without instances", scene_id, agg_path.name)
        seg_ids = _read_segments(segs_path, len(xyz)) if segs_path.is_file() else None
        instances, instance_ids = [], np.full(len(xyz), -1, dtype=np.int64)
    else:
        seg_ids = _read_segments(segs_path, len(xyz))
        instances, instance_ids = _read_instances(agg_path, seg_ids, points)
    posed_dir = None
    if posed_images_root is not None:
        posed_dir = find_scene_dir(posed_images_root, scene_id, "posed-images folder")
    scene = Scene(
        scene_id=scene_id,
        points=points,
        colors=np.clip(rgb, 0.0, 1.0).astype(np.float32),
        instances=instances,
        instance_ids=instance_ids,
        segment_ids=seg_ids,
        faces=faces if with_faces else None,
        axis_alignment=align,
        scene_dir=scene_dir,
        posed_images_dir=posed_dir,
    )
    if posed_dir is not None:
        _ = scene._frame_table  # fail early on missing intrinsics / frames
    logger.debug("loaded %s: %d points, %d instances", scene_id, scene.num_points, len(instances))
    return scene


def iter_scenes(
    scene_ids: Sequence[str],
    scannet_root: str | Path,
    posed_images_root: str | Path | None = None,
    *,
    catch: tuple[type[BaseException], ...] = (Exception,),
    **load_kwargs: Any,
) -> Iterator[tuple[str, Scene | BaseException]]:
    """Yield ``(scene_id, Scene)`` per scene, or ``(scene_id, exception)`` for one that failed.

    Scenes are loaded one at a time, so a multi-scene run can record a bad scene as failed and
    go on.  Exceptions outside ``catch`` propagate.
    """
    for scene_id in scene_ids:
        try:
            scene = load_scene(scene_id, scannet_root, posed_images_root, **load_kwargs)
        except catch as e:
            logger.warning("scene %s failed to load: %s", scene_id, e)
            yield scene_id, e
        else:
            yield scene_id, scene
