"""spconv 2.x helpers that reproduce the MinkowskiEngine semantics TSP3D relies on.

Coordinates follow spconv: ``indices [N, 4]`` int32 as ``(batch, x, y, z)`` in the
grid of the tensor's own level (a voxel at level stride ``s`` covers base voxels
``[i*s, (i+1)*s)``).  MinkowskiEngine stores the same voxel as ``i*s`` in base
units, so every ME rule below is an index rule here:

* stride-2 output set (ME ``k3 s2`` conv, ``k2 s2`` pooling): ``floor(i / 2)``;
  spconv's ``SparseConv3d(3, 2, padding=1)`` produces a superset (odd inputs also
  reach ``(i + 1) / 2``), :class:`MEStridedConv` filters it back to ME's set.
* generative transposed conv ``k3 s2``: 27 children ``2 i + {-1, 0, 1}`` per axis;
  spconv's ``SparseConvTranspose3d(3, 2, padding=1)`` gives exactly these, with the
  spatial shape ``2 n - 1`` that :func:`generative_upsample` resets to ``2 n``.
* features at coordinates: exact lookup by sorted integer keys, zeros where absent.

spconv is imported lazily (``import threed`` needs torch only).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from threed.voxels import unique_voxels

__all__ = [
    "spconv_modules",
    "make_tensor",
    "select",
    "coord_keys",
    "lookup",
    "lookup_table",
    "features_at",
    "interpolate_coarse",
    "generative_upsample",
    "transposed_conv_at",
    "me_downsample_coords",
    "unique_coords",
    "MEStridedConv",
    "MEStrideShortcut",
    "Voxelization",
    "voxelize",
    "voxels_to_points",
    "voxel_positions",
]


class _DropFxTracingNote(logging.Filter):
    """Drops torch's "is_fx_tracing will return true ..." note, which torch logs each
    time spconv builds a ``SparseConvTensor`` (its class uses torch.fx's
    ``ProxyableClassMeta``); every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


_FX_FILTER = _DropFxTracingNote()


def _silence_known_spconv_noise() -> None:
    """Narrowly silence the two messages spconv 2.3.6 causes on recent torch, for
    library users too (not only the scripts): the note above, and the
    ``torch.cuda.amp.custom_fwd/bwd`` FutureWarnings raised while spconv is imported
    (handled by the caller). Nothing else is filtered."""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    if _FX_FILTER not in fx_log.filters:
        fx_log.addFilter(_FX_FILTER)


def spconv_modules():
    """``(spconv.pytorch, ConvAlgo.Native)``; raises ImportError with a hint."""
    try:
        with warnings.catch_warnings():
            # spconv's own decorators use torch's deprecated amp API; not the user's concern
            warnings.filterwarnings(
                "ignore", message=r"`torch\.cuda\.amp\.custom_", category=FutureWarning
            )
            import spconv.pytorch as spconv
            from spconv.core import ConvAlgo
        _silence_known_spconv_noise()
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError(
            "TSP3D needs spconv 2.x (pip install 'spconv-cu120>=2.3.6'); it runs on CPU "
            "with ConvAlgo.Native"
        ) from e
    return spconv, ConvAlgo.Native


def make_tensor(features: Tensor, indices: Tensor, spatial_shape, batch_size: int):
    """A fresh ``SparseConvTensor`` (no cached indice pairs)."""
    spconv, _ = spconv_modules()
    return spconv.SparseConvTensor(
        features,
        indices.to(torch.int32).contiguous(),
        [int(s) for s in spatial_shape],
        int(batch_size),
    )


def select(x, keep: Tensor):
    """Rows ``keep`` (bool mask [N] or index [K]) of ``x`` as a new tensor.

    ``SparseConvTensor.select_by_index`` is broken in spconv 2.3.6, so the
    tensor is rebuilt from masked features / indices (what ME's pruning does).
    """
    return make_tensor(x.features[keep], x.indices[keep], x.spatial_shape, x.batch_size)


