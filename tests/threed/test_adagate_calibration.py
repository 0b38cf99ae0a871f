"""AdaGate calibration, profiles and the spatial contribution analysis."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.flops import decoder_prefill_flops
from threed.adagate import (
    AdaGate,
    AdaGateProfile,
    ProfileMismatchError,
    choose_schedule,
    exp_decay,
    fit_keep_curve,
    measure_spatial_flow,
)
from threed.adagate.calibrate import schedule_tokens
from threed.analysis import spatial_contribution

from .llava3d_standin import build, llava3d_batch
from .test_adagate import _llama as tiny_llama


def _llama(layers: int = 6, impl: str = "sdpa", seed: int = 0):
    """The runtime tests' tiny LLaMA (4 heads, 2 KV heads, width 64)."""
    return tiny_llama(impl, layers=layers, seed=seed)


def _samples(n: int = 2, seed: int = 0):
    """LLaVA-3D-like text layout: 12 prefix, 60 spatial, 14 question tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, 128, (1, 86), generator=gen), "spatial_spans": [(12, 72)]}
        for _ in range(n)
    ]


def _brute_force(model, ids, mask, spatial):
    """Per-layer flows from the eager model's full attention maps (the definition)."""
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    intra, text, recv = [], [], []
    for a in att:
        a = a.mean(1)  # [B, L, L] head-averaged
        i_b, t_b, r_b = [], [], []
        for b in range(ids.shape[0]):
            sp = spatial[b]
            first = int(sp.nonzero()[0])
            tq = ~sp & mask[b].bool() & (torch.arange(ids.shape[1]) > first)
            on_sp = a[b][:, sp].sum(-1)
            i_b.append(on_sp[sp].mean())
            t_b.append(on_sp[tq].mean())
            r_b.append(a[b][tq][:, sp].mean(0))
        intra.append(torch.stack(i_b).mean())
        text.append(torch.stack(t_b).mean())
        recv.append(r_b)
    return torch.stack(intra), torch.stack(text), recv


@pytest.mark.parametrize("impl", ("sdpa", "eager"))
def test_flow_measurement_equals_the_full_attention_maps(impl):
    """Streamed per-layer flows (query blocks of 16, any attention implementation) equal
    the ones read from every layer's full eager attention map, on a left-padded batch."""
    model = _llama(impl=impl)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 70), generator=gen)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :6] = 0
    spans = [[(10, 50)], [(16, 46)]]
    spatial = torch.zeros(2, 70, dtype=torch.bool)
    spatial[0, 10:50] = True
    spatial[1, 16:46] = True
    sample = {"input_ids": ids, "attention_mask": mask, "spatial_spans": spans}
    flow = measure_spatial_flow(model, [sample], query_chunk=16)
    intra, text, recv = _brute_force(model, ids, mask, spatial)
    torch.testing.assert_close(flow.intra, intra, rtol=0, atol=1e-5)
    torch.testing.assert_close(flow.text, text, rtol=0, atol=1e-5)
    for b in range(2):
        want = torch.stack([layer[b] for layer in recv])
        torch.testing.assert_close(flow.received[b], want, rtol=0, atol=1e-6)
    assert flow.num_samples == 2
    assert flow.num_spatial == 35.0


def test_spatial_query_stride_estimates_intra_from_every_kth_query():
    model = _llama()
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(5))
    sample = {"input_ids": ids, "spatial_spans": [(10, 50)]}
    flow = measure_spatial_flow(model, [sample], spatial_query_stride=3)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    picked = torch.arange(10, 50, 3)
    want = torch.stack([a[0].mean(0)[picked][:, 10:50].sum(-1).mean() for a in att])
    torch.testing.assert_close(flow.intra, want, rtol=0, atol=1e-5)
    exact = measure_spatial_flow(model, [sample])
    torch.testing.assert_close(flow.text, exact.text)  # text queries are all still read
    with pytest.raises(ValueError, match="spatial_query_stride"):
        measure_spatial_flow(model, [sample], spatial_query_stride=0)


