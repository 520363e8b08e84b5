"""Fingerprint columns of the image shards: content digest, perceptual hash, pixel count.

The embed stage makes them from the bytes and pixels it already holds
(:mod:`embeddings.fingerprint`) and writes them beside the metadata columns of each image
shard; they are nullable (a row whose decode path made none) and absent from shards of
runs made before they existed, which read as "unknown" here, never as an error: a stage
that needs them says how many rows lack them and falls back to an embedding column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..fingerprint import Print, digest_keys
from .columns import ColumnReader

PRINT_FIELDS = pa.schema([("digest", pa.binary(16)), ("phash", pa.uint64()),
                          ("pixels", pa.int64())])


def prints_table(prints: Sequence[Print | None] | None, rows: int) -> pa.Table:
    """The fingerprint columns of ``rows`` kept images (``prints``: one per row, None
    where none was made; None for all: a decode path that makes none)."""
    prints = list(prints) if prints is not None else [None] * rows
    if len(prints) != rows:
        raise ValueError(f"{len(prints)} fingerprints for {rows} rows")
    cols = [[p[k] if p is not None else None for p in prints] for k in range(3)]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, PRINT_FIELDS)],
                                schema=PRINT_FIELDS)


@dataclass(frozen=True)
class Fingerprints:
    """The fingerprints of every image row; ``known[r]``: row ``r`` has them."""

    digests: np.ndarray  # (n, 2) uint64 keys of the xxh3_128 digests (0 where unknown)
    phash: np.ndarray  # (n,) uint64
    pixels: np.ndarray  # (n,) int64 width * height (0 where unknown)
    known: np.ndarray  # (n,) bool

    @property
    def missing(self) -> int:
        return int(len(self.known) - np.count_nonzero(self.known))


def read_prints(reader: ColumnReader, progress: Callable[[int], object] | None = None
                ) -> Fingerprints:
    """The fingerprint columns of every row, shard by shard (28 bytes a row in memory)."""
    n = reader.offsets.total
    digests = np.zeros((n, 2), dtype=np.uint64)
    phash = np.zeros(n, dtype=np.uint64)
    pixels = np.zeros(n, dtype=np.int64)
    known = np.zeros(n, dtype=bool)
    for s in range(len(reader.records)):
        lo, hi = int(reader.offsets.starts[s]), int(reader.offsets.starts[s + 1])
        if hi > lo and set(PRINT_FIELDS.names) <= set(reader.names(s)):
            t = reader.read_shard(s, PRINT_FIELDS.names)
            ok = np.asarray(t.column("digest").is_valid().to_numpy(zero_copy_only=False))
            ok &= np.asarray(t.column("phash").is_valid().to_numpy(zero_copy_only=False))
            rows = np.flatnonzero(ok)
            if len(rows):
                d = t.column("digest").combine_chunks().take(pa.array(rows))
                digests[lo + rows] = digest_keys(d.to_pylist())
                phash[lo + rows] = t.column("phash").combine_chunks().take(
                    pa.array(rows)).to_numpy()
                px = t.column("pixels").combine_chunks().take(pa.array(rows))
                pixels[lo + rows] = px.fill_null(0).to_numpy()
            known[lo:hi] = ok
        if progress is not None:
            progress(hi - lo)
    return Fingerprints(digests, phash, pixels, known)
