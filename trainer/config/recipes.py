"""The named DINOv2 recipes: nested dicts of values over the dataclass defaults of :mod:`trainer.config.schema`.

Every number comes from ``shared/design/recipe.md`` (DINOv2 paper, appendix B and the reference code); the comment
beside each derived value says where it comes from.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["RECIPES", "merge"]


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, recursively for nested dicts (neither argument is modified)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_LONG = {
    # long recipe (ViT-L/14, ViT-g/14): batch 3072, lr 2e-4, 625k iterations, 100k warm-up, wd -> 0.2,
    # momentum 0.994, no layer decay, drop path 0.4, Sinkhorn-Knopp centering, untied 131k-prototype heads.
    "model": {"patch_size": 14, "drop_path_rate": 0.4, "ffn": "swiglu"},
    "heads": {
        "dino_prototypes": 131072,
        "dino_bottleneck": 384,
        "ibot_separate_head": True,
        "ibot_prototypes": 131072,
        "ibot_bottleneck": 256,
    },
    "loss": {"centering": "sinkhorn"},
    "data": {"crops": {"local_size": 98}},
    "optim": {
        "global_batch_size": 3072,
        "base_lr": 2e-4,
        "iterations": 625000,
        "warmup_iterations": 100000,
        "weight_decay_end": 0.2,
        "momentum_teacher": 0.994,
        "layerwise_decay": 1.0,
    },
}


RECIPES: dict[str, dict[str, Any]] = {
    # short recipe: ViT-L/16 on ImageNet-1k, batch 2048, lr 4e-3, 125k its, 12.5k warm-up, drop path 0.3, decay 0.9.
    "short_vitl16": {"model": {"arch": "vit_large", "patch_size": 16}},
    "long_vitl14": merge(_LONG, {"model": {"arch": "vit_large"}}),
    "long_vitg14": merge(_LONG, {"model": {"arch": "vit_giant2"}}),
    # distilled S/B/L: batch 2048, lr 1e-3, 625k its, 100k warm-up, no drop path, no layer decay, ViT-g/14 teacher.
    **{
        f"distill_vit{size[0]}14": merge(
            _LONG,
            {
                "model": {"arch": f"vit_{size}", "drop_path_rate": 0.0, "ffn": "mlp"},
                "optim": {"global_batch_size": 2048, "base_lr": 1e-3},
                "stage": {"kind": "distill"},
            },
        )
        for size in ("small", "base", "large")
    },
    # high-resolution adaptation: 518 px for the last 10k iterations, schedules compressed into the window,
    # lower lr. Applied on top of the pretraining stage's model/head settings (the control plane merges them).
    "highres518": merge(
        _LONG,
        {
            "model": {"arch": "vit_large", "img_size": 518},
            "data": {"crops": {"global_size": 518, "local_size": 224}},
            "optim": {"iterations": 10000, "warmup_iterations": 1000, "base_lr": 5e-5},
            "loss": {"warmup_teacher_temp_iterations": 0},
            "stage": {"kind": "highres"},
        },
    ),
    # ViT-S/14 with the long recipe at full crop sizes: the realistic CPU/GPU benchmark.
    "vits14": merge(_LONG, {"model": {"arch": "vit_small", "ffn": "mlp"}}),
    # A CPU-sized recipe (seconds per step on 2 cores) for tests and the quickstart: every mechanism of the full
    # recipe (multi-crop, masking, DINO+iBOT+KoLeo, Sinkhorn, EMA, layer decay, efficient drop path) at toy scale.
    "tiny": {
        # LayerScale 0.1 instead of 1e-5: with 4 blocks and ~1k steps the residual branches must matter from the
        # start, or every image gets the same CLS token and the teacher targets stay uniform for most of the run.
        "model": {
            "arch": "vit_pico", "patch_size": 4, "img_size": 32, "drop_path_rate": 0.1, "layerscale_init": 0.1,
        },
        "heads": {
            "dino_prototypes": 256,
            "dino_bottleneck": 64,
            "dino_hidden": 256,
            "ibot_separate_head": True,
            "ibot_prototypes": 256,
            "ibot_bottleneck": 64,
            "ibot_hidden": 256,
        },
        # a constant sharp teacher (0.04): the 0.04 -> 0.07 warm-up spans 37.5k iterations in the full recipes
        "loss": {"centering": "sinkhorn", "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                 "warmup_teacher_temp_iterations": 0},
        "data": {
            "dataset": "synthetic",
            "num_workers": 0,
            "crops": {"global_size": 32, "local_size": 16, "num_local": 4},
        },
        "optim": {
            "global_batch_size": 32,
            "iterations": 200,
            "base_lr": 1e-2,  # x sqrt(batch / 1024): 1.8e-3 at batch 32, 2.5e-3 at 64
            "warmup_iterations": 20,
            "freeze_last_layer_iterations": 10,
            "layerwise_decay": 0.9,
            "momentum_teacher": 0.99,
        },
        "checkpoint": {"interval_iterations": 50, "keep_last": 2},
        "metrics": {"port": 0, "log_interval": 5},
        "parallel": {"param_dtype": "float32"},
    },
}
# Highres keeps the pretraining recipe's architecture; only the crop/schedule keys above are the stage's own.
