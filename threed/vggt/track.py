"""``eval_scannet`` track "vggt": VGGT with and without FastVGGT token merging.

Without ``--vggt-weights`` a small random VGGT (seeded with ``--seed``) runs
on the scene's frames: the rows report cost (aggregator time, peak memory,
tokens kept, attention share) and merged-vs-unmerged agreement (depth
abs-rel difference, pose differences), with ``"accuracy_valid": False``
(accuracy figures are still computed so the pipeline is exercised, but they
mean nothing for random weights). With weights (facebook/VGGT-1B
``model.pt``) the rows also carry Chamfer distance, ATE / ARE / RPE and pose
AUC@30 against the scene's ground truth, with ``"accuracy_valid": True``.

Frames: 32 per scene by default, for the small model too. FastVGGT only
shortens global attention, whose cost grows with the square of the token
count; at 8 frames (1576 tokens) the merged aggregator was no faster than the
full one on a CPU (matching and unmerging cost as much as they save), at 32
frames (6304 tokens) it took 0.56-0.84 of the full time (see
``DEFAULT_FRAMES``). On a CPU ``aggregator_time_s`` is the fastest of
``--vggt-timing-repeats`` warm runs, so the ratio survives a busy machine.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.benchmark import clock, peak_memory_mb
from common.runs import FULL, Progress, Setting, Track, TrackContext, option

from .geometry import closed_form_inverse_se3, pose_encoding_to_extri_intri
from .merging import TokenMerging, attention_share
from .metrics import fastvggt_chamfer, pose_auc, rotation_angle_deg, trajectory_metrics
from .model import VGGT, VGGTConfig
from .preprocess import preprocess_images

log = logging.getLogger(__name__)

__all__ = ["VGGTOptions", "VGGTTrack", "default_merge_ratios", "small_track_config"]


# Measured on the generated scenes (small random model, 224 px, one thread, a busy 2-core
# machine): merged / full aggregator time 0.96-1.14 at 8 frames, 0.47-0.87 at 16,
# 0.56-0.81 at 32 (fastvggt@0.5 and @0.9, one warm run each, two repeats); with the
# fastest of 3 warm runs: 1.05 / 1.47 at 8 frames, 0.84 / 0.70 at 32.
DEFAULT_FRAMES = 32


def small_track_config() -> VGGTConfig:
    """The random CPU model of the no-weights mode: ``VGGTConfig.small("eval")``."""
    return VGGTConfig.small("eval")


def default_merge_ratios(kept_ratios: list[float] | None) -> list[float]:
    """Merge ratios swept by default: FastVGGT's 0.9 plus ``1 - r`` for each kept ratio r."""
    out = {0.9}
    for r in kept_ratios or []:
        m = round(1.0 - float(r), 4)
        if 0.0 < m < 1.0:
            out.add(m)
    return sorted(out)


def _parse_merge_ratios(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--merge-ratio: expected numbers, got {text!r}") from e
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"--merge-ratio: each must be in [0, 1], got {text!r}")
    return vals


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class VGGTOptions:
    """Options of the ``vggt`` track (flags in brackets).

    Attributes:
        weights: facebook/VGGT-1B ``model.pt`` [--vggt-weights]; None = random model.
        frames: frames per scene [--frames]; None = ``DEFAULT_FRAMES`` (32).
        merge_ratios: FastVGGT merge ratios [--merge-ratio]; None = 0.9 and
            ``1 - r`` for each kept ratio ``r`` of the run.
        timing_repeats: warm aggregator runs per setting on a CPU
            [--vggt-timing-repeats]; ``aggregator_time_s`` is the fastest (the least
            disturbed by other processes), so merged / full stays readable on a busy
            machine.
        size: model size without weights [--vggt-size]: small or large (VGGT-1B).
    """

    weights: Path | None = field(
        default=None,
        metadata=option(
            "--vggt-weights",
            type=Path,
            help="facebook/VGGT-1B model.pt (default: small random model)",
        ),
    )
    frames: int | None = field(
        default=None,
        metadata=option("--frames", type=int, help=f"frames per scene (default: {DEFAULT_FRAMES})"),
    )
    merge_ratios: tuple[float, ...] | None = field(
        default=None,
        metadata=option(
            "--merge-ratio",
            type=_parse_merge_ratios,
            help="comma-separated merge ratios (default: 0.9 and 1 - each --ratios)",
        ),
    )
    timing_repeats: int = field(
        default=3,
        metadata=option(
            "--vggt-timing-repeats",
            type=int,
            help="warm aggregator runs per setting on a CPU; the fastest is reported (default: 3)",
        ),
    )
    size: str | None = field(
        default=None,
        metadata=option(
            "--vggt-size",
            choices=["small", "large"],
            help="model size without weights (default: small; large = VGGT-1B)",
        ),
    )

    def __post_init__(self) -> None:
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            raise ValueError(f"frames must be an int >= 1, got {self.frames!r}")
        if self.merge_ratios is not None:
            ratios = tuple(float(r) for r in self.merge_ratios)
            if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
                raise ValueError(f"merge_ratios: each must be in [0, 1], got {self.merge_ratios}")
            object.__setattr__(self, "merge_ratios", ratios)
        if not isinstance(self.timing_repeats, int) or self.timing_repeats < 1:
            raise ValueError(f"timing_repeats must be an int >= 1, got {self.timing_repeats!r}")
        if self.size not in (None, "small", "large"):
            raise ValueError(f"size must be 'small' or 'large', got {self.size!r}")


