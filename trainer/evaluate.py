"""Frozen-feature evaluation: k-NN and linear probes, always next to a random-init baseline of the same preset.

k-NN follows the DINO protocol: L2-normalised CLS features, cosine similarity, the k=20 nearest training samples vote
with weight exp(sim / 0.07). The linear probe trains a softmax classifier on the concatenation of the CLS token and
the average patch token (the DINOv2 linear protocol without its learning-rate grid over many layers), choosing the
learning rate and weight decay on a held-out part of the training features.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.data.eval_data import build_eval_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "Features",
    "evaluate_backbone",
    "extract_features",
    "knn_top1",
    "labelled_batches",
    "linear_probe_top1",
    "pixel_features",
]


@dataclass
class Features:
    """Frozen features of one split: ``cls [N,D]``, ``patch_mean [N,D]``, ``labels [N]``."""

    cls: torch.Tensor
    patch_mean: torch.Tensor
    labels: torch.Tensor

    def linear_input(self) -> torch.Tensor:
        return torch.cat([self.cls, self.patch_mean], dim=1)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device
) -> Features:
    """Run the backbone in eval mode over ``(images, labels)`` batches."""
    backbone.eval().to(device)
    cls, patch, labels = [], [], []
    for images, batch_labels in batches:
        out = backbone.forward_features(images.to(device, non_blocking=True))
        cls.append(out["x_norm_clstoken"].float().cpu())
        patch.append(out["x_norm_patchtokens"].float().mean(dim=1).cpu())
        labels.append(torch.as_tensor(batch_labels).cpu())
    return Features(torch.cat(cls), torch.cat(patch), torch.cat(labels).long())


def pixel_features(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Features:
    """Raw (normalised) pixels as features: the 'no learning at all' baseline."""
    flat, labels = [], []
    for images, batch_labels in batches:
        flat.append(images.flatten(1).float())
        labels.append(torch.as_tensor(batch_labels))
    pixels = torch.cat(flat)
    return Features(pixels, torch.zeros(pixels.shape[0], 0), torch.cat(labels).long())


@torch.no_grad()
def knn_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN top-1 accuracy (DINO protocol) with cosine similarity."""
    if train.shape[0] < k:
        raise ValueError(f"k={k} needs at least {k} training samples, got {train.shape[0]}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sims = test[start : start + chunk] @ train.T  # [q, N]
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(top_sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / test.shape[0]


def _train_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, lr: float, weight_decay: float, epochs: int, seed: int
) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    batch = 256
    steps = epochs * math.ceil(x.shape[0] / batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head


def linear_probe_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 30,
    learning_rates: tuple[float, ...] = (1e-3, 1e-2, 1e-1),
    weight_decays: tuple[float, ...] = (0.0, 1e-4),
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """Linear-probe top-1 on ``test``; (lr, wd) chosen on a held-out ``val_fraction`` of ``train``."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std  # standardise: one lr grid fits every feature scale
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    num_val = max(1, int(train.shape[0] * val_fraction))
    val_idx, fit_idx = order[:num_val], order[num_val:]
    best: tuple[float, float, float] | None = None
    for lr in learning_rates:
        for wd in weight_decays:
            head = _train_linear(train[fit_idx], train_labels[fit_idx], num_classes, lr=lr, weight_decay=wd,
                                 epochs=epochs, seed=seed)
            with torch.no_grad():
                acc = float((head(train[val_idx]).argmax(1) == train_labels[val_idx]).float().mean())
            if best is None or acc > best[0]:
                best = (acc, lr, wd)
    assert best is not None
    _, lr, wd = best
    head = _train_linear(train, train_labels, num_classes, lr=lr, weight_decay=wd, epochs=epochs, seed=seed)
    with torch.no_grad():
        top1 = float((head(test).argmax(1) == test_labels).float().mean())
    return top1, {"lr": lr, "weight_decay": wd, "val_top1": best[0]}


def labelled_batches(
    path: str, *, image_size: int, batch_size: int = 256, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Resize + centre-crop + normalise a labelled MDS dataset or image folder into in-memory batches."""
    from torch.utils.data import DataLoader, Subset

    dataset = build_eval_dataset(path, image_size=image_size)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))  # the first `limit` samples: deterministic across runs and models
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [(images, labels) for images, labels, *_ in loader]


def evaluate_backbone(
    backbone: nn.Module,
    *,
    train: list[tuple[torch.Tensor, torch.Tensor]],
    test: list[tuple[torch.Tensor, torch.Tensor]],
    protocols: tuple[str, ...] = ("knn",),
    random_backbone: nn.Module | None = None,
    raw_pixels: bool = True,
    device: torch.device = torch.device("cpu"),
    k: int = 20,
) -> dict[str, dict[str, float]]:
    """Top-1 per protocol for the trained backbone and, in the same run, the random-init and raw-pixel baselines."""
    candidates: dict[str, tuple[Features, Features]] = {
        "trained": (extract_features(backbone, train, device=device), extract_features(backbone, test, device=device))
    }
    if random_backbone is not None:
        candidates["random_init"] = (
            extract_features(random_backbone, train, device=device),
            extract_features(random_backbone, test, device=device),
        )
    if raw_pixels:
        candidates["raw_pixels"] = (pixel_features(train), pixel_features(test))
    report: dict[str, dict[str, float]] = {}
    for protocol in protocols:
        report[protocol] = {}
        for name, (fit, held_out) in candidates.items():
            if protocol == "knn":
                top1 = knn_top1(fit.cls, fit.labels, held_out.cls, held_out.labels, k=k)
            elif protocol == "linear":
                top1, _ = linear_probe_top1(fit.linear_input(), fit.labels, held_out.linear_input(), held_out.labels)
            else:
                raise ValueError(f"protocol: invalid value {protocol!r}; allowed: knn, linear")
            report[protocol][name] = top1
            logger.info("%s top-1 of %s: %.4f", protocol, name, top1)
    return report
