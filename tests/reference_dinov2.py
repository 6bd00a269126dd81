"""Access to the public reference implementation (facebookresearch/dinov2, the ``dinov2==0.0.1.dev2`` PyPI release).

``scripts/setup.sh`` installs it without its dependencies (its metadata pins torch 2.0 and xformers 0.0.18) into
``.venv/reference``; only the parity tests and ``bench/train_step.py --reference`` put that directory on sys.path.
Without xformers the reference's attention falls back to plain softmax attention and its nested-tensor (list)
forward is unavailable, so on a CPU it is driven one crop size at a time.
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".venv" / "reference"


def import_reference(module: str = "dinov2") -> ModuleType:
    """Import ``module`` from the reference package; a clear error when scripts/setup.sh has not installed it."""
    if not (REFERENCE_DIR / "dinov2").is_dir():
        raise RuntimeError(
            f"the DINOv2 reference implementation is not installed in {REFERENCE_DIR}; run scripts/setup.sh "
            "(it runs: .venv/bin/pip install --no-deps --target .venv/reference dinov2==0.0.1.dev2)"
        )
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    return importlib.import_module(module)


def reference_backbone(
    *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, ffn: str = "mlp",
    init_values: float = 1.0, block_chunks: int = 0,
):
    """The reference ``DinoVisionTransformer`` as its ``vit_*`` factories build it, with explicit sizes."""
    vit = import_reference("dinov2.models.vision_transformer")
    layers = import_reference("dinov2.layers")
    return vit.DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        init_values=init_values,
        block_fn=partial(layers.NestedTensorBlock, attn_class=layers.MemEffAttention),
        ffn_layer="swiglufused" if ffn == "swiglu" else "mlp",
        drop_path_rate=0.0,
        block_chunks=block_chunks,
    )
