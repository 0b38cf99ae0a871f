"""LLaVA-3D spatial tokens from posed RGB-D frames.

LLaVA-3D (ZCMax/LLaVA-3D) turns a scan into "spatial tokens" in four steps,
reproduced here (read from ``llava/model/multimodal_encoder/video_processor.py``,
``unproject.py``, ``video_encoder.py``, ``spatial_aware_module.py`` and
``llava/model/llava_arch.py``):

1. **Views.** ``num_views`` frames (20 by default) uniformly over the frames
   with a finite pose: ``step = n_valid // num_views``, frame ``(i * step) %
   n_valid`` for ``i < num_views`` (:func:`select_views`). With fewer valid
   frames than views ``step`` is 0 and every view is the first frame, as
   upstream.
2. **Pixels.** Colour goes through the CLIP processor (shortest side 336,
   bicubic, centre crop 336, CLIP mean / std: :func:`preprocess_colour`).
   Depth is resized to shortest side 336 with NEAREST, centre-cropped to 336
   and kept in metres (:func:`preprocess_depth`); the depth intrinsic is
   scaled by resized / original size and its ``cx`` shifted by ``-(new_w -
   new_h) / 2`` for the crop (:func:`scale_intrinsic`); poses become
   axis-aligned (``axis_align @ pose``, which :class:`threed.scannet.Scene`
   frames already are).
3. **Patch positions.** Every pixel of the 336 x 336 depth is unprojected
   (``x = (u - cx) z / fx``, ``y = (v - cy) z / fy``, camera-to-world pose)
   and the 24 x 24 patch grid takes its xyz with ``F.interpolate(mode=
   "nearest")`` from 336 to 24, i.e. the pixel ``(14 i, 14 j)``: the patch's
   *top-left* pixel, not its centre. That is the faithful default
   (``patch_pixel="corner"``); ``"centre"`` reads the pixel ``(14 i + 7, 14 j
   + 7)`` instead, which is where the patch actually looks. Zero depth is not
   inpainted on this path, so a patch whose pixel has no depth lands at the
   camera centre (faithful, ``invalid_depth="camera"``); ``"drop"`` leaves
   such patches out of every voxel.
4. **Voxels.** ``round(xyz / 0.2)`` minus the per-scene minimum gives integer
   voxel coordinates; patches sharing a voxel are mean-pooled (the patch
   feature plus a learned 3D position embedding of its xyz, added before
   pooling: ``position_embedding``), in ascending order of the raveled key
   (x, then y, then z), as ``torch.unique`` orders them upstream. More than
   2560 voxels: a random subset of 2560 in ``torch.randperm`` order (unseeded
   upstream, seeded here).

The projector (``mm_projector``) runs after pooling in LLaVA-3D; it is not
part of this module.

ScanNet colour frames (1296 x 968) are larger than the depth frames (640 x
480) and have their own intrinsic. LLaVA-3D feeds the colour frame to CLIP as
it is; the two cameras see nearly the same field of view (about 57.9 vs 58.0
degrees across), so after the 336 crop colour and depth disagree by about a
pixel, well under a 14-pixel patch. ``align_colour=True`` resamples the colour
frame onto the depth camera first (:func:`resample_colour_to_depth`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from threed.voxels import unique_voxels

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SceneViews",
    "SpatialTokenConfig",
    "SpatialTokens",
    "build_spatial_tokens",
    "patch_xyz",
    "prepare_views",
    "preprocess_colour",
    "preprocess_depth",
    "resample_colour_to_depth",
    "resized_shape",
    "scale_intrinsic",
    "select_views",
    "voxelize",
]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SpatialTokenConfig:
    """How spatial tokens are built (LLaVA-3D's values by default).

    Attributes:
        num_views: views per scene (LLaVA-3D: 20), >= 1.
        image_size: side of the square CLIP input (336), a multiple of ``patch_size``.
        patch_size: CLIP patch (14): the grid is ``image_size // patch_size`` (24).
        voxel_size: pooling voxel in metres (0.2), > 0.
        max_tokens: cap on spatial tokens (2560), >= 1.
        patch_pixel: ``"corner"`` (faithful: the patch's top-left pixel, what
            ``F.interpolate(mode="nearest")`` picks) or ``"centre"``.
        invalid_depth: ``"camera"`` (faithful: a zero-depth patch lands at the
            camera centre) or ``"drop"`` (such patches join no voxel).
        align_colour: resample colour onto the depth camera before CLIP
            (LLaVA-3D does not: ``False``).
        seed: seed of the subsample above ``max_tokens``.
        precision: ``"float32"`` or ``"bfloat16"`` for the unprojection and the
            voxel keys (LLaVA-3D's eval scripts run them in bfloat16; see
            :func:`patch_xyz`). Positions are returned in float32 either way.
    """

    num_views: int = 20
    image_size: int = 336
    patch_size: int = 14
    voxel_size: float = 0.2
    max_tokens: int = 2560
    patch_pixel: str = "corner"
    invalid_depth: str = "camera"
    align_colour: bool = False
    seed: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name, low in (
            ("num_views", 1),
            ("image_size", 1),
            ("patch_size", 1),
            ("max_tokens", 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size ({self.patch_size}), "
                f"got {self.image_size}"
            )
        if not isinstance(self.voxel_size, (int, float)) or not 0 < self.voxel_size < 100:
            raise ValueError(f"voxel_size must be in (0, 100) metres, got {self.voxel_size!r}")
        if self.patch_pixel not in ("corner", "centre"):
            raise ValueError(f"patch_pixel must be 'corner' or 'centre', got {self.patch_pixel!r}")
        if self.invalid_depth not in ("camera", "drop"):
            raise ValueError(
                f"invalid_depth must be 'camera' or 'drop', got {self.invalid_depth!r}"
            )
        if not isinstance(self.align_colour, bool):
            raise ValueError(f"align_colour must be True or False, got {self.align_colour!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ---------------------------------------------------------------------------- views / pixels


def select_views(num_valid: int, num_views: int) -> list[int]:
    """LLaVA-3D's view choice: indices into the ``num_valid`` frames with a finite pose."""
    if num_valid < 1:
        raise ValueError(f"num_valid must be >= 1, got {num_valid}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    step = num_valid // num_views
    return [(i * step) % num_valid for i in range(num_views)]


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """``(new_w, new_h)`` with the shortest side ``size`` (the long side truncated)."""
    if width < height:
        return size, int(height * size / width)
    return int(width * size / height), size


def preprocess_depth(depth: np.ndarray, size: int = 336) -> tuple[Tensor, tuple[int, int]]:
    """Depth as LLaVA-3D feeds it: ``([size, size]`` metres, ``(new_w, new_h))``.

    ``depth`` ``[h, w]`` metres (0 = invalid). NEAREST resize to shortest side
    ``size`` (Pillow), centre crop with Pillow's rounding of the half-pixel box.
    """
    from PIL import Image

    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [h, w], got shape {depth.shape}")
    h, w = depth.shape
    new_w, new_h = resized_shape(w, h, size)
    img = Image.fromarray(depth, mode="F").resize((new_w, new_h), Image.NEAREST)
    left, top = (new_w - size) / 2, (new_h - size) / 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()), (new_w, new_h)


def scale_intrinsic(
    intrinsic: np.ndarray | Tensor, original_wh: tuple[int, int], resized_wh: tuple[int, int]
) -> Tensor:
    """LLaVA-3D's intrinsic for the resized, centre-cropped depth: ``[4, 4]`` float32.

    Row 0 (fx, cx) scaled by ``new_w / w``, row 1 (fy, cy) by ``new_h / h``,
    then ``cx -= (new_w - new_h) / 2`` (the crop of a landscape frame; upstream
    applies the same line to portrait frames).
    """
    k = torch.as_tensor(np.asarray(intrinsic, dtype=np.float64)).clone()
    if k.shape[-2:] not in ((4, 4), (3, 3)):
        raise ValueError(f"intrinsic must be 3x3 or 4x4, got shape {tuple(k.shape)}")
    (w, h), (new_w, new_h) = original_wh, resized_wh
    k[..., 0, :] /= w / new_w
    k[..., 1, :] /= h / new_h
    k[..., 0, 2] -= (new_w - new_h) / 2
    if k.shape[-1] == 3:
        k4 = torch.eye(4, dtype=k.dtype)
        k4[:3, :3] = k
        k = k4
    return k.float()


def preprocess_colour(rgb: np.ndarray, size: int = 336) -> Tensor:
    """Colour as CLIP's image processor prepares it: ``[3, size, size]`` float32.

    Shortest side ``size`` (bicubic, long side truncated), centre crop (floor
    of the half margin), ``/ 255``, CLIP mean / std.
    """
    from PIL import Image

    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be [H, W, 3], got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    new_w, new_h = resized_shape(w, h, size)
    img = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    img = img[top : top + size, left : left + size].astype(np.float32) / 255.0
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(((img - mean) / std).transpose(2, 0, 1).copy())


def resample_colour_to_depth(
    rgb: np.ndarray,
    intrinsic_colour: np.ndarray,
    intrinsic_depth: np.ndarray,
    depth_hw: tuple[int, int],
) -> np.ndarray:
    """The colour frame seen through the depth camera: ``[h, w, 3]`` uint8.

    ScanNet's colour and depth cameras share a centre and orientation in the
    posed-images export, so depth pixel ``(u, v)`` sees colour pixel
    ``u_c = fx_c (u - cx_d) / fx_d + cx_c`` (and likewise ``v``); colours are
    read bilinearly there (edge pixels repeated outside the frame).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be [H, W, 3], got shape {rgb.shape}")
    kc, kd = np.asarray(intrinsic_colour, np.float64), np.asarray(intrinsic_depth, np.float64)
    h, w = int(depth_hw[0]), int(depth_hw[1])
    hc, wc = rgb.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    uc = kc[0, 0] * (u - kd[0, 2]) / kd[0, 0] + kc[0, 2]
    vc = kc[1, 1] * (v - kd[1, 2]) / kd[1, 1] + kc[1, 2]
    # grid_sample with align_corners=True: -1 / +1 are the first / last pixel centres
    grid = np.stack([2 * uc / max(wc - 1, 1) - 1, 2 * vc / max(hc - 1, 1) - 1], -1)
    src = torch.from_numpy(rgb.astype(np.float64)).permute(2, 0, 1)[None]
    out = torch.nn.functional.grid_sample(
        src,
        torch.from_numpy(grid)[None],
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass
class SceneViews:
    """A scene's views as LLaVA-3D's processor returns them (what its ``generate`` takes).

    Attributes:
        images: ``[V, 3, S, S]`` CLIP-normalised colour.
        depths: ``[V, S, S]`` metres (0 = invalid).
        poses: ``[V, 4, 4]`` axis-aligned camera-to-world.
        intrinsics: ``[V, 4, 4]`` depth intrinsic of the ``S x S`` crop.
        frame_ids: ``[V]`` ids of the frames used.
    """

    images: Tensor
    depths: Tensor
    poses: Tensor
    intrinsics: Tensor
    frame_ids: list[int] = field(default_factory=list)


def prepare_views(
    frames: Sequence, config: SpatialTokenConfig | None = None, *, select: bool = True
) -> SceneViews:
    """Choose views from ``frames`` (posed frames with finite, axis-aligned poses,
    e.g. ``scene.frames()``) and preprocess them as LLaVA-3D does.

    Args:
        frames: :class:`threed.scannet.PosedFrame` objects (or anything with
            ``rgb``, ``depth``, ``pose``, ``intrinsic_depth``, ``intrinsic_color``,
            ``frame_id``).
        config: sizes and options (default :class:`SpatialTokenConfig`).
        select: pick ``config.num_views`` with :func:`select_views`; ``False``
            uses every frame given.
    """
    cfg = config or SpatialTokenConfig()
    frames = list(frames)
    if not frames:
        raise ValueError("prepare_views: no frames (the scene has no frame with a finite pose)")
    if select:
        frames = [frames[i] for i in select_views(len(frames), cfg.num_views)]
    images, depths, poses, intrinsics = [], [], [], []
    for f in frames:
        depth = np.asarray(f.depth, dtype=np.float32)
        rgb = f.rgb
        if cfg.align_colour:
            rgb = resample_colour_to_depth(rgb, f.intrinsic_color, f.intrinsic_depth, depth.shape)
        images.append(preprocess_colour(rgb, cfg.image_size))
        d, new_wh = preprocess_depth(depth, cfg.image_size)
        depths.append(d)
        intrinsics.append(
            scale_intrinsic(f.intrinsic_depth, (depth.shape[1], depth.shape[0]), new_wh)
        )
        poses.append(torch.as_tensor(np.asarray(f.pose, dtype=np.float32)))
    return SceneViews(
        torch.stack(images),
        torch.stack(depths),
        torch.stack(poses),
        torch.stack(intrinsics),
        [int(f.frame_id) for f in frames],
    )


# ---------------------------------------------------------------------------- geometry


def patch_xyz(
    depths: Tensor,
    intrinsics: Tensor,
    poses: Tensor,
    grid: int = 24,
    patch_pixel: str = "corner",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """World xyz of each patch: ``([V, g, g, 3], valid [V, g, g])``, computed in ``dtype``.

    ``depths [V, S, S]`` metres, ``intrinsics [V, 4, 4]`` (pixel units of the
    ``S x S`` depth), ``poses [V, 4, 4]`` camera-to-world. Patch ``(i, j)``
    reads pixel ``(s i, s j)`` (``"corner"``, what ``F.interpolate(mode=
    "nearest")`` from S to g picks) or ``(s i + s // 2, s j + s // 2)``
    (``"centre"``), ``s = S / g``. ``valid`` is False where that depth is 0
    (the point is then the camera centre). With ``dtype=torch.bfloat16`` the
    pixel coordinates, the division and the pose product round as in
    LLaVA-3D's evaluation scripts, which cast depths, poses and intrinsics to
    bfloat16 (a ScanNet ``cx`` of 167.65 becomes 168, odd pixel coordinates above
    256 snap to even ones).
    """
    if depths.ndim != 3 or depths.shape[1] != depths.shape[2]:
        raise ValueError(f"depths must be [V, S, S], got shape {tuple(depths.shape)}")
    size = depths.shape[-1]
    if size % grid:
        raise ValueError(f"depth side {size} is not a multiple of the grid {grid}")
    if patch_pixel not in ("corner", "centre"):
        raise ValueError(f"patch_pixel must be 'corner' or 'centre', got {patch_pixel!r}")
    s = size // grid
    idx = torch.arange(grid, device=depths.device) * s + (s // 2 if patch_pixel == "centre" else 0)
    z = depths[:, idx][:, :, idx].to(dtype)  # [V, g, g]
    v, u = torch.meshgrid(idx.to(dtype), idx.to(dtype), indexing="ij")
    k = intrinsics.to(dtype)
    fx, fy = k[:, 0, 0, None, None], k[:, 1, 1, None, None]
    cx, cy = k[:, 0, 2, None, None], k[:, 1, 2, None, None]
    cam = torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z, torch.ones_like(z)], -1)
    nv = depths.shape[0]
    # pose @ [x y z 1]^T per view, as LLaVA-3D's unproject multiplies
    world = (poses.to(dtype) @ cam.reshape(nv, -1, 4).transpose(1, 2)).transpose(1, 2)
    world = world.reshape(nv, grid, grid, 4)
    return world[..., :3] / world[..., 3:], z > 0


def voxelize(xyz: Tensor, voxel_size: float) -> tuple[Tensor, Tensor]:
    """Voxel of every point: ``(inverse [N], coords [M, 3])``.

    ``coords`` are ``round(xyz / voxel_size)`` minus their minimum over the
    points, one row per occupied voxel, ascending by (x, y, z) (LLaVA-3D's
    raveled key order); ``inverse[n]`` is the row of point ``n``.
    """
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"xyz must be a non-empty [N, 3], got shape {tuple(xyz.shape)}")
    c = torch.round(xyz / voxel_size).long()
    return unique_voxels(c - c.min(0).values)


@dataclass
class SpatialTokens:
    """A scene's spatial tokens.

    Attributes:
        features: ``[N, C]`` mean of the member patches' features (plus
            position embedding), in token order.
        positions: ``[N, 3]`` mean world xyz of the member patches.
        counts: ``[N]`` member patches per token.
        voxel_coords: ``[N, 3]`` integer voxel coordinates (scene minimum = 0).
        assignment: ``[V, g, g]`` token index of each view's patch, -1 when it
            joins none (dropped for invalid depth, or its voxel fell to the cap).
        patch_xyz: ``[V, g, g, 3]`` world xyz of each patch.
        patch_valid: ``[V, g, g]`` whether the patch had depth.
        frame_ids: the views' frame ids.
        num_voxels: occupied voxels before the cap.
    """

    features: Tensor
    positions: Tensor
    counts: Tensor
    voxel_coords: Tensor
    assignment: Tensor
    patch_xyz: Tensor
    patch_valid: Tensor
    frame_ids: list[int] = field(default_factory=list)
    num_voxels: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


def build_spatial_tokens(
    patch_features: Tensor,
    views: SceneViews,
    config: SpatialTokenConfig | None = None,
    *,
    position_embedding: Callable[[Tensor], Tensor] | None = None,
) -> SpatialTokens:
    """Pool per-view patch features into LLaVA-3D's voxel tokens.

    Args:
        patch_features: ``[V, g*g, C]`` patch features of the views, row-major
            over the ``g x g`` grid (CLIP's patch order without the class token).
        views: :func:`prepare_views` output (depths, poses, intrinsics).
        config: voxel size, cap, patch pixel, invalid depth, seed.
        position_embedding: ``xyz [P, 3] -> [P, C]`` added to every patch
            feature before pooling (LLaVA-3D: a learned MLP); ``None`` adds nothing.
    """
    cfg = config or SpatialTokenConfig()
    g = views.depths.shape[-1] // cfg.patch_size
    nv = views.depths.shape[0]
    if patch_features.ndim != 3 or patch_features.shape[:2] != (nv, g * g):
        raise ValueError(
            f"patch_features must be [V={nv}, {g * g}, C], got shape {tuple(patch_features.shape)}"
        )
    dtype = getattr(torch, cfg.precision)
    xyz, valid = patch_xyz(
        views.depths, views.intrinsics, views.poses, g, cfg.patch_pixel, dtype=dtype
    )
    key_xyz = xyz.reshape(-1, 3)  # voxel keys in the unprojection's precision
    xyz = xyz.float()
    flat_xyz = xyz.reshape(-1, 3)
    feats = patch_features.reshape(nv * g * g, -1)
    if position_embedding is not None:
        feats = feats + position_embedding(flat_xyz.to(feats.dtype))
    dev = xyz.device
    feats = feats.to(dev)
    member = torch.ones(nv * g * g, dtype=torch.bool, device=dev)
    if cfg.invalid_depth == "drop":
        member = valid.reshape(-1)
        if not bool(member.any()):
            raise ValueError("no patch of the chosen views has depth: nothing to voxelize")
    inverse, coords = voxelize(key_xyz[member], float(cfg.voxel_size))
    m = coords.shape[0]
    counts = torch.bincount(inverse, minlength=m)
    pooled = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=dev)
    pooled = pooled.index_add_(0, inverse, feats[member])
    pooled = pooled / counts[:, None].to(feats.dtype)
    pos = torch.zeros(m, 3, dtype=flat_xyz.dtype, device=dev)
    pos = pos.index_add_(0, inverse, flat_xyz[member])
    pos = pos / counts[:, None].to(pos.dtype)
    token_of = torch.full((nv * g * g,), -1, dtype=torch.long, device=dev)
    token_of[member] = inverse
    if m > cfg.max_tokens:
        gen = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(m, generator=gen)[: cfg.max_tokens].to(dev)  # upstream's order
        remap = torch.full((m,), -1, dtype=torch.long, device=dev)
        remap[keep] = torch.arange(cfg.max_tokens, device=dev)
        token_of = torch.where(token_of >= 0, remap[token_of.clamp_min(0)], token_of)
        pooled, pos, counts, coords = pooled[keep], pos[keep], counts[keep], coords[keep]
        logger.debug("spatial tokens: %d voxels capped to %d", m, cfg.max_tokens)
    return SpatialTokens(
        features=pooled,
        positions=pos,
        counts=counts,
        voxel_coords=coords,
        assignment=token_of.reshape(nv, g, g),
        patch_xyz=xyz,
        patch_valid=valid,
        frame_ids=list(views.frame_ids),
        num_voxels=m,
    )
