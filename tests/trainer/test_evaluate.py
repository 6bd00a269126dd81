"""k-NN and linear-probe scoring against independent expectations on synthetic features."""

from __future__ import annotations

import pytest
import torch

from trainer.evaluate import knn_top1, linear_probe_top1


def _clusters(num_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_knn_separates_well_separated_clusters_and_is_chance_on_shuffled_labels():
    train, train_labels = _clusters(50, 4, 16, 0.3, seed=0)
    test, test_labels = _clusters(20, 4, 16, 0.3, seed=0)  # same centres: the seed fixes them
    assert knn_top1(train, train_labels, test, test_labels) == 1.0
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    assert knn_top1(train, shuffled, test, test_labels) < 0.5


def test_knn_weighted_vote_follows_the_closest_neighbours():
    # one query next to three class-1 points, farther from many class-0 points: k=3 must answer class 1
    train = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.98, -0.05]] + [[0.0, 1.0]] * 10)
    labels = torch.tensor([1, 1, 1] + [0] * 10)
    assert knn_top1(train, labels, torch.tensor([[1.0, 0.01]]), torch.tensor([1]), k=3) == 1.0
    with pytest.raises(ValueError, match="k=20 needs at least 20 training samples"):
        knn_top1(train, labels, train, labels)


def test_linear_probe_learns_a_linear_rule_and_reports_its_choice():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(400, 8, generator=generator)
    test = torch.randn(200, 8, generator=generator)
    direction = torch.randn(8, generator=generator)
    top1, chosen = linear_probe_top1(train, (train @ direction > 0).long(), test, (test @ direction > 0).long(),
                                     epochs=20)
    assert top1 > 0.9
    assert chosen["lr"] in (1e-3, 1e-2, 1e-1) and chosen["weight_decay"] in (0.0, 1e-4)
