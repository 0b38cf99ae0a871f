"""Benchmarks of the shared primitives against straightforward references.

Each entry times a reference implementation (Python loops over frames /
clusters, or the unchunked version) and the library function side by side
(``common.benchmark.compare``, interleaved) on the same inputs and reports
``speedup = reference median / library median``.

Sizes: HoliTom's LLaVA-OV features (32 frames x 196 tokens x 3584 dims) for
similarity, segmentation and DPC-kNN; VGGT's global attention tokens
(frames x 1041 tokens x 1024 dims) for FastVGGT matching: 100 frames on a
GPU, fewer on CPU (each full match is ``O(N^2 C)``), fewer still with
``quick``. The row says which sizes and device were used.
"""

from __future__ import annotations

import logging

import torch

from common.benchmark import compare
from common.clustering import dpc_knn_merge
from common.matching import grid_random_partition, match_src_to_dst
from common.segmentation import temporal_segmentation
from common.similarity import adjacent_frame_similarity, cosine_similarity_matrix

logger = logging.getLogger(__name__)

__all__ = ["run"]


def _row(name: str, result: dict, **sizes) -> dict:
    row = {
        "name": f"primitives/{name}",
        "baseline_median_s": result["baseline"]["median_s"],
        "method_median_s": result["method"]["median_s"],
        "speedup": result["speedup"],
        "baseline_iqr_s": result["baseline"]["iqr_s"],
        "method_iqr_s": result["method"]["iqr_s"],
        "repeats": result["method"]["n"],
    }
    row.update(sizes)
    logger.info("%s: speedup %.2fx", row["name"], row["speedup"])
    return row


def _ab(name: str, baseline, method, /, *, repeats: int, compare_device=None, **fields) -> dict:
    """One row: ``baseline`` vs ``method`` timed side by side (:func:`compare`)."""
    return _row(name, compare(baseline, method, repeats=repeats, device=compare_device), **fields)


# ---------------------------------------------------------------- references
def _adjacent_loop(x: torch.Tensor) -> torch.Tensor:
    """Frame-by-frame adjacent similarity with ``F.cosine_similarity``."""
    rows = [
        torch.nn.functional.cosine_similarity(x[t].float(), x[t + 1].float(), dim=-1)
        for t in range(x.shape[0] - 1)
    ]
    return torch.stack(rows)


def _cos_full(a: torch.Tensor) -> torch.Tensor:
    an = torch.nn.functional.normalize(a.float(), dim=-1)
    return an @ an.transpose(-1, -2)


def _segmentation_loop(sim: torch.Tensor, tau: float) -> tuple[list, float]:
    """The official structure: a cumprod per start frame, then a scalar DP loop."""
    f = sim.shape[0] + 1
    simm = torch.ones(f, f, sim.shape[1])
    for start in range(f - 1):
        cum = torch.cumprod((sim[start:] > tau).float(), dim=0)
        simm[start, start + 1 : start + 1 + len(cum)] = cum
    wl = (torch.arange(f)[None, :] - torch.arange(f)[:, None]).clamp(min=0)
    count = simm.sum(-1) * wl
    dp = torch.zeros(f)
    prev = torch.zeros(f, dtype=torch.long)
    for i in range(f):
        best = dp[i - 1] if i > 0 else 0
        arg = i
        for w in range(2, i + 2):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + count[j + 1, i]
            if val > best:
                best, arg = val, j + 1
        dp[i], prev[i] = best, arg
    segs, i = [], f - 1
    while i >= 0:
        segs.append((int(prev[i]), i))
        i = int(prev[i]) - 1
    return segs[::-1], float(dp[-1])


def _dpc_merge_loop(x: torch.Tensor, num_centres: int, k: int, beta: float) -> torch.Tensor:
    """Per-frame DPC-kNN with a Python loop over clusters (official structure)."""
    out = []
    for frame in x:
        xf = frame[None].float()
        d = xf.shape[-1]
        dist = torch.cdist(xf, xf) / d**0.5
        knn = torch.topk(dist, k, dim=-1, largest=False).values
        density = (-(knn**2).mean(-1)).exp() + torch.rand(1, xf.shape[1], device=xf.device) * 1e-6
        mask = (density[:, None, :] > density[:, :, None]).float()
        dmax = dist.flatten(1).max(-1).values[:, None, None]
        delta = (dist * mask + dmax * (1 - mask)).min(-1).values
        centres = (delta * density).topk(num_centres, -1).indices.sort(-1).values[0]
        is_c = torch.zeros(xf.shape[1], dtype=torch.bool, device=xf.device)
        is_c[centres] = True
        others = (~is_c).nonzero()[:, 0]
        near = dist[0][others][:, centres].argmin(-1)
        toks = []
        for c in range(num_centres):
            members = frame[others[near == c]]
            if len(members):
                toks.append(beta * frame[centres[c]] + (1 - beta) * members.mean(0))
            else:
                toks.append(frame[centres[c]])
        out.append(torch.stack(toks))
    return torch.stack(out)


