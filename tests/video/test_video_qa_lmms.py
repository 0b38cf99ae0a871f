"""The lmms-eval plugin's model class on hand-made requests (lmms-eval is not installed here).

lmms-eval builds requests whose ``args`` are ``(context, gen_kwargs,
doc_to_visual, doc_id, task, split)`` and sets ``model.task_dict``; the
requests below are duck-typed stand-ins with exactly that shape.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest

from video.qa import read_manifest


@dataclass
class Request:
    args: tuple


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from video.synthetic import ensure_synthetic_video_qa

    data = ensure_synthetic_video_qa(tmp_path_factory.mktemp("syn"), num_videos=2)
    return data, read_manifest(data.manifest)


def _requests(samples, gen_kwargs, task="syn", split="test"):
    docs = [{"video": s.video, "question": s.question} for s in samples]
    reqs = [
        Request(
            (f"<image>{s.question}\nAnswer:", gen_kwargs, lambda d: [d["video"]], i, task, split)
        )
        for i, s in enumerate(samples)
    ]
    return {task: {split: docs}}, reqs


def test_plugin_layout_is_what_lmms_eval_loads():
    """``LMMS_EVAL_PLUGINS=video.lmms_plugin``: lmms-eval imports ``<plugin>.models``, reads
    ``AVAILABLE_MODELS`` and imports ``<plugin>.models.<name>.<Class>``; it also needs
    ``<plugin>.tasks`` to be a package."""
    models = importlib.import_module("video.lmms_plugin.models")
    assert set(models.AVAILABLE_MODELS) == {"holoprune_llava_onevision", "holoprune_qwen2_vl"}
    for name, cls_name in models.AVAILABLE_MODELS.items():
        cls = getattr(importlib.import_module(f"video.lmms_plugin.models.{name}"), cls_name)
        assert callable(cls.generate_until) and callable(cls.loglikelihood)
    spec = importlib.util.find_spec("video.lmms_plugin.tasks")
    assert spec is not None and spec.submodule_search_locations
    # recent lmms-eval reads the "lmms_eval.models" entry point of the installed package
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lmms_eval.models"]["holoprune"]
    module, attr = target.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_generate_until_matches_the_qa_path_and_keeps_order(synthetic):
    """Unpruned, the plugin's answers equal a direct processor + generate on the same prompt;
    order follows the requests, batches of 2."""
    from video.lmms_plugin import HoloPruneLlavaOnevision

    data, samples = synthetic
    lm = HoloPruneLlavaOnevision(
        pretrained="tiny-random-llava-onevision", max_frames_num=4, batch_size=2
    )
    task_dict, reqs = _requests(samples[:3], {"max_new_tokens": 4, "until": []})
    lm.task_dict = task_dict
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # the same prompts through generate directly, one at a time
    from video.io import load_video, loader_options

    for req, answer in zip(reqs, answers):
        context = req.args[0].replace("<image>", "").strip()
        frames = load_video(
            task_dict["syn"]["test"][req.args[3]]["video"],
            num_frames=4,
            **loader_options(lm.processor),
        ).frames
        messages = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": context}]}
        ]
        prompt = lm.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = lm.processor(text=[prompt], videos=[frames], return_tensors="pt")
        out = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        direct = lm.processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        assert answer == direct[0]


def test_method_is_applied_and_until_truncates(synthetic):
    from video.lmms_plugin import HoloPruneQwen2VL

    data, samples = synthetic
    lm = HoloPruneQwen2VL(
        pretrained="tiny-random-qwen2-vl",
        method="holitom",
        retain_ratio="0.25",
        inner_layer="2",
        max_frames_num="4",
    )
    assert lm.method.retain_ratio == 0.25 and lm.handle.active
    task_dict, reqs = _requests(samples[:2], {"max_new_tokens": 6})
    lm.task_dict = task_dict
    free = lm.generate_until(reqs)
    last = lm.handle.last
    assert last is not None  # the reducer shortened the prefill
    assert all(s < f for s, f in zip(last["short_length"], last["full_length"]))
    stop = next((a[1] for a in free if len(a) > 1), None)
    if stop is None:
        pytest.skip("random answers too short to test stop strings")
    task_dict, reqs = _requests(samples[:2], {"max_new_tokens": 6, "until": [stop]})
    cut = lm.generate_until(reqs)
    for before, after in zip(free, cut):
        assert stop not in after and before.startswith(after)


def test_bad_model_args():
    from video.lmms_plugin import HoloPruneLlavaOnevision, HoloPruneQwen2VL

    with pytest.raises(ValueError, match="retain_ratio"):
        HoloPruneLlavaOnevision(
            pretrained="tiny-random-llava-onevision", method="holitom", retain_ratio=0.0
        )
    with pytest.raises(ValueError, match="no method is given"):
        HoloPruneLlavaOnevision(pretrained="tiny-random-llava-onevision", retain_ratio=0.1)
    with pytest.raises(ValueError, match="needs a qwen2_vl checkpoint"):
        HoloPruneQwen2VL(pretrained="tiny-random-llava-onevision")
    lm = HoloPruneLlavaOnevision(pretrained="tiny-random-llava-onevision")
    with pytest.raises(NotImplementedError):
        lm.loglikelihood([])
    with pytest.raises(ValueError, match="video path or a list of frames"):
        lm._frames([3])
    frames, meta = lm._frames([np.zeros((8, 8, 3), np.uint8)] * 2)
    assert frames.shape == (2, 8, 8, 3) and meta is None
