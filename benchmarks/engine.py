"""Decoder-engine benchmark: FastV prefill vs unpruned prefill, side by side.

A Qwen2-style decoder with random weights (hidden 512, 8 layers, 8 heads /
2 key-value heads, SwiGLU MLP 2816, float32, CPU, SDPA) on one prompt of
64 text tokens around a 4096-token visual span (32 before, 32 after).
FastV (layer 2, 25 % of the span kept) against the same model unpatched,
timed interleaved by :func:`common.benchmark.compare`, next to the analytic
FLOPs ratio of :mod:`common.flops` (``4nd^2 + 2n^2d + 3ndm`` per layer, the
FastV / HoliTom formula with a SwiGLU MLP; the GQA-exact figure is reported
too). Also times the recomputed attention row FastV scores with
(:func:`common.engine.attention_rows`) against one full decoder layer.

Per-sample budgets (``engine/masked_prefill``, ``engine/masked_decode``): a
batch of 3 equal-length prompts, pruned at layer 2 by a plan that keeps
``(k - k/2, k, k + k/2)`` span tokens (the masked path: kept sets padded to
``k + k/2`` and the padding masked out of later layers and the cache) against
the same plan keeping ``(k, k, k)`` (the equal-count path, no padding, no
extra mask): the same total of real tokens. ``cost`` is masked / equal time;
``padding_cost_ideal`` is what the padding slots alone should cost by the
FLOPs formula, so ``cost / padding_cost_ideal`` is the masking overhead.

The machine is shared: read ``speedup`` (a ratio measured in one run) rather
than absolute seconds.
"""

from __future__ import annotations

import logging

import torch

from common.benchmark import compare, summarize, time_fn
from common.engine import FastV, PlanContext, TokenPlan, attention_rows, topk_per_sample
from common.flops import count_flops, decoder_prefill_flops

logger = logging.getLogger(__name__)

__all__ = ["run"]


