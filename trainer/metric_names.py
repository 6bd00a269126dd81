"""Every Prometheus metric the trainer exports: name -> (type, help, label names).

Torch-free so the dashboard and alert-rule generators (control plane) and their tests can check that every query
references a metric that really exists. ``trainer.metrics`` creates exactly these.
"""

from __future__ import annotations

TRAINER_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dino_train_iterations_total": ("counter", "Optimiser steps completed by this run.", ()),
    "dino_train_iteration": ("gauge", "Current iteration (absolute, survives restarts).", ()),
    "dino_train_samples_total": ("counter", "Images consumed (global batch per step).", ()),
    "dino_train_loss": ("gauge", "Latest loss value per component.", ("component",)),
    "dino_train_learning_rate": ("gauge", "Current base learning rate.", ()),
    "dino_train_weight_decay": ("gauge", "Current weight decay.", ()),
    "dino_train_teacher_momentum": ("gauge", "Current teacher EMA momentum.", ()),
    "dino_train_teacher_temperature": ("gauge", "Current teacher softmax temperature.", ()),
    "dino_train_grad_norm": ("gauge", "Gradient norm before clipping per module.", ("module",)),
    "dino_train_iteration_duration_seconds": ("histogram", "Wall time of one training iteration.", ()),
    "dino_data_wait_seconds": ("histogram", "Time the step waited for the next batch.", ()),
    "dino_data_bad_samples_total": ("counter", "Undecodable or truncated images replaced.", ()),
    "dino_train_images_per_second": ("gauge", "Global images per second over the last log interval.", ()),
    "dino_train_mfu_ratio": ("gauge", "Model FLOPs utilisation (CUDA only).", ()),
    "dino_gpu_memory_allocated_bytes": ("gauge", "Peak CUDA memory allocated on this process.", ()),
    "dino_checkpoint_last_iteration": ("gauge", "Iteration of the last complete checkpoint.", ()),
    "dino_checkpoint_last_success_timestamp_seconds": ("gauge", "Unix time of the last complete checkpoint.", ()),
    "dino_checkpoint_save_duration_seconds": ("gauge", "Wall time of the last checkpoint save.", ()),
    "dino_train_nonfinite_loss_total": ("counter", "Steps stopped by a NaN/inf loss.", ()),
    "dino_build_info": ("gauge", "Build information (value 1).", ("version", "torch", "stage", "recipe")),
}

CONTROLLER_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dino_ctl_stage_restarts_total": ("counter", "Stage restarts by reason.", ("experiment", "stage", "reason")),
    "dino_ctl_reconcile_errors_total": ("counter", "Reconcile errors.", ("kind",)),
    "dino_ctl_experiments": ("gauge", "Experiments by phase.", ("phase",)),
}

CURATION_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dino_curation_images_embedded_total": ("counter", "Images embedded by this rank.", ("source",)),
    "dino_curation_shards_total": ("counter", "Shards of a step handled by this rank, computed or reused.",
                                   ("step", "outcome")),
    "dino_curation_kmeans_iteration": ("gauge", "Current Lloyd iteration of a k-means fit.", ("fit",)),
    "dino_curation_kmeans_inertia": ("gauge", "Sum of squared distances to the centroids (unit vectors).",
                                     ("fit",)),
    "dino_curation_duplicates_found_total": ("counter", "Pool images removed as copies or evaluation look-alikes.",
                                             ("kind",)),
    "dino_curation_step_duration_seconds": ("gauge", "Wall time of the last run of a step on this rank.", ("step",)),
    "dino_curation_step_completed": ("gauge", "1 once a step is committed (done or reused) in this run.", ("step",)),
}
"""Curation metrics (``curation.metrics``): served by every rank of ``python -m curation.launch --metrics-port``."""
