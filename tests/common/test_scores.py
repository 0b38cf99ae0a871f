"""Tests for common.scores."""

from __future__ import annotations

import pytest
import torch

from common.scores import attention_received, cls_attention, l2_norm_score


def test_attention_received_known_answer():
    attn = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])  # [B=1, Nq=2, Nk=3]
    torch.testing.assert_close(attention_received(attn), torch.tensor([[0.25, 0.25, 0.5]]))
    heads = torch.stack([attn[0], attn[0].flip(-1)])[None]  # [1, 2, 2, 3]
    torch.testing.assert_close(attention_received(heads), torch.tensor([[0.375, 0.25, 0.375]]))
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(attention_received(attn, mask), torch.tensor([[0.5, 0.5, 0.0]]))


def test_cls_attention_and_norm():
    attn = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    torch.testing.assert_close(cls_attention(attn), attn[:, :, 0].mean(1))
    torch.testing.assert_close(cls_attention(attn, -1), attn[:, :, -1].mean(1))
    x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert l2_norm_score(x).tolist() == [[5.0, 1.0]]


def test_half_precision():
    attn = torch.softmax(torch.randn(1, 2, 64, 64), -1)
    for dt in (torch.float16, torch.bfloat16):
        r = attention_received(attn.to(dt))
        assert r.dtype == torch.float32
        torch.testing.assert_close(r, attention_received(attn), atol=1e-3, rtol=1e-2)
        assert l2_norm_score(torch.randn(1, 3, 4, dtype=dt)).dtype == torch.float32


def test_bad_input():
    with pytest.raises(ValueError, match="attn"):
        attention_received(torch.rand(3, 3))
    with pytest.raises(TypeError, match="attn"):
        attention_received(torch.ones(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="query_mask"):
        attention_received(torch.rand(1, 3, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask"):
        attention_received(torch.rand(1, 3, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="cls_index"):
        cls_attention(torch.rand(1, 3, 3), 3)
    with pytest.raises(TypeError, match="x"):
        l2_norm_score([1.0, 2.0])
