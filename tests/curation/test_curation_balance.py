"""Balanced hierarchical k-means (Vo et al. 2024): water-filling, vectorised centroids, flattening of skewed data."""

from __future__ import annotations

import numpy as np
import pytest

from curation.balance import balanced_sample, hierarchical_kmeans
from curation.grouping import group_means, rank_within_groups, water_fill
from curation_data import skewed_concepts


@pytest.mark.parametrize(
    "sizes,budget,expected",
    [
        ([10, 10, 10], 15, [5, 5, 5]),  # equal sizes: equal cut
        ([1, 2, 100], 30, [1, 2, 27]),  # small clusters whole, the large one takes the rest
        ([5, 5, 50, 50], 40, [5, 5, 15, 15]),
        ([3, 4], 7, [3, 4]),  # budget = total: everything
        ([3, 4], 0, [0, 0]),
    ],
)
def test_water_fill_single_group(sizes: list[int], budget: int, expected: list[int]) -> None:
    alloc = water_fill(
        np.array(sizes), np.zeros(len(sizes), np.int64), np.array([budget]), rng=np.random.default_rng(0)
    )
    assert alloc.tolist() == expected


def test_water_fill_groups_are_independent_and_fair() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        num_groups = int(rng.integers(1, 6))
        parents = rng.integers(0, num_groups, 40)
        sizes = rng.integers(0, 30, 40)
        totals = np.bincount(parents, weights=sizes, minlength=num_groups).astype(int)
        budgets = (totals * rng.random(num_groups)).astype(int)
        alloc = water_fill(sizes, parents, budgets, rng=rng)
        assert np.all((alloc >= 0) & (alloc <= sizes))
        np.testing.assert_array_equal(np.bincount(parents, weights=alloc, minlength=num_groups), budgets)
        for g in range(num_groups):  # max-min fair: a child cut below its size gets within 1 of the largest share
            cut = (parents == g) & (alloc < sizes)
            if cut.any():
                assert alloc[cut].min() >= alloc[parents == g].max() - 1


def test_water_fill_rejects_a_budget_above_the_group_size() -> None:
    with pytest.raises(ValueError, match="exceeds the total size"):
        water_fill(np.array([1, 2]), np.array([0, 0]), np.array([4]), rng=np.random.default_rng(0))


def test_group_means_match_a_loop() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    labels = rng.integers(0, 7, 500)
    means, counts = group_means(x, labels, 9)  # clusters 7 and 8 are empty
    for c in range(9):
        expected = x[labels == c].mean(0) if counts[c] else np.zeros(8)
        np.testing.assert_allclose(means[c], expected, rtol=1e-5, atol=1e-6)
    assert means.dtype == np.float32


def test_rank_within_groups() -> None:
    ranks = rank_within_groups(np.array([1, 0, 1, 0, 1]), np.array([0.5, 0.2, 0.1, 0.9, 0.3]))
    assert ranks.tolist() == [2, 0, 0, 1, 1]


def _concept_stats(counts: np.ndarray) -> tuple[float, float]:
    """(largest / smallest concept share, entropy normalised to [0, 1])."""
    share = counts / counts.sum()
    entropy = -(share[share > 0] * np.log(share[share > 0])).sum() / np.log(len(counts))
    return float(counts.max() / max(counts.min(), 1)), float(entropy)


def test_balanced_sampling_flattens_a_skewed_concept_distribution() -> None:
    rng = np.random.default_rng(0)
    sizes = [1600, 800, 400, 200, 100, 50]  # a 32x skew between the largest and smallest concept
    x, concept = skewed_concepts(rng, sizes, 32, spread=0.1)
    hierarchy = hierarchical_kmeans(
        x, levels=(60, 20, 6), resampling_rounds=3, resample_fraction=0.5, iterations=15, seed=0
    )
    chosen = balanced_sample(hierarchy, 300, sampling="random", rng=np.random.default_rng(0))
    assert len(chosen) == 300 and len(np.unique(chosen)) == 300
    random_pick = rng.choice(len(x), 300, replace=False)  # the baseline: uniform sampling keeps the skew
    before = _concept_stats(np.bincount(concept, minlength=6))
    baseline = _concept_stats(np.bincount(concept[random_pick], minlength=6))
    after = _concept_stats(np.bincount(concept[chosen], minlength=6))
    print(f"max/min ratio, entropy: pool {before}, uniform sample {baseline}, balanced {after}")
    assert after[0] < before[0] / 3 and after[0] < baseline[0] / 3
    assert after[1] > before[1] + 0.1 and after[1] > baseline[1] + 0.1


def test_hierarchy_structure_and_closest_sampling() -> None:
    rng = np.random.default_rng(3)
    x, _ = skewed_concepts(rng, [200, 100, 50], 16)
    hierarchy = hierarchical_kmeans(
        x, levels=(12, 3), resampling_rounds=2, resample_fraction=0.5, iterations=10, seed=0
    )
    paths = hierarchy.point_clusters()
    assert paths.shape == (350, 2)
    sizes = hierarchy.cluster_sizes()
    assert sizes[0].sum() == sizes[1].sum() == 350
    np.testing.assert_array_equal(np.bincount(paths[:, 1], minlength=3), sizes[1])
    chosen = balanced_sample(hierarchy, 24, sampling="closest", rng=np.random.default_rng(0))
    # In each leaf, the picked points are the ones closest to its centroid.
    for leaf in np.unique(hierarchy.labels[0][chosen]):
        members = np.flatnonzero(hierarchy.labels[0] == leaf)
        picked = np.intersect1d(members, chosen)
        rest = np.setdiff1d(members, chosen)
        if len(rest):
            assert hierarchy.similarities[picked].min() >= hierarchy.similarities[rest].max()


def test_target_above_pool_takes_everything() -> None:
    x, _ = skewed_concepts(np.random.default_rng(4), [30, 20], 8)
    hierarchy = hierarchical_kmeans(x, levels=(4,), resampling_rounds=0, resample_fraction=0.5, iterations=5, seed=0)
    assert len(balanced_sample(hierarchy, 1000, sampling="random", rng=np.random.default_rng(0))) == 50
