"""``eval_scannet`` track "vggt": VGGT with and without FastVGGT token merging.

Without ``--vggt-weights`` a small random VGGT (seeded with ``--seed``) runs
on the scene's frames: the rows report cost (aggregator time, peak memory,
tokens kept, attention share) and merged-vs-unmerged agreement (depth
abs-rel difference, pose differences), with ``"accuracy_valid": False``
(accuracy figures are still computed so the pipeline is exercised, but they
mean nothing for random weights). With weights (facebook/VGGT-1B
``model.pt``) the rows also carry Chamfer distance, ATE / ARE / RPE and pose
AUC@30 against the scene's ground truth, with ``"accuracy_valid": True``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.benchmark import peak_memory_mb

from .geometry import closed_form_inverse_se3, pose_encoding_to_extri_intri
from .merging import TokenMerging, attention_share
from .metrics import fastvggt_chamfer, pose_auc, rotation_angle_deg, trajectory_metrics
from .model import VGGT, VGGTConfig
from .preprocess import preprocess_images

log = logging.getLogger(__name__)

__all__ = ["VGGTTrack", "small_track_config", "default_merge_ratios"]


def small_track_config() -> VGGTConfig:
    """The random CPU model of the no-weights mode (embed 128, 4+4 blocks, 224 px)."""
    return VGGTConfig(
        img_size=224,
        embed_dim=128,
        depth=4,
        num_heads=4,
        patch_embed_depth=2,
        patch_embed_heads=4,
        camera_trunk_depth=1,
        camera_heads=4,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
    )


def default_merge_ratios(kept_ratios: list[float] | None) -> list[float]:
    """Merge ratios swept by default: FastVGGT's 0.9 plus ``1 - r`` for each kept ratio r."""
    out = {0.9}
    for r in kept_ratios or []:
        m = round(1.0 - float(r), 4)
        if 0.0 < m < 1.0:
            out.add(m)
    return sorted(out)


