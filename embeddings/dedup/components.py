"""Union-find over row numbers, in arrays: edges arrive in batches, memory is one int64 per row.

A Python object per row or per pair would cost about 100 bytes each (100 MB per million
rows before a single edge); here the whole state is ``parent`` (8 bytes a row) and the
batch being merged.  A batch is merged by vectorised rounds of "find both roots, hook the
larger root under the smaller": links always point to a smaller row number, so there is
never a cycle, and each round hooks at least one root of every edge still between two
sets.  Finding roots halves paths as it goes (``parent[r] = parent[parent[r]]`` on every
row visited), which on the rows of a batch is pointer doubling: a chain of length L built
in one round is flattened in log2(L) rounds.

Every set's root is its smallest row, so labels are canonical: two runs over the same
edges in any order and batching give the same labels (tested against a breadth-first
search).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Edges = tuple[np.ndarray, np.ndarray]


class UnionFind:
    """Disjoint sets of ``0 .. n-1``; :meth:`union` takes arrays of edges."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The root of each row (its set's smallest row), compressing the paths visited."""
        p = self.parent
        rows = np.asarray(rows, dtype=np.int64)
        r = p[rows]
        while True:
            up = p[r]
            moving = up != r
            if not moving.any():
                break
            # Path halving on every visited node: r's parent becomes its grandparent.
            mr = r[moving]
            p[mr] = p[up[moving]]
            r = np.where(moving, p[r], r)
        p[rows] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> int:
        """Merge the sets of ``a[i]`` and ``b[i]`` for every ``i``; returns how many sets
        were merged away."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"edge arrays differ in length: {a.shape} vs {b.shape}")
        n = len(self.parent)
        if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
            raise ValueError(f"edge endpoints must be rows 0..{n - 1}")
        merged = 0
        while a.size:
            ra, rb = self.find(a), self.find(b)
            apart = ra != rb
            if not apart.any():
                break
            a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(self.parent, hi, lo)  # each root hooks under its smallest partner
            merged += len(np.unique(hi))  # hooks form a forest: each one merges two sets
        return merged

    def union_batches(self, batches: Iterable[Edges]) -> UnionFind:
        """:meth:`union` every ``(a, b)`` batch; returns ``self``."""
        for a, b in batches:
            self.union(a, b)
        return self

    def labels(self) -> np.ndarray:
        """Every row's root (the smallest row of its set), by full pointer jumping."""
        p = self.parent
        while True:
            up = p[p]
            if np.array_equal(up, p):
                return p.copy()
            p[:] = up


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Labels of the components of the graph on ``n`` rows with edges ``(a[i], b[i])``:
    each row's smallest connected row."""
    uf = UnionFind(n)
    uf.union(a, b)
    return uf.labels()


def group_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of each row's group (``labels`` as :meth:`UnionFind.labels` gives them)."""
    counts = np.bincount(labels, minlength=len(labels))
    return counts[labels]


def dense_groups(labels: np.ndarray, min_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Number the groups of at least ``min_size`` rows ``0, 1, ...``, largest first (ties:
    smallest root first).  Returns ``(group, sizes)``: ``group[row]`` (-1 for a row in a
    smaller group) and ``sizes[g]``."""
    counts = np.bincount(labels, minlength=len(labels))
    roots = np.flatnonzero(counts >= max(min_size, 1))
    order = roots[np.lexsort((roots, -counts[roots]))]
    number = np.full(len(labels), -1, dtype=np.int64)
    number[order] = np.arange(len(order))
    return number[labels], counts[order]
