"""Arrays in, index out: build, measure and tune over vectors already in memory.

The convenience layer for small inputs, benchmarks and tests; the index stage streams
through :mod:`.builders` instead.  Training uses the same seeded rows as every builder
(:func:`.builders.train_rows`), so these results equal theirs for the same input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from .choice import train_size as recommended_train_size
from .core import add_vectors, as_f32, describe, set_search_params, train_index
from .recall import evaluate, truth_in_memory


def train_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The seeded training rows, sorted: drawn across the whole column."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def build_index(vectors: np.ndarray, factory: str, train_size: int | None = None,
                seed: int = 0, gpu: bool = False) -> faiss.Index:
    """Train (on a seeded sample) and fill an inner-product index; returns a CPU index."""
    x = as_f32(vectors)
    nlist, _ = describe(factory, x.shape[1])
    size = train_size or recommended_train_size(len(x), nlist, "PQ" in factory)
    index = train_index(factory, x[train_rows(len(x), size, seed)], seed, gpu)
    return add_vectors(index, x, gpu=gpu, factory=factory)


@dataclass(frozen=True)
class Measured:
    index: faiss.Index
    params: dict[str, int]
    recall: float
    queries: int
    seconds: float


def measure(index: faiss.Index, vectors: np.ndarray, k: int = 10, target_recall: float = 0.95,
            n_queries: int = 500, seed: int = 0,
            tune_params: bool = True) -> tuple[dict[str, int], float, int]:
    """(search params, recall@k vs exact, number of measuring queries) for ``index``;
    queries are a seeded sample of ``vectors`` (half tune, half measure); ties count."""
    return evaluate(index, truth_in_memory(vectors, n_queries, k, seed), target_recall,
                    tune_params)


def build_and_measure(vectors: np.ndarray, factory: str, k: int = 10,
                      target_recall: float = 0.95, n_queries: int = 500, seed: int = 0,
                      gpu: bool = False, params: dict[str, int] | None = None) -> Measured:
    """Build, tune search parameters (unless ``params`` given), measure recall@k."""
    t0 = time.perf_counter()
    index = build_index(vectors, factory, seed=seed, gpu=gpu)
    seconds = time.perf_counter() - t0
    if params:
        set_search_params(index, params)
    tuned, recall, nq = measure(index, vectors, k, target_recall, n_queries, seed,
                                tune_params=not params)
    return Measured(index, params or tuned, recall, nq, seconds)
