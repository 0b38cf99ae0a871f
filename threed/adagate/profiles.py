"""``AdaGate.calibrate``: measure, fit, choose a schedule, write the profile."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from threed.adagate.calibrate import choose_schedule, measure_spatial_flow
from threed.adagate.profile import AdaGateProfile, exp_decay

__all__ = ["calibrate_profile", "decoder_dims"]

logger = logging.getLogger(__name__)


def decoder_dims(model: nn.Module) -> dict[str, Any]:
    """``hidden_size``, ``intermediate_size``, ``kv_dim``, ``mlp`` and the name of the decoder."""
    from common.engine import find_decoder_layers

    decoder, layers = find_decoder_layers(model)
    cfg = getattr(decoder, "config", None) or getattr(model, "config", None)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    hidden = int(text_cfg.hidden_size)
    inter = int(text_cfg.intermediate_size)
    heads = int(text_cfg.num_attention_heads)
    head_dim = int(getattr(text_cfg, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
    mlp = "swiglu" if hasattr(getattr(layers[0], "mlp", None), "gate_proj") else "standard"
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "kv_dim": kv_heads * head_dim,
        "mlp": mlp,
        "num_layers": len(layers),
        "model_name": name,
    }


def calibrate_profile(
    model: nn.Module,
    samples: Sequence[dict[str, Any]],
    *,
    target_flops: float = 0.37,
    out: str | Path | None = None,
    stages: int = 3,
    intra_weight: float = 0.5,
    query_chunk: int = 512,
    spatial_query_stride: int = 1,
    model_name: str | None = None,
    min_keep_tokens: int = 16,
) -> AdaGateProfile:
    """Calibrate an AdaGate profile on the unpruned ``model``.

    Args:
        model: the model to calibrate (left as it is: eval mode, no gate applied).
        samples: a few samples (see :func:`threed.adagate.calibrate.prepare_sample`):
            forward inputs plus ``spatial_spans``, or LLaVA-3D ``generate`` inputs.
        target_flops: wanted prefill FLOPs as a fraction of the unpruned
            prefill, in (0, 1) (the paper: 63% fewer, i.e. 0.37).
        out: write the profile JSON there too.
        stages: number of gating layers.
        intra_weight: weight of the intra-spatial flow against the
            text <- spatial flow in the combined flow, in [0, 1].
        query_chunk: query rows recomputed at once (memory ``O(chunk * L)``).
        spatial_query_stride: estimate the intra-spatial flow from every k-th
            spatial query (1: exact; larger: faster calibration).
        model_name: stored in the profile (default: the config's name or class).
        min_keep_tokens: fewest spatial tokens any gate keeps, counted on the
            samples' mean span (capped at it), >= 1. The fitted decay can reach
            zero (random weights: it does), which would leave a single spatial
            token; 16 keeps 1% of a 1600-token LLaVA-3D scene. 1 follows the
            fitted curve down to one token.
    """
    if not 0 <= intra_weight <= 1:
        raise ValueError(f"intra_weight must be in [0, 1], got {intra_weight}")
    if isinstance(min_keep_tokens, bool) or not isinstance(min_keep_tokens, int):
        raise ValueError(f"min_keep_tokens must be an int >= 1, got {min_keep_tokens!r}")
    if min_keep_tokens < 1:
        raise ValueError(f"min_keep_tokens must be an int >= 1, got {min_keep_tokens!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one sample")
    dims = decoder_dims(model)
    t0 = time.perf_counter()
    flow = measure_spatial_flow(
        model,
        samples,
        query_chunk=query_chunk,
        keep_received=False,
        spatial_query_stride=spatial_query_stride,
    )
    combined = flow.combined(intra_weight)
    sched = choose_schedule(
        combined,
        target_flops=target_flops,
        num_text=flow.num_text,
        num_spatial=flow.num_spatial,
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        kv_dim=dims["kv_dim"],
        mlp=dims["mlp"],
        stages=stages,
        min_keep=min(float(min_keep_tokens), flow.num_spatial) / max(flow.num_spatial, 1.0),
    )
    curve = [exp_decay(layer, *sched.params) for layer in range(1, dims["num_layers"] + 1)]
    profile = AdaGateProfile(
        model_name=model_name or dims["model_name"],
        num_layers=dims["num_layers"],
        layers=sched.layers,
        keep=sched.keep,
        curve_params=dict(zip("ABCD", (float(v) for v in sched.params))),
        curve=[float(v) for v in curve],
        flow=[float(v) for v in combined],
        flow_intra=[float(v) for v in flow.intra],
        flow_text=[float(v) for v in flow.text],
        target_flops=float(target_flops),
        flops_ratio=float(sched.flops_ratio),
        num_samples=flow.num_samples,
        extra={
            "num_text": flow.num_text,
            "num_spatial": flow.num_spatial,
            "stages": stages,
            "intra_weight": intra_weight,
            "min_keep_tokens": min_keep_tokens,
            "floor": float(sched.floor),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    logger.info(
        "AdaGate calibration: layers %s keep %s (prefill FLOPs %.3f of unpruned, target %.3f)",
        profile.layers,
        tuple(round(k, 4) for k in profile.keep),
        sched.flops_ratio,
        target_flops,
    )
    if out is not None:
        profile.save(out)
    return profile
