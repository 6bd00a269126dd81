"""Benchmark one DINOv2 training step: packed forward + efficient stochastic depth vs the unpacked baseline.

    python bench/train_step.py --preset vits14 --device cpu --steps 3 --batch-size 4

Prints ONE JSON object (last line): images_per_s, step_time_s (median), peak_mem_bytes, model_flops_per_image,
mfu (CUDA), and the same for a baseline that runs one student forward per crop size with classic drop-path, measured
in the same process on the same batches, plus ``speedup_vs_unpacked``; and the public reference implementation's
own training step (facebookresearch/dinov2 from PyPI: its ``SSLMetaArch.forward_backward`` with its packed list
forward, its optimiser, schedules, clipping and teacher update; bench/reference_dinov2.py) from the same weights on
the same batches, with ``speedup_vs_reference`` and ``memory_ratio_vs_reference`` (``--no-reference`` skips it).
Without xformers (any CPU) its attention runs through the stand-in of bench/reference_standins.py
(PyTorch SDPA block by block); ``reference.student_forward`` says which. ``--profile N`` adds
``profile``: one more step of ours under ``torch.profiler``, its N costliest operators by self time (CUDA kernels on a
GPU) with each one's share of the step. ``mfu`` counts the student backbone's matmul FLOPs only
(``model_flops_per_image``): not the teacher's forward, the heads' prototype layers nor the losses.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.batches import random_batch  # noqa: E402
from trainer.config import resolve_config  # noqa: E402
from trainer.models import model_flops_per_image  # noqa: E402
from trainer.parallelize import autocast_dtype, configure_cuda_matmul  # noqa: E402
from trainer.runtime import _peak_flops  # noqa: E402
from trainer.meta_arch import TrainStep, build_models  # noqa: E402


def _reset_peak_mem(device: torch.device) -> None:
    """Start the peak-memory window after set-up, so building the models (and, for the reference, the copy it is
    loaded from) does not count. On Linux writing 5 to /proc/self/clear_refs resets the RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not permitted): the peak then includes set-up


def _peak_mem(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _profile_step(step, batch: dict, index: int, device: torch.device, dtype, top: int) -> list[dict]:
    """One more step under ``torch.profiler``: the ``top`` operators by self time on the device (CUDA kernels'
    time) or, on a CPU, by self CPU time, each with its share of the step's total self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            step(batch, index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def self_time(event) -> float:  # microseconds
        if device.type == "cuda":
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    # Operators only (on CUDA each one's kernels' time is its self device time); the kernels' own rows would count
    # the same time twice.
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and self_time(e) > 0]
    total = sum(self_time(e) for e in events)
    events.sort(key=self_time, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_ms": round(self_time(e) / 1e3, 3), "share": round(self_time(e) / total, 4)}
        for e in events[:top]
    ]


def _measure(preset: str, overrides: dict, mode: str, batch_size: int, steps: int, warmup: int,
             device_name: str, profile_top: int = 0) -> dict:
    """One configuration, run in a fresh process so CPU peak RSS belongs to it alone.

    ``mode``: "packed" (ours), "unpacked" (ours, one forward per crop size) or "reference" (the public reference's
    own step, see bench/reference_dinov2.py), all from the same initial weights and on the same batches.
    """
    device = torch.device(device_name)
    config = resolve_config(preset, overrides=overrides)
    torch.manual_seed(0)
    models = build_models(config)
    for net in (models.student, models.teacher, models.centers):
        net.to(device)
    # Ours runs the trainer's own mixed precision (bf16 backbones by autocast, float32 heads and losses, TF32 per
    # parallel.allow_tf32: what Runtime does on one GPU). The reference's own train.py turns TF32 on and its FSDP
    # policy runs every module, heads included, in half precision: emulated by autocasting its whole step.
    dtype = torch.bfloat16 if device.type == "cuda" and mode == "reference" else None
    if device.type == "cuda":
        configure_cuda_matmul(replace(config.parallel, allow_tf32=True) if mode == "reference" else config.parallel)
    if mode == "reference":
        import warnings

        from bench.reference_dinov2 import ReferenceStep, reference_training_code

        warnings.simplefilter("ignore", FutureWarning)  # the 2023 reference calls since-deprecated torch APIs
        with reference_training_code(device) as code:
            step = ReferenceStep(code, models, config, device)
        del models  # only the reference's copies stay in memory
    else:
        step = TrainStep(models, config, packed=mode == "packed",
                         autocast_dtype=autocast_dtype(config.parallel, world_size=1, device=device))
    batches = [random_batch(config, batch_size, seed=i, device=device) for i in range(2)]
    gc.collect()
    _reset_peak_mem(device)
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
    result = {"step_time_s": median, "images_per_s": batch_size / median, "peak_mem_bytes": _peak_mem(device)}
    if mode == "reference":
        result["student_forward"] = "packed list (" + (
            "xformers)" if step.xformers == "xformers" else "xformers stand-in: PyTorch SDPA per block)"
        )
    if profile_top:
        result["profile"] = _profile_step(step, batches[0], warmup + steps, device, dtype, profile_top)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vits14", help="recipe name (vits14, tiny, long_vitl14, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="per-process images (default 4 cpu / 64 cuda)")
    parser.add_argument("--override", action="append", default=[], help="dotted config override key=value")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the public reference implementation's step (bench/reference_dinov2.py)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one more step of ours and report its N costliest operators")
    args = parser.parse_args()
    if args.profile < 0:
        parser.error(f"--profile: invalid value {args.profile}; allowed: >= 0 (0: no profile)")
    from trainer.config import parse_override

    device = torch.device(args.device)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 4)
    overrides = dict(parse_override(o) for o in args.override)
    overrides.setdefault("data.dataset", "synthetic")
    overrides.setdefault("optim.global_batch_size", batch_size)
    config = resolve_config(args.preset, overrides=overrides)
    baseline_overrides = {**overrides, "model.drop_path_mode": "classic"}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        common = (batch_size, args.steps, args.warmup, args.device)
        ours = pool.apply(_measure, (args.preset, overrides, "packed", *common, args.profile))
        base = pool.apply(_measure, (args.preset, baseline_overrides, "unpacked", *common))
        ref = None if args.no_reference else pool.apply(_measure, (args.preset, overrides, "reference", *common))
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
    if ref is not None:
        from bench.reference_dinov2 import REFERENCE_VERSION

        result["reference"] = {**ref, "implementation": REFERENCE_VERSION}
        result["speedup_vs_reference"] = ref["step_time_s"] / ours["step_time_s"]
        result["memory_ratio_vs_reference"] = ours["peak_mem_bytes"] / ref["peak_mem_bytes"]
    peak = _peak_flops(device)
    result["head_prototypes"] = {"dino": config.heads.dino_prototypes, "ibot": config.heads.ibot_prototypes}
    if peak:
        result["mfu"] = flops * ours["images_per_s"] / peak
        for name in ("baseline_unpacked", "reference"):
            if name in result:
                result[name]["mfu"] = flops * result[name]["images_per_s"] / peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
