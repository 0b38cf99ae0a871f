"""TSP3D grounding network on spconv 2.x (single-stage 3D visual grounding).

Follows GWxuan/TSP3D (``models/bdetr.py``, ``models/mink_resnet.py``,
``models/multilevel_head.py``):

* backbone: MinkResNet34 (BasicBlocks 3-4-6-3, channels 64/128/128/128, stem k3 s2 +
  max-pool k2 s2), outputs at strides 8/16/32/64 base voxels; TSP3D uses 16/32/64
  (16/32/64 cm at the official 1 cm voxel);
* frozen text encoder -> ``Linear(H, d) + LayerNorm + Dropout``;
* decoder: BiEncoder + TGP at 64 cm (scene level), generative upsampling + backbone
  features at the generated coordinates, BiEncoder + TGP at 32 cm (target level),
  upsampling to 16 cm, CBA, lateral / out blocks, fusion with the sentence feature
  (first token of the text-enhanced text features), single-level head (box offsets
  from the voxel corner + exp log size, axis aligned, and a logit), top-1 box.

``prune=False`` runs the same layers without TGP and CBA.  ``config.unpruned_upsample``
chooses what the unpruned decoder holds: ``"scene"`` (default; the transposed conv is
evaluated only at the backbone level's voxels, i.e. the scene's voxels) or
``"generative"`` (all 27 children; identical to TGP with thresholds 0 and CBA off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from common.benchmark import clock

from .pruning import CompletionAddition, PositionEmbeddingLearned, TextGuidedPruning
from .sparse import (
    MEStridedConv,
    MEStrideShortcut,
    Voxelization,
    features_at,
    generative_upsample,
    make_tensor,
    spconv_modules,
    transposed_conv_at,
    voxel_positions,
    voxelize,
)
from .text import TextEncoder

__all__ = [
    "TSP3DConfig",
    "MinkResNetBackbone",
    "SubMBlock",
    "UpBlock",
    "TSP3DGrounder",
    "GroundingOutput",
    "SceneBatch",
    "make_scene_batch",
]

STRIDES = (8, 16, 32, 64)  # backbone output strides in base voxels


def check_thresholds(thresholds, name: str = "thresholds") -> tuple[float, float]:
    """Two keep-probability thresholds (64 cm, 32 cm), each in [0, 1) (NaN refused)."""
    try:
        vals = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {thresholds!r}") from None
    if len(vals) != 2 or not all(0.0 <= t < 1.0 for t in vals):  # NaN fails the comparison
        raise ValueError(f"{name} must be two numbers in [0, 1), got {thresholds!r}")
    return vals


def check_keep_ratios(ratios, name: str = "keep_ratios") -> tuple[float, float]:
    """Two kept fractions (64 cm, 32 cm), each in (0, 1]."""
    try:
        vals = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers in (0, 1], got {ratios!r}") from None
    if len(vals) != 2 or not all(0.0 < r <= 1.0 for r in vals):
        raise ValueError(f"{name} must be two numbers in (0, 1], got {ratios!r}")
    return vals


@dataclass
class TSP3DConfig:
    """Hyperparameters (defaults = official TSP3D on ScanRefer).

    voxel_size: base voxel in metres (official 0.01; levels at 16/32/64 x voxel_size).
    prune_thresholds: inference keep-prob thresholds (64 cm scene level, 32 cm target
        level); tunable at run time through ``forward(thresholds=...)``.
    train_topk: training top-k after upsampling (32 cm, 16 cm range ``[low, high)``).
    train_max_voxels: training subsample before the 64 / 32 cm BiEncoders.
    keep_half_widths: keep-target cube half-widths in metres (64 cm, 32 cm).
    """

    voxel_size: float = 0.01
    in_channels: int = 6
    backbone_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    backbone_channels: tuple[int, int, int, int] = (64, 128, 128, 128)
    stem_channels: int = 64
    d_model: int = 128
    n_heads: int = 8
    dim_feedforward: int = 128
    dropout: float = 0.1
    num_layers: int = 2
    prune_thresholds: tuple[float, float] = (0.7, 0.3)
    train_topk: tuple[int, tuple[int, int]] = (4000, (1200, 4000))
    train_max_voxels: tuple[int | None, int | None] = (320, 3200)
    fallback_topk: int = 100
    cba: bool = True
    cba_threshold: float = 0.15
    cba_candidates: int = 2400
    keep_half_widths: tuple[float, float] = (1.04, 0.52)
    top_pts: int = 32
    unpruned_upsample: str = "scene"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")
        self.prune_thresholds = check_thresholds(self.prune_thresholds, "prune_thresholds")
        if not 0.0 <= self.cba_threshold < 1.0:
            raise ValueError(f"cba_threshold must be in [0, 1), got {self.cba_threshold}")
        if any(c != self.d_model for c in self.backbone_channels[1:]):
            raise ValueError(
                f"backbone_channels[1:] must equal d_model={self.d_model} (the BiEncoders run on "
                f"backbone features), got {self.backbone_channels}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got {self.d_model}, {self.n_heads}"
            )
        if self.unpruned_upsample not in ("scene", "generative"):
            raise ValueError(
                f"unpruned_upsample must be 'scene' or 'generative', got {self.unpruned_upsample!r}"
            )
        if len(self.backbone_blocks) != 4 or min(self.backbone_blocks) < 1:
            raise ValueError(f"backbone_blocks must be 4 counts >= 1, got {self.backbone_blocks}")

    def level_cm(self, stride: int) -> float:
        return round(stride * self.voxel_size * 100, 3)


def _feat(x, fn):
    return x.replace_feature(fn(x.features))


class BasicBlock(nn.Module):
    """ME ``BasicBlock`` (conv3-BN-ReLU-conv3-BN + shortcut, ReLU) on spconv."""

    def __init__(self, cin: int, cout: int, stride: int, key: str):
        super().__init__()
        spconv, native = spconv_modules()
        self.stride = stride
        if stride == 2:
            self.conv1 = MEStridedConv(cin, cout)
            self.down = MEStrideShortcut(cin, cout)
            self.down_bn = nn.BatchNorm1d(cout)
        else:
            self.conv1 = spconv.SubMConv3d(
                cin, cout, 3, padding=1, bias=False, algo=native, indice_key=key
            )
            self.down = None
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = spconv.SubMConv3d(
            cout, cout, 3, padding=1, bias=False, algo=native, indice_key=key
        )
        self.bn2 = nn.BatchNorm1d(cout)

    def forward(self, x):
        out = _feat(self.conv1(x), lambda f: torch.relu(self.bn1(f)))
        out = _feat(self.conv2(out), self.bn2)
        if self.down is not None:
            identity = self.down_bn(self.down(x, out.indices))
        else:
            identity = x.features
        return out.replace_feature(torch.relu(out.features + identity))


class MinkResNetBackbone(nn.Module):
    """MinkResNet (official ``TSPBackbone``): stem k3 s2 + BN + ReLU + max-pool k2 s2,
    then 4 stages of BasicBlocks, each starting with stride 2.

    Input: SparseConvTensor at the base voxel; output: list of 4 tensors at strides
    8, 16, 32, 64 base voxels with ``channels``.
    """

    def __init__(
        self, in_channels=6, blocks=(3, 4, 6, 3), channels=(64, 128, 128, 128), stem_channels=64
    ):
        super().__init__()
        spconv, native = spconv_modules()
        self.stem = MEStridedConv(in_channels, stem_channels)
        self.stem_bn = nn.BatchNorm1d(stem_channels)
        self.pool = spconv.SparseMaxPool3d(2, 2, algo=native)
        stages = []
        cin = stem_channels
        for i, (n, c) in enumerate(zip(blocks, channels)):
            layers = [BasicBlock(cin, c, 2, f"bb{i}")]
            layers += [BasicBlock(c, c, 1, f"bb{i}") for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x) -> list:
        x = _feat(self.stem(x), lambda f: torch.relu(self.stem_bn(f)))
        x = self.pool(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class SubMBlock(nn.Module):
    """SubM k3 conv + BN + ReLU (the head's lateral / out blocks)."""

    def __init__(self, cin, cout):
        super().__init__()
        spconv, native = spconv_modules()
        self.conv = spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, algo=native)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return _feat(self.conv(x), lambda f: torch.relu(self.bn(f)))


