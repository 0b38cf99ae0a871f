"""``eval_scannet`` track "llava3d": LLaVA-3D spatial tokens gated by AdaGate.

Each scene's posed RGB-D frames become LLaVA-3D spatial tokens
(:mod:`threed.llava3d.spatial`); ScanQA and SQA3D questions about the scene
are answered with and without gating, and every row reports, per setting and
scene (averaged over its questions): spatial tokens, spatial tokens left at
the last layer, prefill FLOPs (analytic, :mod:`common.flops`, over the
lengths every decoder layer really saw), prefill time, agreement of the
generated answers with the ungated run, and EM@1 (plus CIDEr / BLEU-4 /
METEOR / ROUGE-L where ``pycocoevalcap`` is installed).

Settings: ``full``; ``adagate`` (schedule, ``--adagate-keep`` of the original
span at ``--adagate-layers``); ``adagate-adaptive`` (``--adagate-mass``);
``adagate-profile`` (the ``--adagate-profile`` schedule, or one calibrated on
the scene's own first two questions for the FLOPs target 0.37 when no
profile is given); ``fastv`` (FastV at layer 2 with the keep ratio whose
analytic prefill FLOPs equal the ``adagate`` schedule's on the scene's first
question).

Without ``--llava3d-model`` (the embedded default) the model is tiny and
random, built offline from configs: a 2-layer ``CLIPVisionModel`` (336 px,
14 px patches, width 32) gives the patch features (LLaVA's second-to-last
layer, class token dropped), a random MLP of xyz their 3D position embedding
(LLaVA-3D's learned MLP shape), a 2-layer projector maps the pooled voxels to
a random 8-layer ``LlamaForCausalLM`` (width 64) whose q/k weights are scaled
by 4 so attention is peaked as in a trained model (the AdaGate bench does the
same). Prompts follow LLaVA-3D's ``llava_v1`` template (a system prompt of
about 35 word tokens, ``USER: <image>`` where the spatial span goes, the
question, ``ASSISTANT:``) through a word-hash tokenizer, and ``generate`` is
called with ``inputs_embeds`` as LLaVA-3D does. Its answers are random words:
accuracy columns are not meaningful (``accuracy_valid: False``); tokens,
FLOPs, times and agreement are real.

With ``--llava3d-model PATH`` (a LLaVA-3D checkpoint; needs the ``llava``
package of ZCMax/LLaVA-3D importable, its transformers 4.37.2 and a GPU):
LLaVA-3D's own tokenizer, conversation template, encoders and ``generate``
on the views this module prepares; AdaGate finds the spatial span through
LLaVA-3D's ``prepare_inputs_labels_for_multimodal``. That path has not run
with LLaVA-3D itself (no install, weights or GPU here); it is tested on the
test stand-in of LLaVA-3D's calling pattern behind a fake ``llava`` package.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.benchmark import clock
from common.checks import budget
from common.flops import decoder_prefill_flops
from common.runs import FULL, Progress, Setting, Track, TrackContext, option

from .answers import score_answers
from .spatial import SpatialTokenConfig, SpatialTokens, build_spatial_tokens, prepare_views

__all__ = [
    "Llava3DOptions",
    "Llava3DTrack",
    "TinyLlava3D",
    "WordTokenizer",
    "fastv_equal_flops",
    "tokens_per_layer",
]

logger = logging.getLogger(__name__)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TINY_LAYERS = 8
TINY_GATES = (2, 4, 6)  # AdaGate's (8, 16, 24) of 32 layers, scaled to 8
FLOPS_TARGET = 0.37  # the paper: 63% fewer prefill FLOPs


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,0.25, got {text!r}") from e


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,24, got {text!r}") from e


@dataclass(frozen=True)
class Llava3DOptions:
    """Options of the ``llava3d`` track (flags in brackets).

    Attributes:
        model: LLaVA-3D checkpoint folder [--llava3d-model]; None = tiny random model.
        views: views per scene [--llava3d-views]; None = 20 with a model, 8 without.
        questions: questions per data set (ScanQA, SQA3D) and scene [--llava3d-questions].
        max_new_tokens: answer length [--llava3d-max-new-tokens]; None = 32 / 4.
        layers: AdaGate gating layers [--adagate-layers]; None = (8, 16, 24) / (2, 4, 6).
        keep: AdaGate schedule [--adagate-keep], fractions of the original span.
        mass: adaptive mode's attention mass [--adagate-mass].
        profile: a calibrated AdaGate profile JSON [--adagate-profile].
        sqa3d_questions / sqa3d_annotations: SQA3D files [--sqa3d-questions,
            --sqa3d-annotations]; generated data: found next to the scenes.
        patch_pixel / invalid_depth / align_colour: see :class:`SpatialTokenConfig`.
    """

    model: Path | None = field(
        default=None,
        metadata=option(
            "--llava3d-model",
            type=Path,
            help="LLaVA-3D checkpoint folder (needs the llava package; default: tiny random model)",
        ),
    )
    views: int | None = field(
        default=None,
        metadata=option("--llava3d-views", type=int, help="views per scene (default 20; 8 tiny)"),
    )
    questions: int = field(
        default=2,
        metadata=option(
            "--llava3d-questions", type=int, help="questions per data set and scene (default 2)"
        ),
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata=option(
            "--llava3d-max-new-tokens", type=int, help="answer tokens (default 32; 4 tiny)"
        ),
    )
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata=option(
            "--adagate-layers",
            type=_ints,
            help="AdaGate gating layers (default 8,16,24; 2,4,6 for the tiny model)",
        ),
    )
    keep: tuple[float, ...] = field(
        default=(0.5, 0.25, 0.125),
        metadata=option(
            "--adagate-keep", type=_floats, help="AdaGate schedule (default 0.5,0.25,0.125)"
        ),
    )
    mass: float = field(
        default=0.9,
        metadata=option("--adagate-mass", type=float, help="adaptive attention mass (0.9)"),
    )
    profile: Path | None = field(
        default=None,
        metadata=option(
            "--adagate-profile",
            type=Path,
            help="calibrated AdaGate profile (default: calibrated per scene)",
        ),
    )
    sqa3d_questions: Path | None = field(
        default=None, metadata=option("--sqa3d-questions", type=Path, help="SQA3D questions JSON")
    )
    sqa3d_annotations: Path | None = field(
        default=None,
        metadata=option("--sqa3d-annotations", type=Path, help="SQA3D annotations JSON"),
    )
    patch_pixel: str = field(
        default="corner",
        metadata=option(
            "--llava3d-patch-pixel",
            choices=["corner", "centre"],
            help="depth pixel of a patch (corner: LLaVA-3D's; centre)",
        ),
    )
    invalid_depth: str = field(
        default="camera",
        metadata=option(
            "--llava3d-invalid-depth",
            choices=["camera", "drop"],
            help="zero-depth patches: at the camera centre (LLaVA-3D) or dropped",
        ),
    )
    align_colour: bool = field(
        default=False,
        metadata=option(
            "--llava3d-align-colour",
            action="store_true",
            help="resample colour onto the depth camera (LLaVA-3D does not)",
        ),
    )

    def __post_init__(self) -> None:
        for name in ("views", "max_new_tokens", "questions"):
            v = getattr(self, name)
            if v is None and name != "questions":  # None: the model's default
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        # the gate's own checks name the field (keep, mass, layers)
        from threed.adagate import AdaGate

        AdaGate(layers=self.layers or TINY_GATES, keep=self.keep, mass=self.mass)
        SpatialTokenConfig(
            patch_pixel=self.patch_pixel,
            invalid_depth=self.invalid_depth,
            align_colour=self.align_colour,
        )


# ---------------------------------------------------------------------------- tiny model


class WordTokenizer:
    """Offline word-hash tokenizer for the tiny model: a word's id is its CRC32 modulo
    the vocabulary (ids 0-2 reserved: pad, bos, eos); ``decode`` knows the words it
    has encoded or was given (other ids read ``<id>``)."""

    def __init__(self, vocab_size: int = 4096, words: list[str] | None = None) -> None:
        self.vocab_size = vocab_size
        self._words: dict[int, str] = {}
        for w in words or []:
            self._id(w)

    @staticmethod
    def split(text: str) -> list[str]:
        import re

        return re.findall(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']", text)

    def _id(self, word: str) -> int:
        i = 3 + zlib.crc32(word.lower().encode()) % (self.vocab_size - 3)
        self._words.setdefault(i, word.lower())
        return i

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([1] if bos else []) + [self._id(w) for w in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words.get(int(i), f"<{int(i)}>") for i in ids if int(i) > 2)


class TinyLlava3D(nn.Module):
    """A tiny random LLaVA-3D-shaped model from configs (see the module docstring).

    ``vision``: ``CLIPVisionModel``; ``position``: xyz MLP; ``projector``:
    LLaVA's 2-layer GELU MLP; ``decoder``: ``LlamaForCausalLM``.
    """

    def __init__(self, seed: int = 0, vision_width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=vision_width,
                    intermediate_size=2 * vision_width,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=336,
                    patch_size=14,
                )
            )
            self.position = nn.Sequential(
                nn.Linear(3, vision_width),
                nn.LayerNorm(vision_width),
                nn.ReLU(),
                nn.Linear(vision_width, vision_width),
            )
            self.projector = nn.Sequential(
                nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
            cfg = LlamaConfig(
                vocab_size=4096,
                hidden_size=hidden,
                intermediate_size=172,
                num_hidden_layers=TINY_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=8192,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
            cfg._attn_implementation = "sdpa"
            self.decoder = LlamaForCausalLM(cfg)
            with torch.no_grad():
                for layer in self.decoder.model.layers:
                    layer.self_attn.q_proj.weight.mul_(4.0)
                    layer.self_attn.k_proj.weight.mul_(4.0)
        self.decoder.generation_config.pad_token_id = 0
        self.eval()

    @torch.no_grad()
    def patch_features(self, images: Tensor) -> Tensor:
        """``[V, 576, C]``: LLaVA's select layer -2, patch tokens only."""
        out = self.vision(pixel_values=images, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]


