"""Benchmark one DINOv2 training step: packed forward + efficient stochastic depth vs the unpacked baseline.

    python bench/train_step.py --preset vits14 --device cpu --steps 3 --batch-size 4

Prints ONE JSON object (last line): images_per_s, step_time_s (median), peak_mem_bytes, model_flops_per_image,
mfu (CUDA), and the same for a baseline that runs one student forward per crop size with classic drop-path, measured
in the same process on the same batches, plus ``speedup_vs_unpacked``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.batches import random_batch  # noqa: E402
from trainer.config import resolve_config  # noqa: E402
from trainer.models import model_flops_per_image  # noqa: E402
from trainer.runtime import _peak_flops  # noqa: E402
from trainer.meta_arch import TrainStep, build_models  # noqa: E402


def _peak_mem(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _measure(preset: str, overrides: dict, packed: bool, batch_size: int, steps: int, warmup: int,
             device_name: str) -> dict:
    """One configuration, run in a fresh process so CPU peak RSS belongs to it alone."""
    device = torch.device(device_name)
    config = resolve_config(preset, overrides=overrides)
    torch.manual_seed(0)
    models = build_models(config)
    for net in (models.student, models.teacher, models.centers):
        net.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    step = TrainStep(models, config, packed=packed)
    batches = [random_batch(config, batch_size, seed=i, device=device) for i in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            step(batches[index % 2], index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_time_s": median, "images_per_s": batch_size / median, "peak_mem_bytes": _peak_mem(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vits14", help="recipe name (vits14, tiny, long_vitl14, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="per-process images (default 4 cpu / 64 cuda)")
    parser.add_argument("--override", action="append", default=[], help="dotted config override key=value")
    args = parser.parse_args()
    from trainer.config import parse_override

    device = torch.device(args.device)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 4)
    overrides = dict(parse_override(o) for o in args.override)
    overrides.setdefault("data.dataset", "synthetic")
    overrides.setdefault("optim.global_batch_size", batch_size)
    config = resolve_config(args.preset, overrides=overrides)
    baseline_overrides = {**overrides, "model.drop_path_mode": "classic"}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        ours = pool.apply(_measure, (args.preset, overrides, True, batch_size, args.steps, args.warmup, args.device))
        base = pool.apply(
            _measure, (args.preset, baseline_overrides, False, batch_size, args.steps, args.warmup, args.device)
        )
    flops = model_flops_per_image(config.model, config.data.crops)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps": args.steps,
        **ours,
        "model_flops_per_image": flops,
        "baseline_unpacked": base,
        "speedup_vs_unpacked": base["step_time_s"] / ours["step_time_s"],
    }
    peak = _peak_flops(device)
    if peak:
        result["mfu"] = flops * ours["images_per_s"] / peak
        result["baseline_unpacked"]["mfu"] = flops * base["images_per_s"] / peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
