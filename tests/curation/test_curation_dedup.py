"""Deduplication on generated embeddings: planted copies go, distinct images stay, evaluation components go whole."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import DedupConfig, IndexConfig
from curation.dedup import deduplicate
from curation_data import noisy_copies, random_unit


def _pool_with_copies(seed: int, *, num_distinct: int, num_copied: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct images followed by 1-3 noisy copies of the first ``num_copied``; returns (pool, original of row)."""
    rng = np.random.default_rng(seed)
    distinct = random_unit(rng, num_distinct, dim)
    sources = np.repeat(np.arange(num_copied), rng.integers(1, 4, num_copied))
    copies = noisy_copies(rng, distinct[sources], cosine=0.8)
    return np.concatenate([distinct, copies]), np.concatenate([np.arange(num_distinct), sources])


def _precision_recall(keep: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """Removal precision (removed rows that really were copies) and recall (copies that were removed)."""
    is_copy = np.zeros(len(keep), bool)
    is_copy[len(np.unique(original)) :] = True  # rows after the distinct block are the planted copies
    removed = ~keep
    precision = (removed & is_copy).sum() / max(removed.sum(), 1)
    recall = (removed & is_copy).sum() / is_copy.sum()
    return float(precision), float(recall)


@pytest.mark.parametrize("index_kind", ["flat", "ivf_flat"])
def test_planted_copies_are_removed_and_distinct_images_kept(index_kind: str) -> None:
    pool, original = _pool_with_copies(0, num_distinct=3000, num_copied=300, dim=128)
    config = DedupConfig(k=16, index=IndexConfig(kind=index_kind, nprobe=8))
    result = deduplicate(pool, None, config=config)
    precision, recall = _precision_recall(result.keep, original)
    print(f"{index_kind}: precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.99 and recall >= (0.99 if index_kind == "flat" else 0.9)
    if index_kind == "flat":  # exact search: exactly one image per group of copies survives
        kept_groups = original[result.keep]
        assert len(np.unique(kept_groups)) == len(kept_groups) == 3000
    assert result.summary()["kept"] == int(result.keep.sum())


def test_representative_is_the_smallest_row_of_its_component() -> None:
    pool, original = _pool_with_copies(1, num_distinct=200, num_copied=50, dim=64)
    result = deduplicate(pool, None, config=DedupConfig(k=8))
    kept = np.flatnonzero(result.keep)
    assert np.all(result.component[kept] == kept)
    copied_rows = np.arange(200, len(pool))
    np.testing.assert_array_equal(result.component[copied_rows], original[copied_rows])


def test_evaluation_components_are_dropped_whole() -> None:
    rng = np.random.default_rng(2)
    dim = 64
    background = random_unit(rng, 400, dim)
    eval_image = random_unit(rng, 1, dim)
    # a: a loose copy of the evaluation image (0.5 > 0.45); b: close to a (0.5) but far from the evaluation image;
    # c: a tight copy of b (0.9, same self-dedup component as b); d: unrelated.
    a = noisy_copies(rng, eval_image, 0.5)
    b = noisy_copies(rng, a, 0.5)
    c = noisy_copies(rng, b, 0.9)
    pool = np.concatenate([background, a, b, c])
    ia, ib, ic = 400, 401, 402
    assert float((b @ eval_image.T)[0, 0]) < 0.45  # b touches the evaluation set only through a
    result = deduplicate(pool, eval_image, config=DedupConfig(k=8))
    assert not result.keep[[ia, ib, ic]].any()
    assert result.eval_touched[[ia, ib, ic]].all()
    assert result.keep[:400].all()  # the unrelated background is untouched
    assert result.summary()["removed_eval"] == 2  # components {a} and {b, c}


def test_without_eval_sets_nothing_is_eval_touched() -> None:
    pool, _ = _pool_with_copies(3, num_distinct=100, num_copied=10, dim=64)
    result = deduplicate(pool, None, config=DedupConfig(k=4))
    assert not result.eval_touched.any()
