"""Runs of synthetic vectors written through the store's shard writer, for the scale tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embeddings.store import Run
from embeddings.store.imported import VectorShard, write_vectors_run
from tests._index_fixtures import clustered

COLUMN = "syn_image"
RARE = "rare"


def labels_for(n: int, rare: int, seed: int = 0) -> list[str]:
    """``rare`` rows labelled ``rare`` (seeded, spread over the rows), the rest by cluster."""
    out = [f"c{i % 5}" for i in range(n)]
    for i in np.random.default_rng(seed + 7).choice(n, rare, replace=False):
        out[int(i)] = RARE
    return out


def synthetic_run(path: Path, n: int, d: int, shard_rows: Sequence[int] | int,
                  rare: int = 12, seed: int = 0, append: bool = False,
                  first_id: int = 0) -> tuple[Run, np.ndarray, list[str]]:
    """A run of ``n`` clustered unit vectors (float16) in shards of ``shard_rows`` (one
    size, or the size of each shard); ids ``r<row>``, splits train/test alternating."""
    x = clustered(n, d, seed=seed)
    labels = labels_for(n, rare, seed)
    sizes = list(shard_rows) if not isinstance(shard_rows, int) else \
        [min(shard_rows, n - s) for s in range(0, n, shard_rows)]
    assert sum(sizes) == n
    shards, start = [], 0
    for size in sizes:
        rows = range(start, start + size)
        shards.append(VectorShard(
            ids=[f"r{first_id + r}" for r in rows], vectors={COLUMN: x[start:start + size]},
            split=["train" if (first_id + r) % 2 == 0 else "test" for r in rows],
            label=labels[start:start + size],
            labels=[[lb, "all"] for lb in labels[start:start + size]]))
        start += size
    run = write_vectors_run(path, {COLUMN: d}, shards, append=append)
    return run, x.astype(np.float16).astype(np.float32), labels