def tokens_per_layer(length: int, num_layers: int, plan: dict | None) -> list[int]:
    """Tokens each decoder layer saw in a batch-1 prefill of ``length`` (engine record)."""
    counts = (plan or {}).get("kept_counts") or {}
    per, cur = [], length
    for i in range(num_layers):
        if i in counts:
            cur = int(counts[i][0])
        per.append(cur)
    return per


def fastv_equal_flops(
    n_text: int,
    n_spatial: int,
    target_flops: int,
    flops_of,
    num_layers: int,
    layer: int = 2,
) -> float:
    """FastV keep ratio at ``layer`` whose analytic prefill FLOPs are closest to, and not
    above, ``target_flops`` (bisection over the ratio; at least one spatial token)."""
    lo, hi = 1.0 / n_spatial, 1.0

    def flops(r: float) -> int:
        kept = max(1, round(n_spatial * r))
        per = [n_text + n_spatial] * layer + [n_text + kept] * (num_layers - layer)
        return flops_of(per)

    if flops(lo) > target_flops:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops(mid) <= target_flops else (lo, mid)
    return lo


@dataclass
class _Question:
    dataset: str
    question_id: str
    text: str
    answers: list[str]


def _accuracy(texts: list[str], questions: list[_Question]) -> dict:
    """EM@1 overall and per data set; caption metrics on ScanQA only (as LLaVA-3D reports)."""
    out = {"em1": score_answers(texts, [q.answers for q in questions])["em1"]}
    for name in ("scanqa", "sqa3d"):
        pick = [i for i, q in enumerate(questions) if q.dataset == name]
        scores = score_answers([texts[i] for i in pick], [questions[i].answers for i in pick])
        out[f"em1_{name}"] = scores["em1"]
        out[f"em1_refined_{name}"] = scores["em1_refined"]
        if name == "scanqa":
            out.update({k: scores[k] for k in ("cider", "bleu4", "meteor", "rouge_l")})
    return out