def _match_unchunked(metric, dst_idx, src_idx):
    """Full ``[B, Ns, Nd]`` score matrix at once, argmax."""
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    s = m[:, src_idx[0]] @ m[:, dst_idx[0]].transpose(1, 2)
    return s.argmax(-1)


def _match_agreement(metric, dst_idx, src_idx, chunk: int) -> float:
    """Fraction of src tokens whose dst is the same in the reference and the library."""
    ref = dst_idx[0, _match_unchunked(metric, dst_idx, src_idx)[0]]
    got = match_src_to_dst(metric, dst_idx, src_idx, chunk_size=chunk)
    holder = got.keep_idx[0, got.dst_of[0, src_idx[0]]]
    return float((holder == ref).float().mean())


# ---------------------------------------------------------------- run
def run(quick: bool = False) -> list[dict]:
    """Run the primitive benchmarks; one dict per comparison."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 2 if quick else 3
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []

    # HoliTom sizes
    f, n, d = (8, 196, 3584) if quick else (32, 196, 3584)
    x = torch.randn(f, n, d, generator=g)
    # make half the positions static so segmentation has work to do
    x[:, : n // 2] = x[:1, : n // 2] + 0.05 * torch.randn(f, n // 2, d, generator=g)
    x = x.to(device)
    rows.append(
        _ab(
            "adjacent_frame_similarity",
            lambda: _adjacent_loop(x),
            lambda: adjacent_frame_similarity(x),
            repeats=repeats,
            compare_device=device,
            frames=f,
            tokens=n,
            dim=d,
            device=device,
            reference="per-frame F.cosine_similarity loop",
            max_abs_diff=float((_adjacent_loop(x) - adjacent_frame_similarity(x)).abs().max()),
        )
    )
    flat = x.reshape(1, f * n, d)
    rows.append(
        _ab(
            "cosine_similarity_matrix_chunked",
            lambda: _cos_full(flat),
            lambda: cosine_similarity_matrix(flat, chunk_size=1024),
            repeats=repeats,
            compare_device=device,
            tokens=f * n,
            dim=d,
            device=device,
            reference="unchunked normalize + matmul",
        )
    )
    sim = adjacent_frame_similarity(x).cpu()
    rows.append(
        _ab(
            "temporal_segmentation",
            lambda: _segmentation_loop(sim, 0.8),
            lambda: temporal_segmentation(sim, 0.8),
            repeats=repeats,
            frames=f,
            tokens=n,
            device="cpu",
            reference="official structure: cumprod per start + scalar DP loop",
            agree=_segmentation_loop(sim, 0.8) == temporal_segmentation(sim, 0.8),
        )
    )
    num_centres = 20
    rows.append(
        _ab(
            "dpc_knn_merge",
            lambda: _dpc_merge_loop(x, num_centres, 7, 0.6),  # same device as the method
            lambda: dpc_knn_merge(x, num_centres, k=7, generator=0),
            repeats=repeats,
            compare_device=device,
            frames=f,
            tokens=n,
            dim=d,
            centres=num_centres,
            device=device,
            reference="per-frame DPC-kNN + Python loop over clusters",
        )
    )

    # FastVGGT sizes
    if device == "cuda":
        frames = 24 if quick else 100
    else:
        frames = 4 if quick else 16
    tpf, special, grid = 1041, 5, (28, 37)
    metric = torch.randn(1, frames * tpf, 1024, generator=g).to(device)
    dst_idx, src_idx = grid_random_partition(
        frames, tpf, special, grid, generator=33, device=device
    )
    chunk = 5000
    rows.append(
        _ab(
            "match_src_to_dst",
            lambda: _match_unchunked(metric, dst_idx, src_idx),
            lambda: match_src_to_dst(metric, dst_idx, src_idx, chunk_size=chunk),
            repeats=repeats,
            compare_device=device,
            frames=frames,
            tokens=frames * tpf,
            dim=1024,
            dst=int(dst_idx.shape[1]),
            src=int(src_idx.shape[1]),
            chunk_size=chunk,
            device=device,
            reference="unchunked [Ns, Nd] score matrix + argmax",
            agree_fraction=_match_agreement(metric, dst_idx, src_idx, chunk),
            peak_scores_mb_reference=src_idx.shape[1] * dst_idx.shape[1] * 4 / 2**20,
            peak_scores_mb_method=min(chunk, src_idx.shape[1]) * dst_idx.shape[1] * 4 / 2**20,
        )
    )
    return rows


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(quick=True), indent=1))
