"""TSP3D benchmark: pruned vs unpruned grounding network, side by side, on CPU.

One generated ~50k-point room (floor, walls, 12 boxes; ``quick``: ~15k points) at the
official 1 cm voxel (``quick``: 2 cm).  Random weights, so two kinds of keep scores:

* ``random``: the untrained heads (their keep probabilities sit near 0.5, so the 0.7
  scene-level threshold keeps nothing and the fallback top-k decides);
* ``trained-like``: the TGP / CBA logits are replaced by fields computed from the
  voxel positions, shaped like the official supervision (64 cm: cube of 1.04 m around
  every object; 32 cm: cube of 0.52 m around the target; CBA: within 0.3 m of the
  target), so the thresholds act as they would on a trained model.

Reported: forward / decoder time with and without pruning (interleaved, median),
voxel counts per level, TGP reduction at 32 and 16 cm, the cost of CBA, whether the
16 cm decoder keeps <= 10 % of the unpruned decoder's voxels, and the decoder speedup
against the >= 2x goal.  "Unpruned" is measured both ways the network can run without
pruning: ``scene`` (decoder on the scene's own voxels) and ``generative`` (every
generated child, the tensor TGP prunes).  FLOPs: ``torch.utils.flop_counter`` (it sees
spconv's Native CPU convolutions, which are ``torch.mm`` calls) for the whole forward and
the decoder share, next to the analytic sparse-conv count of the decoder.  Per-stage
decoder times (``stage_ms_*``: BiEncoders, keep heads, lateral / out blocks, upsampling,
CBA and its BiEncoder, the rest) come from a separate pass with forward hooks.  Timings
are interleaved over the settings after one warm-up call each; set
``OMP_NUM_THREADS`` / ``torch.set_num_threads`` before comparing machines
(``torch_threads`` is recorded).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics

import torch

from common.benchmark import clock, time_interleaved

__all__ = ["run", "make_room"]


def make_room(num_points: int = 50_000, seed: int = 0):
    """Deterministic room: points [N, 3], colors [N, 3], boxes [M, 6] (target = box 0)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([7.0, 6.0, 2.8])
    m = 12
    centers = torch.rand(m, 3, generator=g) * (size - 1.2) + 0.6
    dims = torch.rand(m, 3, generator=g) * 0.8 + 0.3
    centers[:, 2] = dims[:, 2] / 2
    boxes = torch.cat([centers, dims], 1)
    n_floor, n_wall = num_points // 3, num_points // 4
    n_obj = (num_points - n_floor - n_wall) // m
    parts = [torch.rand(n_floor, 3, generator=g) * torch.tensor([7.0, 6.0, 0.0])]
    w = torch.rand(n_wall, 3, generator=g) * size
    side = torch.randint(0, 4, (n_wall,), generator=g)
    w[side == 0, 0] = 0.0
    w[side == 1, 0] = 7.0
    w[side == 2, 1] = 0.0
    w[side == 3, 1] = 6.0
    parts.append(w)
    for b in boxes:
        u = torch.rand(n_obj, 3, generator=g) - 0.5
        face = torch.randint(0, 3, (n_obj,), generator=g)
        u[torch.arange(n_obj), face] = torch.sign(u[torch.arange(n_obj), face]) * 0.5
        parts.append(u * b[3:] + b[:3])
    pts = torch.cat(parts)
    return pts, torch.rand(pts.shape[0], 3, generator=g), boxes


def subm_pairs(indices: torch.Tensor, spatial_shape) -> int:
    """Input-output pairs of a 3x3x3 submanifold conv on ``indices`` (analytic FLOPs =
    2 * pairs * C_in * C_out)."""
    from threed.tsp3d.sparse import lookup

    total = 0
    for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3):
        q = indices.clone().long()
        q[:, 1] += dx
        q[:, 2] += dy
        q[:, 3] += dz
        total += int((lookup(indices, q, spatial_shape) >= 0).sum())
    return total


