"""Analytic matmul FLOPs of the student backbone, the numerator of MFU.

Counted: every matrix multiply, at 2 FLOPs per multiply-accumulate. For a crop of ``n = (size / p)^2`` patches and
``s = 1 + R + n`` tokens, width ``D``, FFN hidden ``h``, depth ``L``::

    patch embedding  2 * n * (3 * p^2) * D
    per block        qkv 2*s*D*3D  +  QK^T 2*s^2*D  +  AV 2*s^2*D  +  proj 2*s*D^2
                     + FFN: MLP 2 * 2*s*D*h (h = 4D); SwiGLU 2*s*D*2h + 2*s*h*D (h = round_up(8/3 D, 8))

Backward costs two forwards for every matmul (gradients of both operands), except the patch embedding whose input
(the image) needs no gradient: it costs one. So forward + backward = 3 x blocks + 2 x patch embedding.

Not counted: LayerNorm, softmax, GELU/SiLU, biases, position-embedding interpolation (all O(s*D), < 1%), the heads
(their cost depends on the head config, not on this model's), and the work skipped by efficient stochastic depth
(MFU counts the model's FLOPs, as is customary, not the FLOPs a given implementation executes).
The teacher's forward on the global crops is ``model_flops_per_image(model, dataclasses.replace(crops,
num_local=0), include_backward=False)``.
"""

from __future__ import annotations

from trainer.config import CropConfig, ModelConfig
from trainer.models.layers import swiglu_hidden_dim

__all__ = ["crop_flops", "model_flops_per_image"]


def crop_flops(model_config: ModelConfig, crop_size: int) -> tuple[float, float]:
    """``(patch_embedding, blocks)`` forward FLOPs of one square crop of ``crop_size`` pixels."""
    dim, depth, _heads, ffn = model_config.resolved()
    patch = model_config.patch_size
    num_patches = (crop_size // patch) ** 2
    tokens = 1 + model_config.num_register_tokens + num_patches
    hidden = 4 * dim if ffn == "mlp" else swiglu_hidden_dim(dim)
    ffn_macs = 2 * tokens * dim * hidden if ffn == "mlp" else 3 * tokens * dim * hidden
    block_macs = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + ffn_macs
    patch_macs = num_patches * 3 * patch * patch * dim
    return 2.0 * patch_macs, 2.0 * depth * block_macs


def model_flops_per_image(
    model_config: ModelConfig, crops_config: CropConfig, *, num_global: int = 2, include_backward: bool = True
) -> float:
    """Matmul FLOPs of the student backbone on one image's ``num_global`` global and ``num_local`` local crops.

    Args:
        model_config: the backbone (preset plus overrides).
        crops_config: crop sizes and the number of local crops.
        num_global: global crops per image (2 in DINOv2).
        include_backward: add the backward pass (see the module docstring for the factors).
    """
    total = 0.0
    for size, count in ((crops_config.global_size, num_global), (crops_config.local_size, crops_config.num_local)):
        patch_embed, blocks = crop_flops(model_config, size)
        if include_backward:
            patch_embed, blocks = 2 * patch_embed, 3 * blocks
        total += count * (patch_embed + blocks)
    return total
