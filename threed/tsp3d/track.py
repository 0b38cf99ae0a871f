"""The "grounding" track of ``scripts/eval_scannet.py``: TSP3D on ScanRefer-format data.

Settings:

* ``full``: the same network with ``prune=False`` (no TGP, no CBA);
* ``tsp3d``: TGP with ``--tgp-thresholds`` (default the official 0.7, 0.3) + CBA;
* ``tsp3d-nocba``: TGP only;
* ``tsp3d@R`` for each ``--ratios`` value R < 1: keep the top fraction R of the voxels at
  both TGP levels instead of thresholds (a project sweep, not in the paper);
* ``tsp3d-oracle`` (random weights only): TGP + CBA at the run-time thresholds on
  "trained-like" score fields built from the ground-truth boxes
  (:func:`threed.tsp3d.oracle.oracle_scores`), to show what pruning saves when the
  scores are good.  It reads the answer, so its accuracy fields are left empty.

Each row is one setting on one scene, averaged over its referring expressions:
Acc@0.25 / Acc@0.5 (strictly greater IoU, unique / multiple split), voxels per level
before / after pruning, time and FPS, and agreement with the unpruned run (IoU between
the pruned and unpruned top-1 boxes).  ``kept_ratio`` is the 16 cm decoder voxel count
over the unpruned run's; it can exceed 1 when the keep scores are weak, because
generative upsampling also creates voxels in empty space.  With no
``--grounding-weights`` the network has random weights (``accuracy_valid: False``)
and, for CPU speed, a 2 cm base voxel unless ``--grounding-voxel-size`` says
otherwise (official: 1 cm).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.benchmark import clock, peak_memory_mb
from common.methods import build_method
from common.runs import FULL, Progress, Setting, Track, TrackContext, option

from .losses import axis_aligned_iou
from .model import TSP3DConfig, TSP3DGrounder, make_scene_batch
from .oracle import oracle_scores
from .text import TextEncoder
from .train import load_grounder, scene_keep_centres, subsample_points

__all__ = ["GroundingOptions", "GroundingTrack", "grounding_accuracy", "parse_thresholds"]

logger = logging.getLogger(__name__)


def grounding_accuracy(
    pred: torch.Tensor, gt: torch.Tensor, unique: list[bool] | None = None
) -> dict[str, float]:
    """Top-1 grounding accuracy: IoU(pred, gt) strictly > 0.25 / 0.5.

    pred, gt [Q, 6] (cx, cy, cz, dx, dy, dz); unique [Q] ScanRefer split flags.
    Returns ``acc@0.25``, ``acc@0.5``, ``iou_mean`` and the ``unique`` / ``multiple``
    variants (NaN where the split is empty), plus ``n``.
    """
    iou = axis_aligned_iou(pred.float(), gt.float())
    out = {"n": int(iou.numel()), "iou_mean": float(iou.mean()) if iou.numel() else float("nan")}
    flags = torch.tensor(unique if unique is not None else [True] * iou.numel(), dtype=torch.bool)
    for name, sel in (("", torch.ones_like(flags)), ("_unique", flags), ("_multiple", ~flags)):
        for t in (0.25, 0.5):
            v = iou[sel]
            out[f"acc@{t}{name}"] = float((v > t).float().mean()) if v.numel() else float("nan")
    return out


def parse_thresholds(text: str | None) -> tuple[float, float]:
    """``"0.7,0.3"`` -> (0.7, 0.3): keep-prob thresholds at 64 cm and 32 cm."""
    if not text:
        return (0.7, 0.3)
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise ValueError(
            f"--tgp-thresholds: expected two numbers like 0.7,0.3, got {text!r}"
        ) from e
    if len(vals) != 2 or not all(0 <= v < 1 for v in vals):
        raise ValueError(f"--tgp-thresholds: two numbers in [0, 1), got {text!r}")
    return vals  # type: ignore[return-value]


def _object_centres(scene) -> torch.Tensor:
    """``[M, 3]`` oracle 64 cm keep centres: the same objects training supervises
    (:func:`threed.tsp3d.train.scene_keep_centres`, official rule: walls / floor /
    ceiling included, first 132 distinct instances)."""
    return torch.as_tensor(scene_keep_centres(scene), dtype=torch.float32).reshape(-1, 3)


def _thresholds_flag(text: str) -> tuple[float, float]:
    try:
        return parse_thresholds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class GroundingOptions:
    """Options of the ``grounding`` track (flags in brackets).

    Attributes:
        weights: TSP3D checkpoint from ``scripts/train_grounding.py``
            [--grounding-weights]; None = random weights (accuracy not meaningful).
        text_encoder: local path of a RoBERTa-like model [--text-encoder].
        tgp_thresholds: TGP keep-prob thresholds at 64 cm and 32 cm, each in
            [0, 1) [--tgp-thresholds] (official 0.7, 0.3).
        voxel_size: base voxel in metres [--grounding-voxel-size]; None = the
            checkpoint's, 0.02 without weights (official 0.01).
        max_queries: referring expressions per scene [--grounding-max-queries].
        points: points sampled per scene [--grounding-points] (official 50000).
    """

    weights: Path | None = field(
        default=None,
        metadata=option(
            "--grounding-weights",
            type=Path,
            help="TSP3D checkpoint from scripts/train_grounding.py (default: "
            "random weights, accuracy not meaningful)",
        ),
    )
    text_encoder: str | None = field(
        default=None,
        metadata=option(
            "--text-encoder",
            help="local path of a Hugging Face RoBERTa-like model (default: the "
            "checkpoint's, else a tiny random offline encoder)",
        ),
    )
    tgp_thresholds: tuple[float, float] = field(
        default=(0.7, 0.3),
        metadata=option(
            "--tgp-thresholds",
            type=_thresholds_flag,
            help="TGP keep-prob thresholds at 64 cm and 32 cm (default 0.7,0.3)",
        ),
    )
    voxel_size: float | None = field(
        default=None,
        metadata=option(
            "--grounding-voxel-size",
            type=float,
            help="base voxel in metres (default: checkpoint's; 0.02 without "
            "weights for CPU speed; official 0.01)",
        ),
    )
    max_queries: int = field(
        default=8,
        metadata=option(
            "--grounding-max-queries", type=int, help="referring expressions per scene (default 8)"
        ),
    )
    points: int = field(
        default=50_000,
        metadata=option(
            "--grounding-points", type=int, help="points sampled per scene (official 50000)"
        ),
    )

    def __post_init__(self) -> None:
        th = tuple(float(t) for t in self.tgp_thresholds)
        if len(th) != 2 or not all(0.0 <= t < 1.0 for t in th):
            raise ValueError(f"tgp_thresholds: two numbers in [0, 1), got {self.tgp_thresholds}")
        object.__setattr__(self, "tgp_thresholds", th)
        if self.voxel_size is not None and not (
            math.isfinite(self.voxel_size) and self.voxel_size > 0
        ):
            raise ValueError(f"voxel_size must be a positive number, got {self.voxel_size!r}")
        for name in ("max_queries", "points"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class GroundingTrack(Track):
    """TSP3D grounding with and without pruning (see the module docstring)."""

    name = "grounding"
    Options = GroundingOptions
    labels = {
        "kept_ratio": "decoder voxels at 16 cm (fraction of unpruned)",
        "voxels_kept_64": "voxels kept at 64 cm",
        "voxels_kept_32": "voxels kept at 32 cm",
        "voxels_decoder_16": "decoder voxels at 16 cm",
        "voxels_added_16": "voxels added back by CBA",
        "fps": "expressions per second",
        "time_s": "time per expression (s)",
        "agreement_iou": "IoU with the unpruned box",
        "acc@0.25": "Acc@0.25 (fraction)",
        "acc@0.5": "Acc@0.5 (fraction)",
        "acc@0.25_unique": "Acc@0.25, unique (fraction)",
        "acc@0.25_multiple": "Acc@0.25, multiple (fraction)",
        "peak_mem_mb": "peak memory above start (MB)",
    }
    empty_reasons = {
        "acc@0.25": "tsp3d-oracle reads the answer, so it has no accuracy",
        "acc@0.5": "tsp3d-oracle reads the answer, so it has no accuracy",
        "acc@0.25_unique": "no 'unique' expression, or tsp3d-oracle (reads the answer)",
        "acc@0.25_multiple": "no 'multiple' expression in these scenes, or tsp3d-oracle",
        "voxels_added_16": "CBA off (full, tsp3d-nocba)",
    }

    def __init__(self, options: GroundingOptions, context: TrackContext) -> None:
        super().__init__(options, context)
        self.device = torch.device(context.device)
        self.seed = int(context.seed)
        self.thresholds = options.tgp_thresholds
        self.max_queries = options.max_queries
        self.max_points = options.points
        self.ratios = [float(r) for r in context.ratios if float(r) < 1]
        vsize = options.voxel_size
        if options.weights is not None:
            self.model, _ = load_grounder(options.weights, options.text_encoder)
            if vsize is not None:
                self.model.config.voxel_size = float(vsize)
            self.accuracy_valid = True
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.model = TSP3DGrounder(
                    TSP3DConfig(voxel_size=vsize or 0.02),
                    TextEncoder(options.text_encoder, seed=self.seed),
                )
            self.accuracy_valid = False
        self.model.to(self.device).eval()
        self.data = context.data
        self._records: dict[str, list] = {}  # scene id -> its ScanRefer records

    # ------------------------------------------------------------------ data
    def _scene_records(self, scene) -> list:
        """The scene's ScanRefer records (first ``max_queries``).  Read per scene, so the
        unique / multiple split only needs this scene's annotations: a full ScanRefer file
        works with a partial ScanNet download."""
        if scene.scene_id not in self._records:
            from threed.scannet import load_scanrefer

            path = getattr(self.data, "scanrefer_path", None)
            if path is None:
                raise ValueError("the grounding track needs ScanRefer records (--scanrefer)")
            self._records[scene.scene_id] = load_scanrefer(
                path, getattr(self.data, "scannet_root", None), scene_ids={scene.scene_id}
            )
        return self._records[scene.scene_id][: self.max_queries]

    # Columns of the summary table (every field stays in rows.jsonl / summary.json).
    table_columns = [
        "setting",
        "num_scenes",
        "kept_ratio",
        "voxels_kept_64",
        "voxels_kept_32",
        "voxels_decoder_16",
        "voxels_added_16",
        "fps",
        "agreement_iou",
        "acc@0.25",
        "acc@0.5",
        "acc@0.25_unique",
        "acc@0.25_multiple",
    ]

    def settings(self) -> list[Setting]:
        th = {"thresholds": self.thresholds}
        out = [
            FULL,
            Setting("tsp3d", "tsp3d", th),
            Setting("tsp3d-nocba", "tsp3d", {**th, "cba": False}),
        ]
        if not self.accuracy_valid:
            out.append(Setting("tsp3d-oracle", "tsp3d-oracle", th))
        out += [
            Setting(f"tsp3d@{r:g}", "tsp3d", {"keep_ratios": (r, r)}, series="tsp3d top-k")
            for r in self.ratios
        ]
        return out

    def notes(self) -> list[str]:
        lines = [
            "kept_ratio: decoder voxels at 16 cm over the unpruned run's. It can exceed 1: "
            "generative upsampling creates children in empty space too, and with weak keep "
            "scores (random weights) TGP falls back to its top voxels, whose children can "
            "outnumber the unpruned decoder's voxels."
        ]
        if not self.accuracy_valid:
            lines.append(
                "tsp3d-oracle: TGP + CBA on trained-like scores built from the ground-truth "
                "boxes (shows what pruning saves with good scores; no accuracy)."
            )
        return lines

    @staticmethod
    def _kwargs(setting: Setting) -> dict:
        """The grounder's forward options of ``setting``, through the registered
        ``"tsp3d"`` method (its checks, its defaults)."""
        if setting.method == "full":
            return build_method("tsp3d", prune=False).forward_kwargs()
        if setting.method in ("tsp3d", "tsp3d-oracle"):
            return build_method("tsp3d", **setting.params).forward_kwargs()
        raise ValueError(f"grounding track: unknown method {setting.method!r}")

    @torch.no_grad()
    def _run(self, batch, text: str, setting: Setting, oracle: tuple | None = None):
        """One forward; ``oracle = (object_centres [M, 3], target_centre [3])`` for the
        oracle setting."""
        g = torch.Generator().manual_seed(self.seed)
        ctx = oracle_scores(self.model, *oracle) if oracle else contextlib.nullcontext()
        t0 = clock(self.device)
        with ctx:
            out = self.model(batch, [text], generator=g, **self._kwargs(setting))
        return out, clock(self.device) - t0

    # ------------------------------------------------------------------ rows
    def run_unit(
        self, scene, settings: list[Setting], progress: Progress = lambda _: None
    ) -> Iterator[dict]:
        """One row per setting on ``scene``, averaged over its referring expressions;
        the unpruned run always comes first (every row is compared with it)."""
        recs = [
            r
            for r in self._scene_records(scene)
            if any(i.object_id == r.object_id for i in scene.instances)
        ]
        if not recs:
            logger.warning("grounding: no referring expression for %s", scene.scene_id)
            return
        idx = subsample_points(scene.num_points, self.max_points, self.seed)
        pts = torch.as_tensor(scene.points[idx], dtype=torch.float32)
        cols = torch.as_tensor(scene.colors[idx], dtype=torch.float32)
        batch = make_scene_batch([pts], [cols], self.model.config.voxel_size)
        batch.indices, batch.features = (
            batch.indices.to(self.device),
            batch.features.to(self.device),
        )
        gt = torch.stack(
            [
                torch.as_tensor(np.asarray(scene.instance(r.object_id).box, dtype=np.float32))
                for r in recs
            ]
        )
        unique = [bool(r.unique) for r in recs]
        centres = _object_centres(scene)

        def run_all(setting: Setting) -> tuple[list, float | None]:
            """Every expression under ``setting``, and the peak memory above its start."""
            out: list = []

            def go() -> None:
                for i, r in enumerate(recs):
                    progress(f"{setting.label}: expression {i + 1}/{len(recs)}")
                    truth = (centres, gt[i, :3]) if setting.method == "tsp3d-oracle" else None
                    out.append(self._run(batch, r.description, setting, truth))

            return out, peak_memory_mb(go, self.device)

        progress("full: warm-up")
        self._run(batch, recs[0].description, FULL)  # warm-up (not timed)
        full, full_mem = run_all(FULL)
        full_boxes = torch.stack([o.boxes[0].cpu() for o, _ in full])
        for setting in [FULL, *[s for s in settings if s.method != "full"]]:
            if setting not in settings:
                continue
            runs, mem = (full, full_mem) if setting.method == "full" else run_all(setting)
            boxes = torch.stack([o.boxes[0].cpu() for o, _ in runs])
            acc = grounding_accuracy(boxes, gt, unique)
            times = [t for _, t in runs]
            counts = {k: float(np.mean([o.counts[k] for o, _ in runs])) for k in runs[0][0].counts}
            full_16 = float(np.mean([o.counts["decoder_16"] for o, _ in full]))
            agree = axis_aligned_iou(boxes, full_boxes)
            row = {
                "setting": setting.label,
                "method": setting.method,
                "kept_ratio": counts["decoder_16"] / max(full_16, 1.0),
                "accuracy_valid": self.accuracy_valid,
                "num_queries": len(recs),
                "acc@0.25": acc["acc@0.25"],
                "acc@0.5": acc["acc@0.5"],
                "acc@0.25_unique": acc["acc@0.25_unique"],
                "acc@0.5_unique": acc["acc@0.5_unique"],
                "acc@0.25_multiple": acc["acc@0.25_multiple"],
                "acc@0.5_multiple": acc["acc@0.5_multiple"],
                "iou_mean": acc["iou_mean"],
                "time_s": float(np.mean(times)),
                "fps": 1.0 / max(float(np.mean(times)), 1e-9),
                "voxels_kept": counts["decoder_16"],
                "agreement_iou": float(agree.mean()),
                "agreement@0.5": float((agree > 0.5).float().mean()),
                "voxel_size_m": self.model.config.voxel_size,
                **{f"voxels_{k}": v for k, v in counts.items()},
            }
            if setting.method == "tsp3d-oracle":  # its scores read the answer: no accuracy
                for k in [k for k in row if k.startswith("acc@") or k == "iou_mean"]:
                    row[k] = None
            if mem is not None:  # peak above the start of this setting's runs
                row["peak_mem_mb"] = mem
            yield row

    # ------------------------------------------------------------------ picture
    def visualize(self, scene, out_dir: Path) -> list[Path]:
        """Top view of the scene points with the voxels TSP3D keeps (first expression);
        with random weights a second panel shows the oracle (trained-like) scores."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self._scene_records(scene)
        if not recs:
            return []
        r = recs[0]
        idx = subsample_points(scene.num_points, self.max_points, self.seed)
        pts = torch.as_tensor(scene.points[idx], dtype=torch.float32)
        cols = torch.as_tensor(scene.colors[idx], dtype=torch.float32)
        batch = make_scene_batch([pts], [cols], self.model.config.voxel_size)
        panels = [(self.settings()[1], None)]
        if not self.accuracy_valid:
            centres = _object_centres(scene)
            target = torch.as_tensor(np.asarray(scene.instance(r.object_id).box[:3]))
            oracle_setting = Setting(
                "tsp3d-oracle", "tsp3d-oracle", {"thresholds": self.thresholds}
            )
            panels.append((oracle_setting, (centres, target.float())))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6), squeeze=False)
        for ax, (setting, oracle) in zip(axes[0], panels):
            out, _ = self._run(batch, r.description, setting, oracle)
            self._draw(ax, scene, r, pts, out, setting.label)
        fig.suptitle(f"{scene.scene_id}: {r.description[:80]}", fontsize=9)
        fig.tight_layout()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"grounding_{scene.scene_id}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]

    def _draw(self, ax, scene, record, pts, out, setting: str) -> None:
        from matplotlib.patches import Rectangle

        cfg = self.model.config
        ax.scatter(pts[::5, 0], pts[::5, 1], s=0.2, c="0.75", label="scene points")
        k32 = out.kept_positions[32].cpu()
        ax.scatter(
            k32[:, 0],
            k32[:, 1],
            s=6,
            c="tab:blue",
            alpha=0.3,
            label=f"kept @{cfg.level_cm(32):g} cm",
        )
        p16 = out.positions.cpu()
        ax.scatter(
            p16[:, 0],
            p16[:, 1],
            s=2,
            c="tab:orange",
            label=f"decoder voxels @{cfg.level_cm(16):g} cm",
        )
        n_added = out.counts.get("added_16", 0)
        if n_added:
            ax.scatter(
                p16[-n_added:, 0], p16[-n_added:, 1], s=4, c="tab:green", label="added by CBA"
            )
        for box, color, lab in (
            (scene.instance(record.object_id).box, "red", "target"),
            (out.boxes[0].cpu().numpy(), "black", "prediction"),
        ):
            ax.add_patch(
                Rectangle(
                    (box[0] - box[3] / 2, box[1] - box[4] / 2),
                    box[3],
                    box[4],
                    fill=False,
                    ec=color,
                    lw=2,
                    label=lab,
                )
            )
        ax.set_aspect("equal")
        weights = "trained weights" if self.accuracy_valid else "random weights"
        if setting == "tsp3d-oracle":
            weights = "oracle scores from the GT boxes"
        ax.set_title(f"{setting} ({weights}): {len(p16)} decoder voxels", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