class VGGTTrack(Track):
    """VGGT / FastVGGT track (see module doc). Settings: ``full`` and ``fastvggt@<merge ratio>``."""

    name = "vggt"
    Options = VGGTOptions
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
    labels = {
        "kept_ratio": "tokens kept in global attention (fraction of all)",
        "tokens_kept": "tokens kept in global attention",
        "attention_share": "global attention cost (fraction of unmerged)",
        "aggregator_time_s": "aggregator time per scene, fastest warm run (s)",
        "time_s": "forward time per scene (s)",
        "peak_mem_mb": "peak memory above start (MB)",
        "depth_absrel_vs_full": "depth difference to unmerged (mean abs. rel.)",
        "pose_rot_diff_deg_vs_full": "camera rotation difference to unmerged (degrees)",
        "pose_trans_diff_vs_full": "camera translation difference to unmerged",
        "chamfer": "Chamfer distance to the scene mesh (m)",
        "ate": "absolute trajectory error (m)",
        "are": "absolute rotation error (degrees)",
        "auc30": "pose AUC@30 (0-1)",
    }
    empty_reasons = {
        "chamfer": "no predicted depth passes the confidence filter, as with random weights, "
        "or open3d is missing",
        "peak_mem_mb": "peak memory is measured on CUDA only",
    }

    def __init__(self, options: VGGTOptions, context: TrackContext) -> None:
        super().__init__(options, context)
        self.device = torch.device(context.device)
        weights = options.weights
        size = options.size or ("large" if weights else "small")
        self.size = size
        if weights:
            self.model = VGGT.from_checkpoint(weights)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(context.seed)
                cfg = small_track_config() if size == "small" else VGGTConfig()
                self.model = VGGT(cfg)
        self.model = self.model.to(self.device).eval()
        self.accuracy_valid = bool(weights)
        self.image_width = 518 if (weights or size == "large") else self.model.config.img_size
        self.num_frames = options.frames or DEFAULT_FRAMES
        self.timing_repeats = options.timing_repeats
        self.merge_ratios = list(options.merge_ratios or default_merge_ratios(context.ratios))

    def settings(self) -> list[Setting]:
        merged = [
            Setting(f"fastvggt@{m:g}", "fastvggt", {"ratio": m}, series="fastvggt")
            for m in self.merge_ratios
        ]
        return [FULL, *merged]

    def notes(self) -> list[str]:
        return [
            "kept_ratio: tokens that keep their own row in global attention. FastVGGT's "
            "dst set (all of frame 0, the special tokens and one token per 2x2 cell of "
            "every other frame) never merges, so merge ratios above about 0.75 give the "
            "same rows: every unprotected src token is merged already."
        ]

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

        def pre(*_):
            marks["start"] = clock(self.device)

        def post(*_):
            marks["end"] = clock(self.device)

        h1 = agg.register_forward_pre_hook(pre)
        h2 = agg.register_forward_hook(post)
        try:
            t0 = clock(self.device)
            with torch.inference_mode():
                out = self.model(images)
            total = clock(self.device) - t0
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
        agg = [timed["agg"]]
        if self.device.type == "cpu":  # CPU timings move with the machine's load
            agg += [self._aggregator_seconds(images) for _ in range(self.timing_repeats - 1)]
        return out, min(agg), timed["total"], mem

    def _aggregator_seconds(self, images: torch.Tensor) -> float:
        """One more warm aggregator pass alone (CPU), in seconds."""
        x = images[None] if images.ndim == 4 else images
        t0 = clock(self.device)
        with torch.inference_mode():
            self.model.aggregator(x, keep_layers=self.model.kept_layers)
        return clock(self.device) - t0

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
    def run_unit(
        self, scene, settings: list[Setting], progress: Progress = lambda _: None
    ) -> Iterator[dict]:
        """One row per setting on ``scene``; the unmerged forward always runs first
        (every row is compared with it)."""
        progress(f"loading {self.num_frames} frames")
        frames, images = self._inputs(scene)
        hw = tuple(images.shape[-2:])
        progress(f"full: {len(frames)} frames")
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
            if setting.method == "full":
                out, a_t, t_t, mem = full, agg_t, tot_t, full_mem
                kept, share = 1.0, 1.0
            elif setting.method == "fastvggt":
                progress(f"{setting.label}: {len(frames)} frames")
                with setting.build().apply(self.model) as handle:
                    out, a_t, t_t, mem = self._measured_forward(images)
                    kept, share = handle.kept_ratio, attention_share(handle)
            else:
                raise ValueError(f"vggt track: unknown method {setting.method!r}")
            extr, _ = pose_encoding_to_extri_intri(out["pose_enc"][0].float(), hw)
            d_full, d = full["depth"].float(), out["depth"].float()
            row = {
                **base,
                "setting": setting.label,
                "method": setting.method,
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
