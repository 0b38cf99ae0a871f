"""Training loop for the TSP3D grounder over ScanRefer-format data.

AdamW (official: lr 5e-4, weight decay 5e-4, gradient clipping max-norm 0.1, step
decay x0.1), linear warm-up, checkpoint save + resume, tqdm progress bar.
The official data pipeline (augmentation, the text parser's anchor objects) is not
reproduced: the 32 cm keep targets use the target object only, and no augmentation is
applied.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoints import CheckpointError, missing_keys_message, read_checkpoint
from .losses import grounding_loss
from .model import TSP3DConfig, TSP3DGrounder, make_scene_batch
from .text import TextEncoder

__all__ = [
    "TrainConfig",
    "GroundingSample",
    "samples_from_scanrefer",
    "sample_from_scene",
    "scene_keep_centres",
    "MAX_SCENE_OBJECTS",
    "subsample_points",
    "save_checkpoint",
    "load_grounder",
    "read_grounder_checkpoint",
    "load_model_state",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the official ScanRefer recipe, per step)."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 5e-4
    weight_decay: float = 5e-4
    clip_norm: float = 0.1
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()
    decay_rate: float = 0.1
    seed: int = 0
    save_every: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")


@dataclass
class GroundingSample:
    """One referring expression: points [N, 3], colors [N, 3], target_box [6] (cx..dz),
    scene_centers [M, 3] (all objects), target_centers [K, 3] (target (+ anchor))."""

    scene_id: str
    text: str
    points: Tensor
    colors: Tensor
    target_box: Tensor
    scene_centers: Tensor
    target_centers: Tensor
    unique: bool = True
    object_id: int = -1
    extra: dict = field(default_factory=dict)


def subsample_points(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` points (seeded; official 50k)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_points, replace=False))


MAX_SCENE_OBJECTS = 132  # official MAX_NUM_OBJ (src/joint_det_dataset.py)
SCENE_OBJECT_MODES = ("official", "no_structure")


def scene_keep_centres(
    scene,
    mode: str = "official",
    max_objects: int = MAX_SCENE_OBJECTS,
    object_labels: set[str] | None = None,
) -> np.ndarray:
    """``[M, 3]`` centres of the objects whose cubes are the 64 cm keep targets.

    ``mode="official"`` (official ``_get_scene_objects``): every annotated instance in
    the aggregation's order, walls, floor and ceiling included, duplicates (the same
    point set) dropped, the first ``max_objects`` (132) of them, then those whose label
    is in ``object_labels`` (the official class list: its 485 ScanNet classes, which
    include the structure; ``None`` keeps every label). ``mode="no_structure"`` is the
    project's earlier rule: :meth:`Scene.objects` (walls, floor and ceiling left out),
    uncapped. Centres are those of the instance boxes over all mesh vertices.
    """
    if mode not in SCENE_OBJECT_MODES:
        raise ValueError(f"mode must be one of {SCENE_OBJECT_MODES}, got {mode!r}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if mode == "no_structure":
        objs = scene.objects()
    else:
        objs, seen = [], set()
        for inst in scene.instances:
            key = np.sort(np.asarray(inst.point_idx)).tobytes()
            if key in seen:  # official Scan drops duplicate boxes (identical point sets)
                continue
            seen.add(key)
            objs.append(inst)
        objs = objs[:max_objects]
        if object_labels is not None:
            allowed = {lab.lower() for lab in object_labels}
            objs = [o for o in objs if o.label.lower() in allowed]
    return np.stack([o.box[:3] for o in objs]) if objs else np.zeros((0, 3))


def sample_from_scene(
    scene,
    record,
    max_points: int = 50_000,
    seed: int = 0,
    scene_objects: str = "official",
    object_labels: set[str] | None = None,
) -> GroundingSample:
    """Build a :class:`GroundingSample` from a ``threed.scannet`` Scene + ReferRecord.

    ``scene_objects`` / ``object_labels``: which objects give the 64 cm keep targets
    (:func:`scene_keep_centres`; default the official rule, walls / floor included).
    """
    idx = subsample_points(scene.num_points, max_points, seed)
    inst = scene.instance(record.object_id)
    centers = scene_keep_centres(scene, scene_objects, object_labels=object_labels)
    box = torch.as_tensor(np.asarray(inst.box, dtype=np.float32))
    return GroundingSample(
        scene.scene_id,
        record.description,
        torch.as_tensor(scene.points[idx], dtype=torch.float32),
        torch.as_tensor(scene.colors[idx], dtype=torch.float32),
        box,
        torch.as_tensor(centers, dtype=torch.float32),
        box[None, :3].clone(),
        bool(record.unique),
        int(record.object_id),
    )


def samples_from_scanrefer(
    scanrefer_path,
    scannet_root,
    scene_ids=None,
    max_points: int = 50_000,
    seed: int = 0,
    scene_objects: str = "official",
    object_labels: set[str] | None = None,
) -> list[GroundingSample]:
    """All ScanRefer records of the given scenes as training samples (``scene_objects``,
    ``object_labels``: the 64 cm keep targets, see :func:`scene_keep_centres`)."""
    if scene_objects not in SCENE_OBJECT_MODES:
        raise ValueError(
            f"scene_objects must be one of {SCENE_OBJECT_MODES}, got {scene_objects!r}"
        )
    from threed.scannet import load_scanrefer, load_scene

    recs = load_scanrefer(
        scanrefer_path, scannet_root, scene_ids=set(scene_ids) if scene_ids else None
    )
    scenes, out = {}, []
    for r in recs:
        if r.scene_id not in scenes:
            scenes[r.scene_id] = load_scene(r.scene_id, scannet_root)
        try:
            out.append(
                sample_from_scene(
                    scenes[r.scene_id], r, max_points, seed, scene_objects, object_labels
                )
            )
        except KeyError:
            logger.warning("skipping %s object %d: not in the scene", r.scene_id, r.object_id)
    return out


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
        return warm * cfg.decay_rate ** sum(step >= s for s in cfg.decay_steps)

    return f


def save_checkpoint(
    path: Path,
    model: TSP3DGrounder,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    text_encoder_path: str | None = None,
) -> None:
    """Write model (without the frozen text encoder's weights), config, optimiser,
    scheduler and step; atomically (tmp file + rename)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    ckpt = {
        "model": state,
        "config": asdict(model.config),
        "step": step,
        "text_encoder": text_encoder_path or getattr(model.text_encoder, "path", None),
        "text_encoder_seed": int(getattr(model.text_encoder, "seed", 0)),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def read_grounder_checkpoint(path, map_location="cpu") -> dict:
    """A :func:`save_checkpoint` file as a dict, read with ``weights_only=True``.

    ``FileNotFoundError`` for a missing path; :class:`~threed.checkpoints.CheckpointError`
    (a ``ValueError``) for a file that is not such a checkpoint, naming what is missing.
    """
    ckpt = read_checkpoint(path, map_location, "TSP3D checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a TSP3D checkpoint: it holds a {type(ckpt).__name__}")
    missing = [k for k in ("model", "config", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(missing_keys_message(path, "TSP3D", missing, list(ckpt)))
    return ckpt


def load_model_state(model: TSP3DGrounder, state: dict, path) -> None:
    """Load a checkpoint's weights into ``model``; the frozen text encoder's weights are
    not stored (they come from its path or seed) and every other key must match."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def load_grounder(
    path, text_encoder: str | None = None, map_location="cpu"
) -> tuple[TSP3DGrounder, dict]:
    """Rebuild a grounder from :func:`save_checkpoint` output; returns (model, checkpoint).

    ``text_encoder`` overrides the encoder path stored in the checkpoint.
    """
    ckpt = read_grounder_checkpoint(path, map_location)
    cfg = TSP3DConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    )
    enc = TextEncoder(
        text_encoder or ckpt.get("text_encoder"), seed=int(ckpt.get("text_encoder_seed", 0))
    )
    model = TSP3DGrounder(cfg, enc)
    load_model_state(model, ckpt["model"], path)
    return model, ckpt


def train(
    model: TSP3DGrounder,
    samples: list[GroundingSample],
    cfg: TrainConfig,
    out_dir: Path | None = None,
    resume: bool = True,
    text_encoder_path: str | None = None,
) -> list[dict]:
    """Train ``model`` on ``samples`` for ``cfg.steps`` steps; returns per-step loss dicts.

    With ``out_dir``, saves ``last.pt`` every ``save_every`` steps and at the end, and
    resumes from it when ``resume`` (model, optimiser, scheduler, step; the sample order
    and the pruning generator are re-derived from the seed and the step).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not samples:
        raise ValueError("samples must not be empty")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    start = 0
    ckpt_path = Path(out_dir) / "last.pt" if out_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        ck = read_grounder_checkpoint(ckpt_path)
        load_model_state(model, ck["model"], ckpt_path)
        if ck.get("optimizer") is None or ck.get("scheduler") is None:
            raise CheckpointError(
                f"{ckpt_path} holds no optimiser / scheduler state, so training cannot resume "
                "from it (start a fresh run: resume=False, or another output folder)"
            )
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["step"])
        logger.info("resumed from %s at step %d", ckpt_path, start)
    model.train()
    dev = next(model.parameters()).device
    # fork the RNG of the device dropout runs on, so the caller's stream is left untouched
    rng_devices = []
    if dev.type == "cuda":
        rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    history = []
    # the bar counts every step of the run: a resume at 100 of 200 shows 100/200
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc="train")
    with bar, logging_redirect_tqdm():  # log lines go above the bar, not through it
        for step in range(start, cfg.steps):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            pick = torch.randint(len(samples), (cfg.batch_size,), generator=g).tolist()
            batch = [samples[i] for i in pick]
            sb = make_scene_batch(
                [s.points for s in batch], [s.colors for s in batch], model.config.voxel_size
            )
            with torch.random.fork_rng(devices=rng_devices):  # dropout: seeded per step
                torch.manual_seed(cfg.seed * 1_000_003 + step)
                out = model(sb, [s.text for s in batch], prune=True, generator=g)
            losses = grounding_loss(
                out,
                torch.stack([s.target_box for s in batch]),
                [s.scene_centers for s in batch],
                [s.target_centers for s in batch],
                model.config,
            )
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            opt.step()
            sched.step()
            rec = {k: float(v.detach()) for k, v in losses.items()}
            rec.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(gnorm))
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {rec}")
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            bar.update(1)
            if ckpt_path is not None and (
                (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps
            ):
                save_checkpoint(ckpt_path, model, opt, sched, step + 1, text_encoder_path)
    return history
