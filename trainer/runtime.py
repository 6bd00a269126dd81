"""Everything one training process holds: models, optimiser, loader, checkpoints, metrics, and stage initialisation.

:func:`trainer.train.train` drives it; this class keeps the loop there short. Order of construction follows
torchtitan: build single-device models (on the meta device when FSDP2 shards them on GPUs, see
:func:`build_training_models`), parallelise (activation checkpointing -> compile -> FSDP2), materialise, then the
optimiser over the sharded parameters, then resume from the newest complete checkpoint (or initialise the stage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import fsspec
import torch
import torch.nn as nn

from trainer import layout
from trainer.artifacts import export_backbone
from trainer.checkpoint import CheckpointManager, load_model_weights
from trainer.config import ModelConfig, TrainConfig, micro_batches
from trainer.data.loader import build_train_loader
from trainer.distributed import all_gather_objects, local_rank
from trainer.metrics import JsonlLogger, TrainMetrics, format_console
from trainer.models import interpolate_pos_embed, model_flops_per_image
from trainer.meta_arch import NonFiniteLossError, SSLModels, TrainStep, build_centers, build_models
from trainer.parallelize import autocast_dtype, configure_cuda_matmul, materialize, parallelize, uses_fsdp
from trainer.rng import RNGState

logger = logging.getLogger(__name__)

# dense bf16 peak FLOP/s by device name fragment, for MFU (H100 SXM 989 TF, A100 312 TF, H200 = H100 compute)
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


def build_training_models(
    config: TrainConfig,
    *,
    world_size: int,
    device: torch.device,
    teacher_model: ModelConfig | None = None,
    on_meta: bool | None = None,
) -> SSLModels:
    """Student, teacher (and in distillation the student EMA) of one rank, parallelised on ``device``.

    ``on_meta`` (default: FSDP2 on CUDA): the networks are built on the meta device, sharded, then materialised, so a
    rank allocates only its shards and never holds a full unsharded copy (a ViT-g/14 student and teacher are about
    9 GB in float32). The teacher (or the student EMA) then copies the student's initial weights shard by shard.
    Otherwise they are built whole on the host and then parallelised: one rank has nothing to shard, and on CPU meshes
    DTensor's random initialisation draws the same values on every rank, so the host build also keeps the initial
    weights equal across world sizes.
    """
    parallel = config.parallel
    if on_meta is None:
        on_meta = uses_fsdp(parallel, world_size=world_size) and device.type == "cuda"
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        models = build_models(config, teacher_model=teacher_model)
    if on_meta:
        models.centers = build_centers(config)  # buffers, used as built: not re-initialised by materialize
    networks = {"student": (models.student, False), "teacher": (models.teacher, True),
                "student_ema": (models.student_ema, True)}
    for name, (network, is_teacher) in networks.items():
        if network is not None:
            network = parallelize(network, parallel, world_size=world_size, device=device, is_teacher=is_teacher)
            setattr(models, name, materialize(network, device) if on_meta else network)
    if on_meta:  # the copy of the student that build_models made on the meta device holds no values yet
        copy = models.student_ema if models.distill else models.teacher
        copy.load_state_dict(models.student.state_dict())
    models.centers.to(device)
    return models


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)


class Runtime:
    """Models, step, loader, checkpointing and metrics of one rank."""

    def __init__(self, config: TrainConfig, *, rank: int, world_size: int, device: torch.device) -> None:
        self.config, self.rank, self.world_size, self.device = config, rank, world_size, device
        torch.manual_seed(config.seed)  # identical init on every rank; per-rank streams are seeded after
        if device.type == "cuda":
            configure_cuda_matmul(config.parallel)
        self.models = build_training_models(
            config, world_size=world_size, device=device, teacher_model=self._teacher_model_config()
        )
        num_micro, _ = micro_batches(config, world_size)
        self.train_step = TrainStep(
            self.models, config, num_micro_batches=num_micro,
            autocast_dtype=autocast_dtype(config.parallel, world_size=world_size, device=device),
        )
        self.loader = build_train_loader(
            config,
            rank=rank,
            world_size=world_size,
            local_rank=local_rank(),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            seed=config.seed,
        )
        self.rng = RNGState()
        torch.manual_seed(config.seed + 1000 * rank + 1)  # drop-path subsets differ per rank
        self.checkpoints = CheckpointManager(config.checkpoint, rank=rank, world_size=world_size)
        self.metrics = TrainMetrics(config.metrics, enabled=local_rank() == 0 and config.metrics.port >= 0)
        self.metrics.set_build_info(stage=config.stage.kind, recipe=config.recipe)
        self.metrics.start_server()
        log_file = config.metrics.log_file or layout.join(config.checkpoint.dir, "train_log.jsonl")
        self.log_file = JsonlLogger(log_file) if rank == 0 else None
        self.flops_per_image = model_flops_per_image(config.model, config.data.crops)
        self.peak_flops = _peak_flops(device)
        self._last_saved = -1
        self._last_record: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- construction
    def _teacher_model_config(self) -> ModelConfig | None:
        stage = self.config.stage
        if stage.kind != "distill":
            return None
        if stage.teacher_model is not None:
            return stage.teacher_model
        return layout.read_stage_config(stage.teacher_from).model

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (models, optimiser, centers, loader position, RNG)."""
        state: dict[str, Any] = {
            "student": self.models.student,
            "teacher": self.models.teacher,
            "centers": self.models.centers,
            "optimizer": self.train_step.optimizer,
            "loader": self.loader,
            "rng": self.rng,
        }
        if self.models.student_ema is not None:
            state["student_ema"] = self.models.student_ema
        return state

    # ------------------------------------------------------------------------------------------- resume / init
    def write_resolved_config(self) -> None:
        """``<checkpoint.dir>/config.yaml``: what this stage runs with, for resume, distillation and evaluation."""
        layout.write_stage_config(self.config.checkpoint.dir, self.config)

    def resume_or_init(self) -> int:
        """Resume from the newest complete checkpoint, else initialise the stage. Returns the start iteration."""
        start = time.perf_counter()
        iteration = self.checkpoints.load_latest(self.state())
        if iteration is not None:
            seconds = time.perf_counter() - start
            logger.info("resumed at iteration %d in %.2fs", iteration, seconds)
            self._last_saved = iteration
            self._log_start(resumed_from=iteration, load_seconds=seconds)
            return iteration
        stage = self.config.stage
        if stage.kind == "highres":
            source = layout.published_or_latest(stage.init_from)
            if source is None:
                raise FileNotFoundError(f"stage.init_from: no complete checkpoint in {stage.init_from}")
            load_model_weights(
                source.path,
                {"student": self.models.student, "teacher": self.models.teacher},
                resize=self._resize_pos_embed,
            )
            logger.info("highres stage initialised from %s", source.path)
        elif stage.kind == "distill":
            source = layout.published_or_latest(stage.teacher_from)
            if source is None:
                raise FileNotFoundError(f"stage.teacher_from: no complete checkpoint in {stage.teacher_from}")
            load_model_weights(source.path, {"teacher": self.models.teacher})
            logger.info("distillation teacher loaded from %s", source.path)
        self._log_start(resumed_from=None, load_seconds=time.perf_counter() - start)
        return 0

    def _resize_pos_embed(self, key: str, saved: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Stage init at another resolution: interpolate the position embedding to this stage's grid."""
        if not key.endswith("backbone.pos_embed"):
            raise ValueError(f"stage.init_from: {key} has shape {tuple(saved.shape)}, this stage needs {tuple(shape)}")
        grid = math.isqrt(shape[1] - 1)
        model = self.config.model
        logger.info("interpolating %s from %d to %d patches", key, saved.shape[1] - 1, shape[1] - 1)
        return interpolate_pos_embed(
            saved, (grid, grid), antialias=model.interpolate_antialias, offset=model.interpolate_offset
        )

    def _log_start(self, *, resumed_from: int | None, load_seconds: float) -> None:
        if self.log_file:
            self.log_file.write(
                {
                    "event": "start",
                    "time": time.time(),
                    "resumed_from": resumed_from,
                    "load_seconds": load_seconds,
                    "world_size": self.world_size,
                    "metrics_port": self.metrics.port,
                    "stage": self.config.stage.kind,
                    "recipe": self.config.recipe,
                }
            )

    # --------------------------------------------------------------------------------------------------- steps
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }

    def step(self, batch: dict[str, Any], iteration: int, *, data_wait: float) -> None:
        """Train on ``batch`` as iteration ``iteration`` (0-based), update metrics, log every log interval."""
        start = time.perf_counter()
        self.models.student.train()
        try:
            record = self.train_step(batch, iteration)
        except NonFiniteLossError as exc:
            self.metrics.observe_nonfinite()
            if self.log_file:
                self.log_file.write({"event": "nonfinite", "iteration": exc.iteration, "losses": exc.losses})
            raise
        step_seconds = time.perf_counter() - start
        images = self.config.optim.global_batch_size
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_image * images / step_seconds / (self.peak_flops * self.world_size)
        self._last_record = record
        log_record = self.metrics.observe_step(
            iteration + 1,
            losses={k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("loss/")},
            lr=record["lr"],
            wd=record["weight_decay"],
            momentum=record["teacher_momentum"],
            teacher_temp=record["teacher_temp"],
            grad_norms={k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("grad_norm/")},
            step_seconds=step_seconds,
            data_wait_seconds=data_wait,
            images=images,
            bad_samples=int(batch.get("num_bad_samples", 0)),
            mfu=mfu,
            gpu_mem=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
        )
        if self.config.metrics.log_sample_ids:
            shares = all_gather_objects(list(batch["sample_ids"]))
            if log_record is not None:
                log_record["sample_ids"] = [sample_id for share in shares for sample_id in share]
        if log_record is not None:
            log_record["iterations"] = self.config.optim.iterations
            logger.info("%s", format_console(log_record))
            if self.log_file:
                self.log_file.write({"event": "step", **log_record})

    # ------------------------------------------------------------------------------------------- checkpointing
    def save(self, iteration: int, *, reason: str) -> None:
        if iteration == self._last_saved:
            return
        losses = {k: v for k, v in self._last_record.items() if k.startswith("loss/")}
        blocked = self.checkpoints.save(
            iteration, self.state(), meta={"reason": reason, "losses": losses}, blocking=reason != "interval"
        )
        self._last_saved = iteration
        # an asynchronous save is published later; its metrics reflect the last published checkpoint
        published = self.checkpoints.last_saved_iteration
        if published is not None:
            self.metrics.observe_checkpoint(published, self.checkpoints.last_save_seconds)
        if self.log_file:
            self.log_file.write({"event": "checkpoint", "iteration": iteration, "reason": reason,
                                 "blocked_seconds": blocked, "time": time.time()})

    def final_model(self) -> nn.Module:
        """The model a stage hands on: the teacher backbone (EMA), or in distillation the student EMA."""
        models: SSLModels = self.models
        return (models.student_ema if models.distill else models.teacher)["backbone"]

    def finish(self, iteration: int) -> None:
        """Final checkpoint, released-layout export of the final backbone, and ``final.json``."""
        self.save(iteration, reason="final")
        self.checkpoints.wait()
        export_dir = layout.join(self.config.checkpoint.dir, "export")
        model_config = self.config.model
        model_config = dataclasses.replace(model_config, drop_path_rate=0.0)  # an inference model
        export_backbone(self.final_model(), model_config, export_dir, write=self.rank == 0)
        if self.rank == 0:
            summary = {
                "iteration": iteration,
                "export": export_dir,
                "losses": {k: v for k, v in self._last_record.items() if k.startswith("loss/")},
            }
            with fsspec.open(layout.join(self.config.checkpoint.dir, "final.json"), "w") as handle:
                json.dump(summary, handle, indent=2)
            if self.log_file:
                self.log_file.write({"event": "end", "iteration": iteration, "time": time.time()})

    def close(self) -> None:
        self.checkpoints.wait()
        self.metrics.close()
        if self.log_file:
            self.log_file.close()
