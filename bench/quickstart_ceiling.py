"""The quickstart's supervised ceiling: what the same backbone reaches on Fashion-MNIST when it is given the labels.

    python bench/quickstart_ceiling.py --iterations 1000

Trains the backbone of ``examples/quickstart.yaml`` (its resolved model, no stochastic depth) with labels:
cross-entropy of a linear head on the CLS token, AdamW (lr 1e-3, weight decay 0.05), batch ``--batch-size``, once per
input pipeline, from the same initial weights and on the same sample order:

- ``clean``: the evaluation transform (what k-NN sees at test time);
- ``flip``: the evaluation transform plus a random horizontal flip;
- ``multicrop``: both global crops of the quickstart's own augmentation (``trainer.data.augment``, the spec's
  ``data.crops`` settings: RandomResizedCrop, flip, colour jitter, grayscale, blur, solarize); a step of
  ``--batch-size`` images is then twice as many crops, so this pipeline sees more inputs, not fewer.
  ``--override data.crops.KEY=VALUE`` (repeatable, as in ``bench/quickstart_knn.py``) changes that augmentation,
  one component at a time: ``flip_probability=0``, ``aspect_ratio=[1,1]``, ``blur_probabilities=disabled``, ...

Each backbone is then scored like the quickstart (k-NN, k=20, T=0.07, CLS token, the first ``--limit-train`` /
``--limit-test`` images), next to raw pixels, and by its own head (``head_top1``, the supervised classifier on the
clean test images). Prints ONE JSON object (last line).

What it answers: how much of the gap between the self-supervised quickstart and raw pixels is the method, and how much
is what the recipe's augmentations cost this backbone at this budget even with labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINES = ("clean", "flip", "multicrop")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-train", type=int, default=10000)
    parser.add_argument("--limit-test", type=int, default=2000)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {PIPELINES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="dotted trainer key=value (data.crops.*)")
    args = parser.parse_args(argv)
    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        parser.error(f"--pipelines: invalid value {unknown!r}; allowed: {', '.join(PIPELINES)}")

    import numpy as np
    import torch
    import torch.nn.functional as F
    from streaming import LocalDataset

    from dino_ctl.validation import load_spec
    from dino_ctl.stages import stage_train_config
    from trainer.config import ConfigError, parse_override, with_overrides
    from trainer.data.augment import MultiCropAugmentation
    from trainer.data.eval_data import eval_transform
    from trainer.evaluate import extract_features, knn_top1, labelled_batches, pixel_features
    from trainer.models import build_backbone

    experiment = load_spec(args.spec)
    config = stage_train_config(experiment, experiment.spec.stages[0].name)
    if args.override:
        try:
            config = with_overrides(config, dict(map(parse_override, args.override)))
        except (ConfigError, ValueError) as exc:
            parser.error(f"--override: {exc}")
    evaluation = experiment.spec.evaluation
    if evaluation is None:
        raise SystemExit(f"{args.spec}: spec.evaluation names no labelled train/test data to score on")
    size = config.model.img_size
    source = config.data.streams[0].local if config.data.streams else None
    if not source:
        raise SystemExit(f"{args.spec}: the first stage reads no local MDS stream to train on")
    records = LocalDataset(source)
    augmentation = MultiCropAugmentation(config.data.crops)

    order = np.random.default_rng(args.seed).integers(0, len(records), size=(args.iterations, args.batch_size))
    flips = np.random.default_rng(args.seed + 1).random((args.iterations, args.batch_size)) < 0.5

    def batch(pipeline: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [records[int(i)] for i in order[step]]
        labels = torch.tensor([int(s["label"]) for s in samples])
        if pipeline == "multicrop":
            crops = [augmentation(s["image"], seed=(args.seed, step, j)).global_crops for j, s in enumerate(samples)]
            return torch.cat(crops), labels.repeat_interleave(2)
        images = torch.stack([eval_transform(s["image"], image_size=size) for s in samples])
        if pipeline == "flip":
            images = torch.where(torch.from_numpy(flips[step])[:, None, None, None], images.flip(-1), images)
        return images, labels

    train_eval = labelled_batches(evaluation.train, image_size=size, limit=args.limit_train)
    test_eval = labelled_batches(evaluation.test, image_size=size, limit=args.limit_test)
    cpu = torch.device("cpu")
    pixels_fit, pixels_test = pixel_features(train_eval), pixel_features(test_eval)
    report: dict = {
        "benchmark": "quickstart_ceiling",
        "overrides": args.override,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "num_train": int(pixels_fit.labels.numel()),
        "num_test": int(pixels_test.labels.numel()),
        "raw_pixels": knn_top1(pixels_fit.cls, pixels_fit.labels, pixels_test.cls, pixels_test.labels),
    }
    torch.manual_seed(args.seed)
    initial = build_backbone(config.model, drop_path_rate=0.0)
    num_classes = int(pixels_fit.labels.max()) + 1
    initial_head = torch.nn.Linear(initial.embed_dim, num_classes)
    for pipeline in pipelines:
        backbone = build_backbone(config.model, drop_path_rate=0.0)
        backbone.load_state_dict(initial.state_dict())
        head = torch.nn.Linear(initial.embed_dim, num_classes)
        head.load_state_dict(initial_head.state_dict())
        optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
        backbone.train()
        start = time.perf_counter()
        for step in range(args.iterations):
            images, labels = batch(pipeline, step)
            loss = F.cross_entropy(head(backbone.forward_features(images)["x_norm_clstoken"]), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        fit = extract_features(backbone, train_eval, device=cpu)
        held_out = extract_features(backbone, test_eval, device=cpu)
        with torch.no_grad():
            head_top1 = float((head(held_out.cls).argmax(1) == held_out.labels).float().mean())
        report[pipeline] = {
            "knn_top1": knn_top1(fit.cls, fit.labels, held_out.cls, held_out.labels),
            "head_top1": head_top1,
            "final_loss": round(loss.item(), 4),
            "train_seconds": round(seconds, 1),
        }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