def _parse_merge_ratios(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--merge-ratio: expected numbers, got {text!r}") from e
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"--merge-ratio: each must be in [0, 1], got {text!r}")
    return vals


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class VGGTTrack:
    """VGGT / FastVGGT track (see module doc). Settings: ``full`` and ``fastvggt@<merge ratio>``."""

    name = "vggt"
    # Columns of the summary table (every field stays in rows.jsonl / summary.json).
    table_columns = [
        "setting",
        "num_scenes",
        "kept_ratio",
        "tokens_kept",
        "attention_share",
        "aggregator_time_s",
        "peak_mem_mb",
        "depth_absrel_vs_full",
        "pose_rot_diff_deg_vs_full",
        "chamfer",
        "ate",
        "are",
        "auc30",
    ]

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument(
            "--vggt-weights",
            type=Path,
            default=None,
            help="facebook/VGGT-1B model.pt (default: small random model)",
        )
        parser.add_argument(
            "--frames",
            dest="vggt_frames",
            type=int,
            default=None,
            help="frames per scene (default: 8 small, 32 large)",
        )
        parser.add_argument(
            "--merge-ratio",
            dest="vggt_merge_ratios",
            type=_parse_merge_ratios,
            default=None,
            help="comma-separated merge ratios (default: 0.9 and 1 - each --ratios)",
        )
        parser.add_argument(
            "--vggt-size",
            choices=["small", "large"],
            default=None,
            help="model size without weights (default: small; large = VGGT-1B)",
        )

    def __init__(self, args: argparse.Namespace, data=None) -> None:
        self.args = args
        self.device = torch.device(getattr(args, "device", "cpu") or "cpu")
        weights = getattr(args, "vggt_weights", None)
        size = getattr(args, "vggt_size", None) or ("large" if weights else "small")
        self.size = size
        if weights:
            self.model = VGGT.from_checkpoint(weights)
        else:
            torch.manual_seed(int(getattr(args, "seed", 0) or 0))
            cfg = small_track_config() if size == "small" else VGGTConfig()
            self.model = VGGT(cfg)
        self.model = self.model.to(self.device).eval()
        self.accuracy_valid = bool(weights)
        self.image_width = 518 if (weights or size == "large") else self.model.config.img_size
        frames = getattr(args, "vggt_frames", None)
        self.num_frames = int(frames) if frames else (8 if size == "small" else 32)
        ratios = getattr(args, "vggt_merge_ratios", None)
        self.merge_ratios = ratios or default_merge_ratios(getattr(args, "ratios", None))

    def settings(self) -> list[str]:
        return ["full"] + [f"fastvggt@{m:g}" for m in self.merge_ratios]

    # ------------------------------------------------------------------ helpers
    def _inputs(self, scene, max_frames: int | None = None):
        frames = scene.frames(max_frames=max_frames or self.num_frames)
        if not frames:
            raise ValueError(f"scene {scene.scene_id} has no posed frames")
        images = preprocess_images([f.rgb for f in frames], target=self.image_width)
        return frames, images.to(self.device)

    def _timed_forward(self, images: torch.Tensor):
        agg = self.model.aggregator
        marks: dict[str, float] = {}

        def sync():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def pre(*_):
            sync()
            marks["start"] = time.perf_counter()

        def post(*_):
            sync()
            marks["end"] = time.perf_counter()

        h1 = agg.register_forward_pre_hook(pre)
        h2 = agg.register_forward_hook(post)
        try:
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(images)
            sync()
            total = time.perf_counter() - t0
        finally:
            h1.remove()
            h2.remove()
        return out, marks["end"] - marks["start"], total

    def _measured_forward(self, images: torch.Tensor):
        """``(out, aggregator_s, total_s, peak_mem_mb)``: a first forward gives the
        outputs and warms up (on CUDA the very first call also pays for lazy
        initialisation); the timings come from a second, warm forward, run under
        :func:`peak_memory_mb`, so every setting is timed the same way."""
        out, _, _ = self._timed_forward(images)
        timed: dict[str, float] = {}

        def warm():
            _, timed["agg"], timed["total"] = self._timed_forward(images)

        mem = peak_memory_mb(warm, self.device)
        return out, timed["agg"], timed["total"], mem

    def _accuracy(self, scene, frames, out, hw) -> dict:
        extr, intr = pose_encoding_to_extri_intri(out["pose_enc"][0].float(), hw)
        extr, intr = extr.cpu().double().numpy(), intr.cpu().double().numpy()
        gt_c2w = np.stack([f.pose for f in frames])
        gt_rel = np.linalg.inv(gt_c2w[0]) @ gt_c2w  # first camera = world, like VGGT
        gt_w2c = closed_form_inverse_se3(gt_rel)
        pred_w2c = np.tile(np.eye(4), (len(frames), 1, 1))
        pred_w2c[:, :3, :] = extr
        row = {}
        # official convention: trajectories of world-to-camera matrices
        row.update(trajectory_metrics(pred_w2c, gt_w2c))
        row["auc30"] = pose_auc(pred_w2c, gt_w2c, 30)
        try:
            cd = fastvggt_chamfer(
                out["depth"][0].float().cpu().numpy(),
                out["depth_conf"][0].float().cpu().numpy(),
                extr,
                intr,
                gt_c2w[0],
                np.asarray(scene.points),
            )
        except ImportError:
            cd = float("nan")
        row["chamfer"] = cd
        return {k: _finite(v) for k, v in row.items()}

    # ------------------------------------------------------------------ track API
    def run_scene(self, scene, settings: list[str]) -> Iterator[dict]:
        frames, images = self._inputs(scene)
        hw = tuple(images.shape[-2:])
        full, agg_t, tot_t, full_mem = self._measured_forward(images)
        base = {
            "num_frames": len(frames),
            "image_hw": list(hw),
            "model": "VGGT-1B" if self.accuracy_valid else f"random-{self.size}",
            "accuracy_valid": self.accuracy_valid,
        }
        tokens = len(frames) * (
            self.model.aggregator.patch_start_idx
            + (hw[0] // self.model.config.patch_size) * (hw[1] // self.model.config.patch_size)
        )
        ref_extr, _ = pose_encoding_to_extri_intri(full["pose_enc"][0].float(), hw)
        for setting in settings:
            if setting == "full":
                out, a_t, t_t, mem = full, agg_t, tot_t, full_mem
                kept, share = 1.0, 1.0
            elif setting.startswith("fastvggt@"):
                ratio = float(setting.split("@", 1)[1])
                with TokenMerging(ratio=ratio).apply(self.model) as handle:
                    out, a_t, t_t, mem = self._measured_forward(images)
                    kept, share = handle.kept_ratio, attention_share(handle)
            else:
                raise ValueError(f"unknown vggt setting {setting!r}")
            extr, _ = pose_encoding_to_extri_intri(out["pose_enc"][0].float(), hw)
            d_full, d = full["depth"].float(), out["depth"].float()
            row = {
                **base,
                "setting": setting,
                "method": "full" if setting == "full" else "fastvggt",
                "kept_ratio": float(kept),
                "tokens_kept": int(round(kept * tokens)),
                "tokens_total": tokens,
                "attention_share": float(share),
                "time_s": float(t_t),
                "aggregator_time_s": float(a_t),
                "peak_mem_mb": None if mem is None else float(mem),
                "depth_absrel_vs_full": float(((d - d_full).abs() / d_full.clamp_min(1e-6)).mean()),
                "pose_trans_diff_vs_full": float(
                    (extr[:, :3, 3] - ref_extr[:, :3, 3]).norm(dim=-1).mean()
                ),
                "pose_rot_diff_deg_vs_full": float(
                    np.mean(
                        rotation_angle_deg(
                            ref_extr[:, :3, :3].cpu().double().numpy(),
                            extr[:, :3, :3].cpu().double().numpy(),
                        )
                    )
                ),
            }
            row.update(self._accuracy(scene, frames, out, hw))
            yield row

    def visualize(self, scene, out_dir: Path) -> list[Path]:
        """PNG of which patch tokens of up to 4 frames merged in the first global block."""
        import matplotlib  # lazy

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frames, images = self._inputs(scene, max_frames=min(4, self.num_frames))
        with TokenMerging(ratio=max(self.merge_ratios)).apply(self.model) as handle:
            with torch.inference_mode():
                self.model(images)
            plan = handle.last_plan
        s, _, h, w = images.shape
        p = self.model.config.patch_size
        gh, gw = h // p, w // p
        psi = self.model.aggregator.patch_start_idx
        fig, axes = plt.subplots(1, s, figsize=(3.2 * s, 3.2 * h / w + 0.6), squeeze=False)
        for i in range(s):
            ax = axes[0, i]
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
            if plan is not None:
                m = plan.merge
                tgt = m.keep_idx[0][m.dst_of[0]].cpu()
                start = i * (psi + gh * gw) + psi
                idx = torch.arange(start, start + gh * gw)
                merged = (tgt[idx] != idx).reshape(gh, gw).numpy()
                overlay = np.zeros((gh, gw, 4))
                overlay[merged] = (0.0, 0.0, 0.0, 0.6)
                ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
                ax.set_title(f"frame {frames[i].frame_id}: {merged.mean():.0%} merged", fontsize=8)
            ax.axis("off")
        fig.suptitle(
            f"{scene.scene_id}: dark = patch merged into another token (FastVGGT)", fontsize=9
        )
        path = out_dir / f"vggt_merged_{scene.scene_id}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        return [path]