def upsample_pairs(indices: torch.Tensor, spatial_shape, out_indices: torch.Tensor) -> int:
    """(child, present parent) pairs of the k3 s2 transposed conv onto ``out_indices``."""
    from threed.tsp3d.sparse import lookup

    c = out_indices.long()
    total = 0
    for d in itertools.product((-1, 0, 1), repeat=3):
        twice = c[:, 1:] - torch.tensor(d)
        ok = (twice % 2 == 0).all(dim=1)
        q = torch.cat([c[:, :1], torch.div(twice, 2, rounding_mode="floor")], dim=1)
        total += int((ok & (lookup(indices, q, spatial_shape) >= 0)).sum())
    return total


def _sdpa_cpu_flops(q, k, v, *args, **kwargs) -> int:
    """CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``), which
    ``torch.utils.flop_counter`` does not count by itself: ``QK^T`` + ``AV``."""
    b, h, lq, d = q
    return 2 * b * h * lq * k[-2] * d + 2 * b * h * lq * k[-2] * v[-1]


_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def decoder_flops(model, batch, texts, call) -> dict:
    """One untimed run under ``torch.utils.flop_counter``.

    spconv's Native CPU algorithm runs one ``torch.mm`` per kernel offset, so the counter
    sees the sparse convolutions too (checked: equal to ``2 * pairs * C_in * C_out`` on a
    SubM conv); CPU attention is added through a custom formula (:func:`_sdpa_cpu_flops`),
    the counter misses it otherwise.  Returns the counted total, the counted decoder
    share (total minus a separate backbone + text-encoder run) and, next to it, the
    analytic sparse-conv FLOPs of the decoder (lateral / out blocks from neighbour
    pairs, upsampling from (child, present parent) pairs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from threed.tsp3d.model import SubMBlock, UpBlock
    from threed.tsp3d.sparse import make_tensor

    recs = []

    def hook(mod, inp, out):
        x = inp[0]
        c = mod.conv
        if isinstance(mod, UpBlock) and (len(inp) < 2 or inp[1] is None):
            pairs = 27 * x.indices.shape[0]  # generative: every child of every voxel
        elif isinstance(mod, UpBlock):  # onto known children: present parent pairs
            pairs = upsample_pairs(x.indices, x.spatial_shape, inp[1])
        else:
            pairs = subm_pairs(x.indices, x.spatial_shape)
        recs.append(2 * pairs * c.in_channels * c.out_channels)

    mods = [m for m in model.modules() if isinstance(m, (SubMBlock, UpBlock))]
    hooks = [m.register_forward_hook(hook) for m in mods]
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_SDPA) as fc:
            call()
    finally:
        for h in hooks:
            h.remove()
    x_in = make_tensor(batch.features, batch.indices, batch.spatial_shape, batch.batch_size)
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_SDPA) as fb:
        model.backbone(x_in)
        model.encode_text(texts)
    total = int(fc.get_total_flops())
    return {
        "total_flops": total,
        "decoder_flops": total - int(fb.get_total_flops()),
        "decoder_sparse_conv_flops_analytic": int(sum(recs)),
    }


def _median_times(fns: dict, repeats: int) -> dict:
    """Interleaved timing: {name: (median total s, median decoder s, last output)}."""
    decs = {k: [] for k in fns}
    outs = {}

    def record(name, out):
        decs[name].append(out.timings["decoder"])
        outs[name] = out

    totals = time_interleaved(fns, repeats=repeats, warmup=1, on_output=record)
    return {k: (statistics.median(totals[k]), statistics.median(decs[k]), outs[k]) for k in fns}


def _stages(model) -> dict:
    """Decoder stages timed by :func:`stage_times` (module forward, hooks)."""
    return {
        "bienc_64": model.tgp_scene.encoder,
        "keep_head_64": model.tgp_scene.keep_head,
        "lateral_64": model.lateral[2],
        "upsample_64_32": model.up_64_32,
        "bienc_32": model.tgp_target.encoder,
        "keep_head_32": model.tgp_target.keep_head,
        "lateral_32": model.lateral[1],
        "upsample_32_16": model.up_32_16,
        "cba": model.cba,
        "cba_bienc": model.cba.encoder,
        "lateral_16": model.lateral[0],
        "out_block_16": model.out_block,
        "fuse": model.fuse,
    }


def stage_times(model, fns: dict, repeats: int) -> dict:
    """Per-stage decoder wall time (median ms over ``repeats`` interleaved calls), in a
    separate pass with forward hooks so the headline timings carry no hook overhead.

    ``other_ms`` = decoder time minus the top-level stages (``cba_bienc`` is inside
    ``cba``): pruning / select, ``features_at`` joins, position embeddings of the TGP
    levels, the oracle fields, the top-1 selection.
    """
    stages = _stages(model)
    acc, start = {}, {}
    hooks = []
    for name, mod in stages.items():

        def pre(m, a, name=name):
            start[name] = clock()

        def post(m, a, o, name=name):
            acc[name] = acc.get(name, 0.0) + clock() - start[name]

        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    runs = {k: [] for k in fns}
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                for k, f in fns.items():
                    acc.clear()
                    out = f()
                    rec = {s: acc.get(s, 0.0) for s in stages}
                    top = sum(v for s, v in rec.items() if s != "cba_bienc")
                    rec["other"] = out.timings["decoder"] - top
                    rec["decoder"] = out.timings["decoder"]
                    runs[k].append(rec)
    finally:
        for h in hooks:
            h.remove()
    return {
        k: {f"{s}_ms": 1000 * statistics.median(r[s] for r in v) for s in v[0]}
        for k, v in runs.items()
    }


def run(quick: bool = False) -> list[dict]:
    """Rows: one per score kind, plus a summary of the goals."""
    from threed.tsp3d import TextEncoder, TSP3DConfig, TSP3DGrounder
    from threed.tsp3d.oracle import oracle_scores

    torch.manual_seed(0)
    n_pts, vsize, repeats = (15_000, 0.02, 5) if quick else (50_000, 0.01, 9)
    pts, cols, boxes = make_room(n_pts)
    model = TSP3DGrounder(TSP3DConfig(voxel_size=vsize), TextEncoder(seed=0)).eval()
    batch = model.scene_batch(pts, cols)
    text = ["the box in the corner of the room"]
    rows = []

    def call(**kw):
        return lambda: model(batch, text, generator=torch.Generator().manual_seed(0), **kw)

    for kind in ("random", "trained-like"):
        ctx = (
            oracle_scores(model, boxes[:, :3], boxes[0, :3])
            if kind == "trained-like"
            else (contextlib.nullcontext())
        )
        with ctx:
            model.config.unpruned_upsample = "scene"
            fns = {
                "full_scene": call(prune=False),
                "tsp3d": call(prune=True),
                "tsp3d_nocba": call(prune=True, cba=False),
            }
            res = _median_times(fns, repeats)
            stages = stage_times(model, fns, max(3, repeats // 2))
            model.config.unpruned_upsample = "generative"
            res.update(_median_times({"full_generative": call(prune=False)}, max(1, repeats // 2)))
            model.config.unpruned_upsample = "scene"
            flops = {
                k: decoder_flops(model, batch, text, fns[k])
                for k in ("full_scene", "tsp3d", "tsp3d_nocba")
            }
        c_full, c_gen, c_p = (res[k][2].counts for k in ("full_scene", "full_generative", "tsp3d"))
        row = {
            "name": f"tsp3d/{kind}",
            "scores": kind,
            "num_points": int(pts.shape[0]),
            "voxel_size_m": vsize,
            "level_cm": [model.config.level_cm(s) for s in (16, 32, 64)],
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
            "time_full_scene_s": res["full_scene"][0],
            "time_full_generative_s": res["full_generative"][0],
            "time_tsp3d_s": res["tsp3d"][0],
            "time_tsp3d_nocba_s": res["tsp3d_nocba"][0],
            "decoder_full_scene_s": res["full_scene"][1],
            "decoder_full_generative_s": res["full_generative"][1],
            "decoder_tsp3d_s": res["tsp3d"][1],
            "decoder_tsp3d_nocba_s": res["tsp3d_nocba"][1],
            "backbone_s": res["tsp3d"][2].timings["backbone"],
            "speedup_total_vs_scene": res["full_scene"][0] / res["tsp3d"][0],
            "speedup_decoder_vs_scene": res["full_scene"][1] / res["tsp3d"][1],
            "speedup_decoder_vs_generative": res["full_generative"][1] / res["tsp3d"][1],
            "cba_added_cost_s": res["tsp3d"][1] - res["tsp3d_nocba"][1],
            "counts_full_scene": c_full,
            "counts_full_generative": c_gen,
            "counts_tsp3d": c_p,
            "tgp_reduction_32_vs_generative": 1 - c_p["decoder_32"] / max(c_gen["decoder_32"], 1),
            "tgp_reduction_16_vs_generative": 1 - c_p["pruned_16"] / max(c_gen["decoder_16"], 1),
            "tgp_reduction_32_vs_scene": 1 - c_p["decoder_32"] / max(c_full["decoder_32"], 1),
            "tgp_reduction_16_vs_scene": 1 - c_p["pruned_16"] / max(c_full["decoder_16"], 1),
            "decoder16_kept_frac_vs_scene": c_p["decoder_16"] / max(c_full["decoder_16"], 1),
            "decoder16_kept_frac_vs_generative": c_p["decoder_16"] / max(c_gen["decoder_16"], 1),
            "cba_added_voxels": c_p["added_16"],
            "flops_full_scene": flops["full_scene"],
            "flops_tsp3d": flops["tsp3d"],
            "flops_tsp3d_nocba": flops["tsp3d_nocba"],
            "decoder_flops_ratio": flops["tsp3d"]["decoder_flops"]
            / max(flops["full_scene"]["decoder_flops"], 1),
            "decoder_flops_ratio_nocba": flops["tsp3d_nocba"]["decoder_flops"]
            / max(flops["full_scene"]["decoder_flops"], 1),
            "speedup_decoder_nocba_vs_scene": res["full_scene"][1] / res["tsp3d_nocba"][1],
            "stage_ms_full_scene": stages["full_scene"],
            "stage_ms_tsp3d": stages["tsp3d"],
            "stage_ms_tsp3d_nocba": stages["tsp3d_nocba"],
        }
        # the official network without pruning upsamples every child (generative): that is
        # the paper's comparison; "scene" (decoder on the scene's own voxels) is the
        # project's stricter baseline
        row["official_comparison"] = "full_generative"
        row["goal_keep_le_10pct_vs_generative"] = row["decoder16_kept_frac_vs_generative"] <= 0.10
        row["goal_decoder_speedup_ge_2x_vs_generative"] = (
            row["speedup_decoder_vs_generative"] >= 2.0
        )
        row["goal_keep_le_10pct_vs_scene"] = row["decoder16_kept_frac_vs_scene"] <= 0.10
        row["goal_decoder_speedup_ge_2x_vs_scene"] = row["speedup_decoder_vs_scene"] >= 2.0
        # the keep cubes (1.04 / 0.52 m) and CBA's 2400 candidates are tuned for the
        # official 16 / 32 / 64 cm levels; at 2 cm voxels the levels are 32 / 64 / 128 cm
        row["distances_tuned_for_level_cm"] = [16.0, 32.0, 64.0]
        row["cba_candidates_seen"] = min(model.config.cba_candidates, c_p["backbone_16"])
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
