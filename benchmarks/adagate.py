"""AdaGate benchmark: a LLaVA-3D-shaped prefill at tiny width, side by side.

Model: ``LlamaForCausalLM`` with random weights, hidden 512, 16 layers, 8
heads (no GQA, as LLaMA-7B), SwiGLU MLP 1376 (LLaMA's 11008 / 4096 ratio),
float32, SDPA, CPU. Random initialisation attends almost uniformly, so the
q / k projections are scaled (``QK_SCALE``) to give attention a trained
model's concentration; otherwise "the smallest set holding 90% of the mass"
is nearly everything. Layout as LLaVA-3D: 35 prefix tokens, the spatial
span (1600 tokens; the calibration / spread samples vary it over
1200..2000 as scenes do), one click token, 40 question tokens, fed as
``inputs_embeds``.

Figures (all ratios measured side by side in one interleaved run):

* calibration: ``AdaGate.calibrate`` on 8 samples with a prefill FLOPs
  target of 0.37 (the paper's "63% fewer"), wall time;
* prefill: unpruned vs the calibrated schedule vs AdaGate adaptive vs FastV
  at the schedule's FLOPs; speedup against the analytic FLOPs-ideal
  (``4nd^2 + 2n^2d + 3ndm`` per layer; goal >= 0.8 x ideal);
* gating overhead: time inside AdaGate's scoring and selection during the
  pruned prefill, over the unpruned prefill (goal < 3%);
* adaptive spread: per-sample kept counts at each gate across samples;
* FLOPs counted by ``torch.utils.flop_counter`` (eager) next to the analytic ratio.
"""

from __future__ import annotations

import logging
import statistics

import torch

from benchmarks.engine import random_decoder
from common.benchmark import clock, summarize, time_interleaved
from common.checks import budget
from common.engine import FastV
from common.flops import count_flops, decoder_prefill_flops
from threed.adagate import AdaGate

logger = logging.getLogger(__name__)

__all__ = ["run"]

QK_SCALE = 4.0
PREFIX, CLICK, QUESTION = 35, 1, 40


