"""Connected components: the vectorised union-find against a sequential reference, edge extraction from k-NN."""

from __future__ import annotations

import numpy as np
import pytest

from curation.graph import connected_components, knn_edges


def _reference_components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Textbook union-find (path halving), labels = smallest node of each component."""
    parent = list(range(num_nodes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(int(u)), find(int(v))
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return np.array([find(x) for x in range(num_nodes)])


@pytest.mark.parametrize("num_nodes,num_edges", [(1, 0), (10, 0), (50, 30), (500, 400), (2000, 5000)])
def test_components_match_reference_union_find(num_nodes: int, num_edges: int) -> None:
    rng = np.random.default_rng(num_nodes + num_edges)
    edges = rng.integers(0, num_nodes, size=(num_edges, 2))
    labels = connected_components(num_nodes, edges, use_scipy=False)
    np.testing.assert_array_equal(labels, _reference_components(num_nodes, edges))


def test_long_chain_is_one_component_labelled_by_its_smallest_node() -> None:
    order = np.random.default_rng(0).permutation(1000)
    edges = np.stack([order[:-1], order[1:]], axis=1)  # a path visiting the nodes in random order
    labels = connected_components(1000, edges, use_scipy=False)
    assert set(labels.tolist()) == {0}


def test_scipy_path_agrees_when_installed() -> None:
    pytest.importorskip("scipy.sparse.csgraph")
    edges = np.random.default_rng(1).integers(0, 300, size=(200, 2))
    np.testing.assert_array_equal(
        connected_components(300, edges, use_scipy=True), connected_components(300, edges, use_scipy=False)
    )


def test_out_of_range_edges_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"edge endpoints must lie in \[0, 3\)"):
        connected_components(3, np.array([[0, 3]]))


def test_knn_edges_threshold_self_loops_and_duplicates() -> None:
    ids = np.array([[0, 1, 2], [1, 0, -1], [2, 0, 1]])
    sims = np.array([[1.0, 0.9, 0.5], [1.0, 0.9, -np.inf], [1.0, 0.5, 0.7]], np.float32)
    edges = knn_edges(sims, ids, 0.6)
    np.testing.assert_array_equal(edges, [[0, 1], [1, 2]])  # (0,1) found twice, kept once; 0.5 pairs dropped
