"""FastVGGT token merging (Shen et al. 2025) for VGGT's global attention.

In every global block from ``start_block`` on, inside attention after qkv,
qk-norm and RoPE:

1. dst = all tokens of frame 0, the special (camera + register) tokens of
   every frame, and one random patch per 2x2 cell of every other frame
   (a fresh generator seeded with ``seed`` at every call); src = the rest.
2. Every src finds its most cosine-similar dst over the whole sequence, the
   metric being the block's norm1 output (the attention input), computed in
   chunks of at most ``chunk`` src tokens in ``sim_dtype`` (protected src,
   which never merge, are skipped).
3. ``r = int(ratio * N)`` clipped to the unprotected src count: the r most
   similar unprotected src merge; protected tokens never merge.
4. q, k and v are merged by the mean of each dst's members (itself
   included); attention runs on the shorter sequence (plain SDPA: no size
   tracking, no proportional attention, exactly as the official code).
5. After the output projection each src copies its dst's output; the MLP
   runs at full length.

Options (one line each):

- ``faithful_grid=True``: the official grid, built as ``(h//2*2) x (w//2*2)``
  cells written contiguously into the frame, so for the 37x28 grid rows
  drift by one column and the last 28 patches of every frame are always
  src. Default ``False``: correct 2x2 cells on any grid (partial border
  cells draw among their own patches).
- ``protect="stride"``: official protection, every ``N // int(N*share)``-th
  token of the sequence (the docstring's "top 10% by importance" is not what
  the code does). ``"norm"``: protect the ``share * N`` src tokens with the
  largest key norm (after qk-norm and RoPE, mean over heads): a token whose
  key is long draws large attention logits, so averaging it away changes
  attention the most. ``None``: no protection.
- ``faithful_protect=True`` (stride only): like the official code, a
  protected token that is also dst appears twice in the merged sequence
  (once as the dst mean, once raw) and takes the raw copy's output; its src
  members take the dst copy's. ``False``: protected dst are ordinary dst.

The method patches attention *instances* (their ``forward`` attribute) and
adds a pre-hook on the aggregator; ``handle.remove()`` restores both.
It works on this project's :class:`~threed.vggt.model.VGGT` and on the
upstream ``vggt`` package's VGGT (duck-typed: ``aggregator.global_blocks[i]
.attn`` with ``qkv``, ``q_norm``, ``k_norm``, ``proj``, ``num_heads``, ``rope``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checks import budget, check_count, check_range, top_r
from common.matching import Merge, grid_random_partition, match_src_to_dst
from common.merging import scatter_merge
from common.methods import MethodHandle, register_method

__all__ = [
    "MergeHandle",
    "MergePlan",
    "TokenMerging",
    "attention_share",
    "build_plan",
    "dst_mask",
]

_PROTECT = ("stride", "norm", None)
_SIM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@register_method(
    "fastvggt",
    kind="vggt",
    keep_all={"ratio": 0.0},
    example={"ratio": 0.9},
    invalid=(
        ("ratio", 1.5),
        ("start_block", -1),
        ("protect", "top"),
        ("protect_share", 1.0),
        ("seed", -1),
        ("chunk", 0),
        ("faithful_grid", 1),
        ("sim_dtype", "int8"),
    ),
    summary="FastVGGT token merging in VGGT's global attention (ratio 0 = unchanged)",
)
@dataclass
class TokenMerging:
    """FastVGGT token merging; see the module docstring.

    Args:
        ratio: merge ratio in [0, 1]; ``r = int(ratio * N)`` src tokens merge
            (official 0.9, i.e. all unprotected src). 0 = unchanged model.
        start_block: first global block that merges (official ``--merging``, 0).
        protect: ``"stride"`` (official), ``"norm"`` or ``None``.
        protect_share: share of the ``N`` tokens protected, in [0, 1) (official 0.1).
        seed: seed of the dst draw, re-seeded at every call (official 33).
        chunk: src tokens per similarity block (official 5000).
        faithful_grid: reproduce the official drifting 2x2 grid.
        faithful_protect: duplicate protected dst tokens as the official code.
        sim_dtype: ``"bfloat16"`` (official), ``"float16"`` or ``"float32"``.
            Never switched behind the caller's back (it decides near-ties). On
            CPU, bfloat16 is about 2x faster than float32 where the CPU has
            native bf16 dot products (AVX512-BF16 / AMX: measured 51 vs 116 ms
            at 32 frames, 224 px); without them bf16 matmuls are emulated and
            slower than float32, so pass ``"float32"`` there.
    """

    ratio: float = 0.9
    start_block: int = 0
    protect: str | None = "stride"
    protect_share: float = 0.1
    seed: int = 33
    chunk: int = 5000
    faithful_grid: bool = False
    faithful_protect: bool = True
    sim_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)
        check_count("start_block", self.start_block, low=0)
        if self.protect not in _PROTECT:
            raise ValueError(f"protect must be one of {_PROTECT}, got {self.protect!r}")
        check_range("protect_share", self.protect_share, 0.0, 1.0)
        if self.protect_share >= 1.0:
            raise ValueError(f"protect_share must be in [0, 1), got {self.protect_share}")
        check_count("seed", self.seed, low=0)
        check_count("chunk", self.chunk, low=1)
        for name in ("faithful_grid", "faithful_protect"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.sim_dtype not in _SIM_DTYPES:
            raise ValueError(
                f"sim_dtype must be one of {tuple(_SIM_DTYPES)}, got {self.sim_dtype!r}"
            )

    def apply(self, model: nn.Module) -> MergeHandle:
        """Patch ``model`` (a VGGT or its aggregator); returns the handle.

        Applying again (this or another TokenMerging, to the model or to its
        aggregator) first removes the previous patch, so patches never stack.
        """
        return MergeHandle(model, self)

    __call__ = apply


@dataclass
class MergePlan:
    """One block's merge decision.

    ``merge``: the :class:`common.matching.Merge` (``K`` kept tokens);
    ``extra_idx``: ``[E]`` positions appended raw after the merged tokens
    (official duplicated protected dst; empty otherwise); ``num_merged``: r.
    """

    merge: Merge
    extra_idx: Tensor
    num_merged: int

    @property
    def num_attended(self) -> int:
        return self.merge.num_kept + int(self.extra_idx.numel())


def dst_mask(
    num_frames: int,
    grid_hw: tuple[int, int],
    num_special: int,
    seed: int,
    faithful_grid: bool,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[S * (num_special + h*w)]`` bool: True for dst tokens."""
    h, w = grid_hw
    tpf = num_special + h * w
    if not faithful_grid:
        dst_idx, _ = grid_random_partition(
            num_frames, tpf, num_special, (h, w), (2, 2), generator=seed, device=device
        )
        mask = torch.zeros(num_frames * tpf, dtype=torch.bool, device=device)
        mask[dst_idx[0]] = True
        return mask
    mask = torch.zeros(num_frames, tpf, dtype=torch.bool, device=device)
    mask[0] = True
    mask[:, :num_special] = True
    if num_frames > 1:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        hc, wc = h // 2, w // 2
        pick = torch.randint(4, (num_frames - 1, hc, wc), generator=gen, device=device)
        cells = torch.zeros(num_frames - 1, hc, wc, 4, dtype=torch.bool, device=device)
        cells.scatter_(3, pick[..., None], True)
        grid = cells.view(num_frames - 1, hc, wc, 2, 2).transpose(2, 3)
        grid = grid.reshape(num_frames - 1, hc * 2 * wc * 2)
        # official quirk: the (2hc) x (2wc) grid is written contiguously, ignoring
        # the real row width w (rows drift when w is odd; the tail is always src)
        mask[1:, num_special : num_special + grid.shape[1]] = grid
    return mask.reshape(-1)


