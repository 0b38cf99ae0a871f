"""Multiple-choice video QA: manifests, prompts, answer parsing, per-batch evaluation,
and the ``video_qa`` track that ``scripts/video_qa.py`` runs on :mod:`common.runs`.

Manifests (:func:`read_manifest`): JSONL, JSON, CSV / TSV or parquet with ``id``, ``video``,
``question``, ``options``, ``answer`` (a letter, an option's text or its
index), optionally ``start`` / ``end`` in seconds; and the annotation layouts
of MVBench (``video``, ``question``, ``candidates``, ``answer`` as text),
EgoSchema (``q_uid``, ``question``, ``option 0..4``; answers from a
``{q_uid: index}`` file), Video-MME (``videoID``, ``question_id``,
``options`` as ``"A. ..."``, ``answer`` letter) and LongVideoBench
(``video_path``, ``candidates``, ``correct_choice``). Relative video paths
resolve against ``video_root`` (default: the manifest's folder).

Per sample and setting the track records the prediction, the parsed option,
whether it is correct, the visual tokens the processor produced
(``visual_tokens_before``), those entering the decoder
(``visual_tokens_after``) and those left at its last layer
(``visual_tokens_final``), the analytic prefill FLOPs over the lengths every
decoder layer really saw (HoliTom's ``4nd^2 + 2n^2d + 2ndm`` per layer, in
TFLOPs), time to first token and total latency (of the sample's ``generate``
call, after decoding and preprocessing: the first token's time is stamped by a
logits processor, so it covers the vision tower, any outer-LLM reduction and
the prefill).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.runs import FULL, Setting, Track

__all__ = [
    "LETTERS",
    "ManifestError",
    "VideoQAData",
    "check_model",
    "default_settings",
    "split_method_args",
    "PrefillMeter",
    "QASample",
    "VideoQAOptions",
    "VideoQATrack",
    "answer_batch",
    "expand_settings",
    "format_prompt",
    "load_model",
    "model_dtype",
    "parse_option",
    "read_manifest",
    "rows_left",
    "video_inputs",
]

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
_RATIO_PARAMS = ("retain_ratio", "keep_ratio", "ratio")


# ----------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class QASample:
    """One multiple-choice question about one video.

    Attributes:
        id: unique sample id.
        video: path of the video file.
        question: the question text.
        options: option texts without letters (``options[0]`` is ``A``).
        answer: the correct letter, or ``None`` when the manifest has none.
        start, end: optional clip window in seconds.
        meta: other manifest fields (task, duration...), kept in the rows.
    """

    id: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str | None = None
    start: float | None = None
    end: float | None = None
    meta: dict = field(default_factory=dict)


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the row."""


_LETTER_PREFIX = re.compile(r"^\s*\(?([A-J])[\.\):]\s+")


def _strip_letter(option: str, index: int) -> str:
    """``"B. a dog"`` -> ``"a dog"`` when the letter is the option's own."""
    m = _LETTER_PREFIX.match(option)
    if m and m.group(1) == LETTERS[index]:
        return option[m.end() :].strip()
    return option.strip()


