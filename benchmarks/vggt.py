"""VGGT aggregator with and without FastVGGT token merging, side by side on CPU.

A small random VGGT (embed 256, 4 frame + 4 global blocks, 4 heads, 2-block
DINOv2 patch embed, 224 x 224 frames = 16 x 16 patches + 5 specials) at
S = 16, 32, 64 frames (quick: 8, 16). Per S: aggregator time (interleaved
A/B via ``common.benchmark.compare``, one warm-up pair so one-off costs such as
oneDNN kernel creation for a new shape stay out, medians of ``REPEATS``),
peak memory (CUDA allocator or the process's RSS high-water mark on CPU), one
global attention alone and the matching alone (``build_plan``), interleaved
full / merged / matching with medians of ``ATTN_REPEATS`` (merged attention
includes its matching; ``matching_share`` = matching / full global attention),
tokens kept, and FLOPs of the smallest S from ``torch.utils.flop_counter`` next
to the analytic attention share. Both attentions run the same
``F.scaled_dot_product_attention`` (the CPU flash kernel on CPU).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from common.benchmark import compare, peak_memory_mb, summarize, time_interleaved
from threed.vggt import VGGT, TokenMerging, VGGTConfig, attention_share, build_plan
from threed.vggt.layers import patch_positions

log = logging.getLogger(__name__)

RATIO = 0.9
REPEATS = 3  # aggregator A/B pairs per S (after one warm-up pair)
ATTN_REPEATS = 7  # global attention / matching triples per S (after one warm-up)


def bench_config() -> VGGTConfig:
    """The eval track's small model at embed 256 (224 px, 4 frame + 4 global blocks)."""
    return VGGTConfig.small("eval", embed_dim=256)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = VGGT(bench_config()).to(device).eval()
    method = TokenMerging(ratio=RATIO)
    frames_list = (8, 16) if quick else (16, 32, 64)
    rows = [_bench_frames(model, method, s, s == frames_list[0], device) for s in frames_list]
    return rows


def _bench_frames(model, method, s: int, small: bool, device) -> dict:
    """All figures for one sequence length ``s``."""
    agg = model.aggregator
    keep = model.kept_layers
    images = torch.rand(1, s, 3, 224, 224, device=device)
    n = s * (agg.patch_start_idx + 16 * 16)

    def full():
        return agg(images, keep_layers=keep)

    def merged():
        with method.apply(model):
            return agg(images, keep_layers=keep)

    times = compare(full, merged, repeats=REPEATS, warmup=1, device=device)
    with torch.inference_mode():
        _trim_heap(device)
        mem_full = peak_memory_mb(full, device)
        _trim_heap(device)
        mem_merged = peak_memory_mb(merged, device)
        with method.apply(model) as handle:
            agg(images, keep_layers=keep)
            kept, share = handle.kept_ratio, attention_share(handle)
            stats = handle.stats
    # one global attention alone, and the matching alone, interleaved
    blk = agg.global_blocks[-1]
    with torch.no_grad():
        x = blk.norm1(torch.randn(1, n, 256, device=device))
    pos = patch_positions(s, 16, 16, agg.patch_start_idx, device).reshape(1, n, 2)
    keys = torch.randn(1, 4, n, 64, device=device)
    attn_times = time_interleaved(
        {
            "full": lambda: blk.attn(x, pos=pos),
            "merged": lambda: _merged_attn(model, blk, x, pos),
            "matching": lambda: build_plan(method, x, keys, (16, 16), agg.patch_start_idx),
        },
        repeats=ATTN_REPEATS,
        device=device,
    )
    attn = {name: summarize(t) for name, t in attn_times.items()}
    row = {
        "name": f"vggt_aggregator_S{s}",
        "frames": s,
        "tokens": n,
        "merge_ratio": RATIO,
        "device": str(device),
        "aggregator_full_s": times["baseline"]["median_s"],
        "aggregator_merged_s": times["method"]["median_s"],
        "aggregator_speedup": times["speedup"],
        "peak_mem_full_mb": mem_full,
        "peak_mem_merged_mb": mem_merged,
        "kept_ratio": kept,
        "attention_share": share,
        "global_attn_full_s": attn["full"]["median_s"],
        "global_attn_merged_s": attn["merged"]["median_s"],
        "global_attn_speedup": attn["full"]["median_s"] / attn["merged"]["median_s"],
        "matching_s": attn["matching"]["median_s"],
        "matching_share": attn["matching"]["median_s"] / attn["full"]["median_s"],
        "threads": torch.get_num_threads(),
    }
    if small:
        with torch.inference_mode():
            f_full = _flops(full)
            f_merged = _flops(merged)
        # FlopCounterMode does not count CPU SDPA: add attention analytically
        # (4 * N_q * N_k * C per attention: QK^T and AV, 2 FLOPs per MAC)
        p = agg.patch_start_idx + 16 * 16
        frame_attn = agg.depth * 4 * s * p * p * 256
        full_attn = frame_attn + agg.depth * 4 * n * n * 256
        merged_attn = frame_attn + sum(4 * st["attended"] ** 2 * 256 for st in stats)
        row.update(
            flops_counted_full=f_full,
            flops_counted_merged=f_merged,
            attention_flops_full=full_attn,
            attention_flops_merged=merged_attn,
            flops_ratio=(f_merged + merged_attn) / (f_full + full_attn),
        )
    log.info("%s", row)
    return row


def _trim_heap(device) -> None:
    """CPU: hand freed heap memory back to the OS (glibc ``malloc_trim``) so the RSS
    high-water mark of the next run is not hidden by memory the previous run left
    cached (otherwise whichever of full / merged runs second reads about 0 MB)."""
    if device.type != "cpu":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _merged_attn(model, blk, x, pos):
    """The merged attention of one global block (patch applied for the call)."""
    with TokenMerging(ratio=RATIO).apply(model) as handle:
        handle.grid_hw = (16, 16)  # as the aggregator pre-hook would set it
        return blk.attn(x, pos=pos)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for r in run(quick=True):
        log.info(r)
