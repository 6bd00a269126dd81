"""Peak host memory of one rank building its training state: whole on the host vs meta device -> shard -> materialise.

    python bench/build_memory.py --preset long_vitg14 --world-size 8

Each variant runs in a fresh child process that joins a fake process group of ``--world-size`` ranks (collectives are
no-ops, so one process stands for rank 0 of a multi-node job) and calls :func:`trainer.runtime.build_training_models`
on the CPU with FSDP2 on:

- ``host`` builds student and teacher whole on the host, then shards them (the path before the meta device);
- ``meta`` builds them on the meta device, shards, then materialises only this rank's shards.

Prints ONE JSON object: each variant's peak resident set size (``ru_maxrss``, which includes the interpreter and
torch), the resident size before building, the bytes of the parameters the rank holds afterwards, and the ratio of
the two peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._cli import positive_int  # noqa: E402

VARIANTS = ("host", "meta")


def _rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _child(variant: str, preset: str, world_size: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from trainer.config import resolve_config
    from trainer.runtime import build_training_models

    torch.set_num_threads(1)
    config = resolve_config(preset, overrides={"data.dataset": "synthetic", "parallel.fsdp": "on",
                                               "optim.global_batch_size": world_size * 2})
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    before = _current_rss_bytes()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    models = build_training_models(config, world_size=world_size, device=torch.device("cpu"),
                                   on_meta=variant == "meta")
    seconds = time.perf_counter() - start
    local = sum(p.to_local().numel() * p.element_size()
                for net in (models.student, models.teacher) for p in net.parameters())
    full = sum(p.numel() * p.element_size() for net in (models.student, models.teacher) for p in net.parameters())
    dist.destroy_process_group()
    return {"peak_rss_gb": _rss_bytes() / 1e9, "rss_before_build_gb": before / 1e9,
            "local_param_gb": local / 1e9, "unsharded_param_gb": full / 1e9, "build_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="long_vitg14", help="a trainer.config recipe (default: ViT-g/14)")
    parser.add_argument("--world-size", type=positive_int, default=8, help="ranks the state is sharded over")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: host, meta")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.preset, args.world_size)))
        return 0
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: invalid value {unknown[0]!r}; allowed: {', '.join(VARIANTS)}")
    results = {}
    for variant in variants:  # one fresh process each: ru_maxrss never goes down
        command = [sys.executable, __file__, "--child", variant, "--preset", args.preset,
                   "--world-size", str(args.world_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    report: dict[str, object] = {"preset": args.preset, "world_size": args.world_size, "device": "cpu", **results}
    if {"host", "meta"} <= set(results):
        report["peak_rss_ratio_host_over_meta"] = round(results["host"]["peak_rss_gb"] / results["meta"]["peak_rss_gb"], 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
