"""Packed multi-crop forward (== separate forwards) and the two stochastic-depth modes."""

from __future__ import annotations

import pytest
import torch

from trainer.models import Block, TokenLayout, build_backbone
from trainer.models.packing import sample_kept_rows


def pico(**overrides):
    settings = {"patch_size": 4, "img_size": 32, "drop_path_rate": 0.0, "attention_backend": "sdpa"}
    return build_backbone("vit_pico", **{**settings, **overrides})


def crops_and_masks() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(0)
    global_crops = torch.randn(4, 3, 32, 32, generator=generator)
    local_crops = torch.randn(6, 3, 16, 16, generator=generator)
    masks = torch.rand(4, 64, generator=generator) < 0.3
    return [global_crops, local_crops], [masks, None]


def weighted_loss(outputs: list[dict], weights: list[torch.Tensor]) -> torch.Tensor:
    keys = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
    return sum((out[key] * w[key]).sum() for out, w in zip(outputs, weights) for key in keys)


def test_packed_forward_equals_separate_forwards_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = pico(num_register_tokens=2)
    for param in model.parameters():  # LayerScale 1e-5 would hide block differences: make blocks matter
        if param.dim() == 1 and torch.all(param == 1e-5):
            param.data.fill_(0.5)
    xs, masks = crops_and_masks()
    separate = [model.forward_features(x, m) for x, m in zip(xs, masks)]
    weights = [{key: torch.randn_like(value) for key, value in out.items() if key != "masks"} for out in separate]
    weighted_loss(separate, weights).backward()
    separate_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    packed = model.forward_features_list(xs, masks)
    weighted_loss(packed, weights).backward()
    for out_packed, out_separate in zip(packed, separate):
        for key in weights[0]:
            torch.testing.assert_close(out_packed[key], out_separate[key], rtol=1e-5, atol=1e-5)
        assert out_packed["masks"] is out_separate["masks"]
    assert all(g.abs().sum() > 0 for g in separate_grads.values() if g.numel() > 96)
    for name, param in model.named_parameters():
        scale = separate_grads[name].abs().max().item()  # sums over many tokens: float32 error grows with them
        torch.testing.assert_close(param.grad, separate_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_packed_forward_with_equal_sizes_and_empty_batches() -> None:
    model = pico().eval()
    a, b = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    empty = torch.zeros(0, 3, 32, 32)
    out_a, out_empty, out_b = model.forward_features_list([a, empty, b])
    torch.testing.assert_close(out_a["x_prenorm"], model.forward_features(a)["x_prenorm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b["x_prenorm"], model.forward_features(b)["x_prenorm"], rtol=1e-5, atol=1e-5)
    assert out_empty["x_norm_clstoken"].shape == (0, 96)
    with pytest.raises(ValueError, match="2 crop batches but 1 masks"):
        model.forward_features_list([a, b], [None])


def test_token_layout() -> None:
    layout = TokenLayout((2, 0, 3, 4), (5, 9, 5, 2))
    assert layout.num_tokens == 2 * 5 + 3 * 5 + 4 * 2
    assert layout.offsets == (0, 10, 10, 25)
    assert layout.attention_groups == ((0, 5, 5), (25, 4, 2))  # the empty group is skipped, equal lengths merged
    assert layout.crop_seq_lens() == [5] * 5 + [2] * 4
    views = layout.split(torch.arange(33.0)[:, None])
    assert [tuple(v.shape) for v in views] == [(2, 5, 1), (0, 9, 1), (3, 5, 1), (4, 2, 1)]
    assert views[3][0, 0, 0] == 25


def test_sample_kept_rows_keeps_whole_crops() -> None:
    layout = TokenLayout((10, 7, 1), (3, 2, 4))
    rows, scale, kept = sample_kept_rows(layout, 1 - 0.3, torch.device("cpu"))
    assert kept.batch_sizes == (int(10 * 0.7), int(7 * 0.7), 1)  # int(B * (1 - d)), at least one crop
    assert kept.seq_lens == layout.seq_lens
    assert rows.shape == scale.shape == (kept.num_tokens,)
    group0 = rows[: 7 * 3].view(7, 3)
    assert torch.equal(group0 - group0[:, :1], torch.arange(3).expand(7, 3))  # whole crops, tokens in order
    assert torch.all(group0[:, 0] % 3 == 0) and len(set(group0[:, 0].tolist())) == 7
    assert torch.all(rows[21:29] >= 30) and torch.all(rows[21:29] < 44) and torch.all(rows[29:] >= 44)
    expected_scale = [10 / 7] * 21 + [7 / 4] * 8 + [1.0] * 4
    torch.testing.assert_close(scale, torch.tensor(expected_scale))


def attention_only_block(rate: float, mode: str) -> Block:
    """A tiny block whose FFN branch is switched off, so the output is x + ls1 * attn(norm1(x))."""
    torch.manual_seed(0)
    block = Block(dim=8, num_heads=2, ffn="mlp", layerscale_init=1.0, drop_path_rate=rate, drop_path_mode=mode)
    block.ls2.gamma.data.zero_()
    return block


def test_drop_path_is_identity_in_eval() -> None:
    layout = TokenLayout((4, 6), (3, 5))
    x = torch.randn(layout.num_tokens, 8)
    reference = attention_only_block(0.0, "efficient").eval()
    for mode in ("efficient", "classic"):
        block = attention_only_block(0.5, mode).eval()
        block.load_state_dict(reference.state_dict())
        torch.testing.assert_close(block(x, layout), reference(x, layout), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["efficient", "classic"])
def test_drop_path_in_training_drops_whole_crops_and_is_unbiased(mode: str) -> None:
    layout = TokenLayout((8, 5), (3, 4))
    x = torch.randn(layout.num_tokens, 8)
    block = attention_only_block(0.25, mode)
    with torch.no_grad():
        update = block.eval()(x, layout) - x  # the full attention update of every token
        block.train()
        draws = torch.stack([block(x, layout) - x for _ in range(800)])  # [draws, T, D]
    per_crop = layout.split(draws.permute(1, 0, 2))  # per group [B, N, draws, D]
    full = layout.split(update)
    for group, (b, crops) in enumerate(zip(layout.batch_sizes, per_crop)):
        kept_crop = crops.abs().amax(dim=(1, 3)) > 0  # [B, draws]: whether the crop's branch ran in that draw
        if mode == "efficient":  # exactly int(B * (1 - d)) crops run in every draw, each scaled by B / kept
            assert torch.all(kept_crop.sum(0) == int(b * 0.75))
            keep = int(b * 0.75) / b
        else:  # each crop runs with probability 1 - d, scaled by 1 / (1 - d)
            keep = 0.75
        ran = crops.permute(0, 2, 1, 3)[kept_crop]  # [runs, N, D]
        expected = full[group][:, None].expand(-1, len(draws), -1, -1)[kept_crop]
        torch.testing.assert_close(ran, expected / keep, rtol=1e-4, atol=1e-5)
        assert kept_crop.float().mean().item() == pytest.approx(keep, abs=0.04)
        # unbiased: the mean update over draws is the full update (within 5 standard errors of a {0, u/keep} draw)
        standard_error = full[group].abs() * ((1 - keep) / keep / len(draws)) ** 0.5
        mean = crops.mean(dim=2)
        assert torch.all((mean - full[group]).abs() <= 5 * standard_error + 1e-6)

def test_efficient_drop_path_backward_through_the_packed_model() -> None:
    torch.manual_seed(0)
    model = pico(drop_path_rate=0.5).train()
    xs, masks = crops_and_masks()
    outputs = model.forward_features_list(xs, masks)
    sum(out["x_norm_patchtokens"].square().mean() for out in outputs).backward()
    grads = [p.grad for name, p in model.named_parameters() if name.startswith("blocks.")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    reference = pico(drop_path_rate=0.0)
    reference.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model(xs[0]), reference.eval()(xs[0]), rtol=0, atol=0)
