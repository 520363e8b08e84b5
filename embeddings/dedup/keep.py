"""Which row of each duplicate group to keep: rules applied in order, ties to the first row.

Rules (a list, most important first; the row number always breaks the last tie):

- ``first``: the earliest row (input order), the default.
- ``resolution``: the most pixels (``width * height``), so a thumbnail never replaces
  the original it was made from.
- ``split``: the earliest split in a preference list (default ``train, val, test``):
  keep the training copy and drop its copies from evaluation, or prefer ``test`` to keep
  a benchmark intact and thin the training set instead.

One lexicographic sort over all rows: no Python loop over groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULES = ("first", "resolution", "split")
SPLIT_ORDER = ("train", "val", "test")


def split_rank(split: Sequence[str] | np.ndarray, prefer: Sequence[str] = SPLIT_ORDER
               ) -> np.ndarray:
    """Each row's position in ``prefer`` (a split not listed, or missing, comes last)."""
    values, inverse = np.unique(np.asarray(split, dtype=object).astype(str), return_inverse=True)
    where = {s: i for i, s in enumerate(prefer)}
    ranks = np.array([where.get(v, len(prefer)) for v in values], dtype=np.int64)
    return ranks[inverse.reshape(-1)]


def representatives(labels: np.ndarray, rules: Sequence[str] | str = "first", *,
                    pixels: np.ndarray | None = None,
                    split: Sequence[str] | np.ndarray | None = None,
                    prefer: Sequence[str] = SPLIT_ORDER) -> np.ndarray:
    """``rep[row]``: the row kept for ``row``'s group (``labels`` as union-find gives them).

    ``pixels`` (width * height per row) is needed by ``resolution``, ``split`` by
    ``split``."""
    labels = np.asarray(labels, dtype=np.int64)
    rules = [rules] if isinstance(rules, str) else list(rules)
    keys: list[np.ndarray] = [np.arange(len(labels))]  # lexsort: last key is primary
    for rule in reversed(rules):
        if rule == "first":
            continue
        if rule == "resolution":
            if pixels is None:
                raise ValueError("keep rule 'resolution' needs the pixel count of each row")
            keys.append(-np.asarray(pixels, dtype=np.int64))
        elif rule == "split":
            if split is None:
                raise ValueError("keep rule 'split' needs the split of each row")
            keys.append(split_rank(split, prefer))
        else:
            raise ValueError(f"unknown keep rule {rule!r}; known: {', '.join(RULES)}")
    keys.append(labels)
    order = np.lexsort(keys)
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    best = np.empty(len(labels), dtype=np.int64)  # by label (a label is a row number)
    best[labels[order][first]] = order[first]
    return best[labels]


def keep_mask(rep: np.ndarray) -> np.ndarray:
    """Rows to keep: each group's representative and every row without duplicates."""
    return rep == np.arange(len(rep))
