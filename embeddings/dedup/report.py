"""What a grouping found, as arrays ready for Parquet: one row per member of a duplicate group.

:func:`group_report` turns union-find labels and the kept representatives into a
:class:`GroupReport` (group id, member row, id, similarity to the group's representative,
split, kept or not), only for groups of two or more, largest group first; ``to_arrow()``
gives the table a stage writes through the store.  :func:`summary` counts what a user
wants to know first; :func:`leaks` marks evaluation rows with a copy in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..fingerprint import hamming, hash_similarity
from .components import dense_groups
from .neighbours import Vectors, take_vectors

REPORT_SCHEMA = pa.schema([
    ("group", pa.int64()), ("row", pa.int64()), ("id", pa.string()),
    ("representative", pa.bool_()), ("similarity", pa.float32()), ("split", pa.string())])
SIM_BATCH = 65536


@dataclass(frozen=True)
class GroupReport:
    """Members of the duplicate groups, one entry per row, sorted by group then rank
    (representative first, then by similarity to it, then row)."""

    group: np.ndarray  # int64 group number, 0 = the largest group
    row: np.ndarray  # int64 row of the run (its position in the column)
    representative: np.ndarray  # bool: the row kept for its group
    similarity: np.ndarray  # float32 similarity to the representative (1 for itself)
    ids: np.ndarray | None = None  # object: the rows' ids, when given
    split: np.ndarray | None = None  # object: the rows' splits, when given

    def __len__(self) -> int:
        return len(self.row)

    @property
    def groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    def members(self, g: int) -> np.ndarray:
        """Rows of group ``g``, representative first."""
        lo, hi = np.searchsorted(self.group, [g, g + 1])
        return self.row[lo:hi]

    def to_arrow(self) -> pa.Table:
        n = len(self.row)
        none = pa.nulls(n, pa.string())
        return pa.Table.from_arrays([
            pa.array(self.group, pa.int64()), pa.array(self.row, pa.int64()),
            pa.array(self.ids, pa.string()) if self.ids is not None else none,
            pa.array(self.representative, pa.bool_()),
            pa.array(self.similarity, pa.float32()),
            pa.array(self.split, pa.string()) if self.split is not None else none,
        ], schema=REPORT_SCHEMA)


def vector_similarity(vectors: Vectors) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``sim(rows, reps)``: cosine of unit vectors (an array, memory map or row getter)."""
    def sim(rows: np.ndarray, reps: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float32)
        for s in range(0, len(rows), SIM_BATCH):
            a, b = rows[s:s + SIM_BATCH], reps[s:s + SIM_BATCH]
            both, inv = np.unique(np.r_[a, b], return_inverse=True)
            x = take_vectors(vectors, both)
            out[s:s + len(a)] = np.einsum("ij,ij->i", x[inv[:len(a)]], x[inv[len(a):]])
        return out
    return sim


def hash_similarity_of(hashes: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``sim(rows, reps)``: ``1 - hamming / 64`` of perceptual hashes."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    return lambda rows, reps: hash_similarity(hamming(hashes[rows], hashes[reps]))


def group_report(labels: np.ndarray, rep: np.ndarray,
                 similarity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 ids: Sequence[Any] | np.ndarray | None = None,
                 split: Sequence[Any] | np.ndarray | None = None) -> GroupReport:
    """The members of every group of two or more rows (``labels``: union-find labels;
    ``rep``: :func:`.keep.representatives`); ``similarity(rows, reps)`` fills the
    similarity column (NaN without it).  ``ids``/``split``: per-row values of the run."""
    group, _ = dense_groups(np.asarray(labels, dtype=np.int64))
    rows = np.flatnonzero(group >= 0)
    reps = np.asarray(rep)[rows]
    sims = (np.asarray(similarity(rows, reps), dtype=np.float32) if similarity is not None
            else np.full(len(rows), np.nan, dtype=np.float32))
    is_rep = rows == reps
    sims[is_rep] = 1.0
    order = np.lexsort((rows, -np.nan_to_num(sims, nan=-2.0), ~is_rep, group[rows]))
    rows = rows[order]

    def pick(values: Sequence[Any] | np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
        return arr[rows]

    return GroupReport(group[rows], rows, is_rep[order], sims[order], pick(ids), pick(split))


def summary(labels: np.ndarray, split: Sequence[Any] | np.ndarray | None = None,
            train: str = "train") -> dict[str, Any]:
    """Counts for the summary table: rows, groups of two or more, rows in them, rows a
    keep-list drops, the largest group, group sizes, and with ``split``: groups spanning
    splits and rows outside ``train`` with a copy in it, per split."""
    labels = np.asarray(labels, dtype=np.int64)
    group, sizes = dense_groups(labels)
    hist = np.bincount(sizes)
    out: dict[str, Any] = {
        "rows": len(labels), "groups": len(sizes), "rows_in_groups": int(sizes.sum()),
        "removable": int(sizes.sum() - len(sizes)),
        "largest": int(sizes.max()) if len(sizes) else 0,
        "sizes": {int(s): int(c) for s, c in enumerate(hist) if c and s >= 2}}
    if split is not None:
        split_arr = np.asarray(split, dtype=object).astype(str)
        in_group = group >= 0
        _, codes = np.unique(split_arr, return_inverse=True)
        g, c = group[in_group], codes.reshape(-1)[in_group]
        pairs = np.unique(np.stack([g, c], axis=1), axis=0) if len(g) else np.zeros((0, 2))
        out["cross_split_groups"] = int((np.bincount(pairs[:, 0].astype(np.int64))
                                         > 1).sum()) if len(pairs) else 0
        leaked = leaks(labels, split_arr, train)
        out["leaks"] = {s: int(np.count_nonzero(leaked & (split_arr == s)))
                        for s in sorted(set(split_arr.tolist()) - {train})}
    return out


def leaks(labels: np.ndarray, split: Sequence[Any] | np.ndarray, train: str = "train"
          ) -> np.ndarray:
    """Rows outside ``train`` whose group holds a ``train`` row: the evaluation rows a
    metric should be reported without."""
    labels = np.asarray(labels, dtype=np.int64)
    split_arr = np.asarray(split, dtype=object).astype(str)
    is_train = split_arr == train
    has_train = np.zeros(len(labels), dtype=bool)
    has_train[labels[is_train]] = True
    return has_train[labels] & ~is_train