class UpBlock(nn.Module):
    """Generative transposed conv k3 s2 + BN + ReLU (27 children per voxel)."""

    def __init__(self, cin, cout):
        super().__init__()
        spconv, native = spconv_modules()
        self.conv = spconv.SparseConvTranspose3d(
            cin, cout, 3, 2, padding=1, bias=False, algo=native
        )
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x, out_indices: Tensor | None = None):
        """All 27 children per voxel, or only ``out_indices`` (children known to exist)."""
        if out_indices is None:
            y = generative_upsample(x, self.conv)
        else:
            shape = [2 * int(s) for s in x.spatial_shape]
            y = make_tensor(
                transposed_conv_at(x, self.conv, out_indices), out_indices, shape, x.batch_size
            )
        return _feat(y, lambda f: torch.relu(self.bn(f)))


@dataclass
class SceneBatch:
    """Voxelised scenes sharing one grid: indices [V, 4], features [V, C], origins [B, 3]."""

    indices: Tensor
    features: Tensor
    origins: Tensor
    spatial_shape: list[int]
    batch_size: int
    voxelizations: list[Voxelization]


def make_scene_batch(
    points: list[Tensor], colors: list[Tensor | None], voxel_size: float
) -> SceneBatch:
    """Voxelise each scene (xyz + rgb features, official input) and stack them."""
    vox, idx, feats, shape = [], [], [], [0, 0, 0]
    for b, (p, c) in enumerate(zip(points, colors)):
        p = torch.as_tensor(p, dtype=torch.float32)
        if c is None:
            c = torch.zeros_like(p)
        else:
            raw = torch.as_tensor(c)
            c = raw.to(device=p.device, dtype=torch.float32)
            if raw.dtype == torch.uint8:
                c = c / 255.0
        v = voxelize(p, torch.cat([p, c], 1), voxel_size)
        vox.append(v)
        i = v.indices.clone()
        i[:, 0] = b
        idx.append(i)
        feats.append(v.features)
        shape = [max(a, s) for a, s in zip(shape, v.spatial_shape)]
    return SceneBatch(
        torch.cat(idx), torch.cat(feats), torch.stack([v.origin for v in vox]), shape, len(vox), vox
    )


