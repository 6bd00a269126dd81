"""DINOv2 trainer: models, losses, data, runtime."""
