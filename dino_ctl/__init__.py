"""dino-ctl: the control plane. Imports no torch (the trainer's config schema is torch-free)."""

__version__ = "0.1.0"