def coord_keys(indices: Tensor, spatial_shape) -> Tensor:
    """Unique int64 key per ``(b, x, y, z)``; coordinates in ``[-1, shape]`` are allowed."""
    idx = indices.long()
    s = [int(v) + 3 for v in spatial_shape]
    return ((idx[:, 0] * s[0] + idx[:, 1] + 1) * s[1] + idx[:, 2] + 1) * s[2] + idx[:, 3] + 1


def lookup(src_indices: Tensor, query_indices: Tensor, spatial_shape) -> Tensor:
    """Row of ``src_indices`` holding each query coordinate, ``-1`` where absent.

    Sorted-key search: ``O((N + M) log N)``; ``src_indices`` must be unique.
    Returns ``[M]`` long.
    """
    return lookup_table(src_indices, spatial_shape)(query_indices)


def lookup_table(src_indices: Tensor, spatial_shape):
    """:func:`lookup` with the source keys sorted once: returns ``query_indices -> rows``
    (``[M]`` long, ``-1`` where absent) for many queries against the same source."""
    n = src_indices.shape[0]
    if n:
        skeys, order = torch.sort(coord_keys(src_indices, spatial_shape))

    def find(query_indices: Tensor) -> Tensor:
        if query_indices.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=src_indices.device)
        if n == 0:
            return torch.full(
                (query_indices.shape[0],), -1, dtype=torch.long, device=query_indices.device
            )
        qry = coord_keys(query_indices, spatial_shape)
        pos = torch.searchsorted(skeys, qry).clamp_(max=n - 1)
        found = skeys[pos] == qry
        return torch.where(found, order[pos], torch.full_like(pos, -1))

    return find


def features_at(x, query_indices: Tensor) -> Tensor:
    """ME ``features_at_coordinates`` for on-grid queries: ``[M, C]``, zeros where absent."""
    row = lookup(x.indices, query_indices, x.spatial_shape)
    out = x.features.new_zeros(query_indices.shape[0], x.features.shape[1])
    hit = row >= 0
    out[hit] = x.features[row[hit]]
    return out


def interpolate_coarse(
    coarse_features: Tensor, coarse_indices: Tensor, coarse_shape, fine_indices: Tensor
) -> Tensor:
    """Linear interpolation of a coarse (stride 2s) field at fine (stride s) voxels.

    What ME's ``features_at_coordinates`` does when TSP3D reads the 64 cm keep
    scores at generated 32 cm coordinates: a child ``2 i`` sits on parent ``i``
    (weight 1 per axis), an odd child ``2 i + 1`` halfway between ``i`` and ``i + 1``
    (0.5 each).  Absent parents contribute zero (weights are not renormalised), as in
    ME's CPU ``interpolation_map_weight_kernel``.
    Returns ``[M, C]``.
    """
    fine = fine_indices.long()
    lo = torch.div(fine[:, 1:], 2, rounding_mode="floor")
    odd = (fine[:, 1:] - 2 * lo).bool()
    out = coarse_features.new_zeros(fine.shape[0], coarse_features.shape[1])
    find = lookup_table(coarse_indices, coarse_shape)
    for corner in range(8):
        bits = torch.tensor([(corner >> a) & 1 for a in range(3)], device=fine.device)
        if bits.any():
            valid = (odd | (bits == 0)).all(dim=1)  # an even axis has a single parent
        else:
            valid = torch.ones(fine.shape[0], dtype=torch.bool, device=fine.device)
        weight = torch.where(odd, 0.5, 1.0).prod(dim=1).to(coarse_features.dtype)
        q = torch.cat([fine[:, :1], lo + bits], dim=1)
        row = find(q)
        hit = (row >= 0) & valid
        out[hit] += weight[hit, None] * coarse_features[row[hit]]
    return out


def generative_upsample(x, conv: nn.Module):
    """ME ``MinkowskiGenerativeConvolutionTranspose(k3, s2)`` with spconv.

    ``conv`` is ``SparseConvTranspose3d(C, C', 3, 2, padding=1)``; every voxel
    generates its 27 children ``2 i + {-1, 0, 1}``; the spatial shape is reset from
    spconv's ``2 n - 1`` to ``2 n`` (the caller keeps voxels off the upper border).
    """
    y = conv(x)
    shape = [2 * int(s) for s in x.spatial_shape]
    return make_tensor(y.features, y.indices, shape, x.batch_size)


