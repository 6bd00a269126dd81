"""Copy-detection deduplication (DINOv2 paper, appendix A).

Self-dedup: k nearest neighbours of every pool image, pairs above ``threshold`` form a graph, its connected
components are groups of copies, and one image per component (the smallest row) is kept.

Evaluation-set dedup: a pool image with an evaluation image above the stricter ``eval_threshold`` touches the
evaluation set, and every pool image in its component of the ``eval_threshold`` graph is dropped with it. The
``threshold`` graph's components are subsets of the ``eval_threshold`` graph's (eval_threshold <= threshold), so
running both on the whole pool equals the paper's self-dedup-then-eval-dedup order, and one k-NN search serves both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from curation.config import DedupConfig
from curation.graph import connected_components, knn_edges
from curation.index import Advance, build_index, knn_search

__all__ = ["DedupResult", "deduplicate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DedupResult:
    """Per pool row: whether it is kept and its copy component (label = smallest row of the component)."""

    keep: np.ndarray
    """bool ``[n]``."""
    component: np.ndarray
    """int64 ``[n]``: component of the ``threshold`` graph."""
    eval_touched: np.ndarray
    """bool ``[n]``: dropped because its ``eval_threshold`` component touches an evaluation image."""

    def summary(self) -> dict[str, int]:
        """Counts for the step summary and the manifest."""
        representative = self.component == np.arange(len(self.component))
        return {
            "input": int(len(self.keep)),
            "components": int(representative.sum()),
            "removed_copies": int((~representative).sum()),
            "removed_eval": int((self.eval_touched & representative).sum()),
            "kept": int(self.keep.sum()),
        }


def deduplicate(
    pool: np.ndarray,
    eval_sets: np.ndarray | None,
    *,
    config: DedupConfig,
    seed: int = 0,
    advance: Advance | None = None,
) -> DedupResult:
    """Self-dedup ``pool`` ``[n, D]`` and drop components near ``eval_sets`` ``[m, D]`` (both L2-normalised)."""
    if config.eval_threshold > config.threshold:
        logger.warning(
            "dedup.eval_threshold %.3f is looser than dedup.threshold %.3f: evaluation components are then "
            "computed on the self-dedup graph",
            config.eval_threshold,
            config.threshold,
        )
    num = len(pool)
    index = build_index(pool, config=config.index, field="dedup.index", seed=seed)
    # k + 1: every image finds itself first; the self-match is dropped when building edges.
    sims, ids = knn_search(index, pool, config.k + 1, batch_size=config.index.batch_size, advance=advance)
    component = connected_components(num, knn_edges(sims, ids, config.threshold))
    keep = component == np.arange(num)
    eval_touched = np.zeros(num, bool)
    if eval_sets is not None and len(eval_sets):
        eval_touched = _eval_touched(pool, eval_sets, sims, ids, config=config)
        keep &= ~eval_touched
    return DedupResult(keep=keep, component=component, eval_touched=eval_touched)


def _eval_touched(
    pool: np.ndarray, eval_sets: np.ndarray, sims: np.ndarray, ids: np.ndarray, *, config: DedupConfig
) -> np.ndarray:
    """Pool rows whose ``eval_threshold`` component contains a row close to an evaluation image."""
    eval_index = build_index(eval_sets, config=config.index, field="dedup.index")
    # The nearest evaluation image decides whether a pool image touches the evaluation sets.
    nearest, _ = knn_search(eval_index, pool, 1, batch_size=config.index.batch_size)
    direct = nearest[:, 0] > config.eval_threshold
    graph_threshold = min(config.eval_threshold, config.threshold)
    component = connected_components(len(pool), knn_edges(sims, ids, graph_threshold))
    touched_components = np.zeros(len(pool), bool)
    touched_components[component[direct]] = True
    return touched_components[component]
