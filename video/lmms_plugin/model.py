"""The lmms-eval model class behind ``holoprune_llava_onevision`` / ``holoprune_qwen2_vl``.

lmms-eval is an optional dependency: where it is installed the class derives
from ``lmms_eval.api.model.lmms`` and registers with ``register_model``;
without it the class is a plain object with the same interface (the tests
drive ``generate_until`` with hand-made requests that carry the same
``args`` tuple lmms-eval builds).

What lmms-eval hands ``generate_until``: a list of requests whose ``args``
are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the
visuals of a document are ``doc_to_visual(self.task_dict[task][split][doc_id])``
(video tasks: a list with one video path). ``gen_kwargs`` may hold
``until``, ``max_new_tokens``, ``temperature``, ``top_p``, ``num_beams``,
``do_sample``. The answers come back in request order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["HoloPruneVideoLMM", "register"]

_FAMILIES = {"llava_onevision": ("llava_onevision",), "qwen2_vl": ("qwen2_vl", "qwen2_5_vl")}


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError:  # optional: the class still works (and is tested) without lmms-eval
        return object
    return lmms


def register(name: str):
    """Register with lmms-eval's ``register_model`` when it exists (the plugin's
    ``AVAILABLE_MODELS`` covers versions without it)."""

    def deco(cls: type) -> type:
        try:
            from lmms_eval.api.registry import register_model
        except ImportError:
            return cls
        try:
            return register_model(name)(cls)
        except Exception as e:  # already registered (the plugin loader got there first)
            logger.debug("register_model(%s): %s", name, e)
            return cls

    return deco


def _parse(value: Any) -> Any:
    from video.qa import _value

    return _value(value) if isinstance(value, str) else value


class HoloPruneVideoLMM(_lmms_base()):
    """A Hugging Face video LLM with a holoprune method applied, as an lmms-eval model.

    ``--model_args pretrained=PATH,method=holitom,retain_ratio=0.1`` -> every
    argument that is not one of the loader's (``pretrained``, ``method``,
    ``device``, ``dtype``, ``batch_size``, ``max_frames_num``, ``fps``,
    ``attn_implementation``, ``max_new_tokens``, ``seed``) is a parameter of
    the method (``build_method(method, **params)``; a bad one raises naming
    the field). ``method`` omitted or ``none``: the unpruned model.
    ``pretrained`` may also be a tiny random model name (tests).
    """

    family = ""  # set by the registered subclasses

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_frames_num: int | str = 32,
        fps: float | str | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int | str = 16,
        seed: int | str = 0,
        max_batch_size: int | str | None = None,  # lmms-eval passes it to every model; unused
        **method_params: Any,
    ) -> None:
        if _lmms_base() is not object:
            super().__init__()
        else:
            self.task_dict: dict = {}
        from common.methods import build_method
        from common.runs import dist_info
        from video.qa import load_model, model_dtype

        self.batch_size_per_gpu = int(_parse(batch_size))
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_frames_num = int(_parse(max_frames_num))
        self.fps = None if fps in (None, "", "none") else float(_parse(fps))
        self.max_new_tokens = int(_parse(max_new_tokens))
        self._rank, self._world_size, local = dist_info()
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        torch_dtype = model_dtype(dtype, self._device)
        self._model, self.processor = load_model(
            str(pretrained),
            device=self._device,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            seed=int(_parse(seed)),
        )
        model_type = getattr(self._model.config, "model_type", "")
        if self.family and model_type not in _FAMILIES[self.family]:
            raise ValueError(
                f"{type(self).__name__} needs a {self.family} checkpoint, got model_type "
                f"{model_type!r} from {pretrained}"
            )
        self.method_name = None if method in (None, "", "none", "full") else str(method)
        params = {k: _parse(v) for k, v in method_params.items()}
        if params and self.method_name is None:
            raise ValueError(
                f"model_args {', '.join(sorted(params))} are method parameters but no method "
                "is given (method=holitom, ...)"
            )
        self.method = None
        self.handle = None
        if self.method_name is not None:
            self.method = build_method(self.method_name, **params)
            self.handle = self.method.apply(self._model)
        logger.info("holoprune lmms model: %s with %s", pretrained, self.method or "no method")

    # ------------------------------------------------------------------ lmms-eval's interface
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def tok_encode(self, text: str, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests: list) -> list:
        raise NotImplementedError(
            "holoprune lmms models answer generation tasks only (generate_until)"
        )

    def generate_until_multi_round(self, requests: list) -> list:
        raise NotImplementedError("holoprune lmms models answer single-round tasks only")

    def generate_until(self, requests: list) -> list[str]:
        """Answers of ``requests`` (see the module docstring), in request order.

        Consecutive requests with equal ``gen_kwargs`` are answered together,
        ``batch_size`` at a time.
        """
        out: list[str] = []
        batch: list = []
        key = None
        for req in requests:
            k = json.dumps(req.args[1], sort_keys=True, default=str)
            if batch and (k != key or len(batch) >= self.batch_size_per_gpu):
                out += self._answer(batch)
                batch = []
            key = k
            batch.append(req)
        if batch:
            out += self._answer(batch)
        return out

    # ------------------------------------------------------------------ internals
    def _frames(self, visuals: Any) -> tuple[np.ndarray, dict | None]:
        """``[T, H, W, 3]`` uint8 from a document's visuals (a video path, or frames), and the
        clip's sampling metadata (``None`` for frames given as images)."""
        from video.io import load_video, loader_options

        if isinstance(visuals, (list, tuple)) and len(visuals) == 1:
            visuals = visuals[0]
        if isinstance(visuals, (str, os.PathLike)):
            kwargs: dict[str, Any] = dict(loader_options(self.processor))
            if self.fps is not None:
                kwargs.update(fps=self.fps, max_frames=self.max_frames_num)
            else:
                kwargs["num_frames"] = self.max_frames_num
            clip = load_video(visuals, **kwargs)
            return clip.frames, clip.hf_metadata()
        if isinstance(visuals, (list, tuple)) and visuals:  # frames (PIL images or arrays)
            frames = [np.asarray(v.convert("RGB") if hasattr(v, "convert") else v) for v in visuals]
            if len({f.shape for f in frames}) != 1:
                raise ValueError("frames of one document must share one size")
            return np.stack(frames), None
        raise ValueError(
            f"expected a video path or a list of frames as the document's visual, got "
            f"{type(visuals).__name__}"
        )

    def _answer(self, batch: list) -> list[str]:
        from video.qa import video_inputs

        contexts, gen_kwargs, videos, metadata = [], batch[0].args[1] or {}, [], []
        for req in batch:
            context, _, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id] if split is not None else None
            if doc is None:
                doc = self.task_dict[task][doc_id]
            frames, meta = self._frames(doc_to_visual(doc))
            videos.append(frames)
            metadata.append(meta)
            contexts.append(str(context).replace("<image>", "").strip())
        inputs = video_inputs(self._model, self.processor, contexts, videos, metadata)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        generate = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            do_sample=bool(gen_kwargs.get("do_sample", False)) and temperature > 0,
            num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if generate["do_sample"]:
            generate["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generate["top_p"] = float(gen_kwargs["top_p"])
        with torch.inference_mode():
            out = self._model.generate(**inputs, **generate)
        texts = self.processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        answers = []
        for req, text in zip(batch, texts):
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            hook = getattr(self, "cache_hook", None)
            if hook is not None:
                hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
            answers.append(text)
        return answers
