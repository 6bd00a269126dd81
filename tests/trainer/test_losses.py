"""DINO, iBOT and KoLeo losses against explicit per-pair / per-sample computations written out here."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses.dino import dino_cross_entropy
from trainer.losses.ibot import ibot_masked_loss
from trainer.losses.koleo import koleo_loss


def _cross_entropy(teacher: torch.Tensor, student: torch.Tensor, temp: float) -> torch.Tensor:
    """Batch-mean H(t, s) in float64, one pair of views."""
    return -(teacher.double() * torch.log_softmax(student.double() / temp, dim=-1)).sum(-1).mean()


def _dino_by_pairs(student_global, student_local, teacher, temp):
    global_terms = [
        _cross_entropy(teacher[j], student_global[i], temp) for i in range(2) for j in range(2) if i != j
    ]
    local_terms = [_cross_entropy(teacher[j], view, temp) for view in student_local for j in range(2)]
    num_terms = len(global_terms) + len(local_terms)
    return sum(global_terms) / num_terms, sum(local_terms, torch.zeros((), dtype=torch.float64)) / num_terms


@pytest.mark.parametrize("num_local", [0, 3])
def test_dino_cross_entropy_equals_sum_over_view_pairs(num_local):
    gen = torch.Generator().manual_seed(0)
    batch, prototypes = 5, 11
    student_global = torch.randn(2, batch, prototypes, generator=gen)
    student_local = torch.randn(num_local, batch, prototypes, generator=gen)
    teacher = torch.softmax(torch.randn(2, batch, prototypes, generator=gen) / 0.07, dim=-1)

    loss_global, loss_local = dino_cross_entropy(
        student_global, student_local if num_local else None, teacher, student_temp=0.1
    )
    expected_global, expected_local = _dino_by_pairs(student_global, student_local, teacher, 0.1)
    torch.testing.assert_close(loss_global.double(), expected_global, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_local.double(), expected_local, rtol=1e-5, atol=1e-6)


def test_dino_teacher_views_are_swapped_for_global_terms():
    # A student that copies teacher view 0 exactly at view 0: swapping means view 0 is scored against teacher view 1.
    teacher_logits = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 0.0, 4.0]]])
    teacher = torch.softmax(teacher_logits, dim=-1)
    student = teacher_logits * 0.1  # s / 0.1 == teacher logits
    loss_global, _ = dino_cross_entropy(student, None, teacher, student_temp=0.1)
    swapped = (_cross_entropy(teacher[1], student[0], 0.1) + _cross_entropy(teacher[0], student[1], 0.1)) / 2
    same_view = (_cross_entropy(teacher[0], student[0], 0.1) + _cross_entropy(teacher[1], student[1], 0.1)) / 2
    torch.testing.assert_close(loss_global.double(), swapped)
    assert loss_global.item() > same_view.item() + 1.0


def test_dino_loss_at_initialisation_is_ln_k_split_16_to_2():
    prototypes, batch = 131072, 2
    gen = torch.Generator().manual_seed(1)
    # Untrained heads: nearly uniform student and teacher distributions.
    student_global = 1e-4 * torch.randn(2, batch, prototypes, generator=gen)
    student_local = 1e-4 * torch.randn(8, batch, prototypes, generator=gen)
    teacher = torch.softmax(1e-4 * torch.randn(2, batch, prototypes, generator=gen) / 0.04, dim=-1)
    loss_global, loss_local = dino_cross_entropy(student_global, student_local, teacher, student_temp=0.1)
    log_k = math.log(prototypes)
    assert loss_local.item() == pytest.approx(16 / 18 * log_k, rel=1e-4)
    assert loss_global.item() == pytest.approx(2 / 18 * log_k, rel=1e-4)
    # recipe.md quotes the measured start of training, 10.59 / 1.32: at or slightly above the uniform bound.
    assert 10.59 - 0.15 < loss_local.item() <= 10.59
    assert 1.32 - 0.02 < loss_global.item() <= 1.32


def test_dino_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="teacher_probs"):
        dino_cross_entropy(torch.zeros(2, 3, 5), None, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="student_local"):
        dino_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(4, 2, 5), torch.zeros(2, 3, 5))


def test_dino_loss_gradient_flows_to_student_only_through_log_softmax():
    student_global = torch.randn(2, 3, 7, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 7), dim=-1)
    loss_global, _ = dino_cross_entropy(student_global, None, teacher)
    loss_global.backward()
    # d/ds of CE(t, softmax(s / T)) = (softmax(s / T) - t) / T, summed over the 2 terms, / (B * 2).
    expected = (torch.softmax(student_global.detach() / 0.1, -1) - teacher.flip(0)) / 0.1 / (3 * 2)
    torch.testing.assert_close(student_global.grad, expected, rtol=1e-5, atol=1e-6)


def test_ibot_masked_loss_equals_weighted_sum_over_patches():
    gen = torch.Generator().manual_seed(2)
    # 3 global crops: crop 0 has 2 masked patches, crop 1 has 3, crop 2 none -> M = 5.
    crop_of_patch = [0, 0, 1, 1, 1]
    student = torch.randn(5, 9, generator=gen)
    teacher = torch.softmax(torch.randn(5, 9, generator=gen) / 0.05, dim=-1)
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])

    loss = ibot_masked_loss(student, teacher, weights, num_global_crops_total=3, student_temp=0.1)

    per_crop = [0.0, 0.0, 0.0]
    counts = [crop_of_patch.count(c) for c in range(3)]
    for m, crop in enumerate(crop_of_patch):
        log_p = torch.log_softmax(student[m].double() / 0.1, dim=-1)
        per_crop[crop] += -(teacher[m].double() * log_p).sum().item() / counts[crop]
    assert loss.item() == pytest.approx(sum(per_crop) / 3, rel=1e-5)


def test_ibot_masked_loss_without_masked_patches_is_zero():
    student = torch.zeros(0, 4, requires_grad=True)
    loss = ibot_masked_loss(student, torch.zeros(0, 4), torch.zeros(0), num_global_crops_total=4)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_koleo_loss_equals_nearest_neighbour_log_distance():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen) * 3
    loss = koleo_loss(x)

    unit = [row.double() / row.double().norm() for row in x]
    total = 0.0
    for i, xi in enumerate(unit):
        nearest = max((j for j in range(len(unit)) if j != i), key=lambda j: float(xi @ unit[j]))
        total += math.log((xi - unit[nearest]).norm().item() + 1e-8)
    assert loss.item() == pytest.approx(-total / len(unit), rel=1e-5)


def test_koleo_loss_of_duplicates_is_finite():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 5.0
    assert torch.isfinite(x.grad).all()


def test_koleo_loss_with_one_sample_names_the_fix():
    with pytest.raises(ValueError) as excinfo:
        koleo_loss(torch.randn(1, 8))
    message = str(excinfo.value)
    assert "KoLeo needs at least 2 samples per rank per global crop" in message
    assert "got 1" in message
    assert "loss.koleo_loss_weight=0" in message and "optim.global_batch_size" in message
