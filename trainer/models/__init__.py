"""DINOv2 models: the ViT backbone (released checkpoint layout), the DINO/iBOT head, checkpoint I/O and FLOPs.

Models are plain single-device ``nn.Module``s; :mod:`trainer.parallelize` applies activation checkpointing,
compilation and FSDP2 afterwards.
"""

from trainer.models.attention import Attention, xformers_available
from trainer.models.block import Block
from trainer.models.build import build_backbone
from trainer.models.checkpoint_io import (
    LoadResult,
    export_backbone_state_dict,
    load_backbone_state_dict,
    read_checkpoint,
    save_backbone,
)
from trainer.models.flops import model_flops_per_image
from trainer.models.heads import DINOHead
from trainer.models.packing import TokenLayout
from trainer.models.vision_transformer import DinoVisionTransformer, interpolate_pos_embed

__all__ = [
    "Attention",
    "Block",
    "DINOHead",
    "DinoVisionTransformer",
    "LoadResult",
    "TokenLayout",
    "build_backbone",
    "export_backbone_state_dict",
    "interpolate_pos_embed",
    "load_backbone_state_dict",
    "model_flops_per_image",
    "read_checkpoint",
    "save_backbone",
    "xformers_available",
]