@dataclass
class GroundingOutput:
    """What :meth:`TSP3DGrounder.forward` returns.

    boxes [B, 6] top-1 (cx, cy, cz, dx, dy, dz); scores [B] its sigmoid score;
    voxel_boxes [N, 6], cls_logits [N], positions [N, 3], batch_idx [N]: the final 16 cm
    voxels; keep: per TGP level (64, 32) dict(logits, positions, batch_idx);
    cba: dict(logits, positions, batch_idx, added) or None; counts: voxels per level
    before / after pruning; kept_positions: the kept coarse voxels per level;
    timings: wall seconds of ``backbone``, ``text`` and ``decoder`` (TGP, CBA, head).
    """

    boxes: Tensor
    scores: Tensor
    voxel_boxes: Tensor
    cls_logits: Tensor
    positions: Tensor
    batch_idx: Tensor
    keep: dict
    cba: dict | None
    counts: dict
    kept_positions: dict
    timings: dict = field(default_factory=dict)


class _Level(NamedTuple):
    """One TGP level of the decoder: its stride (in base voxels), modules, the backbone
    level below it and the run-time threshold / keep ratio."""

    stride: int
    tgp: TextGuidedPruning
    lateral: nn.Module
    up: nn.Module
    skip: object  # the backbone SparseConvTensor at stride / 2
    threshold: float
    keep_ratio: float | None


class _DecoderPass(NamedTuple):
    """What one forward pass shares across levels (outputs are filled in place)."""

    org: Tensor
    txt_pad: Tensor
    generator: torch.Generator | None
    prune: bool
    scene_mode: bool
    keep: dict
    kept_pos: dict
    counts: dict


