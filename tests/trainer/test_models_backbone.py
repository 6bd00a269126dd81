"""The DINOv2 backbone: released parameter layout, init, tokens, position embedding and the forward API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, ModelConfig
from trainer.models import DinoVisionTransformer, build_backbone, interpolate_pos_embed

# Written out from the released checkpoints (dinov2_vit{s,b,l,g}14[_reg4].pth), independently of the model code.
# name: (embed_dim, depth, {per-block FFN key: shape})
RELEASES = {
    "vit_small": (384, 12, {"mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
                            "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,)}),
    "vit_base": (768, 12, {"mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
                           "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,)}),
    "vit_large": (1024, 24, {"mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
                             "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,)}),
    "vit_giant2": (1536, 40, {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,),
                              "mlp.w3.weight": (1536, 4096), "mlp.w3.bias": (1536,)}),
}


def released_layout(dim: int, depth: int, ffn: dict, registers: int) -> list[tuple[str, tuple[int, ...]]]:
    keys = [("cls_token", (1, 1, dim)), ("pos_embed", (1, 1370, dim))]  # 518 px / 14 = 37x37 patches + CLS
    if registers:
        keys.append(("register_tokens", (1, registers, dim)))
    keys += [("mask_token", (1, dim)), ("patch_embed.proj.weight", (dim, 3, 14, 14)), ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        keys += [(f"blocks.{i}.norm1.weight", (dim,)), (f"blocks.{i}.norm1.bias", (dim,)),
                 (f"blocks.{i}.attn.qkv.weight", (3 * dim, dim)), (f"blocks.{i}.attn.qkv.bias", (3 * dim,)),
                 (f"blocks.{i}.attn.proj.weight", (dim, dim)), (f"blocks.{i}.attn.proj.bias", (dim,)),
                 (f"blocks.{i}.ls1.gamma", (dim,)),
                 (f"blocks.{i}.norm2.weight", (dim,)), (f"blocks.{i}.norm2.bias", (dim,))]
        keys += [(f"blocks.{i}.{name}", shape) for name, shape in ffn.items()]
        keys.append((f"blocks.{i}.ls2.gamma", (dim,)))
    return keys + [("norm.weight", (dim,)), ("norm.bias", (dim,))]


def pico(**overrides) -> DinoVisionTransformer:
    settings = {"patch_size": 4, "img_size": 32, "drop_path_rate": 0.0, "attention_backend": "sdpa"}
    return build_backbone("vit_pico", **{**settings, **overrides})


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", list(RELEASES))
def test_state_dict_matches_released_layout(arch: str, registers: int) -> None:
    dim, depth, ffn = RELEASES[arch]
    with torch.device("meta"):
        model = build_backbone(arch, patch_size=14, img_size=518, num_register_tokens=registers)
    got = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert got == released_layout(dim, depth, ffn, registers)
    assert (model.embed_dim, model.n_blocks, model.num_register_tokens, model.patch_size) == (dim, depth, registers, 14)


def test_meta_build_then_init_gives_documented_statistics() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = pico(num_register_tokens=4, layerscale_init=1e-5, ffn="swiglu")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    weights = torch.cat([params[f"blocks.{i}.attn.qkv.weight"].flatten() for i in range(model.n_blocks)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.03)
    assert params["pos_embed"].std().item() == pytest.approx(0.02, rel=0.1)
    for name in ("cls_token", "register_tokens"):
        assert 0 < params[name].abs().max().item() < 1e-5  # normal(std 1e-6), not zero
    assert torch.count_nonzero(params["mask_token"]) == 0
    biases = [p for name, p in params.items() if name.endswith("bias") and "norm" not in name and "patch" not in name]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    assert torch.equal(params["blocks.0.ls2.gamma"], torch.full((96,), 1e-5))
    assert torch.equal(params["norm.weight"], torch.ones(96))
    assert params["patch_embed.proj.weight"].abs().max() > 0


def test_register_tokens_have_no_position_embedding_and_cls_comes_first() -> None:
    model = pico(num_register_tokens=3)
    images = torch.randn(2, 3, 32, 32)
    tokens = model.prepare_tokens(images)
    assert tokens.shape == (2, 1 + 3 + 64, 96)
    assert torch.equal(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))
    assert torch.allclose(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, -1))
    patches = model.patch_embed(images) + model.pos_embed[:, 1:]
    assert torch.allclose(tokens[:, 4:], patches)


def test_mask_token_replaces_masked_patches_before_position_embedding() -> None:
    model = pico()
    with torch.no_grad():
        model.mask_token.normal_()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [0, 5, 63]] = True
    masks[1] = True
    tokens = model.prepare_tokens(images, masks)[:, 1:]
    expected = torch.where(masks[..., None], model.mask_token, model.patch_embed(images)) + model.pos_embed[:, 1:]
    assert torch.allclose(tokens, expected)
    # a fully masked crop no longer depends on its pixels
    other = model.forward_features(torch.randn(2, 3, 32, 32), masks)["x_norm_patchtokens"][1]
    assert torch.allclose(model.forward_features(images, masks)["x_norm_patchtokens"][1], other, atol=1e-6)
    with pytest.raises(ValueError, match=r"masks of shape \(2, 16\)"):
        model.prepare_tokens(images, masks[:, :16])


def test_pos_embed_interpolation_modes() -> None:
    pos = torch.randn(1, 1 + 8 * 8, 6)
    assert interpolate_pos_embed(pos, (8, 8), antialias=False, offset=0.1) is pos  # own grid: untouched
    grid = pos[:, 1:].reshape(1, 8, 8, 6).permute(0, 3, 1, 2)
    # original releases: scale factor (grid + 0.1) / M, no antialias
    original = interpolate_pos_embed(pos, (4, 6), antialias=False, offset=0.1)
    expected = F.interpolate(grid, scale_factor=(4.1 / 8, 6.1 / 8), mode="bicubic", antialias=False)
    assert torch.allclose(original[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 24, 6))
    # _reg4 releases: output size, antialias
    reg4 = interpolate_pos_embed(pos, (4, 6), antialias=True, offset=0.0)
    expected = F.interpolate(grid, size=(4, 6), mode="bicubic", antialias=True)
    assert torch.allclose(reg4[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 24, 6))
    assert not torch.allclose(original, reg4)
    assert torch.equal(original[:, 0], pos[:, 0]) and torch.equal(reg4[:, 0], pos[:, 0])
    constant = torch.ones(1, 65, 6)  # bicubic resampling keeps a constant field constant
    assert torch.allclose(interpolate_pos_embed(constant, (13, 13), antialias=False, offset=0.1), torch.ones(1, 170, 6))


def test_forward_on_other_and_non_square_grids() -> None:
    model = pico(num_register_tokens=2).eval()
    out = model.forward_features(torch.randn(3, 3, 16, 24))
    assert out["x_norm_patchtokens"].shape == (3, 4 * 6, 96)
    assert out["x_norm_regtokens"].shape == (3, 2, 96)
    assert out["x_prenorm"].shape == (3, 1 + 2 + 24, 96)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.randn(1, 3, 18, 16))


def test_forward_and_intermediate_layers() -> None:
    model = pico(num_register_tokens=2).eval()
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    cls = model(images)
    assert torch.equal(cls, features["x_norm_clstoken"])
    assert torch.allclose(cls.norm(dim=-1) ** 2 / 96, torch.ones(2), atol=1e-2)  # LayerNorm output: ~unit variance
    (last,) = model.get_intermediate_layers(images)
    assert torch.allclose(last, features["x_norm_patchtokens"], atol=1e-6)
    layers = model.get_intermediate_layers(images, [0, 2], reshape=True, return_class_token=True, norm=False)
    assert [tuple(p.shape) for p, _ in layers] == [(2, 96, 8, 8)] * 2
    assert layers[1][1].shape == (2, 96)
    assert len(model.get_intermediate_layers(images, 4)) == 4
    with pytest.raises(ValueError, match="n=5"):
        model.get_intermediate_layers(images, 5)


def test_config_mistakes_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model.num_heads: invalid value 5; allowed: a positive divisor of embed"):
        DinoVisionTransformer(ModelConfig(arch="vit_pico", num_heads=5))
    with pytest.raises(ConfigError, match=r"model.img_size: invalid value 30"):
        DinoVisionTransformer(ModelConfig(arch="vit_pico", patch_size=4, img_size=30))
    with pytest.raises(ConfigError, match=r"model.arch: invalid value 'vit_huge'"):
        build_backbone("vit_huge")
    with pytest.raises(ConfigError, match=r"model.dropout: invalid value 0.1; allowed: a ModelConfig field"):
        build_backbone("vit_pico", dropout=0.1)
    with pytest.raises(ConfigError, match=r"model.attention_backend: invalid value 'flash'"):
        build_backbone("vit_pico", patch_size=4, img_size=32, attention_backend="flash")