def _options(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ManifestError(f"{where}: options is not a JSON list: {text[:60]!r}") from None
        else:
            value = [p for p in re.split(r"\s*\|\s*|\n", text) if p.strip()]
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise ManifestError(f"{where}: need at least two options, got {value!r}")
    if len(value) > len(LETTERS):
        raise ManifestError(f"{where}: at most {len(LETTERS)} options, got {len(value)}")
    return [_strip_letter(str(v), i) for i, v in enumerate(value)]


def _answer(value: Any, options: list[str], where: str) -> str | None:
    """A letter from a letter, an option's text or an index (``None`` stays ``None``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ManifestError(f"{where}: answer {value!r} is not a letter, text or index")
    if isinstance(value, (int, float)) and int(value) == value:
        i = int(value)
        if not 0 <= i < len(options):
            raise ManifestError(f"{where}: answer index {i} outside {len(options)} options")
        return LETTERS[i]
    text = str(value).strip()
    m = re.fullmatch(r"\(?([A-J])[\.\)]?", text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return m.group(1)
    if text.isdigit() and int(text) < len(options):
        return LETTERS[int(text)]
    stripped = _LETTER_PREFIX.sub("", text).strip()
    for i, opt in enumerate(options):
        if stripped.lower() == opt.lower():
            return LETTERS[i]
    raise ManifestError(f"{where}: answer {text!r} is none of the options {options}")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise ManifestError(f"{path}:{n}: not JSON ({e})") from None
            return rows
        if suffix == ".json":
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):  # {id: row} or {"questions": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) == 1:
                    return lists[0]
                return [dict(v, id=v.get("id", k)) for k, v in data.items() if isinstance(v, dict)]
            return list(data)
        if suffix in (".csv", ".tsv"):
            with open(path, newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".parquet":  # Video-MME's annotations on the Hub are parquet
            try:
                import pandas as pd
            except ImportError:
                raise ManifestError(
                    f"manifest {path}: reading parquet needs pandas and pyarrow "
                    "(pip install pandas pyarrow), or convert it to JSON / CSV"
                ) from None
            records = pd.read_parquet(path).to_dict("records")
            # numpy arrays (options lists) and scalars as plain Python values
            return [
                {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
                for r in records
            ]
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} not found") from None
    except (OSError, ValueError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"manifest {path}: cannot read ({e})") from None
    raise ManifestError(f"manifest {path}: expected .jsonl, .json, .csv, .tsv or .parquet")


def _layout(row: dict) -> str:
    keys = set(row)
    if "q_uid" in keys:
        return "egoschema"
    if "videoID" in keys or "video_id" in keys and "question_id" in keys:
        return "videomme"
    if "video_path" in keys and "candidates" in keys:
        return "longvideobench"
    if "candidates" in keys:
        return "mvbench"
    return "generic"


def read_manifest(
    path: str | os.PathLike,
    *,
    video_root: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[QASample]:
    """Samples of a manifest (see the module docstring for the layouts).

    Args:
        path: the manifest file.
        video_root: folder relative video paths resolve against (default: the
            manifest's folder).
        answers: EgoSchema's ``{q_uid: index}`` answers file, when separate.
        limit: keep the first ``limit`` samples.

    Raises:
        ManifestError: unreadable file, missing columns, bad options/answers
            or repeated ids (the message names the file and the row).
    """
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.parent
    rows = _read_rows(path)
    extra_answers: dict = {}
    if answers is not None:
        with open(answers) as f:
            extra_answers = json.load(f)
    samples: list[QASample] = []
    for n, row in enumerate(rows):
        where = f"{path} row {n + 1}"
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
        layout = _layout(row)
        try:
            if layout == "egoschema":
                sid = str(row["q_uid"])
                options = _options([row[f"option {i}"] for i in range(5)], where)
                ans = row.get("answer", extra_answers.get(sid))
                video = row.get("video", f"{sid}.mp4")
            elif layout == "videomme":
                sid = str(row.get("question_id") or row.get("id"))
                vid = row.get("videoID") or row.get("video_id")
                options = _options(row["options"], where)
                ans = row.get("answer")
                video = row.get("video") or f"{vid}.mp4"
            elif layout == "longvideobench":
                sid = str(row["id"])
                options = _options(row["candidates"], where)
                ans = row.get("correct_choice", row.get("answer"))
                video = row["video_path"]
            elif layout == "mvbench":
                sid = str(row.get("id", n))
                options = _options(row["candidates"], where)
                ans = row.get("answer")
                video = row["video"]
            else:
                sid = str(row["id"])
                options = _options(row["options"], where)
                ans = row.get("answer")
                video = row["video"]
            question = str(row["question"])
        except KeyError as e:
            raise ManifestError(
                f"{where}: missing column {e.args[0]!r} ({layout} layout)"
            ) from None
        if isinstance(ans, str) and ans.strip().lstrip("-").isdigit() and layout != "generic":
            ans = int(ans)
        letter = _answer(ans, options, where)
        video_path = Path(str(video))
        if not video_path.is_absolute():
            video_path = (root / video_path).absolute()
        start = row.get("start")
        end = row.get("end")
        known = {
            "id", "video", "question", "options", "answer", "start", "end", "candidates",
            "q_uid", "video_path", "correct_choice", "videoID", "question_id",
        }  # fmt: skip
        meta = {
            k: v
            for k, v in row.items()
            if k not in known
            and not k.startswith("option ")
            and isinstance(v, (str, int, float, bool, type(None)))
        }
        samples.append(
            QASample(
                id=sid,
                video=str(video_path),
                question=question,
                options=tuple(options),
                answer=letter,
                start=float(start) if start not in (None, "") else None,
                end=float(end) if end not in (None, "") else None,
                meta=meta,
            )
        )
        if limit is not None and len(samples) >= limit:
            break
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ManifestError(f"manifest {path}: repeated ids {dup}")
    if not samples:
        raise ManifestError(f"manifest {path} has no samples")
    return samples


# ----------------------------------------------------------------------------- prompts


def format_prompt(sample: QASample) -> str:
    """The multiple-choice prompt, in the wording of lmms-eval's Video-MME task."""
    shown = list(LETTERS[: len(sample.options)])
    letters = ", ".join(shown[:-1]) + (", or " if len(shown) > 2 else " or ") + shown[-1]
    lines = [
        "Select the best answer to the following multiple-choice question based on the "
        f"video. Respond with only the letter ({letters}) of the correct option.",
        sample.question.strip(),
    ]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options)]
    lines.append("The best answer is:")
    return "\n".join(lines)