def test_fit_recovers_a_known_decay_curve():
    num_layers, floor = 32, 12.0
    x = torch.arange(1, num_layers + 1, dtype=torch.float64)
    b_true = 0.15
    a = (100 - floor) / (1 - math.exp(-b_true * (num_layers - 1)))
    y = (a * torch.exp(-b_true * (x - 1)) + 100 - a) / 100
    (A, B, C, D), curve = fit_keep_curve(y, floor=floor)
    assert B == pytest.approx(b_true, rel=1e-3)
    assert exp_decay(1, A, B, C, D) == pytest.approx(100.0)
    assert exp_decay(num_layers, A, B, C, D) == pytest.approx(floor)
    torch.testing.assert_close(curve.double(), 100 * y, rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="floor"):
        fit_keep_curve(y, floor=100.0)


def test_schedule_meets_the_flops_target():
    flow = torch.linspace(1, 0, 16) ** 2
    dims = dict(hidden_size=512, intermediate_size=1376, kv_dim=512, mlp="swiglu")
    sched = choose_schedule(
        flow, target_flops=0.37, num_text=75, num_spatial=1600, stages=3, **dims
    )
    tokens = schedule_tokens(sched.layers, sched.keep, 16, 75, 1600)
    full = decoder_prefill_flops(1675, 512, 1376, 16, mlp="swiglu")
    ratio = decoder_prefill_flops([round(t) for t in tokens], 512, 1376, mlp="swiglu") / full
    assert ratio == pytest.approx(sched.flops_ratio, abs=2e-3)
    assert 0.36 <= sched.flops_ratio <= 0.37
    assert list(sched.keep) == sorted(sched.keep, reverse=True)
    assert len(sched.layers) == 3 and all(1 <= layer < 16 for layer in sched.layers)
    with pytest.raises(ValueError, match="cannot be reached"):
        choose_schedule(flow, target_flops=0.01, num_text=75, num_spatial=1600, **dims)


def test_calibration_keeps_at_least_min_keep_tokens():
    """The floor of every gate is min_keep_tokens of the samples' 60-token span."""
    model = _llama(layers=8)
    samples = _samples(2)
    bare = AdaGate.calibrate(model, samples, target_flops=0.6, stages=2, min_keep_tokens=1)
    floored = AdaGate.calibrate(model, samples, target_flops=0.75, stages=2, min_keep_tokens=30)
    assert min(floored.keep) >= 0.5 and floored.flops_ratio <= 0.75 + 1e-9
    assert floored.extra["min_keep_tokens"] == 30
    assert min(bare.keep) < 0.5  # the floor is what holds the schedule up
    with pytest.raises(ValueError, match="min_keep"):
        AdaGate.calibrate(model, samples, target_flops=0.6, stages=2, min_keep_tokens=60)
    with pytest.raises(ValueError, match="min_keep_tokens"):
        AdaGate.calibrate(model, samples, target_flops=0.6, min_keep_tokens=0)


def test_calibration_round_trip(tmp_path):
    model = _llama(layers=8)
    out = tmp_path / "profiles" / "tiny.json"
    profile = AdaGate.calibrate(model, _samples(3), target_flops=0.6, out=out, stages=2)
    assert out.exists()
    data = json.loads(out.read_text())
    assert data["num_layers"] == 8 and data["layers"] == list(profile.layers)
    assert len(data["curve"]) == 8 and len(data["flow"]) == 8
    assert data["curve"][0] == pytest.approx(100.0)
    loaded = AdaGateProfile.load(out)
    assert loaded == profile
    gate = AdaGate.from_profile(out)
    assert gate.layers == profile.layers and gate.keep == profile.keep
    # the chosen schedule really costs what the profile says (analytic, on the samples' layout)
    assert profile.flops_ratio <= 0.6 + 1e-9
    ids = _samples(1, seed=9)[0]["input_ids"]
    with gate.apply(model, spatial_spans=[(12, 72)]) as h:
        with torch.no_grad():
            model(ids)
        kept = [h.last_counts[layer][0] for layer in profile.layers]
    want = [max(1, round(60 * k)) for k in profile.keep]
    assert kept == want
    # another depth is refused clearly
    with pytest.raises(ProfileMismatchError, match="8-layer decoder; this model has 6 layers"):
        AdaGate.from_profile(out).apply(_llama(layers=6), spatial_spans=[(12, 72)])