# ---------------------------------------------------------------------------- the track


class Llava3DTrack(Track):
    """LLaVA-3D + AdaGate (see the module docstring)."""

    name = "llava3d"
    Options = Llava3DOptions
    table_columns = [
        "setting",
        "num_scenes",
        "spatial_tokens",
        "kept_ratio",
        "flops_ratio",
        "prefill_tflops",
        "prefill_time_s",
        "agreement",
        "first_token_agreement",
        "em1_scanqa",
        "em1_sqa3d",
        "cider",
        "bleu4",
        "meteor",
        "rouge_l",
    ]
    labels = {
        "kept_ratio": "spatial tokens left at the last layer (fraction)",
        "spatial_tokens": "spatial tokens per scene",
        "flops_ratio": "prefill FLOPs (fraction of ungated)",
        "prefill_tflops": "prefill TFLOPs (analytic)",
        "prefill_time_s": "prefill time per question (s)",
        "agreement": "answers equal to the ungated run (fraction)",
        "first_token_agreement": "first answer token equal to the ungated run (fraction)",
        "em1": "EM@1, ScanQA and SQA3D together (fraction)",
        "em1_scanqa": "ScanQA EM@1 (fraction)",
        "em1_sqa3d": "SQA3D EM@1 (fraction)",
        "cider": "CIDEr",
        "bleu4": "BLEU-4",
        "meteor": "METEOR",
        "rouge_l": "ROUGE-L",
    }
    empty_reasons = {
        "em1_scanqa": "no ScanQA question for these scenes",
        "em1_sqa3d": "no SQA3D question for these scenes (--sqa3d-questions)",
        "cider": "pycocoevalcap is not installed",
        "bleu4": "pycocoevalcap is not installed",
        "meteor": "pycocoevalcap is not installed (METEOR also needs Java)",
        "rouge_l": "pycocoevalcap is not installed",
    }

    def __init__(self, options: Llava3DOptions, context: TrackContext) -> None:
        super().__init__(options, context)
        self.device = torch.device(context.device)
        self.real = options.model is not None
        self.accuracy_valid = self.real
        self.spatial_config = SpatialTokenConfig(
            num_views=options.views or (20 if self.real else 8),
            patch_pixel=options.patch_pixel,
            invalid_depth=options.invalid_depth,
            align_colour=options.align_colour,
            seed=context.seed,
        )
        self.max_new_tokens = options.max_new_tokens or (32 if self.real else 4)
        self.gate_layers = tuple(options.layers or ((8, 16, 24) if self.real else TINY_GATES))
        if self.real:
            self._load_llava3d(options.model)
        else:
            self.model = TinyLlava3D(seed=context.seed).to(self.device)
            self.decoder = self.model.decoder
            self.tokenizer = WordTokenizer(4096, WordTokenizer.split(SYSTEM))
        from threed.adagate.profiles import decoder_dims

        self.dims = decoder_dims(self.decoder)

    # ------------------------------------------------------------------ settings
    def settings(self) -> list[Setting]:
        o = self.options
        layers = list(self.gate_layers)
        return [
            FULL,
            Setting("adagate", "adagate", {"layers": layers, "keep": list(o.keep)}),
            Setting(
                "adagate-adaptive",
                "adagate",
                {"layers": layers, "keep": [1.0] * len(layers), "mode": "adaptive", "mass": o.mass},
            ),
            Setting("adagate-profile", "adagate", {"profile": str(o.profile or "per scene")}),
            Setting("fastv", "fastv", {"layer": 2, "keep_ratio": "equal FLOPs to adagate"}),
        ]

    def notes(self) -> list[str]:
        out = [
            "fastv: FastV at layer 2 with the keep ratio whose analytic prefill FLOPs equal "
            "the adagate schedule's on the scene's first question.",
            "prefill_time_s: median over a scene's questions of one prefill each ("
            + ("time to the first token" if self.real else "the decoder stack, no LM head")
            + "); single runs, so on a shared machine flops_ratio is the steadier cost figure.",
        ]
        if self.options.profile is None:
            out.append(
                "adagate-profile: calibrated on each scene's own first two questions "
                f"(FLOPs target {FLOPS_TARGET}); pass --adagate-profile for a fixed one."
            )
        if not self.accuracy_valid:
            out.append(
                "tiny random model: em1 and the caption metrics are not meaningful; "
                "tokens, FLOPs, times and agreement with the ungated run are."
            )
        return out

    # ------------------------------------------------------------------ data
    def _questions(self, scene_id: str) -> list[_Question]:
        from threed.scannet import load_scanqa, load_sqa3d

        data = self.context.data
        k = self.options.questions
        out: list[_Question] = []
        scanqa = getattr(data, "scanqa_path", None)
        if scanqa is not None and Path(scanqa).is_file():
            for r in load_scanqa(scanqa, scene_ids={scene_id})[:k]:
                out.append(_Question("scanqa", r.question_id, r.question, r.answers))
        questions, annotations = self._sqa3d_paths()
        if questions is not None and questions.is_file():
            ann = annotations if annotations is not None and annotations.is_file() else None
            for r in load_sqa3d(questions, ann, scene_ids={scene_id})[:k]:
                text = f"{r.situation} {r.question}"
                out.append(_Question("sqa3d", str(r.question_id), text, r.answers))
        if not self.real:
            for q in out:  # so that decode() spells the words it has seen
                self.tokenizer.encode(" ".join(q.answers))
        if not out:
            raise ValueError(f"{scene_id}: no ScanQA / SQA3D questions (pass --scanqa / --sqa3d-*)")
        return out

    def _sqa3d_paths(self) -> tuple[Path | None, Path | None]:
        o = self.options
        if o.sqa3d_questions is not None:
            return o.sqa3d_questions, o.sqa3d_annotations
        data = self.context.data
        root = getattr(data, "scannet_root", None)
        if getattr(data, "synthetic", False) and root is not None:
            base = Path(root).parent / "sqa_task" / "balanced"
            return (
                base / "v1_balanced_questions_val_scannetv2.json",
                base / "v1_balanced_sqa_annotations_val_scannetv2.json",
            )
        return None, None

    # ------------------------------------------------------------------ tiny model inputs
    def _scene_tokens(self, scene) -> tuple[SpatialTokens, Tensor]:
        cached = getattr(self, "_last_tokens", None)
        if cached is not None and cached[0] == scene.scene_id:
            return cached[1]  # the visual of the scene just run
        views = prepare_views(scene.frames(), self.spatial_config)
        m, dev = self.model, self.device
        with torch.no_grad():
            feats = m.patch_features(views.images.to(dev)).cpu()
            tokens = build_spatial_tokens(
                feats,
                views,
                self.spatial_config,
                position_embedding=lambda xyz: m.position(xyz.to(dev)).cpu(),
            )
            embeds = m.projector(tokens.features.to(dev))  # LLaVA-3D projects after pooling
        self._last_tokens = (scene.scene_id, (tokens, embeds))
        return tokens, embeds

    def _sample(self, question: str, spatial: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[1, L, D]`` embeddings (system, ``USER:``, spatial span, question,
        ``ASSISTANT:``) and the span."""
        tok = self.tokenizer
        pre = tok.encode(f"{SYSTEM} USER:", bos=True)
        post = tok.encode(f"\n{question} ASSISTANT:")
        emb = self.decoder.get_input_embeddings()
        with torch.no_grad():
            a = emb(torch.tensor([pre], device=self.device))
            b = emb(torch.tensor([post], device=self.device))
        x = torch.cat([a, spatial[None].to(a.dtype), b], 1)
        return x, (len(pre), len(pre) + spatial.shape[0])

    # ------------------------------------------------------------------ methods
    def _methods(self, setting: Setting, calib: list[dict], n_text: int, n_sp: int):
        """The method of a gated setting. ``calib``: AdaGate calibration samples (the
        scene's first two questions); ``n_text`` / ``n_sp``: the first question's text
        and spatial token counts (FastV's equal-FLOPs budget)."""
        from common.engine import FastV
        from threed.adagate import AdaGate

        o = self.options
        if setting.label == "adagate":
            return AdaGate(layers=self.gate_layers, keep=o.keep)
        if setting.label == "adagate-adaptive":
            return AdaGate(
                layers=self.gate_layers,
                keep=(1.0,) * len(self.gate_layers),
                mode="adaptive",
                mass=o.mass,
            )
        if setting.label == "adagate-profile":
            if o.profile is not None:
                return AdaGate.from_profile(o.profile)
            profile = AdaGate.calibrate(
                self.decoder, calib[:2], target_flops=FLOPS_TARGET, stages=len(self.gate_layers)
            )
            return AdaGate.from_profile(profile)
        if setting.label == "fastv":
            sched = AdaGate(layers=self.gate_layers, keep=o.keep)
            per, cur = [], n_sp
            for i in range(self.dims["num_layers"]):
                if i in sched.layers:
                    cur = budget(n_sp, sched.keep[sched.layers.index(i)])  # AdaGate's rule
                per.append(n_text + cur)
            ratio = fastv_equal_flops(
                n_text, n_sp, self._flops(per), self._flops, self.dims["num_layers"], layer=2
            )
            return FastV(layer=2, keep_ratio=ratio)
        raise ValueError(f"llava3d track: unknown setting {setting.label!r}")

    def _flops(self, per_layer: list[int]) -> int:
        d = self.dims
        return decoder_prefill_flops(
            per_layer, d["hidden_size"], d["intermediate_size"], mlp=d["mlp"], kv_dim=d["kv_dim"]
        )

    # ------------------------------------------------------------------ one question
    def _answer(self, x: Tensor, span: tuple[int, int], handle) -> dict[str, Any]:
        dec = self.decoder
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            # the decoder stack (the engine's hooks sit on its layers); the LM head over
            # every position would dominate a tiny model and is one row in a real prefill
            t0 = clock(self.device)
            dec.model(inputs_embeds=x, attention_mask=mask, use_cache=False)
            t = clock(self.device) - t0
            plan = handle.last_plan if handle is not None else None
            out = dec.generate(
                inputs_embeds=x,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
            )
        ids = (
            out[0, -self.max_new_tokens :].tolist()
            if out.shape[1] > x.shape[1]
            else out[0].tolist()
        )
        per = tokens_per_layer(x.shape[1], self.dims["num_layers"], plan)
        n_sp = span[1] - span[0]
        return {
            "ids": ids,
            "time": t,
            "per_layer": per,
            "spatial_left": n_sp - (x.shape[1] - per[-1]),
        }

    # ------------------------------------------------------------------ track API
    def run_unit(
        self, scene, settings: list[Setting], progress: Progress = lambda _: None
    ) -> Iterator[dict]:
        if self.real:
            yield from self._run_llava3d(scene, settings, progress)
            return
        progress("spatial tokens")
        tokens, spatial = self._scene_tokens(scene)
        questions = self._questions(scene.scene_id)
        samples = [self._sample(q.text, spatial) for q in questions]
        progress(f"full: {len(questions)} questions")
        full = [self._answer(x, span, None) for x, span in samples]
        n_sp = tokens.num_tokens
        for setting in settings:
            if setting.method == "full":
                results, method = full, None
            else:
                progress(f"{setting.label}: {len(questions)} questions")
                calib = [{"inputs_embeds": x, "spatial_spans": [sp]} for x, sp in samples[:2]]
                x0, (s0, e0) = samples[0]
                method = self._methods(setting, calib, x0.shape[1] - (e0 - s0), e0 - s0)
                results = []
                for x, span in samples:
                    with method.apply(self.decoder, spans=[span]) as handle:
                        results.append(self._answer(x, span, handle))
            views = len(tokens.frame_ids)
            yield self._row(
                setting, method, questions, full, results, n_sp, views, tokens.num_voxels
            )

    def _decode(self, ids: list[int]) -> str:
        if self.real:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return self.tokenizer.decode(ids)

    def _row(self, setting, method, questions, full, results, n_sp, num_views, num_voxels) -> dict:
        flops = [self._flops(r["per_layer"]) for r in results]
        texts = [self._decode(r["ids"]) for r in results]
        acc = _accuracy(texts, questions)
        row = {
            "setting": setting.label,
            "model": "LLaVA-3D" if self.real else "tiny-random-llava3d",
            "accuracy_valid": self.accuracy_valid,
            "method_repr": repr(method) if method is not None else "full",
            "num_questions": len(questions),
            "num_views": num_views,
            "spatial_tokens": n_sp,
            "num_voxels": num_voxels,
            "kept_ratio": statistics.fmean(r["spatial_left"] / n_sp for r in results),
            "spatial_left": statistics.fmean(r["spatial_left"] for r in results),
            "prefill_tflops": statistics.fmean(flops) / 1e12,
            "flops_ratio": statistics.fmean(
                f / self._flops(r["per_layer"]) for f, r in zip(flops, full)
            ),
            "prefill_time_s": statistics.median(r["time"] for r in results),
            "agreement": statistics.fmean(
                float(r["ids"] == f["ids"]) for r, f in zip(results, full)
            ),
            "first_token_agreement": statistics.fmean(
                float(r["ids"][:1] == f["ids"][:1]) for r, f in zip(results, full)
            ),
            "answers": [
                {"dataset": q.dataset, "question_id": q.question_id, "answer": t}
                for q, t in zip(questions, texts)
            ],
        }
        if method is not None and setting.label == "adagate-profile":
            row["profile_layers"] = list(method.layers)
            row["profile_keep"] = [round(k, 4) for k in method.keep]
        if setting.label == "fastv":
            row["fastv_keep_ratio"] = float(method.keep_ratio)
        row.update(acc)
        return row

    # ------------------------------------------------------------------ visual
    def visualize(self, scene, out_dir: Path) -> list[Path]:
        """Top view: the scene's points, and the spatial tokens the ``adagate`` schedule
        keeps (colour) or gates (grey) at each gating layer, for the first question."""
        if self.real:
            return []
        import matplotlib  # lazy

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from threed.adagate import AdaGate

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokens, spatial = self._scene_tokens(scene)
        question = self._questions(scene.scene_id)[0]
        x, span = self._sample(question.text, spatial)
        gate = AdaGate(layers=self.gate_layers, keep=self.options.keep)
        with gate.apply(self.decoder, spatial_spans=[span]) as handle:
            with torch.inference_mode():
                self.decoder(inputs_embeds=x, use_cache=False)
            plan = handle.last_plan
        pos = tokens.positions.numpy()
        pts = scene.points[:: max(1, len(scene.points) // 20000)]
        layers = list(self.gate_layers)
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            kept = torch.zeros(len(pos), dtype=torch.bool)
            if plan is not None and layer in plan["keep_idx"]:
                idx = plan["keep_idx"][layer][0]
                idx = idx[(idx >= span[0]) & (idx < span[1])] - span[0]
                kept[idx.cpu()] = True
            ax.scatter(pts[:, 0], pts[:, 1], s=0.2, c="0.85")
            ax.scatter(pos[~kept, 0], pos[~kept, 1], s=4, c="0.55", label="gated")
            ax.scatter(pos[kept, 0], pos[kept, 1], s=6, c="tab:red", label="kept")
            ax.set_title(f"layer {layer}: {int(kept.sum())}/{len(pos)} kept", fontsize=9)
            ax.set_aspect("equal")
            ax.set_xlabel("x (m)")
            ax.set_ylabel("y (m)")
        axes[0][0].legend(loc="upper right", fontsize=7, markerscale=2)
        fig.suptitle(
            f"{scene.scene_id}: AdaGate {self.options.keep}, {question.text!r}", fontsize=8
        )
        path = out_dir / f"llava3d_gated_{scene.scene_id}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        return [path]

    # ---------------------------------------------------------- LLaVA-3D checkpoints
    def _load_llava3d(self, path: Path) -> None:
        try:
            from llava.mm_utils import get_model_name_from_path
            from llava.model.builder import load_pretrained_model
        except ImportError as e:
            raise ImportError(
                "--llava3d-model needs LLaVA-3D's llava package (github.com/ZCMax/LLaVA-3D, "
                "pip install -e . there)"
            ) from e
        name = get_model_name_from_path(str(path))
        tokenizer, model, _, _ = load_pretrained_model(str(path), None, name)
        self.tokenizer, self.model = tokenizer, model.eval()
        self.decoder = model

    def _run_llava3d(self, scene, settings, progress) -> Iterator[dict]:
        """LLaVA-3D's ScanQA / SQA3D calling pattern (``model_sqa3d.py``) on our views."""
        from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.conversation import conv_templates
        from llava.mm_utils import tokenizer_image_token

        model = self.model
        views = prepare_views(scene.frames(), self.spatial_config)
        dtype = next(model.parameters()).dtype
        kw = {
            "images": views.images[None].to(self.device, dtype),
            "depths": views.depths[None].to(self.device, dtype),
            "poses": views.poses[None].to(self.device, dtype),
            "intrinsics": views.intrinsics[None].to(self.device, dtype),
        }
        questions = self._questions(scene.scene_id)
        ids = []
        for q in questions:
            conv = conv_templates["llava_v1"].copy()
            conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{q.text}")
            conv.append_message(conv.roles[1], None)
            prompt = conv.get_prompt()
            ids.append(tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, "pt")[None])

        def answer(input_ids, handle):
            input_ids = input_ids.to(self.device)
            with torch.inference_mode():
                t0 = clock(self.device)
                out = model.generate(
                    input_ids, **kw, do_sample=False, max_new_tokens=1, use_cache=True
                )
                t = clock(self.device) - t0  # time to first token
                plan = handle.last_plan if handle is not None else None
                out = model.generate(
                    input_ids, **kw, do_sample=False, max_new_tokens=self.max_new_tokens
                )
            return out[0].tolist(), t, plan

        from threed.adagate.llava3d import SpanRecorder

        full = []
        spans = []
        for x in ids:
            rec = SpanRecorder(model)
            try:
                out, t, _ = answer(x, None)
            finally:
                rec.remove()
            (s, e) = rec.spans[0][0]
            length = x.shape[1] - 1 + (e - s)
            full.append(
                {
                    "ids": out,
                    "time": t,
                    "per_layer": [length] * self.dims["num_layers"],
                    "spatial_left": e - s,
                }
            )
            spans.append((s, e))
        n_sp = spans[0][1] - spans[0][0]
        calib = [{"input_ids": x.to(self.device), **kw} for x in ids[:2]]
        n_text = full[0]["per_layer"][0] - n_sp
        for setting in settings:
            if setting.method == "full":
                results, method = full, None
            else:
                progress(f"{setting.label}: {len(questions)} questions")
                method = self._methods(setting, calib, n_text, n_sp)
                results = []
                for x, f, span in zip(ids, full, spans):
                    # AdaGate finds the span through LLaVA-3D's input builder; FastV is told
                    kwargs = {"spans": [span]} if setting.method == "fastv" else {}
                    with method.apply(model, **kwargs) as handle:
                        out, t, plan = answer(x, handle)
                    per = tokens_per_layer(f["per_layer"][0], self.dims["num_layers"], plan)
                    n = span[1] - span[0]
                    results.append(
                        {
                            "ids": out,
                            "time": t,
                            "per_layer": per,
                            "spatial_left": n - (per[0] - per[-1]),
                        }
                    )
            # LLaVA-3D pools inside the model: the span length stands for the voxels
            yield self._row(
                setting, method, questions, full, results, n_sp, len(views.frame_ids), n_sp
            )