_ANSWER_PATTERNS = (
    # "B", "B.", "(B) ...", "B: ..."; not the article of "A blue square" (a letter, then a
    # lowercase word: left to the option texts)
    re.compile(r"^\s*\(?([A-J])\)?(?:[\.\):,]|\s(?!\s*[a-z])|$)"),
    re.compile(r"(?:answer|option)\s*(?:is|:)?\s*\(?([A-J])\b", re.IGNORECASE),
    re.compile(r"\b([A-J])[\.\)]\s"),
    re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])"),
)


def parse_option(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer names, or ``None``.

    Tried in order: a leading letter (``"B"``, ``"(B) ..."``), ``"answer is B"``,
    ``"B. "`` anywhere, an option's text, a lone capital letter. Only
    letters of existing options count.
    """
    valid = LETTERS[: len(options)]
    text = text or ""
    for pattern in _ANSWER_PATTERNS[:3]:
        m = pattern.search(text)
        if m and m.group(1) in valid:
            return m.group(1)
    lowered = text.lower()
    hits = [i for i, opt in enumerate(options) if opt and opt.lower() in lowered]
    if len(hits) == 1:
        return LETTERS[hits[0]]
    m = _ANSWER_PATTERNS[3].search(text)
    if m and m.group(1) in valid:
        return m.group(1)
    return None


# ----------------------------------------------------------------------------- models


_MODEL_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def check_model(spec: str) -> str:
    """The model type of ``spec`` (a tiny name or a local HF folder); ``ValueError`` when
    it cannot be loaded here (before a run starts, not once per sample)."""
    from video.tiny import TINY_MODELS

    if spec in TINY_MODELS:
        return "llava_onevision" if "llava" in spec else "qwen2_vl"
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--model {spec!r}: not a local folder and not one of {', '.join(TINY_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {spec}: no config.json (not a Hugging Face model folder)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in _MODEL_CLASSES:
        raise ValueError(
            f"--model {spec}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(_MODEL_CLASSES)})"
        )
    return model_type


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to load a model in: ``auto`` is bf16 on CUDA and fp32 elsewhere, else
    ``float32`` / ``bfloat16`` / ``float16`` (another name: ``ValueError``)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return _DTYPES[name]


def load_model(
    spec: str,
    *,
    device: Any = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
):
    """``(model, processor)`` from a tiny model name or a local Hugging Face folder.

    Local folders load offline (``local_files_only``). Model classes by
    ``model_type``: ``llava_onevision`` (LLaVA-OneVision, LLaVA-Video),
    ``qwen2_vl``, ``qwen2_5_vl``. When torchvision is missing the processor's
    video part is :mod:`video.io.processors`' equivalent, built from the
    folder's video preprocessor config.
    """
    from video.tiny import TINY_MODELS, build_tiny

    if spec in TINY_MODELS:
        kwargs: dict[str, Any] = {"seed": seed}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model, processor = build_tiny(spec, **kwargs)
        return model.to(device=device, dtype=dtype or torch.float32), processor
    model_type = check_model(spec)
    path = Path(spec)
    import transformers

    cls = getattr(transformers, _MODEL_CLASSES[model_type])
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(path, **kwargs).to(device).eval()
    processor = _load_processor(path, model_type)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation
    return model, processor


def _load_processor(path: Path, model_type: str):
    from transformers import AutoProcessor

    from video.io.processors import (
        LlavaOnevisionFrameProcessor,
        Qwen2VLFrameProcessor,
        hf_video_processors_available,
        lenient_processor,
    )

    if hf_video_processors_available():
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    # no torchvision: the same processor with the frame processor for videos
    import transformers

    cfg = {}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).exists():
            cfg = json.loads((path / name).read_text())
            break
    proc_cfg = {}
    if (path / "processor_config.json").exists():
        proc_cfg = json.loads((path / "processor_config.json").read_text())
    if model_type == "llava_onevision":
        video = LlavaOnevisionFrameProcessor.from_dict(cfg)
        base = transformers.LlavaOnevisionProcessor
        image = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(path)
    else:
        video = Qwen2VLFrameProcessor.from_dict(cfg)
        base = getattr(
            transformers,
            "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen2VLProcessor",
        )
        image = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    extra = {
        k: v
        for k, v in proc_cfg.items()
        if k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
    }
    template = getattr(tok, "chat_template", None)
    if (path / "chat_template.json").exists():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    elif (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return lenient_processor(base)(
        image_processor=image, tokenizer=tok, video_processor=video, chat_template=template, **extra
    )


# ----------------------------------------------------------------------------- measuring


class PrefillMeter:
    """Hooks that record what the decoder saw during the first forward (prefill).

    After a ``generate`` inside the context: ``layer_lengths`` (padded sequence
    length each decoder layer processed), ``entry_lengths`` ``[B]`` (real tokens
    of each sample entering the decoder, from its 2D attention mask when it
    gets one), and ``first_token_s`` (seconds from :meth:`start` to the first
    logits-processor call, i.e. prefill plus the first LM head).
    """

    def __init__(self, model: torch.nn.Module):
        from common.engine import find_decoder_layers

        self.decoder, self.layers = find_decoder_layers(model)
        self.device = next(model.parameters()).device
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.layer_lengths: list[int] = []
        self.entry_lengths: list[int] | None = None
        self.first_token_s: float | None = None
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.reset()
        self._sync()
        self._t0 = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> PrefillMeter:
        def decoder_hook(module, args, kwargs):
            if self.entry_lengths is None:
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    self.entry_lengths = [int(v) for v in mask.sum(1).tolist()]
                else:  # no 2D mask: every sample has the full length
                    h = kwargs.get("inputs_embeds")
                    h = h if h is not None else kwargs.get("input_ids")
                    if h is None and args:
                        h = args[0]
                    if h is not None:
                        self.entry_lengths = [int(h.shape[1])] * int(h.shape[0])

        def layer_hook(module, args, output):
            if len(self.layer_lengths) < len(self.layers):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                self.layer_lengths.append(int(hidden.shape[1]))

        self._handles.append(self.decoder.register_forward_pre_hook(decoder_hook, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(layer_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def logits_processor(self):
        """A logits processor that stamps the first token's time (add it to ``generate``)."""
        meter = self

        class _Stamp:
            def __call__(self, input_ids, scores):
                if meter.first_token_s is None:
                    meter._sync()
                    meter.first_token_s = time.perf_counter() - meter._t0
                return scores

        return _Stamp()


def _engine_plan(handle: Any) -> dict | None:
    """The decoder engine's record of the latest prefill (``kept_counts`` / ``span_kept`` per
    pruning layer and sample), from a method handle or its inner-LLM handle; ``None`` if none."""
    for h in (handle, getattr(handle, "inner", None)):
        plan = getattr(h, "last_plan", None)
        if isinstance(plan, dict) and plan.get("kept_counts"):
            return {
                "kept_counts": {int(k): v.tolist() for k, v in plan["kept_counts"].items()},
                "span_kept": {int(k): v.tolist() for k, v in plan["span_kept"].items()},
            }
    return None


def _flops(model, lengths: list[int]) -> float:
    from common.flops import decoder_prefill_flops

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    cfg = cfg or model.config
    return float(
        decoder_prefill_flops(
            [max(int(n), 0) for n in lengths], cfg.hidden_size, cfg.intermediate_size
        )
    )


def video_inputs(
    model: torch.nn.Module,
    processor: Any,
    texts: Sequence[str],
    videos: Sequence[Any],
    metadata: Sequence[dict | None] | None = None,
) -> dict[str, Any]:
    """The model's ``generate`` inputs for one user turn per video: the video, then its text.

    Args:
        texts: the user text of each turn; ``videos``: ``[T, H, W, 3]`` uint8 frames each.
        metadata: per video, ``VideoClip.hf_metadata()``; passed to the processor only
            when every video has it.

    Returns:
        the processor's tensors (left-padded batch) on the model's device, floating
        ones in the model's dtype.
    """
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for t in texts
    ]
    extra = {}
    if metadata is not None and all(m is not None for m in metadata):
        extra["video_metadata"] = list(metadata)
    inputs = processor(
        text=prompts, videos=list(videos), return_tensors="pt", padding=True, **extra
    )
    param = next(model.parameters())
    return {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
        if k != "video_metadata"
    }


