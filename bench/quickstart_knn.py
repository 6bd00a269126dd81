"""What a quickstart setting buys: train the quickstart's pretrain stage in-process, then k-NN top-1 on Fashion-MNIST.

    python bench/quickstart_knn.py --iterations 600 --override model.patch_size=7 --override model.img_size=28

Reads ``examples/quickstart.yaml`` (data must be prepared: run the quickstart once, or ``dino-ctl data prepare``),
applies ``--override`` on top of its overrides, trains ``--iterations`` steps into a temporary directory and scores
the teacher backbone by k-NN (k=20, CLS token) on the first ``--limit-train`` / ``--limit-test`` images, next to the
same preset randomly initialised and raw pixels (the baselines, in the same run). Prints ONE JSON object (last
line). The choices commented in examples/quickstart.yaml were measured with this script (single runs, seed 0).
``--every N`` also keeps a checkpoint every N iterations and scores each one's teacher (``curve``: the learning curve
of one run; the baselines are scored once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--override", action="append", default=[], help="dotted trainer key=value")
    parser.add_argument("--limit-train", type=int, default=5000)
    parser.add_argument("--limit-test", type=int, default=1000)
    parser.add_argument("--every", type=int, default=None, help="also score a checkpoint every N iterations")
    args = parser.parse_args()
    if args.every is not None and not 0 < args.every <= args.iterations:
        parser.error(f"--every: invalid value {args.every}; allowed: 1..--iterations ({args.iterations})")

    import torch

    from dino_ctl.cli.eval_cmds import run_eval
    from dino_ctl.validation import load_spec
    from dino_ctl.stages import stage_train_config
    from trainer import layout
    from trainer.config import parse_override, with_overrides
    from trainer.train import train

    experiment = load_spec(args.spec)
    stage = experiment.spec.stages[0]
    base = stage_train_config(experiment, stage.name)
    evaluation = experiment.spec.evaluation
    with tempfile.TemporaryDirectory(prefix="quickstart-knn-") as out:
        overrides = {
            "optim.iterations": args.iterations,
            "optim.warmup_iterations": min(base.optim.warmup_iterations, args.iterations // 10),
            "checkpoint.dir": out,
            "checkpoint.interval_iterations": args.every or args.iterations,
            "checkpoint.keep_last": args.iterations // (args.every or args.iterations) + 1,
            "metrics.port": -1,
            **dict(parse_override(o) for o in args.override),
        }
        config = with_overrides(base, overrides)
        start = time.perf_counter()
        code = train(config)
        seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"training exited with {code}")
        limits = {"limit_train": args.limit_train, "limit_test": args.limit_test}
        report = run_eval("knn", out, evaluation.train, evaluation.test, **limits)
        curve = []
        for iteration in range(args.every or args.iterations, args.iterations, args.every or args.iterations):
            checkpoint = layout.join(out, layout.checkpoint_name(iteration))
            scored = run_eval("knn", checkpoint, evaluation.train, evaluation.test, network="teacher",
                              baseline=False, **limits)
            curve.append({"iteration": iteration, "trained": scored["top1"]["trained"]})
    print(json.dumps({
        "benchmark": "quickstart_knn",
        "overrides": args.override,
        "iterations": args.iterations,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        **report["top1"],
        **({"curve": [*curve, {"iteration": args.iterations, "trained": report["top1"]["trained"]}]}
           if args.every else {}),
        "num_train": report["num_train"],
        "num_test": report["num_test"],
    }))


if __name__ == "__main__":
    main()
