"""Token matchers (ToMe style): compute indices once, return a :class:`Merge`.

A matcher looks at a metric ``[B, N, C]`` under ``torch.no_grad()`` and
decides which tokens survive and which surviving token absorbs each of the
others. The result, :class:`Merge`, applies that decision to any tensor that
rides along (features, sizes, positions, source maps) through the functions
of :mod:`common.merging` (one mechanism for every method).

Matchers:

- :func:`bipartite_soft_matching` -- ToMe: alternate tokens into sets A/B,
  each A token's most similar B token, merge the ``r`` best edges.
- :func:`grid_random_partition` + :func:`match_src_to_dst` -- FastVGGT:
  dst = frame 0, special tokens, one random token per grid cell of every
  other frame; every other (src) token merges into its most cosine-similar
  dst over the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.checks import (
    check_compute_dtype,
    check_count,
    check_finite,
    check_tensor,
    make_generator,
    top_r,
)
from common.merging import (
    MERGE_MODES,
    check_assignment,
    scatter_merge,
    sequential_halving_merge,
    unmerge,
    weighted_average_merge,
)
from common.similarity import best_match, normalize

__all__ = [
    "Merge",
    "merge_from_targets",
    "bipartite_soft_matching",
    "grid_random_partition",
    "match_src_to_dst",
]


@dataclass(eq=False)
class Merge:
    """A merge decision for a batch of sequences.

    Attributes:
        keep_idx: ``[B, K]`` long, sorted ascending: original indices of the
            surviving tokens (the merged token ``k`` sits where
            ``keep_idx[:, k]`` was).
        dst_of: ``[B, N]`` long in ``[0, K)``: which surviving token holds each
            original token; a kept token maps to itself
            (``dst_of.gather(1, keep_idx) == arange(K)``).
    """

    keep_idx: torch.Tensor
    dst_of: torch.Tensor

    def __post_init__(self) -> None:
        keep_idx = check_tensor("keep_idx", self.keep_idx, 2)
        if keep_idx.dtype != torch.long:
            raise TypeError(f"keep_idx must be a long tensor, got {keep_idx.dtype}")
        dst_of = check_assignment("dst_of", self.dst_of, keep_idx.shape[1])
        if dst_of.shape[0] != keep_idx.shape[0]:
            raise ValueError(
                f"keep_idx batch {keep_idx.shape[0]} does not match dst_of batch {dst_of.shape[0]}"
            )

    # ---- shape helpers -------------------------------------------------
    @property
    def batch(self) -> int:
        return self.dst_of.shape[0]

    @property
    def num_tokens(self) -> int:
        """``N``, the length before merging."""
        return self.dst_of.shape[1]

    @property
    def num_kept(self) -> int:
        """``K``, the length after merging."""
        return self.keep_idx.shape[1]

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device=None) -> Merge:
        """The keep-everything merge (every method's first test)."""
        check_count("batch", batch, low=1)
        check_count("num_tokens", num_tokens, low=1)
        idx = torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()
        return cls(keep_idx=idx, dst_of=idx.clone())

    # ---- application ---------------------------------------------------
    def merge(
        self, x: torch.Tensor, mode: str = "mean", size: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Merge a tensor riding along: ``x [B, N, *] -> [B, K, *]``.

        Modes: ``"mean"`` (mean of all members, the kept token included, as
        ToMe / FastVGGT ``scatter_reduce(include_self=True)``), ``"sum"``,
        ``"amax"`` and ``"wavg"`` (size-weighted mean with ``size [B, N]``,
        default ones; get the merged sizes from :meth:`merge_size`) and
        ``"halving"`` (HoliTom's inner-LLM loop ``h[t] = (h[t] + h[i]) / 2`` over
        the members in index order, see
        :func:`common.merging.sequential_halving_merge`).
        """
        if mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        if mode == "wavg":
            return weighted_average_merge(x, self.dst_of, self.num_kept, size)[0]
        if mode == "halving":
            if size is not None:
                raise ValueError("size is only used with mode='wavg'")
            return sequential_halving_merge(x, self.dst_of, self.keep_idx)
        if size is not None:
            raise ValueError("size is only used with mode='wavg'")
        return scatter_merge(x, self.dst_of, self.num_kept, mode)

    def merge_wavg(
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ToMe's ``merge_wavg``: ``(size-weighted mean [B, K, *], merged size [B, K])``."""
        return weighted_average_merge(x, self.dst_of, self.num_kept, size)

    def merge_size(self, size: torch.Tensor | None = None) -> torch.Tensor:
        """Sizes after merging: ``size [B, N]`` (default ones) -> ``[B, K]`` sums."""
        if size is None:
            size = torch.ones(self.dst_of.shape, dtype=torch.float32, device=self.dst_of.device)
        size = check_tensor("size", size)
        if size.ndim == 2:
            return scatter_merge(size[..., None], self.dst_of, self.num_kept, "sum")[..., 0]
        return scatter_merge(size, self.dst_of, self.num_kept, "sum")

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Back to full length: ``y [B, K, *] -> [B, N, *]`` (each token copies its slot)."""
        return unmerge(y, self.dst_of)

    def merge_source(self, source: torch.Tensor | None = None) -> torch.Tensor:
        """Which original tokens each merged token holds (ToMe ``merge_source``).

        ``source [B, N, N0]`` (bool or float; default the identity, bool) ->
        ``[B, K, N0]`` by elementwise max over the members. Chain merges by
        passing the previous result. Memory ``O(B * N * N0)``: meant for
        inspection / visualisation, not for 100k-token sequences.
        """
        if source is None:
            b, n = self.dst_of.shape
            source = torch.eye(n, dtype=torch.bool, device=self.dst_of.device).expand(b, n, n)
        else:
            source = check_tensor("source", source, 3)
        return scatter_merge(source, self.dst_of, self.num_kept, "amax")


def merge_from_targets(target: torch.Tensor) -> Merge:
    """Build a :class:`Merge` from ``target [B, N]`` (original index holding each token).

    ``target[b, i] == i`` marks a kept token; otherwise ``target[b, i]`` must
    be a kept token (no chains). Every row must keep the same number of tokens.
    """
    target = check_tensor("target", target, 2)
    if target.dtype != torch.long:
        raise TypeError(f"target must be a long tensor, got {target.dtype}")
    b, n = target.shape
    if int(target.min()) < 0 or int(target.max()) >= n:
        raise ValueError(f"target values must be in [0, {n})")
    ar = torch.arange(n, device=target.device)
    is_kept = target == ar
    counts = is_kept.sum(1)
    k = int(counts[0])
    if bool((counts != k).any()):
        raise ValueError(f"every batch row must keep the same number of tokens, got {counts}")
    if not bool(is_kept.gather(1, target).all()):
        raise ValueError("target must point at kept tokens (target[target] == target)")
    # kept indices in ascending order: stable sort of "not kept" puts kept first
    keep_idx = torch.sort((~is_kept).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    pos = is_kept.long().cumsum(1) - 1  # slot of each kept token
    dst_of = pos.gather(1, target)
    return Merge(keep_idx=keep_idx, dst_of=dst_of)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: int = 0) -> Merge:
    """ToMe's bipartite soft matching.

    Tokens ``i >= protect_first`` with even ``i`` form set A, odd ``i`` set B
    (the global parity, so ``protect_first=1`` / ``2`` reproduces ToMe's
    ``class_token`` / ``distill_token`` handling). Each A token finds its most
    cosine-similar B token; the ``r`` A tokens with the highest similarity
    merge into their B match. Protected leading tokens neither merge nor
    receive. Ties are broken toward the lower index.

    Args:
        metric: ``[B, N, C]`` floating point (keys in ToMe).
        r: tokens to remove, clipped as ToMe does to
            ``(N - protect_first) // 2`` (at most half of the unprotected
            tokens; never more than ``|A|``).
        protect_first: number of leading tokens never merged.

    Returns:
        :class:`Merge` with ``K = N - min(r, (N - protect_first) // 2)``.
    """
    metric = check_tensor("metric", metric, 3, floating=True)
    check_finite("metric", metric)
    b, n, _ = metric.shape
    check_count("r", r)
    check_count("protect_first", protect_first, high=n)
    device = metric.device
    a_start = min(protect_first + protect_first % 2, n)
    b_start = min(protect_first + 1 - protect_first % 2, n)
    a_idx = torch.arange(a_start, n, 2, device=device)
    b_idx = torch.arange(b_start, n, 2, device=device)
    # ToMe: "we can only reduce by a maximum of 50% tokens" (<= |A|, and B is non-empty)
    r = min(r, (n - protect_first) // 2, a_idx.numel()) if b_idx.numel() > 0 else 0
    target = torch.arange(n, device=device).expand(b, n).clone()
    if r == 0:
        return merge_from_targets(target)
    with torch.no_grad():
        m = normalize(metric)
        scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # [B, Na, Nb]
        node_max, node_idx = scores.max(dim=-1)  # first max on ties
        src_local = top_r(node_max, r)  # [B, r] positions in A, ties -> lower index
        dst_local = node_idx.gather(1, src_local)
        target.scatter_(1, a_idx[src_local], b_idx[dst_local])
    return merge_from_targets(target)


def grid_random_partition(
    num_frames: int,
    tokens_per_frame: int,
    num_special: int,
    grid_hw: tuple[int, int],
    cell: tuple[int, int] = (2, 2),
    generator: torch.Generator | int | None = None,
    first_frame_all_dst: bool = True,
    batch: int = 1,
    *,
    randomize: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVGGT's dst/src partition of a multi-frame token sequence.

    The sequence is ``num_frames`` frames of ``tokens_per_frame`` tokens each:
    ``num_special`` special tokens (camera, registers) then an ``h x w`` patch
    grid in row-major order. dst = every token of frame 0 (when
    ``first_frame_all_dst``), the special tokens of every frame, and one
    random patch per ``cell = (ch, cw)`` cell of every other frame; src = the
    rest. Any grid size works: partial cells at the bottom / right border
    draw uniformly among their own patches. (The official code asserts a
    37x28 grid and lays the cells out with a one-column drift; this is the
    corrected layout.)

    Args:
        num_frames, tokens_per_frame, num_special: sequence layout, with
            ``tokens_per_frame == num_special + h * w``.
        grid_hw: ``(h, w)`` patch grid.
        cell: ``(ch, cw)`` cell size.
        generator: ``torch.Generator`` or int seed (``None`` = seed 0).
            FastVGGT re-seeds with 33 at every call.
        first_frame_all_dst: make all of frame 0 dst (FastVGGT's reference frame).
        batch: ``B``; each row draws its own cells.
        randomize: ``False`` takes each cell's top-left patch (official ``no_rand``).
        device: where the indices live (the generator's device when given).

    Returns:
        ``(dst_idx [B, Nd], src_idx [B, Ns])`` long, each sorted ascending,
        disjoint, together covering ``[0, num_frames * tokens_per_frame)``.
    """
    check_count("num_frames", num_frames, low=1)
    check_count("tokens_per_frame", tokens_per_frame, low=1)
    check_count("num_special", num_special, high=tokens_per_frame)
    check_count("batch", batch, low=1)
    if not (isinstance(grid_hw, (tuple, list)) and len(grid_hw) == 2):
        raise TypeError(f"grid_hw must be a pair (h, w), got {grid_hw!r}")
    h = check_count("grid_hw[0]", grid_hw[0], low=1)
    w = check_count("grid_hw[1]", grid_hw[1], low=1)
    if not (isinstance(cell, (tuple, list)) and len(cell) == 2):
        raise TypeError(f"cell must be a pair (ch, cw), got {cell!r}")
    sy = check_count("cell[0]", cell[0], low=1)
    sx = check_count("cell[1]", cell[1], low=1)
    if num_special + h * w != tokens_per_frame:
        raise ValueError(
            f"tokens_per_frame must equal num_special + h * w = {num_special} + {h}*{w}, "
            f"got {tokens_per_frame}"
        )
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    gen = make_generator(generator, device)
    device = torch.device(device)
    f, p = num_frames, tokens_per_frame
    n = f * p
    is_dst = torch.zeros(batch, f, p, dtype=torch.bool, device=device)
    is_dst[:, :, :num_special] = True
    first = 1 if first_frame_all_dst else 0
    if first_frame_all_dst:
        is_dst[:, 0] = True
    nf = f - first
    if nf > 0:
        gh, gw = math.ceil(h / sy), math.ceil(w / sx)
        cy = torch.arange(gh, device=device)
        cx = torch.arange(gw, device=device)
        eh = (h - cy * sy).clamp(max=sy)  # [gh] rows in each cell row
        ew = (w - cx * sx).clamp(max=sx)  # [gw]
        if randomize:
            u = torch.rand(batch, nf, gh, gw, generator=gen, device=gen.device).to(device)
            cnt = eh[:, None] * ew[None, :]  # [gh, gw]
            pick = (u * cnt).long().clamp(max=cnt - 1)  # uniform in [0, cnt)
            oy = pick // ew[None, :]
            ox = pick % ew[None, :]
        else:
            oy = torch.zeros(batch, nf, gh, gw, dtype=torch.long, device=device)
            ox = torch.zeros_like(oy)
        py = cy[:, None] * sy + oy
        px = cx[None, :] * sx + ox
        flat = (num_special + py * w + px).reshape(batch, nf, gh * gw)
        grid = is_dst[:, first:]
        grid.scatter_(2, flat, True)
    is_dst = is_dst.reshape(batch, n)
    nd = int(is_dst[0].sum())
    order = torch.sort((~is_dst).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :nd].contiguous(), order[:, nd:].contiguous()


def _as_batched_index(name: str, idx: object, b: int, n: int) -> torch.Tensor:
    idx = check_tensor(name, idx, (1, 2), nonempty=False)
    if idx.dtype != torch.long:
        raise TypeError(f"{name} must be a long tensor, got {idx.dtype}")
    if idx.ndim == 1:
        idx = idx.expand(b, idx.shape[0])
    if idx.shape[0] != b:
        raise ValueError(f"{name} batch must be {b} (or 1-D), got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name} values must be in [0, {n})")
    return idx


def match_src_to_dst(
    metric: torch.Tensor,
    dst_idx: torch.Tensor,
    src_idx: torch.Tensor,
    protected: torch.Tensor | None = None,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    r: int | None = None,
) -> Merge:
    """Merge src tokens into their most cosine-similar dst token (FastVGGT).

    Args:
        metric: ``[B, N, C]`` floating point (FastVGGT: the block's norm1 output).
        dst_idx: ``[Nd]`` or ``[B, Nd]`` long, destination tokens (always kept;
            they receive src tokens, protected or not).
        src_idx: ``[Ns]`` or ``[B, Ns]`` long, tokens that merge; disjoint from
            ``dst_idx``. Tokens in neither set are kept untouched.
        protected: optional ``[N]`` or ``[B, N]`` bool; a protected src token
            is never merged (kept as its own token, receiving nothing). Every
            row must end with the same number of kept tokens.
        chunk_size: process this many src tokens at a time so only a
            ``[B, chunk_size, Nd]`` score block exists (FastVGGT: 5000).
            ``None`` = all at once.
        compute_dtype: dtype of the similarity matmul (FastVGGT: bfloat16);
            default float32 for half inputs, else the metric's dtype.
        r: ``None`` merges every unprotected src; an int merges only the ``r``
            unprotected src with the highest similarity to their match (clipped
            to the smallest number of unprotected src of a row), FastVGGT's
            top-r cut. Ties of that cut go to the lower position in ``src_idx``
            (:func:`common.checks.top_r`, as ToMe's matcher here).

    Returns:
        :class:`Merge` with ``K = N - (number of merged src)``.
        Ties of the best match go to the lowest-numbered dst position in ``dst_idx``.

    When every row shares ``src_idx`` (1-D) and the same protected src, only
    the unprotected src are matched (a protected src never reads its match);
    the result is the same as matching all of them.
    """
    metric = check_tensor("metric", metric, 3, floating=True)
    check_finite("metric", metric)
    b, n, _ = metric.shape
    shared_src = isinstance(src_idx, torch.Tensor) and src_idx.ndim == 1
    dst_idx = _as_batched_index("dst_idx", dst_idx, b, n)
    src_idx = _as_batched_index("src_idx", src_idx, b, n)
    if dst_idx.shape[1] == 0 and src_idx.shape[1] > 0:
        raise ValueError("dst_idx must not be empty when src_idx is not")
    if chunk_size is not None:
        check_count("chunk_size", chunk_size, low=1)
    check_compute_dtype(compute_dtype)
    if r is not None:
        check_count("r", r)
    device = metric.device
    use = torch.zeros(b, n, dtype=torch.int32, device=device)
    use.scatter_add_(1, dst_idx, torch.ones_like(dst_idx, dtype=torch.int32))
    use.scatter_add_(1, src_idx, torch.ones_like(src_idx, dtype=torch.int32))
    if bool((use > 1).any()):
        raise ValueError("dst_idx and src_idx must be disjoint and without repeats")
    if protected is not None:
        protected = check_tensor("protected", protected, (1, 2))
        if protected.dtype != torch.bool:
            raise TypeError(f"protected must be a bool tensor, got {protected.dtype}")
        if protected.shape[-1] != n or (protected.ndim == 2 and protected.shape[0] != b):
            raise ValueError(
                f"protected must be [N={n}] or [B={b}, N={n}], got {tuple(protected.shape)}"
            )
        protected = protected.expand(b, n)
    target = torch.arange(n, device=device).expand(b, n).clone()
    ns = src_idx.shape[1]
    if ns == 0:
        return merge_from_targets(target)
    with torch.no_grad():
        valid = None if protected is None else ~protected.gather(1, src_idx)  # [B, Ns]
        # match only the src that can merge when every row agrees on them
        rows = None
        if valid is None:
            rows = torch.arange(ns, device=device) if shared_src else None
        elif shared_src and (b == 1 or bool((valid == valid[:1]).all())):
            rows = valid[0].nonzero()[:, 0]
        num_valid = ns if valid is None else int(valid.sum(1).min())
        if r is not None:
            num_valid = min(r, num_valid)
        if num_valid == 0:
            return merge_from_targets(target)
        sub = src_idx if rows is None else src_idx[:, rows]  # [B, Nm] src that are matched
        c = metric.shape[-1]
        src = metric.gather(1, sub[..., None].expand(b, sub.shape[1], c))
        dst = metric.gather(1, dst_idx[..., None].expand(b, dst_idx.shape[1], c))
        sims, best = best_match(src, dst, chunk_size=chunk_size, compute_dtype=compute_dtype)
        if r is None or (rows is not None and num_valid == rows.numel()):
            tgt = dst_idx.gather(1, best)  # every matched src merges
            if rows is None and valid is not None:
                tgt = torch.where(valid, tgt, src_idx)
            target.scatter_(1, sub, tgt)
        else:
            score = sims.float()
            if rows is None and valid is not None:
                score = score.masked_fill(~valid, float("-inf"))
            chosen = top_r(score, num_valid)  # [B, r] positions in sub
            target.scatter_(1, sub.gather(1, chosen), dst_idx.gather(1, best.gather(1, chosen)))
    kept = (target == torch.arange(n, device=device)).sum(1)
    if bool((kept != kept[0]).any()):
        raise ValueError(
            f"protected leaves batch rows with different numbers of kept tokens "
            f"{kept.tolist()}; use one partition for every row (or batch 1), or pass r"
        )
    return merge_from_targets(target)
