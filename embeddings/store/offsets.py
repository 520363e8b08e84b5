"""Rows to shards: global row ``r`` of a kind is row ``r - starts[s]`` of shard ``s``
(:class:`RowOffsets`); a chunk of a streamed column; a few rows out of a table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import FormatError

SLICE_MAX = 64  # rows read by slicing (see take); as many from a row group: its prefix


@dataclass(frozen=True)
class Chunk:
    """``vectors[i]`` is row ``start + i`` of the column (stored dtype, read-only view)."""

    start: int
    vectors: np.ndarray
    shard: int  # index of the shard in the manifest's list of this kind


class RowOffsets:
    """Global row -> (shard, row within the shard), from the manifest's row counts."""

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = tuple(records)
        self.starts = np.concatenate([[0], np.cumsum([r.rows for r in records],
                                                     dtype=np.int64)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.total):
            bad = rows[(rows < 0) | (rows >= self.total)][0]
            raise FormatError(f"row {bad} is outside the {self.total} rows of the shards: "
                              "the index and the embed stage disagree (rerun `python -m "
                              "pipeline index`)")
        return np.searchsorted(self.starts, rows, side="right") - 1

    def groups(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, positions in ``rows``, rows within the shard) for each shard touched."""
        rows = np.asarray(rows, dtype=np.int64)
        shards = self.shard_of(rows)
        order = np.argsort(shards, kind="stable")
        cuts = np.flatnonzero(np.diff(shards[order])) + 1
        for pos in np.split(order, cuts) if len(order) else []:
            s = int(shards[pos[0]])
            yield s, pos, rows[pos] - self.starts[s]


def take(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s rows at positions ``rows``.  A few rows are sliced out, not taken: a
    take loads Arrow's compute module, a tenth of a second or more of a CLI search."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > SLICE_MAX:
        return table.take(pa.Array.from_buffers(pa.int64(), len(rows),
                                                [None, pa.py_buffer(rows)]))
    if not len(rows):
        return table.slice(0, 0)
    return pa.concat_tables([table.slice(int(r), 1) for r in rows])
