"""HoliTom's outer-LLM stage as a pure function (``holitom/llava_arch.py``).

On one video's pooled, projected vision features ``x [F, N, D]`` and the
vision attention each token receives ``a [F, N]``:

1. adjacent-frame per-position cosine similarity ``s [F-1, N]``;
2. exact DP segmentation of the frames (:func:`common.temporal_segmentation`);
3. budget rebalancing ``r' = min(r / ((F*N - R) / (F*N)), 1)``;
4. per segment longer than one frame, the positions static over the whole
   segment are averaged over its frames (one token per position);
5. dynamic tokens, per frame: the top ``ceil(n_dyn * r')`` by attention;
6. static tokens, per segment: ``round(n_static * r')`` DPC-kNN centres, each
   merged with its members (``beta * centre + (1 - beta) * mean(members)``);
7. LLM order: ``"one_token"`` (LLaVA-OneVision): per segment the static
   tokens, then each frame's dynamic tokens, in spatial order, one newline at
   the very end; ``"grid"`` (LLaVA-Video): each frame's tokens sorted by
   position with a newline after every row that still holds a token, the
   segment's first frame holding the static tokens.

Faithful details (checked side by side with the official functions): the
similarity, the threshold tests and the static means run in the features'
dtype (bf16 in practice; ``compute_dtype=torch.float32`` for the float32
variant, which flips a few threshold decisions); dynamic budgets use ``ceil``
and static budgets Python's ``round`` (half to even), so a segment whose
static budget rounds to 0 loses its static tokens, as in the official code;
DPC-kNN centres tie-break toward the lower index; the dynamic top-k
tie-breaks toward the lower index (the official ``topk`` leaves it open).

The work is vectorised over frames, segments and videos: the only Python
loops are the DP over frames and one DPC-kNN call per segment (never one per
cluster or per frame). :func:`outer_merge_batch` runs many videos at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.checks import (
    budget,
    check_compute_dtype,
    check_count,
    check_finite,
    check_range,
    check_ratio,
    check_tensor,
    make_generator,
)
from common.clustering import assign_to_centres, dpc_knn
from common.merging import centre_weighted_merge, mean_merge
from common.segmentation import (
    rebalance_retain_ratio,
    segment_static_masks,
    temporal_segmentation,
)

__all__ = [
    "NEWLINE",
    "LAYOUTS",
    "STATIC_MERGES",
    "OuterMergeResult",
    "outer_merge",
    "outer_merge_batch",
]

NEWLINE = -1
"""``position`` of a newline token in :class:`OuterMergeResult`."""

LAYOUTS = ("one_token", "grid")
STATIC_MERGES = ("beta", "mean")
ATTENTION_TIES = ("topk", "lowest")


@dataclass(frozen=True)
class OuterMergeResult:
    """What the outer stage hands the LLM for one video.

    Attributes:
        tokens: ``[M, D]`` merged tokens in LLM order, in the features' dtype.
        frame: ``[M]`` long, frame of each token (a static token: its
            segment's first frame; a newline: the frame of the row it closes,
            the last frame for the one-token layout's final newline).
        position: ``[M]`` long, spatial position in ``[0, N)`` (a merged
            token: its cluster centre's) or :data:`NEWLINE` (-1).
        size: ``[M]`` long, how many input tokens each output token stands
            for (a kept dynamic token 1, a static cluster
            ``frames * positions``; a newline 0).
        segments: ``(first, last)`` frame of each segment, in order.
        total_reduced: tokens saved by the static merge (the DP optimum).
        retain_ratio: the rebalanced ratio ``r'`` applied after that merge.
        static: ``[M]`` bool, True for static (segment-merged) tokens.
    """

    tokens: torch.Tensor
    frame: torch.Tensor
    position: torch.Tensor
    size: torch.Tensor
    segments: list[tuple[int, int]]
    total_reduced: int
    retain_ratio: float
    static: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_newline(self) -> torch.Tensor:
        """``[M]`` bool."""
        return self.position == NEWLINE


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class OuterOptions:
    """The validated options shared by every video of a call (also checks HoliTom's fields)."""

    retain_ratio: float
    tau: float
    beta: float
    dominant_share: float
    knn_k: int
    max_window_size: int
    layout: str
    static_merge: str
    compute_dtype: torch.dtype | None
    attention_ties: str

    def __post_init__(self) -> None:
        check_ratio("retain_ratio", self.retain_ratio)
        check_range("tau", self.tau, -1.0, 1.0)
        check_range("beta", self.beta, 0.0, 1.0)
        check_range("dominant_share", self.dominant_share, 0.0, 1.0)
        if self.dominant_share >= 1.0:
            raise ValueError(f"dominant_share must be in [0, 1), got {self.dominant_share}")
        check_count("knn_k", self.knn_k, low=1)
        check_count("max_window_size", self.max_window_size, low=1)
        for name, allowed in (
            ("layout", LAYOUTS),
            ("static_merge", STATIC_MERGES),
            ("attention_ties", ATTENTION_TIES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_compute_dtype(self.compute_dtype)


def _check_video(i: int, x: object, a: object) -> tuple[torch.Tensor, torch.Tensor]:
    name = "features" if i < 0 else f"features[{i}]"
    aname = "attention" if i < 0 else f"attention[{i}]"
    x = check_tensor(name, x, 3, floating=True)
    a = check_tensor(aname, a, 2)
    if a.dtype == torch.bool or a.is_complex():
        raise TypeError(f"{aname} must be real numbers, got {a.dtype}")
    if tuple(a.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{aname} must be [F, N] = {tuple(x.shape[:2])}, got {tuple(a.shape)}")
    if a.device != x.device:
        raise ValueError(f"{aname} is on {a.device} but {name} is on {x.device}")
    check_finite(aname, a)
    return x, a


def _check_newline(newline: object, d: int, device: torch.device) -> torch.Tensor | None:
    if newline is None:
        return None
    newline = check_tensor("newline", newline, (1, 2), floating=True)
    newline = newline.reshape(-1)
    if newline.shape[0] != d:
        raise ValueError(f"newline must be [D={d}] (or [1, D]), got {tuple(newline.shape)}")
    return newline.to(device)


# ----------------------------------------------------------------------------- pieces


def _exact_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows ``a, b [K, D] -> [K]`` in their dtype, bit-identical to the official
    ``cosine_similarity(normalize(a), normalize(b))``: the same elementwise steps
    (``x / max(|x|, 1e-12)``, again with ``1e-8`` as ``cosine_similarity`` does,
    product, sum), each row independent of the others."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        y = x / torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clamp_min(1e-12)
        return y / torch.linalg.vector_norm(y, 2, dim=-1, keepdim=True).clamp_min(1e-8)

    return (unit(a) * unit(b)).sum(-1)


def _static_above(xc: torch.Tensor, tau: float, name: str = "features") -> torch.Tensor:
    """``[F, N, D] -> above [F-1, N]`` bool: the official ``sim > tau`` decisions exactly.

    The official similarity (two normalisations of the whole clip, then a
    cosine) costs several ``[F, N, D]`` temporaries; only its comparison with
    ``tau`` is ever used. So: one cheap float32 cosine per adjacent pair
    (norms once per frame, dots into a reused buffer), and the exact official
    steps (:func:`_exact_similarity`, in ``xc``'s dtype) only for the pairs
    within a safe margin of ``tau`` (1e-3 in float32, 4 eps for half types:
    well above the rounding gap between the two computations, so every other
    decision is certain). Also rejects non-finite features (a NaN or inf row
    has a non-finite norm), without a separate pass.
    """
    f, n, d = xc.shape
    half = xc.dtype in (torch.float16, torch.bfloat16)
    acc = torch.float32 if half else xc.dtype
    norms = torch.empty(f, n, dtype=acc, device=xc.device)
    dots = torch.empty(max(f - 1, 0), n, dtype=acc, device=xc.device)
    frame = [torch.empty(n, d, dtype=acc, device=xc.device) for _ in range(2)] if half else None
    prod = torch.empty(n, d, dtype=acc, device=xc.device)
    prev = None
    for t in range(f):
        cur = frame[t % 2].copy_(xc[t]) if half else xc[t]
        torch.linalg.vector_norm(cur, 2, dim=-1, out=norms[t])
        if prev is not None:
            torch.sum(torch.mul(prev, cur, out=prod), -1, out=dots[t - 1])
        prev = cur
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} contains NaN or inf values (or rows whose norm overflows)")
    if f < 2:
        return torch.zeros(0, n, dtype=torch.bool, device=xc.device)
    cheap = dots / (norms[:-1] * norms[1:]).clamp_min(1e-30)
    margin = max(1e-3, 4 * torch.finfo(xc.dtype).eps)
    above = cheap > tau
    unsure = ((cheap - tau).abs() <= margin).nonzero(as_tuple=True)
    if unsure[0].numel():
        t, p = unsure
        exact = _exact_similarity(xc[t, p], xc[t + 1, p])
        above[t, p] = exact > tau  # compared in xc's dtype, as the official tensor
    return above


@dataclass
class _Video:
    """Per-video plan before the batched work (all index tensors on the video's device)."""

    f: int
    n: int
    segments: list[tuple[int, int]]
    total_reduced: int
    ratio: float
    seg_of_frame: torch.Tensor  # [F] long
    static_mask: torch.Tensor  # [S, N] bool
    frame_static: torch.Tensor  # [F, N] bool (static in the frame's segment)


def _plan_video(xc: torch.Tensor, tau: float, max_window_size: int, retain_ratio: float) -> _Video:
    f, n, _ = xc.shape
    above = _static_above(xc, tau)
    # the segmentation reads only `sim > tau`: a +-2 stand-in carries the exact decisions
    sim = torch.where(above, 2.0, -2.0)
    segments, total_reduced = temporal_segmentation(sim, tau, max_window_size)
    if f > 1:
        static_mask = segment_static_masks(sim, segments, tau)
    else:
        static_mask = torch.zeros(1, n, dtype=torch.bool, device=xc.device)
    seg_of_frame = torch.empty(f, dtype=torch.long)
    for k, (s, e) in enumerate(segments):
        seg_of_frame[s : e + 1] = k
    seg_of_frame = seg_of_frame.to(xc.device)
    ratio = rebalance_retain_ratio(retain_ratio, f, n, total_reduced)
    return _Video(
        f, n, segments, total_reduced, ratio, seg_of_frame, static_mask, static_mask[seg_of_frame]
    )


def _dpc_groups(
    tokens: torch.Tensor, num_centres: int, knn_k: int, beta: float, static_merge: str, gen
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-kNN on ``tokens [B, n, D]`` (float32 distances), merged per cluster.

    Returns ``(merged [B, K, D], centre_idx [B, K], members [B, K])`` where
    ``members`` counts the tokens of each cluster, the centre included.
    """
    centre_idx, dist = dpc_knn(tokens, num_centres, k=min(knn_k, num_centres), generator=gen)
    assign = assign_to_centres(dist, centre_idx)
    if static_merge == "beta":
        merged = centre_weighted_merge(tokens, centre_idx, assign, beta)
    else:  # NO_BETA=1: plain mean of the cluster, the centre included
        merged = mean_merge(tokens, assign, num_centres)
    members = torch.zeros(assign.shape[0], num_centres, dtype=torch.long, device=assign.device)
    members.scatter_add_(1, assign, torch.ones_like(assign))
    return merged, centre_idx, members


# ----------------------------------------------------------------------------- main


def outer_merge(
    features: torch.Tensor,
    attention: torch.Tensor,
    *,
    retain_ratio: float = 0.1,
    tau: float = 0.8,
    beta: float = 0.6,
    dominant_share: float = 0.0,
    knn_k: int = 7,
    max_window_size: int = 1024,
    layout: str = "one_token",
    newline: torch.Tensor | None = None,
    static_merge: str = "beta",
    compute_dtype: torch.dtype | None = None,
    attention_ties: str = "topk",
    generator: torch.Generator | int | None = None,
) -> OuterMergeResult:
    """HoliTom's outer-LLM merge of one video.

    Args:
        features: ``[F, N, D]`` pooled, projected vision features (LLaVA-OV:
            ``[32, 196, 3584]``).
        attention: ``[F, N]`` mean attention each token receives in the
            vision tower (pooled like the features); higher = keep.
        retain_ratio: overall share of the ``F * N`` tokens to keep, in (0, 1].
        tau: static threshold on the adjacent-frame similarity (strict ``>``).
        beta: centre weight of a static cluster merge, in [0, 1].
        dominant_share: 0 (official default) keeps each frame's dynamic
            budget by pure attention top-k. In (0, 1): the paper's
            VisionZip-style split: ``round(budget * (1 - dominant_share))``
            dominant tokens by attention, the rest of the budget as contextual
            tokens, DPC-kNN clusters of the remaining tokens of the frame
            merged as the static ones (emitted after the dominant tokens).
            The official branch for it mis-broadcasts the positions
            (``pos.masked_select(mask.unsqueeze(-1))``) and crashes; this is
            that branch with the broadcast fixed (checked side by side).
        knn_k: DPC-kNN neighbours (used as ``min(knn_k, clusters)``).
        max_window_size: longest segment the DP considers.
        layout: ``"one_token"`` (LLaVA-OneVision) or ``"grid"`` (LLaVA-Video;
            ``N`` must be a square grid).
        newline: ``[D]`` newline embedding (``image_newline``); ``None``
            inserts no newline tokens (the order is unchanged).
        static_merge: ``"beta"`` (official default) or ``"mean"`` (the
            official ``NO_BETA=1``: plain mean of the cluster, centre included).
        compute_dtype: dtype of the similarity, threshold tests and means;
            ``None`` = the features' dtype (faithful); ``torch.float32`` for
            the float32 variant. DPC-kNN distances are float32 either way.
        attention_ties: how equal attention values (frequent in bf16) are
            ranked: ``"topk"`` (faithful) as ``torch.topk`` on the device,
            like the official call; ``"lowest"``: the lower position first,
            the same on every device.
        generator: DPC-kNN tie-breaking noise (Generator or int seed; the
            official code uses the global RNG).

    Returns:
        :class:`OuterMergeResult` (tokens ``[M, D]`` in the features' dtype).
    """
    x, a = _check_video(-1, features, attention)
    return outer_merge_batch(
        [x],
        [a],
        retain_ratio=retain_ratio,
        tau=tau,
        beta=beta,
        dominant_share=dominant_share,
        knn_k=knn_k,
        max_window_size=max_window_size,
        layout=layout,
        newline=newline,
        static_merge=static_merge,
        compute_dtype=compute_dtype,
        attention_ties=attention_ties,
        generator=generator,
    )[0]


def outer_merge_batch(
    features: torch.Tensor | list[torch.Tensor],
    attention: torch.Tensor | list[torch.Tensor],
    *,
    retain_ratio: float = 0.1,
    tau: float = 0.8,
    beta: float = 0.6,
    dominant_share: float = 0.0,
    knn_k: int = 7,
    max_window_size: int = 1024,
    layout: str = "one_token",
    newline: torch.Tensor | None = None,
    static_merge: str = "beta",
    compute_dtype: torch.dtype | None = None,
    attention_ties: str = "topk",
    generator: torch.Generator | int | None = None,
) -> list[OuterMergeResult]:
    """:func:`outer_merge` on many videos at once.

    Args:
        features: ``[V, F, N, D]`` or a list of ``[F_v, N_v, D]`` (videos may
            differ in frames and grid, not in ``D``, dtype or device).
        attention: ``[V, F, N]`` or a list of ``[F_v, N_v]``.
        others: as :func:`outer_merge`, shared by all videos.

    Returns:
        One :class:`OuterMergeResult` per video, each exactly what
        :func:`outer_merge` returns for it alone (same generator draws in
        order of videos, then segments).

    The similarity and the DP run per video (the DP is sequential over
    frames); the static means, the dynamic top-k, the static merges and the
    final gather run once over all videos' frames and segments.
    """
    o = OuterOptions(
        retain_ratio,
        tau,
        beta,
        dominant_share,
        knn_k,
        max_window_size,
        layout,
        static_merge,
        compute_dtype,
        attention_ties,
    )
    if isinstance(features, torch.Tensor):
        features = check_tensor("features", features, 4, floating=True)
        features = list(features.unbind(0))
    if isinstance(attention, torch.Tensor):
        attention = check_tensor("attention", attention, 3)
        attention = list(attention.unbind(0))
    if not isinstance(features, (list, tuple)) or not isinstance(attention, (list, tuple)):
        raise TypeError("features and attention must be tensors or lists of tensors")
    if len(features) != len(attention) or not features:
        raise ValueError(
            f"features and attention must hold the same number (>= 1) of videos, "
            f"got {len(features)} and {len(attention)}"
        )
    videos = [_check_video(i, x, a) for i, (x, a) in enumerate(zip(features, attention))]
    x0 = videos[0][0]
    dtype, device, d = x0.dtype, x0.device, x0.shape[-1]
    for i, (x, _) in enumerate(videos):
        if x.dtype != dtype or x.device != device or x.shape[-1] != d:
            raise ValueError(f"features[{i}] must share dtype, device and D with features[0]")
        if layout == "grid" and math.isqrt(x.shape[1]) ** 2 != x.shape[1]:
            raise ValueError(f"layout='grid' needs a square grid, got N={x.shape[1]} tokens")
    nl = _check_newline(newline, d, device)
    cd = compute_dtype or dtype
    gen = make_generator(generator, device)

    with torch.no_grad():
        out = []
        for x, a in videos:
            xc = x.to(cd)
            plan = _plan_video(xc, o.tau, o.max_window_size, o.retain_ratio)
            out.append(_merge_one(xc, a, plan, nl, dtype, o, gen))
    return out


def _merge_one(
    xc: torch.Tensor,
    a: torch.Tensor,
    p: _Video,
    nl: torch.Tensor | None,
    dtype: torch.dtype,
    o: OuterOptions,
    gen: torch.Generator,
) -> OuterMergeResult:
    """Steps 4-7 for one planned video."""
    beta, dominant_share, knn_k, static_merge = o.beta, o.dominant_share, o.knn_k, o.static_merge
    f, n = p.f, p.n
    d = xc.shape[-1]
    device = xc.device
    seg_len = torch.tensor([e - s + 1 for s, e in p.segments], dtype=torch.long, device=device)
    r = p.ratio

    # --- dynamic tokens: per frame, top ceil(n_dyn * r') by attention (static slots at -inf)
    n_dyn = n - p.static_mask.sum(1)  # [S]
    n_dyn_list = n_dyn.tolist()
    # official: math.ceil without tolerance (tol=0), Python round for the split
    total_budget = [budget(v, r, name="r'", rounding="ceil", tol=0) for v in n_dyn_list]
    if dominant_share > 0:
        dom_budget = [
            budget(b, 1 - dominant_share, name="1 - dominant_share", at_least_one=False)
            for b in total_budget
        ]
    else:
        dom_budget = total_budget
    if o.attention_ties == "lowest":
        frame_budget = torch.tensor(dom_budget, dtype=torch.long, device=device)[p.seg_of_frame]
        score = a.masked_fill(p.frame_static, float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [F, N]
        ar = torch.arange(n, device=device).expand(f, n)
        rank = torch.empty_like(order).scatter_(1, order, ar)
        dominant = rank < frame_budget[:, None]  # [F, N] bool, never a static slot
    else:
        # torch.topk on each segment's [W, n_dyn] attention, as the official call, so
        # ties (common in bf16 attention) resolve as there on the same device
        dominant = torch.zeros(f, n, dtype=torch.bool, device=device)
        for k, (s, e) in enumerate(p.segments):
            if dom_budget[k] <= 0:
                continue
            dyn_pos = (~p.static_mask[k]).nonzero(as_tuple=True)[0]
            top = a[s : e + 1][:, dyn_pos].topk(dom_budget[k], dim=1).indices
            dominant[s : e + 1].scatter_(1, dyn_pos[top], True)
    dyn_f, dyn_p = dominant.nonzero(as_tuple=True)  # frame-major, ascending position
    dyn_tokens_src = dyn_f * n + dyn_p

    pieces_tok = []  # merged tokens not taken verbatim from xc
    pieces = []  # (frame, position, size, group, is_static) per merged token

    # --- contextual tokens (dominant_share > 0): DPC-kNN over each frame's rest, per segment
    if dominant_share > 0:
        rest = ~dominant & ~p.frame_static
        for k, (s, e) in enumerate(p.segments):
            ctx = total_budget[k] - dom_budget[k]
            n_rest = n_dyn_list[k] - dom_budget[k]
            if ctx <= 0 or n_rest <= 0:
                continue
            w = e - s + 1
            # every frame of a segment has the same dynamic set, so the rest differs per frame
            rest_pos = rest[s : e + 1].nonzero(as_tuple=True)[1].view(w, n_rest)
            toks = xc[s : e + 1].gather(1, rest_pos[..., None].expand(w, n_rest, d))
            merged, cidx, members = _dpc_groups(toks, ctx, knn_k, beta, static_merge, gen)
            pieces_tok.append(merged.reshape(w * ctx, d))
            pieces.append(
                (
                    torch.arange(s, e + 1, device=device).repeat_interleave(ctx),
                    rest_pos.gather(1, cidx).reshape(-1),
                    members.reshape(-1),
                    torch.ones(w * ctx, dtype=torch.long, device=device),
                    torch.zeros(w * ctx, dtype=torch.bool, device=device),
                )
            )

    # --- static tokens: mean over the segment's frames, then DPC-kNN per segment
    n_static = p.static_mask.sum(1).tolist()
    multi = [k for k, (s, e) in enumerate(p.segments) if e > s and n_static[k] > 0]
    if multi:
        # mean over the frames of each segment, of its static positions only; summed in
        # float32 for half inputs and rounded once, as torch's mean of the official call
        acc = torch.float32 if xc.dtype in (torch.float16, torch.bfloat16) else xc.dtype
        st_seg, st_pos = p.static_mask.nonzero(as_tuple=True)  # [T] segment-major
        means = torch.empty(st_seg.shape[0], d, dtype=xc.dtype, device=device)
        start = 0
        for k, (s, e) in enumerate(p.segments):
            if n_static[k] == 0:
                continue
            pos = st_pos[start : start + n_static[k]]
            total = torch.sum(xc[s : e + 1], dim=0, dtype=acc)[pos]
            means[start : start + n_static[k]] = (total / (e - s + 1)).to(xc.dtype)
            start += n_static[k]
        offsets = [0]
        for k in range(len(p.segments)):
            offsets.append(offsets[-1] + n_static[k])
        for k in multi:
            c = budget(n_static[k], r, name="r'", at_least_one=False)  # official: Python round
            if c <= 0:
                continue  # the official code drops the segment's static tokens
            s = p.segments[k][0]
            toks = means[offsets[k] : offsets[k + 1]][None]
            merged, cidx, members = _dpc_groups(toks, c, knn_k, beta, static_merge, gen)
            pos = st_pos[offsets[k] : offsets[k + 1]][cidx[0]]
            pieces_tok.append(merged[0])
            pieces.append(
                (
                    torch.full((c,), s, dtype=torch.long, device=device),
                    pos,
                    members[0] * int(seg_len[k]),
                    torch.zeros(c, dtype=torch.long, device=device),
                    torch.ones(c, dtype=torch.bool, device=device),
                )
            )

    # --- order key: one_token (segment, static first, frame, dominant before contextual,
    # position); grid (frame, position), static tokens sitting in their segment's first frame
    num_dyn = dyn_f.shape[0]
    frames = [dyn_f] + [q[0] for q in pieces]
    positions = [dyn_p] + [q[1] for q in pieces]
    sizes = [torch.ones(num_dyn, dtype=torch.long, device=device)] + [q[2] for q in pieces]
    groups = [torch.ones(num_dyn, dtype=torch.long, device=device)] + [
        torch.where(q[4], 0, 2) for q in pieces
    ]
    statics = [torch.zeros(num_dyn, dtype=torch.bool, device=device)] + [q[4] for q in pieces]
    frame_t, pos_t, size_t = torch.cat(frames), torch.cat(positions), torch.cat(sizes)
    group_t, static_t = torch.cat(groups), torch.cat(statics)
    seg_t = p.seg_of_frame[frame_t]
    key = (((seg_t * 2 + (~static_t).long()) * f + frame_t) * 3 + group_t) * n + pos_t
    rows = [xc.reshape(f * n, d).index_select(0, dyn_tokens_src)] + pieces_tok
    tokens, frame_t, pos_t, size_t, static_t = arrange_tokens(
        torch.cat([r.to(dtype) for r in rows]),
        frame_t,
        pos_t,
        size_t,
        static_t,
        key,
        layout=o.layout,
        newline=nl,
        num_frames=f,
        tokens_per_frame=n,
    )
    return OuterMergeResult(
        tokens=tokens,
        frame=frame_t,
        position=pos_t,
        size=size_t,
        segments=list(p.segments),
        total_reduced=int(p.total_reduced),
        retain_ratio=float(r),
        static=static_t,
    )


def arrange_tokens(
    tokens: torch.Tensor,
    frame: torch.Tensor,
    position: torch.Tensor,
    size: torch.Tensor,
    static: torch.Tensor,
    key: torch.Tensor | None,
    *,
    layout: str,
    newline: torch.Tensor | None,
    num_frames: int,
    tokens_per_frame: int,
    every_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put reduced video tokens in LLM order and insert the newlines.

    Args:
        tokens: ``[M, D]`` in any order; ``frame``, ``position``, ``size``,
            ``static``: ``[M]`` per token.
        key: ``[M]`` long, the one-token order (ascending; ``None`` = by frame,
            then position); the grid layout always orders by (frame, position).
        layout: ``"one_token"``: one newline after the last token;
            ``"grid"``: a newline after every row (``position // sqrt(N)``) of
            every frame that holds a token, or, with ``every_row``, after every
            row of such frames, empty ones included (VisionZip's official grid).
        newline: ``[D]`` or ``None`` (no newline tokens).

    Returns:
        ``(tokens, frame, position, size, static)`` in order; a newline has
        position :data:`NEWLINE`, size 0, not static, and the frame of its row
        (the last frame for the one-token newline).
    """
    device = tokens.device
    m = tokens.shape[0]
    n = tokens_per_frame
    if layout == "one_token":
        if key is None:
            key = frame * n + position
        order = torch.sort(key, stable=True).indices
        cols = [order]
        if newline is not None:
            cols.append(torch.tensor([m], device=device))  # the newline row, appended below
    else:
        g = math.isqrt(n)
        row = frame * g + torch.div(position, g, rounding_mode="floor")
        if newline is None:
            nl_rows = row.new_zeros(0)
        elif every_row:
            fr = torch.unique(frame)
            nl_rows = (fr[:, None] * g + torch.arange(g, device=device)).reshape(-1)
        else:
            nl_rows = torch.unique(row)
        # tokens of a row by position, then its newline: key (row, is_newline, position)
        k_tok = (row * 2) * n + position
        k_nl = (nl_rows * 2 + 1) * n
        order = torch.sort(torch.cat([k_tok, k_nl]), stable=True).indices
        cols = [torch.where(order < m, order, m)]
        nl_frame = torch.div(nl_rows, g, rounding_mode="floor")
    idx = torch.cat(cols)
    is_nl = idx == m
    if newline is not None:
        tokens = torch.cat([tokens, newline.to(tokens.dtype)[None]])
        last = frame.new_full((1,), num_frames - 1)
        frame = torch.cat([frame, last])
        position = torch.cat([position, position.new_full((1,), NEWLINE)])
        size = torch.cat([size, size.new_zeros(1)])
        static = torch.cat([static, static.new_zeros(1)])
    frame_out = frame[idx]
    if layout == "grid" and newline is not None:
        frame_out[is_nl] = nl_frame  # newline rows come in nl_rows order after the sort
    return tokens.index_select(0, idx), frame_out, position[idx], size[idx], static[idx]
