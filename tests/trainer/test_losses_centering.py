"""Softmax centering and Sinkhorn-Knopp in one process, against float64 loops written out here."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.centering import SoftmaxCenter, sinkhorn_knopp


def sinkhorn_reference(logits: torch.Tensor, temp: float, num_iterations: int) -> torch.Tensor:
    """The recipe's Sinkhorn-Knopp, literally, in float64: Q [K, B] = exp(z / tau)^T, no stabilisation."""
    q = torch.exp(logits.double() / temp).t()
    num_prototypes, num_samples = q.shape
    q = q / q.sum()
    for _ in range(num_iterations):
        for k in range(num_prototypes):
            q[k] = q[k] / q[k].sum() / num_prototypes
        for b in range(num_samples):
            q[:, b] = q[:, b] / q[:, b].sum() / num_samples
    return (q * num_samples).t()


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_sinkhorn_matches_float64_reference_loop(offset):
    gen = torch.Generator().manual_seed(0)
    # offset 5 at tau 0.04: z / tau lies in [100, 150], where float32 exp(z / tau) overflows without the max shift.
    logits = offset + torch.randn(12, 7, generator=gen).clamp(-1.0, 1.0)
    result = sinkhorn_knopp(logits, 0.04, num_iterations=3)
    assert result.dtype == torch.float32 and result.shape == (12, 7)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.double(), sinkhorn_reference(logits, 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rows_are_distributions_and_prototypes_equipartitioned():
    gen = torch.Generator().manual_seed(1)
    num_samples, num_prototypes = 40, 8
    logits = torch.randn(num_samples, num_prototypes, generator=gen)
    q = sinkhorn_knopp(logits, 0.5, num_iterations=3)
    # After the final sample step every sample's distribution sums to one...
    torch.testing.assert_close(q.sum(dim=1), torch.ones(num_samples))
    # ... and prototypes receive close to B / K each: far closer than the plain softmax does.
    ideal = torch.full((num_prototypes,), num_samples / num_prototypes)
    sinkhorn_error = (q.sum(dim=0) - ideal).abs().max()
    softmax_error = (torch.softmax(logits / 0.5, dim=1).sum(dim=0) - ideal).abs().max()
    assert sinkhorn_error < 0.2 * softmax_error
    # Iterated to convergence it is doubly stochastic (rows 1, prototype columns B / K), even at a sharp temperature.
    converged = sinkhorn_knopp(logits, 0.1, num_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), ideal, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_iterations", [1, 3, 10])
def test_sinkhorn_without_the_scalar_factors_is_the_recipe_at_the_real_head_width(num_iterations):
    """The recipe's 1/total, 1/K, 1/B and x B are not applied (they cancel): against the literal float64 recipe at
    K = 65,536 and a sharp teacher, where a wrong cancellation would show at once. The logits span [-1, 1] like the
    head's (cosine similarities with weight-normalised prototypes)."""
    gen = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.rand(16, 65536, generator=gen) - 1.0
    result = sinkhorn_knopp(logits, 0.04, num_iterations=num_iterations)
    q = torch.exp((logits.double() - logits.max()) / 0.04).t()  # [K, B]; the shift is a constant factor
    num_prototypes, num_samples = q.shape
    q = q / q.sum()
    for _ in range(num_iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / num_samples
    expected = (q * num_samples).t()
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(result.sum(dim=1), torch.ones(16))


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="num_iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, num_iterations=0)


def test_softmax_center_probs_then_update():
    gen = torch.Generator().manual_seed(3)
    center = SoftmaxCenter(5, momentum=0.9)
    first = torch.randn(4, 5, generator=gen)
    probs = center.probs(first, 0.04)
    torch.testing.assert_close(probs, torch.softmax(first / 0.04, dim=-1))  # center starts at zero

    center.update(first)
    expected_center = 0.1 * first.mean(dim=0, keepdim=True)
    torch.testing.assert_close(center.center, expected_center)

    second = torch.randn(2, 3, 5, generator=gen)  # any leading shape
    torch.testing.assert_close(center.probs(second, 0.07), torch.softmax((second - expected_center) / 0.07, dim=-1))
    center.update(second)
    torch.testing.assert_close(center.center, 0.9 * expected_center + 0.1 * second.reshape(6, 5).mean(0))


def test_softmax_center_is_checkpointed_and_ignores_empty_batches():
    center = SoftmaxCenter(3)
    center.update(torch.ones(2, 3))
    state = center.state_dict()
    assert list(state) == ["center"]
    restored = SoftmaxCenter(3)
    restored.load_state_dict(state)
    restored.update(torch.zeros(0, 3))
    torch.testing.assert_close(restored.center, torch.full((1, 3), 0.1))


def test_softmax_center_rejects_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(4, momentum=1.5)
    with pytest.raises(ValueError, match="out_dim"):
        SoftmaxCenter(0)
