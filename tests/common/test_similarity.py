"""Tests for common.similarity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.similarity import (
    adjacent_frame_similarity,
    best_match,
    cosine_similarity_matrix,
    normalize,
)


def test_known_answer():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = cosine_similarity_matrix(a)
    r = 2**-0.5
    torch.testing.assert_close(s, torch.tensor([[1.0, 0, r], [0, 1.0, r], [r, r, 1.0]]))
    v, i = best_match(a[None], a[None], exclude_self=True)
    assert i.tolist() == [[2, 2, 0]]  # row 2: tie between 0 and 1 -> lower index
    torch.testing.assert_close(v, torch.tensor([[r, r, r]]))
    assert normalize(torch.zeros(2, 3)).abs().sum() == 0


def test_adjacent_frame_similarity_known_answer():
    x = torch.zeros(3, 2, 2)
    x[:, 0] = torch.tensor([1.0, 0.0])  # static position
    x[0, 1], x[1, 1], x[2, 1] = (
        torch.tensor([1.0, 0]),
        torch.tensor([0, 1.0]),
        torch.tensor([0, 3.0]),
    )
    s = adjacent_frame_similarity(x)
    assert s.shape == (2, 2)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    sb = adjacent_frame_similarity(torch.stack([x, x]))
    assert sb.shape == (2, 2, 2)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    m=st.integers(1, 20),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_chunked_equals_full(b, n, m, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, 6, generator=g)
    c = torch.randn(b, m, 6, generator=g)
    full = cosine_similarity_matrix(a, c)
    ref = torch.nn.functional.cosine_similarity(a[:, :, None], c[:, None], dim=-1)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cosine_similarity_matrix(a, c, chunk_size=chunk), full)
    v, i = best_match(a, c, chunk_size=chunk)
    v0, i0 = full.max(-1)
    torch.testing.assert_close(v, v0)
    assert torch.equal(i, i0)


def test_low_precision():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 30, 16, generator=g)
    ref = cosine_similarity_matrix(a)
    for dt in (torch.float16, torch.bfloat16):
        s = cosine_similarity_matrix(a.to(dt), chunk_size=7)
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, ref, atol=2e-2, rtol=0)
        s2 = cosine_similarity_matrix(a, compute_dtype=dt)
        assert s2.dtype == torch.float32
        torch.testing.assert_close(s2, ref, atol=2e-2, rtol=0)
        assert adjacent_frame_similarity(a.to(dt)).dtype == torch.float32


def test_bad_input():
    with pytest.raises(ValueError, match="a"):
        cosine_similarity_matrix(torch.randn(3))
    with pytest.raises(TypeError, match="a"):
        cosine_similarity_matrix(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        cosine_similarity_matrix(torch.randn(2, 3), chunk_size=0)
    with pytest.raises(TypeError, match="compute_dtype"):
        cosine_similarity_matrix(torch.randn(2, 3), compute_dtype="bf16")
    with pytest.raises(ValueError, match="b"):
        best_match(torch.randn(1, 2, 3), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="exclude_self"):  # one token has no other match
        best_match(torch.randn(1, 1, 3), torch.randn(1, 1, 3), exclude_self=True)
    with pytest.raises(ValueError, match="x"):
        adjacent_frame_similarity(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="x"):
        adjacent_frame_similarity(torch.randn(4, 3))