def unique_coords(indices: Tensor) -> Tensor:
    """Unique rows of ``indices [N, 4]`` (non-negative), sorted by key; 1-D sort on int64
    keys (``torch.unique(dim=0)`` is several times slower on CPU)."""
    idx = indices.long()
    if idx.shape[0] == 0:
        return indices
    lo = idx.min(0).values
    ext = idx.max(0).values - lo + 1
    rel = idx - lo
    key = ((rel[:, 0] * ext[1] + rel[:, 1]) * ext[2] + rel[:, 2]) * ext[3] + rel[:, 3]
    key = torch.unique(key)
    out = torch.empty(key.shape[0], 4, dtype=torch.long, device=idx.device)
    for a in (3, 2, 1):
        out[:, a] = key % ext[a]
        key = torch.div(key, ext[a], rounding_mode="floor")
    out[:, 0] = key
    return (out + lo).to(indices.dtype)


def transposed_conv_at(x, conv: nn.Module, out_indices: Tensor) -> Tensor:
    """The generative ``k3 s2`` transposed conv evaluated only at ``out_indices``.

    Child ``c`` receives ``W[c - 2p + 1] @ f_p`` from every present parent ``p`` with
    ``c - 2p`` in ``{-1, 0, 1}`` per axis (ME's non-generative transposed conv onto
    known coordinates); equals :func:`generative_upsample` restricted to those rows
    without computing the other children.  ``conv`` is the same
    ``SparseConvTranspose3d``; returns ``[M, C_out]``.
    """
    w = conv.weight  # [C_out, 3, 3, 3, C_in]
    c = out_indices.long()
    out = x.features.new_zeros(c.shape[0], w.shape[0])
    find = lookup_table(x.indices, x.spatial_shape)  # one sort for the 27 offsets
    # offset d reaches child c only when c - d is even on every axis, i.e. the child's
    # parity is |d|: group the children by parity once (8 classes) instead of testing
    # every child against every offset
    par = c[:, 1:] & 1
    cls = par[:, 0] * 4 + par[:, 1] * 2 + par[:, 2]
    groups = [torch.nonzero(cls == k).squeeze(1) for k in range(8)]
    for a, b, e in itertools.product(range(3), repeat=3):
        rows = groups[4 * (a != 1) + 2 * (b != 1) + (e != 1)]
        if rows.numel() == 0:
            continue
        d = torch.tensor([a - 1, b - 1, e - 1], device=c.device)
        q = torch.cat([c[rows, :1], torch.div(c[rows, 1:] - d, 2, rounding_mode="floor")], 1)
        row = find(q)
        hit = row >= 0
        if bool(hit.any()):
            out.index_add_(0, rows[hit], x.features[row[hit]] @ w[:, a, b, e, :].t())
    if getattr(conv, "bias", None) is not None:
        out = out + conv.bias
    return out


def me_downsample_coords(indices: Tensor) -> Tensor:
    """ME's output coordinate set of a stride-2 conv / pooling: unique ``floor(i / 2)``."""
    out = indices.clone().long()
    out[:, 1:] = torch.div(out[:, 1:], 2, rounding_mode="floor")
    return unique_coords(out).to(torch.int32)


class MEStridedConv(nn.Module):
    """ME ``MinkowskiConvolution(k3, s2)``: spconv ``SparseConv3d(3, 2, padding=1)``
    restricted to ME's output set ``floor(i / 2)`` (the kernel footprint is the same:
    output ``o`` reads inputs ``2 o + {-1, 0, 1}``)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False):
        super().__init__()
        spconv, native = spconv_modules()
        self.conv = spconv.SparseConv3d(
            in_channels, out_channels, 3, 2, padding=1, bias=bias, algo=native
        )

    def forward(self, x):
        y = self.conv(x)
        target = me_downsample_coords(x.indices)
        keep = lookup(target, y.indices, y.spatial_shape) >= 0
        return select(y, keep)


class MEStrideShortcut(nn.Module):
    """ME ``MinkowskiConvolution(k1, s2)`` shortcut onto given output coordinates.

    ME reads only the input at ``2 o`` (zero when that voxel is absent); spconv's own
    ``k1 s2`` conv would drop outputs whose only inputs are odd, so the features are
    gathered explicitly and multiplied by the 1x1 weight.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x, out_indices: Tensor) -> Tensor:
        q = out_indices.clone()
        q[:, 1:] = q[:, 1:] * 2
        return self.linear(features_at(x, q))