def test_profile_files_fail_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        AdaGateProfile.load(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an AdaGate profile"):
        AdaGateProfile.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        AdaGateProfile.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="keep"):
        AdaGateProfile(model_name="m", num_layers=8, layers=(2, 4), keep=(0.5,))


def test_calibration_on_llava3d_inputs():
    """Raw LLaVA-3D generate inputs: spans come from its input builder (stand-in)."""
    model = build(seed=0, layers=6)
    samples = []
    for seed in range(2):
        ids, mask, images, clicks = llava3d_batch(
            seed=seed, scene_tokens=(60,), question=(12,), click=(True,)
        )
        samples.append({"input_ids": ids, "images": images, "clicks": clicks})
    profile = AdaGate.calibrate(model, samples, target_flops=0.7, stages=2)
    assert profile.num_layers == 6
    assert profile.extra["num_spatial"] == 60.0
    assert profile.extra["num_text"] == 35 + 1 + 1 + 12  # prefix, "\n", click, question
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__


def test_spatial_contribution_numbers_and_plot(tmp_path):
    model = _llama()
    with torch.no_grad():  # sharper attention than random init gives, so some tokens are low
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    samples = _samples(2)
    res = spatial_contribution(model, samples, threshold=0.05)
    # the definition, from full eager attention maps
    want = []
    for s in samples:
        spatial = torch.zeros(1, 86, dtype=torch.bool)
        spatial[0, 12:72] = True
        _, _, recv = _brute_force(model, s["input_ids"], torch.ones(1, 86), spatial)
        r = torch.stack([layer[0] for layer in recv])
        want.append(((r / r.max(1, keepdim=True).values) < 0.05).double().mean(1))
    torch.testing.assert_close(
        torch.tensor(res.low_share, dtype=torch.float64), torch.stack(want).mean(0)
    )
    assert res.num_samples == 2 and len(res.low_share) == 6
    assert 0.2 < res.mean_low_share < 0.8
    # the low tokens hold a small share of the mass: each is under 5% of the top token
    assert all(m < 0.5 * s for m, s in zip(res.mass_of_low, res.low_share))
    with pytest.raises(ValueError, match="threshold"):
        spatial_contribution(model, samples, threshold=1.5)


def test_spatial_contribution_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = spatial_contribution(_llama(layers=2), _samples(1), out=tmp_path)
    png = tmp_path / "spatial_contribution.png"
    assert res.plot == str(png)
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "spatial_contribution.json").read_text())
    assert data["low_share"] == res.low_share and data["threshold"] == 0.05


@pytest.mark.slow
def test_adagate_imports_with_torch_and_transformers_only():
    """LLaVA-3D's environment: no spconv / open3d / matplotlib. ``from threed import AdaGate``
    loads none of them, and gating plus calibration run there."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('spconv', 'open3d', 'matplotlib', 'decord', 'av'):\n"
        "    sys.modules[name] = None  # importing them now raises ImportError\n"
        "import torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from threed import AdaGate\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,\n"
        "                  num_hidden_layers=3, num_attention_heads=2)\n"
        "m = LlamaForCausalLM(cfg).eval()\n"
        "ids = torch.randint(3, 60, (1, 40))\n"
        "with AdaGate(layers=(1, 2), keep=(0.5, 0.25)).apply(m, spatial_spans=[(5, 30)]) as h:\n"
        "    m.generate(ids, max_new_tokens=2, do_sample=False)\n"
        "    assert h.last_counts == {1: [12], 2: [6]}, h.last_counts\n"
        "p = AdaGate.calibrate(m, [{'input_ids': ids, 'spatial_spans': [(5, 30)]}],\n"
        "                      target_flops=0.9, stages=1)\n"
        "print('ok', p.layers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
