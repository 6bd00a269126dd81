"""The test-only xformers stand-in (bench/reference_standins.py) computes what xformers' functions compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.reference_standins import (
    BlockDiagonalMask, index_select_cat, memory_efficient_attention, modules, scaled_index_add,
)


def test_block_diagonal_mask_concatenates_and_splits_back_per_tensor():
    tensors = [torch.randn(2, 5, 3), torch.randn(3, 2, 3), torch.randn(1, 5, 3)]
    mask, cat = BlockDiagonalMask.from_tensor_list(tensors)
    assert mask.seqlens == [5, 5, 2, 2, 2, 5] and cat.shape == (1, 21, 3)
    assert mask.runs() == [(2, 5), (3, 2), (1, 5)]
    for part, tensor in zip(mask.split(cat), tensors):
        assert torch.equal(part, tensor)
    dense = mask.materialize()
    assert dense.shape == (21, 21) and int(dense.sum()) == 3 * 25 + 3 * 4
    assert dense[0, 4] and not dense[0, 5] and dense[10, 11] and not dense[11, 12]


def test_block_diagonal_attention_equals_sdpa_with_the_dense_mask_and_separate_sequences():
    torch.manual_seed(0)
    tensors = [torch.randn(2, 5, 4, 8) for _ in range(3)]  # [B, M, H, K] per crop size
    tensors[1] = torch.randn(3, 2, 4, 8)
    mask, q = BlockDiagonalMask.from_tensor_list(tensors)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = memory_efficient_attention(q, k, v, attn_bias=mask, op="flash")
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.materialize()
    ).transpose(1, 2)
    torch.testing.assert_close(out, dense)
    start = 0
    for length in mask.seqlens:  # each sequence alone
        sl = slice(start, start + length)
        alone = memory_efficient_attention(q[:, sl], k[:, sl], v[:, sl])
        torch.testing.assert_close(out[:, sl], alone)
        start += length


def test_scaled_index_add_and_index_select_cat():
    x, source, scaling = torch.randn(5, 3, 4), torch.randn(2, 3, 4), torch.randn(4)
    index = torch.tensor([3, 0])
    expected = x.clone()
    expected[index] += 0.5 * source * scaling
    torch.testing.assert_close(scaled_index_add(x, index, source, scaling=scaling, alpha=0.5), expected)
    a, b = torch.randn(4, 6), torch.randn(3, 6)
    picked = index_select_cat([a, b], [torch.tensor([2, 0]), torch.tensor([1])])
    assert torch.equal(picked, torch.cat([a[2], a[0], b[1]]))


def test_modules_provide_only_what_the_reference_imports():
    ops = modules()["xformers"]["xformers.ops"]
    for name in ("fmha", "memory_efficient_attention", "unbind", "scaled_index_add", "index_select_cat"):
        assert hasattr(ops, name), name
    for name in ("SwiGLU", "cross_entropy"):  # missing, so the reference falls back to its PyTorch versions
        assert not hasattr(ops, name), name
    config = modules()["omegaconf"]["omegaconf"].OmegaConf.create({"optim": {"lr": 0.0}})
    config.optim.lr = 1.0
    assert config["optim"]["lr"] == 1.0
