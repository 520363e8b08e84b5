"""The leakage guard and keep-list filtering: what the other stages take from ``RUN/dedup``.

A *leak* is an evaluation row (any split but ``train``) whose duplicate group (the dedup
report) holds a ``train`` row: a metric on it measures memory, not generalisation.  The
splits are the caller's (the heads stage may make its own), the groups the report's.  A
report made over other shards than the run now holds is refused (rerun dedup), never
applied to the wrong rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from embeddings.errors import RunMismatch
from embeddings.store import Run

log = logging.getLogger(__name__)
TRAIN = "train"
HINT = "rerun `python -m pipeline dedup`"


def _checked(run: Run) -> dict | None:
    summary = run.dedup.summary()
    if summary is None:
        return None
    now = [r.file for r in run.embed.manifest().shards["images"]]
    if summary["shards"] != now:
        raise RunMismatch(f"the dedup report in {run.dedup.dir} covers {len(summary['shards'])} "
                          f"image shards, the embed stage now has {len(now)} (or others): "
                          f"{HINT}")
    return summary


def leak_mask(run: Run, split: Sequence[str] | np.ndarray) -> np.ndarray | None:
    """Bool per image row: not ``train`` and a duplicate of a ``train`` row (by ``split``,
    one value per image row); None when the run has no dedup report."""
    if _checked(run) is None:
        return None
    t = run.dedup.read("groups", ["group", "row"])
    group = t.column("group").to_numpy()
    rows = t.column("row").to_numpy()
    split = np.asarray(split, dtype=object).astype(str)
    out = np.zeros(len(split), dtype=bool)
    if not len(rows):
        return out
    is_train = split[rows] == TRAIN
    has_train = np.zeros(int(group.max()) + 1, dtype=bool)
    has_train[group[is_train]] = True
    out[rows] = has_train[group] & ~is_train
    return out


def leak_counts(mask: np.ndarray, split: Sequence[str] | np.ndarray) -> dict[str, int]:
    """Leaked rows per evaluation split (every split but train, zeros included)."""
    split = np.asarray(split, dtype=object).astype(str)
    return {s: int(np.count_nonzero(mask & (split == s)))
            for s in sorted(set(split.tolist()) - {TRAIN, ""})}


def describe(counts: dict[str, int], excluded: bool) -> str:
    """One line for a stage's notes."""
    parts = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no evaluation"
    tail = ("excluded from evaluation (--exclude-leaks)" if excluded else
            "--exclude-leaks evaluates without them")
    return f"leaks: {parts} row(s) have a near-duplicate in train (RUN/dedup); {tail}"


def kept_mask(run: Run, n: int) -> np.ndarray:
    """Bool per image row: in the dedup keep-list (``--dedup``)."""
    if _checked(run) is None:
        raise RunMismatch(f"--dedup needs a dedup report: run `python -m pipeline dedup "
                          f"--run {run.path}` first")
    mask = np.zeros(n, dtype=bool)
    mask[run.dedup.keep_rows()] = True
    return mask



class Duplicates:
    """Image row -> the ids of the other members of its duplicate group (the serve page
    marks such hits), from the report's ``group``, ``row`` and ``id`` (arrays: no Python
    object per row).  Empty when there is no report, or it covers other shards."""

    SHOWN = 20  # ids listed per hit at most

    def __init__(self, run: Run) -> None:
        self.sorted_rows = np.zeros(0, dtype=np.int64)
        try:
            if _checked(run) is None:
                return
        except RunMismatch as e:
            log.warning("duplicates not marked: %s", e)
            return
        t = run.dedup.read("groups", ["group", "row", "id"])
        self.group = t.column("group").to_numpy()  # report order: sorted by group
        self.rows = t.column("row").to_numpy()
        self.ids = t.column("id").combine_chunks()
        self.order = np.argsort(self.rows, kind="stable")
        self.sorted_rows = self.rows[self.order]

    def of(self, row: int) -> list[str]:
        """Ids of the other members of ``row``'s group (none: not a duplicate)."""
        at = int(np.searchsorted(self.sorted_rows, row))
        if at == len(self.sorted_rows) or self.sorted_rows[at] != row:
            return []
        g = self.group[self.order[at]]
        lo, hi = (int(x) for x in np.searchsorted(self.group, [g, g + 1]))
        others = [lo + j for j in np.flatnonzero(self.rows[lo:hi] != row)[:self.SHOWN]]
        return self.ids.take(np.asarray(others, dtype=np.int64)).to_pylist()
