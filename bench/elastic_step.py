"""What uneven batch shares cost: training steps at world sizes that do and do not divide the global batch.

    python bench/elastic_step.py --preset tiny --global-batch 8 --steps 10

Runs the real training step (``TrainStep`` on FSDP2-sharded models, gloo on CPU or NCCL on GPUs) in W processes on
the same global batch, one configuration after the other in this run:

- ``w2_even``: W=2, shares 4/4 of the global batch B (the issue's comparison);
- ``w3_uneven``: W=3, shares 3/3/2 of the same B (ceil/floor of B/W: the elastic case);
- ``w3_even``: W=3, shares 3/3/3 of B+1 images: the baseline with the same largest share, so
  ``uneven_vs_even_same_largest_share`` isolates what unevenness itself costs (the smaller rank waits at the
  collectives for the larger ones; nothing else differs).

Prints ONE JSON object: per configuration the median step time over ``--steps`` (after ``--warmup``), images per
second and the share sizes; the ratios; and ``ideal_efficiency_w3_uneven`` = B / (W * ceil(B / W)), the fraction of
rank-time that does work when the step waits for the largest share. On a machine with fewer cores than processes
(this CI machine has 2) the W=3 runs share cores, so compare W=3 with W=3 (``uneven_vs_even_same_largest_share``),
not with W=2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from trainer.batches import random_batch  # noqa: E402
from trainer.config import batch_share, resolve_config  # noqa: E402
from trainer.meta_arch import TrainStep, select_images  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, global_batch: int, out: str) -> None:
    from trainer.runtime import build_training_models

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        config = resolve_config(args.preset, overrides={"optim.global_batch_size": global_batch})
        torch.manual_seed(0)
        models = build_training_models(config, world_size=world_size, device=device)
        step = TrainStep(models, config)
        share = batch_share(config, world_size, rank)
        batches = [select_images(random_batch(config, global_batch, seed=i, device=device), share.start, share.stop)
                   for i in range(2)]
        times = []
        for index in range(args.warmup + args.steps):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(batches[index % 2], 100 + index)  # past warm-up and the last-layer freeze
            if cuda:
                torch.cuda.synchronize(device)
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"times": times[args.warmup:], "shares": [
                len(batch_share(config, world_size, r)) for r in range(world_size)]}))
    finally:
        dist.destroy_process_group()


def _measure(world_size: int, global_batch: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world_size, _free_port(), args, global_batch, out), nprocs=world_size, join=True)
        result = json.loads(Path(out).read_text())
    step_s = statistics.median(result["times"])
    return {"world_size": world_size, "global_batch": global_batch, "shares": result["shares"],
            "step_s": step_s, "images_per_s": global_batch / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.global_batch % 2 or args.global_batch % 3 == 0:
        parser.error("--global-batch must be even and not a multiple of 3 (W=2 even, W=3 uneven)")
    if args.device == "cuda" and torch.cuda.device_count() < 3:
        parser.error("--device cuda needs 3 GPUs")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    batch = args.global_batch
    runs = {
        "w2_even": _measure(2, batch, args),
        "w3_uneven": _measure(3, batch, args),
        "w3_even": _measure(3, -(-batch // 3) * 3, args),
    }
    largest = -(-batch // 3)
    print(json.dumps({
        "bench": "elastic_step",
        "preset": args.preset,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "threads_per_process": args.threads,
        "steps": args.steps,
        **runs,
        "w3_uneven_vs_w2_even_step_time": runs["w3_uneven"]["step_s"] / runs["w2_even"]["step_s"],
        "uneven_vs_even_same_largest_share": runs["w3_uneven"]["step_s"] / runs["w3_even"]["step_s"],
        "ideal_efficiency_w3_uneven": batch / (3 * largest),
    }))


if __name__ == "__main__":
    main()
