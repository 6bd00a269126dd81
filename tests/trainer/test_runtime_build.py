"""``build_training_models``: the meta-device path shards before allocating, and starts the teacher as the student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tests.dist_utils import run_distributed
from trainer.config import resolve_config
from trainer.runtime import build_training_models

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _build(rank: int, world_size: int, on_meta: bool, kind: str) -> dict:
    overrides = {"data.dataset": "synthetic", "parallel.fsdp": "on"}
    if kind == "distill":
        overrides.update({"stage.kind": "distill", "stage.teacher_from": "/unused", "model.arch": "vit_pico"})
    config = resolve_config("tiny", overrides=overrides)
    torch.manual_seed(0)
    models = build_training_models(config, world_size=world_size, device=CPU, on_meta=on_meta,
                                   teacher_model=config.model if kind == "distill" else None)
    source, copy = (models.student, models.student_ema) if kind == "distill" else (models.student, models.teacher)
    params = dict(source.named_parameters())
    return {
        "dtensors": all(isinstance(p, DTensor) for p in params.values()),
        "local_fraction": sum(p.to_local().numel() for p in params.values()) / sum(p.numel() for p in params.values()),
        "on_cpu": {p.to_local().device.type for p in params.values()},
        "copy_equal": all(torch.equal(a.full_tensor(), b.full_tensor())
                          for a, b in zip(source.parameters(), copy.parameters())),
        "finite": all(torch.isfinite(p.full_tensor()).all().item() for p in params.values()),
        "teacher_frozen": not any(p.requires_grad for p in copy.parameters()),
        "student_trains": all(p.requires_grad for p in params.values()),
        "names": sorted(params),
        "centers_on_cpu": {b.device.type for b in models.centers.buffers()},
    }


def test_meta_path_shards_materialises_and_copies_the_student_into_the_teacher() -> None:
    meta = run_distributed(_build, world_size=2, args=(True, "pretrain"))
    host = run_distributed(_build, world_size=2, args=(False, "pretrain"))
    for rank in meta:
        assert rank["dtensors"] and rank["local_fraction"] < 0.6  # this rank allocated about half of the student
        assert rank["on_cpu"] == {"cpu"} and rank["centers_on_cpu"] == {"cpu"}
        assert rank["copy_equal"] and rank["finite"] and rank["teacher_frozen"] and rank["student_trains"]
    assert meta[0]["names"] == host[0]["names"]  # parameter names (optimiser groups, export) do not change


def test_meta_path_copies_the_student_into_the_student_ema_when_distilling() -> None:
    [rank] = run_distributed(_build, world_size=1, args=(True, "distill"))
    assert rank["copy_equal"] and rank["teacher_frozen"] and rank["finite"]


def test_the_memory_bench_reports_both_paths() -> None:
    result = subprocess.run([sys.executable, "bench/build_memory.py", "--preset", "tiny", "--world-size", "2"],
                            cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) >= {"host", "meta", "peak_rss_ratio_host_over_meta"}
    assert report["host"]["local_param_gb"] == report["meta"]["local_param_gb"]
    assert report["meta"]["local_param_gb"] < report["meta"]["unsharded_param_gb"]