class TSP3DGrounder(nn.Module):
    """The full grounding network.  ``forward(batch, texts, prune=True)``."""

    def __init__(self, config: TSP3DConfig | None = None, text_encoder: TextEncoder | None = None):
        super().__init__()
        cfg = config or TSP3DConfig()
        self.config = cfg
        d = cfg.d_model
        self.backbone = MinkResNetBackbone(
            cfg.in_channels, cfg.backbone_blocks, cfg.backbone_channels, cfg.stem_channels
        )
        self.text_encoder = text_encoder if text_encoder is not None else TextEncoder()
        self.text_projector = nn.Sequential(
            nn.Linear(self.text_encoder.hidden_size, d),
            nn.LayerNorm(d, eps=1e-12),
            nn.Dropout(cfg.dropout),
        )
        self.pos_embed = PositionEmbeddingLearned(d)
        common = dict(
            d_model=d,
            n_heads=cfg.n_heads,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            num_layers=cfg.num_layers,
            pos_embed=self.pos_embed,
        )
        self.tgp_scene = TextGuidedPruning(
            threshold=cfg.prune_thresholds[0],
            train_topk=cfg.train_topk[0],
            max_train_voxels=cfg.train_max_voxels[0],
            fallback_topk=cfg.fallback_topk,
            **common,
        )
        self.tgp_target = TextGuidedPruning(
            threshold=cfg.prune_thresholds[1],
            train_topk=tuple(cfg.train_topk[1]),
            max_train_voxels=cfg.train_max_voxels[1],
            fallback_topk=cfg.fallback_topk,
            **common,
        )
        self.cba = CompletionAddition(
            threshold=cfg.cba_threshold, num_candidates=cfg.cba_candidates, **common
        )
        self.up_64_32 = UpBlock(d, d)
        self.up_32_16 = UpBlock(d, d)
        self.lateral = nn.ModuleList([SubMBlock(d, d) for _ in range(3)])  # 16, 32, 64
        self.out_block = SubMBlock(d, d)
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True))
        self.bbox_head = nn.Linear(d, 6)
        self.cls_head = nn.Linear(d, 1)
        nn.init.normal_(self.bbox_head.weight, std=0.01)
        nn.init.normal_(self.cls_head.weight, std=0.01)
        nn.init.constant_(self.cls_head.bias, -math.log((1 - 0.01) / 0.01))

    # ------------------------------------------------------------------ helpers
    def scene_batch(self, points, colors=None) -> SceneBatch:
        """``points``: one scene's ``[N, 3]`` tensor or numpy array (what
        ``threed.scannet.load_scene`` gives), or a list of them; colours ``[N, 3]`` in
        [0, 1] (uint8 arrays are divided by 255)."""
        if isinstance(points, (Tensor, np.ndarray)):
            points, colors = [points], [colors]
        colors = colors if colors is not None else [None] * len(points)
        return make_scene_batch(points, colors, self.config.voxel_size)

    def _pos(self, x, stride: int, origins: Tensor) -> Tensor:
        o = origins[x.indices[:, 0].long()]
        return o + x.indices[:, 1:].float() * (stride * self.config.voxel_size)

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pad = self.text_encoder(texts)
        return self.text_projector(hidden), pad

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        batch: SceneBatch,
        texts: list[str],
        *,
        prune: bool = True,
        thresholds: tuple[float, float] | None = None,
        cba: bool | None = None,
        keep_ratios: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> GroundingOutput:
        """Ground ``texts[b]`` in scene ``b`` of ``batch``.

        prune: TGP + CBA on (False: the same layers without them); thresholds:
        inference keep-prob thresholds (64, 32) overriding the config; cba: override
        ``config.cba``; keep_ratios: keep the top fraction per level instead of
        thresholds (project option); generator: CBA candidate sampling and training
        subsampling / top-k draws (dropout still uses the global RNG in training).
        """
        cfg = self.config
        if len(texts) != batch.batch_size:
            raise ValueError(f"need one text per scene, got {len(texts)} for {batch.batch_size}")
        thr = cfg.prune_thresholds if thresholds is None else check_thresholds(thresholds)
        if keep_ratios is not None:
            keep_ratios = check_keep_ratios(keep_ratios)
        use_cba = (cfg.cba if cba is None else cba) and prune
        dev = self.text_projector[0].weight.device
        x_in = make_tensor(
            batch.features.to(dev), batch.indices.to(dev), batch.spatial_shape, batch.batch_size
        )
        t0 = clock(dev)
        x8, x16, x32, x64 = self.backbone(x_in)
        t1 = clock(dev)
        txt, txt_pad = self.encode_text(texts)
        t2 = clock(dev)
        org = batch.origins.to(txt.device)
        counts = {
            "backbone_64": x64.features.shape[0],
            "backbone_32": x32.features.shape[0],
            "backbone_16": x16.features.shape[0],
        }
        keep, kept_pos = {}, {}

        # unpruned "scene" mode: the children that exist in the backbone level (every
        # backbone voxel's parent is present), computed only there
        scene_mode = not prune and cfg.unpruned_upsample == "scene"
        run = _DecoderPass(org, txt_pad, generator, prune, scene_mode, keep, kept_pos, counts)
        ratios = (None, None) if keep_ratios is None else keep_ratios
        x = x64
        for level in (
            _Level(64, self.tgp_scene, self.lateral[2], self.up_64_32, x32, thr[0], ratios[0]),
            _Level(32, self.tgp_target, self.lateral[1], self.up_32_16, x16, thr[1], ratios[1]),
        ):
            x, txt, n_scored = self._tgp_level(x, txt, level, run)
            if level.stride == 32:
                counts["decoder_32"] = n_scored
        counts["pruned_16"] = x.features.shape[0]

        cba_info = None
        if use_cba:
            pos16 = self._pos(x16, 16, org)
            x, info, txt = self.cba(x, x16, pos16, txt, txt_pad, generator)
            rows = info["sampled"]
            cba_info = {
                "logits": info["logits"],
                "positions": pos16[rows],
                "batch_idx": x16.indices[rows, 0].long(),
                "added": info["added"],
            }
        counts["decoder_16"] = x.features.shape[0]
        counts["added_16"] = counts["decoder_16"] - counts["pruned_16"]

        # head (16)
        x = self.lateral[0](x)
        out = self.out_block(x)
        bidx = out.indices[:, 0].long()
        f = self.fuse(torch.cat([out.features, txt[:, 0][bidx]], 1))
        reg = self.bbox_head(f)
        cls = self.cls_head(f).squeeze(1)
        pos = self._pos(out, 16, org)
        vboxes = torch.cat([pos + reg[:, :3], torch.exp(reg[:, 3:6].clamp(max=10.0))], 1)
        boxes, scores = [], []
        for b in range(batch.batch_size):
            rows = torch.nonzero(bidx == b).squeeze(1)
            if rows.numel() == 0:
                boxes.append(vboxes.new_zeros(6))
                scores.append(vboxes.new_zeros(()))
                continue
            j = rows[torch.argmax(cls[rows])]
            boxes.append(vboxes[j])
            scores.append(torch.sigmoid(cls[j]))
        t3 = clock(dev)
        timings = {"backbone": t1 - t0, "text": t2 - t1, "decoder": t3 - t2}
        return GroundingOutput(
            torch.stack(boxes),
            torch.stack(scores),
            vboxes,
            cls,
            pos,
            bidx,
            keep,
            cba_info,
            counts,
            kept_pos,
            timings,
        )

    def _tgp_level(self, x, txt: Tensor, level: _Level, run: _DecoderPass):
        """One TGP level (the official ``TSPHead`` loop body, written once for 64 and 32).

        BiEncoder + keep score on ``x`` (level ``stride``) -> lateral block -> inference
        pruning by threshold -> upsampling to ``stride / 2`` (all 27 children, or only
        ``skip``'s voxels in the unpruned ``scene`` mode) -> training top-k of the
        children -> + the backbone features of ``skip`` at the children. Pruning the
        children before the join (the official order at 32 cm; at 64 cm it joins first)
        gives the same rows and values: the top-k reads only the coarse logits and the
        join is row-wise. Fills ``keep[stride]``, ``kept_pos[stride]`` and the
        ``kept_{stride}`` / ``generated_{stride // 2}`` counts; returns ``(x, txt,
        voxels scored)``.
        """
        stride, tgp, skip = level.stride, level.tgp, level.skip
        x, logit, txt = tgp.score(x, self._pos(x, stride, run.org), txt, run.txt_pad, run.generator)
        run.keep[stride] = {
            "logits": logit,
            "positions": self._pos(x, stride, run.org),
            "batch_idx": x.indices[:, 0].long(),
        }
        n_scored = x.features.shape[0]
        x = level.lateral(x)
        if run.prune and not self.training:
            x, _ = tgp.prune_coarse(x, logit, level.threshold, level.keep_ratio)
        run.counts[f"kept_{stride}"] = x.features.shape[0]
        run.kept_pos[stride] = self._pos(x, stride, run.org)
        coarse = x
        x = level.up(x, skip.indices if run.scene_mode else None)
        run.counts[f"generated_{stride // 2}"] = x.features.shape[0]
        if run.prune and self.training:
            x, _ = tgp.prune_children(x, coarse, logit, tgp.draw_topk(run.generator))
        # scene mode computed the children exactly at skip's rows: the join is the identity
        joined = skip.features if run.scene_mode else features_at(skip, x.indices)
        return x.replace_feature(x.features + joined), txt, n_scored

    @torch.no_grad()
    def predict(self, points: Tensor, colors: Tensor | None, text: str, **kw) -> GroundingOutput:
        """One scene, one expression, eval mode: ``out.boxes[0]`` is the grounded box."""
        was = self.training
        self.eval()
        try:
            return self(self.scene_batch(points, colors), [text], **kw)
        finally:
            self.train(was)


def voxel_centers_world(v: Voxelization, stride: int = 1) -> Tensor:
    """Centre of each base voxel in world metres (for the voxels -> points round trip)."""
    return voxel_positions(v.indices, stride, v.origin, v.voxel_size) + 0.5 * v.voxel_size