def answer_batch(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[QASample],
    videos: Sequence[Any],
    *,
    method: Any = None,
    max_new_tokens: int = 8,
    metadata: Sequence[dict] | None = None,
) -> list[dict]:
    """Answer one batch of questions with ``method`` applied (``None``: the unpruned model).

    Args:
        samples: the questions; ``videos``: their frames (``[T, H, W, 3]`` uint8 each).
        metadata: per video, ``VideoClip.hf_metadata()`` (sampling rate and frame
            indices: Qwen2.5-VL's temporal positions are in seconds).

    Returns:
        one dict per sample: ``prediction``, ``parsed``, ``correct`` (``None``
        without an answer), ``accuracy`` (1.0 / 0.0 / ``None``), token counts,
        ``prefill_tflops``, ``ttft_ms``, ``latency_ms``, ``new_tokens``,
        ``batch_size``.
    """
    from video.hf import _video_token_id

    tok = processor.tokenizer
    inputs = video_inputs(model, processor, [format_prompt(s) for s in samples], videos, metadata)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    video_id = _video_token_id(model.config, required=False)
    visual_before = (ids == video_id).sum(1).tolist() if video_id is not None else [0] * len(ids)
    text_len = [int(m) - int(v) for m, v in zip(mask.sum(1).tolist(), visual_before)]

    handle = method.apply(model) if method is not None else None
    try:
        with PrefillMeter(model) as meter, torch.inference_mode():
            meter.start()
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=[meter.logits_processor()],
                pad_token_id=tok.pad_token_id,
            )
            meter._sync()
            latency = time.perf_counter() - meter._t0
        plan = _engine_plan(handle)
    finally:
        if handle is not None:
            handle.remove()
    new = out[:, ids.shape[1] :]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    lengths = meter.layer_lengths
    entry = meter.entry_lengths or [int(m) for m in mask.sum(1).tolist()]
    padded0 = lengths[0] if lengths else ids.shape[1]
    results = []
    for b, s in enumerate(samples):
        after = entry[b] - text_len[b]
        if plan is not None:  # per-sample counts after each in-LLM stage, from the engine
            per_layer, final, n_now, v_now = [], after, entry[b], after
            for layer in range(len(lengths)):
                if layer in plan["kept_counts"]:
                    # the engine counts the left-padding slots of the input as alive
                    n_now = int(plan["kept_counts"][layer][b]) - (padded0 - entry[b])
                    v_now = int(plan["span_kept"][layer][b])
                per_layer.append(n_now)
            final = v_now
        else:  # no engine record: every sample lost what the padded length lost
            per_layer = [entry[b] - (padded0 - n) for n in lengths]
            final = after - (padded0 - lengths[-1]) if lengths else after
        parsed = parse_option(texts[b], s.options)
        correct = None if s.answer is None else parsed == s.answer
        eos = tok.eos_token_id
        gen = new[b]
        n_new = int(((gen != tok.pad_token_id) & (gen != eos)).sum()) if len(gen) else 0
        results.append(
            {
                "prediction": texts[b],
                "parsed": parsed,
                "answer": s.answer,
                "correct": correct,
                "accuracy": None if correct is None else float(correct),
                "visual_tokens_before": int(visual_before[b]),
                "visual_tokens_after": int(after),
                "visual_tokens_final": int(final),
                "prefill_tokens": int(entry[b]),
                "prefill_tflops": _flops(model, per_layer) / 1e12,
                "ttft_ms": 1000.0 * (meter.first_token_s or latency),
                "latency_ms": 1000.0 * latency,
                "new_tokens": n_new,
                "batch_size": len(samples),
            }
        )
    return results


