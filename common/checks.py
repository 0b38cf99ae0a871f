"""Argument checks shared by every public function.

Each raises ``ValueError`` / ``TypeError`` whose message names the argument
and what was expected, so bad input never turns into a silent wrong result
or an ``IndexError`` from deep inside a kernel.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "accumulation_dtype",
    "check_compute_dtype",
    "make_generator",
    "check_tensor",
    "check_finite",
    "check_ratio",
    "check_count",
    "budget",
    "ROUNDING_MODES",
    "top_r",
    "check_range",
]


def check_tensor(
    name: str,
    x: object,
    ndim: int | tuple[int, ...] | None = None,
    *,
    floating: bool = False,
    nonempty: bool = True,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the given rank(s); return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Reject NaN / inf values (a NaN metric would silently reorder top-k)."""
    if x.is_floating_point() and x.numel():
        # fast path: one reduction without a bool copy; a NaN / inf anywhere makes the
        # sum non-finite. Only a non-finite sum (possibly an overflow of large finite
        # values) needs the elementwise check.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    return x


def check_ratio(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A ratio in (0, 1] (or [0, 1] with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1) or math.isnan(value):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def check_count(name: str, value: int, *, low: int = 0, high: int | None = None) -> int:
    """An integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name} must be in [{low}, {hi}], got {value}")
    return value


def check_range(name: str, value: float, low: float, high: float) -> float:
    """A number in the closed interval [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:  # also rejects NaN (a value error, as in check_ratio)
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


ROUNDING_MODES = ("round", "ceil", "floor", "trunc")


def budget(
    n: int,
    keep: float | int,
    *,
    name: str = "keep",
    rounding: str = "round",
    at_least_one: bool = True,
    tol: float = 1e-9,
) -> int:
    """Number of tokens out of ``n`` that a ratio or a count stands for: the one rule.

    ``keep`` is a ratio in [0, 1] (float) or an exact count in [0, n] (int);
    zero means none in both forms (an empty selection). A ratio becomes
    ``n * keep`` rounded by ``rounding``, one mode per method's official code:

    - ``"round"``: Python ``round`` (half to even: ``round(2.5) == 2``);
      FastV, PDrop, HoliTom's static / inner-LLM counts;
    - ``"ceil"`` / ``"floor"``: with a tolerance ``tol`` (default 1e-9), so
      ``100 * 0.07`` gives 7 (TSP3D's keep ratios use ``"ceil"``); ``tol=0``
      is ``math.ceil(n * keep)`` as official code writes it (HoliTom's dynamic
      tokens: ``100 * 0.07 = 7.000000000000001`` gives 8 there);
    - ``"trunc"``: ``int(n * keep)`` exactly as written in the official code,
      without tolerance (FastVGGT's ``r``, AdaToken-3D's counts).

    A positive ratio gives at least one token when ``n > 0`` unless
    ``at_least_one=False`` (FastVGGT merges ``int(ratio * N)`` tokens, which
    may be zero).
    """
    check_count("n", n)
    if isinstance(keep, bool):
        raise TypeError(f"{name} must be a float ratio or an int count, got bool")
    if isinstance(keep, int):
        return check_count(name, keep, high=n)
    check_ratio(name, keep, allow_zero=True)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if rounding == "round":
        k = round(n * keep)
    elif rounding == "ceil":
        k = math.ceil(n * keep - tol)
    elif rounding == "floor":
        k = math.floor(n * keep + tol)
    elif rounding == "trunc":
        k = int(n * keep)
    else:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if keep > 0 and at_least_one and n > 0:
        k = max(k, 1)
    return min(n, max(k, 0))


def top_r(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Positions of the ``r`` largest ``scores [B, M]`` per row, best first: ``[B, r]`` long.

    The one deterministic top-r of the suite (selection, ToMe matching,
    FastVGGT's cut): a stable descending sort, so ties go to the lower
    position (``torch.topk`` leaves the order of ties unspecified).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :r]


def check_compute_dtype(compute_dtype: object, name: str = "compute_dtype") -> None:
    """``None`` or a floating ``torch.dtype``."""
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise TypeError(f"{name} must be a floating torch.dtype, got {compute_dtype!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (sums and norms), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def make_generator(
    generator: torch.Generator | int | None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` as given, or a new one on ``device`` seeded with the int
    (``None`` = seed 0), so every random choice comes from an explicit seed."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
        g = torch.Generator(device=device)
        g.manual_seed(0 if generator is None else generator)
        return g
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