@dataclass
class Voxelization:
    """Points quantised to a base voxel grid.

    indices [V, 4] int32 (batch, x, y, z) base-grid coordinates (offset by ``margin``);
    features [V, C] mean of the point features per voxel; point_to_voxel [N] long;
    origin [3] world position of base index 0; spatial_shape [3]; voxel_size metres.
    """

    indices: Tensor
    features: Tensor
    point_to_voxel: Tensor
    origin: Tensor
    spatial_shape: list[int]
    voxel_size: float


def voxelize(
    points: Tensor,
    features: Tensor | None,
    voxel_size: float,
    *,
    coarsest_stride: int = 64,
    margin_cells: int = 1,
) -> Voxelization:
    """Quantise ``points [N, 3]`` (features ``[N, C]``, default xyz) to a grid.

    The grid origin leaves ``margin_cells`` empty cells of the coarsest level
    (``coarsest_stride`` base voxels) below and above the scene so that generative
    upsampling never produces negative or out-of-shape children; the spatial shape
    is a multiple of ``coarsest_stride`` so every stride-2 level halves it exactly.
    Voxel features are the mean of the points inside (ME's default picks one random
    point; the mean is deterministic).
    """
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be a [N, 3] tensor, got {getattr(points, 'shape', None)}")
    if points.shape[0] < 2:
        raise ValueError(f"points must hold at least 2 points, got {points.shape[0]}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    pts = points.float()
    feats = pts if features is None else features.float().to(pts.device)
    if feats.shape[0] != pts.shape[0]:
        raise ValueError("features must have one row per point")
    for name, t in (("points", pts), ("features", feats)):
        bad = ~torch.isfinite(t).all(1)
        if bool(bad.any()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(
                f"{kind} in {name}: {int(bad.sum())} of {t.shape[0]} rows are not finite"
            )
    cell = voxel_size * coarsest_stride
    lo = torch.floor(pts.min(0).values / cell) * cell - margin_cells * cell
    grid = torch.floor((pts - lo) / voxel_size).long()
    extent = grid.max(0).values + 1
    shape = (
        (
            torch.div(extent + coarsest_stride - 1, coarsest_stride, rounding_mode="floor")
            + margin_cells
        )
        * coarsest_stride
    ).tolist()
    inverse, uniq = unique_voxels(grid)
    if uniq.shape[0] < 2:
        raise ValueError(
            "points fall into a single voxel; nothing to ground (use a smaller voxel_size)"
        )
    dev = pts.device
    count = torch.zeros(uniq.shape[0], device=dev).index_add_(
        0, inverse, torch.ones(pts.shape[0], device=dev)
    )
    summed = torch.zeros(uniq.shape[0], feats.shape[1], device=dev).index_add_(0, inverse, feats)
    idx = torch.cat([torch.zeros(uniq.shape[0], 1, dtype=torch.long, device=dev), uniq], dim=1)
    return Voxelization(
        idx.to(torch.int32), summed / count[:, None], inverse, lo, shape, float(voxel_size)
    )


def voxel_positions(indices: Tensor, stride: int, origin: Tensor, voxel_size: float) -> Tensor:
    """World xyz ``[N, 3]`` of voxels at level ``stride``: ``origin + i * stride * voxel``
    (ME's ``coordinates * voxel_size``: the voxel's lower corner, as TSP3D uses it)."""
    return origin.to(torch.float32) + indices[:, 1:].float() * (stride * voxel_size)


def voxels_to_points(vox: Voxelization, voxel_values: Tensor) -> Tensor:
    """Broadcast per-voxel values ``[V, *]`` back to the points ``[N, *]``."""
    return voxel_values[vox.point_to_voxel]
