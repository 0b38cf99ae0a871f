"""Tests for common.checks (the shared argument checks)."""

from __future__ import annotations

import pytest
import torch

from common.checks import (
    budget,
    check_count,
    check_finite,
    check_range,
    check_ratio,
    check_tensor,
    top_r,
)


def test_check_tensor():
    x = torch.zeros(2, 3)
    assert check_tensor("x", x, 2) is x
    with pytest.raises(TypeError, match="x"):
        check_tensor("x", [1.0])
    with pytest.raises(ValueError, match="x must be 3-D or 4-D"):
        check_tensor("x", x, (3, 4))
    with pytest.raises(TypeError, match="x"):
        check_tensor("x", x.long(), floating=True)
    with pytest.raises(ValueError, match="empty"):
        check_tensor("x", torch.zeros(0, 3))
    assert check_tensor("x", torch.zeros(0, 3), nonempty=False).shape == (0, 3)


def test_check_finite_including_overflowing_sums():
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # finite, but the sum overflows
    assert check_finite("x", big) is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="x"):
            check_finite("x", torch.tensor([1.0, bad]))
    check_finite("x", torch.tensor([1, 2]))  # integers are always finite


def test_scalar_checks_name_the_argument():
    assert check_ratio("r", 1) == 1.0 and check_ratio("r", 0.0, allow_zero=True) == 0.0
    for bad in (0.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="r"):
            check_ratio("r", bad)
    with pytest.raises(TypeError, match="r"):
        check_ratio("r", True)
    assert check_count("n", 3, low=1, high=3) == 3
    with pytest.raises(ValueError, match="n"):
        check_count("n", 4, high=3)
    with pytest.raises(TypeError, match="n"):
        check_count("n", 2.0)
    assert check_range("beta", 0.5, 0.0, 1.0) == 0.5
    with pytest.raises(ValueError, match="beta"):
        check_range("beta", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="beta"):  # NaN is a bad value, not a bad type
        check_range("beta", float("nan"), 0.0, 1.0)
    with pytest.raises(TypeError, match="beta"):
        check_range("beta", "0.5", 0.0, 1.0)


def test_budget():
    assert budget(10, 0.25) == 2  # round(2.5) -> 2 (Python rounding, as the official code)
    assert budget(10, 0.25, rounding="ceil") == 3
    assert budget(10, 0.29, rounding="floor") == 2
    assert budget(10, 0.01) == 1  # a ratio keeps at least one token
    assert budget(0, 0.5) == 0
    assert budget(10, 0) == 0 and budget(10, 10) == 10  # ints are exact counts
    assert budget(10, 0.0) == 0  # zero means none as a ratio too (one rule)
    assert budget(100, 0.07, rounding="ceil") == 7  # 100 * 0.07 = 7.000000000000001
    assert budget(100, 0.29, rounding="floor") == 29  # 100 * 0.29 = 28.999999999999996
    assert budget(100, 0.07, rounding="ceil", tol=0.0) == 8  # math.ceil as official code has it
    assert budget(100, 0.29, rounding="floor", tol=0.0) == 28
    assert budget(29, 0.9, rounding="trunc") == 26  # int(26.1), FastVGGT's r
    assert budget(10, 0.05, rounding="trunc", at_least_one=False) == 0
    assert budget(10, 0.05, rounding="trunc") == 1
    assert budget(10, 0.0, at_least_one=True) == 0
    with pytest.raises(ValueError, match="keep"):
        budget(10, 11)
    with pytest.raises(ValueError, match="keep"):
        budget(10, 1.5)
    with pytest.raises(ValueError, match="keep"):
        budget(10, -0.1)
    with pytest.raises(TypeError, match="keep"):
        budget(10, True)
    with pytest.raises(ValueError, match="rounding"):
        budget(10, 0.5, rounding="up")
    with pytest.raises(ValueError, match="tol"):
        budget(10, 0.5, rounding="ceil", tol=-1e-9)


def test_top_r_is_stable_on_ties():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    assert top_r(s, 3).tolist() == [[1, 3, 0]]  # ties -> lower position first
    assert top_r(s, 0).shape == (1, 0)
    assert top_r(torch.zeros(2, 5), 2).tolist() == [[0, 1], [0, 1]]
