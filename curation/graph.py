"""Connected components of a similarity graph (the paper's union-find), vectorised.

Each component is labelled by its smallest node id, which doubles as the deterministic representative kept by
deduplication. ``scipy.sparse.csgraph`` is used when installed; otherwise a numpy union-find with hooking and
pointer jumping (path compression applied to every node at once) runs in O(log n) rounds of O(edges) work.
"""

from __future__ import annotations

import numpy as np

__all__ = ["connected_components", "knn_edges"]


def knn_edges(
    sims: np.ndarray, ids: np.ndarray, threshold: float, *, query_ids: np.ndarray | None = None
) -> np.ndarray:
    """Undirected edges ``[E, 2]`` (u < v) between each query and its neighbours with similarity > threshold.

    ``query_ids`` names the graph node of each query row (default: the row number). Self-loops, missing neighbours
    (id -1) and duplicate edges are dropped.
    """
    num_queries, k = ids.shape
    nodes = np.arange(num_queries, dtype=np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
    src = np.repeat(nodes, k)
    dst = ids.reshape(-1)
    keep = (sims.reshape(-1) > threshold) & (dst >= 0) & (dst != src)
    u, v = src[keep], dst[keep]
    edges = np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1)
    return np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2)


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _components_numpy(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    parent = np.arange(num_nodes, dtype=np.int64)
    u, v = edges[:, 0], edges[:, 1]
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return parent
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]  # edges inside one tree are done for good
        low, high = np.minimum(ru, rv), np.maximum(ru, rv)
        # Hook each larger root under the smallest root it touches; parent[x] <= x always holds, so no cycles.
        np.minimum.at(parent, high, low)
        parent = _compress(parent)


def _components_scipy(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(num_nodes, num_nodes))
    _, labels = cc(graph, directed=False)
    smallest = np.full(labels.max() + 1 if num_nodes else 0, num_nodes, np.int64)
    np.minimum.at(smallest, labels, np.arange(num_nodes, dtype=np.int64))
    return smallest[labels]


def connected_components(num_nodes: int, edges: np.ndarray, *, use_scipy: bool | None = None) -> np.ndarray:
    """Component label of every node ``[num_nodes]``: the smallest node id of its component.

    ``use_scipy``: None uses scipy when it is importable; False forces the numpy union-find.
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= num_nodes):
        raise ValueError(f"edge endpoints must lie in [0, {num_nodes}), got [{edges.min()}, {edges.max()}]")
    if use_scipy is None:
        try:
            import scipy.sparse.csgraph  # noqa: F401

            use_scipy = True
        except ImportError:
            use_scipy = False
    if use_scipy:
        return _components_scipy(num_nodes, edges)
    return _components_numpy(num_nodes, edges)