# ----------------------------------------------------------------------------- settings


def _split_values(raw: str) -> list[str]:
    """``"0.1,0.25"`` -> two values; commas inside brackets stay (``"[8,16,24]"`` is one)."""
    parts, depth, cur = [], 0, ""
    for ch in str(raw):
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith(("[", "(")):  # a list-valued parameter: [8,16,24]
        inner = text.strip("[]()")
        return tuple(_value(v) for v in _split_values(inner))
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def expand_settings(specs: Sequence[tuple[str, dict[str, str]]]) -> list[Setting]:
    """``[(method, {param: "v1,v2"})]`` -> one :class:`Setting` per value combination.

    Each method's settings share one plot line (``series``: the method and its
    single-valued parameters); labels read ``method@param=value,...``.
    Parameters are checked by building each method once (``ValueError`` naming
    the field).
    """
    from common.methods import build_method, get_method

    out: list[Setting] = [FULL]
    seen = {"full"}
    for name, params in specs:
        get_method(name)  # unknown names raise listing the registry
        values = {k: [_value(v) for v in _split_values(raw)] for k, raw in params.items()}
        swept = [k for k, v in values.items() if len(v) > 1]
        fixed = {k: v[0] for k, v in values.items() if len(v) == 1}
        # the plot's x axis is the ratio: a line is the method with its other fixed fields
        series = name + "".join(f" {k}={v}" for k, v in fixed.items() if k not in _RATIO_PARAMS)
        keys = list(values)
        for combo in itertools.product(*(values[k] for k in keys)) if keys else [()]:
            p = dict(zip(keys, combo))
            build_method(name, **p)
            shown = {k: p[k] for k in keys if k in swept or k in _RATIO_PARAMS} or p
            label = name + ("@" + ",".join(f"{k}={v}" for k, v in shown.items()) if shown else "")
            if label in seen:  # same label from a fixed non-ratio parameter: spell everything
                label = name + "@" + ",".join(f"{k}={v}" for k, v in p.items())
            if label in seen:
                raise ValueError(f"setting {label} is given twice")
            seen.add(label)
            out.append(Setting(label, name, p, series=series))
    return out


