"""Block-diagonal attention over packed tokens: SDPA per crop group, and xformers on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ConfigError
from trainer.models import Attention, TokenLayout, build_backbone, xformers_available


def dense_block_diagonal_attention(attn: Attention, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Independent reference: one softmax over the whole packed sequence with -inf outside each crop's block."""
    num_tokens, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(num_tokens, 3, heads, head_dim).permute(1, 2, 0, 3)
    crop = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    bias = torch.where(crop[:, None] == crop[None, :], 0.0, -math.inf)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
    out = (weights @ v).permute(1, 0, 2).reshape(num_tokens, dim)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_grouped_sdpa_equals_dense_block_diagonal_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 4, backend="sdpa")
    layout = TokenLayout((3, 2, 4), (5, 5, 2))  # the first two groups merge into one SDPA call
    x = torch.randn(layout.num_tokens, 16, requires_grad=True)
    out = attn(x, layout)
    expected = dense_block_diagonal_attention(attn, x, layout.crop_seq_lens())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    (grad_packed,) = torch.autograd.grad(out, x, grad_out)
    (grad_dense,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(grad_packed, grad_dense, rtol=1e-4, atol=1e-6)


def test_backend_choice_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"model.attention_backend: invalid value 'flash'; allowed: one of auto"):
        Attention(16, 4, backend="flash")
    if not xformers_available():
        with pytest.raises(ConfigError, match=r"allowed: auto or sdpa \(xformers is not installed\)"):
            Attention(16, 4, backend="xformers")


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not xformers_available():
        pytest.skip("needs xformers")
    torch.manual_seed(0)
    settings = {"patch_size": 4, "img_size": 32, "drop_path_rate": 0.0, "num_register_tokens": 4}
    sdpa = build_backbone("vit_pico", attention_backend="sdpa", **settings).cuda().eval()
    xformers = build_backbone("vit_pico", attention_backend="xformers", **settings).cuda().eval()
    xformers.load_state_dict(sdpa.state_dict())
    xs = [torch.randn(4, 3, 32, 32, device="cuda"), torch.randn(8, 3, 16, 16, device="cuda")]
    assert xformers.blocks[0].attn._use_xformers(xs[0]) and not sdpa.blocks[0].attn._use_xformers(xs[0])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = sdpa.forward_features_list(xs)
        got = xformers.forward_features_list(xs)
    for out_x, out_s in zip(got, expected):
        torch.testing.assert_close(out_x["x_prenorm"].float(), out_s["x_prenorm"].float(), rtol=2e-2, atol=2e-2)
