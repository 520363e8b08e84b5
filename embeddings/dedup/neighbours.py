"""Near-duplicate groups from vectors: a thresholded k-NN graph, or exact pairs per cluster.

Two ways in, one union-find (:mod:`.components`) out:

- :func:`knn_groups`: from any neighbour source that yields batches of
  ``(ids (b,), neighbour ids (b, k), similarities (b, k))``: a FAISS index searched with
  every indexed vector, :func:`exact_neighbours` below, or anything else.  Only edges at
  or above the cosine threshold are kept, batch by batch, so memory is the union-find's
  8 bytes a row plus one batch.  A group is a connected component: A~B and B~C put A and C
  together even when A and C are below the threshold (single linkage); a group is found
  whole as long as its members are linked by a path of k-nearest-neighbour edges.
- :func:`cluster_groups`: SemDeDup's per-cluster path for sets beyond memory: rows are
  split by cluster (an IVF list, k-means), every pair inside a cluster is compared exactly,
  one cluster at a time, so memory is bounded by the largest cluster.  Two duplicates in
  different clusters are missed; give each row its two nearest clusters (an ``(n, 2)``
  assignment) to catch those on the border.

Vectors are L2-normalised, so the inner product is the cosine similarity.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .components import UnionFind

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids (b,), neighbours (b, k), sims (b, k)
Vectors = np.ndarray | Callable[[np.ndarray], np.ndarray]  # rows -> (len(rows), d)
BLOCK_BYTES = 64 << 20  # similarity blocks are kept under this
PAIR_BLOCK = 512  # rows per block of the exact pairs within a cluster


def knn_edges(batch: Batch, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges ``(a, b, similarity)`` of one neighbour batch at or above ``threshold``
    (self matches and missing neighbours, id -1, dropped)."""
    ids, nbrs, sims = (np.asarray(x) for x in batch)
    if nbrs.ndim != 2 or sims.shape != nbrs.shape or len(ids) != len(nbrs):
        raise ValueError(f"a neighbour batch is ids (b,), neighbours (b, k), similarities "
                         f"(b, k); got {ids.shape}, {nbrs.shape}, {sims.shape}")
    keep = (sims >= threshold) & (nbrs >= 0) & (nbrs != ids[:, None])
    rows = np.broadcast_to(ids[:, None], nbrs.shape)
    return rows[keep].astype(np.int64), nbrs[keep].astype(np.int64), sims[keep]


def knn_groups(n: int, batches: Iterable[Batch], threshold: float,
               uf: UnionFind | None = None) -> UnionFind:
    """Union every neighbour pair at or above ``threshold`` (cosine); returns the
    union-find (``.labels()`` gives the groups).  Pass ``uf`` to add to earlier edges (a
    perceptual-hash grouping, another column)."""
    uf = UnionFind(n) if uf is None else uf
    for batch in batches:
        a, b, _ = knn_edges(batch, threshold)
        uf.union(a, b)
    return uf


def take_vectors(vectors: Vectors, rows: np.ndarray) -> np.ndarray:
    """float32 vectors of ``rows`` (sorted rows read a memory map front to back)."""
    got = vectors(rows) if callable(vectors) else vectors[rows]
    return np.asarray(got, dtype=np.float32)


def exact_neighbours(vectors: np.ndarray, k: int, batch_size: int | None = None,
                     ids: np.ndarray | None = None) -> Iterator[Batch]:
    """Exact ``k`` nearest neighbours (inner product) of every row among all rows, in
    batches: the reference neighbour source (O(n^2 d): tests, evaluation, small sets).

    ``ids``: the rows to query (default all).  Neighbours include the row itself."""
    x = np.asarray(vectors, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    batch = batch_size or max(1, min(4096, BLOCK_BYTES // max(4 * n, 1)))
    rows = np.arange(n) if ids is None else np.asarray(ids, dtype=np.int64)
    for start in range(0, len(rows), batch):
        q = rows[start:start + batch]
        sims = x[q] @ x.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else \
            np.broadcast_to(np.arange(n), (len(q), n)).copy()
        s = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-s, axis=1, kind="stable")
        yield q, np.take_along_axis(top, order, axis=1), np.take_along_axis(s, order, axis=1)


def pair_edges(x: np.ndarray, rows: np.ndarray, threshold: float,
               block: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair ``(rows[i], rows[j])``, ``i < j``, with ``x[i] @ x[j] >= threshold``,
    a block of rows at a time (exact, O(m^2 d) for m rows).

    Blocks of ``PAIR_BLOCK`` rows: each block is compared with the rows from its own
    start on, so the products cover about half the m x m matrix (one block of all m
    rows would compute all of it; at 1M rows that was 40% more time)."""
    m = len(x)
    block = block or max(1, min(m, PAIR_BLOCK, BLOCK_BYTES // max(4 * m, 1)))
    for start in range(0, m, block):
        sims = x[start:start + block] @ x[start:].T  # only j >= i of this block matters
        i, j = np.nonzero(sims >= threshold)
        j = j + start
        i = i + start
        upper = j > i
        if upper.any():
            yield rows[i[upper]], rows[j[upper]]


def cluster_groups(assign: np.ndarray, vectors: Vectors, threshold: float,
                   uf: UnionFind | None = None, n: int | None = None,
                   progress: Callable[[int], Any] | None = None,
                   workers: int | None = None) -> UnionFind:
    """Exact near-duplicate pairs within each cluster, unioned.

    ``assign``: the cluster of each row, ``(n,)``, or ``(n, a)`` for ``a`` clusters per
    row (-1: none); ``vectors``: an array (or memory map) of all rows, or a function giving
    the vectors of given rows (called from this thread only, in cluster order), so only a
    few clusters' vectors are in memory at a time: about ``2 * workers`` of them.
    ``progress(rows)`` is called after each cluster.

    Clusters are compared on ``workers`` threads (default: the CPU count) with one BLAS
    thread each: a cluster's matrices are small, and OpenBLAS spreading each small product
    over its own threads was 35x slower on a loaded 2-core machine (300 x 64 products)."""
    from threadpoolctl import threadpool_limits

    assign = np.asarray(assign)
    n = len(assign) if n is None else n
    uf = UnionFind(n) if uf is None else uf
    rows = np.repeat(np.arange(len(assign), dtype=np.int64),
                     1 if assign.ndim == 1 else assign.shape[1])
    clusters = assign.reshape(-1)
    valid = clusters >= 0
    rows, clusters = rows[valid], clusters[valid]
    order = np.argsort(clusters, kind="stable")
    rows, clusters = rows[order], clusters[order]
    bounds = np.flatnonzero(np.diff(clusters)) + 1
    del order, clusters, valid
    workers = workers or os.cpu_count() or 1

    def pairs(x: np.ndarray, members: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(pair_edges(x, members, threshold))

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[Future, int]] = deque()

        def drain(keep: int) -> None:
            while len(pending) > keep:
                job, size = pending.popleft()
                for a, b in job.result():
                    uf.union(a, b)
                if progress is not None:
                    progress(size)

        for members in np.split(rows, bounds):
            if len(members) > 1:
                members = np.unique(members)  # sorted: reads from a memory map go forward
                pending.append((pool.submit(pairs, take_vectors(vectors, members), members),
                                len(members)))
            elif progress is not None:
                progress(len(members))
            drain(2 * workers)
        drain(0)
    return uf