def rows_left(out: str | os.PathLike, sample_ids: Sequence[str], labels: Sequence[str]) -> int:
    """How many (sample, setting) rows of the ``video_qa`` track ``out`` does not hold yet
    (merged rows and every shard file count)."""
    from common.runs.results import read_done

    out = Path(out)
    files = [out / "rows.jsonl", *sorted(out.glob("rows.rank*.jsonl"))]
    done = set().union(*(read_done(f, "sample_id") for f in files if f.exists()))
    track = VideoQATrack.name
    return sum((str(sid), track, label) not in done for sid in sample_ids for label in labels)


def split_method_args(argv: Sequence[str], parser) -> tuple[list[str], list]:
    """Split ``argv`` into the script's own arguments and ``[(method, {param: raw})]``.

    ``--method NAME`` opens a method; the flags after it that the parser does
    not know are that method's parameters (``--retain-ratio 0.1,0.25`` ->
    ``retain_ratio``); flags the parser knows stay the script's.
    """
    known: dict[str, bool] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            known[flag] = action.nargs != 0
    rest: list[str] = []
    specs: list[tuple[str, dict[str, str]]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        flag, eq, inline = tok.partition("=")
        if flag == "--method":
            name = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if not name or name.startswith("--"):
                raise ValueError("--method needs a method name")
            specs.append((name, {}))
            i += 1 if eq else 2
            continue
        if specs and flag.startswith("--") and flag not in known:
            if eq:
                value = inline
                i += 1
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 2
            else:
                raise ValueError(f"{flag} (a parameter of --method {specs[-1][0]}) needs a value")
            specs[-1][1][flag[2:].replace("-", "_")] = value
            continue
        rest.append(tok)
        if flag in known and known[flag] and not eq and i + 1 < len(argv):
            rest.append(argv[i + 1])
            i += 2
            continue
        i += 1
    return rest, specs


def default_settings(tiny: bool) -> list[tuple[str, dict[str, str]]]:
    """The embedded default: HoliTom at 10% and 25% plus two baselines at 25%.

    Baselines: FastV and the first registered of VisionZip / DivPrune (else
    PDrop). On the 4-layer tiny models the in-LLM layers are moved to 2
    (HoliTom's inner merge, FastV) and PDrop's stages to [1,2,3].
    """
    from common.methods import get_method, registered_methods

    names = registered_methods()
    holitom = {"retain_ratio": "0.1,0.25"}
    if tiny:
        holitom["inner_layer"] = "2"
    specs: list[tuple[str, dict[str, str]]] = [("holitom", holitom)]
    specs.append(("fastv", {"keep_ratio": "0.25", "layer": "2"}))
    for name in ("visionzip", "divprune"):
        if name in names:
            fields = {f.name for f in dataclasses.fields(get_method(name).cls)}
            ratio = next((k for k in _RATIO_PARAMS if k in fields), None)
            specs.append((name, {ratio: "0.25"} if ratio else {}))
            break
    else:
        specs.append(("pdrop", {"layers": "[1,2,3]"} if tiny else {}))
    return specs


# ----------------------------------------------------------------------------- the track


@dataclass(frozen=True)
class VideoQAOptions:
    """Options of the ``video_qa`` track.

    Attributes:
        model: a tiny model name or a local Hugging Face folder.
        settings: ``[(method, {param: "v1,v2"})]`` as parsed from ``--method``.
        frames: frames per video (uniform), or ``None`` with ``fps``.
        fps: frames per second instead of a fixed count.
        max_frames: cap on fps sampling.
        batch_size: questions per ``generate`` call.
        max_new_tokens: tokens generated per answer.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto``: bf16 on CUDA, fp32 on CPU).
        attn_implementation: ``sdpa`` / ``eager`` / ``flash_attention_2``; ``None``: the default.
        random_weights: whether the model has random weights (accuracy then meaningless).
    """

    model: str = "tiny-random-llava-onevision"
    settings: tuple = ()
    frames: int | None = 16
    fps: float | None = None
    max_frames: int | None = None
    batch_size: int = 1
    max_new_tokens: int = 8
    dtype: str = "auto"
    attn_implementation: str | None = None
    random_weights: bool = True

    def __post_init__(self) -> None:
        if self.frames is not None and (int(self.frames) != self.frames or self.frames < 1):
            raise ValueError(f"frames must be an integer >= 1, got {self.frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if (self.frames is None) == (self.fps is None):
            raise ValueError("give exactly one of frames and fps")
        if int(self.batch_size) != self.batch_size or not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size must be an integer in [1, 1024], got {self.batch_size}")
        if int(self.max_new_tokens) != self.max_new_tokens or not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype}")


_LOADED: dict[tuple, tuple] = {}  # the model of this process, by what it was loaded with


@dataclass
class VideoQAData:
    """What the script hands the track: samples by id and the order of this process's shard."""

    samples: dict[str, QASample]
    order: list[str]


class VideoQATrack(Track):
    """Multiple-choice video QA with one model under every setting (see the module docstring).

    Batches: the runner hands one sample at a time; this track answers it
    together with the next ``batch_size - 1`` samples of the same process
    (same frame shape) and keeps their rows until the runner asks for them,
    so a killed run loses at most the batch in flight.
    """

    name = "video_qa"
    Options = VideoQAOptions
    table_columns = [
        "setting",
        "num_samples",
        "kept_ratio",
        "accuracy",
        "visual_tokens_before",
        "visual_tokens_after",
        "visual_tokens_final",
        "prefill_tflops",
        "ttft_ms",
        "latency_ms",
        "num_failed",
    ]
    labels = {
        "kept_ratio": "retain ratio (setting, or measured visual tokens kept)",
        "accuracy": "accuracy (share correct)",
        "prefill_tflops": "prefill TFLOPs (4nd^2 + 2n^2d + 2ndm per layer)",
        "visual_tokens_after": "visual tokens entering the LLM",
        "visual_tokens_final": "visual tokens at the last layer",
    }
    empty_reasons = {"accuracy": "the manifest has no answers"}

    def __init__(self, options: VideoQAOptions, context) -> None:
        super().__init__(options, context)
        self._model = None
        self._processor = None
        self._cache: dict[tuple[str, str], dict] = {}
        self._clips: dict[str, Any] = {}
        self._pos: dict[str, int] | None = None

    # ------------------------------------------------------------------ setup
    def settings(self) -> list[Setting]:
        return expand_settings(self.options.settings)

    def notes(self) -> list[str]:
        lines = []
        if self.options.random_weights:
            lines.append(
                f"Model {self.options.model} has random weights: accuracy is meaningless "
                "(chance or worse); tokens, FLOPs and times are real."
            )
        lines.append(
            "visual_tokens_before: from the processor; _after: entering the decoder; _final: at "
            "its last layer. prefill_tflops: analytic, over the lengths the layers saw. ttft_ms / "
            f"latency_ms: per generate call of batch_size {self.options.batch_size}."
        )
        return lines

    def _load(self):
        if self._model is None:
            device = torch.device(self.context.device)
            dtype = model_dtype(self.options.dtype, device)
            key = (self.options.model, str(device), str(dtype))
            key += (self.options.attn_implementation, self.context.seed)
            if key not in _LOADED:  # one load per process (the settings check reuses it)
                _LOADED.clear()
                _LOADED[key] = load_model(
                    self.options.model,
                    device=device,
                    dtype=dtype,
                    attn_implementation=self.options.attn_implementation,
                    seed=self.context.seed,
                )
            self._model, self._processor = _LOADED[key]
        return self._model, self._processor

    def check_settings(self) -> None:
        """Load the model and apply every setting's method once (then remove it), so a
        setting the model cannot take (a layer past its depth...) stops the run before
        any work instead of failing every sample. ``ValueError`` naming the setting."""
        model, _ = self._load()
        for setting in self.settings():
            method = setting.build()
            if method is None:
                continue
            try:
                method.apply(model).remove()
            except (ValueError, TypeError, NotImplementedError) as e:
                raise ValueError(f"setting {setting.label} on {self.options.model}: {e}") from e

    def load_clip(self, sample: QASample):
        """The sample's :class:`video.io.VideoClip`, sampled as options and processor ask."""
        from video.io import load_video, loader_options

        _, processor = self._load()
        o = self.options
        clip = load_video(
            sample.video,
            num_frames=o.frames,
            fps=o.fps,
            max_frames=o.max_frames,
            start=sample.start,
            end=sample.end,
            **loader_options(processor),
        )
        return clip

    # ------------------------------------------------------------------ rows
    def _positions(self) -> dict[str, int]:
        """Sample id -> position in this process's order (empty without run data)."""
        if self._pos is None:
            data = self.context.data if self.context is not None else None
            order = data.order if isinstance(data, VideoQAData) else []
            self._pos = {sid: i for i, sid in enumerate(order)}
        return self._pos

    def _batch(self, sample: QASample, clip) -> list[tuple[QASample, Any]]:
        """This sample and up to ``batch_size - 1`` following ones with the same frame shape."""
        batch = [(sample, clip)]
        pos = self._positions()
        if self.options.batch_size == 1 or sample.id not in pos:
            return batch
        data: VideoQAData = self.context.data
        for sid in data.order[pos[sample.id] + 1 :]:
            if len(batch) >= self.options.batch_size:
                break
            other = data.samples[sid]
            try:
                c = self.load_clip(other)
            except Exception as e:  # its own turn records the failure
                logger.debug("not batching %s: %s", sid, e)
                continue
            if c.frames.shape == clip.frames.shape:
                batch.append((other, c))
                self._clips[sid] = c
        return batch

    def _setting_rows(self, setting: Setting, batch) -> dict[str, dict]:
        model, processor = self._load()
        method = setting.build()
        samples = [s for s, _ in batch]
        try:
            rows = answer_batch(
                model,
                processor,
                samples,
                [c.frames for _, c in batch],
                method=method,
                max_new_tokens=self.options.max_new_tokens,
                metadata=[c.hf_metadata() for _, c in batch],
            )
        except Exception:
            if len(batch) == 1:
                raise
            logger.warning(
                "batch of %d failed under %s; answering alone", len(batch), setting.label
            )
            return self._setting_rows(setting, batch[:1])
        return {s.id: r for s, r in zip(samples, rows)}

    def run_unit(self, unit: QASample, settings: list[Setting], progress) -> Iterator[dict]:
        sample = unit
        progress("decoding video")
        clip = self._clips.pop(sample.id, None)
        pos = self._positions()
        if sample.id in pos:
            # batch-mates whose rows an earlier run finished are never asked for: drop them
            here = pos[sample.id]
            for sid in [k for k in self._clips if pos.get(k, -1) < here]:
                del self._clips[sid]
                self._cache = {k: v for k, v in self._cache.items() if k[0] != sid}
        if clip is None:
            clip = self.load_clip(sample)  # a bad file fails this sample only
        batch = None
        for setting in settings:
            key = (sample.id, setting.label)
            if key not in self._cache:
                if batch is None:
                    batch = self._batch(sample, clip)
                progress(f"{setting.label} (batch {len(batch)})")
                for sid, row in self._setting_rows(setting, batch).items():
                    self._cache[(sid, setting.label)] = row
            row = self._cache.pop(key)
            yield {"setting": setting.label, **self._finish(sample, setting, row)}

    def _finish(self, sample: QASample, setting: Setting, row: dict) -> dict:
        ratio = None
        for k in _RATIO_PARAMS:
            if isinstance(setting.params.get(k), (int, float)):
                ratio = float(setting.params[k])
                break
        if setting.method == "full":
            ratio = 1.0
        if ratio is None and row["visual_tokens_before"]:
            ratio = row["visual_tokens_final"] / row["visual_tokens_before"]
        out = {
            "kept_ratio": ratio,
            **row,
            "question": sample.question,
            "video": sample.video,
            "model": self.options.model,
            "accuracy_valid": not self.options.random_weights and row["accuracy"] is not None,
        }
        out.update({f"meta_{k}": v for k, v in sample.meta.items()})
        return out
