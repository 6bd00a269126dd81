"""DINOHead: structure, init and weight-normalised prototypes (against torch's parametrization).

FSDP2 sharding of the head is tested in test_models_fsdp.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from trainer.models import DINOHead


def test_structure_and_initialisation() -> None:
    head = DINOHead(32, 100, hidden_dim=48, bottleneck_dim=16)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes == {
        "mlp.0.weight": (48, 32), "mlp.0.bias": (48,),
        "mlp.2.weight": (48, 48), "mlp.2.bias": (48,),
        "mlp.4.weight": (16, 48), "mlp.4.bias": (16,),
        "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16),
    }
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert torch.equal(head.last_layer.weight_g, torch.ones(100, 1)) and head.last_layer.weight_g.requires_grad
    assert torch.count_nonzero(head.mlp[2].bias) == 0
    assert [type(m) for m in DINOHead(32, 100, 48, 16, num_layers=1).mlp] == [nn.Linear]
    assert [m.out_features for m in DINOHead(32, 100, 48, 16, num_layers=2).mlp if isinstance(m, nn.Linear)] == [48, 16]
    with pytest.raises(ValueError, match=r"heads.num_layers: invalid value 0; allowed: an integer >= 1"):
        DINOHead(32, 100, num_layers=0)


def test_meta_build_then_init() -> None:
    with torch.device("meta"):
        head = DINOHead(32, 100, 48, 16)
    head.to_empty(device="cpu")
    head.init_weights()
    assert all(torch.isfinite(p).all() for p in head.parameters())
    assert torch.equal(head.last_layer.weight_g, torch.ones(100, 1))
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_weight_norm_matches_torch_parametrization_and_trains_the_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(32, 100, 48, 16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    reference = weight_norm(nn.Linear(16, 100, bias=False), dim=0)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(7, 32)
    out = head(x)
    expected = reference(F.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(head.last_layer.weight_g.grad, reference.parametrizations.weight.original0.grad)
    torch.testing.assert_close(head.last_layer.weight_v.grad, reference.parametrizations.weight.original1.grad)
    with torch.no_grad():  # only v's direction matters
        head.last_layer.weight_v.mul_(3.0)
    torch.testing.assert_close(head(x), out.detach(), rtol=1e-5, atol=1e-6)