def random_decoder(
    hidden: int,
    layers: int,
    inter: int,
    heads: int,
    kv_heads: int,
    impl: str = "sdpa",
    *,
    family: str = "qwen2",
    max_positions: int = 32768,
):
    """A random Qwen2 (or ``family="llama"``: LLaMA) decoder, seed 0, 1000-token
    vocabulary; the video and AdaGate benchmarks use it too."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    config_cls, model_cls = classes[family]
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        attn_implementation=impl,
    )
    return model_cls(cfg).eval()


def _cache_of(out):
    cache = getattr(out, "cache", None)  # transformers >= 5.x names it `cache`
    return cache if cache is not None else out.past_key_values


class _FixedCounts(TokenPlan):
    """Keep ``counts[b]`` span tokens of sample ``b`` at ``layer`` (last token's top attention)."""

    def __init__(self, layer: int, counts: tuple[int, ...]) -> None:
        self.layer, self.counts = layer, counts

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def score(self, ctx: PlanContext) -> torch.Tensor:
        return ctx.span_attention(-1)

    def select(self, scores: torch.Tensor, ctx: PlanContext) -> torch.Tensor:
        return topk_per_sample(scores, torch.tensor(self.counts), ctx.span_valid)


def _masked_rows(quick: bool, repeats: int) -> list[dict]:
    """Masked per-sample path vs equal-count path at the same total of kept tokens."""
    if quick:
        hidden, layers, inter, heads, kv_heads, span, text = 256, 4, 1408, 4, 2, 512, 64
    else:
        hidden, layers, inter, heads, kv_heads, span, text = 512, 8, 2816, 8, 2, 2048, 64
    layer_k, batch = 2, 3
    k = span // 4
    uneven = (k - k // 2, k, k + k // 2)
    even = (k, k, k)
    model = random_decoder(hidden, layers, inter, heads, kv_heads)
    gen = torch.Generator().manual_seed(1)
    n = span + text
    ids = torch.randint(10, 1000, (batch, n), generator=gen)
    spans = [(text // 2, text // 2 + span)]
    masked, equal = _FixedCounts(layer_k, uneven), _FixedCounts(layer_k, even)

    def prefill(plan):
        def fn() -> None:
            with plan.apply(model, spans=spans), torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        return fn

    with masked.apply(model, spans=spans) as h, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        assert h.last_plan["span_kept"][layer_k].tolist() == list(uneven)
        padded_len = h.last_plan["kept_length"][layer_k]
    equal_len = n - span + k
    assert padded_len == n - span + max(uneven)
    timing = compare(prefill(equal), prefill(masked), repeats=repeats, warmup=1)
    per_layer_eq = [n] * layer_k + [equal_len] * (layers - layer_k)
    per_layer_pad = [n] * layer_k + [padded_len] * (layers - layer_k)
    ideal = decoder_prefill_flops(per_layer_pad, hidden, inter, mlp="swiglu") / (
        decoder_prefill_flops(per_layer_eq, hidden, inter, mlp="swiglu")
    )
    cost = 1.0 / timing["speedup"]  # masked time / equal time
    rows = [
        {
            "name": "engine/masked_prefill",
            "model": f"Qwen2 d={hidden} L={layers} m={inter} heads={heads}/{kv_heads} fp32 sdpa",
            "batch": batch,
            "tokens_per_sample": n,
            "span_kept_masked": list(uneven),
            "span_kept_equal": list(even),
            "length_after_k_masked": padded_len,
            "length_after_k_equal": equal_len,
            "equal_median_s": timing["baseline"]["median_s"],
            "masked_median_s": timing["method"]["median_s"],
            "cost": cost,
            "padding_cost_ideal": ideal,
            "mask_overhead": cost / ideal,
            "repeats": repeats,
        }
    ]

    # decoding: `steps` single-token steps on each pruned cache (cropped back after each run)
    steps = 8 if quick else 16
    tok = ids[:, -1:]
    model_m = random_decoder(hidden, layers, inter, heads, kv_heads)
    handles = [equal.apply(model, spans=spans), masked.apply(model_m, spans=spans)]
    try:
        with torch.no_grad():
            cache_e = _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
            cache_m = _cache_of(model_m(input_ids=ids, use_cache=True, logits_to_keep=1))

        def decode(m, cache) -> None:
            mask = torch.ones(batch, n + steps, dtype=torch.long)
            with torch.no_grad():
                for t in range(steps):
                    m(input_ids=tok, attention_mask=mask[:, : n + t + 1], cache=cache)
            cache.crop(-steps)

        dec = compare(
            lambda: decode(model, cache_e),
            lambda: decode(model_m, cache_m),
            repeats=repeats,
            warmup=1,
        )
    finally:
        for handle in handles:
            handle.remove()
    rows.append(
        {
            "name": "engine/masked_decode",
            "batch": batch,
            "steps": steps,
            "cache_tokens_after_k_masked": padded_len,
            "cache_tokens_after_k_equal": equal_len,
            "equal_ms_per_step": 1e3 * dec["baseline"]["median_s"] / steps,
            "masked_ms_per_step": 1e3 * dec["method"]["median_s"] / steps,
            "cost": 1.0 / dec["speedup"],
        }
    )
    return rows


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; returns one dict per figure (see the module docstring)."""
    if quick:
        hidden, layers, inter, heads, kv_heads, span, text = 256, 4, 1408, 4, 2, 1024, 64
        repeats = 3
    else:
        hidden, layers, inter, heads, kv_heads, span, text = 512, 8, 2816, 8, 2, 4096, 64
        repeats = 5
    layer_k, keep_ratio = 2, 0.25
    model = random_decoder(hidden, layers, inter, heads, kv_heads)
    gen = torch.Generator().manual_seed(0)
    n = span + text
    ids = torch.randint(10, 1000, (1, n), generator=gen)
    start = text // 2
    spans = [(start, start + span)]
    method = FastV(layer=layer_k, keep_ratio=keep_ratio)
    kept = n - span + round(span * keep_ratio)

    def full() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def pruned() -> None:
        with method.apply(model, spans=spans), torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    # sanity: the pruned run really shortens the sequence
    with method.apply(model, spans=spans) as h, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        assert h.last_plan["kept_length"][layer_k] == kept

    timing = compare(full, pruned, repeats=repeats, warmup=1)
    per_layer = [n] * layer_k + [kept] * (layers - layer_k)
    kv_dim = kv_heads * (hidden // heads)
    f_full = decoder_prefill_flops(n, hidden, inter, layers, mlp="swiglu")
    f_pruned = decoder_prefill_flops(per_layer, hidden, inter, mlp="swiglu")
    g_full = decoder_prefill_flops(n, hidden, inter, layers, mlp="swiglu", kv_dim=kv_dim)
    g_pruned = decoder_prefill_flops(per_layer, hidden, inter, mlp="swiglu", kv_dim=kv_dim)
    ideal = f_full / f_pruned
    rows: list[dict] = [
        {
            "name": "engine/fastv_prefill",
            "setting": f"FastV(layer={layer_k}, keep_ratio={keep_ratio})",
            "model": f"Qwen2 d={hidden} L={layers} m={inter} heads={heads}/{kv_heads} fp32 sdpa",
            "tokens": n,
            "tokens_kept_after_k": kept,
            "baseline_median_s": timing["baseline"]["median_s"],
            "pruned_median_s": timing["method"]["median_s"],
            "baseline_iqr_s": timing["baseline"]["iqr_s"],
            "pruned_iqr_s": timing["method"]["iqr_s"],
            "speedup": timing["speedup"],
            "flops_full_macs": f_full,
            "flops_pruned_macs": f_pruned,
            "flops_ideal_speedup": ideal,
            "flops_ideal_speedup_gqa": g_full / g_pruned,
            "speedup_over_ideal": timing["speedup"] / ideal,
            "goal_met": timing["speedup"] >= 0.8 * ideal,
            "repeats": repeats,
        }
    ]

    # measured FLOPs (FlopCounterMode needs eager attention to see the n^2 term)
    eager = random_decoder(hidden, layers, inter, heads, kv_heads, impl="eager")
    c_full = count_flops(lambda: eager(input_ids=ids, use_cache=False, logits_to_keep=1))
    with method.apply(eager, spans=spans):
        c_pruned = count_flops(lambda: eager(input_ids=ids, use_cache=False, logits_to_keep=1))
    rows.append(
        {
            "name": "engine/fastv_flop_counter",
            "counted_full_flops": c_full,
            "counted_pruned_flops": c_pruned,
            "counted_ratio": c_full / c_pruned,
            "analytic_ratio_gqa": g_full / g_pruned,
            "note": "FlopCounterMode (eager, multiply-add = 2, includes the LM head on 1 token "
            "and the scoring row)",
        }
    )

    # decoding on the pruned cache: `steps` greedy single-token steps after the prefill
    # (the caches are cropped back after each run, so every run decodes the same tokens).
    # The pruned side runs on a second instance with the same weights (same seed) that
    # keeps the handle of its pruned prefill, so its steps go through the engine's decode
    # path (key-side mask slicing, cache-length checks) while the baseline has no hooks.
    steps = 8 if quick else 16
    tok = ids[:, -1:]
    with torch.no_grad():
        cache_full = _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    model_p = random_decoder(hidden, layers, inter, heads, kv_heads)
    handle = method.apply(model_p, spans=spans)
    with torch.no_grad():
        cache_pruned = _cache_of(model_p(input_ids=ids, use_cache=True, logits_to_keep=1))

    def decode(m, cache) -> None:
        with torch.no_grad():
            for _ in range(steps):
                m(input_ids=tok, cache=cache, use_cache=True)
        cache.crop(-steps)

    try:
        dec = compare(
            lambda: decode(model, cache_full),
            lambda: decode(model_p, cache_pruned),
            repeats=repeats,
            warmup=1,
        )
    finally:
        handle.remove()
    rows.append(
        {
            "name": "engine/fastv_decode",
            "steps": steps,
            "cache_tokens_full": n,
            "cache_tokens_pruned_after_k": kept,
            "baseline_ms_per_token": 1e3 * dec["baseline"]["median_s"] / steps,
            "pruned_ms_per_token": 1e3 * dec["method"]["median_s"] / steps,
            "speedup": dec["speedup"],
        }
    )

    # overhead of the recomputed attention row vs one decoder layer at full length
    captured: dict = {}
    layer = model.model.layers[layer_k]

    def grab(mod, args, kwargs):
        captured["h"], captured["kw"] = args[0], kwargs

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    hook.remove()
    h, kw = captured["h"], captured["kw"]
    pe = kw["position_embeddings"]
    row_t = summarize(time_fn(lambda: attention_rows(layer, h, pe, -1), repeats=repeats))
    layer_t = summarize(time_fn(lambda: layer(h, **kw), repeats=repeats))
    rows.append(
        {
            "name": "engine/attention_row_overhead",
            "tokens": n,
            "row_median_s": row_t["median_s"],
            "layer_median_s": layer_t["median_s"],
            "row_over_layer": row_t["median_s"] / layer_t["median_s"],
            "row_over_pruned_prefill": row_t["median_s"] / timing["method"]["median_s"],
        }
    )
    rows.extend(_masked_rows(quick, repeats))
    logger.info("engine benchmark: %s", rows)
    return rows
