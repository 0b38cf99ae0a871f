"""Video baselines (VisionZip, DivPrune, uniform frames) and the in-LLM ones (FastV, PDrop)
on the same tiny LLaVA-OneVision / Qwen2-VL models, through one API."""

from __future__ import annotations

import pytest
import torch

from common.methods import build_method, get_method
from tests.engine._tiny import generate
from tests.video._models import BUILDERS, VIDEO_ID, sample

NEW = 3
OUTER = ("visionzip", "divprune", "uniform_frames")


def _generate(model, inputs):
    """Greedy: ``.sequences`` and per-step ``.logits``."""
    return generate(model, NEW, **inputs)


@pytest.mark.parametrize("kind", ["llava_ov", "qwen2_vl"])
@pytest.mark.parametrize("name", OUTER)
def test_outer_baseline_keeps_its_budget_and_each_sample_decodes_as_alone(name, kind):
    model, inputs = BUILDERS[kind]("sdpa")
    with torch.no_grad():
        ref = model(**inputs).logits
    with build_method(name, retain_ratio=1.0).apply(model):  # keep-all: the identity
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)
    ratio = 0.5
    with build_method(name, retain_ratio=ratio).apply(model) as handle:
        batch = _generate(model, inputs)
        short = handle.last["input_ids"]
        alone = [_generate(model, sample(inputs, b, kind)) for b in range(2)]
    frames_tokens = int((inputs["input_ids"][0] == VIDEO_ID).sum())
    if kind == "llava_ov":
        frames_tokens -= 1  # the newline stays on top of the budget
    for b in range(2):
        n_video = int((short[b] == VIDEO_ID).sum())
        kept = n_video - (1 if kind == "llava_ov" else 0)
        # per-frame rounding: at most one frame's tokens (16 here) off the budget
        assert abs(kept - ratio * frames_tokens) <= 16, (name, kept)
        n = alone[b].sequences.shape[1]
        assert torch.equal(batch.sequences[b, -NEW:], alone[b].sequences[0, n - NEW :])
        for t in range(NEW):
            torch.testing.assert_close(batch.logits[t][b], alone[b].logits[t][0], atol=1e-4, rtol=0)


def test_uniform_frames_keeps_whole_evenly_spaced_frames():
    model, inputs = BUILDERS["llava_ov"]("sdpa")
    with build_method("uniform_frames", retain_ratio=0.5).apply(model) as handle:
        with torch.no_grad():
            model(**inputs)
    res = handle.last["reduced"][0]
    frames = sorted(set(res.frame[res.position >= 0].tolist()))
    assert frames == [0, 2, 5]  # 6 frames * 0.5 = 3: linspace(0, 5, 3) rounded (2.5 -> 2)
    counts = [int(((res.frame == f) & (res.position >= 0)).sum()) for f in frames]
    assert counts == [16] * len(frames)


@pytest.mark.parametrize("kind", ["llava_ov", "qwen2_vl"])
def test_methods_compare_by_changing_one_name(kind):
    model, inputs = BUILDERS[kind]("sdpa")
    settings = {
        "holitom": {"retain_ratio": 0.25, "tau": 0.65, "inner_layer": 2, "inner_ratio": 0.5},
        "visionzip": {"retain_ratio": 0.25},
        "divprune": {"retain_ratio": 0.25},
        "uniform_frames": {"retain_ratio": 0.34},
        "fastv": {"layer": 2, "keep_ratio": 0.25},
        "pdrop": {"layers": (1, 2), "ratios": (0.5, 0.5)},
    }
    full = _generate(model, inputs)
    for name, params in settings.items():
        spec = get_method(name)
        with spec.build(**params).apply(model):
            out = _generate(model, inputs)
        # the original prompt comes back, followed by NEW tokens, for every method
        assert out.sequences.shape == full.sequences.shape, name
        assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("name", ("holitom", *OUTER))
def test_grid_layout_is_refused_on_qwen2_vl(name):
    """Qwen2-VL places no newline tokens: layout='grid' is an error for every outer stage."""
    model, _ = BUILDERS["qwen2_vl"]()
    with pytest.raises(ValueError, match="layout='grid' needs a LLaVA model"):
        build_method(name, layout="grid").apply(model)