def _model(hidden: int, layers: int, inter: int, heads: int, impl: str = "sdpa"):
    """A random LLaMA decoder (no GQA) with the q / k projections scaled by ``QK_SCALE``."""
    model = random_decoder(
        hidden, layers, inter, heads, heads, impl, family="llama", max_positions=4096
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    return model


def _sample(model, n_spatial: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[1, L, D]`` embeddings: prefix text, spatial span, click, question; and the span."""
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    n_text = PREFIX + CLICK + QUESTION
    ids = torch.randint(10, 1000, (1, n_text), generator=gen)
    with torch.no_grad():
        text = emb(ids)
    scale = float(emb.weight.detach().std())
    spatial = scale * torch.randn(1, n_spatial, text.shape[-1], generator=gen)
    embeds = torch.cat([text[:, :PREFIX], spatial, text[:, PREFIX:]], dim=1)
    return embeds, (PREFIX, PREFIX + n_spatial)


def _tokens_per_layer(n_text: int, n_spatial: int, num_layers: int, gates: dict[int, int]):
    per, cur = [], n_spatial
    for i in range(num_layers):
        cur = gates.get(i, cur)
        per.append(n_text + cur)
    return per


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; returns one dict per figure (see the module docstring)."""
    if quick:
        hidden, layers, inter, heads, n_sp, repeats, n_spread = 256, 8, 688, 4, 600, 3, 3
        sp_range = (450, 750)
    else:
        hidden, layers, inter, heads, n_sp, repeats, n_spread = 512, 16, 1376, 8, 1600, 3, 4
        sp_range = (1200, 2000)
    n_text = PREFIX + CLICK + QUESTION
    target = 0.37
    base = _model(hidden, layers, inter, heads)
    state = base.state_dict()

    # ---- calibration on 8 samples (scene sizes vary as LLaVA-3D's do)
    sizes = torch.linspace(*sp_range, 8).round().long().tolist()
    calib = []
    for i, n in enumerate(sizes):
        e, span = _sample(base, n, seed=100 + i)
        calib.append({"inputs_embeds": e, "spatial_spans": [span]})
    t0 = clock()
    profile = AdaGate.calibrate(base, calib, target_flops=target, stages=3, spatial_query_stride=8)
    calib_s = clock() - t0
    rows: list[dict] = [
        {
            "name": "adagate/calibration",
            "samples": len(calib),
            "spatial_tokens": f"{sizes[0]}..{sizes[-1]}",
            "seconds": calib_s,
            "goal_met": calib_s < 60.0,
            "layers": list(profile.layers),
            "keep": [round(k, 4) for k in profile.keep],
            "flops_ratio_analytic": profile.flops_ratio,
            "spatial_query_stride": 8,
        }
    ]

    # ---- one prompt, four settings, each on its own copy of the same weights
    embeds, span = _sample(base, n_sp, seed=0)
    n = embeds.shape[1]
    schedule = AdaGate.from_profile(profile)
    adaptive = AdaGate(
        layers=profile.layers,
        keep=(1.0,) * len(profile.layers),
        mode="adaptive",
        mass=0.9,
        min_keep=min(profile.keep),
        max_keep=profile.keep[0],
    )
    sched_counts = {layer: budget(n_sp, k) for layer, k in zip(profile.layers, profile.keep)}
    f_full = decoder_prefill_flops(n, hidden, inter, layers, mlp="swiglu")
    f_sched = decoder_prefill_flops(
        _tokens_per_layer(n_text, n_sp, layers, sched_counts), hidden, inter, mlp="swiglu"
    )
    fastv_layer = 2

    def fastv_flops(r: float) -> int:
        kept = max(1, round(n_sp * r))
        per = _tokens_per_layer(n_text, n_sp, layers, {fastv_layer: kept})
        return decoder_prefill_flops(per, hidden, inter, mlp="swiglu")

    lo, hi = 1e-4, 1.0  # FastV keep ratio with the schedule's FLOPs
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fastv_flops(mid) <= f_sched else (lo, mid)
    fastv = FastV(layer=fastv_layer, keep_ratio=lo)

    models = {"unpruned": base}
    handles = {}
    for name, method in (("schedule", schedule), ("adaptive", adaptive), ("fastv", fastv)):
        m = _model(hidden, layers, inter, heads)
        m.load_state_dict(state)
        models[name] = m
        handles[name] = method.apply(m, spans=[span])

    def prefill(m):
        return lambda: m(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)

    times = time_interleaved(
        {name: prefill(m) for name, m in models.items()}, repeats=repeats, warmup=1
    )
    stats = {name: summarize(t) for name, t in times.items()}
    full_s = stats["unpruned"]["median_s"]

    adaptive_counts = handles["adaptive"].last_counts
    f_adaptive = decoder_prefill_flops(
        _tokens_per_layer(n_text, n_sp, layers, {k: v[0] for k, v in adaptive_counts.items()}),
        hidden,
        inter,
        mlp="swiglu",
    )
    for name, flops, setting in (
        ("schedule", f_sched, f"AdaGate.from_profile: layers {profile.layers}"),
        ("adaptive", f_adaptive, f"AdaGate(mode='adaptive', mass=0.9) counts {adaptive_counts}"),
        ("fastv", fastv_flops(lo), f"FastV(layer={fastv_layer}, keep_ratio={lo:.4f})"),
    ):
        speedup = full_s / stats[name]["median_s"]
        ideal = f_full / flops
        rows.append(
            {
                "name": f"adagate/prefill_{name}",
                "setting": setting,
                "model": f"Llama d={hidden} L={layers} m={inter} heads={heads} fp32 sdpa",
                "tokens": n,
                "baseline_median_s": full_s,
                "pruned_median_s": stats[name]["median_s"],
                "pruned_iqr_s": stats[name]["iqr_s"],
                "speedup": speedup,
                "flops_fewer": 1 - flops / f_full,
                "flops_ideal_speedup": ideal,
                "speedup_over_ideal": speedup / ideal,
                "goal_met": (speedup >= 0.8 * ideal)
                and (name != "schedule" or flops <= 0.37 * f_full),
                "repeats": repeats,
            }
        )

    # ---- gating overhead: time spent in AdaGate's score + select during the pruned prefill
    plan = handles["schedule"].plan
    spent: list[float] = []

    def timed(fn):
        def wrapper(*a, **k):
            t = clock()
            out = fn(*a, **k)
            spent.append(clock() - t)
            return out

        return wrapper

    plan.score, plan.select = timed(plan.score), timed(plan.select)
    per_run = []
    with torch.inference_mode():
        for _ in range(repeats):
            spent.clear()
            prefill(models["schedule"])()
            per_run.append(sum(spent))
    del plan.score, plan.select
    overhead = statistics.median(per_run)
    rows.append(
        {
            "name": "adagate/gating_overhead",
            "score_select_s": overhead,
            "over_unpruned_prefill": overhead / full_s,
            "goal_met": overhead / full_s < 0.03,
        }
    )

    # ---- adaptive spread across samples of different scenes
    spread = {layer: [] for layer in profile.layers}
    with torch.inference_mode():
        for s in calib[:: max(1, len(calib) // n_spread)][:n_spread]:
            handles["adaptive"].set_spans(s["spatial_spans"])
            models["adaptive"](inputs_embeds=s["inputs_embeds"], use_cache=False, logits_to_keep=1)
            n0 = s["spatial_spans"][0][1] - s["spatial_spans"][0][0]
            for layer, c in handles["adaptive"].last_counts.items():
                spread[layer].append(round(c[0] / n0, 4))
    rows.append(
        {
            "name": "adagate/adaptive_spread",
            "samples": n_spread,
            "kept_fraction_per_gate": {str(k): v for k, v in spread.items()},
            "min_max_per_gate": {str(k): (min(v), max(v)) for k, v in spread.items() if v},
        }
    )
    for h in handles.values():
        h.remove()

    # ---- FLOPs counted (eager: FlopCounterMode sees the n^2 term only there)
    eager = _model(hidden, layers, inter, heads, impl="eager")
    eager.load_state_dict(state)
    c_full = count_flops(lambda: eager(inputs_embeds=embeds, use_cache=False, logits_to_keep=1))
    with schedule.apply(eager, spatial_spans=[span]):
        c_sched = count_flops(
            lambda: eager(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
        )
    rows.append(
        {
            "name": "adagate/flop_counter",
            "counted_ratio": c_sched / c_full,
            "analytic_ratio": f_sched / f_full,
            "note": "FlopCounterMode (eager, multiply-add = 2; includes the scoring rows, the "
            "LM head on 1 token and exact per-layer MLP / GQA terms)",
        }
    )
    logger.info("adagate benchmark: %s", rows)
    return rows