def build_plan(
    cfg: TokenMerging,
    metric: Tensor,
    keys: Tensor,
    grid_hw: tuple[int, int],
    num_special: int,
) -> MergePlan | None:
    """Merge plan for one global block (``None`` when nothing merges).

    Args:
        metric: ``[B, N, C]`` the block's norm1 output.
        keys: ``[B, H, N, D]`` keys after qk-norm and RoPE (for ``protect="norm"``).
        grid_hw: patch grid ``(h, w)``; num_special: tokens before the patches.

    The matching is :func:`common.matching.match_src_to_dst` with the top-r
    cut (``r``; ties go to the lower src position, as ToMe's matcher): it
    matches only the src that can merge and skips the cut when every
    unprotected src merges (``ratio`` 0.9 with the default protection).
    """
    b, n, _ = metric.shape
    h, w = grid_hw
    tpf = num_special + h * w
    if n % tpf:
        raise ValueError(f"sequence length {n} is not a multiple of {num_special} + {h}*{w}")
    # official: r = int(N * ratio), protected count int(N * share), no tolerance
    r = budget(n, cfg.ratio, name="ratio", rounding="trunc", at_least_one=False)
    if r <= 0:
        return None
    device = metric.device
    with torch.no_grad():
        is_dst = dst_mask(n // tpf, grid_hw, num_special, cfg.seed, cfg.faithful_grid, device)
        src_idx = (~is_dst).nonzero()[:, 0]
        dst_idx = is_dst.nonzero()[:, 0]
        if src_idx.numel() == 0:
            return None
        protected = torch.zeros(b, n, dtype=torch.bool, device=device)
        extra_idx = torch.zeros(0, dtype=torch.long, device=device)
        num_prot = budget(
            n, cfg.protect_share, name="protect_share", rounding="trunc", at_least_one=False
        )
        if cfg.protect == "stride" and num_prot > 0:
            step = max(1, n // num_prot)
            pidx = torch.arange(0, n, step, device=device)[:num_prot]
            protected[:, pidx] = True
            if cfg.faithful_protect:
                extra_idx = pidx[is_dst[pidx]]
        elif cfg.protect == "norm" and num_prot > 0:
            score = keys.float().norm(dim=-1).mean(1)[:, src_idx]  # [B, Ns]
            top = top_r(score, min(num_prot, src_idx.numel()))
            protected.scatter_(1, src_idx[top], True)
        merge = match_src_to_dst(
            metric,
            dst_idx,
            src_idx,
            protected=protected,
            chunk_size=cfg.chunk,
            compute_dtype=_SIM_DTYPES[cfg.sim_dtype],
            r=r,
        )
    return MergePlan(merge, extra_idx, n - merge.num_kept)


class _Context:
    """Per-forward state shared by the patched attentions of one model."""

    def __init__(self) -> None:
        self.grid_hw: tuple[int, int] | None = None
        self.stats: list[dict] = []
        self.last_plan: MergePlan | None = None
        self.last_plan_block: int | None = None


def _merged_forward(attn: nn.Module, x: Tensor, pos: Tensor | None = None, **_ignored) -> Tensor:
    """Replacement ``Attention.forward`` (bound to one instance)."""
    cfg, ctx, block = attn._hp_cfg, attn._hp_ctx, attn._hp_block
    b, n, c = x.shape
    heads = attn.num_heads
    hd = c // heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = getattr(attn, "rope", None)
    if rope is not None and pos is not None:
        q, k = rope(q, pos), rope(k, pos)
    plan = None
    if ctx.grid_hw is not None:
        plan = build_plan(cfg, x, k, ctx.grid_hw, attn._hp_special)
    if plan is None:
        out = F.scaled_dot_product_attention(q, k, v)
        ctx.stats.append({"block": block, "tokens": n, "attended": n, "merged": 0})
        return attn.proj(out.transpose(1, 2).reshape(b, n, c))
    kk, ne = plan.merge.num_kept, int(plan.extra_idx.numel())
    dst_of, extra = plan.merge.dst_of, plan.extra_idx
    unmerge_idx = _unmerge_index(plan)
    q, k, v = (_merge_heads(t, dst_of, extra, kk) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = attn.proj(out.transpose(1, 2).reshape(b * (kk + ne), c))
    # every token copies its slot's output (a duplicated protected dst its raw copy's)
    full = out.index_select(0, unmerge_idx).view(b, n, c)
    ctx.stats.append(
        {"block": block, "tokens": n, "attended": plan.num_attended, "merged": plan.num_merged}
    )
    if ctx.last_plan is None:
        ctx.last_plan, ctx.last_plan_block = plan, block
    return full


def _unmerge_index(plan: MergePlan) -> Tensor:
    """``[B*N]``: the row of the flattened ``[B*(K+E), C]`` attention output each token
    copies (a duplicated protected dst its raw copy's)."""
    m, extra = plan.merge, plan.extra_idx
    b, n = m.dst_of.shape
    kk, ne = m.num_kept, int(extra.numel())
    dev = m.dst_of.device
    slot = m.dst_of.clone()
    if ne:
        slot[:, extra] = kk + torch.arange(ne, device=dev)
    return (slot + torch.arange(b, device=dev)[:, None] * (kk + ne)).reshape(-1)


def _merge_heads(t: Tensor, dst_of: Tensor, extra: Tensor, kk: int) -> Tensor:
    """Mean-merge ``t [B, H, N, D]`` into ``[B, H, K + E, D]`` (contiguous).

    Slots ``j < K``: :func:`common.merging.scatter_merge` (mean of the members,
    along the token axis of the head-major tensor, written in place: no
    transposed copy of q, k and v, and SDPA gets contiguous inputs); slots
    ``K + e``: raw copies of ``t[:, :, extra[e]]`` (the official duplicated
    protected dst).
    """
    b, h, _, d = t.shape
    ne = int(extra.numel())
    if torch.is_grad_enabled() and t.requires_grad:
        # autograd refuses the in-place writes into a slice of ``out``: same values, copied
        merged = scatter_merge(t, dst_of, kk, "mean", dim=2)
        return torch.cat([merged, t.index_select(2, extra)], 2) if ne else merged.contiguous()
    out = t.new_empty(b, h, kk + ne, d)
    scatter_merge(t, dst_of, kk, "mean", dim=2, out=out[:, :, :kk])
    if ne:
        out[:, :, kk:] = t.index_select(2, extra)
    return out


class MergeHandle(MethodHandle):
    """What :meth:`TokenMerging.apply` returns: remove it (or use ``with``) to restore.

    A :class:`common.methods.MethodHandle` claiming the aggregator: applying
    merging again to the same VGGT (or to its aggregator) removes this one.

    ``stats``: one dict per global block of the last forward (``tokens`` N,
    ``attended`` tokens entering attention, ``merged`` r); ``kept_ratio``
    their mean attended/N over merging blocks; ``last_plan``: the first
    merging block's :class:`MergePlan` of the last forward (for plots).
    """

    def __init__(self, model: nn.Module, method: TokenMerging) -> None:
        self.model = model
        self.method = method
        self._patched: list[tuple[nn.Module, object]] = []
        self._hook = None
        self._ctx = _Context()
        agg = getattr(model, "aggregator", model)
        blocks = getattr(agg, "global_blocks", None)
        if blocks is None:
            raise TypeError(
                "model must be a VGGT (with .aggregator.global_blocks) or its aggregator"
            )
        attns = [blk.attn for i, blk in enumerate(blocks) if i >= method.start_block]
        for i, attn in enumerate(attns, start=method.start_block):
            for name in ("qkv", "proj", "num_heads", "q_norm", "k_norm"):
                if not hasattr(attn, name):
                    raise TypeError(f"global block {i} attention has no {name!r}")
        special = int(getattr(agg, "patch_start_idx", 5))
        psize = getattr(agg, "patch_size", 14)
        self._patch_size = psize[0] if isinstance(psize, (tuple, list)) else int(psize)
        # claim first: the previous handle restores the very attributes patched below
        self._claim(agg)
        for i, attn in enumerate(attns, start=method.start_block):
            prev = attn.__dict__.get("forward")
            attn._hp_cfg, attn._hp_ctx, attn._hp_block, attn._hp_special = (
                method,
                self._ctx,
                i,
                special,
            )
            attn.forward = types.MethodType(_merged_forward, attn)
            self._patched.append((attn, prev))
        # a bound method: the hook keeps this handle alive as long as the patch exists
        self._hook = agg.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        images = args[0] if args else kwargs["images"]
        ctx = self._ctx
        ctx.grid_hw = (images.shape[-2] // self._patch_size, images.shape[-1] // self._patch_size)
        ctx.stats = []
        ctx.last_plan, ctx.last_plan_block = None, None

    @property
    def grid_hw(self) -> tuple[int, int] | None:
        """Patch grid ``(h, w)`` of the current forward, set by the aggregator's pre-hook;
        set it by hand to call a patched global attention on its own."""
        return self._ctx.grid_hw

    @grid_hw.setter
    def grid_hw(self, value: tuple[int, int] | None) -> None:
        self._ctx.grid_hw = None if value is None else (int(value[0]), int(value[1]))

    @property
    def stats(self) -> list[dict]:
        return list(self._ctx.stats)

    @property
    def kept_ratio(self) -> float:
        """Mean share of tokens entering attention in the merging blocks (1.0 = none)."""
        rows = [s for s in self._ctx.stats if s["merged"] > 0]
        if not rows:
            return 1.0
        return sum(s["attended"] / s["tokens"] for s in rows) / len(rows)

    @property
    def last_plan(self) -> MergePlan | None:
        return self._ctx.last_plan

    def _undo(self) -> None:
        """Restore every patched attention and drop the hook."""
        for attn, prev in self._patched:
            del attn.forward
            if prev is not None:
                attn.forward = prev
            for name in ("_hp_cfg", "_hp_ctx", "_hp_block", "_hp_special"):
                attn.__dict__.pop(name, None)
        self._patched.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def attention_share(handle: MergeHandle) -> float:
    """Attention cost of the last forward relative to full (sum of attended^2 / N^2)."""
    rows = handle.stats
    if not rows:
        return 1.0
    return sum(s["attended"] ** 2 for s in rows) / sum(s["tokens"] ** 2 for s in rows)
