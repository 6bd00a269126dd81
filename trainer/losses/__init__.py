"""DINOv2 losses: DINO (CLS, multi-crop), iBOT (masked patches), KoLeo, and teacher-target centering."""

from trainer.losses.centering import SoftmaxCenter, sinkhorn_knopp
from trainer.losses.dino import dino_cross_entropy, num_dino_loss_terms
from trainer.losses.ibot import ibot_masked_loss
from trainer.losses.koleo import koleo_loss

__all__ = [
    "SoftmaxCenter",
    "dino_cross_entropy",
    "ibot_masked_loss",
    "koleo_loss",
    "num_dino_loss_terms",
    "sinkhorn_knopp",
]
